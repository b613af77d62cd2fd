"""Fashion-MNIST images read as sequences, classified by a 1-D convolutional network.

Each 28x28 image becomes a sequence of 28 time steps (its rows, top to bottom) with 28 channels
(the pixels of the row, one per column): shape (n, channels=28, length=28). The 1-D convolutions
slide along the rows only, each filter seeing all 28 columns of 3 neighbouring rows at once,
so the network learns vertical patterns directly and horizontal ones through its channels.

Conv1D 64 (k3, same) BN ReLU pool · Conv1D 128 (k3, same) BN ReLU pool · Flatten ·
Dense 64 ReLU · Dense 10; SoftmaxCrossEntropy, Adam; inputs standardised with the training
part's statistics, 10% of the training images held out for validation.

Run from the repository root::

    python examples/conv1d_sequences.py                        # full Fashion-MNIST, 3 epochs: about 89%
    python examples/conv1d_sequences.py --sample --epochs 5    # the sample shipped with cnnx
    python examples/conv1d_sequences.py --limit 10000 --epochs 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import cnnx
from cnnx import datasets, preprocessing
from cnnx.layers import BatchNorm1D, Conv1D, Dense, Flatten, MaxPool1D, ReLU


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the shuffling")
    parser.add_argument("--limit", type=int, help="use only the first N training images; None: all")
    parser.add_argument("--data",
                        help="directory of the Fashion-MNIST IDX files; None: look in $CNNX_DATA and the usual places")
    parser.add_argument("--sample", action="store_true", help="use the sample shipped with cnnx")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", type=Path, default=Path("runs/conv1d_sequences"),
                        help="where to save the trained network")
    return parser.parse_args(argv)


def as_sequences(images):
    """(n, 28, 28) images -> (n, 28 channels, 28 steps): step t is row t, channel j is column j."""
    return np.ascontiguousarray(images.transpose(0, 2, 1))


def sequence_network():
    # No bias before a BatchNorm: its mean subtraction would cancel it.
    return cnnx.Network([
        Conv1D(28, 64, 3, padding="same", bias=False), BatchNorm1D(64), ReLU(),    # 64 x 28
        MaxPool1D(2),                                                              # 64 x 14
        Conv1D(64, 128, 3, padding="same", bias=False), BatchNorm1D(128), ReLU(),  # 128 x 14
        MaxPool1D(2),                                                              # 128 x 7
        Flatten(),
        Dense(128 * 7, 64, activation="relu"),
        Dense(64, 10),
    ], input_shape=(28, 28))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, y_train), (x_test, y_test) = (datasets.load_fashion_mnist(sample=True) if args.sample
                                                else datasets.load_fashion_mnist(args.data))
    except FileNotFoundError as exc:
        sys.exit(f"{exc}\nOr run with --sample to train on the sample shipped with cnnx.")
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
        preprocessing.scale(x_train), y_train, val_fraction=0.1, seed=args.seed)
    x_train, x_val, x_test = preprocessing.standardize(x_train, x_val, preprocessing.scale(x_test))
    x_train, x_val, x_test = (as_sequences(x) for x in (x_train, x_val, x_test))
    print(f"{len(x_train)} training, {len(x_val)} validation, {len(x_test)} test sequences "
          f"of shape {x_train.shape[1:]} (channels, steps)")

    cnnx.manual_seed(args.seed)
    net = sequence_network()
    net.summary()
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam(lr=args.lr))

    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
            validation_data=(x_val, y_val), seed=args.seed, verbose=1 if sys.stderr.isatty() else 2)
    seconds = time.perf_counter() - start
    result = net.evaluate(x_test, y_test)
    print(f"training: {seconds:.1f} s, {seconds / max(args.epochs, 1):.1f} s per epoch")
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.4f}")
    cnnx.save(net, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
