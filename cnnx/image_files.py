"""Reading the images a user hands to the ``cnnx`` command (``predict``, ``explain``) from a .npy file.

This module owns the checks between a file on disk and an array the network may see. Everything
the header says (format, dtype, shape, size) is checked before the data is read, so a wrong or
damaged file costs no memory and gets one message that names the file, what was expected and
what was received. Then the values: the scaling rule below is the only one, and what it cannot
place is refused, never clipped or guessed.

Scaling rule (stated in ``cnnx predict --help``):

- uint8 images hold 0..255 and are divided by 255;
- float images hold values in ``[0, float_range]``; ``float_range`` is 1 (the default: used as
  they are) or 255 (divided by 255). Values outside that range, NaN or infinity are refused:
  a float image holding 0..255 read as [0, 1] would be classified confidently and wrongly.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .io import NpyVersionError, read_npy_header

__all__ = ["FLOAT_RANGES", "ImageFileError", "read_images"]

FLOAT_RANGES = (1, 255)

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class ImageFileError(ValueError):
    """An image file the command cannot use; the message is one line naming the file."""


def read_images(path, input_shape, float_range=1, what="input"):
    """Images from a .npy file as a batch shaped ``(n, *input_shape)``, values in [0, 1] or uint8.

    Parameters
    ----------
    path : str or Path
        A .npy file written by ``numpy.save``.
    input_shape : tuple of int
        ``(c, h, w)`` the network takes. Accepted arrays: ``(n, c, h, w)`` and one image
        ``(c, h, w)``; for grey models (``c == 1``) also ``(n, h, w)`` and ``(h, w)``.
    float_range : {1, 255}
        The range float images are in; 255 divides them by 255 (see the module docstring).
    what : str
        How the message names the file's argument (``"input"``, ``"--input"``).

    Returns
    -------
    ndarray of shape (n, *input_shape)
        uint8 (0..255, for the caller to divide) or floating with values in [0, 1].

    Raises
    ------
    ImageFileError
        (a ValueError) for a missing, empty, non-.npy, malformed, truncated or over-long file, a
        dtype other than uint8 / float16 / float32 / float64, a shape the network does not take,
        no images, or values outside the stated range.
    """
    if float_range not in FLOAT_RANGES:
        raise ValueError(f"Expected float_range 1 or 255, received: float_range={float_range!r}")
    path = Path(path)
    label = f"{what} {str(path)!r}"
    shape, fortran_order, dtype, offset, size = _read_header(path, label)
    _check_dtype(dtype, label)
    input_shape = tuple(int(s) for s in input_shape)
    batch_shape = _batch_shape(shape, input_shape, label)

    count = math.prod(shape)
    expected_bytes = count * dtype.itemsize
    if size - offset != expected_bytes:
        state = "truncated" if size - offset < expected_bytes else "longer than its header says"
        raise ImageFileError(
            f"{label}: {state}: expected {expected_bytes} bytes of data for shape {shape} {dtype}, "
            f"received: {size - offset}")
    with open(path, "rb") as f:
        f.seek(offset)
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:  # the file changed since its size was read
        raise ImageFileError(f"{label}: truncated: expected {count} values, received: {data.size}")
    x = data.reshape(shape, order="F" if fortran_order else "C").reshape(batch_shape)
    if x.dtype.kind == "f":
        x = _scaled_floats(x, float_range, label)
    return x


def _read_header(path, label):
    """``(shape, fortran_order, dtype, data_offset, file_size)`` from the .npy header."""
    if not path.exists():
        raise ImageFileError(f"{label}: file does not exist")
    if not path.is_file():
        raise ImageFileError(f"{label}: expected a .npy file, received: a directory or special file")
    size = path.stat().st_size
    expected = "expected a .npy array written by numpy.save"
    if size == 0:
        raise ImageFileError(f"{label}: {expected}, received: an empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            if head.startswith(_ZIP_MAGIC):
                received = "a zip archive (an .npz of several arrays?)"
            else:
                received = f"a file starting with {head!r}"
            raise ImageFileError(f"{label}: {expected}, received: {received}")
        f.seek(0)
        try:
            shape, fortran_order, dtype = read_npy_header(f)
        except NpyVersionError as exc:
            raise ImageFileError(f"{label}: {exc}") from None
        except (ValueError, EOFError, SyntaxError, TypeError, OverflowError):
            raise ImageFileError(
                f"{label}: expected a .npy header as numpy.save writes it ({{'descr': ..., "
                f"'fortran_order': ..., 'shape': (...)}}), received: {_header_text(path)!r}") from None
        if any(dim < 0 for dim in shape):
            raise ImageFileError(f"{label}: expected a .npy header with a non-negative shape, received: {shape}")
        return tuple(shape), bool(fortran_order), np.dtype(dtype), f.tell(), size


def _header_text(path, limit=80):
    """The start of a .npy header as text, for an error message."""
    with open(path, "rb") as f:
        f.seek(len(_NPY_MAGIC) + 2)
        raw = f.read(4 + limit)
    text = raw.decode("latin-1")
    start = text.find("{")
    return (text[start:] if start >= 0 else text)[:limit].rstrip()


def _check_dtype(dtype, label):
    if dtype == np.uint8 or (dtype.kind == "f" and dtype.itemsize <= 8 and not dtype.fields):
        return
    if dtype.hasobject:
        received = f"Python objects (dtype {dtype}), which cnnx never unpickles"
    else:
        received = f"dtype {dtype}"
    raise ImageFileError(
        f"{label}: expected uint8 (0..255) or float16/32/64 images, received: {received}")


def _batch_shape(shape, input_shape, label):
    """The ``(n, *input_shape)`` shape an array of ``shape`` is read as, or a clear error."""
    grey = input_shape[0] == 1
    if shape == input_shape or (grey and shape == input_shape[1:]):
        return (1,) + input_shape  # one image without a batch axis
    if shape[1:] == input_shape or (grey and len(shape) == len(input_shape) and shape[1:] == input_shape[1:]):
        if shape[0] == 0:
            raise ImageFileError(f"{label}: expected at least one image, received: an array of shape {shape}")
        return (shape[0],) + input_shape
    accepted = f"(n, {', '.join(map(str, input_shape))})"
    if grey:
        accepted += f" or (n, {', '.join(map(str, input_shape[1:]))})"
    raise ImageFileError(
        f"{label}: the model takes images of shape {input_shape}: expected an array of shape "
        f"{accepted}, or one image without the n axis, received: an array of shape {shape}")


def _scaled_floats(x, float_range, label):
    """Float images checked against ``[0, float_range]`` and brought to [0, 1]."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = x[~finite][0]
        raise ImageFileError(
            f"{label}: expected finite float images, received: {np.count_nonzero(~finite)} NaN or "
            f"infinite value(s) (the first is {bad})")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > float_range:
        hint = ""
        if float_range == 1 and lo >= 0 and hi <= 255:
            hint = "; for images in 0..255 pass --float-range 255 or save them as uint8"
        raise ImageFileError(
            f"{label}: expected float images with values in [0, {float_range}] (--float-range "
            f"{float_range}), received: values in [{lo:.6g}, {hi:.6g}]{hint}")
    if float_range == 255:
        x = x / np.asarray(255, dtype=x.dtype)
    return x
