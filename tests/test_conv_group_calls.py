"""The packed float32 convolution's groups of images run inside one compiled call (OpenMP threads,
no GIL): ``_ops.conv_gemm_nchw(..., group)`` and its pooled forms in the forward,
``_ops.conv_backward_groups`` in the backward. They must give exactly what the per-group calls
gave: one call per group on Python worker threads (``functional.COMPILED_GROUPS = False``), and
for the kernels, one call for all the images.

Bit-exact on purpose: the same kernels compute each value as the same sum in the same order;
only which thread runs which group differs, and each group's results are written apart."""
import numpy as np
import pytest

import cnnx.functional as F
from cnnx import _simd
from cnnx.geometry import conv_output_size
from cnnx.parallel import num_threads
import reference as ref

BUILDS = _simd.available_isas()

# (batch, channels, height, width, out_channels, kernel, stride, padding): odd sizes (the pool
# drops a row / column), a batch that does not divide into the groups, a thin K (< 8 taps: the
# input gradient's GEMM then runs on BLAS and the backward keeps the worker threads).
SHAPES = [
    (37, 3, 13, 11, 5, 3, 1, 1),
    (20, 6, 14, 14, 16, 5, 1, 0),
    (19, 16, 9, 9, 7, 2, 1, 1),
    (50, 2, 7, 8, 9, 3, 2, 2),
    (16, 1, 9, 9, 4, 2, 1, 0),
]
ACTIVATIONS = [None, "relu", "leaky_relu"]


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("shape", SHAPES, ids=ref.conv_case_id)
@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
def test_forward_by_groups_in_one_call_equals_one_call_for_all_images(isa, shape, pooled, rng):
    ops = _simd.load(isa)
    x, weight, bias = ref.conv_operands(shape, rng)
    n, c, h, w, oc, k, s, p = shape
    out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
    pixels = (out_h // 2) * (out_w // 2) if pooled else out_h * out_w
    kernel = ops.conv_gemm_nchw_max_pool_2x2 if pooled else ops.conv_gemm_nchw

    def run(group, threads):
        y = np.full((n, oc, pixels), np.nan, np.float32)
        kernel(x, 0, n, weight.reshape(oc, -1), k, k, s, s, p, p, out_h, out_w, bias, True, True, 0.1, y,
               threads, group)
        return y

    whole = run(0, 1)
    for group, threads in [(1, 2), (4, 2), (6, 3), (n - 1, 2)]:
        np.testing.assert_array_equal(run(group, threads), whole)


@pytest.mark.parametrize("shape", SHAPES, ids=ref.conv_case_id)
@pytest.mark.parametrize("form", ["conv", "infer", "train"])
def test_forward_in_one_call_equals_the_worker_threads(shape, form, rng, monkeypatch):
    x, weight, bias = ref.conv_operands(shape, rng)
    stride, padding = shape[6], shape[7]

    def forward():
        if form == "train":
            return F.conv2d_max_pool_2x2_train(x, weight, bias, stride, padding, activation="relu")
        return (F.conv2d(x, weight, bias, stride, padding, activation="relu", max_pool_2x2=form == "infer"),)

    with num_threads(2):
        compiled = forward()
        monkeypatch.setattr(F, "COMPILED_GROUPS", False)
        workers = forward()
    for a, b in zip(compiled, workers):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", SHAPES, ids=ref.conv_case_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "no dx"])
def test_backward_in_one_call_equals_the_worker_threads(shape, activation, pooled, need_dx, rng, monkeypatch):
    x, weight, bias = ref.conv_operands(shape, rng)
    stride, padding = shape[6], shape[7]
    if pooled:
        y, argmax = F.conv2d_max_pool_2x2_train(x, weight, bias, stride, padding, activation=activation)
    else:
        y = F.conv2d(x, weight, bias, stride, padding, activation=activation)
    dy = rng.standard_normal(y.shape).astype(np.float32)

    def backward():
        if pooled:
            return F.conv2d_max_pool_2x2_backward(dy, argmax, y, x, weight, stride, padding, need_dx=need_dx,
                                                  activation=activation)
        return F.conv2d_backward(dy, x, weight, stride, padding, need_dx=need_dx, activation=activation, y=y)

    compiled = _calls_of(monkeypatch, "conv_backward_groups")
    results = {}
    for threads in (1, 2, 3):
        with num_threads(threads):
            results[threads] = backward()
    thin = shape[1] * shape[5] ** 2 < 8
    assert len(compiled) == (3 if not (need_dx and thin) else 0)  # thin K with dx: BLAS, worker threads
    monkeypatch.setattr(F, "COMPILED_GROUPS", False)
    with num_threads(2):
        expected = backward()
    for threads, got in results.items():
        for name, a, b in zip(("dx", "dweight", "dbias"), got, expected):
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, {threads} threads")


def _calls_of(monkeypatch, name):
    """A list that grows by one on every call of ``F._ops.<name>`` (which still runs)."""
    calls = []
    real_ops = F._ops

    class Counting:
        def __getattr__(self, attr):
            return getattr(real_ops, attr)

    def counted(*args):
        calls.append(1)
        return getattr(real_ops, name)(*args)

    counting = Counting()
    setattr(counting, name, counted)
    monkeypatch.setattr(F, "_ops", counting)
    return calls
