"""LeNet-5 on Fashion-MNIST, written out layer by layer.

The classic two-convolution network (61,706 parameters) with the training setup of the cnnx
model zoo: SGD with momentum 0.9, learning rate 0.05, batch 128. Three epochs reach about 87%
test accuracy in about a minute on a laptop CPU.

Run from the repository root::

    python examples/lenet5.py                    # full Fashion-MNIST (apt-get install dataset-fashion-mnist)
    python examples/lenet5.py --sample --epochs 2  # the 7000-image sample shipped with cnnx
    python examples/lenet5.py --data DIR          # a directory holding the four *-ubyte[.gz] files

The same run as a command: ``cnnx train --model lenet5 --dataset fashion-mnist --epochs 3``.
"""
from __future__ import annotations

import argparse
import sys
import time

import cnnx
from cnnx import datasets, preprocessing
from cnnx.layers import Conv2D, Dense, Flatten, MaxPool2D


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the shuffling")
    parser.add_argument("--data",
                        help="directory of the Fashion-MNIST IDX files; None: look in $CNNX_DATA and the usual places")
    parser.add_argument("--sample", action="store_true", help="use the sample shipped with cnnx")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", default="runs/lenet5", help="where to save the trained network")
    return parser.parse_args(argv)


def lenet5():
    """Conv(6, k5, pad 2) ReLU pool · Conv(16, k5) ReLU pool · Dense 120 ReLU · 84 ReLU · 10."""
    return cnnx.Network([
        # activation="relu" fuses the ReLU into the layer's bias pass: the same result as a
        # separate ReLU() layer, one sweep over the output fewer.
        Conv2D(1, 6, kernel_size=5, padding=2, activation="relu"),
        MaxPool2D(2),
        Conv2D(6, 16, kernel_size=5, activation="relu"),
        MaxPool2D(2),
        Flatten(),
        Dense(16 * 5 * 5, 120, activation="relu"),
        Dense(120, 84, activation="relu"),
        Dense(84, 10),  # logits: SoftmaxCrossEntropy applies the softmax
    ], input_shape=(1, 28, 28))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, y_train), (x_test, y_test) = (
            datasets.load_fashion_mnist(sample=True) if args.sample
            else datasets.load_fashion_mnist(args.data))
    except FileNotFoundError as exc:
        sys.exit(f"{exc}\nOr run with --sample to train on the sample shipped with cnnx.")

    # uint8 (n, 28, 28) -> float32 (n, 1, 28, 28) in [0, 1]; hold out 10% (stratified) for
    # validation; standardise with statistics of the training part only.
    x_train = preprocessing.add_channel_axis(preprocessing.scale(x_train))
    x_test = preprocessing.add_channel_axis(preprocessing.scale(x_test))
    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
        x_train, y_train, val_fraction=0.1, seed=args.seed)
    standardizer = preprocessing.Standardizer()
    x_train = standardizer.fit_transform(x_train)
    x_val, x_test = standardizer.transform(x_val), standardizer.transform(x_test)

    cnnx.manual_seed(args.seed)  # the same seed gives the same initial weights
    net = lenet5()
    net.summary()
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.SGD(lr=args.lr, momentum=0.9))

    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
            validation_data=(x_val, y_val), seed=args.seed,
            verbose=1 if sys.stderr.isatty() else 2)  # a progress bar only on a terminal
    seconds = time.perf_counter() - start
    result = net.evaluate(x_test, y_test)
    print(f"{seconds / args.epochs:.1f} s per epoch")
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.4f}")

    predicted = net.predict_classes(x_test[:8])
    print("first test images:", ", ".join(
        f"{datasets.FASHION_MNIST_CLASSES[p]}{'' if p == t else ' (wrong)'}"
        for p, t in zip(predicted, y_test[:8])))
    cnnx.save(net, args.out)
    print(f"saved to {args.out} (reload with cnnx.load({args.out!r}))")


if __name__ == "__main__":
    main()
