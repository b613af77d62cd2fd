"""Central-difference gradient checks, shared by the layer, loss and network tests.

``check_layer_gradients`` checks a layer's ``backward`` against finite differences of
``sum(forward(x) * g)`` for a random upstream gradient ``g``, in float64, for the input and for
every parameter the layer reports through ``named_parameters()``.
"""
import contextlib

import numpy as np

try:
    from cnnx.parallel import num_threads as _num_threads
except ImportError:  # the helper itself does not depend on cnnx
    _num_threads = None


def numerical_gradient(f, x, eps=1e-6):
    """Central differences of a scalar function with respect to ``x``.

    Parameters
    ----------
    f : callable
        Called with no arguments; returns a float computed from ``x``, which is perturbed in place
        one element at a time (and restored).
    x : ndarray, float64, writeable, C-contiguous
    eps : float

    Returns
    -------
    grad : ndarray of the shape of ``x``
    """
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous and x.flags.writeable):
        raise ValueError("Expected x to be a writeable C-contiguous ndarray (it is perturbed in place)")
    grad = np.zeros(x.shape, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = float(f())
        flat[i] = old - eps
        down = float(f())
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def _assert_close(name, analytic, numeric, rtol, atol):
    if analytic is None:
        raise AssertionError(f"{name}: backward returned no gradient")
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != numeric.shape:
        raise AssertionError(f"{name}: gradient of shape {analytic.shape}, expected {numeric.shape}")
    # atol relative to the gradient's scale: elements near zero are judged against the whole array.
    tol_abs = rtol * max(1.0, float(np.max(np.abs(numeric), initial=0.0))) if atol is None else atol
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=tol_abs, err_msg=f"gradient of {name}")
    return float(np.max(np.abs(analytic - numeric), initial=0.0))


def check_layer_gradients(layer, x, rtol=1e-6, atol=None, eps=1e-6, seed=0, training=False):
    """Check ``layer.backward`` against central differences, in float64.

    The layer is cast to float64 (``layer.astype``); the loss is ``sum(layer.forward(x) * g)``
    with ``g`` standard normal, so ``backward(g)`` must return dL/dx and fill dL/dparam.
    The layer must be deterministic in the mode ``training`` selects (not Dropout in training).

    Parameters
    ----------
    layer : cnnx.layers.Layer
    x : array_like
        Input batch (copied to float64).
    rtol, atol : float
        Tolerances of ``np.testing.assert_allclose``; ``atol=None`` means ``rtol`` times the
        largest numerical gradient (at least 1).
    eps : float
        Central-difference step.
    seed : int
        Seed of the upstream gradient.
    training : bool
        Passed to ``forward``.

    Returns
    -------
    errors : dict
        Largest absolute difference per checked gradient: ``"x"`` (when the layer returns dx)
        and each parameter name.
    """
    layer.astype(np.float64)
    x = np.array(x, dtype=np.float64, order="C")
    y = layer.forward(x, training=training)
    g = np.random.default_rng(seed).standard_normal(np.shape(y))
    dx = layer.backward(g.copy())
    dx = None if dx is None else np.array(dx, dtype=np.float64)
    analytic = {name: np.array(grad, dtype=np.float64) for name, _, grad in layer.named_parameters()}

    def loss():
        return np.sum(layer.forward(x, training=training) * g)

    # The analytic pass above ran with the default thread count. The hundreds of tiny forwards
    # below run serially: their values do not depend on it, and on a busy machine waking OpenMP
    # threads for a few hundred flops costs milliseconds per call.
    serial = _num_threads(1) if _num_threads is not None else contextlib.nullcontext()
    errors = {}
    with serial:
        if dx is not None:
            errors["x"] = _assert_close("x", dx, numerical_gradient(loss, x, eps), rtol, atol)
        for name, param, _ in layer.named_parameters():
            errors[name] = _assert_close(name, analytic[name], numerical_gradient(loss, param, eps), rtol, atol)
    return errors
