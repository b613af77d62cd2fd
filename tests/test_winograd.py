"""Winograd F(2x2, 3x3) for float32 3x3 stride-1 convolutions (``_ops.winograd_conv_nchw`` and its
pooled forms, cnnx/_winograd.pxi; ``functional.winograd_conv`` / ``WINOGRAD`` choose it): every
build this CPU can run against the float64 reference on odd and even sizes (a last partial tile
row / column), padding 0 / 1 / 2, channel counts that are not multiples of MR / NR, several blocks
of tiles and tile panels that straddle tile rows and images."""
import numpy as np
import pytest

import cnnx.functional as F
from cnnx import _simd
from cnnx.geometry import conv_output_size
from cnnx.parallel import num_threads
import reference as ref

BUILDS = _simd.available_isas()
ACTIVATIONS = [(None, 0.0), ("relu", 0.0), ("leaky_relu", 0.1)]

# (batch, channels, height, width, out_channels, kernel, stride, padding); kernel 3, stride 1.
SHAPES = [
    (1, 1, 4, 4, 1, 3, 1, 0),        # one tile, M < MR
    (3, 3, 7, 9, 5, 3, 1, 1),        # 7x9 output: a partial last tile row and column
    (2, 17, 16, 16, 33, 3, 1, 1),    # 8x8 tiles per image: panels span tile rows; M = 33
    (1, 5, 5, 6, 9, 3, 1, 2),        # padding 2: windows over two rows of zeros
    (2, 4, 9, 4, 7, 3, 1, 0),        # 7x2 output, one tile column
    (3, 8, 10, 10, 40, 3, 1, 1),     # 5x5 tiles: runs of 5 tiles, panels across images
    (1, 130, 6, 70, 6, 3, 1, 1),     # c = 130: blocks of one panel, several blocks per call
]

shape_id = ref.conv_case_id

# F(2x2, 3x3)'s matrices (Lavin & Gray): y = A^T [(G g G^T) * (B^T d B)] A, entrywise magnitudes.
G_ABS = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0, 0, 1]])
BT_ABS = np.array([[1, 0, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 0, 1]], dtype=np.float64)
AT_ABS = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=np.float64)


def winograd_float32_bound(x, weight, bias, padding, out_hw):
    """A float32 round-off bound for each output of the Winograd convolution.

    Rounding-error analysis (first order, eps = float32's machine epsilon): U = G g G^T is computed
    in double and rounded once (eps |U|); V = B^T d B is two levels of additions (2 eps |B^T||d||B|);
    each product adds eps and the sum over the c channels c eps; the output transform A^T M A is two
    levels of at most 3 terms (4 eps); the bias one more. So each output is off by at most
    (c + 8) eps * S, with S = A^T (sum_c |G||g_c||G|^T * |B^T||d_c||B|) A + |bias|: the magnitudes
    the transforms add, which exceed the direct sum's sum |x w| (the direct GEMM's bound, in
    ``reference.conv2d_and_float32_bound``) by the transforms' growth. A factor 2 covers the
    higher-order terms, as the direct bound does.
    """
    n, c, h, w = x.shape
    oh, ow = out_hw
    th, tw = -(-oh // 2), -(-ow // 2)
    # Zero padding on every side, and enough at the bottom / right for the last (partial) tiles.
    xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2))
    rows, cols = min(h, 2 * th + 2 - padding), min(w, 2 * tw + 2 - padding)
    xp[:, :, padding:padding + rows, padding:padding + cols] = np.abs(x[:, :, :rows, :cols])
    patches = np.lib.stride_tricks.sliding_window_view(xp, (4, 4), axis=(2, 3))[:, :, ::2, ::2]
    u = np.einsum("ik,ockl,jl->ocij", G_ABS, np.abs(weight.astype(np.float64)), G_ABS)
    v = np.einsum("ik,ntuvkl,jl->ntuvij", BT_ABS, patches, BT_ABS)
    m = np.einsum("ocij,ncuvij->nouvij", u, v)
    tiles = np.einsum("pi,nouvij,qj->nouvpq", AT_ABS, m, AT_ABS)
    size = tiles.transpose(0, 1, 2, 4, 3, 5).reshape(n, weight.shape[0], 2 * th, 2 * tw)[:, :, :oh, :ow]
    if bias is not None:
        size = size + np.abs(bias.astype(np.float64))[None, :, None, None]
    return 2 * (c + 8) * np.finfo(np.float32).eps * size + 1e-30


def reference_and_bound(x, weight, bias, padding, activation, slope):
    z = ref.conv2d(x.astype(np.float64), weight.astype(np.float64),
                   None if bias is None else bias.astype(np.float64), (1, 1), ((padding, padding),) * 2)
    bound = winograd_float32_bound(x, weight, bias, padding, z.shape[2:])
    if activation is not None:  # slope <= 1: the activation does not widen the bound
        z = np.where(z > 0, z, slope * z)
    return z, bound


def pool_2x2(a):
    """The floor 2x2 / stride-2 max-pool of (n, c, h, w) (NaN if a window holds one)."""
    n, c, h, w = a.shape
    return a[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def kernel_args(x, weight, p, out_hw, bias, with_bias, activation, slope):
    oc = weight.shape[0]
    return (weight.reshape(oc, -1), 3, 3, 1, 1, p, p, *out_hw, bias if with_bias else np.empty(0, np.float32),
            with_bias, activation is not None, slope)


def test_the_bound_is_no_looser_than_needed_by_orders_of_magnitude(rng):
    # The bound must be able to fail: a wrong tap (the kernel flipped) is far outside it.
    x, weight, bias = ref.conv_operands((2, 8, 8, 8, 5, 3, 1, 1), rng)
    z, bound = reference_and_bound(x, weight, bias, 1, None, 0.0)
    y = np.empty((2, 5, 64), np.float32)
    _simd.ops.winograd_conv_nchw(x, 0, 2, np.ascontiguousarray(weight[:, :, ::-1, ::-1]).reshape(5, -1), 3, 3, 1,
                                 1, 1, 1, 8, 8, bias, True, False, 0.0, y, 1)
    assert not np.all(np.abs(y.reshape(z.shape) - z) <= bound)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_winograd_matches_the_float64_reference(isa, shape, rng):
    ops = _simd.load(isa)
    x, weight, bias = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    # The call's images are 1 : n + 1 of a batch with one more image in front (NaN: never read).
    xs = np.concatenate([np.full_like(x[:1], np.nan), x])
    for case, ((activation, slope), with_bias) in enumerate((a, b) for a in ACTIVATIONS for b in (True, False)):
        expected, bound = reference_and_bound(x, weight, bias if with_bias else None, p, activation, slope)
        out_hw = expected.shape[2:]
        y = np.full((n + 1, oc, out_hw[0] * out_hw[1]), 7.0, np.float32)
        ops.winograd_conv_nchw(xs, 1, n, *kernel_args(x, weight, p, out_hw, bias, with_bias, activation, slope),
                               y, 1 + case % 2)
        assert np.all(np.abs(y[1:].reshape(expected.shape) - expected) <= bound), (activation, with_bias)
        assert np.all(y[0] == 7.0)  # exact: the image in front is never written


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_pooled_winograd_matches_the_unfused_reference(isa, shape, rng):
    ops = _simd.load(isa)
    x, weight, bias = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    for case, ((activation, slope), with_bias) in enumerate((a, b) for a in ACTIVATIONS for b in (True, False)):
        z, bound = reference_and_bound(x, weight, bias if with_bias else None, p, activation, slope)
        # Each pooled value is the maximum of values each within its bound: within the largest.
        expected, pooled_bound = pool_2x2(z), pool_2x2(bound)
        y = np.full((n + 1, oc, expected.shape[2] * expected.shape[3]), 7.0, np.float32)
        code = np.full(y.shape, -1, np.int32)
        args = kernel_args(x, weight, p, z.shape[2:], bias, with_bias, activation, slope)
        ops.winograd_conv_nchw_max_pool_2x2(x, 0, n, *args, y, 1 + case % 2)
        assert np.all(np.abs(y[:n].reshape(expected.shape) - expected) <= pooled_bound), (activation, with_bias)
        assert np.all(y[n] == 7.0)
        y[:] = 7.0
        ops.winograd_conv_nchw_max_pool_2x2_argmax(x, 0, n, *args, y, code, 1 + case % 2)
        assert np.all(np.abs(y[:n].reshape(expected.shape) - expected) <= pooled_bound), (activation, with_bias)
        assert np.all(y[n] == 7.0) and np.all(code[n] == -1) and np.all((code[:n] >= 0) & (code[:n] <= 3))


def input_grad_operands(shape, rng):
    """dy, and the arguments of ``winograd_conv_input_grad`` for it: dy in GEMM layout, the
    transformed flipped kernels, the padding; the float64 reference dx and its bound."""
    x, weight, _ = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_h, out_w = conv_output_size(h, 3, 1, p), conv_output_size(w, 3, 1, p)
    dy = rng.standard_normal((n, oc, out_h, out_w)).astype(np.float32)
    expected, _, _ = ref.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), weight.astype(np.float64),
                                         (1, 1), ((p, p), (p, p)))
    # dx is the convolution of dy with w'[ci, o] = w[o, ci, ::-1, ::-1], padded 2 - p: its bound.
    flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    bound = winograd_float32_bound(dy, flipped, None, 2 - p, (h, w))
    dy_gemm = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(oc, n, -1)
    return (x, weight, dy), (dy_gemm, out_h, out_w, flipped.reshape(c, -1), 2 - p), expected, bound


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_winograd_input_gradient_matches_the_float64_reference(isa, shape, rng):
    ops = _simd.load(isa)
    n, c, h, w, oc, k, s, p = shape
    _, (dy_gemm, out_h, out_w, flipped, pad), expected, bound = input_grad_operands(shape, rng)
    dx = np.full((n + 1, c, h, w), 7.0, np.float32)
    ops.winograd_conv_input_grad(dy_gemm, out_h, out_w, ops.winograd_weights(flipped, oc), pad, pad, dx, 1, 1 + n % 2)
    assert np.all(np.abs(dx[1:] - expected) <= bound)
    assert np.all(dx[0] == 7.0)  # exact: the image in front is never written


A_ABS = AT_ABS.T
GT_ABS = G_ABS.T


def weight_grad_operands(shape, rng):
    """x, dy in GEMM layout, the float64 reference dW and its float32 bound for the Winograd
    weight gradient.

    dW[o, ci] = G^T (sum over tiles of (A dy A^T) * (B^T d B)) G: the same rounding analysis as
    ``winograd_float32_bound`` with the tiles as the sum (T = all tiles of the call: T eps), two
    levels of additions in each transform and the final transform in double (rounded once):
    (T + 8) eps * S, S = |G^T| (sum_t (|A||dy_t||A^T| * |B^T||d_t||B|)) |G|, times 2.
    """
    x, weight, _ = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_h, out_w = conv_output_size(h, 3, 1, p), conv_output_size(w, 3, 1, p)
    dy = rng.standard_normal((n, oc, out_h, out_w)).astype(np.float32)
    expected, bound = weight_grad_reference(x, weight, dy, p)
    dy_gemm = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(oc, n, -1)
    return (x, weight, dy), dy_gemm, (out_h, out_w), expected, bound


def weight_grad_reference(x, weight, dy, p):
    """The float64 dW of (x, dy) with padding p, and its bound (see ``weight_grad_operands``)."""
    n, c, h, w = x.shape
    oc, out_h, out_w = dy.shape[1:]
    _, expected, _ = ref.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), weight.astype(np.float64),
                                         (1, 1), ((p, p), (p, p)))
    th, tw = -(-out_h // 2), -(-out_w // 2)
    xp = np.zeros((n, c, 2 * th + 2, 2 * tw + 2))
    rows, cols = min(h, 2 * th + 2 - p), min(w, 2 * tw + 2 - p)
    xp[:, :, p:p + rows, p:p + cols] = np.abs(x[:, :, :rows, :cols])
    patches = np.lib.stride_tricks.sliding_window_view(xp, (4, 4), axis=(2, 3))[:, :, ::2, ::2]
    v = np.einsum("ik,ntuvkl,jl->ntuvij", BT_ABS, patches, BT_ABS)
    dyp = np.zeros((n, oc, 2 * th, 2 * tw))
    dyp[:, :, :out_h, :out_w] = np.abs(dy)
    dy_tiles = dyp.reshape(n, oc, th, 2, tw, 2).transpose(0, 1, 2, 4, 3, 5)
    y = np.einsum("ip,nouvpq,jq->nouvij", A_ABS, dy_tiles, A_ABS)
    sums = np.einsum("nouvij,ncuvij->ocij", y, v)
    size = np.einsum("ai,ocij,jb->ocab", GT_ABS, sums, G_ABS)
    return expected, 2 * (n * th * tw + 8) * np.finfo(np.float32).eps * size + 1e-30


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_winograd_weight_gradient_matches_the_float64_reference(isa, shape, rng):
    ops = _simd.load(isa)
    n, c, h, w, oc, k, s, p = shape
    (x, _, _), dy_gemm, out_hw, expected, bound = weight_grad_operands(shape, rng)
    xs = np.concatenate([np.full_like(x[:1], np.nan), x])  # the call's images are 1 : n + 1
    dweight = np.full((oc, c * 9), 7.0, np.float32)
    ops.winograd_conv_weight_grad(xs, 1, dy_gemm, p, p, *out_hw, dweight)
    assert np.all(np.abs(dweight.reshape(expected.shape) - expected) <= bound)


def corners_reference(z):
    """Activated (n, oc, oh, ow) -> pooled values and codes 2 * dy + dx of each window's first
    maximum (or first NaN) in row-major order, as max_pool2d picks it."""
    n, oc, oh, ow = z.shape
    ph, pw = oh // 2, ow // 2
    corners = z[:, :, :2 * ph, :2 * pw].reshape(n, oc, ph, 2, pw, 2).transpose(0, 1, 2, 4, 3, 5)
    corners = corners.reshape(n, oc, ph * pw, 4)
    code = np.argmax(corners, axis=-1)  # the first maximum, or the first NaN
    return np.take_along_axis(corners, code[..., None], -1)[..., 0], code.astype(np.int32)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_pooled_winograd_argmax_matches_max_pool_with_ties_and_nans(isa, shape, rng):
    ops = _simd.load(isa)
    n, c, h, w, oc, k, s, p = shape
    # Small integers make Winograd exact: U = G g G^T holds multiples of 1/4 (computed in double,
    # exact), V = B^T d B integers, every product and sum a multiple of 1/4 far below 2**22, the
    # output transform integer sums, the slope 0.5 exact. So values and codes must be exactly the
    # reference's; most windows hold ties (ReLU makes more), which go to the first maximum. A NaN
    # reaches exactly the outputs whose 3x3 window holds it (B^T's and A^T's sparsity keep a tile's
    # first input column out of its second output column, and so on), as in the direct sum.
    x = rng.integers(-2, 3, (n, c, h, w)).astype(np.float32)
    x[0, 0, h // 2, w - 2] = np.nan
    weight = rng.integers(-2, 3, (oc, c, 3, 3)).astype(np.float32)
    bias = rng.integers(-2, 3, oc).astype(np.float32)
    for case, (activation, slope, with_bias) in enumerate([(None, 0.0, True), ("relu", 0.0, False),
                                                           ("leaky_relu", 0.5, True)]):
        z = ref.conv2d(x.astype(np.float64), weight.astype(np.float64),
                       bias.astype(np.float64) if with_bias else None, (1, 1), ((p, p), (p, p)))
        with np.errstate(invalid="ignore"):
            activated = z if activation is None else np.where(z > 0, z, slope * z)
        activated[np.isnan(z)] = np.nan
        expected, expected_code = corners_reference(activated)
        y = np.empty((n, oc, expected.shape[2]), np.float32)
        code = np.empty(y.shape, np.int32)
        args = kernel_args(x, weight, p, z.shape[2:], bias, with_bias, activation, slope)
        ops.winograd_conv_nchw_max_pool_2x2_argmax(x, 0, n, *args, y, code, 1 + case % 2)
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(code, expected_code)
        pooled = np.empty_like(y)
        ops.winograd_conv_nchw_max_pool_2x2(x, 0, n, *args, pooled, 1 + case % 2)
        np.testing.assert_array_equal(pooled, expected)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[5], SHAPES[6]], ids=shape_id)
def test_winograd_gives_the_same_bits_on_any_thread_count(shape, rng):
    ops = _simd.load(BUILDS[0])
    x, weight, bias = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_hw = conv_output_size(h, 3, 1, p), conv_output_size(w, 3, 1, p)
    args = kernel_args(x, weight, p, out_hw, bias, True, "leaky_relu", 0.1)
    pooled = (n, oc, (out_hw[0] // 2) * (out_hw[1] // 2))

    def run(threads):
        y = np.empty((n, oc, out_hw[0] * out_hw[1]), np.float32)
        yp, ya = np.empty(pooled, np.float32), np.empty(pooled, np.float32)
        code = np.empty(pooled, np.int32)
        ops.winograd_conv_nchw(x, 0, n, *args, y, threads)
        ops.winograd_conv_nchw_max_pool_2x2(x, 0, n, *args, yp, threads)
        ops.winograd_conv_nchw_max_pool_2x2_argmax(x, 0, n, *args, ya, code, threads)
        return np.concatenate([y.ravel(), yp.ravel(), ya.ravel(), code.ravel().astype(np.float32)])

    # Threads split the blocks of tiles; each output is the same sums in the same order.
    ref.assert_kernel_identical_for_thread_counts(run)
    _, (dy_gemm, out_h, out_w, flipped, pad), _, _ = input_grad_operands(shape, rng)
    transformed = ops.winograd_weights(flipped, oc)

    def run_input_grad(threads):
        dx = np.empty((n, c, h, w), np.float32)
        ops.winograd_conv_input_grad(dy_gemm, out_h, out_w, transformed, pad, pad, dx, 0, threads)
        return dx

    ref.assert_kernel_identical_for_thread_counts(run_input_grad)


def test_winograd_kernels_refuse_what_they_cannot_compute():
    ops = _simd.ops
    x = np.zeros((1, 2, 6, 6), np.float32)
    bias = np.zeros(3, np.float32)
    y = np.zeros((1, 3, 16), np.float32)
    expected = r"Expected a 3x3 kernel with stride 1.*received: kernel \(3, 3\), stride \(2, 2\)"
    with pytest.raises(ValueError, match=expected):
        ops.winograd_conv_nchw(x, 0, 1, np.zeros((3, 18), np.float32), 3, 3, 2, 2, 0, 0, 4, 4, bias, True, False,
                               0.0, y, 1)
    with pytest.raises(ValueError, match=r"Expected a weight of shape \(out_c, 18\).*received: \(3, 12\)"):
        ops.winograd_conv_nchw(x, 0, 1, np.zeros((3, 12), np.float32), 3, 3, 1, 1, 0, 0, 4, 4, bias, True, False,
                               0.0, y, 1)
    with pytest.raises(ValueError, match=r"Expected y of shape \(>= 1, 3, 4\).*received: y \(1, 3, 16\)"):
        ops.winograd_conv_nchw_max_pool_2x2(x, 0, 1, np.zeros((3, 18), np.float32), 3, 3, 1, 1, 0, 0, 4, 4, bias,
                                            True, False, 0.0, y, 1)
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        ops.winograd_conv_nchw_max_pool_2x2(x, 0, 1, np.zeros((3, 18), np.float32), 3, 3, 1, 1, 0, 0, 4, 4, bias,
                                            True, True, -0.5, np.zeros((1, 3, 4), np.float32), 1)
    with pytest.raises(ValueError, match=r"Expected images first : first \+ count within x's 1"):
        ops.winograd_conv_nchw(x, 1, 1, np.zeros((3, 18), np.float32), 3, 3, 1, 1, 0, 0, 4, 4, bias, True, False,
                               0.0, y, 1)


# --- the rule and the switch in functional ------------------------------------------------------

def test_the_rules_take_float32_3x3_stride_1_convolutions_with_enough_channels(monkeypatch):
    monkeypatch.setattr(F, "WINOGRAD", None)
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", None)
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    plain = ((3, 3), (1, 1), (1, 1), 1)

    def forward(out_c, in_c, out_hw, dtype=f32, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), groups=1):
        return F.winograd_conv(dtype, out_c, in_c, kernel, stride, dilation, groups, out_hw)

    def input_grad(out_c, in_c, in_hw, padding=(1, 1)):
        return F.winograd_input_grad(f32, out_c, in_c, *plain, in_hw, padding)

    assert forward(64, 32, (32, 32)) and forward(128, 64, (16, 16))        # mind-cifar conv2, conv3
    assert input_grad(64, 32, (32, 32)) and input_grad(128, 64, (16, 16))
    assert not forward(32, 3, (32, 32)) and not input_grad(32, 3, (32, 32))  # conv1: 3 input channels
    assert forward(16, 8, (32, 32)) and not forward(16, 8, (16, 16))        # 8 channels: 32x32 only
    assert not forward(4, 64, (32, 32)) and forward(8, 64, (8, 8))
    assert not input_grad(32, 8, (32, 32)) and input_grad(8, 64, (8, 8))   # dx has in_c channels
    assert not input_grad(64, 32, (32, 32), padding=(3, 3))                # dx's padding 2 - 3 < 0
    assert F.winograd_weight_grad(f32, 64, 32, *plain, (32, 32))
    assert not F.winograd_weight_grad(f32, 32, 3, *plain, (32, 32))
    assert not F.winograd_weight_grad(f32, 32, 16, *plain, (32, 32)) and F.winograd_weight_grad(f32, 8, 64, *plain,
                                                                                                 (8, 8))
    assert not F.winograd_weight_grad(f64, 64, 32, *plain, (32, 32))
    assert not forward(64, 32, (32, 32), dtype=f64)
    assert not forward(64, 32, (16, 16), stride=(2, 2))
    assert not forward(64, 32, (32, 32), kernel=(2, 2))
    assert not forward(64, 32, (32, 32), dilation=(2, 2))
    assert not forward(64, 32, (32, 32), groups=2)
    assert not forward(64, 32, (0, 32))
    monkeypatch.setattr(F, "WINOGRAD", True)  # forced on: any 3x3 stride-1 float32 shape
    assert forward(32, 3, (32, 32)) and input_grad(32, 3, (32, 32))
    assert not forward(64, 32, (16, 16), stride=(2, 2))
    assert not input_grad(64, 32, (32, 32), padding=(3, 3))
    monkeypatch.setattr(F, "WINOGRAD", False)
    assert not forward(64, 32, (32, 32)) and not input_grad(64, 32, (32, 32))
    monkeypatch.setattr(F, "WINOGRAD", None)
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", True)  # a forced GEMM path is that exact path
    assert not forward(64, 32, (32, 32)) and not input_grad(64, 32, (32, 32))


class _CallLog:
    """The compiled module with a record of the kernels called through it."""

    def __init__(self, ops):
        self._ops, self.called = ops, []

    def __getattr__(self, name):
        kernel = getattr(self._ops, name)

        def call(*args, **kwargs):
            self.called.append(name)
            return kernel(*args, **kwargs)

        return call


@pytest.mark.parametrize("switch", [True, False])
def test_the_switch_sends_conv2d_and_its_pooled_forms_to_the_kernel_it_names(switch, rng, monkeypatch):
    log = _CallLog(F._ops)
    monkeypatch.setattr(F, "_ops", log)
    monkeypatch.setattr(F, "WINOGRAD", switch)
    x, weight, bias = ref.conv_operands((2, 4, 6, 6, 5, 3, 1, 1), rng)
    F.conv2d(x, weight, bias, padding=1, activation="relu")
    F.conv2d(x, weight, bias, padding=1, activation="relu", max_pool_2x2=True)
    F.conv2d_max_pool_2x2_train(x, weight, bias, padding=1, activation="relu")
    F.conv2d(x.astype(np.float64), weight, bias, padding=1)  # float64: never Winograd
    dy = rng.standard_normal((2, 5, 6, 6)).astype(np.float32)
    F.conv2d_backward(dy, x, weight, padding=1)
    F.conv2d_backward(dy, x, weight, padding=1, need_dx=False)
    F.conv2d_backward(dy.astype(np.float64), x, weight, padding=1)
    winograd = [name for name in log.called if name.startswith("winograd_conv")]
    expected = ["winograd_conv_nchw", "winograd_conv_nchw_max_pool_2x2", "winograd_conv_nchw_max_pool_2x2_argmax",
                "winograd_conv_input_grad", "winograd_conv_weight_grad"]
    assert set(winograd) == (set(expected) if switch else set())  # once per group of images


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[5]], ids=shape_id)
def test_functional_winograd_matches_the_reference_forward_and_trains(shape, threads, rng, monkeypatch):
    monkeypatch.setattr(F, "WINOGRAD", True)
    x, weight, bias = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    z, bound = reference_and_bound(x, weight, bias, p, "leaky_relu", 0.1)
    with num_threads(threads):
        y = F.conv2d(x, weight, bias, padding=p, activation="leaky_relu", negative_slope=0.1)
        pooled = F.conv2d(x, weight, bias, padding=p, activation="leaky_relu", negative_slope=0.1, max_pool_2x2=True)
        trained, argmax = F.conv2d_max_pool_2x2_train(x, weight, bias, padding=p, activation="leaky_relu",
                                                      negative_slope=0.1)
        dy = rng.standard_normal(trained.shape).astype(np.float32)
        dx, dweight, dbias = F.conv2d_max_pool_2x2_backward(dy, argmax, trained, x, weight, padding=p,
                                                            activation="leaky_relu", negative_slope=0.1)
    assert y.dtype == np.float32 and np.all(np.abs(y - z) <= bound)
    assert np.all(np.abs(pooled - pool_2x2(z)) <= pool_2x2(bound))
    np.testing.assert_array_equal(trained, pooled)  # the same outputs, the same maximum
    # The backward of the pooled training form routes dy through the argmax Winograd chose.
    _, expected_code = corners_reference(np.where(z > 0, z, 0.1 * z))
    agree = (argmax.reshape(expected_code.shape) == expected_code).mean()
    assert agree > 0.99  # only near-ties (within round-off) may go the other way
    assert dx.shape == x.shape and dweight.shape == weight.shape and np.all(np.isfinite(dx))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=shape_id)
def test_functional_backward_by_winograd_matches_the_reference(shape, threads, rng, monkeypatch):
    (x, weight, dy), _, expected, bound = input_grad_operands(shape, rng)
    p = shape[-1]
    with num_threads(threads):
        monkeypatch.setattr(F, "WINOGRAD", True)
        dx, dweight, dbias = F.conv2d_backward(dy, x, weight, padding=p)
        monkeypatch.setattr(F, "WINOGRAD", False)
        _, gemm_dweight, gemm_dbias = F.conv2d_backward(dy, x, weight, padding=p)
    assert dx.dtype == np.float32 and np.all(np.abs(dx - expected) <= bound)
    # dW: each group of images is one Winograd call, the groups' parts summed in order afterwards
    # (one more rounding per group, bounded by the groups' count, far below the tiles').
    expected_dweight, dweight_bound = weight_grad_reference(x, weight, dy, p)
    assert np.all(np.abs(dweight - expected_dweight) <= dweight_bound)
    np.testing.assert_allclose(dweight, gemm_dweight, rtol=1e-4, atol=1e-4 * np.abs(gemm_dweight).max())
    np.testing.assert_array_equal(dbias, gemm_dbias)  # exact: the bias gradient's code is the same


def test_functional_winograd_gives_the_same_bits_on_any_thread_count(rng, monkeypatch):
    monkeypatch.setattr(F, "WINOGRAD", True)
    x, weight, bias = ref.conv_operands(SHAPES[5], rng)
    dy = rng.standard_normal((3, 40, 5, 5)).astype(np.float32)

    def run():
        y, argmax = F.conv2d_max_pool_2x2_train(x, weight, bias, padding=1, activation="relu")
        dx, dweight, dbias = F.conv2d_max_pool_2x2_backward(dy, argmax, y, x, weight, padding=1, activation="relu")
        return [y, argmax, dx, dweight, dbias, F.conv2d(x, weight, bias, padding=1)]

    # Groups of images do not depend on the thread count, each kernel call's split neither.
    ref.assert_identical_for_any_thread_count(run, 2)
