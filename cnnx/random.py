"""The library-wide random generator, seeded with ``cnnx.manual_seed`` (as ``torch.manual_seed``).

Layers draw initial weights from it when no ``rng`` is given, so ``manual_seed(0)`` followed by
building the same network gives the same weights.
"""
from __future__ import annotations

import numpy as np

_rng = np.random.default_rng()


def manual_seed(seed):
    """Reseed the generator layers draw their initial weights (and Dropout its masks) from."""
    global _rng
    _rng = np.random.default_rng(seed)
    return _rng


def get_rng():
    return _rng
