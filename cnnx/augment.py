"""Data augmentation for training batches: random crop with padding, horizontal flip, random
translation and Cutout, composable and seeded.

This module owns the augmentations. Each one transforms a whole batch ``(n, c, h, w)`` at once
with a few vectorised NumPy passes (one gather for the shifts, one masked multiply for Cutout),
so it costs a small fraction of a training step (``benchmarks/augment.py`` measures it).
``Network.fit(..., augment=...)`` applies it to every training batch with a generator seeded
from ``fit``'s ``seed`` and the epoch, so a seeded run repeats exactly (and a resumed one
continues the same sequence); ``evaluate``, ``predict`` and the validation pass never see it::

    aug = Compose([RandomCrop(padding=4), RandomHorizontalFlip()])
    net.fit(x, y, epochs=30, seed=0, augment=aug)

An augmentation is called as ``aug(x, rng)`` and returns a new array; it never writes into ``x``.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = [
    "Augmentation",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomTranslation",
    "Cutout",
    "from_names",
]


class Augmentation:
    """Base class: ``aug(x, rng) -> x_augmented`` for a batch ``x`` of shape ``(n, c, h, w)``."""

    def __call__(self, x, rng):
        """Return an augmented copy of ``x``.

        Parameters
        ----------
        x : ndarray of shape (n, c, h, w)
        rng : numpy.random.Generator
            Source of every random draw (same generator state -> same output).

        Returns
        -------
        ndarray of shape (n, c, h, w), x's dtype
        """
        _check_batch(x)
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"Expected rng as a numpy.random.Generator, received: {type(rng).__name__}")
        return self._transform(x, rng, owned=False)

    def _transform(self, x, rng, owned):
        """The transform; ``owned`` says ``x`` is a scratch array it may overwrite."""
        raise NotImplementedError

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Compose(Augmentation):
    """Apply augmentations one after the other (left to right).

    Parameters
    ----------
    augmentations : sequence of Augmentation
    """

    def __init__(self, augmentations):
        augmentations = list(augmentations)
        for i, aug in enumerate(augmentations):
            if not isinstance(aug, Augmentation):
                raise TypeError(f"Expected Augmentation instances, received at index {i}: {type(aug).__name__}")
        self.augmentations = augmentations

    def _transform(self, x, rng, owned):
        for aug in self.augmentations:
            y = aug._transform(x, rng, owned)
            owned = owned or y is not x  # after the first copy, later steps may work in place
            x = y
        return x

    def __repr__(self):
        return f"Compose([{', '.join(map(repr, self.augmentations))}])"


def _shift(x, dy, dx):
    """Shift every image by its own integer offset, filling with zeros.

    Output pixel ``(i, j)`` of image ``k`` is input pixel ``(i - dy[k], j - dx[k])`` (zero where
    that falls outside). One zero-padded copy and one gather through a sliding-window view: no
    Python loop over the batch.
    """
    n, c, h, w = x.shape
    py = int(np.abs(dy).max(initial=0))
    px = int(np.abs(dx).max(initial=0))
    if py == 0 and px == 0:
        return x.copy()
    padded = np.zeros((n, c, h + 2 * py, w + 2 * px), dtype=x.dtype)
    padded[:, :, py:py + h, px:px + w] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(2, 3))  # (n, c, 2py+1, 2px+1, h, w)
    return windows[np.arange(n), :, py - dy, px - dx]  # advanced indices first: (n, c, h, w)


class RandomCrop(Augmentation):
    """Pad by ``padding`` zeros on every side and crop back to the input size at a random place,
    as ``torchvision.transforms.RandomCrop(size, padding)`` with the image's own size: each image
    moves by an offset drawn uniformly from ``[-padding, padding]`` on each axis.

    Parameters
    ----------
    padding : int >= 0, default 4
    """

    def __init__(self, padding=4):
        self.padding = _check_int("padding", padding, 0)

    def _transform(self, x, rng, owned):
        p = self.padding
        n = len(x)
        dy = rng.integers(-p, p + 1, size=n)
        dx = rng.integers(-p, p + 1, size=n)
        return _shift(x, dy, dx)

    def get_config(self):
        return {"padding": self.padding}


class RandomTranslation(Augmentation):
    """Shift each image by a random whole number of pixels, up to a fraction of its size (as
    Keras' ``RandomTranslation(height_factor, width_factor, fill_mode="constant")``), zero fill.

    Parameters
    ----------
    height_factor, width_factor : float in [0, 1), default 0.1
        The largest shift is ``round(factor * size)`` pixels, in either direction.
    """

    def __init__(self, height_factor=0.1, width_factor=None):
        self.height_factor = _check_fraction("height_factor", height_factor)
        self.width_factor = self.height_factor if width_factor is None else _check_fraction("width_factor", width_factor)

    def _transform(self, x, rng, owned):
        n, _, h, w = x.shape
        my = int(round(self.height_factor * h))
        mx = int(round(self.width_factor * w))
        dy = rng.integers(-my, my + 1, size=n)
        dx = rng.integers(-mx, mx + 1, size=n)
        return _shift(x, dy, dx)

    def get_config(self):
        return {"height_factor": self.height_factor, "width_factor": self.width_factor}


class RandomHorizontalFlip(Augmentation):
    """Mirror each image left-right with probability ``p``.

    Parameters
    ----------
    p : float in [0, 1], default 0.5
    """

    def __init__(self, p=0.5):
        self.p = _check_probability("p", p)

    def _transform(self, x, rng, owned):
        flip = np.flatnonzero(rng.random(len(x)) < self.p)
        out = x if owned else x.copy()
        if len(flip):
            out[flip] = x[flip, :, :, ::-1]  # the fancy index on the right is a copy: no overlap
        return out

    def get_config(self):
        return {"p": self.p}


class Cutout(Augmentation):
    """Zero a ``size`` x ``size`` square at a random centre of each image (DeVries & Taylor, 2017);
    the square may stick out of the image, so edges are cut less often, as in the paper.

    Parameters
    ----------
    size : int >= 1, default 8
    p : float in [0, 1], default 1
        Probability that an image gets a square.
    """

    def __init__(self, size=8, p=1.0):
        self.size = _check_int("size", size, 1)
        self.p = _check_probability("p", p)

    def _transform(self, x, rng, owned):
        n, _, h, w = x.shape
        cy = rng.integers(0, h, size=n)
        cx = rng.integers(0, w, size=n)
        apply = rng.random(n) < self.p
        top = cy - self.size // 2
        left = cx - self.size // 2
        rows = np.arange(h)
        cols = np.arange(w)
        in_y = (rows >= top[:, None]) & (rows < top[:, None] + self.size) & apply[:, None]  # (n, h)
        in_x = (cols >= left[:, None]) & (cols < left[:, None] + self.size)  # (n, w)
        keep = ~(in_y[:, :, None] & in_x[:, None, :])  # (n, h, w)
        out = x if owned else x.copy()
        out *= keep[:, None, :, :]
        return out

    def get_config(self):
        return {"size": self.size, "p": self.p}


_NAMES = {
    "crop": lambda h: RandomCrop(padding=max(1, h // 8)),
    "flip": lambda h: RandomHorizontalFlip(),
    "translate": lambda h: RandomTranslation(0.1),
    "cutout": lambda h: Cutout(size=max(1, h // 4)),
}


def from_names(names, image_size):
    """The command line's ``--augment crop,flip``: a :class:`Compose` of the named augmentations.

    Parameters
    ----------
    names : str or sequence of str
        Comma-separated names among ``crop`` (padding ``size // 8``, 4 for 32x32), ``flip``,
        ``translate`` (10 %) and ``cutout`` (a square of ``size // 4``, 8 for 32x32).
    image_size : int
        Image height, which sets the defaults above.
    """
    if isinstance(names, str):
        names = [part.strip() for part in names.split(",") if part.strip()]
    if not names:
        raise ValueError(f"Expected augmentation names among {sorted(_NAMES)}, received: none")
    unknown = [name for name in names if name not in _NAMES]
    if unknown:
        raise ValueError(f"Expected augmentation names among {sorted(_NAMES)}, received: {', '.join(unknown)}")
    return Compose([_NAMES[name](int(image_size)) for name in names])


def as_augmentation(augment):
    """``fit``'s ``augment`` argument as an Augmentation (a list becomes a Compose), or None."""
    if augment is None or isinstance(augment, Augmentation):
        return augment
    if isinstance(augment, (list, tuple)):
        return Compose(augment)
    raise TypeError(
        f"Expected augment to be an Augmentation or a list of them, received: {type(augment).__name__}"
    )


def _check_batch(x):
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.dtype.kind != "f":
        shape = getattr(x, "shape", None)
        raise ValueError(
            f"Expected a float batch of images of shape (n, c, h, w), received: "
            f"{type(x).__name__} of shape {shape} and dtype {getattr(x, 'dtype', None)}"
        )


def _check_int(name, value, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Expected {name} as an int >= {minimum}, received: {name}={value!r}")
    return int(value)


def _check_probability(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Expected {name} in [0, 1], received: {name}={value!r}")
    return float(value)


def _check_fraction(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"Expected {name} in [0, 1), received: {name}={value!r}")
    return float(value)
