"""cnnx's packed GEMM for dense layers: ``_ops.dense_gemm`` (x @ W.T + bias, activation in the tile
stores) and ``functional.linear`` / ``linear_backward`` / ``Dense`` on it, against float64 NumPy."""
import numpy as np
import pytest

import cnnx
import cnnx.functional as F
from cnnx import _simd
from cnnx.layers import Dense, Flatten, LeakyReLU, ReLU
import reference as ref

BUILDS = _simd.available_isas()
EPS = np.finfo(np.float32).eps

# (rows, in_features, out_features): rows below, at and above the MR-row panel (6 or 8), outputs
# not a multiple of the NR-column panel (16 or 32), K above the K block (512: 2 and 3 blocks),
# enough outputs for two column blocks at K = 1030 (160 columns per block on AVX-512).
SHAPES = [(1, 5, 3), (7, 37, 45), (8, 64, 32), (9, 513, 33), (17, 1030, 200), (33, 16, 10), (2, 1, 1)]
ACTIVATIONS = [(None, 0.0), ("relu", 0.0), ("leaky_relu", 0.1)]


def operands(n, d_in, d_out, rng):
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = rng.standard_normal((d_out, d_in)).astype(np.float32)
    b = rng.standard_normal(d_out).astype(np.float32)
    return x, w, b


def activated(z, activation, slope):
    return z if activation is None else np.where(z > 0, z, slope * z)


def reference_and_bound(x, w, b, activation, slope):
    """The float64 result and a float32 round-off bound per output: a sum of K products (and the
    bias) rounded in float32 is off by at most about (K + 1) * eps * sum |x w| + |b|; the (leaky)
    ReLU with slope <= 1 does not widen a difference."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    b64 = np.zeros(w.shape[0]) if b is None else b.astype(np.float64)
    z = activated(x64 @ w64.T + b64, activation, slope)
    size = np.abs(x64) @ np.abs(w64.T) + np.abs(b64)
    return z, 2 * (x.shape[1] + 1) * EPS * size + 1e-30


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}_in{}_out{}".format(*s))
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_dense_gemm_matches_float64(isa, shape, activation, slope, has_bias, rng):
    ops = _simd.load(isa)
    x, w, b = operands(*shape, rng)
    z = np.full((shape[0], shape[2]), np.nan, np.float32)
    ops.dense_gemm(x, w, b if has_bias else np.empty(0, np.float32), has_bias, activation is not None,
                   slope, z, 2)
    exact, bound = reference_and_bound(x, w, b if has_bias else None, activation, slope)
    assert np.all(np.abs(z - exact) <= bound)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", [(77, 1030, 45), (9, 1030, 200)], ids=["rows split", "outputs split"])
def test_dense_gemm_gives_the_same_values_on_any_thread_count(isa, shape, rng):
    # Threads split the rows, or the outputs when the weight is the larger operand (more outputs
    # than rows): either way each output is one thread's sum in the same order.
    ops = _simd.load(isa)
    x, w, b = operands(*shape, rng)

    def run(threads):
        z = np.empty((shape[0], shape[2]), np.float32)
        ops.dense_gemm(x, w, b, True, True, 0.01, z, threads)
        return z

    ref.assert_kernel_identical_for_thread_counts(run)


def test_dense_gemm_with_no_inputs_gives_the_activated_bias():
    ops = _simd.load(BUILDS[0])
    b = np.array([1.5, -2.0, 0.0], np.float32)
    z = np.full((2, 3), np.nan, np.float32)
    ops.dense_gemm(np.empty((2, 0), np.float32), np.empty((3, 0), np.float32), b, True, True, 0.5, z, 1)
    np.testing.assert_array_equal(z, [[1.5, -1.0, 0.0]] * 2)  # exact: no sum, one product by 0.5
    z = np.full((2, 3), np.nan, np.float32)
    ops.dense_gemm(np.empty((2, 0), np.float32), np.empty((3, 0), np.float32), b, False, False, 0.0, z, 1)
    np.testing.assert_array_equal(z, np.zeros((2, 3)))


def test_dense_gemm_refuses_mismatched_shapes():
    ops = _simd.load(BUILDS[0])
    x, w, b = np.zeros((4, 5), np.float32), np.zeros((3, 6), np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"received: x \(4, 5\), weight \(3, 6\)"):
        ops.dense_gemm(x, w, b, True, False, 0.0, np.zeros((4, 3), np.float32), 1)
    with pytest.raises(ValueError, match=r"bias \(2,\)"):
        ops.dense_gemm(x, np.zeros((3, 5), np.float32), np.zeros(2, np.float32), True, False, 0.0,
                       np.zeros((4, 3), np.float32), 1)


# ---------------------------------------------------------------------- the rules ---------------
def test_dense_rules_are_float32_only_and_follow_the_measurements(monkeypatch):
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    assert F.packed_dense_forward(f32, 256, 6272, 128)
    assert not F.packed_dense_forward(f32, 256, 128, 10)  # a 10-class head: BLAS
    assert not F.packed_dense_forward(f64, 256, 6272, 128)
    assert not F.packed_dense_forward(f32, 0, 6272, 128)
    monkeypatch.setattr(_simd, "blas_narrower_than_kernels", lambda: True)
    assert F.packed_dense_backward(f32, 256, 6272, 128)
    assert F.packed_dense_backward(f32, 256, 128, 10)
    assert not F.packed_dense_backward(f32, 64, 16, 10)
    assert not F.packed_dense_backward(f64, 256, 6272, 128)
    monkeypatch.setattr(_simd, "blas_narrower_than_kernels", lambda: False)
    assert F.packed_dense_backward(f32, 256, 6272, 128)
    assert F.packed_dense_backward(f32, 128, 2048, 10)
    assert not F.packed_dense_backward(f32, 128, 400, 120)
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", True)
    assert F.packed_dense_forward(f32, 2, 3, 1) and F.packed_dense_backward(f32, 2, 3, 1)
    assert not F.packed_dense_forward(f64, 2, 3, 1)
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", False)
    assert not F.packed_dense_forward(f32, 256, 6272, 128) and not F.packed_dense_backward(f32, 256, 6272, 128)


# ---------------------------------------------------------------------- functional.linear ------
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation, slope", ACTIVATIONS)
@pytest.mark.parametrize("n", [0, 1, 19])
def test_linear_with_its_activation_matches_float64(packed, threads, activation, slope, n, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", packed)
    x, w, b = operands(n, 530, 37, rng)
    with cnnx.parallel.num_threads(threads):
        z = F.linear(x, w, b, activation, slope)
    assert z.shape == (n, 37) and z.dtype == np.float32
    exact, bound = reference_and_bound(x, w, b, activation, slope)
    assert np.all(np.abs(z - exact) <= bound)


@pytest.mark.parametrize("view", ["strided columns", "transposed", "float64 input"])
def test_linear_on_the_packed_path_takes_any_input_layout(view, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", True)
    _, w, b = operands(1, 40, 33, rng)
    wide = rng.standard_normal((11, 80)).astype(np.float32)
    x = {"strided columns": wide[:, ::2], "transposed": np.ascontiguousarray(wide[:, :40].T).T,
         "float64 input": wide[:, :40].astype(np.float64)}[view]
    z = F.linear(x, w, b)
    assert z.dtype == np.float32  # the weight's dtype
    exact, bound = reference_and_bound(np.asarray(x, np.float32), w, b, None, 0.0)
    assert np.all(np.abs(z - exact) <= bound)


def test_linear_refuses_an_activation_it_cannot_fuse(rng):
    x, w, b = operands(2, 4, 3, rng)
    with pytest.raises(ValueError, match="received: activation='tanh'"):
        F.linear(x, w, b, "tanh")
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        F.linear(x, w, b, "leaky_relu", -0.5)


@pytest.mark.parametrize("n, d_in, d_out", [(1, 5, 3), (0, 7, 20), (37, 300, 17), (64, 1030, 45)])
@pytest.mark.parametrize("threads", [1, 2])
def test_linear_backward_on_the_packed_path_matches_float64(n, d_in, d_out, threads, rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", True)
    x, w, b = operands(n, d_in, d_out, rng)
    dz = rng.standard_normal((n, d_out)).astype(np.float32)
    x64, w64, dz64 = (a.astype(np.float64) for a in (x, w, dz))
    dw, db = np.full_like(w, np.nan), np.full_like(b, np.nan)
    with cnnx.parallel.num_threads(threads):
        dx = F.linear_backward(dz, x[:, :], w, dw, db)
    assert np.all(np.abs(dw - dz64.T @ x64) <= 2 * (n + 1) * EPS * (np.abs(dz64.T) @ np.abs(x64)) + 1e-30)
    assert np.all(np.abs(dx - dz64 @ w64) <= 2 * (d_out + 1) * EPS * (np.abs(dz64) @ np.abs(w64)) + 1e-30)
    np.testing.assert_allclose(db, dz64.sum(axis=0), rtol=1e-5, atol=1e-5 * max(n, 1))


def test_packed_dense_layers_give_the_same_values_on_any_thread_count(rng, monkeypatch):
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", True)
    x, w, b = operands(45, 600, 40, rng)
    dz = rng.standard_normal((45, 40)).astype(np.float32)

    def run():
        dw, db = np.empty_like(w), np.empty_like(b)
        dx = F.linear_backward(dz, x, w, dw, db)
        return [F.linear(x, w, b, "leaky_relu", 0.01), dw, db, dx]

    ref.assert_identical_for_any_thread_count(run, 2)


# ---------------------------------------------------------------------- Dense in a network ------
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("act", ["relu", "leaky"])
def test_dense_with_a_fused_rectifier_matches_the_separate_layers(packed, act, rng, monkeypatch):
    """A Dense + ReLU / LeakyReLU pair runs as one plan step whose activation the packed GEMM applies
    in its stores; outputs and gradients match the same layers run one by one (``fuse = False``)."""
    monkeypatch.setattr(F, "PACKED_DENSE_GEMM", packed)

    def build(fuse):
        gen = np.random.default_rng(5)
        activation = ReLU() if act == "relu" else LeakyReLU(0.2)
        net = cnnx.Network([Flatten(), Dense(48, 40, rng=gen), activation, Dense(40, 20, rng=gen)],
                           input_shape=(3, 4, 4))
        net.fuse = fuse
        return net

    fused, separate = build(True), build(False)
    assert any(s.kind == "dense+act" for s in fused.plan.train_steps)
    x = rng.standard_normal((13, 3, 4, 4)).astype(np.float32)
    g = rng.standard_normal((13, 20)).astype(np.float32)
    outs, grads = [], []
    for net in (fused, separate):
        outs.append(net.forward(x, training=True))
        grads.append(net.backward(g, need_input_grad=True))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    for (name, _, g_fused), (_, _, g_separate) in zip(fused.parameters(), separate.parameters(), strict=True):
        np.testing.assert_allclose(g_fused, g_separate, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("activation, slope", [("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.5), ("tanh", 0.01)])
def test_dense_own_activation_in_float32_matches_float64(activation, slope, rng):
    """``Dense(activation=...)``: ReLU / LeakyReLU(slope >= 0) go into ``linear``; a negative slope
    or another activation keeps its own pass. Output and gradients against float64 NumPy."""
    layer = Dense(70, 40, activation=activation, negative_slope=slope, rng=1)
    x = rng.standard_normal((9, 70)).astype(np.float32)
    dy = rng.standard_normal((9, 40)).astype(np.float32)
    w, b = (layer.params[k].astype(np.float64) for k in ("weight", "bias"))
    z = x.astype(np.float64) @ w.T + b
    if activation == "tanh":
        y, dz = np.tanh(z), dy * (1 - np.tanh(z) ** 2)
    else:
        a = 0.0 if activation == "relu" else slope
        y, dz = np.where(z > 0, z, a * z), dy * np.where(z > 0, 1.0, a)
    out = layer.forward(x, training=True)
    dx = layer.backward(dy)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, dz @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.grads["weight"], dz.T @ x, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(layer.grads["bias"], dz.sum(axis=0), rtol=1e-4, atol=1e-4)
