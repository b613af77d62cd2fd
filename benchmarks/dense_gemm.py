"""cnnx's packed GEMM against np.matmul for the Dense layers of the benchmark workloads.

Every Dense layer of seed-mnist, lenet5, seed-cifar and mind-cifar (random float32 data, at the
workload's batch size and at ``Network.predict``'s default of 256) runs, as the networks run it
(inside ``parallel.single_threaded_blas()``, the Network's BLAS setting):

- ``fwd``: ``functional.linear`` with the layer's activation (``x @ W.T + b``, then the (leaky)
  ReLU): ``_ops.dense_gemm`` with bias and activation in the tile stores, against np.matmul by
  row blocks (``parallel.matmul``) + bias + activation pass;
- ``bwd``: ``functional.linear_backward`` (``dW = dz.T @ x``, ``dx = dz @ W``, ``db``):
  ``_ops.gemm`` with its own threads against np.matmul by row blocks.

``--networks``: whole user-style networks (separate activation layers, ``workloads.cnnx_model(name,
fused=False)``) through ``fit`` and ``predict`` over 8 batches per call, instead of single layers,
with the dense rules (``PACKED_DENSE_GEMM = None``) against every Dense GEMM on np.matmul (False)
and against main's rule before ``_ops.dense_gemm`` (commit d0ba7b0: forward on np.matmul, the
backward's row blocks on ``_ops.gemm`` against narrower BLAS kernels); the minor page faults per
call are printed beside the times.

Each case alternates the two paths (``functional.PACKED_DENSE_GEMM`` False / True) for
``--rounds`` rounds, takes the best time of each per round, and prints both times and the median
of the per-round ratios BLAS time / cnnx time (above 1: cnnx's GEMM is faster). Run it with the
environment's OpenBLAS kernels and with ``env -u OPENBLAS_CORETYPE``: the BLAS path depends on
them, cnnx's does not.

    PYTHONPATH=$PWD python benchmarks/dense_gemm.py --threads 1 2 --rounds 5
    PYTHONPATH=$PWD python benchmarks/dense_gemm.py --networks --threads 1 --clock cpu
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def dense_layers(name, batch):
    """(label, n, in_features, out_features, activation) of each Dense layer of workload ``name``."""
    from workloads import spec_input_shapes

    layers, features = [], None
    for op, (c, h, w) in spec_input_shapes(name):
        if op[0] == "flat":
            features = c * h * w
        elif op[0] == "dense":
            _, out, act = op
            act = {"lrelu": "leaky_relu", "relu": "relu", None: None}[act]
            layers.append((f"{name} dense{len(layers) + 1}", batch, features, out, act))
            features = out
    return layers


#: The clock of ``best_time``: wall time, or the process's CPU time (``--clock cpu``: on a machine
#: shared with other work, a one-thread call's CPU time does not count the time it waited).
CLOCK = time.perf_counter


def best_time(fn, min_seconds=0.1):
    """Best of the calls made in ``min_seconds`` (at least 5)."""
    best, spent, calls = float("inf"), 0.0, 0
    while spent < min_seconds or calls < 5:
        start = CLOCK()
        fn()
        took = CLOCK() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def measure(layer, form, threads, rounds, rng):
    import numpy as np
    import cnnx
    import cnnx.functional as F

    _, n, d_in, d_out, act = layer
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    b = rng.standard_normal(d_out).astype(np.float32)
    dz = rng.standard_normal((n, d_out)).astype(np.float32)
    dw, db = np.empty_like(w), np.empty_like(b)
    slope = 0.01 if act == "leaky_relu" else 0.0
    if form == "fwd":
        def call():
            F.linear(x, w, b, act, slope)
    else:
        def call():
            F.linear_backward(dz, x, w, dw, db)
    times = {False: [], True: []}
    with cnnx.parallel.num_threads(threads), cnnx.parallel.single_threaded_blas():
        for _ in range(rounds):
            for packed in (False, True):
                F.PACKED_DENSE_GEMM = packed
                times[packed].append(best_time(call))
    F.PACKED_DENSE_GEMM = None
    ratio = statistics.median(o / p for o, p in zip(times[False], times[True]))
    return min(times[False]), min(times[True]), ratio


def main_rule_linear_backward(dz, x, weight, dweight, dbias=None, need_dx=True):
    """``linear_backward`` as main had it before ``_ops.dense_gemm`` (commit d0ba7b0): np.matmul by
    row blocks, each block on ``_ops.gemm`` (one thread) when NumPy's BLAS runs narrower kernels
    than cnnx's build and out_features >= 16."""
    import numpy as np
    import cnnx.functional as F
    from cnnx import _simd, parallel

    def packed(a, b, out):
        F._ops.gemm(a, b, out, 1)

    product = packed if (weight.dtype == np.float32 and weight.shape[0] >= 16
                         and _simd.blas_narrower_than_kernels()) else parallel.blas_product
    parallel.matmul(dz.T, x, dweight, product)
    if dbias is not None:
        np.sum(dz, axis=0, out=dbias)
    if not need_dx:
        return None
    return parallel.matmul(dz, weight, np.empty((dz.shape[0], weight.shape[1]), dtype=weight.dtype), product)


def measure_network(name, mode, threads, rounds):
    """(best s per call all-BLAS, best s per call with the rule, median ratio, faults per call of
    each) of ``fit`` / ``predict`` over 8 batches of workload ``name``."""
    import resource

    import numpy as np
    import cnnx
    import cnnx.functional as F
    from workloads import WORKLOADS, cnnx_model, user_step

    batch = WORKLOADS[name]["batch"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8 * batch,) + WORKLOADS[name]["input"]).astype(np.float32)
    y = rng.integers(0, 10, size=8 * batch)
    net = cnnx_model(name, fused=False)
    call = user_step(net, x, y, batch, mode)
    paths = ("blas", "main", "rule")
    times = {path: [] for path in paths}
    faults = {path: [] for path in paths}
    new_backward = F.linear_backward
    with cnnx.parallel.num_threads(threads):
        for _ in range(rounds):
            for path in paths:
                F.PACKED_DENSE_GEMM = None if path == "rule" else False
                F.linear_backward = main_rule_linear_backward if path == "main" else new_backward
                call()  # warm: the plan's buffers for this path
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = CLOCK()
                times[path].append(best_time(call, 0.3))
                calls = max(1, round((CLOCK() - start) / times[path][-1]))
                faults[path].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls)
    F.PACKED_DENSE_GEMM, F.linear_backward = None, new_backward
    return ({path: min(times[path]) for path in paths},
            {path: statistics.median(o / p for o, p in zip(times[path], times["rule"])) for path in paths},
            {path: statistics.median(faults[path]) for path in paths})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["seed-mnist", "lenet5", "seed-cifar", "mind-cifar"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forms", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    parser.add_argument("--networks", action="store_true", help="whole networks through fit / predict")
    parser.add_argument("--predict-batch", type=int, default=256,
                        help="also measure at this batch (Network.predict's default); 0: only the workload's")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the process's CPU time (for one thread on a shared machine)")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import numpy as np
    import cnnx
    from workloads import WORKLOADS

    rng = np.random.default_rng(0)
    print(f"kernels {cnnx._simd.ISA}, NumPy BLAS kernels {cnnx._simd.blas_isa()}, CPU {cnnx._simd.cpu_model()}")
    if args.networks:
        print("| workload | mode | threads | ms / call: all BLAS, main's rule, new rule | all BLAS / new | main / new "
              "| page faults / call (BLAS, main, new) |")
        print("|---|---|---|---|---|---|---|")
        for name in args.workloads:
            for mode in ("train", "infer"):
                for threads in args.threads:
                    best, ratio, faults = measure_network(name, mode, threads, args.rounds)
                    print(f"| {name} | {mode} | {threads} | {best['blas'] * 1e3:.2f}, {best['main'] * 1e3:.2f}, "
                          f"{best['rule'] * 1e3:.2f} | {ratio['blas']:.2f} | {ratio['main']:.2f} | "
                          f"{faults['blas']:.0f}, {faults['main']:.0f}, {faults['rule']:.0f} |", flush=True)
        return
    print("| layer (n, in, out) | form | threads | BLAS ms | cnnx ms | BLAS / cnnx |")
    print("|---|---|---|---|---|---|")
    for name in args.workloads:
        batches = [WORKLOADS[name]["batch"]]
        if args.predict_batch and args.predict_batch not in batches:
            batches.append(args.predict_batch)
        for batch in batches:
            for layer in dense_layers(name, batch):
                for form in args.forms:
                    for threads in args.threads:
                        old, new, ratio = measure(layer, form, threads, args.rounds, rng)
                        label, n, d_in, d_out, _ = layer
                        print(f"| {label} ({n}, {d_in}, {d_out}) | {form} | {threads} | {old * 1e3:.3f} | "
                              f"{new * 1e3:.3f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
