"""Thread policy: how many OpenMP threads the compiled kernels use.

The kernels' parallel loops (im2col, col2im, layout passes, pooling) and OpenBLAS's GEMMs run one
after the other, never at the same time, so each may use every core. ``set_num_threads`` sets the
kernels' count and, through threadpoolctl when it is installed, BLAS's as well.
"""
from __future__ import annotations

import contextlib
import os


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
    return max(1, min(_num_threads, work // MIN_WORK_PER_THREAD))


def get_num_threads():
    """Threads the compiled kernels use (``CNNX_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the cores)."""
    return _num_threads


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
