"""Activation layers and the fused-activation registry: values, gradients, stability, errors."""
import json
import math
import warnings

import numpy as np
import pytest

from cnnx.layers import ACTIVATIONS, GELU, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh
from cnnx.layers.activations import erf, erfc, normal_cdf

from gradcheck import check_layer_gradients

LAYERS = [
    (ReLU, {}),
    (LeakyReLU, {}),
    (LeakyReLU, {"negative_slope": 0.2}),
    (LeakyReLU, {"negative_slope": -0.5}),
    (LeakyReLU, {"negative_slope": 3.0}),
    (Sigmoid, {}),
    (Tanh, {}),
    (GELU, {}),
    (GELU, {"approximate": "tanh"}),
    (Softmax, {}),
]
LAYER_IDS = [f"{cls.__name__}{kw}" for cls, kw in LAYERS]


def _numpy_reference(layer, x):
    """Textbook formulas (with math.erf for GELU), evaluated elementwise in float64."""
    name = type(layer).__name__
    if name == "ReLU":
        return np.where(x > 0, x, 0.0)
    if name == "LeakyReLU":
        return np.where(x > 0, x, layer.negative_slope * x)
    if name == "Sigmoid":
        return np.array([1 / (1 + math.exp(-v)) for v in x.ravel()]).reshape(x.shape)
    if name == "Tanh":
        return np.tanh(x)
    if name == "GELU" and layer.approximate == "none":
        return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]).reshape(x.shape)
    if name == "GELU":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- erf ----------------------------------------------------------------------------------------

def test_erf_matches_math_erf_to_float64_rounding(rng):
    x = np.concatenate([np.linspace(-8, 8, 20001), rng.standard_normal(2000) * 3,
                        [0.0, -0.0, 0.46875, -0.46875, 4.0, -4.0, 1e-300, -1e-20, 40.0, -40.0]])
    ref = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(erf(x), ref, rtol=1e-14, atol=0)


def test_erfc_keeps_relative_accuracy_in_the_tail():
    x = np.linspace(-6, 26, 32001)
    ref = np.array([math.erfc(v) for v in x])
    np.testing.assert_allclose(erfc(x), ref, rtol=1e-14, atol=0)


def test_erf_edge_values():
    assert erf(np.array([np.inf, -np.inf])).tolist() == [1.0, -1.0]
    assert erfc(np.array([np.inf, -np.inf])).tolist() == [0.0, 2.0]
    assert np.isnan(erf(np.array([np.nan]))[0])


def test_erf_float32_keeps_dtype_and_accuracy(rng):
    x = (rng.standard_normal(1000) * 3).astype(np.float32)
    out = erf(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [math.erf(v) for v in x.astype(np.float64)], atol=3e-7)


def test_normal_cdf_far_tail_is_not_zero():
    # 0.5 * (1 + erf(-x / sqrt 2)) would cancel to 0 here; Phi(-30) is about 4.9e-198.
    assert normal_cdf(np.array([-30.0]))[0] == pytest.approx(0.5 * math.erfc(30 / math.sqrt(2)), rel=1e-13)


# --- layers: values and gradients ---------------------------------------------------------------

@pytest.mark.parametrize("cls, kw", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 3)], ids=["2d", "4d"])
def test_forward_matches_formula(cls, kw, shape, rng):
    layer = cls(**kw)
    x = rng.standard_normal(shape) * 3
    np.testing.assert_allclose(layer.forward(x), _numpy_reference(layer, x), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("cls, kw", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3, 2)], ids=["2d", "4d"])
def test_gradients_match_central_differences(cls, kw, shape, rng):
    x = rng.standard_normal(shape) * 2
    check_layer_gradients(cls(**kw), x, rtol=1e-6)


@pytest.mark.parametrize("cls, kw", LAYERS, ids=LAYER_IDS)
def test_float32_in_float32_out(cls, kw, rng):
    layer = cls(**kw)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = layer.forward(x)
    assert y.dtype == np.float32
    assert layer.backward(np.ones_like(y)).dtype == np.float32
    np.testing.assert_allclose(y, _numpy_reference(layer, x.astype(np.float64)), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("cls, kw", LAYERS, ids=LAYER_IDS)
def test_forward_does_not_modify_input(cls, kw, rng):
    x = rng.standard_normal((3, 4))
    before = x.copy()
    layer = cls(**kw)
    layer.backward(np.ones_like(layer.forward(x)))
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("cls, kw", LAYERS, ids=LAYER_IDS)
def test_get_config_round_trip(cls, kw):
    layer = cls(**kw)
    config = json.loads(json.dumps(layer.get_config()))
    assert cls.from_config(config).get_config() == layer.get_config()
    assert repr(layer).startswith(cls.__name__ + "(")


def test_relu_gradient_is_zero_at_zero():
    layer = ReLU()
    layer.forward(np.array([[-1.0, 0.0, 2.0]]))
    assert layer.backward(np.ones((1, 3))).tolist() == [[0.0, 0.0, 1.0]]


def test_sigmoid_is_stable_for_huge_inputs():
    x = np.array([[-1e4, -800.0, -40.0, 0.0, 40.0, 800.0, 1e4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = Sigmoid().forward(x)
        y32 = Sigmoid().forward(x.astype(np.float32))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(y32))
    assert y[0, 3] == 0.5 and y[0, -1] == 1.0 and y[0, 0] == 0.0
    assert y[0, 2] == pytest.approx(math.exp(-40) / (1 + math.exp(-40)), rel=1e-14)


def test_softmax_is_stable_and_normalised_over_axis_1(rng):
    x = rng.standard_normal((2, 5, 3, 3)) * 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = Softmax().forward(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-12)


def test_softmax_backward_is_the_jacobian_vector_product(rng):
    x = rng.standard_normal((2, 4))
    g = rng.standard_normal((2, 4))
    layer = Softmax()
    y = layer.forward(x)
    for i in range(2):
        jacobian = np.diag(y[i]) - np.outer(y[i], y[i])
        np.testing.assert_allclose(layer.backward(g)[i], jacobian @ g[i], rtol=1e-12, atol=1e-15)


def test_gelu_grad_far_tails():
    layer = GELU()
    x = np.array([[-40.0, -10.0, 10.0, 40.0]])
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(x))
    np.testing.assert_allclose(y, [[-0.0, -10 * 0.5 * math.erfc(10 / math.sqrt(2)), 10.0, 40.0]], rtol=1e-13, atol=0)
    np.testing.assert_allclose(dx, [[0.0, 0.0, 1.0, 1.0]], atol=1e-20)


# --- the fused registry -------------------------------------------------------------------------

FUSED = [("relu", {}), ("leaky_relu", {"negative_slope": 0.1}), ("leaky_relu", {"negative_slope": -0.3}),
         ("sigmoid", {}), ("tanh", {}), ("gelu", {}), ("gelu", {"approximate": "tanh"})]


@pytest.mark.parametrize("name, kw", FUSED, ids=[f"{n}{k}" for n, k in FUSED])
def test_registry_in_place_forward_and_backward_agree_with_out_of_place(name, kw, rng):
    fn = ACTIVATIONS[name]
    x = rng.standard_normal((4, 6))
    dy = rng.standard_normal((4, 6))
    y = fn.forward(x, **kw)
    dx = fn.backward(dy, x, y, **kw)
    buf = x.copy()
    y_inplace = fn.forward(buf, out=buf, **kw)
    assert y_inplace is buf
    np.testing.assert_array_equal(y_inplace, y)
    # When backward does not read the pre-activation, x=None must work (the in-place fused path).
    x_arg = x if fn.needs_input(**kw) else None
    out = np.empty_like(dy)
    assert fn.backward(dy, x_arg, y, out=out, **kw) is out
    np.testing.assert_array_equal(out, dx)


def test_registry_names_are_the_documented_ones():
    assert set(ACTIVATIONS) == {"relu", "leaky_relu", "sigmoid", "tanh", "gelu"}


# --- errors -------------------------------------------------------------------------------------

def test_errors_on_bad_input():
    with pytest.raises(TypeError, match="floating-point"):
        ReLU().forward(np.arange(4).reshape(2, 2))
    with pytest.raises(TypeError, match="numpy array"):
        ReLU().forward([[1.0, 2.0]])
    with pytest.raises(ValueError, match="at least 2 axes"):
        Softmax().forward(np.ones(3))
    with pytest.raises(RuntimeError, match="before forward"):
        Tanh().backward(np.ones((2, 2)))
    layer = Sigmoid()
    layer.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"expected dy of shape \(2, 3\), received: \(3, 2\)"):
        layer.backward(np.ones((3, 2)))


def test_errors_on_bad_constructor_arguments():
    with pytest.raises(ValueError, match="Expected approximate"):
        GELU(approximate="erf")
    with pytest.raises(TypeError, match="negative_slope"):
        LeakyReLU("0.1")
    with pytest.raises(TypeError, match="negative_slope"):
        LeakyReLU(float("nan"))


# --- against PyTorch ----------------------------------------------------------------------------

TORCH_CASES = [(ReLU, {}, "relu", {}), (LeakyReLU, {"negative_slope": 0.2}, "leaky_relu", {"negative_slope": 0.2}),
               (Sigmoid, {}, "sigmoid", {}), (Tanh, {}, "tanh", {}), (GELU, {}, "gelu", {}),
               (GELU, {"approximate": "tanh"}, "gelu", {"approximate": "tanh"}), (Softmax, {}, "softmax", {"dim": 1})]


@pytest.mark.parametrize("cls, kw, torch_name, torch_kw", TORCH_CASES,
                         ids=[f"{c[0].__name__}{c[1]}" for c in TORCH_CASES])
def test_matches_torch_float64(cls, kw, torch_name, torch_kw, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 4, 5)) * 4
    g = rng.standard_normal((3, 4, 5))
    layer = cls(**kw)
    y = layer.forward(x)
    dx = layer.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    yt = getattr(torch.nn.functional, torch_name)(xt, **torch_kw)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
