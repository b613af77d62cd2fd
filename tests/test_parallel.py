"""cnnx.parallel.for_each_group: every group exactly once, errors raised in the caller, the caller
returns only after the helpers' groups are written, and several callers at once."""
import multiprocessing
import sys
import threading
import time

import numpy as np
import pytest

from cnnx import parallel
import reference as ref


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("n_groups", [1, 2, 7, 32])
def test_every_group_runs_once_on_a_valid_worker(threads, n_groups):
    seen = []
    lock = threading.Lock()

    def work(worker, group):
        with lock:
            seen.append((worker, group))

    with parallel.num_threads(threads):
        parallel.for_each_group(n_groups, work)
    assert sorted(g for _, g in seen) == list(range(n_groups))
    assert all(0 <= w < min(threads, n_groups) for w, _ in seen)


def test_the_call_returns_only_after_every_group_is_written():
    # Groups that take a while (releasing the GIL, as the kernels do): whichever thread ran them,
    # their writes are all there when the call returns.
    out = np.zeros(16)

    def work(worker, group):
        time.sleep(0.002)
        out[group] = group + 1

    with parallel.num_threads(2):
        for _ in range(5):
            out[:] = 0
            parallel.for_each_group(len(out), work)
            np.testing.assert_array_equal(out, np.arange(1, 17))


@pytest.mark.parametrize("failing_group", [0, 5, 15])
def test_an_error_in_any_group_is_raised_in_the_caller_and_the_pool_keeps_working(failing_group):
    def work(worker, group):
        time.sleep(0.001)
        if group == failing_group:
            raise ValueError(f"group {group} failed")

    with parallel.num_threads(2):
        with pytest.raises(ValueError, match=f"group {failing_group} failed"):
            parallel.for_each_group(16, work)
        seen = []
        parallel.for_each_group(8, lambda worker, group: seen.append(group))
    assert sorted(seen) == list(range(8))


def test_callers_in_several_threads_each_get_all_their_groups():
    results = {}

    def caller(name):
        seen = []
        lock = threading.Lock()

        def work(worker, group):
            time.sleep(0.0005)
            with lock:
                seen.append(group)

        for _ in range(10):
            parallel.for_each_group(12, work)
        results[name] = sorted(seen)

    with parallel.num_threads(2):
        ref.run_in_threads(caller, 4)
    assert results == {i: sorted(list(range(12)) * 10) for i in range(4)}


def _groups_in_child(queue):
    seen = []
    with parallel.num_threads(2):
        parallel.for_each_group(6, lambda worker, group: seen.append(group))
    queue.put(sorted(seen))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_starts_its_own_helpers():
    with parallel.num_threads(2):
        parallel.for_each_group(4, lambda worker, group: None)  # the parent has helpers now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_groups_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == list(range(6))
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
