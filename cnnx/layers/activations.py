"""Activation layers and the ``activation=`` argument of Conv2D / Conv1D / Dense / Residual.

The maths lives in ``cnnx.functional`` (``ACTIVATIONS``: small stateless objects, and ``erf``),
so a fused activation (``activation="relu"``) runs exactly the code the standalone layers
(``ReLU()``) run. Each object has

- ``forward(x, out=None, **kw) -> y``; ``out`` may be ``x`` itself (in place);
- ``backward(dy, x, y, out=None, **kw) -> dx`` with ``x`` the pre-activation and ``y`` the output;
- ``needs_input(**kw) -> bool``: whether ``backward`` reads ``x``. When it does not, a caller may
  compute ``y`` in place over ``x`` and pass ``x=None`` to ``backward`` (saves a buffer per layer).

The layers here hold only their parameters (``negative_slope``, ``approximate``) and call them.
"""
from __future__ import annotations

import math

import numpy as np

from ..functional import ACTIVATIONS, SOFTMAX, check_gelu_approximate, erf, erfc, normal_cdf
from ..validation import check_array, check_dy, check_floating
from .base import Layer

# erf, erfc and normal_cdf stay importable from here (their home before cnnx.functional).
__all__ = [
    "ACTIVATIONS", "SOFTMAX", "FusedActivation", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "Softmax",
    "check_activation", "activation_kwargs", "compiled_rectifier", "check_negative_slope",
    "erf", "erfc", "normal_cdf",
]


def check_activation(name):
    """Validate a fused-activation name (``None`` means no activation); returns it unchanged."""
    if name is not None and (not isinstance(name, str) or name not in ACTIVATIONS):
        raise ValueError(
            f"Expected activation to be None or one of {tuple(ACTIVATIONS)}, received: activation={name!r}"
        )
    return name


def activation_kwargs(name, negative_slope=0.01):
    """The keyword arguments a fused activation ``name`` takes from its layer's constructor."""
    return {"negative_slope": negative_slope} if name == "leaky_relu" else {}


def compiled_rectifier(name, negative_slope=0.01):
    """True when the compiled convolution kernels can apply activation ``name`` themselves:
    ReLU, and leaky ReLU with a slope >= 0 (its backward reads the sign of the output)."""
    return name == "relu" or (name == "leaky_relu" and negative_slope >= 0)


def check_negative_slope(negative_slope):
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float, np.floating)) \
            or not math.isfinite(negative_slope):
        raise TypeError(f"Expected negative_slope to be a finite number, received: negative_slope={negative_slope!r}")
    return float(negative_slope)


class FusedActivation:
    """A layer's ``activation=`` argument (Conv2D, Conv1D, Dense, Residual): the ``ACTIVATIONS``
    function with the keyword arguments the layer was built with, or the identity for ``None``.

    It keeps no data; the layer caches ``z`` and ``y`` between ``forward`` and ``backward``.
    """

    def __init__(self, name, negative_slope=0.01):
        self.fn = ACTIVATIONS[name] if name else None
        self.kw = activation_kwargs(name, negative_slope)

    def forward(self, z):
        """Return ``(y, z_kept)``: ``y = activation(z)`` and the ``z`` that ``backward`` needs.

        When the activation's backward reads only its output, ``y`` overwrites ``z`` (one buffer
        per layer instead of two) and ``z_kept`` is None.
        """
        if self.fn is None:
            return z, None
        if self.fn.needs_input(**self.kw):
            return self.fn.forward(z, **self.kw), z
        return self.fn.forward(z, out=z, **self.kw), None

    def backward(self, dy, z, y):
        """``dz`` from ``dy`` and the ``(y, z_kept)`` that ``forward`` returned."""
        return dy if self.fn is None else self.fn.backward(dy, z, y, **self.kw)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class _Activation(Layer):
    """Shared body of the parameter-free activation layers; works on any shape ``(n, ...)``."""

    _fn = None
    _min_ndim = 1

    stateful = False

    def new_state(self):
        state = super().new_state()
        state.x = state.y = None
        return state

    def _kw(self):
        return {}

    @property
    def activation_name(self):
        """The ``ACTIVATIONS`` name of the function this layer applies ("relu", ..., "softmax")."""
        return self._fn.name

    def call(self, x, training, state):
        """Apply the activation.

        Parameters
        ----------
        x : ndarray of shape (n, ...), floating
        training : bool
            Ignored (same behaviour in both modes).

        Returns
        -------
        y : ndarray of the same shape and dtype
        """
        check_array(self, x)
        if x.ndim < self._min_ndim:
            raise ValueError(
                f"{type(self).__name__} expected input with at least {self._min_ndim} axes (batch first), "
                f"received: {x.shape}"
            )
        check_floating(self, x)
        kw = self._kw()
        y = self._fn.forward(x, **kw)
        state.x = x if self._fn.needs_input(**kw) else None
        state.y = y
        return y

    def call_backward(self, dy, state, need_input_grad):
        """Gradient with respect to the input.

        Parameters
        ----------
        dy : ndarray, same shape as the last ``forward`` output

        Returns
        -------
        dx : ndarray, same shape
        """
        if state.y is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        check_dy(self, dy, state.y.shape)
        if not need_input_grad:
            return None
        return self._fn.backward(dy, state.x, state.y, **self._kw())

    def fused_form(self):
        """``FusedActivation`` computing this layer (how a plan folds it into the layer before)."""
        name = self._fn.name
        return FusedActivation(name, getattr(self, "negative_slope", 0.01)) if name in ACTIVATIONS and \
            self._kw().get("approximate", "none") == "none" else None

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < self._min_ndim - 1:
            raise ValueError(
                f"{type(self).__name__} expected a per-sample shape with at least {self._min_ndim - 1} axes, "
                f"received: {input_shape}"
            )
        return input_shape


class ReLU(_Activation):
    """``max(x, 0)`` elementwise."""

    _fn = ACTIVATIONS["relu"]


class LeakyReLU(_Activation):
    """``x`` for ``x > 0``, ``negative_slope * x`` otherwise.

    Parameters
    ----------
    negative_slope : float, default 0.01
    """

    _fn = ACTIVATIONS["leaky_relu"]

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = check_negative_slope(negative_slope)

    def _kw(self):
        return {"negative_slope": self.negative_slope}

    def get_config(self):
        return {"negative_slope": self.negative_slope}


class Sigmoid(_Activation):
    """Logistic function ``1 / (1 + exp(-x))``, computed without overflow."""

    _fn = ACTIVATIONS["sigmoid"]


class Tanh(_Activation):
    """Hyperbolic tangent."""

    _fn = ACTIVATIONS["tanh"]


class GELU(_Activation):
    """Gaussian error linear unit ``x * Phi(x)``.

    Parameters
    ----------
    approximate : {"none", "tanh"}, default "none"
        ``"none"`` is the exact erf form (PyTorch's default); ``"tanh"`` the approximation
        ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.
    """

    _fn = ACTIVATIONS["gelu"]

    def __init__(self, approximate="none"):
        super().__init__()
        check_gelu_approximate(approximate)
        self.approximate = approximate

    def _kw(self):
        return {"approximate": self.approximate}

    def get_config(self):
        return {"approximate": self.approximate}


class Softmax(_Activation):
    """Softmax over axis 1: ``(n, classes)`` rows, or the channels of ``(n, c, ...)``.

    ``backward`` is the full Jacobian-vector product, so it composes with any loss; pair raw
    logits with ``SoftmaxCrossEntropy`` instead when training a classifier (more stable).
    """

    _fn = SOFTMAX
    _min_ndim = 2
