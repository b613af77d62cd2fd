"""Convolution algorithm by shape: im2col + GEMM against Winograd F(2x2, 3x3), side by side.

Usage::

    python benchmarks/conv_algorithms.py [--repeat 10] [--rounds 3] [--isa avx512]

Times ``cnnx.functional.conv2d`` (forward with the fused ReLU, as the layers call it) on the
3x3 / stride-1 convolutions of the workloads and a few more channel counts, with each algorithm,
alternating A B A B over ``--rounds``; prints the best time of each and the ratio
im2col / winograd (> 1: Winograd is faster). This is how ``WINOGRAD_MIN_CHANNELS`` was chosen.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

# (name, x shape, output channels); all 3x3, stride 1, padding 1
SHAPES = [
    ("mind-cifar conv1 c3", (128, 3, 32, 32), 32),
    ("c8 32x32", (128, 8, 32, 32), 32),
    ("c16 32x32", (128, 16, 32, 32), 32),
    ("mind-cifar conv2 c32", (128, 32, 32, 32), 64),
    ("mind-cifar conv3 c64", (128, 64, 16, 16), 128),
    ("c128 8x8", (128, 128, 8, 8), 128),
]


def best_ms(fn, repeat):
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isa", default=None)
    args = parser.parse_args(argv)
    if args.isa:
        os.environ["CNNX_ISA"] = args.isa
    import numpy as np

    import cnnx
    import cnnx.functional as F

    rng = np.random.default_rng(0)
    c = cnnx._simd.config()
    print(f"{c['cpu']}, kernels {c['kernels']}, {c['threads']} threads")
    print("| convolution (3x3, stride 1, pad 1) | im2col ms | winograd ms | im2col / winograd |")
    print("|---|---|---|---|")
    with cnnx.parallel.single_threaded_blas():
        for name, xs, oc in SHAPES:
            x = rng.standard_normal(xs, dtype=np.float32)
            w = rng.standard_normal((oc, xs[1], 3, 3), dtype=np.float32)
            b = rng.standard_normal(oc, dtype=np.float32)
            ws = F.Workspace()
            y = F.conv2d(x, w, b, padding=1, activation="relu")
            best = {}
            for _ in range(args.rounds):
                for algo, limit in (("im2col", None), ("winograd", 1)):
                    F.WINOGRAD_MIN_CHANNELS = limit
                    t = best_ms(lambda: F.conv2d(x, w, b, padding=1, activation="relu", out=y, workspace=ws),
                                args.repeat)
                    best[algo] = min(best.get(algo, float("inf")), t)
            print(f"| {name} | {best['im2col']:.3f} | {best['winograd']:.3f} | "
                  f"{best['im2col'] / best['winograd']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
