"""Concat: the container layer that runs parallel branches on one input and joins their outputs
on the channel axis (an Inception module is ``Concat([[1x1], [1x1, 3x3], [1x1, 5x5], [pool, 1x1]])``).

Like ``Residual`` it owns no parameters: its branches' layers do, reported under prefixed names
(``"branches.1.0.weight"``: branch 1, its layer 0), which optimizers and save/load key on; its
config nests the branches' configs so ``from_config`` rebuilds it (containers nest).
"""
from __future__ import annotations

import numpy as np

from ..validation import check_array, check_dy
from .base import Layer, layer_to_config, layers_from_config
from .container import Container, as_layer_list, path_backward, path_forward, path_shape


class Concat(Container):
    """Parallel branches on the same input, outputs concatenated along axis 1 (channels).

    Parameters
    ----------
    branches : list of (Layer or list of Layer)
        Each branch is applied to the input in order. Their outputs must agree on every axis but
        the channel axis (for images: the same ``h x w``).

    Notes
    -----
    The output's channels are the branches' channels in order: ``(n, c_0 + c_1 + ..., h, w)``.
    The input gradient is the sum of the branches' input gradients. ``params``, ``grads`` and
    ``buffers`` are read-only snapshots keyed like ``named_parameters``.
    """

    def __init__(self, branches):
        super().__init__()
        if isinstance(branches, Layer) or not isinstance(branches, (list, tuple)) or len(branches) == 0:
            raise TypeError(
                "Expected branches as a non-empty list of branches (each a Layer or a list of layers), "
                f"received: {branches!r}"
            )
        self.branches = [as_layer_list(branch, f"branches[{b}]") for b, branch in enumerate(branches)]
        self._hold([layer for branch in self.branches for layer in branch], "the branches")
        self._splits = None
        self._y_shape = None

    # --- the Layer state: the branches' (see Container) ---------------------------------
    holders = "branches"

    def paths(self):
        for b, branch in enumerate(self.branches):
            yield f"branches.{b}", branch

    # --- shapes --------------------------------------------------------------------------
    def output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        shapes = [path_shape(branch, input_shape, f"Concat branches[{b}]") for b, branch in enumerate(self.branches)]
        for b, shape in enumerate(shapes):
            if len(shape) < 1 or shape[1:] != shapes[0][1:]:
                raise ValueError(
                    f"Concat expected every branch to give the same shape but for the channels for input "
                    f"{input_shape}, received: branch 0 {shapes[0]}, branch {b} {shape}"
                )
        return (sum(s[0] for s in shapes),) + shapes[0][1:]

    # --- forward / backward ----------------------------------------------------------------
    def forward(self, x, training=False):
        """Parameters
        ----------
        x : ndarray of shape (n, ...), what the first layer of every branch takes

        Returns
        -------
        y : ndarray of shape (n, sum of the branches' channels, ...)
        """
        check_array(self, x)
        outputs = [path_forward(branch, x, training) for branch in self.branches]
        shapes = [a.shape for a in outputs]
        if any(a.ndim < 2 or a.shape[0] != x.shape[0] or a.shape[2:] != outputs[0].shape[2:] for a in outputs):
            raise ValueError(
                f"Concat expected every branch to give the same shape but for the channels for input {x.shape}, "
                f"received: {shapes}"
            )
        # np.concatenate writes a new array: the branches' outputs may be buffers they reuse.
        y = np.concatenate(outputs, axis=1)
        self._splits = np.cumsum([a.shape[1] for a in outputs])[:-1]
        self._y_shape = y.shape
        return y

    def backward(self, dy):
        """Parameters
        ----------
        dy : ndarray of the shape of the last ``forward`` output

        Returns
        -------
        dx : ndarray of the input's shape, the sum of the branches' input gradients; None when
            ``needs_input_grad`` is False
        """
        if self._y_shape is None:
            raise RuntimeError("Concat.backward called before forward")
        check_dy(self, dy, self._y_shape)
        dx = None
        for branch, d in zip(self.branches, np.split(dy, self._splits, axis=1)):
            d_branch = path_backward(branch, np.ascontiguousarray(d), self.needs_input_grad)
            if self.needs_input_grad:
                # The first branch's dx may be a buffer its layer keeps: sum into a fresh array.
                dx = np.array(d_branch) if dx is None else np.add(dx, d_branch, out=dx)
        return dx

    # --- config ------------------------------------------------------------------------------
    def get_config(self):
        return {
            "branches": [
                [layer_to_config(layer) for layer in branch]
                for branch in self.branches
            ]
        }

    @classmethod
    def from_config(cls, config):
        entries = config.get("branches") if isinstance(config, dict) else None
        if not isinstance(entries, (list, tuple)):
            raise TypeError(f"Expected a Concat config with a list of branches, received: {config!r}")
        return cls([layers_from_config(branch, f"branches[{b}]") for b, branch in enumerate(entries)])

    def __repr__(self):
        body = ", ".join("[" + ", ".join(repr(layer) for layer in branch) + "]" for branch in self.branches)
        return f"Concat(branches=[{body}])"
