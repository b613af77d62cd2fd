"""The model zoo: the networks of benchmarks/README.md (and ResNet-8), built uncompiled, by function or name.

Each builder returns a fresh ``Network``; ``default_optimizer(name)`` and ``DEFAULT_BATCH_SIZE``
give the training setup benchmarks/README.md uses for it. A convolution or dense layer directly followed
by its activation is built with the fused ``activation=`` argument (one pass instead of two, the
same function); ``fused=False`` builds separate activation layers instead, e.g. to compare.
"""
from __future__ import annotations

import numpy as np

from .network import Network
from .zoo_modern import convnext_mini, mini_inception
from .zoo_resnet import resnet8

__all__ = [
    "lenet5",
    "seed_mnist",
    "seed_cifar",
    "mind_cifar",
    "resnet8",
    "vgg_small",
    "mini_inception",
    "convnext_mini",
    "MODELS",
    "DEFAULT_BATCH_SIZE",
    "build",
    "default_optimizer",
]

_SLOPE = 0.01  # LeakyReLU slope of the seed library's networks


class _Builder:
    """Appends layers, fusing an activation into the conv/dense before it when asked."""

    def __init__(self, fused, rng):
        from . import layers

        self.L = layers
        self.fused = fused
        self.rng = rng
        self.layers = []

    def conv(self, c_in, c_out, k, padding, activation):
        if self.fused:
            self.layers.append(self.L.Conv2D(c_in, c_out, k, padding=padding, rng=self.rng, **_act(activation)))
        else:
            self.layers.append(self.L.Conv2D(c_in, c_out, k, padding=padding, rng=self.rng))
            self._activation(activation)

    def dense(self, f_in, f_out, activation=None):
        if self.fused and activation is not None:
            self.layers.append(self.L.Dense(f_in, f_out, rng=self.rng, **_act(activation)))
        else:
            self.layers.append(self.L.Dense(f_in, f_out, rng=self.rng))
            self._activation(activation)

    def _activation(self, activation):
        if activation == "relu":
            self.layers.append(self.L.ReLU())
        elif activation == "leaky_relu":
            self.layers.append(self.L.LeakyReLU(_SLOPE))

    def add(self, layer):
        self.layers.append(layer)


def _act(activation):
    """Keyword arguments for the fused activation of Conv2D / Dense."""
    if activation == "leaky_relu":
        return {"activation": "leaky_relu", "negative_slope": _SLOPE}
    return {"activation": activation}


def _generator(seed):
    # One generator shared by all layers: a seed fixes every initial weight of the network.
    return None if seed is None else np.random.default_rng(seed)


def lenet5(dtype="float32", seed=None, fused=True):
    """LeNet-5 for 1×28×28 inputs (61,706 parameters).

    Conv(6, k5, pad 2) ReLU pool · Conv(16, k5) ReLU pool · Flatten · Dense 120 ReLU ·
    Dense 84 ReLU · Dense 10.

    Parameters
    ----------
    dtype : {"float32", "float64"}
    seed : int or None
        Seed of the initial weights (None: the library generator, see ``cnnx.manual_seed``).
    fused : bool, default True
        Fuse each activation into the layer before it.

    Returns
    -------
    Network
        Uncompiled; outputs 10 logits.
    """
    b = _Builder(fused, _generator(seed))
    b.conv(1, 6, 5, 2, "relu")
    b.add(b.L.MaxPool2D(2))
    b.conv(6, 16, 5, 0, "relu")
    b.add(b.L.MaxPool2D(2))
    b.add(b.L.Flatten())
    b.dense(16 * 5 * 5, 120, "relu")
    b.dense(120, 84, "relu")
    b.dense(84, 10)
    return Network(b.layers, (1, 28, 28), dtype=dtype)


def seed_mnist(dtype="float32", seed=None, fused=True):
    """The seed report's MNIST network for 1×28×28 inputs (806,394 parameters).

    Conv(16, k2, same) LReLU pool · Conv(32, k2, same) LReLU · Flatten · Dense 128 LReLU ·
    Dense 10, with LeakyReLU slope 0.01. Arguments as :func:`lenet5`.
    """
    b = _Builder(fused, _generator(seed))
    b.conv(1, 16, 2, "same", "leaky_relu")
    b.add(b.L.MaxPool2D(2))
    b.conv(16, 32, 2, "same", "leaky_relu")
    b.add(b.L.Flatten())
    b.dense(32 * 14 * 14, 128, "leaky_relu")
    b.dense(128, 10)
    return Network(b.layers, (1, 28, 28), dtype=dtype)


def seed_cifar(dtype="float32", seed=None, fused=True):
    """The seed report's CIFAR-10 network for 3×32×32 inputs (544,122 parameters).

    Conv(32, k2, same) LReLU pool · Conv(64, k2, same) LReLU pool · Flatten ·
    Dense 128, 64, 32, 16 (each LReLU) · Dense 10. Arguments as :func:`lenet5`.
    """
    b = _Builder(fused, _generator(seed))
    b.conv(3, 32, 2, "same", "leaky_relu")
    b.add(b.L.MaxPool2D(2))
    b.conv(32, 64, 2, "same", "leaky_relu")
    b.add(b.L.MaxPool2D(2))
    b.add(b.L.Flatten())
    widths = [64 * 8 * 8, 128, 64, 32, 16]
    for f_in, f_out in zip(widths[:-1], widths[1:]):
        b.dense(f_in, f_out, "leaky_relu")
    b.dense(16, 10)
    return Network(b.layers, (3, 32, 32), dtype=dtype)


def mind_cifar(dtype="float32", seed=None, fused=True):
    """A deeper CIFAR-10 network for 3×32×32 inputs (179,402 parameters), "same" convolutions.

    Conv(32, k3) ReLU · Conv(64, k3) ReLU pool · Dropout 0.25 · Conv(128, k3) ReLU pool ·
    Conv(128, k2) ReLU pool · Dropout 0.25 · Flatten · Dense 10. Arguments as :func:`lenet5`.
    """
    b = _Builder(fused, _generator(seed))
    b.conv(3, 32, 3, "same", "relu")
    b.conv(32, 64, 3, "same", "relu")
    b.add(b.L.MaxPool2D(2))
    b.add(b.L.Dropout(0.25))
    b.conv(64, 128, 3, "same", "relu")
    b.add(b.L.MaxPool2D(2))
    b.conv(128, 128, 2, "same", "relu")
    b.add(b.L.MaxPool2D(2))
    b.add(b.L.Dropout(0.25))
    b.add(b.L.Flatten())
    b.dense(128 * 4 * 4, 10)
    return Network(b.layers, (3, 32, 32), dtype=dtype)


def vgg_small(num_classes=10, in_channels=3, dtype="float32", seed=None, fused=True):
    """A small VGG for 32×32 inputs (550,570 parameters with 3 input channels and 10 classes).

    Three stages of two 3×3 "same" convolutions with ReLU and a 2×2 max-pool (32, 64, 128
    channels) · Flatten · Dense 128 ReLU · Dropout 0.5 · Dense ``num_classes``.

    Parameters
    ----------
    num_classes : int, default 10
    in_channels : int, default 3
        1 for grey images (Fashion-MNIST padded to 32×32).
    dtype, seed, fused
        As :func:`lenet5`.

    Returns
    -------
    Network
        Uncompiled; outputs ``num_classes`` logits.
    """
    b = _Builder(fused, _generator(seed))
    c_in = in_channels
    for width in (32, 64, 128):
        b.conv(c_in, width, 3, "same", "relu")
        b.conv(width, width, 3, "same", "relu")
        b.add(b.L.MaxPool2D(2))
        c_in = width
    b.add(b.L.Flatten())
    b.dense(128 * 4 * 4, 128, "relu")
    b.add(b.L.Dropout(0.5))
    b.dense(128, num_classes)
    return Network(b.layers, (in_channels, 32, 32), dtype=dtype)


MODELS = {
    "lenet5": lenet5,
    "seed-mnist": seed_mnist,
    "seed-cifar": seed_cifar,
    "mind-cifar": mind_cifar,
    "resnet8": resnet8,  # cnnx/zoo_resnet.py; not one of benchmarks/README.md's workloads
    # The course's later architectures for 32x32 inputs (not benchmark workloads either).
    "vgg-small": vgg_small,
    "mini-inception": mini_inception,  # cnnx/zoo_modern.py
    "convnext-mini": convnext_mini,    # cnnx/zoo_modern.py
}

#: Batch size benchmarks/README.md trains each model with.
DEFAULT_BATCH_SIZE = {"lenet5": 128, "seed-mnist": 256, "seed-cifar": 64, "mind-cifar": 128, "resnet8": 128,
                      "vgg-small": 128, "mini-inception": 128, "convnext-mini": 128}

# Optimizer (class name, constructor arguments) benchmarks/README.md trains each model with.
_OPTIMIZERS = {
    "lenet5": ("SGD", {"lr": 0.05, "momentum": 0.9}),
    "seed-mnist": ("Adam", {"lr": 1e-4}),
    "seed-cifar": ("Adam", {"lr": 5e-5}),
    "mind-cifar": ("Adam", {"lr": 1e-3}),
    "resnet8": ("Adam", {"lr": 1e-3}),  # not in benchmarks/README.md: the usual Adam default
    "vgg-small": ("Adam", {"lr": 1e-3}),
    "mini-inception": ("Adam", {"lr": 1e-3}),
    "convnext-mini": ("AdamW", {"lr": 1e-3, "weight_decay": 0.05}),  # the ConvNeXt paper's optimizer
}


def _canonical(name):
    if not isinstance(name, str):
        raise TypeError(f"Expected a model name (str), received: {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in MODELS:
        raise ValueError(f"Expected a model name, one of {sorted(MODELS)}, received: {name!r}")
    return key


def build(name, **kwargs):
    """Build a zoo model by name (``"seed-mnist"``; ``"seed_mnist"`` works too).

    ``kwargs`` go to the builder (``dtype``, ``seed``, ``fused``).
    """
    return MODELS[_canonical(name)](**kwargs)


def default_optimizer(name):
    """A fresh instance of the optimizer benchmarks/README.md trains model ``name`` with."""
    from . import optimizers

    cls_name, config = _OPTIMIZERS[_canonical(name)]
    return optimizers.get(cls_name, **config)
