"""The 32×32 zoo entries of issue 15 (vgg-small, mini-inception, convnext-mini): exact parameter
counts, shapes, the CLI summary, and smoke training on CIFAR-format batches and on Fashion-MNIST
padded to 32×32."""
import pickle

import numpy as np
import pytest

from cnnx import cli, datasets, models, preprocessing
from cnnx.layers import GELU, Concat, Conv2D, LayerNorm, ReLU, Residual
from cnnx.losses import SoftmaxCrossEntropy
from cnnx.network import Network

# name -> parameters with 3 input channels, with 1 input channel (10 classes). Worked out by hand
# in the README's table (e.g. convnext-mini: stem 416 + LN 64 + 2 x 10,016 + down 8,320 +
# 2 x 36,416 + down 33,024 + 2 x 138,368 + head LN 256 + Dense 1,290 = 412,970).
NEW_ZOO = {
    "vgg-small": (550_570, 549_994),
    "mini-inception": (59_742, 59_166),
    "convnext-mini": (412_970, 412_714),
}


@pytest.mark.parametrize("name", sorted(NEW_ZOO))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "separate"])
def test_parameter_counts_and_shapes(name, fused):
    rgb, grey = NEW_ZOO[name]
    net = models.build(name, fused=fused)
    assert isinstance(net, Network) and not net.compiled
    assert net.num_params == rgb
    assert net.input_shape == (3, 32, 32) and net.output_shape == (10,)
    assert f"Total params: {rgb:,}" in net.summary(print_fn=None)
    grey_net = models.build(name, in_channels=1, num_classes=7, fused=fused)
    assert grey_net.input_shape == (1, 32, 32) and grey_net.output_shape == (7,)
    # 7 classes instead of 10: three fewer rows of the last Dense layer.
    assert grey_net.num_params == grey - 3 * (net.layers[-1].in_features + 1)


def test_registry_defaults():
    for name in NEW_ZOO:
        assert models.DEFAULT_BATCH_SIZE[name] == 128
        models.default_optimizer(name)
    assert type(models.default_optimizer("convnext-mini")).__name__ == "AdamW"


def test_architectures_use_the_new_layers():
    inception = models.build("mini-inception")
    modules = [layer for layer in inception.layers if isinstance(layer, Concat)]
    assert len(modules) == 3 and all(len(m.branches) == 4 for m in modules)
    assert [s for s in inception.shapes if len(s) == 3][1:] == [(56, 32, 32), (56, 16, 16), (112, 16, 16),
                                                                 (112, 8, 8), (144, 8, 8)]
    convnext = models.build("convnext-mini")
    blocks = [layer for layer in convnext.layers if isinstance(layer, Residual)]
    assert len(blocks) == 6
    depthwise = blocks[0].block[0]
    assert isinstance(depthwise, Conv2D) and depthwise.groups == depthwise.in_channels == 32
    assert depthwise.kernel_size == (7, 7) and depthwise.params["weight"].shape == (32, 1, 7, 7)
    assert isinstance(blocks[0].block[1], LayerNorm) and blocks[0].block[1].axis == 1
    assert blocks[0].block[2].activation == "gelu"
    assert isinstance(convnext.layers[-2], LayerNorm) and convnext.layers[-2].axis == -1
    separate = models.build("convnext-mini", fused=False)
    assert any(isinstance(layer, GELU) for block in separate.layers if isinstance(block, Residual)
               for layer in block.block)
    vgg = models.build("vgg-small", fused=False)
    assert sum(isinstance(layer, ReLU) for layer in vgg.layers) == 7


@pytest.mark.parametrize("name", sorted(NEW_ZOO))
def test_fused_and_separate_compute_the_same(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 32, 32))
    results = []
    for fused in (True, False):
        net = models.build(name, dtype="float64", seed=5, fused=fused)
        loss = SoftmaxCrossEntropy()
        out = net.forward(x, training=False).copy()
        loss.forward(out, np.array([3, 7]))
        net.backward(loss.backward())
        results.append((out, net.parameters()[0][2].copy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name, total", [(n, f"{p[0]:,}") for n, p in sorted(NEW_ZOO.items())],
                         ids=sorted(NEW_ZOO))
def test_cnnx_summary_shows_them(name, total, capsys):
    assert cli.main(["summary", "--model", name]) == 0
    out = capsys.readouterr().out
    assert f"Total params: {total}" in out
    if name == "mini-inception":
        assert out.count("Concat") == 3
    if name == "convnext-mini":
        assert "LayerNorm" in out and out.count("Residual") == 6


# --- smoke training --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_format_data(tmp_path_factory):
    """Random images written as CIFAR-10 python batches and read back with ``load_cifar10``."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    directory.mkdir()
    for name, n in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (directory / name).write_bytes(pickle.dumps(batch, protocol=4))
    (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(directory)
    assert x_train.shape == (30, 3, 32, 32) and x_test.shape == (10, 3, 32, 32)
    return (preprocessing.scale(x_train), y_train), (preprocessing.scale(x_test), y_test)


@pytest.fixture(scope="module")
def fashion_mnist_32():
    """32 training and 10 test images of the shipped Fashion-MNIST sample, zero-padded to 32×32."""
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(sample=True)

    def pad(x):
        return np.pad(preprocessing.scale(x), ((0, 0), (2, 2), (2, 2)))[:, None]

    return (pad(x_train[:32]), y_train[:32]), (pad(x_test[:10]), y_test[:10])


def _smoke_train(name, data, in_channels):
    (x_train, y_train), (x_test, y_test) = data
    net = models.build(name, in_channels=in_channels, seed=0)
    net.compile(SoftmaxCrossEntropy(), models.default_optimizer(name))
    before = [p.copy() for _, p, _ in net.parameters()]
    history = net.fit(x_train, y_train, epochs=1, batch_size=16, validation_data=(x_test, y_test), seed=0,
                      verbose=0)
    assert len(history["loss"]) == 1 and np.isfinite(history["loss"][0]) and np.isfinite(history["val_loss"][0])
    assert all(not np.array_equal(b, p) for b, (_, p, _) in zip(before, net.parameters()))
    result = net.evaluate(x_test, y_test)
    assert np.isfinite(result["loss"]) and 0 <= result["accuracy"] <= 1
    probs = net.predict(x_test)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(NEW_ZOO))
def test_trains_on_cifar_format_batches(name, cifar_format_data):
    _smoke_train(name, cifar_format_data, 3)


@pytest.mark.parametrize("name", sorted(NEW_ZOO))
def test_trains_on_fashion_mnist_padded_to_32(name, fashion_mnist_32):
    _smoke_train(name, fashion_mnist_32, 1)


@pytest.mark.parametrize("name", sorted(NEW_ZOO))
def test_a_few_steps_reduce_the_loss_on_a_batch(name):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 3, 32, 32)).astype(np.float32)
    y = np.arange(8)
    net = models.build(name, seed=0).compile(SoftmaxCrossEntropy(), models.default_optimizer(name))
    before = net.evaluate(x, y)["loss"]
    net.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=0)
    assert net.evaluate(x, y)["loss"] < before


# --- the example script ------------------------------------------------------------------------------

def test_inception_convnext_example_runs(monkeypatch, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "inception_convnext.py"
    spec = importlib.util.spec_from_file_location("example_inception_convnext", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(sample=True)
    small = ((x_train[:24], y_train[:24]), (x_test[:8], y_test[:8]))
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda path=None, sample=False: small)
    example.main(["--epochs", "1", "--batch-size", "12"])
    out = capsys.readouterr().out
    assert "24 training, 8 test images of shape (1, 32, 32)" in out
    # The hand-written modules build the zoo's networks.
    assert "inception: 59,166 parameters (as cnnx.models.build('mini-inception'))" in out
    assert "convnext: 412,714 parameters (as cnnx.models.build('convnext-mini'))" in out
    assert out.rstrip().splitlines()[-3].split()[:3] == ["model", "params", "s/epoch"]
