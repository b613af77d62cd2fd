"""cnnx's packed convolution GEMM against im2col + np.matmul, per conv layer of the benchmark workloads.

Every convolution layer of seed-mnist, lenet5, seed-cifar and mind-cifar (at the batch sizes of
benchmarks/README.md, random float32 data) runs its forward as the networks run it: conv + bias +
activation (``conv2d``), or, where a 2x2 max-pool follows, the inference form
(``conv2d(max_pool_2x2=True)``) and the training form (``conv2d_max_pool_2x2_train``); its backward
as training runs it (``bwd``: both GEMMs, and col2im except for a first layer) and the weight
gradient alone (``dw``: ``conv2d_backward(need_dx=False)``, implicit-im2col against im2col +
np.matmul). Each case
alternates the two paths (``functional.PACKED_CONV_GEMM`` False / True) for ``--rounds`` rounds,
takes the best time of each path per round, and prints GFLOP/s of both and the median of the
per-round ratios new / old (above 1: the packed GEMM is faster). Run it once with the
environment's OpenBLAS kernels and once with ``env -u OPENBLAS_CORETYPE`` (or another setting):
the old path depends on them, the new one does not.

    PYTHONPATH=$PWD python benchmarks/conv_gemm.py --threads 1 --rounds 5

``--pool-store`` times the pooled inference form (``infer``) on the packed path both ways instead:
old = the packed GEMM into its ``(out_c, m, P)`` layout, then the pooling pass
(``functional.POOLED_TILE_STORE = False``), new = the pool in the GEMM's tile stores (``True``).

    PYTHONPATH=$PWD python benchmarks/conv_gemm.py --pool-store --forms infer --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def conv_layers(name, batch):
    """(label, x shape, out_c, kernel, padding, activation, pooled) of each conv layer."""
    layers = []
    ops = [op for op, _ in spec_input_shapes(name)]
    for i, (op, (c, h, w)) in enumerate(spec_input_shapes(name)):
        if op[0] == "conv":
            _, out, k, pad, act = op
            pooled = i + 1 < len(ops) and ops[i + 1][0] == "pool"
            layers.append((f"{name} conv{len(layers) + 1}", (batch, c, h, w), out, k, pad,
                           "leaky_relu" if act == "lrelu" else act, pooled))
    return layers


def best_time(fn, min_seconds=0.15):
    """Best of the calls made in ``min_seconds`` (at least 3)."""
    best, spent, calls = float("inf"), 0.0, 0
    while spent < min_seconds or calls < 3:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def main(argv=None):
    import cnnx
    import numpy as np
    from cnnx import functional as F

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--forms", nargs="+", default=["conv", "infer", "train", "bwd", "dw"],
                        help="which of conv / infer / train / bwd / dw to time")
    parser.add_argument("--pool-store", action="store_true",
                        help="old / new = pooling pass / pool in the tile stores, both on the packed GEMM")
    args = parser.parse_args(argv)
    # What a round switches between: (module attribute, old value, new value).
    switch = ("POOLED_TILE_STORE", False, True) if args.pool_store else ("PACKED_CONV_GEMM", False, True)
    cnnx.parallel.set_num_threads(args.threads)
    print(f"cnnx {cnnx.__version__}, kernels {cnnx._simd.ISA}, {args.threads} thread(s), "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"GEMM tile {cnnx._simd.ops.gemm_config()}")
    print(f"{'layer':<18} {'form':<6} {'GEMM (M, K, N/img)':<20} {'old GFLOP/s':>11} {'new GFLOP/s':>11} {'new/old':>8}")
    rng = np.random.default_rng(0)
    for name in args.workloads:
        spec = WORKLOADS[name]
        for label, shape, out, k, pad, act, pooled in conv_layers(name, spec["batch"]):
            x = rng.standard_normal(shape, dtype=np.float32)
            weight = rng.standard_normal((out, shape[1], k, k), dtype=np.float32) * 0.1
            bias = rng.standard_normal(out, dtype=np.float32)
            y = F.conv2d(x[:1], weight, bias, padding=pad)
            pixels = y.shape[2] * y.shape[3]
            flops = 2.0 * shape[0] * out * shape[1] * k * k * pixels
            forms = {"conv": lambda: F.conv2d(x, weight, bias, padding=pad, activation=act, workspace=ws)}
            if pooled:
                forms = {
                    "infer": lambda: F.conv2d(x, weight, bias, padding=pad, activation=act, workspace=ws,
                                              max_pool_2x2=True),
                    "train": lambda: F.conv2d_max_pool_2x2_train(x, weight, bias, padding=pad, activation=act,
                                                                 workspace=ws),
                }
            # The backward as training runs it (no input gradient for a network's first layer).
            y_full = F.conv2d(x, weight, bias, padding=pad, activation=act)
            dy = rng.standard_normal(y_full.shape, dtype=np.float32)
            need_dx = not label.endswith("conv1")
            forms["bwd"] = lambda: F.conv2d_backward(dy, x, weight, padding=pad, need_dx=need_dx, workspace=ws,
                                                     activation=act, y=y_full)
            # The weight gradient alone (with the layout pass and the bias gradient): implicit-im2col
            # ``conv_weight_grad`` against im2col + np.matmul.
            forms["dw"] = lambda: F.conv2d_backward(dy, x, weight, padding=pad, need_dx=False, workspace=ws,
                                                    activation=act, y=y_full)
            for form, fn in forms.items():
                if form not in args.forms:
                    continue
                ws = F.Workspace()
                times = {False: [], True: []}
                attribute, old_value, new_value = switch
                saved = getattr(F, attribute)
                for _ in range(args.rounds):
                    for new in (False, True):
                        setattr(F, attribute, new_value if new else old_value)
                        times[new].append(best_time(fn))
                setattr(F, attribute, saved)
                ratio = statistics.median(o / n for o, n in zip(times[False], times[True]))
                gemm = f"({out}, {shape[1] * k * k}, {pixels})"
                print(f"{label:<18} {form:<6} {gemm:<20} {flops / min(times[False]) / 1e9:>11.1f} "
                      f"{flops / min(times[True]) / 1e9:>11.1f} {ratio:>8.2f}", flush=True)
    return 0


from workloads import WORKLOADS, spec_input_shapes  # noqa: E402  (after the path set-up above)

if __name__ == "__main__":
    sys.exit(main())
