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


def test_preempted_threads_are_halved_down_to_one_then_tried_again_after_the_hold():
    guard, count = backoff.Guard(), Counter()
    guard.observe(4, 0.0, count)
    count.value += busy(300, 4, W)
    guard.observe(4, W, count)
    assert guard.allowed(4) == 2
    count.value += busy(300, 2, W)  # still preempted on 2 threads
    guard.observe(4, 2 * W, count)
    assert guard.allowed(4) == 1
    count.value += busy(300, 1, W)  # one thread cannot be halved: it stays at one
    guard.observe(4, 3 * W, count)
    assert guard.allowed(4) == 1
    t = 2 * W + backoff.HOLD_S  # the hold set by the last halving lapses
    guard.observe(4, t, count)
    assert guard.limit is None and guard.allowed(4) == 4


def test_a_window_is_judged_only_once_complete_and_the_counter_read_only_then():
    guard, count = backoff.Guard(), Counter()
    guard.observe(2, 0.0, count)
    count.value += 10_000
    for now in np.linspace(0.0, 0.9 * W, 10):
        guard.observe(2, float(now), count)
    assert guard.limit is None and count.reads == 1
    guard.observe(2, W, count)
    assert guard.allowed(2) == 1 and count.reads == 2


def test_the_limit_never_raises_a_lower_thread_count():
    guard, count = backoff.Guard(), Counter()
    guard.observe(8, 0.0, count)
    count.value += busy(300, 8, W)
    guard.observe(8, W, count)
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
        with backoff_disabled():
            expected = net.predict(x, batch_size=16)
        assert parallel.threads_for(1 << 24) == 2
        got = net.predict(x, batch_size=16)  # each batch tells backoff: the second one halves
        assert parallel.threads_for(1 << 24) == 1 and parallel.threads_for_groups(8) == 1
        assert parallel.get_num_threads() == 2  # what the user set is unchanged
    # Exact: the kernels sum in the same order whatever the thread count (thread-count invariance).
    np.testing.assert_array_equal(got, expected)


class backoff_disabled:
    def __enter__(self):
        self.saved, backoff.ENABLED = backoff.ENABLED, False

    def __exit__(self, *exc):
        backoff.ENABLED = self.saved
