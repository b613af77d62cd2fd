"""Loss functions: the value a network minimises and its gradient with respect to the prediction.

This module owns the losses and their target handling. Each loss keeps what ``backward`` needs
from the last ``forward`` (one loss object serves one training loop), so the expensive part --
the softmax of :class:`SoftmaxCrossEntropy`, the residual of :class:`MSE` -- is computed once per
batch. The arithmetic stays in ``pred``'s dtype (float32 or float64); the value comes back as a
Python float.

Contract (docs/INTERNALS.md)::

    value = loss.forward(pred, target)   # mean over the batch
    dpred = loss.backward()              # same shape and dtype as pred

Classification targets are int class ids of shape ``(n,)`` or one-hot / probability rows of shape
``(n, k)``; MSE and binary cross-entropy take targets of ``pred``'s shape.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import functional as F
from .validation import as_array, from_identifier

__all__ = [
    "Loss",
    "MSE",
    "BinaryCrossEntropy",
    "BinaryCrossEntropyWithLogits",
    "CrossEntropy",
    "SoftmaxCrossEntropy",
    "LOSSES",
    "get",
]

# Every Loss subclass by class name: what ``get`` and save/load use to rebuild a loss.
LOSSES: dict[str, type] = {}

# Other spellings people use (Keras and PyTorch names); class names in snake case work without
# being listed here.
_ALIASES = {
    "mean_squared_error": "MSE",
    "bce": "BinaryCrossEntropy",
    "binary_crossentropy": "BinaryCrossEntropy",
    "bce_with_logits": "BinaryCrossEntropyWithLogits",
    "binary_crossentropy_with_logits": "BinaryCrossEntropyWithLogits",
    "categorical_crossentropy": "CrossEntropy",
    "sparse_categorical_crossentropy": "CrossEntropy",
    "nll": "CrossEntropy",
    "softmax_crossentropy": "SoftmaxCrossEntropy",
    "softmax_ce": "SoftmaxCrossEntropy",
}


# ------------------------------------------------------------------------------------------------
# Input checks shared by the losses
# ------------------------------------------------------------------------------------------------
def _check_pred(loss, pred):
    if not isinstance(pred, np.ndarray):
        raise TypeError(f"{loss} expected pred as a numpy array, received: {type(pred).__name__}")
    if pred.dtype not in (np.float32, np.float64):
        raise TypeError(f"{loss} expected pred of dtype float32 or float64, received: dtype={pred.dtype}")
    if pred.ndim < 1:
        raise ValueError(f"{loss} expected pred with at least 1 dimension, received: shape={pred.shape}")
    if pred.shape[0] == 0:
        raise ValueError(f"{loss} expected a batch of at least one sample, received: shape={pred.shape}")


def _check_finite(loss, target):
    if target.dtype.kind == "f" and not np.isfinite(target).all():
        raise ValueError(f"{loss} expected finite targets, received: a target containing NaN or inf")


def _elementwise_target(loss, pred, target):
    """Check ``pred``; return the target of MSE/BCE as an array of ``pred``'s shape and dtype.

    A target of shape ``(n,)`` is accepted for ``pred`` of shape ``(n, 1)`` (labels next to a
    single-output layer); it is reshaped, never broadcast, so an ``(n,)`` vs ``(n, 1)`` slip cannot
    silently turn into an ``(n, n)`` loss as it does with NumPy broadcasting.
    """
    _check_pred(loss, pred)
    target = as_array(target, f"{loss}'s target")
    if target.dtype.kind not in "biuf":
        raise TypeError(f"{loss} expected a numeric target, received: dtype={target.dtype}")
    if target.shape != pred.shape:
        if pred.ndim == 2 and pred.shape[1] == 1 and target.shape == pred.shape[:1]:
            target = target.reshape(pred.shape)
        else:
            raise ValueError(f"{loss} expected target of shape {pred.shape} (as pred), received: shape={target.shape}")
    _check_finite(loss, target)
    return np.asarray(target, dtype=pred.dtype)


def _class_target(loss, pred, target):
    """Check ``pred`` of shape ``(n, k)`` and validate its classification target.

    Returns ``(ids, None)`` with ids an intp array of shape ``(n,)``, or ``(None, rows)`` with rows
    of shape ``(n, k)`` in ``pred``'s dtype.
    """
    _check_pred(loss, pred)
    if pred.ndim != 2:
        raise ValueError(f"{loss} expected pred of shape (n, classes), received: shape={pred.shape}")
    n, k = pred.shape
    target = as_array(target, f"{loss}'s target")
    kind = target.dtype.kind
    if target.ndim == 1:
        if target.shape[0] != n:
            raise ValueError(
                f"{loss} expected {n} class ids (one per row of pred), received: target shape={target.shape}"
            )
        if kind in "iu":
            ids = target
        elif kind == "f":
            _check_finite(loss, target)
            if not np.array_equal(target, np.floor(target)):
                bad = target[target != np.floor(target)][0]
                raise ValueError(f"{loss} expected integer class ids, received: a non-integer id {float(bad)!r}")
            ids = target
        else:
            raise TypeError(f"{loss} expected integer class ids, received: dtype={target.dtype}")
        lo, hi = ids.min(), ids.max()
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{loss} expected class ids in [0, {k}), received: a class id {bad}")
        return ids.astype(np.intp, copy=False), None
    if target.ndim == 2:
        if target.shape != pred.shape:
            raise ValueError(
                f"{loss} expected one-hot/probability target of shape {pred.shape} (as pred), "
                f"received: shape={target.shape}"
            )
        if kind not in "biuf":
            raise TypeError(f"{loss} expected a numeric target, received: dtype={target.dtype}")
        _check_finite(loss, target)
        return None, np.asarray(target, dtype=pred.dtype)
    raise ValueError(
        f"{loss} expected target of class ids (n,) or one-hot rows (n, classes), received: shape={target.shape}"
    )


def _check_eps(eps):
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not 0.0 < eps < 0.5:
        raise ValueError(f"Expected eps in (0, 0.5), received: eps={eps!r}")
    return float(eps)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
class Loss:
    """Base class: ``forward(pred, target) -> float``, ``backward() -> dpred``, ``get_config()``.

    Subclasses register themselves in :data:`LOSSES` by class name.
    """

    #: The activation that turns ``pred`` into probabilities ("softmax", "sigmoid"), applied by
    #: callers that want them (``Network.predict``, the ONNX export); None when ``pred`` is not logits.
    output_activation = None
    #: True when ``pred`` must already be probabilities (after a Softmax / Sigmoid layer).
    takes_probabilities = False
    #: True for element-wise losses, which take targets of pred's shape (class ids become one-hot rows).
    dense_targets = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # a shared private base is no loss of its own
            LOSSES[cls.__name__] = cls

    @property
    def from_logits(self):
        """True when ``pred`` is a raw score (logit) rather than a probability (``output_activation`` is set)."""
        return self.output_activation is not None

    def forward(self, pred, target):
        """Return the loss value (a Python float) and keep what ``backward`` needs."""
        raise NotImplementedError

    def backward(self):
        """Return the gradient of the last ``forward`` value with respect to ``pred``."""
        raise NotImplementedError

    def get_config(self):
        """JSON-serialisable constructor arguments: ``type(loss)(**loss.get_config())`` rebuilds it."""
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    #: What the last ``forward`` kept for ``backward`` (None before the first ``forward``).
    _cache = None

    def _cached(self):
        """What the last ``forward`` kept; a RuntimeError when there was none."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        return self._cache


class MSE(Loss):
    """Mean squared error over all elements, as ``torch.nn.MSELoss()``.

    ``loss = mean((pred - target) ** 2)``; ``dpred = 2 (pred - target) / pred.size``.

    Parameters of ``forward``
    -------------------------
    pred : ndarray of any shape ``(n, ...)``, float32 or float64
    target : ndarray of pred's shape (or ``(n,)`` when pred is ``(n, 1)``)
    """

    dense_targets = True

    def forward(self, pred, target):
        target = _elementwise_target(self, pred, target)
        diff = self._cache = np.subtract(pred, target)
        flat = diff.reshape(-1)
        # dot is one BLAS pass with no temporary, instead of squaring into a new array then summing
        return float(np.dot(flat, flat)) / flat.size

    def backward(self):
        diff = self._cached()
        return diff * (2.0 / diff.size)


class _ClippedProbabilityLoss(Loss):
    """A loss on probabilities, clipped ``eps`` away from 0 (and 1) so that its log stays finite."""

    takes_probabilities = True

    def __init__(self, eps=1e-7):
        self.eps = _check_eps(eps)

    def get_config(self):
        return {"eps": self.eps}


class BinaryCrossEntropy(_ClippedProbabilityLoss):
    """Binary cross-entropy on probabilities (after a Sigmoid), mean over all elements, as
    ``torch.nn.BCELoss()``.

    ``loss = -mean(t log p + (1 - t) log(1 - p))`` with ``p`` clipped to ``[eps, 1 - eps]`` so a
    saturated sigmoid gives a large but finite value. The gradient ``(p - t) / (p (1 - p)) / size``
    is taken at the clipped ``p``: a saturated wrong prediction keeps being pushed back (as torch's
    does) instead of getting the zero gradient of a hard clip.

    Parameters
    ----------
    eps : float, default 1e-7
        Clipping margin; 1e-7 stays distinct from 0 and 1 in float32.
    """

    dense_targets = True

    def forward(self, pred, target):
        target = _elementwise_target(self, pred, target)
        if target.size and (target.min() < 0 or target.max() > 1):
            bad = target.min() if target.min() < 0 else target.max()
            raise ValueError(f"{self} expected targets in [0, 1], received: a target {float(bad)!r}")
        p = np.clip(pred, self.eps, 1.0 - self.eps)
        one_minus_p = 1.0 - p
        log_p = np.log(p)
        log_1mp = np.log(one_minus_p)
        # t log p + (1 - t) log(1 - p) = log(1 - p) + t (log p - log(1 - p)): one product, not two
        np.subtract(log_p, log_1mp, out=log_p)
        log_p *= target
        log_p += log_1mp
        self._cache = (p, one_minus_p, target)
        return -float(log_p.sum(dtype=np.float64)) / log_p.size

    def backward(self):
        p, one_minus_p, target = self._cached()
        d = np.subtract(p, target)
        denom = p * one_minus_p
        denom *= p.size
        d /= denom
        return d


class BinaryCrossEntropyWithLogits(Loss):
    """Sigmoid + binary cross-entropy fused on logits, as ``torch.nn.BCEWithLogitsLoss()``.

    ``loss = mean(max(x, 0) - x t + log(1 + exp(-|x|)))`` never overflows; the gradient is
    ``(sigmoid(x) - t) / size``.
    """

    output_activation = "sigmoid"
    dense_targets = True

    def forward(self, pred, target):
        target = _elementwise_target(self, pred, target)
        # exp(-|x|) <= 1: the stable form needs no clipping
        e = np.abs(pred)
        np.negative(e, out=e)
        np.exp(e, out=e)
        value = np.log1p(e)
        value += np.maximum(pred, 0)
        value -= pred * target
        # sigmoid(x) = 1/(1+e) for x >= 0, e/(1+e) for x < 0, with e = exp(-|x|)
        sig = np.where(pred >= 0, 1.0, e)
        e += 1.0
        sig /= e
        self._cache = (sig.astype(pred.dtype, copy=False), target)
        return float(value.sum(dtype=np.float64)) / value.size

    def backward(self):
        sig, target = self._cached()
        d = np.subtract(sig, target)
        d *= 1.0 / d.size
        return d


class CrossEntropy(_ClippedProbabilityLoss):
    """Categorical cross-entropy on probabilities (after a Softmax layer).

    ``loss = -mean_i sum_j t_ij log p_ij`` with ``p`` clipped to ``[eps, 1]``; for class ids this is
    ``-mean_i log p[i, y_i]``. Equals ``F.nll_loss(log(p), y)`` (ids) or
    ``-(t * log(p)).sum(1).mean()`` (rows). The gradient ``-t / (n p)`` is taken at the clipped p.

    Prefer :class:`SoftmaxCrossEntropy` on logits when the network ends with a softmax: it is
    exact where a probability underflows to 0.

    Parameters
    ----------
    eps : float, default 1e-7
    """

    def forward(self, pred, target):
        ids, rows = _class_target(self, pred, target)
        n = pred.shape[0]
        if ids is not None:
            # only the n picked probabilities matter: no (n, k) temporary
            picked = np.maximum(pred[np.arange(n), ids], self.eps)
            self._cache = (pred.shape, pred.dtype, ids, picked, None, None)
            return -float(np.log(picked).sum(dtype=np.float64)) / n
        p = np.maximum(pred, self.eps)
        log_p = np.log(p)
        log_p *= rows
        self._cache = (pred.shape, pred.dtype, None, None, p, rows)
        return -float(log_p.sum(dtype=np.float64)) / n

    def backward(self):
        shape, dtype, ids, picked, p, rows = self._cached()
        n = shape[0]
        if ids is not None:
            d = np.zeros(shape, dtype=dtype)
            d[np.arange(n), ids] = -1.0 / (n * picked)
            return d
        d = np.divide(rows, p)
        d *= -1.0 / n
        return d


class SoftmaxCrossEntropy(Loss):
    """Softmax + cross-entropy fused on logits, as ``torch.nn.CrossEntropyLoss()``.

    ``loss = mean_i (logsumexp(z_i) - sum_j t_ij z_ij)`` computed with the row maximum
    subtracted, so logits of any magnitude give a finite value; the gradient is
    ``(softmax(z) * sum_j t_ij - t) / n``, i.e. ``(softmax(z) - onehot) / n`` for class ids.
    ``forward`` computes the value and the gradient in one compiled pass; ``backward`` returns it.

    Parameters
    ----------
    label_smoothing : float in [0, 1], default 0
        As torch: the target becomes ``(1 - label_smoothing) t + label_smoothing / k``.
    """

    output_activation = "softmax"

    def __init__(self, label_smoothing=0.0):
        if (
            not isinstance(label_smoothing, numbers.Real)
            or isinstance(label_smoothing, bool)
            or not 0.0 <= label_smoothing <= 1.0
        ):
            raise ValueError(f"Expected label_smoothing in [0, 1], received: label_smoothing={label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def get_config(self):
        return {"label_smoothing": self.label_smoothing}

    def forward(self, pred, target):
        ids, rows = _class_target(self, pred, target)
        k = pred.shape[1]
        eps = self.label_smoothing
        if rows is not None and eps:
            rows = rows * (1.0 - eps)
            rows += eps / k
        # One compiled pass per row: row maximum, exp, logsumexp, the value and the gradient.
        value, self._cache = F.softmax_cross_entropy(pred, ids=ids, rows=rows, label_smoothing=eps)
        return value

    def backward(self):
        return self._cached().copy()


# ------------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------------
def get(identifier, **kwargs):
    """Return a loss instance from an instance, a class, a name or a config dict.

    Parameters
    ----------
    identifier : Loss, Loss subclass, str or dict
        A name is a class name (``"SoftmaxCrossEntropy"``) or its snake case
        (``"softmax_cross_entropy"``, ``"mse"``) or a common alias (``"categorical_crossentropy"``,
        ``"binary_crossentropy"``); matching ignores case, underscores and hyphens. A dict is
        ``{"class": name, "config": {...}}`` as save/load writes it.
    **kwargs
        Constructor arguments, when ``identifier`` is a name or class.

    Returns
    -------
    Loss
    """
    return from_identifier(identifier, Loss, LOSSES, ("a Loss", "a loss"), kwargs, _ALIASES)
