"""The base of the container layers (``Residual``, ``Concat``): layers made of paths of other layers.

A container owns no parameters of its own; the layers it holds do. It reports theirs under
prefixed names (``"block.0.weight"``, ``"branches.1.0.weight"``), which is what optimizers and
save/load key on, and its dtype, gradients and buffers are theirs. A subclass says what it holds
with ``paths()`` and does its own shapes, forward, backward and config.
"""
from __future__ import annotations

from .base import Layer

__all__ = ["Container", "as_layer_list", "path_backward", "path_forward", "path_shape"]


def _snapshot(what, collect):
    """A property reading ``collect(container)``; its setter accepts only the empty dict
    ``Layer.__init__`` assigns (a container keeps nothing of its own)."""

    def refuse(self, value):
        if value:
            raise AttributeError(f"{type(self).__name__} keeps its {what} in its {self.holders}; set them there")

    return property(collect, refuse)


class Container(Layer):
    """A layer whose state lives in the layers of its paths (see the module docstring).

    ``params``, ``grads`` and ``buffers`` are read-only snapshots keyed like ``named_parameters``.
    """

    abstract = True  # not a layer of its own: not registered for cnnx.load
    #: What the error messages call the layers it holds.
    holders = "children"

    def paths(self):
        """Yield ``(prefix, layers)`` for every path, in the order of its names."""
        raise NotImplementedError

    def _hold(self, children, what):
        """Take ``children`` (every layer of every path; ``what`` names them in the error): they
        must be distinct objects. Inner layers always pass gradients on; the first layer of each
        path follows the container's own flag (which a Network may turn off), set in backward."""
        if len({id(layer) for layer in children}) != len(children):
            raise ValueError(f"Expected every layer of {what} to be a distinct object, received a repeated layer")
        for layer in children:
            layer.needs_input_grad = True
        self.needs_input_grad = True

    def held_layers(self):
        """Yield ``(name, layer)`` for every layer it holds: ``name`` is ``"<path>.<index>"``."""
        for prefix, layers in self.paths():
            for i, layer in enumerate(layers):
                yield f"{prefix}.{i}", layer

    params = _snapshot("parameters", lambda self: {name: p for name, p, _ in self.named_parameters()})
    grads = _snapshot("gradients", lambda self: {name: g for name, _, g in self.named_parameters()})
    buffers = _snapshot("buffers", lambda self: dict(self.named_buffers()))

    def named_parameters(self):
        for where, layer in self.held_layers():
            for name, p, g in layer.named_parameters():
                yield f"{where}.{name}", p, g

    def named_buffers(self):
        for where, layer in self.held_layers():
            for name, b in layer.named_buffers():
                yield f"{where}.{name}", b

    def astype(self, dtype):
        for _, layer in self.held_layers():
            layer.astype(dtype)
        return self

    def zero_grads(self):
        for _, layer in self.held_layers():
            layer.zero_grads()


def as_layer_list(layers, name, allow_none=False):
    """``layers`` (a Layer or a non-empty list of them) as a list; None too when ``allow_none``."""
    if layers is None and allow_none:
        return None
    if isinstance(layers, Layer):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        expected = "a Layer, a list of layers or None" if allow_none else "a Layer or a list of layers"
        raise TypeError(f"Expected {name} to be {expected}, received: {type(layers).__name__}")
    if len(layers) == 0:
        raise ValueError(f"Expected {name} to hold at least one layer, received: an empty list")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"Expected {name}[{i}] to be a cnnx Layer, received: {type(layer).__name__}")
    return list(layers)


def path_shape(layers, shape, where):
    """The output shape of ``layers`` for a per-sample input ``shape``; ``where`` ("Residual block",
    "Concat branches[1]") names the path when a layer refuses the shape."""
    for i, layer in enumerate(layers):
        try:
            shape = tuple(layer.output_shape(shape))
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"{where}[{i}] ({type(layer).__name__}) cannot take input of shape {shape}: {exc}"
            ) from exc
    return shape


def path_forward(layers, x, training):
    """Run ``x`` through ``layers`` in order; returns the path's output."""
    for layer in layers:
        x = layer.forward(x, training)
    return x


def path_backward(layers, d, needs_input_grad):
    """Back-propagate ``d`` through ``layers`` in reverse; returns the path's input gradient."""
    # The first layer of a path need not compute dx when nobody wants the container's dx.
    layers[0].needs_input_grad = needs_input_grad
    for layer in reversed(layers):
        d = layer.backward(d)
    return d
