"""Conv2D: parameters, padding resolution, caches and the fused activation around
``cnnx.functional.conv2d`` / ``conv2d_backward`` (which own the arithmetic)."""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..geometry import dilated_kernel_size, explicit_padding, positive_pair, windowed_output_size
from ..init import check_initializer
from ..validation import check_bool, check_dy, check_floating, check_groups, positive_int
from .activations import FusedActivation, check_activation, check_negative_slope, compiled_rectifier
from .base import Layer, init_weight_and_bias, store_grads


def canonical_padding(padding, kernel_size, stride):
    """Validate ``padding`` and return the form ``get_config`` reports.

    ``"valid"``/``"same"`` stay strings (``"same"`` with stride > 1 depends on the input size);
    anything else becomes ``(ph, pw)`` when symmetric, else ``((top, bottom), (left, right))``.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        explicit_padding(mode, kernel_size, (1, 1))  # validates the name only
        return mode
    (pt, pb), (pl, pr) = explicit_padding(padding, kernel_size, stride)
    return (pt, pl) if (pt == pb and pl == pr) else ((pt, pb), (pl, pr))


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as PyTorch) over NCHW batches.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (kh, kw)
    stride : int or (sy, sx), default 1
    padding : int, (ph, pw), ((top, bottom), (left, right)), "valid" or "same", default 0
        ``"same"`` keeps ``ceil(size / stride)`` outputs; an even kernel's extra row/column goes
        at the bottom/right (PyTorch, Keras).
    bias : bool, default True
    activation : {None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu"}, default None
        Fused activation applied after the bias.
    negative_slope : float, default 0.01
        Slope of ``"leaky_relu"`` (ignored otherwise).
    weight_init : str, default "default"
        One of ``cnnx.init.INITIALIZERS``; ``"default"`` is PyTorch's ``nn.Conv2d`` rule
        (fan_in = in_channels * kh * kw).
    rng : None, int or numpy.random.Generator
        Source of the initial weights; ``None`` uses the generator ``cnnx.manual_seed`` seeds.
    dilation : int or (dy, dx), default 1 (keyword only)
        Spacing between kernel taps; the kernel spans ``d * (k - 1) + 1`` input pixels per axis
        (what ``"same"`` padding and the output size are computed from).
    groups : int, default 1 (keyword only)
        Split the channels into ``groups`` independent convolutions (both channel counts must be
        divisible by it); ``groups == in_channels`` is a depthwise convolution.

    Attributes
    ----------
    params : dict
        ``"weight"`` of shape (out_channels, in_channels // groups, kh, kw), ``"bias"`` of shape
        (out_channels,): PyTorch's layout.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 activation=None, negative_slope=0.01, weight_init="default", rng=None, *, dilation=1, groups=1):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = positive_pair(kernel_size, "kernel_size")
        self.stride = positive_pair(stride, "stride")
        self.dilation = positive_pair(dilation, "dilation")
        self.groups = check_groups(groups, self.in_channels, self.out_channels)
        # What the padding and the output size see: the dilated kernel's span.
        self._span = dilated_kernel_size(self.kernel_size, self.dilation)
        self.padding = canonical_padding(padding, self._span, self.stride)
        self.use_bias = check_bool(bias, "bias")
        self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)
        self.weight_init = check_initializer(weight_init)
        init_weight_and_bias(self, (self.out_channels, self.in_channels // self.groups) + self.kernel_size, rng)
        self._act = FusedActivation(self.activation, self.negative_slope)
        # The kernels fuse ReLU and leaky ReLU (slope >= 0); other activations run as NumPy passes.
        self._compiled_act = self.activation if compiled_rectifier(self.activation, self.negative_slope) else None

    def explicit_padding(self, hw):
        """``((top, bottom), (left, right))`` for an input of spatial size ``hw = (h, w)``."""
        return explicit_padding(self.padding, self._span, self.stride, tuple(hw))

    def output_shape(self, input_shape):
        _, h, w = self._sample_shape(input_shape, (self.in_channels, "h", "w"))
        (pt, pb), (pl, pr) = self.explicit_padding((h, w))
        dilated = "" if self.dilation == (1, 1) else f" (dilation {self.dilation})"
        out_h, out_w = windowed_output_size((h, w), self._span, self.stride, ((pt, pb), (pl, pr)), "Conv2D", dilated)
        return (self.out_channels, out_h, out_w)

    def _checked(self, x):
        """Validate ``x``; return it in the parameters' dtype, its explicit padding and the output shape."""
        self._check_input(x, (self.in_channels, None, None))
        check_floating(self, x)
        y_shape = (x.shape[0],) + self.output_shape(x.shape[1:])
        x = x.astype(self.params["weight"].dtype, copy=False)
        return x, self.explicit_padding(x.shape[2:]), y_shape

    stateful = False

    def new_state(self):
        state = super().new_state()
        # Scratch buffers (im2col columns, a reused output) belong to the call site, not the layer.
        state.workspace = F.Workspace()
        state.x = state.z = state.y = state.pads = None
        state.rectifier = None
        return state

    def _rectifier(self, fused_activation):
        """``(activation, slope)`` for the kernels: the layer's own, or the activation layer an
        execution plan fuses into it (only when the layer has none of its own)."""
        if fused_activation is None:
            return self._compiled_act, self.negative_slope
        if self.activation is not None or not compiled_rectifier(*fused_activation):
            raise ValueError(f"Conv2D cannot fuse activation {fused_activation!r}")
        return fused_activation

    def call(self, x, training, state, *, fused_activation=None, max_pool_2x2=False, reuse_output=False):
        """Forward with caches in ``state`` (see ``Layer.call``).

        Parameters
        ----------
        x : ndarray of shape (n, in_channels, h, w), floating (cast to the parameters' dtype)
        training : bool
        state : CallState from ``new_state()``
        fused_activation : ("relu" | "leaky_relu", negative_slope), optional
            The activation layer that follows, run inside the kernel (only for a layer without an
            activation of its own; an execution plan passes it).
        max_pool_2x2 : bool
            Also apply the 2x2 / stride-2 max-pool that follows, in the same pass. Inference
            only: nothing is cached for a backward.
        reuse_output : bool
            Write the output into a buffer of ``state`` reused from call to call: only when the
            caller knows the next layer copies what it needs before the next call.

        Returns
        -------
        y : ndarray of shape (n, out_channels, out_h, out_w), halved spatially with ``max_pool_2x2``
        """
        rectifier = self._rectifier(fused_activation)
        x, pads, y_shape = self._checked(x)
        w, b = self.params["weight"], self.params.get("bias")
        ws = state.workspace
        if max_pool_2x2:
            state.x = state.y = state.z = None
            return self._conv(x, pads, ws, activation=rectifier[0], negative_slope=rectifier[1], max_pool_2x2=True)
        state.x, state.pads, state.rectifier = x, pads, rectifier
        # A fresh 33 MB output costs its page faults on every call (4 ms of a 100 ms mind-cifar
        # forward on 2 cores): the plan asks for a reused buffer where that is invisible.
        out = ws.get("output", y_shape, w.dtype) if reuse_output else None
        if self._act.fn is None or rectifier[0] is not None:
            # Bias and (leaky) ReLU in the kernel's layout pass: no separate sweep over the output.
            state.z = None
            state.y = self._conv(x, pads, ws, out=out, activation=rectifier[0], negative_slope=rectifier[1])
            return state.y
        z = self._conv(x, pads, ws, out=out)
        state.y, state.z = self._act.forward(z)
        return state.y

    @property
    def can_fuse_max_pool_2x2(self):
        """Whether ``call(..., max_pool_2x2=True)`` applies (the activation, if any, runs in the kernels)."""
        return self.activation is None or self._compiled_act is not None

    def forward_max_pool_2x2(self, x):
        """Inference: this layer followed by a 2x2 / stride-2 max-pool, in one pass (no caches)."""
        return self.call(x, False, self.own_state, max_pool_2x2=True)

    def call_backward(self, dy, state, need_input_grad, reuse_input_grad=False):
        """Parameters
        ----------
        dy : ndarray of shape (n, out_channels, out_h, out_w), the gradient of the last output
        state : the CallState the forward ``call`` filled
        need_input_grad : bool
        reuse_input_grad : bool
            Write ``dx`` into a buffer of ``state`` reused from call to call: only when the caller
            knows ``dx`` is consumed (not kept) before the next backward (an execution plan).

        Returns
        -------
        dx : ndarray of shape (n, in_channels, h, w), or None when ``need_input_grad`` is False
        """
        if state.x is None:
            raise RuntimeError("Conv2D.backward called before forward")
        check_dy(self, dy, state.y.shape)
        w = self.params["weight"]
        dz = dy.astype(w.dtype, copy=False)
        activation, slope = state.rectifier
        if self._act.fn is not None and activation is None:
            dz = self._act.backward(dz, state.z, state.y)
        dx, dw, db = self._conv_backward(dz, state.x, state.pads, need_input_grad, state.workspace,
                                         activation=activation, negative_slope=slope, y=state.y,
                                         out=_input_grad_buffer(state, need_input_grad and reuse_input_grad))
        store_grads(self, weight=dw, bias=db)
        return dx if need_input_grad else None

    def _conv(self, x, pads, workspace, **kwargs):
        w, b = self.params["weight"], self.params.get("bias")
        return F.conv2d(x, w, b, self.stride, pads, self.dilation, self.groups, workspace=workspace, **kwargs)

    def _conv_backward(self, dz, x, pads, need_dx, workspace, **kwargs):
        return F.conv2d_backward(dz, x, self.params["weight"], self.stride, pads, self.dilation, self.groups,
                                 need_dx=need_dx, workspace=workspace, **kwargs)

    def get_config(self):
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "bias": self.use_bias,
            "activation": self.activation,
            "negative_slope": self.negative_slope,
            "weight_init": self.weight_init,
            "dilation": self.dilation,
            "groups": self.groups,
        }

    # --- training with the following 2x2 / stride-2 max-pool fused (a plan's conv+act+pool step) ---
    @property
    def pools_in_training(self):
        """Whether ``call_pooled`` applies: a plain convolution (no groups, no dilation) whose
        activation, if any, the kernels apply."""
        plain = self.groups == 1 and self.dilation == (1, 1)
        return plain and (self.activation is None or self._compiled_act is not None)

    def call_pooled(self, x, training, state, *, fused_activation=None, reuse_output=False):
        """Forward of this layer (+ the activation layer an execution plan fuses) + a 2x2 / stride-2
        max-pool in one sweep, keeping the pool's argmax in ``state`` for ``call_pooled_backward``.

        The argmax is written into a buffer of ``state`` reused from call to call (only this
        state's backward reads it); so is the output with ``reuse_output`` (see ``call``).

        Returns
        -------
        y : ndarray of shape (n, out_channels, out_h // 2, out_w // 2)
        """
        if not self.pools_in_training:
            raise ValueError("Conv2D.call_pooled needs a plain convolution with a compiled activation or none")
        rectifier = self._rectifier(fused_activation)
        x, pads, y_shape = self._checked(x)
        w, b = self.params["weight"], self.params.get("bias")
        ws = state.workspace
        # Fresh arrays every batch cost page faults and a one-threaded free (seed-mnist: ~690 per batch).
        pooled_shape = y_shape[:2] + (y_shape[2] // 2, y_shape[3] // 2)
        argmax_out = ws.get("pool_argmax", pooled_shape, np.dtype(np.int32))
        # (A bias of another dtype than the weight makes the output float64: a fresh array then.)
        reuse_output = reuse_output and (b is None or b.dtype == w.dtype)
        out = ws.get("pooled_output", pooled_shape, w.dtype) if reuse_output else None
        y, argmax = F.conv2d_max_pool_2x2_train(x, w, b, self.stride, pads,
                                         workspace=ws, activation=rectifier[0],
                                         negative_slope=rectifier[1], out=out, argmax_out=argmax_out)
        state.x, state.pads, state.rectifier, state.z = x, pads, rectifier, None
        state.y, state.pool_argmax = y, argmax
        return y

    def call_pooled_backward(self, dy, state, need_input_grad, reuse_input_grad=False):
        """Backward of ``call_pooled``: ``dy`` is the gradient of the pooled output
        (``reuse_input_grad`` as in ``call_backward``)."""
        argmax = getattr(state, "pool_argmax", None)
        if state.x is None or argmax is None or argmax.shape != state.y.shape:
            raise RuntimeError("Conv2D.call_pooled_backward called before call_pooled")
        check_dy(self, dy, state.y.shape)
        w = self.params["weight"]
        activation, slope = state.rectifier
        dx, dw, db = F.conv2d_max_pool_2x2_backward(dy.astype(w.dtype, copy=False), argmax, state.y, state.x, w,
                                             self.stride, state.pads, need_dx=need_input_grad,
                                             workspace=state.workspace, activation=activation,
                                             negative_slope=slope,
                                             out=_input_grad_buffer(state, need_input_grad and reuse_input_grad))
        store_grads(self, weight=dw, bias=db)
        return dx if need_input_grad else None


def _input_grad_buffer(state, reuse):
    """The reused input-gradient buffer of ``state`` (shaped like the cached input), or None for
    a fresh array."""
    if not reuse:
        return None
    return state.workspace.get("input_grad", state.x.shape, state.x.dtype)
