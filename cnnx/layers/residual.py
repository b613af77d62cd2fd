"""Residual: the container layer ``y = activation(block(x) + shortcut(x))``.

It owns no parameters of its own; its children do. It forwards ``named_parameters`` /
``named_buffers`` under prefixed names (``"block.0.weight"``, ``"shortcut.1.running_mean"``), which
is what optimizers and save/load key on, and nests children's configs so ``from_config`` can
rebuild it (a Residual may sit inside another Residual's block).
"""
from __future__ import annotations

import numpy as np

from ..validation import check_array, check_dy
from .activations import FusedActivation, check_activation, check_negative_slope
from .base import layer_to_config, layers_from_config
from .container import Container, as_layer_list, path_backward, path_forward, path_shape


class Residual(Container):
    """Residual connection: ``y = activation(block(x) + shortcut(x))``.

    Parameters
    ----------
    block : Layer or list of Layer
        The main path, applied in order.
    shortcut : None, Layer or list of Layer, default None
        ``None`` is the identity; otherwise e.g. a strided 1x1 ``Conv2D`` (and a ``BatchNorm2D``)
        that brings ``x`` to the block's output shape.
    activation : {None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu"}, default None
        Applied after the sum (``"relu"`` for a ResNet basic block).
    negative_slope : float, default 0.01
        Slope of ``"leaky_relu"`` (ignored otherwise).

    Notes
    -----
    Both paths must produce the same shape; ``output_shape`` (which a ``Network`` calls when it is
    built) and ``forward`` raise ``ValueError`` otherwise. ``params``, ``grads`` and ``buffers``
    are read-only snapshots keyed like ``named_parameters``; the arrays live in the children.
    """

    def __init__(self, block, shortcut=None, activation=None, negative_slope=0.01):
        super().__init__()
        self.block = as_layer_list(block, "block")
        self.shortcut = as_layer_list(shortcut, "shortcut", allow_none=True)
        self._hold(self.block + (self.shortcut or []), "block and shortcut")
        self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)
        self._act = FusedActivation(self.activation, self.negative_slope)
        self._z = self._y = None

    # --- the Layer state: the paths' (see Container) ---------------------------------------
    def paths(self):
        yield "block", self.block
        if self.shortcut is not None:
            yield "shortcut", self.shortcut

    # --- shapes --------------------------------------------------------------------------
    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        block_shape = path_shape(self.block, input_shape, "Residual block")
        short_shape = input_shape if self.shortcut is None else path_shape(self.shortcut, input_shape,
                                                                           "Residual shortcut")
        if block_shape != short_shape:
            what = "the identity shortcut" if self.shortcut is None else "the shortcut"
            raise ValueError(
                f"Residual expected the block and {what} to give the same shape for input {input_shape}, "
                f"received: block {block_shape}, shortcut {short_shape}"
            )
        return block_shape

    # --- forward / backward ----------------------------------------------------------------
    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, ...), what the first layer of each path takes

        Returns
        -------
        y : ndarray of the block's output shape
        """
        check_array(self, x)
        a = path_forward(self.block, x, training)
        s = x if self.shortcut is None else path_forward(self.shortcut, x, training)
        if a.shape != s.shape:
            raise ValueError(
                f"Residual expected the block and the shortcut to give the same shape for input {x.shape}, "
                f"received: block {a.shape}, shortcut {s.shape}"
            )
        # a + s is a fresh array the activation may overwrite; the paths' outputs may be buffers
        # their layers still need for backward.
        self._y, self._z = self._act.forward(a + s)
        return self._y

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of the shape of the last ``forward`` output

        Returns
        -------
        dx : ndarray of the input's shape, ``dx_block + dx_shortcut``; None when
            ``needs_input_grad`` is False
        """
        if self._y is None:
            raise RuntimeError("Residual.backward called before forward")
        check_dy(self, dy, self._y.shape)
        dz = self._act.backward(dy, self._z, self._y)
        d_block = path_backward(self.block, dz, self.needs_input_grad)
        if self.shortcut is None:
            d_short = dz
        else:
            d_short = path_backward(self.shortcut, dz, self.needs_input_grad)
        if not self.needs_input_grad:
            return None
        return np.add(d_block, d_short)

    # --- config ------------------------------------------------------------------------------
    def get_config(self):
        def nested(layers):
            return [layer_to_config(layer) for layer in layers]

        return {
            "block": nested(self.block),
            "shortcut": None if self.shortcut is None else nested(self.shortcut),
            "activation": self.activation,
            "negative_slope": self.negative_slope,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        block = layers_from_config(config.pop("block", None), "block")
        shortcut = config.pop("shortcut", None)
        if shortcut is not None:
            shortcut = layers_from_config(shortcut, "shortcut")
        return cls(block, shortcut, **config)

    def __repr__(self):
        def show(layers):
            return "[" + ", ".join(repr(layer) for layer in layers) + "]"

        shortcut = "None" if self.shortcut is None else show(self.shortcut)
        extra = f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope!r}"
        return f"Residual(block={show(self.block)}, shortcut={shortcut}{extra})"

