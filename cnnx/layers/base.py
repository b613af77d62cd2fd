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

import contextlib
import contextvars
import math

import numpy as np

from .. import random as _random
from ..init import initialize_bias, initialize_weight
from ..validation import check_array

# The layer classes a saved config may name, by class name: what save/load (and
# ``Network.from_config``, ``Residual``) use to rebuild a network. cnnx's own layers enter it as
# they are defined; any other class only through ``register_layer``, because loading a file
# runs the constructor of whatever class it names: a file must not choose code to run.
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
        # cnnx's own public layers register themselves; anything else must use register_layer.
        # An abstract base (``abstract = True`` in its own body, e.g. Container) is none of them.
        if _is_cnnx_class(cls) and not cls.__name__.startswith("_") and not cls.__dict__.get("abstract", False):
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
    def _sample_shape(self, input_shape, expected):
        """``input_shape`` (per sample) as a tuple, checked against ``expected``: an int where the
        size is fixed, a name (``"h"``) where any size goes, e.g. ``(self.in_channels, "h", "w")``."""
        input_shape = tuple(input_shape)
        if len(input_shape) != len(expected) or any(
            isinstance(e, int) and e != s for e, s in zip(expected, input_shape)
        ):
            shown = "(" + ", ".join(map(str, expected)) + ("," if len(expected) == 1 else "") + ")"
            raise ValueError(f"{type(self).__name__} expected input of shape {shown} per sample, received: {input_shape}")
        return input_shape

    def _check_input(self, x, expected_shape):
        """Raise a clear error unless ``x`` is an ndarray of shape ``(n, *expected_shape)``.

        ``None`` in ``expected_shape`` means any size on that axis.
        """
        check_array(self, x)
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


# ---------------------------------------------------------------- registry and load budget --
def layer_to_config(layer):
    """``{"class": name, "config": {...}}``: how networks and containers write a layer."""
    return {"class": type(layer).__name__, "config": layer.get_config()}


def layer_class(name):
    """The registered Layer class called ``name`` (see :func:`register_layer`).

    Raises
    ------
    ValueError
        Naming the known classes when there is none of that name.
    """
    cls = LAYER_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown layer class {name!r}: expected one of cnnx's layers or a class registered "
            f"with cnnx.register_layer, known: {sorted(LAYER_CLASSES)}"
        )
    return cls


def layers_from_config(entries, name="layers"):
    """The layers a list of :func:`layer_to_config` entries describes, built afresh.

    ``name`` (``"layers"``, ``"block"``, ``"branches[1]"``) starts every error message.
    """
    if not isinstance(entries, (list, tuple)):
        raise TypeError(f"Expected {name} as a list of {{'class': ..., 'config': ...}}, received: {entries!r}")
    layers = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise TypeError(f"Expected {name}[{i}] as {{'class': ..., 'config': ...}}, received: {entry!r}")
        try:
            cls = layer_class(entry.get("class"))
        except ValueError as exc:
            raise ValueError(f"{name}[{i}]: {exc}") from None
        layers.append(cls.from_config(entry.get("config", {})))
    return layers


def register_layer(cls=None):
    """Allow ``cnnx.load`` (and ``from_config``) to rebuild layers of class ``cls``.

    Use as a decorator, like Keras's ``register_keras_serializable``::

        @cnnx.register_layer
        class Scale(cnnx.layers.Layer):
            ...

    Only cnnx's own layers and the classes registered here can be named by a saved
    ``config.json``; a file naming any other class is refused without running its code.

    Parameters
    ----------
    cls : type
        A subclass of :class:`Layer`; saved and looked up by its ``__name__``.

    Returns
    -------
    cls, unchanged (so it works as a decorator).

    Raises
    ------
    TypeError
        If ``cls`` is not a Layer subclass.
    ValueError
        If another class is already registered under the same name (cnnx's own ``Dense``, say):
        a saved file could not tell the two apart.
    """
    if cls is None:  # @register_layer() with parentheses
        return register_layer
    if not (isinstance(cls, type) and issubclass(cls, Layer)) or cls is Layer:
        raise TypeError(f"Expected a subclass of cnnx.layers.Layer, received: {cls!r}")
    name = cls.__name__
    current = LAYER_CLASSES.get(name)
    # The same class defined again (a re-run notebook cell) replaces its earlier definition.
    same_definition = current is not None and (current.__module__, current.__qualname__) == (
        cls.__module__, cls.__qualname__) and not _is_cnnx_class(current)
    if current is not None and current is not cls and not same_definition:
        raise ValueError(
            f"Expected a layer class name not yet registered, received: {name!r}, already taken by "
            f"{current.__module__}.{current.__qualname__}; rename the class"
        )
    LAYER_CLASSES[name] = cls
    return cls


def _is_cnnx_class(cls):
    return cls.__module__ == "cnnx" or cls.__module__.startswith("cnnx.")


# While a saved network is loaded, the number of parameter and buffer values its files hold:
# layers check each array against it *before* allocating (``check_state_size``), so a config
# edited to ``out_features=3_000_000`` is refused without spending the memory. None: no limit.
_state_budget: contextvars.ContextVar = contextvars.ContextVar("cnnx_state_budget", default=None)


class StateSizeError(ValueError):
    """A layer being loaded would allocate more parameter values than the saved files hold."""


@contextlib.contextmanager
def state_budget(n_values):
    """Within the block, layers may allocate at most ``n_values`` parameter/buffer values in all
    (see :func:`check_state_size`); used by ``cnnx.io`` while it rebuilds a saved network."""
    token = _state_budget.set([int(n_values)])
    try:
        yield
    finally:
        _state_budget.reset(token)


def check_state_size(shape, what):
    """Raise :class:`StateSizeError` if allocating ``shape`` exceeds the current load budget.

    Layers call this before creating a parameter or buffer; outside a load it does nothing.
    """
    budget = _state_budget.get()
    if budget is None:
        return
    n = math.prod(int(s) for s in shape)
    if n > budget[0]:
        raise StateSizeError(
            f"its config asks for {what} of shape {tuple(shape)} ({n} values), more than its saved "
            "file holds"
        )
    budget[0] -= n


# --- parameter bookkeeping the layer classes share ----------------------------------------------

def init_weight_and_bias(layer, shape, rng, bias_shape=None):
    """Draw ``layer.params["weight"]`` of ``shape`` (and ``"bias"`` when ``layer.use_bias``) with
    ``layer.weight_init``, then zero the gradients.

    ``bias_shape`` is the shape whose first axis gives the bias length and whose others give its
    fan-in (default ``shape``).
    """
    check_state_size(shape, "a weight")  # before drawing: a doctored saved config is refused here
    if layer.use_bias:
        check_state_size((shape if bias_shape is None else bias_shape)[:1], "a bias")
    gen = default_rng(rng)
    layer.params["weight"] = initialize_weight(layer.weight_init, shape, gen)
    if layer.use_bias:
        layer.params["bias"] = initialize_bias(layer.weight_init, shape if bias_shape is None else bias_shape, gen)
    layer.zero_grads()


def grad_buffer(layer, name):
    """``layer.grads[name]`` as a writable array matching its parameter (made on first use).

    Gradients are written into this array rather than replacing it, so anyone holding a reference
    (an optimizer's parameter list) always sees the latest values.
    """
    p = layer.params[name]
    g = layer.grads.get(name)
    if g is None or g.shape != p.shape or g.dtype != p.dtype:
        g = layer.grads[name] = np.zeros_like(p)
    return g


def store_grads(layer, **grads):
    """Copy each ``name=gradient`` into ``layer.grads[name]`` in place.

    Names the layer has no parameter for (the bias of a layer built without one) are skipped.
    """
    for name, g in grads.items():
        if name in layer.params:
            np.copyto(grad_buffer(layer, name), g)


def init_affine(layer, num_features):
    """``layer.params`` ``"weight"`` (ones) and ``"bias"`` (zeros) of shape ``(num_features,)``: the
    per-feature scale and shift of a normalisation layer built with ``affine=True``."""
    layer.params["weight"] = np.ones(num_features, dtype=np.float32)
    layer.params["bias"] = np.zeros(num_features, dtype=np.float32)
    layer.zero_grads()
