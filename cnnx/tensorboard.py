"""The ``TensorBoard`` callback: live training curves, weight histograms and first-layer filters.

This module owns what cnnx writes for TensorBoard. It writes through ``tensorboardX`` (the
optional extra ``cnnx[tensorboard]``), imported only when training starts, in Keras' layout so
train and validation curves overlay in one chart::

    log_dir/train/        epoch_loss, epoch_accuracy, epoch_learning_rate (step = epoch),
                          batch_loss, batch_accuracy, batch_learning_rate (step = optimizer step),
                          histograms "<layer>.<param>", image "filters/<layer>.weight"
    log_dir/validation/   epoch_loss, epoch_accuracy

Watch it with ``tensorboard --logdir log_dir``. Epochs are counted over the network's whole
history and batches by the optimizer's step count, both saved with the network, so a resumed run
extends the same curves.
"""
from __future__ import annotations

import math
import numbers
import os
import time
from pathlib import Path

import numpy as np

from .callbacks import Callback

__all__ = ["TensorBoard", "filter_grid"]


class TensorBoard(Callback):
    """Write training curves, weight histograms and filter images for TensorBoard.

    Parameters
    ----------
    log_dir : str or os.PathLike
        Directory of the event files (``train/`` and ``validation/`` inside it).
    update_freq : "epoch" or int >= 1, default "epoch"
        Also write the batch loss, accuracy and learning rate every this many optimizer steps.
    histogram_freq : int >= 0, default 1
        Write a histogram of every parameter every this many epochs (0: never).
    write_images : bool, default True
        Write the first convolution's filters as an image at each histogram epoch.

    Raises
    ------
    ImportError
        At the start of ``fit`` when tensorboardX is not installed (``pip install cnnx[tensorboard]``).
    """

    def __init__(self, log_dir, update_freq="epoch", histogram_freq=1, write_images=True):
        if not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"Expected log_dir as a str or path, received: {type(log_dir).__name__}")
        if update_freq != "epoch" and (
            not isinstance(update_freq, numbers.Integral) or isinstance(update_freq, bool) or update_freq < 1
        ):
            raise ValueError(f"Expected update_freq 'epoch' or an int >= 1, received: update_freq={update_freq!r}")
        if not isinstance(histogram_freq, numbers.Integral) or isinstance(histogram_freq, bool) or histogram_freq < 0:
            raise ValueError(f"Expected histogram_freq as an int >= 0, received: histogram_freq={histogram_freq!r}")
        self.log_dir = Path(log_dir)
        self.update_freq = update_freq
        self.histogram_freq = int(histogram_freq)
        self.write_images = bool(write_images)
        self._writers = None
        self._lr = None
        self._batch_lr = None

    # --- writers ------------------------------------------------------------------------
    def _open(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError(
                "The TensorBoard callback needs tensorboardX: pip install 'cnnx[tensorboard]' "
                "(or pip install tensorboardX)"
            ) from None
        if self._writers is None:
            # tensorboardX names files by the second and the host: two writers opened within one
            # second (a quick resume) would write the same file, the second truncating the first.
            # Nanoseconds keep them apart and in order (TensorBoard reads files in name order).
            suffix = f".{time.time_ns()}.{os.getpid()}"
            self._writers = {
                name: SummaryWriter(str(self.log_dir / name), filename_suffix=suffix)
                for name in ("train", "validation")
            }

    def close(self):
        """Flush and close the event files (done at the end of ``fit``)."""
        if self._writers is not None:
            for writer in self._writers.values():
                writer.close()
            self._writers = None

    # --- hooks --------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self._open()

    def on_train_end(self, logs=None):
        self.close()

    def on_epoch_begin(self, epoch, logs=None):
        self._lr = self.network.optimizer.lr

    def on_batch_begin(self, batch, logs=None):
        if self.update_freq != "epoch":
            self._batch_lr = self.network.optimizer.lr

    def on_batch_end(self, batch, logs=None):
        if self.update_freq == "epoch" or self._writers is None:
            return
        step = self.network.optimizer.iterations
        if step % self.update_freq:
            return
        train = self._writers["train"]
        logs = logs or {}
        for key in ("loss", "accuracy"):
            value = logs.get(key)
            if value is not None and not _is_nan(value):
                train.add_scalar(f"batch_{key}", value, step)
        train.add_scalar("batch_learning_rate", self._batch_lr, step)

    def on_epoch_end(self, epoch, logs=None):
        if self._writers is None:
            return
        logs = logs or {}
        step = len(self.network.history["loss"]) - 1  # the epoch over the whole history
        train, validation = self._writers["train"], self._writers["validation"]
        for key, value in logs.items():
            if key == "lr" or value is None or _is_nan(value):
                continue
            if key.startswith("val_"):
                validation.add_scalar(f"epoch_{key[4:]}", value, step)
            else:
                train.add_scalar(f"epoch_{key}", value, step)
        train.add_scalar("epoch_learning_rate", logs.get("lr", self._lr), step)
        if self.histogram_freq and step % self.histogram_freq == 0:
            for key, param, _ in self.network.parameters():
                train.add_histogram(key, param, step)
            if self.write_images:
                first = _first_filters(self.network)
                if first is not None:
                    key, weight = first
                    train.add_image(f"filters/{key}", filter_grid(weight), step, dataformats="HWC")
        for writer in self._writers.values():
            writer.flush()

    def __repr__(self):
        return (f"TensorBoard({str(self.log_dir)!r}, update_freq={self.update_freq!r}, "
                f"histogram_freq={self.histogram_freq}, write_images={self.write_images})")


def _first_filters(network):
    """``(key, weight)`` of the first 2-D convolution (a 4-D weight), or None."""
    for key, param, _ in network.parameters():
        if key.endswith(".weight") and param.ndim == 4:
            return key, param
    return None


def filter_grid(weight, tile=24, gap=2):
    """The filters of a convolution as one image: a grid of tiles, each filter scaled to [0, 1].

    Parameters
    ----------
    weight : ndarray of shape (out_channels, in_channels, kh, kw)
        Three input channels are shown in colour; any other number as their mean, in grey.
    tile : int
        Approximate tile size in pixels (each kernel pixel becomes a square block).
    gap : int
        White pixels between tiles.

    Returns
    -------
    ndarray of shape (height, width, 3), float32 in [0, 1]
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise ValueError(f"Expected a weight of shape (out, in, kh, kw), received: shape={w.shape}")
    out, cin, kh, kw = w.shape
    rgb = w.transpose(0, 2, 3, 1) if cin == 3 else np.repeat(w.mean(axis=1)[..., None], 3, axis=3)
    lo = rgb.min(axis=(1, 2, 3), keepdims=True)
    hi = rgb.max(axis=(1, 2, 3), keepdims=True)
    rgb = (rgb - lo) / np.where(hi > lo, hi - lo, 1.0)
    scale = max(1, tile // max(kh, kw))
    rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)  # (out, kh*s, kw*s, 3)
    cols = math.ceil(math.sqrt(out))
    rows = math.ceil(out / cols)
    th, tw = kh * scale, kw * scale
    grid = np.ones((rows * (th + gap) + gap, cols * (tw + gap) + gap, 3), dtype=np.float32)
    for k in range(out):
        r, c = divmod(k, cols)
        top, left = gap + r * (th + gap), gap + c * (tw + gap)
        grid[top:top + th, left:left + tw] = rgb[k]
    return grid


def _is_nan(value):
    return isinstance(value, float) and math.isnan(value)
