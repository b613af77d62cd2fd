"""Classification metrics: accuracy and the confusion matrix.

This module owns turning predictions and labels into scores. Labels come in the same forms the
losses take: int class ids ``(n,)`` or one-hot / probability rows ``(n, k)``. Predictions are the
network's outputs (probabilities or logits: argmax does not care which).
"""
from __future__ import annotations

import numpy as np

from .validation import as_array

__all__ = ["accuracy", "confusion_matrix"]


def _labels(name, y, n_classes=None):
    """Class ids ``(n,)`` as intp from ids or rows ``(n, k)`` (argmax); checks range when known."""
    y = as_array(y, name)
    if y.ndim == 2:
        if y.shape[1] == 1:
            raise ValueError(f"Expected {name} as class ids (n,) or rows (n, k>1), received: shape={y.shape}")
        ids = y.argmax(axis=1)
    elif y.ndim != 1:
        raise ValueError(f"Expected {name} as class ids (n,) or rows (n, k), received: shape={y.shape}")
    else:
        if y.dtype.kind == "f":
            if not np.isfinite(y).all() or not np.array_equal(y, np.floor(y)):
                raise ValueError(f"Expected {name} as integer class ids, received: non-integer or non-finite values")
        elif y.dtype.kind not in "iu":
            raise TypeError(f"Expected {name} as integer class ids, received: dtype={y.dtype}")
        ids = y.astype(np.intp, copy=False)
    if ids.size and ids.min() < 0:
        raise ValueError(f"Expected {name} class ids >= 0, received: a class id {ids.min()}")
    if n_classes is not None and ids.size and ids.max() >= n_classes:
        raise ValueError(f"Expected {name} class ids in [0, {n_classes}), received: a class id {ids.max()}")
    return ids


def accuracy(pred, target, threshold=0.5):
    """Fraction of samples whose predicted class equals the target class.

    Parameters
    ----------
    pred : ndarray of shape (n, k) with k > 1, or (n, 1) / (n,) for a single (binary) output
        Scores per class: the predicted class is the argmax. A single output is a probability of
        class 1, thresholded at ``threshold`` (pass ``threshold=0`` for a logit).
    target : ndarray of shape (n,) (class ids) or (n, k) (one-hot / probability rows, argmax)
        For a single output: 0/1 labels of shape (n,) or (n, 1) (soft labels count as 1 from 0.5).
    threshold : float, default 0.5

    Returns
    -------
    float in [0, 1]
    """
    pred = as_array(pred, "pred")
    target = as_array(target, "target")
    if pred.ndim == 0 or pred.shape[0] == 0:
        raise ValueError(f"Expected pred with at least one sample, received: shape={pred.shape}")
    n = pred.shape[0]
    binary = pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1)
    if binary:
        p = pred.reshape(n)
        if target.shape not in ((n,), (n, 1)):
            raise ValueError(
                f"Expected target of shape ({n},) or ({n}, 1) for a single-output pred, received: shape={target.shape}"
            )
        t = target.reshape(n)
        if t.dtype.kind == "f" and not np.isfinite(t).all():
            raise ValueError("Expected finite targets, received: a target containing NaN or inf")
        return float(np.mean((p > threshold) == (t >= 0.5)))
    if pred.ndim != 2:
        raise ValueError(f"Expected pred of shape (n, classes), received: shape={pred.shape}")
    k = pred.shape[1]
    if target.ndim == 2 and target.shape != pred.shape:
        raise ValueError(f"Expected one-hot target of shape {pred.shape} (as pred), received: shape={target.shape}")
    if target.ndim == 1 and target.shape[0] != n:
        raise ValueError(f"Expected {n} class ids (one per row of pred), received: target shape={target.shape}")
    t = _labels("target", target, k)
    return float(np.mean(pred.argmax(axis=1) == t))


def confusion_matrix(y_true, y_pred, n_classes=None):
    """Count of samples per (true class, predicted class).

    Parameters
    ----------
    y_true : ndarray of shape (n,) (class ids) or (n, k) (one-hot rows, argmax)
    y_pred : ndarray of shape (n,) (class ids) or (n, k) (scores, argmax)
    n_classes : int, optional
        Size ``k`` of the matrix; inferred as ``max id + 1`` (or the row width) when omitted.

    Returns
    -------
    ndarray of shape (k, k), int64
        ``m[i, j]`` = number of samples of true class ``i`` predicted as class ``j`` (rows are the
        true class, as scikit-learn).
    """
    if n_classes is not None:
        if not isinstance(n_classes, (int, np.integer)) or isinstance(n_classes, bool) or n_classes < 1:
            raise ValueError(f"Expected n_classes as an int >= 1, received: n_classes={n_classes!r}")
        n_classes = int(n_classes)
    t = _labels("y_true", y_true, n_classes)
    p = _labels("y_pred", y_pred, n_classes)
    if t.shape != p.shape:
        raise ValueError(
            f"Expected y_true and y_pred with the same number of samples, received: {t.shape[0]} and {p.shape[0]}"
        )
    if n_classes is None:
        widths = [np.shape(y)[1] for y in (y_true, y_pred) if np.ndim(y) == 2]
        n_classes = max([int(t.max()) + 1 if t.size else 0, int(p.max()) + 1 if p.size else 0, *widths, 1])
    # one bincount over the flattened (true, pred) pair instead of a Python loop
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64, copy=False)
