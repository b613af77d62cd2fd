"""1-D layers on ``(batch, channels, length)``: Conv1D, MaxPool1D, AvgPool1D.

They own no arithmetic of their own: a length-``L`` signal is an image of height 1, so each layer
views its input as ``x[:, :, None, :]`` (and Conv1D its weight as ``weight[:, :, None, :]``), runs
``cnnx.functional``'s 2-D kernels with padding ``((0, 0), (left, right))`` and drops the height
axis again. The views cost nothing and the compiled kernels stay the only hot path.
"""
from __future__ import annotations

import numbers

from .. import functional as F
from ..geometry import conv_output_size, explicit_padding
from ..init import check_initializer
from ..validation import check_bool, check_dy, check_floating, check_groups, positive_int
from .activations import FusedActivation, check_activation, check_negative_slope
from .base import Layer, init_weight_and_bias, store_grads


def _positive_length(value, name):
    """A kernel size or stride of a 1-D layer: an int >= 1 (a 1-tuple is accepted too)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return positive_int(value, name)


def canonical_padding_1d(padding, allow_strings=True):
    """Validate a 1-D ``padding`` and return the form ``get_config`` reports.

    ``"valid"``/``"same"`` stay (lower-case) strings; an int stays an int; a pair ``(left, right)``
    becomes an int when both sides agree.
    """
    if isinstance(padding, str):
        if not allow_strings:
            raise TypeError(f"Expected padding as an int or (left, right), received: padding={padding!r}")
        mode = padding.lower()
        if mode not in ("valid", "same"):
            raise ValueError(
                f"Expected padding 'valid', 'same', an int or (left, right), received: padding={padding!r}"
            )
        return mode
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        left = right = int(padding)
    elif (isinstance(padding, (tuple, list)) and len(padding) == 2
          and all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in padding)):
        left, right = int(padding[0]), int(padding[1])
    else:
        expected = "'valid', 'same', an int or (left, right)" if allow_strings else "an int or (left, right)"
        raise TypeError(f"Expected padding as {expected}, received: padding={padding!r}")
    if left < 0 or right < 0:
        raise ValueError(f"Expected padding >= 0, received: padding={padding!r}")
    return left if left == right else (left, right)


def _explicit_pads(padding, kernel_size, stride, length):
    """``(left, right)`` for a canonical 1-D ``padding`` and an input of ``length`` samples."""
    if isinstance(padding, str):
        return explicit_padding(padding, (1, kernel_size), (1, stride), (1, length))[1]
    if isinstance(padding, int):
        return (padding, padding)
    return tuple(padding)


class Conv1D(Layer):
    """1-D convolution (cross-correlation, as PyTorch's ``nn.Conv1d``) over ``(n, c, length)``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
    stride : int, default 1
    padding : int, (left, right), "valid" or "same", default 0
        ``"same"`` keeps ``ceil(length / stride)`` outputs; an even kernel's extra sample goes on
        the right (PyTorch, Keras).
    bias : bool, default True
    activation : {None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu"}, default None
        Fused activation applied after the bias.
    negative_slope : float, default 0.01
        Slope of ``"leaky_relu"`` (ignored otherwise).
    weight_init : str, default "default"
        One of ``cnnx.init.INITIALIZERS``; ``"default"`` is PyTorch's rule (fan_in = in_channels * k).
    rng : None, int or numpy.random.Generator
        Source of the initial weights; ``None`` uses the generator ``cnnx.manual_seed`` seeds.
    dilation : int, default 1 (keyword only)
        Spacing between kernel taps; the kernel spans ``dilation * (kernel_size - 1) + 1`` samples.
    groups : int, default 1 (keyword only)
        Independent channel groups (dividing both channel counts); ``in_channels`` is depthwise.

    Attributes
    ----------
    params : dict
        ``"weight"`` of shape (out_channels, in_channels // groups, kernel_size), ``"bias"`` of
        shape (out_channels,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 activation=None, negative_slope=0.01, weight_init="default", rng=None, *, dilation=1, groups=1):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = _positive_length(kernel_size, "kernel_size")
        self.stride = _positive_length(stride, "stride")
        self.dilation = _positive_length(dilation, "dilation")
        self.groups = check_groups(groups, self.in_channels, self.out_channels)
        self._span = self.dilation * (self.kernel_size - 1) + 1  # what padding and output size see
        self.padding = canonical_padding_1d(padding)
        self.use_bias = check_bool(bias, "bias")
        self.activation = check_activation(activation)
        self.negative_slope = check_negative_slope(negative_slope)
        self.weight_init = check_initializer(weight_init)
        init_weight_and_bias(self, (self.out_channels, self.in_channels // self.groups, self.kernel_size), rng)
        self._act = FusedActivation(self.activation, self.negative_slope)

    stateful = False

    def new_state(self):
        state = super().new_state()
        state.workspace = F.Workspace()  # scratch of the 2-D kernels, per call site
        state.x4 = state.z = state.y = state.pads = state.act = None
        return state

    def explicit_padding(self, length):
        """``(left, right)`` for an input of ``length`` samples."""
        return _explicit_pads(self.padding, self._span, self.stride, length)

    def output_shape(self, input_shape):
        _, length = self._sample_shape(input_shape, (self.in_channels, "length"))
        left, right = self.explicit_padding(length)
        if self._span > length + left + right:
            dilated = "" if self.dilation == 1 else f", dilation {self.dilation}"
            raise ValueError(
                f"Conv1D expected a padded input at least as long as the kernel ({self._span}{dilated}), "
                f"received: length {length} padded to {length + left + right}"
            )
        return (self.out_channels, conv_output_size(length, self._span, self.stride, left, right))

    def call(self, x, training, state, *, fused_activation=None):
        """Forward with caches in ``state`` (see ``Layer.call``).

        Parameters
        ----------
        x : ndarray of shape (n, in_channels, length), floating (cast to the parameters' dtype)
        training : bool
        state : CallState from ``new_state()``
        fused_activation : FusedActivation, optional
            The activation layer that follows, applied in place on this layer's output (only for
            a layer without an activation of its own; an execution plan passes it).

        Returns
        -------
        y : ndarray of shape (n, out_channels, out_length)
        """
        act = self._act
        if fused_activation is not None:
            if self.activation is not None:
                raise ValueError("Conv1D cannot fuse a second activation after its own")
            act = fused_activation
        self._check_input(x, (self.in_channels, None))
        check_floating(self, x)
        self.output_shape(x.shape[1:])
        w = self.params["weight"]
        x4 = x.astype(w.dtype, copy=False)[:, :, None, :]
        pads = ((0, 0), self.explicit_padding(x.shape[2]))
        w4, b = w[:, :, None, :], self.params.get("bias")
        z = F.conv2d(x4, w4, b, (1, self.stride), pads, (1, self.dilation), self.groups,
                     workspace=state.workspace)[:, :, 0, :]
        state.x4, state.pads, state.act = x4, pads, act
        state.y, state.z = act.forward(z)
        return state.y

    def call_backward(self, dy, state, need_input_grad):
        """Parameters
        ----------
        dy : ndarray of shape (n, out_channels, out_length)
        state : the CallState the forward ``call`` filled
        need_input_grad : bool

        Returns
        -------
        dx : ndarray of shape (n, in_channels, length), or None when ``need_input_grad`` is False
        """
        if state.x4 is None:
            raise RuntimeError("Conv1D.backward called before forward")
        check_dy(self, dy, state.y.shape)
        w = self.params["weight"]
        dz = state.act.backward(dy.astype(w.dtype, copy=False), state.z, state.y)
        dx, dw, db = F.conv2d_backward(dz[:, :, None, :], state.x4, w[:, :, None, :], (1, self.stride), state.pads,
                                       (1, self.dilation), self.groups, need_dx=need_input_grad,
                                       workspace=state.workspace)
        store_grads(self, weight=dw[:, :, 0, :], bias=db)
        return dx[:, :, 0, :] if need_input_grad else None

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


class _Pool1D(Layer):
    """Shared geometry of MaxPool1D and AvgPool1D (PyTorch semantics, floor output size)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = _positive_length(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _positive_length(stride, "stride")
        self.padding = canonical_padding_1d(padding, allow_strings=False)
        # The explicit per-side padding (left, right), also read by the exporters.
        self.pads = _explicit_pads(self.padding, self.kernel_size, self.stride, None)
        # As PyTorch: a window must always overlap the input (max-pool would otherwise see only padding).
        if max(self.pads) > self.kernel_size // 2:
            raise ValueError(
                f"Expected padding at most half the kernel ({self.kernel_size // 2}), received: padding={padding!r}"
            )

    stateful = False

    def new_state(self):
        state = super().new_state()
        state.x_shape = state.indices = None
        return state

    @property
    def _geometry_2d(self):
        """kernel_size, stride, padding of the equivalent height-1 2-D pooling."""
        return (1, self.kernel_size), (1, self.stride), ((0, 0), self.pads)

    def output_shape(self, input_shape):
        c, length = self._sample_shape(input_shape, ("c", "length"))
        left, right = self.pads
        if self.kernel_size > length + left + right:
            raise ValueError(
                f"{type(self).__name__} expected a padded input at least as long as the kernel ({self.kernel_size}), "
                f"received: length {length} padded to {length + left + right}"
            )
        return (c, conv_output_size(length, self.kernel_size, self.stride, left, right))

    def call(self, x, training, state):
        """Parameters
        ----------
        x : ndarray of shape (n, c, length), floating

        Returns
        -------
        y : ndarray of shape (n, c, out_length)
        """
        self._check_input(x, (None, None))
        check_floating(self, x)
        self.output_shape(x.shape[1:])
        y = self._pool(x[:, :, None, :], state)[:, :, 0, :]
        state.x_shape = x.shape
        return y

    def call_backward(self, dy, state, need_input_grad):
        """Parameters
        ----------
        dy : ndarray of shape (n, c, out_length)

        Returns
        -------
        dx : ndarray of shape (n, c, length), or None when ``needs_input_grad`` is False
        """
        if state.x_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        check_dy(self, dy, (state.x_shape[0],) + self.output_shape(state.x_shape[1:]))
        if not need_input_grad:
            return None
        n, c, length = state.x_shape
        return self._pool_backward(dy[:, :, None, :], (n, c, 1, length), state)[:, :, 0, :]

    def _pool(self, x4, state):
        """The 2-D kernel's output for ``x4``, the height-1 view of a checked input."""
        raise NotImplementedError

    def _pool_backward(self, dy4, x4_shape, state):
        """The 2-D kernel's dx (of shape ``x4_shape``) for ``dy4``, the height-1 view of a checked dy."""
        raise NotImplementedError

    def get_config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}


class MaxPool1D(_Pool1D):
    """Max pooling over ``(n, c, length)``; padding never wins the max.

    Parameters
    ----------
    kernel_size : int
    stride : int, default ``kernel_size``
    padding : int or (left, right), default 0
        At most half the kernel on each side.

    Notes
    -----
    With ties the gradient goes to the first maximum of the window, as in PyTorch.
    """

    def _pool(self, x4, state):
        y4, state.indices = F.max_pool2d(x4, *self._geometry_2d)
        return y4

    def _pool_backward(self, dy4, x4_shape, state):
        return F.max_pool2d_backward(dy4, state.indices, x4_shape)


class AvgPool1D(_Pool1D):
    """Average pooling over ``(n, c, length)``; zero padding counts toward the mean (PyTorch's
    default ``count_include_pad=True``).

    Parameters
    ----------
    kernel_size : int
    stride : int, default ``kernel_size``
    padding : int or (left, right), default 0
        At most half the kernel on each side.
    """

    def _pool(self, x4, state):
        return F.avg_pool2d(x4, *self._geometry_2d)

    def _pool_backward(self, dy4, x4_shape, state):
        return F.avg_pool2d_backward(dy4, x4_shape, *self._geometry_2d)
