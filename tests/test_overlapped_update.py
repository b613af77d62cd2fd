"""fit's overlapped optimizer update (training.OverlappedUpdate): each layer's update starts on a
helper thread once the backward has its gradients. Same updates, same values as the step after
the backward; used only where nothing needs all the gradients first."""
import numpy as np
import pytest

import cnnx
from cnnx import parallel, training
from cnnx.layers import Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU
from cnnx.losses import SoftmaxCrossEntropy
from cnnx.optimizers import SGD, Adam, AdamW
from reference import assert_identical_for_any_thread_count


def _network(seed, dtype="float32"):
    gen = np.random.default_rng(seed)
    return cnnx.Network([
        Conv2D(2, 4, 3, padding="same", rng=gen), LeakyReLU(0.1), MaxPool2D(2),
        Conv2D(4, 6, 3, rng=gen), ReLU(), Flatten(),
        Dense(6 * 2 * 2, 16, rng=gen), ReLU(), Dense(16, 3, rng=gen),
    ], input_shape=(2, 8, 8), dtype=dtype)


OPTIMIZERS = {
    "sgd-momentum": lambda: SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda: Adam(lr=1e-2),
    "adamw": lambda: AdamW(lr=1e-2, weight_decay=0.1),
}


def _train(rng_seed, optimizer, overlap, dtype="float32", chunk=None):
    """Weights and optimizer state after three epochs of fit, with the overlap on or off (and
    the update tasks cut into runs of ``chunk`` elements)."""
    data = np.random.default_rng(rng_seed)
    x = data.standard_normal((48, 2, 8, 8))
    y = data.integers(0, 3, 48)
    net = _network(rng_seed, dtype)
    net.compile(SoftmaxCrossEntropy(), OPTIMIZERS[optimizer]())
    used = []
    original = training.OverlappedUpdate.applies

    def applies(*args):
        used.append(original(*args))
        return used[-1] and overlap

    training.OverlappedUpdate.applies = staticmethod(applies)
    default_chunk = training.OverlappedUpdate.CHUNK
    training.OverlappedUpdate.CHUNK = chunk or default_chunk
    try:
        net.fit(x, y, epochs=3, batch_size=16, shuffle=True, seed=1, verbose=0)
    finally:
        training.OverlappedUpdate.applies = staticmethod(original)
        training.OverlappedUpdate.CHUNK = default_chunk
    state = net.optimizer.state_dict()
    weights = net.get_weights()  # copies
    return [weights[k] for k in sorted(weights)] + [state[k] for k in sorted(state)], used


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("chunk", [None, 40], ids=["whole-parameters", "runs-of-32"])
def test_overlapped_update_gives_the_same_weights_and_state_as_the_step_after_backward(optimizer, dtype, chunk):
    with parallel.num_threads(2):
        overlapped, used = _train(3, optimizer, overlap=True, dtype=dtype, chunk=chunk)
        serial, _ = _train(3, optimizer, overlap=False, dtype=dtype)
    assert used == [True]  # the overlap did run
    assert len(overlapped) == len(serial)
    for a, b in zip(overlapped, serial):
        # Bit-exact on purpose: every parameter gets the same update from the same arrays; only
        # the thread and the order of the (independent) parameters change.
        np.testing.assert_array_equal(a, b)


def test_overlapped_training_is_identical_for_any_thread_count():
    assert_identical_for_any_thread_count(lambda: _train(5, "adam", overlap=True)[0], threads=2)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS) + ["sgd-plain", "sgd-nesterov"])
def test_update_tasks_in_any_order_equal_one_step(optimizer, rng):
    make = {**OPTIMIZERS, "sgd-plain": lambda: SGD(lr=0.1),
            "sgd-nesterov": lambda: SGD(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-2)}[optimizer]
    shapes = [(7, 50), (3,), (200,)]  # 350 and 200 elements: several runs of 32, a short last one
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    by_step, by_tasks = make(), make()
    ours = [p.copy() for p in params]
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        by_step.step([(f"{i}.w", p, g) for i, (p, g) in enumerate(zip(params, grads))])
        tasks = by_tasks.update_tasks([(f"{i}.w", p, g) for i, (p, g) in enumerate(zip(ours, grads))], chunk=40)
        assert len(tasks) == 11 + 1 + 7
        for k in rng.permutation(len(tasks)):
            tasks[k]()
        by_tasks.count_step()
        for a, b in zip(params, ours):
            # Exact: each element gets the same arithmetic, only the runs and their order differ.
            np.testing.assert_array_equal(a, b)
    state_a, state_b = by_step.state_dict(), by_tasks.state_dict()
    assert sorted(state_a) == sorted(state_b)
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key])


def _applies(net, sync=None, clip=None):
    with parallel.num_threads(2):
        return training.OverlappedUpdate.applies(net, sync, clip)


def test_overlap_applies_only_where_nothing_needs_all_gradients_first():
    net = _network(0)
    net.compile(SoftmaxCrossEntropy(), Adam())
    assert _applies(net)
    assert not _applies(net, clip=1.0)  # clipping needs the global norm first
    assert not _applies(net, sync=object())  # the allreduce over ranks comes first
    with parallel.num_threads(1):
        assert not training.OverlappedUpdate.applies(net, None, None)

    class WholeStep(SGD):  # a step that may look at every parameter
        def step(self, params):
            super().step(params)

    net.compile(SoftmaxCrossEntropy(), WholeStep(lr=0.1))
    assert not _applies(net)


def test_a_parameter_shared_by_two_layers_trains_with_the_step_after_backward():
    def build():
        gen = np.random.default_rng(0)
        first, second = Dense(5, 5, rng=gen), Dense(5, 5, rng=gen)
        second.params["weight"] = first.params["weight"]  # tied weights
        net = cnnx.Network([first, ReLU(), second, Dense(5, 2, rng=gen)], input_shape=(5,))
        net.compile(SoftmaxCrossEntropy(), SGD(lr=0.1, momentum=0.9))
        return net

    # Its update after the second layer's backward would change what the first one's reads.
    assert not _applies(build())
    x = np.random.default_rng(1).standard_normal((32, 5))
    y = np.arange(32) % 2

    def run():
        net = build()
        net.fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0)
        weights = net.get_weights()
        return [weights[k] for k in sorted(weights)]

    assert_identical_for_any_thread_count(run, threads=2)


def test_an_error_in_an_overlapped_update_is_raised_by_fit():
    net = _network(0)

    class Failing(SGD):
        def _update(self, key, p, grad, state):
            if key.startswith("6."):
                raise RuntimeError(f"update of {key} failed")
            super()._update(key, p, grad, state)

    net.compile(SoftmaxCrossEntropy(), Failing(lr=0.1))
    assert _applies(net)
    x = np.zeros((16, 2, 8, 8))
    with parallel.num_threads(2), pytest.raises(RuntimeError, match="update of 6.weight failed"):
        net.fit(x, np.zeros(16, dtype=int), epochs=1, batch_size=8, verbose=0)
