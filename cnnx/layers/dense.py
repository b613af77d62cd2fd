"""Fully connected layers and the shape/regularisation layers that sit around them.

Dense (alias Linear) owns a PyTorch-layout weight ``(out_features, in_features)`` and an
optional fused activation; Flatten turns image batches into rows; Dropout is inverted dropout.
Dense computes through ``cnnx.functional.linear`` / ``linear_backward``.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import functional as F
from .. import random as _random
from ..init import check_initializer
from ..validation import check_array, check_bool, check_dy, check_floating, positive_int
from .activations import FusedActivation, check_activation, check_negative_slope, compiled_rectifier
from .base import Layer, grad_buffer, init_weight_and_bias


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
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.use_bias = check_bool(bias, "bias")
        self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)
        self.weight_init = check_initializer(weight_init)
        init_weight_and_bias(self, (self.out_features, self.in_features), rng)
        self._act = FusedActivation(self.activation, self.negative_slope)

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if input_shape != (self.in_features,):
            raise ValueError(
                f"Dense expected input of shape ({self.in_features},) per sample, received: {input_shape}"
                + (" (add a Flatten layer before Dense)" if len(input_shape) > 1 else "")
            )
        return (self.out_features,)

    stateful = False

    def new_state(self):
        state = super().new_state()
        state.x = state.z = state.y = state.act = None
        return state

    def call(self, x, training, state, *, fused_activation=None):
        """Forward with caches in ``state`` (see ``Layer.call``).

        Parameters
        ----------
        x : ndarray of shape (n, in_features), floating (cast to the parameters' dtype)
        training : bool
        state : CallState from ``new_state()``
        fused_activation : FusedActivation, optional
            The activation layer that follows, applied in place on this layer's output (only for
            a layer without an activation of its own; an execution plan passes it).

        Returns
        -------
        y : ndarray of shape (n, out_features)
        """
        act = self._act
        if fused_activation is not None:
            if self.activation is not None:
                raise ValueError("Dense cannot fuse a second activation after its own")
            act = fused_activation
        self._check_input(x, (self.in_features,))
        check_floating(self, x)
        w = self.params["weight"]
        x = x.astype(w.dtype, copy=False)
        bias = self.params["bias"] if self.use_bias else None
        state.x, state.act = x, act
        rectifier = _compiled_rectifier(act)
        if rectifier is not None:
            # (Leaky) ReLU with a slope >= 0: applied inside linear (in the packed GEMM's tile
            # stores where it runs); its backward reads only the output, so no z is kept.
            state.y, state.z = F.linear(x, w, bias, *rectifier), None
        else:
            state.y, state.z = act.forward(F.linear(x, w, bias))
        return state.y

    def call_backward(self, dy, state, need_input_grad):
        """Parameters
        ----------
        dy : ndarray of shape (n, out_features)
        state : the CallState the forward ``call`` filled
        need_input_grad : bool

        Returns
        -------
        dx : ndarray of shape (n, in_features), or None when ``need_input_grad`` is False
        """
        if state.x is None:
            raise RuntimeError("Dense.backward called before forward")
        check_dy(self, dy, state.y.shape)
        w = self.params["weight"]
        dz = state.act.backward(dy.astype(w.dtype, copy=False), state.z, state.y)
        return F.linear_backward(dz, state.x, w, grad_buffer(self, "weight"),
                                 grad_buffer(self, "bias") if self.use_bias else None, need_input_grad)

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


def _compiled_rectifier(act):
    """``(activation, negative_slope)`` for ``F.linear`` when ``act`` (a FusedActivation) is a ReLU or
    a leaky ReLU with slope >= 0 (what the packed GEMM applies in its stores), else None."""
    name = act.fn.name if act.fn is not None else None
    slope = act.kw.get("negative_slope", 0.0)
    return (name, slope) if name is not None and compiled_rectifier(name, slope) else None


class Flatten(Layer):
    """Flatten every axis after the batch axis: ``(n, d1, d2, ...) -> (n, d1 * d2 * ...)``."""

    stateful = False

    def new_state(self):
        state = super().new_state()
        state.x_shape = None
        return state

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 1:
            raise ValueError(f"Flatten expected a per-sample shape with at least 1 axis, received: {input_shape}")
        return (int(np.prod(input_shape, dtype=np.int64)),)

    def call(self, x, training, state):
        """Parameters
        ----------
        x : ndarray of shape (n, d1, ...)

        Returns
        -------
        y : ndarray of shape (n, d1 * ...), a view of ``x`` when ``x`` is contiguous
        """
        check_array(self, x)
        if x.ndim < 2:
            raise ValueError(f"Flatten expected input of shape (batch, d1, ...), received: {x.shape}")
        state.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def call_backward(self, dy, state, need_input_grad):
        shape = state.x_shape
        if shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        check_dy(self, dy, (shape[0], int(np.prod(shape[1:], dtype=np.int64))))
        return dy.reshape(shape) if need_input_grad else None


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the rest
    by ``1 / (1 - p)``; in evaluation, the identity.

    Each call draws a seed from the library generator (``cnnx.manual_seed`` makes it
    reproducible) and the mask is a function of that seed and the element's position only
    (``cnnx.functional.dropout``), so a float32 and a float64 network given the same seed drop
    the same units, whatever the thread count.

    Parameters
    ----------
    p : float in [0, 1), default 0.5
        Probability of dropping an element.
    """

    stateful = False

    def __init__(self, p=0.5):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (numbers.Real, np.floating)):
            raise TypeError(f"Expected p to be a float in [0, 1), received: p={p!r}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"Expected p in [0, 1), received: p={p!r}")
        self.p = float(p)

    def new_state(self):
        state = super().new_state()
        state.mask = state.y_shape = None
        return state

    def call(self, x, training, state):
        """Parameters
        ----------
        x : ndarray of shape (n, ...), floating
        training : bool
            Drop only when True.

        Returns
        -------
        y : ndarray of the same shape (``x`` itself in evaluation)
        """
        check_array(self, x)
        check_floating(self, x)
        state.y_shape = x.shape
        if not training or self.p == 0.0:
            state.mask = None
            return x
        # One draw from the library generator seeds a counter-based mask, computed in parallel in
        # one pass with the output (NumPy's generator drew the uniforms on one core, 5 ms for 3.2 M).
        seed = int(_random.get_rng().integers(0, 2**63))
        if F.compiled_dtype(x):
            y, state.mask = F.dropout(x, seed, self.p)
            return y
        y, mask = F.dropout(x.astype(np.float32), seed, self.p)  # float16: the same mask, cast
        state.mask = mask.astype(x.dtype)
        return y.astype(x.dtype)

    def call_backward(self, dy, state, need_input_grad):
        if state.y_shape is None:
            raise RuntimeError("Dropout.backward called before forward")
        check_dy(self, dy, state.y_shape)
        if not need_input_grad:
            return None
        if state.mask is None:
            return dy
        if F.compiled_dtype(dy, state.mask):
            return F.multiply(dy, state.mask)
        return dy * state.mask

    def get_config(self):
        return {"p": self.p}
