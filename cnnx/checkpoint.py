"""``ModelCheckpoint``: the callback that saves the network during ``fit`` (through ``cnnx.io``).

Saves are atomic (see :mod:`cnnx.io`), so a run killed mid-save still leaves a loadable
checkpoint, and ``cnnx.load(path)`` followed by ``fit`` resumes it exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import io
from .callbacks import Callback, monitored_value
from .validation import is_nan

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Save the network every ``every`` epochs, or only when a monitored metric improves.

    Parameters
    ----------
    path : str or os.PathLike
        Where to save (a directory, see :func:`cnnx.save`; a file with ``save_weights_only``).
        A str may hold ``str.format`` fields filled from the epoch logs and the epoch number,
        e.g. ``"runs/mnist/epoch{epoch:03d}-{val_loss:.3f}"``; without fields each save
        replaces the previous one.
    every : int, default 1
        Act at the end of every ``every``-th epoch. Epochs are counted over the network's whole
        history (``len(net.history["loss"])``), so a resumed run keeps the rhythm.
    save_best_only : bool, default False
        Save only when ``monitor`` is better than at every earlier save.
    monitor : str, default "val_loss"
        Epoch-log key compared with ``save_best_only``.
    mode : {"auto", "min", "max"}, default "auto"
        Whether lower or higher ``monitor`` is better; "auto" picks "max" for accuracy-like names.
    save_weights_only : bool, default False
        Write only the weights (:func:`cnnx.save_weights`) instead of the whole network.
    verbose : int, default 0
        1 prints a line for every save.

    Attributes
    ----------
    best : float or None
        Best monitored value so far (``save_best_only``). When ``path`` already holds a
        checkpoint at the start of training, it starts from the best value in the network's
        history, so a resumed run does not overwrite a better checkpoint with a worse one.
    last_saved : pathlib.Path or None
        Path of the latest save.
    """

    def __init__(self, path, every=1, save_best_only=False, monitor="val_loss", mode="auto",
                 save_weights_only=False, verbose=0):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Expected path as a str or os.PathLike, received: {type(path).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"Expected every to be an int >= 1, received: every={every!r}")
        if not isinstance(monitor, str):
            raise TypeError(f"Expected monitor to be a str, received: monitor={monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Expected mode 'auto', 'min' or 'max', received: mode={mode!r}")
        self.path = path
        self.every = every
        self.save_best_only = bool(save_best_only)
        self.monitor = monitor
        self.mode = mode
        self.save_weights_only = bool(save_weights_only)
        self.verbose = verbose
        if mode == "auto":
            mode = "max" if ("acc" in monitor or "auc" in monitor) else "min"
        self._sign = 1.0 if mode == "min" else -1.0  # compare sign * value: lower is better
        self.best = None
        self.last_saved = None

    def on_train_begin(self, logs=None):
        if self.save_best_only and self.best is None and self._existing_checkpoint():
            past = [v for v in self.network.history.get(self.monitor, []) if not is_nan(v)]
            if past:
                self.best = min(past, key=lambda v: self._sign * v)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # The epoch number over the whole history: fit appends to it before calling callbacks.
        n_epochs = len(self.network.history.get("loss", ())) or epoch + 1
        if n_epochs % self.every:
            return
        if self.save_best_only:
            current = monitored_value(logs, self.monitor, "ModelCheckpoint", "; not saving")
            if current is None:
                return
            if self.best is not None and not self._sign * (current - self.best) < 0:
                return
            self.best = float(current)
        path = self._format_path(n_epochs, logs)
        if self.save_weights_only:
            io.save_weights(self.network, path)
        else:
            io.save(self.network, path)
        self.last_saved = Path(path)
        if self.verbose:
            extra = f" ({self.monitor}={self.best:.4g})" if self.save_best_only else ""
            print(f"Epoch {n_epochs}: saved {path}{extra}")

    def _format_path(self, n_epochs, logs):
        if not isinstance(self.path, str) or "{" not in self.path:
            return self.path
        try:
            return self.path.format(epoch=n_epochs, **logs)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"ModelCheckpoint cannot fill path {self.path!r} from epoch and logs {sorted(logs)}: {exc}"
            ) from None

    def _existing_checkpoint(self):
        if isinstance(self.path, str) and "{" in self.path:
            return False
        path = Path(self.path)
        if self.save_weights_only:
            return path.is_file()
        return (path / "config.json").is_file() or (path.parent / f"{path.name}.bak" / "config.json").is_file()

    def __repr__(self):
        args = f"{str(self.path)!r}, every={self.every}"
        if self.save_best_only:
            args += f", save_best_only=True, monitor={self.monitor!r}, mode={self.mode!r}"
        if self.save_weights_only:
            args += ", save_weights_only=True"
        return f"ModelCheckpoint({args})"
