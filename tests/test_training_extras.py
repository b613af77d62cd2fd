"""fit's training details against PyTorch: gradient clipping by global norm, class weights,
label smoothing; and the CSVLogger callback."""
import csv
import math

import numpy as np
import pytest

import cnnx
from cnnx.callbacks import CSVLogger
from cnnx.gradients import class_weight_table, clip_grad_norm_
from cnnx.layers import Dense, ReLU
from cnnx.losses import SoftmaxCrossEntropy
from cnnx.optimizers import SGD


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 100.0], ids=["clipped", "clipped-a-bit", "untouched"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_grad_norm_matches_torch(rng, max_norm, dtype):
    torch = pytest.importorskip("torch")
    shapes = [(4, 3), (4,), (2, 3, 2, 2)]
    grads = [rng.normal(size=s).astype(dtype) for s in shapes]
    params = [(f"{i}.w", np.zeros(s, dtype=dtype), g.copy()) for i, (s, g) in enumerate(zip(shapes, grads))]
    params.append(("skipped", np.zeros(2, dtype=dtype), None))
    tensors = [torch.zeros(s, dtype=getattr(torch, dtype), requires_grad=True) for s in shapes]
    for t, g in zip(tensors, grads):
        t.grad = torch.from_numpy(g.copy())
    expected_norm = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
    norm = clip_grad_norm_(params, max_norm)
    tol = 1e-6 if dtype == "float32" else 1e-13
    assert norm == pytest.approx(expected_norm, rel=tol)
    assert norm == pytest.approx(math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads)), rel=tol)
    for (_, _, g), t in zip(params, tensors):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=tol, atol=0)
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for _, _, g in params if g is not None))
    assert total <= max_norm * (1 + tol) or max_norm > expected_norm


def test_clip_grad_norm_refuses_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([], 0.0)
    net = cnnx.Network([Dense(2, 2)], input_shape=(2,)).compile("SoftmaxCrossEntropy", SGD(lr=0.1))
    with pytest.raises(ValueError, match="clip_grad_norm > 0"):
        net.fit(np.zeros((2, 2)), np.array([0, 1]), clip_grad_norm=-1, verbose=0)


def mlp(seed):
    gen = np.random.default_rng(seed)
    return cnnx.Network([Dense(5, 7, rng=gen), ReLU(), Dense(7, 4, rng=gen)], input_shape=(5,), dtype="float64")


def torch_step(torch, net, x, y, lr, class_weight=None, clip=None, label_smoothing=0.0):
    """The same network in torch, one SGD step on the whole batch; returns the new weights."""
    layers = [net.layers[0], net.layers[2]]
    lin = [torch.nn.Linear(5, 7).double(), torch.nn.Linear(7, 4).double()]
    with torch.no_grad():
        for t, layer in zip(lin, layers):
            t.weight.copy_(torch.from_numpy(layer.params["weight"]))
            t.bias.copy_(torch.from_numpy(layer.params["bias"]))
    model = torch.nn.Sequential(lin[0], torch.nn.ReLU(), lin[1])
    out = model(torch.from_numpy(x))
    target = torch.from_numpy(y)
    per_sample = torch.nn.functional.cross_entropy(out, target, reduction="none", label_smoothing=label_smoothing)
    if class_weight is not None:
        table = np.ones(4)
        for k, v in class_weight.items():
            table[k] = v
        per_sample = per_sample * torch.from_numpy(table)[target]  # Keras' class_weight
    per_sample.mean().backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return [t.detach().numpy() for layer in lin for t in (layer.weight, layer.bias)]


@pytest.mark.parametrize("options", [
    {"class_weight": {0: 3.0, 2: 0.25}},
    {"clip_grad_norm": 0.05},
    {"label_smoothing": 0.2},
    {"class_weight": {1: 2.0, 3: 0.5}, "clip_grad_norm": 0.1, "label_smoothing": 0.1},
], ids=["class-weight", "clip", "label-smoothing", "all"])
def test_one_fit_step_matches_torch(rng, options):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(12, 5))
    y = rng.integers(0, 4, 12)
    net = mlp(seed=3)
    expected = torch_step(torch, net, x, y, lr=0.3, class_weight=options.get("class_weight"),
                          clip=options.get("clip_grad_norm"), label_smoothing=options.get("label_smoothing", 0.0))
    net.compile(SoftmaxCrossEntropy(label_smoothing=options.get("label_smoothing", 0.0)), SGD(lr=0.3))
    net.fit(x, y, epochs=1, batch_size=12, shuffle=False, verbose=0,
            class_weight=options.get("class_weight"), clip_grad_norm=options.get("clip_grad_norm"))
    got = [net.layers[0].params["weight"], net.layers[0].params["bias"],
           net.layers[2].params["weight"], net.layers[2].params["bias"]]
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


def test_class_weight_changes_the_step_but_not_the_reported_loss(rng):
    x = rng.normal(size=(12, 5))
    y = rng.integers(0, 4, 12)
    plain, weighted = mlp(seed=1), mlp(seed=1)
    plain.compile("SoftmaxCrossEntropy", SGD(lr=0.3))
    weighted.compile("SoftmaxCrossEntropy", SGD(lr=0.3))
    plain.fit(x, y, batch_size=12, shuffle=False, verbose=0)
    weighted.fit(x, y, batch_size=12, shuffle=False, verbose=0, class_weight={0: 5.0})
    # same starting point, so the first (and only) epoch's loss is the same unweighted mean
    assert weighted.history["loss"] == pytest.approx(plain.history["loss"], rel=1e-12)
    assert not np.allclose(weighted.layers[2].params["weight"], plain.layers[2].params["weight"])


def test_class_weight_table():
    ids = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(class_weight_table("balanced", ids, 4, np.float64), [6 / 12, 6 / 4, 6 / 8, 1.0])
    np.testing.assert_array_equal(class_weight_table({1: 2.5}, ids, 3, np.float32), [1, 2.5, 1])
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        class_weight_table({3: 1.0}, ids, 3, np.float64)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        class_weight_table({0: -1.0}, ids, 3, np.float64)
    with pytest.raises(ValueError, match="'balanced'"):
        class_weight_table("auto", ids, 3, np.float64)


def test_class_weight_needs_class_targets():
    net = cnnx.Network([Dense(2, 3)], input_shape=(2,)).compile("MSE", SGD(lr=0.1))
    with pytest.raises(ValueError, match="class labels"):
        net.fit(np.zeros((2, 2)), np.full((2, 3), 0.3), class_weight={0: 2.0}, verbose=0)


# -------------------------------------------------------------------------------- CSVLogger --
def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_logger_rows_equal_history(tmp_path, rng):
    x = rng.normal(size=(20, 5))
    y = rng.integers(0, 4, 20)
    net = mlp(seed=2).compile("SoftmaxCrossEntropy", SGD(lr=0.1))
    path = tmp_path / "logs" / "train.csv"
    net.fit(x, y, epochs=3, batch_size=5, validation_data=(x[:6], y[:6]), verbose=0, callbacks=[CSVLogger(path)])
    rows = read_csv(path)
    assert list(rows[0]) == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        # written with repr: the floats round-trip exactly
        assert [float(r[key]) for r in rows] == net.history[key]
    # append=True continues the file and the numbering in a second fit
    net.fit(x, y, epochs=1, batch_size=5, validation_data=(x[:6], y[:6]), verbose=0,
            callbacks=[CSVLogger(path, append=True)])
    rows = read_csv(path)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["loss"]) == net.history["loss"][-1]
    # append=False starts afresh
    net.fit(x, y, epochs=1, batch_size=5, verbose=0, callbacks=[CSVLogger(path, separator=";")])
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == "epoch;accuracy;loss" and len(lines) == 2
    assert list(tmp_path.joinpath("logs").iterdir()) == [path]  # no temporary left behind


def test_csv_logger_bad_arguments():
    with pytest.raises(ValueError, match="separator"):
        CSVLogger("x.csv", separator="ab")
    with pytest.raises(TypeError, match="filename"):
        CSVLogger(3)


# ------------------------------------------------------------------------------ cnnx train --
def run_cli(argv):
    import contextlib
    import io

    from cnnx import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_train_with_schedule_augmentation_and_logs(tmp_path):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "run"
    code, stdout, stderr = run_cli([
        "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", "96", "--epochs", "2",
        "--batch-size", "32", "--threads", "1", "--no-progress", "--no-plots", "--out", str(out),
        "--lr-schedule", "cosine", "--augment", "crop,flip", "--tensorboard", str(tmp_path / "tb"),
        "--csv-log", str(tmp_path / "log.csv"), "--label-smoothing", "0.1", "--clip-grad-norm", "5",
        "--class-weight", "balanced",
    ])
    assert code == 0, stderr
    assert "lr schedule CosineAnnealingLR(T_max=2" in stdout
    assert "augmentation Compose([RandomCrop(padding=3), RandomHorizontalFlip(p=0.5)])" in stdout
    net = cnnx.load(out)
    schedule = net.optimizer.schedule
    assert type(schedule).__name__ == "CosineAnnealingLR" and schedule.last_epoch == 2 and schedule.T_max == 2
    assert net.optimizer.lr == pytest.approx(0.0, abs=1e-15)  # annealed to eta_min = 0 after T_max epochs
    assert net.history["lr"][0] == schedule.base_lr and len(net.history["lr"]) == 2
    assert net.loss.label_smoothing == 0.1
    assert [float(r["loss"]) for r in read_csv(tmp_path / "log.csv")] == net.history["loss"]
    assert any((tmp_path / "tb" / "train").iterdir())


@pytest.mark.parametrize("option, value, message", [
    ("--lr-schedule", "sine", "--lr-schedule 'sine'"),
    ("--lr-schedule", "step:gamma=0.5", "step_size"),
    ("--augment", "crop,rotate", "rotate"),
])
def test_cli_train_refuses_bad_options(tmp_path, option, value, message):
    code, _, stderr = run_cli(["train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", "8",
                               "--epochs", "1", "--no-plots", "--out", str(tmp_path / "r"), option, value])
    assert code != 0 and message in stderr


def test_cifar_augment_cosine_example_runs(tmp_path, capsys):
    """examples/cifar_augment_cosine.py end to end on a few CIFAR-format images."""
    import importlib.util
    import pickle
    from pathlib import Path

    r = np.random.default_rng(0)
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 8)]:
        batch = {b"data": r.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in r.integers(0, 10, n)]}
        (data / name).write_bytes(pickle.dumps(batch, protocol=4))
    path = Path(__file__).resolve().parents[1] / "examples" / "cifar_augment_cosine.py"
    spec = importlib.util.spec_from_file_location("example_cifar_augment_cosine", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "run"
    example.main(["--data", str(data), "--epochs", "3", "--warmup", "1", "--batch-size", "16",
                  "--cutout", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "SequentialLR(" in stdout and "Cutout(size=8" in stdout
    net = cnnx.load(out)
    # warm-up epoch at 0.1 * lr, then cosine over 2 epochs: 0.1, 0.05
    assert net.history["lr"] == pytest.approx([0.01, 0.1, 0.05])
    assert net.optimizer.schedule.last_epoch == 3
