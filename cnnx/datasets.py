"""Dataset readers: IDX files (MNIST, Fashion-MNIST), CIFAR-10 python batches, the embedded sample.

This module owns getting real data off the disk into plain NumPy arrays and nothing else:
images come back as ``uint8`` exactly as stored and labels as ``int64``; scaling, one-hot
encoding and splits live in :mod:`cnnx.preprocessing`. Every reader checks the file it reads
(magic numbers, lengths, shapes, label ranges) and names the file when something is wrong,
because a silently misread dataset shows up much later as a model that will not learn.

Nothing here downloads: a dataset is found on disk or the error says where it looked and how to
get it.

Where datasets are looked for
-----------------------------
``load_fashion_mnist(path)``, ``load_mnist(path)`` and ``load_cifar10(path)`` with an explicit
``path`` read that directory only (a typo must not silently fall back to another copy). With
``path=None`` they try, in order:

1. ``$CNNX_DATA/<name>`` where ``<name>`` is ``fashion-mnist``, ``mnist`` or
   ``cifar-10-batches-py``, so one ``CNNX_DATA`` directory can hold all three datasets;
2. ``$CNNX_DATA`` itself (a directory holding one dataset's files directly);
3. the system location: ``/usr/share/datasets/fashion-mnist`` (Debian package
   ``dataset-fashion-mnist``) for Fashion-MNIST, ``/usr/share/datasets/mnist`` for MNIST.

A directory counts only when it holds every file the dataset needs.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "load_idx",
    "load_fashion_mnist",
    "load_mnist",
    "load_cifar10",
    "RefusedPickleError",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
#: Class names by dataset, indexed by label id.
CLASS_NAMES = {
    "fashion-mnist": FASHION_MNIST_CLASSES,
    "mnist": MNIST_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}

DATA_ENV = "CNNX_DATA"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
MNIST_SYSTEM_DIR = Path("/usr/share/datasets/mnist")
SAMPLE_FILE = "fashion_mnist_sample.npz"

# IDX type code -> big-endian NumPy dtype (the format stores every multi-byte value big-endian).
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_MAX_DIMS = 32  # what every NumPy version accepts; real IDX files have 1 to 4
_READ_CHUNK = 1 << 20

# The four IDX files of an MNIST-style dataset, by role.
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------------
def load_idx(path):
    """Read one IDX file, gzipped or raw.

    Compression is detected from the gzip magic bytes ``1f 8b``, not from the file name, so a
    decompressed file that kept its ``.gz`` name (or the reverse) still loads. The file is read
    as a stream: the header, exactly the payload it declares and one byte more (to detect
    trailing data); a gzip stream is never decompressed beyond that.

    Parameters
    ----------
    path : str or os.PathLike
        The IDX file.

    Returns
    -------
    ndarray of shape given by the file's header
        The payload in native byte order, with the dtype the header's type code names
        (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64).
        The array owns its memory and is writable.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is a corrupt gzip stream, its magic number is wrong, its type code is not
        an IDX type code, it declares more than 32 dimensions, or its payload is shorter or
        longer than the dimensions say. The message names the file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        if not compressed:
            return _read_idx_stream(f, path, os.fstat(f.fileno()).st_size)
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as stream:
                return _read_idx_stream(stream, path, None)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from None


def _read_exactly(stream, n_bytes):
    """Up to ``n_bytes`` from ``stream`` (fewer at its end), in chunks: a gzip stream is never
    decompressed beyond what is asked, and nothing is allocated for bytes that do not come."""
    data = bytearray()
    while len(data) < n_bytes:
        chunk = stream.read(min(n_bytes - len(data), _READ_CHUNK))
        if not chunk:
            break
        data += chunk
    return data


def _read_idx_stream(stream, path, file_size):
    """Parse one IDX file from ``stream``: the header, exactly the payload it declares, and one
    byte more to detect trailing data. ``file_size`` (raw files) is checked before reading."""
    magic = _read_exactly(stream, 4)
    if len(magic) < 4:
        raise ValueError(
            f"{path}: not an IDX file: expected a 4-byte magic number, "
            f"received a file of {len(magic)} bytes"
        )
    if magic[0] != 0 or magic[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: expected the magic number to start with two zero bytes, "
            f"received: {magic.hex(' ')}"
        )
    code, ndim = magic[2], magic[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"{path}: unknown IDX type code: expected one of {known}, received: 0x{code:02X}"
        )
    if ndim == 0:
        raise ValueError(f"{path}: expected at least one dimension in the IDX header, received: 0")
    if ndim > _IDX_MAX_DIMS:
        raise ValueError(
            f"{path}: expected at most {_IDX_MAX_DIMS} dimensions in the IDX header (NumPy's limit), "
            f"received: {ndim}"
        )
    dims = _read_exactly(stream, 4 * ndim)
    header_len = 4 + 4 * ndim
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"{path}: truncated IDX header: expected {header_len} bytes for {ndim} dimensions, "
            f"received: {4 + len(dims)} bytes"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    dtype = _IDX_DTYPES[code]
    # Python ints: the product of four uint32 dimensions can overflow int64.
    expected = math.prod(shape) * dtype.itemsize
    if file_size is not None and file_size != header_len + expected:
        _payload_error(path, shape, dtype, expected, file_size - header_len)
    payload = _read_exactly(stream, expected)
    if len(payload) < expected:
        _payload_error(path, shape, dtype, expected, len(payload))
    if stream.read(1):  # one byte, never more: a huge tail is not decompressed to be measured
        raise ValueError(
            f"{path}: trailing bytes after the IDX payload: expected {expected} bytes for shape "
            f"{shape} of {dtype.name}, received more"
        )
    data = np.frombuffer(payload, dtype=dtype)
    # astype copies, which both converts to native order and detaches from the read-only bytes.
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _payload_error(path, shape, dtype, expected, received):
    what = "truncated" if received < expected else "trailing bytes after the"
    raise ValueError(
        f"{path}: {what} IDX payload: expected {expected} bytes for shape {shape} of "
        f"{dtype.name}, received: {received} bytes"
    )


def _find_idx_file(directory, stem):
    """Path of ``stem`` or ``stem.gz`` in ``directory`` (also the ``name.idx3-ubyte`` spelling
    some mirrors use), or None."""
    variants = (stem, stem.replace("-idx", ".idx"))
    for name in variants:
        for candidate in (directory / (name + ".gz"), directory / name):
            if candidate.is_file():
                return candidate
    return None


def _candidate_dirs(path, subdir, system_dir):
    """Directories to search, in order, as (directory, reason) pairs."""
    if path is not None:
        return [(Path(path), "path argument")]
    dirs = []
    env = os.environ.get(DATA_ENV)
    if env:
        dirs.append((Path(env) / subdir, f"${DATA_ENV}/{subdir}"))
        dirs.append((Path(env), f"${DATA_ENV}"))
    else:
        dirs.append((None, f"${DATA_ENV} (not set)"))
    if system_dir is not None:
        dirs.append((system_dir, "system location"))
    return dirs


def _locate(title, path, subdir, system_dir, find_files, how_to_get):
    """First candidate directory holding a complete dataset; FileNotFoundError listing all."""
    looked = []
    for directory, reason in _candidate_dirs(path, subdir, system_dir):
        if directory is None:
            looked.append(reason)
            continue
        if not directory.is_dir():
            looked.append(f"{directory} ({reason}): no such directory")
            continue
        files, missing = find_files(directory)
        if not missing:
            return files
        looked.append(f"{directory} ({reason}): missing {', '.join(missing)}")
    raise FileNotFoundError(
        f"{title} not found. Looked in:\n  " + "\n  ".join(looked) + "\n" + how_to_get
    )


def _mnist_style_files(directory):
    files, missing = {}, []
    for role, stem in _IDX_FILES.items():
        found = _find_idx_file(directory, stem)
        if found is None:
            missing.append(stem + "[.gz]")
        files[role] = found
    return files, missing


def _check_split(images, labels, images_path, labels_path, n_classes, image_shape):
    """Validate one split of an MNIST-style dataset; return (images, labels as int64)."""
    if images.dtype != np.uint8 or images.shape[1:] != image_shape or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (n, {image_shape[0]}, "
            f"{image_shape[1]}), received: {images.dtype} array of shape {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{labels_path}: expected a 1-D integer label array, received: "
            f"{labels.dtype} array of shape {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"Expected as many labels as images, received: {labels.shape[0]} labels in "
            f"{labels_path} for {images.shape[0]} images in {images_path}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"{labels_path}: expected labels in [0, {n_classes - 1}], received values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    return images, labels


def _load_mnist_style(files):
    splits = []
    for split in ("train", "test"):
        images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
        images, labels = load_idx(images_path), load_idx(labels_path)
        splits.append(_check_split(images, labels, images_path, labels_path, 10, (28, 28)))
    return tuple(splits)


def load_fashion_mnist(path=None, sample=False):
    """Load Fashion-MNIST (Zalando's 28x28 grey clothing images, 10 classes).

    Parameters
    ----------
    path : str or os.PathLike, optional
        Directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``). When
        given, only this directory is read; when None, see the module docstring for the
        search order (``$CNNX_DATA/fashion-mnist``, ``$CNNX_DATA``,
        ``/usr/share/datasets/fashion-mnist``).
    sample : bool, default False
        Load the class-stratified sample of the real dataset shipped inside cnnx
        (6000 training and 1000 test images, 600 and 100 per class) instead, so examples and
        tests run without the full download. Cannot be combined with ``path``.

    Returns
    -------
    (x_train, y_train), (x_test, y_test)
        ``x_*`` : uint8 ndarray of shape (n, 28, 28), pixel values 0..255;
        ``y_*`` : int64 ndarray of shape (n,), class ids 0..9 (names in
        ``FASHION_MNIST_CLASSES``).

    Raises
    ------
    FileNotFoundError
        If no searched directory holds all four files; the message lists every place looked.
    ValueError
        If a file is corrupt or image and label counts disagree.
    """
    if sample:
        if path is not None:
            raise ValueError(
                f"Expected either path or sample=True, not both, received: path={path!r}, "
                f"sample={sample!r}"
            )
        return _load_sample()
    files = _locate(
        "Fashion-MNIST", path, "fashion-mnist", FASHION_MNIST_SYSTEM_DIR, _mnist_style_files,
        "To get Fashion-MNIST: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
        "download the four *-ubyte.gz files from the Fashion-MNIST project and point "
        f"${DATA_ENV} (or path=) at their directory; or use load_fashion_mnist(sample=True) "
        "for the 7000-image sample shipped with cnnx.",
    )
    return _load_mnist_style(files)


def load_mnist(path=None):
    """Load MNIST (28x28 grey handwritten digits, 10 classes).

    Parameters
    ----------
    path : str or os.PathLike, optional
        Directory holding the four standard IDX files (raw or ``.gz``). When given, only this
        directory is read; when None the search order is ``$CNNX_DATA/mnist``, ``$CNNX_DATA``,
        ``/usr/share/datasets/mnist``.

    Returns
    -------
    (x_train, y_train), (x_test, y_test)
        ``x_*`` : uint8 ndarray of shape (n, 28, 28); ``y_*`` : int64 ndarray of shape (n,).

    Raises
    ------
    FileNotFoundError
        If no searched directory holds all four files; the message lists every place looked.
    ValueError
        If a file is corrupt or image and label counts disagree.
    """
    files = _locate(
        "MNIST", path, "mnist", MNIST_SYSTEM_DIR, _mnist_style_files,
        "To get MNIST: download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz and point "
        f"${DATA_ENV} (or path=) at their directory (or at a parent holding them in mnist/).",
    )
    return _load_mnist_style(files)


def _load_sample():
    resource = resources.files("cnnx") / "data" / SAMPLE_FILE
    with resources.as_file(resource) as sample_path:
        if not sample_path.is_file():
            raise FileNotFoundError(
                f"The embedded Fashion-MNIST sample is missing from the installed package "
                f"(looked for {sample_path}); reinstall cnnx or regenerate it with "
                "tools/make_sample.py."
            )
        # allow_pickle=False: the sample is plain arrays; a tampered file cannot run code.
        with np.load(sample_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    name = str(sample_path)
    train = _check_split(arrays["x_train"], arrays["y_train"], name, name, 10, (28, 28))
    test = _check_split(arrays["x_test"], arrays["y_test"], name, name, 10, (28, 28))
    return train, test


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------
def _numpy_reconstruct():
    # numpy 2 moved numpy.core to numpy._core; files pickled by either name resolve here.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RefusedPickleError(pickle.UnpicklingError):
    """A pickle asked for a global the restricted CIFAR-10 unpickler does not allow."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """Stands for ``_codecs.encode``, which Python 3 pickles of protocol 0-2 call to rebuild every
    bytes object (``encode(str, "latin1")``); nothing else that function can do is allowed."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise RefusedPickleError(
            f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): only "
            "encode(str, 'latin1'), as Python pickles bytes, is allowed"
        )
    return text.encode("latin1")


def _empty_bytes(*args):
    """Stands for ``bytes``, which protocol 0-2 pickles call without arguments for ``b""``."""
    if args:
        raise RefusedPickleError("refusing bytes() with arguments: only the empty bytes b'' is allowed")
    return b""


def _array_from_buffer(buffer, dtype, shape, order):
    """Stands for NumPy's ``_frombuffer``, which protocol-5 pickles of arrays call."""
    if not isinstance(buffer, (bytes, bytearray, pickle.PickleBuffer)) or not isinstance(dtype, np.dtype) \
            or dtype.hasobject or order not in ("C", "F") or not isinstance(shape, tuple) \
            or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RefusedPickleError("refusing numpy _frombuffer with arguments that are not a plain array")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR-10 python batch references.

    The batches are dicts of bytes keys holding lists, ints, bytes and NumPy arrays. Supported:
    the original Python 2 batches, and batches re-pickled by Python 3 with any protocol 0 to 5.
    Rebuilding them needs NumPy's ``_reconstruct``, ``ndarray`` and ``dtype`` (``_frombuffer``
    with protocol 5), and, for protocols 0 to 2, ``_codecs.encode`` and ``bytes``, which Python
    calls to rebuild bytes objects. The last three are not handed over: cnnx's stand-ins accept
    exactly the arguments Python's pickler writes (``encode(str, "latin1")``, ``bytes()``,
    a plain buffer, dtype, shape and order) and refuse anything else. Refusing every other global
    is what stops a crafted file from calling ``os.system`` and the like: a pickle can only call
    what ``find_class`` hands it.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_reconstruct(),
        ("numpy.core.numeric", "_frombuffer"): lambda: _array_from_buffer,
        ("numpy._core.numeric", "_frombuffer"): lambda: _array_from_buffer,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,
        ("__builtin__", "bytes"): lambda: _empty_bytes,
        ("builtins", "bytes"): lambda: _empty_bytes,
    }

    def __init__(self, file, path):
        # encoding="bytes": the batches were written by Python 2, whose str is bytes here.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise RefusedPickleError(
                f"{self._path}: refusing to load global {module}.{name}: a CIFAR-10 batch "
                f"only needs numpy arrays and bytes (allowed: "
                f"{', '.join(sorted(m + '.' + n for m, n in self._ALLOWED))})"
            )
        return resolve()


def _unpickle_batch(path):
    """Load one CIFAR batch file through the restricted unpickler; return its dict."""
    with open(path, "rb") as f:
        try:
            obj = _CifarUnpickler(f, path).load()
        except RefusedPickleError as exc:
            if str(path) in str(exc):
                raise
            raise RefusedPickleError(f"{path}: {exc}") from None
        except Exception as exc:  # truncated / garbage files fail in many different ways
            raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: "
                             f"{exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, received: {type(obj).__name__}")
    return obj


def _get(batch, key, path):
    # Accept str keys too, in case a batch was re-pickled by Python 3.
    for k in (key, key.decode()):
        if k in batch:
            return batch[k]
    raise ValueError(
        f"{path}: expected key {key!r} in the batch dict, received keys: {sorted(map(str, batch))}"
    )


def _read_cifar_batch(path):
    """Return (images uint8 (n, 3, 32, 32), labels int64 (n,)) from one batch file."""
    batch = _unpickle_batch(path)
    data = _get(batch, b"data", path)
    labels = _get(batch, b"labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise ValueError(f"{path}: expected b'data' as a uint8 array of shape (n, 3072), "
                         f"received: {got}")
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.asarray([], dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: expected b'labels' as {data.shape[0]} integers (one per image), "
            f"received: {labels.dtype} array of shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: expected labels in [0, 9], received values in "
                         f"[{labels.min()}, {labels.max()}]")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major: NCHW as is.
    return data.reshape(-1, 3, 32, 32), labels


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _cifar_files(directory):
    # Accept the parent of the extracted archive as well as the batch directory itself.
    if not (directory / _CIFAR_TEST).is_file() and (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    names = _CIFAR_TRAIN + (_CIFAR_TEST,)
    missing = [n for n in names if not (directory / n).is_file()]
    return {n: directory / n for n in names + ("batches.meta",)}, missing


def load_cifar10(path=None, with_label_names=False):
    """Load CIFAR-10 from its python batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    The batches are pickles; they are read with a restricted unpickler that resolves only the
    NumPy globals an array needs, so a tampered file raises instead of running code. Supported:
    the batches as distributed (pickled by Python 2) and batches re-pickled by Python 3 with any
    protocol 0 to 5, with bytes or str keys. Protocols 0 to 2 rebuild bytes objects through
    ``_codecs.encode`` and ``bytes``; these are answered by stand-ins that accept only
    ``encode(str, "latin1")`` and ``bytes()`` (what Python's pickler writes), never the real
    functions.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The ``cifar-10-batches-py`` directory or the directory containing it. When None the
        search order is ``$CNNX_DATA/cifar-10-batches-py``, ``$CNNX_DATA``.
    with_label_names : bool, default False
        Also return the class names: those in ``batches.meta`` when that file is present,
        otherwise ``CIFAR10_CLASSES``.

    Returns
    -------
    (x_train, y_train), (x_test, y_test)[, label_names]
        ``x_train`` : uint8 ndarray of shape (50000, 3, 32, 32) (NCHW);
        ``y_train`` : int64 ndarray of shape (50000,); the test split likewise with 10000;
        ``label_names`` : tuple of 10 str, only when ``with_label_names`` is True.

    Raises
    ------
    FileNotFoundError
        If no searched directory holds all six batches.
    RefusedPickleError (a pickle.UnpicklingError)
        If a batch references anything but the NumPy array globals; nothing in it is run.
    ValueError
        If a batch is unreadable or its arrays have the wrong shape or dtype.
    """
    files = _locate(
        "CIFAR-10", path, "cifar-10-batches-py", None, _cifar_files,
        "To get CIFAR-10: download and extract the 'CIFAR-10 python version' archive "
        f"(cifar-10-python.tar.gz) and point ${DATA_ENV} (or path=) at the extracted "
        "cifar-10-batches-py directory or its parent.",
    )
    parts = [_read_cifar_batch(files[n]) for n in _CIFAR_TRAIN]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_cifar_batch(files[_CIFAR_TEST])
    result = ((x_train, y_train), (x_test, y_test))
    if not with_label_names:
        return result
    return result + (_cifar_label_names(files["batches.meta"]),)


def _cifar_label_names(meta_path):
    if not meta_path.is_file():
        return CIFAR10_CLASSES
    names = _get(_unpickle_batch(meta_path), b"label_names", meta_path)
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise ValueError(f"{meta_path}: expected b'label_names' as a list of 10 names, "
                         f"received: {names!r:.200}")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
