"""Training-step parity with PyTorch: the seed-mnist network, same weights, same batches.

Forward outputs, every gradient and the weights after several Adam steps must agree with
torch.nn / torch.optim in float64 to 1e-9 — so a script translated from PyTorch trains the same.
Skipped when torch is not installed.
"""
import numpy as np
import pytest

import cnnx

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
nn = torch.nn


def torch_seed_mnist():
    leaky = lambda: nn.LeakyReLU(0.01)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(1, 16, 2, padding="same"), leaky(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 2, padding="same"), leaky(), nn.Flatten(),
        nn.Linear(6272, 128), leaky(), nn.Linear(128, 10),
    ).double()


def copy_weights(net, model):
    """cnnx parameters into the torch model (the shapes are PyTorch's, so no transposes)."""
    ours = [p for _, p, _ in net.parameters()]
    theirs = list(model.parameters())
    assert [p.shape for p in ours] == [tuple(t.shape) for t in theirs]
    with torch.no_grad():
        for p, t in zip(ours, theirs):
            t.copy_(torch.from_numpy(p))


@pytest.mark.parametrize("fused", [True, False], ids=["fused-activations", "activation-layers"])
def test_seed_mnist_matches_pytorch_for_several_adam_steps(fused, rng):
    net = cnnx.models.seed_mnist(dtype="float64", seed=3, fused=fused)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam(lr=1e-3, weight_decay=1e-4))
    model = torch_seed_mnist()
    copy_weights(net, model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    for step in range(3):
        x = rng.standard_normal((8, 1, 28, 28))
        y = rng.integers(0, 10, 8)
        out = net.forward(x, training=True)
        value = net.loss.forward(out, y)
        net.backward(net.loss.backward())

        opt.zero_grad()
        t_out = model(torch.from_numpy(x))
        t_loss = loss_fn(t_out, torch.from_numpy(y))
        t_loss.backward()

        np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=f"step {step}")
        assert abs(value - t_loss.item()) < 1e-9
        for (key, _, grad), t in zip(net.parameters(), model.parameters()):
            np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{key} step {step}")

        net.optimizer.step(net.parameters())
        opt.step()
        for (key, p, _), t in zip(net.parameters(), model.parameters()):
            np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=f"{key} step {step}")


def test_input_gradient_matches_pytorch(rng):
    """The saliency path (gradient with respect to the input) agrees with autograd."""
    net = cnnx.models.lenet5(dtype="float64", seed=1)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    ).double()
    copy_weights(net, model)
    x = rng.standard_normal((4, 1, 28, 28))
    dout = rng.standard_normal((4, 10))
    net.forward(x)
    dx = net.backward(dout, need_input_grad=True)
    tx = torch.from_numpy(x).requires_grad_(True)
    model(tx).backward(torch.from_numpy(dout))
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
