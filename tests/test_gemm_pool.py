"""The 2x2 max-pool fused into cnnx's packed convolution GEMM (``_ops.conv_gemm_nchw_max_pool_2x2``,
what ``conv2d(max_pool_2x2=True)`` runs in float32): every build this CPU can run against the
unfused float64 reference (convolution, bias, activation, then the floor 2x2 / stride-2 pool) on
odd output sizes (the pool drops a last row / column), padding, stride 2, more than one K block,
pooled rows of one window and windows that straddle images within one register tile."""
import numpy as np
import pytest

import cnnx.functional as F
from cnnx import _simd
from cnnx.parallel import num_threads
from cnnx.geometry import conv_output_size
import reference as ref

BUILDS = _simd.available_isas()
ACTIVATIONS = [(None, 0.0), ("relu", 0.0), ("leaky_relu", 0.1)]

# (batch, channels, height, width, out_channels, kernel, stride, padding)
SHAPES = [
    (1, 1, 5, 5, 5, 1, 1, 0),        # 5x5 output -> 2x2, one image, M < MR
    (3, 3, 7, 9, 32, 3, 1, 1),       # 7x9 output -> 3x4: 12 windows per image, tiles straddle images
    (2, 4, 11, 13, 9, 3, 2, 2),      # stride 2, padding 2: 7x8 -> 3x4
    (3, 2, 9, 9, 6, 2, 2, 1),        # stride 2, padding 1: 5x5 -> 2x2
    (5, 2, 7, 9, 3, 5, 2, 0),        # 2x3 output -> 1x1: runs of one window
    (2, 70, 6, 5, 13, 3, 1, 1),      # K = 630 > the K block (512): sums wait between K blocks
    (2, 128, 6, 6, 20, 2, 1, 0),     # mind-cifar conv4's shape class: 5x5 output, K = 512
    (1, 3, 35, 35, 7, 2, 1, 0),      # 34x34 -> 17x17: long pooled rows across tiles
    (4, 16, 16, 16, 17, 3, 1, 1),    # 16x16 -> 8x8, M = 17 (a last MR panel of one row)
    (3, 70, 12, 12, 13, 3, 1, 1),    # K = 630 and several column blocks: each block keeps its own sums
    (9, 2, 3, 3, 5, 2, 1, 0),        # 2x2 -> 1x1: one window per image, a tile spans 2-8 images
]


shape_id = ref.conv_case_id
operands = ref.conv_operands


def pool_2x2(a):
    """The floor 2x2 / stride-2 max-pool of (n, c, h, w) in NumPy (NaN if a window holds one)."""
    n, c, h, w = a.shape
    ph, pw = h // 2, w // 2
    return a[:, :, :2 * ph, :2 * pw].reshape(n, c, ph, 2, pw, 2).max(axis=(3, 5))


def unfused_reference(x, weight, bias, stride, padding, activation, slope):
    """float64 convolution + bias + activation, then the pool; and a float32 round-off bound per
    pooled value (the maximum of values each within its bound is within the largest bound of its
    window; the activation, slope <= 1, does not widen it)."""
    z, bound = ref.conv2d_and_float32_bound(x, weight, bias, stride, padding)
    if activation is not None:
        z = np.where(z > 0, z, slope * z)
    return pool_2x2(z), pool_2x2(bound), z.shape[2:]


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pooled_conv_gemm_matches_the_unfused_reference(isa, shape, rng):
    ops = _simd.load(isa)
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    # The group is images 1 : n + 1 of a batch with one more image in front.
    xs = np.concatenate([np.full_like(x[:1], np.nan), x])
    for case, ((activation, slope), with_bias) in enumerate((a, b) for a in ACTIVATIONS for b in (True, False)):
        b = bias if with_bias else None
        expected, bound, (out_h, out_w) = unfused_reference(x, weight, b, s, p, activation, slope)
        y = np.full((n + 1, oc, expected.shape[2] * expected.shape[3]), 7.0, np.float32)
        ops.conv_gemm_nchw_max_pool_2x2(xs, 1, n, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w,
                                        bias if with_bias else np.empty(0, np.float32), with_bias,
                                        activation is not None, slope, y, 1 + case % 2)
        got = y[1:].reshape(expected.shape)
        assert np.all(np.abs(got - expected) <= bound), (activation, with_bias)
        assert np.all(y[0] == 7.0)  # exact: the image in front is never written


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[5], SHAPES[8], SHAPES[9]], ids=shape_id)
def test_pooled_conv_gemm_gives_the_same_values_on_any_thread_count(shape, rng):
    ops = _simd.load(BUILDS[0])
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)

    def run(threads):
        y = np.empty((n, oc, (out_h // 2) * (out_w // 2)), np.float32)
        ops.conv_gemm_nchw_max_pool_2x2(x, 0, n, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w,
                                        bias, True, True, 0.1, y, threads)
        return y

    ref.assert_kernel_identical_for_thread_counts(run)  # threads split the column blocks; maxima too


@pytest.mark.parametrize("isa", BUILDS)
def test_pooled_conv_gemm_propagates_nan_like_max_pool(isa, rng):
    ops = _simd.load(isa)
    x, weight, bias = operands((2, 2, 6, 7, 9, 1, 1, 0), rng)
    x[0, 1, 2, 3] = np.nan   # window (1, 1) of image 0, every channel
    x[1, 0, 5, 6] = np.nan   # the dropped last column: no pooled value sees it
    y = np.empty((2, 9, 9), np.float32)
    ops.conv_gemm_nchw_max_pool_2x2(x, 0, 2, weight.reshape(9, -1), 1, 1, 1, 1, 0, 0, 6, 7,
                                    bias, True, True, 0.0, y, 1)
    z = F.conv2d(x, weight, bias, activation="relu")
    expected, _ = F.max_pool2d(z, 2)
    np.testing.assert_array_equal(np.isnan(y.reshape(expected.shape)), np.isnan(expected))
    assert np.isnan(y[0, :, 1 * 3 + 1]).all() and not np.isnan(y[1]).any()


def test_pooled_conv_gemm_refuses_a_wrong_output_or_slope():
    ops = _simd.load(BUILDS[0])
    x = np.zeros((1, 2, 6, 6), np.float32)
    weight = np.zeros((3, 2 * 3 * 3), np.float32)
    bias = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"Expected y of shape \(>= 1, 3, 4\).*received: y \(1, 3, 9\)"):
        ops.conv_gemm_nchw_max_pool_2x2(x, 0, 1, weight, 3, 3, 1, 1, 0, 0, 4, 4, bias, True, False, 0.0,
                                        np.zeros((1, 3, 9), np.float32), 1)
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        ops.conv_gemm_nchw_max_pool_2x2(x, 0, 1, weight, 3, 3, 1, 1, 0, 0, 4, 4, bias, True, True, -0.5,
                                        np.zeros((1, 3, 4), np.float32), 1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[6]], ids=shape_id)
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
def test_conv2d_pooled_in_the_tile_stores_equals_conv2d_then_max_pool2d(shape, activation, slope, threads, rng,
                                                                        monkeypatch):
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", True)
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    with num_threads(threads):
        got = F.conv2d(x, weight, bias, stride=s, padding=p, activation=activation, negative_slope=slope,
                       max_pool_2x2=True)
        monkeypatch.setattr(F, "POOLED_TILE_STORE", False)  # the packed GEMM, then the pooling pass
        two_passes = F.conv2d(x, weight, bias, stride=s, padding=p, activation=activation, negative_slope=slope,
                              max_pool_2x2=True)
        unfused, _ = F.max_pool2d(F.conv2d(x, weight, bias, stride=s, padding=p, activation=activation,
                                           negative_slope=slope), 2)
    expected, bound, _ = unfused_reference(x, weight, bias, s, p, activation, slope)
    assert got.dtype == np.float32 and got.shape == expected.shape == unfused.shape
    assert np.all(np.abs(got - expected) <= bound)
    # The same GEMM sums either way; a float32 tolerance all the same (a compiler may contract
    # the two kernels' multiply-adds differently).
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5 * np.abs(unfused).max())
    np.testing.assert_allclose(got, two_passes, rtol=1e-5, atol=1e-5 * np.abs(unfused).max())


# --- the training form: pooled values and each window's argmax from the tile stores -----------

def corners_reference(z, slope):
    """Activated (n, oc, oh, ow) -> pooled values and codes 2 * dy + dx of each window's first
    maximum (or first NaN) in row-major order, as max_pool2d picks it."""
    n, oc, oh, ow = z.shape
    ph, pw = oh // 2, ow // 2
    a = np.where(z > 0, z, slope * z)[:, :, :2 * ph, :2 * pw].reshape(n, oc, ph, 2, pw, 2)
    corners = a.transpose(0, 1, 2, 4, 3, 5).reshape(n, oc, ph * pw, 4)
    code = np.argmax(corners, axis=-1)
    return np.take_along_axis(corners, code[..., None], -1)[..., 0], code.astype(np.int32)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pooled_conv_gemm_argmax_matches_max_pool_with_ties(isa, shape, rng):
    ops = _simd.load(isa)
    n, c, h, w, oc, k, s, p = shape
    # Small integers: every sum is exact in float32 (|sum| <= 4 * K + 2 < 2**24) and so is the slope
    # 0.5, so values and codes must be exactly the reference's; most windows hold ties (and ReLU
    # makes more), which must go to the first maximum.
    x = rng.integers(-2, 3, (n, c, h, w)).astype(np.float32)
    weight = rng.integers(-2, 3, (oc, c, k, k)).astype(np.float32)
    bias = rng.integers(-2, 3, oc).astype(np.float32)
    pads = ((p, p), (p, p))
    for case, (rectify, slope, with_bias) in enumerate([(False, 1.0, True), (True, 0.0, False), (True, 0.5, True)]):
        z = ref.conv2d(x.astype(np.float64), weight.astype(np.float64),
                       bias.astype(np.float64) if with_bias else None, (s, s), pads)
        expected, expected_code = corners_reference(z, slope)
        out_h, out_w = z.shape[2:]
        y = np.full((n + 1, oc, expected.shape[2]), 7.0, np.float32)
        code = np.full(y.shape, -1, np.int32)
        xs = np.concatenate([np.zeros_like(x[:1]), x])
        ops.conv_gemm_nchw_max_pool_2x2_argmax(xs, 1, n, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w,
                                               bias if with_bias else np.empty(0, np.float32), with_bias, rectify,
                                               slope if rectify else 0.0, y, code, 1 + case % 2)
        np.testing.assert_array_equal(y[1:], expected)
        np.testing.assert_array_equal(code[1:], expected_code)
        assert np.all(y[0] == 7.0) and np.all(code[0] == -1)  # the image in front is never written


@pytest.mark.parametrize("isa", BUILDS)
def test_pooled_conv_gemm_argmax_picks_the_first_nan(isa, rng):
    ops = _simd.load(isa)
    x = rng.standard_normal((1, 1, 4, 6)).astype(np.float32)
    x[0, 0, 1, 2] = np.nan   # window (0, 1), bottom left
    x[0, 0, 2, 5] = np.nan   # window (1, 2), top right
    x[0, 0, 3, 4] = np.nan   # window (1, 2), bottom left: the top right comes first
    y = np.empty((1, 1, 6), np.float32)
    code = np.empty((1, 1, 6), np.int32)
    ops.conv_gemm_nchw_max_pool_2x2_argmax(x, 0, 1, np.ones((1, 1), np.float32), 1, 1, 1, 1, 0, 0, 4, 6,
                                           np.zeros(1, np.float32), False, True, 0.0, y, code, 1)
    assert np.isnan(y[0, 0, [1, 5]]).all() and not np.isnan(y[0, 0, [0, 2, 3, 4]]).any()
    assert code[0, 0, 1] == 2 and code[0, 0, 5] == 1


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[5]], ids=shape_id)
def test_pooled_training_forward_from_the_tile_stores_equals_the_pooling_pass(shape, threads, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", True)
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    with num_threads(threads):
        y, argmax = F.conv2d_max_pool_2x2_train(x, weight, bias, s, p, activation="leaky_relu", negative_slope=0.1)
        monkeypatch.setattr(F, "POOLED_TILE_STORE", False)
        y_pass, argmax_pass = F.conv2d_max_pool_2x2_train(x, weight, bias, s, p, activation="leaky_relu",
                                                          negative_slope=0.1)
    expected, bound, _ = unfused_reference(x, weight, bias, s, p, "leaky_relu", 0.1)
    assert np.all(np.abs(y - expected) <= bound)
    np.testing.assert_allclose(y, y_pass, rtol=1e-5, atol=1e-5 * np.abs(y_pass).max())
    # Both paths sum with the same micro-kernel in the same order and compare the same activated values.
    np.testing.assert_array_equal(argmax, argmax_pass)
