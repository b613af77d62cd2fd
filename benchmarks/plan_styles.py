"""What the execution plan buys for networks written with separate activation layers.

Three forms of each zoo network, with the same weights, measured in one process, alternating
(round-robin, several rounds, median reported), through ``fit`` and ``predict``:

- ``layers``: activations as separate layers (``ReLU()``, ``LeakyReLU(0.01)``), the plan's
  fusions switched off (``net.fuse = False``): every layer runs on its own, as before the plan;
- ``layers+plan``: the same network with the plan fusing (the default);
- ``activation=``: the zoo's form, activations passed to Conv2D / Dense.

Usage::

    python benchmarks/plan_styles.py [--workloads seed-mnist lenet5] [--rounds 5] [--threads N]

Prints images/s per form (wall clock) and the ratios ``layers+plan / layers`` and
``layers+plan / activation=``, with the CPU model and its SIMD flags; also the same ratios in CPU
time per image (all threads), which a machine shared with other jobs disturbs less.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the source tree (built in place), when run from a clone

import cnnx  # noqa: E402
from workloads import WORKLOADS  # noqa: E402


def cpu_description():
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "amx_tile") if f in flags]
    return f"{model} ({', '.join(simd) or 'no avx2'}), {cnnx.parallel.get_num_threads()} threads"


def build_forms(name):
    forms = {"layers": cnnx.models.build(name, seed=0, fused=False)}
    forms["layers"].fuse = False
    forms["layers+plan"] = cnnx.models.build(name, seed=0, fused=False)
    forms["activation="] = cnnx.models.build(name, seed=0)
    for net in forms.values():
        net.compile("softmax_cross_entropy", cnnx.optimizers.Adam(lr=1e-3))
    return forms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["seed-mnist"], choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
    print(f"cnnx {cnnx.__version__} on {cpu_description()}")
    rng = np.random.default_rng(0)
    for name in args.workloads:
        spec = WORKLOADS[name]
        batch = spec["batch"]
        n = batch * args.train_batches
        x = rng.standard_normal((n,) + spec["input"]).astype(np.float32)
        y = rng.integers(0, 10, n)
        forms = build_forms(name)
        print(forms["layers+plan"].plan.describe())
        timings = {form: {"train": [], "infer": []} for form in forms}
        cpu = {form: {"train": [], "infer": []} for form in forms}
        for net in forms.values():  # warm-up: buffers allocated, pages touched
            net.fit(x[:batch], y[:batch], epochs=1, batch_size=batch, shuffle=False, verbose=0)
            net.predict(x[:batch], batch_size=batch)
        for _ in range(args.rounds):
            for form, net in forms.items():
                t0, c0 = time.perf_counter(), time.process_time()
                net.fit(x, y, epochs=1, batch_size=batch, shuffle=False, verbose=0)
                t1, c1 = time.perf_counter(), time.process_time()
                net.predict(x, batch_size=batch)
                t2, c2 = time.perf_counter(), time.process_time()
                timings[form]["train"].append(n / (t1 - t0))
                timings[form]["infer"].append(n / (t2 - t1))
                # images per CPU-second, so that a ratio reads the same way as the wall-clock one
                cpu[form]["train"].append(n / (c1 - c0))
                cpu[form]["infer"].append(n / (c2 - c1))
        med = {form: {mode: statistics.median(v) for mode, v in t.items()} for form, t in timings.items()}
        med_cpu = {form: {mode: statistics.median(v) for mode, v in t.items()} for form, t in cpu.items()}
        print(f"\n{name}: batch {batch}, {args.rounds} rounds of {args.train_batches} fit steps + predict of {n}")
        print(f"{'form':<14}{'train img/s':>14}{'infer img/s':>14}")
        for form, m in med.items():
            print(f"{form:<14}{m['train']:>14,.0f}{m['infer']:>14,.0f}")
        for label, m in (("wall", med), ("cpu time", med_cpu)):
            for other in ("layers", "activation="):
                print(f"{label:<9} layers+plan / {other:<12} train {m['layers+plan']['train'] / m[other]['train']:.2f}x"
                      f"   infer {m['layers+plan']['infer'] / m[other]['infer']:.2f}x")


if __name__ == "__main__":
    main()
