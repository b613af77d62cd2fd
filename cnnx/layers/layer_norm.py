"""LayerNorm: per-sample normalisation over the feature axis (PyTorch's ``nn.LayerNorm`` over one axis).

Unlike BatchNorm it keeps no running statistics and behaves the same in training and inference:
each position of each sample is normalised over its ``num_features`` values. Two layouts, one
implementation on a ``(a, c, b)`` view of the input, normalised over its middle axis:

- ``axis=1``: the channels of ``(n, c, ...)`` (ConvNeXt's "channels_first" LayerNorm on NCHW
  maps), view ``(n, c, h * w)``;
- ``axis=-1``: the last axis (a ``(n, features)`` row, or each step of a ``(n, L, features)``
  sequence), view ``(n * ..., c, 1)``.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..validation import check_array, check_bool, check_dy, check_floating, positive_float, positive_int
from .base import Layer, check_state_size, init_affine, store_grads


class LayerNorm(Layer):
    """Layer normalisation over one axis: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Parameters
    ----------
    num_features : int
        Length ``c`` of the normalised axis.
    axis : {1, -1}, default 1
        ``1``: the channel axis of ``(n, c)``, ``(n, c, length)`` or ``(n, c, h, w)`` inputs
        (each pixel normalised over its channels, as ConvNeXt does); ``-1``: the last axis, as
        ``torch.nn.LayerNorm(c)``. Both agree on ``(n, c)`` input.
    eps : float, default 1e-5
        Added to the (biased) variance before the square root.
    affine : bool, default True
        Learn a per-feature scale ``weight`` (init 1) and shift ``bias`` (init 0).

    Attributes
    ----------
    params : dict
        ``"weight"`` and ``"bias"`` of shape (c,) when ``affine`` (PyTorch's names and shapes).
    """

    def __init__(self, num_features, axis=1, eps=1e-5, affine=True):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        if isinstance(axis, bool) or axis not in (1, -1):
            raise ValueError(f"Expected axis 1 (channels) or -1 (last axis), received: axis={axis!r}")
        self.axis = int(axis)
        self.eps = positive_float(eps, "eps")
        self.affine = check_bool(affine, "affine")
        self.needs_input_grad = True
        if self.affine:
            check_state_size((2 * self.num_features,), "num_features")  # weight and bias
            init_affine(self, self.num_features)
        self._dtype = np.dtype(np.float32)  # the dtype without affine parameters to carry it
        self._cache = None

    def astype(self, dtype):
        self._dtype = np.dtype(dtype)
        return super().astype(dtype)

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        where = 0 if self.axis == 1 else len(input_shape) - 1
        if len(input_shape) < 1 or input_shape[where] != self.num_features:
            layout = (f"({self.num_features}, ...)" if self.axis == 1 else f"(..., {self.num_features})")
            raise ValueError(f"LayerNorm(axis={self.axis}) expected input of shape {layout} per sample, "
                             f"received: {input_shape}")
        return input_shape

    def _view(self, x):
        """``x`` as the ``(a, c, b)`` array normalised over axis 1 (a view when ``x`` is contiguous)."""
        if self.axis == 1:
            return x.reshape(x.shape[0], self.num_features, -1)
        return x.reshape(-1, self.num_features, 1)

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, c, ...) for ``axis=1``, (n, ..., c) for ``axis=-1``, floating

        Returns
        -------
        y : ndarray of the shape of ``x``, in the layer's dtype
        """
        check_array(self, x)
        check_floating(self, x)
        if x.ndim < 2:
            raise ValueError(f"LayerNorm expected a batch of samples (n, ...), received: shape={x.shape}")
        self.output_shape(x.shape[1:])
        x3 = self._view(np.ascontiguousarray(x, dtype=self._dtype))
        affine = (self.params["weight"], self.params["bias"]) if self.affine else (None, None)
        y, x_hat, inv_std = F.layer_norm(x3, *affine, self.eps)
        self._cache = (x_hat, inv_std, x.shape)
        return y.reshape(x.shape)

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of the shape of the last ``forward`` input

        Returns
        -------
        dx : ndarray of the same shape, or None when ``needs_input_grad`` is False

        Notes
        -----
        With ``g = dy * weight``, per normalised group of ``c`` values:
        ``dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat))``.
        """
        if self._cache is None:
            raise RuntimeError("LayerNorm.backward called before forward")
        x_hat, inv_std, shape = self._cache
        check_dy(self, dy, shape)
        dy3 = self._view(np.ascontiguousarray(dy, dtype=x_hat.dtype))
        weight = self.params["weight"] if self.affine else None
        dx, dweight, dbias = F.layer_norm_backward(dy3, x_hat, inv_std, weight, self.needs_input_grad)
        if self.affine:
            store_grads(self, weight=dweight, bias=dbias)
        return None if dx is None else dx.reshape(shape)

    def get_config(self):
        return {"num_features": self.num_features, "axis": self.axis, "eps": self.eps, "affine": self.affine}
