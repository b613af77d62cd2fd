"""cnnx.backoff: the kernels' threads are halved while the process's threads are being preempted
(other processes busy on the same cores), and the full count is tried again after a hold. The
rule is driven here by a clock and a preemption counter of the test's own, not by the machine."""
import itertools

import numpy as np
import pytest

import cnnx
from cnnx import backoff, parallel
from cnnx.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU

W = backoff.WINDOW_S


class Counter:
    """A preemption counter the test advances; counts how often it was read."""

    def __init__(self):
        self.value = 0
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return self.value


def busy(per_thread_second, threads, seconds):
    """Preemptions of ``threads`` threads over ``seconds`` at ``per_thread_second`` each."""
    return int(per_thread_second * threads * seconds)


def test_a_quiet_machine_keeps_every_thread():
    guard, count = backoff.Guard(), Counter()
    for k in range(20):
        count.value += busy(15, 4, W)  # ~15 per thread-second: a quiet machine
        guard.observe(4, k * W, count)
    assert guard.limit is None and guard.allowed(4) == 4


def busy_windows(guard, count, threads, start, windows, per_thread_second=300):
    """Feed ``windows`` windows of ``threads`` preempted threads from time ``start``; returns the end."""
    now = start
    for _ in range(windows):
        count.value += busy(per_thread_second, threads, W)
        now += W * 1.001  # just past the window's end, whatever the rounding of sums of 0.1
        guard.observe(threads, now, count)
    return now


def test_preempted_threads_are_halved_down_to_one_then_tried_again_after_the_hold():
    guard, count = backoff.Guard(), Counter()
    guard.observe(4, 0.0, count)
    now = busy_windows(guard, count, 4, 0.0, backoff.BUSY_WINDOWS - 1)
    assert guard.allowed(4) == 4  # not yet: a single busy window may be a burst
    now = busy_windows(guard, count, 4, now, 1)
    assert guard.allowed(4) == 2
    now = busy_windows(guard, count, 2, now, backoff.BUSY_WINDOWS)  # still preempted on 2 threads
    assert guard.allowed(4) == 1
    halved_at = now
    now = busy_windows(guard, count, 1, now, backoff.BUSY_WINDOWS)  # one thread stays at one
    assert guard.allowed(4) == 1
    guard.observe(4, halved_at + backoff.HOLD_S, count)  # the hold set by the last halving lapses
    assert guard.limit is None and guard.allowed(4) == 4


def test_a_burst_between_quiet_windows_changes_nothing():
    guard, count = backoff.Guard(), Counter()
    guard.observe(2, 0.0, count)
    now = 0.0
    for k in range(10):
        now = busy_windows(guard, count, 2, now, 1, per_thread_second=300 if k % 2 else 15)
    assert guard.limit is None and guard.halvings == 0


def test_a_window_is_judged_only_once_complete_and_the_counter_read_only_then():
    guard, count = backoff.Guard(), Counter()
    guard.observe(2, 0.0, count)
    count.value += 10_000
    for now in np.linspace(0.0, 0.9 * W, 10):
        guard.observe(2, float(now), count)
    assert count.reads == 1 and guard.busy_windows == 0
    guard.observe(2, W, count)
    assert count.reads == 2 and guard.busy_windows == 1


def test_the_limit_never_raises_a_lower_thread_count():
    guard, count = backoff.Guard(), Counter()
    guard.observe(8, 0.0, count)
    busy_windows(guard, count, 8, 0.0, backoff.BUSY_WINDOWS)
    assert guard.allowed(8) == 4 and guard.allowed(3) == 3 and guard.allowed(1) == 1


@pytest.fixture
def preempted(monkeypatch):
    """backoff enabled with a fresh guard, every window judged, and a counter that says the
    threads are preempted all the time."""
    monkeypatch.setattr(backoff, "ENABLED", True)
    monkeypatch.setattr(backoff, "_guard", backoff.Guard())
    monkeypatch.setattr(backoff, "WINDOW_S", 0.0)
    ticks = itertools.count(step=10**9)
    monkeypatch.setattr(backoff, "_preemptions", lambda: next(ticks))


def _small_net():
    layers = [Conv2D(1, 8, 3, padding=1, rng=1), ReLU(), MaxPool2D(2), Flatten(), Dense(8 * 14 * 14, 10, rng=2)]
    return cnnx.Network(layers, input_shape=(1, 28, 28))


def test_a_network_under_load_runs_on_fewer_threads_with_the_same_results(preempted, rng):
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    net = _small_net()
    with parallel.num_threads(2):
        with pytest.MonkeyPatch.context() as full_count:
            full_count.setattr(backoff, "ENABLED", False)
            expected = net.predict(x, batch_size=16)
        assert parallel.threads_for(1 << 24) == 2
        got = net.predict(x, batch_size=16)  # each batch tells backoff: the third one halves
        assert parallel.threads_for(1 << 24) == 1 and parallel.threads_for_groups(8) == 1
        assert parallel.get_num_threads() == 2  # what the user set is unchanged
        assert backoff.halvings() == 1
    # Exact: the kernels sum in the same order whatever the thread count (thread-count invariance).
    np.testing.assert_array_equal(got, expected)

