"""Activation functions: the elementwise maths, and the parameter-free layers built on it.

The maths lives in small stateless objects collected in ``ACTIVATIONS`` so that Conv2D and Dense
can fuse their activation into the layer (``activation="relu"``) with exactly the code the
standalone layers (``ReLU()``) run. Each object has

- ``forward(x, out=None, **kw) -> y``; ``out`` may be ``x`` itself (in place);
- ``backward(dy, x, y, out=None, **kw) -> dx`` with ``x`` the pre-activation and ``y`` the output;
- ``needs_input(**kw) -> bool``: whether ``backward`` reads ``x``. When it does not, a caller may
  compute ``y`` in place over ``x`` and pass ``x=None`` to ``backward`` (saves a buffer per layer).

They run on every batch: float32 / float64 arrays go through the compiled, threaded passes of
``cnnx.functional`` (one sweep per pass); other float dtypes (float16) take the NumPy code, which
writes through ``out=`` and avoids temporaries where NumPy allows.
GELU needs ``erf``; SciPy is not a dependency, so ``erf``/``erfc`` are W. J. Cody's rational
Chebyshev approximations (Math. Comp. 1969, SPECFUN ``CALERF``), accurate to float64 rounding.
"""
from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ._common import check_dy, check_floating
from .base import Layer

# --------------------------------------------------------------------------------------------
# erf / erfc (Cody). Three intervals of |x|: [0, 0.46875], (0.46875, 4], (4, inf).
# --------------------------------------------------------------------------------------------
_ERF_THRESH = 0.46875
_SQRPI = 5.6418958354775628695e-1  # 1 / sqrt(pi)
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
      3.20937758913846947e03, 1.85777706184603153e-1)
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
      2.84423683343917062e03)
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
      2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
      2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
      1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
      3.43936767414372164e03, 1.23033935480374942e03)
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
      1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)
_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
      6.05183413124413191e-2, 2.33520497626869185e-3)
# Beyond this erfc underflows to 0 in float64; clamping keeps inf out of the exp split below.
_ERFC_XBIG = 28.0


def _rational(t, lead, p, q, num, den):
    """``(lead t^n + p[0] t^(n-1) + ... + p[-1]) / (t^n + q[0] t^(n-1) + ... + q[-1])`` into ``num``.

    Horner's scheme in place on the scratch arrays ``num`` and ``den`` (no temporaries).
    """
    np.multiply(t, lead, out=num)
    np.copyto(den, t)
    for p_i, q_i in zip(p[:-1], q[:-1]):
        num += p_i
        num *= t
        den += q_i
        den *= t
    num += p[-1]
    den += q[-1]
    num /= den
    return num


def _erf_parts(a):
    """Cody's two branches for ``a = |x|``, each evaluated on the whole array.

    Returns ``(erf_small, erfc_big, is_small)``: ``erf(a)`` valid where ``a <= 0.46875``,
    ``erfc(a)`` valid elsewhere, and the 0/1 float mask of the first region. Every branch sees
    clamped arguments, so all values are finite and callers blend them as ``s*m + b*(1-m)``
    (exact for m in {0, 1}); masks, ``np.where`` and fancy indexing are several times slower
    here because their branches are unpredictable.
    """
    num = np.empty_like(a)
    den = np.empty_like(a)
    t = np.minimum(a, _ERF_THRESH)
    ysq = t * t
    # erf(t) = t * (A4 t^8 + A0 t^6 + ... + A3) / (t^8 + B0 t^6 + ... + B3) in the variable t^2
    erf_small = _rational(ysq, _A[4], _A[:4], _B, num, den) * t
    # erfc on (0.46875, 4]: rational in y
    y = np.clip(a, _ERF_THRESH, _ERFC_XBIG, out=t)
    mid = _rational(np.minimum(y, 4.0), _C[8], _C[:8], _D, num, den).copy()
    # erfc beyond 4: (1/sqrt(pi) - z R(z)) / y with z = 1/y^2
    y_tail = np.maximum(y, 4.0)
    z = np.multiply(y_tail, y_tail)
    np.divide(1.0, z, out=z)
    tail = _rational(z, _P[5], _P[:5], _Q, num, den)
    tail *= z
    np.subtract(_SQRPI, tail, out=tail)
    tail /= y_tail
    is_tail = (y > 4.0).astype(a.dtype)
    tail *= is_tail
    np.subtract(1.0, is_tail, out=is_tail)
    mid *= is_tail
    erfc_big = np.add(mid, tail, out=mid)
    # times exp(-y^2), split as exp(-r^2) exp(-(y-r)(y+r)) with r = y rounded down to 1/16: r^2 is
    # exact, so the low bits of y^2 that decide erfc's relative accuracy in the tail are kept.
    r = np.multiply(y, 16.0, out=y_tail)
    np.trunc(r, out=r)
    r *= 0.0625
    d = np.subtract(y, r, out=z)
    y += r
    d *= y
    np.negative(d, out=d)
    np.exp(d, out=d)
    erfc_big *= d
    np.multiply(r, r, out=r)
    np.negative(r, out=r)
    np.exp(r, out=r)
    erfc_big *= r
    is_small = (a <= _ERF_THRESH).astype(a.dtype)
    return erf_small, erfc_big, is_small


def _float_array(x):
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def erf(x):
    """Error function, elementwise, to float64 rounding accuracy (Cody's approximation).

    Parameters
    ----------
    x : array_like
        Computed in its own floating dtype (integers as float64).

    Returns
    -------
    ndarray of the same shape
    """
    x = _float_array(x)
    erf_small, erfc_big, m = _erf_parts(np.abs(x))
    erf_small *= m
    np.subtract(1.0, erfc_big, out=erfc_big)
    np.subtract(1.0, m, out=m)
    erfc_big *= m
    erf_small += erfc_big
    return np.copysign(erf_small, x, out=erf_small)


def erfc(x):
    """Complementary error function ``1 - erf(x)``, elementwise, accurate in the tails too.

    Parameters
    ----------
    x : array_like

    Returns
    -------
    ndarray of the same shape
    """
    x = _float_array(x)
    erf_small, erfc_big, m = _erf_parts(np.abs(x))
    v = np.subtract(1.0, erf_small, out=erf_small)
    v *= m
    np.subtract(1.0, m, out=m)
    erfc_big *= m
    v += erfc_big  # erfc(|x|)
    # erfc(x) = 2 - erfc(|x|) for x < 0: add neg * (2 - 2 v), exact where neg == 0.
    fix = np.multiply(v, -2.0, out=erfc_big)
    fix += 2.0
    fix *= x < 0
    v += fix
    return v


def normal_cdf(x):
    """Standard normal CDF ``Phi(x) = erfc(-x / sqrt(2)) / 2``, accurate for very negative x."""
    x = _float_array(x)
    return 0.5 * erfc(x * -math.sqrt(0.5))


# --------------------------------------------------------------------------------------------
# The activation functions (stateless objects; see the module docstring for the protocol).
# --------------------------------------------------------------------------------------------
def _compiled(*arrays, out=None):
    """Whether the compiled pass applies: float32 / float64 arrays of one shape and dtype."""
    return F.compiled_dtype(*arrays) and (out is None or F.compiled_dtype(arrays[0], out))


class _ReLUFn:
    name = "relu"

    def needs_input(self):
        return False

    def forward(self, x, out=None):
        if _compiled(x, out=out):
            return F.leaky_relu(x, 0.0, out=out)
        return np.maximum(x, 0, out=out)

    def backward(self, dy, x, y, out=None):
        # y > 0 exactly where x > 0, so the output suffices (gradient 0 at x = 0, as PyTorch).
        if _compiled(dy, y, out=out):
            return F.leaky_relu_backward(dy, y, 0.0, out=out)
        return np.multiply(dy, y > 0, out=out)


class _LeakyReLUFn:
    name = "leaky_relu"

    def needs_input(self, negative_slope=0.01):
        # With a negative slope the sign of y no longer tells the sign of x.
        return negative_slope < 0

    def forward(self, x, out=None, negative_slope=0.01):
        if _compiled(x, out=out):
            return F.leaky_relu(x, negative_slope, out=out)
        # leaky_relu(x) = max(x, a x) for a <= 1 and min(x, a x) for a > 1: two streaming passes.
        # (Masked ufuncs, np.where and copyto(where=) branch on every element and are ~30x slower.)
        pick = np.maximum if negative_slope <= 1 else np.minimum
        if out is not None and np.may_share_memory(out, x):
            return pick(x, x * negative_slope, out=out)
        scaled = np.multiply(x, negative_slope, out=out)
        return pick(x, scaled, out=scaled)

    def backward(self, dy, x, y, out=None, negative_slope=0.01):
        ref = x if negative_slope < 0 else y
        if _compiled(dy, ref, out=out):
            return F.leaky_relu_backward(dy, ref, negative_slope, out=out)
        positive = ref > 0
        # factor = 1 where positive, a elsewhere, built as (not positive) * a + positive: each
        # term is exactly 0, 1 or a, so the positive side passes dy through bit for bit.
        factor = np.logical_not(positive).astype(dy.dtype)
        factor *= negative_slope
        factor += positive
        return np.multiply(dy, factor, out=factor if out is None else out)


class _SigmoidFn:
    name = "sigmoid"

    def needs_input(self):
        return False

    def forward(self, x, out=None):
        if F.SIMD_TRANSCENDENTALS and _compiled(x, out=out):
            return F.sigmoid(x, out=out)
        # With e = exp(-|x|) (never overflows): sigmoid = 1/(1+e) for x >= 0, e/(1+e) for x < 0.
        # The numerator is max(e, [x >= 0]) since 0 < e <= 1: no branches, one rounding.
        nonneg = x >= 0  # taken before out overwrites x when the call is in place
        out = np.abs(x, out=out)
        np.negative(out, out=out)
        np.exp(out, out=out)
        denom = out + 1
        np.maximum(out, nonneg, out=out)
        np.divide(out, denom, out=out)
        return out

    def backward(self, dy, x, y, out=None):
        if _compiled(dy, y, out=out):
            return F.sigmoid_backward(dy, y, out=out)
        out = np.subtract(1, y, out=out)
        np.multiply(out, y, out=out)
        return np.multiply(out, dy, out=out)


class _TanhFn:
    name = "tanh"

    def needs_input(self):
        return False

    def forward(self, x, out=None):
        # NumPy's vectorised tanh beats the compiled one (see functional.SIMD_TRANSCENDENTALS).
        return np.tanh(x, out=out)

    def backward(self, dy, x, y, out=None):
        if _compiled(dy, y, out=out):
            return F.tanh_backward(dy, y, out=out)
        out = np.multiply(y, y, out=out)
        np.subtract(1, out, out=out)
        return np.multiply(out, dy, out=out)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715
_GELU_APPROXIMATIONS = ("none", "tanh")


def _check_gelu_approximate(approximate):
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(
            f"Expected approximate to be one of {_GELU_APPROXIMATIONS}, received: approximate={approximate!r}"
        )


class _GELUFn:
    """GELU: exact ``x * Phi(x)`` (PyTorch's default) or the tanh approximation."""

    name = "gelu"

    def needs_input(self, approximate="none"):
        return True

    def _tanh_inner(self, x):
        return np.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x))

    def forward(self, x, out=None, approximate="none"):
        _check_gelu_approximate(approximate)
        if _compiled(x, out=out) and (approximate == "none" or F.SIMD_TRANSCENDENTALS):
            return F.gelu(x, approximate, out=out)
        if approximate == "tanh":
            t = self._tanh_inner(x)
            t += 1
            t *= 0.5
        else:
            t = normal_cdf(x)
        return np.multiply(x, t, out=out)

    def backward(self, dy, x, y, out=None, approximate="none"):
        _check_gelu_approximate(approximate)
        if _compiled(dy, x, out=out) and (approximate == "none" or F.SIMD_TRANSCENDENTALS):
            return F.gelu_backward(dy, x, approximate, out=out)
        if approximate == "tanh":
            t = self._tanh_inner(x)
            # d/dx [x (1+t)/2] = (1+t)/2 + x (1-t^2)/2 * sqrt(2/pi) (1 + 3c x^2)
            inner_grad = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * x * x)
            grad = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner_grad
        else:
            # d/dx [x Phi(x)] = Phi(x) + x phi(x)
            grad = normal_cdf(x)
            grad += x * np.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return np.multiply(dy, grad, out=out)


class _SoftmaxFn:
    """Softmax over axis 1 (classes/channels); not elementwise, so not offered for fusion."""

    name = "softmax"

    def needs_input(self):
        return False

    def forward(self, x, out=None):
        # Shift by the row maximum so exp never overflows.
        out = np.subtract(x, x.max(axis=1, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def backward(self, dy, x, y, out=None):
        # Jacobian-vector product: dx = y * (dy - sum(dy * y)) along the softmax axis.
        dot = np.sum(dy * y, axis=1, keepdims=True)
        out = np.subtract(dy, dot, out=out)
        return np.multiply(out, y, out=out)


#: The activations Conv2D and Dense can fuse (``activation=<name>``), by name.
ACTIVATIONS = {
    "relu": _ReLUFn(),
    "leaky_relu": _LeakyReLUFn(),
    "sigmoid": _SigmoidFn(),
    "tanh": _TanhFn(),
    "gelu": _GELUFn(),
}
SOFTMAX = _SoftmaxFn()


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
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{type(self).__name__} expected a numpy array, received: {type(x).__name__}")
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
        _check_gelu_approximate(approximate)
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
