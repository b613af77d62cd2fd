"""Concat: branches on one input joined on the channel axis; gradients, names, nesting, configs,
save/load, summary, and parity with the equivalent torch module (an Inception module)."""
import json

import numpy as np
import pytest

import cnnx
from cnnx.layers import (
    BatchNorm2D,
    Concat,
    Conv2D,
    Dense,
    Flatten,
    GlobalAvgPool2D,
    MaxPool2D,
    ReLU,
    Residual,
    Tanh,
)
from cnnx.network import Network

from gradcheck import check_layer_gradients


def inception(c_in, rng):
    """A GoogLeNet-style module: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max-pool -> 1x1."""
    return Concat([
        Conv2D(c_in, 2, 1, rng=rng),
        [Conv2D(c_in, 2, 1, rng=rng), Tanh(), Conv2D(2, 3, 3, padding=1, rng=rng)],
        [Conv2D(c_in, 1, 1, rng=rng), Tanh(), Conv2D(1, 2, 5, padding=2, rng=rng)],
        [MaxPool2D(3, stride=1, padding=1), Conv2D(c_in, 1, 1, rng=rng)],
    ])


def test_output_is_the_branches_joined_on_channels(rng):
    layer = inception(3, rng)
    x = rng.standard_normal((2, 3, 6, 5))
    y = layer.forward(x)
    assert y.shape == (2, 8, 6, 5) and layer.output_shape((3, 6, 5)) == (8, 6, 5)
    first = layer.branches[0][0].forward(x)
    np.testing.assert_array_equal(y[:, :2], first)
    pooled = layer.branches[3][0].forward(x)
    np.testing.assert_array_equal(y[:, 7:], layer.branches[3][1].forward(pooled))


def test_inception_gradients(rng):
    layer = inception(3, rng)
    x = rng.standard_normal((2, 3, 5, 5))
    x += 0.05 * np.sign(x)  # the max-pool's choice must not flip under the step (no ties within 1e-6)
    check_layer_gradients(layer, x)


def test_gradients_with_batchnorm_and_nested_containers(rng):
    inner = Concat([Conv2D(2, 2, 1, rng=rng), [Conv2D(2, 1, 3, padding=1, rng=rng), BatchNorm2D(1)]])
    layer = Residual([Concat([inner, [Conv2D(2, 1, 1, rng=rng), Tanh()]]), Conv2D(4, 2, 1, rng=rng)])
    check_layer_gradients(layer, rng.standard_normal((3, 2, 4, 4)), training=True)


def test_rows_can_be_concatenated_too(rng):
    layer = Concat([Dense(4, 3, rng=rng), [Dense(4, 2, rng=rng), Tanh()]])
    assert layer.output_shape((4,)) == (5,)
    check_layer_gradients(layer, rng.standard_normal((3, 4)))


def test_dx_is_the_sum_over_branches_and_not_an_alias(rng):
    layer = Concat([ReLU(), ReLU()])
    x = np.abs(rng.standard_normal((2, 3, 2, 2))) + 0.1
    np.testing.assert_array_equal(layer.forward(x), np.concatenate([x, x], axis=1))
    dy = rng.standard_normal((2, 6, 2, 2))
    dy_copy = dy.copy()
    np.testing.assert_allclose(layer.backward(dy), dy[:, :3] + dy[:, 3:], rtol=1e-15)
    np.testing.assert_array_equal(dy, dy_copy)


def test_skips_dx_when_not_needed_but_fills_grads(rng):
    layer = inception(2, rng)
    layer.needs_input_grad = False
    y = layer.forward(rng.standard_normal((2, 2, 4, 4)).astype(np.float32))
    assert layer.backward(np.ones_like(y)) is None
    assert all(np.abs(g).sum() > 0 for _, _, g in layer.named_parameters())


def test_names_state_and_params(rng):
    layer = Concat([Conv2D(2, 3, 1, rng=rng), [Conv2D(2, 2, 1, bias=False, rng=rng), BatchNorm2D(2)]])
    assert [n for n, _, _ in layer.named_parameters()] == [
        "branches.0.0.weight", "branches.0.0.bias", "branches.1.0.weight", "branches.1.1.weight", "branches.1.1.bias",
    ]
    assert [n for n, _ in layer.named_buffers()] == ["branches.1.1.running_mean", "branches.1.1.running_var"]
    assert layer.params["branches.1.0.weight"] is layer.branches[1][0].params["weight"]
    assert set(layer.grads) == set(layer.params)
    assert layer.num_params == 6 + 3 + 4 + 2 + 2
    layer.astype(np.float64)
    assert all(p.dtype == np.float64 for _, p, _ in layer.named_parameters())
    with pytest.raises(AttributeError, match="branches"):
        layer.params = {"weight": np.zeros(1)}


def test_mismatched_branches_and_bad_arguments_are_reported(rng):
    layer = Concat([Conv2D(2, 2, 1, rng=rng), Conv2D(2, 2, 3, rng=rng)])
    with pytest.raises(ValueError, match=r"same shape but for the channels .* branch 0 \(2, 5, 5\), branch 1 \(2, 3, 3\)"):
        layer.output_shape((2, 5, 5))
    with pytest.raises(ValueError, match=r"Layer 0 \(Concat\) cannot take input"):
        Network([layer], (2, 5, 5))
    with pytest.raises(ValueError, match=r"branches\[1\]\[0\] \(Conv2D\) cannot take input of shape \(3, 5, 5\)"):
        Concat([ReLU(), Conv2D(2, 2, 1, rng=rng)]).output_shape((3, 5, 5))
    with pytest.raises(TypeError, match="non-empty list of branches"):
        Concat([])
    with pytest.raises(TypeError, match="non-empty list of branches"):
        Concat(ReLU())
    with pytest.raises(TypeError, match=r"branches\[1\]\[0\] to be a cnnx Layer"):
        Concat([ReLU(), ["relu"]])
    relu = ReLU()
    with pytest.raises(ValueError, match="distinct object"):
        Concat([relu, [Tanh(), relu]])
    with pytest.raises(RuntimeError, match="before forward"):
        Concat([ReLU()]).backward(np.zeros((1, 1)))


def _network(rng):
    return Network([Conv2D(3, 4, 3, padding=1, rng=rng), ReLU(), inception(4, rng), BatchNorm2D(8),
                    GlobalAvgPool2D(), Dense(8, 3, rng=rng)], (3, 6, 6))


def test_network_config_save_load_and_summary(tmp_path, rng):
    net = _network(rng)
    config = json.loads(json.dumps(net.get_config()))  # JSON-serialisable
    rebuilt = Network.from_config(config)
    assert rebuilt.get_config() == net.get_config() and rebuilt.num_params == net.num_params
    keys = [k for k, _, _ in net.parameters()]
    assert "2.branches.1.2.weight" in keys and "2.branches.3.1.bias" in keys

    net.compile("SoftmaxCrossEntropy", "Adam")
    x = rng.standard_normal((6, 3, 6, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    net.fit(x, y, epochs=2, batch_size=3, verbose=0, seed=0)
    net.save(tmp_path / "net")
    loaded = cnnx.load(tmp_path / "net")
    assert isinstance(loaded.layers[2], Concat)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))
    # Training resumes with the same optimizer state: one more epoch gives the same weights.
    net.fit(x, y, epochs=1, batch_size=3, verbose=0, seed=0, shuffle=False)
    loaded.fit(x, y, epochs=1, batch_size=3, verbose=0, seed=0, shuffle=False)
    for (k, a, _), (_, b, _) in zip(net.parameters(), loaded.parameters()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=k)

    text = net.summary(print_fn=None)
    assert "Concat" in text and "(8, 6, 6)" in text
    concat_params = net.layers[2].num_params
    assert f"{concat_params:,}" in text and f"Total params: {net.num_params:,}" in text


def test_inception_module_matches_torch(rng):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class TorchInception(nn.Module):
        def __init__(self):
            super().__init__()
            self.b0 = nn.Conv2d(3, 2, 1)
            self.b1 = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Tanh(), nn.Conv2d(2, 3, 3, padding=1))
            self.b2 = nn.Sequential(nn.Conv2d(3, 1, 1), nn.Tanh(), nn.Conv2d(1, 2, 5, padding=2))
            self.b3 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), nn.Conv2d(3, 1, 1))

        def forward(self, x):
            return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)

    layer = inception(3, rng).astype(np.float64)
    module = TorchInception().double()
    torch_convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    cnnx_convs = [lay for branch in layer.branches for lay in branch if isinstance(lay, Conv2D)]
    with torch.no_grad():
        for t, c in zip(torch_convs, cnnx_convs, strict=True):
            t.weight.copy_(torch.from_numpy(c.params["weight"]))
            t.bias.copy_(torch.from_numpy(c.params["bias"]))
    x = rng.standard_normal((2, 3, 7, 6))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = module(tx)
    y = layer.forward(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(layer.backward(dy), tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    for t, c in zip(torch_convs, cnnx_convs):
        np.testing.assert_allclose(c.grads["weight"], t.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(c.grads["bias"], t.bias.grad.numpy(), rtol=1e-10, atol=1e-10)
