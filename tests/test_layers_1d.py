"""Conv1D, MaxPool1D, AvgPool1D: gradients, PyTorch parity, configs and input validation."""
import json

import numpy as np
import pytest

from cnnx.layers import LAYER_CLASSES, AvgPool1D, Conv1D, MaxPool1D

from gradcheck import check_layer_gradients


def _roundtrip(layer):
    config = json.loads(json.dumps(layer.get_config()))
    return LAYER_CLASSES[type(layer).__name__].from_config(config)


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, length",
    [
        ({"kernel_size": 3, "padding": "same", "stride": 2}, 9),
        ({"kernel_size": 4, "padding": "same"}, 7),
        ({"kernel_size": 3, "padding": (2, 1), "stride": 3}, 10),
        ({"kernel_size": 2, "bias": False}, 5),
        ({"kernel_size": 3, "padding": 1, "activation": "tanh"}, 6),
    ],
    ids=["same-stride2", "same-even-kernel", "asymmetric-stride3", "no-bias", "fused-tanh"],
)
def test_conv1d_gradients(rng, kwargs, length):
    layer = Conv1D(3, 4, rng=rng, **kwargs)
    check_layer_gradients(layer, rng.standard_normal((2, 3, length)))


@pytest.mark.parametrize("cls", [MaxPool1D, AvgPool1D], ids=["max", "avg"])
@pytest.mark.parametrize("kwargs", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1}],
                         ids=["k2", "k3-s2-p1"])
def test_pool1d_gradients(rng, cls, kwargs):
    # A permutation keeps max-pool windows free of ties, where the gradient is not differentiable.
    x = rng.permutation(2 * 3 * 9).reshape(2, 3, 9) / 7.0
    check_layer_gradients(cls(**kwargs), x)


def test_maxpool1d_ties_go_to_first_maximum():
    x = np.array([[[1.0, 1.0, 0.0, 2.0, 2.0, 2.0]]])
    layer = MaxPool1D(3)
    np.testing.assert_array_equal(layer.forward(x), [[[1.0, 2.0]]])
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 2))), [[[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]]])


# --- shapes, configs, errors ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, length, expected",
    [
        ({"kernel_size": 3}, 10, 8),
        ({"kernel_size": 3, "padding": "same", "stride": 2}, 9, 5),
        ({"kernel_size": 4, "padding": "same"}, 7, 7),
        ({"kernel_size": 3, "padding": (0, 2), "stride": 2}, 10, 5),
    ],
)
def test_conv1d_output_shape_matches_forward(rng, kwargs, length, expected):
    layer = Conv1D(2, 5, rng=rng, **kwargs)
    assert layer.output_shape((2, length)) == (5, expected)
    assert layer.forward(rng.standard_normal((3, 2, length)).astype(np.float32)).shape == (3, 5, expected)


def test_conv1d_weight_shape_and_float32_default(rng):
    layer = Conv1D(3, 8, 5, rng=rng)
    assert layer.params["weight"].shape == (8, 3, 5)
    assert layer.params["bias"].shape == (8,)
    assert layer.params["weight"].dtype == np.float32
    # PyTorch's default bound 1/sqrt(fan_in) with fan_in = in_channels * k.
    assert np.abs(layer.params["weight"]).max() <= 1 / np.sqrt(15)


@pytest.mark.parametrize(
    "layer",
    [
        Conv1D(3, 4, 3, stride=2, padding=(1, 2), bias=False, activation="leaky_relu", negative_slope=0.2, rng=0),
        Conv1D(3, 4, 2, padding="SAME", rng=0),
        MaxPool1D(3, stride=2, padding=1),
        AvgPool1D(2, padding=(0, 1)),
    ],
    ids=["conv-asym", "conv-same", "maxpool", "avgpool"],
)
def test_get_config_roundtrip(layer):
    rebuilt = _roundtrip(layer)
    assert type(rebuilt) is type(layer)
    assert rebuilt.get_config() == layer.get_config()
    assert repr(rebuilt) == repr(layer)


def test_conv1d_rebuilt_from_config_computes_the_same(rng):
    layer = Conv1D(2, 3, 3, padding="same", rng=rng)
    rebuilt = _roundtrip(layer)
    rebuilt.params["weight"][...] = layer.params["weight"]
    rebuilt.params["bias"][...] = layer.params["bias"]
    x = rng.standard_normal((2, 2, 6)).astype(np.float32)
    np.testing.assert_array_equal(rebuilt.forward(x), layer.forward(x))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: Conv1D(3, 4, 0), ValueError),
        (lambda: Conv1D(3, 4, 2.5), TypeError),
        (lambda: Conv1D(3, 4, 3, stride=0), ValueError),
        (lambda: Conv1D(3, 4, 3, padding="full"), ValueError),
        (lambda: Conv1D(3, 4, 3, padding=-1), ValueError),
        (lambda: Conv1D(3, 4, 3, padding=(1, 2, 3)), TypeError),
        (lambda: Conv1D(3, 4, 3, activation="swish"), ValueError),
        (lambda: MaxPool1D(2, padding=2), ValueError),
        (lambda: AvgPool1D(3, padding="same"), TypeError),
    ],
    ids=["kernel0", "kernel-float", "stride0", "padding-name", "padding-neg", "padding-triple",
         "activation", "pool-padding-too-big", "pool-padding-string"],
)
def test_constructor_errors(make, error):
    with pytest.raises(error, match="Expected"):
        make()


def test_conv1d_rejects_bad_input(rng):
    layer = Conv1D(3, 4, 3, rng=rng)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 3, \*\)"):
        layer.forward(np.zeros((2, 2, 8), np.float32))
    with pytest.raises(ValueError, match="expected input of shape"):
        layer.forward(np.zeros((2, 3, 8, 1), np.float32))
    with pytest.raises(ValueError, match="at least as long as the kernel"):
        layer.forward(np.zeros((2, 3, 2), np.float32))
    with pytest.raises(TypeError, match="floating"):
        layer.forward(np.zeros((2, 3, 8), np.int64))
    with pytest.raises(ValueError, match="at least as long as the kernel"):
        layer.output_shape((3, 2))


def test_pool1d_rejects_bad_input_and_dy():
    layer = MaxPool1D(2)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch"):
        layer.forward(np.zeros((2, 3, 4, 4)))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 3, 2)))
    layer.forward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"expected dy of shape \(2, 3, 2\)"):
        layer.backward(np.zeros((2, 3, 3)))


def test_conv1d_skips_dx_when_not_needed(rng):
    layer = Conv1D(2, 3, 3, rng=rng)
    layer.needs_input_grad = False
    y = layer.forward(rng.standard_normal((2, 2, 6)).astype(np.float32))
    assert layer.backward(np.ones_like(y)) is None
    assert np.abs(layer.grads["weight"]).sum() > 0


# --- PyTorch parity -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    return torch


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "kwargs",
    [{"kernel_size": 3}, {"kernel_size": 5, "stride": 2, "padding": 2}, {"kernel_size": 4, "padding": "same"},
     {"kernel_size": 2, "stride": 3, "bias": False}],
    ids=["k3", "k5-s2-p2", "same-even", "s3-nobias"],
)
def test_conv1d_matches_torch(torch, rng, kwargs):
    layer = Conv1D(3, 4, rng=rng, **kwargs).astype(np.float64)
    tkw = dict(kwargs)
    tl = torch.nn.Conv1d(3, 4, dtype=torch.float64, **tkw)
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(layer.params["weight"]))
        if layer.use_bias:
            tl.bias.copy_(torch.from_numpy(layer.params["bias"]))
    x = rng.standard_normal((2, 3, 11))
    xt = torch.tensor(x, requires_grad=True)
    yt = tl(xt)
    y = layer.forward(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-10)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(layer.grads["weight"], tl.weight.grad.numpy(), rtol=0, atol=1e-10)
    if layer.use_bias:
        np.testing.assert_allclose(layer.grads["bias"], tl.bias.grad.numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel_size, stride, padding", [(2, None, 0), (3, 2, 1), (4, 1, 2)])
def test_pool1d_matches_torch(torch, rng, kind, kernel_size, stride, padding):
    cls, tcls = (MaxPool1D, torch.nn.MaxPool1d) if kind == "max" else (AvgPool1D, torch.nn.AvgPool1d)
    layer, tl = cls(kernel_size, stride, padding), tcls(kernel_size, stride, padding)
    x = rng.standard_normal((2, 3, 13))
    xt = torch.tensor(x, requires_grad=True)
    yt = tl(xt)
    y = layer.forward(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-10)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=0, atol=1e-10)
