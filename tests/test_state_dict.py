"""Network.state_dict / load_state_dict: PyTorch's nn.Sequential keys, round trips through torch.

The key mapping is pinned against hand-written torch models (independent of cnnx.state_dict.to_torch);
outputs are compared in float64 after moving the weights each way.
"""
import numpy as np
import pytest

import cnnx
from cnnx.layers import BatchNorm2D, Conv2D, Dense, Flatten, Layer, ReLU, Residual
from export_nets import has_new_layers, image_net, new_layers_net, randomized, sequence_net

# Outputs of the same float64 weights in two libraries: summation orders differ, so not bit-exact.
TOL = dict(rtol=1e-10, atol=1e-12)


def test_keys_follow_the_sequential_with_activations_as_modules():
    fused = cnnx.models.lenet5(seed=0, fused=True)
    separate = cnnx.models.lenet5(seed=0, fused=False)
    expected = ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias",
                "11.weight", "11.bias"]
    assert list(fused.state_dict()) == expected
    assert list(separate.state_dict()) == expected


def test_batchnorm_and_residual_keys():
    net = cnnx.Network([
        Conv2D(3, 4, 3, padding=1, bias=False), BatchNorm2D(4),
        Residual([Conv2D(4, 8, 3, stride=2, padding=1), BatchNorm2D(8)],
                 shortcut=[Conv2D(4, 8, 1, stride=2, bias=False)], activation="relu"),
        Flatten(), Dense(8 * 4 * 4, 2),
    ], (3, 8, 8))
    sd = net.state_dict()
    assert list(sd) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "2.block.0.weight", "2.block.0.bias", "2.block.1.weight", "2.block.1.bias", "2.block.1.running_mean",
        "2.block.1.running_var", "2.block.1.num_batches_tracked", "2.shortcut.0.weight",
        "5.weight", "5.bias",  # 3 is the Residual's ReLU, 4 the Flatten
    ]
    assert sd["1.num_batches_tracked"].dtype == np.int64 and sd["1.num_batches_tracked"].shape == ()
    assert sd["2.block.0.weight"].shape == (8, 4, 3, 3)


def test_state_dict_returns_copies():
    net = cnnx.models.lenet5(seed=0)
    sd = net.state_dict()
    sd["0.weight"][...] = 7.0
    assert not np.any(net.layers[0].params["weight"] == 7.0)


# ---------------------------------------------------------------------------- with torch ----
def _torch():
    return pytest.importorskip("torch")


def torch_lenet5(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).double()


def torch_resnet_stage(torch):
    """A hand-written torch twin of ``cnnx_resnet_stage`` (the documented Residual layout)."""
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + self.shortcut(x)

    block = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    shortcut = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), Residual(block, shortcut), nn.ReLU(),
                         nn.AvgPool2d(4), nn.Flatten(), nn.Linear(8, 5)).double()


def cnnx_resnet_stage():
    from cnnx.zoo_resnet import basic_block

    layers = [Conv2D(3, 3, 3, padding=1, activation=None)] + basic_block(3, 8, stride=2) + [
        cnnx.layers.AvgPool2D(4), Flatten(), Dense(8, 5)]
    return cnnx.Network(layers, (3, 8, 8), dtype="float64")


def _to_torch_state(sd, torch):
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def _from_torch(model, x, torch):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("build_cnnx, build_torch, shape", [
    (lambda: cnnx.models.lenet5(dtype="float64", seed=1), torch_lenet5, (1, 28, 28)),
    (lambda: cnnx.models.lenet5(dtype="float64", seed=1, fused=False), torch_lenet5, (1, 28, 28)),
    (lambda: randomized(cnnx_resnet_stage()), torch_resnet_stage, (3, 8, 8)),
], ids=["lenet5-fused", "lenet5-separate", "residual-batchnorm"])
def test_torch_sequential_loads_cnnx_weights_strictly(build_cnnx, build_torch, shape, rng):
    torch = _torch()
    net, model = build_cnnx(), build_torch(torch)
    result = model.load_state_dict(_to_torch_state(net.state_dict(), torch), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    x = rng.standard_normal((4,) + shape)
    np.testing.assert_allclose(_from_torch(model, x, torch), net.forward(x), **TOL)


@pytest.mark.parametrize("build_cnnx, build_torch, shape", [
    (lambda: cnnx.models.lenet5(dtype="float64", seed=1), torch_lenet5, (1, 28, 28)),
    (lambda: cnnx_resnet_stage(), torch_resnet_stage, (3, 8, 8)),
], ids=["lenet5", "residual-batchnorm"])
def test_cnnx_loads_a_torch_state_dict(build_cnnx, build_torch, shape, rng):
    torch = _torch()
    torch.manual_seed(0)
    model = build_torch(torch)
    # Train a few steps so the BatchNorm running statistics are not their initial values.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.from_numpy(rng.standard_normal((8,) + shape))).square().mean().backward()
        opt.step()
    model.eval()
    net = build_cnnx()
    assert net.load_state_dict(model.state_dict()) == ([], [])  # torch tensors accepted as they are
    x = rng.standard_normal((4,) + shape)
    np.testing.assert_allclose(net.forward(x), _from_torch(model, x, torch), **TOL)


@pytest.mark.parametrize("name", sorted(cnnx.models.MODELS))
def test_zoo_models_round_trip_through_torch(name, rng):
    torch = _torch()
    from cnnx.state_dict import to_torch

    net = randomized(cnnx.models.build(name, dtype="float64", seed=0), weights=False)
    model = to_torch(net)
    x = rng.standard_normal((3,) + net.input_shape)
    np.testing.assert_allclose(_from_torch(model, x, torch), net.forward(x), **TOL)
    # ... and back: a differently seeded cnnx network takes torch's weights and agrees again.
    other = cnnx.models.build(name, dtype="float64", seed=1)
    other.load_state_dict(model.state_dict())
    np.testing.assert_allclose(other.forward(x), net.forward(x), **TOL)


@pytest.mark.parametrize("build", [image_net, sequence_net], ids=["image-layers", "sequence-layers"])
def test_every_layer_matches_its_torch_equivalent(build, rng):
    torch = _torch()
    from cnnx.state_dict import to_torch

    net = build()
    model = to_torch(net)
    assert list(model.state_dict()) == list(net.state_dict())
    x = rng.standard_normal((3,) + net.input_shape)
    np.testing.assert_allclose(_from_torch(model, x, torch), net.forward(x), **TOL)


@pytest.mark.skipif(not has_new_layers(), reason="needs LayerNorm, global pools, Concat, grouped Conv2D")
def test_new_layers_match_their_torch_equivalents(rng):
    torch = _torch()
    from cnnx.state_dict import to_torch

    net = new_layers_net()
    keys = list(net.state_dict())
    assert "4.branches.0.0.weight" in keys and "4.branches.1.1.running_mean" in keys  # Concat's layout
    assert "2.weight" in keys and "7.bias" in keys  # LayerNorm: weight / bias like torch.nn.LayerNorm
    model = to_torch(net)
    assert list(model.state_dict()) == keys
    x = rng.standard_normal((3,) + net.input_shape)
    np.testing.assert_allclose(_from_torch(model, x, torch), net.forward(x), **TOL)
    other = new_layers_net()
    randomized(other, seed=1)
    other.load_state_dict(model.state_dict())
    np.testing.assert_allclose(other.forward(x), net.forward(x), **TOL)


def test_float32_network_takes_float64_torch_weights(rng):
    torch = _torch()
    model = torch_lenet5(torch)  # float64
    net = cnnx.models.lenet5(seed=5)  # float32
    net.load_state_dict(model.state_dict())
    assert net.layers[0].params["weight"].dtype == np.float32
    x = rng.standard_normal((2, 1, 28, 28))
    np.testing.assert_allclose(net.forward(x.astype(np.float32)), _from_torch(model, x, torch), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- errors ----
def _weights(net):
    return {k: v.copy() for k, v in net.get_weights().items()}


def test_missing_and_unexpected_keys_raise_and_change_nothing():
    net = cnnx.models.lenet5(seed=0)
    before = _weights(net)
    sd = cnnx.models.lenet5(seed=1).state_dict()
    del sd["11.bias"]
    sd["12.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing \['11.bias'\], unexpected \['12.weight'\]"):
        net.load_state_dict(sd)
    for key, value in _weights(net).items():
        np.testing.assert_array_equal(value, before[key])  # exact: nothing may have been written


def test_non_strict_loads_the_rest_and_reports():
    net = cnnx.models.lenet5(seed=0)
    sd = cnnx.models.lenet5(seed=1).state_dict()
    del sd["11.bias"]
    sd["extra"] = np.zeros(1)
    result = net.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["11.bias"] and result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(net.layers[0].params["weight"], sd["0.weight"])  # a plain copy


def test_a_wrong_shape_is_named_and_nothing_is_written():
    net = cnnx.models.lenet5(seed=0)
    before = _weights(net)
    sd = cnnx.models.lenet5(seed=1).state_dict()
    sd["9.weight"] = sd["9.weight"].T
    with pytest.raises(ValueError, match=r"9.weight of shape \(84, 120\), received: \(120, 84\)"):
        net.load_state_dict(sd)
    np.testing.assert_array_equal(net.layers[0].params["weight"], before["0.weight"])


def test_bad_values_are_refused():
    net = cnnx_resnet_stage()
    sd = net.state_dict()
    bad = dict(sd, **{"1.block.1.num_batches_tracked": np.array(1.5)})
    with pytest.raises(ValueError, match="num_batches_tracked to be an integer scalar"):
        net.load_state_dict(bad)
    bad = dict(sd, **{"0.weight": sd["0.weight"].astype(np.int64)})
    with pytest.raises(ValueError, match="0.weight to hold floating-point values"):
        net.load_state_dict(bad)
    with pytest.raises(TypeError, match="mapping"):
        net.load_state_dict([("0.weight", sd["0.weight"])])
    # num_batches_tracked may be left out (old PyTorch files do)
    net.load_state_dict({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})


def test_unknown_container_is_refused_by_name():
    class Pair(Layer):  # a container cnnx.state_dict was not told about
        def __init__(self):
            super().__init__()
            self.inner = Dense(4, 4)

        def named_parameters(self):
            for name, p, g in self.inner.named_parameters():
                yield f"inner.{name}", p, g

        def output_shape(self, input_shape):
            return input_shape

    try:
        net = cnnx.Network([Pair(), ReLU()], (4,))
        with pytest.raises(NotImplementedError, match="Pair.*CONTAINERS"):
            net.state_dict()
    finally:
        cnnx.layers.LAYER_CLASSES.pop("Pair", None)


def test_npz_file_round_trip(tmp_path):
    net = randomized(cnnx.models.resnet8(seed=0))
    np.savez(tmp_path / "w.npz", **net.state_dict())
    other = cnnx.models.resnet8(seed=1)
    with np.load(tmp_path / "w.npz") as data:
        other.load_state_dict(dict(data))
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[key], value)  # exact: a file copy
