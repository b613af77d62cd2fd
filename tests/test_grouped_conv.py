"""Grouped, depthwise and dilated convolutions: Conv2D / Conv1D (dilation=, groups=) and
``functional.conv2d`` against a naive reference, central differences, torch.nn, and the
usual invalid input."""
import numpy as np
import pytest

import cnnx
from cnnx import _ops
from cnnx import functional as F
from cnnx.layers import Conv1D, Conv2D, Flatten, Dense
from cnnx.network import Network
from cnnx.parallel import num_threads

from gradcheck import check_layer_gradients
import reference as ref


# --- a naive reference: one einsum per output pixel and group ------------------------------------

def reference_conv2d(x, weight, bias, stride, pads, dilation, groups):
    """Explicit padding, a dilated window per output pixel and a loop over groups (slow, obvious)."""
    (sy, sx), (dy, dx) = stride, dilation
    (pt, pb), (pl, pr) = pads
    n, c, h, w = x.shape
    oc, cg, kh, kw = weight.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    span_h, span_w = dy * (kh - 1) + 1, dx * (kw - 1) + 1
    out_h = (xp.shape[2] - span_h) // sy + 1
    out_w = (xp.shape[3] - span_w) // sx + 1
    ocg = oc // groups
    y = np.zeros((n, oc, out_h, out_w))
    for g in range(groups):
        wg = weight[g * ocg:(g + 1) * ocg].astype(np.float64)
        for oy in range(out_h):
            for ox in range(out_w):
                win = xp[:, g * cg:(g + 1) * cg, oy * sy: oy * sy + span_h: dy, ox * sx: ox * sx + span_w: dx]
                y[:, g * ocg:(g + 1) * ocg, oy, ox] = np.einsum("nckl,ockl->no", win, wg)
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def reference_backward(dy, x, weight, stride, pads, dilation, groups):
    """Each output pixel's gradient scattered back over its dilated window, group by group."""
    (sy, sx), (dly, dlx) = stride, dilation
    (pt, pb), (pl, pr) = pads
    oc, cg, kh, kw = weight.shape
    ocg = oc // groups
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    dxp = np.zeros_like(xp)
    dw = np.zeros(weight.shape)
    span_h, span_w = dly * (kh - 1) + 1, dlx * (kw - 1) + 1
    for g in range(groups):
        o, ci = slice(g * ocg, (g + 1) * ocg), slice(g * cg, (g + 1) * cg)
        for oy in range(dy.shape[2]):
            for ox in range(dy.shape[3]):
                rows = slice(oy * sy, oy * sy + span_h, dly)
                cols = slice(ox * sx, ox * sx + span_w, dlx)
                d = dy[:, o, oy, ox]
                dw[o] += np.einsum("no,nckl->ockl", d, xp[:, ci, rows, cols])
                dxp[:, ci, rows, cols] += np.einsum("no,ockl->nckl", d, weight[o])
    dx = dxp[:, :, pt: pt + x.shape[2], pl: pl + x.shape[3]]
    return dx, dw, dy.sum(axis=(0, 2, 3))


# (c, out_c, groups, kernel, stride, padding, dilation)
CASES = [
    (4, 6, 2, (3, 2), (1, 2), ((1, 0), (2, 1)), (2, 1)),
    (6, 6, 6, (3, 3), 1, 1, 1),                  # depthwise
    (3, 6, 3, (2, 3), (2, 1), 0, (1, 2)),        # depthwise with channel multiplier 2
    (4, 4, 1, (3, 3), 1, 2, (2, 2)),             # dilated only
    (4, 8, 4, (1, 1), 2, 0, 1),                  # grouped 1x1
    (2, 2, 2, (3, 3), 1, "same", (3, 2)),        # "same" keeps the size with a dilated span
]
CASE_IDS = ["g2-dil", "depthwise", "depthwise-x2", "dilated", "g4-1x1", "same-dilated"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_functional_matches_the_reference(case, n, dtype, rng):
    c, oc, groups, k, stride, padding, dilation = case
    x = rng.standard_normal((n, c, 7, 8)).astype(dtype)
    w = rng.standard_normal((oc, c // groups) + k).astype(dtype)
    b = rng.standard_normal(oc).astype(dtype)
    dil = cnnx.geometry.int_pair(dilation)
    span = cnnx.geometry.dilated_kernel_size(k, dil)
    pads = cnnx.geometry.explicit_padding(padding, span, cnnx.geometry.int_pair(stride), (7, 8))
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    expected = reference_conv2d(x, w, b, cnnx.geometry.int_pair(stride), pads, dil, groups)
    tol = 1e-12 if dtype == np.float64 else 1e-4
    assert y.dtype == dtype and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)
    if padding == "same":
        assert y.shape[2:] == x.shape[2:]

    g = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = F.conv2d_backward(g, x, w, stride, padding, dilation, groups)
    rdx, rdw, rdb = reference_backward(g.astype(np.float64), x.astype(np.float64), w.astype(np.float64),
                                       cnnx.geometry.int_pair(stride), pads, dil, groups)
    for got, want in ((dx, rdx), (dw, rdw), (db, rdb)):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def test_groups_1_dilation_1_is_the_plain_convolution(rng):
    # One function serves the plain and the grouped/dilated convolution (conv2d_grouped was a
    # second schedule until it merged into conv2d); groups=1, dilation=1 is the plain one.
    x = rng.standard_normal((3, 4, 9, 8))
    w = rng.standard_normal((5, 4, 3, 2))
    b = rng.standard_normal(5)
    pads = ((1, 1), (1, 1))
    y = F.conv2d(x, w, b, 2, 1, 1, 1)
    np.testing.assert_allclose(y, reference_conv2d(x, w, b, (2, 2), pads, (1, 1), 1), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal((3, 5, 5, 5))
    expected = reference_backward(dy, x, w, (2, 2), pads, (1, 1), 1)
    for a, e in zip(F.conv2d_backward(dy, x, w, 2, 1, 1, 1), expected):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_non_contiguous_input_and_fused_relu(rng):
    x = rng.standard_normal((2, 8, 7, 6))[:, ::2]          # every other channel: not contiguous
    w = rng.standard_normal((4, 2, 3, 3))
    b = rng.standard_normal(4)
    y = F.conv2d(x, w, b, 1, 1, 2, 2, activation="relu")
    z = reference_conv2d(np.ascontiguousarray(x), w, b, (1, 1), ((1, 1), (1, 1)), (2, 2), 2)
    np.testing.assert_allclose(y, np.maximum(z, 0), rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv2d_backward(dy, x, w, 1, 1, 2, 2, activation="relu", y=y)
    ex, ew, eb = F.conv2d_backward(dy * (z > 0), x, w, 1, 1, 2, 2)
    for a, e in ((dx, ex), (dw, ew), (db, eb)):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_fused_max_pool_2x2_equals_conv_then_pool(rng):
    x = rng.standard_normal((2, 4, 8, 8))
    w = rng.standard_normal((4, 1, 3, 3))
    y = F.conv2d(x, w, None, 1, 1, 1, 4, activation="relu")
    pooled = F.conv2d(x, w, None, 1, 1, 1, 4, activation="relu", max_pool_2x2=True)
    np.testing.assert_allclose(pooled, F.max_pool2d(y, 2)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [2, 3])
def test_results_identical_with_one_thread_and_several(threads, rng, monkeypatch):
    # Small calls normally run serial; lower the threshold so these really run threaded. The
    # results are bit-identical: the work is split by images and every sum keeps its order.
    monkeypatch.setattr(cnnx.parallel, "MIN_WORK_PER_THREAD", 1)
    x = rng.standard_normal((7, 4, 9, 8)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)

    wd = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)  # depthwise: the direct kernel

    def run():
        y = F.conv2d(x, w, None, (2, 1), 1, (1, 2), 2)
        yd = F.conv2d(x, wd, None, 1, 2, 2, 4)
        return ((y,) + F.conv2d_backward(np.ones_like(y), x, w, (2, 1), 1, (1, 2), 2)
                + (yd,) + F.conv2d_backward(np.cos(yd), x, wd, 1, 2, 2, 4))

    ref.assert_identical_for_any_thread_count(run, threads)


def test_dilated_im2col_and_col2im_are_adjoint(rng):
    # <im2col(x), c> == <x, col2im(c)> for the dilated pair, with padding and strides.
    x = rng.standard_normal((2, 3, 8, 7))
    kh, kw, sy, sx, dy, dx, pt, pl = 3, 2, 2, 1, 2, 3, 1, 2
    out_h = (8 + 2 * pt - (dy * (kh - 1) + 1)) // sy + 1
    out_w = (7 + 2 * pl - (dx * (kw - 1) + 1)) // sx + 1
    cols = np.empty((3 * kh * kw, 2, out_h * out_w))
    _ops.im2col_dilated(x, 0, kh, kw, sy, sx, dy, dx, pt, pl, out_h, out_w, cols, 1)
    c = rng.standard_normal(cols.shape)
    back = np.empty_like(x)
    _ops.col2im_dilated(c, 0, kh, kw, sy, sx, dy, dx, pt, pl, out_h, out_w, back, 1)
    np.testing.assert_allclose(np.sum(cols * c), np.sum(x * back), rtol=1e-12)


# --- layers: shapes, gradients, config ---------------------------------------------------------

def test_conv2d_weight_shape_and_init_follow_pytorch(rng):
    layer = Conv2D(8, 12, (3, 5), groups=4, dilation=(2, 1), rng=rng)
    assert layer.params["weight"].shape == (12, 2, 3, 5)
    bound = 1 / np.sqrt(2 * 3 * 5)           # fan_in = in_channels // groups * kh * kw
    assert np.abs(layer.params["weight"]).max() <= bound
    assert layer.output_shape((8, 10, 10)) == (12, 6, 6)
    assert Conv2D(8, 8, 7, padding="same", groups=8, dilation=2).output_shape((8, 9, 9)) == (8, 9, 9)
    assert layer.num_params == 12 * 2 * 15 + 12


@pytest.mark.parametrize("kwargs", [
    dict(groups=2, dilation=(2, 1), stride=(1, 2), padding=((1, 0), (2, 1))),
    dict(groups=4, padding=1, activation="relu"),
    dict(groups=2, dilation=2, padding="same", activation="tanh", bias=False),
], ids=["grouped-dilated", "depthwise-relu", "same-tanh-nobias"])
def test_conv2d_gradients(kwargs, rng):
    layer = Conv2D(4, 4, (3, 2), rng=rng, **kwargs)
    x = rng.standard_normal((2, 4, 6, 7))
    if kwargs.get("activation") == "relu":
        x += 0.05 * np.sign(x)  # keep pre-activations away from the kink
    check_layer_gradients(layer, x)


@pytest.mark.parametrize("kwargs", [
    dict(groups=3, dilation=2, padding="same"),
    dict(groups=3, stride=2, padding=(2, 1), activation="gelu"),
    dict(groups=1, dilation=3),
], ids=["depthwise-same-dilated", "depthwise-strided-gelu", "dilated"])
def test_conv1d_gradients(kwargs, rng):
    layer = Conv1D(3, 6, 3, rng=rng, **kwargs)
    check_layer_gradients(layer, rng.standard_normal((2, 3, 11)))


def test_config_round_trip_and_network_save_load(tmp_path, rng):
    conv = Conv2D(4, 8, 3, padding="same", groups=4, dilation=2, rng=rng)
    assert conv.get_config()["groups"] == 4 and conv.get_config()["dilation"] == (2, 2)
    rebuilt = Conv2D.from_config(conv.get_config())
    assert rebuilt.get_config() == conv.get_config()
    assert "groups=4" in repr(conv) and "dilation=(2, 2)" in repr(conv)
    c1 = Conv1D(4, 4, 5, groups=2, dilation=2, padding="same", rng=rng)
    assert Conv1D.from_config(c1.get_config()).get_config() == c1.get_config()

    net = Network([conv, Flatten(), Dense(8 * 6 * 6, 3, rng=rng)], (4, 6, 6))
    x = rng.standard_normal((5, 4, 6, 6)).astype(np.float32)
    net.save(tmp_path / "net")
    loaded = cnnx.load(tmp_path / "net")
    assert loaded.layers[0].groups == 4 and loaded.layers[0].dilation == (2, 2)
    np.testing.assert_array_equal(loaded.predict(x), net.predict(x))  # the same weights, the same kernels


def test_a_config_without_the_new_keys_still_loads():
    # Configs saved before dilation/groups existed rebuild as the plain convolution.
    config = Conv2D(3, 4, 3).get_config()
    del config["dilation"], config["groups"]
    layer = Conv2D.from_config(config)
    assert layer.groups == 1 and layer.dilation == (1, 1)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(groups=3), ValueError, r"Expected groups to divide in_channels \(4\) and out_channels \(6\), received: groups=3"),
    (dict(groups=0), ValueError, r"Expected groups >= 1, received: groups=0"),
    (dict(groups=2.0), TypeError, r"Expected groups to be an int"),
    (dict(dilation=0), ValueError, r"Expected dilation >= 1, received: dilation=0"),
    (dict(dilation=(1, 2, 3)), TypeError, r"Expected dilation to be an int or a pair"),
], ids=["not-dividing", "zero", "float", "dilation-zero", "dilation-triple"])
def test_layer_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        Conv2D(4, 6, 3, **kwargs)


def test_dilated_kernel_larger_than_the_input_is_refused():
    layer = Conv2D(2, 2, 3, dilation=3)                    # spans 7 pixels
    with pytest.raises(ValueError, match=r"at least as large as the kernel \(7, 7\) \(dilation \(3, 3\)\)"):
        layer.forward(np.zeros((1, 2, 6, 9), np.float32))
    with pytest.raises(ValueError, match=r"at least as long as the kernel \(9, dilation 4\)"):
        Conv1D(2, 2, 3, dilation=4).forward(np.zeros((1, 2, 8), np.float32))


def test_functional_errors(rng):
    x = rng.standard_normal((2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"Expected weight of shape \(6, 2, kh, kw\) .* received: weight.shape=\(6, 4, 3, 3\)"):
        F.conv2d(x, np.zeros((6, 4, 3, 3)), groups=2)
    with pytest.raises(ValueError, match="divisible by groups, received: groups=3"):
        F.conv2d(x, np.zeros((6, 1, 3, 3)), groups=3)
    with pytest.raises(ValueError, match=r"Expected a kernel no larger than the padded input"):
        F.conv2d(x, np.zeros((4, 1, 3, 3)), dilation=4, groups=4)
    with pytest.raises(ValueError, match=r"Expected dy of shape"):
        F.conv2d_backward(np.zeros((2, 4, 5, 5)), x, np.zeros((4, 1, 3, 3)), groups=4)


# --- parity with torch.nn in float64 -----------------------------------------------------------

TORCH_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=7, padding=3, groups=6),
    dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2, groups=3, bias=False),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2, groups=2),
]


@pytest.mark.parametrize("kwargs", TORCH_CASES, ids=["grouped-dilated", "depthwise-7x7", "multiplier", "same"])
def test_conv2d_matches_torch(kwargs, rng):
    torch = pytest.importorskip("torch")
    cnnx_kwargs = {k: v for k, v in kwargs.items() if k not in ("dilation", "groups")}
    layer = Conv2D(**cnnx_kwargs, dilation=kwargs.get("dilation", 1), groups=kwargs["groups"], rng=rng)
    layer.astype(np.float64)
    module = torch.nn.Conv2d(**kwargs).double()
    _check_against_torch(torch, layer, module, rng.standard_normal((3, kwargs["in_channels"], 11, 10)), rng)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=4, out_channels=8, kernel_size=5, stride=2, padding=3, dilation=2, groups=4),
    dict(in_channels=6, out_channels=3, kernel_size=3, padding="same", dilation=3, groups=3),
], ids=["strided", "same"])
def test_conv1d_matches_torch(kwargs, rng):
    torch = pytest.importorskip("torch")
    cnnx_kwargs = {k: v for k, v in kwargs.items() if k not in ("dilation", "groups")}
    layer = Conv1D(**cnnx_kwargs, dilation=kwargs["dilation"], groups=kwargs["groups"], rng=rng)
    layer.astype(np.float64)
    module = torch.nn.Conv1d(**kwargs).double()
    _check_against_torch(torch, layer, module, rng.standard_normal((3, kwargs["in_channels"], 17)), rng)


def _check_against_torch(torch, layer, module, x, rng):
    """Copy cnnx's weights into ``module`` (the same layout), compare outputs and all gradients to 1e-10."""
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.params["weight"]))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(layer.params["bias"]))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = module(tx)
    y = layer.forward(x)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.from_numpy(dy))
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.grads["weight"], module.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    if module.bias is not None:
        np.testing.assert_allclose(layer.grads["bias"], module.bias.grad.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("threads", [2, 4])
def test_threaded_results_are_bit_identical_on_convnext_shapes(threads, rng):
    # The first version of the dilated/depthwise kernels computed each tap's valid output columns
    # through a pointer, which Cython leaves shared between OpenMP threads (only variables the
    # loop body assigns are made private): ConvNeXt-mini's gradients once differed from run to
    # run. Such a race shows only when threads interleave at the wrong moment, so this check of
    # ConvNeXt's shapes (many small planes) against the serial run can pass on a racy build; the
    # kernels now assign those bounds directly. Each plane is one thread's: bit-identical results.
    def run(x, w, dy, padding, dilation, groups):
        y = F.conv2d(x, w, None, 1, padding, dilation, groups)
        return (y,) + F.conv2d_backward(dy, x, w, 1, padding, dilation, groups)[:2]

    cases = []
    for c, size in ((32, 16), (64, 8), (128, 4)):
        x = rng.standard_normal((4, c, size, size))
        cases.append((x, rng.standard_normal((c, 1, 7, 7)), rng.standard_normal(x.shape), 3, 1, c))
        cases.append((x, rng.standard_normal((c, 2, 3, 3)), rng.standard_normal(x.shape), 2, 2, c // 2))
    with num_threads(1):
        serial = [run(*case) for case in cases]
    with num_threads(threads):
        for _ in range(3):
            for case, expected in zip(cases, serial):
                for a, b in zip(expected, run(*case)):
                    np.testing.assert_array_equal(a, b)


def test_network_fuses_a_depthwise_conv_with_the_max_pool_after_it(rng):
    # Inference runs Conv2D + 2x2 max-pool as one step (Network's plan); the result must equal
    # the layers run one by one.
    from cnnx.layers import MaxPool2D

    net = Network([Conv2D(4, 8, 3, padding=1, groups=4, activation="relu", rng=rng), MaxPool2D(2),
                   Conv2D(8, 8, 3, padding=2, dilation=2, groups=2, rng=rng), Flatten(), Dense(8 * 3 * 3, 3, rng=rng)],
                  (4, 6, 6), dtype="float64")
    x = rng.standard_normal((5, 4, 6, 6))
    expected = x
    for layer in net.layers:
        expected = layer.forward(expected, training=False)
    np.testing.assert_allclose(net.forward(x), expected, rtol=1e-12, atol=1e-12)
