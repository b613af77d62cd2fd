"""Fewer kernel threads while other processes compete for the cores.

cnnx's idle OpenMP threads spin briefly after each parallel call (``cnnx.IDLE_SPINS``), so that
the next call of a step finds them awake. When another busy process shares the cores, a
parallel call instead waits at its end for a thread the scheduler has set aside, and the spin
holds a core the other process needs: with one busy process on a 2-vCPU AMD EPYC Zen 5 (avx512f)
virtual machine, lenet5 training on 2 threads ran 30-50 % slower (10,000-20,000 spins) than with
threads that sleep at once, and 1.6-2x slower than on one thread (docs/PERFORMANCE_LOG.md, sixth
session).

The sign is the process's threads being preempted: ``getrusage``'s involuntary context switches
were ~15 per thread-second there on a quiet machine and ~300 with one busy process. The plan calls
``observe()`` once per batch (through ``parallel.note_batch``); over windows of ``WINDOW_S`` it
counts preemptions per thread, and after ``BUSY_WINDOWS`` windows in a row past
``PREEMPTIONS_PER_THREAD_S`` it halves the threads the kernels may use (down to one) for
``HOLD_S``, then tries the full count again. The thread count never changes a result (the kernels
are thread-count invariant), only how fast it comes. Time the host takes from a virtual machine
(steal) is invisible here: only other processes inside the machine are seen.
"""
from __future__ import annotations

import threading
import time

try:
    import resource
except ImportError:  # not a Unix: no preemption counts, never backs off
    resource = None

ENABLED = True  # False keeps the full thread count whatever the load (for comparisons)
WINDOW_S = 0.1
PREEMPTIONS_PER_THREAD_S = 100.0
BUSY_WINDOWS = 2  # in a row before halving: a burst of kernel work on a quiet machine is not load
HOLD_S = 2.0


def _preemptions():
    """Involuntary context switches of this process so far (all its threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


class Guard:
    """The thread limit and the window it is judged over. ``observe`` takes the clock and the
    preemption counter as arguments so the rule can be tested without a busy machine."""

    def __init__(self):
        self.limit = None  # None: no limit
        self.until = 0.0  # when a limit lapses
        self.window = None  # (start time, preemptions at start, threads allowed during it)
        self.busy_windows = 0  # windows in a row past the threshold
        self.halvings = 0  # how often it backed off (benchmarks report it)
        self._lock = threading.Lock()

    def allowed(self, threads):
        """Threads the kernels may use now, out of the ``threads`` asked for."""
        limit = self.limit
        return threads if limit is None else min(threads, limit)

    def observe(self, threads, now, count_preemptions):
        """Close the current window once it is ``WINDOW_S`` long, and set or lift the limit.
        ``count_preemptions()`` is read only then (a system call)."""
        window = self.window
        if window is not None and now - window[0] < WINDOW_S:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is judging this window
        try:
            preemptions = count_preemptions()
            window = self.window
            if window is None:
                self.window = (now, preemptions, self.allowed(threads))
                return
            start, start_count, used = window
            if now - start < WINDOW_S:
                return
            rate = (preemptions - start_count) / (now - start) / used
            self.busy_windows = self.busy_windows + 1 if rate > PREEMPTIONS_PER_THREAD_S else 0
            if self.busy_windows >= BUSY_WINDOWS and used > 1:
                self.limit, self.until = max(1, used // 2), now + HOLD_S
                self.busy_windows = 0
                self.halvings += 1
            elif self.limit is not None and now >= self.until:
                self.limit = None  # try the full count again; the next window judges it
            self.window = (now, preemptions, self.allowed(threads))
        finally:
            self._lock.release()


_guard = Guard()


def allowed(threads):
    """Threads the kernels may use now, out of the ``threads`` the user set."""
    return _guard.allowed(threads) if ENABLED else threads


def halvings():
    """How often the threads were halved in this process so far (benchmarks report it)."""
    return _guard.halvings


def observe(threads):
    """One batch went by with ``threads`` asked for: judge the window when it is complete."""
    if ENABLED and threads > 1 and resource is not None:
        _guard.observe(threads, time.perf_counter(), _preemptions)
