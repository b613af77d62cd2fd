"""Network: construction, forward/backward, fit/evaluate/predict, input checks, summary."""
import math

import numpy as np
import pytest

from cnnx.callbacks import Callback, LambdaCallback
from cnnx.layers import Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, ReLU
from cnnx.losses import MSE, SoftmaxCrossEntropy
from cnnx.network import Network, NonFiniteLossError
from cnnx.optimizers import SGD, Adam


# ----------------------------------------------------------------------------- helpers
@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def make_shapes(n, seed, size=16):
    """A learnable 3-class image set: a horizontal bar, a vertical bar or a hollow square,
    at a random place on a noisy background."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.2, (n, 1, size, size)).astype(np.float32)
    y = np.arange(n) % 3
    rng.shuffle(y)
    for i, c in enumerate(y):
        r, q = rng.integers(0, size - 7, 2)
        if c == 0:
            x[i, 0, r + 3 : r + 5, q : q + 7] += 1.0
        elif c == 1:
            x[i, 0, r : r + 7, q + 3 : q + 5] += 1.0
        else:
            x[i, 0, r : r + 7, q] += 1.0
            x[i, 0, r : r + 7, q + 6] += 1.0
            x[i, 0, r, q : q + 7] += 1.0
            x[i, 0, r + 6, q : q + 7] += 1.0
    return x, y


def small_convnet(seed=0, dtype="float32", size=16, classes=3):
    """A seed-mnist-like network scaled down for fast tests."""
    gen = np.random.default_rng(seed)
    half = size // 2
    return Network(
        [
            Conv2D(1, 4, 2, padding="same", activation="leaky_relu", rng=gen),
            MaxPool2D(2),
            Conv2D(4, 8, 2, padding="same", rng=gen),
            LeakyReLU(0.01),
            Flatten(),
            Dense(8 * half * half, 32, activation="leaky_relu", rng=gen),
            Dense(32, classes, rng=gen),
        ],
        input_shape=(1, size, size),
        dtype=dtype,
    )


def mlp(seed=0, dtype="float32", n_in=6, classes=3):
    gen = np.random.default_rng(seed)
    return Network([Dense(n_in, 16, rng=gen), ReLU(), Dense(16, classes, rng=gen)], input_shape=(n_in,), dtype=dtype)


def blobs(n, seed, n_in=6, classes=3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, n_in))
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(0, 1, (n, n_in))).astype(np.float32)
    return x, y


def weights(net):
    return {k: p.copy() for k, p, _ in net.parameters()}


# ----------------------------------------------------------------------------- construction
def test_shapes_and_parameters():
    net = small_convnet()
    assert net.input_shape == (1, 16, 16)
    assert net.output_shape == (3,)
    assert net.shapes[0] == (4, 16, 16) and net.shapes[1] == (4, 8, 8)
    keys = [k for k, _, _ in net.parameters()]
    assert keys == ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias", "6.weight", "6.bias"]
    expected = (4 * 1 * 4 + 4) + (8 * 4 * 4 + 8) + (8 * 8 * 8 * 32 + 32) + (32 * 3 + 3)
    assert net.num_params == expected
    assert len(net) == 7
    # The network writes no flags into its layers: the plan passes need_input_grad per call.
    assert all(layer.needs_input_grad for layer in net.layers)


def test_parameters_are_rebuilt_each_call():
    net = mlp()
    new_grad = np.ones_like(net.layers[0].grads["weight"])
    net.layers[0].grads["weight"] = new_grad
    assert net.parameters()[0][2] is new_grad


def test_shape_mismatch_names_layer_index_and_class():
    with pytest.raises(ValueError, match=r"Layer 2 \(Dense\).*\(4, 8, 8\)"):
        Network([Conv2D(1, 4, 3, padding=1), MaxPool2D(2), Dense(10, 3)], input_shape=(1, 16, 16))
    with pytest.raises(ValueError, match=r"Layer 0 \(Conv2D\)"):
        Network([Conv2D(3, 4, 3)], input_shape=(1, 16, 16))


def test_constructor_rejects_bad_arguments():
    with pytest.raises(TypeError, match="index 1"):
        Network([Dense(4, 4), "relu"], input_shape=(4,))
    with pytest.raises(ValueError, match="at least one layer"):
        Network([], input_shape=(4,))
    dense = Dense(4, 4)
    with pytest.raises(ValueError, match="more than once"):
        Network([dense, dense], input_shape=(4,))
    with pytest.raises(ValueError, match="float32' or 'float64"):
        Network([Dense(4, 4)], input_shape=(4,), dtype="int32")
    with pytest.raises(ValueError, match="positive ints"):
        Network([Dense(4, 4)], input_shape=(0,))


def test_dtype_casts_layers():
    net = mlp(dtype="float64")
    assert all(p.dtype == np.float64 and g.dtype == np.float64 for _, p, g in net.parameters())
    out = net.forward(np.zeros((2, 6), dtype=np.float32))
    assert out.dtype == np.float64


def test_float32_contiguous_input_is_not_copied(rng):
    net = mlp()
    x = rng.normal(size=(5, 6)).astype(np.float32)
    assert net.check_inputs(x, "x") is x
    assert net.check_inputs(x.astype(np.float64), "x").dtype == np.float32


# ----------------------------------------------------------------------------- forward / backward
def test_backward_input_grad_only_when_asked(rng):
    net = small_convnet()
    x = rng.normal(size=(2, 1, 16, 16)).astype(np.float32)
    out = net(x)
    assert out.shape == (2, 3)
    assert net.backward(np.ones_like(out)) is None
    net.forward(x)
    dx = net.backward(np.ones_like(out), need_input_grad=True)
    assert dx.shape == x.shape and np.abs(dx).sum() > 0
    assert net.layers[0].needs_input_grad is True  # untouched: the flag is passed per call


def test_full_network_gradient_check_float64(rng):
    """net.backward against central differences of the loss, w.r.t. the input and parameters."""
    gen = np.random.default_rng(7)
    net = Network(
        [
            Conv2D(2, 3, (3, 2), padding=1, activation="leaky_relu", negative_slope=0.1, rng=gen),
            MaxPool2D(2),
            Conv2D(3, 2, 2, padding="same", rng=gen),
            LeakyReLU(0.1),
            Flatten(),
            Dense(2 * 3 * 4, 4, activation="leaky_relu", negative_slope=0.1, rng=gen),
            Dense(4, 3, rng=gen),
        ],
        input_shape=(2, 6, 7),
        dtype="float64",
    )
    loss = SoftmaxCrossEntropy()
    x = rng.normal(size=(3, 2, 6, 7))
    y = np.array([0, 2, 1])

    def f():
        return loss.forward(net.forward(x), y)

    f()
    dx = net.backward(loss.backward(), need_input_grad=True)
    analytic = {k: g.copy() for k, _, g in net.parameters()}
    h = 1e-6
    num_dx = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        up = f()
        x[idx] = old - h
        down = f()
        x[idx] = old
        num_dx[idx] = (up - down) / (2 * h)
    np.testing.assert_allclose(dx, num_dx, rtol=1e-5, atol=1e-8)
    for key, p, _ in net.parameters():
        num = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + h
            up = f()
            p[idx] = old - h
            down = f()
            p[idx] = old
            num[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(analytic[key], num, rtol=1e-5, atol=1e-8, err_msg=key)


# ----------------------------------------------------------------------------- training
def test_overfits_a_small_batch():
    x, y = make_shapes(16, seed=3)
    net = small_convnet(seed=1).compile(SoftmaxCrossEntropy(), Adam(lr=1e-2))
    history = net.fit(x, y, epochs=60, batch_size=16, shuffle=False, verbose=0)
    assert history["loss"][-1] < 0.02
    assert history["accuracy"][-1] == 1.0


def test_learns_synthetic_shapes_well_above_chance():
    x, y = make_shapes(300, seed=11)
    x_test, y_test = make_shapes(150, seed=12)
    net = small_convnet(seed=0).compile("softmax_cross_entropy", Adam(lr=1e-2))
    net.fit(x, y, epochs=8, batch_size=32, seed=0, verbose=0)
    result = net.evaluate(x_test, y_test)
    assert result["accuracy"] > 0.85  # chance is 1/3
    assert result["loss"] < 0.4


def test_shuffle_false_is_reproducible():
    x, y = make_shapes(64, seed=5)
    runs = []
    for _ in range(2):
        net = small_convnet(seed=4).compile(SoftmaxCrossEntropy(), SGD(lr=0.05, momentum=0.9))
        hist = net.fit(x, y, epochs=3, batch_size=10, shuffle=False, verbose=0)
        runs.append((hist, weights(net)))
    assert runs[0][0] == runs[1][0]
    for key in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][key], runs[1][1][key])


def test_shuffle_seed_is_reproducible_and_changes_the_order():
    x, y = blobs(60, seed=0)
    hists = []
    for seed in (3, 3, 4):
        net = mlp(seed=0).compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
        hists.append(net.fit(x, y, epochs=2, batch_size=8, seed=seed, verbose=0))
    assert hists[0] == hists[1]
    assert hists[0] != hists[2]


def test_one_hot_and_id_labels_train_identically():
    x, y = blobs(40, seed=1)
    one_hot = np.eye(3, dtype=np.float32)[y]
    hists = []
    for labels in (y, one_hot):
        net = mlp(seed=0).compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
        hists.append(net.fit(x, labels, epochs=2, batch_size=7, shuffle=False, verbose=0))
    np.testing.assert_allclose(hists[0]["loss"], hists[1]["loss"], rtol=1e-5)
    assert hists[0]["accuracy"] == hists[1]["accuracy"]


def test_history_grows_across_fit_calls_and_stays_aligned():
    x, y = blobs(30, seed=2)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    h = net.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert h is net.history and set(h) == {"loss", "accuracy"}
    assert len(h["loss"]) == len(h["accuracy"]) == 2
    net.fit(x, y, epochs=3, batch_size=8, validation_data=(x[:10], y[:10]), verbose=0)
    assert set(h) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 5 for v in h.values())
    assert math.isnan(h["val_loss"][0]) and math.isnan(h["val_loss"][1])
    assert all(isinstance(v, float) and 0 <= v for v in h["val_loss"][2:])
    net.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(len(v) == 6 for v in h.values()) and math.isnan(h["val_accuracy"][-1])


def test_epoch_metrics_are_batch_size_weighted_means():
    x, y = blobs(10, seed=3)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    seen = []
    cb = LambdaCallback(on_batch_end=lambda b, logs: seen.append((logs["size"], logs["loss"], logs["accuracy"])))
    h = net.fit(x, y, epochs=1, batch_size=4, shuffle=False, callbacks=[cb], verbose=0)
    assert [s for s, _, _ in seen] == [4, 4, 2]
    assert h["loss"][0] == pytest.approx(sum(s * l for s, l, _ in seen) / 10)
    assert h["accuracy"][0] == pytest.approx(sum(s * a for s, _, a in seen) / 10)


def test_validation_metrics_match_evaluate():
    x, y = blobs(40, seed=4)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    h = net.fit(x[:30], y[:30], epochs=1, batch_size=8, validation_data=(x[30:], y[30:]), verbose=0)
    res = net.evaluate(x[30:], y[30:], batch_size=3)
    assert h["val_loss"][0] == pytest.approx(res["loss"], rel=1e-5)
    assert h["val_accuracy"][0] == pytest.approx(res["accuracy"])


def test_nan_loss_names_epoch_and_batch():
    x, y = blobs(40, seed=5)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))

    def poison(batch, logs):
        if len(net.history["loss"]) == 1 and batch == 2:  # second epoch, third batch
            net.layers[0].params["weight"][0, 0] = np.nan

    with pytest.raises(FloatingPointError, match=r"epoch 2/3, batch 4/5") as info:
        net.fit(x, y, epochs=3, batch_size=8, shuffle=False, callbacks=[LambdaCallback(on_batch_end=poison)], verbose=0)
    assert isinstance(info.value, NonFiniteLossError)
    assert (info.value.epoch, info.value.batch) == (1, 3)


def test_callbacks_called_in_order_and_stop_training_honoured():
    calls = []

    class Recorder(Callback):
        def on_train_begin(self, logs=None):
            calls.append("train_begin")

        def on_epoch_begin(self, epoch, logs=None):
            calls.append(f"epoch_begin {epoch}")

        def on_batch_begin(self, batch, logs=None):
            calls.append(f"batch_begin {batch}")

        def on_batch_end(self, batch, logs=None):
            calls.append(f"batch_end {batch}")

        def on_epoch_end(self, epoch, logs=None):
            calls.append(f"epoch_end {epoch} {sorted(logs)}")
            if epoch == 1:
                self.network.stop_training = True

        def on_train_end(self, logs=None):
            calls.append("train_end")

    x, y = blobs(12, seed=6)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    h = net.fit(x, y, epochs=5, batch_size=6, callbacks=[Recorder()], verbose=0)
    assert len(h["loss"]) == 2
    epoch = ["batch_begin 0", "batch_end 0", "batch_begin 1", "batch_end 1"]
    assert calls == (
        ["train_begin", "epoch_begin 0", *epoch, "epoch_end 0 ['accuracy', 'loss']"]
        + ["epoch_begin 1", *epoch, "epoch_end 1 ['accuracy', 'loss']", "train_end"]
    )


def test_stop_training_mid_epoch_records_the_partial_epoch():
    x, y = blobs(40, seed=7)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    batches = []

    def stop(batch, logs):
        batches.append(batch)
        if batch == 1:
            net.stop_training = True

    h = net.fit(x, y, epochs=3, batch_size=8, callbacks=[LambdaCallback(on_batch_end=stop)], verbose=0)
    assert batches == [0, 1] and len(h["loss"]) == 1


def test_progress_bar_output(capsys):
    x, y = blobs(20, seed=8)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    net.fit(x, y, epochs=2, batch_size=5, validation_data=(x, y), verbose=1)
    err = capsys.readouterr().err
    assert "Epoch 1/2" in err and "Epoch 2/2" in err and "batch" in err and "val_acc=" in err
    net.fit(x, y, epochs=1, batch_size=5, verbose=0)
    assert capsys.readouterr().err == ""
    net.fit(x, y, epochs=1, batch_size=5, verbose=2)
    assert "Epoch 1/1: loss=" in capsys.readouterr().err


# ----------------------------------------------------------------------------- input checks
def _fit_error(net, *args, **kwargs):
    """Run fit expecting an error; check nothing happened before it was raised."""
    before = weights(net)
    started = []
    kwargs.setdefault("callbacks", [LambdaCallback(on_train_begin=lambda logs: started.append(1))])
    kwargs.setdefault("verbose", 0)
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        net.fit(*args, **kwargs)
    assert started == [] and net.history["loss"] == []
    for key, p in before.items():
        np.testing.assert_array_equal(dict((k, q) for k, q, _ in net.parameters())[key], p)
    return info


@pytest.fixture
def conv_data():
    x, y = make_shapes(12, seed=9)
    net = small_convnet().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    return net, x, y


def test_fit_rejects_missing_channel_axis_with_a_hint(conv_data):
    net, x, y = conv_data
    info = _fit_error(net, x[:, 0], y)
    assert info.type is ValueError and "(n, 1, 16, 16)" in str(info.value) and "x[:, None]" in str(info.value)


def test_fit_rejects_wrong_shape(conv_data):
    net, x, y = conv_data
    info = _fit_error(net, x[:, :, :8], y)
    assert "received: (12, 1, 8, 16)" in str(info.value)


def test_fit_rejects_labels_out_of_range(conv_data):
    net, x, y = conv_data
    bad = y.copy()
    bad[3] = 3
    info = _fit_error(net, x, bad)
    assert "[0, 3)" in str(info.value) and "[0, 3]" in str(info.value)
    _fit_error(net, x, y - 1)


def test_fit_rejects_length_mismatch(conv_data):
    net, x, y = conv_data
    info = _fit_error(net, x, y[:-1])
    assert "12 rows" in str(info.value) and "(11,)" in str(info.value)


def test_fit_rejects_bad_labels(conv_data):
    net, x, y = conv_data
    info = _fit_error(net, x, np.eye(4)[y])  # one-hot of the wrong width
    assert "(n, 3)" in str(info.value)
    _fit_error(net, x, y + 0.5)  # not class ids
    _fit_error(net, x, np.array(["a"] * 12))


def test_fit_rejects_non_finite_inputs(conv_data):
    net, x, y = conv_data
    x = x.copy()
    x[5, 0, 3, 3] = np.nan
    info = _fit_error(net, x, y)
    assert "finite" in str(info.value) and "index 5" in str(info.value)
    x = x.astype(np.float64)
    x[5, 0, 3, 3] = 1e39  # finite in float64, inf once cast to float32
    _fit_error(net, x, y)


def test_fit_rejects_bad_options(conv_data):
    net, x, y = conv_data
    _fit_error(net, x, y, batch_size=0)
    _fit_error(net, x, y, epochs=1.5)
    _fit_error(net, x, y, verbose=3)
    _fit_error(net, x, y, validation_data=(x,))
    info = _fit_error(net, x, y, validation_data=(x, y[:5]))
    assert "y_val" in str(info.value)
    _fit_error(net, x, y, callbacks=["not a callback"])


def test_fit_requires_compile():
    x, y = make_shapes(6, seed=1)
    net = small_convnet()
    info = _fit_error(net, x, y)
    assert info.type is RuntimeError and "compile" in str(info.value)
    with pytest.raises(RuntimeError, match="compile"):
        net.evaluate(x, y)


def test_compile_accepts_names():
    net = mlp().compile("softmax_cross_entropy", "adam")
    assert isinstance(net.loss, SoftmaxCrossEntropy) and isinstance(net.optimizer, Adam)
    with pytest.raises(ValueError):
        mlp().compile("no_such_loss", "adam")


# ----------------------------------------------------------------------------- evaluate / predict
def test_evaluate_matches_a_manual_computation(rng):
    x, y = blobs(23, seed=9)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    res = net.evaluate(x, y, batch_size=5)
    assert set(res) == {"loss", "accuracy"} and all(isinstance(v, float) for v in res.values())
    out = net.forward(x).copy()
    assert res["loss"] == pytest.approx(SoftmaxCrossEntropy().forward(out, y), rel=1e-5)
    assert res["accuracy"] == pytest.approx(np.mean(out.argmax(1) == y))


def test_predict_returns_probabilities_for_the_softmax_loss(rng):
    net = small_convnet().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    x = rng.normal(size=(11, 1, 16, 16)).astype(np.float32)
    p = net.predict(x, batch_size=4)
    assert p.shape == (11, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert (p >= 0).all()
    np.testing.assert_allclose(p, net.predict(x, batch_size=256), rtol=1e-5)
    np.testing.assert_array_equal(net.predict_classes(x), p.argmax(1))


def test_predict_returns_raw_outputs_otherwise(rng):
    x = rng.normal(size=(4, 6)).astype(np.float32)
    net = mlp()
    raw = net.forward(x).copy()
    np.testing.assert_allclose(net.predict(x), raw, rtol=1e-6)  # not compiled
    net.compile(MSE(), SGD(lr=0.1))
    np.testing.assert_allclose(net.predict(x), raw, rtol=1e-6)


def test_mse_takes_class_ids_as_one_hot_rows():
    x, y = blobs(30, seed=10)
    net = mlp().compile(MSE(), SGD(lr=0.05))
    h = net.fit(x, y, epochs=2, batch_size=10, verbose=0)
    assert len(h["loss"]) == 2 and np.isfinite(h["loss"]).all()


def test_predict_runs_in_eval_mode(rng):
    from cnnx.layers import Dropout

    net = Network([Dense(6, 8), Dropout(0.5), Dense(8, 3)], input_shape=(6,)).compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    x = rng.normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_array_equal(net.predict(x), net.predict(x))


# ----------------------------------------------------------------------------- display
def test_summary_table():
    net = small_convnet()
    lines = []
    text = net.summary(print_fn=lines.append)
    assert lines == [text]
    assert f"Total params: {net.num_params:,}" in text
    assert "Conv2D + leaky_relu(0.01)" in text  # a fused activation is shown
    assert "(8, 8, 8)" in text and "MaxPool2D" in text
    assert net.summary(print_fn=None) == text


def test_repr_lists_layers():
    text = repr(mlp())
    assert text.startswith("Network(input_shape=(6,), dtype='float32'")
    assert "(0) Dense(" in text and "(1) ReLU(" in text


def test_get_and_set_weights_roundtrip():
    net = mlp(seed=0)
    saved = net.get_weights()
    for _, p, _ in net.parameters():
        p += 1
    net.set_weights(saved)
    for key, p, _ in net.parameters():
        np.testing.assert_array_equal(p, saved[key])
    with pytest.raises(ValueError, match="missing"):
        net.set_weights({})


def test_fit_appends_to_a_replaced_history():
    x, y = blobs(20, seed=11)
    net = mlp().compile(SoftmaxCrossEntropy(), SGD(lr=0.1))
    net.history = {}  # e.g. set by a loader
    h = net.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert set(h) == {"loss", "accuracy"} and all(len(v) == 2 for v in h.values())


def test_regression_targets_report_no_accuracy():
    import cnnx
    """An autoencoder's targets are images, not classes: accuracy is NaN, not an argmax of pixels."""
    import math
    from cnnx.layers import Dense, Sigmoid
    rng = np.random.default_rng(0)
    x = rng.random((32, 6)).astype(np.float32)
    net = cnnx.Network([Dense(6, 3, rng=0), Dense(3, 6, rng=1), Sigmoid()], input_shape=(6,))
    net.compile("mse", cnnx.optimizers.Adam(lr=1e-2))
    history = net.fit(x, x, epochs=2, batch_size=8, verbose=0)
    assert all(math.isnan(a) for a in history["accuracy"])
    assert history["loss"][1] < history["loss"][0]
    assert math.isnan(net.evaluate(x, x)["accuracy"])


def test_reused_conv_outputs_are_invisible():
    """Network lets a Conv2D reuse its output buffer only where the next layer writes a new array:
    outputs returned earlier stay intact, and training gives bit-identical results either way."""
    import cnnx

    def build(reuse):
        # conv -> conv: the first writes into a reused buffer; so does the pooled conv + max-pool
        # step, whose output a Flatten (a view) hands to a Dense layer.
        net = Network([Conv2D(1, 4, 3, padding=1, activation="leaky_relu", rng=0),
                       Conv2D(4, 4, 3, padding=1, activation="relu", rng=1), MaxPool2D(2), Flatten(),
                       Dense(4 * 14 * 14, 10, rng=2)], input_shape=(1, 28, 28))
        if not reuse:
            for step in net.plan.train_steps + net.plan.infer_steps:
                step.reuse_output = step.reuse_input_grad = False
        net.compile("softmax_cross_entropy", cnnx.optimizers.Adam(lr=1e-3))
        return net

    net = build(reuse=True)
    assert [step.reuse_output for step in net.plan.train_steps][:3] == [True, True, False]
    # The second conv's input gradient goes to the first conv only: a reused buffer.
    assert [step.reuse_input_grad for step in net.plan.train_steps] == [False, True, False, False]
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((2, 4, 1, 28, 28)).astype(np.float32)
    first = net.forward(x1)
    kept = first.copy()
    net.forward(x2)
    np.testing.assert_array_equal(first, kept)

    x = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    histories = [build(reuse).fit(x, y, epochs=2, batch_size=8, shuffle=False, verbose=0) for reuse in (True, False)]
    assert histories[0] == histories[1]


def test_pooled_training_step_never_reuses_the_network_output():
    """A conv + max-pool training step whose output is the network's output (or goes to a
    Flatten that is last) writes a new array each call: outputs returned earlier stay intact."""
    for tail in ([], [Flatten()]):
        net = Network([Conv2D(1, 2, 3, padding=1, rng=0), MaxPool2D(2)] + tail, input_shape=(1, 8, 8))
        assert net.plan.train_steps[0].kind == "conv+pool"
        assert net.plan.train_steps[0].reuse_output is False
        rng = np.random.default_rng(0)
        first = net.forward(rng.standard_normal((2, 1, 8, 8)).astype(np.float32), training=True)
        kept = first.copy()
        net.forward(rng.standard_normal((2, 1, 8, 8)).astype(np.float32), training=True)
        np.testing.assert_array_equal(first, kept)  # exact: the same array, untouched


def test_inference_fuses_conv_and_max_pool_without_changing_results():
    """Eval-mode forwards run Conv2D + MaxPool2D(2) as one kernel pass; outputs are bit-identical
    to the layer-by-layer pass, and a backward after it (saliency maps) still works."""
    import cnnx

    net = cnnx.models.lenet5(seed=0)
    fused = [step.indices for step in net.plan.infer_steps if step.kind == "conv+pool"]
    assert fused == [(0, 1), (2, 3)]
    x = np.random.default_rng(1).standard_normal((5, 1, 28, 28)).astype(np.float32)
    fused = net.forward(x)
    plain = x
    for layer in net.layers:
        plain = layer.forward(plain, False)
    np.testing.assert_array_equal(fused, plain)

    net.forward(x)
    dx = net.backward(np.ones_like(fused), need_input_grad=True)
    net.forward_checked(x, True)  # unfused: caches filled layer by layer (no Dropout in lenet5)
    np.testing.assert_array_equal(dx, net.backward(np.ones_like(fused), need_input_grad=True))
