"""The compiled per-element passes (cnnx.functional wrappers over cnnx._ops) against NumPy
references in float64: activations, dropout, softmax cross-entropy, optimizer steps, batch norm."""
import math

import numpy as np
import pytest

import cnnx.functional as F
import cnnx.parallel
from cnnx.parallel import num_threads
import reference as ref

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-6, atol=1e-7), np.float64: dict(rtol=1e-14, atol=1e-300)}
# Sizes: empty, one element, below and above the 16-element chunk rounding, and several 4096-element
# chunks with a ragged end (the kernels give each thread at least 4096 elements).
SIZES = [0, 1, 15, 17, 3 * 4096 + 37]


def _sigmoid(x):
    return np.array([1 / (1 + math.exp(-v)) if v > -700 else math.exp(v) for v in x.ravel()]).reshape(x.shape)


def _gelu(x, approximate):
    if approximate == "tanh":
        # 0.5 (1 + tanh u) written as sigmoid(2u): no cancellation for very negative x
        return x * _sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
    return np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.ravel()]).reshape(x.shape)


def _gelu_grad(x, approximate):
    if approximate == "tanh":
        s = _sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))  # (1 + tanh u) / 2
        return s + 2 * x * s * (1 - s) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.ravel()]).reshape(x.shape)
    return cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("slope", [0.0, 0.01, -0.5, 3.0])
def test_leaky_relu_forward_and_backward(dtype, n, slope, rng):
    x = (rng.standard_normal(n) * 3).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    y = F.leaky_relu(x, slope)
    np.testing.assert_array_equal(y, np.where(x > 0, x, x * dtype(slope)))  # one product: exact
    ref = x if slope < 0 else y  # the output's sign is the input's only for slope >= 0
    dx = F.leaky_relu_backward(dy, ref, slope)
    np.testing.assert_array_equal(dx, np.where(x > 0, dy, dy * dtype(slope)))


def test_relu_gives_positive_zero_and_propagates_nan():
    y = F.leaky_relu(np.array([-2.0, -0.0, np.nan, np.inf, -np.inf]), 0.0)
    np.testing.assert_array_equal(y, [0.0, 0.0, np.nan, np.inf, 0.0])
    assert not np.signbit(y[:2]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("n", SIZES)
def test_sigmoid_and_tanh_match_float64_references(dtype, n, rng):
    x = (rng.standard_normal(n) * 6).astype(dtype)
    np.testing.assert_allclose(F.sigmoid(x), _sigmoid(x.astype(np.float64)), **TOL[dtype])
    np.testing.assert_allclose(F.tanh(x), np.tanh(x.astype(np.float64)), **TOL[dtype])
    dy = rng.standard_normal(n).astype(dtype)
    # 1 - y and 1 - t^2 cancel where y, t are near 1: compare to round-off of 1 (a fused
    # multiply-add in one build and not the other moves the last bits).
    grad_tol = dict(rtol=TOL[dtype]["rtol"], atol=4 * np.finfo(dtype).eps)
    y = F.sigmoid(x)
    np.testing.assert_allclose(F.sigmoid_backward(dy, y), dy * y * (1 - y), **grad_tol)
    t = F.tanh(x)
    np.testing.assert_allclose(F.tanh_backward(dy, t), dy * (1 - t * t), **grad_tol)


def test_sigmoid_and_tanh_at_the_extremes():
    x = np.array([-1e4, -800.0, -745.0, -40.0, -1e-300, 0.0, -0.0, 1e-12, 40.0, 800.0, np.inf, -np.inf, np.nan])
    s = F.sigmoid(x)
    expected = _sigmoid(np.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4))
    np.testing.assert_allclose(s[:-1], expected[:-1], rtol=1e-14, atol=1e-300)
    assert np.isnan(s[-1])
    t = F.tanh(x)
    np.testing.assert_allclose(t[:-1], np.tanh(x[:-1]), rtol=1e-14, atol=0)
    assert np.isnan(t[-1]) and np.signbit(t[6]) and t[7] == 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_forward_and_backward(dtype, approximate, rng):
    x = np.concatenate([rng.standard_normal(300) * 4, [-40.0, -9.0, 0.0, 9.0, 40.0]]).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    x64 = x.astype(np.float64)
    tol = TOL[dtype] if dtype == np.float32 else dict(rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(F.gelu(x, approximate), _gelu(x64, approximate), **tol)
    np.testing.assert_allclose(F.gelu_backward(dy, x, approximate), dy * _gelu_grad(x64, approximate), **tol)


def test_elementwise_in_place_and_non_contiguous(rng):
    base = rng.standard_normal((6, 10))
    x = base[:, ::2]  # strided view
    np.testing.assert_array_equal(F.leaky_relu(x, 0.1), np.where(x > 0, x, 0.1 * x))
    inplace = base.copy()
    out = F.sigmoid(inplace, out=inplace)
    assert out is inplace
    np.testing.assert_allclose(inplace, _sigmoid(base), rtol=1e-14)
    strided_out = np.zeros((6, 20))[:, ::4]
    result = F.tanh(x, out=strided_out)
    assert result is strided_out
    np.testing.assert_allclose(strided_out, np.tanh(x), rtol=1e-14)


def test_elementwise_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="Expected arrays of one shape"):
        F.leaky_relu_backward(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="Expected out of shape"):
        F.sigmoid(np.ones(3), out=np.ones(3, dtype=np.float32))


@pytest.mark.parametrize("threads", [2, 3])
def test_elementwise_results_identical_for_any_thread_count(threads, rng, monkeypatch):
    # Every element is computed by the same expression whichever thread owns it: bit-identical.
    monkeypatch.setattr(cnnx.parallel, "MIN_WORK_PER_THREAD", 1)
    x = rng.standard_normal(5 * 4096 + 3).astype(np.float32)
    dy = rng.standard_normal(x.size).astype(np.float32)

    def run():
        return [F.leaky_relu(x, 0.01), F.sigmoid(x), F.tanh(x), F.gelu(x), F.gelu_backward(dy, x, "tanh"),
                F.multiply(x, dy)]

    ref.assert_identical_for_any_thread_count(run, threads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dropout_mask_and_output(dtype, rng):
    x = rng.standard_normal((40, 30, 50)).astype(dtype)
    y, mask = F.dropout(x, 12345, 0.3)
    kept = mask != 0
    # the scale is one rounding of 1 / 0.7 in the data's dtype; y is one product: exact
    np.testing.assert_array_equal(mask[kept], np.full(kept.sum(), 1 / 0.7, dtype=dtype))
    np.testing.assert_array_equal(y, x * mask)
    assert abs(kept.mean() - 0.7) < 0.005  # 60000 draws: 5 standard deviations is ~0.0094 / 2


def test_dropout_mask_depends_on_seed_only(rng, monkeypatch):
    x = rng.standard_normal(5 * 4096 + 7)
    monkeypatch.setattr(cnnx.parallel, "MIN_WORK_PER_THREAD", 1)
    with num_threads(1):
        _, serial = F.dropout(x, 99, 0.5)
    with num_threads(3):
        _, threaded = F.dropout(x.astype(np.float32), 99, 0.5)
    np.testing.assert_array_equal(serial != 0, threaded != 0)  # any dtype, any thread count
    _, other = F.dropout(x, 100, 0.5)
    assert 0.4 < np.mean((other != 0) == (serial != 0)) < 0.6  # another seed: an unrelated mask
    np.testing.assert_array_equal(F.dropout(x, 7, 0.0)[0], x)
    with pytest.raises(ValueError, match="Expected p in"):
        F.dropout(x, 1, 1.0)
    with pytest.raises(ValueError, match="Expected a seed"):
        F.dropout(x, -1, 0.5)


# --- softmax cross-entropy ----------------------------------------------------------------------

def _softmax_ce_reference(z, target_rows):
    z = z.astype(np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1))
    mass = target_rows.sum(axis=1)
    value = np.mean(lse * mass - (target_rows * shifted).sum(axis=1))
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return value, (p * mass[:, None] - target_rows) / z.shape[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_with_ids_and_rows(dtype, smoothing, rng):
    n, k = 37, 10
    z = (rng.standard_normal((n, k)) * 5).astype(dtype)
    ids = rng.integers(0, k, n)
    rows = np.eye(k)[ids] * (1 - smoothing) + smoothing / k
    value, grad = F.softmax_cross_entropy(z, ids=ids, label_smoothing=smoothing)
    expected_value, expected_grad = _softmax_ce_reference(z, rows)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-15)
    assert grad.dtype == dtype
    np.testing.assert_allclose(value, expected_value, **tol)
    np.testing.assert_allclose(grad, expected_grad, **tol)
    value_rows, grad_rows = F.softmax_cross_entropy(z, rows=rows.astype(dtype))
    np.testing.assert_allclose(value_rows, expected_value, **tol)
    np.testing.assert_allclose(grad_rows, expected_grad, **tol)


def test_softmax_cross_entropy_is_finite_for_huge_logits():
    z = np.array([[1e30, -1e30, 0.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    value, grad = F.softmax_cross_entropy(z, ids=np.array([1, 2]))
    assert np.isfinite(value) and np.isfinite(grad).all()
    np.testing.assert_allclose(value, (2e30 + math.log(3)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="class ids in"):
        F.softmax_cross_entropy(z, ids=np.array([0, 3]))


# --- optimizer steps (the equations of torch.optim, written out in float64) ---------------------

def _sgd_reference(p, g, buf, lr, mu, damp, wd, nesterov):
    d = g + wd * p
    if mu:
        buf = d.copy() if buf is None else mu * buf + (1 - damp) * d
        d = d + mu * buf if nesterov else buf
    return p - lr * d, buf


@pytest.mark.parametrize("mu,damp,wd,nesterov", [(0.0, 0.0, 0.0, False), (0.9, 0.0, 0.0, False),
                                                  (0.9, 0.3, 1e-2, False), (0.8, 0.0, 1e-2, True)])
def test_sgd_step_matches_torch_equations(mu, damp, wd, nesterov, rng):
    p = rng.standard_normal(5000)
    buf = np.empty_like(p)
    ref_p, ref_buf = p.copy(), None
    for step in range(3):
        g = rng.standard_normal(p.size)
        F.sgd_step(p, g, buf if mu else p, 0.05, mu, damp, wd, nesterov, first=step == 0)
        ref_p, ref_buf = _sgd_reference(ref_p, g, ref_buf, 0.05, mu, damp, wd, nesterov)
        np.testing.assert_allclose(p, ref_p, rtol=1e-14, atol=1e-15)
        if mu:
            np.testing.assert_allclose(buf, ref_buf, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_step_matches_torch_equations(dtype, wd, decoupled, rng):
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    p = rng.standard_normal(5000).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    rp, rm, rv = (a.astype(np.float64) for a in (p, m, v))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    for t in range(1, 4):
        g = rng.standard_normal(p.size).astype(dtype)
        F.adam_step(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled)
        g64 = g.astype(np.float64)
        if decoupled:
            rp = rp * (1 - lr * wd)
        else:
            g64 = g64 + wd * rp
        rm = rm + (1 - b1) * (g64 - rm)
        rv = b2 * rv + (1 - b2) * g64 * g64
        denom = np.sqrt(rv) / math.sqrt(1 - b2**t) + eps
        rp = rp - lr / (1 - b1**t) * rm / denom
        np.testing.assert_allclose(p, rp, **tol)
        np.testing.assert_allclose(m, rm, **tol)
        np.testing.assert_allclose(v, rv, **tol)


def test_optimizer_steps_refuse_mismatched_state():
    p = np.zeros(4)
    with pytest.raises(ValueError, match="C-contiguous float32/float64"):
        F.adam_step(p, np.zeros(4), np.zeros(5), np.zeros(4), 1, 1e-3, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="step >= 1"):
        F.adam_step(p, np.zeros(4), np.zeros(4), np.zeros(4), 0, 1e-3, 0.9, 0.999, 1e-8)
    with pytest.raises(ValueError, match="C-contiguous"):
        F.sgd_step(p, np.zeros(4, dtype=np.float32), p, 0.1)


# --- batch norm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(5, 3, 7), (2, 1, 1), (4, 6, 33)])
def test_batch_norm_passes_match_numpy(dtype, shape, rng):
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    gamma = rng.standard_normal(shape[1]).astype(dtype)
    beta = rng.standard_normal(shape[1]).astype(dtype)
    x64 = x.astype(np.float64)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    y, x_hat, mean, var, inv_std = F.batch_norm_train(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), **tol)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), **tol)
    expected_hat = (x64 - x64.mean(axis=(0, 2))[:, None]) / np.sqrt(x64.var(axis=(0, 2))[:, None] + 1e-5)
    np.testing.assert_allclose(x_hat, expected_hat, **tol)
    np.testing.assert_allclose(y, expected_hat * gamma[:, None] + beta[:, None], **tol)
    dy = rng.standard_normal(shape).astype(dtype)
    s1, s2 = F.channel_dot_sums(dy, x_hat)
    np.testing.assert_allclose(s1, dy.astype(np.float64).sum(axis=(0, 2)), **tol)
    np.testing.assert_allclose(s2, (dy.astype(np.float64) * x_hat).sum(axis=(0, 2)), **tol)
    ye, _ = F.batch_norm_eval(x, gamma, beta, mean.astype(dtype), var.astype(dtype), 1e-5)
    np.testing.assert_allclose(ye, y, **tol)


@pytest.mark.parametrize("threads", [2, 3])
def test_batch_norm_identical_for_any_thread_count(threads, rng, monkeypatch):
    # Each channel's sums run in one thread in a fixed order, so the thread count changes no bits.
    monkeypatch.setattr(cnnx.parallel, "MIN_WORK_PER_THREAD", 1)
    x = rng.standard_normal((3, 5, 29)).astype(np.float32)
    g = np.ones(5, np.float32)
    b = np.zeros(5, np.float32)
    ref.assert_identical_for_any_thread_count(lambda: F.batch_norm_train(x, g, b, 1e-5), threads)
