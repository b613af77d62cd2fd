"""LayerNorm (channels of NCHW and last axis) and GlobalAvgPool2D / GlobalMaxPool2D: values,
central differences, torch.nn parity in float64, configs and invalid input."""
import numpy as np
import pytest

import cnnx
from cnnx.layers import Conv2D, Dense, GlobalAvgPool2D, GlobalMaxPool2D, LayerNorm
from cnnx.network import Network

from gradcheck import check_layer_gradients


def _randomise_affine(layer, rng):
    layer.params["weight"][...] = rng.uniform(0.5, 1.5, layer.num_features)
    layer.params["bias"][...] = rng.standard_normal(layer.num_features)
    return layer


# --- LayerNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [
    ((3, 5, 4, 6), 1), ((2, 5, 7), 1), ((4, 5), 1), ((3, 4, 5), -1), ((2, 3, 2, 5), -1), ((4, 5), -1),
], ids=["nchw-channels", "ncl-channels", "rows-1", "ncl-last", "nchw-last", "rows-last"])
def test_layernorm_normalises_each_position_over_the_axis(shape, axis, rng):
    layer = LayerNorm(5, axis=axis, affine=False).astype(np.float64)
    x = rng.standard_normal(shape) * 3 + 2
    y = layer.forward(x)
    assert y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_allclose(y.mean(axis=axis), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axis), 1 / (1 + 1e-5 / x.var(axis=axis)), rtol=1e-10)


@pytest.mark.parametrize("axis, shape", [(1, (2, 3, 4, 5)), (1, (3, 4, 6)), (-1, (2, 3, 4)), (-1, (3, 4))],
                         ids=["channels-nchw", "channels-ncl", "last-3d", "last-rows"])
def test_layernorm_gradients(axis, shape, rng):
    c = shape[1] if axis == 1 else shape[-1]
    layer = _randomise_affine(LayerNorm(c, axis=axis).astype(np.float64), rng)
    check_layer_gradients(layer, rng.standard_normal(shape))


def test_layernorm_gradients_without_affine(rng):
    check_layer_gradients(LayerNorm(4, affine=False), rng.standard_normal((2, 4, 3, 3)))


def test_layernorm_is_the_same_in_training_and_inference(rng):
    layer = _randomise_affine(LayerNorm(4), rng)
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(layer.forward(x, training=True), layer.forward(x, training=False))
    assert layer.buffers == {}


@pytest.mark.parametrize("axis", [1, -1], ids=["channels", "last"])
def test_layernorm_matches_torch(axis, rng):
    torch = pytest.importorskip("torch")
    c = 6
    layer = _randomise_affine(LayerNorm(c, axis=axis, eps=1e-6).astype(np.float64), rng)
    module = torch.nn.LayerNorm(c, eps=1e-6).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.params["weight"]))
        module.bias.copy_(torch.from_numpy(layer.params["bias"]))
    x = rng.standard_normal((3, c, 4, 5) if axis == 1 else (3, 4, 5, c)) * 2 + 1
    tx = torch.from_numpy(x).requires_grad_(True)
    # ConvNeXt's channels-first LayerNorm: torch's LayerNorm on the channels-last permutation.
    ty = module(tx.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if axis == 1 else module(tx)
    y = layer.forward(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["weight"], module.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["bias"], module.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_layernorm_config_shapes_and_errors():
    layer = LayerNorm(8, axis=-1, eps=1e-6)
    assert LayerNorm.from_config(layer.get_config()).get_config() == layer.get_config() == {
        "num_features": 8, "axis": -1, "eps": 1e-6, "affine": True}
    assert layer.num_params == 16 and LayerNorm(8, affine=False).num_params == 0
    assert layer.output_shape((3, 8)) == (3, 8)
    assert LayerNorm(8).output_shape((8, 4, 4)) == (8, 4, 4)
    with pytest.raises(ValueError, match=r"LayerNorm\(axis=1\) expected input of shape \(8, \.\.\.\) per sample, "
                                         r"received: \(4, 8, 8\)"):
        LayerNorm(8).output_shape((4, 8, 8))
    with pytest.raises(ValueError, match=r"received: \(8, 4\)"):
        layer.forward(np.zeros((2, 8, 4), np.float32))
    with pytest.raises(ValueError, match="Expected axis 1 .* received: axis=2"):
        LayerNorm(8, axis=2)
    with pytest.raises(ValueError, match="eps"):
        LayerNorm(8, eps=0)
    with pytest.raises(TypeError, match="floating"):
        LayerNorm(2).forward(np.zeros((1, 2), np.int64))
    with pytest.raises(RuntimeError, match="before forward"):
        LayerNorm(2).backward(np.zeros((1, 2)))


# --- global pooling ---------------------------------------------------------------------------------

def test_global_pools_values_and_shapes(rng):
    x = rng.standard_normal((3, 4, 5, 6))
    np.testing.assert_allclose(GlobalAvgPool2D().forward(x), x.mean(axis=(2, 3)), rtol=1e-12)
    np.testing.assert_array_equal(GlobalMaxPool2D().forward(x), x.max(axis=(2, 3)))
    assert GlobalAvgPool2D(keepdims=True).forward(x).shape == (3, 4, 1, 1)
    assert GlobalMaxPool2D().output_shape((4, 5, 6)) == (4,)
    assert GlobalMaxPool2D(keepdims=True).output_shape((4, 5, 6)) == (4, 1, 1)


@pytest.mark.parametrize("cls", [GlobalAvgPool2D, GlobalMaxPool2D], ids=["avg", "max"])
@pytest.mark.parametrize("keepdims", [False, True], ids=["flat", "keepdims"])
def test_global_pool_gradients(cls, keepdims, rng):
    check_layer_gradients(cls(keepdims=keepdims), rng.standard_normal((2, 3, 4, 5)))


def test_global_max_pool_sends_the_gradient_to_the_first_maximum():
    x = np.zeros((1, 1, 2, 2))  # all tied
    layer = GlobalMaxPool2D()
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(np.array([[2.0]])), [[[[2.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_global_pools_match_torch(kind, rng):
    torch = pytest.importorskip("torch")
    layer = GlobalAvgPool2D() if kind == "avg" else GlobalMaxPool2D()
    module = torch.nn.AdaptiveAvgPool2d(1) if kind == "avg" else torch.nn.AdaptiveMaxPool2d(1)
    x = rng.standard_normal((3, 4, 7, 5))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = module(tx).flatten(1)
    y = layer.forward(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_global_pool_errors_and_config():
    layer = GlobalAvgPool2D(keepdims=True)
    assert GlobalAvgPool2D.from_config(layer.get_config()).keepdims is True
    assert repr(GlobalMaxPool2D()) == "GlobalMaxPool2D(keepdims=False)"
    with pytest.raises(ValueError, match=r"expected input of shape \(c, h, w\) per sample, received: \(4,\)"):
        GlobalAvgPool2D().output_shape((4,))
    with pytest.raises(TypeError, match="keepdims"):
        GlobalMaxPool2D(keepdims=1)
    with pytest.raises(ValueError, match=r"expected dy of shape \(2, 3\)"):
        pool = GlobalMaxPool2D()
        pool.forward(np.zeros((2, 3, 4, 4), np.float32))
        pool.backward(np.zeros((2, 3, 1, 1), np.float32))


def test_network_with_layernorm_and_global_pool_saves_and_loads(tmp_path, rng):
    net = Network([Conv2D(3, 8, 3, padding=1, rng=rng), LayerNorm(8), GlobalAvgPool2D(), LayerNorm(8, axis=-1),
                   Dense(8, 4, rng=rng)], (3, 6, 6))
    for layer in (net.layers[1], net.layers[3]):
        _randomise_affine(layer, rng)
    x = rng.standard_normal((5, 3, 6, 6)).astype(np.float32)
    net.save(tmp_path / "net")
    loaded = cnnx.load(tmp_path / "net")
    assert [type(layer).__name__ for layer in loaded.layers] == ["Conv2D", "LayerNorm", "GlobalAvgPool2D",
                                                                "LayerNorm", "Dense"]
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
