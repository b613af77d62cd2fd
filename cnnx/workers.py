"""Thread policy of a worker process: a sweep trial or an MPI rank uses the cores it was given.

A process that shares a machine with other workers must size all of its thread pools -- cnnx's
own (kernels and worker threads, :mod:`cnnx.parallel`), OpenMP's and BLAS's -- to its share of
the cores, or two trials on two cores run four busy threads and both slow down. Ray sets only
``OMP_NUM_THREADS`` in a trial, and a reused worker process keeps whatever thread counts an
earlier trial left, so every worker calls :func:`use_cores` when it starts its work.
"""
from __future__ import annotations

import os

__all__ = ["use_cores", "thread_counts", "visible_cores"]


def visible_cores():
    """Cores this process may run on (its CPU affinity; a bound MPI rank sees only its own)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def use_cores(n):
    """Size cnnx's, OpenMP's and BLAS's thread pools to ``n`` threads, for the rest of the process.

    Parameters
    ----------
    n : int
        Cores given to this worker (a trial's ``cpu`` resource, a rank's share of its node).

    Returns
    -------
    int
        ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Expected a positive int number of cores, received: n={n!r}")
    from threadpoolctl import threadpool_limits

    from . import parallel

    parallel.set_num_threads(n)
    # Child processes (a data loader, a nested pool) inherit the same budget.
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["CNNX_NUM_THREADS"] = str(n)
    threadpool_limits(limits=n)  # every library threadpoolctl knows: BLAS and OpenMP
    return n


def thread_counts():
    """What this process's thread pools are set to, as a JSON-serialisable dict.

    Returns
    -------
    dict
        ``{"cnnx": int, "blas": [int, ...], "openmp": [int, ...]}``: cnnx's thread count and
        the ``num_threads`` of every BLAS and OpenMP library loaded (threadpoolctl's view).
    """
    from threadpoolctl import threadpool_info

    from . import parallel

    counts = {"cnnx": parallel.get_num_threads(), "blas": [], "openmp": []}
    for pool in threadpool_info():
        if pool.get("user_api") in ("blas", "openmp"):
            counts[pool["user_api"]].append(int(pool["num_threads"]))
    return counts
