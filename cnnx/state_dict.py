"""PyTorch-style state dicts: a Network's weights under the keys of the equivalent ``torch.nn.Sequential``.

The mapping (one rule, so the keys never depend on how a network was written):

- Each cnnx layer is one module of the Sequential, numbered from 0 in order.
- A fused activation (``Conv2D(..., activation="relu")``, ``Dense``, ``Conv1D``, and the
  activation after a ``Residual``'s sum) is the module right after its layer, as a PyTorch user
  writes it (``nn.Conv2d, nn.ReLU``); it takes an index and has no keys. So a network built with
  fused activations and the same network built with separate activation layers have the same keys.
- Parameters and buffers keep their names, which are PyTorch's (``weight``, ``bias``,
  ``running_mean``, ``running_var``); a BatchNorm also gets ``num_batches_tracked``.
- A container is a module whose children sit in numbered Sequentials under its own names:
  ``Residual`` -> ``"{i}.block.{j}.weight"`` and ``"{i}.shortcut.{j}.weight"`` (with the same
  numbering rule inside), i.e. a torch module with attributes ``block`` and ``shortcut``
  (``to_torch`` builds one); ``Concat`` -> ``"{i}.branches.{b}.{j}.weight"`` (a ``ModuleList``
  of Sequentials). ``CONTAINERS`` says how each container class names its children.

``num_batches_tracked``: cnnx's BatchNorm always uses its ``momentum`` (PyTorch only reads the
count when ``momentum=None``), so it keeps no count; ``state_dict`` writes 0 and
``load_state_dict`` checks the value is an integer scalar and otherwise ignores it.
"""
from __future__ import annotations

import functools
import os
import secrets
from collections import namedtuple
from pathlib import Path

import numpy as np

__all__ = ["state_dict", "load_state_dict", "save_npz", "module_layout", "to_torch", "CONTAINERS", "LoadResult"]

#: What ``load_state_dict`` returns (as PyTorch's ``load_state_dict``): keys skipped when ``strict=False``.
LoadResult = namedtuple("LoadResult", ["missing_keys", "unexpected_keys"])

_NUM_BATCHES = "num_batches_tracked"


def _residual_children(layer):
    paths = [("block", layer.block)]
    if layer.shortcut is not None:
        paths.append(("shortcut", layer.shortcut))
    return paths


def _concat_children(layer):
    return [(f"branches.{b}", branch) for b, branch in enumerate(layer.branches)]


#: Container class name -> function giving ``[(attribute, list_of_layers), ...]``: the named
#: Sequentials that hold its children. A new container adds one entry. ``Concat`` is a module
#: whose ``branches`` is a ``ModuleList`` of Sequentials: ``"{i}.branches.{b}.{j}.weight"``.
CONTAINERS = {"Residual": _residual_children, "Concat": _concat_children}


def _is_batchnorm(layer):
    return "running_mean" in layer.buffers and "running_var" in layer.buffers


def module_layout(layers):
    """Index of each layer in the equivalent ``torch.nn.Sequential``.

    Parameters
    ----------
    layers : list of Layer

    Returns
    -------
    list of (int, Layer)
        A layer with a fused ``activation`` pushes the next index by one (its activation module).
    """
    layout, index = [], 0
    for layer in layers:
        layout.append((index, layer))
        index += 2 if getattr(layer, "activation", None) is not None else 1
    return layout


def _entries(layers, prefix):
    """Yield ``(key, layer, store, name)`` for every array of ``layers``, in PyTorch's order.

    ``store`` is ``"params"``, ``"buffers"`` or ``None`` (``num_batches_tracked``, not stored).
    """
    for index, layer in module_layout(layers):
        here = f"{prefix}{index}."
        kind = type(layer).__name__
        if kind in CONTAINERS:
            for attribute, children in CONTAINERS[kind](layer):
                yield from _entries(children, f"{here}{attribute}.")
            continue
        names = [name for name, _, _ in layer.named_parameters()] + [name for name, _ in layer.named_buffers()]
        nested = [name for name in names if "." in name]
        if nested:
            # A container nobody told this module about: guessing its torch layout would give keys
            # that load into the wrong modules.
            raise NotImplementedError(
                f"state_dict does not know the PyTorch layout of {kind} (its arrays are named {nested}); "
                f"add it to cnnx.state_dict.CONTAINERS"
            )
        for name in layer.params:
            yield here + name, layer, "params", name
        for name in layer.buffers:
            yield here + name, layer, "buffers", name
        if _is_batchnorm(layer):
            yield here + _NUM_BATCHES, layer, None, _NUM_BATCHES


def state_dict(net):
    """The network's parameters and buffers under PyTorch's ``nn.Sequential`` keys.

    Parameters
    ----------
    net : Network

    Returns
    -------
    dict of str -> ndarray
        Copies (in ``net.dtype``), ordered as PyTorch orders them; ``num_batches_tracked`` is an
        int64 scalar 0. ``{k: torch.from_numpy(v) for k, v in sd.items()}`` loads into the
        equivalent Sequential (see the module docstring for the mapping and :func:`to_torch`).
    """
    out = {}
    for key, layer, store, name in _entries(net.layers, ""):
        if store is None:
            out[key] = np.array(0, dtype=np.int64)
        else:
            out[key] = getattr(layer, store)[name].copy()
    return out


def _as_array(value, key):
    """A NumPy array from an ndarray, a CPU torch tensor (duck-typed: torch is not imported) or a list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # anything NumPy cannot read: say which key
        raise TypeError(f"Expected an array for {key!r}, received: {type(value).__name__} ({exc})") from None


def load_state_dict(net, state, strict=True):
    """Copy a PyTorch-style state dict into ``net``, in place, all or nothing.

    Parameters
    ----------
    net : Network
    state : mapping of str -> array
        NumPy arrays or torch tensors (``torch_model.state_dict()`` works as it is), keyed as
        :func:`state_dict` writes them. ``num_batches_tracked`` may be absent.
    strict : bool, default True
        Raise when a key is missing or unexpected; False skips them and reports them.

    Returns
    -------
    LoadResult
        ``(missing_keys, unexpected_keys)``, both empty with ``strict=True``.

    Raises
    ------
    ValueError
        Missing or unexpected keys (strict), a shape that differs, non-floating weights or a
        ``num_batches_tracked`` that is not an integer scalar. Nothing is written then.
    """
    if not hasattr(state, "keys") or not hasattr(state, "__getitem__"):
        raise TypeError(f"Expected a mapping of str -> array, received: {type(state).__name__}")
    entries = {key: (layer, store, name) for key, layer, store, name in _entries(net.layers, "")}
    optional = {key for key, (_, store, _) in entries.items() if store is None}
    missing = sorted(set(entries) - set(state) - optional)
    unexpected = sorted(set(state) - set(entries))
    if strict and (missing or unexpected):
        raise ValueError(
            f"Expected the keys of the network's state_dict, received: missing {missing}, unexpected {unexpected}"
        )
    updates = []
    for key, (layer, store, name) in entries.items():
        if key not in state:
            continue
        value = _as_array(state[key], key)
        if store is None:
            if value.shape != () or value.dtype.kind not in "iu":
                raise ValueError(f"Expected {key} to be an integer scalar, received: shape {value.shape}, dtype {value.dtype}")
            continue
        target = getattr(layer, store)[name]
        if value.shape != target.shape:
            raise ValueError(f"Expected {key} of shape {target.shape}, received: {value.shape}")
        if value.dtype.kind != "f":
            raise ValueError(f"Expected {key} to hold floating-point values, received: dtype {value.dtype}")
        updates.append((target, value))
    for target, value in updates:  # only once every entry passed its checks
        target[...] = value
    return LoadResult(missing, unexpected)


def save_npz(net, path):
    """Write ``state_dict(net)`` into one ``.npz`` file, atomically (``np.load`` reads it back;
    ``{k: torch.from_numpy(v) for k, v in np.load(path).items()}`` feeds ``torch.nn.Module.load_state_dict``)."""
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **state_dict(net))
    write_atomically(Path(path), buffer.getvalue())


def write_atomically(path, data):
    """Write ``data`` (bytes) to ``path`` through a temporary file renamed into place, so a reader
    (or a crash) never sees a half-written file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


# ------------------------------------------------------------------------------------------
# The equivalent torch module (torch imported here only)
# ------------------------------------------------------------------------------------------
def to_torch(net):
    """The ``torch.nn.Sequential`` equivalent to ``net``, holding ``net``'s weights.

    Parameters
    ----------
    net : Network

    Returns
    -------
    torch.nn.Sequential
        In ``net.dtype``, in eval mode. Its ``state_dict()`` keys are :func:`state_dict`'s.
        A ``Residual`` becomes a small module with ``block`` / ``shortcut`` Sequentials; a
        Conv2D with padding PyTorch's ``nn.Conv2d`` cannot express (asymmetric, or ``"same"``
        with a stride) pads with ``torch.nn.functional.pad`` first, with the same keys.

    Raises
    ------
    NotImplementedError
        For a layer without a torch equivalent here (the message names it).
    ImportError
        Without torch.
    """
    import torch

    model = _torch_sequential(net.layers, net.input_shape)
    model = model.to(dtype=torch.float64 if net.dtype == np.float64 else torch.float32)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict(net).items()})
    return model.eval()


def _torch_sequential(layers, input_shape):
    import torch.nn as nn

    modules, shape = [], tuple(input_shape)
    for layer in layers:
        modules.append(_torch_module(layer, shape))
        activation = getattr(layer, "activation", None)
        if activation is not None:
            modules.append(_torch_activation(activation, getattr(layer, "negative_slope", 0.01)))
        shape = tuple(layer.output_shape(shape))
    return nn.Sequential(*modules)


def _torch_activation(name, negative_slope=0.01, approximate="none"):
    import torch.nn as nn

    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "gelu":
        return nn.GELU(approximate=approximate)
    raise NotImplementedError(f"to_torch has no torch module for activation {name!r}")


def _torch_module(layer, shape):
    import torch.nn as nn

    from . import layers as L

    kind = type(layer).__name__
    if isinstance(layer, L.Conv2D):
        (pt, pb), (pl, pr) = layer.explicit_padding(shape[1:])
        extra = _conv_extra(layer)
        if pt == pb and pl == pr:
            return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, (pt, pl),
                             bias=layer.use_bias, **extra)
        conv = _padded_conv_class()(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                    bias=layer.use_bias, **extra)
        conv.pads = (pl, pr, pt, pb)  # torch.nn.functional.pad's order: last axis first
        return conv
    if isinstance(layer, L.Conv1D):
        left, right = layer.explicit_padding(shape[1])
        extra = _conv_extra(layer)
        if left == right:
            return nn.Conv1d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, left,
                             bias=layer.use_bias, **extra)
        conv = _padded_conv_class(1)(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                     bias=layer.use_bias, **extra)
        conv.pads = (left, right)
        return conv
    if isinstance(layer, L.ConvTranspose2D):
        return nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, layer.output_padding, bias=layer.use_bias)
    if isinstance(layer, (L.MaxPool2D, L.AvgPool2D, L.MaxPool1D, L.AvgPool1D)):
        return _torch_pool(layer)
    if isinstance(layer, L.Dense):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias)
    if isinstance(layer, (L.BatchNorm1D, L.BatchNorm2D)):
        cls = nn.BatchNorm2d if isinstance(layer, L.BatchNorm2D) else nn.BatchNorm1d
        return cls(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine)
    if isinstance(layer, L.Flatten):
        return nn.Flatten()
    if isinstance(layer, L.Reshape):
        return nn.Unflatten(1, tuple(layer.output_shape(shape))) if len(shape) == 1 else \
            nn.Sequential(nn.Flatten(), nn.Unflatten(1, tuple(layer.output_shape(shape))))
    if isinstance(layer, L.Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, L.Upsample2D):
        return nn.Upsample(scale_factor=tuple(float(s) for s in layer.scale_factor), mode="nearest")
    if isinstance(layer, L.Softmax):
        return nn.Softmax(dim=1)
    if isinstance(layer, L.GELU):
        return _torch_activation("gelu", approximate=layer.approximate)
    if isinstance(layer, L.LeakyReLU):
        return _torch_activation("leaky_relu", layer.negative_slope)
    for name, cls in (("relu", L.ReLU), ("sigmoid", L.Sigmoid), ("tanh", L.Tanh)):
        if isinstance(layer, cls):
            return _torch_activation(name)
    if kind == "LayerNorm":
        if layer.axis == -1 or len(shape) == 1:
            return nn.LayerNorm(layer.num_features, eps=layer.eps, elementwise_affine=layer.affine)
        return _channel_layer_norm_class()(layer.num_features, eps=layer.eps, elementwise_affine=layer.affine)
    if kind in ("GlobalAvgPool2D", "GlobalMaxPool2D"):
        pool = nn.AdaptiveAvgPool2d(1) if kind == "GlobalAvgPool2D" else nn.AdaptiveMaxPool2d(1)
        return pool if layer.keepdims else nn.Sequential(pool, nn.Flatten())
    if kind == "Concat":
        branches = [_torch_sequential(branch, shape) for branch in layer.branches]
        return _concat_class()(branches)
    if isinstance(layer, L.Residual):
        block = _torch_sequential(layer.block, shape)
        shortcut = None if layer.shortcut is None else _torch_sequential(layer.shortcut, shape)
        return _residual_class()(block, shortcut)
    raise NotImplementedError(f"to_torch has no torch module for {kind}")


def _conv_extra(layer):
    """``dilation`` / ``groups`` keyword arguments of the torch convolution (from the layer's config)."""
    config = layer.get_config()
    return {name: config[name] for name in ("dilation", "groups") if name in config}


def _torch_pool(layer):
    import torch.nn as nn

    from . import layers as L

    one_d = isinstance(layer, (L.MaxPool1D, L.AvgPool1D))
    if one_d:
        left, right = layer.pads
        pads = (left, right)
    else:
        (pt, pb), (pl, pr) = layer.pads
        pads = (pt, pb, pl, pr)
    if pads[0::2] != pads[1::2]:
        raise NotImplementedError(f"to_torch: torch pooling has no asymmetric padding, received {layer!r}")
    padding = pads[0] if one_d else (pads[0], pads[2])
    if isinstance(layer, (L.MaxPool2D, L.MaxPool1D)):
        cls = nn.MaxPool1d if one_d else nn.MaxPool2d
        return cls(layer.kernel_size, layer.stride, padding)
    cls = nn.AvgPool1d if one_d else nn.AvgPool2d
    return cls(layer.kernel_size, layer.stride, padding, count_include_pad=True)


# The torch classes below are defined on first use (torch is optional) and once: functools.cache.


@functools.cache
def _padded_conv_class(dims=2):
    """``nn.Conv{dims}d`` padding explicitly (any four sides) before the convolution; same keys."""
    import torch.nn as nn
    import torch.nn.functional as F

    base = nn.Conv2d if dims == 2 else nn.Conv1d

    class PaddedConv(base):
        pads = None

        def forward(self, x):
            return super().forward(F.pad(x, self.pads))

    PaddedConv.__name__ = f"PaddedConv{dims}d"
    return PaddedConv


@functools.cache
def _residual_class():
    """A torch module computing ``block(x) + shortcut(x)`` (identity shortcut when None)."""
    import torch.nn as nn

    class Residual(nn.Module):
        def __init__(self, block, shortcut=None):
            super().__init__()
            self.block = block
            self.shortcut = shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    return Residual


@functools.cache
def _concat_class():
    """A torch module joining its branches' outputs on the channel axis."""
    import torch
    import torch.nn as nn

    class Concat(nn.Module):
        def __init__(self, branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], dim=1)

    return Concat


@functools.cache
def _channel_layer_norm_class():
    """``nn.LayerNorm`` over axis 1 of ``(n, c, ...)`` (ConvNeXt's channels-first LayerNorm); same keys."""
    import torch.nn as nn

    class ChannelLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)

    return ChannelLayerNorm
