"""Fully connected layers and the shape/regularisation layers that sit around them.

Dense (alias Linear) owns a PyTorch-layout weight ``(out_features, in_features)`` and an
optional fused activation; Flatten turns image batches into rows; Dropout is inverted dropout.
All of it is a handful of BLAS calls, so it stays in NumPy (no ``cnnx.functional`` needed).
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import random as _random
from ..init import check_initializer, initialize_bias, initialize_weight
from .activations import ACTIVATIONS, activation_kwargs, check_activation, check_negative_slope
from .base import Layer, default_rng


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected {name} to be an int, received: {name}={value!r}")
    if value < 1:
        raise ValueError(f"Expected {name} >= 1, received: {name}={value!r}")
    return int(value)


def _check_floating(layer, x):
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{type(layer).__name__} expected a floating-point array, received: dtype={x.dtype}")


def _grad_buffer(layer, name):
    """``layer.grads[name]`` as a writable array matching its parameter (made on first use).

    Gradients are written into this array rather than replacing it, so anyone holding a reference
    (an optimizer's parameter list) always sees the latest values.
    """
    p = layer.params[name]
    g = layer.grads.get(name)
    if g is None or g.shape != p.shape or g.dtype != p.dtype:
        g = layer.grads[name] = np.zeros_like(p)
    return g


class Dense(Layer):
    """Fully connected layer ``y = activation(x @ weight.T + bias)``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    activation : {None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu"}, default None
        Fused activation, identical to following the layer with the activation layer.
    negative_slope : float, default 0.01
        Slope of ``"leaky_relu"`` for negative inputs (ignored otherwise).
    weight_init : str, default "default"
        One of ``cnnx.init.INITIALIZERS``; ``"default"`` is PyTorch's ``nn.Linear`` rule.
    rng : None, int or numpy.random.Generator
        Source of the initial weights; ``None`` uses the generator ``cnnx.manual_seed`` seeds.

    Attributes
    ----------
    params : dict
        ``"weight"`` of shape (out_features, in_features) and ``"bias"`` of shape (out_features,).
    """

    def __init__(self, in_features, out_features, bias=True, activation=None, negative_slope=0.01,
                 weight_init="default", rng=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"Expected bias to be a bool, received: bias={bias!r}")
        self.use_bias = bool(bias)
        self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)
        self.weight_init = check_initializer(weight_init)
        self.needs_input_grad = True

        gen = default_rng(rng)
        shape = (self.out_features, self.in_features)
        self.params["weight"] = initialize_weight(self.weight_init, shape, gen)
        if self.use_bias:
            self.params["bias"] = initialize_bias(self.weight_init, shape, gen)
        self.zero_grads()

        self._act = ACTIVATIONS[self.activation] if self.activation else None
        self._act_kw = activation_kwargs(self.activation, self.negative_slope)
        self._x = self._z = self._y = None

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if input_shape != (self.in_features,):
            raise ValueError(
                f"Dense expected input of shape ({self.in_features},) per sample, received: {input_shape}"
                + (" (add a Flatten layer before Dense)" if len(input_shape) > 1 else "")
            )
        return (self.out_features,)

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, in_features), floating (cast to the parameters' dtype)

        Returns
        -------
        y : ndarray of shape (n, out_features)
        """
        self._check_input(x, (self.in_features,))
        _check_floating(self, x)
        w = self.params["weight"]
        x = x.astype(w.dtype, copy=False)
        z = np.matmul(x, w.T)
        if self.use_bias:
            z += self.params["bias"]
        self._x = x
        if self._act is None:
            self._z = None
            y = z
        elif self._act.needs_input(**self._act_kw):
            self._z = z
            y = self._act.forward(z, **self._act_kw)
        else:
            # The activation's backward reads only its output: overwrite z, keep one buffer.
            self._z = None
            y = self._act.forward(z, out=z, **self._act_kw)
        self._y = y
        return y

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of shape (n, out_features)

        Returns
        -------
        dx : ndarray of shape (n, in_features), or None when ``needs_input_grad`` is False
        """
        if self._x is None:
            raise RuntimeError("Dense.backward called before forward")
        if not isinstance(dy, np.ndarray) or dy.shape != self._y.shape:
            received = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(f"Dense expected dy of shape {self._y.shape}, received: {received}")
        w = self.params["weight"]
        dz = dy.astype(w.dtype, copy=False)
        if self._act is not None:
            dz = self._act.backward(dz, self._z, self._y, **self._act_kw)
        np.matmul(dz.T, self._x, out=_grad_buffer(self, "weight"))
        if self.use_bias:
            np.sum(dz, axis=0, out=_grad_buffer(self, "bias"))
        if not self.needs_input_grad:
            return None
        return np.matmul(dz, w)

    def get_config(self):
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.use_bias,
            "activation": self.activation,
            "negative_slope": self.negative_slope,
            "weight_init": self.weight_init,
        }


#: PyTorch's name for Dense.
Linear = Dense


class Flatten(Layer):
    """Flatten every axis after the batch axis: ``(n, d1, d2, ...) -> (n, d1 * d2 * ...)``."""

    def __init__(self):
        super().__init__()
        self.needs_input_grad = True
        self._x_shape = None

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 1:
            raise ValueError(f"Flatten expected a per-sample shape with at least 1 axis, received: {input_shape}")
        return (int(np.prod(input_shape, dtype=np.int64)),)

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, d1, ...)

        Returns
        -------
        y : ndarray of shape (n, d1 * ...), a view of ``x`` when ``x`` is contiguous
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"Flatten expected a numpy array, received: {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"Flatten expected input of shape (batch, d1, ...), received: {x.shape}")
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        if self._x_shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        expected = (self._x_shape[0], int(np.prod(self._x_shape[1:], dtype=np.int64)))
        if not isinstance(dy, np.ndarray) or dy.shape != expected:
            received = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(f"Flatten expected dy of shape {expected}, received: {received}")
        return dy.reshape(self._x_shape)


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the rest
    by ``1 / (1 - p)``; in evaluation, the identity.

    The mask is drawn at call time from the library generator (``cnnx.manual_seed`` makes it
    reproducible). It is drawn in float32 whatever the data's dtype, so a float32 and a float64
    network given the same seed drop the same units.

    Parameters
    ----------
    p : float in [0, 1), default 0.5
        Probability of dropping an element.
    """

    def __init__(self, p=0.5):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (numbers.Real, np.floating)):
            raise TypeError(f"Expected p to be a float in [0, 1), received: p={p!r}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"Expected p in [0, 1), received: p={p!r}")
        self.p = float(p)
        self.needs_input_grad = True
        self._mask = None
        self._y_shape = None

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, ...), floating
        training : bool
            Drop only when True.

        Returns
        -------
        y : ndarray of the same shape (``x`` itself in evaluation)
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"Dropout expected a numpy array, received: {type(x).__name__}")
        _check_floating(self, x)
        self._y_shape = x.shape
        if not training or self.p == 0.0:
            self._mask = None
            return x
        keep = _random.get_rng().random(x.shape, dtype=np.float32) >= self.p
        mask = keep.astype(x.dtype)
        mask *= 1.0 / (1.0 - self.p)
        self._mask = mask
        return x * mask

    def backward(self, dy):
        if self._y_shape is None:
            raise RuntimeError("Dropout.backward called before forward")
        if not isinstance(dy, np.ndarray) or dy.shape != self._y_shape:
            received = dy.shape if isinstance(dy, np.ndarray) else type(dy).__name__
            raise ValueError(f"Dropout expected dy of shape {self._y_shape}, received: {received}")
        return dy if self._mask is None else dy * self._mask

    def get_config(self):
        return {"p": self.p}
