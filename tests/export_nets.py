"""Small networks that use every cnnx layer, shared by the state-dict and ONNX export tests.

Weights, BatchNorm scales and running statistics are drawn at random (not the neutral initial
values), so a key mapped to the wrong array or a statistic ignored by an exporter shows in the
outputs.
"""
import numpy as np

import cnnx
from cnnx.layers import (GELU, AvgPool1D, AvgPool2D, BatchNorm1D, BatchNorm2D, Conv1D, Conv2D, ConvTranspose2D,
                         Dense, Dropout, Flatten, LeakyReLU, MaxPool1D, MaxPool2D, ReLU, Reshape, Residual, Sigmoid,
                         Softmax, Tanh, Upsample2D)


def image_net(dtype="float64"):
    """Every 2-D layer, fused activations, both kinds of Residual; input (3, 12, 12)."""
    layers = [
        Conv2D(3, 4, 3, padding=((1, 0), (2, 1)), activation="gelu", rng=1),
        BatchNorm2D(4),
        LeakyReLU(0.2),
        Conv2D(4, 6, (2, 3), stride=2, padding="same", activation="leaky_relu", negative_slope=0.1, rng=2),
        MaxPool2D(3, stride=1, padding=1),
        AvgPool2D(2, stride=1, padding=(1, 0)),
        ConvTranspose2D(6, 5, 3, stride=2, padding=1, output_padding=1, rng=3),
        Sigmoid(),
        Upsample2D((1, 2)),
        Tanh(),
        Residual([Conv2D(5, 5, 3, padding=1, activation="tanh", rng=4), BatchNorm2D(5)], activation="relu"),
        Residual([Conv2D(5, 3, 1, rng=5)], shortcut=[Conv2D(5, 3, 1, bias=False, rng=6), BatchNorm2D(3, affine=False)]),
        MaxPool2D(2),
        ReLU(),
        Dropout(0.3),
        Flatten(),
        Dense(3 * 6 * 14, 16, activation="sigmoid", rng=7),
        GELU("tanh"),
        BatchNorm1D(16),
        Dense(16, 10, bias=False, rng=8),
        Softmax(),
    ]
    return randomized(cnnx.Network(layers, (3, 12, 12), dtype=dtype))


def sequence_net(dtype="float64"):
    """The 1-D layers and Reshape; input (2, 20)."""
    layers = [
        Conv1D(2, 4, 3, padding="same", activation="relu", rng=1),
        BatchNorm1D(4),
        MaxPool1D(2),
        Conv1D(4, 6, 4, stride=2, padding=(2, 1), rng=2),
        AvgPool1D(3, stride=1, padding=1),
        Reshape((3, -1)),
        Tanh(),
        Flatten(),
        Dense(30, 10, activation="gelu", rng=3),
        Reshape((2, 5)),
        Softmax(),
    ]
    return randomized(cnnx.Network(layers, (2, 20), dtype=dtype))


def randomized(net, seed=0, weights=True):
    """``net`` with every parameter and buffer redrawn: weights ~ N(0, 0.3), BatchNorm scales
    around 1, running means around 0 and running variances in [0.5, 2]. ``weights=False`` redraws
    the buffers only (keeps the initialisation's output scale of a large network)."""
    rng = np.random.default_rng(seed)
    for key, p, _ in net.parameters() if weights else []:
        base = 1.0 if key.endswith("weight") and p.ndim == 1 else 0.0  # BatchNorm gamma
        p[...] = base + 0.3 * rng.standard_normal(p.shape)
    for key, b in net.buffers():
        if key.endswith("running_var"):
            b[...] = rng.uniform(0.5, 2.0, b.shape)
        else:
            b[...] = 0.2 * rng.standard_normal(b.shape)
    return net



NEW_LAYERS = ("LayerNorm", "GlobalAvgPool2D", "GlobalMaxPool2D", "Concat")


def has_new_layers():
    """Whether this cnnx has LayerNorm, the global pools, Concat and grouped / dilated Conv2D."""
    import inspect

    return (all(hasattr(cnnx.layers, name) for name in NEW_LAYERS)
            and {"dilation", "groups"} <= set(inspect.signature(Conv2D).parameters))


def new_layers_net(dtype="float64"):
    """Grouped, depthwise and dilated convolutions, LayerNorm both ways, global pools and an
    Inception-style Concat; input (4, 10, 10)."""
    L = cnnx.layers
    layers = [
        Conv2D(4, 8, 3, padding=2, dilation=2, groups=2, activation="gelu", rng=1),
        L.LayerNorm(8),  # over the channels of NCHW (ConvNeXt)
        Conv2D(8, 8, 7, padding=3, groups=8, rng=2),  # depthwise 7x7
        L.Concat([
            [Conv2D(8, 3, 1, activation="relu", rng=3)],
            [Conv2D(8, 2, 1, rng=4), BatchNorm2D(2), Conv2D(2, 4, 3, padding=1, activation="relu", rng=5)],
            [MaxPool2D(3, stride=1, padding=1), Conv2D(8, 2, 1, rng=6)],
        ]),
        L.Concat([[L.GlobalAvgPool2D(keepdims=True)], [L.GlobalMaxPool2D(keepdims=True)]]),
        L.GlobalAvgPool2D(),
        L.LayerNorm(18, axis=-1),
        Dense(18, 5, rng=7),
    ]
    return randomized(cnnx.Network(layers, (4, 10, 10), dtype=dtype))
