"""Which spans of a training step run on one thread: a per-op timeline with thread ids.

Usage::

    python benchmarks/timeline.py [--workloads lenet5 seed-cifar] [--batches 40] [--threads 2]
                                  [--rounds 3] [--json timeline.json]

Trains each user-style network (separate activation layers) through ``Network.fit`` on random
data at its benchmarks/README.md batch size and records, per batch, when each thread was busy:

- the calling (main) thread is busy for the whole batch except while it waits inside
  ``parallel.for_each_group`` for another thread's last group;
- a worker thread is busy while it runs a group of a ``for_each_group`` call.

From these intervals it reports the time one thread ran alone ("serial"), split by what the main
thread was in (a plan step's forward or backward, the loss, the optimizer, the fit loop between
them) and by where (inside a ``for_each_group`` call: the other thread's start or the last
groups' tail; outside: a span with no parallel work at all), and the resulting "cores" (busy
thread time / wall time). OpenMP loops inside one kernel call (``threads_for`` > 1) are not seen
as parallel here: the ops that asked for them are listed, so their spans can be read for what
they are.

Unlike CPU time / wall time of the process, the structure this shows (how much of a step has no
parallel work, how many groups each call has) holds on a machine shared with other processes;
the lengths of the spans do stretch with the load. ``--threads 1`` gives each span's length on
one core.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
from pathlib import Path

# Only this folder (for workloads.py): cnnx is the installed package, never the source tree above.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

clock = time.perf_counter


class Tracer:
    """Records the ops of the main thread ``(label, start, end)``, the ``for_each_group`` calls
    ``(label, n_groups, start, end, [(thread id, start, end) per group])`` and the fit batches."""

    def __init__(self):
        self.current = "fit loop"
        self.ops = []
        self.calls = []
        self.batches = []
        self.openmp_ops = collections.Counter()

    def clear(self):
        self.ops.clear()
        self.calls.clear()
        self.batches.clear()

    def wrap_for_each_group(self, original):
        tracer = self

        def for_each_group(n_groups, work, n_threads=None):
            groups = []

            def traced(worker, group):
                t0 = clock()
                try:
                    work(worker, group)
                finally:
                    groups.append((threading.get_ident(), t0, clock()))

            t0 = clock()
            original(n_groups, traced, n_threads)
            tracer.calls.append((tracer.current, n_groups, t0, clock(), groups))

        return for_each_group

    def wrap_threads_for(self, original):
        tracer = self

        def threads_for(work):
            n = original(work)
            if n > 1 and threading.current_thread() is threading.main_thread():
                tracer.openmp_ops[tracer.current] += 1
            return n

        return threads_for

    def wrap_op(self, label, method):
        tracer = self

        def op(*args, **kwargs):
            previous, tracer.current = tracer.current, label
            t0 = clock()
            try:
                return method(*args, **kwargs)
            finally:
                tracer.ops.append((label, t0, clock()))
                tracer.current = previous

        return op


def install(net, tracer):
    """Patch cnnx (the module-level names that functional and parallel call) and ``net``'s plan,
    loss and optimizer so that ``tracer`` records them; returns the callback marking the batches."""
    import cnnx
    from cnnx import functional, parallel

    traced = tracer.wrap_for_each_group(parallel.for_each_group)
    parallel.for_each_group = traced  # parallel.matmul looks it up here
    functional.for_each_group = traced
    functional.threads_for = tracer.wrap_threads_for(parallel.threads_for)
    for k, step in enumerate(net.plan.train_steps):
        step.forward = tracer.wrap_op(f"{k} fwd {step.label}", step.forward)
        step.backward = tracer.wrap_op(f"{k} bwd {step.label}", step.backward)
    net.loss.forward = tracer.wrap_op("loss", net.loss.forward)
    net.loss.backward = tracer.wrap_op("loss", net.loss.backward)
    net.optimizer.step = tracer.wrap_op("optimizer", net.optimizer.step)

    class BatchSpans(cnnx.callbacks.Callback):
        def on_batch_begin(self, batch, logs=None):
            tracer.batches.append([clock(), None])

        def on_batch_end(self, batch, logs=None):
            tracer.batches[-1][1] = clock()

    return BatchSpans()


def _overlap(a, b, c, d):
    return max(0.0, min(b, d) - max(a, c))


def analyse(tracer, skip):
    """Per batch (after the first ``skip``): wall time, time with one / two threads busy, and the
    one-thread time per op, inside ``for_each_group`` calls or outside them (sums over batches)."""
    main = threading.main_thread().ident
    rows = []
    outside_by_op = collections.Counter()
    inside_by_op = collections.Counter()
    call_stats = collections.defaultdict(list)
    batches = [b for b in tracer.batches if b[1] is not None][skip:]
    for start, end in batches:
        calls = [c for c in tracer.calls if start <= c[2] and c[3] <= end]
        ops = [o for o in tracer.ops if start <= o[1] and o[2] <= end]
        # Busy intervals: the main thread all along except after its own last group of a call
        # until the call returns; the other threads during their groups.
        events = [(start, 1), (end, -1)]
        for label, n_groups, c0, c1, groups in calls:
            own_end = max((g[2] for g in groups if g[0] == main), default=c0)
            if own_end < c1:
                events += [(own_end, -1), (c1, 1)]
            others = [g for g in groups if g[0] != main]
            events += [(g[1], 1) for g in others] + [(g[2], -1) for g in others]
            if n_groups > 1:
                own = [g for g in groups if g[0] == main]
                ends = [max((g[2] for g in grp), default=c0) for grp in (own, others)]
                call_stats[label].append((c1 - c0, n_groups, min((g[1] for g in others), default=c1) - c0,
                                          abs(ends[0] - ends[1]), len(others)))
        events.sort()
        busy, last_t = 0, start
        time_at = collections.Counter()
        alone = []
        for t, change in events:
            if t > last_t:
                time_at[min(busy, 2)] += t - last_t
                if busy == 1:
                    alone.append((last_t, t))
            busy += change
            last_t = max(last_t, t)
        # One-thread time by the main thread's op, inside a call (start and tail) or outside.
        for a, b in alone:
            rest = b - a
            for label, o0, o1 in ops:
                part = _overlap(a, b, o0, o1)
                if part > 0:
                    inside = sum(_overlap(a, b, c[2], c[3]) for c in calls if c[0] == label and o0 <= c[2] <= o1)
                    inside_by_op[label] += inside
                    outside_by_op[label] += part - inside
                    rest -= part
            if rest > 0:
                outside_by_op["fit loop (between ops)"] += rest
        wall = end - start
        rows.append({"wall": wall, "one": time_at[1], "two": time_at[2],
                     "cores": (time_at[1] + 2 * time_at[2]) / wall if wall > 0 else 0.0})
    return rows, outside_by_op, inside_by_op, call_stats, len(batches)


def run(workload, batches, threads, rounds):
    import cnnx
    import numpy as np
    from workloads import WORKLOADS, cnnx_model

    cnnx.parallel.set_num_threads(threads)
    spec = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    n = spec["batch"]
    x = rng.standard_normal((n * batches,) + spec["input"], dtype=np.float32)
    y = rng.integers(0, 10, size=n * batches)
    net = cnnx_model(workload, fused=False)
    net.fit(x[:n * 2], y[:n * 2], epochs=1, batch_size=n, shuffle=False, verbose=0)  # builds the plan
    tracer = Tracer()
    callback = install(net, tracer)
    results = []
    for _ in range(rounds):
        tracer.clear()
        cpu0 = time.process_time()
        t0 = clock()
        net.fit(x, y, epochs=1, batch_size=n, shuffle=False, verbose=0, callbacks=[callback])
        wall = clock() - t0
        cpu = time.process_time() - cpu0
        rows, outside_by_op, inside_by_op, call_stats, counted = analyse(tracer, skip=2)
        results.append({"rows": rows, "serial": outside_by_op, "inside": inside_by_op, "calls": call_stats,
                        "counted": counted, "process_cores": cpu / wall, "ms_per_batch": 1e3 * wall / batches})
    return results, dict(tracer.openmp_ops)


def report(workload, threads, results, openmp_ops):
    med = statistics.median
    best = min(results, key=lambda r: med([row["wall"] for row in r["rows"]]))
    rows, counted = best["rows"], best["counted"]
    ms = 1e3
    wall = med([r["wall"] for r in rows]) * ms
    print(f"\n== {workload}, {threads} threads: {counted} batches, median {wall:.2f} ms / batch "
          f"(process CPU / wall over the fit call: {best['process_cores']:.2f}; rounds: "
          + ", ".join(f"{r['ms_per_batch']:.2f} ms {r['process_cores']:.2f} cores" for r in results) + ")")
    one = med([r["one"] for r in rows]) * ms
    two = med([r["two"] for r in rows]) * ms
    cores = med([r["cores"] for r in rows])
    print(f"   one thread busy {one:.2f} ms, two busy {two:.2f} ms, traced cores {cores:.2f}")
    print("   one-thread time per batch (mean), outside any for_each_group call, by op:")
    for label, t in best["serial"].most_common():
        print(f"     {t / counted * ms:7.3f} ms  {label}")
    print("   one-thread time inside for_each_group calls (start + tail), by op:")
    for label, t in best["inside"].most_common():
        print(f"     {t / counted * ms:7.3f} ms  {label}")
    print("   calls with > 1 group: mean ms, groups, other thread's start ms, last-group gap ms, groups run by it:")
    for label, stats in best["calls"].items():
        k = len(stats)
        print(f"     {label:<40} {sum(s[0] for s in stats) / k * ms:6.3f}  {stats[0][1]:3d}  "
              f"{sum(s[2] for s in stats) / k * ms:6.3f}  {sum(s[3] for s in stats) / k * ms:6.3f}  "
              f"{sum(s[4] for s in stats) / k:4.1f}")
    if openmp_ops:
        print("   ops that ran OpenMP loops (threads_for > 1) from the main thread: " + ", ".join(sorted(openmp_ops)))
    return {"workload": workload, "threads": threads, "ms_per_batch": wall, "one_ms": one, "two_ms": two,
            "cores": cores, "process_cores": best["process_cores"],
            "serial_ms": {k: v / counted * ms for k, v in best["serial"].items()},
            "inside_ms": {k: v / counted * ms for k, v in best["inside"].items()}}


def main(argv=None):
    import cnnx  # noqa: F401  (before NumPy: OpenBLAS loads with sleeping idle threads)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["lenet5", "seed-cifar"])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out = []
    for workload in args.workloads:
        results, openmp_ops = run(workload, args.batches, args.threads, args.rounds)
        out.append(report(workload, args.threads, results, openmp_ops))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
