"""ResNet-8 from the cnnx model zoo on CIFAR-10, with a validation split and early stopping.

``cnnx.models.build("resnet8")``: Conv 16 + BatchNorm, three residual stages (16, 32, 64
channels, the last two halving the image), global average pooling, Dense 10 (78,042
parameters); Adam 1e-3, batch 128. Inputs are standardised per colour channel with the
training part's statistics; 10% of the training images are held out for validation. Training
stops when the validation loss has not improved for ``--patience`` epochs and keeps the best
weights, which are also saved after every improving epoch (``cnnx.load(out)`` resumes).

Needs the real CIFAR-10 "python version" batches (data_batch_1..5, test_batch)::

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
    python examples/resnet8_cifar10.py --data cifar-10-batches-py     # or: export CNNX_DATA=$PWD
    python examples/resnet8_cifar10.py --limit 5000 --epochs 2         # a quick trial

Without them it says where it looked and exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cnnx
from cnnx import datasets, models, preprocessing
from cnnx.callbacks import EarlyStopping

HOW_TO_GET = """
This example trains on the real CIFAR-10 images. To get them (163 MB):
    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
then pass --data cifar-10-batches-py, or set CNNX_DATA to the directory holding it."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="cifar-10-batches-py or its parent; None: look in $CNNX_DATA")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=models.DEFAULT_BATCH_SIZE["resnet8"],
                        help="images per training step")
    parser.add_argument("--lr", type=float, help="learning rate; None: the zoo's (Adam 1e-3)")
    parser.add_argument("--patience", type=int, default=3, help="epochs without improvement before stopping")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the shuffling")
    parser.add_argument("--limit", type=int, help="use only the first N training images; None: all")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", type=Path, default=Path("runs/resnet8_cifar10"),
                        help="where the best network is saved")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, y_train), (x_test, y_test), class_names = datasets.load_cifar10(
            args.data, with_label_names=True)
    except FileNotFoundError as exc:  # the message lists every place it looked
        print(f"{exc}\n{HOW_TO_GET}", file=sys.stderr)
        sys.exit(1)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    # uint8 NCHW -> float32 in [0, 1]; per-channel mean/std of the training part only.
    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
        preprocessing.scale(x_train), y_train, val_fraction=0.1, seed=args.seed)
    x_train, x_val, x_test = preprocessing.standardize(x_train, x_val, preprocessing.scale(x_test))
    print(f"{len(x_train)} training, {len(x_val)} validation, {len(x_test)} test images")

    net = models.build("resnet8", seed=args.seed)
    optimizer = models.default_optimizer("resnet8")
    if args.lr is not None:
        optimizer.lr = args.lr
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), optimizer)
    net.summary()

    callbacks = [
        EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True),
        cnnx.ModelCheckpoint(args.out, save_best_only=True, monitor="val_loss", verbose=1),
    ]
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
            validation_data=(x_val, y_val), seed=args.seed, callbacks=callbacks,
            verbose=1 if sys.stderr.isatty() else 2)
    seconds = time.perf_counter() - start
    epochs_run = len(net.history["loss"])
    result = net.evaluate(x_test, y_test)  # the best epoch's weights (restore_best_weights)
    print(f"{epochs_run} epochs in {seconds:.1f} s ({seconds / max(epochs_run, 1):.1f} s per epoch)")
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.4f}")

    matrix = cnnx.metrics.confusion_matrix(y_test, net.predict_classes(x_test), n_classes=10)
    for k, name in enumerate(class_names):
        print(f"  {name:<10} {matrix[k, k] / max(matrix[k].sum(), 1):.3f}")
    print(f"best network saved in {args.out}")


if __name__ == "__main__":
    main()
