"""Where the time goes: per-layer forward / backward times of every benchmark workload.

Usage::

    python benchmarks/profile_layers.py [--workloads seed-mnist lenet5 seed-cifar mind-cifar]
                                        [--steps 10] [--warmup 2] [--threads T] [--infer]
                                        [--json benchmarks/results/profile.json]

Runs ``cnnx.profiler.profile`` on each zoo network at its benchmarks/README.md batch size, with its
optimizer and softmax cross-entropy, on random inputs, and prints the table: each layer's mean
forward and backward ms per step, its share of the whole step, its forward MFLOP per batch and the
GFLOP/s it achieves; then the loss, the optimizer update and the Python left between the timed
calls. ``--infer`` adds the eval-mode forward (inference) table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Only this folder (for workloads.py): cnnx is the installed package, never the source tree above.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


def main(argv=None):
    import cnnx  # before NumPy: OpenBLAS then loads with sleeping idle threads (cnnx/__init__.py)
    import numpy as np
    from cnnx.profiler import profile
    from workloads import WORKLOADS, canonical, cnnx_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: cnnx's (all cores)")
    parser.add_argument("--infer", action="store_true", help="also profile eval-mode forwards")
    parser.add_argument("--json", default=None, help="also write the rows and totals here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        cnnx.parallel.set_num_threads(args.threads)
    print(f"cnnx {cnnx.__version__}, {cnnx.parallel.get_num_threads()} threads")
    results = {}
    for name in map(canonical, args.workloads):
        spec = WORKLOADS[name]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((spec["batch"],) + spec["input"], dtype=np.float32)
        y = rng.integers(0, 10, size=spec["batch"])
        net = cnnx_model(name)
        print(f"\n== {name} ({net.num_params:,} parameters, {type(net.optimizer).__name__}) ==")
        train = profile(net, x, y, steps=args.steps, warmup=args.warmup)
        print(train.text)
        results[name] = {"train": {"rows": train.rows, "totals": train.totals}}
        if args.infer:
            infer = profile(net, x, steps=args.steps, warmup=args.warmup, training=False)
            print()
            print(infer.text)
            results[name]["infer"] = {"rows": infer.rows, "totals": infer.totals}
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=list))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
