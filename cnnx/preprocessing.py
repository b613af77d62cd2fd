"""Preprocessing between the dataset readers and a Network: scaling, standardisation, labels, splits.

This module owns the small array transformations every training script repeats: uint8 pixels
to float32 in [0, 1], mean/std standardisation fitted on the training split only (so no
statistic of the test data leaks into training), integer labels to one-hot rows and back, a
seeded stratified train/validation split, and the channel axis a grey image needs to be NCHW.
Everything is plain NumPy; nothing here touches layers or the compiled kernels.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "scale",
    "Standardizer",
    "standardize",
    "one_hot",
    "from_one_hot",
    "train_val_split",
    "add_channel_axis",
]


def _as_array(x, name):
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:
        raise TypeError(f"Expected {name} to be array-like, received: {type(x).__name__} "
                        f"({exc})") from None


def scale(x, dtype=np.float32):
    """Scale images to floating point in [0, 1].

    Only ``uint8`` input is divided by 255: that is the one dtype whose range is known to be
    0..255. Floating input is assumed to be scaled already and is only cast to ``dtype``
    (a copy is made only when the dtype changes). Other integer dtypes are refused because
    their range is ambiguous (0..255 stored as int64? 0..65535 16-bit images?); convert them
    explicitly.

    Parameters
    ----------
    x : ndarray of any shape, uint8 or floating
    dtype : float32 or float64, default float32

    Returns
    -------
    ndarray of the same shape as ``x`` and dtype ``dtype``

    Raises
    ------
    TypeError
        If ``x`` is neither uint8 nor floating, or ``dtype`` is not a floating dtype.
    """
    x = _as_array(x, "x")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"Expected dtype float32 or float64, received: dtype={dtype}")
    if x.dtype == np.uint8:
        out = x.astype(dtype)
        out /= 255  # in place: one allocation for a 47 MB training set, not two
        return out
    if x.dtype.kind == "f":
        return x.astype(dtype, copy=False)
    raise TypeError(f"Expected x of dtype uint8 (divided by 255) or floating (cast only), "
                    f"received: x.dtype={x.dtype}")


class Standardizer:
    """Subtract a mean and divide by a standard deviation fitted on the training data.

    Statistics are global for grey images ``(n, h, w)`` and per channel for ``(n, c, h, w)``
    (reduced over every axis except axis 1), unless ``per_channel`` says otherwise. A channel
    whose std is below ``eps`` is divided by 1 instead (it is only centred), so constant
    inputs (blank borders) do not become inf/nan.

    Parameters
    ----------
    per_channel : bool or None, default None
        None: per channel for 4-D input, global otherwise. True: statistics per index of
        axis 1 (channels of NCHW or of ``(n, c, length)``, features of ``(n, d)``).
        False: one global mean and std.
    eps : float, default 1e-7

    Attributes
    ----------
    mean_, std_ : ndarray of shape () or (c,), float64
        Set by ``fit``.

    Examples
    --------
    >>> s = Standardizer()
    >>> x_train = s.fit_transform(scale(x_train))     # doctest: +SKIP
    >>> x_test = s.transform(scale(x_test))           # doctest: +SKIP
    """

    def __init__(self, per_channel=None, eps=1e-7):
        if per_channel not in (None, True, False):
            raise TypeError(f"Expected per_channel to be None, True or False, received: "
                            f"per_channel={per_channel!r}")
        if not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"Expected eps >= 0, received: eps={eps!r}")
        self.per_channel = per_channel
        self.eps = float(eps)
        self.mean_ = None
        self.std_ = None

    def __repr__(self):
        fitted = "unfitted" if self.mean_ is None else f"fitted on {self.mean_.size} channel(s)"
        return f"Standardizer(per_channel={self.per_channel!r}, eps={self.eps!r}) [{fitted}]"

    def _resolve_per_channel(self, x):
        per_channel = x.ndim == 4 if self.per_channel is None else self.per_channel
        if per_channel and x.ndim < 2:
            raise ValueError(f"Expected x with a channel axis (ndim >= 2) for per-channel "
                             f"statistics, received: x.shape={x.shape}")
        return per_channel

    def fit(self, x):
        """Compute the mean and std of ``x``.

        Parameters
        ----------
        x : ndarray of shape (n, h, w), (n, c, h, w) or (n, ...), numeric

        Returns
        -------
        self
        """
        x = _as_array(x, "x")
        if x.dtype.kind not in "uif":
            raise TypeError(f"Expected a numeric array, received: x.dtype={x.dtype}")
        if x.ndim < 1 or x.shape[0] == 0:
            raise ValueError(f"Expected at least one sample to fit on, received: "
                             f"x.shape={x.shape}")
        axes = None
        if self._resolve_per_channel(x):
            axes = (0,) + tuple(range(2, x.ndim))
        # float64 accumulation: float32 sums over 47M pixels lose digits of the mean.
        mean = np.mean(x, axis=axes, dtype=np.float64)
        std = np.std(x, axis=axes, dtype=np.float64)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise ValueError("Expected finite values in x, received an array whose mean/std "
                             "is not finite (it contains nan or inf)")
        self.mean_ = np.asarray(mean, dtype=np.float64)
        self.std_ = np.where(std < self.eps, 1.0, std).astype(np.float64)
        return self

    def _broadcast(self, x, stat):
        if stat.ndim == 0:
            return stat
        if x.ndim < 2 or x.shape[1] != stat.shape[0]:
            raise ValueError(f"Expected x with {stat.shape[0]} channels on axis 1 (as fitted), "
                             f"received: x.shape={x.shape}")
        return stat.reshape((1, -1) + (1,) * (x.ndim - 2))

    def transform(self, x, dtype=None, copy=True):
        """Standardise ``x`` with the fitted statistics.

        Parameters
        ----------
        x : ndarray of the fitted layout
        dtype : floating dtype, optional
            Output dtype; default: ``x``'s dtype when floating, else float32.
        copy : bool, default True
            False standardises ``x`` in place when it already is a writeable array of the output
            dtype (no second copy of a large training set); otherwise a copy is made anyway.

        Returns
        -------
        ndarray of the same shape as ``x``
        """
        if self.mean_ is None:
            raise RuntimeError("Expected fit() (or set_state()) before transform(), "
                               "received an unfitted Standardizer")
        x = _as_array(x, "x")
        if x.dtype.kind not in "uif":
            raise TypeError(f"Expected a numeric array, received: x.dtype={x.dtype}")
        if dtype is None:
            dtype = x.dtype if x.dtype.kind == "f" else np.float32
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"Expected a floating output dtype, received: dtype={dtype}")
        mean = self._broadcast(x, self.mean_).astype(dtype)
        std = self._broadcast(x, self.std_).astype(dtype)
        # A copy unless the caller gave its own array away (copy=False): then only when needed.
        out = x.astype(dtype, copy=copy or not x.flags.writeable)
        out -= mean
        out /= std
        return out

    def fit_transform(self, x, dtype=None):
        """``fit(x)`` then ``transform(x)``."""
        return self.fit(x).transform(x, dtype=dtype)

    def get_state(self):
        """The fitted statistics as arrays, for saving with ``np.savez``.

        Returns
        -------
        dict with keys ``"mean"``, ``"std"`` (float64, shape () or (c,)) and
        ``"per_channel"`` (0-d bool array: whether statistics are per channel)
        """
        if self.mean_ is None:
            raise RuntimeError("Expected a fitted Standardizer, received an unfitted one")
        return {
            "mean": self.mean_.copy(),
            "std": self.std_.copy(),
            "per_channel": np.asarray(self.mean_.ndim == 1),
        }

    def set_state(self, state):
        """Restore statistics saved by ``get_state`` (a dict or an ``np.load`` result).

        Returns
        -------
        self
        """
        try:
            mean = np.asarray(state["mean"], dtype=np.float64)
            std = np.asarray(state["std"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Expected a state with numeric 'mean' and 'std' arrays, "
                             f"received: {exc!r}") from None
        if mean.shape != std.shape or mean.ndim > 1:
            raise ValueError(f"Expected 'mean' and 'std' of equal shape () or (c,), received: "
                             f"mean.shape={mean.shape}, std.shape={std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(std > 0) and np.all(np.isfinite(std))):
            raise ValueError("Expected finite 'mean' and finite positive 'std', received "
                             f"mean={mean}, std={std}")
        self.mean_, self.std_ = mean, std
        return self


def standardize(x_train, *x_others, per_channel=None):
    """Standardise ``x_train`` and any other splits with statistics fitted on ``x_train`` only.

    Parameters
    ----------
    x_train : ndarray of shape (n, h, w) or (n, c, h, w)
    *x_others : ndarrays of the same layout (validation, test)
    per_channel : bool or None, default None
        See ``Standardizer``.

    Returns
    -------
    tuple of ndarrays
        ``(x_train_std, *x_others_std)``. Keep a ``Standardizer`` instead when the statistics
        must be saved and reapplied at prediction time.
    """
    s = Standardizer(per_channel=per_channel).fit(x_train)
    return (s.transform(x_train),) + tuple(s.transform(x) for x in x_others)


def _class_ids(labels, name="labels"):
    """Validate 1-D integer(-valued) labels; return them as int64."""
    labels = _as_array(labels, name)
    if labels.ndim != 1:
        raise ValueError(f"Expected {name} of shape (n,), received: {name}.shape={labels.shape}")
    if labels.dtype.kind == "b" or labels.dtype.kind not in "uif":
        raise TypeError(f"Expected integer class ids, received: {name}.dtype={labels.dtype}")
    if labels.dtype.kind == "f":
        # Float labels (e.g. read from a CSV) are fine if every value is a whole number.
        bad = labels[~np.isfinite(labels) | (labels != np.round(labels))]
        if bad.size:
            raise ValueError(f"Expected integer class ids, received non-integer value(s) in "
                             f"{name}: {bad[:5].tolist()}")
    ids = labels.astype(np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError(f"Expected class ids >= 0, received: {name} contains {ids.min()}")
    return ids


def one_hot(labels, n_classes=None, dtype=np.float32):
    """Encode integer class ids as one-hot rows.

    Parameters
    ----------
    labels : array-like of shape (n,)
        Class ids in ``[0, n_classes)``; integer dtype, or floats with whole values.
    n_classes : int, optional
        Number of classes; default ``labels.max() + 1``. Pass it explicitly for a split that
        may lack the last classes.
    dtype : dtype, default float32

    Returns
    -------
    ndarray of shape (n, n_classes)

    Raises
    ------
    TypeError
        If labels are not integer-valued numbers.
    ValueError
        If labels are not 1-D, negative, or ``>= n_classes``.
    """
    ids = _class_ids(labels)
    if n_classes is None:
        if ids.size == 0:
            raise ValueError("Expected n_classes when labels is empty, received: n_classes=None")
        n_classes = int(ids.max()) + 1
    elif not isinstance(n_classes, numbers.Integral) or isinstance(n_classes, bool) \
            or n_classes < 1:
        raise ValueError(f"Expected n_classes to be a positive int, received: "
                         f"n_classes={n_classes!r}")
    if ids.size and ids.max() >= n_classes:
        raise ValueError(f"Expected class ids < n_classes={n_classes}, received: "
                         f"labels contains {ids.max()}")
    out = np.zeros((ids.shape[0], int(n_classes)), dtype=dtype)
    out[np.arange(ids.shape[0]), ids] = 1
    return out


def from_one_hot(y):
    """Class ids from one-hot rows (or class scores/probabilities): the argmax of each row.

    Parameters
    ----------
    y : ndarray of shape (n, n_classes)

    Returns
    -------
    ndarray of shape (n,), int64

    Raises
    ------
    ValueError
        If ``y`` is not 2-D or has no columns.
    """
    y = _as_array(y, "y")
    if y.ndim != 2 or y.shape[1] == 0:
        raise ValueError(f"Expected y of shape (n, n_classes) with n_classes >= 1, received: "
                         f"y.shape={y.shape}")
    return np.argmax(y, axis=1).astype(np.int64)


def _largest_remainder(counts, total):
    """Split ``total`` over classes in proportion to ``counts``, summing exactly to ``total``."""
    quota = counts * (total / counts.sum())
    take = np.floor(quota).astype(np.int64)
    short = total - take.sum()
    # Give the leftover units to the largest fractional parts; stable sort -> ties to lower ids.
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:short]] += 1
    return take


def train_val_split(x, y, val_fraction=0.1, seed=0, stratify=True):
    """Split off a validation set, reproducibly and (by default) stratified by class.

    Parameters
    ----------
    x : ndarray of shape (n, ...)
    y : ndarray of shape (n,) class ids, or (n, n_classes) one-hot rows
    val_fraction : float in (0, 1), default 0.1
        ``round(n * val_fraction)`` samples go to validation (at least 1, at most n - 1).
    seed : int or numpy.random.Generator, default 0
        The same seed gives the same split.
    stratify : bool, default True
        Keep each class's share the same in both parts (a class gets its proportional number
        of validation samples, rounded so the total is exact).

    Returns
    -------
    (x_train, y_train), (x_val, y_val)
        Rows keep their original relative order within each part.

    Raises
    ------
    ValueError
        If lengths differ, there are fewer than 2 samples, or ``val_fraction`` is outside (0, 1).
    """
    x = _as_array(x, "x")
    y = _as_array(y, "y")
    if x.ndim < 1 or y.ndim not in (1, 2) or x.shape[0] != y.shape[0]:
        raise ValueError(f"Expected x of shape (n, ...) and y of shape (n,) or (n, k) with the "
                         f"same n, received: x.shape={x.shape}, y.shape={y.shape}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"Expected at least 2 samples to split, received: n={n}")
    if not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"Expected 0 < val_fraction < 1, received: val_fraction={val_fraction!r}")
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    rng = np.random.default_rng(seed)

    if stratify:
        ids = from_one_hot(y) if y.ndim == 2 else _class_ids(y, "y")
        classes, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        per_class = _largest_remainder(counts, n_val)
        val_parts = []
        for k in range(classes.size):
            members = np.flatnonzero(inverse == k)
            val_parts.append(rng.permutation(members)[:per_class[k]])
        val_idx = np.concatenate(val_parts)
    else:
        val_idx = rng.permutation(n)[:n_val]

    is_val = np.zeros(n, dtype=bool)
    is_val[val_idx] = True
    return (x[~is_val], y[~is_val]), (x[is_val], y[is_val])


def add_channel_axis(x):
    """Turn grey images ``(n, h, w)`` into NCHW ``(n, 1, h, w)`` (a view, no copy).

    Parameters
    ----------
    x : ndarray of shape (n, h, w)

    Returns
    -------
    ndarray of shape (n, 1, h, w)
    """
    x = _as_array(x, "x")
    if x.ndim != 3:
        raise ValueError(f"Expected x of shape (n, h, w), received: x.shape={x.shape}")
    return x[:, np.newaxis]
