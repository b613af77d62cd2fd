"""cnnx.functional against the naive references in reference.py, over the geometry grid."""
import itertools

import numpy as np
import pytest

import cnnx.functional as F
import cnnx.parallel
from cnnx.parallel import num_threads
import reference as ref

DTYPES = [np.float32, np.float64]
STRIDES = [(1, 1), (2, 2), (3, 3), (2, 1)]
PADDINGS = {
    "p0": ((0, 0), (0, 0)),
    "p1": ((1, 1), (1, 1)),
    "p2": ((2, 2), (2, 2)),
    "asym": ((0, 2), (1, 0)),
}
KERNELS = [(1, 1), (2, 2), (3, 3), (2, 3), (5, 5)]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def non_contiguous(a):
    """The same values as ``a`` in a strided, non-contiguous view."""
    wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    wide[..., ::2] = a
    view = wide[..., ::2]
    assert not view.flags.c_contiguous
    return view


GRID = list(itertools.product(DTYPES, STRIDES, PADDINGS, KERNELS, [1, 3]))


def grid_id(case):
    dtype, stride, pad, kernel, batch = case
    return f"{np.dtype(dtype).name}-s{stride[0]}x{stride[1]}-{pad}-k{kernel[0]}x{kernel[1]}-n{batch}"


@pytest.mark.parametrize("case", GRID, ids=[grid_id(c) for c in GRID])
def test_conv2d_forward_and_backward_match_reference(case, rng):
    dtype, stride, pad_name, kernel, batch = case
    pads = PADDINGS[pad_name]
    x = rng.standard_normal((batch, 2, 7, 9)).astype(dtype)
    w = rng.standard_normal((3, 2) + kernel).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    if batch > 1:
        x = non_contiguous(x)
    y = F.conv2d(x, w, b, stride=stride, padding=pads)
    assert y.dtype == dtype
    expected = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride, pads)
    np.testing.assert_allclose(y, expected, **TOL[dtype])

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = F.conv2d_backward(dy, x, w, stride=stride, padding=pads)
    edx, edw, edb = ref.conv2d_backward(dy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), stride, pads)
    np.testing.assert_allclose(dx, edx, **TOL[dtype])
    np.testing.assert_allclose(dw, edw, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)
    np.testing.assert_allclose(db, edb, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("case", GRID, ids=[grid_id(c) for c in GRID])
def test_im2col_matches_reference_and_col2im_is_its_adjoint(case, rng):
    dtype, stride, pad_name, kernel, batch = case
    pads = PADDINGS[pad_name]
    x = rng.standard_normal((batch, 2, 7, 9)).astype(dtype)
    cols = F.im2col(x, kernel, stride=stride, padding=pads)
    np.testing.assert_array_equal(cols, ref.im2col(x.astype(np.float64), kernel, stride, pads).astype(dtype))
    c = rng.standard_normal(cols.shape).astype(dtype)
    back = F.col2im(c, x.shape, kernel, stride=stride, padding=pads)
    lhs = np.vdot(cols.astype(np.float64), c.astype(np.float64))
    rhs = np.vdot(x.astype(np.float64), back.astype(np.float64))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_conv2d_small_groups_give_the_same_result(rng, monkeypatch):
    """The group tiling must not change the answer (one image per group versus the whole batch)."""
    x = rng.standard_normal((5, 3, 8, 8))
    w = rng.standard_normal((4, 3, 3, 3))
    y_all = F.conv2d(x, w, padding=1)
    dx_all, dw_all, _ = F.conv2d_backward(np.ones_like(y_all), x, w, padding=1)
    monkeypatch.setattr(F, "COLUMN_BUFFER_BYTES", 1)
    np.testing.assert_allclose(F.conv2d(x, w, padding=1), y_all, rtol=1e-13)
    dx, dw, _ = F.conv2d_backward(np.ones_like(y_all), x, w, padding=1)
    np.testing.assert_allclose(dx, dx_all, rtol=1e-13)
    np.testing.assert_allclose(dw, dw_all, rtol=1e-12)


@pytest.mark.parametrize("stride,pads", [((1, 1), ((1, 1), (1, 1))), ((2, 1), ((0, 1), (2, 0)))], ids=["s1-p1", "s2x1-asym"])
def test_conv2d_backward_matches_central_differences(stride, pads, rng):
    x = rng.standard_normal((2, 2, 5, 6))
    w = rng.standard_normal((3, 2, 3, 2))
    b = rng.standard_normal(3)
    y = F.conv2d(x, w, b, stride=stride, padding=pads)
    dy = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(F.conv2d(x, w, b, stride=stride, padding=pads) * dy))

    dx, dw, db = F.conv2d_backward(dy, x, w, stride=stride, padding=pads)
    for analytic, wrt in ((dx, x), (dw, w), (db, b)):
        numeric = ref.numerical_gradient(loss, wrt)
        rel = np.abs(analytic - numeric).max() / np.abs(numeric).max()
        assert rel < 1e-7


def test_conv2d_backward_without_dx(rng):
    x = rng.standard_normal((2, 1, 6, 6))
    w = rng.standard_normal((2, 1, 3, 3))
    dy = rng.standard_normal((2, 2, 4, 4))
    dx, dw, db = F.conv2d_backward(dy, x, w, need_dx=False)
    assert dx is None
    np.testing.assert_allclose(dw, F.conv2d_backward(dy, x, w)[1])


POOL_GRID = [
    case
    for case in itertools.product(DTYPES, [(2, 2), (3, 3), (2, 3), (1, 1)], [None, (1, 1), (2, 1)], ["p0", "p1"], [1, 3])
    # padding larger than half the kernel is refused (see test_invalid_input_raises_a_clear_error)
    if not (case[3] == "p1" and min(case[1]) < 2)
]


@pytest.mark.parametrize(
    "dtype,kernel,stride,pad_name,batch", POOL_GRID,
    ids=[f"{np.dtype(d).name}-k{k[0]}x{k[1]}-s{s}-{p}-n{b}" for d, k, s, p, b in POOL_GRID],
)
def test_pooling_matches_reference(dtype, kernel, stride, pad_name, batch, rng):
    pads = PADDINGS[pad_name]
    x = rng.standard_normal((batch, 3, 7, 8)).astype(dtype)
    if batch > 1:
        x = non_contiguous(x)
    s = kernel if stride is None else stride
    y, idx = F.max_pool2d(x, kernel, stride, pads)
    np.testing.assert_array_equal(y, ref.max_pool2d(x, kernel, s, pads))
    # The indices point at the maxima.
    flat = np.ascontiguousarray(x).reshape(batch, 3, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat, idx.reshape(batch, 3, -1), axis=2).reshape(y.shape), y)
    a = F.avg_pool2d(x, kernel, stride, pads)
    np.testing.assert_allclose(a, ref.avg_pool2d(x.astype(np.float64), kernel, s, pads), **TOL[dtype])
    # Backward of both pools is the adjoint of its forward (linear for avg, linear in the routing for max).
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx_avg = F.avg_pool2d_backward(dy, x.shape, kernel, stride, pads)
    probe = rng.standard_normal(x.shape)
    np.testing.assert_allclose(
        np.vdot(F.avg_pool2d(probe, kernel, stride, pads), dy), np.vdot(probe, dx_avg), rtol=1e-4 if dtype == np.float32 else 1e-12
    )
    dx_max = F.max_pool2d_backward(dy, idx, x.shape)
    expected = np.zeros(flat.shape)
    np.add.at(expected, (np.arange(batch)[:, None, None], np.arange(3)[None, :, None], idx.reshape(batch, 3, -1)), dy.reshape(batch, 3, -1))
    np.testing.assert_allclose(dx_max.reshape(flat.shape), expected, **TOL[dtype])


def test_max_pool_ties_route_each_window_to_exactly_one_input():
    x = np.ones((2, 3, 6, 6))
    y, idx = F.max_pool2d(x, 2)
    dy = np.arange(1, y.size + 1, dtype=np.float64).reshape(y.shape)
    dx = F.max_pool2d_backward(dy, idx, x.shape)
    assert np.count_nonzero(dx) == y.size
    for oy in range(3):
        for ox in range(3):
            window = dx[:, :, 2 * oy: 2 * oy + 2, 2 * ox: 2 * ox + 2]
            assert (np.count_nonzero(window, axis=(2, 3)) == 1).all()
            np.testing.assert_array_equal(window.sum(axis=(2, 3)), dy[:, :, oy, ox])
    # The first maximum in scan order wins, as in PyTorch.
    assert (idx[:, :, 0, 0] == 0).all()


def test_max_pool_propagates_nan():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 2, 3] = np.nan
    y, _ = F.max_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 1, 1])
    y3, _ = F.max_pool2d(x, 3, 1)
    assert np.isnan(y3).all()


@pytest.mark.parametrize("threads", [2, 3])
def test_results_identical_with_one_thread_and_several(threads, rng, monkeypatch):
    # Small calls normally run serial; lower the threshold so these really run threaded.
    monkeypatch.setattr(cnnx.parallel, "MIN_WORK_PER_THREAD", 1)
    x = rng.standard_normal((7, 3, 11, 10)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)

    def run():
        y = F.conv2d(x, w, padding=((1, 0), (2, 1)), stride=(2, 1))
        dx, dw, db = F.conv2d_backward(np.ones_like(y), x, w, padding=((1, 0), (2, 1)), stride=(2, 1))
        p, idx = F.max_pool2d(x, 3, 2, 1)
        return [y, dx, dw, db, p, idx, F.max_pool2d_backward(p, idx, x.shape), F.avg_pool2d(x, 2)]

    ref.assert_identical_for_any_thread_count(run, threads)


def test_integer_input_becomes_float32_and_float64_is_kept():
    x = np.arange(32).reshape(1, 2, 4, 4)
    assert F.conv2d(x, np.ones((1, 2, 2, 2), dtype=np.float32)).dtype == np.float32
    assert F.conv2d(x.astype(np.float64), np.ones((1, 2, 2, 2))).dtype == np.float64
    assert F.max_pool2d(x, 2)[0].dtype == np.float32


def test_out_and_workspace_are_reused(rng):
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    ws = F.Workspace()
    out = np.empty((4, 3, 4, 4), dtype=np.float32)
    # One thread: which worker thread takes which group is otherwise up to the scheduler.
    with num_threads(1):
        y = F.conv2d(x, w, out=out, workspace=ws)
        assert y is out
        before = ws.nbytes
        F.conv2d(x, w, out=out, workspace=ws)
        assert ws.nbytes == before
    np.testing.assert_allclose(out, F.conv2d(x, w), rtol=1e-6)


# --- invalid input: each raises the documented exception with a message that says what and why ----

X = np.zeros((2, 3, 8, 8), dtype=np.float32)
W = np.zeros((4, 3, 3, 3), dtype=np.float32)
INVALID = {
    "x-wrong-ndim": (lambda: F.conv2d(np.zeros((3, 8, 8)), W), ValueError, "4 dimensions"),
    "channel-mismatch": (lambda: F.conv2d(X, np.zeros((4, 2, 3, 3))), ValueError, "input channels"),
    "kernel-too-large": (lambda: F.conv2d(X, np.zeros((4, 3, 9, 3))), ValueError, "no larger than the padded input"),
    "stride-zero": (lambda: F.conv2d(X, W, stride=0), ValueError, "stride"),
    "negative-padding": (lambda: F.conv2d(X, W, padding=-1), ValueError, "padding >= 0"),
    "complex-dtype": (lambda: F.conv2d(X.astype(np.complex64), W), TypeError, "dtype"),
    "object-dtype": (lambda: F.conv2d(X.astype(object), W), TypeError, "dtype"),
    "bias-shape": (lambda: F.conv2d(X, W, np.zeros(3)), ValueError, "bias"),
    "dy-shape": (lambda: F.conv2d_backward(np.zeros((2, 4, 5, 5)), X, W), ValueError, "dy of shape"),
    "pool-dy-indices-shape": (
        lambda: F.max_pool2d_backward(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 3, 4), dtype=np.int64), X.shape),
        ValueError, "indices",
    ),
    "pool-indices-out-of-range": (
        lambda: F.max_pool2d_backward(np.zeros((2, 3, 4, 4)), np.full((2, 3, 4, 4), 64), X.shape),
        ValueError, "out of range",
    ),
    "pool-float-indices": (
        lambda: F.max_pool2d_backward(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)), X.shape), TypeError, "integer"
    ),
    "avg-dy-shape": (lambda: F.avg_pool2d_backward(np.zeros((2, 3, 3, 3)), X.shape, 2), ValueError, "dy of shape"),
    "pool-padding-too-large": (lambda: F.max_pool2d(X, 2, padding=2), ValueError, "half the kernel"),
    "pool-kernel-too-large": (lambda: F.max_pool2d(X, 9), ValueError, "no larger"),
    "pool-stride-zero": (lambda: F.avg_pool2d(X, 2, stride=0), ValueError, "stride"),
    "bad-padding-string": (lambda: F.conv2d(X, W, padding="full"), ValueError, "padding"),
    "bad-kernel-type": (lambda: F.im2col(X, 2.5), TypeError, "kernel_size"),
    "col2im-shape": (lambda: F.col2im(np.zeros((2, 27, 35)), X.shape, 3), ValueError, "cols of shape"),
    "out-wrong-shape": (lambda: F.conv2d(X, W, out=np.zeros((2, 4, 5, 5), dtype=np.float32)), ValueError, "out of shape"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_input_raises_a_clear_error(name):
    call, exc, words = INVALID[name]
    with pytest.raises(exc, match=words):
        call()


def test_debug_build_catches_out_of_bounds_access():
    """In a CNNX_DEBUG=1 build the kernels check every index (CI runs the suite on both builds).

    Calling the raw kernel with a column buffer too small for the geometry must raise there,
    not write out of bounds; the release build skips this (it relies on cnnx.functional).
    """
    from cnnx import _ops

    if not _ops.debug_build():
        pytest.skip("release build: bounds checks are compiled out")
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    too_small = np.zeros((4, 1, 8), dtype=np.float32)  # needs (4, 1, 9) for a 2x2 kernel on 4x4
    with pytest.raises(IndexError):
        _ops.im2col(x, 0, 2, 2, 1, 1, 0, 0, 3, 3, too_small, 1)


# --- regressions from issue 11: validate first, then write; refuse what is not an integer shape --

def test_max_pool2d_backward_leaves_out_untouched_when_indices_are_out_of_range():
    """Defect: max_pool2d_backward(..., out=o) wrote into ``o`` before raising on bad indices."""
    dy = np.ones((2, 3, 4, 4), dtype=np.float32)
    for bad_value in (64, -1):  # past the end of the 8x8 input, and negative
        indices = np.zeros((2, 3, 4, 4), dtype=np.int64)
        indices[1, 2, 3, 3] = bad_value
        out = np.full(X.shape, 7.0, dtype=np.float32)
        with pytest.raises(ValueError, match=r"indices in \[0, 64\).*1 out of range"):
            F.max_pool2d_backward(dy, indices, X.shape, out=out)
        # Exact: nothing may have been written, so every element still holds the sentinel.
        assert np.all(out == 7.0)


def test_max_pool2d_backward_with_out_still_writes_valid_indices(rng):
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    _, indices = F.max_pool2d(x, 2)
    out = np.full(x.shape, 7.0, dtype=np.float32)
    assert F.max_pool2d_backward(dy, indices, x.shape, out=out) is out
    # Exact: the same kernel routes the same values in both calls (a copy, no arithmetic order).
    np.testing.assert_array_equal(out, F.max_pool2d_backward(dy, indices, x.shape))


@pytest.mark.parametrize("x_shape", [(2, 3, 8.7, 8.9), (2, 3, 8.0, 8.0), "2338", b"2338", (2, 3, True, 8),
                                     (2, 3, "8", 8), 2338, None],
                         ids=["fractional", "integral-floats", "str", "bytes", "bool", "str-entry", "int", "none"])
def test_shapes_that_are_not_integers_are_refused(x_shape):
    """Defect: col2im accepted x_shape=(2, 3, 8.7, 8.9) (truncated to 8) and '2338' (as 2, 3, 3, 8)."""
    cols = np.zeros((2, 3 * 3 * 3, 36), dtype=np.float32)
    with pytest.raises(TypeError, match=r"Expected x_shape as a tuple of 4 ints \(n, c, h, w\), received: x_shape="):
        F.col2im(cols, x_shape, 3)
    dy = np.zeros((2, 3, 4, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="x_shape"):
        F.max_pool2d_backward(dy, np.zeros(dy.shape, dtype=np.int64), x_shape)
    with pytest.raises(TypeError, match="x_shape"):
        F.avg_pool2d_backward(dy, x_shape, 2)


def test_numpy_integer_shapes_are_accepted():
    cols = np.zeros((2, 27, 36), dtype=np.float32)
    shape = np.array([2, 3, 8, 8], dtype=np.int64)
    assert F.col2im(cols, shape, 3).shape == (2, 3, 8, 8)
    assert F.col2im(cols, [np.int32(2), 3, 8, np.uint8(8)], 3).shape == (2, 3, 8, 8)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
def test_longdouble_is_refused_not_computed_in_float32():
    """Defect: np.longdouble input was silently computed in float32."""
    x = X.astype(np.longdouble)
    name = np.dtype(np.longdouble).name  # float128 on x86-64 Linux
    with pytest.raises(TypeError, match=rf"Expected x with dtype float32 or float64.*received: x.dtype={name}"):
        F.conv2d(x, W)
    with pytest.raises(TypeError, match=f"weight.dtype={name}"):
        F.conv2d(X, W.astype(np.longdouble))
    with pytest.raises(TypeError, match=f"x.dtype={name}"):
        F.max_pool2d(x, 2)
    with pytest.raises(TypeError, match=f"cols.dtype={name}"):
        F.col2im(np.zeros((2, 27, 36), dtype=np.longdouble), X.shape, 3)


def test_float16_is_widened_to_float32():
    assert F.max_pool2d(X.astype(np.float16), 2)[0].dtype == np.float32


def test_linear_and_conv_transpose2d_match_their_definitions(rng):
    # F.linear is x @ W.T + b; F.conv_transpose2d is the adjoint of conv2d: <conv2d(u), v> == <u, convT(v)>.
    x = rng.standard_normal((5, 7))
    w = rng.standard_normal((3, 7))
    b = rng.standard_normal(3)
    np.testing.assert_allclose(F.linear(x, w, b), x @ w.T + b, rtol=1e-12)
    with pytest.raises(ValueError, match="in_features"):
        F.linear(x, w[:, :6])
    u = rng.standard_normal((2, 4, 9, 9))
    k = rng.standard_normal((3, 4, 3, 3))  # conv2d: 4 -> 3 channels; its transpose: 3 -> 4
    v = rng.standard_normal((2, 3, 5, 5))
    lhs = np.sum(F.conv2d(u, k, None, 2, 1) * v)
    rhs = np.sum(u * F.conv_transpose2d(v, k, None, 2, 1, output_padding=0))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)
    with pytest.raises(ValueError, match="output_padding"):
        F.conv_transpose2d(v, k, None, 2, 1, output_padding=2)

