"""A denoising autoencoder on Fashion-MNIST, built from Dense layers only.

The network sees an image with Gaussian noise (sigma 0.3, clipped to [0, 1]) and learns to
output the clean image: 784 -> 256 -> 64 -> 256 -> 784, ReLU inside, Sigmoid at the end so the
output is a valid pixel in [0, 1], mean squared error against the clean pixels. A fresh noise
draw every epoch means the network never sees the same noisy image twice, so it has to learn
what clothes look like rather than memorise the noise.

Writes ``denoising.png``: rows noisy (the input), denoised (the network's output), clean (the
target); needs matplotlib.

Run from the repository root::

    python examples/dense_autoencoder.py                  # full Fashion-MNIST, 10 epochs
    python examples/dense_autoencoder.py --sample --epochs 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import cnnx
from cnnx import datasets, preprocessing
from cnnx.layers import Dense


# Row labels of denoising.png, the words the README uses for this grid.
ROW_LABELS = ("noisy", "denoised", "clean")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--noise", type=float, default=0.3, help="standard deviation of the noise")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the noise and the shuffling")
    parser.add_argument("--data",
                        help="directory of the Fashion-MNIST IDX files; None: look in $CNNX_DATA and the usual places")
    parser.add_argument("--sample", action="store_true", help="use the sample shipped with cnnx")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", type=Path, default=Path("runs/dense-autoencoder"),
                        help="folder for denoising.png and the saved network")
    return parser.parse_args(argv)


def add_noise(x, sigma, rng):
    """x plus N(0, sigma^2) noise, clipped back to the valid pixel range [0, 1]."""
    noisy = x + rng.normal(0.0, sigma, size=x.shape).astype(x.dtype)
    return np.clip(noisy, 0.0, 1.0, out=noisy)


def autoencoder():
    return cnnx.Network([
        Dense(784, 256, activation="relu"),
        Dense(256, 64, activation="relu"),   # the bottleneck: 64 numbers per image
        Dense(64, 256, activation="relu"),
        Dense(256, 784, activation="sigmoid"),
    ], input_shape=(784,))


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked first: no point training without the picture)
    except ImportError:
        sys.exit("This example draws its result with matplotlib: pip install matplotlib")
    from cnnx import visualize

    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, _), (x_test, _) = (datasets.load_fashion_mnist(sample=True) if args.sample
                                     else datasets.load_fashion_mnist(args.data))
    except FileNotFoundError as exc:
        sys.exit(f"{exc}\nOr run with --sample to train on the sample shipped with cnnx.")

    # Pixels in [0, 1], one row of 784 per image. No standardisation: the targets are pixels
    # and the Sigmoid output lives in [0, 1] as they do.
    x_train = preprocessing.scale(x_train).reshape(len(x_train), -1)
    x_test = preprocessing.scale(x_test).reshape(len(x_test), -1)
    rng = np.random.default_rng(args.seed)
    noisy_test = add_noise(x_test, args.noise, rng)

    cnnx.manual_seed(args.seed)
    net = autoencoder()
    net.summary()
    net.compile(cnnx.losses.MSE(), cnnx.optimizers.Adam(lr=args.lr))

    start = time.perf_counter()
    for epoch in range(args.epochs):
        # The targets are the clean images (regression): y has the output's shape (n, 784).
        net.fit(add_noise(x_train, args.noise, rng), x_train, epochs=1, batch_size=args.batch_size,
                seed=args.seed + epoch, verbose=0)
        denoised = net.predict(noisy_test)
        print(f"epoch {epoch + 1}/{args.epochs}: train MSE {net.history['loss'][-1]:.4f}, "
              f"test MSE {mse(denoised, x_test):.4f}", flush=True)
    seconds = time.perf_counter() - start

    denoised = net.predict(noisy_test)
    print(f"{seconds / max(args.epochs, 1):.1f} s per epoch")
    print(f"test MSE to the clean images: noisy input {mse(noisy_test, x_test):.4f}, "
          f"denoised {mse(denoised, x_test):.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    shape = (-1, 28, 28)
    fig = visualize.plot_reconstructions(
        noisy_test[:10].reshape(shape), denoised[:10].reshape(shape), x_test[:10].reshape(shape),
        path=args.out / "denoising.png", max_images=10,
        title=f"Denoising autoencoder (noise sigma {args.noise})", labels=ROW_LABELS)
    import matplotlib.pyplot as plt

    plt.close(fig)
    cnnx.save(net, args.out / "model")
    print(f"wrote {args.out / 'denoising.png'}, saved the network in {args.out / 'model'}")


if __name__ == "__main__":
    main()
