"""Per-element passes at the workloads' sizes: activations, dropout, loss, optimizers, BatchNorm.

Usage::

    python benchmarks/elementwise.py [--repeat 30] [--threads T] [--isa baseline|avx2|avx512]

Times each pass through the public objects a training step calls (layer ``forward`` /
``backward``, ``loss.forward`` + ``backward``, ``optimizer.step``), best of ``--repeat`` calls
after a warm-up, in milliseconds. Sizes: the activation after seed-mnist's first convolution
(256 x 16 x 28 x 28 float32, 3.2 M elements), Adam / SGD over seed-mnist's 806,394 parameters
(its four weight and bias shapes), BatchNorm2D on the same 3.2 M activation, softmax
cross-entropy on 256 x 10 logits. ``CNNX_ISA`` (or ``--isa``) picks the kernel build.
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


def best_ms(fn, repeat):
    fn()
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def cases():
    """(name, callable) for every pass measured; each callable runs the pass once."""
    import numpy as np

    import cnnx
    from cnnx import layers, losses, optimizers

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16, 28, 28), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    out = []
    for name, layer in [
        ("relu", layers.ReLU()),
        ("leaky_relu", layers.LeakyReLU(0.01)),
        ("sigmoid", layers.Sigmoid()),
        ("tanh", layers.Tanh()),
        ("gelu", layers.GELU()),
        ("gelu_tanh", layers.GELU("tanh")),
        ("dropout_0.25", layers.Dropout(0.25)),
    ]:
        out.append((f"{name} forward", lambda layer=layer: layer.forward(x, training=True)))
        out.append((f"{name} backward", lambda layer=layer: layer.backward(dy)))
    bn = layers.BatchNorm2D(16)
    out.append(("batchnorm2d forward (train)", lambda: bn.forward(x, training=True)))
    out.append(("batchnorm2d backward (train)", lambda: bn.backward(dy)))

    logits = rng.standard_normal((256, 10), dtype=np.float32)
    labels = rng.integers(0, 10, size=256)
    loss = losses.SoftmaxCrossEntropy()
    out.append(("softmax_ce forward+backward", lambda: (loss.forward(logits, labels), loss.backward())))

    shapes = [(16, 1, 2, 2), (16,), (32, 16, 2, 2), (32,), (128, 6272), (128,), (10, 128), (10,)]
    params = [(f"{i}", rng.standard_normal(s, dtype=np.float32) * 0.01, rng.standard_normal(s, dtype=np.float32))
              for i, s in enumerate(shapes)]
    assert sum(p.size for _, p, _ in params) == 806_394
    for name, opt in [
        ("adam", optimizers.Adam(1e-4)),
        ("adamw", optimizers.AdamW(1e-4)),
        ("sgd momentum", optimizers.SGD(0.05, momentum=0.9)),
        ("sgd nesterov wd", optimizers.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    ]:
        out.append((f"{name} step (806k)", lambda opt=opt: opt.step(params)))
    return cnnx, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--isa", default=None, help="sets CNNX_ISA before cnnx is imported")
    parser.add_argument("--only", default=None, help="substring of the pass names to run")
    args = parser.parse_args(argv)
    if args.isa:
        os.environ["CNNX_ISA"] = args.isa
    cnnx, todo = cases()
    if args.threads is not None:
        cnnx.parallel.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    isa = getattr(getattr(cnnx, "_simd", None), "ISA", "baseline")
    print(f"{cpu}, cnnx kernels: {isa}, {cnnx.parallel.get_num_threads()} threads")
    print("| pass | ms |\n|---|---|")
    with cnnx.parallel.single_threaded_blas():
        for name, fn in todo:
            if args.only and args.only not in name:
                continue
            print(f"| {name} | {best_ms(fn, args.repeat):.3f} |", flush=True)


if __name__ == "__main__":
    main()
