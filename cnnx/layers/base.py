"""The Layer base class: the contract every layer keeps (see DESIGN.md).

A layer owns its parameters (``params``), the gradients ``backward`` fills (``grads``, same keys
and shapes) and optional non-trainable state (``buffers``, e.g. BatchNorm running statistics).

Two ways to call a layer:

- ``forward(x, training)`` / ``backward(dy)``: standalone use. What ``backward`` needs is kept in
  a state object the layer owns, and ``needs_input_grad`` (an attribute) says whether
  ``backward`` computes the input gradient.
- ``call(x, training, state)`` / ``call_backward(dy, state, need_input_grad)``: the protocol a
  Network's execution plan (``cnnx.plan``) uses. The caller owns ``state`` (from
  ``new_state()``): caches and scratch buffers live there, not in the layer, so one layer can sit
  in two networks and one network can run in several threads at once.

Layers written before that protocol (``stateful = True``, the base default) implement only
``forward`` / ``backward`` and keep their caches on themselves; the plan runs them under a lock.
"""
from __future__ import annotations

import numpy as np

from .. import random as _random


# Every Layer subclass, by class name: what save/load uses to rebuild a network from its config.
LAYER_CLASSES: dict[str, type] = {}


class CallState:
    """Per-call-site storage of one layer: what ``call`` caches for ``call_backward`` and the
    scratch buffers it reuses. Plain attributes, set by the layer that owns the protocol."""

    def __repr__(self):
        return f"CallState({', '.join(sorted(self.__dict__))})"


class Layer:
    """Base class. Subclasses implement ``forward``, ``backward``, ``output_shape``, ``get_config``
    (stateful layers) or ``call``, ``call_backward``, ``output_shape``, ``get_config`` with
    ``stateful = False``.

    Shapes passed to ``output_shape`` exclude the batch axis: ``(c, h, w)`` for images,
    ``(features,)`` after Flatten.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # private helper bases are never saved by name
            LAYER_CLASSES[cls.__name__] = cls

    #: True when the layer keeps its caches on itself (only ``forward`` / ``backward``).
    stateful = True

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}
        self.needs_input_grad = True
        self._own_state = None

    # --- the contract -------------------------------------------------------------------
    def forward(self, x, training=False):
        """Standalone forward: ``call`` with the layer's own state."""
        if self.stateful:
            raise NotImplementedError
        return self.call(x, training, self.own_state)

    def backward(self, dy):
        """Standalone backward of the last ``forward``; the input gradient when ``needs_input_grad``."""
        if self.stateful:
            raise NotImplementedError
        return self.call_backward(dy, self.own_state, self.needs_input_grad)

    def new_state(self):
        """A fresh ``CallState`` for one call site (a network's plan, a thread)."""
        return CallState()

    @property
    def own_state(self):
        """The state standalone ``forward`` / ``backward`` use."""
        if self._own_state is None:
            self._own_state = self.new_state()
        return self._own_state

    def call(self, x, training, state):
        """Forward with caches kept in ``state``. Stateful layers: ``forward`` (``state`` unused)."""
        return self.forward(x, training)

    def call_backward(self, dy, state, need_input_grad):
        """Backward of the ``call`` that filled ``state``: fills ``grads`` and returns the input
        gradient, or None when ``need_input_grad`` is false."""
        # A stateful layer reads the flag from itself: set it for this call only (the plan runs
        # stateful layers under a lock), so a first layer still skips its input gradient.
        previous = getattr(self, "needs_input_grad", True)  # a custom layer may not set it
        self.needs_input_grad = bool(need_input_grad)
        try:
            dx = self.backward(dy)
        finally:
            self.needs_input_grad = previous
        return dx if need_input_grad else None

    def output_shape(self, input_shape):
        """Per-sample output shape; raises ValueError when ``input_shape`` does not fit."""
        return tuple(input_shape)

    def get_config(self):
        """JSON-serialisable constructor arguments: ``type(layer)(**layer.get_config())`` rebuilds it."""
        return {}

    # --- shared behaviour ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def zero_grads(self):
        for name, p in self.params.items():
            self.grads[name] = np.zeros_like(p)

    def astype(self, dtype):
        """Cast parameters, gradients and buffers to ``dtype`` in place of the old arrays."""
        dtype = np.dtype(dtype)
        for store in (self.params, self.grads, self.buffers):
            for name, a in store.items():
                store[name] = np.ascontiguousarray(a, dtype=dtype)
        return self

    def named_parameters(self):
        """Yield ``(name, param, grad)``; containers (Residual) override this to prefix sub-layers."""
        for name, p in self.params.items():
            yield name, p, self.grads.get(name)

    def named_buffers(self):
        """Yield ``(name, buffer)`` for non-trainable state that save/load must keep."""
        yield from self.buffers.items()

    @property
    def num_params(self):
        return int(sum(p.size for _, p, _ in self.named_parameters()))

    def __call__(self, x, training=False):
        return self.forward(x, training=training)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # --- helpers for subclasses ---------------------------------------------------------
    def _check_input(self, x, expected_shape):
        """Raise a clear error unless ``x`` is an ndarray of shape ``(n, *expected_shape)``.

        ``None`` in ``expected_shape`` means any size on that axis.
        """
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{type(self).__name__} expected a numpy array, received: {type(x).__name__}")
        ok = x.ndim == len(expected_shape) + 1 and all(
            e is None or e == s for e, s in zip(expected_shape, x.shape[1:])
        )
        if not ok:
            shown = ", ".join("*" if e is None else str(e) for e in expected_shape)
            raise ValueError(
                f"{type(self).__name__} expected input of shape (batch, {shown}), received: {x.shape}"
            )


def default_rng(rng=None):
    """The generator a layer draws its initial weights from (``cnnx.random.manual_seed`` seeds it)."""
    return _random.get_rng() if rng is None else np.random.default_rng(rng)
