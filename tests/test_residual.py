"""Residual: gradients through both paths, prefixed names, nesting, configs, and networks using it
(the ResNet-8 of the model zoo; save/load of a network mixing Residual, BatchNorm and Conv1D)."""
import json

import numpy as np
import pytest

from cnnx import optimizers as cnnx_optimizers
from cnnx.io import load, save
from cnnx.layers import (
    LAYER_CLASSES,
    AvgPool1D,
    BatchNorm1D,
    BatchNorm2D,
    Conv1D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool1D,
    ReLU,
    Residual,
    Tanh,
)
from cnnx.network import Network

from gradcheck import check_layer_gradients


def _conv_bn_block(c_in, c_out, stride, rng):
    return [Conv2D(c_in, c_out, 3, stride=stride, padding=1, rng=rng), BatchNorm2D(c_out), Tanh(),
            Conv2D(c_out, c_out, 3, padding=1, rng=rng)]


def _randomise_bn(layer, rng):
    """Non-trivial BatchNorm parameters and running statistics everywhere inside ``layer``."""
    for name, p, _ in layer.named_parameters():
        if p.ndim == 1:  # BatchNorm scale and shift (and conv biases, harmlessly)
            p[...] = rng.uniform(0.5, 1.5, p.shape)
    for name, b in layer.named_buffers():
        b[...] = rng.uniform(0.5, 1.5, b.shape) if name.endswith("running_var") else rng.standard_normal(b.shape)
    return layer


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "tanh"], ids=["no-activation", "tanh-after-sum"])
def test_identity_shortcut_gradients(rng, activation):
    layer = Residual(_conv_bn_block(2, 2, 1, rng), activation=activation)
    check_layer_gradients(layer, rng.standard_normal((2, 2, 5, 5)), training=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_shortcut_gradients(rng, training):
    shortcut = [Conv2D(2, 3, 1, stride=2, rng=rng), BatchNorm2D(3)]
    layer = Residual(_conv_bn_block(2, 3, 2, rng), shortcut, activation="sigmoid")
    layer.astype(np.float64)
    _randomise_bn(layer, rng)
    check_layer_gradients(layer, rng.standard_normal((2, 2, 6, 5)), training=training)


def test_nested_residual_gradients(rng):
    inner = Residual([Conv2D(2, 2, 3, padding=1, rng=rng), Tanh()])
    outer = Residual([inner, BatchNorm2D(2), Conv2D(2, 2, 1, rng=rng)], shortcut=Conv2D(2, 2, 1, rng=rng),
                     activation="tanh")
    check_layer_gradients(outer, rng.standard_normal((2, 2, 4, 4)), training=True)


def test_gradient_is_the_sum_of_both_paths(rng):
    # Dropout in eval returns dy itself: the sum must not alias (and double) it in place.
    layer = Residual(Dropout(0.5))
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(layer.forward(x), 2 * x)
    dy = rng.standard_normal((3, 4))
    dy_copy = dy.copy()
    np.testing.assert_array_equal(layer.backward(dy), 2 * dy_copy)
    np.testing.assert_array_equal(dy, dy_copy)


def test_skips_dx_when_not_needed_but_fills_grads(rng):
    layer = Residual(_conv_bn_block(2, 2, 1, rng), shortcut=Conv2D(2, 2, 1, rng=rng))
    layer.needs_input_grad = False
    y = layer.forward(rng.standard_normal((2, 2, 4, 4)).astype(np.float32), training=True)
    assert layer.backward(np.ones_like(y)) is None
    assert all(np.abs(g).sum() > 0 for _, _, g in layer.named_parameters())
    layer.needs_input_grad = True
    layer.forward(rng.standard_normal((2, 2, 4, 4)).astype(np.float32), training=True)
    assert layer.backward(np.ones_like(y)).shape == (2, 2, 4, 4)


# --- names, state, shapes --------------------------------------------------------------------------

def test_prefixed_names_and_state(rng):
    inner = Residual([Conv2D(2, 2, 1, bias=False, rng=rng), BatchNorm2D(2)])
    layer = Residual([inner, ReLU()], shortcut=[Conv2D(2, 2, 1, rng=rng), BatchNorm2D(2, affine=False)])
    assert [n for n, _, _ in layer.named_parameters()] == [
        "block.0.block.0.weight", "block.0.block.1.weight", "block.0.block.1.bias",
        "shortcut.0.weight", "shortcut.0.bias",
    ]
    assert [n for n, _ in layer.named_buffers()] == [
        "block.0.block.1.running_mean", "block.0.block.1.running_var",
        "shortcut.1.running_mean", "shortcut.1.running_var",
    ]
    assert layer.params["shortcut.0.weight"] is layer.shortcut[0].params["weight"]
    assert set(layer.grads) == set(layer.params)
    assert layer.num_params == 4 + 2 + 2 + 4 + 2
    layer.astype(np.float64)
    assert all(p.dtype == np.float64 and g.dtype == np.float64 for _, p, g in layer.named_parameters())
    assert all(b.dtype == np.float64 for _, b in layer.named_buffers())
    with pytest.raises(AttributeError, match="children"):
        layer.params = {"weight": np.zeros(1)}


def test_output_shape(rng):
    down = Residual(_conv_bn_block(2, 4, 2, rng), [Conv2D(2, 4, 1, stride=2, rng=rng)])
    assert down.output_shape((2, 9, 9)) == (4, 5, 5)
    assert Residual(_conv_bn_block(2, 2, 1, rng)).output_shape((2, 6, 7)) == (2, 6, 7)


def test_shape_mismatch_is_reported(rng):
    identity = Residual(_conv_bn_block(2, 4, 2, rng))
    expected = r"identity shortcut to give the same shape.*block \(4, 4, 4\), shortcut \(2, 8, 8\)"
    with pytest.raises(ValueError, match=expected):
        identity.output_shape((2, 8, 8))
    with pytest.raises(ValueError, match="same shape"):
        identity.forward(np.zeros((1, 2, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"block\[0\] \(Conv2D\) cannot take input of shape \(3, 8, 8\)"):
        identity.output_shape((3, 8, 8))
    with pytest.raises(ValueError, match="Layer 0 \\(Residual\\) cannot take input"):
        Network([identity], input_shape=(2, 8, 8))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: Residual([]), ValueError),
        (lambda: Residual("conv"), TypeError),
        (lambda: Residual([ReLU(), "relu"]), TypeError),
        (lambda: Residual(ReLU(), shortcut=[]), ValueError),
        (lambda: Residual(ReLU(), activation="swish"), ValueError),
    ],
    ids=["empty", "not-a-layer", "list-with-non-layer", "empty-shortcut", "activation"],
)
def test_constructor_errors(make, error):
    with pytest.raises(error, match="Expected"):
        make()


def test_repeated_layer_is_refused():
    relu = ReLU()
    with pytest.raises(ValueError, match="distinct"):
        Residual([relu], shortcut=[relu])


def test_backward_before_forward_and_bad_dy(rng):
    layer = Residual(ReLU())
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 3)))
    layer.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"expected dy of shape \(2, 3\)"):
        layer.backward(np.zeros((2, 4)))


# --- config -------------------------------------------------------------------------------------

def test_get_config_roundtrip_nested(rng):
    inner = Residual([Conv2D(2, 2, 3, padding="same", rng=rng), BatchNorm2D(2, momentum=0.2)], activation="relu")
    layer = Residual([inner, Conv2D(2, 4, 3, stride=2, padding=1, rng=rng)],
                     shortcut=[Conv2D(2, 4, 1, stride=2, rng=rng)], activation="leaky_relu", negative_slope=0.1)
    config = json.loads(json.dumps(layer.get_config()))
    assert config["block"][0]["class"] == "Residual"
    shortcut_config = json.loads(json.dumps(layer.shortcut[0].get_config()))
    assert config["shortcut"][0] == {"class": "Conv2D", "config": shortcut_config}
    rebuilt = LAYER_CLASSES["Residual"].from_config(config)
    assert json.dumps(rebuilt.get_config()) == json.dumps(layer.get_config())
    assert repr(rebuilt) == repr(layer)
    assert "negative_slope=0.1" in repr(layer)
    assert Residual.from_config(Residual(ReLU()).get_config()).shortcut is None


def test_from_config_rejects_unknown_class():
    with pytest.raises(ValueError, match="known layer class"):
        Residual.from_config({"block": [{"class": "NoSuchLayer", "config": {}}], "shortcut": None})


# --- in networks --------------------------------------------------------------------------------------

def _mixed_network(seed):
    rng = np.random.default_rng(seed)
    return Network(
        [
            Conv1D(2, 4, 3, padding="same", rng=rng),
            BatchNorm1D(4),
            Residual([Conv1D(4, 4, 3, padding=1, rng=rng), BatchNorm1D(4), ReLU(), Conv1D(4, 4, 3, padding=1, rng=rng)],
                     activation="relu"),
            Residual([Conv1D(4, 6, 3, stride=2, padding=1, rng=rng)],
                     shortcut=[Conv1D(4, 6, 1, stride=2, rng=rng), BatchNorm1D(6)]),
            MaxPool1D(2),
            AvgPool1D(2),
            Flatten(),
            Dense(6 * 2, 3, rng=rng),
        ],
        input_shape=(2, 16),
    )


def test_network_with_residual_trains_and_keys_parameters(rng):
    net = _mixed_network(0)
    keys = [k for k, _, _ in net.parameters()]
    assert "2.block.0.weight" in keys and "3.shortcut.1.bias" in keys
    # Buffer keys are f"{i}.<something>{name}" (the Network may mark them as buffers).
    buffer_keys = [k for k, _ in net.buffers()]
    assert [k for k in buffer_keys if k.startswith("3.") and k.endswith("shortcut.1.running_var")]
    running_mean = next(k for k in buffer_keys if k.startswith("2.") and k.endswith("block.1.running_mean"))
    net.compile("SoftmaxCrossEntropy", "Adam")
    x = rng.standard_normal((16, 2, 16)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    before = net.get_weights()
    net.fit(x, y, epochs=2, batch_size=8, verbose=0)
    after = net.get_weights()
    assert all(np.isfinite(v).all() for v in after.values())
    assert not np.array_equal(before["3.shortcut.0.weight"], after["3.shortcut.0.weight"])
    assert not np.array_equal(before[running_mean], after[running_mean])


def test_save_load_roundtrip_with_residual_batchnorm_conv1d(rng, tmp_path):
    net = _mixed_network(1)
    net.compile("SoftmaxCrossEntropy", cnnx_optimizers.SGD(lr=0.01, momentum=0.9))
    x = rng.standard_normal((8, 2, 16)).astype(np.float32)
    net.fit(x, rng.integers(0, 3, 8), epochs=1, batch_size=4, verbose=0)  # moves the running stats
    save(net, tmp_path / "mixed")
    loaded = load(tmp_path / "mixed")
    assert loaded.get_config() == net.get_config()
    original, restored = net.get_weights(), loaded.get_weights()
    assert original.keys() == restored.keys()
    for key in original:
        np.testing.assert_array_equal(restored[key], original[key], err_msg=key)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))


def test_resnet8_from_the_zoo():
    from cnnx.models_resnet import resnet8

    net = resnet8(seed=0)
    assert net.num_params == 78042
    assert net.output_shape == (10,)
    assert [type(layer).__name__ for layer in net.layers].count("Residual") == 3
    assert net.layers[4].shortcut is not None and net.layers[3].shortcut is None
    y = net.forward(np.zeros((1, 3, 32, 32), np.float32), training=False)
    assert y.shape == (1, 10) and np.isfinite(y).all()
    assert resnet8(num_classes=4, seed=0, fused=False).output_shape == (4,)
    again = resnet8(seed=0).get_weights()
    assert all(np.array_equal(again[k], v) for k, v in net.get_weights().items())


def test_resnet8_fused_and_separate_relu_compute_the_same(rng):
    from cnnx.models_resnet import resnet8

    x = rng.standard_normal((1, 3, 32, 32))
    outputs = []
    for fused in (True, False):
        net = resnet8(num_classes=3, dtype="float64", seed=5, fused=fused)
        out = net.forward(x, training=True).copy()
        net.backward(np.ones_like(out))
        outputs.append((out, net.parameters()[0][2].copy()))
    np.testing.assert_allclose(outputs[0][0], outputs[1][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(outputs[0][1], outputs[1][1], rtol=1e-10, atol=1e-12)
