"""Gradient utilities used by the training loop: clipping by global norm, class weights.

This module owns what ``Network.fit`` does to the gradients between ``backward`` and the
optimizer's ``step``: ``clip_grad_norm_`` (PyTorch's ``torch.nn.utils.clip_grad_norm_``) and the
per-class weights of ``fit(..., class_weight=...)`` (Keras' ``class_weight``).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["clip_grad_norm_", "class_weight_table"]


def clip_grad_norm_(parameters, max_norm):
    """Scale every gradient in place so that their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the norm is taken over all gradients together, and
    when it exceeds ``max_norm`` every gradient is multiplied by ``max_norm / (norm + 1e-6)``.

    Parameters
    ----------
    parameters : iterable of (key, param, grad)
        As ``Network.parameters()``; entries whose grad is None are skipped.
    max_norm : float > 0

    Returns
    -------
    float
        The global norm before clipping.
    """
    if not isinstance(max_norm, numbers.Real) or isinstance(max_norm, bool) or not (
        math.isfinite(max_norm) and max_norm > 0
    ):
        raise ValueError(f"Expected max_norm as a finite number > 0, received: max_norm={max_norm!r}")
    grads = [g for _, _, g in parameters if g is not None]
    # Sum of squares in float64 whatever the grads' dtype: no overflow, no loss of small terms.
    total = 0.0
    for g in grads:
        flat = g.reshape(-1).astype(np.float64, copy=False)
        total += float(np.dot(flat, flat))
    norm = math.sqrt(total)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return norm


def class_weight_table(class_weight, ids, n_classes, dtype):
    """``fit``'s ``class_weight`` as an array ``table[class] -> weight`` of ``n_classes`` entries.

    Parameters
    ----------
    class_weight : dict {class id: weight} or "balanced"
        Classes missing from a dict weigh 1. "balanced" weighs class ``c`` by
        ``n_samples / (n_classes * count[c])`` (scikit-learn's rule; absent classes weigh 1).
    ids : ndarray of shape (n,)
        The training labels as class ids.
    n_classes : int
    dtype : numpy dtype of the table

    Returns
    -------
    ndarray of shape (n_classes,)
    """
    table = np.ones(n_classes, dtype=np.float64)
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise ValueError(f"Expected class_weight a dict or 'balanced', received: {class_weight!r}")
        counts = np.bincount(ids, minlength=n_classes)
        present = counts > 0
        table[present] = len(ids) / (n_classes * counts[present])
        return table.astype(dtype)
    if not isinstance(class_weight, dict):
        raise TypeError(f"Expected class_weight a dict {{class id: weight}} or 'balanced', received: "
                        f"{type(class_weight).__name__}")
    for key, weight in class_weight.items():
        if not isinstance(key, numbers.Integral) or isinstance(key, bool) or not 0 <= key < n_classes:
            raise ValueError(f"Expected class_weight keys as class ids in [0, {n_classes}), received: {key!r}")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not (
            math.isfinite(weight) and weight >= 0
        ):
            raise ValueError(f"Expected class_weight values as finite numbers >= 0, received: {key}: {weight!r}")
        table[int(key)] = float(weight)
    return table.astype(dtype)
