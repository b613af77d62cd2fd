"""CIFAR-10 the way it is usually trained: crop + flip augmentation, SGD with Nesterov momentum,
a linear warm-up into cosine annealing, label smoothing, live curves in TensorBoard.

Trains ``resnet8`` by default (any zoo model that takes 3x32x32 images: ``--model``). Each
training batch is augmented (random 32x32 crop of the 4-pixel zero-padded image, horizontal flip,
optionally Cutout); the validation and test sets never are. The learning rate rises linearly
for ``--warmup`` epochs and then follows a cosine down to 0 at the last epoch. The network is
saved with its optimizer and schedule, so ``cnnx.load(out)`` and ``fit`` continue the cosine
where it stopped.

Needs the CIFAR-10 "python version" batches (data_batch_1..5, test_batch)::

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    tar xzf cifar-10-python.tar.gz
    python examples/cifar_augment_cosine.py --data cifar-10-batches-py --tensorboard runs/tb
    tensorboard --logdir runs/tb      # in another terminal: loss, accuracy, lr, histograms, filters
    python examples/cifar_augment_cosine.py --limit 5000 --epochs 3   # a quick trial
"""
from __future__ import annotations

import argparse
import sys
import time

import cnnx
from cnnx import augment, datasets, models, preprocessing, schedules
from cnnx.callbacks import CSVLogger


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="resnet8", help="zoo model taking 3x32x32 images")
    parser.add_argument("--data", help="cifar-10-batches-py or its parent; None: $CNNX_DATA")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--warmup", type=int, default=2, help="epochs of linear warm-up (0: none)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD's L2 weight decay")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="of the cross-entropy")
    parser.add_argument("--cutout", action="store_true", help="add Cutout(8) to crop + flip")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, split, shuffling, augmentation")
    parser.add_argument("--limit", type=int, help="use only the first N training images; None: all")
    parser.add_argument("--threads", type=int, help="threads for the compiled kernels; None: all cores")
    parser.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard logs here; None: no logs")
    parser.add_argument("--out", default="runs/cifar-augment-cosine", help="where the network is saved")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, y_train), (x_test, y_test) = datasets.load_cifar10(args.data)
    except FileNotFoundError as exc:
        print(f"{exc}\nGet CIFAR-10 with: curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              file=sys.stderr)
        sys.exit(1)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    x_train, x_test = preprocessing.scale(x_train), preprocessing.scale(x_test)
    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(
        x_train, y_train, val_fraction=0.1, seed=args.seed)
    standardizer = preprocessing.Standardizer()  # per colour channel, from the training part only
    x_train = standardizer.fit_transform(x_train)
    x_val, x_test = standardizer.transform(x_val), standardizer.transform(x_test)
    print(f"{len(x_train)} training, {len(x_val)} validation, {len(x_test)} test images")

    net = models.build(args.model, seed=args.seed)
    optimizer = cnnx.optimizers.SGD(lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    # The schedule attaches itself to the optimizer; fit steps it once per epoch.
    cosine_epochs = args.epochs - args.warmup
    if args.warmup > 0 and cosine_epochs > 0:
        warmup = schedules.LinearLR(optimizer, start_factor=0.1, total_iters=args.warmup)
        cosine = schedules.CosineAnnealingLR(optimizer, T_max=cosine_epochs)
        schedule = schedules.SequentialLR(optimizer, [warmup, cosine], milestones=[args.warmup])
    else:
        schedule = schedules.CosineAnnealingLR(optimizer, T_max=args.epochs)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(label_smoothing=args.label_smoothing), optimizer)
    names = "crop,flip,cutout" if args.cutout else "crop,flip"
    aug = augment.from_names(names, image_size=32)
    print(f"{args.model}: {net.num_params:,} parameters; {schedule!r}; {aug!r}")

    callbacks = [CSVLogger(f"{args.out}-log.csv")]
    if args.tensorboard:
        callbacks.append(cnnx.callbacks.TensorBoard(args.tensorboard, update_freq=50))
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, validation_data=(x_val, y_val),
            seed=args.seed, augment=aug, callbacks=callbacks, verbose=1 if sys.stderr.isatty() else 2)
    seconds = time.perf_counter() - start
    result = net.evaluate(x_test, y_test)
    print(f"{args.epochs} epochs in {seconds:.1f} s; learning rates: "
          + ", ".join(f"{lr:.4g}" for lr in net.history["lr"]))
    print(f"test loss: {result['loss']:.4f}")
    print(f"test accuracy: {result['accuracy']:.4f}")
    net.save(args.out)
    print(f"saved in {args.out} (with the schedule: cnnx.load and fit continue it)")


if __name__ == "__main__":
    main()
