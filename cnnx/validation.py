"""The argument checks shared by the modules: one place for each rule and its message.

Every check returns the value in its canonical form or raises in the Keras style,
``Expected ..., received: name=value``: a ``TypeError`` for a value of the wrong kind, a
``ValueError`` for one out of range.
"""
from __future__ import annotations

import math
import numbers

__all__ = ["NotAnIntegerError", "check_int", "check_shape", "is_nan"]


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
