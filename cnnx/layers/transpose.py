"""Layers that grow or re-arrange feature maps: ConvTranspose2D, Upsample2D, Reshape.

ConvTranspose2D holds its weight and calls ``cnnx.functional.conv_transpose2d`` (the adjoint of
``conv2d``, computed as a convolution's input gradient) and ``conv_transpose2d_backward``.
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import functional as F
from ..geometry import conv_transpose_output_size, int_pair, positive_pair
from ..init import check_initializer
from ..validation import check_array, check_bool, check_dy, check_floating, positive_int
from .base import Layer, grad_buffer, init_weight_and_bias, store_grads


class ConvTranspose2D(Layer):
    """Transposed 2-D convolution (PyTorch's ``nn.ConvTranspose2d``, dilation 1, one group).

    ``out = (in - 1) * stride - 2 * padding + kernel_size + output_padding`` on each axis.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (kh, kw)
    stride : int or (sy, sx), default 1
    padding : int or (ph, pw), default 0
        Rows/columns removed from each border of the full output (PyTorch's meaning).
    output_padding : int or (oy, ox), default 0
        Extra rows/columns added at the bottom/right; each must be smaller than the stride.
    bias : bool, default True
    weight_init : str, default "default"
        One of ``cnnx.init.INITIALIZERS``; ``"default"`` is PyTorch's rule, whose fan_in for a
        transposed convolution is ``out_channels * kh * kw``.
    rng : None, int or numpy.random.Generator
        Source of the initial weights; ``None`` uses the generator ``cnnx.manual_seed`` seeds.

    Attributes
    ----------
    params : dict
        ``"weight"`` of shape (in_channels, out_channels, kh, kw) (PyTorch's layout) and
        ``"bias"`` of shape (out_channels,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 bias=True, weight_init="default", rng=None):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = positive_pair(kernel_size, "kernel_size")
        self.stride = positive_pair(stride, "stride")
        self.padding = int_pair(padding, "padding")
        self.output_padding = int_pair(output_padding, "output_padding")
        if min(self.padding) < 0:
            raise ValueError(f"Expected padding >= 0, received: padding={padding!r}")
        op, s = self.output_padding, self.stride
        if min(op) < 0 or op[0] >= s[0] or op[1] >= s[1]:
            raise ValueError(
                f"Expected 0 <= output_padding < stride {self.stride}, received: output_padding={output_padding!r}"
            )
        self.use_bias = check_bool(bias, "bias")
        self.weight_init = check_initializer(weight_init)
        self.needs_input_grad = True
        # compute_fans reads shape[1] as fan_in: out_channels * kh * kw, exactly PyTorch's choice.
        # The bias takes its length from bias_shape[0] and its fan_in from bias_shape[1:]:
        # (out, out, kh, kw) gives out_channels biases with PyTorch's bound 1/sqrt(out*kh*kw).
        init_weight_and_bias(self, (self.in_channels, self.out_channels) + self.kernel_size, rng,
                             bias_shape=(self.out_channels, self.out_channels) + self.kernel_size)
        self._workspace = F.Workspace()
        self._x = None
        self._y_shape = None

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[0] != self.in_channels:
            raise ValueError(
                f"ConvTranspose2D expected input of shape ({self.in_channels}, h, w) per sample, "
                f"received: {input_shape}"
            )
        out = [conv_transpose_output_size(size, k, s, p, op) for size, k, s, p, op in
               zip(input_shape[1:], self.kernel_size, self.stride, self.padding, self.output_padding)]
        if min(input_shape[1:]) < 1 or min(out) < 1:
            raise ValueError(
                f"ConvTranspose2D expected an input giving a non-empty output, received: input {input_shape} "
                f"-> output {(self.out_channels, *out)}"
            )
        return (self.out_channels, out[0], out[1])

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, in_channels, h, w), floating (cast to the parameters' dtype)

        Returns
        -------
        y : ndarray of shape (n, out_channels, out_h, out_w)
        """
        self._check_input(x, (self.in_channels, None, None))
        check_floating(self, x)
        self.output_shape(x.shape[1:])
        w = self.params["weight"]
        x = np.ascontiguousarray(x, dtype=w.dtype)
        y = F.conv_transpose2d(x, w, self.params["bias"] if self.use_bias else None, self.stride, self.padding,
                               self.output_padding, workspace=self._workspace)
        self._x = x
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of shape (n, out_channels, out_h, out_w)

        Returns
        -------
        dx : ndarray of shape (n, in_channels, h, w), or None when ``needs_input_grad`` is False
        """
        if self._x is None:
            raise RuntimeError("ConvTranspose2D.backward called before forward")
        check_dy(self, dy, self._y_shape)
        w = self.params["weight"]
        dy = np.ascontiguousarray(dy, dtype=w.dtype)
        dx, dw, db = F.conv_transpose2d_backward(dy, self._x, w, self.stride, self.padding, self.output_padding,
                                                 need_dx=self.needs_input_grad, workspace=self._workspace)
        store_grads(self, weight=dw)
        if self.use_bias:
            np.copyto(grad_buffer(self, "bias"), db)
        return dx

    def get_config(self):
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
            "output_padding": self.output_padding,
            "bias": self.use_bias,
            "weight_init": self.weight_init,
        }


class Upsample2D(Layer):
    """Nearest-neighbour upsampling of NCHW batches by an integer factor per axis.

    Parameters
    ----------
    scale_factor : int or (sy, sx), default 2
    """

    def __init__(self, scale_factor=2):
        super().__init__()
        self.scale_factor = positive_pair(scale_factor, "scale_factor")
        self.needs_input_grad = True
        self._x_shape = None

    def output_shape(self, input_shape):
        c, h, w = self._sample_shape(input_shape, ("c", "h", "w"))
        sy, sx = self.scale_factor
        return (c, h * sy, w * sx)

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, c, h, w)

        Returns
        -------
        y : ndarray of shape (n, c, h * sy, w * sx), each input pixel repeated sy x sx times
        """
        self._check_input(x, (None, None, None))
        check_floating(self, x)
        n, c, h, w = x.shape
        sy, sx = self.scale_factor
        self._x_shape = x.shape
        # One copy: broadcast each pixel over a (sy, sx) block, then fold the blocks into the axes.
        blocks = np.broadcast_to(x[:, :, :, None, :, None], (n, c, h, sy, w, sx))
        return blocks.reshape(n, c, h * sy, w * sx)

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of shape (n, c, h * sy, w * sx)

        Returns
        -------
        dx : ndarray of shape (n, c, h, w), the sum of each pixel's block of gradients
        """
        if self._x_shape is None:
            raise RuntimeError("Upsample2D.backward called before forward")
        n, c, h, w = self._x_shape
        sy, sx = self.scale_factor
        check_dy(self, dy, (n, c, h * sy, w * sx))
        if not self.needs_input_grad:
            return None
        return dy.reshape(n, c, h, sy, w, sx).sum(axis=(3, 5))

    def get_config(self):
        return {"scale_factor": self.scale_factor}


class Reshape(Layer):
    """Reshape each sample: ``(n, *in_shape) -> (n, *target_shape)``.

    Parameters
    ----------
    target_shape : int or tuple of int
        Per-sample shape (no batch axis); one entry may be -1 (inferred, as NumPy).
    """

    def __init__(self, target_shape):
        super().__init__()
        if isinstance(target_shape, numbers.Integral) and not isinstance(target_shape, bool):
            target_shape = (target_shape,)
        if not isinstance(target_shape, (tuple, list)) or len(target_shape) == 0 or not all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in target_shape
        ):
            raise TypeError(f"Expected target_shape as a tuple of ints, received: target_shape={target_shape!r}")
        target_shape = tuple(int(s) for s in target_shape)
        if sum(s == -1 for s in target_shape) > 1 or any(s < 1 and s != -1 for s in target_shape):
            raise ValueError(
                f"Expected target_shape of positive ints with at most one -1, received: target_shape={target_shape!r}"
            )
        self.target_shape = target_shape
        self.needs_input_grad = True
        self._x_shape = None

    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        size = int(np.prod(input_shape, dtype=np.int64))
        known = int(np.prod([s for s in self.target_shape if s != -1], dtype=np.int64))
        if -1 in self.target_shape:
            if known == 0 or size % known:
                raise ValueError(
                    f"Reshape expected an input whose size is a multiple of {known} for target_shape="
                    f"{self.target_shape}, received: {input_shape} (size {size})"
                )
            return tuple(size // known if s == -1 else s for s in self.target_shape)
        if size != known:
            raise ValueError(
                f"Reshape expected an input of {known} elements per sample for target_shape={self.target_shape}, "
                f"received: {input_shape} ({size} elements)"
            )
        return self.target_shape

    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, *in_shape)

        Returns
        -------
        y : ndarray of shape (n, *target_shape), a view of ``x`` where NumPy can make one
        """
        check_array(self, x)
        if x.ndim < 1:
            raise ValueError(f"Reshape expected a batch (n, ...), received: shape={x.shape}")
        out = self.output_shape(x.shape[1:])
        self._x_shape = x.shape
        return x.reshape((x.shape[0],) + out)

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of shape (n, *target_shape)

        Returns
        -------
        dx : ndarray of shape (n, *in_shape)
        """
        if self._x_shape is None:
            raise RuntimeError("Reshape.backward called before forward")
        check_dy(self, dy, (self._x_shape[0],) + self.output_shape(self._x_shape[1:]))
        return dy.reshape(self._x_shape)

    def get_config(self):
        return {"target_shape": self.target_shape}
