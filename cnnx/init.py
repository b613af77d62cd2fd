"""Parameter initialisers: the one place that knows how initial weights and biases are drawn.

``"default"`` is PyTorch's rule for ``nn.Linear`` / ``nn.Conv2d`` (Kaiming-uniform with
``a = sqrt(5)``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for the weight and the same bound for
the bias), so a cnnx network starts from the same distribution as its PyTorch twin. The other
names follow Keras (Glorot/He); with them the bias starts at zero, as in Keras.
"""
from __future__ import annotations

import math

import numpy as np

#: Names accepted by ``weight_init`` in Conv2D / Dense.
INITIALIZERS = ("default", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "zeros")


def check_initializer(name):
    """Return ``name`` if it is a known initialiser, else raise a ValueError naming the options."""
    if not isinstance(name, str) or name not in INITIALIZERS:
        raise ValueError(f"Expected weight_init to be one of {INITIALIZERS}, received: weight_init={name!r}")
    return name


def compute_fans(shape):
    """``(fan_in, fan_out)`` of a weight in PyTorch layout.

    Parameters
    ----------
    shape : tuple of int
        ``(out_features, in_features)`` for Dense, ``(out_channels, in_channels, kh, kw)`` for
        Conv2D (any number of trailing kernel axes).

    Returns
    -------
    fan_in, fan_out : int
        ``in * prod(kernel)`` and ``out * prod(kernel)``.
    """
    if len(shape) < 2:
        raise ValueError(f"Expected a weight shape with at least 2 axes, received: shape={tuple(shape)}")
    receptive = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def initialize_weight(name, shape, rng, dtype=np.float32):
    """Draw a weight array of ``shape`` with the rule ``name``.

    Parameters
    ----------
    name : str
        One of ``INITIALIZERS``.
    shape : tuple of int
        Weight shape in PyTorch layout (see ``compute_fans``).
    rng : numpy.random.Generator
        Where the numbers come from (layers pass ``cnnx.layers.base.default_rng(rng)``).
    dtype : dtype, default float32

    Returns
    -------
    ndarray of shape ``shape`` and dtype ``dtype``
    """
    check_initializer(name)
    fan_in, fan_out = compute_fans(shape)
    if name == "zeros":
        return np.zeros(shape, dtype=dtype)
    if name in ("default", "he_uniform", "glorot_uniform"):
        if name == "default":
            # kaiming_uniform_(a=sqrt(5)): gain^2 = 2 / (1 + 5), bound = sqrt(3) * gain / sqrt(fan_in)
            bound = 1.0 / math.sqrt(fan_in)
        elif name == "he_uniform":
            bound = math.sqrt(6.0 / fan_in)
        else:
            bound = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, size=shape).astype(dtype)
    # Plain (not truncated) normals, as torch.nn.init.kaiming_normal_ / xavier_normal_.
    std = math.sqrt(2.0 / fan_in) if name == "he_normal" else math.sqrt(2.0 / (fan_in + fan_out))
    return (rng.standard_normal(size=shape) * std).astype(dtype)


def initialize_bias(name, weight_shape, rng, dtype=np.float32):
    """Draw the bias that goes with a weight initialised by ``name``.

    ``"default"`` gives PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)); every other rule gives
    zeros (Keras' ``bias_initializer="zeros"``).

    Returns
    -------
    ndarray of shape (weight_shape[0],)
    """
    check_initializer(name)
    n_out = int(weight_shape[0])
    if name != "default":
        return np.zeros((n_out,), dtype=dtype)
    fan_in, _ = compute_fans(weight_shape)
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=(n_out,)).astype(dtype)
