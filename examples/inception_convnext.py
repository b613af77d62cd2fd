"""An Inception network and a ConvNeXt-style network, built from their modules, trained side by side.

The two building blocks are written out here in a few lines each, with cnnx's layers:

- an Inception (GoogLeNet) module is a ``Concat`` of four branches on the same input
  (1×1 · 1×1→3×3 · 1×1→5×5 · 3×3 max-pool→1×1), joined on the channel axis;
- a ConvNeXt block is a ``Residual`` around a depthwise 7×7 convolution (``groups=channels``),
  a ``LayerNorm`` over the channels, and an inverted bottleneck 1×1 (×4, GELU) → 1×1.

The networks built from them are the zoo's ``mini-inception`` and ``convnext-mini`` (the script
checks the parameter counts agree). By default they train on the Fashion-MNIST sample shipped
with cnnx, zero-padded from 28×28 to 32×32; ``--data DIR`` trains on CIFAR-10 instead::

    python examples/inception_convnext.py                         # Fashion-MNIST sample, 3 epochs
    python examples/inception_convnext.py --data cifar-10-batches-py --epochs 10
    python examples/inception_convnext.py --models convnext --limit 1000 --epochs 1
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import cnnx
from cnnx import datasets, models, preprocessing
from cnnx.layers import (GELU, Concat, Conv2D, Dense, Dropout, GlobalAvgPool2D, LayerNorm, MaxPool2D,
                         Residual)


def inception_module(c_in, c1, c3_reduce, c3, c5_reduce, c5, pool_proj, rng):
    """GoogLeNet's module: four parallel branches, concatenated on channels."""
    def conv(a, b, k):
        return Conv2D(a, b, k, padding=k // 2, activation="relu", rng=rng)

    return Concat([
        conv(c_in, c1, 1),
        [conv(c_in, c3_reduce, 1), conv(c3_reduce, c3, 3)],
        [conv(c_in, c5_reduce, 1), conv(c5_reduce, c5, 5)],
        [MaxPool2D(3, stride=1, padding=1), conv(c_in, pool_proj, 1)],
    ])


def convnext_block(dim, rng):
    """x + 1x1(GELU(1x1 expand(LayerNorm(depthwise 7x7(x)))))."""
    return Residual([
        Conv2D(dim, dim, 7, padding=3, groups=dim, rng=rng),   # depthwise: one 7x7 filter per channel
        LayerNorm(dim, eps=1e-6),                               # over the channels of each pixel
        Conv2D(dim, 4 * dim, 1, rng=rng), GELU(),               # inverted bottleneck
        Conv2D(4 * dim, dim, 1, rng=rng),
    ])


def inception_net(in_channels, rng=None):
    layers = [Conv2D(in_channels, 32, 3, padding=1, activation="relu", rng=rng),
              inception_module(32, 16, 16, 24, 4, 8, 8, rng), MaxPool2D(3, stride=2, padding=1),
              inception_module(56, 32, 24, 48, 8, 16, 16, rng), MaxPool2D(3, stride=2, padding=1),
              inception_module(112, 48, 32, 64, 8, 16, 16, rng),
              GlobalAvgPool2D(), Dropout(0.4), Dense(144, 10, rng=rng)]
    return cnnx.Network(layers, (in_channels, 32, 32))


def convnext_net(in_channels, rng=None, dims=(32, 64, 128)):
    layers = [Conv2D(in_channels, dims[0], 2, stride=2, rng=rng), LayerNorm(dims[0], eps=1e-6)]  # 32 -> 16
    for stage, dim in enumerate(dims):
        if stage > 0:  # halve the image between stages
            layers += [LayerNorm(dims[stage - 1], eps=1e-6), Conv2D(dims[stage - 1], dim, 2, stride=2, rng=rng)]
        layers += [convnext_block(dim, rng), convnext_block(dim, rng)]
    layers += [GlobalAvgPool2D(), LayerNorm(dims[-1], axis=-1, eps=1e-6), Dense(dims[-1], 10, rng=rng)]
    return cnnx.Network(layers, (in_channels, 32, 32))


BUILDERS = {"inception": (inception_net, "mini-inception"), "convnext": (convnext_net, "convnext-mini")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="CIFAR-10 (cifar-10-batches-py or its parent); without it, the "
                                       "Fashion-MNIST sample padded to 32x32")
    parser.add_argument("--models", default="inception,convnext", help="comma-separated: inception, convnext")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--limit", type=int, help="use only the first N training images (all when unset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling")
    return parser.parse_args(argv)


def load_data(args):
    """Training and test images as float32 NCHW 32x32, standardised with the training statistics."""
    if args.data:
        try:
            (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(args.data)
        except FileNotFoundError as exc:
            print(exc, file=sys.stderr)
            sys.exit(1)
        x_train, x_test = preprocessing.scale(x_train), preprocessing.scale(x_test)
    else:
        (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(sample=True)
        # 28x28 grey -> 1x32x32: two rows/columns of zeros on each side.
        x_train, x_test = (np.pad(preprocessing.scale(x), ((0, 0), (2, 2), (2, 2)))[:, None] for x in (x_train, x_test))
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    x_train, x_test = preprocessing.standardize(x_train, x_test)
    return (x_train, y_train), (x_test, y_test)


def main(argv=None):
    args = parse_args(argv)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown or not names:
        print(f"Expected --models from {sorted(BUILDERS)}, received: {args.models!r}", file=sys.stderr)
        sys.exit(2)
    (x_train, y_train), (x_test, y_test) = load_data(args)
    in_channels = x_train.shape[1]
    print(f"{len(x_train)} training, {len(x_test)} test images of shape {x_train.shape[1:]}")

    rows = []
    for name in names:
        build, zoo_name = BUILDERS[name]
        net = build(in_channels, np.random.default_rng(args.seed))
        same = models.build(zoo_name, in_channels=in_channels).num_params == net.num_params
        print(f"\n{name}: {net.num_params:,} parameters"
              + (f" (as cnnx.models.build({zoo_name!r}))" if same else ""))
        net.summary()
        net.compile(cnnx.losses.SoftmaxCrossEntropy(), models.default_optimizer(zoo_name))
        start = time.perf_counter()
        net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                verbose=1 if sys.stderr.isatty() else 2)
        seconds = time.perf_counter() - start
        result = net.evaluate(x_test, y_test)
        rows.append((name, net.num_params, seconds / max(args.epochs, 1), result["accuracy"]))

    print(f"\n{'model':<10} {'params':>9} {'s/epoch':>8} {'test acc':>9}")
    for name, params, per_epoch, accuracy in rows:
        print(f"{name:<10} {params:>9,} {per_epoch:>8.1f} {accuracy:>9.4f}")


if __name__ == "__main__":
    main()
