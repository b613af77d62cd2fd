"""Naive, obviously-correct references the compiled kernels are checked against.

Explicit padding with np.pad and a Python loop over output positions; nothing here is fast.
"""
import threading

import numpy as np


def pad_input(x, pads, value=0.0):
    (pt, pb), (pl, pr) = pads
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


def windows(xp, kh, kw, sy, sx):
    """Yield ``(oy, ox, window)`` with window of shape (n, c, kh, kw) over an already padded input."""
    out_h = (xp.shape[2] - kh) // sy + 1
    out_w = (xp.shape[3] - kw) // sx + 1
    for oy in range(out_h):
        for ox in range(out_w):
            yield oy, ox, xp[:, :, oy * sy: oy * sy + kh, ox * sx: ox * sx + kw]


def out_size(xp_shape, kh, kw, sy, sx):
    return (xp_shape[2] - kh) // sy + 1, (xp_shape[3] - kw) // sx + 1


def conv2d(x, weight, bias, stride, pads):
    sy, sx = stride
    oc, _, kh, kw = weight.shape
    xp = pad_input(x, pads)
    out_h, out_w = out_size(xp.shape, kh, kw, sy, sx)
    y = np.zeros((x.shape[0], oc, out_h, out_w), dtype=np.float64)
    for oy, ox, win in windows(xp, kh, kw, sy, sx):
        y[:, :, oy, ox] = np.einsum("nckl,ockl->no", win, weight)
    if bias is not None:
        y += bias[None, :, None, None]
    return y


def conv_case_id(shape):
    """Test id of a convolution case ``(batch, channels, height, width, out_channels, kernel,
    stride, padding)``."""
    return "n{}c{}_{}x{}_o{}_k{}s{}p{}".format(*shape)


def conv_operands(shape, rng):
    """float32 ``x``, ``weight`` and ``bias`` of a convolution case (see ``conv_case_id``)."""
    n, c, h, w, oc, k, s, p = shape
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((oc, c, k, k)).astype(np.float32)
    bias = rng.standard_normal(oc).astype(np.float32)
    return x, weight, bias


def conv2d_and_float32_bound(x, weight, bias, stride, padding):
    """The float64 convolution (square ``stride`` and ``padding``; ``bias`` may be None) and a
    float32 round-off bound for each output: a sum of K products rounded in float32 is off by at
    most about K * eps * sum |x w| (with the bias)."""
    pads = ((padding, padding), (padding, padding))
    b64 = None if bias is None else bias.astype(np.float64)
    z = conv2d(x.astype(np.float64), weight.astype(np.float64), b64, (stride, stride), pads)
    size = conv2d(np.abs(x).astype(np.float64), np.abs(weight).astype(np.float64),
                  None if b64 is None else np.abs(b64), (stride, stride), pads)
    k = weight[0].size + 1
    return z, 2 * k * np.finfo(np.float32).eps * size + 1e-30


def conv2d_backward(dy, x, weight, stride, pads):
    sy, sx = stride
    _, _, kh, kw = weight.shape
    (pt, pb), (pl, pr) = pads
    xp = pad_input(x, pads)
    dxp = np.zeros_like(xp, dtype=np.float64)
    dw = np.zeros(weight.shape, dtype=np.float64)
    for oy, ox, win in windows(xp, kh, kw, sy, sx):
        g = dy[:, :, oy, ox]
        dw += np.einsum("no,nckl->ockl", g, win)
        dxp[:, :, oy * sy: oy * sy + kh, ox * sx: ox * sx + kw] += np.einsum("no,ockl->nckl", g, weight)
    dx = dxp[:, :, pt: pt + x.shape[2], pl: pl + x.shape[3]]
    return dx, dw, dy.sum(axis=(0, 2, 3))


def im2col(x, kernel_size, stride, pads):
    kh, kw = kernel_size
    xp = pad_input(x, pads)
    out_h, out_w = out_size(xp.shape, kh, kw, *stride)
    n, c = x.shape[:2]
    cols = np.zeros((n, c * kh * kw, out_h * out_w), dtype=np.float64)
    for oy, ox, win in windows(xp, kh, kw, *stride):
        cols[:, :, oy * out_w + ox] = win.reshape(n, -1)
    return cols


def max_pool2d(x, kernel_size, stride, pads):
    kh, kw = kernel_size
    xp = pad_input(x, pads, value=-np.inf)
    out_h, out_w = out_size(xp.shape, kh, kw, *stride)
    return np.stack(
        [np.stack([win.max(axis=(2, 3)) for oy, ox, win in windows(xp, kh, kw, *stride) if oy == r], axis=-1)
         for r in range(out_h)],
        axis=-2,
    )


def avg_pool2d(x, kernel_size, stride, pads):
    kh, kw = kernel_size
    xp = pad_input(x, pads)
    out_h, out_w = out_size(xp.shape, kh, kw, *stride)
    y = np.zeros(x.shape[:2] + (out_h, out_w))
    for oy, ox, win in windows(xp, kh, kw, *stride):
        y[:, :, oy, ox] = win.mean(axis=(2, 3))
    return y


def numerical_gradient(f, x, eps=1e-6):
    """Central differences of the scalar function ``f`` with respect to the float64 array ``x``."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def assert_identical_for_any_thread_count(run, threads):
    """``run()`` (a list of arrays) gives the same bits with one thread and with ``threads``.

    Bit-exact on purpose: cnnx's kernels give every output the same sums in the same order whichever
    thread computes it (a design property, not a float coincidence; see cnnx/parallel.py).
    """
    from cnnx.parallel import num_threads

    with num_threads(1):
        serial = run()
    with num_threads(threads):
        parallel = run()
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def assert_kernel_identical_for_thread_counts(run, thread_counts=(1, 2, 3)):
    """``run(n_threads)`` (a compiled kernel's output, in a fresh array) has the same bits for every
    thread count.

    Bit-exact on purpose: cnnx's kernels give each output to one thread and sum it in the same
    order whatever the split (a design property, not a float coincidence).
    """
    results = [run(threads) for threads in thread_counts]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def run_in_threads(work, count, timeout=60):
    """Call ``work(k)`` for k in 0 .. count - 1, each in its own thread, all at once; re-raise the
    first exception a thread raised, and fail if a thread has not returned after ``timeout`` s."""
    errors = []

    def target(k):
        try:
            work(k)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread never returned"
    if errors:
        raise errors[0]
