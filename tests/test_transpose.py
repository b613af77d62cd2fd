"""ConvTranspose2D, Upsample2D, Reshape: gradients, the adjoint property, PyTorch parity, configs."""
import json

import numpy as np
import pytest

from cnnx import functional as F
from cnnx.layers import LAYER_CLASSES, ConvTranspose2D, Reshape, Upsample2D

from gradcheck import check_layer_gradients


def _roundtrip(layer):
    config = json.loads(json.dumps(layer.get_config()))
    return LAYER_CLASSES[type(layer).__name__].from_config(config)


# --- ConvTranspose2D --------------------------------------------------------------------------------

CT_CASES = [
    ({"kernel_size": 3, "stride": 2, "padding": 1, "output_padding": 1}, (3, 4)),
    ({"kernel_size": (2, 3), "stride": (2, 1)}, (3, 3)),
    ({"kernel_size": 4, "stride": 3, "padding": (1, 2), "output_padding": (2, 0), "bias": False}, (2, 3)),
    ({"kernel_size": 1}, (2, 2)),
]
CT_IDS = ["k3-s2-p1-op1", "nonsquare", "s3-asym-op", "k1"]


@pytest.mark.parametrize("kwargs, hw", CT_CASES, ids=CT_IDS)
def test_conv_transpose_gradients(rng, kwargs, hw):
    layer = ConvTranspose2D(2, 3, rng=rng, **kwargs)
    check_layer_gradients(layer, rng.standard_normal((2, 2) + hw))


@pytest.mark.parametrize("kwargs, hw", CT_CASES, ids=CT_IDS)
def test_conv_transpose_is_the_adjoint_of_conv2d(rng, kwargs, hw):
    # <conv_transpose(x), z> == <x, conv2d(z)> for the same weight (no bias).
    kwargs = dict(kwargs, bias=False)
    layer = ConvTranspose2D(2, 3, rng=rng, **kwargs).astype(np.float64)
    x = rng.standard_normal((2, 2) + hw)
    y = layer.forward(x)
    z = rng.standard_normal(y.shape)
    p = layer.padding
    back = F.conv2d(z, layer.params["weight"], None, layer.stride, ((p[0], p[0]), (p[1], p[1])))
    assert back.shape == x.shape
    np.testing.assert_allclose(np.vdot(y, z), np.vdot(x, back), rtol=1e-12)


def test_conv_transpose_grouped_forward_matches_one_group(rng, monkeypatch):
    layer = ConvTranspose2D(3, 2, 3, stride=2, padding=1, rng=rng).astype(np.float64)
    x = rng.standard_normal((5, 3, 4, 3))
    whole = layer.forward(x).copy()
    monkeypatch.setattr(F, "COLUMN_BUFFER_BYTES", 1)  # one image per group
    np.testing.assert_array_equal(layer.forward(x), whole)


def test_conv_transpose_output_shape_and_init(rng):
    layer = ConvTranspose2D(4, 2, 3, stride=2, padding=1, output_padding=1, rng=rng)
    assert layer.params["weight"].shape == (4, 2, 3, 3)
    assert layer.params["bias"].shape == (2,)
    assert layer.params["weight"].dtype == np.float32
    # PyTorch's bound for a transposed convolution: fan_in = out_channels * kh * kw.
    bound = 1 / np.sqrt(2 * 9)
    assert np.abs(layer.params["weight"]).max() <= bound and np.abs(layer.params["bias"]).max() <= bound
    assert layer.output_shape((4, 5, 7)) == (2, 10, 14)
    assert layer.forward(rng.standard_normal((3, 4, 5, 7)).astype(np.float32)).shape == (3, 2, 10, 14)


def test_conv_transpose_skips_dx_when_not_needed(rng):
    layer = ConvTranspose2D(2, 3, 2, stride=2, rng=rng)
    layer.needs_input_grad = False
    y = layer.forward(rng.standard_normal((2, 2, 3, 3)).astype(np.float32))
    assert layer.backward(np.ones_like(y)) is None
    assert np.abs(layer.grads["weight"]).sum() > 0


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: ConvTranspose2D(2, 3, 0), ValueError),
        (lambda: ConvTranspose2D(2, 3, 3, stride=0), ValueError),
        (lambda: ConvTranspose2D(2, 3, 3, padding=-1), ValueError),
        (lambda: ConvTranspose2D(2, 3, 3, padding="same"), TypeError),
        (lambda: ConvTranspose2D(2, 3, 3, stride=2, output_padding=2), ValueError),
        (lambda: ConvTranspose2D(2, 3, 3, output_padding=1), ValueError),
        (lambda: ConvTranspose2D(2, 3, 3, bias=1), TypeError),
        (lambda: ConvTranspose2D(0, 3, 3), ValueError),
    ],
    ids=["kernel0", "stride0", "padding-neg", "padding-name", "op>=stride", "op-stride1", "bias", "channels"],
)
def test_conv_transpose_constructor_errors(make, error):
    with pytest.raises(error, match="Expected"):
        make()


def test_conv_transpose_rejects_bad_input(rng):
    layer = ConvTranspose2D(2, 3, 3, padding=2)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 2, \*, \*\)"):
        layer.forward(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="non-empty output"):
        layer.forward(np.zeros((1, 2, 1, 1), np.float32))
    with pytest.raises(TypeError, match="floating"):
        layer.forward(np.zeros((1, 2, 4, 4), np.int8))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 3, 2, 2)))
    layer.forward(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected dy of shape \(1, 3, 2, 2\)"):
        layer.backward(np.zeros((1, 3, 4, 4), np.float32))


@pytest.mark.parametrize("kwargs, hw", CT_CASES, ids=CT_IDS)
def test_conv_transpose_matches_torch(rng, kwargs, hw):
    torch = pytest.importorskip("torch")
    layer = ConvTranspose2D(2, 3, rng=rng, **kwargs).astype(np.float64)
    tl = torch.nn.ConvTranspose2d(2, 3, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        tl.weight.copy_(torch.from_numpy(layer.params["weight"]))
        if layer.use_bias:
            tl.bias.copy_(torch.from_numpy(layer.params["bias"]))
    x = rng.standard_normal((2, 2) + hw)
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


# --- Upsample2D ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2, (1, 3)], ids=["2", "1x3"])
def test_upsample_gradients(rng, scale):
    check_layer_gradients(Upsample2D(scale), rng.standard_normal((2, 2, 3, 2)))


def test_upsample_repeats_pixels(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    layer = Upsample2D((2, 3))
    y = layer.forward(x)
    assert y.shape == (2, 3, 8, 15) == (2,) + layer.output_shape((3, 4, 5))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(3, axis=3))
    np.testing.assert_array_equal(layer.backward(np.ones_like(y)), np.full(x.shape, 6.0))


def test_upsample_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 4, 5))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.Upsample(scale_factor=2, mode="nearest")(xt)
    layer = Upsample2D(2)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=0, atol=1e-12)


def test_upsample_errors():
    with pytest.raises(ValueError, match="Expected scale_factor >= 1"):
        Upsample2D(0)
    with pytest.raises(TypeError, match="Expected scale_factor"):
        Upsample2D(1.5)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, \*, \*, \*\)"):
        Upsample2D().forward(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(c, h, w\) per sample"):
        Upsample2D().output_shape((3, 4))


# --- Reshape ------------------------------------------------------------------------------------------

def test_reshape_forward_backward(rng):
    layer = Reshape((3, -1))
    x = rng.standard_normal((2, 12))
    y = layer.forward(x)
    assert y.shape == (2, 3, 4) and layer.output_shape((12,)) == (3, 4)
    np.testing.assert_array_equal(y, x.reshape(2, 3, 4))
    np.testing.assert_array_equal(layer.backward(y), x)
    check_layer_gradients(Reshape(6), rng.standard_normal((2, 2, 3)))


def test_reshape_errors():
    with pytest.raises(ValueError, match="12 elements per sample"):
        Reshape((3, 4)).output_shape((2, 5))
    with pytest.raises(ValueError, match="multiple of 5"):
        Reshape((5, -1)).forward(np.zeros((2, 12)))
    with pytest.raises(ValueError, match="at most one -1"):
        Reshape((-1, -1))
    with pytest.raises(ValueError, match="positive ints"):
        Reshape((0, 3))
    with pytest.raises(TypeError, match="Expected target_shape"):
        Reshape("3x4")
    layer = Reshape((4,))
    layer.forward(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"expected dy of shape \(2, 4\)"):
        layer.backward(np.zeros((2, 2, 2)))


# --- configs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "layer",
    [ConvTranspose2D(2, 3, (2, 3), stride=2, padding=1, output_padding=(1, 0), bias=False, rng=0),
     Upsample2D((2, 1)), Reshape((4, -1, 2))],
    ids=["conv-transpose", "upsample", "reshape"],
)
def test_get_config_roundtrip(layer):
    rebuilt = _roundtrip(layer)
    assert rebuilt.get_config() == layer.get_config()
    assert repr(rebuilt) == repr(layer)
