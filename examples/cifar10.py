"""CIFAR-10 with a model from the cnnx zoo, early stopping and checkpoints.

Trains ``mind-cifar`` (four 'same' convolutions with dropout, 179,402 parameters, Adam 1e-3,
batch 128) by default, or any zoo model that takes 3x32x32 images (``--model``). Training stops
when the validation loss has not improved for ``--patience`` epochs and keeps the best
weights; the best network so far is saved after each improving epoch, so an interrupted run
leaves a usable model behind (``cnnx.load(out)``; ``fit`` on it resumes training).

Needs the real CIFAR-10 "python version" batches (data_batch_1..5, test_batch)::

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
    python examples/cifar10.py --data cifar-10-batches-py      # or: export CNNX_DATA=$PWD
    python examples/cifar10.py --limit 5000 --epochs 2          # a quick trial

Without them it says where it looked and exits with status 1.
"""
from __future__ import annotations

import argparse
import sys
import time

import cnnx
from cnnx import datasets, models, preprocessing
from cnnx.callbacks import EarlyStopping

HOW_TO_GET = """
This example trains on the real CIFAR-10 images. To get them (163 MB):
    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
then pass --data cifar-10-batches-py, or set CNNX_DATA to the directory holding it."""


def cifar_models():
    """Zoo models that take CIFAR-sized (3, 32, 32) images."""
    return sorted(name for name in models.MODELS
                  if tuple(models.build(name, seed=0).input_shape) == (3, 32, 32))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=cifar_models(), default="mind-cifar", help="zoo model to train")
    parser.add_argument("--data", help="cifar-10-batches-py or its parent; None: look in $CNNX_DATA")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=int,
                        help="images per training step; None: the zoo's for the model")
    parser.add_argument("--lr", type=float, help="learning rate; None: the zoo's for the model")
    parser.add_argument("--patience", type=int, default=3, help="epochs without improvement before stopping")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the shuffling")
    parser.add_argument("--limit", type=int, help="use only the first N training images; None: all")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", default="runs/cifar10", help="where the best network is saved")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, y_train), (x_test, y_test), class_names = datasets.load_cifar10(
            args.data, with_label_names=True)
    except FileNotFoundError as exc:
        print(f"{exc}\n{HOW_TO_GET}", file=sys.stderr)
        sys.exit(1)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]

    x_train, x_test = preprocessing.scale(x_train), preprocessing.scale(x_test)
    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
        x_train, y_train, val_fraction=0.1, seed=args.seed)
    standardizer = preprocessing.Standardizer()  # per colour channel, training part only
    x_train = standardizer.fit_transform(x_train)
    x_val, x_test = standardizer.transform(x_val), standardizer.transform(x_test)
    print(f"{len(x_train)} training, {len(x_val)} validation, {len(x_test)} test images")

    net = models.build(args.model, seed=args.seed)
    optimizer = models.default_optimizer(args.model)
    if args.lr is not None:
        optimizer.lr = args.lr
    batch_size = args.batch_size or models.DEFAULT_BATCH_SIZE.get(args.model, 128)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), optimizer)
    net.summary()

    callbacks = [
        EarlyStopping(monitor="val_loss", patience=args.patience, restore_best_weights=True),
        cnnx.ModelCheckpoint(args.out, save_best_only=True, monitor="val_loss", verbose=1),
    ]
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=batch_size,
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
