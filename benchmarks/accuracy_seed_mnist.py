"""Train the seed-mnist network in cnnx and in PyTorch with the same settings, same data, and
report test accuracy and time per epoch for each (the quality check of issue 3).

Both: Fashion-MNIST 60,000 training images scaled to [0, 1] and standardised with the training
set's mean and standard deviation, Adam (lr 1e-3 by default), batch 256, shuffled each epoch,
softmax cross-entropy; evaluated on the 10,000 test images after the last epoch. Same threads.

    python benchmarks/accuracy_seed_mnist.py --epochs 3 --seeds 0 1
"""
from __future__ import annotations

import argparse
import time
import warnings

import cnnx  # before NumPy: cnnx then loads OpenBLAS with sleeping idle threads
import numpy as np
from cnnx import datasets, preprocessing


def load(limit=None):
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
    x_train = preprocessing.add_channel_axis(preprocessing.scale(x_train))
    x_test = preprocessing.add_channel_axis(preprocessing.scale(x_test))
    x_train, x_test = preprocessing.standardize(x_train, x_test)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    return x_train, y_train, x_test, y_test


def train_cnnx(data, epochs, lr, seed):
    x_train, y_train, x_test, y_test = data
    net = cnnx.models.seed_mnist(seed=seed)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam(lr=lr))
    start = time.perf_counter()
    net.fit(x_train, y_train, epochs=epochs, batch_size=256, seed=seed, verbose=0)
    seconds = time.perf_counter() - start
    return net.evaluate(x_test, y_test)["accuracy"], seconds / epochs


def train_torch(data, epochs, lr, seed, threads):
    import torch
    from torch import nn

    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(a)) for a in data)
    leaky = lambda: nn.LeakyReLU(0.01)  # noqa: E731
    model = nn.Sequential(
        nn.Conv2d(1, 16, 2, padding="same"), leaky(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 2, padding="same"), leaky(), nn.Flatten(),
        nn.Linear(6272, 128), leaky(), nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for lo in range(0, len(order), 256):
            idx = order[lo:lo + 256]
            opt.zero_grad()
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        correct = (model(x_test).argmax(1) == y_test).sum().item()
    return correct / len(y_test), seconds / epochs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--limit", type=int, help="use only the first N training images")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    data = load(args.limit)
    threads = cnnx.parallel.get_num_threads()
    print(f"seed-mnist on Fashion-MNIST: {len(data[0])} train / {len(data[2])} test images, "
          f"Adam lr {args.lr}, batch 256, {args.epochs} epochs, {threads} threads")
    print("| framework | seed | test accuracy | s / epoch |\n|---|---|---|---|")
    for seed in args.seeds:
        acc, per_epoch = train_cnnx(data, args.epochs, args.lr, seed)
        print(f"| cnnx | {seed} | {acc:.4f} | {per_epoch:.1f} |", flush=True)
        if not args.no_torch:
            try:
                acc, per_epoch = train_torch(data, args.epochs, args.lr, seed, threads)
            except ImportError:
                print("| torch | - | not installed | - |")
                continue
            print(f"| torch | {seed} | {acc:.4f} | {per_epoch:.1f} |", flush=True)


if __name__ == "__main__":
    main()
