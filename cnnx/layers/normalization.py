"""Batch normalisation (BatchNorm1D, BatchNorm2D) with PyTorch's semantics.

Both work on a ``(n, c, L)`` view of their input (``L`` = h*w for images, the length for
sequences, 1 for ``(n, c)`` rows), so one implementation serves both: compiled, threaded passes
(``cnnx.functional.batch_norm_*``: channel statistics in double precision, then one sweep to
normalise) for float32 / float64, NumPy for other float dtypes. Training
mode normalises with the batch statistics (biased variance) and updates ``running_mean`` /
``running_var`` (the latter with the unbiased variance); evaluation mode uses the running
statistics. The running statistics are buffers (``named_buffers``), so save/load keeps them.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import functional as F
from ..validation import check_array, check_bool, check_dy, check_floating, positive_float, positive_int
from .base import Layer, check_state_size, init_affine, store_grads


class _BatchNorm(Layer):
    """Shared body; subclasses define which per-sample shapes they accept (``_check_shape``)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        self.eps = positive_float(eps, "eps")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"Expected momentum to be a number in [0, 1], received: momentum={momentum!r}")
        self.momentum = float(momentum)
        self.affine = check_bool(affine, "affine")
        self.needs_input_grad = True
        c = self.num_features
        check_state_size(((4 if self.affine else 2) * c,), "num_features")  # weight, bias, 2 buffers
        if self.affine:
            init_affine(self, c)
        self.buffers["running_mean"] = np.zeros(c, dtype=np.float32)
        self.buffers["running_var"] = np.ones(c, dtype=np.float32)
        self._cache = None

    # --- shapes ----------------------------------------------------------------------------
    def _check_shape(self, input_shape):
        raise NotImplementedError

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        self._check_shape(input_shape)
        return input_shape

    def _as_ncl(self, x):
        """Validate ``x`` and return it as an ``(n, c, L)`` array of the parameters' dtype."""
        check_array(self, x)
        check_floating(self, x)
        if x.ndim < 1:
            raise ValueError(f"{type(self).__name__} expected a batch of samples, received: shape={x.shape}")
        self._check_shape(x.shape[1:])
        dtype = self.buffers["running_mean"].dtype
        x = np.ascontiguousarray(x, dtype=dtype)
        return x.reshape(x.shape[0], self.num_features, -1)

    def _scale_shift(self):
        """``gamma`` and ``beta`` (ones and zeros without ``affine``)."""
        if self.affine:
            return self.params["weight"], self.params["bias"]
        dtype = self.buffers["running_mean"].dtype
        return np.ones(self.num_features, dtype), np.zeros(self.num_features, dtype)

    # --- forward / backward --------------------------------------------------------------
    def forward(self, x, training=False):
        """Normalise each channel.

        Parameters
        ----------
        x : ndarray of shape (n, c) or (n, c, L) for BatchNorm1D, (n, c, h, w) for BatchNorm2D
        training : bool
            True: batch statistics, and the running statistics are updated in place.
            False: the running statistics.

        Returns
        -------
        y : ndarray of the shape of ``x``, in the parameters' dtype
        """
        shape = x.shape if isinstance(x, np.ndarray) else None
        x3 = self._as_ncl(x)
        n, c, length = x3.shape
        m = n * length
        gamma, beta = self._scale_shift()
        if training and m < 2:
            raise ValueError(
                f"{type(self).__name__} expected more than 1 value per channel in training mode, "
                f"received: input of shape {shape}"
            )
        if training:
            y, x_hat, mean, var, inv_std = F.batch_norm_train(x3, gamma, beta, self.eps)
            self._update_running(mean, var, m)
            self._cache = ("train", x_hat, inv_std, shape)
        else:
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            y, inv_std = F.batch_norm_eval(x3, gamma, beta, rm, rv, self.eps)
            # x itself is enough for the backward: x_hat is recomputed per channel only.
            self._cache = ("eval", x3, inv_std, shape)
        return y.reshape(shape)

    def _update_running(self, mean, var, m):
        """Blend the batch statistics into the running ones; the variance unbiased, as PyTorch."""
        mom = self.momentum
        rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
        rm *= 1.0 - mom
        rm += mom * mean
        rv *= 1.0 - mom
        rv += (mom * m / (m - 1)) * var

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of the shape of the last ``forward`` input

        Returns
        -------
        dx : ndarray of the same shape, or None when ``needs_input_grad`` is False

        Notes
        -----
        In training mode the batch statistics depend on every sample, so
        ``dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))`` (per channel).
        In evaluation mode the statistics are constants: ``dx = gamma * inv_std * dy``.
        """
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        mode, saved, inv_std, shape = self._cache
        check_dy(self, dy, shape)
        dy3 = np.ascontiguousarray(dy, dtype=saved.dtype).reshape(saved.shape)
        gamma, _ = self._scale_shift()
        m = saved.shape[0] * saved.shape[2]
        # per channel: sum(dy) and sum(dy * x_hat) (train) or sum(dy * x) (eval), in double when compiled
        dbeta, dot = F.channel_dot_sums(dy3, saved)
        if mode == "train":
            dgamma = dot
        else:
            # sum(dy * (x - mean)) * inv_std without materialising x_hat.
            dgamma = (dot - self.buffers["running_mean"] * dbeta) * inv_std
        store_grads(self, weight=dgamma, bias=dbeta)  # skipped without affine (no parameters)
        if not self.needs_input_grad:
            return None
        scale = gamma * inv_std
        if mode == "eval":
            return F.batch_norm_eval_backward(dy3, scale).reshape(shape)
        return F.batch_norm_train_backward(dy3, saved, scale, dbeta / m, dgamma / m).reshape(shape)

    def get_config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum, "affine": self.affine}


# The parameters and attributes both public classes document (their docstrings end with it).
_BATCHNORM_DOC = """
    Parameters
    ----------
    num_features : int
        ``c``.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float in [0, 1], default 0.1
        ``running = (1 - momentum) * running + momentum * batch_statistic``.
    affine : bool, default True
        Learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).

    Attributes
    ----------
    params : dict
        ``"weight"`` and ``"bias"`` of shape (c,) when ``affine``.
    buffers : dict
        ``"running_mean"`` (init 0) and ``"running_var"`` (init 1), shape (c,).
    """


class BatchNorm1D(_BatchNorm):
    __doc__ = ("Batch normalisation over ``(n, c)`` rows or ``(n, c, length)`` sequences "
               "(PyTorch's ``BatchNorm1d``).\n" + _BATCHNORM_DOC)

    def _check_shape(self, input_shape):
        if len(input_shape) not in (1, 2) or input_shape[0] != self.num_features:
            raise ValueError(
                f"BatchNorm1D expected input of shape ({self.num_features},) or ({self.num_features}, length) "
                f"per sample, received: {tuple(input_shape)}"
            )


class BatchNorm2D(_BatchNorm):
    __doc__ = "Batch normalisation of NCHW batches, per channel (PyTorch's ``BatchNorm2d``).\n" + _BATCHNORM_DOC

    def _check_shape(self, input_shape):
        if len(input_shape) != 3 or input_shape[0] != self.num_features:
            raise ValueError(
                f"BatchNorm2D expected input of shape ({self.num_features}, h, w) per sample, "
                f"received: {tuple(input_shape)}"
            )
