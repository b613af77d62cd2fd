"""The course's later architectures for 32×32 inputs: a mini Inception (GoogLeNet-style modules)
and a ConvNeXt-style network (``cnnx.models.MODELS["mini-inception"]``, ``["convnext-mini"]``).

Kept apart from ``models.py``, as ResNet-8 is, because they are built from the container layers
(``Concat``, ``Residual``) and the newer layers (grouped convolutions, ``LayerNorm``, global
pooling). ``Network`` is imported inside the builders: ``models`` imports this module, and
``network`` must never import back.
"""
from __future__ import annotations

import numpy as np

__all__ = ["inception_module", "mini_inception", "convnext_block", "convnext_mini"]


def _relu_conv(c_in, c_out, k, rng, fused, **kwargs):
    """A convolution followed by ReLU: one layer with the fused activation, or two."""
    from .layers import Conv2D, ReLU

    if fused:
        return [Conv2D(c_in, c_out, k, activation="relu", rng=rng, **kwargs)]
    return [Conv2D(c_in, c_out, k, rng=rng, **kwargs), ReLU()]


def inception_module(c_in, c1, c3_reduce, c3, c5_reduce, c5, pool_proj, rng=None, fused=True):
    """A GoogLeNet (Inception v1) module: four branches on the same input, joined on channels.

    Branches: 1×1 conv · 1×1 reduce then 3×3 conv · 1×1 reduce then 5×5 conv · 3×3 max-pool
    (stride 1) then 1×1 projection; every convolution "same"-padded and followed by ReLU.

    Parameters
    ----------
    c_in : int
        Input channels.
    c1, c3_reduce, c3, c5_reduce, c5, pool_proj : int
        Output channels of each convolution (GoogLeNet's table columns).
    rng : numpy.random.Generator or None
    fused : bool, default True
        ReLU fused into each convolution, else separate ``ReLU`` layers.

    Returns
    -------
    Concat
        Output ``(c1 + c3 + c5 + pool_proj, h, w)`` for an input ``(c_in, h, w)``.
    """
    from .layers import Concat, MaxPool2D

    return Concat([
        _relu_conv(c_in, c1, 1, rng, fused),
        _relu_conv(c_in, c3_reduce, 1, rng, fused) + _relu_conv(c3_reduce, c3, 3, rng, fused, padding=1),
        _relu_conv(c_in, c5_reduce, 1, rng, fused) + _relu_conv(c5_reduce, c5, 5, rng, fused, padding=2),
        [MaxPool2D(3, stride=1, padding=1)] + _relu_conv(c_in, pool_proj, 1, rng, fused),
    ])


def mini_inception(num_classes=10, in_channels=3, dtype="float32", seed=None, fused=True):
    """A mini GoogLeNet for 32×32 inputs (59,742 parameters with 3 input channels and 10 classes).

    Conv(32, k3, same) ReLU · Inception(32 → 16 | 16→24 | 4→8 | 8 = 56) · max-pool 3/2 ·
    Inception(56 → 32 | 24→48 | 8→16 | 16 = 112) · max-pool 3/2 ·
    Inception(112 → 48 | 32→64 | 8→16 | 16 = 144) · global average pool · Dropout 0.4 ·
    Dense ``num_classes``.

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 3
        1 for grey images (Fashion-MNIST padded to 32×32).
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the initial weights (None: the library generator, see ``cnnx.manual_seed``).
    fused : bool, default True
        Fuse each ReLU into the convolution before it.

    Returns
    -------
    Network
        Uncompiled; outputs ``num_classes`` logits.
    """
    from .layers import Dense, Dropout, GlobalAvgPool2D, MaxPool2D
    from .network import Network

    rng = None if seed is None else np.random.default_rng(seed)
    layers = _relu_conv(in_channels, 32, 3, rng, fused, padding=1)
    layers.append(inception_module(32, 16, 16, 24, 4, 8, 8, rng, fused))
    layers.append(MaxPool2D(3, stride=2, padding=1))
    layers.append(inception_module(56, 32, 24, 48, 8, 16, 16, rng, fused))
    layers.append(MaxPool2D(3, stride=2, padding=1))
    layers.append(inception_module(112, 48, 32, 64, 8, 16, 16, rng, fused))
    layers += [GlobalAvgPool2D(), Dropout(0.4), Dense(144, num_classes, rng=rng)]
    return Network(layers, (in_channels, 32, 32), dtype=dtype)


#: LayerNorm epsilon of the ConvNeXt paper's code.
CONVNEXT_EPS = 1e-6


def convnext_block(dim, rng=None, fused=True):
    """A ConvNeXt block: ``x + pw2(gelu(pw1(layernorm(depthwise7x7(x)))))``.

    Depthwise 7×7 convolution (``groups=dim``, padding 3) · LayerNorm over channels ·
    1×1 expansion to ``4 * dim`` · GELU · 1×1 projection back to ``dim``, added to the input.
    (The paper's layer scale and stochastic depth are left out: they matter for deep networks.)

    Parameters
    ----------
    dim : int
    rng : numpy.random.Generator or None
    fused : bool, default True
        GELU as the expansion's ``activation=``, else a separate ``GELU`` layer.

    Returns
    -------
    Residual
    """
    from .layers import GELU, Conv2D, LayerNorm, Residual

    expand = ([Conv2D(dim, 4 * dim, 1, activation="gelu", rng=rng)] if fused
              else [Conv2D(dim, 4 * dim, 1, rng=rng), GELU()])
    return Residual([Conv2D(dim, dim, 7, padding=3, groups=dim, rng=rng), LayerNorm(dim, eps=CONVNEXT_EPS)]
                    + expand + [Conv2D(4 * dim, dim, 1, rng=rng)])


def convnext_mini(num_classes=10, in_channels=3, dtype="float32", seed=None, fused=True,
                  dims=(32, 64, 128), depths=(2, 2, 2)):
    """A ConvNeXt-style network for 32×32 inputs (412,970 parameters with the defaults).

    Stem: Conv(dims[0], k2, stride 2) · LayerNorm → 16×16. Stage ``i``: ``depths[i]`` ConvNeXt
    blocks of width ``dims[i]``; between stages LayerNorm · Conv(k2, stride 2) halves the size
    (16, 8, 4). Head: global average pool · LayerNorm (last axis) · Dense ``num_classes``.

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 3
        1 for grey images (Fashion-MNIST padded to 32×32).
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the initial weights (None: the library generator, see ``cnnx.manual_seed``).
    fused : bool, default True
        GELU as the expansion convolution's ``activation=``, else separate layers.
    dims, depths : sequences of int
        Width and number of blocks of each stage.

    Returns
    -------
    Network
        Uncompiled; outputs ``num_classes`` logits.
    """
    from .layers import Conv2D, Dense, GlobalAvgPool2D, LayerNorm
    from .network import Network

    if len(dims) != len(depths) or len(dims) == 0:
        raise ValueError(f"Expected as many dims as depths (at least one), received: dims={dims!r}, depths={depths!r}")
    rng = None if seed is None else np.random.default_rng(seed)
    layers = [Conv2D(in_channels, dims[0], 2, stride=2, rng=rng), LayerNorm(dims[0], eps=CONVNEXT_EPS)]
    for stage, (dim, depth) in enumerate(zip(dims, depths)):
        if stage > 0:
            layers += [LayerNorm(dims[stage - 1], eps=CONVNEXT_EPS), Conv2D(dims[stage - 1], dim, 2, stride=2, rng=rng)]
        layers += [convnext_block(dim, rng, fused) for _ in range(depth)]
    layers += [GlobalAvgPool2D(), LayerNorm(dims[-1], axis=-1, eps=CONVNEXT_EPS), Dense(dims[-1], num_classes, rng=rng)]
    return Network(layers, (in_channels, 32, 32), dtype=dtype)
