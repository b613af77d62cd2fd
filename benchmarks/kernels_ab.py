"""Compiled kernels of two cnnx builds side by side (A/B), for changes to ``cnnx/_ops.pyx``.

Usage::

    python benchmarks/kernels_ab.py OLD_TREE NEW_TREE [--rounds 3] [--repeat 8] [--isa avx512]

Each tree is a folder holding a built ``cnnx`` package (a clone after
``python setup.py build_ext --inplace``). Every round runs one process per tree, alternating, so
both see the same machine load; each process times every kernel through ``cnnx.functional`` on
one thread, as the CPU time of the calling thread (``time.thread_time``: a shared machine's other
processes barely move it), best of ``--repeat`` calls after two warm-up calls. The table gives
the best of the rounds in ms and NEW / OLD. Sizes: 1-4 M float32 elements, the scale of the
workloads' activations and parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
import cnnx.functional as F

repeat = int(sys.argv[1])
rng = np.random.default_rng(0)
flat = rng.standard_normal(4 * 2**20, dtype=np.float32)
out = np.empty_like(flat)
p, g = (rng.standard_normal(2**20, dtype=np.float32) for _ in range(2))
m, v, buf = (np.zeros_like(p) for _ in range(3))
x4 = rng.standard_normal((64, 16, 32, 32), dtype=np.float32)
xs = rng.standard_normal((32, 16, 28, 28), dtype=np.float32)
cols = F.im2col(xs, 3, 1, 1)
xd = rng.standard_normal((16, 64, 56, 56), dtype=np.float32)
wd = rng.standard_normal((64, 1, 3, 3), dtype=np.float32)
dyd = rng.standard_normal(xd.shape, dtype=np.float32)
cases = {
    "leaky_relu 4M": lambda: F.leaky_relu(flat, 0.01, out=out),
    "sigmoid 4M": lambda: F.sigmoid(flat, out=out),
    "gelu (tanh) 4M": lambda: F.gelu(flat, approximate="tanh", out=out),
    "adam_step 1M": lambda: F.adam_step(p, g, m, v, 3, 1e-3, 0.9, 0.999, 1e-8),
    "sgd_step 1M, momentum": lambda: F.sgd_step(p, g, buf, 1e-3, momentum=0.9),
    "max_pool2d 2x2, 1M": lambda: F.max_pool2d(x4, 2, indices=False),
    "max_pool2d 3x3 s1 p1, 1M": lambda: F.max_pool2d(x4, 3, stride=1, padding=1),
    "avg_pool2d 3x3 s1 p1, 1M": lambda: F.avg_pool2d(x4, 3, stride=1, padding=1),
    "avg_pool2d_backward 3x3 s1 p1, 3.2M": lambda: F.avg_pool2d_backward(dyd, xd.shape, 3, 1, 1),
    "im2col 3x3 p1, 0.4M": lambda: F.im2col(xs, 3, 1, 1),
    "col2im 3x3 p1, 0.4M": lambda: F.col2im(cols, xs.shape, 3, 1, 1),
    "depthwise 3x3 p1, 3.2M": lambda: F.conv2d_grouped(xd, wd, None, 1, 1, 1, 64),
    "depthwise backward 3x3 p1, 3.2M": lambda: F.conv2d_grouped_backward(dyd, xd, wd, 1, 1, 1, 64),
}
best = {}
for name, run in cases.items():
    run(); run()
    times = []
    for _ in range(repeat):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    best[name] = min(times) * 1e3
print(json.dumps(best))
"""


def measure(tree, repeat, isa):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "CNNX_NUM_THREADS": "1"}
    if isa:
        env["CNNX_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", WORKER, str(repeat)], env=env, capture_output=True,
                          text=True, cwd=os.path.abspath(tree), check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="folder holding the OLD built cnnx package")
    parser.add_argument("new", help="folder holding the NEW built cnnx package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--isa", default="", help="CNNX_ISA for both (default: the widest build)")
    args = parser.parse_args(argv)
    best = {"old": {}, "new": {}}
    for _ in range(args.rounds):
        for side in ("old", "new"):
            for name, ms in measure(getattr(args, side), args.repeat, args.isa).items():
                best[side][name] = min(ms, best[side].get(name, float("inf")))
    print(f"| kernel ({args.isa or 'widest ISA'}, 1 thread) | old ms | new ms | new / old |")
    print("|---|---|---|---|")
    for name, old_ms in best["old"].items():
        new_ms = best["new"][name]
        print(f"| {name} | {old_ms:.3f} | {new_ms:.3f} | {new_ms / old_ms:.2f} |")


if __name__ == "__main__":
    main()
