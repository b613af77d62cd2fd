"""The TensorBoard callback: event files read back with tensorboard's EventAccumulator equal the
history, histograms and the filter image are there, and a real ``tensorboard`` server serves the
scalars over HTTP."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import cnnx
from cnnx.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from cnnx.optimizers import SGD
from cnnx.schedules import StepLR
from cnnx.tensorboard import TensorBoard, filter_grid

pytest.importorskip("tensorboardX")


def convnet(seed=0):
    gen = np.random.default_rng(seed)
    return cnnx.Network([Conv2D(1, 6, 3, padding=1, rng=gen), ReLU(), MaxPool2D(2), Flatten(),
                         Dense(6 * 4 * 4, 3, rng=gen)], input_shape=(1, 8, 8))


def data(n, seed):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    x = r.normal(size=(n, 1, 8, 8)).astype(np.float32)
    x[np.arange(n), 0, 2 * y, 2 * y] += 3.0  # a learnable class signal
    return x, y


def train(log_dir, epochs=3, **kwargs):
    x, y = data(40, seed=1)
    xv, yv = data(16, seed=2)
    opt = SGD(lr=0.1, momentum=0.9)
    StepLR(opt, step_size=1, gamma=0.5)
    net = convnet().compile("SoftmaxCrossEntropy", opt)
    net.fit(x, y, epochs=epochs, batch_size=10, validation_data=(xv, yv), seed=0, verbose=0,
            callbacks=[TensorBoard(log_dir, **kwargs)])
    return net


def accumulator(path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    ea.Reload()
    return ea


def as_float32(values):
    # Event files store scalars as 32-bit floats: history (float64) rounded to float32 is what
    # must come back, exactly (rounding to nearest is deterministic).
    return [float(np.float32(v)) for v in values]


def test_event_files_hold_the_history(tmp_path):
    net = train(tmp_path, update_freq=2)
    h = net.history
    tr = accumulator(tmp_path / "train")
    va = accumulator(tmp_path / "validation")
    assert [e.step for e in tr.Scalars("epoch_loss")] == [0, 1, 2]
    assert [e.value for e in tr.Scalars("epoch_loss")] == as_float32(h["loss"])
    assert [e.value for e in tr.Scalars("epoch_accuracy")] == as_float32(h["accuracy"])
    assert [e.value for e in va.Scalars("epoch_loss")] == as_float32(h["val_loss"])
    assert [e.value for e in va.Scalars("epoch_accuracy")] == as_float32(h["val_accuracy"])
    assert [e.value for e in tr.Scalars("epoch_learning_rate")] == as_float32([0.1, 0.05, 0.025])
    assert [e.value for e in tr.Scalars("epoch_learning_rate")] == as_float32(h["lr"])
    # 4 batches an epoch, written every 2 optimizer steps
    assert [e.step for e in tr.Scalars("batch_loss")] == [2, 4, 6, 8, 10, 12]
    assert [e.value for e in tr.Scalars("batch_learning_rate")] == as_float32([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    hist = tr.Histograms("0.weight")
    assert [e.step for e in hist] == [0, 1, 2]
    assert hist[-1].histogram_value.num == net.layers[0].params["weight"].size
    assert hist[-1].histogram_value.min == pytest.approx(float(net.layers[0].params["weight"].min()), rel=1e-6)
    images = tr.Images("filters/0.weight")
    assert len(images) == 3 and images[0].width > 0 and images[0].height > 0


def test_resumed_run_extends_the_curves(tmp_path):
    net = train(tmp_path / "tb", epochs=2, histogram_freq=0)
    net.save(tmp_path / "model")
    resumed = cnnx.load(tmp_path / "model")
    x, y = data(40, seed=1)
    resumed.fit(x, y, epochs=1, batch_size=10, verbose=0, callbacks=[TensorBoard(tmp_path / "tb", histogram_freq=0)])
    tr = accumulator(tmp_path / "tb" / "train")
    steps = sorted(e.step for e in tr.Scalars("epoch_loss"))
    assert steps == [0, 1, 2]
    assert tr.Scalars("epoch_learning_rate")[-1].value == pytest.approx(0.025)


def test_filter_grid_layout():
    w = np.zeros((5, 3, 2, 2))
    w[:, 0] = 1.0  # red channel only
    w[:, :, 0, 0] = -1.0
    grid = filter_grid(w, tile=4, gap=1)
    # 5 filters -> 3 columns x 2 rows of 4x4 tiles with 1 px gaps
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid.dtype == np.float32 and grid.min() >= 0 and grid.max() <= 1
    np.testing.assert_array_equal(grid[1:3, 1:3], 0.0)  # the -1 kernel pixel, scaled to 0
    np.testing.assert_array_equal(grid[3, 3], [1.0, 0.5, 0.5])  # red 1, green and blue 0 -> mid-range
    with pytest.raises(ValueError, match=r"\(out, in, kh, kw\)"):
        filter_grid(np.zeros((3, 3)))


def test_without_tensorboardx_fit_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now raises ImportError
    x, y = data(10, seed=1)
    net = convnet().compile("SoftmaxCrossEntropy", SGD(lr=0.1))
    with pytest.raises(ImportError, match=r"pip install 'cnnx\[tensorboard\]'"):
        net.fit(x, y, verbose=0, callbacks=[cnnx.callbacks.TensorBoard(tmp_path)])
    assert cnnx.callbacks.TensorBoard is TensorBoard


def test_bad_arguments():
    with pytest.raises(ValueError, match="update_freq"):
        TensorBoard("x", update_freq=0)
    with pytest.raises(ValueError, match="histogram_freq"):
        TensorBoard("x", histogram_freq=-1)
    with pytest.raises(TypeError, match="log_dir"):
        TensorBoard(3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.tensorboard_server
def test_tensorboard_server_serves_the_scalars(tmp_path):
    """Starts ``tensorboard --logdir`` on a free localhost port and reads the epoch losses back
    from its HTTP data API (the one the web page uses)."""
    pytest.importorskip("tensorboard")
    net = train(tmp_path, epochs=2, histogram_freq=0)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=train&tag=epoch_loss"
    try:
        deadline = time.monotonic() + 90
        rows = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    rows = json.loads(response.read())
                if len(rows) == 2:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        assert rows is not None, "tensorboard never answered"
        # each row: [wall_time, step, value]
        assert [r[1] for r in rows] == [0, 1]
        assert [r[2] for r in rows] == pytest.approx(net.history["loss"], rel=1e-6)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
