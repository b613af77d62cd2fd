"""The ``cnnx`` command, run in-process through ``cnnx.cli.main`` on a few hundred images of the
embedded Fashion-MNIST sample (one epoch, one thread: seconds, not minutes)."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cnnx
from cnnx import cli, datasets, parallel, preprocessing

N_TRAIN = 300
N_TEST = 200


def _run(argv):
    """main(argv) with stdout/stderr captured; for module-scoped fixtures, where capsys is not available."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches gain nothing from threads; ``--threads`` is process-wide, so restore it after."""
    threads = parallel.get_num_threads()
    parallel.set_num_threads(1)
    yield
    parallel.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """A model trained by ``cnnx train`` (lenet5, 300 images, 1 epoch)."""
    out = tmp_path_factory.mktemp("cli") / "lenet5"
    code, stdout, stderr = _run([
        "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample",
        "--limit", str(N_TRAIN), "--epochs", "1", "--seed", "3", "--threads", "1",
        "--out", str(out),
    ])
    assert code == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def test_images():
    _, (x_test, y_test) = datasets.load_fashion_mnist(sample=True)
    return x_test[:N_TEST], y_test[:N_TEST]


def _reference_preprocess(x_uint8, run):
    """What evaluate/predict must do: /255, channel axis, standardise with the saved statistics."""
    meta = json.loads((run / cli.PREPROCESSING_FILE).read_text())
    x = preprocessing.add_channel_axis(preprocessing.scale(x_uint8))
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


def _value(stdout, label):
    lines = [line for line in stdout.splitlines() if line.startswith(label)]
    assert len(lines) == 1, stdout
    return float(lines[0].split(":", 1)[1])


def _assert_one_line_error(code, err, prefix="cnnx"):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix) and "error:" in lines[0], err


# ------------------------------------------------------------------------------- train -------
def test_train_writes_a_loadable_model_preprocessing_and_history(run_dir):
    out, stdout = run_dir
    net = cnnx.load(out)
    assert net.num_params == 61_706
    assert len(net.history["loss"]) == 1

    # 10% of the 300 images are held out, stratified, for validation.
    assert f"{N_TRAIN - 30} train / 30 validation / 1000 test images" in stdout
    assert stdout.count("epoch 1/1") == 1
    accuracy = _value(stdout, "test accuracy:")
    assert 0.0 <= accuracy <= 1.0

    meta = json.loads((out / cli.PREPROCESSING_FILE).read_text())
    assert meta["dataset"] == "fashion-mnist-sample"
    assert meta["class_names"] == list(datasets.FASHION_MNIST_CLASSES)
    assert meta["input_shape"] == [1, 28, 28]
    # Standardisation fitted on the training part: a mean near Fashion-MNIST's 0.29, std 0.35.
    assert len(meta["mean"]) == 1 and 0.2 < meta["mean"][0] < 0.4
    assert 0.25 < meta["std"][0] < 0.45

    history = json.loads((out / cli.HISTORY_FILE).read_text())
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 1 for v in history.values())
    record = json.loads((out / cli.RUN_FILE).read_text())
    assert record["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)


def test_train_writes_one_history_file(run_dir):
    """Defect: cnnx train wrote both history.json and train_history.json."""
    out, _ = run_dir
    histories = sorted(p.name for p in out.iterdir() if "history" in p.name)
    assert histories == ["history.json"]
    assert json.loads((out / "history.json").read_text())["loss"] == cnnx.load(out).history["loss"]
    assert "history" not in json.loads((out / cli.RUN_FILE).read_text())


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "log-file"])
def test_each_epoch_is_reported_once_bar_or_line(terminal, tmp_path, monkeypatch):
    """Defect: on a terminal each epoch showed the tqdm bar and then a plain line with the same
    figures. Now a terminal gets the bar (left on screen with the final figures), anything else
    one plain line."""
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: terminal)
    code, stdout, stderr = _run([
        "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", "40",
        "--epochs", "2", "--out", str(tmp_path / "run"), "--no-plots",
    ])
    assert code == 0, stderr
    plain_lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    bar_epochs = {f"Epoch {e}/2" for e in (1, 2) if f"Epoch {e}/2" in stderr}
    if terminal:
        assert plain_lines == []
        assert bar_epochs == {"Epoch 1/2", "Epoch 2/2"} and "val_loss=" in stderr
    else:
        assert [line.split("  ")[0] for line in plain_lines] == ["epoch 1/2", "epoch 2/2"]
        assert bar_epochs == set()


def test_no_progress_gives_plain_lines_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: True)
    code, stdout, stderr = _run([
        "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", "40",
        "--epochs", "1", "--out", str(tmp_path / "run"), "--no-plots", "--no-progress",
    ])
    assert code == 0, stderr
    assert stdout.count("epoch 1/1  loss") == 1 and "Epoch 1/1" not in stderr


def test_train_draws_curves_and_confusion_matrix(run_dir):
    pytest.importorskip("matplotlib")
    out, _ = run_dir
    for name in (cli.CURVES_FILE, cli.CONFUSION_FILE):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_is_reproducible_with_a_seed(tmp_path, run_dir):
    out, stdout = run_dir
    code, again, err = _run([
        "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", str(N_TRAIN),
        "--epochs", "1", "--seed", "3", "--out", str(tmp_path / "again"), "--no-plots",
    ])
    assert code == 0, err
    assert _value(again, "test loss:") == _value(stdout, "test loss:")


def test_train_lr_and_optimizer_options(tmp_path):
    code, stdout, err = _run([
        "train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--limit", "40",
        "--epochs", "1", "--optimizer", "adam", "--lr", "0.002", "--batch-size", "16",
        "--val-fraction", "0", "--out", str(tmp_path / "adam"), "--no-plots",
    ])
    assert code == 0, err
    assert "Adam(lr=0.002" in stdout and "batch size 16" in stdout
    assert "40 train / 0 validation" in stdout
    assert type(cnnx.load(tmp_path / "adam").optimizer).__name__ == "Adam"


def _write_idx(path, array):
    """An IDX file: zero bytes, type code 0x08 (uint8), ndim, big-endian dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_train_on_a_directory_of_idx_files(tmp_path, capsys):
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(sample=True)
    data = tmp_path / "my-fashion"
    data.mkdir()
    _write_idx(data / "train-images-idx3-ubyte", x_train[:60])
    _write_idx(data / "train-labels-idx1-ubyte", y_train[:60])
    _write_idx(data / "t10k-images-idx3-ubyte", x_test[:30])
    _write_idx(data / "t10k-labels-idx1-ubyte", y_test[:30])
    code = cli.main(["train", "--model", "lenet5", "--dataset", str(data), "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--no-plots"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "54 train / 6 validation / 30 test images" in captured.out
    meta = json.loads((tmp_path / "run" / cli.PREPROCESSING_FILE).read_text())
    assert meta["dataset"] == str(data.resolve())
    assert meta["class_names"] == list(datasets.FASHION_MNIST_CLASSES)  # "fashion" in the name

    # evaluate finds the recorded directory again
    assert cli.main(["evaluate", str(tmp_path / "run")]) == 0
    assert "30 test images" in capsys.readouterr().out


def test_train_on_a_directory_of_cifar_batches(tmp_path, capsys):
    import pickle

    rng = np.random.default_rng(0)
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    for name, n in [(f"data_batch_{i}", 12) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (data / name).write_bytes(pickle.dumps(batch, protocol=4))
    code = cli.main(["train", "--model", "seed-cifar", "--dataset", str(tmp_path), "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--no-plots"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "54 train / 6 validation / 10 test images" in captured.out
    meta = json.loads((tmp_path / "run" / cli.PREPROCESSING_FILE).read_text())
    assert len(meta["mean"]) == 3  # per colour channel
    assert meta["class_names"] == list(datasets.CIFAR10_CLASSES)


# ------------------------------------------------------------------ evaluate / predict -------
def test_evaluate_matches_the_network_on_the_saved_preprocessing(run_dir, test_images, capsys, monkeypatch):
    out, _ = run_dir
    calls = []
    monkeypatch.setattr(parallel, "set_num_threads", lambda n, **kw: calls.append(n))
    assert cli.main(["evaluate", str(out), "--limit", str(N_TEST), "--threads", "1"]) == 0
    stdout = capsys.readouterr().out
    assert calls == [1]

    x, y = test_images
    expected = cnnx.load(out).evaluate(_reference_preprocess(x, out), y)
    assert _value(stdout, "test accuracy:") == pytest.approx(expected["accuracy"], abs=1e-4)
    assert _value(stdout, "test loss:") == pytest.approx(expected["loss"], abs=1e-4)


def test_predict_prints_class_names_and_writes_ids(run_dir, test_images, tmp_path, capsys):
    out, _ = run_dir
    x, _ = test_images
    x = x[:7]
    np.save(tmp_path / "grey.npy", x)                                 # uint8 (n, 28, 28)
    np.save(tmp_path / "nchw.npy", (x / 255.0)[:, None])              # float (n, 1, 28, 28)
    expected = cnnx.load(out).predict_classes(_reference_preprocess(x, out))

    assert cli.main(["predict", str(out), str(tmp_path / "grey.npy")]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names == [datasets.FASHION_MNIST_CLASSES[k] for k in expected]

    assert cli.main(["predict", str(out), str(tmp_path / "nchw.npy"), "--out", str(tmp_path / "ids.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "ids.npy"), expected)


def test_explain_writes_pngs(run_dir, test_images, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, _ = run_dir
    np.save(tmp_path / "x.npy", test_images[0][:3])
    code = cli.main(["explain", str(out), "--input", str(tmp_path / "x.npy"), "--index", "1",
                     "--out", str(tmp_path / "why")])
    assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "why").iterdir())
    assert {"occlusion.png", "saliency.png"} <= set(written)
    assert any(name.startswith("feature_maps") for name in written)


# ------------------------------------------------------------------------------- summary -----
@pytest.mark.parametrize("model, total", [
    ("lenet5", "61,706"), ("seed-mnist", "806,394"), ("seed-cifar", "544,122"), ("mind-cifar", "179,402"),
], ids=["lenet5", "seed-mnist", "seed-cifar", "mind-cifar"])
def test_summary_prints_the_zoo_totals(model, total, capsys):
    assert cli.main(["summary", "--model", model]) == 0
    assert f"Total params: {total}" in capsys.readouterr().out


def test_summary_of_a_saved_model(run_dir, capsys):
    assert cli.main(["summary", str(run_dir[0])]) == 0
    assert "Total params: 61,706" in capsys.readouterr().out


# ------------------------------------------------------------------------------- errors ------
@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["train"],
    ["train", "--model", "no-such-model"],
    ["train", "--model", "lenet5", "--epochs", "0"],
    ["train", "--model", "lenet5", "--val-fraction", "1.5"],
    ["train", "--model", "lenet5", "--lr", "-1"],
    ["summary", "--model", "lenet5", "--bogus"],
    ["--bogus"],
    ["predict", "run", "x.npy", "--float-range", "100"],
], ids=["nothing", "unknown-command", "no-model", "unknown-model", "zero-epochs", "bad-fraction",
        "negative-lr", "unknown-option", "unknown-global-option", "bad-float-range"])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    code = cli.main(argv)
    _assert_one_line_error(code, capsys.readouterr().err)
    assert code == 2


def test_missing_model_dir(tmp_path, capsys):
    code = cli.main(["evaluate", str(tmp_path / "nothing-here")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "does not exist" in err


def test_corrupt_model_dir_is_a_one_line_error(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir[0], broken)
    layer_file = sorted((broken / "layers").iterdir())[0]
    layer_file.write_bytes(layer_file.read_bytes()[:40])  # truncated, as by a full disk
    _assert_one_line_error(cli.main(["evaluate", str(broken)]), capsys.readouterr().err, "cnnx: error:")


def test_missing_dataset_files(tmp_path, capsys):
    # A directory that looks like MNIST but lacks three of the four files.
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"")
    code = cli.main(["train", "--model", "lenet5", "--dataset", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "train-images-idx3-ubyte" in err


def test_missing_cifar10(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNX_DATA", str(tmp_path))
    code = cli.main(["train", "--model", "seed-cifar", "--dataset", "cifar10", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "CIFAR-10 not found" in err


def test_unknown_dataset_name(tmp_path, capsys):
    code = cli.main(["train", "--model", "lenet5", "--dataset", str(tmp_path / "imagenet")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "unknown dataset" in err


def test_model_and_dataset_shapes_must_match(tmp_path, capsys):
    code = cli.main(["train", "--model", "seed-cifar", "--dataset", "fashion-mnist-sample", "--limit", "20",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "(3, 32, 32)" in err and "(1, 28, 28)" in err
    assert not (tmp_path / "o").exists()


def test_predict_rejects_images_of_the_wrong_shape(run_dir, tmp_path, capsys):
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 32, 32), dtype=np.uint8))
    code = cli.main(["predict", str(run_dir[0]), str(tmp_path / "rgb.npy")])
    _assert_one_line_error(code, capsys.readouterr().err, "cnnx: error:")


def test_out_dir_that_is_not_a_model_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    code = cli.main(["train", "--model", "lenet5", "--dataset", "fashion-mnist-sample", "--out", str(tmp_path)])
    _assert_one_line_error(code, capsys.readouterr().err, "cnnx: error:")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_summary", interrupted)
    assert cli.main(["summary", "--model", "lenet5"]) == 130
    assert "interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------------------- entry points
def test_help_in_process(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict", "summary", "explain"):
        assert command in out


def test_python_dash_m_cnnx_help():
    result = subprocess.run([sys.executable, "-m", "cnnx", "train", "--help"], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert "--limit N" in result.stdout and "use only the first N training images" in result.stdout


def test_unknown_option_before_the_command_is_named(capsys):
    """Defect: 'cnnx --bogus' said "the following arguments are required: COMMAND"."""
    code = cli.main(["--bogus"])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "unknown option '--bogus'" in err and "expected a command (train, evaluate" in err
    assert cli.main([]) == 2 and "no command given" in capsys.readouterr().err
    # argparse's unique prefixes of the real options still work
    assert cli.main(["--vers"]) == 0
    assert capsys.readouterr().out.startswith("cnnx ")


# ------------------------------------------------------- predict / explain: what they accept -
def _predict(run, path, *extra):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["predict", str(run), str(path), *extra])
    return code, out.getvalue(), err.getvalue()


def test_predict_refuses_huge_float_values(run_dir, tmp_path):
    """Defect: a float64 image holding 1e300 passed the finite check, overflowed in the cast to
    float32 and was classified with exit 0."""
    np.save(tmp_path / "huge.npy", np.full((2, 28, 28), 1e300))
    for extra in ((), ("--float-range", "255")):
        code, out, err = _predict(run_dir[0], tmp_path / "huge.npy", *extra)
        _assert_one_line_error(code, err, "cnnx: error:")
        assert "huge.npy" in err and "received: values in [1e+300, 1e+300]" in err
        assert out == ""


def test_predict_refuses_float_images_in_0_255_unless_told(run_dir, test_images, tmp_path):
    """Defect: float images holding 0..255 were taken as [0, 1] with only a note, and accuracy
    silently fell from 0.90 to 0.76. Now they are refused, or divided by 255 with --float-range 255."""
    x, _ = test_images
    np.save(tmp_path / "f255.npy", x[:20].astype(np.float32))
    np.save(tmp_path / "u8.npy", x[:20])
    code, out, err = _predict(run_dir[0], tmp_path / "f255.npy")
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "expected float images with values in [0, 1]" in err and "--float-range 255" in err
    assert out == ""

    code, scaled, err = _predict(run_dir[0], tmp_path / "f255.npy", "--float-range", "255")
    assert code == 0, err
    code, reference, err = _predict(run_dir[0], tmp_path / "u8.npy")
    assert code == 0, err
    # Exact: both paths divide the same float32 integers by float32 255, so the network sees
    # bit-identical inputs.
    assert scaled == reference


@pytest.mark.parametrize("values", [[np.nan], [np.inf], [-0.5], [1.5]], ids=["nan", "inf", "negative", "above-1"])
def test_predict_refuses_floats_outside_the_stated_range(values, run_dir, tmp_path):
    x = np.full((1, 28, 28), 0.5, dtype=np.float32)
    x[0, 0, 0] = values[0]
    np.save(tmp_path / "x.npy", x)
    code, out, err = _predict(run_dir[0], tmp_path / "x.npy")
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "x.npy" in err and "expected" in err and out == ""


def test_predict_out_writes_exactly_the_path_it_reports(run_dir, test_images, tmp_path):
    """Defect: --out /x/outx said 'wrote ... to /x/outx' but np.save wrote /x/outx.npy."""
    np.save(tmp_path / "x.npy", test_images[0][:4])
    target = tmp_path / "outx"
    code, out, err = _predict(run_dir[0], tmp_path / "x.npy", "--out", str(target))
    assert code == 0, err
    assert out.strip() == f"wrote 4 class ids to {target}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outx", "x.npy"]  # no outx.npy, no temp file
    assert np.load(target).shape == (4,)

    code, _, err = _predict(run_dir[0], tmp_path / "x.npy", "--out", str(tmp_path / "missing" / "ids.npy"))
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "does not exist" in err
    code, _, err = _predict(run_dir[0], tmp_path / "x.npy", "--out", str(tmp_path))
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "received: a directory" in err


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


GOOD = np.zeros((3, 28, 28), dtype=np.uint8)
BAD_FILES = {
    # name: (bytes of the file, words the one-line error must hold)
    "empty": (b"", "received: an empty file (0 bytes)"),
    "text": (b"0.1 0.2 0.3\n", "expected a .npy array written by numpy.save, received: a file starting with"),
    "malformed-header": (_npy_bytes(GOOD).replace(b"'descr': '|u1'", b"'descr': 1+2  "),
                         "expected a .npy header as numpy.save writes it"),
    "truncated": (_npy_bytes(GOOD)[:-100], "truncated: expected 2352 bytes of data for shape (3, 28, 28) uint8, received: 2252"),
    "over-long": (_npy_bytes(GOOD) + b"\0" * 8, "longer than its header says"),
    "negative-shape": (_npy_bytes(GOOD).replace(b"(3, 28, 28), } ", b"(-3, 28, 28), }"),
                       "expected a .npy header with a non-negative shape, received: (-3, 28, 28)"),
    "npz": (None, "received: a zip archive"),
    "object-dtype": (None, "which cnnx never unpickles"),
    "int64": (_npy_bytes(GOOD.astype(np.int64)), "expected uint8 (0..255) or float16/32/64 images, received: dtype int64"),
    "no-images": (_npy_bytes(GOOD[:0]), "expected at least one image, received: an array of shape (0, 28, 28)"),
    "wrong-shape": (_npy_bytes(np.zeros((5, 32, 32), dtype=np.uint8)), "received: an array of shape (5, 32, 32)"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_input_file_is_one_line_naming_it(name, run_dir, tmp_path):
    """Defects: a 0-byte .npy printed a traceback; a text file got NumPy's 'allow_pickle=' advice;
    a malformed header gave 'malformed node or string ... <ast.BinOp>'; a truncated .npy did not
    name the file; a (5, 32, 32) input was reported as (5, 1, 32, 32)."""
    content, words = BAD_FILES[name]
    path = tmp_path / f"{name}.npy"
    if name == "npz":
        np.savez(path, a=GOOD)
        path = path.with_suffix(".npy.npz")
    elif name == "object-dtype":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    code, out, err = _predict(run_dir[0], path)
    _assert_one_line_error(code, err, "cnnx: error:")
    assert f"input {str(path)!r}: " in err
    assert words in err
    assert out == ""


def test_predict_reads_fortran_order_big_endian_and_single_images(run_dir, test_images, tmp_path):
    x = test_images[0][:3]
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x.astype(np.float32) / np.float32(255)).astype(">f4"))
    np.save(tmp_path / "one.npy", x[1])
    code, c_order, err = _predict(run_dir[0], tmp_path / "c.npy")
    assert code == 0, err
    code, fortran, err = _predict(run_dir[0], tmp_path / "f.npy")
    assert code == 0, err
    assert fortran == c_order  # exact: the same float32 values as uint8 / 255, read back in C order
    code, one, err = _predict(run_dir[0], tmp_path / "one.npy")
    assert code == 0, err
    assert one.splitlines() == c_order.splitlines()[1:2]


def test_explain_takes_negative_indices_python_style(run_dir, test_images, tmp_path, capsys):
    """Defect: 'explain --index -1' reported 'at least one sample, received (0, 1, 28, 28)'."""
    pytest.importorskip("matplotlib")
    np.save(tmp_path / "x.npy", test_images[0][:3])
    code = cli.main(["explain", str(run_dir[0]), "--input", str(tmp_path / "x.npy"), "--index", "-1",
                     "--out", str(tmp_path / "why")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("image 2: predicted ")

    code = cli.main(["explain", str(run_dir[0]), "--input", str(tmp_path / "x.npy"), "--index", "-4",
                     "--out", str(tmp_path / "why")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "cnnx: error:")
    assert "--index: expected an index in [-3, 2]" in err and "received: -4" in err
