"""cnnx's packed float32 convolution GEMM (``_ops.conv_gemm_nchw`` / ``conv_gemm_columns``, im2col
fused into the packing): every build this CPU can run against the float64 reference over a grid of
shapes that are not multiples of the register tile (MR x NR) or of the K block, 1x1 / 3x3 / 5x5
windows, strides 1 and 2, paddings 0 / 1 / 2, one and odd batches, one input channel; and
``functional.conv2d`` (plain, pooled inference, pooled training) on the packed path."""
import itertools

import numpy as np
import pytest

import cnnx
import cnnx.functional as F
from cnnx import _simd
from cnnx.geometry import conv_output_size
import reference as ref

BUILDS = _simd.available_isas()

# (batch, channels, height, width, out_channels, kernel, stride, padding)
SHAPES = [
    (1, 1, 9, 7, 5, 3, 1, 1),        # one image, one channel, M < MR
    (3, 1, 28, 28, 6, 5, 1, 2),      # lenet5's first layer, odd batch
    (2, 3, 12, 11, 32, 3, 1, 1),     # M a multiple of MR, N = 2 * 132 not of NR
    (3, 4, 11, 13, 9, 3, 2, 2),      # stride 2, padding 2
    (1, 5, 8, 8, 17, 1, 1, 0),       # 1x1
    (5, 2, 7, 9, 3, 5, 2, 0),        # 5x5 stride 2, output 2x3
    (3, 6, 10, 10, 16, 5, 1, 0),     # lenet5's second layer shape class
    (2, 70, 6, 5, 13, 3, 1, 1),      # K = 630 > the K block (512): accumulates across K blocks
    (1, 2, 3, 3, 3, 3, 1, 2),        # output larger than the input, mostly padding
    (7, 3, 5, 4, 40, 2, 1, 0),       # many images per NR panel
]


shape_id = ref.conv_case_id
operands = ref.conv_operands


reference_and_bound = ref.conv2d_and_float32_bound


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_gemm_nchw_matches_reference_with_bias_and_leaky_relu(isa, shape, rng):
    ops = _simd.load(isa)
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    z, bound = reference_and_bound(x, weight, bias, s, p)
    out_h, out_w = z.shape[2:]
    # The group is images 1 : n of an output with one more image in front, which stays untouched.
    y = np.full((n + 1, oc, out_h * out_w), 7.0, np.float32)
    xs = np.concatenate([np.zeros_like(x[:1]), x])
    ops.conv_gemm_nchw(xs, 1, n, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w,
                       bias, True, True, 0.1, y, 1)
    expected = np.where(z > 0, z, 0.1 * z).reshape(n, oc, -1)
    assert np.all(np.abs(y[1:] - expected) <= bound.reshape(n, oc, -1))
    assert np.all(y[0] == 7.0)  # exact: never written


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_gemm_columns_matches_reference_in_gemm_layout(isa, shape, rng):
    ops = _simd.load(isa)
    x, weight, _ = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    zero_bias = np.zeros(oc, np.float32)
    z, bound = reference_and_bound(x, weight, zero_bias, s, p)
    out_h, out_w = z.shape[2:]
    y_gemm = np.full((oc, n, out_h * out_w), np.nan, np.float32)
    ops.conv_gemm_columns(x, 0, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w, y_gemm, 1)
    got = y_gemm.transpose(1, 0, 2).reshape(z.shape)
    assert np.all(np.abs(got - z) <= bound)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[7], SHAPES[9]], ids=shape_id)
def test_conv_gemm_gives_the_same_values_on_any_thread_count(shape, rng):
    ops = _simd.load(BUILDS[0])
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)

    def run(threads):
        y = np.empty((n, oc, out_h * out_w), np.float32)
        ops.conv_gemm_nchw(x, 0, n, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w,
                           bias, True, False, 0.0, y, threads)
        return y

    ref.assert_kernel_identical_for_thread_counts(run)  # threads split the column blocks


def test_conv_gemm_refuses_an_empty_weight():
    ops = _simd.load(BUILDS[0])
    x = np.zeros((1, 0, 4, 4), np.float32)
    with pytest.raises(ValueError, match="at least one column"):
        ops.conv_gemm_nchw(x, 0, 1, np.zeros((2, 0), np.float32), 1, 1, 1, 1, 0, 0, 4, 4,
                           np.zeros(2, np.float32), False, False, 0.0, np.zeros((1, 2, 16), np.float32), 1)


def test_packed_path_is_float32_only():
    assert F.packed_conv_gemm(np.dtype(np.float32), 32, 27, 1024)
    assert not F.packed_conv_gemm(np.dtype(np.float64), 32, 27, 1024)
    assert not F.packed_conv_gemm(np.dtype(np.float32), 32, 0, 1024)
    assert F.packed_backward_gemm(np.dtype(np.float32), 32, 27, 1024)[1]
    assert F.packed_backward_gemm(np.dtype(np.float64), 32, 576, 1024) == (False, False)


def test_weight_gradient_stays_on_blas_unless_its_kernels_are_narrower(monkeypatch):
    monkeypatch.setattr(_simd, "blas_narrower_than_kernels", lambda: False)
    assert not F.packed_backward_gemm(np.dtype(np.float32), 128, 576, 256)[0]
    monkeypatch.setattr(_simd, "blas_narrower_than_kernels", lambda: True)
    assert F.packed_backward_gemm(np.dtype(np.float32), 128, 576, 256)[0]
    assert not F.packed_backward_gemm(np.dtype(np.float32), 32, 27, 1024)[0]  # small k: BLAS either way


def test_blas_isa_names_a_known_instruction_set_or_none():
    assert _simd.blas_isa() in (None,) + _simd.ISAS
    assert isinstance(_simd.blas_narrower_than_kernels(), bool)


FORMS = ["conv", "conv_pool_infer", "conv_pool_train"]


@pytest.mark.parametrize("form, shape", list(itertools.product(FORMS, [SHAPES[1], SHAPES[2], SHAPES[7]])),
                         ids=lambda v: v if isinstance(v, str) else shape_id(v))
def test_functional_conv2d_on_the_packed_path_matches_reference(form, shape, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", True)
    x, weight, bias = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    z, bound = reference_and_bound(x, weight, bias, s, p)
    expected = np.maximum(z, 0)
    if form == "conv":
        got = F.conv2d(x, weight, bias, stride=s, padding=p, activation="relu")
    else:
        ph, pw = z.shape[2] // 2, z.shape[3] // 2
        crop = (slice(None), slice(None), slice(0, 2 * ph), slice(0, 2 * pw))
        expected = ref.max_pool2d(expected[crop], (2, 2), (2, 2), ((0, 0), (0, 0)))
        bound = ref.max_pool2d(bound[crop], (2, 2), (2, 2), ((0, 0), (0, 0)))
        if form == "conv_pool_infer":
            got = F.conv2d(x, weight, bias, stride=s, padding=p, activation="relu", max_pool_2x2=True)
        else:
            got, _ = F.conv2d_max_pool_2x2_train(x, weight, bias, stride=s, padding=p, activation="relu")
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= bound)


# (M, K, N, a transposed, b transposed): the GEMM of the convolution backwards (dW = dY @ cols.T,
# dcols = W.T @ dY) and edges of every block size.
GEMMS = [(5, 7, 9, False, False), (64, 128, 1000, True, False), (33, 700, 65, False, True),
         (8, 3, 32, True, True), (17, 1, 40, False, False)]


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("m, k, n, ta, tb", GEMMS)
def test_gemm_matches_float64_product_for_any_strides(isa, m, k, n, ta, tb, rng):
    ops = _simd.load(isa)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    a, b = (a.T if ta else a), (b.T if tb else b)
    c = np.full((m, n), np.nan, np.float32)
    ops.gemm(a, b, c, 2)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = 2 * k * np.finfo(np.float32).eps * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    assert np.all(np.abs(c - exact) <= bound)


def test_gemm_refuses_mismatched_shapes():
    ops = _simd.load(BUILDS[0])
    with pytest.raises(ValueError, match=r"received: a \(2, 3\), b \(4, 5\)"):
        ops.gemm(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), np.zeros((2, 5), np.float32), 1)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[7]], ids=shape_id)
def test_conv2d_backward_on_the_packed_path_matches_reference(shape, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", True)
    x, weight, _ = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    pads = ((p, p), (p, p))
    z = ref.conv2d(x.astype(np.float64), weight.astype(np.float64), None, (s, s), pads)
    dy = rng.standard_normal(z.shape).astype(np.float32)
    dx, dweight, dbias = F.conv2d_backward(dy, x, weight, stride=s, padding=p)
    dx_ref, dweight_ref, _ = ref.conv2d_backward(dy.astype(np.float64), x.astype(np.float64),
                                              weight.astype(np.float64), (s, s), pads)
    # Round-off bounds: the same sums of |.| products, times 2 * terms * eps.
    eps = np.finfo(np.float32).eps
    dx_size, dweight_size, _ = ref.conv2d_backward(np.abs(dy).astype(np.float64), np.abs(x).astype(np.float64),
                                                np.abs(weight).astype(np.float64), (s, s), pads)
    assert np.all(np.abs(dx - dx_ref) <= 2 * oc * k * k * eps * dx_size)
    assert np.all(np.abs(dweight - dweight_ref) <= 2 * n * z[0, 0].size * eps * dweight_size)
    np.testing.assert_allclose(dbias, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


# The weight gradient straight from the images (``_ops.conv_weight_grad``): the SHAPES, plus
# groups of more pixels than one pixel block (2048) with a tail that is not a vector multiple.
WEIGHT_GRAD_SHAPES = SHAPES + [
    (3, 2, 40, 41, 5, 3, 1, 1),      # N = 3 * 1640: three pixel blocks, last one 824 pixels
    (2, 3, 45, 45, 7, 3, 2, 0),      # stride 2 over a long row, N = 2 * 22 * 22
]


def dy_in_gemm_layout(dy):
    """(n, out_c, h, w) -> the GEMM layout (out_c, n, h * w)."""
    n, oc = dy.shape[:2]
    return np.ascontiguousarray(dy.transpose(1, 0, 2, 3).reshape(oc, n, -1))


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", WEIGHT_GRAD_SHAPES, ids=shape_id)
def test_conv_weight_grad_matches_reference(isa, shape, rng):
    ops = _simd.load(isa)
    x, weight, _ = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    pads = ((p, p), (p, p))
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    z = ref.conv2d(x64, w64, None, (s, s), pads)
    out_h, out_w = z.shape[2:]
    dy = rng.standard_normal(z.shape).astype(np.float32)
    _, expected, _ = ref.conv2d_backward(dy.astype(np.float64), x64, w64, (s, s), pads)
    _, size, _ = ref.conv2d_backward(np.abs(dy).astype(np.float64), np.abs(x64), np.abs(w64), (s, s), pads)
    # The group is images 1 : n + 1 of a batch with one more image in front (never read).
    xs = np.concatenate([np.full_like(x[:1], np.nan), x])
    dweight = np.full((oc, c * k * k), np.nan, np.float32)  # overwritten, not accumulated into
    ops.conv_weight_grad(xs, 1, dy_in_gemm_layout(dy), k, k, s, s, p, p, out_h, out_w, dweight, 1)
    bound = 2 * n * out_h * out_w * np.finfo(np.float32).eps * size.reshape(oc, -1) + 1e-30
    assert np.all(np.abs(dweight - expected.reshape(oc, -1)) <= bound)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[7], WEIGHT_GRAD_SHAPES[-2]], ids=shape_id)
def test_conv_weight_grad_gives_the_same_values_on_any_thread_count(shape, rng):
    ops = _simd.load(BUILDS[-1])
    x, weight, _ = operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
    dy_gemm = rng.standard_normal((oc, n, out_h * out_w)).astype(np.float32)

    def run(threads):
        dweight = np.empty((oc, c * k * k), np.float32)
        ops.conv_weight_grad(x, 0, dy_gemm, k, k, s, s, p, p, out_h, out_w, dweight, threads)
        return dweight

    ref.assert_kernel_identical_for_thread_counts(run)  # threads split the taps


def test_conv_weight_grad_refuses_mismatched_shapes():
    ops = _simd.load(BUILDS[0])
    x = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"received: dweight \(4, 26\)"):
        ops.conv_weight_grad(x, 0, np.zeros((4, 2, 9), np.float32), 3, 3, 1, 1, 0, 0, 3, 3,
                             np.zeros((4, 26), np.float32), 1)


def test_implicit_weight_gradient_is_float32_only(monkeypatch):
    assert F.implicit_weight_grad(np.dtype(np.float32), 32, 27, 1024)
    assert not F.implicit_weight_grad(np.dtype(np.float64), 32, 27, 1024)
    assert not F.implicit_weight_grad(np.dtype(np.float32), 32, 0, 1024)
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", False)
    assert not F.implicit_weight_grad(np.dtype(np.float32), 32, 27, 1024)


def test_conv_weight_grad_of_empty_images_is_zero():
    # 0x0 images with padding 1: every window reads only padding, so dW is exactly zero.
    ops = _simd.load(BUILDS[0])
    dweight = np.full((3, 2), np.nan, np.float32)
    ops.conv_weight_grad(np.zeros((2, 2, 0, 0), np.float32), 0, np.ones((3, 2, 4), np.float32),
                         1, 1, 1, 1, 1, 1, 2, 2, dweight, 1)
    assert np.array_equal(dweight, np.zeros((3, 2), np.float32))


@pytest.mark.parametrize("n, d_in, d_out", [(1, 5, 3), (37, 300, 17), (256, 784, 128)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_and_its_backward_on_the_packed_path_match_float64(n, d_in, d_out, threads, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_CONV_GEMM", True)  # forces the dense GEMMs too (tests/test_dense_gemm.py)
    monkeypatch.setattr(cnnx.parallel, "MIN_GEMM_WORK", 1)  # split rows even for the small cases
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    b = rng.standard_normal(d_out).astype(np.float32)
    dz = rng.standard_normal((n, d_out)).astype(np.float32)
    x64, w64, dz64 = (a.astype(np.float64) for a in (x, w, dz))
    eps = np.finfo(np.float32).eps
    with cnnx.parallel.num_threads(threads):
        z = F.linear(x, w, b)
        dw = np.full_like(w, np.nan)
        dx = F.linear_backward(dz, x, w, dw, np.empty_like(b))
    assert np.all(np.abs(z - (x64 @ w64.T + b)) <= 2 * d_in * eps * (np.abs(x64) @ np.abs(w64.T) + np.abs(b)))
    assert np.all(np.abs(dw - dz64.T @ x64) <= 2 * n * eps * (np.abs(dz64.T) @ np.abs(x64)))
    assert np.all(np.abs(dx - dz64 @ w64) <= 2 * d_out * eps * (np.abs(dz64) @ np.abs(w64)))
