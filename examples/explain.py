"""Train LeNet-5 on Fashion-MNIST, then look at what it learned and why it decides.

Writes into ``--out`` (default ``runs/explain``):

- ``history.png``, ``confusion_matrix.png``: how training went and which classes get mixed up;
- ``filters.png``: the first convolution's 5x5 kernels;
- ``feature_maps_conv1.png``, ``feature_maps_conv2.png``: what the two convolutions respond to;
- ``occlusion_<i>_<class>.png``: how much hiding each 4x4 patch lowers the true class's probability;
- ``saliency_<i>_<class>.png``: |d logit / d pixel|, the pixels the decision is most sensitive to.

Run from the repository root::

    python examples/explain.py                 # full Fashion-MNIST if found, else the bundled sample
    python examples/explain.py --sample --epochs 1 --out /tmp/explain
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import cnnx
from cnnx import datasets, models, preprocessing, visualize

# Classes we explain: footwear (where the shape is the clue) and the classes it is hardest to tell
# a shirt from, so the maps can be compared between easy and confusable cases.
EXPLAIN_CLASSES = ("Sneaker", "Ankle boot", "Sandal", "Shirt", "T-shirt/top", "Trouser", "Bag")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/explain"), help="folder for the PNGs")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--sample", action="store_true", help="use the 7000-image sample shipped with cnnx")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the shuffling")
    return parser.parse_args(argv)


def load_data(sample):
    """Fashion-MNIST as (n, 1, 28, 28) float32 in [0, 1]; the bundled sample when the full set is absent."""
    if not sample:
        try:
            return datasets.load_fashion_mnist(), "Fashion-MNIST"
        except FileNotFoundError as exc:
            print(f"{exc}\nFalling back to the bundled sample.", file=sys.stderr)
    return datasets.load_fashion_mnist(sample=True), "Fashion-MNIST sample"


def main(argv=None):
    args = parse_args(argv)
    import matplotlib.pyplot as plt  # after the argument check; cnnx.visualize picks Agg when headless

    ((x_train, y_train), (x_test, y_test)), source = load_data(args.sample)
    x_train = preprocessing.scale(x_train)[:, None]
    x_test = preprocessing.scale(x_test)[:, None]
    (x_train, y_train), (x_val, y_val) = preprocessing.train_val_split(x_train, y_train, 0.1, seed=args.seed)
    standardizer = preprocessing.Standardizer()
    x_train = standardizer.fit_transform(x_train)
    x_val, x_test = standardizer.transform(x_val), standardizer.transform(x_test)
    # A black pixel after standardisation: occluding with it erases part of the garment, where the
    # dataset mean (0.0) would paint a grey patch onto the black background.
    black = float(standardizer.transform(np.zeros((1, 1, 1, 1), dtype=np.float32)).ravel()[0])
    names = datasets.FASHION_MNIST_CLASSES
    print(f"{source}: {len(x_train)} training, {len(x_val)} validation, {len(x_test)} test images")

    net = models.lenet5(seed=args.seed)
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), models.default_optimizer("lenet5"))
    net.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
            validation_data=(x_val, y_val), seed=args.seed)
    result = net.evaluate(x_test, y_test)
    print(f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pred = net.predict_classes(x_test)
    cm = visualize.confusion_matrix(y_test, pred, n_classes=10)
    figures = {
        "history.png": visualize.plot_history(net.history, title=f"LeNet-5 on {source}"),
        "confusion_matrix.png": visualize.plot_confusion_matrix(
            cm, names, normalize=True, title=f"Test confusion matrix, accuracy {result['accuracy']:.3f}"),
        "filters.png": visualize.plot_filters(net, layer=0),
    }
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)

    # The first test image of each chosen class, so every run explains the same images.
    ids = [int(np.flatnonzero(y_test == names.index(c))[0]) for c in EXPLAIN_CLASSES]
    images, labels = x_test[ids], y_test[ids]
    probs = net.predict(images)
    titles = [f"{names[t]} ({probs[k, t]:.2f})" for k, t in enumerate(labels)]
    for layer, fname in ((0, "feature_maps_conv1.png"), (2, "feature_maps_conv2.png")):
        fig = visualize.plot_feature_maps(net, images, layer, max_maps=16, titles=titles, path=out / fname)
        plt.close(fig)

    patch, stride = 4, 2
    heat = visualize.occlusion_map(net, images, labels, patch=patch, stride=stride, fill=black)
    saliency = visualize.saliency_map(net, images, labels)
    for k, (image, label) in enumerate(zip(images, labels)):
        predicted = int(probs[k].argmax())
        what = f"true {names[label]} (p={probs[k, label]:.2f}), predicted {names[predicted]}"
        slug = names[label].lower().replace("/", "-").replace(" ", "-")
        fig = visualize.plot_occlusion(image, heat[k], patch=patch, stride=stride,
                                       title=f"Occlusion ({patch}x{patch} black patch): {what}",
                                       path=out / f"occlusion_{k}_{slug}.png")
        plt.close(fig)
        fig = visualize.plot_saliency(image, saliency[k], title=f"Saliency |d logit / d pixel|: {what}",
                                      path=out / f"saliency_{k}_{slug}.png")
        plt.close(fig)
    print(f"wrote {len(list(out.glob('*.png')))} PNGs to {out}")


if __name__ == "__main__":
    main()
