"""Checks and parameter bookkeeping that many layers share, written once.

Argument checks raise with the house wording ("Expected ..., received: name=value"); the
gradient helpers keep the contract that ``backward`` writes into the existing ``grads`` arrays.
"""
from __future__ import annotations

import numbers

import numpy as np

from ..init import initialize_bias, initialize_weight
from .base import check_state_size, default_rng


def positive_int(value, name):
    """``value`` as an int, which must be >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected {name} to be an int, received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"Expected {name} >= 1, received: {name}={value!r}")
    return int(value)


def check_bool(value, name):
    """``value`` as a bool, which must be a Python or NumPy bool (not any truthy object)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Expected {name} to be a bool, received: {name}={value!r}")
    return bool(value)


def check_floating(layer, x):
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{type(layer).__name__} expected a floating-point array, received: dtype={x.dtype}")


def check_dy(layer, dy, expected):
    """Raise unless ``dy`` is an ndarray of shape ``expected`` (what the last forward produced)."""
    expected = tuple(expected)
    if not isinstance(dy, np.ndarray) or dy.shape != expected:
        received = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
        raise ValueError(f"{type(layer).__name__} expected dy of shape {expected}, received: {received}")


def init_weight_and_bias(layer, shape, rng, bias_shape=None):
    """Draw ``layer.params["weight"]`` of ``shape`` (and ``"bias"`` when ``layer.use_bias``) with
    ``layer.weight_init``, then zero the gradients.

    ``bias_shape`` is the shape whose first axis gives the bias length and whose others give its
    fan-in (default ``shape``).
    """
    check_state_size(shape, "a weight")  # before drawing: a doctored saved config is refused here
    if layer.use_bias:
        check_state_size((shape if bias_shape is None else bias_shape)[:1], "a bias")
    gen = default_rng(rng)
    layer.params["weight"] = initialize_weight(layer.weight_init, shape, gen)
    if layer.use_bias:
        layer.params["bias"] = initialize_bias(layer.weight_init, shape if bias_shape is None else bias_shape, gen)
    layer.zero_grads()


def grad_buffer(layer, name):
    """``layer.grads[name]`` as a writable array matching its parameter (made on first use).

    Gradients are written into this array rather than replacing it, so anyone holding a reference
    (an optimizer's parameter list) always sees the latest values.
    """
    p = layer.params[name]
    g = layer.grads.get(name)
    if g is None or g.shape != p.shape or g.dtype != p.dtype:
        g = layer.grads[name] = np.zeros_like(p)
    return g


def store_grads(layer, **grads):
    """Copy each ``name=gradient`` into ``layer.grads[name]`` in place.

    Names the layer has no parameter for (the bias of a layer built without one) are skipped.
    """
    for name, g in grads.items():
        if name in layer.params:
            np.copyto(grad_buffer(layer, name), g)


def check_groups(groups, in_channels, out_channels):
    """``groups`` of a convolution as an int >= 1 dividing both channel counts."""
    groups = positive_int(groups, "groups")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"Expected groups to divide in_channels ({in_channels}) and out_channels ({out_channels}), "
            f"received: groups={groups}"
        )
    return groups
