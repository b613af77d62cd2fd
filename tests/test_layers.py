"""Core layers (Conv2D, Dense, Flatten, Dropout, MaxPool2D, AvgPool2D) and cnnx.init."""
import json
import math

import numpy as np
import pytest

import cnnx
import reference
from cnnx.init import INITIALIZERS, compute_fans
from cnnx.layers import LAYER_CLASSES, AvgPool2D, Conv2D, Dense, Dropout, Flatten, Linear, MaxPool2D

from gradcheck import check_layer_gradients


@pytest.fixture(autouse=True)
def _seeded_library_generator():
    """Layers built without ``rng`` and Dropout masks draw from cnnx's generator: seed it per test."""
    cnnx.manual_seed(1234)


# --- Conv2D ------------------------------------------------------------------------------------

# (constructor kwargs, input shape (n, c, h, w))
CONV_CASES = [
    (dict(in_channels=2, out_channels=3, kernel_size=3), (2, 2, 4, 5)),
    (dict(in_channels=2, out_channels=2, kernel_size=(3, 2), stride=2, padding=1), (2, 2, 7, 6)),
    (dict(in_channels=1, out_channels=2, kernel_size=(2, 3), stride=(2, 1), padding=((1, 0), (2, 1))), (1, 1, 5, 5)),
    (dict(in_channels=2, out_channels=2, kernel_size=2, padding="same"), (2, 2, 5, 4)),
    (dict(in_channels=2, out_channels=2, kernel_size=(4, 3), padding="same"), (1, 2, 6, 5)),
    (dict(in_channels=2, out_channels=2, kernel_size=3, stride=2, padding="same"), (2, 2, 6, 5)),
    (dict(in_channels=3, out_channels=2, kernel_size=(1, 3), bias=False, padding="valid"), (2, 3, 3, 4)),
    (dict(in_channels=2, out_channels=3, kernel_size=2, activation="relu"), (2, 2, 4, 4)),
    (dict(in_channels=2, out_channels=3, kernel_size=2, activation="leaky_relu", negative_slope=0.2), (2, 2, 4, 4)),
    (dict(in_channels=2, out_channels=3, kernel_size=2, activation="leaky_relu", negative_slope=-0.3), (2, 2, 4, 4)),
    (dict(in_channels=2, out_channels=3, kernel_size=2, activation="sigmoid"), (2, 2, 4, 4)),
    (dict(in_channels=2, out_channels=3, kernel_size=2, activation="tanh", padding="same"), (2, 2, 4, 4)),
    (dict(in_channels=2, out_channels=3, kernel_size=2, activation="gelu", stride=2, padding=1), (2, 2, 5, 4)),
]


def _conv_id(case):
    return "-".join(f"{k}={v}" for k, v in case[0].items() if k not in ("in_channels", "out_channels"))


def _reference_conv_output(layer, x):
    """Pad explicitly, then the naive valid convolution, then the activation (float64)."""
    pads = layer.explicit_padding(x.shape[2:])
    z = reference.conv2d(x, layer.params["weight"], layer.params.get("bias"), layer.stride, pads)
    act = {None: lambda v: v, "relu": lambda v: np.maximum(v, 0), "tanh": np.tanh,
           "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
           "leaky_relu": lambda v: np.where(v > 0, v, layer.negative_slope * v),
           "gelu": lambda v: 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))}[layer.activation]
    return act(z)


@pytest.mark.parametrize("kwargs, shape", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_conv2d_gradients(kwargs, shape, rng):
    layer = Conv2D(**kwargs, rng=0)
    check_layer_gradients(layer, rng.standard_normal(shape), rtol=1e-6)


@pytest.mark.parametrize("kwargs, shape", CONV_CASES, ids=[_conv_id(c) for c in CONV_CASES])
def test_conv2d_forward_matches_pad_then_valid_reference(kwargs, shape, rng):
    layer = Conv2D(**kwargs, rng=1).astype(np.float64)
    x = rng.standard_normal(shape)
    y = layer.forward(x)
    assert y.shape == (shape[0],) + layer.output_shape(shape[1:])
    np.testing.assert_allclose(y, _reference_conv_output(layer, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, (2, 3)], ids=str)
def test_same_padding_keeps_size_and_puts_extra_at_bottom_right(k, rng):
    layer = Conv2D(1, 1, k, padding="same", rng=0).astype(np.float64)
    x = rng.standard_normal((1, 1, 5, 6))
    y = layer.forward(x)
    assert y.shape == x.shape
    kh, kw = (k, k) if isinstance(k, int) else k
    pads = (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
    assert layer.explicit_padding((5, 6)) == pads
    np.testing.assert_allclose(y, reference.conv2d(x, layer.params["weight"], layer.params["bias"], (1, 1), pads),
                               rtol=1e-12, atol=1e-12)


def test_same_padding_with_stride_gives_ceil_output():
    layer = Conv2D(1, 1, 3, stride=2, padding="same")
    assert layer.output_shape((1, 7, 8)) == (1, 4, 4)
    assert layer.output_shape((1, 1, 1)) == (1, 1, 1)


def test_conv2d_backward_matches_reference(rng):
    layer = Conv2D(2, 3, (3, 2), stride=(1, 2), padding=((0, 1), (1, 0)), rng=0).astype(np.float64)
    x = rng.standard_normal((2, 2, 5, 5))
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    pads = layer.explicit_padding((5, 5))
    rdx, rdw, rdb = reference.conv2d_backward(dy, x, layer.params["weight"], layer.stride, pads)
    np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["weight"], rdw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["bias"], rdb, rtol=1e-12, atol=1e-12)


def test_fused_activation_equals_separate_layer(rng):
    from cnnx.layers import GELU, LeakyReLU
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    for act, layer_after in (("leaky_relu", LeakyReLU(0.1)), ("gelu", GELU())):
        fused = Conv2D(3, 4, 3, activation=act, negative_slope=0.1, rng=5)
        plain = Conv2D(3, 4, 3, rng=5)
        y = fused.forward(x)
        np.testing.assert_allclose(y, layer_after.forward(plain.forward(x)), rtol=1e-6, atol=1e-6)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = fused.backward(dy)
        dx_plain = plain.backward(layer_after.backward(dy))
        np.testing.assert_allclose(dx, dx_plain, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fused.grads["weight"], plain.grads["weight"], rtol=1e-5, atol=1e-5)


def test_conv2d_float32_and_input_cast(rng):
    layer = Conv2D(2, 3, 3)
    assert layer.params["weight"].dtype == np.float32 and layer.params["bias"].dtype == np.float32
    assert layer.params["weight"].shape == (3, 2, 3, 3) and layer.params["bias"].shape == (3,)
    y = layer.forward(rng.standard_normal((1, 2, 4, 4)))  # float64 input, float32 layer
    assert y.dtype == np.float32
    assert layer.backward(np.ones_like(y)).dtype == np.float32


def test_needs_input_grad_false_skips_dx_but_fills_grads(rng):
    for layer, x in ((Conv2D(2, 2, 3, rng=0), rng.standard_normal((2, 2, 4, 4))),
                     (Dense(3, 2, rng=0), rng.standard_normal((4, 3)))):
        layer.needs_input_grad = False
        y = layer.forward(x)
        assert layer.backward(np.ones_like(y)) is None
        assert np.any(layer.grads["weight"] != 0) and np.any(layer.grads["bias"] != 0)


@pytest.mark.parametrize("make", [lambda: Conv2D(2, 2, 3, rng=0), lambda: Dense(3, 2, rng=0)], ids=["conv", "dense"])
def test_grads_are_overwritten_in_place_not_accumulated(make, rng):
    layer = make()
    x = rng.standard_normal((2, 2, 4, 4) if isinstance(layer, Conv2D) else (4, 3)).astype(np.float32)
    arrays = {k: v for k, v in layer.grads.items()}
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    first = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(x)
    layer.backward(np.ones_like(y))
    for k in first:
        assert layer.grads[k] is arrays[k]  # an optimizer holding the array sees new values
        np.testing.assert_array_equal(layer.grads[k], first[k])


# --- Dense, Flatten ----------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu"], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dense_gradients(activation, bias, rng):
    layer = Dense(5, 4, bias=bias, activation=activation, negative_slope=0.2, rng=0)
    check_layer_gradients(layer, rng.standard_normal((3, 5)), rtol=1e-6)
    assert ("bias" in layer.params) == bias


def test_dense_forward_formula(rng):
    layer = Dense(5, 4, rng=0).astype(np.float64)
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(layer.forward(x), x @ layer.params["weight"].T + layer.params["bias"], rtol=1e-14)
    assert Linear is Dense


def test_flatten_round_trip(rng):
    layer = Flatten()
    x = rng.standard_normal((2, 3, 4, 5))
    y = layer.forward(x)
    assert y.shape == (2, 60) and layer.output_shape((3, 4, 5)) == (60,)
    np.testing.assert_array_equal(y[1], x[1].ravel())
    np.testing.assert_array_equal(layer.backward(y), x)
    check_layer_gradients(Flatten(), x[:, :2, :2, :2])


# --- Dropout -----------------------------------------------------------------------------------

def test_dropout_eval_is_identity(rng):
    x = rng.standard_normal((4, 10)).astype(np.float32)
    layer = Dropout(0.5)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    np.testing.assert_array_equal(layer.backward(x), x)


def test_dropout_training_scales_kept_units_and_backward_uses_the_same_mask():
    x = np.ones((200, 50))
    layer = Dropout(0.3)
    y = layer.forward(x, training=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.7)
    assert abs(kept.mean() - 0.7) < 0.02  # 10000 draws: 5 standard deviations is ~0.023
    dx = layer.backward(np.full_like(x, 2.0))
    np.testing.assert_array_equal(dx != 0, kept)
    np.testing.assert_allclose(dx[kept], 2 / 0.7)


def test_dropout_reproducible_with_manual_seed_and_same_for_both_dtypes():
    x = np.ones((8, 16))
    cnnx.manual_seed(7)
    a = Dropout(0.5).forward(x, training=True)
    cnnx.manual_seed(7)
    b = Dropout(0.5).forward(x.astype(np.float32), training=True)
    np.testing.assert_array_equal(a != 0, b != 0)
    assert b.dtype == np.float32
    assert not np.array_equal(a != 0, Dropout(0.5).forward(x, training=True) != 0)  # fresh mask per call


def test_dropout_p_zero_is_identity_in_training(rng):
    x = rng.standard_normal((3, 3))
    np.testing.assert_array_equal(Dropout(0.0).forward(x, training=True), x)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5], ids=str)
def test_dropout_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"Expected p in \[0, 1\)"):
        Dropout(p)


# --- pooling -----------------------------------------------------------------------------------

POOL_CASES = [
    (dict(kernel_size=2), (2, 2, 4, 6)),
    (dict(kernel_size=3, stride=2, padding=1), (1, 2, 5, 7)),
    (dict(kernel_size=(2, 3), stride=(1, 2)), (2, 1, 5, 5)),
    (dict(kernel_size=(3, 2), stride=1, padding=((1, 0), (0, 1))), (1, 2, 4, 4)),
]


def _pool_id(case):
    return "-".join(f"{k}={v}" for k, v in case[0].items())


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("kwargs, shape", POOL_CASES, ids=[_pool_id(c) for c in POOL_CASES])
def test_pool_gradients_and_reference(cls, kwargs, shape, rng):
    layer = cls(**kwargs)
    # A permutation keeps all values distinct (no ties within eps for the max).
    x = rng.permutation(np.prod(shape)).reshape(shape) / 7.0
    check_layer_gradients(layer, x, rtol=1e-6)
    ref = reference.max_pool2d if cls is MaxPool2D else reference.avg_pool2d
    y = layer.forward(x)
    assert y.shape == (shape[0],) + layer.output_shape(shape[1:])
    np.testing.assert_allclose(y, ref(x, layer.kernel_size, layer.stride, layer.pads), rtol=1e-13)


def test_maxpool_ties_send_gradient_to_first_maximum():
    layer = MaxPool2D(2)
    x = np.ones((1, 1, 2, 2))
    layer.forward(x)
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 1, 1))), [[[[1.0, 0.0], [0.0, 0.0]]]])


def test_maxpool_padding_never_wins():
    y = MaxPool2D(3, stride=1, padding=1).forward(-np.ones((1, 1, 3, 3)))
    np.testing.assert_array_equal(y, -np.ones((1, 1, 3, 3)))


def test_pool_stride_defaults_to_kernel():
    assert MaxPool2D((2, 3)).stride == (2, 3)
    assert AvgPool2D(2, stride=1).get_config() == {"kernel_size": (2, 2), "stride": (1, 1), "padding": (0, 0)}


# --- init --------------------------------------------------------------------------------------

def test_default_init_bounds_match_pytorch():
    layer = Conv2D(16, 32, (3, 5), rng=0)
    bound = 1 / math.sqrt(16 * 15)
    w, b = layer.params["weight"], layer.params["bias"]
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert np.abs(b).max() <= bound
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # uniform(-a, a) has std a/sqrt(3)
    dense = Dense(300, 200, rng=0)
    assert np.abs(dense.params["weight"]).max() <= 1 / math.sqrt(300)
    assert np.abs(dense.params["bias"]).max() <= 1 / math.sqrt(300)


@pytest.mark.parametrize("name, expected_std", [
    ("glorot_uniform", math.sqrt(2 / (400 + 300))),
    ("glorot_normal", math.sqrt(2 / (400 + 300))),
    ("he_uniform", math.sqrt(2 / 400)),
    ("he_normal", math.sqrt(2 / 400)),
    ("zeros", 0.0),
])
def test_named_initialisers_statistics(name, expected_std):
    layer = Dense(400, 300, weight_init=name, rng=3)
    w = layer.params["weight"]
    assert w.dtype == np.float32 and w.shape == (300, 400)
    assert w.std() == pytest.approx(expected_std, rel=0.02, abs=1e-12)
    assert abs(w.mean()) < 0.01 * max(expected_std, 1e-3)
    if name.endswith("uniform"):
        assert np.abs(w).max() <= math.sqrt(3) * expected_std * (1 + 1e-6)
    np.testing.assert_array_equal(layer.params["bias"], 0)  # Keras: zero bias with named rules


def test_initialiser_names_and_fans():
    assert set(INITIALIZERS) == {"default", "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "zeros"}
    assert compute_fans((8, 3, 5, 2)) == (30, 80)
    assert compute_fans((10, 4)) == (4, 10)


def test_init_reproducible_from_manual_seed_and_rng():
    cnnx.manual_seed(11)
    a = Conv2D(3, 4, 3).params["weight"]
    cnnx.manual_seed(11)
    b = Conv2D(3, 4, 3).params["weight"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(Dense(4, 3, rng=5).params["weight"], Dense(4, 3, rng=5).params["weight"])
    assert not np.array_equal(Dense(4, 3, rng=5).params["weight"], Dense(4, 3, rng=6).params["weight"])


# --- config, repr, registry --------------------------------------------------------------------

ALL_LAYERS = [
    lambda: Conv2D(3, 8, (3, 2), stride=2, padding=((1, 0), (0, 1)), bias=False, activation="leaky_relu",
                   negative_slope=0.1, weight_init="he_normal"),
    lambda: Conv2D(1, 4, 2, padding="same", activation="gelu"),
    lambda: Conv2D(1, 4, 3, padding=[1, 2]),
    lambda: Dense(10, 3, activation="tanh", weight_init="glorot_uniform"),
    lambda: Flatten(),
    lambda: Dropout(0.25),
    lambda: MaxPool2D(3, stride=2, padding=1),
    lambda: AvgPool2D((2, 3), padding=((1, 0), (1, 1))),
]


@pytest.mark.parametrize("make", ALL_LAYERS, ids=lambda f: repr(f()))
def test_config_round_trip_through_json(make):
    layer = make()
    config = layer.get_config()
    rebuilt = LAYER_CLASSES[type(layer).__name__].from_config(json.loads(json.dumps(config)))
    assert rebuilt.get_config() == config
    assert type(layer)(**config).get_config() == config
    assert repr(layer) == f"{type(layer).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in config.items()) + ")"
    assert {k: v.shape for k, v in rebuilt.params.items()} == {k: v.shape for k, v in layer.params.items()}


def test_padding_is_reported_in_canonical_form():
    assert Conv2D(1, 1, 3, padding=1).get_config()["padding"] == (1, 1)
    assert Conv2D(1, 1, 3, padding="SAME").get_config()["padding"] == "same"
    assert Conv2D(1, 1, 3, padding=((1, 1), (2, 2))).get_config()["padding"] == (1, 2)
    assert Conv2D(1, 1, 3, padding=((0, 1), (2, 2))).get_config()["padding"] == ((0, 1), (2, 2))


# --- errors ------------------------------------------------------------------------------------

def test_conv2d_input_errors():
    layer = Conv2D(3, 4, 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 3, \*, \*\), received: \(2, 2, 5, 5\)"):
        layer.forward(np.ones((2, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="received: \\(3, 5, 5\\)"):
        layer.forward(np.ones((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"at least as large as the kernel \(3, 3\), received: input \(2, 5\)"):
        layer.forward(np.ones((1, 3, 2, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(3, h, w\) per sample, received: \(4, 5, 5\)"):
        layer.output_shape((4, 5, 5))
    with pytest.raises(TypeError, match="floating-point"):
        layer.forward(np.ones((1, 3, 5, 5), np.int64))
    with pytest.raises(TypeError, match="numpy array"):
        layer.forward([[1.0]])
    layer.forward(np.ones((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected dy of shape \(1, 4, 3, 3\), received: \(1, 4, 5, 5\)"):
        layer.backward(np.ones((1, 4, 5, 5), np.float32))
    assert Conv2D(3, 4, 3, padding=1).output_shape((3, 1, 1)) == (4, 1, 1)


def test_dense_and_pool_input_errors():
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 4\), received: \(2, 5\)"):
        Dense(4, 2).forward(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="add a Flatten layer"):
        Dense(4, 2).output_shape((1, 2, 2))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, \*, \*, \*\)"):
        MaxPool2D(2).forward(np.ones((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="at least as large as the kernel"):
        AvgPool2D(3).output_shape((1, 2, 5))
    with pytest.raises(ValueError, match="Flatten expected input of shape"):
        Flatten().forward(np.ones(3))
    with pytest.raises(RuntimeError, match="before forward"):
        MaxPool2D(2).backward(np.ones((1, 1, 1, 1)))


@pytest.mark.parametrize("make, exc, message", [
    (lambda: Conv2D(0, 4, 3), ValueError, "Expected in_channels >= 1, received: in_channels=0"),
    (lambda: Conv2D(1.5, 4, 3), TypeError, "Expected in_channels to be an int"),
    (lambda: Conv2D(1, 4, 0), ValueError, "Expected kernel_size >= 1"),
    (lambda: Conv2D(1, 4, 3, stride=0), ValueError, "Expected stride >= 1, received: stride=0"),
    (lambda: Conv2D(1, 4, 3, padding="full"), ValueError, "received: padding='full'"),
    (lambda: Conv2D(1, 4, 3, padding=-1), ValueError, "Expected padding >= 0"),
    (lambda: Conv2D(1, 4, 3, activation="swish"), ValueError, "received: activation='swish'"),
    (lambda: Conv2D(1, 4, 3, weight_init="orthogonal"), ValueError, "received: weight_init='orthogonal'"),
    (lambda: Dense(4, 2, bias="yes"), TypeError, "Expected bias to be a bool"),
    (lambda: Dense(4, 0), ValueError, "Expected out_features >= 1"),
    (lambda: MaxPool2D(2, padding=2), ValueError, "Expected padding at most half the kernel"),
    (lambda: AvgPool2D(2, padding="same"), TypeError, "received: padding='same'"),
    (lambda: Dropout("0.5"), TypeError, "Expected p to be a float"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_constructor_errors(make, exc, message):
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


# --- against PyTorch (float64) ------------------------------------------------------------------

TORCH_CONV = [
    (dict(kernel_size=3, stride=1, padding=1), (2, 3, 7, 6)),
    (dict(kernel_size=(3, 2), stride=2, padding=0), (2, 3, 8, 7)),
    (dict(kernel_size=(2, 4), stride=(1, 3), padding=(1, 2)), (1, 3, 5, 9)),
    (dict(kernel_size=2, stride=1, padding="same"), (2, 3, 5, 5)),
    (dict(kernel_size=3, stride=1, padding=((0, 2), (1, 0))), (2, 3, 5, 6)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's note on its own copy
@pytest.mark.parametrize("kwargs, shape", TORCH_CONV, ids=[_pool_id(c) for c in TORCH_CONV])
def test_conv2d_matches_torch(kwargs, shape, rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    layer = Conv2D(3, 4, **kwargs, rng=0).astype(np.float64)
    x = rng.standard_normal(shape)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(layer.params["weight"], requires_grad=True)
    bt = torch.tensor(layer.params["bias"], requires_grad=True)
    (pt, pb), (pl, pr) = layer.explicit_padding(shape[2:])
    padding = kwargs["padding"] if kwargs["padding"] == "same" else 0
    xin = xt if padding == "same" else tf.pad(xt, (pl, pr, pt, pb))
    yt = tf.conv2d(xin, wt, bt, stride=layer.stride, padding=padding)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["weight"], wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["bias"], bt.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"], ids=str)
def test_dense_matches_torch(activation, rng):
    torch = pytest.importorskip("torch")
    layer = Dense(6, 5, activation=activation, rng=0).astype(np.float64)
    x = rng.standard_normal((4, 6))
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    lin = torch.nn.Linear(6, 5).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(layer.params["weight"]))
        lin.bias.copy_(torch.tensor(layer.params["bias"]))
    xt = torch.tensor(x, requires_grad=True)
    yt = lin(xt)
    if activation:
        yt = getattr(torch.nn.functional, activation)(yt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads["weight"], lin.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads["bias"], lin.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls, torch_name", [(MaxPool2D, "max_pool2d"), (AvgPool2D, "avg_pool2d")])
@pytest.mark.parametrize("kernel_size, stride, padding", [(2, None, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 0))], ids=str)
def test_pools_match_torch(cls, torch_name, kernel_size, stride, padding, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 3, 7, 6))
    layer = cls(kernel_size, stride, padding)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = getattr(torch.nn.functional, torch_name)(xt, kernel_size, stride, padding)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_torch_default_init_distribution_matches(rng):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tw = torch.nn.Conv2d(8, 16, 3).weight.detach().numpy()
    w = Conv2D(8, 16, 3, rng=0).params["weight"]
    # Same bound 1/sqrt(fan_in); both spread over it.
    assert np.abs(tw).max() <= 1 / math.sqrt(72) + 1e-7 and np.abs(w).max() <= 1 / math.sqrt(72)
    assert w.std() == pytest.approx(tw.std(), rel=0.1)


def test_max_pool_backward_after_an_eval_forward_matches_training(rng):
    """Eval-mode forwards skip the argmax; a backward after one (saliency maps) still routes dy
    to the same inputs as after a training forward."""
    import cnnx.functional as F
    from cnnx.layers import MaxPool2D

    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y, idx = F.max_pool2d(x, 2)
    y_only, none = F.max_pool2d(x, 2, indices=False)
    assert none is None
    np.testing.assert_array_equal(y_only, y)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    layer = MaxPool2D(2)
    layer.needs_input_grad = True
    layer.forward(x, training=True)
    trained = layer.backward(dy)
    layer.forward(x, training=False)
    np.testing.assert_array_equal(layer.backward(dy), trained)
