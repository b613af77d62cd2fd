"""Validated kernels: the only caller of the compiled module ``cnnx._ops``.

Owns validation (ndim, dtypes, channel counts, geometry), contiguity, output allocation and the
one im2col + GEMM schedule of every convolution (plain, strided, dilated, grouped; its backward;
the pooled training pass; the transposed convolution): images are processed in groups small
enough that a group's column matrix stays in cache, each group is one BLAS GEMM per pass over all
its output pixels, and groups are spread over threads: inside one compiled call on the packed
float32 path, else over worker threads (``parallel.for_each_group``). Layers pass a ``Workspace``
so buffers are allocated once per batch shape, not once per call.
"""
from __future__ import annotations

import math
import operator

import numpy as np

from . import _simd
from ._simd import ops as _ops  # the build for this CPU's instruction set (cnnx._simd)
from .geometry import (
    check_pool_padding,
    conv_transpose_output_size,
    dilated_kernel_size,
    explicit_padding,
    int_pair,
    positive_pair,
    windowed_output_size,
)
from . import parallel
from .parallel import for_each_group, matmul, threads_for
from .validation import as_floating, check_int, float_array

__all__ = [
    "Workspace",
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "im2col",
    "col2im",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "linear",
    "linear_backward",
    "batch_norm_eval_backward",
    "layer_norm",
    "layer_norm_backward",
    "erf",
    "erfc",
    "normal_cdf",
    "ACTIVATIONS",
    "SOFTMAX",
]

# Target size of one group's column matrix. Measured on the project's 2-core machines: larger
# groups keep the GEMM efficient, smaller ones keep the columns in L2 (see benchmarks/README.md).
COLUMN_BUFFER_BYTES = 4 << 20


class Workspace:
    """Grow-only scratch buffers, reused from call to call (one per layer).

    ``get(name, shape, dtype)`` returns a C-contiguous array of ``shape`` that views a flat buffer
    kept under ``name``; the buffer is reallocated only when it is too small or of another dtype.
    Its contents are undefined on return.
    """

    def __init__(self):
        self._buffers = {}
        self._workers = {}

    def worker(self, index):
        """The scratch space of worker thread ``index`` (threads must not share buffers)."""
        ws = self._workers.get(index)
        if ws is None:
            ws = self._workers[index] = Workspace()
        return ws

    def get(self, name, shape, dtype):
        size = 1
        for s in shape:
            size *= s
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.size < size:
            buf = np.empty(max(size, 1), dtype=dtype)
            self._buffers[name] = buf
        return buf[:size].reshape(shape)

    def clear(self):
        self._buffers.clear()
        self._workers.clear()

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self._buffers.values()) + sum(w.nbytes for w in self._workers.values())


# --- validation helpers ----------------------------------------------------------------------

def _common_dtype(*arrays):
    """float64 if any input is float64, else float32."""
    for a in arrays:
        if a is not None and getattr(a, "dtype", None) == np.float64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def _images_and_weight(x, weight, *others, **named):
    """``x``, ``weight`` and the 4-D arrays in ``named`` (e.g. ``dy=dy``) as ``float_array``s of
    one dtype, float64 if any of them or ``others`` (a bias) is; returns ``(dtype, [arrays])``."""
    dtype = _common_dtype(x, weight, *others, *named.values())
    arrays = [float_array(x, "x", 4, dtype), float_array(weight, "weight", 4, dtype)]
    arrays += [float_array(a, name, 4, dtype) for name, a in named.items()]
    return dtype, arrays


def _check_out(out, shape, dtype, name="out"):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise ValueError(f"Expected {name} of shape {tuple(shape)} and dtype {dtype}, received: {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"Expected {name} to be a writeable C-contiguous array")
    return out


def _geometry(in_hw, kernel_size, stride, padding):
    """Resolve window geometry; return ``(kh, kw), (sy, sx), ((pt, pb), (pl, pr)), (out_h, out_w)``."""
    kh, kw = positive_pair(kernel_size, "kernel_size")
    sy, sx = positive_pair(stride, "stride")
    pads = explicit_padding(padding, (kh, kw), (sy, sx), in_hw)
    out_hw = windowed_output_size(in_hw, (kh, kw), (sy, sx), pads)
    return (kh, kw), (sy, sx), pads, out_hw


def _group_size(n, bytes_per_image):
    """Images per group: columns within COLUMN_BUFFER_BYTES, and at least 8 groups when the batch
    allows, so that worker threads stay busy. It does not depend on the thread count, which keeps
    the order of the weight-gradient sums, and so the results, identical for any thread count."""
    return int(max(1, min(COLUMN_BUFFER_BYTES // max(1, bytes_per_image), -(-n // 8))))


def _pool_geometry(x_shape, kernel_size, stride, padding):
    kh, kw = positive_pair(kernel_size, "kernel_size")
    stride = (kh, kw) if stride is None else stride
    geo = _geometry(x_shape[2:], (kh, kw), stride, padding)
    check_pool_padding(geo[2], (kh, kw), padding)
    return geo


# --- convolution -----------------------------------------------------------------------------
# One schedule for every convolution (PyTorch's conv2d: stride, padding, dilation, groups). The
# im2col puts each convolution group's input channels in a contiguous block of rows, so all the
# convolution groups of one group of images are one batched GEMM (a groups axis of length 1 for
# an ordinary convolution, which NumPy hands to BLAS as one plain GEMM). Each of the three GEMMs
# (forward, weight gradient, input gradient) has one call site: ``_conv_forward_groups``,
# ``_conv_backward_groups``, ``_fold_input_grad``. A depthwise convolution (groups == channels
# > 1) takes the direct kernel instead (no column buffer kh*kw times the input's size).
# A ``window`` is ``(kh, kw, sy, sx, dil_y, dil_x, pad_top, pad_left, out_h, out_w)``, the
# geometry arguments of ``_ops.im2col_dilated`` / ``col2im_dilated`` in their order.

def _rectifier(activation, negative_slope):
    """``(rectify, slope)`` for the kernels' fused leaky ReLU; ``activation`` None, "relu" or "leaky_relu"."""
    if activation is None:
        return False, 0.0
    if activation == "relu":
        return True, 0.0
    if activation == "leaky_relu":
        slope = float(negative_slope)
        if not slope >= 0:  # the backward reads the sign of the output, valid only for slope >= 0
            raise ValueError(f"Expected negative_slope >= 0 for the fused leaky_relu, received: {negative_slope!r}")
        return True, slope
    raise ValueError(f"Expected activation None, 'relu' or 'leaky_relu', received: activation={activation!r}")


def _conv_setup(x, weight, stride, padding, dilation=1, groups=1, bias=None, dy=None, max_pool_2x2=False):
    """Validate a convolution's arrays and geometry (for its forward, or its backward with ``dy``).

    Returns ``(x, weight, bias, dy, window, groups)``: the arrays C-contiguous in one dtype
    (float64 if any input is), ``bias`` / ``dy`` None when not given, ``window`` as above.
    """
    dtype = _common_dtype(x, weight, bias, dy)
    x = float_array(x, "x", 4, dtype)
    weight = float_array(weight, "weight", 4, dtype)
    n, c, h, w = x.shape
    oc = weight.shape[0]
    # The defaults (one group, no dilation) skip their checks: a microsecond of a small call.
    plain = type(groups) is int and groups == 1 and type(dilation) is int and dilation == 1
    if not plain:
        groups = check_int(groups, "groups", minimum=1)
        if c % groups or oc % groups:
            raise ValueError(
                f"Expected in_channels ({c}) and out_channels ({oc}) divisible by groups, received: groups={groups}"
            )
    if weight.shape[1] * groups != c:
        if groups == 1:
            raise ValueError(f"Expected weight with {c} input channels to match x.shape={x.shape}, "
                             f"received: weight.shape={weight.shape}")
        raise ValueError(
            f"Expected weight of shape ({oc}, {c // groups}, kh, kw) for {c} input channels in {groups} groups, "
            f"received: weight.shape={weight.shape}"
        )
    if bias is not None:
        bias = float_array(bias, "bias", 1, dtype)
        if bias.shape[0] != oc:
            raise ValueError(f"Expected bias of shape ({oc},), received: bias.shape={bias.shape}")
    kh, kw = weight.shape[2:]
    dil_y, dil_x = (1, 1) if plain else positive_pair(dilation, "dilation")
    span = dilated_kernel_size((kh, kw), (dil_y, dil_x)) if (dil_y, dil_x) != (1, 1) else (kh, kw)
    _, (sy, sx), ((pt, _), (pl, _)), (out_h, out_w) = _geometry((h, w), span, stride, padding)
    if max_pool_2x2 and (out_h < 2 or out_w < 2):
        raise ValueError(f"Expected a conv output of at least 2x2 to max-pool, received: {(out_h, out_w)}")
    if dy is not None:
        dy = float_array(dy, "dy", 4, dtype)
    return x, weight, bias, dy, (kh, kw, sy, sx, dil_y, dil_x, pt, pl, out_h, out_w), groups


def _is_depthwise(x, groups):
    """Whether the direct depthwise kernels run: one input channel per group, more than one group."""
    return groups > 1 and groups == x.shape[1]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, out=None, workspace=None,
           activation=None, negative_slope=0.01, max_pool_2x2=False):
    """2-D cross-correlation (PyTorch's ``conv2d``), optionally followed by a fused (leaky) ReLU
    and, for inference, a fused 2x2 / stride-2 max-pool.

    Parameters
    ----------
    x : ndarray of shape (n, c, h, w)
    weight : ndarray of shape (out_c, c // groups, kh, kw)
        Output channels ``[g * out_c // groups, (g + 1) * out_c // groups)`` see only input channels
        ``[g * c // groups, (g + 1) * c // groups)``; ``groups == c`` is a depthwise convolution.
    bias : ndarray of shape (out_c,) or None
    stride : int or (sy, sx)
    padding : int, (ph, pw), ((top, bottom), (left, right)), "valid" or "same"
        ``"same"`` pads for the dilated kernel span ``d * (k - 1) + 1``.
    dilation : int or (dy, dx), spacing between kernel taps
    groups : int, dividing both ``c`` and ``out_c``
    out : ndarray of the shape of ``y``, optional, written in place
    workspace : Workspace, optional, scratch buffers reused across calls
    activation : None, "relu" or "leaky_relu", applied in the same sweep as the bias
    negative_slope : float >= 0, the slope of "leaky_relu"
    max_pool_2x2 : bool, return ``max_pool2d(y, 2)`` instead of ``y``, computed in the same sweep
        (nothing for a backward pass is kept: inference only)

    Returns
    -------
    y : ndarray of shape (n, out_c, out_h, out_w), the dtype of ``x`` (float64 if either is);
        with ``max_pool_2x2``, of shape (n, out_c, out_h // 2, out_w // 2)
    """
    rectify, slope = _rectifier(activation, negative_slope)
    x, weight, bias, _, window, groups = _conv_setup(x, weight, stride, padding, dilation, groups, bias=bias,
                                                     max_pool_2x2=max_pool_2x2)
    n, oc, out_h, out_w = x.shape[0], weight.shape[0], window[-2], window[-1]
    dtype = x.dtype
    y_shape = (n, oc, out_h // 2, out_w // 2) if max_pool_2x2 else (n, oc, out_h, out_w)
    y = _check_out(out, y_shape, dtype)
    if y.size == 0:
        return y
    has_bias = bias is not None
    b = bias if has_bias else np.empty(0, dtype=dtype)
    if _is_depthwise(x, groups):
        kh, kw, sy, sx, dil_y, dil_x, pt, pl = window[:8]
        ws = workspace if workspace is not None else Workspace()
        full = ws.get("depthwise_y", (n, oc, out_h, out_w), dtype) if max_pool_2x2 else y
        _ops.depthwise_conv2d(x, weight, b, has_bias, sy, sx, dil_y, dil_x, pt, pl, rectify, slope, full,
                              threads_for(full.size * kh * kw))
        return max_pool2d(full, 2, out=(y, None), indices=False)[0] if max_pool_2x2 else y
    y3 = y.reshape(n, oc, -1)

    def gemm_to_output(y_gemm, first, scratch, nt):
        if max_pool_2x2:
            _ops.gemm_to_nchw_max_pool_2x2_vectorised(y_gemm, b, has_bias, rectify, slope, first, out_w, y3, nt)
        else:
            _ops.gemm_to_nchw(y_gemm, b, has_bias, rectify, slope, first, y3, nt)

    # On the packed path the tile stores write y3 themselves, pooled too unless POOLED_TILE_STORE
    # says to pool in a second pass over the GEMM layout.
    nchw = None if max_pool_2x2 and not POOLED_TILE_STORE else (b, has_bias, rectify, slope, y3)
    tile_store = _ops.conv_gemm_nchw_max_pool_2x2 if max_pool_2x2 else _ops.conv_gemm_nchw
    winograd_store = _ops.winograd_conv_nchw_max_pool_2x2 if max_pool_2x2 else _ops.winograd_conv_nchw
    _conv_forward_groups(x, weight, window, groups, gemm_to_output, workspace, nchw, tile_store, winograd_store)
    return y


def _group_split(x, window, oc, rows_per_pixel):
    """``(images per group, groups, threads inside a group)`` of an im2col + GEMM pass (see
    ``_image_groups``): one group runs OpenMP loops inside it; several run one thread each."""
    n, c = x.shape[:2]
    kh, kw, out_h, out_w = window[0], window[1], window[-2], window[-1]
    k, p = c * kh * kw, out_h * out_w
    g = _group_size(n, rows_per_pixel * p * x.dtype.itemsize)
    n_groups = -(-n // g)
    return g, n_groups, (threads_for(n * (k + oc) * p) if n_groups == 1 else 1)


def _image_groups(x, window, oc, rows_per_pixel, workspace):
    """Split the batch for an im2col + GEMM pass: groups of images whose buffers (``rows_per_pixel``
    rows of ``x``'s dtype per output pixel and image) stay within COLUMN_BUFFER_BYTES.

    Returns ``(n_groups, run)``; ``run(body)`` calls ``body(index, first, m, scratch, n_threads)``
    for every group (images ``first : first + m``) on cnnx's workers, with the worker's
    ``scratch`` and the threads the group's own loops may use.
    """
    n = x.shape[0]
    ws = workspace if workspace is not None else Workspace()
    g, n_groups, nt = _group_split(x, window, oc, rows_per_pixel)

    def run(body):
        def run_group(worker, index):
            first = index * g
            body(index, first, min(g, n - first), ws.worker(worker), nt)

        for_each_group(n_groups, run_group)

    return n_groups, run


def _unfold(x, window, first, m, scratch, n_threads):
    """The im2col ``(c*kh*kw, m, out_h*out_w)`` of images ``first : first + m``, in ``scratch``."""
    kh, kw, out_h, out_w = window[0], window[1], window[-2], window[-1]
    cols = scratch.get("cols", (x.shape[1] * kh * kw, m, out_h * out_w), x.dtype)
    _ops.im2col_dilated(x, first, *window, cols, n_threads)
    return cols


def _conv_forward_groups(x, weight, window, groups, gemm_to_output, workspace, nchw=None, tile_store=None,
                         winograd_store=None):
    """The im2col + GEMM forward of a convolution with this ``window`` and ``groups``, run by
    groups of images on cnnx's workers.

    ``gemm_to_output(y_gemm, first, scratch, n_threads)`` takes the GEMM result of images
    ``first : first + m``, laid out ``(out_c, m, P)``, and writes the caller's output (bias,
    activation and pooling as the caller fuses them), with the worker's ``scratch`` for buffers.
    ``nchw = (bias, has_bias, rectify, slope, y3)`` (optional) is ``gemm_to_nchw``'s epilogue: where
    cnnx's packed GEMM runs, it writes ``y3`` directly and ``gemm_to_output`` is not called.
    ``tile_store`` is the packed kernel that does it (default ``conv_gemm_nchw``; the pooled
    ``conv_gemm_nchw_max_pool_2x2`` and its ``_argmax`` form, whose ``nchw`` ends with the argmax).
    ``winograd_store`` is the Winograd kernel of the same form, which replaces ``tile_store``
    where ``winograd_conv`` says so.
    """
    oc = weight.shape[0]
    k = x.shape[1] * window[0] * window[1]  # c * kh * kw
    w3 = weight.reshape(groups, oc // groups, k // groups)
    out_h, out_w = window[-2], window[-1]
    plain_window = window[:4] + window[6:]
    if (nchw is not None and winograd_store is not None
            and winograd_conv(x.dtype, oc, x.shape[1], window[:2], window[2:4], window[4:6], groups, (out_h, out_w))):
        # One compiled call for the whole batch: its threads split the blocks of tiles (no groups
        # of images: the buffers are per block), the weights transformed once.
        threads = 1 if parallel.in_parallel_region() else threads_for(x.shape[0] * (k + oc) * out_h * out_w)
        transformed = _ops.winograd_weights(w3[0], x.shape[1])
        winograd_store(x, 0, x.shape[0], w3[0], *plain_window, *nchw, threads, transformed)
        return
    # The packed GEMM takes the plain convolution (one group, no dilation); window without dilation.
    packed = (groups == 1 and window[4:6] == (1, 1)
              and packed_conv_gemm(x.dtype, oc, k, out_h * out_w))

    if packed and nchw is not None and COMPILED_GROUPS:
        # Each group is one compiled call: the kernel runs the groups on its own threads.
        g, n_groups, nt = _group_split(x, window, oc, k + oc)
        threads = nt if n_groups == 1 else parallel.threads_for_groups(n_groups)
        (tile_store or _ops.conv_gemm_nchw)(x, 0, x.shape[0], w3[0], *plain_window, *nchw, threads, g)
        return
    _, run = _image_groups(x, window, oc, k + oc, workspace)

    def forward(index, first, m, scratch, nt):
        if packed and nchw is not None:
            (tile_store or _ops.conv_gemm_nchw)(x, first, m, w3[0], *plain_window, *nchw, nt)
            return
        y_gemm = scratch.get("y_gemm", (oc, m, out_h * out_w), x.dtype)
        if packed:
            _ops.conv_gemm_columns(x, first, w3[0], *plain_window, y_gemm, nt)
        else:
            cols = _unfold(x, window, first, m, scratch, nt)
            p = cols.shape[2]
            np.matmul(w3, cols.reshape(groups, k // groups, m * p), out=y_gemm.reshape(groups, oc // groups, m * p))
        gemm_to_output(y_gemm, first, scratch, nt)

    run(forward)


# Which convolution GEMMs run cnnx's packed GEMM (``_ops.conv_gemm_*``: im2col fused into the
# packing, bias and activation into the tile stores; ``_ops.gemm`` for the backward) instead of
# im2col + np.matmul: float32 only (float64 stays on BLAS; the PyTorch parity tests run in it).
# ``None`` follows the measured rules below; True / False force a path (benchmarks/conv_gemm.py
# compares the two).
PACKED_CONV_GEMM = None


# Whether a pooled convolution on the packed path (``conv2d(max_pool_2x2=True)``, and
# ``conv2d_max_pool_2x2_train`` with the argmax) pools in the GEMM's tile stores
# (``_ops.conv_gemm_nchw_max_pool_2x2[_argmax]``: only the pixels the pool keeps are computed, no
# full-size output is written) rather than writing the GEMM layout and pooling it in a second pass. Measured faster on every pooled layer of the benchmark workloads
# (docs/PERFORMANCE_LOG.md); False keeps the two passes (benchmarks/conv_gemm.py --pool-store).
POOLED_TILE_STORE = True


# Whether the packed float32 convolution's groups of images run inside one compiled call (an
# OpenMP loop, no GIL: ``_ops.conv_gemm_nchw(..., group)`` and its pooled forms, and
# ``_ops.conv_backward_groups``) rather than one call per group on Python worker threads. The
# results are the same bits; False is for comparison (docs/PERFORMANCE_LOG.md).
COMPILED_GROUPS = True


# Whether float32 3x3 stride-1 convolutions (one group, no dilation) run Winograd F(2x2, 3x3)
# (``_ops.winograd_conv_nchw`` and its pooled forms, cnnx/_winograd.pxi: 2.25x fewer multiplies,
# a different round-off) instead of the packed GEMM, in their forward (inference and training),
# their input gradient (the same convolution of dy with the flipped, transposed kernels, for a
# padding <= 2) and their weight gradient. ``None`` follows the measured rules ``winograd_conv``,
# ``winograd_input_grad`` and ``winograd_weight_grad``, and only while ``PACKED_CONV_GEMM`` is
# unset too (forcing that one forces its exact path); True / False force Winograd on / off
# (benchmarks/winograd.py compares the two).
WINOGRAD = None


def _winograd_forced(dtype, out_c, in_c, kernel, stride, dilation, groups, out_hw):
    """What settles a Winograd rule before its measurements: False where the kernels do not apply
    (not float32, not a 3x3 stride-1 undilated single-group convolution, or empty), else the path
    ``WINOGRAD`` forces, else False while ``PACKED_CONV_GEMM`` forces a GEMM path, else None."""
    if (dtype != np.float32 or tuple(kernel) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1)
            or groups != 1 or out_c == 0 or in_c == 0 or 0 in out_hw):
        return False
    if WINOGRAD is not None:
        return bool(WINOGRAD)
    return False if PACKED_CONV_GEMM is not None else None


def winograd_conv(dtype, out_c, in_c, kernel, stride, dilation, groups, out_hw):
    """Whether a convolution forward runs Winograd F(2x2, 3x3) (see ``WINOGRAD``) rather than the
    packed GEMM: a float32 3x3 stride-1 convolution, one group, no dilation, of ``in_c`` to
    ``out_c`` channels and output size ``out_hw``."""
    forced = _winograd_forced(dtype, out_c, in_c, kernel, stride, dilation, groups, out_hw)
    if forced is not None:
        return forced
    # Measured (benchmarks/winograd.py --sweep, docs/PERFORMANCE_LOG.md, Zen 5): the transforms
    # are per input and per output channel, the multiplies saved per pair, so few input channels
    # lose (3 -> 32: 0.70-0.86x); 8 input channels win at 32x32 (1.26-1.29x) and tie below; 16 or
    # more win everywhere measured (1.04-1.76x), down to 8 output channels.
    if out_c < 8:
        return False
    return in_c >= 16 or (in_c >= 8 and out_hw[0] * out_hw[1] >= 1024)


def winograd_input_grad(dtype, out_c, in_c, kernel, stride, dilation, groups, in_hw, padding):
    """Whether a convolution's input gradient runs Winograd F(2x2, 3x3) (see ``WINOGRAD``): the
    convolution of dy (``out_c`` channels) with the flipped, transposed kernels into ``in_c``
    channels of size ``in_hw``, padded 2 - the forward's top / left ``padding`` (so at most 2)."""
    if padding[0] > 2 or padding[1] > 2:
        return False
    forced = _winograd_forced(dtype, in_c, out_c, kernel, stride, dilation, groups, in_hw)
    if forced is not None:
        return forced
    # Measured (benchmarks/winograd.py --sweep): here the output side is the input channels, and
    # few of them lose (8: 0.80-1.10x of the whole backward); 16 or more win (1.0-1.7x).
    return in_c >= 16 and out_c >= 8


def winograd_weight_grad(dtype, out_c, in_c, kernel, stride, dilation, groups, out_hw):
    """Whether a convolution's weight gradient runs Winograd F(2x2, 3x3) (see ``WINOGRAD``): the
    16 GEMMs, over the tiles, of ``A dy A^T`` (``out_c`` channels) and ``B^T x B`` (``in_c``
    channels), both channels-last."""
    forced = _winograd_forced(dtype, out_c, in_c, kernel, stride, dilation, groups, out_hw)
    if forced is not None:
        return forced
    # Measured (benchmarks/winograd.py --sweep, the dW column): the input channels are the GEMM's
    # vector side (NR = 32 on AVX-512, zero-padded), so 32 or more win (1.19-3.0x against the
    # implicit-im2col kernel), 16 lose at 32x32 (0.79-0.82x), 8 or fewer everywhere.
    return in_c >= 32 and out_c >= 8


def _forced_path(dtype, empty, switch):
    """What settles a packed-GEMM rule before its measurements: False where cnnx's GEMMs do not
    run (not float32, or an empty product), else the path ``switch`` forces (True / False), else
    None (the measured rule decides)."""
    if dtype != np.float32 or empty:
        return False
    return None if switch is None else bool(switch)


def packed_conv_gemm(dtype, out_c, k, pixels):
    """Whether a convolution forward with GEMM ``(out_c, k) @ (k, pixels per image)`` runs cnnx's
    packed GEMM (see ``PACKED_CONV_GEMM``; the figures behind the rule are in docs/PERFORMANCE_LOG.md)."""
    forced = _forced_path(dtype, k == 0, PACKED_CONV_GEMM)
    if forced is not None:
        return forced
    # Measured per layer (docs/PERFORMANCE_LOG.md, Zen 5): 1.05-2.6x faster on every conv layer of
    # the benchmark workloads, against OpenBLAS with its AVX2 (Haswell) or AVX-512 kernels.
    return True


def packed_backward_gemm(dtype, out_c, k, pixels):
    """``(weight gradient, column gradient)``: whether each GEMM of a convolution backward (``dW =
    dY @ cols.T``, ``dcols = W.T @ dY``) runs cnnx's packed GEMM (``_ops.gemm``) instead of np.matmul
    (see ``PACKED_CONV_GEMM``). The weight gradient's answer matters only where
    ``implicit_weight_grad`` does not apply (dilated convolutions)."""
    forced = _forced_path(dtype, k == 0, PACKED_CONV_GEMM)
    if forced is not None:
        return forced, forced
    # Measured (docs/PERFORMANCE_LOG.md, Zen 5): dcols wins or ties from k = 12 on, loses at k = 4;
    # dW (a reduction over the pixels, B packed transposed) wins only for k >= 288 and only against
    # a BLAS running narrower kernels than cnnx's build.
    dweight = k >= 256 and _simd.blas_narrower_than_kernels()
    return dweight, k >= 8


def implicit_weight_grad(dtype, out_c, k, pixels):
    """Whether a convolution's weight gradient ``dW = dY @ cols.T`` (GEMM ``(out_c, pixels) @
    (pixels, k)`` per image) runs ``_ops.conv_weight_grad``: the reduction over the pixels in the
    vectors, the taps read from the padded images (no im2col matrix), instead of im2col +
    np.matmul (see ``PACKED_CONV_GEMM``)."""
    forced = _forced_path(dtype, k == 0, PACKED_CONV_GEMM)
    if forced is not None:
        return forced
    # Measured per layer (docs/PERFORMANCE_LOG.md, Zen 5): faster than im2col + OpenBLAS on every
    # conv layer of the benchmark workloads, with its AVX2 (Haswell) or AVX-512 kernels.
    return True


def conv2d_backward(dy, x, weight, stride=1, padding=0, dilation=1, groups=1, need_dx=True, out=None,
                    workspace=None, activation=None, negative_slope=0.01, y=None):
    """Gradients of ``conv2d`` with respect to its input, weight and bias.

    Parameters
    ----------
    dy : ndarray of shape (n, out_c, out_h, out_w), upstream gradient
    x : ndarray of shape (n, c, h, w), the forward input
    weight : ndarray of shape (out_c, c // groups, kh, kw)
    stride, padding, dilation, groups : as given to ``conv2d``
    need_dx : bool, skip the input gradient when False (a network's first layer)
    out : ndarray of shape (n, c, h, w), optional, receives dx
    workspace : Workspace, optional
    activation, negative_slope : the fused activation given to ``conv2d``; then ``dy`` is the
        gradient of its output and ``y`` must be that output

    Returns
    -------
    dx : ndarray of shape (n, c, h, w), or None when ``need_dx`` is False
    dweight : ndarray of shape (out_c, c // groups, kh, kw)
    dbias : ndarray of shape (out_c,)
    """
    x, weight, _, dy, window, groups = _conv_setup(x, weight, stride, padding, dilation, groups, dy=dy)
    n, c = x.shape[:2]
    oc, out_h, out_w = weight.shape[0], window[-2], window[-1]
    rectify, slope, y = _backward_activation(dy, (n, oc, out_h, out_w), y, activation, negative_slope, "conv2d")
    dx = _check_out(out, x.shape, x.dtype, "out") if need_dx else None
    if n == 0 or out_h * out_w == 0 or c == 0:
        return _empty_backward(dx, dy, y, rectify, slope, weight.shape)
    if _is_depthwise(x, groups):
        return _depthwise_backward(dy, x, weight, window, dx, rectify, slope, y, workspace)
    dy3 = dy.reshape(n, oc, -1)
    y3 = y.reshape(n, oc, -1)

    def dy_to_gemm(first, dy_gemm, dbias_part, nt):
        _ops.nchw_to_gemm(dy3, y3, rectify, slope, first, dy_gemm, dbias_part, nt)

    dweight, dbias = _conv_backward_groups(x, weight, window, groups, dy_to_gemm, dx, workspace,
                                           (dy3, y3, None, rectify, slope))
    return dx, dweight, dbias


def _conv_backward_groups(x, weight, window, groups, dy_to_gemm, dx, workspace, layout=None):
    """The im2col + GEMM backward of a convolution with this ``window`` and ``groups``, run by
    groups of images on cnnx's workers.

    ``dy_to_gemm(first, dy_gemm, dbias_part, n_threads)`` writes the output gradient of images
    ``first : first + m`` in GEMM layout ``(out_c, m, P)`` (through the fused activation, and the
    pool's argmax where there is one) and their per-image bias gradients ``(m, out_c)``. ``dx``
    (or None) receives the input gradient. ``layout = (dy3, y3, argmax3 or None, rectify, slope)``,
    what ``dy_to_gemm`` reads, lets the plain float32 convolution run all of it in one compiled
    call (``_ops.conv_backward_groups``, the same kernels). Returns ``(dweight, dbias)``.
    """
    n, oc = x.shape[0], weight.shape[0]
    k = x.shape[1] * window[0] * window[1]  # c * kh * kw
    kg, ocg = k // groups, oc // groups
    w3 = weight.reshape(groups, ocg, kg)
    ws = workspace if workspace is not None else Workspace()
    dbias_partial = np.empty((n, oc), dtype=np.float64)
    p = window[-2] * window[-1]
    # The weight gradient straight from the images (no column matrix) for the plain convolution.
    implicit_dweight = (groups == 1 and window[4:6] == (1, 1)
                        and implicit_weight_grad(x.dtype, oc, k, p))
    packed_dweight = groups == 1 and packed_backward_gemm(x.dtype, oc, k, p)[0]
    plain_window = window[:4] + window[6:]
    # The input gradient by Winograd: the convolution of dy with the flipped, transposed kernels,
    # padded 2 - the forward's padding (transformed once for all groups); the weight gradient too.
    pt, pl = window[6:8]
    winograd_dx = dx is not None and winograd_input_grad(x.dtype, oc, x.shape[1], window[:2], window[2:4], window[4:6],
                                                         groups, x.shape[2:], (pt, pl))
    winograd_dweight = winograd_weight_grad(x.dtype, oc, x.shape[1], window[:2], window[2:4], window[4:6], groups,
                                            window[-2:])
    if winograd_dx:
        flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)).reshape(x.shape[1], -1)
        transformed_dx = _ops.winograd_weights(flipped, oc)
    # Rows per output pixel a group holds: dy in GEMM layout and the column buffers; on the Winograd
    # steps its weight gradient's channels-last copies and the GEMM steps that remain (larger
    # groups than the GEMM path's: fewer calls from Python).
    rows = 2 * k + oc
    if winograd_dx or winograd_dweight:
        rows = 2 * oc + x.shape[1] if winograd_dweight else oc + (0 if implicit_dweight else k)
        rows += 0 if dx is None or winograd_dx else k
    g, n_groups, _ = _group_split(x, window, oc, rows)
    # Each group's weight gradient is kept apart and the parts summed in group order afterwards:
    # the same sums in the same order whichever thread computed which part.
    dweight_parts = ws.get("dweight_parts", (n_groups, groups, ocg, kg), x.dtype)
    compiled = (COMPILED_GROUPS and layout is not None and implicit_dweight and n_groups > 1 and p > 0
                and not winograd_dx and not winograd_dweight
                and (dx is None or packed_backward_gemm(x.dtype, oc, k, p)[1]))
    if compiled:
        threads = parallel.threads_for_groups(n_groups)
        scratch = ws.get("backward_scratch", (threads, (oc + k) * g * p), x.dtype)
        dy3, y3, argmax3, rectify, slope = layout
        pooled = argmax3 is not None
        _ops.conv_backward_groups(x, dy3, y3, argmax3 if pooled else _NO_CODES, pooled, rectify, slope, w3[0],
                                  *plain_window, g, dbias_partial, dweight_parts.reshape(n_groups, oc, k),
                                  dx if dx is not None else _NO_IMAGES, dx is not None, scratch, threads)
        return _sum_group_gradients(dweight_parts, dbias_partial, weight.shape, x.dtype)
    _, run = _image_groups(x, window, oc, rows, ws)

    def backward(index, first, m, scratch, nt):
        dy_gemm = scratch.get("dy_gemm", (oc, m, p), x.dtype)
        dy_to_gemm(first, dy_gemm, dbias_partial[first:first + m], nt)
        dy_g = dy_gemm.reshape(groups, ocg, m * p)
        if winograd_dweight:
            _ops.winograd_conv_weight_grad(x, first, dy_gemm, pt, pl, window[-2], window[-1], dweight_parts[index, 0])
        elif implicit_dweight:
            _ops.conv_weight_grad(x, first, dy_gemm, *plain_window, dweight_parts[index, 0], nt)
        else:
            cols = _unfold(x, window, first, m, scratch, nt)
            if packed_dweight:
                _ops.gemm(dy_g[0], cols.reshape(kg, m * p).T, dweight_parts[index, 0], nt)
            else:
                np.matmul(dy_g, cols.reshape(groups, kg, m * p).transpose(0, 2, 1), out=dweight_parts[index])
        if winograd_dx:
            _ops.winograd_conv_input_grad(dy_gemm, window[-2], window[-1], transformed_dx, 2 - pt, 2 - pl, dx, first,
                                          nt)
        elif dx is not None:
            _fold_input_grad(w3, dy_g, first, m, window, dx, scratch, nt)

    run(backward)
    return _sum_group_gradients(dweight_parts, dbias_partial, weight.shape, x.dtype)


# Placeholders for ``_ops.conv_backward_groups``'s arguments it does not read (no pool, no dx).
_NO_CODES = np.zeros((1, 1, 1), dtype=np.int32)
_NO_IMAGES = np.zeros((1, 1, 1, 1), dtype=np.float32)


def _sum_group_gradients(dweight_parts, dbias_partial, weight_shape, dtype):
    """``(dweight, dbias)`` from the groups' weight gradients, summed in group order, and the
    per-image bias-gradient sums."""
    dweight = dweight_parts[0].copy()
    for part in dweight_parts[1:]:
        dweight += part
    return dweight.reshape(weight_shape), dbias_partial.sum(axis=0).astype(dtype)


def _fold_input_grad(w3, dy3, first, m, window, dx, scratch, n_threads):
    """A convolution's input gradient for images ``first : first + m``: ``dx[first : first + m] =
    col2im(w3^T @ dy3)`` per convolution group, with ``w3 (groups, out_c // groups, k // groups)``
    and ``dy3 (groups, out_c // groups, m * P)`` in GEMM layout. Also the forward of the
    transposed convolution (``conv_transpose2d``), which is this adjoint."""
    groups, _, kg = w3.shape
    mp = dy3.shape[2]
    dcols = scratch.get("dcols", (groups * kg, m, mp // max(m, 1)), dy3.dtype)
    if groups == 1 and packed_backward_gemm(dy3.dtype, w3.shape[1], kg, mp // max(m, 1))[1]:
        _ops.gemm(w3[0].T, dy3[0], dcols.reshape(kg, mp), n_threads)
    else:
        np.matmul(w3.transpose(0, 2, 1), dy3, out=dcols.reshape(groups, kg, mp))
    _ops.col2im_dilated(dcols, first, *window, dx, n_threads)


def _backward_activation(dy, expected, y, activation, negative_slope, op):
    """Check a convolution backward's ``dy`` (shape ``expected``) and, with a fused ``activation``,
    its forward output ``y``; return ``(rectify, slope, y)`` for the layout pass (``y`` is ``dy``,
    unread, without an activation)."""
    if dy.shape != expected:
        raise ValueError(f"Expected dy of shape {expected}, received: dy.shape={dy.shape}")
    rectify, slope = _rectifier(activation, negative_slope)
    if not rectify:
        return rectify, slope, dy
    if y is None:
        raise ValueError(f"Expected y, the output of {op}, with activation={activation!r}")
    y = float_array(y, "y", 4, dy.dtype)
    if y.shape != dy.shape:
        raise ValueError(f"Expected y of the shape of dy {dy.shape}, received: y.shape={y.shape}")
    return rectify, slope, y


def _empty_backward(dx, dy, y, rectify, slope, weight_shape):
    """The gradients of a convolution with no output pixels or no images (nothing for the GEMMs)."""
    if dx is not None:
        dx[...] = 0
    dz = dy if not rectify else np.where(y > 0, dy, dy * slope)
    return dx, np.zeros(weight_shape, dtype=dy.dtype), dz.sum(axis=(0, 2, 3))


def _depthwise_backward(dy, x, weight, window, dx, rectify, slope, y, workspace):
    """``conv2d_backward`` for ``groups == in_channels`` with the direct kernel."""
    kh, kw, sy, sx, dil_y, dil_x, pt, pl = window[:8]
    n, oc = dy.shape[0], weight.shape[0]
    ws = workspace if workspace is not None else Workspace()
    dz = np.where(y > 0, dy, dy * dy.dtype.type(slope)) if rectify else dy
    dweight_partial = ws.get("depthwise_dweight", (n, oc, kh * kw), dy.dtype)
    dbias_partial = ws.get("depthwise_dbias", (n, oc), np.dtype(np.float64))
    need_dx = dx is not None
    _ops.depthwise_conv2d_backward(dz, x, weight, sy, sx, dil_y, dil_x, pt, pl, need_dx,
                                   dx if need_dx else _NO_DX.astype(dy.dtype), dweight_partial, dbias_partial,
                                   threads_for(x.size * kh * kw))
    # Summed over images here, in one fixed order: identical for any thread count.
    dweight = dweight_partial.sum(axis=0).reshape(weight.shape)
    return dx, dweight, dbias_partial.sum(axis=0).astype(dy.dtype)


_NO_DX = np.zeros((1, 1, 1, 1))  # never written (need_dx=False)


# --- im2col / col2im (public, image-major layout) ---------------------------------------------

def im2col(x, kernel_size, stride=1, padding=0, out=None):
    """Unfold sliding windows into columns.

    Parameters
    ----------
    x : ndarray of shape (n, c, h, w)

    Returns
    -------
    cols : ndarray of shape (n, c*kh*kw, out_h*out_w); row ``(ci*kh + ki)*kw + kj``, column
        ``oy*out_w + ox`` (PyTorch's ``unfold`` layout)
    """
    x = float_array(x, "x", 4)
    n, c, h, w = x.shape
    (kh, kw), (sy, sx), ((pt, _), (pl, _)), (out_h, out_w) = _geometry((h, w), kernel_size, stride, padding)
    k, p = c * kh * kw, out_h * out_w
    result = _check_out(out, (n, k, p), x.dtype)
    cols = np.empty((k, n, p), dtype=x.dtype)
    _ops.im2col(x, 0, kh, kw, sy, sx, pt, pl, out_h, out_w, cols, threads_for(cols.size))
    result[...] = cols.transpose(1, 0, 2)
    return result


def col2im(cols, x_shape, kernel_size, stride=1, padding=0, out=None):
    """Adjoint of ``im2col``: sum each column entry back into the image position it came from.

    Parameters
    ----------
    cols : ndarray of shape (n, c*kh*kw, out_h*out_w)
    x_shape : tuple (n, c, h, w)

    Returns
    -------
    x : ndarray of shape ``x_shape``
    """
    x_shape = _shape4(x_shape, "x_shape")
    cols = float_array(cols, "cols", 3)
    n, c, h, w = x_shape
    (kh, kw), (sy, sx), ((pt, _), (pl, _)), (out_h, out_w) = _geometry((h, w), kernel_size, stride, padding)
    expected = (n, c * kh * kw, out_h * out_w)
    if cols.shape != expected:
        raise ValueError(f"Expected cols of shape {expected} for x_shape={x_shape}, received: cols.shape={cols.shape}")
    x = _check_out(out, x_shape, cols.dtype)
    gemm_layout = np.ascontiguousarray(cols.transpose(1, 0, 2))
    _ops.col2im(gemm_layout, 0, kh, kw, sy, sx, pt, pl, out_h, out_w, x, threads_for(cols.size))
    return x


def _shape4(shape, name):
    """``shape`` as a tuple of 4 non-negative ints; anything that is not an integer is refused.

    ``int()`` would truncate 8.7 to 8 and a string would iterate into digits ('2338' -> 2, 3, 3,
    8), so every entry must be an integer (``operator.index``: int, NumPy integers; not bool).
    """
    received = f"{name}={shape!r}"
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list, np.ndarray)):
        raise TypeError(f"Expected {name} as a tuple of 4 ints (n, c, h, w), received: {received}")
    entries = []
    for s in shape:
        if isinstance(s, (bool, np.bool_)):
            raise TypeError(f"Expected {name} as a tuple of 4 ints (n, c, h, w), received: {received}")
        try:
            entries.append(operator.index(s))
        except TypeError:
            raise TypeError(f"Expected {name} as a tuple of 4 ints (n, c, h, w), received: {received}") from None
    if len(entries) != 4 or min(entries) < 0:
        raise ValueError(f"Expected {name} as 4 non-negative ints (n, c, h, w), received: {received}")
    return tuple(entries)


# --- pooling -----------------------------------------------------------------------------------

_NO_INDICES = np.zeros((1, 1, 1, 1), dtype=np.int64)  # never written (with_indices=False)


def max_pool2d(x, kernel_size, stride=None, padding=0, out=None, indices=True):
    """Max pooling with argmax indices.

    Parameters
    ----------
    x : ndarray of shape (n, c, h, w)
    kernel_size : int or (kh, kw)
    stride : int or (sy, sx), default ``kernel_size``
    padding : int or pairs, at most half the kernel; padding never wins the max
    out : (y, indices) pair of arrays to write into, optional
    indices : bool, False skips the argmax (inference) and returns None in its place

    Returns
    -------
    y : ndarray of shape (n, c, out_h, out_w)
    indices : int64 ndarray of shape (n, c, out_h, out_w), flat ``iy * w + ix`` of each window's
        first maximum (PyTorch's convention), or None
    """
    x = float_array(x, "x", 4)
    n, c, h, w = x.shape
    (kh, kw), (sy, sx), ((pt, _), (pl, _)), (out_h, out_w) = _pool_geometry(x.shape, kernel_size, stride, padding)
    y_out, idx_out = (None, None) if out is None else out
    y = _check_out(y_out, (n, c, out_h, out_w), x.dtype, "out[0]")
    if not indices:
        _ops.max_pool2d(x, kh, kw, sy, sx, pt, pl, y, _NO_INDICES, False, threads_for(x.size))
        return y, None
    argmax = _check_out(idx_out, (n, c, out_h, out_w), np.dtype(np.int64), "out[1]")
    _ops.max_pool2d(x, kh, kw, sy, sx, pt, pl, y, argmax, True, threads_for(x.size))
    return y, argmax


def max_pool2d_backward(dy, indices, x_shape, out=None):
    """Route each output gradient to its window's argmax (``indices`` from ``max_pool2d``).

    Returns
    -------
    dx : ndarray of shape ``x_shape``
    """
    x_shape = _shape4(x_shape, "x_shape")
    dy = float_array(dy, "dy", 4)
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
        raise TypeError(f"Expected integer indices from max_pool2d, received: {getattr(indices, 'dtype', type(indices))}")
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    if indices.shape != dy.shape:
        raise ValueError(f"Expected indices of the shape of dy {dy.shape}, received: indices.shape={indices.shape}")
    n, c, h, w = x_shape
    if dy.shape[:2] != (n, c):
        raise ValueError(f"Expected dy with batch and channels {(n, c)} of x_shape, received: dy.shape={dy.shape}")
    if out is not None and indices.size:
        # Validate before writing into the caller's array. Seen as uint64, a negative index is
        # huge, so one max finds both kinds of bad index. (Without ``out`` the kernel's own count
        # suffices: it writes into a fresh array that is dropped when it raises.)
        if int(indices.view(np.uint64).max()) >= h * w:
            bad = int(np.count_nonzero((indices < 0) | (indices >= h * w)))
            raise ValueError(f"Expected indices in [0, {h * w}) for x_shape={x_shape}, received: {bad} out of range")
    dx = _check_out(out, x_shape, dy.dtype)
    bad = _ops.max_pool2d_backward(dy, indices, dx.reshape(n, c, h * w), threads_for(dx.size))
    if bad:
        raise ValueError(f"Expected indices in [0, {h * w}) for x_shape={x_shape}, received: {bad} out of range")
    return dx


def avg_pool2d(x, kernel_size, stride=None, padding=0, out=None):
    """Average pooling; zero padding counts toward the mean (PyTorch's ``count_include_pad=True``).

    Returns
    -------
    y : ndarray of shape (n, c, out_h, out_w)
    """
    x = float_array(x, "x", 4)
    n, c, h, w = x.shape
    (kh, kw), (sy, sx), ((pt, _), (pl, _)), (out_h, out_w) = _pool_geometry(x.shape, kernel_size, stride, padding)
    y = _check_out(out, (n, c, out_h, out_w), x.dtype)
    _ops.avg_pool2d(x, kh, kw, sy, sx, pt, pl, y, threads_for(x.size))
    return y


def avg_pool2d_backward(dy, x_shape, kernel_size, stride=None, padding=0, out=None):
    """Gradient of ``avg_pool2d``: each output gradient spread evenly over its window.

    Returns
    -------
    dx : ndarray of shape ``x_shape``
    """
    x_shape = _shape4(x_shape, "x_shape")
    dy = float_array(dy, "dy", 4)
    n, c, h, w = x_shape
    (kh, kw), (sy, sx), ((pt, _), (pl, _)), (out_h, out_w) = _pool_geometry(x_shape, kernel_size, stride, padding)
    if dy.shape != (n, c, out_h, out_w):
        raise ValueError(f"Expected dy of shape {(n, c, out_h, out_w)}, received: dy.shape={dy.shape}")
    dx = _check_out(out, x_shape, dy.dtype)
    _ops.avg_pool2d_backward(dy, kh, kw, sy, sx, pt, pl, dx, threads_for(dx.size))
    return dx


# --- per-element passes (activations, dropout, loss, optimizers, batch norm) ---------------------
# Each wrapper takes arrays of any shape, checks that they agree, and hands the kernels flat
# C-contiguous views; ``out`` may be one of the inputs (in place). Only float32 / float64 run
# compiled: ``compiled_dtype`` tells a caller when to take its NumPy path instead (float16).

_COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Whether the compiled sigmoid / tanh-GELU beat NumPy's: their exp is a vectorised polynomial in
# double precision, 2-8x faster than NumPy's with AVX2 + FMA or AVX-512 and several times slower
# in the SSE2 baseline build (measured on AMD EPYC Zen 5, benchmarks/elementwise.py). NumPy's
# float tanh is faster still, so the layers keep np.tanh for tanh itself.
SIMD_TRANSCENDENTALS = _simd.ISA != "baseline"


def compiled_dtype(*arrays):
    """True when every array is a float32 or float64 ndarray of one common dtype (and shape)."""
    first = arrays[0]
    if not isinstance(first, np.ndarray) or first.dtype not in _COMPILED_DTYPES:
        return False
    return all(isinstance(a, np.ndarray) and a.dtype == first.dtype and a.shape == first.shape for a in arrays[1:])


def _flat_inputs(*arrays):
    """Flat C-contiguous views (copies only where an input is not contiguous) of same-shape arrays."""
    first = arrays[0]
    for a in arrays[1:]:
        if a.shape != first.shape or a.dtype != first.dtype:
            raise ValueError(
                f"Expected arrays of one shape and dtype {first.shape} {first.dtype}, received: {a.shape} {a.dtype}"
            )
    return [np.ascontiguousarray(a).reshape(-1) for a in arrays]


def _flat_out(out, like):
    """``(out, flat view to write)``: a new array when ``out`` is None; a scratch copy target when
    ``out`` is not contiguous (the caller copies back with ``_finish``)."""
    if out is None:
        out = np.empty(like.shape, dtype=like.dtype)
    elif out.shape != like.shape or out.dtype != like.dtype:
        raise ValueError(f"Expected out of shape {like.shape} and dtype {like.dtype}, received: {out.shape} {out.dtype}")
    if out.flags.c_contiguous and out.flags.writeable:
        return out, out.reshape(-1)
    return out, np.empty(like.size, dtype=like.dtype)


def _finish(out, flat):
    if not np.shares_memory(out, flat):
        out[...] = flat.reshape(out.shape)
    return out


def leaky_relu(x, negative_slope=0.01, out=None):
    """``x if x > 0 else negative_slope * x`` elementwise (``negative_slope=0`` is ReLU).

    Parameters
    ----------
    x : ndarray of any shape, float32 or float64
    out : ndarray of x's shape and dtype, optional (may be ``x``)

    Returns
    -------
    y : ndarray of x's shape and dtype
    """
    (xf,) = _flat_inputs(x)
    out, yf = _flat_out(out, x)
    _ops.leaky_relu_forward(xf, float(negative_slope), yf, threads_for(xf.size))
    return _finish(out, yf)


def leaky_relu_backward(dy, ref, negative_slope=0.01, out=None):
    """``dy if ref > 0 else negative_slope * dy``: ``ref`` is the forward output when
    ``negative_slope >= 0`` (same sign as the input), else the forward input.

    Returns
    -------
    dx : ndarray of dy's shape and dtype
    """
    dyf, rf = _flat_inputs(dy, ref)
    out, dxf = _flat_out(out, dy)
    _ops.leaky_relu_backward(dyf, rf, float(negative_slope), dxf, threads_for(dyf.size))
    return _finish(out, dxf)


def sigmoid(x, out=None):
    """``1 / (1 + exp(-x))`` elementwise, without overflow (computed in double precision)."""
    (xf,) = _flat_inputs(x)
    out, yf = _flat_out(out, x)
    _ops.sigmoid_forward(xf, yf, threads_for(8 * xf.size))
    return _finish(out, yf)


def tanh(x, out=None):
    """``tanh(x)`` elementwise."""
    (xf,) = _flat_inputs(x)
    out, yf = _flat_out(out, x)
    _ops.tanh_forward(xf, yf, threads_for(8 * xf.size))
    return _finish(out, yf)


def sigmoid_backward(dy, y, out=None):
    """``dy * y * (1 - y)`` from the sigmoid's output ``y``."""
    dyf, yf = _flat_inputs(dy, y)
    out, dxf = _flat_out(out, dy)
    _ops.sigmoid_tanh_backward(dyf, yf, False, dxf, threads_for(dyf.size))
    return _finish(out, dxf)


def tanh_backward(dy, y, out=None):
    """``dy * (1 - y^2)`` from tanh's output ``y``."""
    dyf, yf = _flat_inputs(dy, y)
    out, dxf = _flat_out(out, dy)
    _ops.sigmoid_tanh_backward(dyf, yf, True, dxf, threads_for(dyf.size))
    return _finish(out, dxf)


def gelu(x, approximate="none", out=None):
    """GELU ``x Phi(x)`` (``approximate="none"``) or ``x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) / 2``."""
    (xf,) = _flat_inputs(x)
    out, yf = _flat_out(out, x)
    _ops.gelu_forward(xf, approximate == "tanh", yf, threads_for(8 * xf.size))
    return _finish(out, yf)


def gelu_backward(dy, x, approximate="none", out=None):
    """``dy * gelu'(x)`` from the forward input ``x``."""
    dyf, xf = _flat_inputs(dy, x)
    out, dxf = _flat_out(out, dy)
    _ops.gelu_backward(dyf, xf, approximate == "tanh", dxf, threads_for(8 * dyf.size))
    return _finish(out, dxf)


def dropout(x, seed, p):
    """Inverted dropout: drop each element with probability ``p``, scale the rest by ``1 / (1 - p)``.

    The mask is a function of ``seed`` and the element's flat index only (a counter-based draw,
    computed in parallel): the same seed gives the same mask for any dtype and thread count.

    Parameters
    ----------
    x : ndarray of any shape, float32 or float64
    seed : int in [0, 2**64)
    p : float in [0, 1), the drop probability

    Returns
    -------
    y, mask : ndarrays of x's shape and dtype
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Expected p in [0, 1), received: p={p!r}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"Expected a seed in [0, 2**64), received: seed={seed!r}")
    (xf,) = _flat_inputs(x)
    y = np.empty(x.shape, dtype=x.dtype)
    mask = np.empty(x.shape, dtype=x.dtype)
    _ops.dropout_forward(xf, int(seed), float(p), y.reshape(-1), mask.reshape(-1), threads_for(xf.size))
    return y, mask


def multiply(a, b, out=None):
    """``a * b`` for two arrays of one shape and dtype (threaded)."""
    af, bf = _flat_inputs(a, b)
    out, of = _flat_out(out, a)
    _ops.multiply(af, bf, of, threads_for(af.size))
    return _finish(out, of)


def softmax_cross_entropy(logits, ids=None, rows=None, label_smoothing=0.0):
    """Softmax cross-entropy of logits against class ids or target rows, value and gradient at once.

    Parameters
    ----------
    logits : ndarray of shape (n, k), float32 or float64
    ids : int ndarray of shape (n,) with values in [0, k), or None
    rows : ndarray of shape (n, k) (already smoothed), used when ``ids`` is None
    label_smoothing : float in [0, 1], applied to ``ids`` only

    Returns
    -------
    value : float, the mean over rows of ``logsumexp(z) - t . z``
    grad : ndarray of shape (n, k), ``(softmax(z) sum(t) - t) / n``
    """
    logits = np.ascontiguousarray(logits)
    n, k = logits.shape
    use_ids = ids is not None
    if use_ids:
        ids = np.ascontiguousarray(ids, dtype=np.intp)
        if ids.shape != (n,) or (n and (ids.min() < 0 or ids.max() >= k)):
            raise ValueError(f"Expected {n} class ids in [0, {k}), received: shape {ids.shape}")
        target = np.empty((1, 1), dtype=logits.dtype)
    else:
        target = np.ascontiguousarray(rows, dtype=logits.dtype)
        if target.shape != (n, k):
            raise ValueError(f"Expected target rows of shape {(n, k)}, received: {target.shape}")
        ids = np.empty(1, dtype=np.intp)
    grad = np.empty_like(logits)
    row_loss = np.empty(n, dtype=np.float64)
    _ops.softmax_cross_entropy(logits, ids, target, use_ids, float(label_smoothing), grad, row_loss,
                               threads_for(32 * logits.size))
    return float(row_loss.sum()) / n, grad


def sgd_step(param, grad, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, first=False):
    """One ``torch.optim.SGD`` update of ``param`` (and ``momentum_buffer``) in place.

    All arrays C-contiguous, of one shape and dtype; ``momentum_buffer`` is ignored (may be
    ``param``) when ``momentum`` is 0, and overwritten with the gradient when ``first``.
    """
    _check_inplace(param, grad, momentum_buffer)
    _ops.sgd_step(param.reshape(-1), grad.reshape(-1), momentum_buffer.reshape(-1), float(lr), float(momentum),
                  float(dampening), float(weight_decay), bool(nesterov), bool(first), threads_for(param.size))


def adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    """One ``torch.optim.Adam`` (``decoupled``: ``AdamW``) update at the parameter's step ``step``
    (>= 1) of ``param``, ``exp_avg`` and ``exp_avg_sq`` in place. C-contiguous, one shape and dtype."""
    _check_inplace(param, grad, exp_avg, exp_avg_sq)
    if step < 1:
        raise ValueError(f"Expected step >= 1, received: step={step!r}")
    _ops.adam_step(param.reshape(-1), grad.reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1), float(lr),
                   float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled), int(step),
                   threads_for(param.size))


def _check_inplace(*arrays):
    first = arrays[0]
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.shape != first.shape or a.dtype != first.dtype \
                or a.dtype not in _COMPILED_DTYPES or not a.flags.c_contiguous:
            raise ValueError(
                f"Expected C-contiguous float32/float64 arrays of shape {first.shape} and dtype {first.dtype}, "
                f"received: {getattr(a, 'shape', type(a).__name__)} {getattr(a, 'dtype', '')}"
            )
    for a in arrays:
        if not a.flags.writeable and a is not arrays[1]:
            raise ValueError("Expected writeable parameter and state arrays")


def batch_norm_train(x3, gamma, beta, eps):
    """Training-mode batch normalisation of ``x3 (n, c, L)`` per channel.

    Returns
    -------
    y, x_hat : ndarrays of x3's shape and dtype
    mean, var : float64 arrays of shape (c,), the batch mean and biased variance
    inv_std : float64 array of shape (c,), ``1 / sqrt(var + eps)``

    Dtypes the kernels do not take (float16) get the same maths in NumPy, in their own dtype.
    """
    x3 = np.ascontiguousarray(x3)
    n, c, length = x3.shape
    if not compiled_dtype(x3):
        mean = x3.mean(axis=(0, 2))
        x_hat = x3 - mean[:, None]
        y = np.multiply(x_hat, x_hat)
        var = y.sum(axis=(0, 2)) / (n * length)
        inv_std = 1.0 / np.sqrt(var + eps)
        x_hat *= inv_std[:, None]
        np.multiply(x_hat, gamma[:, None], out=y)
        y += beta[:, None]
        return y, x_hat, mean, var, inv_std
    mean = np.empty(c)
    var = np.empty(c)
    work = n * c * length
    _ops.channel_moments(x3, mean, var, threads_for(work) if c > 1 else 1)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = np.empty_like(x3)
    y = np.empty_like(x3)
    _ops.batchnorm_normalize(x3, mean, inv_std, gamma, beta, x_hat, y, True, threads_for(work))
    return y, x_hat, mean, var, inv_std


def batch_norm_eval(x3, gamma, beta, running_mean, running_var, eps):
    """Evaluation-mode batch normalisation of ``x3 (n, c, L)``: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    Returns
    -------
    y : ndarray of x3's shape and dtype
    inv_std : float64 array of shape (c,) (the running statistics' dtype for float16 input)
    """
    x3 = np.ascontiguousarray(x3)
    if not compiled_dtype(x3):
        inv_std = 1.0 / np.sqrt(running_var + eps)
        scale = gamma * inv_std
        shift = beta - running_mean * scale
        y = x3 * scale[:, None]
        y += shift[:, None]
        return y, inv_std
    inv_std = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    y = np.empty_like(x3)
    _ops.batchnorm_normalize(x3, running_mean.astype(np.float64), inv_std, gamma, beta, y, y, False,
                             threads_for(x3.size))
    return y, inv_std


def channel_dot_sums(dy3, other3):
    """Per channel of two ``(n, c, L)`` arrays: ``(sum(dy), sum(dy * other))`` as float64 arrays of
    shape (c,) (in the arrays' own dtype for float16)."""
    if not compiled_dtype(dy3, other3):
        return dy3.sum(axis=(0, 2)), np.einsum("ncl,ncl->c", dy3, other3)
    n, c, length = dy3.shape
    s1 = np.empty(c)
    s2 = np.empty(c)
    _ops.channel_dot_sums(dy3, other3, s1, s2, threads_for(dy3.size) if c > 1 else 1)
    return s1, s2


def batch_norm_train_backward(dy3, x_hat, scale, mean_dy, mean_dy_xhat):
    """``dx = scale (dy - mean_dy - x_hat mean_dy_xhat)`` per channel (float64 (c,) coefficients)."""
    if not compiled_dtype(dy3, x_hat):
        dx = np.multiply(x_hat, (-mean_dy_xhat)[:, None])
        dx += dy3
        dx -= mean_dy[:, None]
        dx *= scale[:, None]
        return dx
    dx = np.empty_like(dy3)
    _ops.batchnorm_train_backward(dy3, x_hat, scale, mean_dy, mean_dy_xhat, dx, threads_for(dy3.size))
    return dx
def batch_norm_eval_backward(dy3, scale):
    """Evaluation-mode batch norm's ``dx = scale * dy`` per channel (the statistics are constants)."""
    if compiled_dtype(dy3):
        return dy3 * scale.astype(dy3.dtype)[:, None]
    return dy3 * scale[:, None]


def layer_norm(x3, weight, bias, eps):
    """Layer normalisation of ``x3 (a, c, b)`` over axis 1, then ``* weight + bias`` per ``c``.

    Parameters
    ----------
    x3 : ndarray of shape (a, c, b)
    weight, bias : ndarrays of shape (c,), or None (no affine step)
    eps : float

    Returns
    -------
    y, x_hat : ndarrays of x3's shape
    inv_std : ndarray of shape (a, 1, b), ``1 / sqrt(var + eps)``
    """
    mean = x3.mean(axis=1, keepdims=True)
    x_hat = x3 - mean
    var = np.mean(np.square(x_hat), axis=1, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat *= inv_std
    if weight is not None:
        y = x_hat * weight[:, None]
        y += bias[:, None]
    else:
        y = x_hat.copy()
    return y, x_hat, inv_std


def layer_norm_backward(dy3, x_hat, inv_std, weight, need_dx=True):
    """Gradients of ``layer_norm``: with ``g = dy * weight``, per normalised group,
    ``dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))``.

    Returns
    -------
    dx : ndarray of dy3's shape, or None when ``need_dx`` is False
    dweight, dbias : ndarrays of shape (c,), or None without ``weight``
    """
    dweight = dbias = None
    if weight is not None:
        dweight, dbias = np.einsum("acb,acb->c", dy3, x_hat), dy3.sum(axis=(0, 2))
    if not need_dx:
        return None, dweight, dbias
    g = dy3 * weight[:, None] if weight is not None else dy3.copy()
    proj = np.mean(g * x_hat, axis=1, keepdims=True)
    g -= g.mean(axis=1, keepdims=True)
    g -= x_hat * proj
    g *= inv_std
    return g, dweight, dbias


# --- fully connected and transposed convolution --------------------------------------------------

# Which dense-layer GEMMs run cnnx's packed GEMM instead of np.matmul: ``None`` follows the
# measured rules below, True / False force a path (``benchmarks/dense_gemm.py`` compares them).
# Unset, ``PACKED_CONV_GEMM`` forces these too.
PACKED_DENSE_GEMM = None


def _dense_switch():
    return PACKED_DENSE_GEMM if PACKED_DENSE_GEMM is not None else PACKED_CONV_GEMM


def packed_dense_forward(dtype, n, in_features, out_features):
    """Whether ``linear`` (``x (n, in) @ W.T``) runs ``_ops.dense_gemm`` (the weight read in its own
    layout, bias and (leaky) ReLU in the tile stores, the rows split over OpenMP threads) instead
    of np.matmul by row blocks (see ``PACKED_DENSE_GEMM``; figures in docs/PERFORMANCE_LOG.md)."""
    forced = _forced_path(dtype, 0 in (n, in_features, out_features), _dense_switch())
    if forced is not None:
        return forced
    # Measured per layer (docs/PERFORMANCE_LOG.md, Zen 5): 1.2-2.5x np.matmul + bias + activation
    # against OpenBLAS's AVX2 kernels and 1.07-2.4x against its AVX-512 ones from 16 outputs on;
    # 10-output heads do not gain (0.84-1.17x: 10 of the tile's 32 columns do work).
    return out_features >= 16


def packed_dense_backward(dtype, n, in_features, out_features):
    """Whether ``linear_backward``'s GEMMs (``dW = dz.T @ x``, ``dx = dz @ W``) run ``_ops.gemm``
    (its own threads split the in_features columns) instead of np.matmul by row blocks (see
    ``PACKED_DENSE_GEMM``; figures in docs/PERFORMANCE_LOG.md)."""
    forced = _forced_path(dtype, 0 in (n, in_features, out_features), _dense_switch())
    if forced is not None:
        return forced
    # Measured per layer (docs/PERFORMANCE_LOG.md, Zen 5): against OpenBLAS's AVX2 kernels
    # 1.0-2.3x except for 10 outputs from 16 inputs (0.77-0.97x); against its AVX-512 kernels from
    # 1024 inputs on (0.92-2.6x; the 10-output head of 2048 inputs included), 0.65-0.95x below.
    if _simd.blas_narrower_than_kernels():
        return out_features >= 16 or in_features >= 64
    return in_features >= 1024


def linear(x, weight, bias=None, activation=None, negative_slope=0.01):
    """``activation(x @ weight.T + bias)`` (PyTorch's ``F.linear``, then the activation).

    In float32 where ``packed_dense_forward`` says so, one call of cnnx's packed GEMM with the bias
    and the activation applied to each finished tile; else np.matmul with the rows spread over the
    worker threads, then the bias and ``ACTIVATIONS[activation]`` in place.

    Parameters
    ----------
    x : ndarray of shape (n, in_features)
    weight : ndarray of shape (out_features, in_features), the dtype of the result
    bias : ndarray of shape (out_features,) or None
    activation : None, "relu" or "leaky_relu"
    negative_slope : float >= 0, the leaky ReLU's slope (ignored otherwise)

    Returns
    -------
    z : ndarray of shape (n, out_features), a new array
    """
    x, weight = np.asarray(x), np.asarray(weight)
    if weight.ndim != 2 or x.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"Expected x of shape (n, in_features) and weight of shape (out_features, in_features), "
            f"received: x.shape={x.shape}, weight.shape={weight.shape}"
        )
    if weight.dtype.kind != "f":
        raise TypeError(f"Expected a floating weight, received: weight.dtype={weight.dtype}")
    rectify, slope = _rectifier(activation, negative_slope)
    x = x.astype(weight.dtype, copy=False)
    if bias is not None and np.shape(bias) != (weight.shape[0],):
        raise ValueError(f"Expected bias of shape ({weight.shape[0]},), received: bias.shape={np.shape(bias)}")
    n, (d_out, d_in) = x.shape[0], weight.shape
    z = np.empty((n, d_out), dtype=weight.dtype)
    if packed_dense_forward(weight.dtype, n, d_in, d_out):
        b = np.empty(0, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        _ops.dense_gemm(np.ascontiguousarray(x), np.ascontiguousarray(weight), b, bias is not None, rectify,
                        slope, z, parallel.threads_for_gemm(n, d_in, d_out))
        return z
    matmul(x, weight.T, z)
    if bias is not None:
        z += bias
    if rectify:
        ACTIVATIONS[activation].forward(z, out=z, **({"negative_slope": slope} if activation == "leaky_relu" else {}))
    return z


def linear_backward(dz, x, weight, dweight, dbias=None, need_dx=True):
    """Gradients of ``linear`` (before its activation): ``dweight = dz.T @ x`` and ``dbias =
    dz.sum(0)`` written into the given buffers (shapes of ``weight`` and ``(out_features,)``;
    ``dbias`` None: no bias).

    Returns
    -------
    dx : ndarray of shape (n, in_features), or None when ``need_dx`` is False
    """
    n, (d_out, d_in) = dz.shape[0], weight.shape
    packed = packed_dense_backward(weight.dtype, n, d_in, d_out) and dz.dtype == x.dtype == weight.dtype
    if packed:
        _ops.gemm(dz.T, x, dweight, parallel.threads_for_gemm(d_out, n, d_in))
    else:
        matmul(dz.T, x, dweight)
    if dbias is not None:
        np.sum(dz, axis=0, out=dbias)
    if not need_dx:
        return None
    dx = np.empty((n, d_in), dtype=weight.dtype)
    if packed:
        _ops.gemm(dz, weight, dx, parallel.threads_for_gemm(n, d_out, d_in))
        return dx
    return matmul(dz, weight, dx)


def _transpose_geometry(x_shape, weight_shape, stride, padding, output_padding):
    """``(kh, kw), (sy, sx), (ph, pw), (out_h, out_w)`` of a transposed convolution, checked."""
    kh, kw = positive_pair(weight_shape[2:], "kernel_size")
    sy, sx = positive_pair(stride, "stride")
    ph, pw = int_pair(padding, "padding")
    oy, ox = int_pair(output_padding, "output_padding")
    if min(ph, pw) < 0:
        raise ValueError(f"Expected padding >= 0, received: padding={padding!r}")
    if min(oy, ox) < 0 or oy >= sy or ox >= sx:
        raise ValueError(
            f"Expected 0 <= output_padding < stride {(sy, sx)}, received: output_padding={output_padding!r}"
        )
    if x_shape[1] != weight_shape[0]:
        raise ValueError(
            f"Expected weight with {x_shape[1]} input channels (weight.shape[0]) to match x.shape={x_shape}, "
            f"received: weight.shape={weight_shape}"
        )
    out_hw = (conv_transpose_output_size(x_shape[2], kh, sy, ph, oy),
              conv_transpose_output_size(x_shape[3], kw, sx, pw, ox))
    if min(out_hw) < 1:
        raise ValueError(f"Expected an input giving a non-empty output, received: x.shape={x_shape} -> {out_hw}")
    return (kh, kw), (sy, sx), (ph, pw), out_hw


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, workspace=None):
    """Transposed 2-D convolution (PyTorch's ``conv_transpose2d``, dilation 1, one group): the
    adjoint of ``conv2d``, computed as its input gradient (``col2im(W^T x)``, ``_fold_input_grad``).

    Parameters
    ----------
    x : ndarray of shape (n, in_c, h, w)
    weight : ndarray of shape (in_c, out_c, kh, kw) (PyTorch's layout)
    bias : ndarray of shape (out_c,) or None
    stride : int or (sy, sx)
    padding : int or (ph, pw), rows/columns removed from each border of the full output
    output_padding : int or (oy, ox), extra rows/columns at the bottom/right, each < the stride
    workspace : Workspace, optional

    Returns
    -------
    y : ndarray of shape (n, out_c, out_h, out_w) with
        ``out = (in - 1) * stride - 2 * padding + kernel_size + output_padding`` per axis
    """
    dtype, (x, weight) = _images_and_weight(x, weight, bias)
    (kh, kw), (sy, sx), (ph, pw), (out_h, out_w) = _transpose_geometry(
        x.shape, weight.shape, stride, padding, output_padding)
    n, c, h, w = x.shape
    oc = weight.shape[1]
    y = np.empty((n, oc, out_h, out_w), dtype=dtype)
    if n == 0 or c == 0:
        y[...] = 0
    else:
        ws = workspace if workspace is not None else Workspace()
        k = oc * kh * kw
        p = h * w
        g = _group_size(n, (k + c) * p * dtype.itemsize)
        n_groups = -(-n // g)
        w3 = weight.reshape(1, c, k)
        x3 = x.reshape(n, c, p)
        nt = threads_for(n * (k + c) * p) if n_groups == 1 else 1
        window = (kh, kw, sy, sx, 1, 1, ph, pw, h, w)

        def run_group(worker, index):
            first = index * g
            m = min(g, n - first)
            scratch = ws.worker(worker)
            x_gemm = scratch.get("x_gemm", (c, m, p), dtype)
            np.copyto(x_gemm, x3[first:first + m].transpose(1, 0, 2))
            _fold_input_grad(w3, x_gemm.reshape(1, c, m * p), first, m, window, y, scratch, nt)

        for_each_group(n_groups, run_group)
    if bias is not None:
        bias = float_array(bias, "bias", 1, dtype)
        if bias.shape[0] != oc:
            raise ValueError(f"Expected bias of shape ({oc},), received: bias.shape={bias.shape}")
        y += bias[:, None, None]
    return y


def conv_transpose2d_backward(dy, x, weight, stride=1, padding=0, output_padding=0, need_dx=True,
                              workspace=None):
    """Gradients of ``conv_transpose2d``: the forward is ``conv2d``'s input gradient for a
    convolution from y-space to x-space with weight ``weight``, so ``dweight`` is that
    convolution's weight gradient with (input, output) = (dy, x) and ``dx = conv2d(dy, weight)``.

    Returns
    -------
    dx : ndarray of shape (n, in_c, h, w), or None when ``need_dx`` is False
    dweight : ndarray of shape (in_c, out_c, kh, kw)
    dbias : ndarray of shape (out_c,)
    """
    dtype, (x, weight, dy) = _images_and_weight(x, weight, dy=dy)
    _, (sy, sx), (ph, pw), out_hw = _transpose_geometry(x.shape, weight.shape, stride, padding, output_padding)
    expected = (x.shape[0], weight.shape[1]) + out_hw
    if dy.shape != expected:
        raise ValueError(f"Expected dy of shape {expected}, received: dy.shape={dy.shape}")
    pads = ((ph, ph), (pw, pw))
    _, dweight, _ = conv2d_backward(x, dy, weight, (sy, sx), pads, need_dx=False, workspace=workspace)
    dbias = dy.sum(axis=(0, 2, 3))
    dx = conv2d(dy, weight, None, (sy, sx), pads, workspace=workspace) if need_dx else None
    return dx, dweight, dbias

# --- activation functions (the maths behind cnnx.layers' activations) -------------------------
# GELU needs ``erf``; SciPy is not a dependency, so ``erf``/``erfc`` are W. J. Cody's rational
# Chebyshev approximations (Math. Comp. 1969, SPECFUN ``CALERF``), accurate to float64 rounding.

# --------------------------------------------------------------------------------------------
# erf / erfc (Cody). Three intervals of |x|: [0, 0.46875], (0.46875, 4], (4, inf).
# --------------------------------------------------------------------------------------------
_ERF_THRESH = 0.46875
_SQRPI = 5.6418958354775628695e-1  # 1 / sqrt(pi)
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
      3.20937758913846947e03, 1.85777706184603153e-1)
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
      2.84423683343917062e03)
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
      2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
      2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
      1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
      3.43936767414372164e03, 1.23033935480374942e03)
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
      1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
      6.05183413124413191e-2, 2.33520497626869185e-3)
# Beyond this erfc underflows to 0 in float64; clamping keeps inf out of the exp split below.
_ERFC_XBIG = 28.0


def _rational(t, lead, p, q, num, den):
    """``(lead t^n + p[0] t^(n-1) + ... + p[-1]) / (t^n + q[0] t^(n-1) + ... + q[-1])`` into ``num``.

    Horner's scheme in place on the scratch arrays ``num`` and ``den`` (no temporaries).
    """
    np.multiply(t, lead, out=num)
    np.copyto(den, t)
    for p_i, q_i in zip(p[:-1], q[:-1]):
        num += p_i
        num *= t
        den += q_i
        den *= t
    num += p[-1]
    den += q[-1]
    num /= den
    return num


def _erf_parts(a):
    """Cody's two branches for ``a = |x|``, each evaluated on the whole array.

    Returns ``(erf_small, erfc_big, is_small)``: ``erf(a)`` valid where ``a <= 0.46875``,
    ``erfc(a)`` valid elsewhere, and the 0/1 float mask of the first region. Every branch sees
    clamped arguments, so all values are finite and callers blend them as ``s*m + b*(1-m)``
    (exact for m in {0, 1}); masks, ``np.where`` and fancy indexing are several times slower
    here because their branches are unpredictable.
    """
    num = np.empty_like(a)
    den = np.empty_like(a)
    t = np.minimum(a, _ERF_THRESH)
    ysq = t * t
    # erf(t) = t * (A4 t^8 + A0 t^6 + ... + A3) / (t^8 + B0 t^6 + ... + B3) in the variable t^2
    erf_small = _rational(ysq, _A[4], _A[:4], _B, num, den) * t
    # erfc on (0.46875, 4]: rational in y
    y = np.clip(a, _ERF_THRESH, _ERFC_XBIG, out=t)
    mid = _rational(np.minimum(y, 4.0), _C[8], _C[:8], _D, num, den).copy()
    # erfc beyond 4: (1/sqrt(pi) - z R(z)) / y with z = 1/y^2
    y_tail = np.maximum(y, 4.0)
    z = np.multiply(y_tail, y_tail)
    np.divide(1.0, z, out=z)
    tail = _rational(z, _P[5], _P[:5], _Q, num, den)
    tail *= z
    np.subtract(_SQRPI, tail, out=tail)
    tail /= y_tail
    is_tail = (y > 4.0).astype(a.dtype)
    tail *= is_tail
    np.subtract(1.0, is_tail, out=is_tail)
    mid *= is_tail
    erfc_big = np.add(mid, tail, out=mid)
    # times exp(-y^2), split as exp(-r^2) exp(-(y-r)(y+r)) with r = y rounded down to 1/16: r^2 is
    # exact, so the low bits of y^2 that decide erfc's relative accuracy in the tail are kept.
    r = np.multiply(y, 16.0, out=y_tail)
    np.trunc(r, out=r)
    r *= 0.0625
    d = np.subtract(y, r, out=z)
    y += r
    d *= y
    np.negative(d, out=d)
    np.exp(d, out=d)
    erfc_big *= d
    np.multiply(r, r, out=r)
    np.negative(r, out=r)
    np.exp(r, out=r)
    erfc_big *= r
    is_small = (a <= _ERF_THRESH).astype(a.dtype)
    return erf_small, erfc_big, is_small


def erf(x):
    """Error function, elementwise, to float64 rounding accuracy (Cody's approximation).

    Parameters
    ----------
    x : array_like
        Computed in its own floating dtype (integers as float64).

    Returns
    -------
    ndarray of the same shape
    """
    x = as_floating(x)
    erf_small, erfc_big, m = _erf_parts(np.abs(x))
    erf_small *= m
    np.subtract(1.0, erfc_big, out=erfc_big)
    np.subtract(1.0, m, out=m)
    erfc_big *= m
    erf_small += erfc_big
    return np.copysign(erf_small, x, out=erf_small)


def erfc(x):
    """Complementary error function ``1 - erf(x)``, elementwise, accurate in the tails too.

    Parameters
    ----------
    x : array_like

    Returns
    -------
    ndarray of the same shape
    """
    x = as_floating(x)
    erf_small, erfc_big, m = _erf_parts(np.abs(x))
    v = np.subtract(1.0, erf_small, out=erf_small)
    v *= m
    np.subtract(1.0, m, out=m)
    erfc_big *= m
    v += erfc_big  # erfc(|x|)
    # erfc(x) = 2 - erfc(|x|) for x < 0: add neg * (2 - 2 v), exact where neg == 0.
    fix = np.multiply(v, -2.0, out=erfc_big)
    fix += 2.0
    fix *= x < 0
    v += fix
    return v


def normal_cdf(x):
    """Standard normal CDF ``Phi(x) = erfc(-x / sqrt(2)) / 2``, accurate for very negative x."""
    x = as_floating(x)
    return 0.5 * erfc(x * -math.sqrt(0.5))


# --------------------------------------------------------------------------------------------
# The activation functions: stateless objects with the protocol
#   forward(x, out=None, **kw) -> y ; ``out`` may be ``x`` itself (in place);
#   backward(dy, x, y, out=None, **kw) -> dx, with ``x`` the pre-activation and ``y`` the output;
#   needs_input(**kw) -> bool: whether ``backward`` reads ``x`` (when not, a caller may compute
#   ``y`` in place over ``x`` and pass ``x=None``, one buffer per layer saved).
# float32 / float64 arrays take the compiled, threaded passes above (one sweep per pass); other
# float dtypes (float16) the NumPy code, which writes through ``out=`` and avoids temporaries.
# --------------------------------------------------------------------------------------------
def _compiled(*arrays, out=None):
    """Whether the compiled pass applies: float32 / float64 arrays of one shape and dtype."""
    return compiled_dtype(*arrays) and (out is None or compiled_dtype(arrays[0], out))


class _OutputGradFn:
    """An activation whose gradient reads only its output ``y`` (so ``x`` may be overwritten)."""

    def needs_input(self):
        return False


class _ReLUFn(_OutputGradFn):
    name = "relu"

    def forward(self, x, out=None):
        if _compiled(x, out=out):
            return leaky_relu(x, 0.0, out=out)
        return np.maximum(x, 0, out=out)

    def backward(self, dy, x, y, out=None):
        # y > 0 exactly where x > 0, so the output suffices (gradient 0 at x = 0, as PyTorch).
        if _compiled(dy, y, out=out):
            return leaky_relu_backward(dy, y, 0.0, out=out)
        return np.multiply(dy, y > 0, out=out)


class _LeakyReLUFn:
    name = "leaky_relu"

    def needs_input(self, negative_slope=0.01):
        # With a negative slope the sign of y no longer tells the sign of x.
        return negative_slope < 0

    def forward(self, x, out=None, negative_slope=0.01):
        if _compiled(x, out=out):
            return leaky_relu(x, negative_slope, out=out)
        # leaky_relu(x) = max(x, a x) for a <= 1 and min(x, a x) for a > 1: two streaming passes.
        # (Masked ufuncs, np.where and copyto(where=) branch on every element and are ~30x slower.)
        pick = np.maximum if negative_slope <= 1 else np.minimum
        if out is not None and np.may_share_memory(out, x):
            return pick(x, x * negative_slope, out=out)
        scaled = np.multiply(x, negative_slope, out=out)
        return pick(x, scaled, out=scaled)

    def backward(self, dy, x, y, out=None, negative_slope=0.01):
        ref = x if negative_slope < 0 else y
        if _compiled(dy, ref, out=out):
            return leaky_relu_backward(dy, ref, negative_slope, out=out)
        positive = ref > 0
        # factor = 1 where positive, a elsewhere, built as (not positive) * a + positive: each
        # term is exactly 0, 1 or a, so the positive side passes dy through bit for bit.
        factor = np.logical_not(positive).astype(dy.dtype)
        factor *= negative_slope
        factor += positive
        return np.multiply(dy, factor, out=factor if out is None else out)


class _SigmoidFn(_OutputGradFn):
    name = "sigmoid"

    def forward(self, x, out=None):
        if SIMD_TRANSCENDENTALS and _compiled(x, out=out):
            return sigmoid(x, out=out)
        # With e = exp(-|x|) (never overflows): sigmoid = 1/(1+e) for x >= 0, e/(1+e) for x < 0.
        # The numerator is max(e, [x >= 0]) since 0 < e <= 1: no branches, one rounding.
        nonneg = x >= 0  # taken before out overwrites x when the call is in place
        out = np.abs(x, out=out)
        np.negative(out, out=out)
        np.exp(out, out=out)
        denom = out + 1
        np.maximum(out, nonneg, out=out)
        np.divide(out, denom, out=out)
        return out

    def backward(self, dy, x, y, out=None):
        if _compiled(dy, y, out=out):
            return sigmoid_backward(dy, y, out=out)
        out = np.subtract(1, y, out=out)
        np.multiply(out, y, out=out)
        return np.multiply(out, dy, out=out)


class _TanhFn(_OutputGradFn):
    name = "tanh"

    def forward(self, x, out=None):
        # NumPy's vectorised tanh beats the compiled one (see functional.SIMD_TRANSCENDENTALS).
        return np.tanh(x, out=out)

    def backward(self, dy, x, y, out=None):
        if _compiled(dy, y, out=out):
            return tanh_backward(dy, y, out=out)
        out = np.multiply(y, y, out=out)
        np.subtract(1, out, out=out)
        return np.multiply(out, dy, out=out)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_GELU_APPROXIMATIONS = ("none", "tanh")


def check_gelu_approximate(approximate):
    """``approximate`` of GELU: "none" (exact erf form) or "tanh"."""
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(
            f"Expected approximate to be one of {_GELU_APPROXIMATIONS}, received: approximate={approximate!r}"
        )


class _GELUFn:
    """GELU: exact ``x * Phi(x)`` (PyTorch's default) or the tanh approximation."""

    name = "gelu"

    def needs_input(self, approximate="none"):
        return True

    def _tanh_inner(self, x):
        return np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x))

    def forward(self, x, out=None, approximate="none"):
        check_gelu_approximate(approximate)
        if _compiled(x, out=out) and (approximate == "none" or SIMD_TRANSCENDENTALS):
            return gelu(x, approximate, out=out)
        if approximate == "tanh":
            t = self._tanh_inner(x)
            t += 1
            t *= 0.5
        else:
            t = normal_cdf(x)
        return np.multiply(x, t, out=out)

    def backward(self, dy, x, y, out=None, approximate="none"):
        check_gelu_approximate(approximate)
        if _compiled(dy, x, out=out) and (approximate == "none" or SIMD_TRANSCENDENTALS):
            return gelu_backward(dy, x, approximate, out=out)
        if approximate == "tanh":
            t = self._tanh_inner(x)
            # d/dx [x (1+t)/2] = (1+t)/2 + x (1-t^2)/2 * sqrt(2/pi) (1 + 3c x^2)
            inner_grad = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * x * x)
            grad = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner_grad
        else:
            # d/dx [x Phi(x)] = Phi(x) + x phi(x)
            grad = normal_cdf(x)
            grad += x * np.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return np.multiply(dy, grad, out=out)


class _SoftmaxFn(_OutputGradFn):
    """Softmax over axis 1 (classes/channels); not elementwise, so not offered for fusion."""

    name = "softmax"

    def forward(self, x, out=None):
        # Shift by the row maximum so exp never overflows.
        out = np.subtract(x, x.max(axis=1, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def backward(self, dy, x, y, out=None):
        # Jacobian-vector product: dx = y * (dy - sum(dy * y)) along the softmax axis.
        dot = np.sum(dy * y, axis=1, keepdims=True)
        out = np.subtract(dy, dot, out=out)
        return np.multiply(out, y, out=out)


#: The activations Conv2D and Dense can fuse (``activation=<name>``), by name.
ACTIVATIONS = {
    "relu": _ReLUFn(),
    "leaky_relu": _LeakyReLUFn(),
    "sigmoid": _SigmoidFn(),
    "tanh": _TanhFn(),
    "gelu": _GELUFn(),
}
SOFTMAX = _SoftmaxFn()


# --- convolution + activation + 2x2 max-pool for training ------------------------------------
# The pooled output and each window's argmax come out of the GEMM's layout pass, and the backward
# scatters the pooled gradient straight into the GEMM layout: the full-size activation is never
# written, read back by a pool, or scattered into by a pool's backward.

def conv2d_max_pool_2x2_train(x, weight, bias=None, stride=1, padding=0, workspace=None, activation=None,
                       negative_slope=0.01, out=None, argmax_out=None):
    """``max_pool2d(conv2d(x, ...), 2)`` with the pool's argmax, in one sweep over the GEMM output.

    Parameters
    ----------
    x, weight, bias, stride, padding, workspace, activation, negative_slope : as :func:`conv2d`
    out, argmax_out : ndarray, optional
        C-contiguous arrays of ``y``'s shape (``x``'s dtype, int32) to write ``y`` and ``argmax``
        into (an execution plan reuses them from batch to batch); fresh arrays when None.

    Returns
    -------
    y : ndarray of shape (n, out_c, out_h // 2, out_w // 2), the pooled (activated) output
    argmax : ndarray of int32, shape (n, out_c, out_h // 2, out_w // 2): ``2 * dy + dx`` of the
        window position that won, for :func:`conv2d_max_pool_2x2_backward`
    """
    rectify, slope = _rectifier(activation, negative_slope)
    x, weight, bias, _, window, _ = _conv_setup(x, weight, stride, padding, bias=bias, max_pool_2x2=True)
    n, oc, out_h, out_w = x.shape[0], weight.shape[0], window[-2], window[-1]
    dtype = x.dtype
    y = _check_out(out, (n, oc, out_h // 2, out_w // 2), dtype)
    argmax = _check_out(argmax_out, y.shape, np.dtype(np.int32), "argmax_out")
    if n == 0 or oc == 0:
        return y, argmax
    b = bias if bias is not None else np.empty(0, dtype=dtype)
    y3, argmax3 = y.reshape(n, oc, -1), argmax.reshape(n, oc, -1)

    def gemm_to_output(y_gemm, first, scratch, nt):
        m = y_gemm.shape[1]
        pair_max = scratch.get("pair_max", (m, out_h * (out_w // 2)), dtype)
        pair_arg = scratch.get("pair_arg", (m, out_h * (out_w // 2)), np.dtype(np.int32))
        _ops.gemm_to_nchw_max_pool_2x2_argmax(y_gemm, b, bias is not None, rectify, slope, first, out_w, y3, argmax3,
                                              pair_max, pair_arg, nt)

    # The same schedule as conv2d's: the same GEMMs, so the pooled values equal the unfused ones. On
    # the packed path the tile stores pool and keep the argmax themselves (see POOLED_TILE_STORE).
    nchw = (b, bias is not None, rectify, slope, y3, argmax3) if POOLED_TILE_STORE else None
    _conv_forward_groups(x, weight, window, 1, gemm_to_output, workspace, nchw,
                         _ops.conv_gemm_nchw_max_pool_2x2_argmax, _ops.winograd_conv_nchw_max_pool_2x2_argmax)
    return y, argmax


def conv2d_max_pool_2x2_backward(dy, argmax, y, x, weight, stride=1, padding=0, need_dx=True, workspace=None,
                          activation=None, negative_slope=0.01, out=None):
    """Gradients of :func:`conv2d_max_pool_2x2_train` with respect to its input, weight and bias.

    Parameters
    ----------
    dy : ndarray of shape (n, out_c, out_h // 2, out_w // 2), gradient of the pooled output
    argmax, y : the ``argmax`` and ``y`` that ``conv2d_max_pool_2x2_train`` returned
    x, weight, stride, padding, activation, negative_slope : as given to ``conv2d_max_pool_2x2_train``
    need_dx : bool, skip the input gradient when False
    out : ndarray of shape (n, c, h, w), optional, receives dx (as in :func:`conv2d_backward`)

    Returns
    -------
    dx : ndarray of shape (n, c, h, w), or None when ``need_dx`` is False
    dweight : ndarray of shape (out_c, c, kh, kw)
    dbias : ndarray of shape (out_c,)
    """
    rectify, slope = _rectifier(activation, negative_slope)
    x, weight, _, dy, window, _ = _conv_setup(x, weight, stride, padding, dy=dy, max_pool_2x2=True)
    n, oc, out_h, out_w = x.shape[0], weight.shape[0], window[-2], window[-1]
    dtype = x.dtype
    pooled = (n, oc, out_h // 2, out_w // 2)
    y = float_array(y, "y", 4, dtype)
    for name, a in (("dy", dy), ("y", y), ("argmax", argmax)):
        if a.shape != pooled:
            raise ValueError(f"Expected {name} of shape {pooled}, received: {name}.shape={a.shape}")
    argmax = np.ascontiguousarray(argmax, dtype=np.int32)
    dx = _check_out(out, x.shape, dtype, "out") if need_dx else None
    if n == 0 or oc == 0:
        if dx is not None:
            dx[...] = 0
        return dx, np.zeros(weight.shape, dtype=dtype), np.zeros(oc, dtype=dtype)
    dy3, y3, argmax3 = dy.reshape(n, oc, -1), y.reshape(n, oc, -1), argmax.reshape(n, oc, -1)

    def dy_to_gemm(first, dy_gemm, dbias_part, nt):
        _ops.max_pool_2x2_argmax_to_gemm(dy3, y3, argmax3, rectify, slope, first, out_w, dy_gemm, dbias_part, nt)

    dweight, dbias = _conv_backward_groups(x, weight, window, 1, dy_to_gemm, dx, workspace,
                                           (dy3, y3, argmax3, rectify, slope))
    return dx, dweight, dbias
