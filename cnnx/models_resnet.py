"""ResNet-8 for CIFAR-sized inputs: the model zoo's residual network (``cnnx.models.MODELS["resnet8"]``).

Kept apart from ``models.py`` because it is the one zoo model built from the container layers
(Residual, BatchNorm2D). ``Network`` is imported inside the builder: ``models`` imports this
module, and ``network`` must never import back.
"""
from __future__ import annotations

import numpy as np

__all__ = ["resnet8", "basic_block"]


def basic_block(in_channels, out_channels, stride=1, rng=None, fused=True):
    """A ResNet basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Both convolutions are 3x3 with padding 1 (the first one strided) and no bias, since the
    BatchNorm after each cancels a bias anyway. The shortcut is the identity when the shape is
    kept, else a strided 1x1 convolution and a BatchNorm (ResNet's option B).

    Parameters
    ----------
    in_channels, out_channels : int
    stride : int, default 1
    rng : numpy.random.Generator or None
        Source of the initial weights.
    fused : bool, default True
        Apply the ReLU after the sum inside the Residual (``activation="relu"``); False returns it
        as a separate ``ReLU`` layer.

    Returns
    -------
    list of Layer
        ``[Residual]``, or ``[Residual, ReLU]`` when ``fused`` is False.
    """
    from .layers import BatchNorm2D, Conv2D, ReLU, Residual

    block = [
        Conv2D(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, rng=rng),
        BatchNorm2D(out_channels),
        ReLU(),
        Conv2D(out_channels, out_channels, 3, padding=1, bias=False, rng=rng),
        BatchNorm2D(out_channels),
    ]
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = [Conv2D(in_channels, out_channels, 1, stride=stride, bias=False, rng=rng), BatchNorm2D(out_channels)]
    if fused:
        return [Residual(block, shortcut, activation="relu")]
    return [Residual(block, shortcut), ReLU()]


def resnet8(num_classes=10, dtype="float32", seed=None, fused=True):
    """ResNet-8 for 3×32×32 inputs (78,042 parameters with 10 classes).

    Conv(16, k3, same) BN ReLU · three stages of one basic block each (16; 32 stride 2;
    64 stride 2), the ReLU after each residual sum · global average pooling (8×8) · Flatten ·
    Dense ``num_classes``.

    Parameters
    ----------
    num_classes : int, default 10
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the initial weights (None: the library generator, see ``cnnx.manual_seed``).
    fused : bool, default True
        Apply each post-sum ReLU inside its Residual rather than as a separate layer.

    Returns
    -------
    Network
        Uncompiled; outputs ``num_classes`` logits.
    """
    from .layers import AvgPool2D, BatchNorm2D, Conv2D, Dense, Flatten, ReLU
    from .network import Network

    rng = None if seed is None else np.random.default_rng(seed)
    layers = [Conv2D(3, 16, 3, padding="same", bias=False, rng=rng), BatchNorm2D(16), ReLU()]
    for c_in, c_out, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
        layers += basic_block(c_in, c_out, stride, rng=rng, fused=fused)
    layers += [AvgPool2D(8), Flatten(), Dense(64, num_classes, rng=rng)]
    return Network(layers, (3, 32, 32), dtype=dtype)
