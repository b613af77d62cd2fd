"""cnnx.plan: which layers a Network fuses, that fusing changes nothing but speed, and that the
plan's per-thread state makes a Network safe to share between threads (and a layer between
networks). Thread-policy tests for cnnx.parallel (nested calls, the BLAS limit) are here too.
"""
import threading

import numpy as np
import pytest

import cnnx
from cnnx import models, parallel
from cnnx.layers import (GELU, AvgPool2D, Conv2D, Dense, Dropout, Flatten, LeakyReLU, MaxPool2D, ReLU,
                         Sigmoid, Tanh)
from cnnx.network import Network
from cnnx.plan import Plan
import reference as ref


def user_style(dtype="float32", seed=0):
    """seed-mnist as the README's quickstart writes it: activations as separate layers."""
    return models.seed_mnist(dtype=dtype, seed=seed, fused=False)


def tiny_user_net(dtype="float64", seed=0):
    gen = np.random.default_rng(seed)
    layers = [Conv2D(1, 3, 3, padding=1, rng=gen), LeakyReLU(0.1), MaxPool2D(2),
              Conv2D(3, 4, 2, padding="same", rng=gen), ReLU(), AvgPool2D(2),
              Flatten(), Dense(16, 8, rng=gen), Tanh(), Dense(8, 5, rng=gen), GELU(), Dense(5, 3, rng=gen)]
    return Network(layers, input_shape=(1, 8, 8), dtype=dtype)


def copy_weights(src, dst):
    """Copy parameters in order (layer indices differ between the fused and separate forms)."""
    for (_, p_dst, _), (_, p_src, _) in zip(dst.parameters(), src.parameters(), strict=True):
        p_dst[...] = p_src


# ---------------------------------------------------------------------- what gets fused -------
def test_plan_fuses_conv_activation_pool_and_dense_activation():
    net = tiny_user_net()
    train = [(s.kind, s.indices) for s in net.plan.train_steps]
    assert train == [("conv+act+pool", (0, 1, 2)), ("conv+act", (3, 4)), ("layer", (5,)),
                     ("layer", (6,)), ("dense+act", (7, 8)), ("dense+act", (9, 10)), ("layer", (11,))]
    infer = [(s.kind, s.indices) for s in net.plan.infer_steps]
    assert infer == train  # AvgPool2D is not fused
    # Inference runs its own conv + pool step, which keeps no argmax.
    assert type(net.plan.infer_steps[0]) is not type(net.plan.train_steps[0])


def test_plan_leaves_what_it_cannot_fuse():
    layers = [Conv2D(1, 2, 3, activation="tanh", rng=0), ReLU(),  # conv has its own activation
              Conv2D(2, 2, 1, rng=1), LeakyReLU(-0.5),  # negative slope: the kernels cannot apply it
              MaxPool2D(2, stride=1),  # not the plain 2x2 / stride-2 pool
              Flatten(), Dense(50, 4, activation="relu", rng=2), Sigmoid()]  # dense has its own
    net = Network(layers, input_shape=(1, 8, 8))
    assert all(s.kind == "layer" for s in net.plan.train_steps + net.plan.infer_steps)
    assert net.plan.infer_steps is net.plan.train_steps


def test_unfused_plan_runs_every_layer_on_its_own():
    net = tiny_user_net()
    net.fuse = False
    assert [s.indices for s in net.plan.train_steps] == [(i,) for i in range(len(net.layers))]
    with pytest.raises(TypeError, match="fuse"):
        net.fuse = 1


def test_plan_is_rebuilt_when_the_layer_list_changes(rng):
    net = tiny_user_net()
    old = net.plan
    assert net.plan is old  # built once
    net.layers[-1] = Dense(5, 3, rng=4).astype(np.float64)
    assert net.plan is not old and net.plan.layers[-1] is net.layers[-1]
    x = rng.standard_normal((2, 1, 8, 8))
    h = x
    for layer in net.layers:
        h = layer.forward(h)
    np.testing.assert_allclose(net.forward(x), h, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- same results ----------
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 2e-5)])
def test_user_style_equals_fused_style_in_training_and_inference(rng, dtype, rtol):
    """seed-mnist with separate activation layers (fused by the plan) against the zoo's
    activation= form and against the unfused plan: forward, gradients, a few fit steps, predict."""
    nets = {"separate": user_style(dtype), "fused_args": models.seed_mnist(dtype=dtype, seed=0)}
    nets["unfused"] = user_style(dtype)
    nets["unfused"].fuse = False
    for net in nets.values():
        copy_weights(nets["separate"], net)
        net.compile("softmax_cross_entropy", cnnx.optimizers.Adam(lr=1e-3))
    assert any(s.kind == "conv+act" for s in nets["separate"].plan.train_steps)
    x = rng.standard_normal((12, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, 12)

    ref = nets["unfused"]
    out_ref = ref.forward(x, training=True)
    grads_ref = [g.copy() for _, _, g in ref.parameters()] if ref.backward(out_ref - 0.1) is None else None
    for name in ("separate", "fused_args"):
        net = nets[name]
        out = net.forward(x, training=True)
        np.testing.assert_allclose(out, out_ref, rtol=rtol, atol=rtol, err_msg=name)
        assert net.backward(out_ref - 0.1) is None
        for (key, _, g), g_ref in zip(net.parameters(), grads_ref, strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * np.abs(g_ref).max(), err_msg=f"{name} {key}")

    histories = {name: net.fit(x, y, epochs=2, batch_size=4, shuffle=False, verbose=0)["loss"]
                 for name, net in nets.items()}
    for name in ("separate", "fused_args"):
        np.testing.assert_allclose(histories[name], histories["unfused"], rtol=10 * rtol, err_msg=name)
        np.testing.assert_allclose(nets[name].predict(x), ref.predict(x), rtol=10 * rtol, atol=10 * rtol)


def test_fused_plan_gradients_match_central_differences():
    """Input and parameter gradients of the fused plan (float64) against finite differences."""
    from gradcheck import numerical_gradient

    net = tiny_user_net()
    assert any(s.kind == "dense+act" for s in net.plan.train_steps)
    gen = np.random.default_rng(3)
    x = gen.standard_normal((2, 1, 8, 8))
    g = gen.standard_normal((2, 3))

    def objective():
        return float(np.sum(net.forward(x, training=True) * g))

    net.forward(x, training=True)
    dx = net.backward(g, need_input_grad=True)
    analytic = {key: grad.copy() for key, _, grad in net.parameters()}
    np.testing.assert_allclose(dx, numerical_gradient(objective, x), rtol=1e-5, atol=1e-7)
    for key, p, _ in net.parameters():
        np.testing.assert_allclose(analytic[key], numerical_gradient(objective, p), rtol=1e-5, atol=1e-7,
                                   err_msg=key)


def test_backward_after_fused_inference_replays_the_forward(rng):
    """An eval forward through conv + act + pool keeps no caches; a backward (saliency) replays it."""
    net = tiny_user_net()
    assert net.plan.infer_steps[0].kind == "conv+act+pool"
    x = rng.standard_normal((3, 1, 8, 8))
    out = net.forward(x)
    dx = net.backward(np.ones_like(out), need_input_grad=True)
    ref = tiny_user_net()
    ref.fuse = False
    ref.forward(x)
    np.testing.assert_allclose(dx, ref.backward(np.ones_like(out), need_input_grad=True), rtol=1e-12, atol=1e-14)


def test_layers_stay_visible(tmp_path, rng):
    """summary, save / load and visualize.activations still see every layer the user wrote."""
    net = user_style()
    assert "LeakyReLU" in net.summary(print_fn=None)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    maps = cnnx.visualize.activations(net, x)
    assert len(maps) == len(net.layers)
    np.testing.assert_allclose(list(maps.values())[-1], net.forward(x), rtol=1e-5, atol=1e-6)
    net.compile("softmax_cross_entropy", "adam")
    net.save(tmp_path / "net")
    loaded = cnnx.load(tmp_path / "net")
    assert [type(a) for a in loaded.layers] == [type(b) for b in net.layers]
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))


# ---------------------------------------------------------------------- threads and sharing ---
def test_predict_from_four_threads_equals_serial_predict(rng):
    net = user_style()
    net.compile("softmax_cross_entropy", "adam")
    inputs = [rng.standard_normal((40, 1, 28, 28)).astype(np.float32) for _ in range(4)]
    serial = [net.predict(x, batch_size=16) for x in inputs]
    results = [None] * 4
    start = threading.Barrier(4)

    def work(k):
        start.wait()
        for _ in range(3):
            results[k] = net.predict(inputs[k], batch_size=16)

    with parallel.num_threads(2):
        ref.run_in_threads(work, 4, timeout=120)
    for k in range(4):
        # A race (a shared buffer) would give wildly different numbers; round-off would not.
        np.testing.assert_allclose(results[k], serial[k], rtol=1e-5, atol=1e-6)


def test_a_layer_object_in_two_networks(rng):
    """The caches live in each network's plan: interleaved calls do not mix them."""
    shared = Conv2D(1, 3, 3, padding=1, rng=0)
    a = Network([shared, ReLU(), Flatten(), Dense(3 * 6 * 6, 2, rng=1)], input_shape=(1, 6, 6), dtype="float64")
    b = Network([shared, Flatten(), Dense(3 * 6 * 6, 4, rng=2)], input_shape=(1, 6, 6), dtype="float64")
    xa, xb = rng.standard_normal((2, 4, 1, 6, 6))
    out_a = a.forward(xa, training=True)
    b.forward(xb, training=True)  # would overwrite a cache kept on the layer
    a.backward(np.ones_like(out_a))
    grad_interleaved = shared.grads["weight"].copy()
    a.forward(xa, training=True)
    a.backward(np.ones_like(out_a))
    np.testing.assert_allclose(grad_interleaved, shared.grads["weight"], rtol=1e-12)


def test_network_never_writes_flags_into_layers(rng):
    net = tiny_user_net()
    before = [dict(layer.__dict__) for layer in net.layers]
    out = net.forward(rng.standard_normal((2, 1, 8, 8)), training=True)
    net.backward(np.ones_like(out))
    for layer, attrs in zip(net.layers, before):
        assert layer.needs_input_grad is True
        assert set(layer.__dict__) == set(attrs)


def test_stateful_layers_still_run_and_are_serialised(rng):
    """A layer on the old protocol (caches on itself) runs through the plan under its lock, and
    still skips its input gradient as the first layer."""
    from cnnx.layers import BatchNorm1D

    net = Network([Flatten(), BatchNorm1D(12), Dense(12, 2, rng=1)], input_shape=(2, 6), dtype="float64")
    bn = net.layers[1]
    assert bn.stateful and net.plan._stateful
    x = rng.standard_normal((5, 2, 6))
    h = x
    for layer in net.layers:
        h = layer.forward(h, True)
    out = net.forward(x, training=True)
    np.testing.assert_allclose(out, h, rtol=1e-12)
    assert net.backward(np.ones_like(out), need_input_grad=True).shape == x.shape
    assert bn.needs_input_grad is True  # set for the call only

    first = Network([BatchNorm1D(4), Dense(4, 2, rng=0)], input_shape=(4,), dtype="float64")
    calls = []
    original = first.layers[0].backward

    def spy(dy):
        calls.append(first.layers[0].needs_input_grad)
        return original(dy)

    first.layers[0].backward = spy
    out = first.forward(rng.standard_normal((3, 4)), training=True)
    assert first.backward(np.ones_like(out)) is None
    assert calls == [False] and first.layers[0].needs_input_grad is True


def test_conv1d_with_an_activation_layer_is_fused_and_equal(rng):
    from cnnx.layers import Conv1D, MaxPool1D

    def build():
        gen = np.random.default_rng(1)
        return Network([Conv1D(2, 3, 3, padding="same", rng=gen), Tanh(), MaxPool1D(2), Flatten(),
                        Dense(12, 2, rng=gen)], input_shape=(2, 8), dtype="float64")

    fused, plain = build(), build()
    plain.fuse = False
    assert fused.plan.train_steps[0].kind == "conv1d+act"
    assert not fused.plan._stateful
    x = rng.standard_normal((4, 2, 8))
    out = fused.forward(x, training=True)
    np.testing.assert_allclose(out, plain.forward(x, training=True), rtol=1e-12)
    dx = fused.backward(np.ones_like(out), need_input_grad=True)
    np.testing.assert_allclose(dx, plain.backward(np.ones_like(out), need_input_grad=True), rtol=1e-12, atol=1e-15)
    for (key, _, a), (_, _, b) in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15, err_msg=key)


def test_nested_parallel_calls_run_inline_instead_of_deadlocking():
    seen = []
    lock = threading.Lock()

    def inner(worker, group):
        assert parallel.in_parallel_region()
        with lock:
            seen.append(group)

    def outer(worker, group):
        parallel.for_each_group(4, inner)

    def run():
        with parallel.num_threads(2):
            parallel.for_each_group(6, outer)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "nested for_each_group deadlocked"
    assert sorted(seen) == sorted(list(range(4)) * 6)
    assert not parallel.in_parallel_region()


def test_blas_limit_holds_while_any_thread_is_inside_and_is_restored_by_the_last():
    """One process-wide limit shared by concurrent callers: nobody restores it under another.

    Limits are set and read from the main thread only: OpenBLAS 0.3.31 ignores
    ``openblas_set_num_threads`` from other threads once the main thread has set it.
    """
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with parallel.single_threaded_blas():
            inside.set()
            leave.wait(60)

    # The main thread leaves first: the limit stays while the other thread is still inside.
    with parallel.single_threaded_blas():
        worker = threading.Thread(target=hold)
        worker.start()
        assert inside.wait(60)
    still = blas_threads()
    leave.set()
    worker.join(60)
    threadpoolctl.threadpool_limits(limits=max(before, default=1), user_api="blas")  # reset for the next phase
    assert all(n == 1 for n in still)

    # The other thread leaves first: the main thread's exit, the last, restores the setting.
    inside.clear()
    leave.clear()
    with parallel.single_threaded_blas():
        worker = threading.Thread(target=hold)
        worker.start()
        assert inside.wait(60)
        leave.set()
        worker.join(60)
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before


def test_dropout_and_plan_in_training(rng):
    """Dropout's mask lives in the plan's state: backward uses the mask of the same forward."""
    cnnx.manual_seed(5)
    net = Network([Flatten(), Dense(16, 8, rng=0), ReLU(), Dropout(0.5), Dense(8, 2, rng=1)], input_shape=(16,),
                  dtype="float64")
    x = rng.standard_normal((6, 16))
    out = net.forward(x, training=True)
    dx = net.backward(np.ones_like(out), need_input_grad=True)
    mask = net.plan.context().states[3].mask
    assert mask is not None and (mask == 0).any()
    # With the mask fixed, the network is linear-piecewise: check dx against the layers by hand.
    d = np.ones_like(out) @ net.layers[4].params["weight"] * mask
    h = x @ net.layers[1].params["weight"].T + net.layers[1].params["bias"]
    d = d * (h > 0)
    np.testing.assert_allclose(dx, d @ net.layers[1].params["weight"], rtol=1e-12)


def test_plan_repr_and_describe():
    plan = Plan(tiny_user_net().layers)
    assert "conv+act" in plan.describe() and "conv+act+pool" in plan.describe(training=False)
    assert "Plan(12 layers" in repr(plan)


def test_a_network_can_be_copied_and_pickled(rng):
    import copy
    import pickle

    net = tiny_user_net()
    x = rng.standard_normal((2, 1, 8, 8))
    expected = net.forward(x)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert twin.plan is not net.plan
        # Exact: same weights through the same deterministic kernels (results never depend on threads).
        np.testing.assert_array_equal(twin.forward(x), expected)


@pytest.mark.parametrize("kwargs", [{"groups": 2}, {"dilation": 2}, {"groups": 4}], ids=["grouped", "dilated", "depthwise"])
def test_grouped_and_dilated_convolutions_fuse_like_plain_ones(rng, kwargs):
    def build():
        gen = np.random.default_rng(2)
        return Network([Conv2D(4, 4, 3, padding="same", rng=gen, **kwargs), LeakyReLU(0.1), MaxPool2D(2),
                        Flatten(), Dense(4 * 4 * 4, 3, rng=gen)], input_shape=(4, 8, 8), dtype="float64")

    fused, plain = build(), build()
    plain.fuse = False
    assert [s.kind for s in fused.plan.infer_steps][0] == "conv+act+pool"
    x = rng.standard_normal((3, 4, 8, 8))
    np.testing.assert_allclose(fused.forward(x), plain.forward(x), rtol=1e-12, atol=1e-14)
    out = fused.forward(x, training=True)
    np.testing.assert_allclose(out, plain.forward(x, training=True), rtol=1e-12, atol=1e-14)
    dx = fused.backward(np.ones_like(out), need_input_grad=True)
    np.testing.assert_allclose(dx, plain.backward(np.ones_like(out), need_input_grad=True), rtol=1e-12, atol=1e-14)
    for (key, _, a), (_, _, b) in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14, err_msg=key)
