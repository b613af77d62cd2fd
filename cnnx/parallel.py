"""Thread policy: how the compiled kernels and BLAS share the cores.

Two mechanisms, chosen by what a call does:
- element-wise and pooling kernels run OpenMP loops over images (``threads_for`` keeps small
  calls serial);
- a convolution's groups of images (im2col, GEMM, layout pass) run one thread each: a thread runs
  a whole group without waiting for the others, where OpenMP and multi-threaded BLAS would meet at
  a barrier three times per group (measured: 10% faster forward and more on backward for the CIFAR
  networks' convolutions on 2 cores). On the packed float32 path the groups are one compiled
  call's OpenMP loop (``threads_for_groups``); elsewhere they are handed to worker threads
  (``for_each_group``) while BLAS runs one thread each.
Neither changes the arithmetic: results are identical whatever the thread count.
``set_num_threads`` sets the count for both and, through threadpoolctl, BLAS's own.

This module is the one place thread policy lives: the count (lowered by ``cnnx.backoff`` while
other processes keep the cores busy), the worker pool, the BLAS limit
(one process-wide setting shared by concurrent callers, restored by the last to leave), and the
rule that a parallel call made from inside a worker runs inline (no nested pool, no deadlock).
Nothing here depends on whether NumPy, torch or cnnx was imported first: the BLAS libraries are
looked up again when modules were imported since the last look.
"""
from __future__ import annotations

import contextlib
import functools
import os
import queue
import sys
import threading

import numpy as np

from . import backoff


def _available_cores():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _from_environment():
    value = os.environ.get("CNNX_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    try:
        return max(1, int(value)) if value else None
    except ValueError:
        return None


_num_threads = _from_environment() or _available_cores()


# Below this many elements of work a kernel runs serial: waking a second thread costs more than
# it saves (see benchmarks/README.md for the measurement).
MIN_WORK_PER_THREAD = 1 << 15


def threads_for(work):
    """Threads to use for a kernel call touching about ``work`` elements."""
    if work < 2 * MIN_WORK_PER_THREAD:
        return 1
    return max(1, min(backoff.allowed(_num_threads), work // MIN_WORK_PER_THREAD))


def get_num_threads():
    """Threads the compiled kernels use (``CNNX_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the cores).
    While other processes compete for the cores, fewer may run (``cnnx.backoff``)."""
    return _num_threads


def note_batch():
    """The plan ran a batch: lets ``cnnx.backoff`` judge whether the threads get their cores."""
    backoff.observe(_num_threads)


def set_num_threads(n, blas=True):
    """Use ``n`` threads in the compiled kernels and, when ``blas`` and threadpoolctl is present, in BLAS."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Expected a positive int number of threads, received: n={n!r}")
    _num_threads = n
    if blas:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: without it BLAS keeps its own setting
            return
        threadpool_limits(limits=n, user_api="blas")


# Guards the helper threads and the BLAS limit below: several user threads may call a Network at once.
_state_lock = threading.Lock()
# Set in every thread while it runs work for ``for_each_group``: a parallel call made from there
# runs inline (the pool's threads are all busy with the outer call; waiting on them could deadlock).
_inside = threading.local()
# Helper threads, each fed through its own queue (see ``_Helper``); the calling thread is worker 0.
_helpers = []


class _Helper:
    """A persistent worker thread that runs the tasks put on its queue, one after another.

    A ``for_each_group`` call costs one ``put`` per helper (a C-level queue: no futures, no
    condition variables): the hand-off is what a small call pays on the critical path, where the
    woken thread's start already takes tens of microseconds on a virtual machine.
    """

    def __init__(self, index):
        self.queue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"cnnx-{index}", daemon=True)
        self.thread.start()

    def _serve(self):
        get = self.queue.get
        while True:
            get()()


def _helper_threads(n):
    """At least ``n`` helper threads, started once and added to when more are asked for."""
    with _state_lock:
        while len(_helpers) < n:
            _helpers.append(_Helper(len(_helpers) + 1))
        return _helpers[:n]


def _forget_helpers_after_fork():
    # A forked child has none of the parent's threads: it starts its own helpers when it needs them.
    global _state_lock
    _state_lock = threading.Lock()
    _helpers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers_after_fork)


def in_parallel_region():
    """True in a thread that is running work of a ``for_each_group`` call (nested calls run inline)."""
    return getattr(_inside, "depth", 0) > 0


# BLAS thread limit: one process-wide setting, entered by the first concurrent user and restored
# by the last (a per-thread counter would let one thread restore it under another's feet).
_blas_users = 0
_blas_limiter = None
_blas_controller = None
_blas_modules_seen = -1


def _controller():
    """threadpoolctl's view of the loaded BLAS libraries, refreshed when modules were imported
    since it was made (a BLAS loaded after cnnx, e.g. by torch, is then limited too)."""
    global _blas_controller, _blas_modules_seen
    loaded = len(sys.modules)
    if _blas_controller is None or loaded != _blas_modules_seen:
        from threadpoolctl import ThreadpoolController

        _blas_controller = ThreadpoolController()
        _blas_modules_seen = loaded
    return _blas_controller


@contextlib.contextmanager
def single_threaded_blas():
    """Run the block with BLAS at one thread: cnnx's own worker threads are the parallelism.

    The Network enters this once per fit / evaluate / predict / forward / backward call. Besides
    sparing a switch per GEMM, it keeps OpenBLAS's own threads idle, so none spins against the
    kernels' OpenMP loops, whether or not NumPy was imported before cnnx (measured: inference
    40 % slower on 2 cores with a spinning BLAS thread). Nested and concurrent uses share one
    limit, restored when the last of them leaves.
    """
    global _blas_users, _blas_limiter
    with _state_lock:
        if _blas_users == 0:
            _blas_limiter = _controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _state_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


# Below this many multiply-adds per thread a GEMM runs in the calling thread. Waking a sleeping
# thread costs 40-70 us on a virtual machine whose idle vCPUs halt (AMD EPYC Zen 5, 2 vCPUs): the
# dense GEMMs of the benchmark networks ran no faster on 2 threads than on 1 below ~15 M
# multiply-adds (128 x 400 -> 120: 73 us on 1 thread, 97 us on 2; 256 x 1024 -> 128: 339 / 244 us).
MIN_GEMM_WORK = 1 << 23


def threads_for_gemm(m, k, n):
    """Threads for one GEMM of ``m x k x n`` multiply-adds: at least ``MIN_GEMM_WORK`` each, and
    one inside a worker's task (the other workers are busy with the outer call)."""
    if in_parallel_region():
        return 1
    return max(1, min(backoff.allowed(_num_threads), m * k * n // MIN_GEMM_WORK))


def threads_for_groups(n_groups):
    """Threads for a compiled kernel that runs ``n_groups`` groups of images one thread each (as
    ``for_each_group`` would): one inside a worker's task."""
    if in_parallel_region():
        return 1
    return max(1, min(backoff.allowed(_num_threads), n_groups))


def blas_product(a, b, out):
    """``out = a @ b`` by NumPy's BLAS: ``matmul``'s default product for one block of rows."""
    np.matmul(a, b, out=out)


def matmul(a, b, out, product=blas_product):
    """``out = a @ b`` with the rows of ``a`` (and ``out``) spread over the worker threads.

    ``a`` may be a strided view (e.g. a transpose); ``out`` must be C-contiguous. ``product(a, b,
    out)`` computes one block of rows (NumPy's BLAS by default; benchmarks/dense_gemm.py passes
    cnnx's own GEMM to replay an earlier dense-layer rule).
    """
    rows = a.shape[0]
    parts = min(rows, threads_for_gemm(rows, a.shape[1], b.shape[1]))
    if parts <= 1:
        product(a, b, out)
        return out
    bounds = [rows * i // parts for i in range(parts + 1)]

    def work(worker, part):
        lo, hi = bounds[part], bounds[part + 1]
        product(a[lo:hi], b, out[lo:hi])

    for_each_group(parts, work)
    return out


class _Groups:
    """The state of one ``for_each_group`` call: the next group to hand out, and the helpers
    inside a group (the caller waits for them before it returns; a helper that starts after the
    last group was handed out finds nothing left and never touches the caller's buffers)."""

    __slots__ = ("work", "count", "next", "lock", "running", "all_done", "error")

    def __init__(self, count, work):
        self.work = work
        self.count = count
        self.next = 0
        self.lock = threading.Lock()
        self.running = 0  # helpers inside a group
        self.all_done = threading.Lock()  # held while running > 0
        self.error = None

    def run(self, worker):
        """Run groups in this thread until none is left (worker 0 is the caller)."""
        helper = worker != 0
        lock = self.lock
        _inside.depth = getattr(_inside, "depth", 0) + 1
        try:
            while True:
                with lock:
                    group = self.next
                    if group >= self.count:
                        return
                    self.next = group + 1
                    if helper:
                        self.running += 1
                        if self.running == 1:
                            self.all_done.acquire()
                try:
                    self.work(worker, group)
                except BaseException as exc:  # stop the others, re-raise in the caller
                    with lock:
                        self.next = self.count
                        if self.error is None:
                            self.error = exc
                    if not helper:
                        return
                finally:
                    if helper:
                        with lock:
                            self.running -= 1
                            if self.running == 0:
                                self.all_done.release()
        finally:
            _inside.depth -= 1

    def wait_for_helpers(self):
        with self.lock:
            busy = self.running > 0
        if busy:  # released by the last helper to leave its group
            self.all_done.acquire()
            self.all_done.release()


def for_each_group(n_groups, work, n_threads=None):
    """Call ``work(worker, group)`` for every group index, spread over threads as they free up.

    ``worker`` is the index (0 .. threads-1) of the thread running the call, so a caller can give
    each thread its own scratch buffers; every group is processed exactly once, and a worker
    writes only what belongs to its group, so the result does not depend on the schedule.
    Exceptions from any worker are raised here. Called from inside another ``for_each_group``'s
    work, it runs inline in the calling thread (worker 0): nested parallelism never waits on the
    pool it is running in. The calling thread works too and never waits for a helper that has not
    started: a helper still busy elsewhere (another caller's groups) simply finds nothing left.
    """
    n_threads = min(backoff.allowed(_num_threads) if n_threads is None else n_threads, n_groups)
    if n_threads <= 1 or in_parallel_region():
        for group in range(n_groups):
            work(0, group)
        return
    call = _Groups(n_groups, work)
    with single_threaded_blas():
        for worker, helper in enumerate(_helper_threads(n_threads - 1), start=1):
            helper.queue.put(functools.partial(call.run, worker))
        try:
            call.run(0)
        finally:
            call.wait_for_helpers()
    if call.error is not None:
        raise call.error


def with_single_threaded_blas(method):
    """Decorator: run ``method`` inside ``single_threaded_blas()``."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return method(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def num_threads(n):
    """Context manager: run the block with ``n`` kernel threads, then restore the previous count."""
    global _num_threads
    previous = _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Expected a positive int number of threads, received: n={n!r}")
    _num_threads = n
    try:
        yield
    finally:
        _num_threads = previous
