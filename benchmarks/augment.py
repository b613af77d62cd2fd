"""What data augmentation costs next to a training step.

Usage::

    python benchmarks/augment.py [--model mind-cifar] [--batch 128] [--repeats 20] [--threads T]

Times, on random CIFAR-shaped inputs (3x32x32, or the model's input shape), each augmentation of
``cnnx.augment`` and the CIFAR recipe ``crop + flip`` (+ Cutout) on one batch, and one training
step of the zoo model (forward, loss, backward, optimizer update: the body of ``Network.fit``),
interleaved so both see the same machine load. Prints the median times and the augmentation's
cost as a share of the step. Nothing is asserted: timing is a measurement, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def main(argv=None):
    import cnnx  # before NumPy: OpenBLAS then loads with sleeping idle threads (cnnx/__init__.py)
    import numpy as np
    from cnnx import augment, losses, models, parallel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mind-cifar")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        parallel.set_num_threads(args.threads)

    net = models.build(args.model, seed=0)
    net.compile(losses.SoftmaxCrossEntropy(), models.default_optimizer(args.model))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch,) + net.input_shape).astype(np.float32)
    y = rng.integers(0, net.output_shape[0], args.batch)
    h = net.input_shape[1]
    cases = {
        "RandomCrop(padding=4)": augment.RandomCrop(4),
        "RandomHorizontalFlip()": augment.RandomHorizontalFlip(),
        "RandomTranslation(0.1)": augment.RandomTranslation(0.1),
        f"Cutout({h // 4})": augment.Cutout(h // 4),
        "crop + flip": augment.from_names("crop,flip", h),
        "crop + flip + cutout": augment.from_names("crop,flip,cutout", h),
    }

    def train_step():
        out = net.forward(x, training=True)
        net.loss.forward(out, y)
        net.backward(net.loss.backward())
        net.optimizer.step(net.parameters())

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    train_step()  # warm-up: buffers, plan
    step_times, aug_times = [], {name: [] for name in cases}
    for _ in range(args.repeats):
        step_times.append(timed(train_step))
        for name, aug in cases.items():
            # owned=False: the cost fit pays at most (it passes its own buffer, so flips and
            # Cutout may work in place there)
            aug_times[name].append(timed(lambda: aug(x, rng)))
    step = statistics.median(step_times)
    print(f"{args.model}, batch {args.batch}, {parallel.get_num_threads()} thread(s), "
          f"median of {args.repeats}")
    print(f"{'training step':<26}{step * 1e3:9.2f} ms")
    for name, times in aug_times.items():
        t = statistics.median(times)
        print(f"{name:<26}{t * 1e3:9.3f} ms  {100 * t / step:6.2f} % of a step")


if __name__ == "__main__":
    main()
