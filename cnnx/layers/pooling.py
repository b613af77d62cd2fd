"""Pooling layers: geometry, validation and caches around ``cnnx.functional``'s pooling kernels.

``_Pool2D`` owns everything but the kernel calls: MaxPool2D and AvgPool2D only say which kernel
runs forward (``_pool``) and backward (``_pool_backward``).
"""
from __future__ import annotations

from .. import functional as F
from ..geometry import check_pool_padding, explicit_padding, positive_pair, windowed_output_size
from ..validation import check_dy, check_floating
from .base import Layer


class _Pool2D(Layer):
    """Shared geometry of MaxPool2D and AvgPool2D (PyTorch semantics, floor output size)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = positive_pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else positive_pair(stride, "stride")
        if isinstance(padding, str):
            raise TypeError(
                f"Expected padding as an int, (ph, pw) or ((top, bottom), (left, right)), received: padding={padding!r}"
            )
        (pt, pb), (pl, pr) = explicit_padding(padding, self.kernel_size, self.stride)
        check_pool_padding(((pt, pb), (pl, pr)), self.kernel_size, padding)
        # The explicit per-side padding ((top, bottom), (left, right)), also read by the exporters.
        self.pads = ((pt, pb), (pl, pr))
        self.padding = (pt, pl) if (pt == pb and pl == pr) else self.pads

    stateful = False

    def new_state(self):
        state = super().new_state()
        state.x_shape = state.x = state.indices = None
        return state

    def output_shape(self, input_shape):
        c, h, w = self._sample_shape(input_shape, ("c", "h", "w"))
        return (c,) + windowed_output_size((h, w), self.kernel_size, self.stride, self.pads, type(self).__name__)

    def call(self, x, training, state):
        """Parameters
        ----------
        x : ndarray of shape (n, c, h, w), floating

        Returns
        -------
        y : ndarray of shape (n, c, out_h, out_w)
        """
        self._check_input(x, (None, None, None))
        check_floating(self, x)
        self.output_shape(x.shape[1:])
        y = self._pool(x, training, state)
        state.x_shape = x.shape
        return y

    def call_backward(self, dy, state, need_input_grad):
        """Parameters
        ----------
        dy : ndarray of shape (n, c, out_h, out_w)

        Returns
        -------
        dx : ndarray of shape (n, c, h, w), or None when ``needs_input_grad`` is False
        """
        if state.x_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        check_dy(self, dy, (state.x_shape[0],) + self.output_shape(state.x_shape[1:]))
        if not need_input_grad:
            return None
        return self._pool_backward(dy, state)

    def _pool(self, x, training, state):
        """The kernel's output for a checked input ``x``; may cache what ``_pool_backward`` needs in ``state``."""
        raise NotImplementedError

    def _pool_backward(self, dy, state):
        """dx for a checked ``dy`` (``state.x_shape`` holds the input's shape)."""
        raise NotImplementedError

    def get_config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}


class MaxPool2D(_Pool2D):
    """Max pooling over NCHW batches; padding never wins the max.

    Parameters
    ----------
    kernel_size : int or (kh, kw)
    stride : int or (sy, sx), default ``kernel_size``
    padding : int, (ph, pw) or ((top, bottom), (left, right)), default 0
        At most half the kernel on each side.

    Notes
    -----
    With ties the gradient goes to the first maximum of the window (row-major), as in PyTorch.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)

    @property
    def is_plain_2x2(self):
        """2x2 windows, stride 2, no padding: the pool a Network fuses into the Conv2D before it."""
        return self.kernel_size == (2, 2) and self.stride == (2, 2) and self.pads == ((0, 0), (0, 0))

    def _pool(self, x, training, state):
        # Inference skips the argmax; a backward after an eval forward (saliency maps) finds it then.
        y, state.indices = F.max_pool2d(x, self.kernel_size, self.stride, self.pads, indices=training)
        state.x = None if training else x
        return y

    def _pool_backward(self, dy, state):
        if state.indices is None:
            _, state.indices = F.max_pool2d(state.x, self.kernel_size, self.stride, self.pads)
        return F.max_pool2d_backward(dy, state.indices, state.x_shape)


class AvgPool2D(_Pool2D):
    """Average pooling over NCHW batches; zero padding counts toward the mean (PyTorch's default
    ``count_include_pad=True``).

    Parameters
    ----------
    kernel_size : int or (kh, kw)
    stride : int or (sy, sx), default ``kernel_size``
    padding : int, (ph, pw) or ((top, bottom), (left, right)), default 0
        At most half the kernel on each side.
    """

    def _pool(self, x, training, state):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.pads)

    def _pool_backward(self, dy, state):
        return F.avg_pool2d_backward(dy, state.x_shape, self.kernel_size, self.stride, self.pads)
