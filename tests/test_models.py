"""Model zoo: exact parameter counts of benchmarks/README.md, shapes, fused vs separate activations."""
import numpy as np
import pytest

from cnnx import models
from cnnx.layers import Conv2D, Dense, LeakyReLU, ReLU
from cnnx.losses import SoftmaxCrossEntropy
from cnnx.network import Network
from cnnx.optimizers import SGD, Adam

# name -> (parameters, input shape), from benchmarks/README.md
ZOO = {
    "lenet5": (61_706, (1, 28, 28)),
    "seed-mnist": (806_394, (1, 28, 28)),
    "seed-cifar": (544_122, (3, 32, 32)),
    "mind-cifar": (179_402, (3, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_parameter_counts_and_shapes(name, fused):
    params, input_shape = ZOO[name]
    net = models.build(name, fused=fused)
    assert isinstance(net, Network) and not net.compiled
    assert net.num_params == params
    assert net.input_shape == input_shape and net.output_shape == (10,)
    assert f"Total params: {params:,}" in net.summary(print_fn=None)


def test_builders_and_registry_agree():
    assert set(ZOO) <= set(models.MODELS) == set(models.DEFAULT_BATCH_SIZE)
    for name in models.MODELS:
        models.default_optimizer(name)
    assert models.build("resnet8", seed=0).num_params == 78_042
    assert models.MODELS["seed-mnist"] is models.seed_mnist
    assert models.build("Seed_MNIST").num_params == ZOO["seed-mnist"][0]
    with pytest.raises(ValueError, match="lenet5"):
        models.build("resnet50")
    with pytest.raises(TypeError):
        models.build(5)


def test_fused_activations_are_used_and_shown():
    net = models.seed_mnist()
    assert not any(isinstance(layer, (LeakyReLU, ReLU)) for layer in net.layers)
    convs = [layer for layer in net.layers if isinstance(layer, (Conv2D, Dense))]
    assert [c.activation for c in convs] == ["leaky_relu", "leaky_relu", "leaky_relu", None]
    assert all(c.negative_slope == 0.01 for c in convs[:3])
    assert net.summary(print_fn=None).count("+ leaky_relu(0.01)") == 3
    assert sum(isinstance(layer, LeakyReLU) for layer in models.seed_mnist(fused=False).layers) == 3
    assert sum(isinstance(layer, ReLU) for layer in models.lenet5(fused=False).layers) == 4


@pytest.mark.parametrize("name", sorted(ZOO))
def test_fused_and_separate_compute_the_same(name):
    """Same seed, same weights (activation layers draw none): outputs and gradients agree."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2,) + ZOO[name][1])
    y = np.array([3, 7])
    results = []
    for fused in (True, False):
        net = models.build(name, dtype="float64", seed=5, fused=fused)
        loss = SoftmaxCrossEntropy()
        out = net.forward(x, training=False).copy()
        loss.forward(out, y)
        net.backward(loss.backward())
        first = net.parameters()[0][2].copy()
        results.append((out, first))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-8, atol=1e-12)


def test_seed_fixes_the_initial_weights():
    a, b, c = models.lenet5(seed=1), models.lenet5(seed=1), models.lenet5(seed=2)
    for (ka, pa, _), (_, pb, _), (_, pc, _) in zip(a.parameters(), b.parameters(), c.parameters()):
        np.testing.assert_array_equal(pa, pb)
        if ka.endswith("weight"):
            assert not np.array_equal(pa, pc)


def test_dtype_argument():
    net = models.seed_cifar(dtype="float64")
    assert all(p.dtype == np.float64 for _, p, _ in net.parameters())


def test_default_optimizers():
    opt = models.default_optimizer("lenet5")
    assert isinstance(opt, SGD) and opt.lr == pytest.approx(0.05) and opt.momentum == pytest.approx(0.9)
    expected = {"seed-mnist": 1e-4, "seed-cifar": 5e-5, "mind-cifar": 1e-3}
    for name, lr in expected.items():
        opt = models.default_optimizer(name)
        assert isinstance(opt, Adam) and opt.lr == pytest.approx(lr)
    assert models.default_optimizer("seed-mnist") is not models.default_optimizer("seed-mnist")
    assert {k: models.DEFAULT_BATCH_SIZE[k] for k in ZOO} == {
        "lenet5": 128, "seed-mnist": 256, "seed-cifar": 64, "mind-cifar": 128
    }


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_training_step_reduces_the_loss_on_a_batch(name):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4,) + ZOO[name][1]).astype(np.float32)
    y = np.array([1, 4, 7, 9])
    net = models.build(name, seed=0).compile(SoftmaxCrossEntropy(), SGD(lr=0.01))
    before = net.evaluate(x, y)["loss"]
    net.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)
    assert net.evaluate(x, y)["loss"] < before
