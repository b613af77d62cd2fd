"""Grouped, depthwise and dilated convolutions: cnnx against PyTorch, same process, side by side.

Shapes are ConvNeXt-mini's depthwise 7x7 layers at batch 128 (32x16x16, 64x8x8, 128x4x4), a
grouped 3x3 (4 groups) and a dilated 3x3. Each case times the forward pass and the backward pass
(input and weight gradients) of ``cnnx.functional.conv2d`` and ``torch.nn.functional.conv2d``
in float32, alternating the two, and reports the best of ``--repeats`` runs and the ratio
torch / cnnx (above 1: cnnx is faster). Timings on a shared machine are noisy: compare ratios.

    PYTHONPATH=$PWD python benchmarks/grouped_conv.py --threads 2 --repeats 7
"""
from __future__ import annotations

import argparse
import time

import numpy as np

# (name, n, c, out_c, size, kernel, padding, dilation, groups)
CASES = [
    ("depthwise 7x7, 32x16x16", 128, 32, 32, 16, 7, 3, 1, 32),
    ("depthwise 7x7, 64x8x8", 128, 64, 64, 8, 7, 3, 1, 64),
    ("depthwise 7x7, 128x4x4", 128, 128, 128, 4, 7, 3, 1, 128),
    ("grouped 3x3 (4 groups), 64x16x16", 128, 64, 64, 16, 3, 1, 1, 4),
    ("dilated 3x3 (d=2), 32x16x16", 128, 32, 32, 16, 3, 2, 2, 1),
]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch

    import cnnx
    from cnnx import functional as F

    if args.threads:
        cnnx.parallel.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads: cnnx {cnnx.parallel.get_num_threads()}, torch {torch.get_num_threads()}; "
          f"best of {args.repeats}, milliseconds")
    print(f"{'case':<34} {'cnnx fwd':>9} {'torch fwd':>10} {'ratio':>6} {'cnnx bwd':>9} {'torch bwd':>10} {'ratio':>6}")
    for name, n, c, oc, size, k, pad, dil, groups in CASES:
        x = rng.standard_normal((n, c, size, size)).astype(np.float32)
        w = rng.standard_normal((oc, c // groups, k, k)).astype(np.float32)
        ws = F.Workspace()
        y = F.conv2d(x, w, None, 1, pad, dil, groups, workspace=ws)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        tx, tw, tdy = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(w).requires_grad_(True), torch.from_numpy(dy)

        def cnnx_fwd():
            F.conv2d(x, w, None, 1, pad, dil, groups, workspace=ws)

        def cnnx_bwd():
            F.conv2d_backward(dy, x, w, 1, pad, dil, groups, workspace=ws)

        def torch_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, None, 1, pad, dil, groups)

        ty = torch.nn.functional.conv2d(tx, tw, None, 1, pad, dil, groups)

        def torch_bwd():
            torch.autograd.grad(ty, (tx, tw), tdy, retain_graph=True)

        results = {}
        for _ in range(2):  # alternate, so both see the same machine load
            for label, fn in (("cf", cnnx_fwd), ("tf", torch_fwd), ("cb", cnnx_bwd), ("tb", torch_bwd)):
                t = best_of(fn, args.repeats)
                results[label] = min(results.get(label, t), t)
        ms = {key: 1e3 * v for key, v in results.items()}
        print(f"{name:<34} {ms['cf']:>9.1f} {ms['tf']:>10.1f} {ms['tf'] / ms['cf']:>6.2f} "
              f"{ms['cb']:>9.1f} {ms['tb']:>10.1f} {ms['tb'] / ms['cb']:>6.2f}")


if __name__ == "__main__":
    main()
