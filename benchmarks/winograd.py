"""Winograd F(2x2, 3x3) against cnnx's packed GEMM, per 3x3 conv layer and for whole networks.

Per layer (default): every 3x3 stride-1 conv layer of the chosen workloads (mind-cifar by default:
conv1 3 -> 32 at 32x32, conv2 32 -> 64 at 32x32 and conv3 64 -> 128 at 16x16, batch 128, random
float32 data) runs its forward as the networks run it: ``conv`` (conv2d + bias + activation), or,
where a 2x2 max-pool follows, ``infer`` (``conv2d(max_pool_2x2=True)``) and ``train``
(``conv2d_max_pool_2x2_train``, with the argmax); and ``bwd``, its backward
(``conv2d_backward``: Winograd computes dx and dW, db is unchanged). Each case alternates the two
paths (``functional.WINOGRAD`` False / True) for ``--rounds`` rounds, takes the best time of each per
round, and prints GFLOP/s of both (direct-convolution FLOPs: Winograd's are "effective") and the
median of the per-round ratios old / new (above 1: Winograd is faster).

    PYTHONPATH=$PWD python benchmarks/winograd.py --threads 1 --rounds 5

``--network`` times the whole network instead, written as users write it (separate activation
layers, as benchmarks/run.py's default style): ``predict`` over --batches batches and ``fit`` for
one epoch of --batches batches, in the same process, alternating WINOGRAD False / True per round.

    PYTHONPATH=$PWD python benchmarks/winograd.py --network --threads 2 --rounds 5

``--sweep`` times the grid behind ``functional.winograd_conv``'s channel threshold (forward and
backward of 3x3 'same' layers with 3-64 channels at 32x32, 16x16, 8x8, batch 64).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conv_gemm import best_time  # noqa: E402  (this folder's sibling script)


def conv3x3_layers(name, batch):
    """(label, x shape, out_c, padding, activation, pooled) of each 3x3 conv layer of ``name``."""
    from conv_gemm import conv_layers

    return [(label, shape, out, pad, act, pooled)
            for label, shape, out, k, pad, act, pooled in conv_layers(name, batch) if k == 3]


def alternate(fn, rounds, min_seconds=0.2):
    """Best time of ``fn`` with WINOGRAD False and True in each of ``rounds`` rounds:
    ``{False: [...], True: [...]}``."""
    from cnnx import functional as F

    times = {False: [], True: []}
    saved = F.WINOGRAD
    try:
        for _ in range(rounds):
            for new in (False, True):
                F.WINOGRAD = new
                times[new].append(best_time(fn, min_seconds))
    finally:
        F.WINOGRAD = saved
    return times


def per_layer(args):
    """Each 3x3 layer's forms, old (GEMM) against new (Winograd)."""
    import numpy as np
    from cnnx import functional as F

    print(f"{'layer':<16} {'form':<6} {'old GFLOP/s':>11} {'new GFLOP/s':>11} {'old ms':>8} {'new ms':>8} "
          f"{'old/new':>8}")
    rng = np.random.default_rng(0)
    for name in args.workloads:
        for label, shape, out, pad, act, pooled in conv3x3_layers(name, args.batch or WORKLOADS[name]["batch"]):
            x = rng.standard_normal(shape, dtype=np.float32)
            weight = rng.standard_normal((out, shape[1], 3, 3), dtype=np.float32) * 0.1
            bias = rng.standard_normal(out, dtype=np.float32)
            ws = F.Workspace()
            pixels = F.conv2d(x[:1], weight, bias, padding=pad).shape[2:]
            forward_flops = 2.0 * shape[0] * out * shape[1] * 9 * pixels[0] * pixels[1]
            forms = {"conv": lambda: F.conv2d(x, weight, bias, padding=pad, activation=act, workspace=ws)}
            if pooled:
                forms["infer"] = lambda: F.conv2d(x, weight, bias, padding=pad, activation=act, workspace=ws,
                                                  max_pool_2x2=True)
                forms["train"] = lambda: F.conv2d_max_pool_2x2_train(x, weight, bias, padding=pad, activation=act,
                                                                     workspace=ws)
            # The backward as training runs it: input, weight and bias gradients through the
            # activation (Winograd computes dx and dW where the rules say so, here forced).
            y_full = F.conv2d(x, weight, bias, padding=pad, activation=act)
            dy = rng.standard_normal(y_full.shape, dtype=np.float32)
            forms["bwd"] = lambda: F.conv2d_backward(dy, x, weight, padding=pad, workspace=ws, activation=act,
                                                     y=y_full)
            for form, fn in forms.items():
                if form not in args.forms:
                    continue
                flops = forward_flops * (2 if form == "bwd" else 1)  # bwd: dx and dW, each a forward's
                times = alternate(fn, args.rounds)
                ratio = statistics.median(o / n for o, n in zip(times[False], times[True]))
                old, new = min(times[False]), min(times[True])
                print(f"{label:<16} {form:<6} {flops / old / 1e9:>11.1f} {flops / new / 1e9:>11.1f} "
                      f"{old * 1e3:>8.2f} {new * 1e3:>8.2f} {ratio:>8.2f}", flush=True)


def sweep(args):
    """The rules' grid: forward (conv, relu), backward (dx and dW) and the weight gradient alone
    (``need_dx=False``) of 3x3 'same' layers with few channels, batch 64, both paths forced, ratio
    old / new per (c, out_c, size)."""
    import numpy as np
    from cnnx import functional as F

    print(f"{'c':>4} {'out_c':>5} {'size':>5} {'fwd old/new':>11} {'bwd old/new':>11} {'dW old/new':>11}")
    rng = np.random.default_rng(0)
    for size in (32, 16, 8):
        for c, oc in ((3, 32), (8, 16), (8, 32), (16, 16), (16, 32), (32, 16), (32, 32), (64, 8)):
            x = rng.standard_normal((64, c, size, size), dtype=np.float32)
            weight = rng.standard_normal((oc, c, 3, 3), dtype=np.float32) * 0.1
            bias = rng.standard_normal(oc, dtype=np.float32)
            ws = F.Workspace()
            y = F.conv2d(x, weight, bias, padding=1, activation="relu")
            dy = rng.standard_normal(y.shape, dtype=np.float32)
            ratios = []
            for fn in (lambda: F.conv2d(x, weight, bias, padding=1, activation="relu", workspace=ws),
                       lambda: F.conv2d_backward(dy, x, weight, padding=1, workspace=ws, activation="relu", y=y),
                       lambda: F.conv2d_backward(dy, x, weight, padding=1, workspace=ws, activation="relu", y=y,
                                                 need_dx=False)):
                times = alternate(fn, args.rounds, min_seconds=0.1)
                ratios.append(statistics.median(o / n for o, n in zip(times[False], times[True])))
            print(f"{c:>4} {oc:>5} {size:>5} {ratios[0]:>11.2f} {ratios[1]:>11.2f} {ratios[2]:>11.2f}", flush=True)


def network(args):
    """predict and one epoch of fit, user-written style (separate activation layers)."""
    import numpy as np
    from workloads import cnnx_model, user_step

    print(f"{'workload':<12} {'mode':<8} {'old ms/batch':>12} {'new ms/batch':>12} {'old/new':>8} (range)")
    for name in args.workloads:
        spec = WORKLOADS[name]
        batch = args.batch or spec["batch"]
        n = batch * args.batches
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, *spec["input"]), dtype=np.float32)
        labels = rng.integers(0, 10, n)
        net = cnnx_model(name, seed=0, fused=False)
        modes = {"predict": user_step(net, x, labels, batch, "infer"),
                 "fit": user_step(net, x, labels, batch, "train")}
        for mode, fn in modes.items():
            if mode not in args.modes:
                continue
            fn()  # warm-up: the plan and its buffers
            times = alternate(fn, args.rounds, min_seconds=0.0)
            ratios = sorted(o / w for o, w in zip(times[False], times[True]))
            print(f"{name:<12} {mode:<8} {min(times[False]) / args.batches * 1e3:>12.2f} "
                  f"{min(times[True]) / args.batches * 1e3:>12.2f} {statistics.median(ratios):>8.2f} "
                  f"({ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


def main(argv=None):
    import cnnx
    from cnnx import _simd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["mind-cifar"])
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the workload's)")
    parser.add_argument("--forms", nargs="+", default=["conv", "infer", "train", "bwd"])
    parser.add_argument("--network", action="store_true", help="time whole predict / fit instead of layers")
    parser.add_argument("--sweep", action="store_true", help="time the rule's grid of small channel counts")
    parser.add_argument("--modes", nargs="+", default=["predict", "fit"])
    parser.add_argument("--batches", type=int, default=8, help="batches per predict / fit (--network)")
    args = parser.parse_args(argv)
    cnnx.parallel.set_num_threads(args.threads)
    flags = " ".join(sorted(f for f in _simd.cpu_flags() if f in ("avx2", "avx512f", "amx_tile")))
    print(f"cnnx {cnnx.__version__}, kernels {_simd.ISA}, {args.threads} thread(s), CPU {_simd.cpu_model()} "
          f"({flags}), OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
          f"Winograd blocking {_simd.ops.winograd_config()}")
    (network if args.network else sweep if args.sweep else per_layer)(args)
    return 0


from workloads import WORKLOADS  # noqa: E402  (after the path set-up above)

if __name__ == "__main__":
    sys.exit(main())
