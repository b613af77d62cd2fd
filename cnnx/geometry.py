"""Window geometry shared by functional, the layers, explain, plots, the profiler and tests.

One place turns user-facing ``kernel_size`` / ``stride`` / ``padding`` arguments into the
explicit integers the kernels take, so nothing re-derives output sizes inline.
"""
from __future__ import annotations

import numbers


def _is_int_pair(value):
    """A tuple of two exact ints (no bools, no other integer types)."""
    return type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int


def int_pair(value, name="value"):
    """Return ``value`` as a pair of ints: ``3 -> (3, 3)``, ``(2, 3) -> (2, 3)``."""
    # Fast path for what layers pass on every call (exact ints; bool is a subclass, not int itself).
    if type(value) is int:
        return (value, value)
    if _is_int_pair(value):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"Expected {name} to be an int or a pair of ints, received: {name}={value!r}")


def positive_pair(value, name):
    """``int_pair`` that also refuses values below 1 (kernel sizes, strides)."""
    pair = int_pair(value, name)
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"Expected {name} >= 1, received: {name}={value!r}")
    return pair


def conv_output_size(size, k, s, p_before, p_after=None):
    """Output length of a convolution/pooling window sliding over ``size`` elements.

    ``p_after`` defaults to ``p_before`` (symmetric padding).
    """
    if p_after is None:
        p_after = p_before
    return (size + p_before + p_after - k) // s + 1


def explicit_padding(padding, kernel_size=None, stride=(1, 1), input_size=None):
    """Normalise ``padding`` to ``((top, bottom), (left, right))``.

    Accepts an int, a pair ``(ph, pw)``, a pair of pairs, ``"valid"`` or ``"same"``.
    ``"same"`` needs ``kernel_size``; like PyTorch and Keras it puts the extra row/column of an
    even kernel at the bottom/right. With ``stride > 1`` it follows Keras/TensorFlow
    (output = ceil(input / stride)) and therefore needs ``input_size``.
    """
    if type(padding) is tuple and len(padding) == 2 and _is_int_pair(padding[0]) and _is_int_pair(padding[1]):
        result = padding  # already explicit: what the layers pass on every call, so no conversion
    elif isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return ((0, 0), (0, 0))
        if mode != "same":
            raise ValueError(f"Expected padding 'valid', 'same', an int or pairs, received: padding={padding!r}")
        if kernel_size is None:
            raise ValueError("padding='same' needs the kernel size")
        kh, kw = int_pair(kernel_size, "kernel_size")
        sy, sx = int_pair(stride, "stride")
        pads = []
        for k, s, axis in ((kh, sy, 0), (kw, sx, 1)):
            if s == 1:
                total = k - 1
            else:
                if input_size is None:
                    raise ValueError("padding='same' with stride > 1 needs the input size")
                n = input_size[axis]
                out = -(-n // s)
                total = max((out - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        return (pads[0], pads[1])
    elif isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        result = ((int(padding), int(padding)), (int(padding), int(padding)))
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        if all(isinstance(p, (tuple, list)) for p in padding):
            result = (int_pair(tuple(padding[0]), "padding"), int_pair(tuple(padding[1]), "padding"))
        else:
            ph, pw = int_pair(tuple(padding), "padding")
            result = ((ph, ph), (pw, pw))
    else:
        raise TypeError(
            "Expected padding as an int, (ph, pw), ((top, bottom), (left, right)), 'valid' or 'same', "
            f"received: padding={padding!r}"
        )
    if min(result[0] + result[1]) < 0:
        raise ValueError(f"Expected padding >= 0, received: padding={padding!r}")
    return result


def dilated_kernel_size(kernel_size, dilation):
    """The span ``(d * (k - 1) + 1)`` per axis of a ``kernel_size`` pair dilated by a ``dilation`` pair:
    what padding ("same"), output sizes and the fits-in-the-input check see."""
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel_size, dilation))


def windowed_output_size(in_hw, span, stride, pads, owner="the operation", detail=""):
    """``(out_h, out_w)`` of a window of ``span = (kh, kw)`` (dilated if so) sliding with ``stride``
    over an ``in_hw`` input padded by ``pads = ((top, bottom), (left, right))``: the one output-size
    rule of convolutions and pools, with the one check that the window fits the padded input.

    ``owner`` and ``detail`` (e.g. the dilation) only name the caller in the error message.
    """
    (pt, pb), (pl, pr) = pads
    h, w = in_hw
    kh, kw = span
    if kh > h + pt + pb or kw > w + pl + pr:
        raise ValueError(
            f"Expected a kernel no larger than the padded input: {owner} needs a padded input at least as "
            f"large as the kernel {tuple(span)}{detail}, received: input {(h, w)} padded to "
            f"{(h + pt + pb, w + pl + pr)}"
        )
    sy, sx = stride
    return conv_output_size(h, kh, sy, pt, pb), conv_output_size(w, kw, sx, pl, pr)


def check_pool_padding(pads, kernel_size, padding):
    """Refuse pooling padding wider than half the kernel (as PyTorch): every window then overlaps
    the input, so a max-pool always finds a real maximum. ``padding`` is the user's value (message)."""
    (pt, pb), (pl, pr) = pads
    kh, kw = kernel_size
    if max(pt, pb) > kh // 2 or max(pl, pr) > kw // 2:
        raise ValueError(
            f"Expected padding at most half the kernel ({kh // 2}, {kw // 2}), received: padding={padding!r}"
        )


def conv_transpose_output_size(size, k, s, padding, output_padding=0):
    """Output length of a transposed convolution (PyTorch's ``ConvTranspose2d``, dilation 1):
    ``(size - 1) * s - 2 * padding + k + output_padding``."""
    return (size - 1) * s - 2 * padding + k + output_padding
