"""cnnx.profiler: one row per layer, consistent totals, FLOP counts, and a network left untouched.

No assertion here depends on how fast anything runs (timing belongs in benchmarks/).
"""
import numpy as np
import pytest

from cnnx.layers import Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D
from cnnx.losses import SoftmaxCrossEntropy
from cnnx.models import build
from cnnx.network import Network
from cnnx.optimizers import SGD, Adam
from cnnx.profiler import forward_flops, layer_flops, profile


def tiny_net(dropout=True):
    layers = [Conv2D(1, 4, 3, padding="same", activation="relu", rng=0), MaxPool2D(2),
              Conv2D(4, 6, 2, padding="same", rng=1), LeakyReLU(0.01)]
    layers += [Dropout(0.25)] if dropout else []
    layers += [Flatten(), Dense(6 * 4 * 4, 10, rng=2)]
    net = Network(layers, input_shape=(1, 8, 8))
    net.compile(SoftmaxCrossEntropy(), Adam(lr=1e-2))
    return net


@pytest.fixture
def batch(rng):
    return rng.standard_normal((5, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, size=5)


def test_one_row_per_plan_step_naming_the_layers_it_covers(batch):
    net = tiny_net()
    result = profile(net, *batch, steps=3, warmup=1)
    # Training: the max-pool runs inside the first convolution's kernels and the separate
    # LeakyReLU inside the second's.
    assert [r["layers"] for r in result.rows] == [(0, 1), (2, 3), (4,), (5,), (6,)]
    assert [r["layers"] for r in result.rows] == [s.indices for s in net.plan.train_steps]
    assert [r["index"] for r in result.rows] == list(range(5))
    assert result.rows[0]["kind"] == "conv+pool"
    assert result.rows[1]["layer"] == "Conv2D + LeakyReLU" and result.rows[1]["kind"] == "conv+act"
    assert [r["output_shape"] for r in result.rows] == [(5,) + net.shapes[r["layers"][-1]] for r in result.rows]
    for r in result.rows:
        assert r["forward_ms"] >= 0 and r["backward_ms"] >= 0 and r["percent"] >= 0
        assert r["total_ms"] == pytest.approx(r["forward_ms"] + r["backward_ms"])
    assert result.rows[0]["forward_ms"] > 0 and result.rows[0]["backward_ms"] > 0
    assert isinstance(result.text, str) and str(result) == result.text
    assert "Conv2D + relu" in result.text and "optimizer step" in result.text
    assert "2-3" in result.text  # the covered layers' range

    # Inference runs what predict runs: conv + max-pool fused as well.
    result = profile(net, batch[0], steps=2, warmup=1, training=False)
    assert [r["layers"] for r in result.rows] == [(0, 1), (2, 3), (4,), (5,), (6,)]
    assert result.rows[0]["kind"] == "conv+pool" and "0-1" in result.text


def test_unfused_network_gives_one_row_per_layer_and_the_same_flops(batch):
    fused, plain = tiny_net(), tiny_net()
    plain.fuse = False
    a = profile(fused, *batch, steps=1, warmup=0)
    b = profile(plain, *batch, steps=1, warmup=0)
    assert [r["layers"] for r in b.rows] == [(i,) for i in range(len(plain.layers))]
    assert sum(r["mflop"] for r in a.rows) == pytest.approx(sum(r["mflop"] for r in b.rows))


def test_totals_are_consistent(batch):
    result = profile(tiny_net(), *batch, steps=3, warmup=1)
    t = result.totals
    assert t["forward_ms"] == pytest.approx(sum(r["forward_ms"] for r in result.rows))
    assert t["backward_ms"] == pytest.approx(sum(r["backward_ms"] for r in result.rows))
    parts = t["forward_ms"] + t["backward_ms"] + t["loss_ms"] + t["optimizer_ms"] + t["overhead_ms"]
    assert parts == pytest.approx(t["step_ms"], rel=1e-6, abs=1e-6)
    assert min(t["loss_ms"], t["optimizer_ms"], t["overhead_ms"]) >= 0
    shares = sum(r["percent"] for r in result.rows) + t["loss_percent"] + t["optimizer_percent"] + t["overhead_percent"]
    assert shares == pytest.approx(100.0)
    assert t["batch"] == 5 and t["steps"] == 3 and t["training"] is True
    assert t["images_per_s"] == pytest.approx(5e3 / t["step_ms"])
    assert t["cores_used"] > 0 and "cores used" in result.text


def test_network_methods_weights_and_optimizer_are_restored(batch):
    net = tiny_net()
    x, y = batch
    net.fit(x, y, epochs=1, batch_size=5, verbose=0)  # the optimizer now has state to protect
    weights = net.get_weights()
    grads = {key: g.copy() for key, _, g in net.parameters()}
    opt_state = {k: np.copy(v) for k, v in net.optimizer.state_dict().items()}
    before = [dict(layer.__dict__) for layer in net.layers]
    methods = [(type(layer).forward, type(layer).backward) for layer in net.layers]

    profile(net, x, y, steps=2, warmup=1)

    for layer, attrs, (f, b) in zip(net.layers, before, methods):
        assert "forward" not in layer.__dict__ and "backward" not in layer.__dict__
        assert layer.forward.__func__ is f and layer.backward.__func__ is b
        assert set(layer.__dict__) == set(attrs)
    after = net.get_weights()
    assert after.keys() == weights.keys()
    for key in weights:
        np.testing.assert_array_equal(after[key], weights[key])
    for key, _, g in net.parameters():
        np.testing.assert_array_equal(g, grads[key])
    state = net.optimizer.state_dict()
    assert state.keys() == opt_state.keys()
    for key in state:
        np.testing.assert_array_equal(state[key], opt_state[key])


def test_training_after_profiling_matches_an_unprofiled_twin(batch):
    """The restored methods are the real ones and the weights are the originals: a later fit
    gives exactly what the same fit gives on a network that was never profiled."""
    x, y = batch
    a, b = tiny_net(dropout=False), tiny_net(dropout=False)
    profile(b, x, y, steps=2, warmup=1)
    a.fit(x, y, epochs=2, batch_size=5, shuffle=False, verbose=0)
    b.fit(x, y, epochs=2, batch_size=5, shuffle=False, verbose=0)
    wa, wb = a.get_weights(), b.get_weights()
    assert wa.keys() == wb.keys()
    for key in wa:
        np.testing.assert_array_equal(wa[key], wb[key])
    assert a.history["loss"] == b.history["loss"]


def test_methods_are_restored_when_a_step_fails(batch):
    net = tiny_net()
    x, _ = batch
    bad = np.full(5, 99)  # class ids out of range: the loss raises inside the timed loop
    with pytest.raises(ValueError):
        profile(net, x, bad, steps=1, warmup=0, loss=SoftmaxCrossEntropy())
    assert all("forward" not in layer.__dict__ and "backward" not in layer.__dict__ for layer in net.layers)


def test_uncompiled_network_and_inference_mode(batch):
    x, y = batch
    net = Network([Flatten(), Dense(64, 10, rng=0)], input_shape=(1, 8, 8))
    result = profile(net, x, y, steps=2, warmup=0, optimizer=SGD(lr=0.1))
    assert len(result.rows) == 2 and result.totals["optimizer_ms"] >= 0
    result = profile(net, x, steps=2, warmup=0, training=False)
    assert result.totals["training"] is False
    assert result.totals["backward_ms"] == 0 and all(r["backward_ms"] == 0 for r in result.rows)
    assert "bwd ms" not in result.text
    with pytest.raises(ValueError, match="targets"):
        profile(net, x, None)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_rejects_bad_steps(batch, bad):
    with pytest.raises(ValueError, match="steps"):
        profile(tiny_net(), *batch, steps=bad)


@pytest.mark.parametrize(
    "name, mflop",
    [("seed-mnist", 2.51), ("seed-cifar", 6.05), ("lenet5", 0.83), ("mind-cifar", 85.7)],
    ids=["seed-mnist", "seed-cifar", "lenet5", "mind-cifar"],
)
def test_forward_flops_match_benchmarks_md(name, mflop):
    assert forward_flops(build(name, seed=0)) / 1e6 == pytest.approx(mflop, abs=0.006)


def test_layer_flops_by_hand():
    conv = Conv2D(3, 8, (3, 2), padding=0, rng=0)
    assert layer_flops(conv, (3, 10, 9), conv.output_shape((3, 10, 9))) == 2 * 8 * 8 * 8 * 3 * 3 * 2
    assert layer_flops(Dense(20, 7, rng=0), (20,), (7,)) == 2 * 20 * 7
    assert layer_flops(MaxPool2D(2), (3, 4, 4), (3, 2, 2)) == 0
