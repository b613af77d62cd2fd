"""The optional per-batch steps of ``Network.fit``: augmentation, class weights, gradient
clipping and the learning-rate schedule.

This module owns their order inside a training step, so the loop in ``network.py`` stays a few
hook calls::

    xb = extras.augment(xb, epoch, owned)     # before forward
    d = extras.weigh(loss.backward(), ids)    # the loss gradient, per-class weighted
    extras.clip(params)                       # after backward, before the optimizer step
    extras.after_batch(); extras.after_epoch(logs)   # the schedule

Everything is validated when ``FitExtras`` is built, before any training.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import augment as _augment
from .gradients import class_weight_table, clip_grad_norm_

__all__ = ["FitExtras"]

# Third word of the augmentation generator's seed, so its stream never coincides with the
# shuffling's default_rng([seed, epoch]).
_AUGMENT_STREAM = 0x617567


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
            self.schedule._check_fit(has_validation)
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
            self.schedule._fit_step(logs)

    # --- per batch ----------------------------------------------------------------------
    def augment(self, xb, owned):
        """The augmented batch (``owned``: ``xb`` is fit's scratch buffer and may be overwritten)."""
        if self.augmentation is None:
            return xb
        return self.augmentation._transform(xb, self._rng, owned)

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
