"""Callbacks: hooks ``Network.fit`` calls around training, epochs and batches.

A callback sees the network through ``self.network`` (set by ``fit`` via ``set_network``) and
stops training by setting ``self.network.stop_training = True``. Per-epoch history lives in the
Network itself (``net.history``), so there is no History callback.
"""
from __future__ import annotations

import math
import numbers
import os
import secrets
import warnings
from pathlib import Path

__all__ = ["Callback", "EarlyStopping", "LambdaCallback", "CSVLogger", "TensorBoard"]


class Callback:
    """Base class: every hook is a no-op; override the ones you need.

    ``logs`` passed to ``on_epoch_end`` hold ``loss``, ``accuracy`` and, with validation data,
    ``val_loss``, ``val_accuracy``; ``on_batch_end`` gets ``batch``, ``size``, ``loss`` and
    ``accuracy`` of that batch. Epoch and batch indices are zero-based and count from the start
    of the current ``fit`` call.
    """

    network = None

    def set_network(self, network):
        self.network = network

    def on_train_begin(self, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_batch_begin(self, batch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        pass

    def __repr__(self):
        return f"{type(self).__name__}()"


class EarlyStopping(Callback):
    """Stop training when a monitored metric has stopped improving.

    Parameters
    ----------
    monitor : str, default "val_loss"
        Key of the epoch logs to watch (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``).
    patience : int, default 0
        Number of epochs without improvement after which training stops (0: the first one).
    min_delta : float, default 0
        Smallest change that counts as an improvement.
    mode : {"auto", "min", "max"}, default "auto"
        Whether lower or higher is better; "auto" picks "max" for accuracy-like names.
    restore_best_weights : bool, default False
        At the end of training (stopped early or not), copy back the weights of the best epoch.

    Attributes
    ----------
    best : float
        Best value seen.
    best_epoch : int or None
        Zero-based epoch of ``best``.
    stopped_epoch : int or None
        Epoch after which training was stopped, None if it ran to the end.
    """

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto", restore_best_weights=False):
        if not isinstance(monitor, str):
            raise TypeError(f"Expected monitor to be a str, received: monitor={monitor!r}")
        if not isinstance(patience, numbers.Integral) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"Expected patience to be an int >= 0, received: patience={patience!r}")
        if not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"Expected min_delta to be a finite number >= 0, received: min_delta={min_delta!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"Expected mode 'auto', 'min' or 'max', received: mode={mode!r}")
        self.monitor = monitor
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.mode = mode
        self.restore_best_weights = bool(restore_best_weights)
        if mode == "auto":
            mode = "max" if ("acc" in monitor or "auc" in monitor) else "min"
        self._sign = 1.0 if mode == "min" else -1.0  # compare sign * value: lower is better
        self._reset()

    def _reset(self):
        self.wait = 0
        self.best = math.inf * self._sign
        self.best_epoch = None
        self.stopped_epoch = None
        self.best_weights = None
        self._last_epoch = None

    def on_train_begin(self, logs=None):
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None or (isinstance(current, float) and math.isnan(current)):
            warnings.warn(
                f"EarlyStopping is monitoring {self.monitor!r}, which the epoch logs do not hold "
                f"(available: {sorted(k for k, v in (logs or {}).items() if not _is_nan(v))})",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self._last_epoch = epoch
        if self._sign * (current - self.best) < -self.min_delta or self.best_epoch is None:
            self.best = float(current)
            self.best_epoch = epoch
            self.wait = 0
            if self.restore_best_weights:
                self.best_weights = self.network.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.network.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None and self._last_epoch != self.best_epoch:
            self.network.set_weights(self.best_weights)

    def __repr__(self):
        return (
            f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, min_delta={self.min_delta}, "
            f"mode={self.mode!r}, restore_best_weights={self.restore_best_weights})"
        )


class LambdaCallback(Callback):
    """A callback built from plain functions, e.g. ``LambdaCallback(on_epoch_end=lambda e, logs: ...)``.

    Each argument is a callable with the signature of the hook of the same name, or None.
    """

    _HOOKS = ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_batch_begin", "on_batch_end")

    def __init__(self, on_train_begin=None, on_train_end=None, on_epoch_begin=None, on_epoch_end=None,
                 on_batch_begin=None, on_batch_end=None):
        given = dict(on_train_begin=on_train_begin, on_train_end=on_train_end, on_epoch_begin=on_epoch_begin,
                     on_epoch_end=on_epoch_end, on_batch_begin=on_batch_begin, on_batch_end=on_batch_end)
        for name, fn in given.items():
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"Expected {name} to be callable or None, received: {type(fn).__name__}")
            setattr(self, name, fn)  # the instance attribute shadows the no-op method
        self._given = [name for name, fn in given.items() if fn is not None]

    def __repr__(self):
        return f"LambdaCallback({', '.join(self._given)})"


class CSVLogger(Callback):
    """Write one CSV row per epoch: ``epoch`` then the epoch logs (as Keras' ``CSVLogger``).

    ``epoch`` counts from 0 over the network's whole history, so a resumed run appending to the
    same file continues the numbering. Values are written with ``repr`` (exact round trip; NaN as
    ``nan``). The file is rewritten atomically at every epoch (a temporary file renamed over it),
    so a run killed at any moment leaves a complete, readable file.

    Parameters
    ----------
    filename : str or os.PathLike
    separator : str, default ","
    append : bool, default False
        Keep the rows already in the file (its header must match) instead of starting afresh.
    """

    def __init__(self, filename, separator=",", append=False):
        if not isinstance(filename, (str, os.PathLike)):
            raise TypeError(f"Expected filename as a str or path, received: {type(filename).__name__}")
        if not isinstance(separator, str) or len(separator) != 1 or separator in "\n\r\"":
            raise ValueError(f"Expected separator as one character, received: separator={separator!r}")
        self.filename = Path(filename)
        self.separator = separator
        self.append = bool(append)
        self._header = None
        self._lines = []

    def on_train_begin(self, logs=None):
        self._header = None
        self._lines = []
        if self.append and self.filename.is_file():
            lines = self.filename.read_text().splitlines()
            if lines:
                self._header = lines[0].split(self.separator)
                self._lines = lines

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        history = self.network.history if self.network is not None else {}
        index = len(history.get("loss", [])) - 1 if history.get("loss") else epoch
        if self._header is None:
            self._header = ["epoch"] + sorted(logs)
            self._lines = [self.separator.join(self._header)]
        row = [str(index)] + [_csv_value(logs.get(key, math.nan)) for key in self._header[1:]]
        self._lines.append(self.separator.join(row))
        _write_atomic(self.filename, "\n".join(self._lines) + "\n")

    def __repr__(self):
        return f"CSVLogger({str(self.filename)!r}, separator={self.separator!r}, append={self.append})"


def _csv_value(value):
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_atomic(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def __getattr__(name):
    # TensorBoard lives in its own module (it needs the optional tensorboardX); importing it
    # lazily keeps ``import cnnx`` free of that dependency.
    if name == "TensorBoard":
        from .tensorboard import TensorBoard

        return TensorBoard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_nan(value):
    return isinstance(value, float) and math.isnan(value)
