# cython: language_level=3
"""cnnx's compiled hot path: arithmetic only.

Owns im2col / col2im in the "channels-rows" layout the convolution GEMMs want, the NCHW <-> GEMM
layout passes (the convolution's epilogue: bias, fused leaky ReLU and optionally a 2x2 max-pool,
and their gradients), the direct depthwise convolution, pooling forward/backward, the per-element
passes (activations, dropout, optimizer steps), softmax cross-entropy and batch norm. Callers
(``cnnx.functional``) validate shapes, dtypes and geometry and allocate every output; the only
checks here are the ones memory safety needs at run time (argmax indices from the caller).

Column layout: ``cols[r, j, p]`` with ``r = (ci * kh + ki) * kw + kj`` the kernel row,
``j`` the image within the group and ``p = oy * out_w + ox`` the output pixel, so that a group of
images is one GEMM: ``(out_c, K) @ (K, g * P)``.

Every parallel loop runs over images (or image planes): each thread owns whole images, so
scatters (col2im, pooling backward) never race and results do not depend on the thread count.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memcpy, memset

ctypedef long long int64


cdef extern from *:
    """
    #ifdef _OPENMP
    #define CNNX_OPENMP 1
    #else
    #define CNNX_OPENMP 0
    #endif
    """
    int CNNX_OPENMP
    int CNNX_DEBUG_BUILD  # set by setup.py: 1 for a CNNX_DEBUG=1 build (bounds checks compiled in)


def debug_build():
    """True for a ``CNNX_DEBUG=1`` build: bounds and initialisation checks are compiled in."""
    return bool(CNNX_DEBUG_BUILD)


def openmp_enabled():
    """True when this build was compiled with OpenMP (``prange`` runs threads)."""
    return bool(CNNX_OPENMP)


def im2col(
    const floating[:, :, :, ::1] x,
    Py_ssize_t first,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    floating[:, :, ::1] cols,
    int n_threads,
):
    """Unfold images ``x[first : first + g]`` into ``cols`` of shape ``(c*kh*kw, g, out_h*out_w)``:
    ``im2col_dilated`` with dilation 1 (see there for the layout and the padding)."""
    im2col_dilated(x, first, kh, kw, sy, sx, 1, 1, pad_top, pad_left, out_h, out_w, cols, n_threads)


def col2im(
    const floating[:, :, ::1] cols,
    Py_ssize_t first,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    floating[:, :, :, ::1] x,
    int n_threads,
):
    """Adjoint of ``im2col``: overwrite ``x[first : first + g]`` with the sum of ``cols`` folded
    back (``col2im_dilated`` with dilation 1). Contributions that fall into the padding are dropped."""
    col2im_dilated(cols, first, kh, kw, sy, sx, 1, 1, pad_top, pad_left, out_h, out_w, x, n_threads)


def gemm_to_nchw(
    const floating[:, :, ::1] y_gemm,
    const floating[::1] bias,
    bint has_bias,
    bint leaky_relu,
    double negative_slope,
    Py_ssize_t first,
    floating[:, :, ::1] y,
    int n_threads,
):
    """The convolution's epilogue, one sweep: copy the GEMM result ``y_gemm (out_c, g, P)`` into
    the NCHW output ``y[first : first + g]`` of shape ``(n, out_c, P)``, add ``bias[o]`` to every
    value of channel ``o`` when ``has_bias``, and, when ``leaky_relu``, apply a leaky ReLU with
    ``negative_slope`` (0 gives ReLU) to the biased value."""
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t j, o, p
    cdef floating b, v, scaled
    cdef floating slope = <floating>negative_slope
    if g == 0 or oc == 0 or P == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            b = bias[o] if has_bias else 0
            if leaky_relu:
                for p in range(P):
                    v = y_gemm[o, j, p] + b
                    # Both sides computed first so the compiler emits a select, not a branch:
                    # the sign of v is unpredictable (a branch here made the pass 3x slower).
                    scaled = v * slope
                    y[first + j, o, p] = v if v > 0 else scaled
            else:
                for p in range(P):
                    y[first + j, o, p] = y_gemm[o, j, p] + b


def gemm_to_nchw_max_pool_2x2(
    const floating[:, :, ::1] y_gemm,
    const floating[::1] bias,
    bint has_bias,
    bint leaky_relu,
    double negative_slope,
    Py_ssize_t first,
    Py_ssize_t out_w,
    floating[:, :, ::1] y,
    int n_threads,
):
    """``gemm_to_nchw`` followed by a 2x2 / stride-2 max-pool, in one pass (inference): only the
    pooled output ``y`` of shape ``(n, out_c, (out_h // 2) * (out_w // 2))`` is written.

    The bias and a leaky ReLU with slope >= 0 are monotonic, so they are applied to each window's
    maximum instead of to its four values; a NaN in a window gives NaN, as the two passes would.
    """
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t ph = (P // out_w) // 2 if out_w > 0 else 0
    cdef Py_ssize_t j, o, py, px, r0, r1
    cdef floating b, a0, a1, a2, a3, m, m2, v, scaled
    cdef floating slope = <floating>negative_slope
    if g == 0 or oc == 0 or ph == 0 or pw == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            b = bias[o] if has_bias else 0
            for py in range(ph):
                r0 = 2 * py * out_w
                r1 = r0 + out_w
                for px in range(pw):
                    a0 = y_gemm[o, j, r0 + 2 * px]
                    a1 = y_gemm[o, j, r0 + 2 * px + 1]
                    a2 = y_gemm[o, j, r1 + 2 * px]
                    a3 = y_gemm[o, j, r1 + 2 * px + 1]
                    m = a0 if a0 > a1 else a1
                    m2 = a2 if a2 > a3 else a3
                    m = m if m > m2 else m2
                    if (a0 != a0) | (a1 != a1) | (a2 != a2) | (a3 != a3):
                        m = a0 + a1 + a2 + a3  # NaN
                    v = m + b
                    scaled = v * slope
                    if leaky_relu:
                        v = v if v > 0 else scaled
                    y[first + j, o, py * pw + px] = v


def nchw_to_gemm(
    const floating[:, :, ::1] dy,
    const floating[:, :, ::1] y,
    bint leaky_relu,
    double negative_slope,
    Py_ssize_t first,
    floating[:, :, ::1] dy_gemm,
    double[:, ::1] dbias_partial,
    int n_threads,
):
    """Inverse layout pass for the backward GEMMs: ``dy_gemm[o, j, p] = dy[first + j, o, p]``.

    When ``leaky_relu``, the gradient goes through the leaky ReLU first, read from its output ``y``
    (``y > 0`` exactly where its input was, for a slope >= 0). ``dbias_partial[j, o]`` receives
    each image's sum of the resulting gradient, so the bias gradient needs no extra pass and is
    summed in the same order whatever the thread count.
    """
    cdef Py_ssize_t oc = dy_gemm.shape[0], g = dy_gemm.shape[1], P = dy_gemm.shape[2]
    cdef Py_ssize_t j, o, p
    cdef floating v
    cdef floating derivative[2]
    cdef double acc
    derivative[0] = <floating>negative_slope
    derivative[1] = 1
    if g == 0 or oc == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            acc = 0
            if leaky_relu:
                for p in range(P):
                    # The derivative (slope or 1) is looked up by the comparison's 0/1 value: as a
                    # select or as arithmetic the compiler emitted a branch, mispredicted on half
                    # the elements (6x slower).
                    v = dy[first + j, o, p] * derivative[y[first + j, o, p] > 0]
                    dy_gemm[o, j, p] = v
                    acc = acc + v
            else:
                for p in range(P):
                    v = dy[first + j, o, p]
                    dy_gemm[o, j, p] = v
                    acc = acc + v
            dbias_partial[j, o] = acc


# --- a kernel's taps (convolutions, im2col / col2im, the average pool) ------------------------
# A kernel tap (ki, kj) reads input row oy * sy - pad_top + ki * dil_y and column
# ox * sx - pad_left + kj * dil_x for output (oy, ox). ``_tap_range`` gives the output rows and
# columns for which that lies inside the image, so padding costs no test in the loops, and each
# output row's run is one call of a row helper: a plain pointer loop the compiler vectorises for
# unit stride. Walking tap by tap (rather than output by output) also makes the average pool a
# sum of shifted planes, vectorised like the depthwise convolution.

cdef struct Geometry:
    # A convolution's geometry: input plane h x w, output plane out_h x out_w, strides,
    # dilations and the leading (top / left) padding.
    Py_ssize_t h, w, out_h, out_w, sy, sx, dil_y, dil_x, pad_top, pad_left


cdef struct TapRange:
    # For one kernel tap: the output rows [oy_lo, oy_hi) and columns [ox_lo, ox_hi) whose input
    # position (oy * sy + row0, ox * sx + col0) lies inside the image. When no column does, the
    # row range is empty too, so a loop over the rows is all a kernel needs.
    Py_ssize_t oy_lo, oy_hi, ox_lo, ox_hi, row0, col0


cdef inline (Py_ssize_t, Py_ssize_t) _inside(Py_ssize_t n_out, Py_ssize_t stride, Py_ssize_t offset,
                                             Py_ssize_t size) noexcept nogil:
    """The outputs ``[lo, hi)`` of ``range(n_out)`` whose input index ``o * stride + offset`` lies in
    ``[0, size)``: the ones before and after read the padding."""
    cdef Py_ssize_t lo = (-offset + stride - 1) // stride if offset < 0 else 0
    cdef Py_ssize_t hi = (size - offset + stride - 1) // stride if size > offset else 0
    hi = n_out if hi > n_out else hi
    lo = hi if lo > hi else lo
    return lo, hi


cdef inline TapRange _tap_range(Py_ssize_t ki, Py_ssize_t kj, const Geometry* g) noexcept nogil:
    """Where tap ``(ki, kj)`` reads inside the image (see ``TapRange``)."""
    cdef TapRange t
    t.row0 = ki * g.dil_y - g.pad_top
    t.col0 = kj * g.dil_x - g.pad_left
    t.oy_lo, t.oy_hi = _inside(g.out_h, g.sy, t.row0, g.h)
    t.ox_lo, t.ox_hi = _inside(g.out_w, g.sx, t.col0, g.w)
    if t.ox_lo == t.ox_hi:
        t.oy_hi = t.oy_lo  # no column inside the image: the tap reads no row either
    return t


cdef inline void _gather_row(floating* dst, const floating* src, Py_ssize_t step, Py_ssize_t n) noexcept nogil:
    """``dst[i] = src[i * step]`` for ``i < n``: one ``memcpy`` for unit step."""
    cdef Py_ssize_t i
    if step == 1:
        memcpy(dst, src, n * sizeof(floating))
    else:
        for i in range(n):
            dst[i] = src[i * step]


cdef inline void _add_scaled_row(floating* dst, Py_ssize_t dst_step, const floating* src, Py_ssize_t src_step,
                                 floating scale, Py_ssize_t n) noexcept nogil:
    """``dst[i * dst_step] += scale * src[i * src_step]`` for ``i < n`` (a scale of 1 adds exactly).
    One step is 1 wherever it is called; the all-unit case is the loop the compiler vectorises.
    (``n > 0`` in its test is not redundant: told the run is not empty, GCC emits a leaner
    vector loop; without it the depthwise forward ran 10-15 % slower on AVX-512.)"""
    cdef Py_ssize_t i
    if dst_step == 1 and src_step == 1 and n > 0:
        for i in range(n):
            dst[i] += scale * src[i]
    else:
        for i in range(n):
            dst[i * dst_step] += scale * src[i * src_step]


cdef inline floating _dot_row(floating acc, const floating* a, const floating* b, Py_ssize_t b_step,
                              Py_ssize_t n) noexcept nogil:
    """``acc + sum_i a[i] * b[i * b_step]``, added in order (the same result for any thread count)."""
    cdef Py_ssize_t i
    for i in range(n):
        acc = acc + a[i] * b[i * b_step]
    return acc


cdef inline const floating* _plane(const floating[:, :, :, ::1] a, Py_ssize_t img, Py_ssize_t ch) noexcept nogil:
    """The address of plane ``a[img, ch]`` (NULL when the plane is empty: no tap reads it then)."""
    return &a[img, ch, 0, 0] if a.shape[2] > 0 and a.shape[3] > 0 else NULL


cdef inline void _tap_gather_add(floating* outputs, const floating* image, floating scale, const TapRange* t,
                                 const Geometry* g) noexcept nogil:
    """``outputs[oy, ox] += scale * image[oy * sy + row0, ox * sx + col0]`` over the tap's rows and
    columns inside the image (``outputs`` is an ``out_h x out_w`` plane, ``image`` an ``h x w``
    one): a tap's share of a depthwise convolution or an average pool."""
    cdef Py_ssize_t oy
    for oy in range(t.oy_lo, t.oy_hi):
        _add_scaled_row(outputs + oy * g.out_w + t.ox_lo, 1,
                        image + (oy * g.sy + t.row0) * g.w + t.ox_lo * g.sx + t.col0, g.sx, scale, t.ox_hi - t.ox_lo)


cdef inline void _tap_scatter_add(floating* image, const floating* outputs, floating scale, const TapRange* t,
                                  const Geometry* g) noexcept nogil:
    """The adjoint of ``_tap_gather_add``: ``image[oy * sy + row0, ox * sx + col0] += scale *
    outputs[oy, ox]`` (col2im, the depthwise input gradient, the average pool's backward)."""
    cdef Py_ssize_t oy
    for oy in range(t.oy_lo, t.oy_hi):
        _add_scaled_row(image + (oy * g.sy + t.row0) * g.w + t.ox_lo * g.sx + t.col0, g.sx,
                        outputs + oy * g.out_w + t.ox_lo, 1, scale, t.ox_hi - t.ox_lo)


cdef inline floating _tap_dot(const floating* outputs, const floating* image, const TapRange* t,
                              const Geometry* g) noexcept nogil:
    """``sum outputs[oy, ox] * image[oy * sy + row0, ox * sx + col0]`` over the tap's rows and
    columns inside the image, added in order (a depthwise weight's gradient)."""
    cdef Py_ssize_t oy
    cdef floating acc = 0
    for oy in range(t.oy_lo, t.oy_hi):
        acc = _dot_row(acc, outputs + oy * g.out_w + t.ox_lo,
                       image + (oy * g.sy + t.row0) * g.w + t.ox_lo * g.sx + t.col0, g.sx, t.ox_hi - t.ox_lo)
    return acc


# --- pooling ---------------------------------------------------------------------------------

cdef inline bint _in_window_bounds(Py_ssize_t i, Py_ssize_t size) noexcept nogil:
    """Whether input index ``i`` of a max-pool window (``o * stride - pad + tap``) lies inside the
    input's ``size`` elements rather than in the padding, which the pool skips. One unsigned
    comparison (a negative ``i`` wraps to a huge value). The max pool walks each window in
    order (its first maximum wins); the average pool walks the taps instead (``_tap_range``)."""
    return <size_t>i < <size_t>size


cdef inline void _zero_plane(floating[:, :, :, ::1] a, Py_ssize_t img, Py_ssize_t ch) noexcept nogil:
    """``a[img, ch] = 0``: the plane a scatter (a backward, col2im) adds into, cleared first."""
    if a.shape[2] > 0 and a.shape[3] > 0:
        memset(&a[img, ch, 0, 0], 0, a.shape[2] * a.shape[3] * sizeof(floating))


cdef inline bint _takes(floating v, floating best) noexcept nogil:
    """Whether ``v`` replaces the running maximum: larger, or the first NaN (NaN propagates)."""
    return (v > best) | ((v != v) & (best == best))


def max_pool2d(
    const floating[:, :, :, ::1] x,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    floating[:, :, :, ::1] y,
    int64[:, :, :, ::1] indices,
    bint with_indices,
    int n_threads,
):
    """Max over each window; ``indices`` gets the flat ``iy * w + ix`` of the (first) maximum
    when ``with_indices`` (inference skips them: they are two thirds of the bytes written).

    Padding never wins (it acts as -inf); a NaN in a window propagates to the output.
    The caller guarantees every window holds at least one real input position.
    """
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t out_h = y.shape[2], out_w = y.shape[3]
    cdef Py_ssize_t plane, img, ch, oy, ox, ki, kj, iy, ix, best_idx, y0, x0
    cdef floating v, best, a, b, c2, d
    cdef Py_ssize_t k
    cdef bint take
    if n == 0 or c == 0 or out_h == 0 or out_w == 0:
        return
    if kh == 2 and kw == 2 and sy == 2 and sx == 2 and pad_top == 0 and pad_left == 0:
        # Fast path for the 2x2 / stride-2 pool every classic CNN uses: no bounds tests, and
        # selects instead of branches (which of four random values is largest mispredicts often).
        for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
            img = plane // c
            ch = plane % c
            for oy in range(out_h):
                y0 = 2 * oy
                for ox in range(out_w):
                    x0 = 2 * ox
                    a = x[img, ch, y0, x0]
                    b = x[img, ch, y0, x0 + 1]
                    c2 = x[img, ch, y0 + 1, x0]
                    d = x[img, ch, y0 + 1, x0 + 1]
                    # Branch-free: `v if v > m else m` compiles to maxss and the index update is
                    # integer arithmetic on the comparison; the winner of random data is
                    # unpredictable, and a branch here cost 5x.
                    best = a
                    k = 0
                    k = k + (1 - k) * (b > best)
                    best = b if b > best else best
                    k = k + (2 - k) * (c2 > best)
                    best = c2 if c2 > best else best
                    k = k + (3 - k) * (d > best)
                    best = d if d > best else best
                    if (a != a) | (b != b) | (c2 != c2) | (d != d):
                        # Rare: NaN propagates, and the first NaN is the argmax.
                        k = 0 if a != a else (1 if b != b else (2 if c2 != c2 else 3))
                        best = a + b + c2 + d
                    y[img, ch, oy, ox] = best
                    if with_indices:
                        indices[img, ch, oy, ox] = (y0 + k // 2) * w + x0 + k % 2
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        for oy in range(out_h):
            y0 = oy * sy - pad_top
            for ox in range(out_w):
                x0 = ox * sx - pad_left
                best = -INFINITY
                best_idx = -1
                for ki in range(kh):
                    iy = y0 + ki
                    if not _in_window_bounds(iy, h):
                        continue
                    for kj in range(kw):
                        ix = x0 + kj
                        if not _in_window_bounds(ix, w):
                            continue
                        v = x[img, ch, iy, ix]
                        take = best_idx < 0 or _takes(v, best)
                        best = v if take else best
                        best_idx = iy * w + ix if take else best_idx
                y[img, ch, oy, ox] = best
                if with_indices:
                    indices[img, ch, oy, ox] = best_idx


def max_pool2d_backward(
    const floating[:, :, :, ::1] dy,
    const int64[:, :, :, ::1] indices,
    floating[:, :, ::1] dx,
    int n_threads,
):
    """Scatter ``dy`` to the argmax positions: ``dx`` has shape ``(n, c, h * w)`` and is overwritten.

    Returns the number of out-of-range indices found (those are skipped, never written).
    """
    cdef Py_ssize_t n = dy.shape[0], c = dy.shape[1], out_h = dy.shape[2], out_w = dy.shape[3]
    cdef Py_ssize_t hw = dx.shape[2]
    cdef Py_ssize_t plane, img, ch, oy, ox, k
    cdef int64 idx
    cdef Py_ssize_t bad = 0
    if n == 0 or c == 0:
        return 0
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        for k in range(hw):
            dx[img, ch, k] = 0
        for oy in range(out_h):
            for ox in range(out_w):
                idx = indices[img, ch, oy, ox]
                if idx < 0 or idx >= hw:
                    bad += 1
                else:
                    dx[img, ch, idx] += dy[img, ch, oy, ox]
    return bad


def avg_pool2d(
    const floating[:, :, :, ::1] x,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    floating[:, :, :, ::1] y,
    int n_threads,
):
    """Mean over each window, padding counted as zeros (PyTorch's ``count_include_pad=True``).

    Summed tap by tap (``_tap_gather_add``: each tap adds a shifted plane, vectorised for unit
    stride), which adds each window's values in the same order as a loop over the window would,
    then scaled by ``1 / (kh * kw)``."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1]
    cdef Py_ssize_t out_h = y.shape[2], out_w = y.shape[3]
    cdef Geometry geo = Geometry(x.shape[2], x.shape[3], out_h, out_w, sy, sx, 1, 1, pad_top, pad_left)
    cdef Py_ssize_t plane, img, ch, ki, kj, q
    cdef TapRange t
    cdef floating* dst
    cdef const floating* src
    cdef floating scale = 1.0 / (kh * kw)
    if n == 0 or c == 0 or out_h == 0 or out_w == 0:
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        _zero_plane(y, img, ch)
        dst = &y[img, ch, 0, 0]
        src = _plane(x, img, ch)
        for ki in range(kh):
            for kj in range(kw):
                t = _tap_range(ki, kj, &geo)
                _tap_gather_add(dst, src, 1, &t, &geo)
        for q in range(out_h * out_w):
            dst[q] = dst[q] * scale


def avg_pool2d_backward(
    const floating[:, :, :, ::1] dy,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    floating[:, :, :, ::1] dx,
    int n_threads,
):
    """Spread each ``dy / (kh * kw)`` over its window's positions inside the input, tap by tap
    (``_tap_scatter_add``, the adjoint of the forward's walk); ``dx`` is overwritten."""
    cdef Py_ssize_t n = dx.shape[0], c = dx.shape[1]
    cdef Geometry geo = Geometry(dx.shape[2], dx.shape[3], dy.shape[2], dy.shape[3], sy, sx, 1, 1, pad_top, pad_left)
    cdef Py_ssize_t plane, img, ch, ki, kj
    cdef TapRange t
    cdef floating* dst
    cdef const floating* src
    cdef floating scale = 1.0 / (kh * kw)
    if n == 0 or c == 0:
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        _zero_plane(dx, img, ch)
        dst = <floating*>_plane(dx, img, ch)
        src = _plane(dy, img, ch)
        for ki in range(kh):
            for kj in range(kw):
                t = _tap_range(ki, kj, &geo)
                _tap_scatter_add(dst, src, scale, &t, &geo)


# --- per-element passes ------------------------------------------------------------------------
# Each runs over flat, C-contiguous arrays that the caller (cnnx.functional) checked for equal
# length. The array is cut into one contiguous chunk per thread (chunk edges on 64-byte lines, so
# two threads never write the same cache line) and each chunk is a plain pointer loop the compiler
# vectorises: each pass is a chunk kernel ``_<pass>_chunk(out, operands, lo, hi)``, and its ``def``
# fills an ``Operands`` struct and hands both to the one runner, ``_in_chunks``. Every element is computed the same way whatever the chunking, so results do not
# depend on the thread count. Data-dependent choices are written as selects (`a if c else b` on
# values both computed), never branches: signs of activations are unpredictable.

from libc.math cimport ceil, exp, erfc, sqrt, log, fabs
from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    /* Bounds of chunk t of n_chunks over n elements, rounded to 16 elements (64 bytes). */
    static inline Py_ssize_t cnnx_chunk_edge(Py_ssize_t n, Py_ssize_t t, Py_ssize_t n_chunks) {
        if (t >= n_chunks) return n;
        Py_ssize_t e = (Py_ssize_t)(((long double)n * t) / n_chunks);
        e &= ~(Py_ssize_t)15;
        return e;
    }
    """
    Py_ssize_t cnnx_chunk_edge(Py_ssize_t n, Py_ssize_t t, Py_ssize_t n_chunks) noexcept nogil


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* exp and expm1 in double precision, branch-free so that loops calling them vectorise (libm's
       exp is a scalar call). x = k ln2 + r with |r| <= ln2/2; expm1(r) by its Taylor series to
       r^13 (truncation below 1e-17); e^x = 2^k (1 + expm1(r)), 2^k built from its bits. x is
       clamped to [-708, 709] so 2^k stays a normal number; callers that need e^x -> 0 below
       -708 select it. NaN propagates. */
    static inline void cnnx_exp_parts(double x, double *scale, double *scaled_p) {
        const double shifter = 6755399441055744.0;  /* 1.5 * 2^52: adding it rounds to an integer */
        x = x < -708.0 ? -708.0 : x;
        x = x > 709.0 ? 709.0 : x;
        double t = x * 1.4426950408889634 + shifter;
        double k = t - shifter;
        double r = x - k * 6.93147180369123816490e-01;  /* ln 2 split in two (fdlibm) */
        r = r - k * 1.90821492927058770002e-10;
        double p = 1.6059043836821613e-10;              /* 1/13! */
        p = p * r + 2.0876756987868099e-09;
        p = p * r + 2.5052108385441720e-08;
        p = p * r + 2.7557319223985893e-07;
        p = p * r + 2.7557319223985888e-06;
        p = p * r + 2.4801587301587302e-05;
        p = p * r + 1.9841269841269841e-04;
        p = p * r + 1.3888888888888889e-03;
        p = p * r + 8.3333333333333332e-03;
        p = p * r + 4.1666666666666664e-02;
        p = p * r + 1.6666666666666666e-01;
        p = p * r + 0.5;
        p = p * (r * r) + r;
        uint64_t bits;
        memcpy(&bits, &t, sizeof bits);
        bits = (bits + 1023u) << 52;  /* the low bits of t hold k */
        double s;
        memcpy(&s, &bits, sizeof s);
        *scale = s;
        *scaled_p = s * p;
    }
    static inline double cnnx_exp(double x) {
        double s, sp;
        cnnx_exp_parts(x, &s, &sp);
        return s + sp;
    }
    static inline double cnnx_expm1(double x) {
        double s, sp;
        cnnx_exp_parts(x, &s, &sp);
        return sp + (s - 1.0);
    }
    /* 1 / (1 + e^-x) from e = e^-|x| (never overflows): 1/(1+e) for x >= 0, e/(1+e) below;
       below -708 (the clamp of cnnx_exp) the true value is under 1e-307 and 0 is returned. */
    static inline double cnnx_sigmoid(double x) {
        double e = cnnx_exp(-fabs(x));
        e = fabs(x) > 708.0 ? 0.0 : e;
        double num = x >= 0 ? 1.0 : e;
        return num / (1.0 + e);
    }
    /* tanh(x) = -sign(x) expm1(-2|x|) / (2 + expm1(-2|x|)): no cancellation near 0. */
    static inline double cnnx_tanh(double x) {
        double em = cnnx_expm1(-2.0 * fabs(x));
        return copysign(-em / (2.0 + em), x);
    }
    """
    double cnnx_exp(double x) noexcept nogil
    double cnnx_tanh(double x) noexcept nogil
    double cnnx_sigmoid(double x) noexcept nogil


cdef extern from *:
    """
    /* C. Wellons' "lowbias32" integer hash: a bijection of 32-bit words with near-ideal
       avalanche. Element i of a dropout mask draws the top 24 bits of
       hash(hash(lo(i) ^ k0) + hi(i) + k1) (k0, k1 the two halves of the seed): any element can be
       drawn by any thread, so the mask depends on the seed only, never on the thread count.
       32-bit multiplies vectorise on every x86 build; 64-bit ones are emulated below AVX-512. */
    static inline uint32_t cnnx_hash32(uint32_t x) {
        x ^= x >> 16;
        x *= 0x7feb352dU;
        x ^= x >> 15;
        x *= 0x846ca68bU;
        x ^= x >> 16;
        return x;
    }
    static inline uint32_t cnnx_draw24(uint64_t seed, uint64_t i) {
        uint32_t h = cnnx_hash32((uint32_t)i ^ (uint32_t)seed);
        return cnnx_hash32(h + (uint32_t)(i >> 32) + (uint32_t)(seed >> 32)) >> 8;
    }
    """
    uint32_t cnnx_draw24(uint64_t seed, uint64_t i) noexcept nogil


cdef struct Operands:
    # What a per-element pass reads besides its output: the other arrays (untyped, as a struct
    # cannot be fused; each chunk kernel reads them as its output's dtype) and the scalar
    # settings. A pass sets only the fields its kernel names.
    const void* x           # the input: x, dy, a, grad
    const void* other       # the second input: ref / y / x of a backward, b
    void* state             # an extra output or optimizer state: mask, momentum buffer, exp_avg
    void* state2            # exp_avg_sq
    double negative_slope   # leaky ReLU
    bint is_tanh            # sigmoid_tanh_backward
    bint approximate_tanh   # GELU
    bint gradient           # GELU: dy * gelu'(x) rather than gelu(x)
    uint64_t seed           # dropout
    uint32_t threshold
    double scale
    double lr               # SGD
    double momentum
    double damp_keep
    double weight_decay     # SGD; Adam's coupled decay (0 for AdamW)
    bint nesterov
    bint first
    double decay_keep       # Adam
    double one_minus_beta1
    double beta2
    double one_minus_beta2
    double bc2_sqrt
    double eps
    double step_size


cdef inline int _threads_for(Py_ssize_t n, int n_threads) noexcept nogil:
    """Threads actually used: at most one per 4096 elements (smaller chunks cost more to wake)."""
    cdef Py_ssize_t most = n // 4096
    if most < 1:
        return 1
    return <int>(n_threads if n_threads < most else most)


cdef void _in_chunks(
    void (*kernel)(floating*, const Operands*, Py_ssize_t, Py_ssize_t) noexcept nogil,
    floating[::1] out,
    const Operands* operands,
    int n_threads,
):
    """Run ``kernel(&out[0], operands, lo, hi)`` over the elements ``[0, len(out))`` cut into one
    contiguous chunk per thread (``_threads_for``), chunk edges on 64-byte lines (``cnnx_chunk_edge``),
    so two threads never write the same cache line. Each kernel is a plain loop over ``[lo, hi)``
    that the compiler vectorises; called once per chunk, the pointer costs nothing per element."""
    cdef Py_ssize_t n = out.shape[0]
    cdef int t, nt = _threads_for(n, n_threads)
    cdef floating* dst
    if n == 0:
        return
    dst = &out[0]
    for t in prange(nt, nogil=True, schedule="static", num_threads=nt):
        kernel(dst, operands, cnnx_chunk_edge(n, t, nt), cnnx_chunk_edge(n, t + 1, nt))


cdef inline void* _address(const floating[::1] a):
    """The address of ``a[0]`` for an ``Operands`` field (NULL when ``a`` is empty)."""
    return <void*>&a[0] if a.shape[0] > 0 else NULL


cdef void _leaky_relu_chunk(floating* y, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* x = <const floating*>o.x
    cdef floating slope = <floating>o.negative_slope
    cdef Py_ssize_t i
    cdef floating v, scaled
    if slope == 0:
        # ReLU as max(x, 0): -inf gives 0 (not -inf * 0 = NaN), -0.0 gives +0.0, NaN stays NaN.
        for i in range(lo, hi):
            v = x[i]
            y[i] = 0 if v <= 0 else v
        return
    for i in range(lo, hi):
        v = x[i]
        scaled = v * slope
        y[i] = v if v > 0 else scaled


def leaky_relu_forward(
    const floating[::1] x,
    double negative_slope,
    floating[::1] y,
    int n_threads,
):
    """``y = x if x > 0 else negative_slope * x`` (slope 0 gives ReLU); ``y`` may be ``x``."""
    cdef Operands o
    o.x = _address(x)
    o.negative_slope = negative_slope
    _in_chunks(_leaky_relu_chunk[floating], y, &o, n_threads)


cdef void _leaky_relu_grad_chunk(floating* dx, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* dy = <const floating*>o.x
    cdef const floating* ref = <const floating*>o.other
    cdef floating slope = <floating>o.negative_slope
    cdef Py_ssize_t i
    cdef floating g, scaled
    for i in range(lo, hi):
        g = dy[i]
        scaled = g * slope
        dx[i] = g if ref[i] > 0 else scaled


def leaky_relu_backward(
    const floating[::1] dy,
    const floating[::1] ref,
    double negative_slope,
    floating[::1] dx,
    int n_threads,
):
    """``dx = dy if ref > 0 else negative_slope * dy``; ``ref`` is the output (slope >= 0) or the
    input (any slope). ``dx`` may be ``dy``."""
    cdef Operands o
    o.x = _address(dy)
    o.other = _address(ref)
    o.negative_slope = negative_slope
    _in_chunks(_leaky_relu_grad_chunk[floating], dx, &o, n_threads)


# Two kernels rather than one with an is_tanh test: the merged loop ran 3 % slower (AVX-512).
cdef void _sigmoid_chunk(floating* y, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* x = <const floating*>o.x
    cdef Py_ssize_t i
    for i in range(lo, hi):
        y[i] = <floating>cnnx_sigmoid(x[i])


cdef void _tanh_chunk(floating* y, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* x = <const floating*>o.x
    cdef Py_ssize_t i
    for i in range(lo, hi):
        y[i] = <floating>cnnx_tanh(x[i])


cdef _sigmoid_or_tanh(const floating[::1] x, bint is_tanh, floating[::1] y, int n_threads):
    cdef Operands o
    o.x = _address(x)
    if is_tanh:
        _in_chunks(_tanh_chunk[floating], y, &o, n_threads)
    else:
        _in_chunks(_sigmoid_chunk[floating], y, &o, n_threads)


def sigmoid_forward(const floating[::1] x, floating[::1] y, int n_threads):
    """``y = 1 / (1 + exp(-x))`` without overflow, in double precision; ``y`` may be ``x``."""
    _sigmoid_or_tanh(x, False, y, n_threads)


def tanh_forward(const floating[::1] x, floating[::1] y, int n_threads):
    """``y = tanh(x)`` (in double precision); ``y`` may be ``x``."""
    _sigmoid_or_tanh(x, True, y, n_threads)


cdef void _sigmoid_tanh_grad_chunk(floating* dx, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* dy = <const floating*>o.x
    cdef const floating* y = <const floating*>o.other
    cdef Py_ssize_t i
    cdef floating v
    if o.is_tanh:
        for i in range(lo, hi):
            v = y[i]
            dx[i] = (1 - v * v) * dy[i]
    else:
        for i in range(lo, hi):
            v = y[i]
            dx[i] = (1 - v) * v * dy[i]


def sigmoid_tanh_backward(
    const floating[::1] dy,
    const floating[::1] y,
    bint is_tanh,
    floating[::1] dx,
    int n_threads,
):
    """From the output ``y``: ``dx = dy (1 - y^2)`` (tanh) or ``dx = dy y (1 - y)`` (sigmoid)."""
    cdef Operands o
    o.x = _address(dy)
    o.other = _address(y)
    o.is_tanh = is_tanh
    _in_chunks(_sigmoid_tanh_grad_chunk[floating], dx, &o, n_threads)


cdef double _SQRT_HALF = 0.70710678118654752440
cdef double _SQRT_2_OVER_PI = 0.79788456080286535588
cdef double _INV_SQRT_2PI = 0.39894228040143267794
cdef double _GELU_C = 0.044715


cdef inline void _gelu_tanh(const floating* dy, const floating* x, floating* out, Py_ssize_t lo,
                            Py_ssize_t hi, bint grad) noexcept nogil:
    """The tanh approximation of GELU (``grad`` False: ``out = gelu(x)``), or ``dy * gelu'(x)``.

    With ``u = sqrt(2/pi) (x + 0.044715 x^3)``: ``(1 + tanh u) / 2 = sigmoid(2u) = s`` and
    ``1 - tanh(u)^2 = 4 s (1 - s)``, which avoid the cancellation of ``1 + tanh u`` for very
    negative x. Kept apart from the erf form so that this loop, free of libm calls, vectorises."""
    cdef Py_ssize_t i
    cdef double v, sg, inner_grad
    if grad:
        for i in range(lo, hi):
            v = x[i]
            sg = cnnx_sigmoid(2 * _SQRT_2_OVER_PI * (v + _GELU_C * v * v * v))
            inner_grad = _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * v * v)
            out[i] = <floating>(dy[i] * (sg + 2 * v * sg * (1 - sg) * inner_grad))
    else:
        for i in range(lo, hi):
            v = x[i]
            out[i] = <floating>(v * cnnx_sigmoid(2 * _SQRT_2_OVER_PI * (v + _GELU_C * v * v * v)))


cdef inline void _gelu_erf(const floating* dy, const floating* x, floating* out, Py_ssize_t lo,
                           Py_ssize_t hi, bint grad) noexcept nogil:
    """Exact GELU ``x Phi(x)`` with ``Phi(x) = erfc(-x / sqrt 2) / 2`` (accurate for very negative
    x), or ``dy * (Phi(x) + x phi(x))``."""
    cdef Py_ssize_t i
    cdef double v, cdf
    for i in range(lo, hi):
        v = x[i]
        cdf = 0.5 * erfc(-v * _SQRT_HALF)
        if grad:
            out[i] = <floating>(dy[i] * (cdf + v * cnnx_exp(-0.5 * v * v) * _INV_SQRT_2PI))
        else:
            out[i] = <floating>(v * cdf)


cdef void _gelu_chunk(floating* out, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """``out = gelu(x)``, or ``dy * gelu'(x)`` when ``o.gradient`` (then ``o.x`` is dy and
    ``o.other`` is x)."""
    cdef const floating* dy = <const floating*>o.x
    cdef const floating* x = <const floating*>(o.other if o.gradient else o.x)
    if o.approximate_tanh:
        _gelu_tanh(dy, x, out, lo, hi, o.gradient)
    else:
        _gelu_erf(dy, x, out, lo, hi, o.gradient)


def gelu_forward(const floating[::1] x, bint approximate_tanh, floating[::1] y, int n_threads):
    """``y = x Phi(x)`` (erf form) or the tanh approximation, in double precision."""
    cdef Operands o
    o.x = _address(x)
    o.approximate_tanh = approximate_tanh
    o.gradient = False
    _in_chunks(_gelu_chunk[floating], y, &o, n_threads)


def gelu_backward(
    const floating[::1] dy,
    const floating[::1] x,
    bint approximate_tanh,
    floating[::1] dx,
    int n_threads,
):
    """``dx = dy * gelu'(x)``."""
    cdef Operands o
    o.x = _address(dy)
    o.other = _address(x)
    o.approximate_tanh = approximate_tanh
    o.gradient = True
    _in_chunks(_gelu_chunk[floating], dx, &o, n_threads)


cdef void _dropout_chunk(floating* y, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* x = <const floating*>o.x
    cdef floating* mask = <floating*>o.state
    cdef uint64_t seed = o.seed
    cdef uint32_t threshold = o.threshold
    cdef floating scale = <floating>o.scale
    cdef Py_ssize_t i
    cdef floating m
    cdef uint32_t draw
    for i in range(lo, hi):
        draw = cnnx_draw24(seed, <uint64_t>i)
        m = scale if draw >= threshold else 0
        mask[i] = m
        y[i] = x[i] * m


def dropout_forward(
    const floating[::1] x,
    uint64_t seed,
    double p,
    floating[::1] y,
    floating[::1] mask,
    int n_threads,
):
    """Inverted dropout with a mask drawn from ``seed``: element ``i`` is kept when its 24-bit draw
    ``cnnx_draw24(seed, i)`` is at least ``ceil(p * 2^24)`` (probability ``p`` to 2^-24);
    ``mask = keep / (1 - p)``, ``y = x * mask``."""
    cdef Operands o
    o.x = _address(x)
    o.state = _address(mask)
    o.seed = seed
    o.threshold = <uint32_t>ceil(p * 16777216.0)
    o.scale = 1.0 / (1.0 - p)
    _in_chunks(_dropout_chunk[floating], y, &o, n_threads)


cdef void _multiply_chunk(floating* out, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* a = <const floating*>o.x
    cdef const floating* b = <const floating*>o.other
    cdef Py_ssize_t i
    for i in range(lo, hi):
        out[i] = a[i] * b[i]


def multiply(const floating[::1] a, const floating[::1] b, floating[::1] out, int n_threads):
    """``out = a * b`` elementwise (dropout's backward); ``out`` may be ``a`` or ``b``."""
    cdef Operands o
    o.x = _address(a)
    o.other = _address(b)
    _in_chunks(_multiply_chunk[floating], out, &o, n_threads)


# --- optimizers (PyTorch's single-tensor equations, one pass over param, grad and state) ---------

cdef void _sgd_chunk(floating* p, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* g = <const floating*>o.x
    cdef floating* buf = <floating*>o.state
    cdef floating lr = <floating>o.lr, mu = <floating>o.momentum, damp_keep = <floating>o.damp_keep
    cdef floating wd = <floating>o.weight_decay
    cdef bint nesterov = o.nesterov, first = o.first
    cdef Py_ssize_t i
    cdef floating d, b
    for i in range(lo, hi):
        d = g[i]
        if wd != 0:
            d = d + wd * p[i]
        if mu != 0:
            if first:
                b = d  # torch starts the buffer at the gradient itself, undamped
            else:
                b = mu * buf[i] + damp_keep * d
            buf[i] = b
            d = d + mu * b if nesterov else b
        p[i] = p[i] - lr * d


def sgd_step(
    floating[::1] param,
    const floating[::1] grad,
    floating[::1] momentum_buffer,
    double lr,
    double momentum,
    double dampening,
    double weight_decay,
    bint nesterov,
    bint first,
    int n_threads,
):
    """One ``torch.optim.SGD`` step: ``d = g + wd p``; with momentum ``buf = mu buf + (1 - damp) d``
    (``buf = d`` when ``first``) and ``d = d + mu buf`` (Nesterov) or ``buf``; ``p -= lr d``.
    ``momentum_buffer`` is not read or written when ``momentum`` is 0."""
    cdef Operands o
    o.x = _address(grad)
    o.state = _address(momentum_buffer) if momentum != 0 else NULL
    o.lr = lr
    o.momentum = momentum
    o.damp_keep = 1.0 - dampening
    o.weight_decay = weight_decay
    o.nesterov = nesterov
    o.first = first
    _in_chunks(_sgd_chunk[floating], param, &o, n_threads)


cdef void _adam_chunk(floating* p, const Operands* o, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    cdef const floating* g = <const floating*>o.x
    cdef floating* m = <floating*>o.state
    cdef floating* v = <floating*>o.state2
    cdef floating decay_keep = <floating>o.decay_keep, wd = <floating>o.weight_decay
    cdef floating one_minus_beta1 = <floating>o.one_minus_beta1, beta2 = <floating>o.beta2
    cdef floating one_minus_beta2 = <floating>o.one_minus_beta2, bc2_sqrt = <floating>o.bc2_sqrt
    cdef floating eps = <floating>o.eps, step_size = <floating>o.step_size
    cdef Py_ssize_t i
    cdef floating gi, pi, mi, vi, denom
    for i in range(lo, hi):
        pi = p[i] * decay_keep  # AdamW's decoupled decay (decay_keep 1 otherwise: exact)
        gi = g[i] + wd * pi if wd != 0 else g[i]
        mi = m[i] + one_minus_beta1 * (gi - m[i])  # torch's lerp_(grad, 1 - beta1)
        vi = beta2 * v[i] + one_minus_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        denom = sqrt(vi) / bc2_sqrt + eps
        p[i] = pi - step_size * (mi / denom)


def adam_step(
    floating[::1] param,
    const floating[::1] grad,
    floating[::1] exp_avg,
    floating[::1] exp_avg_sq,
    double lr,
    double beta1,
    double beta2,
    double eps,
    double weight_decay,
    bint decoupled,
    Py_ssize_t step,
    int n_threads,
):
    """One ``torch.optim.Adam`` (``decoupled``: ``AdamW``) step at the parameter's step ``step`` >= 1.

    Adam adds ``weight_decay * p`` to the gradient; AdamW first scales ``p`` by ``1 - lr * wd``.
    Then ``m += (1 - b1)(g - m)``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.
    """
    cdef Operands o
    o.x = _address(grad)
    o.state = _address(exp_avg)
    o.state2 = _address(exp_avg_sq)
    o.decay_keep = 1.0 - lr * weight_decay if decoupled else 1.0
    o.weight_decay = 0.0 if decoupled else weight_decay
    o.one_minus_beta1 = 1.0 - beta1
    o.beta2 = beta2
    o.one_minus_beta2 = 1.0 - beta2
    o.bc2_sqrt = sqrt(1.0 - beta2 ** step)
    o.eps = eps
    o.step_size = lr / (1.0 - beta1 ** step)
    _in_chunks(_adam_chunk[floating], param, &o, n_threads)


# --- softmax cross-entropy (value and gradient in one pass over the logits) ---------------------

def softmax_cross_entropy(
    const floating[:, ::1] logits,
    const Py_ssize_t[::1] ids,
    const floating[:, ::1] rows,
    bint use_ids,
    double label_smoothing,
    floating[:, ::1] grad,
    double[::1] row_loss,
    int n_threads,
):
    """Per row ``i``: ``row_loss[i] = logsumexp(z_i) - sum_j t_ij z_ij`` and
    ``grad[i] = (softmax(z_i) sum_j t_ij - t_i) / n``.

    The target is class ids ``ids`` with label smoothing ``eps`` (``t = (1 - eps) onehot + eps / k``)
    when ``use_ids``, else the rows ``rows`` (already smoothed by the caller). The caller checked
    the ids are in [0, k). Logits are shifted by their row maximum, so exp never overflows.
    """
    cdef Py_ssize_t n = logits.shape[0], k = logits.shape[1]
    cdef Py_ssize_t i, j
    cdef double mx, total, log_total, dot, mass, e, tj
    cdef double inv_n = 1.0 / n if n > 0 else 0.0
    cdef double smooth = label_smoothing / k if k > 0 else 0.0
    cdef double on_target = 1.0 - label_smoothing
    if n == 0 or k == 0:
        return
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads):
        mx = logits[i, 0]
        for j in range(1, k):
            mx = logits[i, j] if logits[i, j] > mx else mx
        total = 0
        dot = 0
        mass = 0
        for j in range(k):
            e = exp(logits[i, j] - mx)
            grad[i, j] = <floating>e
            total = total + e
            if use_ids:
                tj = smooth + (on_target if j == ids[i] else 0.0)
            else:
                tj = rows[i, j]
            dot = dot + tj * (logits[i, j] - mx)
            mass = mass + tj
        log_total = log(total)
        row_loss[i] = log_total * mass - dot
        for j in range(k):
            if use_ids:
                tj = smooth + (on_target if j == ids[i] else 0.0)
            else:
                tj = rows[i, j]
            grad[i, j] = <floating>((grad[i, j] / total * mass - tj) * inv_n)


# --- batch normalisation over (n, c, L) views ------------------------------------------------------

cdef inline double _sum_dev(const floating* x, Py_ssize_t n, double mu, bint squared) noexcept nogil:
    """``sum(x - mu)`` or ``sum((x - mu)^2)`` in double, over 8 running sums combined in a fixed
    order: independent additions the compiler can vectorise (one running sum is a chain of
    dependent adds, 4 cycles each), and the same result whatever the thread count."""
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef double d0, d1, d2, d3, d4, d5, d6, d7
    cdef Py_ssize_t i = 0
    if squared:
        while i + 8 <= n:
            d0 = x[i] - mu
            d1 = x[i + 1] - mu
            d2 = x[i + 2] - mu
            d3 = x[i + 3] - mu
            d4 = x[i + 4] - mu
            d5 = x[i + 5] - mu
            d6 = x[i + 6] - mu
            d7 = x[i + 7] - mu
            a0 += d0 * d0
            a1 += d1 * d1
            a2 += d2 * d2
            a3 += d3 * d3
            a4 += d4 * d4
            a5 += d5 * d5
            a6 += d6 * d6
            a7 += d7 * d7
            i += 8
        while i < n:
            d0 = x[i] - mu
            a0 += d0 * d0
            i += 1
    else:
        while i + 8 <= n:
            a0 += x[i] - mu
            a1 += x[i + 1] - mu
            a2 += x[i + 2] - mu
            a3 += x[i + 3] - mu
            a4 += x[i + 4] - mu
            a5 += x[i + 5] - mu
            a6 += x[i + 6] - mu
            a7 += x[i + 7] - mu
            i += 8
        while i < n:
            a0 += x[i] - mu
            i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


cdef inline void _sum_and_dot(const floating* a, const floating* b, Py_ssize_t n, double* total,
                              double* dot) noexcept nogil:
    """``total += sum(a)``, ``dot += sum(a * b)``, each over 4 running sums (see ``_sum_dev``)."""
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0, p0 = 0, p1 = 0, p2 = 0, p3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 += a[i]
        s1 += a[i + 1]
        s2 += a[i + 2]
        s3 += a[i + 3]
        p0 += <double>a[i] * b[i]
        p1 += <double>a[i + 1] * b[i + 1]
        p2 += <double>a[i + 2] * b[i + 2]
        p3 += <double>a[i + 3] * b[i + 3]
        i += 4
    while i < n:
        s0 += a[i]
        p0 += <double>a[i] * b[i]
        i += 1
    total[0] += (s0 + s1) + (s2 + s3)
    dot[0] += (p0 + p1) + (p2 + p3)


def channel_moments(
    const floating[:, :, ::1] x,
    double[::1] mean,
    double[::1] var,
    int n_threads,
):
    """Per channel of ``x (n, c, L)``: the mean and the biased variance (two passes, in double).
    Channels are split over threads: each channel's sums run in one fixed order."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t ch, img
    cdef double acc, mu
    cdef double m = <double>(n * L)
    if c == 0:
        return
    if n == 0 or L == 0:
        mean[:] = 0
        var[:] = 0
        return
    for ch in prange(c, nogil=True, schedule="static", num_threads=n_threads):
        acc = 0
        for img in range(n):
            acc = acc + _sum_dev(&x[img, ch, 0], L, 0.0, False)
        mu = acc / m
        acc = 0
        for img in range(n):
            acc = acc + _sum_dev(&x[img, ch, 0], L, mu, True)
        mean[ch] = mu
        var[ch] = acc / m


def channel_dot_sums(
    const floating[:, :, ::1] dy,
    const floating[:, :, ::1] other,
    double[::1] sum_dy,
    double[::1] sum_dy_other,
    int n_threads,
):
    """Per channel: ``sum(dy)`` and ``sum(dy * other)`` over ``(n, L)``, in double."""
    cdef Py_ssize_t n = dy.shape[0], c = dy.shape[1], L = dy.shape[2]
    cdef Py_ssize_t ch, img
    cdef double total, dot
    if c == 0:
        return
    for ch in prange(c, nogil=True, schedule="static", num_threads=n_threads):
        total = 0
        dot = 0
        for img in range(n if L > 0 else 0):  # (no element to address when L == 0)
            _sum_and_dot(&dy[img, ch, 0], &other[img, ch, 0], L, &total, &dot)
        sum_dy[ch] = total
        sum_dy_other[ch] = dot


cdef inline void _affine(const floating* x, floating* y, Py_ssize_t n, floating scale, floating shift) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = x[i] * scale + shift


def batchnorm_normalize(
    const floating[:, :, ::1] x,
    const double[::1] mean,
    const double[::1] inv_std,
    const floating[::1] gamma,
    const floating[::1] beta,
    floating[:, :, ::1] x_hat,
    floating[:, :, ::1] y,
    bint keep_x_hat,
    int n_threads,
):
    """``x_hat = (x - mean) * inv_std`` (kept when ``keep_x_hat``) and ``y = gamma x_hat + beta``,
    per channel; with ``keep_x_hat`` False this is the affine map ``y = x s + (beta - mean s)``,
    ``s = gamma inv_std`` (evaluation). Planes ``(image, channel)`` are split over threads."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t plane, img, ch, l
    cdef floating mu, s, g, b, h
    if n == 0 or c == 0 or L == 0:
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        if keep_x_hat:
            mu = <floating>mean[ch]
            s = <floating>inv_std[ch]
            g = gamma[ch]
            b = beta[ch]
            for l in range(L):
                h = (x[img, ch, l] - mu) * s
                x_hat[img, ch, l] = h
                y[img, ch, l] = h * g + b
        else:
            s = <floating>(gamma[ch] * inv_std[ch])
            _affine(&x[img, ch, 0], &y[img, ch, 0], L, s, <floating>(beta[ch] - mean[ch] * gamma[ch] * inv_std[ch]))


def batchnorm_train_backward(
    const floating[:, :, ::1] dy,
    const floating[:, :, ::1] x_hat,
    const double[::1] scale,
    const double[::1] mean_dy,
    const double[::1] mean_dy_xhat,
    floating[:, :, ::1] dx,
    int n_threads,
):
    """``dx = scale (dy - mean(dy) - x_hat mean(dy x_hat))`` per channel (``scale = gamma inv_std``)."""
    cdef Py_ssize_t n = dy.shape[0], c = dy.shape[1], L = dy.shape[2]
    cdef Py_ssize_t plane, img, ch, l
    cdef floating s, a, b
    if n == 0 or c == 0 or L == 0:
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        s = <floating>scale[ch]
        a = <floating>mean_dy[ch]
        b = <floating>mean_dy_xhat[ch]
        for l in range(L):
            dx[img, ch, l] = (dy[img, ch, l] - a - x_hat[img, ch, l] * b) * s


# --- im2col / col2im with dilation (every convolution; im2col / col2im call them with 1) ------
# PyTorch's unfold layout, images in the middle axis; kernel tap (ki, kj) reads input row
# oy * sy - pad_top + ki * dil_y and column ox * sx - pad_left + kj * dil_x. Rows of one group's
# input channels are contiguous, so ``cols.reshape(groups, K // groups, g * P)`` is a view the
# caller multiplies group by group in one batched GEMM (np.matmul over the leading axis).
# The taps are walked with the helpers of "a kernel's taps" above.

cdef int _check_columns(const floating[:, :, ::1] cols, const floating[:, :, :, ::1] x, Py_ssize_t first,
                       Py_ssize_t rows, Py_ssize_t pixels, str kernel) except -1:
    """Raise ``IndexError`` unless ``cols`` holds ``rows`` kernel rows of ``pixels`` output pixels for
    its ``g`` images and ``x`` holds images ``first .. first + g - 1``: the row runs below go
    through plain pointers, so these extents are checked here, once, in every build."""
    if cols.shape[0] < rows or cols.shape[2] < pixels or first < 0 or x.shape[0] < first + cols.shape[1]:
        raise IndexError(f"{kernel}: columns of shape {(cols.shape[0], cols.shape[1], cols.shape[2])} and "
                         f"{x.shape[0]} images do not fit {rows} kernel rows x {pixels} pixels from image {first}")
    return 0


def im2col_dilated(
    const floating[:, :, :, ::1] x,
    Py_ssize_t first,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t dil_y,
    Py_ssize_t dil_x,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    floating[:, :, ::1] cols,
    int n_threads,
):
    """Unfold images ``x[first : first + g]`` into ``cols (c*kh*kw, g, out_h*out_w)``, taps ``dil_y``
    rows / ``dil_x`` columns apart (``im2col`` is this with dilation 1).

    Padding is applied by bounds: the output rows and columns whose input lies outside the image
    (``_tap_range``) are written as zero; the rest of each row is one ``_gather_row`` (a
    ``memcpy`` for unit stride).
    """
    cdef Py_ssize_t g = cols.shape[1]
    cdef Py_ssize_t c = x.shape[1]
    cdef Geometry geo = Geometry(x.shape[2], x.shape[3], out_h, out_w, sy, sx, dil_y, dil_x, pad_top, pad_left)
    cdef Py_ssize_t j, img, ci, ki, kj, oy, ox
    cdef TapRange t
    cdef floating* dst
    if g == 0 or cols.shape[0] == 0 or cols.shape[2] == 0:
        return
    _check_columns(cols, x, first, c * kh * kw, out_h * out_w, "im2col_dilated")
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        img = first + j
        for ci in range(c):
            for ki in range(kh):
                for kj in range(kw):
                    t = _tap_range(ki, kj, &geo)
                    for oy in range(out_h):
                        dst = &cols[(ci * kh + ki) * kw + kj, j, oy * out_w]
                        if oy < t.oy_lo or oy >= t.oy_hi:
                            for ox in range(out_w):
                                dst[ox] = 0
                            continue
                        for ox in range(t.ox_lo):
                            dst[ox] = 0
                        _gather_row(dst + t.ox_lo, &x[img, ci, oy * sy + t.row0, t.ox_lo * sx + t.col0], sx,
                                    t.ox_hi - t.ox_lo)
                        for ox in range(t.ox_hi, out_w):
                            dst[ox] = 0


def col2im_dilated(
    const floating[:, :, ::1] cols,
    Py_ssize_t first,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t dil_y,
    Py_ssize_t dil_x,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    floating[:, :, :, ::1] x,
    int n_threads,
):
    """Adjoint of ``im2col_dilated``: overwrite ``x[first : first + g]`` with the sum of ``cols``
    folded back (``col2im`` is this with dilation 1); contributions in the padding are dropped.
    Each tap's rows are added back by ``_tap_scatter_add`` (vectorised for unit stride)."""
    cdef Py_ssize_t g = cols.shape[1]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Geometry geo = Geometry(h, w, out_h, out_w, sy, sx, dil_y, dil_x, pad_top, pad_left)
    cdef Py_ssize_t j, img, ci, ki, kj
    cdef TapRange t
    if g == 0:
        return
    _check_columns(cols, x, first, c * kh * kw, out_h * out_w, "col2im_dilated")
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        img = first + j
        for ci in range(c):
            _zero_plane(x, img, ci)
            if cols.shape[2] == 0:
                continue  # no output pixel: nothing to fold back
            for ki in range(kh):
                for kj in range(kw):
                    t = _tap_range(ki, kj, &geo)
                    _tap_scatter_add(<floating*>_plane(x, img, ci), &cols[(ci * kh + ki) * kw + kj, j, 0], 1, &t, &geo)


# --- direct depthwise convolution (groups == in_channels) -------------------------------------
# Output channel o reads only input channel o // mult (mult = out_c // in_c). Each output plane
# is a sum of kh*kw shifted, scaled copies of one input plane: no column buffer (an im2col would
# hold kh*kw copies of the input) and, for stride 1, a contiguous inner loop the compiler
# vectorises. Parallel over planes; every plane is written by one thread only. The taps are
# walked with the helpers of "a kernel's taps" above.

def depthwise_conv2d(
    const floating[:, :, :, ::1] x,
    const floating[:, :, :, ::1] weight,
    const floating[::1] bias,
    bint has_bias,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t dil_y,
    Py_ssize_t dil_x,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    bint leaky_relu,
    double negative_slope,
    floating[:, :, :, ::1] y,
    int n_threads,
):
    """``y[i, o] = bias[o] + sum_{ki, kj} weight[o, 0, ki, kj] * x[i, o // mult, shifted]``, then,
    when ``leaky_relu``, a leaky ReLU with ``negative_slope`` (0: ReLU) in the same pass.
    ``weight`` has shape ``(out_c, 1, kh, kw)``; ``bias`` is read only when ``has_bias``."""
    cdef Py_ssize_t n = y.shape[0], oc = y.shape[1], out_h = y.shape[2], out_w = y.shape[3]
    cdef Py_ssize_t c = x.shape[1]
    cdef Py_ssize_t kh = weight.shape[2], kw = weight.shape[3]
    cdef Py_ssize_t mult = oc // c if c > 0 else 1
    cdef Geometry geo = Geometry(x.shape[2], x.shape[3], out_h, out_w, sy, sx, dil_y, dil_x, pad_top, pad_left)
    cdef Py_ssize_t plane, img, o, ci, ki, kj, oy, ox
    cdef TapRange t
    cdef floating wv, b, v, scaled
    cdef floating slope = <floating>negative_slope
    if n == 0 or oc == 0 or out_h == 0 or out_w == 0:
        return
    for plane in prange(n * oc, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // oc
        o = plane % oc
        ci = o // mult
        b = bias[o] if has_bias else 0
        for oy in range(out_h):
            for ox in range(out_w):
                y[img, o, oy, ox] = b
        for ki in range(kh):
            for kj in range(kw):
                t = _tap_range(ki, kj, &geo)
                _tap_gather_add(&y[img, o, 0, 0], _plane(x, img, ci), weight[o, 0, ki, kj], &t, &geo)
        if leaky_relu:
            for oy in range(out_h):
                for ox in range(out_w):
                    v = y[img, o, oy, ox]
                    scaled = v * slope
                    y[img, o, oy, ox] = v if v > 0 else scaled


def depthwise_conv2d_backward(
    const floating[:, :, :, ::1] dz,
    const floating[:, :, :, ::1] x,
    const floating[:, :, :, ::1] weight,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t dil_y,
    Py_ssize_t dil_x,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    bint need_dx,
    floating[:, :, :, ::1] dx,
    floating[:, :, ::1] dweight_partial,
    double[:, ::1] dbias_partial,
    int n_threads,
):
    """Gradients of ``depthwise_conv2d`` (before its activation: ``dz`` is the gradient of the
    pre-activation output). Per image, so the caller sums in a fixed order whatever the thread
    count: ``dweight_partial[i, o, ki * kw + kj]`` and ``dbias_partial[i, o]``. ``dx`` (when
    ``need_dx``) is overwritten."""
    cdef Py_ssize_t n = dz.shape[0], oc = dz.shape[1], out_h = dz.shape[2], out_w = dz.shape[3]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t kh = weight.shape[2], kw = weight.shape[3]
    cdef Py_ssize_t mult = oc // c if c > 0 else 1
    cdef Geometry geo = Geometry(h, w, out_h, out_w, sy, sx, dil_y, dil_x, pad_top, pad_left)
    cdef Py_ssize_t plane, img, o, ci, m, ki, kj, oy, ox
    cdef TapRange t
    cdef double bacc
    if n == 0 or oc == 0:
        return
    # Weight and bias gradients: one thread per output plane.
    for plane in prange(n * oc, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // oc
        o = plane % oc
        ci = o // mult
        bacc = 0
        for oy in range(out_h):
            for ox in range(out_w):
                bacc = bacc + dz[img, o, oy, ox]
        dbias_partial[img, o] = bacc
        for ki in range(kh):
            for kj in range(kw):
                t = _tap_range(ki, kj, &geo)
                dweight_partial[img, o, ki * kw + kj] = _tap_dot(_plane(dz, img, o), _plane(x, img, ci), &t, &geo)
    if not need_dx:
        return
    if dx.shape[0] < n or dx.shape[1] != c or dx.shape[2] != h or dx.shape[3] != w:
        # (its planes are walked with x's geometry, through plain pointers)
        raise IndexError(f"depthwise_conv2d_backward: dx of shape "
                         f"{(dx.shape[0], dx.shape[1], dx.shape[2], dx.shape[3])} does not match x of shape "
                         f"{(x.shape[0], x.shape[1], x.shape[2], x.shape[3])}")
    # Input gradient: one thread per input plane, which gathers from its mult output planes.
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ci = plane % c
        _zero_plane(dx, img, ci)
        for m in range(mult):
            o = ci * mult + m
            for ki in range(kh):
                for kj in range(kw):
                    t = _tap_range(ki, kj, &geo)
                    _tap_scatter_add(<floating*>_plane(dx, img, ci), _plane(dz, img, o), weight[o, 0, ki, kj], &t, &geo)


# --- 2x2 max-pool fused into a convolution's layout passes, for training ---------------------
# The forward writes the pooled, activated output and, per pooled cell, which of its window's four
# positions won (0..3, row-major); the backward scatters the pooled gradient through the
# activation straight into the GEMM layout, so the full-size activation is never written or read.

cdef extern from *:
    """
    /* The 2x2 / stride-2 max-pool with argmax over one activated GEMM plane, and its gradient
       scatter, written with AVX-512 intrinsics: the pooled rows of the benchmark networks are 5 to
       16 windows wide, too short for the compiler's 16-lane loops (it ran them as scalar code).
       Float32 only (float64, the parity tests' dtype, keeps the loops: a second copy of these
       kernels for doubles bought nothing that matters). Each pooled row is processed in chunks of
       16 windows under a lane mask:
       the two image rows' values are de-interleaved into the windows' four corners with one
       permutation each, and every comparison is the scalar kernels' (_leaky, _takes) as a mask,
       so values, argmax codes, ties and NaNs are those of the loops they replace. Without AVX-512
       (CNNX_POOL_SIMD 0) the Cython loops below run instead. */
    #if defined(__AVX512F__) && defined(__AVX512VL__)
    #include <immintrin.h>
    #define CNNX_POOL_SIMD 1

    static inline __mmask16 cnnx_low_bits16(Py_ssize_t n) {
        return (__mmask16)(n <= 0 ? 0u : n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
    }
    static inline __m512 cnnx_leaky16(__m512 x, __m512 b, __m512 slope) {
        __m512 v = _mm512_add_ps(x, b);
        __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
        return _mm512_mask_blend_ps(pos, _mm512_mul_ps(v, slope), v);
    }
    /* _takes: v replaces best when larger, or when v is the first NaN. */
    static inline __mmask16 cnnx_takes16(__m512 v, __m512 best) {
        return _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ)
            | (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmp_ps_mask(best, best, _CMP_ORD_Q));
    }

    /* src: one (oh, out_w) plane of GEMM output; dst, code: its (ph, pw) pooled values and
       2 * dy + dx of each window's winner. */
    static void cnnx_pool2x2_argmax_f32(const float *src, Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw,
                                        float bias, float slope, float *dst, int *code) {
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        const __m512 b = _mm512_set1_ps(bias), s = _mm512_set1_ps(slope);
        const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2), three = _mm512_set1_epi32(3);
        for (Py_ssize_t py = 0; py < ph; ++py) {
            const float *top = src + 2 * py * out_w, *bottom = top + out_w;
            for (Py_ssize_t px = 0; px < pw; px += 16) {
                Py_ssize_t n = pw - px < 16 ? pw - px : 16;
                __mmask16 lanes = cnnx_low_bits16(n), lo = cnnx_low_bits16(2 * n), hi = cnnx_low_bits16(2 * n - 16);
                __m512 t0 = _mm512_maskz_loadu_ps(lo, top + 2 * px), t1 = _mm512_maskz_loadu_ps(hi, top + 2 * px + 16);
                __m512 u0 = _mm512_maskz_loadu_ps(lo, bottom + 2 * px), u1 = _mm512_maskz_loadu_ps(hi, bottom + 2 * px + 16);
                __m512 a0 = cnnx_leaky16(_mm512_permutex2var_ps(t0, even, t1), b, s);
                __m512 a1 = cnnx_leaky16(_mm512_permutex2var_ps(t0, odd, t1), b, s);
                __m512 a2 = cnnx_leaky16(_mm512_permutex2var_ps(u0, even, u1), b, s);
                __m512 a3 = cnnx_leaky16(_mm512_permutex2var_ps(u0, odd, u1), b, s);
                __mmask16 right_top = cnnx_takes16(a1, a0), right_bottom = cnnx_takes16(a3, a2);
                __m512 m_top = _mm512_mask_blend_ps(right_top, a0, a1);
                __m512 m_bottom = _mm512_mask_blend_ps(right_bottom, a2, a3);
                __mmask16 take_bottom = cnnx_takes16(m_bottom, m_top);  /* the top wins ties */
                __m512i k_top = _mm512_maskz_mov_epi32(right_top, one);
                __m512i k_bottom = _mm512_mask_mov_epi32(two, right_bottom, three);
                _mm512_mask_storeu_ps(dst + py * pw + px, lanes, _mm512_mask_blend_ps(take_bottom, m_top, m_bottom));
                _mm512_mask_storeu_epi32(code + py * pw + px, lanes, _mm512_mask_blend_epi32(take_bottom, k_top, k_bottom));
            }
        }
    }


    /* The gradient scatter for one plane: dy, y, code of shape (ph, pw) -> out of shape
       (oh, out_w), each window's gradient (times the leaky ReLU's derivative: `low` where y <= 0)
       at its winner and zero elsewhere. Returns the sum of the routed gradient (the bias's). */
    static double cnnx_unpool2x2_f32(const float *dy, const float *y, const int *code, Py_ssize_t oh,
                                     Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw, float low, float *out) {
        /* lanes 0..15 of the result take e_left[0], e_right[0], e_left[1], ... */
        const __m512i first_half = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        const __m512i second_half = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
        const __m512 d = _mm512_set1_ps(low), zero = _mm512_setzero_ps();
        const __m512i three = _mm512_set1_epi32(3);
        __m512d sum_lo = _mm512_setzero_pd(), sum_hi = _mm512_setzero_pd();
        for (Py_ssize_t py = 0; py < ph; ++py) {
            float *top = out + 2 * py * out_w, *bottom = top + out_w;
            for (Py_ssize_t px = 0; px < pw; px += 16) {
                Py_ssize_t n = pw - px < 16 ? pw - px : 16;
                __mmask16 lanes = cnnx_low_bits16(n), lo = cnnx_low_bits16(2 * n), hi = cnnx_low_bits16(2 * n - 16);
                __m512 g = _mm512_maskz_loadu_ps(lanes, dy + py * pw + px);
                __m512 v = _mm512_maskz_loadu_ps(lanes, y + py * pw + px);
                __m512i k = _mm512_and_epi32(_mm512_maskz_loadu_epi32(lanes, code + py * pw + px), three);
                __mmask16 pos = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
                g = _mm512_mask_blend_ps(pos, _mm512_mul_ps(g, d), g);
                __m512 e0 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_setzero_si512()), g);
                __m512 e1 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(1)), g);
                __m512 e2 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(2)), g);
                __m512 e3 = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(k, three), g);
                _mm512_mask_storeu_ps(top + 2 * px, lo, _mm512_permutex2var_ps(e0, first_half, e1));
                _mm512_mask_storeu_ps(top + 2 * px + 16, hi, _mm512_permutex2var_ps(e0, second_half, e1));
                _mm512_mask_storeu_ps(bottom + 2 * px, lo, _mm512_permutex2var_ps(e2, first_half, e3));
                _mm512_mask_storeu_ps(bottom + 2 * px + 16, hi, _mm512_permutex2var_ps(e2, second_half, e3));
                sum_lo = _mm512_add_pd(sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(g)));
                sum_hi = _mm512_add_pd(sum_hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(g), 1))));
            }
            if (out_w > 2 * pw) { top[out_w - 1] = 0; bottom[out_w - 1] = 0; }  /* the odd last column */
        }
        for (Py_ssize_t x = 0; x < (oh - 2 * ph) * out_w; ++x) out[2 * ph * out_w + x] = 0;  /* the odd last row */
        return _mm512_reduce_add_pd(_mm512_add_pd(sum_lo, sum_hi));
    }


    /* Inference: each window's maximum (NaN if it holds one), then the bias and the leaky ReLU
       once per window (both monotonic: the same values as activating the four first). */
    static inline __m512 cnnx_window_max16(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
        __m512 m = _mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3));
        __mmask16 nan = _mm512_cmp_ps_mask(a0, a1, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(a2, a3, _CMP_UNORD_Q);
        return _mm512_mask_blend_ps(nan, m, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    }
    static void cnnx_pool2x2_max_f32(const float *src, Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw,
                                     float bias, float slope, float *dst) {
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        const __m512 b = _mm512_set1_ps(bias), s = _mm512_set1_ps(slope);
        for (Py_ssize_t py = 0; py < ph; ++py) {
            const float *top = src + 2 * py * out_w, *bottom = top + out_w;
            for (Py_ssize_t px = 0; px < pw; px += 16) {
                Py_ssize_t n = pw - px < 16 ? pw - px : 16;
                __mmask16 lanes = cnnx_low_bits16(n), lo = cnnx_low_bits16(2 * n), hi = cnnx_low_bits16(2 * n - 16);
                __m512 t0 = _mm512_maskz_loadu_ps(lo, top + 2 * px), t1 = _mm512_maskz_loadu_ps(hi, top + 2 * px + 16);
                __m512 u0 = _mm512_maskz_loadu_ps(lo, bottom + 2 * px), u1 = _mm512_maskz_loadu_ps(hi, bottom + 2 * px + 16);
                __m512 m = cnnx_window_max16(_mm512_permutex2var_ps(t0, even, t1), _mm512_permutex2var_ps(t0, odd, t1),
                                             _mm512_permutex2var_ps(u0, even, u1), _mm512_permutex2var_ps(u0, odd, u1));
                _mm512_mask_storeu_ps(dst + py * pw + px, lanes, cnnx_leaky16(m, b, s));
            }
        }
    }
    #else
    #define CNNX_POOL_SIMD 0
    static void cnnx_pool2x2_max_f32(const float *src, Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw,
                                     float bias, float slope, float *dst) {}
    static void cnnx_pool2x2_argmax_f32(const float *src, Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw,
                                        float bias, float slope, float *dst, int *code) {}
    static double cnnx_unpool2x2_f32(const float *dy, const float *y, const int *code, Py_ssize_t oh,
                                     Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw, float low, float *out) { return 0; }
    #endif
    """
    int CNNX_POOL_SIMD
    void cnnx_pool2x2_argmax_f32(const float* src, Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw,
                                 float bias, float slope, float* dst, int* code) noexcept nogil
    void cnnx_pool2x2_max_f32(const float* src, Py_ssize_t out_w, Py_ssize_t ph, Py_ssize_t pw,
                              float bias, float slope, float* dst) noexcept nogil
    double cnnx_unpool2x2_f32(const float* dy, const float* y, const int* code, Py_ssize_t oh, Py_ssize_t out_w,
                              Py_ssize_t ph, Py_ssize_t pw, float low, float* out) noexcept nogil


cdef inline floating _leaky(floating v, floating slope) noexcept nogil:
    """Leaky ReLU (slope 1: the identity, exactly); both sides computed first: a select."""
    cdef floating scaled = v * slope
    return v if v > 0 else scaled


cdef inline bint _pool_rows_need_chunks(Py_ssize_t pw) noexcept nogil:
    """Whether the pooled training kernels run their masked AVX-512 chunks for rows of ``pw``
    windows: only where the loops cannot cover a row with whole vectors (``pw`` not a multiple of
    8). Measured on single kernel calls, the chunks won everywhere but at 8 windows (forward
    (64, 16, 16 x 16): 57 us as loops, 61 us in chunks; (16, 16, 28 x 28): 51 -> 28 us; backward
    (32, 16, 32 x 32): 126 -> 40 us), yet whole seed-cifar training steps (rows of 16 and 8
    windows) took 7 % more CPU time with them, seed-mnist and lenet5 (14 and 5) 7-8 % less."""
    return pw % 8 != 0


# The AVX-512 paths of the two kernels below, each its own function, so that the kernels' own
# loops (still run for rows of 8k windows and without AVX-512) compile as they did without them.
cdef void _pool_argmax_in_chunks(const float[:, :, ::1] y_gemm, const float[::1] bias, bint has_bias,
                                 float slope, Py_ssize_t first, Py_ssize_t out_w, float[:, :, ::1] y,
                                 int[:, :, ::1] argmax, int n_threads) noexcept:
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t ph = P // out_w // 2
    cdef Py_ssize_t j, o
    cdef float b
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            b = bias[o] if has_bias else 0
            cnnx_pool2x2_argmax_f32(&y_gemm[o, j, 0], out_w, ph, pw, b, slope, &y[first + j, o, 0],
                                    &argmax[first + j, o, 0])


cdef void _unpool_in_chunks(const float[:, :, ::1] dy, const float[:, :, ::1] y, const int[:, :, ::1] argmax,
                            float low, Py_ssize_t first, Py_ssize_t out_w, float[:, :, ::1] dy_gemm,
                            double[:, ::1] dbias_partial, int n_threads) noexcept:
    cdef Py_ssize_t oc = dy_gemm.shape[0], g = dy_gemm.shape[1], P = dy_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t oh = P // out_w
    cdef Py_ssize_t ph = oh // 2
    cdef Py_ssize_t j, o
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            dbias_partial[j, o] = cnnx_unpool2x2_f32(&dy[first + j, o, 0], &y[first + j, o, 0],
                                                     &argmax[first + j, o, 0], oh, out_w, ph, pw, low,
                                                     &dy_gemm[o, j, 0])


def gemm_to_nchw_max_pool_2x2_argmax(
    const floating[:, :, ::1] y_gemm,
    const floating[::1] bias,
    bint has_bias,
    bint rectify,
    double negative_slope,
    Py_ssize_t first,
    Py_ssize_t out_w,
    floating[:, :, ::1] y,
    int[:, :, ::1] argmax,
    floating[:, ::1] pair_max,
    int[:, ::1] pair_arg,
    int n_threads,
):
    """``gemm_to_nchw`` then a 2x2 / stride-2 max-pool with argmax, in one sweep (training).

    ``y`` and ``argmax`` have shape ``(n, out_c, (out_h // 2) * (out_w // 2))``; ``argmax`` gets
    ``2 * dy + dx`` of each window's maximum. ``pair_max`` and ``pair_arg`` of shape
    ``(g, out_h * (out_w // 2))`` are scratch. The values are activated, then each row's pairs
    are compared, then the two rows' winners: the first maximum (or the first NaN) in row-major
    order wins, as in ``max_pool2d``, so result and argmax are the unfused layers', ties included.
    Two passes because each is a simple loop GCC vectorises at any width (one loop over the 2x2
    windows ran 5-40x slower under AVX-512 for rows of 14 or 28).
    """
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t oh = P // out_w if out_w > 0 else 0
    cdef Py_ssize_t ph = oh // 2
    cdef Py_ssize_t j, o, q, r, py, px
    cdef const floating* src
    cdef floating* hm
    cdef int* hk
    cdef floating* dst
    cdef int* code
    cdef floating b, a0, a1, top, bottom
    cdef bint take
    # Without the activation the slope is 1: the same select then leaves every value as it is.
    cdef floating slope = <floating>negative_slope if rectify else 1
    if g == 0 or oc == 0 or ph == 0 or pw == 0:
        return
    # The loops below use plain pointers: the bounds they rely on are checked here, once.
    if (y.shape[0] < first + g or argmax.shape[0] < first + g or y.shape[1] < oc or argmax.shape[1] < oc
            or y.shape[2] < ph * pw or argmax.shape[2] < ph * pw or (has_bias and bias.shape[0] < oc)
            or pair_max.shape[0] < g or pair_arg.shape[0] < g or pair_max.shape[1] < oh * pw
            or pair_arg.shape[1] < oh * pw):
        raise ValueError("gemm_to_nchw_max_pool_2x2_argmax: output, scratch or bias too small for the GEMM result")
    if floating is float:  # the chunks are float32 only; float64 (the parity tests' dtype) keeps the loops
        if CNNX_POOL_SIMD and _pool_rows_need_chunks(pw):
            _pool_argmax_in_chunks(y_gemm, bias, has_bias, slope, first, out_w, y, argmax, n_threads)
            return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        hm = &pair_max[j, 0]
        hk = &pair_arg[j, 0]
        for o in range(oc):
            b = bias[o] if has_bias else 0
            src = &y_gemm[o, j, 0]
            # 1. Horizontal pairs of every row. With an even width no pair straddles two rows,
            #    so the whole plane is one loop.
            if out_w % 2 == 0:
                for q in range(oh * pw):
                    a0 = _leaky(src[2 * q] + b, slope)
                    a1 = _leaky(src[2 * q + 1] + b, slope)
                    take = _takes(a1, a0)
                    hm[q] = a1 if take else a0
                    hk[q] = take
            else:
                for r in range(oh):
                    for px in range(pw):
                        a0 = _leaky(src[r * out_w + 2 * px] + b, slope)
                        a1 = _leaky(src[r * out_w + 2 * px + 1] + b, slope)
                        take = _takes(a1, a0)
                        hm[r * pw + px] = a1 if take else a0
                        hk[r * pw + px] = take
            # 2. The top and bottom rows' winners; the top wins ties (it comes first).
            for py in range(ph):
                dst = &y[first + j, o, py * pw]
                code = &argmax[first + j, o, py * pw]
                for px in range(pw):
                    top = hm[2 * py * pw + px]
                    bottom = hm[(2 * py + 1) * pw + px]
                    take = _takes(bottom, top)
                    dst[px] = bottom if take else top
                    code[px] = 2 + hk[(2 * py + 1) * pw + px] if take else hk[2 * py * pw + px]


def max_pool_2x2_argmax_to_gemm(
    const floating[:, :, ::1] dy,
    const floating[:, :, ::1] y,
    const int[:, :, ::1] argmax,
    bint rectify,
    double negative_slope,
    Py_ssize_t first,
    Py_ssize_t out_w,
    floating[:, :, ::1] dy_gemm,
    double[:, ::1] dbias_partial,
    int n_threads,
):
    """Backward of ``gemm_to_nchw_max_pool_2x2_argmax``: ``dy_gemm (out_c, g, P)`` gets the pooled
    gradient ``dy`` (through the leaky ReLU, read from the pooled output ``y``) at each window's
    argmax and zero elsewhere; ``dbias_partial[j, o]`` gets each image's sum, as in
    ``nchw_to_gemm``. The argmax is masked to 0..3, so no value can write outside the window.
    """
    cdef Py_ssize_t oc = dy_gemm.shape[0], g = dy_gemm.shape[1], P = dy_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t ph = (P // out_w) // 2 if out_w > 0 else 0
    cdef Py_ssize_t j, o, p, py, px, k, cell
    cdef floating v
    cdef floating derivative[2]
    cdef double acc
    derivative[0] = <floating>negative_slope if rectify else 1
    derivative[1] = 1
    if g == 0 or oc == 0:
        return
    if floating is float and CNNX_POOL_SIMD and P > 0 and ph * pw > 0 and _pool_rows_need_chunks(pw):
        if (dy.shape[0] < first + g or y.shape[0] < first + g or argmax.shape[0] < first + g or dy.shape[1] < oc
                or y.shape[1] < oc or argmax.shape[1] < oc or dy.shape[2] < ph * pw or y.shape[2] < ph * pw
                or argmax.shape[2] < ph * pw or dbias_partial.shape[0] < g or dbias_partial.shape[1] < oc):
            raise ValueError("max_pool_2x2_argmax_to_gemm: dy, y, argmax or dbias_partial too small for dy_gemm")
        _unpool_in_chunks(dy, y, argmax, derivative[0], first, out_w, dy_gemm, dbias_partial, n_threads)
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            for p in range(P):
                dy_gemm[o, j, p] = 0
            acc = 0
            for py in range(ph):
                for px in range(pw):
                    cell = py * pw + px
                    # Looked up by the comparison's 0/1 value (see nchw_to_gemm: no branch).
                    v = dy[first + j, o, cell] * derivative[y[first + j, o, cell] > 0]
                    k = argmax[first + j, o, cell] & 3
                    dy_gemm[o, j, (2 * py + k // 2) * out_w + 2 * px + k % 2] = v
                    acc = acc + v
            dbias_partial[j, o] = acc


cdef void _pool_max_in_chunks(const float[:, :, ::1] y_gemm, const float[::1] bias, bint has_bias, float slope,
                              Py_ssize_t first, Py_ssize_t out_w, float[:, :, ::1] y, int n_threads) noexcept:
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t ph = P // out_w // 2
    cdef Py_ssize_t j, o
    cdef float b
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            b = bias[o] if has_bias else 0
            cnnx_pool2x2_max_f32(&y_gemm[o, j, 0], out_w, ph, pw, b, slope, &y[first + j, o, 0])


def gemm_to_nchw_max_pool_2x2_vectorised(
    const floating[:, :, ::1] y_gemm,
    const floating[::1] bias,
    bint has_bias,
    bint rectify,
    double negative_slope,
    Py_ssize_t first,
    Py_ssize_t out_w,
    floating[:, :, ::1] y,
    int n_threads,
):
    """``gemm_to_nchw_max_pool_2x2`` (same arguments, same values) with its rows in masked
    AVX-512 chunks, as ``gemm_to_nchw_max_pool_2x2_argmax`` has them; float64 and a build without
    AVX-512 run ``gemm_to_nchw_max_pool_2x2`` itself."""
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t pw = out_w // 2
    cdef Py_ssize_t ph = P // out_w // 2 if out_w > 0 else 0
    if floating is float:  # the chunks are float32 only
        if CNNX_POOL_SIMD:
            if g == 0 or oc == 0 or ph == 0 or pw == 0:
                return
            if y.shape[0] < first + g or y.shape[1] < oc or y.shape[2] < ph * pw or (has_bias and bias.shape[0] < oc):
                raise ValueError("gemm_to_nchw_max_pool_2x2_vectorised: output or bias too small for the GEMM result")
            _pool_max_in_chunks(y_gemm, bias, has_bias, <float>negative_slope if rectify else 1, first, out_w, y,
                                n_threads)
            return
    gemm_to_nchw_max_pool_2x2(y_gemm, bias, has_bias, rectify, negative_slope, first, out_w, y, n_threads)


# cnnx's packed float32 GEMM for convolutions (implicit im2col), see _gemm.pxi.
include "_gemm.pxi"
# cnnx's packed float32 GEMM for dense layers (x @ W^T with W in its own layout), see _dense_gemm.pxi.
include "_dense_gemm.pxi"
# Winograd F(2x2, 3x3) for float32 3x3 stride-1 convolutions (forward, input and weight gradients), see _winograd.pxi.
include "_winograd.pxi"
