"""Sweeps, run for real: the sweep file, ``cnnx tune`` on the local engine and on Ray Tune (ASHA on
``ray.init(num_cpus=2)``), a trial SIGKILLed mid-epoch and resumed from its checkpoint, and the
thread count each trial runs with. Select with ``-m scaleout``.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cnnx
from cnnx import cli, sweep

pytestmark = pytest.mark.scaleout

# A few hundred images and a few epochs: every trial takes seconds.
SWEEP = {
    "name": "tiny", "dataset": "fashion-mnist-sample", "limit": 400, "val_fraction": 0.25, "epochs": 3,
    "optimizer": "sgd", "seed": 0, "model": "lenet5", "lr": {"grid": [0.02, 0.1]},
    "batch_size": {"choice": [32, 64]},
}


def _write_sweep(tmp_path, **changes):
    spec = {**SWEEP, **changes}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    return path


# ---------------------------------------------------------------------------- sweep file -----
def test_expand_is_the_grid_times_samples_with_seeded_draws():
    spec = sweep.check_sweep({**SWEEP, "weight_decay": {"loguniform": [1e-5, 1e-3]}})
    configs = sweep.expand(spec, num_samples=3)
    assert len(configs) == 2 * 3
    assert [c["lr"] for c in configs] == [0.02, 0.1] * 3
    assert all(c["batch_size"] in (32, 64) and 1e-5 <= c["weight_decay"] <= 1e-3 for c in configs)
    assert configs == sweep.expand(spec, num_samples=3)  # seeded: the same trials every time
    assert configs != sweep.expand({**spec, "seed": 1}, num_samples=3)


@pytest.mark.parametrize("change, message", [
    ({"lr": {"grid": []}}, "lr.grid to be a non-empty list"),
    ({"model": "lenet6"}, "Expected model to be a zoo model"),
    ({"batch_size": {"uniform": [8, 64]}}, "model and batch_size take grid or choice"),
    ({"lr": {"loguniform": [0, 1]}}, "loguniform bounds > 0"),
    ({"optimizer": "rmsprop"}, "Expected optimizer one of"),
    ({"epochs": "3"}, "Expected epochs to be int"),
    ({"val_fraction": 0.0}, "needs validation data"),
    ({"learning_rate": 0.1}, "received unknown: ['learning_rate']"),
], ids=["empty-grid", "unknown-model", "uniform-batch", "log-zero", "optimizer", "epochs-str", "no-val", "unknown-key"])
def test_bad_sweep_files_are_refused_with_the_key(change, message):
    with pytest.raises((ValueError, TypeError)) as info:
        sweep.check_sweep({**SWEEP, **change})
    assert message in str(info.value)


def test_cli_tune_reports_a_bad_sweep_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "sweep.json"
    path.write_text("{not json")
    assert cli.main(["tune", str(path), "--storage", str(tmp_path)]) == cli.EXIT_FAILURE
    assert "not valid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------------------- local engine ---
def _kill_after_first_epoch(trial_dir, killed):
    """SIGKILL the trial's process as soon as it has recorded epoch 1 (it is then in epoch 2)."""
    progress = trial_dir / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            entries = json.loads(progress.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.005)
            continue
        if entries:
            os.kill(entries[0]["pid"], signal.SIGKILL)
            killed.append(entries[0]["pid"])
            return
        time.sleep(0.005)


def test_local_engine_sweep_survives_a_killed_trial(tmp_path, capsys):
    path = _write_sweep(tmp_path, limit=800)
    killed = []
    watcher = threading.Thread(target=_kill_after_first_epoch, args=(tmp_path / "out" / "tiny" / "trial_0000", killed))
    watcher.start()
    status = cli.main(["tune", str(path), "--engine", "local", "--storage", str(tmp_path / "out"),
                       "--cpus-per-trial", "1", "--max-failures", "1"])
    watcher.join()
    out = capsys.readouterr().out
    assert status == 0, out
    print(out)
    assert killed, "the watcher never saw trial_0000's first epoch"
    rows = json.loads((tmp_path / "out" / "tiny" / "trials.json").read_text())
    assert [r["status"] for r in rows] == ["DONE", "DONE"]
    assert all(r["epochs"] == 3 for r in rows)
    # The killed trial was started again and resumed from its checkpoint, not from epoch 1.
    killed_row = rows[0]
    assert killed_row["restarts"] == 1
    assert killed_row["resumed_from_epoch"] >= 2
    progress = json.loads((tmp_path / "out" / "tiny" / "trial_0000" / "progress.json").read_text())
    assert [p["epoch"] for p in progress] == [1, 2, 3]
    assert progress[0]["pid"] == killed[0] and progress[-1]["pid"] != killed[0]
    # Each trial ran with exactly its one core in cnnx, BLAS and OpenMP.
    for row in rows:
        assert row["threads"]["cnnx"] == 1 and set(row["threads"]["blas"]) == {1}, row
        assert set(row["threads"]["openmp"]) <= {1}, row
    # The table is printed, and the best model is where `cnnx evaluate` reads it.
    assert "best_val_accuracy" in out and "trial_0001" in out
    best = tmp_path / "out" / "tiny" / "best"
    assert cnnx.load(best).history["loss"]
    assert cli.main(["evaluate", str(best), "--limit", "50"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_local_engine_refuses_to_overwrite_without_resume(tmp_path):
    path = _write_sweep(tmp_path, epochs=1, lr=0.05, limit=100)
    assert cli.main(["tune", str(path), "--storage", str(tmp_path / "out")]) == 0
    assert cli.main(["tune", str(path), "--storage", str(tmp_path / "out")]) == cli.EXIT_FAILURE
    # --resume finds the finished trial and keeps it.
    assert cli.main(["tune", str(path), "--storage", str(tmp_path / "out"), "--resume"]) == 0


# ---------------------------------------------------------------------------- Ray Tune -------
@pytest.fixture(scope="module")
def ray_two_cpus():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "PYTHONPATH",
                                            "RAY_worker_register_timeout_seconds")}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # A worker process that takes more than Ray's default 60 s to start (a busy CI machine) is
    # given up on, and the sweep waits for it forever: allow more.
    os.environ["RAY_worker_register_timeout_seconds"] = "300"
    # Ray's worker processes import the same cnnx as this test (installed wheel or in-place build).
    os.environ["PYTHONPATH"] = str(Path(cnnx.__file__).resolve().parent.parent)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_ray_asha_sweep_of_four_trials(ray_two_cpus, tmp_path, capsys):
    path = _write_sweep(tmp_path)
    status = cli.main(["tune", str(path), "--engine", "ray", "--scheduler", "asha", "--num-samples", "2",
                       "--cpus-per-trial", "1", "--storage", str(tmp_path / "out")])
    out = capsys.readouterr().out
    print(out)
    assert status == 0, out
    rows = json.loads((tmp_path / "out" / "tiny" / "trials.json").read_text())
    assert len(rows) == 4
    for row in rows:
        # ASHA lets a trial finish or stops it after a rung; either way it ran at least an epoch.
        assert (row["status"], row["epochs"] == 3) in (("DONE", True), ("STOPPED", False)), row
        assert row["epochs"] >= 1 and row["best_val_accuracy"] is not None
        # Two trials at a time on two CPUs: each uses one thread everywhere.
        assert row["threads"] == {"cnnx": 1, "blas": 1, "openmp": row["threads"]["openmp"]}, row
        assert row["threads"]["openmp"] in (0, 1)
    assert any(row["status"] == "DONE" for row in rows)
    best = sweep.best_row(rows, sweep.check_sweep(json.loads(path.read_text())))
    net = cnnx.load(tmp_path / "out" / "tiny" / "best")
    assert len(net.history["val_accuracy"]) == best["epochs"]
    assert max(net.history["val_accuracy"]) == pytest.approx(best["best_val_accuracy"])
    assert (tmp_path / "out" / "tiny" / "best" / sweep.PREPROCESSING_FILE).is_file()


def test_ray_trial_killed_mid_epoch_resumes_from_its_checkpoint(ray_two_cpus, tmp_path):
    from ray import tune

    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()

    def trainable(config):
        # Defined here so Ray ships it by value to its workers (the test module is not importable there).
        import os
        import signal
        from pathlib import Path

        import cnnx
        from cnnx import tune as cnnx_tune

        cnnx_tune.use_trial_cores()
        (x, y), _ = cnnx.datasets.load_fashion_mnist(sample=True)
        x = cnnx.preprocessing.scale(x[:320])[:, None]
        x_val, y_val, x, y = x[:64], y[:64], x[64:], y[64:320]

        def build():
            net = cnnx.models.lenet5(seed=1)
            return net.compile("SoftmaxCrossEntropy", cnnx.optimizers.SGD(lr=0.05, momentum=0.9))

        net = cnnx_tune.restore_or_build(build)
        start = len(net.history["loss"]) + 1
        marker = Path(config["marker_dir"]) / config["name"]

        def maybe_die(batch, logs):
            # Once per trial, in the middle of epoch 2: no reporting, no cleanup, like an OOM kill.
            if config["kill"] and len(net.history["loss"]) == 1 and batch == 2 and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

        report = cnnx_tune.TuneReportCallback(metrics={"started_at_epoch": start, "pid": os.getpid()})
        net.fit(x, y, epochs=3 - len(net.history["loss"]), batch_size=32, seed=5, verbose=0,
                validation_data=(x_val, y_val),
                callbacks=[cnnx.callbacks.LambdaCallback(on_batch_end=maybe_die), report])

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"kill": tune.grid_search([True, False]), "marker_dir": str(marker_dir),
                     "name": tune.grid_search(["a"])},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(name="kill", storage_path=str(tmp_path / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    assert not results.errors
    by_kill = {r.config["kill"]: r for r in results}
    killed, intact = by_kill[True], by_kill[False]
    assert (marker_dir / "a").is_file()  # the kill happened
    reports = killed.metrics_dataframe
    print(reports[["epoch", "started_at_epoch", "pid", "val_loss"]].to_string())
    # Epoch 1 ran in the first process; after the SIGKILL, Ray restarted the trial from the epoch-1
    # checkpoint: it started at epoch 2, in another process, and finished epoch 3.
    assert list(reports["epoch"]) == [1, 2, 3]
    assert list(reports["started_at_epoch"]) == [1, 2, 2]
    assert reports["pid"].iloc[0] == int((marker_dir / "a").read_text()) != reports["pid"].iloc[-1]
    # Resuming is exact: the killed-and-resumed trial ends where the uninterrupted one does.
    np.testing.assert_allclose(reports["val_loss"], intact.metrics_dataframe["val_loss"], rtol=1e-6)
    with killed.checkpoint.as_directory() as d:
        resumed_net = cnnx.load(Path(d) / "model")
    with intact.checkpoint.as_directory() as d:
        intact_net = cnnx.load(Path(d) / "model")
    a, b = resumed_net.get_weights(), intact_net.get_weights()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6


def test_example_ray_tune_sweep(ray_two_cpus, tmp_path, capsys):
    import importlib.util
    import sys

    from ray import cloudpickle

    path = Path(__file__).resolve().parents[1] / "examples" / "ray_tune_sweep.py"
    if not path.is_file():
        pytest.skip("examples/ are not next to the tests")
    spec = importlib.util.spec_from_file_location("example_ray_tune_sweep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        # Ray's workers cannot import the example by name: ship its functions by value.
        cloudpickle.register_pickle_by_value(module)
        results = module.main(["--sample", "--limit", "300", "--epochs", "2", "--num-samples", "2",
                               "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "best")])
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    assert not results.errors and len(results) == 2
    assert "best trial:" in out and "test accuracy" in out
    assert cnnx.load(tmp_path / "best").history["val_accuracy"]


@pytest.mark.parametrize("extra, message", [
    (["--scheduler", "asha"], "early stopping needs engine 'ray'"),
    (["--address", "10.0.0.1:6379"], "--address needs engine 'ray'"),
    (["--max-failures", "-1"], "--max-failures must be >= 0"),
], ids=["asha-local", "address-local", "negative-failures"])
def test_cli_tune_refuses_options_the_engine_cannot_honour(tmp_path, capsys, extra, message):
    path = _write_sweep(tmp_path)
    assert cli.main(["tune", str(path), "--engine", "local", "--storage", str(tmp_path / "out"), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "tiny").exists()  # refused before any work
