"""BatchNorm1D / BatchNorm2D: both modes' gradients, running statistics, PyTorch parity, configs."""
import json

import numpy as np
import pytest

from cnnx.layers import LAYER_CLASSES, BatchNorm1D, BatchNorm2D

from gradcheck import check_layer_gradients

SHAPES = [(BatchNorm2D, (3, 3, 4, 5)), (BatchNorm1D, (5, 3)), (BatchNorm1D, (2, 3, 7))]
SHAPE_IDS = ["2d", "1d-rows", "1d-seq"]


def _with_params(layer, rng):
    """Non-trivial gamma/beta and running statistics, so every term of every formula is exercised."""
    layer.astype(np.float64)
    c = layer.num_features
    if layer.affine:
        layer.params["weight"][...] = rng.uniform(0.5, 2.0, c)
        layer.params["bias"][...] = rng.standard_normal(c)
    layer.buffers["running_mean"][...] = rng.standard_normal(c)
    layer.buffers["running_var"][...] = rng.uniform(0.5, 2.0, c)
    return layer


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_gradients(rng, cls, shape, training, affine):
    layer = _with_params(cls(shape[1], affine=affine), rng)
    x = rng.standard_normal(shape) * 2 + 0.5
    check_layer_gradients(layer, x, training=training)


def test_skips_dx_when_not_needed_but_fills_grads(rng):
    layer = _with_params(BatchNorm2D(3), rng)
    layer.needs_input_grad = False
    y = layer.forward(rng.standard_normal((2, 3, 4, 4)), training=True)
    assert layer.backward(rng.standard_normal(y.shape)) is None
    assert np.abs(layer.grads["weight"]).sum() > 0


# --- semantics ------------------------------------------------------------------------------------

def test_training_output_is_normalised_per_channel(rng):
    layer = BatchNorm2D(4)
    x = (rng.standard_normal((8, 4, 5, 5)) * 3 + 2).astype(np.float32)
    y = layer.forward(x, training=True)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-3)


def test_running_statistics_update(rng):
    layer = BatchNorm1D(3, momentum=0.25).astype(np.float64)
    x = rng.standard_normal((6, 3, 4)) * 2 + 1
    layer.forward(x, training=True)
    m = 6 * 4
    mean = x.mean(axis=(0, 2))
    unbiased = x.var(axis=(0, 2)) * m / (m - 1)
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.25 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.75 + 0.25 * unbiased, rtol=1e-12)
    # Evaluation neither uses nor changes the batch statistics.
    before = {k: v.copy() for k, v in layer.buffers.items()}
    y = layer.forward(x, training=False)
    for k, v in layer.buffers.items():
        np.testing.assert_array_equal(v, before[k])
    expected = (x - before["running_mean"][:, None]) / np.sqrt(before["running_var"][:, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_running_statistics_are_updated_in_place(rng):
    # Network.set_weights, optimizers and save/load hold references to these arrays.
    layer = BatchNorm2D(2)
    refs = dict(layer.named_buffers())
    layer.forward(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), training=True)
    for name, array in layer.named_buffers():
        assert array is refs[name]
    assert not np.all(refs["running_mean"] == 0)


def test_named_buffers_and_astype(rng):
    layer = BatchNorm2D(3)
    assert [n for n, _ in layer.named_buffers()] == ["running_mean", "running_var"]
    assert [n for n, _, _ in layer.named_parameters()] == ["weight", "bias"]
    np.testing.assert_array_equal(layer.params["weight"], 1)
    np.testing.assert_array_equal(layer.params["bias"], 0)
    layer.astype(np.float64)
    assert all(b.dtype == np.float64 for _, b in layer.named_buffers())
    y = layer.forward(rng.standard_normal((2, 3, 2, 2)).astype(np.float32), training=True)
    assert y.dtype == np.float64
    assert BatchNorm2D(3, affine=False).num_params == 0


@pytest.mark.parametrize(
    "layer",
    [BatchNorm2D(4), BatchNorm1D(7, eps=1e-3, momentum=0.01, affine=False)],
    ids=["2d", "1d"],
)
def test_get_config_roundtrip(layer):
    config = json.loads(json.dumps(layer.get_config()))
    rebuilt = LAYER_CLASSES[type(layer).__name__].from_config(config)
    assert rebuilt.get_config() == layer.get_config()
    assert repr(rebuilt) == repr(layer)


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: BatchNorm2D(0), ValueError),
        (lambda: BatchNorm2D(2.0), TypeError),
        (lambda: BatchNorm2D(2, eps=0), ValueError),
        (lambda: BatchNorm2D(2, momentum=1.5), ValueError),
        (lambda: BatchNorm2D(2, momentum=None), ValueError),
        (lambda: BatchNorm2D(2, affine="yes"), TypeError),
    ],
    ids=["zero-features", "float-features", "eps", "momentum", "momentum-none", "affine"],
)
def test_constructor_errors(make, error):
    with pytest.raises(error, match="Expected"):
        make()


def test_rejects_bad_input(rng):
    with pytest.raises(ValueError, match=r"expected input of shape \(3, h, w\)"):
        BatchNorm2D(3).forward(np.zeros((2, 4, 5, 5)))
    with pytest.raises(ValueError, match=r"expected input of shape \(3,\) or \(3, length\)"):
        BatchNorm1D(3).forward(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"\(3, h, w\) per sample, received: \(3, 5\)"):
        BatchNorm2D(3).output_shape((3, 5))
    with pytest.raises(TypeError, match="floating"):
        BatchNorm1D(3).forward(np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm1D(3).forward(np.zeros((1, 3)), training=True)
    layer = BatchNorm1D(3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((2, 3)))
    layer.forward(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected dy of shape \(2, 3\)"):
        layer.backward(np.zeros((3, 3)))


# --- PyTorch parity -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls, shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_matches_torch_train_then_eval(rng, cls, shape, affine):
    torch = pytest.importorskip("torch")
    c = shape[1]
    layer = cls(c, momentum=0.3, affine=affine).astype(np.float64)
    tcls = torch.nn.BatchNorm2d if cls is BatchNorm2D else torch.nn.BatchNorm1d
    tl = tcls(c, momentum=0.3, affine=affine, dtype=torch.float64)
    if affine:
        gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
        layer.params["weight"][...] = gamma
        layer.params["bias"][...] = beta
        with torch.no_grad():
            tl.weight.copy_(torch.from_numpy(gamma))
            tl.bias.copy_(torch.from_numpy(beta))
    # Two training steps (the running statistics compound), then one evaluation step.
    for training in (True, True, False):
        tl.train(training)
        x = rng.standard_normal(shape) * 1.5 + 0.7
        xt = torch.tensor(x, requires_grad=True)
        yt = tl(xt)
        y = layer.forward(x, training=training)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(layer.buffers["running_mean"], tl.running_mean.numpy(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(layer.buffers["running_var"], tl.running_var.numpy(), rtol=0, atol=1e-10)
        g = rng.standard_normal(shape)
        yt.backward(torch.from_numpy(g))
        np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=0, atol=1e-10)
        if affine:
            np.testing.assert_allclose(layer.grads["weight"], tl.weight.grad.numpy(), rtol=0, atol=1e-10)
            np.testing.assert_allclose(layer.grads["bias"], tl.bias.grad.numpy(), rtol=0, atol=1e-10)
            tl.zero_grad()
