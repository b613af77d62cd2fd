"""cnnx.validation: the argument checks every module shares, one contract each."""
import math

import numpy as np
import pytest

from cnnx.validation import NotAnIntegerError, check_int, check_shape, is_nan


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_check_int_returns_a_python_int(value):
    out = check_int(value, "n", minimum=1)
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [1.5, 2.0, True, "3", None])
def test_check_int_refuses_what_is_not_an_int_as_both_type_and_value_error(value):
    with pytest.raises(NotAnIntegerError, match=r"Expected n to be an int, received: n="):
        check_int(value, "n", minimum=0)
    # Keras style says TypeError; the modules that said ValueError before keep saying it.
    assert issubclass(NotAnIntegerError, TypeError) and issubclass(NotAnIntegerError, ValueError)


def test_check_int_names_the_bound_and_the_value():
    with pytest.raises(ValueError, match=r"Expected steps >= 1, received: steps=0") as info:
        check_int(0, "steps", minimum=1)
    assert not isinstance(info.value, TypeError)
    assert check_int(-5, "offset") == -5  # no minimum: any int


def test_check_shape():
    assert check_shape(4) == (4,)
    assert check_shape([1, np.int32(28), 28]) == (1, 28, 28)
    with pytest.raises(ValueError, match="positive ints"):
        check_shape((1, 0))
    with pytest.raises(ValueError, match="positive ints"):
        check_shape(())
    with pytest.raises(TypeError, match="tuple of ints"):
        check_shape(None)


def test_is_nan_only_for_float_nan():
    assert is_nan(math.nan) and is_nan(float("nan"))
    assert not is_nan(0.5) and not is_nan(None) and not is_nan("nan") and not is_nan(math.inf)
