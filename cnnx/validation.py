"""The argument checks shared by the modules: one place for each rule and its message.

Every check returns the value in its canonical form or raises in the Keras style,
``Expected ..., received: name=value``: a ``TypeError`` for a value of the wrong kind, a
``ValueError`` for one out of range.
"""
from __future__ import annotations

import math
import numbers
import re

import numpy as np

__all__ = ["NotAnIntegerError", "as_array", "as_floating", "check_array", "check_bool", "check_dy", "check_floating", "check_groups",
           "check_int", "check_shape", "float_array", "from_identifier", "is_nan", "positive_float", "positive_int", "squash_name"]


class NotAnIntegerError(TypeError, ValueError):
    """A count, size or seed that is not an int (a float, a bool, a string).

    A ``TypeError`` in the Keras style, and a ``ValueError`` too: the augmentations, schedules
    and the profiler refused such values with a ``ValueError`` before their checks became this
    one, and code catching that keeps working.
    """


def check_int(value, name, minimum=None):
    """``value`` as an ``int`` (a bool is refused), which must be ``>= minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise NotAnIntegerError(f"Expected {name} to be an int, received: {name}={value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected {name} >= {minimum}, received: {name}={value!r}")
    return int(value)


def positive_int(value, name):
    """``value`` as an int, which must be >= 1 (``check_int`` with ``minimum=1``)."""
    return check_int(value, name, minimum=1)


def positive_float(value, name):
    """``value`` as a float, which must be a real number > 0 (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"Expected {name} to be a positive number, received: {name}={value!r}")
    return float(value)


def check_bool(value, name):
    """``value`` as a bool, which must be a Python or NumPy bool (not any truthy object)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Expected {name} to be a bool, received: {name}={value!r}")
    return bool(value)


def check_groups(groups, in_channels, out_channels):
    """``groups`` of a convolution layer as an int >= 1 dividing both channel counts."""
    groups = positive_int(groups, "groups")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"Expected groups to divide in_channels ({in_channels}) and out_channels ({out_channels}), "
            f"received: groups={groups}"
        )
    return groups


def check_array(owner, x):
    """Raise a TypeError unless ``x`` is an ndarray; ``owner`` (a layer) names the message."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{type(owner).__name__} expected a numpy array, received: {type(x).__name__}")


def check_floating(owner, x):
    """Raise unless the array ``x`` has a floating dtype; ``owner`` (a layer) names the message."""
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{type(owner).__name__} expected a floating-point array, received: dtype={x.dtype}")


def check_dy(owner, dy, expected):
    """Raise unless ``dy`` is an ndarray of shape ``expected`` (what the last forward of ``owner``,
    a layer, produced)."""
    expected = tuple(expected)
    if not isinstance(dy, np.ndarray) or dy.shape != expected:
        received = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
        raise ValueError(f"{type(owner).__name__} expected dy of shape {expected}, received: {received}")


def check_shape(shape):
    """A per-sample shape as a tuple of positive ints; an int ``n`` means ``(n,)``."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"Expected a shape (tuple of ints), received: {shape!r}") from None
    if not shape or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"Expected a shape of positive ints, received: {shape!r}")
    return tuple(int(s) for s in shape)


def is_nan(value):
    """True for a float NaN (a metric missing from an epoch's logs); False for anything else."""
    return isinstance(value, float) and math.isnan(value)


def as_array(value, what):
    """``value`` as an ndarray: an ndarray as is, a list or tuple through ``np.asarray``; anything
    else raises "Expected <what> as a numpy array" (targets of losses and metrics)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    raise TypeError(f"Expected {what} as a numpy array, received: {type(value).__name__}")


def float_array(a, name, ndim, dtype=None):
    """Return ``a`` as a C-contiguous float32/float64 array of ``ndim`` dimensions.

    Integer and boolean input becomes float32 (float16 too); complex and object input is refused,
    and so are floats wider than float64 (``np.longdouble``): the kernels compute in float32 or
    float64 only, and narrowing them would silently drop the precision the caller asked for.
    ``dtype`` forces the result dtype (used to bring weights to the input's dtype).
    """
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Expected {name} to be an array of numbers, received: {type(a).__name__}") from exc
    kind = a.dtype.kind
    if kind not in "fiub":
        raise TypeError(
            f"Expected {name} with a real floating or integer dtype, received: {name}.dtype={a.dtype}"
        )
    if kind == "f" and a.dtype.itemsize > 8:
        raise TypeError(
            f"Expected {name} with dtype float32 or float64 (float16 and integers are widened to "
            f"float32), received: {name}.dtype={a.dtype}; cast it with .astype(np.float64) first"
        )
    if a.ndim != ndim:
        raise ValueError(f"Expected {name} with {ndim} dimensions, received: {name}.shape={a.shape}")
    if dtype is None:
        dtype = a.dtype if a.dtype in (np.float32, np.float64) else np.float32
    return np.ascontiguousarray(a, dtype=dtype)


def as_floating(x):
    """``x`` as an array computed in its own floating dtype (integers and bools as float64)."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def squash_name(name):
    """Canonical form for name matching: lower case, no underscores, hyphens or spaces."""
    return re.sub(r"[_\-\s]", "", name).lower()


def from_identifier(identifier, base, registry, names, kwargs, aliases=None):
    """The object an ``identifier`` names: what ``cnnx.losses.get`` and ``cnnx.optimizers.get`` do.

    Parameters
    ----------
    identifier : instance of ``base`` (returned as is), a subclass, a name or a config dict
        ``{"class": name, "config": {...}}``; names match ``registry`` keys and ``aliases`` keys
        by ``squash_name``
    base : class
    registry : dict name -> class
    names : (str, str), the class and the kind for messages, e.g. ``("a Loss", "a loss")``
    kwargs : dict, constructor arguments (with a name, a class or a config dict)
    aliases : dict alias -> registry name, optional
    """
    the_class, the_kind = names
    aliases = aliases or {}
    if isinstance(identifier, base):
        if kwargs:
            raise TypeError(f"Expected no keyword arguments with {the_class} instance, received: {sorted(kwargs)}")
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, base):
        return identifier(**kwargs)
    if isinstance(identifier, dict):
        if "class" not in identifier:
            raise ValueError(f"Expected {the_kind} config {{'class': name, 'config': {{...}}}}, received: {identifier!r}")
        config = dict(identifier.get("config") or {})
        config.update(kwargs)
        return from_identifier(identifier["class"], base, registry, names, config, aliases)
    if isinstance(identifier, str):
        wanted = squash_name(identifier)
        for name, cls in registry.items():
            if squash_name(name) == wanted:
                return cls(**kwargs)
        for alias, name in aliases.items():
            if squash_name(alias) == wanted:
                return registry[name](**kwargs)
        known = sorted(registry) + sorted(aliases)
        raise ValueError(f"Expected {the_kind} name, one of {known}, received: {identifier!r}")
    raise TypeError(f"Expected {the_class}, {the_kind} name or a config dict, received: {type(identifier).__name__}")
