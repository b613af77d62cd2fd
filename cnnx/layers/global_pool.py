"""Global pooling: GlobalAvgPool2D and GlobalMaxPool2D reduce each channel of a NCHW map to one value.

They are the 2-D pooling kernels of ``cnnx.functional`` with a window as large as the input
(compiled, threaded over image planes), so no arithmetic lives here. The output is ``(n, c)``
(Keras' ``GlobalAveragePooling2D``), ready for a ``Dense``; ``keepdims=True`` gives
``(n, c, 1, 1)`` (PyTorch's ``AdaptiveAvgPool2d(1)``).
"""
from __future__ import annotations

from .. import functional as F
from ..validation import check_bool, check_dy, check_floating
from .base import Layer


class _GlobalPool2D(Layer):
    """Shared shapes and caches; subclasses say which kernel runs (``_pool``, ``_pool_backward``)."""

    def __init__(self, keepdims=False):
        super().__init__()
        self.keepdims = check_bool(keepdims, "keepdims")
        self.needs_input_grad = True
        self._x_shape = None

    def output_shape(self, input_shape):
        c, _, _ = self._sample_shape(input_shape, ("c", "h", "w"))
        return (c, 1, 1) if self.keepdims else (c,)

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, c, h, w), floating

        Returns
        -------
        y : ndarray of shape (n, c), or (n, c, 1, 1) with ``keepdims``
        """
        self._check_input(x, (None, None, None))
        check_floating(self, x)
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{type(self).__name__} expected a non-empty image, received: shape={x.shape}")
        y = self._pool(x, training)  # (n, c, 1, 1)
        self._x_shape = x.shape
        return y if self.keepdims else y.reshape(y.shape[:2])

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of shape (n, c) (or (n, c, 1, 1) with ``keepdims``)

        Returns
        -------
        dx : ndarray of shape (n, c, h, w), or None when ``needs_input_grad`` is False
        """
        if self._x_shape is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        n, c = self._x_shape[:2]
        check_dy(self, dy, (n, c, 1, 1) if self.keepdims else (n, c))
        if not self.needs_input_grad:
            return None
        return self._pool_backward(dy.reshape(n, c, 1, 1))

    def _pool(self, x, training):
        raise NotImplementedError

    def _pool_backward(self, dy4):
        raise NotImplementedError

    def get_config(self):
        return {"keepdims": self.keepdims}


class GlobalAvgPool2D(_GlobalPool2D):
    """Mean of each channel over its whole ``h x w`` map.

    Parameters
    ----------
    keepdims : bool, default False
        Output ``(n, c, 1, 1)`` instead of ``(n, c)``.
    """

    def _pool(self, x, training):
        return F.avg_pool2d(x, x.shape[2:])

    def _pool_backward(self, dy4):
        return F.avg_pool2d_backward(dy4, self._x_shape, self._x_shape[2:])


class GlobalMaxPool2D(_GlobalPool2D):
    """Maximum of each channel over its whole ``h x w`` map; the gradient goes to the first maximum.

    Parameters
    ----------
    keepdims : bool, default False
        Output ``(n, c, 1, 1)`` instead of ``(n, c)``.
    """

    def __init__(self, keepdims=False):
        super().__init__(keepdims)
        self._indices = None

    def _pool(self, x, training):
        y, self._indices = F.max_pool2d(x, x.shape[2:])
        return y

    def _pool_backward(self, dy4):
        return F.max_pool2d_backward(dy4, self._indices, self._x_shape)
