"""Write tests/data/compat_v1/ and tests/data/compat_v1_expected.npz: a save in format version 1.

The checked-in save pins the on-disk format: tests/test_io.py loads it with the current cnnx and
checks that its predictions still equal the ones recorded when it was written. Rerun this script
only when a new format version is introduced (as compat_v2, keeping the old directory).

The network is tiny (a conv, a pool, a dense) and trained for one epoch on seeded random data, so
the optimizer has state to save; the whole directory stays far below 100 KB.

Usage::

    python tools/make_compat_model.py [--out-dir tests/data]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing cnnx

import cnnx  # noqa: E402
from cnnx.io import FORMAT_VERSION  # noqa: E402
from cnnx.layers import Conv2D, Dense, Flatten, MaxPool2D  # noqa: E402
from cnnx.network import Network  # noqa: E402

MAX_BYTES = 100 * 1024


def build_and_train(seed=0):
    """The seeded network, trained one epoch on seeded random data; returns ``(net, x_test)``."""
    cnnx.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Network(
        [Conv2D(1, 4, 3, padding="same", activation="relu"), MaxPool2D(2), Flatten(), Dense(4 * 4 * 4, 3)],
        input_shape=(1, 8, 8),
    )
    net.compile(cnnx.losses.SoftmaxCrossEntropy(), cnnx.optimizers.Adam(lr=1e-2))
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=32)
    net.fit(x, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    x_test = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    return net, x_test


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "tests" / "data")
    args = parser.parse_args(argv)

    net, x_test = build_and_train()
    target = args.out_dir / f"compat_v{FORMAT_VERSION}"
    net.save(target)
    expected = args.out_dir / f"compat_v{FORMAT_VERSION}_expected.npz"
    np.savez(expected, x=x_test, predictions=net.predict(x_test))

    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) + expected.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"compat data is {size} bytes, over the {MAX_BYTES}-byte budget")
    print(f"wrote {target} and {expected} ({size} bytes)")


if __name__ == "__main__":
    main()
