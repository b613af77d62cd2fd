"""Losses (cnnx.losses) and metrics (cnnx.metrics).

Values are checked against naive formulas, gradients against central differences in float64,
both target formats (class ids and one-hot / probability rows); torch.nn.functional is a second
reference when torch is installed.
"""
import numpy as np
import pytest

from cnnx import losses, metrics


def numeric_grad(f, x, h=1e-6):
    """Central differences of the scalar function f at x (float64)."""
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f(x)
        flat[i] = old - h
        down = f(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return g


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def onehot(ids, k):
    return np.eye(k)[ids]


# ------------------------------------------------------------------------------------------------
# Cases: (loss, pred, target, naive value) built from a seeded rng, float64
# ------------------------------------------------------------------------------------------------
N, K = 5, 4


def _case(name, rng):
    z = rng.normal(size=(N, K)) * 2
    ids = rng.integers(0, K, N)
    rows = rng.dirichlet(np.ones(K), N)
    if name == "mse":
        p, t = rng.normal(size=(N, 3)), rng.normal(size=(N, 3))
        return losses.MSE(), p, t, np.mean((p - t) ** 2)
    if name == "mse-4d":
        p, t = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
        return losses.MSE(), p, t, np.mean((p - t) ** 2)
    if name == "mse-column":
        p, t = rng.normal(size=(N, 1)), rng.normal(size=N)
        return losses.MSE(), p, t, np.mean((p[:, 0] - t) ** 2)
    if name in ("bce-hard", "bce-soft"):
        p = rng.uniform(0.05, 0.95, size=(N, 3))
        t = rng.integers(0, 2, (N, 3)).astype(float) if name == "bce-hard" else rng.uniform(size=(N, 3))
        return losses.BinaryCrossEntropy(), p, t, -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
    if name == "bce-column":
        p, t = rng.uniform(0.05, 0.95, size=(N, 1)), rng.integers(0, 2, N)
        return losses.BinaryCrossEntropy(), p, t, -np.mean(t * np.log(p[:, 0]) + (1 - t) * np.log(1 - p[:, 0]))
    if name == "bce-logits":
        x, t = rng.normal(size=(N, 3)) * 3, rng.uniform(size=(N, 3))
        s = 1 / (1 + np.exp(-x))
        return losses.BinaryCrossEntropyWithLogits(), x, t, -np.mean(t * np.log(s) + (1 - t) * np.log(1 - s))
    if name == "ce-ids":
        # probabilities kept away from 0 so central differences stay accurate
        p = softmax(z / 4)
        return losses.CrossEntropy(), p, ids, -np.mean(np.log(p[np.arange(N), ids]))
    if name == "ce-rows":
        p = softmax(z / 4)
        return losses.CrossEntropy(), p, rows, -np.mean((rows * np.log(p)).sum(axis=1))
    if name == "sce-ids":
        return losses.SoftmaxCrossEntropy(), z, ids, -np.mean(np.log(softmax(z)[np.arange(N), ids]))
    if name == "sce-onehot":
        t = onehot(ids, K)
        return losses.SoftmaxCrossEntropy(), z, t, -np.mean((t * np.log(softmax(z))).sum(axis=1))
    if name == "sce-rows":
        return losses.SoftmaxCrossEntropy(), z, rows, -np.mean((rows * np.log(softmax(z))).sum(axis=1))
    if name in ("sce-ids-smooth", "sce-rows-smooth"):
        eps = 0.1
        t = onehot(ids, K) if name == "sce-ids-smooth" else rows
        ts = (1 - eps) * t + eps / K
        target = ids if name == "sce-ids-smooth" else rows
        return losses.SoftmaxCrossEntropy(eps), z, target, -np.mean((ts * np.log(softmax(z))).sum(axis=1))
    raise KeyError(name)


CASES = [
    "mse", "mse-4d", "mse-column", "bce-hard", "bce-soft", "bce-column", "bce-logits",
    "ce-ids", "ce-rows", "sce-ids", "sce-onehot", "sce-rows", "sce-ids-smooth", "sce-rows-smooth",
]


@pytest.mark.parametrize("name", CASES)
def test_value_matches_naive_formula(name, rng):
    loss, pred, target, expected = _case(name, rng)
    value = loss.forward(pred, target)
    assert isinstance(value, float)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("name", CASES)
def test_gradient_matches_central_differences(name, rng):
    loss, pred, target, _ = _case(name, rng)
    loss.forward(pred, target)
    grad = loss.backward()
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    expected = numeric_grad(lambda x: type(loss)(**loss.get_config()).forward(x, target), pred.copy())
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_float32_keeps_dtype_and_agrees_with_float64(name, rng):
    loss, pred, target, expected = _case(name, rng)
    value64 = loss.forward(pred, target)
    grad64 = loss.backward()
    value32 = loss.forward(pred.astype(np.float32), target)
    grad32 = loss.backward()
    assert isinstance(value32, float)
    assert grad32.dtype == np.float32 and grad32.shape == pred.shape
    assert value32 == pytest.approx(value64, rel=1e-5)
    np.testing.assert_allclose(grad32, grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_backward_is_repeatable_and_does_not_touch_inputs(name, rng):
    loss, pred, target, _ = _case(name, rng)
    pred_copy, target_copy = pred.copy(), np.array(target, copy=True)
    loss.forward(pred, target)
    first = loss.backward()
    second = loss.backward()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(target, target_copy)


def test_integer_valued_float_ids_equal_int_ids(rng):
    z, ids = rng.normal(size=(N, K)), rng.integers(0, K, N)
    for loss in (losses.SoftmaxCrossEntropy(), losses.CrossEntropy()):
        pred = z if loss.from_logits else softmax(z)
        assert loss.forward(pred, ids.astype(float)) == loss.forward(pred, ids)


def test_onehot_and_ids_give_the_same_gradient(rng):
    z, ids = rng.normal(size=(N, K)), rng.integers(0, K, N)
    for loss in (losses.SoftmaxCrossEntropy(0.2), losses.CrossEntropy()):
        pred = z if loss.from_logits else softmax(z)
        a = loss.forward(pred, ids)
        ga = loss.backward()
        b = loss.forward(pred, onehot(ids, K))
        gb = loss.backward()
        assert a == pytest.approx(b, rel=1e-14)
        np.testing.assert_allclose(ga, gb, rtol=1e-14, atol=1e-16)


# ------------------------------------------------------------------------------------------------
# Stability at extremes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_stable_for_huge_logits(dtype):
    z = np.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 999.0]], dtype=dtype)
    loss = losses.SoftmaxCrossEntropy()
    value = loss.forward(z, np.array([1, 1]))
    grad = loss.backward()
    # row 0: logsumexp = 1000, z[1] = -1000 -> 2000; row 1: log(1 + e^-1) ~ 0.3133
    assert np.isfinite(value)
    assert value == pytest.approx((2000.0 + np.log1p(np.exp(-1.0))) / 2, rel=1e-6)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad[0], [0.5, -0.5, 0.0], atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_with_logits_stable_for_huge_logits(dtype):
    x = np.array([[1000.0], [-1000.0], [1000.0]], dtype=dtype)
    loss = losses.BinaryCrossEntropyWithLogits()
    value = loss.forward(x, np.array([1.0, 0.0, 0.0]))
    grad = loss.backward()
    assert value == pytest.approx(1000.0 / 3, rel=1e-6)
    np.testing.assert_allclose(grad[:, 0], [0.0, 0.0, 1 / 3], atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_losses_clip_saturated_predictions(dtype):
    p = np.array([[0.0], [1.0], [1.0]], dtype=dtype)
    for loss, target in ((losses.BinaryCrossEntropy(), np.array([1.0, 0.0, 1.0])),):
        value = loss.forward(p, target)
        grad = loss.backward()
        assert np.isfinite(value) and value > 10
        assert np.isfinite(grad).all()
        # a saturated wrong prediction is still pushed the right way
        assert grad[0, 0] < 0 and grad[1, 0] > 0
    probs = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=dtype)
    loss = losses.CrossEntropy()
    value = loss.forward(probs, np.array([0, 0]))
    grad = loss.backward()
    assert value == pytest.approx(-np.log(1e-7) / 2, rel=1e-4)
    assert np.isfinite(grad).all() and grad[0, 0] < 0


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
CLASSIFIERS = [losses.SoftmaxCrossEntropy, losses.CrossEntropy]


@pytest.mark.parametrize("cls", CLASSIFIERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "target, match",
    [
        (np.array([0, 1, 4]), r"class ids in \[0, 4\).*4"),
        (np.array([0, -1, 2]), r"class ids in \[0, 4\).*-1"),
        (np.array([0.0, 1.5, 2.0]), "integer class ids.*1.5"),
        (np.array([0.0, np.nan, 2.0]), "finite"),
        (np.array([0, 1]), "3 class ids"),
        (np.eye(4)[[0, 1, 2]][:, :3], r"shape \(3, 4\)"),
        (np.array([[1.0, 0, 0, 0], [0, np.nan, 0, 0], [0, 0, 1, 0]]), "finite"),
        (np.zeros((3, 4, 1)), r"class ids \(n,\) or one-hot"),
    ],
    ids=["id-too-big", "id-negative", "non-integer-id", "nan-id", "short", "rows-shape", "nan-row", "3d"],
)
def test_classification_target_errors(cls, target, match, rng):
    pred = softmax(rng.normal(size=(3, 4)))
    with pytest.raises(ValueError, match=match):
        cls().forward(pred, target)


@pytest.mark.parametrize("cls", CLASSIFIERS, ids=lambda c: c.__name__)
def test_classification_pred_errors(cls):
    with pytest.raises(ValueError, match=r"pred of shape \(n, classes\)"):
        cls().forward(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="float32 or float64.*int64"):
        cls().forward(np.zeros((3, 2), dtype=np.int64), np.array([0, 1, 1]))
    with pytest.raises(TypeError, match="numpy array.*list"):
        cls().forward([[0.5, 0.5]], np.array([0]))
    with pytest.raises(TypeError, match="integer class ids.*bool"):
        cls().forward(np.full((2, 2), 0.5), np.array([True, False]))
    with pytest.raises(ValueError, match="at least one sample"):
        cls().forward(np.zeros((0, 2)), np.array([], dtype=int))


def test_elementwise_target_errors():
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*\(4,\)"):
        losses.MSE().forward(np.zeros((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        losses.MSE().forward(np.zeros((2, 1)), np.array([[0.0], [np.inf]]))
    with pytest.raises(ValueError, match=r"targets in \[0, 1\]"):
        losses.BinaryCrossEntropy().forward(np.full((2, 1), 0.5), np.array([0.0, 2.0]))
    with pytest.raises(ValueError, match="finite"):
        losses.BinaryCrossEntropyWithLogits().forward(np.zeros((2, 1)), np.array([0.0, np.nan]))


def test_mse_does_not_broadcast_column_against_row():
    # (n, 1) vs (n,) would broadcast to (n, n) in plain numpy; here the target is reshaped
    pred = np.array([[1.0], [2.0], [3.0]])
    assert losses.MSE().forward(pred, np.array([1.0, 2.0, 4.0])) == pytest.approx(1 / 3)


def test_backward_before_forward_raises():
    for cls in losses.LOSSES.values():
        with pytest.raises(RuntimeError, match="before forward"):
            cls().backward()


def test_constructor_validation():
    with pytest.raises(ValueError, match=r"label_smoothing in \[0, 1\].*1.5"):
        losses.SoftmaxCrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="eps"):
        losses.BinaryCrossEntropy(eps=0)
    with pytest.raises(ValueError, match="eps"):
        losses.CrossEntropy(eps=-1e-3)


# ------------------------------------------------------------------------------------------------
# Registry and config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, cls",
    [
        ("SoftmaxCrossEntropy", losses.SoftmaxCrossEntropy),
        ("softmax_cross_entropy", losses.SoftmaxCrossEntropy),
        ("mse", losses.MSE),
        ("mean_squared_error", losses.MSE),
        ("binary_cross_entropy", losses.BinaryCrossEntropy),
        ("binary_crossentropy", losses.BinaryCrossEntropy),
        ("bce_with_logits", losses.BinaryCrossEntropyWithLogits),
        ("cross_entropy", losses.CrossEntropy),
        ("categorical_crossentropy", losses.CrossEntropy),
        ("sparse_categorical_crossentropy", losses.CrossEntropy),
    ],
)
def test_get_by_name(name, cls):
    assert type(losses.get(name)) is cls


def test_get_instance_class_dict_and_errors():
    loss = losses.SoftmaxCrossEntropy(0.1)
    assert losses.get(loss) is loss
    assert losses.get(losses.CrossEntropy, eps=1e-5).eps == 1e-5
    rebuilt = losses.get({"class": "SoftmaxCrossEntropy", "config": loss.get_config()})
    assert rebuilt.label_smoothing == 0.1
    assert losses.get("softmax_cross_entropy", label_smoothing=0.2).label_smoothing == 0.2
    with pytest.raises(ValueError, match="loss name.*'hinge'"):
        losses.get("hinge")
    with pytest.raises(TypeError, match="received: int"):
        losses.get(3)


@pytest.mark.parametrize("cls", list(losses.LOSSES.values()), ids=lambda c: c.__name__)
def test_config_round_trip_and_repr(cls):
    import json

    loss = cls()
    config = json.loads(json.dumps(loss.get_config()))
    assert cls.from_config(config).get_config() == loss.get_config()
    assert repr(loss).startswith(cls.__name__ + "(")


# ------------------------------------------------------------------------------------------------
# Cross-check against torch.nn.functional (skipped without torch)
# ------------------------------------------------------------------------------------------------
def _torch_value_and_grad(name, pred, target):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = torch.tensor(pred, requires_grad=True)
    t = torch.tensor(np.asarray(target))
    if name.startswith("mse"):
        value = F.mse_loss(x, t.reshape(x.shape).double())
    elif name.startswith("bce-logits"):
        value = F.binary_cross_entropy_with_logits(x, t.reshape(x.shape).double())
    elif name.startswith("bce"):
        value = F.binary_cross_entropy(x, t.reshape(x.shape).double())
    elif name == "ce-ids":
        value = F.nll_loss(torch.log(x), t)
    elif name == "ce-rows":
        value = -(t * torch.log(x)).sum(dim=1).mean()
    elif name.startswith("sce"):
        smoothing = 0.1 if name.endswith("smooth") else 0.0
        value = F.cross_entropy(x, t, label_smoothing=smoothing)
    value.backward()
    return value.item(), x.grad.numpy()


@pytest.mark.parametrize("name", CASES)
def test_matches_torch(name, rng):
    pytest.importorskip("torch")
    loss, pred, target, _ = _case(name, rng)
    expected_value, expected_grad = _torch_value_and_grad(name, pred, target)
    value = loss.forward(pred, target)
    grad = loss.backward()
    assert value == pytest.approx(expected_value, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def test_accuracy_ids_onehot_and_binary():
    pred = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    ids = np.array([1, 0, 0, 1])
    assert metrics.accuracy(pred, ids) == 0.75
    assert metrics.accuracy(pred, np.eye(2)[ids]) == 0.75
    assert metrics.accuracy(pred, ids.astype(float)) == 0.75
    single = np.array([[0.9], [0.2], [0.6], [0.4]])
    assert metrics.accuracy(single, np.array([1, 0, 0, 0])) == 0.75
    assert metrics.accuracy(single[:, 0], np.array([[1], [0], [1], [0]])) == 1.0
    assert metrics.accuracy(np.array([2.0, -1.0]), np.array([1, 0]), threshold=0.0) == 1.0


def test_accuracy_errors():
    pred = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"3 class ids.*\(2,\)"):
        metrics.accuracy(pred, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(3, 2\).*\(3, 3\)"):
        metrics.accuracy(pred, np.eye(3))
    with pytest.raises(ValueError, match=r"\[0, 2\).*5"):
        metrics.accuracy(pred, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="at least one sample"):
        metrics.accuracy(np.zeros((0, 2)), np.array([], dtype=int))


def test_confusion_matrix_against_loop(rng):
    y_true = rng.integers(0, 4, 50)
    y_pred = rng.integers(0, 4, 50)
    expected = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        expected[t, p] += 1
    m = metrics.confusion_matrix(y_true, y_pred, 4)
    assert m.dtype == np.int64
    np.testing.assert_array_equal(m, expected)
    # scores and one-hot rows are reduced by argmax; k inferred from the row width
    scores = np.eye(5)[y_pred] + 0.01
    np.testing.assert_array_equal(metrics.confusion_matrix(np.eye(5)[y_true], scores)[:4, :4], expected)
    assert metrics.confusion_matrix(y_true, y_pred).shape == (4, 4)
    assert np.trace(metrics.confusion_matrix([0, 1, 2], [0, 1, 2], 3)) == 3


def test_confusion_matrix_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\).*3"):
        metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="same number of samples.*2 and 3"):
        metrics.confusion_matrix(np.array([0, 1]), np.array([0, 1, 1]), 3)
    with pytest.raises(ValueError, match="n_classes"):
        metrics.confusion_matrix(np.array([0]), np.array([0]), 0)
    with pytest.raises(ValueError, match="integer class ids"):
        metrics.confusion_matrix(np.array([0.5]), np.array([0]), 2)


@pytest.mark.parametrize("name, activation, takes_probabilities, dense_targets", [
    ("SoftmaxCrossEntropy", "softmax", False, False),
    ("BinaryCrossEntropyWithLogits", "sigmoid", False, True),
    ("CrossEntropy", None, True, False),
    ("BinaryCrossEntropy", None, True, True),
    ("MSE", None, False, True),
])
def test_loss_says_what_its_pred_is(name, activation, takes_probabilities, dense_targets):
    # What Network.predict, cnnx.explain and the ONNX export read instead of class names.
    loss = losses.get(name)
    assert loss.output_activation == activation
    assert loss.from_logits == (activation is not None)
    assert loss.takes_probabilities is takes_probabilities
    assert loss.dense_targets is dense_targets
