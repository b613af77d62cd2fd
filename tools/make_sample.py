"""Write cnnx/data/fashion_mnist_sample.npz: a class-stratified sample of real Fashion-MNIST.

The sample lets examples, docs and tests run on real images without the full dataset. It is
built from the IDX files of the Debian package ``dataset-fashion-mnist`` (or any directory
holding the four standard files) and kept under ~3 MB so it can ship inside the wheel.

Usage::

    python tools/make_sample.py [--source DIR] [--out FILE] [--train-per-class 600]
                                [--test-per-class 100] [--seed 0]

The same source files and seed always give the same sample.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing cnnx

from cnnx.datasets import FASHION_MNIST_SYSTEM_DIR, SAMPLE_FILE, load_fashion_mnist  # noqa: E402

MAX_BYTES = 3 * 1024 * 1024


def stratified_indices(labels, per_class, rng):
    """Indices of ``per_class`` examples of each class, in the source file's order.

    Parameters
    ----------
    labels : ndarray of shape (n,)
    per_class : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of shape (n_classes * per_class,)
    """
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if members.size < per_class:
            raise ValueError(f"Expected at least {per_class} examples of class {c}, "
                             f"received: {members.size}")
        picked.append(rng.choice(members, size=per_class, replace=False))
    # Sorting keeps the source order, which Fashion-MNIST already shuffled across classes.
    return np.sort(np.concatenate(picked))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=FASHION_MNIST_SYSTEM_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "cnnx" / "data" / SAMPLE_FILE)
    parser.add_argument("--train-per-class", type=int, default=600)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(args.source)
    rng = np.random.default_rng(args.seed)
    tr = stratified_indices(y_train, args.train_per_class, rng)
    te = stratified_indices(y_test, args.test_per_class, rng)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Labels as uint8 to save space; the loader widens them to int64.
    np.savez_compressed(
        args.out,
        x_train=x_train[tr], y_train=y_train[tr].astype(np.uint8),
        x_test=x_test[te], y_test=y_test[te].astype(np.uint8),
        train_index=tr.astype(np.int32), test_index=te.astype(np.int32),
    )
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {tr.size} train + {te.size} test images, {size / 1e6:.2f} MB")
    if size > MAX_BYTES:
        print(f"error: {size} bytes exceeds the {MAX_BYTES}-byte budget; use fewer per class",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
