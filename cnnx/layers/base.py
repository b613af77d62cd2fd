"""The Layer base class: the contract every layer keeps (see DESIGN.md).

A layer owns its parameters (``params``), the gradients ``backward`` fills (``grads``, same keys
and shapes), optional non-trainable state (``buffers``, e.g. BatchNorm running statistics) and
whatever it caches between ``forward`` and ``backward``.
"""
from __future__ import annotations

import numpy as np

from .. import random as _random


# Every Layer subclass, by class name: what save/load uses to rebuild a network from its config.
LAYER_CLASSES: dict[str, type] = {}


class Layer:
    """Base class. Subclasses implement ``forward``, ``backward``, ``output_shape``, ``get_config``.

    Shapes passed to ``output_shape`` exclude the batch axis: ``(c, h, w)`` for images,
    ``(features,)`` after Flatten.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # private helper bases are never saved by name
            LAYER_CLASSES[cls.__name__] = cls

    def __init__(self):
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}

    # --- the contract -------------------------------------------------------------------
    def forward(self, x, training=False):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

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
