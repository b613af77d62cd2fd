# cython: language_level=3
"""cnnx's compiled hot path: arithmetic only.

Owns im2col / col2im in the "channels-rows" layout the convolution GEMMs want, the NCHW <-> GEMM
layout passes (with the bias add fused in), and pooling forward/backward. Callers
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
from libc.string cimport memcpy

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
    """Unfold images ``x[first : first + g]`` into ``cols`` of shape ``(c*kh*kw, g, out_h*out_w)``.

    Padding is applied by a bounds test: positions outside the input read as zero.
    """
    cdef Py_ssize_t g = cols.shape[1]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t j, img, ci, ki, kj, r, oy, ox, iy, ix, p, ox_lo, ox_hi
    if g == 0 or cols.shape[0] == 0 or cols.shape[2] == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        img = first + j
        for ci in range(c):
            for ki in range(kh):
                for kj in range(kw):
                    r = (ci * kh + ki) * kw + kj
                    # The output columns whose input column lies inside the image: ox in [ox_lo, ox_hi).
                    ox_lo = 0
                    while ox_lo < out_w and ox_lo * sx - pad_left + kj < 0:
                        ox_lo = ox_lo + 1
                    ox_hi = out_w
                    while ox_hi > ox_lo and (ox_hi - 1) * sx - pad_left + kj >= w:
                        ox_hi = ox_hi - 1
                    for oy in range(out_h):
                        iy = oy * sy - pad_top + ki
                        p = oy * out_w
                        if iy < 0 or iy >= h:
                            for ox in range(out_w):
                                cols[r, j, p + ox] = 0
                            continue
                        for ox in range(ox_lo):
                            cols[r, j, p + ox] = 0
                        if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                            # Unit stride: the row is one contiguous run (a vectorised copy).
                            # The debug build takes the indexed loop, where every access is checked.
                            memcpy(&cols[r, j, p + ox_lo], &x[img, ci, iy, ox_lo - pad_left + kj],
                                   (ox_hi - ox_lo) * sizeof(floating))
                        else:
                            for ox in range(ox_lo, ox_hi):
                                ix = ox * sx - pad_left + kj
                                cols[r, j, p + ox] = x[img, ci, iy, ix]
                        for ox in range(ox_hi, out_w):
                            cols[r, j, p + ox] = 0


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
    """Adjoint of ``im2col``: overwrite ``x[first : first + g]`` with the sum of ``cols`` folded back.

    Contributions that fall into the padding are dropped.
    """
    cdef Py_ssize_t g = cols.shape[1]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t j, img, ci, ki, kj, r, oy, ox, iy, ix, p, ox_lo, ox_hi, yy, xx, t
    cdef floating* dst
    cdef const floating* src
    if g == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        img = first + j
        for ci in range(c):
            for yy in range(h):
                for xx in range(w):
                    x[img, ci, yy, xx] = 0
            for ki in range(kh):
                for kj in range(kw):
                    r = (ci * kh + ki) * kw + kj
                    ox_lo = 0
                    while ox_lo < out_w and ox_lo * sx - pad_left + kj < 0:
                        ox_lo = ox_lo + 1
                    ox_hi = out_w
                    while ox_hi > ox_lo and (ox_hi - 1) * sx - pad_left + kj >= w:
                        ox_hi = ox_hi - 1
                    for oy in range(out_h):
                        iy = oy * sy - pad_top + ki
                        if iy < 0 or iy >= h:
                            continue
                        p = oy * out_w
                        if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                            # Unit stride: add one contiguous run through plain pointers, which
                            # the compiler vectorises (the debug build checks each access instead).
                            dst = &x[img, ci, iy, ox_lo - pad_left + kj]
                            src = &cols[r, j, p + ox_lo]
                            for t in range(ox_hi - ox_lo):
                                dst[t] += src[t]
                        else:
                            for ox in range(ox_lo, ox_hi):
                                ix = ox * sx - pad_left + kj
                                x[img, ci, iy, ix] += cols[r, j, p + ox]


def gemm_to_nchw(
    const floating[:, :, ::1] y_gemm,
    const floating[::1] bias,
    bint has_bias,
    bint rectify,
    double negative_slope,
    Py_ssize_t first,
    floating[:, :, ::1] y,
    int n_threads,
):
    """Write the GEMM result ``y_gemm (out_c, g, P)`` into ``y[first : first + g]`` of shape
    ``(n, out_c, P)``, adding ``bias[out_c]`` and, when ``rectify``, applying a leaky ReLU
    (``negative_slope`` 0 gives ReLU) in the same sweep."""
    cdef Py_ssize_t oc = y_gemm.shape[0], g = y_gemm.shape[1], P = y_gemm.shape[2]
    cdef Py_ssize_t j, o, p
    cdef floating b, v, scaled
    cdef floating slope = <floating>negative_slope
    if g == 0 or oc == 0 or P == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        for o in range(oc):
            b = bias[o] if has_bias else 0
            if rectify:
                for p in range(P):
                    v = y_gemm[o, j, p] + b
                    # Both sides computed first so the compiler emits a select, not a branch:
                    # the sign of v is unpredictable (a branch here made the pass 3x slower).
                    scaled = v * slope
                    y[first + j, o, p] = v if v > 0 else scaled
            else:
                for p in range(P):
                    y[first + j, o, p] = y_gemm[o, j, p] + b


def gemm_to_nchw_maxpool2(
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
                    if rectify:
                        v = v if v > 0 else scaled
                    y[first + j, o, py * pw + px] = v


def nchw_to_gemm(
    const floating[:, :, ::1] dy,
    const floating[:, :, ::1] y,
    bint rectify,
    double negative_slope,
    Py_ssize_t first,
    floating[:, :, ::1] dy_gemm,
    double[:, ::1] dbias_partial,
    int n_threads,
):
    """Inverse layout pass for the backward GEMMs: ``dy_gemm[o, j, p] = dy[first + j, o, p]``.

    When ``rectify``, the gradient goes through the leaky ReLU first, read from its output ``y``
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
            if rectify:
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
            for ox in range(out_w):
                best = -INFINITY
                best_idx = -1
                for ki in range(kh):
                    iy = oy * sy - pad_top + ki
                    if iy < 0 or iy >= h:
                        continue
                    for kj in range(kw):
                        ix = ox * sx - pad_left + kj
                        if ix < 0 or ix >= w:
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
    """Mean over each window, padding counted as zeros (PyTorch's ``count_include_pad=True``)."""
    cdef Py_ssize_t n = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t out_h = y.shape[2], out_w = y.shape[3]
    cdef Py_ssize_t plane, img, ch, oy, ox, ki, kj, iy, ix
    cdef floating acc
    cdef floating scale = 1.0 / (kh * kw)
    if n == 0 or c == 0 or out_h == 0 or out_w == 0:
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        for oy in range(out_h):
            for ox in range(out_w):
                acc = 0
                for ki in range(kh):
                    iy = oy * sy - pad_top + ki
                    if iy < 0 or iy >= h:
                        continue
                    for kj in range(kw):
                        ix = ox * sx - pad_left + kj
                        if ix < 0 or ix >= w:
                            continue
                        acc = acc + x[img, ch, iy, ix]
                y[img, ch, oy, ox] = acc * scale


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
    """Spread each ``dy`` evenly over its window; ``dx`` is overwritten."""
    cdef Py_ssize_t n = dx.shape[0], c = dx.shape[1], h = dx.shape[2], w = dx.shape[3]
    cdef Py_ssize_t out_h = dy.shape[2], out_w = dy.shape[3]
    cdef Py_ssize_t plane, img, ch, oy, ox, ki, kj, iy, ix
    cdef floating g
    cdef floating scale = 1.0 / (kh * kw)
    if n == 0 or c == 0:
        return
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ch = plane % c
        for iy in range(h):
            for ix in range(w):
                dx[img, ch, iy, ix] = 0
        for oy in range(out_h):
            for ox in range(out_w):
                g = dy[img, ch, oy, ox] * scale
                for ki in range(kh):
                    iy = oy * sy - pad_top + ki
                    if iy < 0 or iy >= h:
                        continue
                    for kj in range(kw):
                        ix = ox * sx - pad_left + kj
                        if ix < 0 or ix >= w:
                            continue
                        dx[img, ch, iy, ix] += g


# --- dilated im2col / col2im (grouped and dilated convolutions) ------------------------------
# The same column layout as im2col / col2im; kernel tap (ki, kj) reads input row
# oy * sy - pad_top + ki * dil_y and column ox * sx - pad_left + kj * dil_x. Rows of one group's
# input channels are contiguous, so ``cols.reshape(groups, K // groups, g * P)`` is a view the
# caller multiplies group by group in one batched GEMM (np.matmul over the leading axis).

cdef inline Py_ssize_t _first_valid(Py_ssize_t out_w, Py_ssize_t sx, Py_ssize_t offset) noexcept nogil:
    """The first output column whose input column ``ox * sx + offset`` is >= 0 (``out_w`` if none)."""
    cdef Py_ssize_t lo = 0
    while lo < out_w and lo * sx + offset < 0:
        lo = lo + 1
    return lo


cdef inline Py_ssize_t _end_valid(Py_ssize_t lo, Py_ssize_t out_w, Py_ssize_t sx, Py_ssize_t offset,
                                  Py_ssize_t w) noexcept nogil:
    """One past the last output column (from ``lo``) whose input column ``ox * sx + offset`` is < ``w``."""
    cdef Py_ssize_t hi = out_w
    while hi > lo and (hi - 1) * sx + offset >= w:
        hi = hi - 1
    return hi


# (Returned, not written through pointers: Cython makes a prange variable thread-private only
# when the loop body assigns it; one written through its address would be shared and raced on.)


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
    """``im2col`` with dilation: unfold ``x[first : first + g]`` into ``cols (c*kh*kw, g, out_h*out_w)``."""
    cdef Py_ssize_t g = cols.shape[1]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t j, img, ci, ki, kj, r, oy, ox, iy, ix, p, ox_lo, ox_hi, col0
    if g == 0 or cols.shape[0] == 0 or cols.shape[2] == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        img = first + j
        for ci in range(c):
            for ki in range(kh):
                for kj in range(kw):
                    r = (ci * kh + ki) * kw + kj
                    col0 = kj * dil_x - pad_left
                    ox_lo = _first_valid(out_w, sx, col0)
                    ox_hi = _end_valid(ox_lo, out_w, sx, col0, w)
                    for oy in range(out_h):
                        iy = oy * sy - pad_top + ki * dil_y
                        p = oy * out_w
                        if iy < 0 or iy >= h:
                            for ox in range(out_w):
                                cols[r, j, p + ox] = 0
                            continue
                        for ox in range(ox_lo):
                            cols[r, j, p + ox] = 0
                        if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                            memcpy(&cols[r, j, p + ox_lo], &x[img, ci, iy, ox_lo + col0],
                                   (ox_hi - ox_lo) * sizeof(floating))
                        else:
                            for ox in range(ox_lo, ox_hi):
                                ix = ox * sx + col0
                                cols[r, j, p + ox] = x[img, ci, iy, ix]
                        for ox in range(ox_hi, out_w):
                            cols[r, j, p + ox] = 0


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
    """Adjoint of ``im2col_dilated``: overwrite ``x[first : first + g]`` with ``cols`` folded back."""
    cdef Py_ssize_t g = cols.shape[1]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t j, img, ci, ki, kj, r, oy, ox, iy, ix, p, ox_lo, ox_hi, yy, xx, t, col0
    cdef floating* dst
    cdef const floating* src
    if g == 0:
        return
    for j in prange(g, nogil=True, schedule="static", num_threads=n_threads):
        img = first + j
        for ci in range(c):
            for yy in range(h):
                for xx in range(w):
                    x[img, ci, yy, xx] = 0
            for ki in range(kh):
                for kj in range(kw):
                    r = (ci * kh + ki) * kw + kj
                    col0 = kj * dil_x - pad_left
                    ox_lo = _first_valid(out_w, sx, col0)
                    ox_hi = _end_valid(ox_lo, out_w, sx, col0, w)
                    for oy in range(out_h):
                        iy = oy * sy - pad_top + ki * dil_y
                        if iy < 0 or iy >= h:
                            continue
                        p = oy * out_w
                        if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                            dst = &x[img, ci, iy, ox_lo + col0]
                            src = &cols[r, j, p + ox_lo]
                            for t in range(ox_hi - ox_lo):
                                dst[t] += src[t]
                        else:
                            for ox in range(ox_lo, ox_hi):
                                ix = ox * sx + col0
                                x[img, ci, iy, ix] += cols[r, j, p + ox]


# --- direct depthwise convolution (groups == in_channels) -------------------------------------
# Output channel o reads only input channel o // mult (mult = out_c // in_c). Each output plane
# is a sum of kh*kw shifted, scaled copies of one input plane: no column buffer (an im2col would
# hold kh*kw copies of the input) and, for stride 1, a contiguous inner loop the compiler
# vectorises. Parallel over planes; every plane is written by one thread only.

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
    bint rectify,
    double negative_slope,
    floating[:, :, :, ::1] y,
    int n_threads,
):
    """``y[i, o] = bias[o] + sum_{ki, kj} weight[o, 0, ki, kj] * x[i, o // mult, shifted]``, then an
    optional leaky ReLU (``negative_slope`` 0: ReLU). ``weight`` has shape ``(out_c, 1, kh, kw)``."""
    cdef Py_ssize_t n = y.shape[0], oc = y.shape[1], out_h = y.shape[2], out_w = y.shape[3]
    cdef Py_ssize_t c = x.shape[1], h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t kh = weight.shape[2], kw = weight.shape[3]
    cdef Py_ssize_t mult = oc // c if c > 0 else 1
    cdef Py_ssize_t plane, img, o, ci, ki, kj, oy, ox, iy, col0, ox_lo, ox_hi
    cdef floating wv, b, v, scaled
    cdef floating slope = <floating>negative_slope
    cdef floating* dst
    cdef const floating* src
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
                wv = weight[o, 0, ki, kj]
                col0 = kj * dil_x - pad_left
                ox_lo = _first_valid(out_w, sx, col0)
                ox_hi = _end_valid(ox_lo, out_w, sx, col0, w)
                for oy in range(out_h):
                    iy = oy * sy - pad_top + ki * dil_y
                    if iy < 0 or iy >= h:
                        continue
                    if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                        dst = &y[img, o, oy, ox_lo]
                        src = &x[img, ci, iy, ox_lo + col0]
                        for ox in range(ox_hi - ox_lo):
                            dst[ox] += wv * src[ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            y[img, o, oy, ox] += wv * x[img, ci, iy, ox * sx + col0]
        if rectify:
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
    cdef Py_ssize_t plane, img, o, ci, m, ki, kj, oy, ox, iy, iy2, ix2, col0, ox_lo, ox_hi
    cdef floating wv, acc
    cdef double bacc
    cdef floating* dst
    cdef const floating* src
    cdef const floating* grad
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
                col0 = kj * dil_x - pad_left
                ox_lo = _first_valid(out_w, sx, col0)
                ox_hi = _end_valid(ox_lo, out_w, sx, col0, w)
                acc = 0
                for oy in range(out_h):
                    iy = oy * sy - pad_top + ki * dil_y
                    if iy < 0 or iy >= h:
                        continue
                    if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                        grad = &dz[img, o, oy, ox_lo]
                        src = &x[img, ci, iy, ox_lo + col0]
                        for ox in range(ox_hi - ox_lo):
                            acc = acc + grad[ox] * src[ox]
                    else:
                        for ox in range(ox_lo, ox_hi):
                            acc = acc + dz[img, o, oy, ox] * x[img, ci, iy, ox * sx + col0]
                dweight_partial[img, o, ki * kw + kj] = acc
    if not need_dx:
        return
    # Input gradient: one thread per input plane, which gathers from its mult output planes.
    for plane in prange(n * c, nogil=True, schedule="static", num_threads=n_threads):
        img = plane // c
        ci = plane % c
        for iy2 in range(h):
            for ix2 in range(w):
                dx[img, ci, iy2, ix2] = 0
        for m in range(mult):
            o = ci * mult + m
            for ki in range(kh):
                for kj in range(kw):
                    wv = weight[o, 0, ki, kj]
                    col0 = kj * dil_x - pad_left
                    ox_lo = _first_valid(out_w, sx, col0)
                    ox_hi = _end_valid(ox_lo, out_w, sx, col0, w)
                    for oy in range(out_h):
                        iy = oy * sy - pad_top + ki * dil_y
                        if iy < 0 or iy >= h:
                            continue
                        if sx == 1 and ox_hi > ox_lo and not CNNX_DEBUG_BUILD:
                            dst = &dx[img, ci, iy, ox_lo + col0]
                            grad = &dz[img, o, oy, ox_lo]
                            for ox in range(ox_hi - ox_lo):
                                dst[ox] += wv * grad[ox]
                        else:
                            for ox in range(ox_lo, ox_hi):
                                dx[img, ci, iy, ox * sx + col0] += wv * dz[img, o, oy, ox]
