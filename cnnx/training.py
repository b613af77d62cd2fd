"""The training loop behind ``Network.fit``, its history and progress display, and the optional
per-batch steps (augmentation, class weights, gradient clipping, the learning-rate schedule).

This module owns training; the ``Network`` (cnnx.network) owns the layers and the public calls
and hands ``fit`` over to :func:`fit`, which uses only the network's public API. Everything a
user can get wrong is checked once per call, before any work; the per-batch loop then runs
without validation and without avoidable allocation: shuffled batches are gathered into buffers
allocated once per ``fit`` call, in-order batches are views.

The optional steps live in :class:`FitExtras`, which owns their order inside a training step::

    xb = extras.augment(xb, epoch, owned)     # before forward
    d = extras.weigh(loss.backward(), ids)    # the loss gradient, per-class weighted
    extras.clip(params)                       # after backward, before the optimizer step
    extras.after_batch(); extras.after_epoch(logs)   # the schedule

Everything is validated when ``FitExtras`` is built, before any training.
"""
from __future__ import annotations

import math
import numbers
import sys

import numpy as np

from . import augment as _augment
from .gradients import class_weight_table, clip_grad_norm_
from .validation import check_int

__all__ = ["fit", "evaluate_batches", "correct_counter", "class_threshold", "FitExtras", "NonFiniteLossError"]

# The progress bar's postfix (running loss / accuracy) is refreshed every this many batches:
# formatting it is cheap but not free, and nobody reads it faster than that.
_POSTFIX_EVERY = 10

# Third word of the augmentation generator's seed, so its stream never coincides with the
# shuffling's default_rng([seed, epoch]).
_AUGMENT_STREAM = 0x617567


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite.

    Attributes
    ----------
    epoch, batch : int
        Zero-based indices (as callbacks see them) of the epoch and batch where it happened.
    value : float
        The offending loss value.
    """

    def __init__(self, message, epoch, batch, value):
        super().__init__(message)
        self.epoch = epoch
        self.batch = batch
        self.value = value


def fit(net, x, y, epochs=1, batch_size=32, validation_data=None, shuffle=True, seed=None,
        callbacks=None, verbose=1, augment=None, clip_grad_norm=None, class_weight=None,
        distributed=None):
    """Train the compiled ``net``: the loop of ``Network.fit`` (see it for the parameters).

    Returns ``net.history``, grown by one entry per epoch trained in every list.
    """
    # ---- validation: everything before any work ----
    epochs = check_int(epochs, "epochs", minimum=0)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    if verbose not in (0, 1, 2):
        raise ValueError(f"Expected verbose 0, 1 or 2, received: verbose={verbose!r}")
    x = net.check_inputs(x, "x")
    targets, ids = net.check_targets(y, len(x), "y")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise TypeError(
                "Expected validation_data to be a tuple (x_val, y_val), received: "
                f"{type(validation_data).__name__}"
                + (f" of length {len(validation_data)}" if isinstance(validation_data, (tuple, list)) else "")
            )
        x_val = net.check_inputs(validation_data[0], "x_val")
        val_targets, val_ids = net.check_targets(validation_data[1], len(x_val), "y_val")
    callbacks = check_callbacks(callbacks)
    if seed is not None:
        seed = check_int(seed, "seed", minimum=0)
    sync = None  # distributed training: cnnx.distributed owns every exchange between ranks
    if distributed is not None:
        from .distributed import data_parallel

        sync = data_parallel(distributed)
        seed, callbacks, verbose = sync.begin_fit(net, len(x), batch_size, shuffle, seed, callbacks, verbose)
    # With a seed, epoch e's order comes from (seed, e) counted over the whole history, so a
    # network saved after 2 epochs and loaded again shuffles epoch 3 as an unbroken run would.
    fresh_rng = np.random.default_rng() if shuffle and seed is None else None
    extras = FitExtras(net, augment, clip_grad_norm, class_weight, ids, seed, validation_data is not None)

    n = len(x)
    n_batches = -(-n // batch_size)
    if shuffle:
        # Gather buffers, allocated once per call; np.take(..., mode="clip") writes straight
        # into them (mode="raise" would go through a temporary).
        bs = min(batch_size, n)
        x_buf = np.empty((bs,) + x.shape[1:], dtype=x.dtype)
        t_buf = np.empty((bs,) + targets.shape[1:], dtype=targets.dtype)
        i_buf = t_buf if ids is targets else (None if ids is None else np.empty(bs, dtype=ids.dtype))

    history = net.history
    _ensure_keys(history, ("loss", "accuracy"))
    if validation_data is not None:
        _ensure_keys(history, ("val_loss", "val_accuracy"))
    if extras.schedule is not None:
        _ensure_keys(history, ("lr",))
    net.stop_training = False
    for cb in callbacks:
        cb.set_network(net)
    for cb in callbacks:
        cb.on_train_begin({})

    forward, backward = net.forward_checked, net.backward
    loss_fn, step, parameters = net.loss, net.optimizer.step, net.parameters
    count_correct = correct_counter(net)

    epochs_done = len(history["loss"])
    for epoch in range(epochs):
        for cb in callbacks:
            cb.on_epoch_begin(epoch, {})
        bar = _progress_bar(n_batches, epoch, epochs) if verbose == 1 else None
        if shuffle:
            rng = fresh_rng if seed is None else np.random.default_rng([seed, epochs_done + epoch])
            order = rng.permutation(n)
        loss_sum = 0.0
        correct = 0
        seen = 0
        epoch_lr = net.optimizer.lr
        extras.start_epoch(epochs_done + epoch)
        try:
            for b in range(n_batches):
                lo = b * batch_size
                hi = min(lo + batch_size, n)
                if sync is not None:
                    lo, hi = sync.local_range(lo, hi)
                m = hi - lo
                if shuffle:
                    idx = order[lo:hi]
                    xb = np.take(x, idx, axis=0, out=x_buf[:m], mode="clip")
                    tb = np.take(targets, idx, axis=0, out=t_buf[:m], mode="clip")
                    if i_buf is t_buf:
                        ib = tb
                    elif i_buf is not None:
                        ib = np.take(ids, idx, out=i_buf[:m], mode="clip")
                    else:
                        ib = None
                else:
                    xb, tb = x[lo:hi], targets[lo:hi]
                    ib = None if ids is None else ids[lo:hi]
                if callbacks:
                    for cb in callbacks:
                        cb.on_batch_begin(b, {"batch": b, "size": m})

                xb = extras.augment(xb, owned=shuffle)
                out = forward(xb, True)
                value = float(loss_fn.forward(out, tb))
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"Loss became {value} at epoch {epoch + 1}/{epochs}, batch {b + 1}/{n_batches} "
                        "(1-based); check the inputs' scale or lower the learning rate",
                        epoch, b, value,
                    )
                batch_correct = count_correct(out, ib)
                backward(extras.weigh(loss_fn.backward(), ib))
                if sync is not None:
                    sync.allreduce_gradients()  # before clipping: the norm is the global batch's
                params = parameters()
                extras.clip(params)
                step(params)
                extras.after_batch()

                loss_sum += value * m
                correct += batch_correct
                seen += m
                if bar is not None:
                    bar.update(1)
                    if b % _POSTFIX_EVERY == 0:
                        bar.set_postfix_str(_format_metrics(loss_sum / seen, correct / seen), refresh=False)
                if callbacks:
                    logs = {"batch": b, "size": m, "loss": value,
                            "accuracy": batch_correct / m if ib is not None else math.nan}
                    for cb in callbacks:
                        cb.on_batch_end(b, logs)
                    if net.stop_training:
                        break

            if sync is not None:
                loss_sum, correct, seen = sync.sum_over_ranks(loss_sum, correct, seen)
            logs = {"loss": loss_sum / seen, "accuracy": correct / seen if ids is not None else math.nan}
            if extras.schedule is not None:
                logs["lr"] = epoch_lr
            if validation_data is not None:
                if sync is None:
                    val = evaluate_batches(net, x_val, val_targets, val_ids, 256)
                else:
                    val = sync.evaluate(x_val, val_targets, val_ids, 256)
                logs["val_loss"], logs["val_accuracy"] = val["loss"], val["accuracy"]
            for key in history:
                history[key].append(logs.get(key, math.nan))
            extras.after_epoch(logs)
            if bar is not None:
                bar.set_postfix_str(_format_metrics(**logs), refresh=False)
        finally:
            if bar is not None:
                bar.close()
        if verbose == 2:
            print(f"Epoch {epoch + 1}/{epochs}: {_format_metrics(**logs)}", file=sys.stderr)
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
        if net.stop_training:
            break

    for cb in callbacks:
        cb.on_train_end({key: values[-1] for key, values in history.items() if values})
    return history


def evaluate_batches(net, x, targets, ids, batch_size):
    """Mean loss and accuracy of ``net`` over checked inputs and targets, in eval mode.

    ``x`` from ``net.check_inputs``, ``(targets, ids)`` from ``net.check_targets``; accuracy is
    NaN when ``ids`` is None (outputs that are not class scores).
    """
    n = len(x)
    loss_fn = net.loss
    count_correct = correct_counter(net)
    loss_sum = 0.0
    correct = 0
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        out = net.forward_checked(x[lo:hi], False)
        loss_sum += float(loss_fn.forward(out, targets[lo:hi])) * (hi - lo)
        if ids is not None:
            correct += count_correct(out, ids[lo:hi])
    return {"loss": loss_sum / n, "accuracy": correct / n if ids is not None else math.nan}


def class_threshold(loss):
    """The decision threshold of a single-output binary classifier trained with ``loss``: 0 on
    logits (the loss applies a sigmoid), 0.5 on probabilities."""
    return 0.0 if getattr(loss, "output_activation", None) == "sigmoid" else 0.5


def correct_counter(net):
    """A function ``(outputs, ids) -> number of correct predictions`` for ``net``'s output kind."""
    if len(net.output_shape) != 1:
        return lambda out, ids: 0
    if net.output_shape[0] == 1:
        threshold = class_threshold(net.loss)

        def count(out, ids):
            return 0 if ids is None else int(np.count_nonzero((out[:, 0] > threshold) == ids))
    else:
        def count(out, ids):
            return 0 if ids is None else int(np.count_nonzero(out.argmax(axis=1) == ids))
    return count


def check_callbacks(callbacks):
    """``callbacks`` as a list of ``cnnx.callbacks.Callback`` (None: empty)."""
    if callbacks is None:
        return []
    from .callbacks import Callback

    if isinstance(callbacks, Callback):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    for i, cb in enumerate(callbacks):
        if not isinstance(cb, Callback):
            raise TypeError(f"Expected callbacks to be Callback instances, received at index {i}: {type(cb).__name__}")
    return callbacks


# ---------------------------------------------------------------------- history and display ----
def _ensure_keys(history, keys):
    """Add missing lists, padded with NaN for the epochs already recorded (a history set by
    ``cnnx.load`` or by hand may lack some), so that every list has one entry per epoch."""
    length = max((len(v) for v in history.values()), default=0)
    for key in keys:
        if key not in history:
            history[key] = [math.nan] * length


def _format_metrics(loss, accuracy, val_loss=None, val_accuracy=None, lr=None):
    text = f"loss={loss:.4f}, acc={accuracy:.4f}"
    if val_loss is not None:
        text += f", val_loss={val_loss:.4f}, val_acc={val_accuracy:.4f}"
    return text


def _progress_bar(total, epoch, epochs):
    from tqdm import tqdm

    # Redrawn often on a terminal; into a log file (CI, nohup) only every few seconds.
    # leave=True: the closed bar, showing the epoch's final figures, is the epoch's record
    # (the cnnx command prints no second line beside it).
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, unit="batch", desc=f"Epoch {epoch + 1}/{epochs}", leave=True,
                dynamic_ncols=True, mininterval=0.1 if interactive else 5.0)


class FitExtras:
    """The options of one ``fit`` call beyond the plain loop (see ``Network.fit``)."""

    def __init__(self, network, augment, clip_grad_norm, class_weight, ids, seed, has_validation):
        self.augmentation = _augment.as_augmentation(augment)
        if self.augmentation is not None and len(network.input_shape) != 3:
            raise ValueError(
                f"Expected image inputs (c, h, w) for augment, received: a network with input shape "
                f"{network.input_shape}"
            )
        if clip_grad_norm is not None and (
            not isinstance(clip_grad_norm, numbers.Real) or isinstance(clip_grad_norm, bool)
            or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0
        ):
            raise ValueError(f"Expected clip_grad_norm > 0 or None, received: clip_grad_norm={clip_grad_norm!r}")
        self.clip_grad_norm = clip_grad_norm
        self.class_weights = None
        if class_weight is not None:
            if ids is None:
                raise ValueError("Expected class labels (class ids or one-hot rows) with class_weight, "
                                 "received: targets that are not classes")
            n_classes = max(network.output_shape[0], 2)
            self.class_weights = class_weight_table(class_weight, ids, n_classes, network.dtype)
        self.schedule = getattr(network.optimizer, "schedule", None)
        if self.schedule is not None:
            self.schedule.check_fit(has_validation)
        self.seed = seed
        self._fresh_rng = np.random.default_rng() if seed is None else None
        self._rng = None

    # --- per epoch ----------------------------------------------------------------------
    def start_epoch(self, epoch):
        """``epoch`` counts over the network's whole history (as the shuffling's seed does)."""
        if self.augmentation is not None:
            self._rng = self._fresh_rng or np.random.default_rng([self.seed, epoch, _AUGMENT_STREAM])

    def after_epoch(self, logs):
        if self.schedule is not None and self.schedule.interval == "epoch":
            self.schedule.fit_step(logs)

    # --- per batch ----------------------------------------------------------------------
    def augment(self, xb, owned):
        """The augmented batch (``owned``: ``xb`` is fit's scratch buffer and may be overwritten)."""
        if self.augmentation is None:
            return xb
        return self.augmentation.transform(xb, self._rng, owned)

    def weigh(self, dloss, ids):
        """The loss gradient of ``sum_i w[y_i] l_i / n``: row i of ``dloss`` times ``w[y_i]``."""
        if self.class_weights is None:
            return dloss
        w = self.class_weights[ids]
        dloss *= w.reshape((len(w),) + (1,) * (dloss.ndim - 1))
        return dloss

    def clip(self, params):
        if self.clip_grad_norm is not None:
            clip_grad_norm_(params, self.clip_grad_norm)

    def after_batch(self):
        if self.schedule is not None and self.schedule.interval == "batch":
            self.schedule.step()
