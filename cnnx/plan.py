"""The execution plan: how a Network runs its layer list.

A ``Plan`` is built once per network (and rebuilt when its layer list changes). It groups the
layers into steps; most steps run one layer, and some run several as one fused pass:

- ``Conv2D`` (no activation of its own) followed by a ``ReLU`` or ``LeakyReLU(slope >= 0)``
  layer: the activation runs inside the convolution kernel's layout pass, forward and backward,
  exactly as ``Conv2D(..., activation="leaky_relu")`` does;
- such a convolution (or one with its own compiled activation, or none) followed by a
  2x2 / stride-2 ``MaxPool2D``: convolution, activation and pool in one pass; in training the
  pass also keeps each window's argmax, and the backward scatters the pooled gradient through it
  straight into the convolution's GEMM layout (inference keeps nothing);
- ``Dense`` or ``Conv1D`` (no activation of its own) followed by an elementwise activation
  layer: the activation is applied in place on the layer's output, as ``activation=`` does.

Fused and unfused forms compute the same arithmetic (the same function objects and kernels),
so results agree to float round-off; tests/test_plan.py checks both against each other.

The plan also owns what used to be written into layers: whether a layer computes its input
gradient (the first layer does not, unless asked) is passed on each call; caches and scratch
buffers live in per-thread ``CallState`` objects (``Context``), not in the layers. So one
Network can run in several threads at once and one layer object can sit in two networks.
Layers still on the stateful protocol (``Layer.stateful``) keep caches on themselves; a plan
holding one runs its forward passes under a lock.
"""
from __future__ import annotations

import threading
import time

from . import parallel

__all__ = ["Plan", "Step", "layer_label"]


class Step:
    """One unit of a plan: the layers it covers and how it runs them.

    Attributes
    ----------
    indices : tuple of int
        Indices into the network's layer list this step runs, in order.
    kind : str
        ``"layer"``, ``"conv+act"``, ``"conv+pool"``, ``"conv+act+pool"``, ``"dense+act"`` or
        ``"conv1d+act"``.
    label : str
        What the profiler shows: the layers' classes joined by ``" + "``.
    """

    kind = "layer"
    # Whether the backward may write its input gradient into a buffer reused from batch to batch:
    # set by the plan when the step before consumes it without keeping it (see _plan_steps).
    reuse_input_grad = False

    def __init__(self, layers, indices, reuse_output=False):
        self.layers = tuple(layers)
        self.indices = tuple(indices)
        self.reuse_output = reuse_output
        self.label = " + ".join(layer_label(layer) for layer in self.layers)

    @property
    def first(self):
        return self.indices[0]

    def forward(self, x, training, states):
        layer = self.layers[0]
        if self.reuse_output:
            return layer.call(x, training, states[self.first], reuse_output=True)
        return layer.call(x, training, states[self.first])

    def backward(self, d, states, need_input_grad):
        if self.reuse_input_grad:
            return self.layers[0].call_backward(d, states[self.first], need_input_grad, reuse_input_grad=True)
        return self.layers[0].call_backward(d, states[self.first], need_input_grad)

    def __repr__(self):
        return f"Step({self.kind}: {self.label}, layers {list(self.indices)})"


def _rectifier(act):
    """``(name, negative_slope)`` of a ReLU / LeakyReLU layer, as Conv2D's ``fused_activation`` takes it."""
    return act.activation_name, getattr(act, "negative_slope", 0.0)


class _ConvActivation(Step):
    """Conv2D + ReLU / LeakyReLU layer: the activation runs in the convolution's kernels."""

    kind = "conv+act"

    def __init__(self, layers, indices, reuse_output=False):
        super().__init__(layers, indices, reuse_output)
        self.rectifier = _rectifier(layers[1])

    def forward(self, x, training, states):
        return self.layers[0].call(x, training, states[self.first], fused_activation=self.rectifier,
                                   reuse_output=self.reuse_output)

    def backward(self, d, states, need_input_grad):
        # The conv's state remembers the fused rectifier: its backward applies the activation's too.
        return self.layers[0].call_backward(d, states[self.first], need_input_grad,
                                            reuse_input_grad=self.reuse_input_grad)


class _ConvPool(Step):
    """Inference: Conv2D (+ its own or a separate compiled activation) + 2x2 max-pool in one pass."""

    def __init__(self, layers, indices):
        super().__init__(layers, indices)
        self.rectifier = _rectifier(layers[1]) if len(layers) == 3 else None
        self.kind = "conv+act+pool" if len(layers) == 3 else "conv+pool"

    def forward(self, x, training, states):
        return self.layers[0].call(x, False, states[self.first], fused_activation=self.rectifier, max_pool_2x2=True)

    def backward(self, d, states, need_input_grad):  # pragma: no cover - the plan replays instead
        raise RuntimeError("a fused conv + max-pool inference step keeps nothing for backward")


class _ConvPoolTraining(Step):
    """Training: Conv2D (+ its own or a separate compiled activation) + 2x2 max-pool in one pass
    that also keeps the pool's argmax; the backward scatters through it into the conv's GEMM."""

    def __init__(self, layers, indices, reuse_output=False):
        super().__init__(layers, indices, reuse_output)
        self.rectifier = _rectifier(layers[1]) if len(layers) == 3 else None
        self.kind = "conv+act+pool" if len(layers) == 3 else "conv+pool"

    def forward(self, x, training, states):
        return self.layers[0].call_pooled(x, training, states[self.first], fused_activation=self.rectifier,
                                          reuse_output=self.reuse_output)

    def backward(self, d, states, need_input_grad):
        return self.layers[0].call_pooled_backward(d, states[self.first], need_input_grad,
                                                   reuse_input_grad=self.reuse_input_grad)


class _LinearActivation(Step):
    """Dense / Conv1D + elementwise activation layer: the activation runs in place on the
    layer's output, as the layer's own ``activation=`` does."""

    def __init__(self, layers, indices):
        super().__init__(layers, indices)
        self.kind = f"{type(layers[0]).__name__.lower()}+act"
        self.activation = layers[1].fused_form()

    def forward(self, x, training, states):
        return self.layers[0].call(x, training, states[self.first], fused_activation=self.activation)

    def backward(self, d, states, need_input_grad):
        return self.layers[0].call_backward(d, states[self.first], need_input_grad)


class Context:
    """One thread's run of a plan: a ``CallState`` per layer, and the input of the last
    inference forward that kept no caches (a following backward replays it)."""

    def __init__(self, layers):
        self.states = [layer.new_state() for layer in layers]
        self.replay = None


class Plan:
    """How a list of layers runs, forward and backward, in training and in inference.

    Parameters
    ----------
    layers : list of Layer
        The network's layers (the plan keeps the list object to notice changes).
    fuse : bool, default True
        False runs every layer as its own step (the reference the fused plan is tested against).

    Attributes
    ----------
    train_steps : list of Step
        Steps of a training forward (and of any forward whose caches a backward will read).
    infer_steps : list of Step
        Steps of an inference forward: also fuses conv + max-pool.
    """

    def __init__(self, layers, fuse=True):
        self.layers = list(layers)
        self.layer_ids = tuple(id(layer) for layer in self.layers)
        self.fuse = fuse
        self.train_steps = _plan_steps(self.layers, fuse, inference=False)
        self.infer_steps = _plan_steps(self.layers, fuse, inference=True)
        if all(a.indices == b.indices and type(a) is type(b) for a, b in zip(self.infer_steps, self.train_steps)) \
                and len(self.infer_steps) == len(self.train_steps):
            # Nothing more to fuse for inference: one list, and every forward keeps its caches.
            self.infer_steps = self.train_steps
        self._local = threading.local()
        # Stateful layers keep caches on themselves: their calls must not overlap.
        self._stateful = any(layer.stateful for layer in self.layers)
        self._forward_lock = threading.RLock()
        # Gradients live in the layers: backward passes never overlap.
        self._backward_lock = threading.RLock()

    def matches(self, layers):
        """Whether the plan was built for exactly this sequence of layer objects."""
        return len(layers) == len(self.layer_ids) and all(id(a) == b for a, b in zip(layers, self.layer_ids))

    def context(self):
        """The calling thread's ``Context`` (created on first use, freed with the thread)."""
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = Context(self.layers)
        return ctx

    def steps(self, training):
        return self.train_steps if training else self.infer_steps

    def forward(self, x, training, keep_caches=True, timer=None):
        """Run the layers on ``x``.

        Parameters
        ----------
        x : ndarray of shape (n, *input_shape)
        training : bool
        keep_caches : bool
            For an inference forward: False allows steps that keep nothing for backward (conv +
            max-pool); a backward that follows then replays the forward first.
        timer : ndarray of shape (len(steps),), optional
            Seconds spent in each step are added to it (the profiler).
        """
        ctx = self.context()
        parallel.note_batch()
        fast = not training and not keep_caches
        steps = self.infer_steps if fast else self.train_steps
        ctx.replay = x if steps is not self.train_steps else None
        if self._stateful:
            with self._forward_lock:
                return _run(steps, x, training, ctx.states, timer)
        return _run(steps, x, training, ctx.states, timer)

    def backward(self, d, need_input_grad=False, timer=None):
        """Back-propagate ``d`` through the calling thread's last forward; fills the layers'
        ``grads``. Returns the input gradient when ``need_input_grad``, else None."""
        ctx = self.context()
        # Stateful layers' caches are shared by all threads: hold off their forwards too.
        with self._backward_lock, (self._forward_lock if self._stateful else _NO_LOCK):
            if ctx.replay is not None:
                x, ctx.replay = ctx.replay, None
                _run(self.train_steps, x, False, ctx.states, None)
            steps = self.train_steps
            clock = time.perf_counter
            for k in range(len(steps) - 1, -1, -1):
                step = steps[k]
                t0 = clock() if timer is not None else 0.0
                d = step.backward(d, ctx.states, need_input_grad or k > 0)
                if timer is not None:
                    timer[k] += clock() - t0
            return d

    def describe(self, training=True):
        """One line per step: index, kind, the layers it covers."""
        return "\n".join(f"{k}: {s.kind:<14} layers {list(s.indices)}  {s.label}"
                         for k, s in enumerate(self.steps(training)))

    def __repr__(self):
        return f"Plan({len(self.layers)} layers, {len(self.train_steps)} training steps, {len(self.infer_steps)} inference steps)"


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


def _run(steps, x, training, states, timer):
    if timer is None:
        for step in steps:
            x = step.forward(x, training, states)
        return x
    clock = time.perf_counter
    for k, step in enumerate(steps):
        t0 = clock()
        x = step.forward(x, training, states)
        timer[k] += clock() - t0
    return x


# ---------------------------------------------------------------------- building -------------
def _plan_steps(layers, fuse, inference):
    """The steps for ``layers``: which layers fuse (greedy, left to right, longest fusion first)
    and which steps may reuse their output buffer from batch to batch."""
    from .layers import Conv1D, Conv2D, Dense

    steps = []
    i, n = 0, len(layers)
    while i < n:
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < n else None
        after_nxt = layers[i + 2] if i + 2 < n else None
        if fuse and type(layer) is Conv2D:
            act_fusable = layer.activation is None and _is_rectifier_layer(nxt)
            if inference and act_fusable and _is_plain_max_pool_2x2(after_nxt):
                steps.append(_ConvPool(layers[i:i + 3], range(i, i + 3)))
                i += 3
                continue
            if inference and layer.can_fuse_max_pool_2x2 and _is_plain_max_pool_2x2(nxt):
                steps.append(_ConvPool(layers[i:i + 2], range(i, i + 2)))
                i += 2
                continue
            if not inference and layer.pools_in_training:
                if act_fusable and _is_plain_max_pool_2x2(after_nxt):
                    steps.append(_ConvPoolTraining(layers[i:i + 3], range(i, i + 3),
                                                   reuse_output=_consumes_into_new_array(layers, i + 3)))
                    i += 3
                    continue
                if _is_plain_max_pool_2x2(nxt):
                    steps.append(_ConvPoolTraining(layers[i:i + 2], range(i, i + 2),
                                                   reuse_output=_consumes_into_new_array(layers, i + 2)))
                    i += 2
                    continue
            if act_fusable:
                # The output buffer can be reused from batch to batch when the next layer reads it
                # and writes a new array (it never reaches the network's output, and only this
                # step's backward reads it again within the same training step).
                reuse = _consumes_into_new_array(layers, i + 2)
                steps.append(_ConvActivation(layers[i:i + 2], range(i, i + 2), reuse_output=reuse))
                i += 2
                continue
        if fuse and type(layer) in (Dense, Conv1D) and layer.activation is None and _is_elementwise_activation(nxt):
            steps.append(_LinearActivation(layers[i:i + 2], range(i, i + 2)))
            i += 2
            continue
        reuse = type(layer) is Conv2D and _consumes_into_new_array(layers, i + 1)
        steps.append(Step([layer], [i], reuse_output=reuse))
        i += 1
    if not inference:
        # A convolution step's input gradient goes only to the step before it; where that is a
        # convolution step too, it reads the gradient and writes new arrays, so the buffer can be
        # reused from batch to batch (the first step's input gradient, returned to the caller, never is).
        for k in range(1, len(steps)):
            steps[k].reuse_input_grad = _is_conv_step(steps[k]) and _is_conv_step(steps[k - 1])
    return steps


def _is_conv_step(step):
    """A step whose backward is a Conv2D's own (``call_backward`` / ``call_pooled_backward``)."""
    from .layers import Conv2D

    return type(step) in (Step, _ConvActivation, _ConvPoolTraining) and type(step.layers[0]) is Conv2D


def _consumes_into_new_array(layers, i):
    """Whether ``layers[i]`` reads its input and writes a new array (so the step before it may
    reuse its output buffer from batch to batch): a Conv2D, pool or Dense layer, or a Flatten
    (a view) followed by a Dense layer. Never the network's output."""
    from .layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D

    kind = type(layers[i]) if i < len(layers) else None
    if kind in (Conv2D, MaxPool2D, AvgPool2D, Dense):
        return True
    return kind is Flatten and i + 1 < len(layers) and type(layers[i + 1]) is Dense


def _is_rectifier_layer(layer):
    """A ReLU or LeakyReLU(slope >= 0) layer: the activations the convolution kernels apply."""
    from .layers import LeakyReLU, ReLU
    from .layers.activations import compiled_rectifier

    if type(layer) is ReLU:
        return True
    return type(layer) is LeakyReLU and compiled_rectifier("leaky_relu", layer.negative_slope)


def _is_plain_max_pool_2x2(layer):
    from .layers import MaxPool2D

    return type(layer) is MaxPool2D and layer.is_plain_2x2


def _is_elementwise_activation(layer):
    from .layers import GELU, LeakyReLU, ReLU, Sigmoid, Tanh

    return type(layer) in (ReLU, LeakyReLU, Sigmoid, Tanh, GELU) and layer.fused_form() is not None


def layer_label(layer):
    """Class name, plus a fused activation so the summary says what the layer computes."""
    name = type(layer).__name__
    try:
        config = layer.get_config()
    except Exception:  # a summary must not fail because of a half-written layer
        config = {}
    activation = config.get("activation") if isinstance(config, dict) else None
    if activation:
        extra = ""
        if activation == "leaky_relu" and "negative_slope" in config:
            extra = f"({config['negative_slope']:g})"
        name += f" + {activation}{extra}"
    return name
