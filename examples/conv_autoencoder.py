"""A convolutional denoising autoencoder on Fashion-MNIST, compared with a dense one of the same size.

The network sees an image with Gaussian noise (sigma 0.3, clipped to [0, 1]) and learns to
output the clean image. Encoder: Conv 16 ReLU, max-pool, Conv 32 ReLU, max-pool (32x7x7);
decoder: two stride-2 transposed convolutions (32 then 16 channels, back to 28x28) and a 3x3
convolution with a Sigmoid, so each output is a valid pixel in [0, 1]. Loss: mean squared error
against the clean pixels; Adam. A fresh noise draw every epoch.

For comparison a dense autoencoder, 784 -> h -> 784 with h chosen so that it has about as many
parameters as the convolutional one, trains on exactly the same noisy images for the same
epochs. The convolutional one shares each 3x3 filter over the whole image; the dense one has
to spend its weights on every pixel separately.

Writes ``denoising.png``: rows noisy input, convolutional autoencoder's output, clean image
(needs matplotlib); saves the convolutional network in ``model/``.

Run from the repository root::

    python examples/conv_autoencoder.py                          # full Fashion-MNIST, 5 epochs (~90 s each on 2 cores)
    python examples/conv_autoencoder.py --sample --epochs 3      # the sample shipped with cnnx
    python examples/conv_autoencoder.py --limit 10000 --epochs 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import cnnx
from cnnx import datasets, preprocessing
from cnnx.layers import Conv2D, ConvTranspose2D, Dense, Flatten, MaxPool2D, ReLU, Reshape


# Row labels of denoising.png, the words the README uses for this grid.
ROW_LABELS = ("noisy", "denoised", "clean")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--noise", type=float, default=0.3, help="standard deviation of the noise")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the noise and the shuffling")
    parser.add_argument("--limit", type=int, help="use only the first N training images; None: all")
    parser.add_argument("--data",
                        help="directory of the Fashion-MNIST IDX files; None: look in $CNNX_DATA and the usual places")
    parser.add_argument("--sample", action="store_true", help="use the sample shipped with cnnx")
    parser.add_argument("--threads", type=int,
                        help="threads for the compiled kernels; None: $CNNX_NUM_THREADS or all cores")
    parser.add_argument("--out", type=Path, default=Path("runs/conv_autoencoder"),
                        help="folder for denoising.png and the saved network")
    return parser.parse_args(argv)


def add_noise(x, sigma, rng):
    """x plus N(0, sigma^2) noise, clipped back to the valid pixel range [0, 1]."""
    noisy = x + rng.normal(0.0, sigma, size=x.shape).astype(x.dtype)
    return np.clip(noisy, 0.0, 1.0, out=noisy)


def conv_autoencoder():
    return cnnx.Network([
        Conv2D(1, 16, 3, padding="same", activation="relu"),     # 16 x 28 x 28
        MaxPool2D(2),                                            # 16 x 14 x 14
        Conv2D(16, 32, 3, padding="same", activation="relu"),    # 32 x 14 x 14
        MaxPool2D(2),                                            # 32 x 7 x 7: the code
        # Stride 2, padding 1, output_padding 1: each transposed convolution doubles h and w.
        ConvTranspose2D(32, 32, 3, stride=2, padding=1, output_padding=1),   # 32 x 14 x 14
        ReLU(),
        ConvTranspose2D(32, 16, 3, stride=2, padding=1, output_padding=1),   # 16 x 28 x 28
        ReLU(),
        Conv2D(16, 1, 3, padding="same", activation="sigmoid"),  # 1 x 28 x 28, pixels in [0, 1]
    ], input_shape=(1, 28, 28))


def dense_autoencoder(hidden):
    """784 -> hidden -> 784, taking and returning (1, 28, 28) images like the convolutional one."""
    return cnnx.Network([
        Flatten(),
        Dense(784, hidden, activation="relu"),
        Dense(hidden, 784, activation="sigmoid"),
        Reshape((1, 28, 28)),
    ], input_shape=(1, 28, 28))


def hidden_for(num_params):
    """The hidden width giving a 784 -> h -> 784 network about ``num_params`` parameters."""
    # 784 h + h (encoder) + h 784 + 784 (decoder) = 1569 h + 784
    return max(1, round((num_params - 784) / 1569))


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked first: no point training without the picture)
    except ImportError:
        sys.exit("This example draws its result with matplotlib: pip install matplotlib")
    import matplotlib.pyplot as plt

    from cnnx import visualize

    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    try:
        (x_train, _), (x_test, _) = (datasets.load_fashion_mnist(sample=True) if args.sample
                                     else datasets.load_fashion_mnist(args.data))
    except FileNotFoundError as exc:
        sys.exit(f"{exc}\nOr run with --sample to train on the sample shipped with cnnx.")
    if args.limit:
        x_train = x_train[:args.limit]

    # Pixels in [0, 1] with a channel axis. No standardisation: the targets are pixels and the
    # Sigmoid output lives in [0, 1] as they do.
    x_train = preprocessing.add_channel_axis(preprocessing.scale(x_train))
    x_test = preprocessing.add_channel_axis(preprocessing.scale(x_test))
    rng = np.random.default_rng(args.seed)
    noisy_test = add_noise(x_test, args.noise, rng)
    print(f"{len(x_train)} training, {len(x_test)} test images")

    cnnx.manual_seed(args.seed)
    conv = conv_autoencoder()
    dense = dense_autoencoder(hidden_for(conv.num_params))
    conv.summary()
    nets = {"conv": conv, "dense": dense}
    for net in nets.values():
        net.compile(cnnx.losses.MSE(), cnnx.optimizers.Adam(lr=args.lr))

    seconds = dict.fromkeys(nets, 0.0)
    for epoch in range(args.epochs):
        noisy_train = add_noise(x_train, args.noise, rng)  # the same noisy images for both
        line = f"epoch {epoch + 1}/{args.epochs}:"
        for name, net in nets.items():
            start = time.perf_counter()
            # The targets are the clean images (regression): y has the output's shape (n, 1, 28, 28).
            net.fit(noisy_train, x_train, epochs=1, batch_size=args.batch_size,
                    seed=args.seed + epoch, verbose=0)
            seconds[name] += time.perf_counter() - start
            line += f"  {name} train MSE {net.history['loss'][-1]:.4f}, test MSE " \
                    f"{mse(net.predict(noisy_test), x_test):.4f}"
        print(line, flush=True)

    outputs = {name: net.predict(noisy_test) for name, net in nets.items()}
    print(f"test MSE to the clean images (noise sigma {args.noise}, {args.epochs} epochs, "
          f"{len(x_train)} training images):")
    print(f"  {'noisy input':<40} {mse(noisy_test, x_test):.4f}")
    for name, net in nets.items():
        label = f"{name} autoencoder, {net.num_params:,} parameters"
        per_epoch = seconds[name] / max(args.epochs, 1)
        print(f"  {label:<40} {mse(outputs[name], x_test):.4f}  ({per_epoch:.1f} s per epoch)")

    args.out.mkdir(parents=True, exist_ok=True)
    fig = visualize.plot_reconstructions(
        noisy_test[:10], outputs["conv"][:10], x_test[:10], path=args.out / "denoising.png", max_images=10,
        title=f"Convolutional denoising autoencoder (noise sigma {args.noise})", labels=ROW_LABELS)
    plt.close(fig)
    cnnx.save(conv, args.out / "model")
    print(f"wrote {args.out / 'denoising.png'}, saved the convolutional network in {args.out / 'model'}")


if __name__ == "__main__":
    main()
