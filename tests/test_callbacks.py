"""Callbacks: the base class, EarlyStopping (unit and inside fit) and LambdaCallback."""
import math

import numpy as np
import pytest

from cnnx.callbacks import Callback, EarlyStopping, LambdaCallback
from cnnx.layers import Dense, ReLU
from cnnx.losses import SoftmaxCrossEntropy
from cnnx.network import Network
from cnnx.optimizers import SGD


class FakeNetwork:
    """Just what a callback touches: stop_training and get/set_weights."""

    def __init__(self):
        self.stop_training = False
        self.w = 0
        self.restored = None

    def get_weights(self):
        return {"w": self.w}

    def set_weights(self, weights):
        self.restored = weights["w"]


def drive(cb, values, key="val_loss"):
    """Feed ``values`` as successive epochs; return the epoch after which training stopped."""
    net = FakeNetwork()
    cb.set_network(net)
    cb.on_train_begin({})
    for epoch, value in enumerate(values):
        net.w = epoch
        cb.on_epoch_end(epoch, {key: value})
        if net.stop_training:
            break
    cb.on_train_end({})
    return epoch, net


def test_base_callback_hooks_are_no_ops():
    cb = Callback()
    cb.set_network("net")
    assert cb.network == "net"
    for hook in ("on_train_begin", "on_train_end"):
        getattr(cb, hook)({})
    for hook in ("on_epoch_begin", "on_epoch_end", "on_batch_begin", "on_batch_end"):
        getattr(cb, hook)(0, {})
    assert repr(cb) == "Callback()"


@pytest.mark.parametrize(
    "patience, values, stopped",
    [
        (0, [3.0, 2.0, 2.5, 1.0], 2),  # the first epoch without improvement stops
        (1, [3.0, 2.0, 2.5, 1.0], 2),  # as Keras: patience 1 also stops at the first
        (2, [3.0, 2.0, 2.5, 1.0, 1.5, 1.6], 5),  # two epochs in a row without improvement
        (2, [3.0, 2.9, 2.8, 2.7], 3),  # never stops while improving
    ],
    ids=["patience0", "patience1", "patience2", "improving"],
)
def test_early_stopping_patience(patience, values, stopped):
    cb = EarlyStopping(patience=patience)
    epoch, net = drive(cb, values)
    assert epoch == stopped
    assert net.stop_training == (cb.stopped_epoch is not None)
    assert cb.best == min(values[: epoch + 1])


def test_early_stopping_min_delta_and_modes():
    cb = EarlyStopping(patience=0, min_delta=0.1)
    epoch, _ = drive(cb, [1.0, 0.95, 0.5])  # 0.05 is not enough of an improvement
    assert epoch == 1 and cb.best == 1.0
    cb = EarlyStopping(monitor="val_accuracy", patience=0)  # auto -> max
    epoch, _ = drive(cb, [0.5, 0.6, 0.55], key="val_accuracy")
    assert epoch == 2 and cb.best == 0.6 and cb.best_epoch == 1
    cb = EarlyStopping(monitor="loss", mode="max", patience=0)
    epoch, _ = drive(cb, [1.0, 2.0, 1.5], key="loss")
    assert epoch == 2 and cb.best == 2.0


def test_early_stopping_resets_between_fits():
    cb = EarlyStopping(patience=0)
    drive(cb, [1.0, 2.0])
    epoch, net = drive(cb, [5.0, 4.0, 3.0])
    assert epoch == 2 and not net.stop_training and cb.best == 3.0


def test_early_stopping_restores_the_best_epoch():
    cb = EarlyStopping(patience=1, restore_best_weights=True)
    _, net = drive(cb, [3.0, 1.0, 2.0, 2.5])
    assert cb.best_epoch == 1 and net.restored == 1
    _, net = drive(EarlyStopping(patience=5, restore_best_weights=True), [3.0, 2.0, 1.0])
    assert net.restored is None  # the last epoch was the best: nothing to restore
    _, net = drive(EarlyStopping(patience=1), [3.0, 1.0, 2.0, 2.5])
    assert net.restored is None


def test_early_stopping_warns_on_a_missing_metric():
    cb = EarlyStopping(monitor="val_loss")
    cb.set_network(FakeNetwork())
    cb.on_train_begin({})
    with pytest.warns(RuntimeWarning, match=r"val_loss.*\['accuracy', 'loss'\]"):
        cb.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5, "val_loss": math.nan})
    assert not cb.network.stop_training


@pytest.mark.parametrize(
    "kwargs",
    [{"patience": -1}, {"patience": 1.5}, {"min_delta": -0.1}, {"mode": "best"}, {"monitor": 3}],
    ids=["negative-patience", "float-patience", "negative-delta", "mode", "monitor"],
)
def test_early_stopping_rejects_bad_arguments(kwargs):
    with pytest.raises((ValueError, TypeError)):
        EarlyStopping(**kwargs)


def test_early_stopping_inside_fit_restores_best_weights():
    """Validation labels that contradict the training labels: fitting makes val_loss worse, so
    training stops after ``patience`` epochs and the best (first) epoch's weights come back."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (3, 4))
    y = rng.integers(0, 3, 60)
    x = (centers[y] + rng.normal(0, 0.5, (60, 4))).astype(np.float32)
    gen = np.random.default_rng(1)
    net = Network([Dense(4, 16, rng=gen), ReLU(), Dense(16, 3, rng=gen)], input_shape=(4,))
    net.compile(SoftmaxCrossEntropy(), SGD(lr=0.05))
    snapshots = []
    record = LambdaCallback(on_epoch_end=lambda epoch, logs: snapshots.append(net.get_weights()))
    stopper = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    history = net.fit(x, y, epochs=30, batch_size=10, shuffle=False, validation_data=(x, (y + 1) % 3),
                      callbacks=[record, stopper], verbose=0)
    assert stopper.stopped_epoch is not None and len(history["loss"]) == stopper.stopped_epoch + 1 < 30
    best = int(np.argmin(history["val_loss"]))
    assert stopper.best_epoch == best and stopper.stopped_epoch == best + 2
    for key, p, _ in net.parameters():
        np.testing.assert_array_equal(p, snapshots[best][key])


def test_lambda_callback():
    seen = []
    cb = LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append((epoch, logs["loss"])),
                        on_train_begin=lambda logs: seen.append("begin"))
    cb.on_train_begin({})
    cb.on_epoch_end(3, {"loss": 0.5})
    cb.on_batch_end(0, {})  # not given: the base no-op
    assert seen == ["begin", (3, 0.5)]
    assert repr(cb) == "LambdaCallback(on_train_begin, on_epoch_end)"
    with pytest.raises(TypeError, match="on_batch_end"):
        LambdaCallback(on_batch_end=3)
