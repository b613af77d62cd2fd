"""Conv2D + activation + 2x2 max-pool fused for training (cnnx.functional.conv2d_max_pool_2x2_train and
its backward, and the plan's training step): the same results as the unfused layers, ties and
odd sizes included."""
import numpy as np
import pytest

import cnnx
from cnnx import _simd
from cnnx import functional as F
from cnnx.layers import Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU
from cnnx.network import Network

ACTIVATIONS = [(None, 0.0), ("relu", 0.0), ("leaky_relu", 0.1)]


def unfused(x, w, b, stride, padding, activation, slope, dy):
    """conv2d (+ activation) -> max_pool2d(2) and back, through the separate functions."""
    z = F.conv2d(x, w, b, stride, padding, activation=activation, negative_slope=slope)
    y, idx = F.max_pool2d(z, 2)
    dz = F.max_pool2d_backward(dy, idx, z.shape)
    dx, dw, db = F.conv2d_backward(dz, x, w, stride, padding, activation=activation, negative_slope=slope, y=z)
    return y, dx, dw, db


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((3, 2, 8, 8), 3, 1, 1),      # even output
    ((2, 3, 9, 7), 2, 1, 0),      # odd output 8x6 -> fine; 9x7 input with k=2 gives 8x6
    ((2, 1, 10, 9), 3, 1, 0),     # odd output 8x7: the last column is dropped by the pool
    ((2, 2, 11, 11), 3, 2, 1),    # strided, output 6x6
])
def test_fused_pool_training_equals_unfused(rng, dtype, tol, activation, slope, shape, kernel, stride, padding):
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((4, shape[1], kernel, kernel)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    y, argmax = F.conv2d_max_pool_2x2_train(x, w, b, stride, padding, activation=activation, negative_slope=slope)
    dy = rng.standard_normal(y.shape).astype(dtype)
    y_ref, dx_ref, dw_ref, db_ref = unfused(x, w, b, stride, padding, activation, slope, dy)
    # Same GEMM, same additions and comparisons: the pooled values are exactly the unfused ones.
    np.testing.assert_array_equal(y, y_ref)
    assert argmax.dtype == np.int32 and argmax.shape == y.shape and 0 <= argmax.min() <= argmax.max() <= 3
    dx, dw, db = F.conv2d_max_pool_2x2_backward(dy, argmax, y, x, w, stride, padding, activation=activation,
                                         negative_slope=slope)
    assert dx.dtype == dw.dtype == db.dtype == dtype
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, dw_ref, rtol=tol, atol=tol * np.abs(dw_ref).max())
    np.testing.assert_allclose(db, db_ref, rtol=tol, atol=tol * np.abs(db_ref).max())
    dx_none, dw2, _ = F.conv2d_max_pool_2x2_backward(dy, argmax, y, x, w, stride, padding, need_dx=False,
                                              activation=activation, negative_slope=slope)
    assert dx_none is None
    np.testing.assert_allclose(dw2, dw, rtol=tol, atol=tol * np.abs(dw).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
def test_ties_route_to_the_same_position_as_max_pool(rng, dtype, activation, slope):
    """Small integers everywhere: most windows hold ties (and ReLU makes zeros tie); each must
    send its gradient to the first maximum, as MaxPool2D does."""
    x = rng.integers(-1, 2, (3, 2, 6, 6)).astype(dtype)
    w = rng.integers(-1, 2, (3, 2, 1, 1)).astype(dtype)
    b = np.zeros(3, dtype)
    y, argmax = F.conv2d_max_pool_2x2_train(x, w, b, activation=activation, negative_slope=slope)
    z = F.conv2d(x, w, b, activation=activation, negative_slope=slope)
    _, idx = F.max_pool2d(z, 2)
    assert np.any(z[..., ::2, ::2] == z[..., 1::2, 1::2])  # the data does hold ties
    rows, cols = np.divmod(idx, z.shape[3])
    oy, ox = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
    np.testing.assert_array_equal(argmax, 2 * (rows - 2 * oy) + (cols - 2 * ox))
    dy = rng.standard_normal(y.shape).astype(dtype)
    _, dx_ref, dw_ref, db_ref = unfused(x, w, b, 1, 0, activation, slope, dy)
    dx, dw, db = F.conv2d_max_pool_2x2_backward(dy, argmax, y, x, w, activation=activation, negative_slope=slope)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dw, dw_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(db, db_ref, rtol=tol, atol=tol)


def test_nan_propagates_like_max_pool(rng):
    x = rng.standard_normal((1, 1, 4, 4))
    x[0, 0, 1, 2] = np.nan
    w = np.ones((1, 1, 1, 1))
    y, argmax = F.conv2d_max_pool_2x2_train(x, w, None, activation="relu")
    y_ref, idx = F.max_pool2d(F.conv2d(x, w, None, activation="relu"), 2)
    np.testing.assert_array_equal(y, y_ref)  # NaN where the unfused pool gives NaN
    assert argmax[0, 0, 0, 1] == 2 and idx[0, 0, 0, 1] == 1 * 4 + 2


def test_bad_input_is_refused_with_a_clear_error(rng):
    x = rng.standard_normal((1, 1, 2, 2))
    with pytest.raises(ValueError, match="at least 2x2"):
        F.conv2d_max_pool_2x2_train(x, np.ones((1, 1, 2, 2)))
    y, argmax = F.conv2d_max_pool_2x2_train(np.ones((1, 1, 4, 4)), np.ones((1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"Expected dy of shape \(1, 1, 2, 2\)"):
        F.conv2d_max_pool_2x2_backward(np.ones((1, 1, 3, 3)), argmax, y, np.ones((1, 1, 4, 4)), np.ones((1, 1, 1, 1)))
    with pytest.raises(ValueError, match="negative_slope"):
        F.conv2d_max_pool_2x2_train(x, np.ones((1, 1, 1, 1)), activation="leaky_relu", negative_slope=-1.0)


def user_net(dtype, own_activation=False, seed=0):
    gen = np.random.default_rng(seed)
    if own_activation:
        head = [Conv2D(2, 4, 3, padding=1, activation="leaky_relu", negative_slope=0.2, rng=gen), MaxPool2D(2)]
    else:
        head = [Conv2D(2, 4, 3, padding=1, rng=gen), LeakyReLU(0.2), MaxPool2D(2)]
    layers = head + [Conv2D(4, 5, 2, rng=gen), ReLU(), MaxPool2D(2), Flatten(), Dense(5 * 2 * 2, 3, rng=gen)]
    return Network(layers, input_shape=(2, 10, 10), dtype=dtype)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-11), ("float32", 2e-5)])
@pytest.mark.parametrize("own_activation", [False, True])
def test_plan_fuses_pool_in_training_and_fit_matches_the_unfused_plan(rng, dtype, rtol, own_activation):
    fused, ref = user_net(dtype, own_activation), user_net(dtype, own_activation)
    ref.fuse = False
    kinds = [s.kind for s in fused.plan.train_steps]
    assert kinds[:2] == (["conv+pool"] if own_activation else ["conv+act+pool"]) + ["conv+act+pool"]
    for net in (fused, ref):
        net.compile("softmax_cross_entropy", cnnx.optimizers.Adam(lr=1e-2))
    x = rng.standard_normal((9, 2, 10, 10)).astype(dtype)
    y = rng.integers(0, 3, 9)
    out, out_ref = fused.forward(x, training=True), ref.forward(x, training=True)
    np.testing.assert_allclose(out, out_ref, rtol=rtol, atol=rtol)
    dx = fused.backward(out_ref - 0.5, need_input_grad=True)
    dx_ref = ref.backward(out_ref - 0.5, need_input_grad=True)
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol, atol=rtol * np.abs(dx_ref).max())
    for (key, _, g), (_, _, g_ref) in zip(fused.parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * np.abs(g_ref).max(), err_msg=key)
    losses = fused.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)["loss"]
    losses_ref = ref.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)["loss"]
    np.testing.assert_allclose(losses, losses_ref, rtol=10 * rtol)
    np.testing.assert_allclose(fused.predict(x), ref.predict(x), rtol=10 * rtol, atol=10 * rtol)


def test_grouped_conv_is_not_pool_fused_in_training():
    layers = [Conv2D(2, 4, 3, padding=1, groups=2, rng=0), ReLU(), MaxPool2D(2)]
    net = Network(layers, input_shape=(2, 6, 6))
    assert net.plan.train_steps[0].kind == "conv+act"
    assert net.plan.infer_steps[0].kind == "conv+act+pool"


# --- the pooled training kernels of every ISA build against a NumPy reference -----------------
# The AVX-512 build runs its pooled rows in masked chunks of 16 (float) or 8 (double) windows:
# the widths below give rows of 1 window, exact chunks, one window past a chunk and several chunks.

def _leaky_ref(v, slope):
    return np.where(v > 0, v, v * slope)


def _pool_argmax_ref(y_gemm, bias, slope, out_w):
    """(out_c, g, oh * out_w) -> pooled (g, out_c, ph * pw) and codes: the first maximum (or the
    first NaN) of each window in row-major order, as np.argmax picks it."""
    oc, g, p = y_gemm.shape
    oh = p // out_w
    ph, pw = oh // 2, out_w // 2
    a = _leaky_ref(y_gemm.reshape(oc, g, oh, out_w) + bias[:, None, None, None], slope)
    a = a[:, :, :2 * ph, :2 * pw].reshape(oc, g, ph, 2, pw, 2).transpose(1, 0, 2, 4, 3, 5)
    corners = a.reshape(g, oc, ph * pw, 4)
    code = np.argmax(corners, axis=-1)
    return np.take_along_axis(corners, code[..., None], -1)[..., 0], code.astype(np.int32)


def _unpool_ref(dy, y, code, low, oh, out_w):
    g, oc, _ = dy.shape
    ph, pw = oh // 2, out_w // 2
    v = np.where(y > 0, dy, dy * low)
    out = np.zeros((oc, g, oh, out_w), dy.dtype)
    k = (code & 3).reshape(g, oc, ph, pw)
    py, px = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
    for j in range(g):
        for o in range(oc):
            out[o, j, 2 * py + k[j, o] // 2, 2 * px + k[j, o] % 2] = v[j, o].reshape(ph, pw)
    return out.reshape(oc, g, oh * out_w), v.sum(axis=-1, dtype=np.float64)


@pytest.mark.parametrize("isa", _simd.available_isas())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("g, oc, oh, out_w", [
    (1, 1, 2, 2), (1, 3, 3, 3), (2, 2, 5, 14), (1, 2, 4, 16), (3, 1, 2, 18), (2, 2, 3, 31),
    (1, 1, 4, 32), (2, 3, 7, 34), (1, 2, 2, 67),
])
def test_pool_kernels_of_each_isa_match_numpy(rng, isa, dtype, g, oc, oh, out_w):
    ops = _simd.load(isa)
    slope = 0.1
    first = 1  # the group's images start one into the batch
    n = first + g
    # Small integers make ties in most windows; a few NaNs must win as max_pool2d's do.
    y_gemm = rng.integers(-2, 3, (oc, g, oh * out_w)).astype(dtype)
    y_gemm.flat[rng.choice(y_gemm.size, size=max(1, y_gemm.size // 40), replace=False)] = np.nan
    bias = rng.integers(-1, 2, oc).astype(dtype)
    ph, pw = oh // 2, out_w // 2
    y = np.full((n, oc, ph * pw), -7, dtype)
    code = np.full(y.shape, -7, np.int32)
    scratch = (np.empty((g, oh * pw), dtype), np.empty((g, oh * pw), np.int32))
    ops.gemm_to_nchw_max_pool_2x2_argmax(y_gemm, bias, True, True, slope, first, out_w, y, code, *scratch, 2)
    y_ref, code_ref = _pool_argmax_ref(y_gemm, bias, slope, out_w)
    # Comparisons and one add and one multiply per value, the same in both: exact.
    np.testing.assert_array_equal(y[first:], y_ref)
    np.testing.assert_array_equal(code[first:], code_ref)
    assert np.all(y[:first] == -7) and np.all(code[:first] == -7)  # other images untouched
    # Inference keeps no argmax: the same values (bias and activation are monotonic), NaNs included.
    y_infer = np.full(y.shape, -7, dtype)
    ops.gemm_to_nchw_max_pool_2x2_vectorised(y_gemm, bias, True, True, slope, first, out_w, y_infer, 2)
    np.testing.assert_array_equal(y_infer, y)
    y_plain = np.full(y.shape, -7, dtype)
    ops.gemm_to_nchw_max_pool_2x2_vectorised(y_gemm, bias, False, False, 0.0, first, out_w, y_plain, 2)
    np.testing.assert_array_equal(y_plain[first:], _pool_argmax_ref(y_gemm, 0 * bias, 1.0, out_w)[0])

    dy = rng.standard_normal(y.shape).astype(dtype)
    y_out = np.where(np.isnan(y), 1, y)
    codes = rng.integers(-4, 8, y.shape).astype(np.int32)  # the kernel masks codes to 0..3
    dy_gemm = np.full((oc, g, oh * out_w), np.nan, dtype)
    dbias = np.full((g, oc), np.nan)
    ops.max_pool_2x2_argmax_to_gemm(dy, y_out, codes, True, slope, first, out_w, dy_gemm, dbias, 2)
    dy_gemm_ref, dbias_ref = _unpool_ref(dy[first:], y_out[first:], codes[first:], slope, oh, out_w)
    np.testing.assert_array_equal(dy_gemm, dy_gemm_ref)  # one multiply per value, or a copy: exact
    np.testing.assert_allclose(dbias, dbias_ref, rtol=1e-12, atol=1e-12)  # summed in another order
