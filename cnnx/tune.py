"""Ray Tune: everything cnnx does with Ray lives in this module.

Two uses:

- in your own Ray code, :class:`TuneReportCallback` (for ``fit(callbacks=[...])``) reports each
  epoch's metrics to Ray Tune with a checkpoint (a ``cnnx.save`` directory), and
  :func:`restore_or_build` gives back the network and its epoch from ``ray.tune.get_checkpoint()``
  when Ray restarts a trial, so training continues exactly where it stopped::

      def trainable(config):
          cnnx.tune.use_trial_cores()
          net = cnnx.tune.restore_or_build(lambda: make_net(config))
          net.fit(x, y, epochs=10 - len(net.history["loss"]), seed=0,
                  validation_data=(x_val, y_val), callbacks=[cnnx.tune.TuneReportCallback()])

- ``cnnx tune SWEEP.json --engine ray`` (:func:`run_ray`) runs a sweep file's trials on Ray Tune,
  on this machine or on a cluster (``--address``), with ASHA early stopping and restarts of
  failed trials from their last checkpoint.

Ray's API moved between 2.7 and 2.4x; this module uses the 2.4x+ one (``ray.tune.report``,
``ray.tune.get_checkpoint``, ``ray.tune.Checkpoint``, ``tune.RunConfig``), and
``pip install "cnnx[ray]"`` pins the range it was tested with. Ray is imported only inside
functions.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .callbacks import Callback

__all__ = ["TuneReportCallback", "restore_or_build", "use_trial_cores", "run_ray", "MODEL_DIR"]

#: Subdirectory of a Ray checkpoint that holds the saved network.
MODEL_DIR = "model"


def _tune():
    try:
        from ray import tune
    except ImportError as exc:
        raise ImportError(f"cnnx.tune needs Ray Tune ({exc}); install it with pip install 'cnnx[ray]'") from None
    return tune


class TuneReportCallback(Callback):
    """Report every epoch's metrics to Ray Tune, with the network as a checkpoint.

    Parameters
    ----------
    checkpoint_every : int, default 1
        Attach a checkpoint every this many epochs (counted over the network's history); 0 never.
    metrics : dict, optional
        Extra constant metrics added to every report (a trial's pid, its thread counts).
    files : dict of str to str, optional
        Extra files written into each checkpoint next to ``model/`` (name -> text), e.g. the
        preprocessing record ``cnnx evaluate`` needs.

    Notes
    -----
    Each report holds the epoch logs (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``; NaN
    values dropped) and ``epoch``, the number of epochs in the network's history (1-based, so a
    restored trial goes on counting). A checkpoint is a directory with ``model/``, written by
    ``cnnx.save`` (weights, optimizer state, history): ``cnnx.load(dir / "model")`` resumes it exactly.
    """

    def __init__(self, checkpoint_every=1, metrics=None, files=None):
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"Expected checkpoint_every to be an int >= 0, received: checkpoint_every={checkpoint_every!r}")
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"Expected metrics to be a dict, received: {type(metrics).__name__}")
        if files is not None and not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise TypeError("Expected files to be a dict of file name -> text")
        self.checkpoint_every = checkpoint_every
        self.metrics = dict(metrics or {})
        self.files = dict(files or {})

    def on_epoch_end(self, epoch, logs=None):
        from . import io

        tune = _tune()
        epochs_done = len(self.network.history["loss"])
        report = {k: float(v) for k, v in (logs or {}).items() if not (isinstance(v, float) and math.isnan(v))}
        report["epoch"] = epochs_done
        report.update(self.metrics)
        if not self.checkpoint_every or epochs_done % self.checkpoint_every:
            tune.report(report)
            return
        # Ray copies the directory into the run's storage during report: a temporary one will do.
        with tempfile.TemporaryDirectory(prefix="cnnx-ckpt-") as tmp:
            io.save(self.network, Path(tmp) / MODEL_DIR)
            for name, text in self.files.items():
                (Path(tmp) / name).write_text(text)
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))

    def __repr__(self):
        return f"TuneReportCallback(checkpoint_every={self.checkpoint_every})"


def restore_or_build(build):
    """The network of the trial's last checkpoint, or ``build()`` when Ray has none.

    Parameters
    ----------
    build : callable
        Returns a fresh compiled network (called only when there is no checkpoint).

    Returns
    -------
    Network
        ``len(net.history["loss"])`` is the number of epochs already done: train for the rest
        with the same ``fit(seed=...)`` and the run continues as if never interrupted.
    """
    from . import io

    if not callable(build):
        raise TypeError(f"Expected build to be callable, received: {type(build).__name__}")
    checkpoint = _tune().get_checkpoint()
    if checkpoint is None:
        return build()
    with checkpoint.as_directory() as directory:
        return io.load(Path(directory) / MODEL_DIR)


def use_trial_cores():
    """Size this trial's thread pools to the CPUs Ray gave it; returns that count.

    Ray sets only ``OMP_NUM_THREADS`` in a trial, and a reused worker process keeps the thread
    counts of the trial before: call this first in every trainable.
    """
    from . import workers

    resources = _tune().get_context().get_trial_resources()
    cpus = resources.required_resources.get("CPU", 1) if resources is not None else 1
    return workers.use_cores(max(1, int(cpus)))


# ============================================================================ cnnx tune =====
def _ray_trial(config, sweep):
    """The trainable ``cnnx tune --engine ray`` runs: one trial of a sweep file."""
    import json

    from . import sweep as sweeps
    from . import workers

    use_trial_cores()
    threads = workers.thread_counts()
    data = sweeps.prepare_data(sweep)
    net = restore_or_build(lambda: sweeps.build_network(sweep, config, input_shape=data["x"].shape[1:]))
    done = len(net.history["loss"])
    metrics = {"pid": os.getpid(), "resumed_from": done + 1 if done else 0, "threads_cnnx": threads["cnnx"],
               "threads_blas": max(threads["blas"], default=0), "threads_openmp": max(threads["openmp"], default=0)}
    files = {sweeps.PREPROCESSING_FILE: json.dumps({"model": config["model"], **data["meta"]}, indent=1)}
    sweeps.train_trial(sweep, config, [TuneReportCallback(metrics=metrics, files=files)], net=net)


def _param_space(sweep):
    tune = _tune()
    space = {}
    for key in ("model", "lr", "batch_size", "weight_decay"):
        value = sweep[key]
        if not isinstance(value, dict):
            space[key] = value
            continue
        kind, arg = next(iter(value.items()))
        space[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](arg) if kind in ("grid", "choice") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*arg)
    return space


def run_ray(sweep, storage, num_samples=1, cpus_per_trial=1, scheduler="fifo", max_failures=0, resume=False,
            address=None):
    """Run a sweep's trials on Ray Tune; returns the rows of the trials table.

    Parameters
    ----------
    sweep : dict
        From :func:`cnnx.sweep.check_sweep`.
    storage : str or os.PathLike
        Ray's storage path; the run is ``storage / sweep["name"]``. On a cluster it must be shared
        by every node (NFS) or be a cloud URI, so a trial restarted elsewhere finds its checkpoint.
    num_samples, cpus_per_trial, max_failures : int
    scheduler : {"fifo", "asha"}
        ASHA stops the worse trials early (grace period 1 epoch, reduction factor 2).
    resume : bool
        Continue an interrupted run at ``storage / name`` (unfinished and errored trials resume
        from their checkpoints).
    address : str, optional
        A running cluster (``ray start --head`` prints it; "auto" finds a local one). Without it
        and without a running Ray, Ray starts on this machine with all its cores.
    """
    import ray

    from . import sweep as sweeps

    tune = _tune()
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    if scheduler not in ("fifo", "asha"):
        raise ValueError(f"Expected scheduler 'fifo' or 'asha', received: scheduler={scheduler!r}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A checkpoint every epoch of a short trial is the point here, not a bottleneck to warn about.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    storage = Path(storage).resolve() if "://" not in str(storage) else storage
    path = f"{storage}/{sweep['name']}"
    trainable = tune.with_resources(tune.with_parameters(_ray_trial, sweep=sweep), {"cpu": cpus_per_trial})
    metric, mode = sweep["metric"], sweeps.metric_mode(sweep["metric"])
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no Ray Tune run to resume at {path}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        if Path(path).exists() and "://" not in path and any(Path(path).glob("experiment_state*")):
            raise FileExistsError(f"{path} holds an earlier sweep: pass --resume to continue it, or choose "
                                  "another --storage or name")
        chosen = (ASHAScheduler(time_attr="epoch", max_t=sweep["epochs"], grace_period=1, reduction_factor=2)
                  if scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(sweep),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=chosen,
                                        search_alg=BasicVariantGenerator(random_state=sweep["seed"])),
            run_config=tune.RunConfig(name=sweep["name"], storage_path=str(storage),
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=0),
        )
    results = tuner.fit()
    # Ctrl-C stops Ray's run gracefully: trials neither finished nor failed are then unfinished,
    # not stopped by the scheduler.
    interrupted = results.num_terminated + results.num_errors < len(results)
    return _rows(results, sweep, interrupted)


def _rows(results, sweep, interrupted=False):
    """The trials table from Ray's ResultGrid (one row per trial, in Ray's order)."""
    from . import sweep as sweeps

    rows = []
    # Ray's trial directories start with the trial's id and index: a stable order, also after --resume.
    for i, result in enumerate(sorted(results, key=lambda r: Path(r.path).name)):
        frame = result.metrics_dataframe
        progress = [] if frame is None else frame.to_dict("records")
        for p in progress:
            p["resumed_from"] = p.get("resumed_from") or None
            p["threads"] = {"cnnx": p.get("threads_cnnx"), "blas": p.get("threads_blas"),
                            "openmp": p.get("threads_openmp")}
            for key, value in list(p.items()):
                if isinstance(value, float) and math.isnan(value):
                    p[key] = None
        epochs = max((p.get("epoch") or 0 for p in progress), default=0)
        if result.error is not None:
            status = "ERROR"
        elif epochs < sweep["epochs"]:
            status = "UNFINISHED" if interrupted else "STOPPED"  # by the scheduler (ASHA)
        else:
            status = "DONE"
        restarts = len({p.get("pid") for p in progress}) - 1 if progress else 0
        checkpoint = result.checkpoint
        row = sweeps._row(Path(result.path).name, result.config, progress, sweep, status, max(0, restarts),
                          None if checkpoint is None else Path(checkpoint.path) / MODEL_DIR)
        row["trial"] = f"trial_{i:04d}"
        row["ray_trial_dir"] = result.path
        rows.append(row)
    return rows
