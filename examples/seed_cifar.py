"""The seed report's CIFAR-10 network, trained the way the report trained it.

Conv(32, k2, same) LReLU pool · Conv(64, k2, same) LReLU pool · Flatten ·
Dense 128, 64, 32, 16 (each LReLU) · Dense 10 (544,122 parameters), Adam 5e-5, batch 64, inputs
standardised per colour channel with the training set's statistics. The report trained 50
epochs (4 h 54 min with its NumPy library); try ``--epochs 5 --lr 5e-4`` for a quick look.

Needs the real CIFAR-10 "python version" batches (data_batch_1..5, test_batch)::

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
    python examples/seed_cifar.py --data cifar-10-batches-py      # or: export CNNX_DATA=$PWD

Without them it says where it looked and exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
import time

import cnnx
from cnnx import datasets, preprocessing
from cnnx.layers import Conv2D, Dense, Flatten, MaxPool2D

SLOPE = 0.01  # the seed library's LeakyReLU slope

HOW_TO_GET = """
This example trains on the real CIFAR-10 images. To get them (163 MB):
    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
then pass --data cifar-10-batches-py, or set CNNX_DATA to the directory holding it."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="cifar-10-batches-py or its parent; None: look in $CNNX_DATA")
    parser.add_argument("--epochs", type=int, default=50, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--lr", type=float, default=5e-5, help="learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the shuffling")
    parser.add_argument("--limit", type=int, help="use only the first N training images; None: all")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", default="runs/seed-cifar", help="where to save the trained network")
    return parser.parse_args(argv)


def seed_network():
    leaky = {"activation": "leaky_relu", "negative_slope": SLOPE}
    layers = [
        Conv2D(3, 32, kernel_size=2, padding="same", **leaky),
        MaxPool2D(2),
        Conv2D(32, 64, kernel_size=2, padding="same", **leaky),
        MaxPool2D(2),
        Flatten(),
    ]
    widths = [64 * 8 * 8, 128, 64, 32, 16]
    layers += [Dense(a, b, **leaky) for a, b in zip(widths[:-1], widths[1:])]
    layers.append(Dense(16, 10))
    return cnnx.Network(layers, input_shape=(3, 32, 32))


def load_cifar10(path):
    try:
        return datasets.load_cifar10(path, with_label_names=True)
    except FileNotFoundError as exc:
        print(f"{exc}\n{HOW_TO_GET}", file=sys.stderr)
        sys.exit(1)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    (x_train, y_train), (x_test, y_test), class_names = load_cifar10(args.data)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    # uint8 NCHW -> float32 in [0, 1]; per-channel mean/std of the training part only.
    x_train, x_test = preprocessing.scale(x_train), preprocessing.scale(x_test)
    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
        x_train, y_train, val_fraction=0.1, seed=args.seed)
    standardizer = preprocessing.Standardizer()
    x_train = standardizer.fit_transform(x_train)
    x_val, x_test = standardizer.transform(x_val), standardizer.transform(x_test)
    print(f"{len(x_train)} training, {len(x_val)} validation, {len(x_test)} test images")

    cnnx.manual_seed(args.seed)
    net = seed_network()
    net.summary()
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam(lr=args.lr))
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
            validation_data=(x_val, y_val), seed=args.seed,
            verbose=1 if sys.stderr.isatty() else 2)
    seconds = time.perf_counter() - start
    result = net.evaluate(x_test, y_test)
    print(f"training: {seconds:.1f} s, {seconds / args.epochs:.1f} s per epoch")
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.4f}")

    matrix = cnnx.metrics.confusion_matrix(y_test, net.predict_classes(x_test), n_classes=10)
    for k, name in enumerate(class_names):
        print(f"  {name:<10} {matrix[k, k] / max(matrix[k].sum(), 1):.3f}")
    cnnx.save(net, args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
