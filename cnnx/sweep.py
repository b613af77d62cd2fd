"""Hyper-parameter sweeps: the sweep file, one trial's training, the local engine, the results.

This module owns what every engine shares: reading and checking a sweep file, expanding its
search space, training one trial (data, model, optimizer, checkpoints, resume), the table of
trials and the best trial's model. The ``local`` engine runs trials in parallel processes on this
machine; the ``ray`` engine (:mod:`cnnx.tune`) hands the same trial function to Ray Tune.

A sweep file is JSON::

    {
      "name": "lenet5-fashion",              # results go to STORAGE/name/
      "dataset": "fashion-mnist-sample",      # as for `cnnx train --dataset`
      "limit": 600,                           # optional: first N training images
      "val_fraction": 0.2,                    # held out (stratified) for the metric
      "epochs": 3,
      "optimizer": "sgd",                     # sgd (momentum 0.9), adam or adamw
      "seed": 0,                              # weights, split, shuffling, random draws
      "metric": "val_accuracy",               # optional; maximised (a *loss is minimised)
      "model": {"grid": ["lenet5", "seed-mnist"]},
      "lr": {"loguniform": [0.01, 0.2]},
      "batch_size": {"choice": [32, 64]},
      "weight_decay": 0.0
    }

``model``, ``lr``, ``batch_size`` and ``weight_decay`` take a value or a search: ``{"grid": [...]}``
(every value, in every combination with the other grids), ``{"choice": [...]}``,
``{"uniform": [lo, hi]}``, ``{"loguniform": [lo, hi]}`` (drawn per trial). As in Ray Tune, the
trials are the grid's combinations, each repeated ``num_samples`` times with fresh draws.

A trial directory holds ``checkpoint/`` (the network, saved atomically after every epoch by
``cnnx.save``), ``progress.json`` (one entry per epoch) and, once finished, ``result.json``.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

__all__ = ["load_sweep", "check_sweep", "expand", "train_trial", "run", "run_local", "write_results",
           "format_table", "SEARCHABLE"]

SEARCHABLE = ("model", "lr", "batch_size", "weight_decay")
_FIXED = {"name": str, "dataset": str, "limit": int, "val_fraction": float, "epochs": int,
          "optimizer": str, "seed": int, "metric": str}
_DEFAULTS = {"limit": None, "val_fraction": 0.1, "optimizer": "sgd", "seed": 0, "metric": "val_accuracy",
             "weight_decay": 0.0}
_SEARCHES = ("grid", "choice", "uniform", "loguniform")
_OPTIMIZERS = ("sgd", "adam", "adamw")
PREPROCESSING_FILE = "preprocessing.json"  # what `cnnx evaluate` reads next to a saved model


# ============================================================================ sweep file ====
def load_sweep(path):
    """Read and check a sweep file; returns the sweep as a dict with defaults filled in."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    try:
        return check_sweep(spec)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{path}: {exc}") from None


def check_sweep(spec):
    """Check a sweep (a dict as in the module docstring); returns a copy with defaults filled in.

    Raises
    ------
    ValueError, TypeError
        Naming the key and saying what was expected and what was received.
    """
    from .models import MODELS

    if not isinstance(spec, dict):
        raise TypeError(f"Expected the sweep to be a JSON object, received: {type(spec).__name__}")
    unknown = sorted(set(spec) - set(_FIXED) - set(SEARCHABLE))
    if unknown:
        raise ValueError(f"Expected keys among {sorted(set(_FIXED) | set(SEARCHABLE))}, received unknown: {unknown}")
    for key in ("name", "dataset", "epochs", "model", "lr", "batch_size"):
        if key not in spec:
            raise ValueError(f"Expected the sweep to name {key!r}, received keys: {sorted(spec)}")
    sweep = {**_DEFAULTS, **spec}
    for key, kind in _FIXED.items():
        value = sweep[key]
        if value is None and key == "limit":
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = sweep[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"Expected {key} to be {kind.__name__}, received: {key}={value!r}")
    if not sweep["name"] or "/" in sweep["name"] or sweep["name"].startswith("."):
        raise ValueError(f"Expected name to be a plain directory name, received: name={sweep['name']!r}")
    if sweep["epochs"] < 1 or (sweep["limit"] is not None and sweep["limit"] < 2):
        raise ValueError(f"Expected epochs >= 1 and limit >= 2, received: epochs={sweep['epochs']}, "
                         f"limit={sweep['limit']}")
    if not 0 <= sweep["val_fraction"] < 1:
        raise ValueError(f"Expected val_fraction in [0, 1), received: val_fraction={sweep['val_fraction']}")
    if sweep["val_fraction"] == 0 and sweep["metric"].startswith("val_"):
        raise ValueError(f"metric {sweep['metric']!r} needs validation data: set val_fraction > 0 or "
                         "metric 'accuracy'")
    if sweep["metric"] not in ("accuracy", "loss", "val_accuracy", "val_loss"):
        raise ValueError(f"Expected metric 'accuracy', 'loss', 'val_accuracy' or 'val_loss', received: "
                         f"metric={sweep['metric']!r}")
    if sweep["optimizer"] not in _OPTIMIZERS:
        raise ValueError(f"Expected optimizer one of {list(_OPTIMIZERS)}, received: optimizer={sweep['optimizer']!r}")
    checks = {
        "model": lambda v: isinstance(v, str) and v in MODELS,
        "lr": lambda v: _is_real(v) and v > 0,
        "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "weight_decay": lambda v: _is_real(v) and v >= 0,
    }
    expected = {"model": f"a zoo model {sorted(MODELS)}", "lr": "a number > 0", "batch_size": "an int >= 1",
                "weight_decay": "a number >= 0"}
    for key in SEARCHABLE:
        value = sweep[key]
        values = _search_values(key, value)
        bad = [v for v in values if not checks[key](v)]
        if bad:
            raise ValueError(f"Expected {key} to be {expected[key]} (or a search over such values), "
                             f"received: {bad[0]!r}")
    return sweep


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _search_values(key, value):
    """The values a (possibly searched) key can take, for checking: a list's items, a range's ends."""
    if not isinstance(value, dict):
        return [value]
    if len(value) != 1 or next(iter(value)) not in _SEARCHES:
        raise ValueError(f"Expected {key} to be a value or one of {{'grid': [...]}}, {{'choice': [...]}}, "
                         f"{{'uniform': [lo, hi]}}, {{'loguniform': [lo, hi]}}, received: {value!r}")
    kind, arg = next(iter(value.items()))
    if not isinstance(arg, list) or not arg:
        raise ValueError(f"Expected {key}.{kind} to be a non-empty list, received: {arg!r}")
    if kind in ("uniform", "loguniform"):
        if key in ("model", "batch_size") or len(arg) != 2 or not all(_is_real(v) for v in arg) or arg[0] >= arg[1]:
            raise ValueError(f"Expected {key}.{kind} as [lo, hi] numbers with lo < hi"
                             f"{' (model and batch_size take grid or choice)' if key in ('model', 'batch_size') else ''}"
                             f", received: {arg!r}")
        if kind == "loguniform" and arg[0] <= 0:
            raise ValueError(f"Expected {key}.loguniform bounds > 0, received: {arg!r}")
    return list(arg)


def expand(sweep, num_samples=1):
    """The trials' configurations: grid combinations x ``num_samples``, random draws seeded.

    Returns
    -------
    list of dict
        One ``{"model", "lr", "batch_size", "weight_decay"}`` per trial, in launch order.
    """
    rng = np.random.default_rng(sweep["seed"])
    grids = [(key, sweep[key]["grid"]) for key in SEARCHABLE if isinstance(sweep[key], dict) and "grid" in sweep[key]]
    combos = list(itertools.product(*(values for _, values in grids))) or [()]
    configs = []
    for _ in range(num_samples):
        for combo in combos:
            config = dict(zip((key for key, _ in grids), combo))
            for key in SEARCHABLE:
                if key not in config:
                    config[key] = _draw(sweep[key], rng)
            configs.append(config)
    return configs


def _draw(value, rng):
    if not isinstance(value, dict):
        return value
    kind, arg = next(iter(value.items()))
    if kind == "choice":
        return arg[int(rng.integers(len(arg)))]
    if kind == "uniform":
        return float(rng.uniform(arg[0], arg[1]))
    return float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))  # loguniform


def metric_mode(metric):
    """"min" for a loss, "max" for an accuracy."""
    return "min" if metric.endswith("loss") else "max"


# ============================================================================ one trial =====
_data_cache = {}


def prepare_data(sweep):
    """Training and validation arrays plus the preprocessing record, cached per process.

    Returns
    -------
    dict
        ``x, y, x_val, y_val`` (``x_val``/``y_val`` None without validation) and ``meta``, the
        preprocessing dict ``cnnx evaluate`` reads (dataset, class names, mean, std).
    """
    key = (sweep["dataset"], sweep["limit"], sweep["val_fraction"], sweep["seed"])
    if key in _data_cache:
        return _data_cache[key]
    from . import preprocessing
    from .cli import load_dataset

    (x, y), _, class_names = load_dataset(sweep["dataset"])
    if sweep["limit"] is not None:
        x, y = x[:sweep["limit"]], y[:sweep["limit"]]
    x = preprocessing.scale(x, dtype=np.float32)
    if x.ndim == 3:
        x = preprocessing.add_channel_axis(x)
    x_val = y_val = None
    if sweep["val_fraction"] > 0:
        (x, y), (x_val, y_val) = preprocessing.train_val_split(x, y, val_fraction=sweep["val_fraction"],
                                                               seed=sweep["seed"])
    stats = preprocessing.Standardizer().fit(x)
    x = stats.transform(x)
    if x_val is not None:
        x_val = stats.transform(x_val)
    state = stats.get_state()
    meta = {
        "dataset": sweep["dataset"],
        "class_names": list(class_names),
        "input_shape": list(x.shape[1:]),
        "scale": "uint8 images divided by 255; float images taken as already in [0, 1]",
        "mean": np.atleast_1d(state["mean"]).tolist(),
        "std": np.atleast_1d(state["std"]).tolist(),
    }
    _data_cache.clear()  # one dataset per worker process at a time
    _data_cache[key] = {"x": x, "y": y, "x_val": x_val, "y_val": y_val, "meta": meta}
    return _data_cache[key]


def build_network(sweep, config, input_shape=None):
    """A fresh, compiled zoo network for one trial configuration."""
    from . import losses, models, optimizers

    net = models.build(config["model"], seed=sweep["seed"])
    if input_shape is not None and tuple(net.input_shape) != tuple(input_shape):
        raise ValueError(f"Expected model {config['model']!r} to take images of shape {tuple(input_shape)} "
                         f"(dataset {sweep['dataset']}), it takes {tuple(net.input_shape)}")
    name, lr, wd = sweep["optimizer"], float(config["lr"]), float(config["weight_decay"])
    if name == "sgd":
        optimizer = optimizers.SGD(lr=lr, momentum=0.9, weight_decay=wd)
    else:
        optimizer = optimizers.get(name, lr=lr, weight_decay=wd)
    return net.compile(losses.SoftmaxCrossEntropy(), optimizer)


def train_trial(sweep, config, callbacks, net=None):
    """Train one trial to ``sweep["epochs"]`` epochs, continuing ``net`` when given (a restore).

    Parameters
    ----------
    sweep : dict
        From :func:`check_sweep`.
    config : dict
        The trial's ``model``, ``lr``, ``batch_size``, ``weight_decay``.
    callbacks : list of Callback
        Called by ``fit``; they report and checkpoint (engine-specific).
    net : Network, optional
        A network restored from the trial's checkpoint; its history says how many epochs are done.

    Returns
    -------
    Network
    """
    data = prepare_data(sweep)
    if net is None:
        net = build_network(sweep, config, input_shape=data["x"].shape[1:])
    remaining = sweep["epochs"] - len(net.history["loss"])
    if remaining > 0:
        validation = None if data["x_val"] is None else (data["x_val"], data["y_val"])
        net.fit(data["x"], data["y"], epochs=remaining, batch_size=int(config["batch_size"]),
                validation_data=validation, seed=sweep["seed"], callbacks=callbacks, verbose=0)
    return net


def epoch_metrics(net, logs):
    """JSON-safe metrics of the epoch just finished: the logs plus ``epoch`` (1-based, whole history)."""
    metrics = {key: _finite_or_none(value) for key, value in (logs or {}).items()}
    metrics["epoch"] = len(net.history["loss"])
    return metrics


def _finite_or_none(value):
    value = float(value)
    return value if math.isfinite(value) else None


# ============================================================================ local engine ==
def _local_trial(sweep, config, trial_dir, cpus):
    """Body of one local trial process: resume from the trial's checkpoint when there is one."""
    from . import io, workers
    from .callbacks import Callback

    workers.use_cores(cpus)
    trial_dir = Path(trial_dir)
    checkpoint = trial_dir / "checkpoint"
    progress_file = trial_dir / "progress.json"
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else []
    net = None
    resumed_from = None
    if (checkpoint / "config.json").is_file() or (checkpoint.parent / "checkpoint.bak" / "config.json").is_file():
        net = io.load(checkpoint)
        resumed_from = len(net.history["loss"]) + 1
        progress = progress[:resumed_from - 1]  # epochs after the checkpoint are redone
    threads = workers.thread_counts()

    class SaveAndRecord(Callback):
        def on_epoch_end(self, epoch, logs=None):
            io.save(self.network, checkpoint)
            entry = epoch_metrics(self.network, logs)
            entry.update(pid=os.getpid(), resumed_from=resumed_from, threads=threads)
            progress.append(entry)
            _write_json(progress_file, progress)

    train_trial(sweep, config, [SaveAndRecord()], net=net)
    _write_json(trial_dir / "result.json", {"config": config, "status": "DONE"})


def run_local(sweep, storage, num_samples=1, cpus_per_trial=1, max_failures=0, resume=False, cpus=None):
    """Run a sweep's trials in parallel processes on this machine.

    Each trial runs in its own (spawned) process using ``cpus_per_trial`` cores; as many run at
    once as ``cpus // cpus_per_trial``. A trial whose process dies (killed, out of memory) is
    started again from its last checkpoint up to ``max_failures`` times. The processes are
    spawned (fresh interpreters), so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard of :mod:`multiprocessing`.

    Parameters
    ----------
    sweep : dict
        From :func:`check_sweep`.
    storage : str or os.PathLike
        Results go to ``storage / sweep["name"]``.
    num_samples : int
    cpus_per_trial : int
    max_failures : int
    resume : bool
        Continue a sweep run before with the same storage: finished trials are kept, the others
        resume from their checkpoints. Without it an existing sweep directory is an error.
    cpus : int, optional
        Cores to use (default: those this process may run on).

    Returns
    -------
    list of dict
        The rows of :func:`summarize`.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    from . import workers

    root = Path(storage) / sweep["name"]
    configs = expand(sweep, num_samples)
    if root.exists() and not resume and any(root.glob("trial_*")):
        raise FileExistsError(f"{root} holds an earlier sweep: pass --resume to continue it, or choose "
                              "another --storage or name")
    root.mkdir(parents=True, exist_ok=True)
    if resume and (root / "sweep.json").is_file():
        if json.loads((root / "sweep.json").read_text()) != {"sweep": sweep, "trials": configs}:
            raise ValueError(f"{root} was started with another sweep or --num-samples; cannot resume it")
    _write_json(root / "sweep.json", {"sweep": sweep, "trials": configs})

    slots = max(1, (cpus or workers.visible_cores()) // cpus_per_trial)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads or state
    trials = [(f"trial_{i:04d}", config) for i, config in enumerate(configs)]
    pending = [t for t in trials if not (root / t[0] / "result.json").is_file()]
    failures = {}
    errors = {}
    running = {}
    while pending or running:
        while pending and len(running) < slots:
            name, config = pending.pop(0)
            (root / name).mkdir(exist_ok=True)
            process = context.Process(target=_local_trial, args=(sweep, config, str(root / name), cpus_per_trial),
                                      name=f"cnnx-{name}", daemon=True)
            process.start()
            running[process.sentinel] = (process, name, config)
        for sentinel in wait(list(running)):
            process, name, config = running.pop(sentinel)
            process.join()
            if process.exitcode == 0:
                continue
            failures[name] = failures.get(name, 0) + 1
            if failures[name] <= max_failures:
                pending.insert(0, (name, config))  # again, from its last checkpoint
            else:
                errors[name] = f"process exited with {process.exitcode}"
    return summarize_local(root, sweep, trials, errors, failures)


def summarize_local(root, sweep, trials, errors, failures):
    rows = []
    for name, config in trials:
        progress_file = root / name / "progress.json"
        progress = json.loads(progress_file.read_text()) if progress_file.is_file() else []
        status = "ERROR" if name in errors else ("DONE" if (root / name / "result.json").is_file() else "UNFINISHED")
        rows.append(_row(name, config, progress, sweep, status, failures.get(name, 0), root / name / "checkpoint"))
    return rows


def _row(name, config, progress, sweep, status, restarts, checkpoint):
    """One line of the trials table from a trial's per-epoch reports."""
    metric, mode = sweep["metric"], metric_mode(sweep["metric"])
    values = [p.get(metric) for p in progress if p.get(metric) is not None]
    best = (max if mode == "max" else min)(values) if values else None
    resumed = sorted({p["resumed_from"] for p in progress if p.get("resumed_from")})
    return {"trial": name, **{key: config[key] for key in SEARCHABLE}, f"best_{metric}": best,
            "epochs": max((p.get("epoch", 0) for p in progress), default=0), "status": status,
            "restarts": restarts, "resumed_from_epoch": resumed[-1] if resumed else None,
            "threads": progress[-1].get("threads") if progress else None,
            "checkpoint": None if checkpoint is None else str(checkpoint)}


# ============================================================================ results =======
def best_row(rows, sweep):
    """The row with the best metric (None when no trial reported one)."""
    key, mode = f"best_{sweep['metric']}", metric_mode(sweep["metric"])
    scored = [r for r in rows if r[key] is not None and r["checkpoint"] is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[key])


def write_results(rows, sweep, root):
    """Write ``trials.csv`` and ``trials.json`` and copy the best trial's model to ``best/``.

    ``best/`` is a saved network plus ``preprocessing.json``: ``cnnx evaluate ROOT/best`` and
    ``cnnx.load(ROOT/best)`` read it. Returns the path of ``best/`` (None when no trial finished
    an epoch).
    """
    import csv

    from . import io

    root = Path(root)
    columns = [c for c in rows[0] if c not in ("threads", "checkpoint")] if rows else []
    with open(root / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _write_json(root / "trials.json", rows)
    best = best_row(rows, sweep)
    if best is None:
        return None
    # The model and our two files are written into a new directory first, then swapped in: a
    # reader of best/ sees the old one or the new one, and cnnx.save never meets our files.
    net = io.load(best["checkpoint"])
    fresh, target, old = root / f".best.new-{os.getpid()}", root / "best", root / f".best.old-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    io.save(net, fresh)
    _write_json(fresh / PREPROCESSING_FILE, {"model": best["model"], **prepare_data(sweep)["meta"]})
    _write_json(fresh / "trial.json", best)
    if target.exists():
        os.replace(target, old)
    os.replace(fresh, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def format_table(rows, sweep):
    """The trials as an aligned text table (config, best metric, epochs run, status)."""
    metric = f"best_{sweep['metric']}"
    header = ["trial", "model", "lr", "batch", "wd", metric, "epochs", "status", "resumed@"]
    lines = [header]
    for r in rows:
        lines.append([r["trial"], str(r["model"]), f"{r['lr']:.4g}", str(r["batch_size"]), f"{r['weight_decay']:.3g}",
                      "-" if r[metric] is None else f"{r[metric]:.4f}", str(r["epochs"]), r["status"],
                      "-" if r["resumed_from_epoch"] is None else str(r["resumed_from_epoch"])])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _write_json(path, obj):
    """Write JSON through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def run(sweep, engine="local", storage="runs/sweeps", num_samples=1, cpus_per_trial=1, scheduler="fifo",
        max_failures=0, resume=False, address=None):
    """Run a sweep on an engine, write its results, and return ``(rows, best_dir)``.

    ``engine="local"`` runs :func:`run_local` (FIFO only); ``"ray"`` runs :func:`cnnx.tune.run_ray`.
    Results: ``storage/name/trials.csv``, ``trials.json`` and ``best/`` (see :func:`write_results`).
    """
    if engine == "local":
        if scheduler != "fifo":
            raise ValueError(f"Expected scheduler 'fifo' with engine 'local' (early stopping needs engine "
                             f"'ray'), received: scheduler={scheduler!r}")
        if address is not None:
            raise ValueError("--address needs engine 'ray'; the local engine runs on this machine")
        rows = run_local(sweep, storage, num_samples=num_samples, cpus_per_trial=cpus_per_trial,
                         max_failures=max_failures, resume=resume)
    elif engine == "ray":
        from .tune import run_ray

        rows = run_ray(sweep, storage, num_samples=num_samples, cpus_per_trial=cpus_per_trial, scheduler=scheduler,
                       max_failures=max_failures, resume=resume, address=address)
    else:
        raise ValueError(f"Expected engine 'local' or 'ray', received: engine={engine!r}")
    root = Path(storage) / sweep["name"]
    return rows, write_results(rows, sweep, root)
