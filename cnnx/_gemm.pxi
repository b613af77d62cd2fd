# cnnx's own float32 GEMM for convolutions, with im2col fused into the packing (included by _ops.pyx).
#
# C = A @ B with A = the weights (out_c, K = c*kh*kw) and B = the im2col matrix of a group of
# images (K, N = g * P), P = out_h * out_w, never materialised:
# - A is packed once per call into micro-panels of MR rows (k-major, MR values per k, zero rows
#   past out_c);
# - B is packed block by block (KC x NC) straight from the images: panels of NR columns, NR values
#   per k, gathered with the convolution's geometry (zero where the window hangs over the padding);
# - a register-blocked micro-kernel (MR x NR accumulators) computes one output tile and writes it
#   to C through a (row stride, image stride) addressing, with the bias and the (leaky) ReLU
#   applied to the finished sums: NCHW output and the (out_c, g, P) GEMM layout are the same code.
# Loops (BLIS's, with the roles of A and B swapped because the vectors run along the output
# pixels, which are contiguous in NCHW): NC blocks of columns -> KC blocks of K -> pack B ->
# MR panels of A (one stays in L1) -> NR panels of B (the block stays in L2) -> micro-kernel.
# Each call runs on the calling thread alone, or splits its NC blocks over n_threads with OpenMP;
# every output value is the same sum in the same order whatever the split.
#
# The micro-kernel is C with GCC/Clang vector extensions; its width follows the build's
# instruction set (cnnx._ops_avx512: 16 floats, cnnx._ops_avx2: 8, baseline: 4), so the same
# source gives each per-ISA module its own kernel. Compilers without vector extensions (MSVC) get
# a plain scalar kernel of the same shape.

from libc.stdlib cimport malloc, free
from libc.string cimport memset
from cython.parallel cimport threadid

cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    #if defined(__GNUC__) || defined(__clang__)
      #define CNNX_GEMM_VECTOR 1
      #if defined(__AVX512F__)
        #define CNNX_VW 16
        #ifndef CNNX_MR_AVX512  /* CFLAGS=-DCNNX_MR_AVX512=12 (or 14) builds a taller tile to measure:
                                   slower on Zen 5 as GCC 12 compiles it (docs/PERFORMANCE_LOG.md) */
          #define CNNX_MR_AVX512 8
        #endif
        #define CNNX_MR CNNX_MR_AVX512
      #elif defined(__AVX2__) || defined(__FMA__) || defined(__AVX__)
        #define CNNX_VW 8
        #define CNNX_MR 6
      #else
        #define CNNX_VW 4
        #define CNNX_MR 6
      #endif
    #else
      #define CNNX_GEMM_VECTOR 0
      #define CNNX_VW 4
      #define CNNX_MR 4
    #endif
    /* Two vectors of columns per tile: MR x 2 accumulators, two B loads and one broadcast fit the
       register file (AVX-512: 16 + 3 of 32 zmm; AVX2 / SSE: 12 + 3 of 16). */
    #define CNNX_NR (2 * CNNX_VW)
    /* Cache blocking: A's MR x KC micro-panel stays in L1, B's KC x NC block in L2. */
    #define CNNX_KC_MAX 512
    #define CNNX_NC_BYTES (256 * 1024)
    static const int CNNX_GEMM_MR = CNNX_MR;
    static const int CNNX_GEMM_NR = CNNX_NR;
    static const int CNNX_GEMM_VW = CNNX_VW;
    static const int CNNX_GEMM_KC_MAX = CNNX_KC_MAX;
    static const int CNNX_GEMM_NC_BYTES = CNNX_NC_BYTES;

    #if CNNX_GEMM_VECTOR
    typedef float cnnx_vf __attribute__((vector_size(CNNX_VW * 4)));
    typedef int32_t cnnx_vi __attribute__((vector_size(CNNX_VW * 4)));
    static inline cnnx_vf cnnx_vload(const float *p) { cnnx_vf v; memcpy(&v, p, sizeof v); return v; }
    static inline void cnnx_vstore(float *p, cnnx_vf v) { memcpy(p, &v, sizeof v); }
    /* s - (+0) is exactly s for every s (also -0), so this folds to a plain broadcast; v + s would
       not (-0 + +0 = +0). */
    static inline cnnx_vf cnnx_splat(float s) { cnnx_vf zero = {0}; return s - zero; }
    /* v if v > 0 else v * slope, as a bit select (no branch; NaN gives NaN * slope = NaN). */
    static inline cnnx_vf cnnx_vleaky(cnnx_vf v, float slope) {
        cnnx_vi pos = v > 0;
        cnnx_vi a = (cnnx_vi)v, b = (cnnx_vi)(v * slope);
        return (cnnx_vf)((a & pos) | (b & ~pos));
    }
    /* Row r of the tile: accumulate a broadcast A value times the two B vectors. */
    #define CNNX_ROW_FMA(r) { cnnx_vf ar = cnnx_splat(a[r]); c##r##0 += ar * b0; c##r##1 += ar * b1; }
    #define CNNX_ROW_STORE(r) \
        if (r < rows) { \
            float *cr = c + (Py_ssize_t)(r) * ldc; \
            cnnx_vf v0 = c##r##0, v1 = c##r##1; \
            if (accumulate) { v0 += cnnx_vload(cr); v1 += cnnx_vload(cr + CNNX_VW); } \
            if (bias) { cnnx_vf br = cnnx_splat(bias[r]); v0 += br; v1 += br; } \
            if (rectify) { v0 = cnnx_vleaky(v0, slope); v1 = cnnx_vleaky(v1, slope); } \
            cnnx_vstore(cr, v0); cnnx_vstore(cr + CNNX_VW, v1); \
        }
    #define CNNX_ROW_DECL(r) cnnx_vf c##r##0 = {0}, c##r##1 = {0};
    /* The register tile's sums over k < kc (shared by every tile store): accumulators c<r>0, c<r>1
       of row r, from a (kc x MR packed) and b (kc x NR packed). */
    #if CNNX_MR == 14
      #define CNNX_ROWS_HI(op) op(6) op(7) op(8) op(9) op(10) op(11) op(12) op(13)
      #define CNNX_ROW_PAIRS_HI(op) op(6, 7) op(8, 9) op(10, 11) op(12, 13)
    #elif CNNX_MR == 12
      #define CNNX_ROWS_HI(op) op(6) op(7) op(8) op(9) op(10) op(11)
      #define CNNX_ROW_PAIRS_HI(op) op(6, 7) op(8, 9) op(10, 11)
    #elif CNNX_MR == 8
      #define CNNX_ROWS_HI(op) op(6) op(7)
      #define CNNX_ROW_PAIRS_HI(op) op(6, 7)
    #else
      #define CNNX_ROWS_HI(op)
      #define CNNX_ROW_PAIRS_HI(op)
    #endif
    #define CNNX_TILE_SUMS \
        CNNX_ROW_DECL(0) CNNX_ROW_DECL(1) CNNX_ROW_DECL(2) CNNX_ROW_DECL(3) \
        CNNX_ROW_DECL(4) CNNX_ROW_DECL(5) CNNX_ROWS_HI(CNNX_ROW_DECL) \
        for (Py_ssize_t k = 0; k < kc; ++k) { \
            cnnx_vf b0 = cnnx_vload(b), b1 = cnnx_vload(b + CNNX_VW); \
            CNNX_ROW_FMA(0) CNNX_ROW_FMA(1) CNNX_ROW_FMA(2) CNNX_ROW_FMA(3) \
            CNNX_ROW_FMA(4) CNNX_ROW_FMA(5) CNNX_ROWS_HI(CNNX_ROW_FMA) \
            a += CNNX_MR; \
            b += CNNX_NR; \
        }

    /* One MR x NR tile: c[r, 0:NR] (row stride ldc) = (accumulate ? c : 0) + sum_k a[k, r] b[k, :],
       then + bias[r] and the leaky ReLU when given; only the first `rows` rows are written.
       a: kc x MR packed, b: kc x NR packed. */
    static void cnnx_sgemm_micro(Py_ssize_t kc, const float *restrict a, const float *restrict b,
                                 float *c, Py_ssize_t ldc, int rows, int accumulate,
                                 const float *bias, int rectify, float slope) {
        CNNX_TILE_SUMS
        CNNX_ROW_STORE(0) CNNX_ROW_STORE(1) CNNX_ROW_STORE(2) CNNX_ROW_STORE(3)
        CNNX_ROW_STORE(4) CNNX_ROW_STORE(5) CNNX_ROWS_HI(CNNX_ROW_STORE)
    }
    #endif  /* CNNX_GEMM_VECTOR: the micro-kernel */
    /* Copy / zero n <= NR floats: the runs of the B packing (an output row of a panel at most), so
       straight-line vector code: whole vectors, an overlapping last vector, or fixed-size pieces
       for runs shorter than a vector (a loop here became a memcpy call, costing more than the copy). */
    #if CNNX_GEMM_VECTOR
    static inline void cnnx_copy_run(float *restrict dst, const float *restrict src, Py_ssize_t n) {
        if (n >= CNNX_VW) {
            cnnx_vstore(dst, cnnx_vload(src));
            if (n > CNNX_VW) cnnx_vstore(dst + n - CNNX_VW, cnnx_vload(src + n - CNNX_VW));
            return;
        }
        Py_ssize_t t = 0;
        if (n & 8) { memcpy(dst + t, src + t, 8 * sizeof(float)); t += 8; }
        if (n & 4) { memcpy(dst + t, src + t, 4 * sizeof(float)); t += 4; }
        if (n & 2) { memcpy(dst + t, src + t, 2 * sizeof(float)); t += 2; }
        if (n & 1) dst[t] = src[t];
    }
    static inline void cnnx_zero_run(float *dst, Py_ssize_t n) {
        static const float zeros[CNNX_VW] = {0};
        cnnx_copy_run(dst, zeros, n < CNNX_VW ? n : CNNX_VW);
        if (n > CNNX_VW) cnnx_copy_run(dst + n - CNNX_VW, zeros, CNNX_VW);
    }
    #else
    static void cnnx_copy_run(float *dst, const float *src, Py_ssize_t n) {
        for (Py_ssize_t t = 0; t < n; ++t) dst[t] = src[t];
    }
    static void cnnx_zero_run(float *dst, Py_ssize_t n) {
        for (Py_ssize_t t = 0; t < n; ++t) dst[t] = 0;
    }
    #endif
    #if !CNNX_GEMM_VECTOR
    static void cnnx_sgemm_micro(Py_ssize_t kc, const float *a, const float *b,
                                 float *c, Py_ssize_t ldc, int rows, int accumulate,
                                 const float *bias, int rectify, float slope) {
        float acc[CNNX_MR][CNNX_NR] = {{0}};
        for (Py_ssize_t k = 0; k < kc; ++k) {
            for (int r = 0; r < CNNX_MR; ++r)
                for (int j = 0; j < CNNX_NR; ++j)
                    acc[r][j] += a[r] * b[j];
            a += CNNX_MR;
            b += CNNX_NR;
        }
        for (int r = 0; r < rows; ++r) {
            float *cr = c + (Py_ssize_t)r * ldc;
            for (int j = 0; j < CNNX_NR; ++j) {
                float v = acc[r][j] + (accumulate ? cr[j] : 0.0f) + (bias ? bias[r] : 0.0f);
                if (rectify) v = v > 0 ? v : v * slope;
                cr[j] = v;
            }
        }
    }
    #endif
    /* 64-byte aligned buffers for the packed panels (freed with cnnx_free_aligned). */
    static float *cnnx_alloc_floats(Py_ssize_t n) {
        char *raw = (char *)malloc((size_t)n * sizeof(float) + 64 + sizeof(void *));
        if (!raw) return NULL;
        uintptr_t p = ((uintptr_t)(raw + sizeof(void *)) + 63) & ~(uintptr_t)63;
        ((void **)p)[-1] = raw;
        return (float *)p;
    }
    static void cnnx_free_floats(float *p) { if (p) free(((void **)p)[-1]); }
    """
    const int CNNX_GEMM_MR
    const int CNNX_GEMM_NR
    const int CNNX_GEMM_VW
    const int CNNX_GEMM_KC_MAX
    const int CNNX_GEMM_NC_BYTES
    void cnnx_sgemm_micro(Py_ssize_t kc, const float* a, const float* b, float* c, Py_ssize_t ldc, int rows,
                          int accumulate, const float* bias, int rectify, float slope) noexcept nogil
    void cnnx_copy_run(float* dst, const float* src, Py_ssize_t n) noexcept nogil
    void cnnx_zero_run(float* dst, Py_ssize_t n) noexcept nogil
    float* cnnx_alloc_floats(Py_ssize_t n) noexcept nogil
    void cnnx_free_floats(float* p) noexcept nogil


# The geometry of one call: images, window, output addressing.
cdef struct _ConvGemm:
    const float* x        # x[first], the group's first image
    Py_ssize_t c, h, w    # input channels and size
    const float* xpad     # the group's images with zero padding: (images, c, hp, wp)
    Py_ssize_t images, hp, wp
    Py_ssize_t kh, kw, sy, sx, pad_top, pad_left, out_h, out_w
    Py_ssize_t M, K, N, P # out_c, c*kh*kw, g*P, out_h*out_w
    Py_ssize_t kc_max, nc # blocking
    const float* a_src    # A(o, k) = a_src[o * a_rs + k * a_cs]
    Py_ssize_t a_rs, a_cs
    const float* b_src    # NULL: B is the images' implicit im2col; else B(k, n) = b_src[k * b_rs + n * b_cs]
    Py_ssize_t b_rs, b_cs
    const float* a_packed
    float* out            # C(o, n) = out[o * row_stride + (n // P) * image_stride + n % P]
    Py_ssize_t row_stride, image_stride
    const float* bias     # NULL without bias
    int rectify
    float slope


cdef struct _PoolTiles:
    # The floor 2x2 / stride-2 max-pool fused into the tile stores (``conv_gemm_nchw_max_pool_2x2``):
    # the GEMM's columns are the pixels the pool keeps, 4 per window, see ``_pack_pool_panel``.
    Py_ssize_t ph, pw     # pooled output size: out_h // 2, out_w // 2
    Py_ssize_t windows    # images * ph * pw
    int* code             # training: each window's argmax (2 * dy + dx) beside the output; NULL: none


def gemm_config():
    """The micro-kernel and blocking of this build: ``{"mr", "nr", "vector_width", "kc_max",
    "nc_bytes"}`` (rows x columns of one register tile, floats per vector, K block, B block bytes)."""
    return {"mr": CNNX_GEMM_MR, "nr": CNNX_GEMM_NR, "vector_width": CNNX_GEMM_VW,
            "kc_max": CNNX_GEMM_KC_MAX, "nc_bytes": CNNX_GEMM_NC_BYTES}


cdef void _pack_a(const _ConvGemm* g, float* ap) noexcept nogil:
    """A (M, K) -> micro-panels of MR rows: ap[(panel * K + k) * MR + r], zero past M."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR
    cdef Py_ssize_t panel, k, r, o
    cdef float* dst
    for panel in range((g.M + mr - 1) // mr):
        for k in range(g.K):
            dst = ap + (panel * g.K + k) * mr
            for r in range(mr):
                o = panel * mr + r
                dst[r] = g.a_src[o * g.a_rs + k * g.a_cs] if o < g.M else 0


cdef void _pack_matrix_panel(const _ConvGemm* g, Py_ssize_t n_start, Py_ssize_t k0, Py_ssize_t kc,
                             float* bp) noexcept nogil:
    """One KC x NR panel of an explicit B, columns ``n_start : n_start + NR``, rows ``k0 : k0 + kc``:
    bp[k * NR + j]. Columns past N are zero."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR
    cdef Py_ssize_t valid = g.N - n_start if g.N - n_start < nr else nr
    cdef Py_ssize_t k, j
    cdef const float* src
    if g.b_cs == 1:
        for k in range(kc):
            src = g.b_src + (k0 + k) * g.b_rs + n_start
            cnnx_copy_run(bp + k * nr, src, valid)
            cnnx_zero_run(bp + k * nr + valid, nr - valid)
        return
    # A transposed B: read each column along its contiguous direction.
    for j in range(valid):
        src = g.b_src + (n_start + j) * g.b_cs + k0 * g.b_rs
        for k in range(kc):
            bp[k * nr + j] = src[k * g.b_rs]
    for k in range(kc):
        cnnx_zero_run(bp + k * nr + valid, nr - valid)


cdef void _pad_images(const _ConvGemm* g, float* xpad) noexcept nogil:
    """The group's images with their padding as zeros: xpad[j, ci, pad_top + iy, pad_left + ix] =
    x[j, ci, iy, ix], shape (images, c, hp, wp), so that packing never clips a window."""
    cdef Py_ssize_t j, ci, r, iy
    cdef float* row
    for j in range(g.images):
        for ci in range(g.c):
            for r in range(g.hp):
                row = xpad + ((j * g.c + ci) * g.hp + r) * g.wp
                iy = r - g.pad_top
                if iy < 0 or iy >= g.h:
                    memset(row, 0, g.wp * sizeof(float))
                    continue
                memset(row, 0, g.pad_left * sizeof(float))
                memcpy(row + g.pad_left, g.x + ((j * g.c + ci) * g.h + iy) * g.w, g.w * sizeof(float))
                memset(row + g.pad_left + g.w, 0, (g.wp - g.pad_left - g.w) * sizeof(float))


cdef void _pack_image_panel(const _ConvGemm* g, Py_ssize_t n_start, Py_ssize_t k0, Py_ssize_t kc,
                            float* bp) noexcept nogil:
    """One KC x NR panel of the implicit im2col matrix, columns ``n_start : n_start + NR``, rows
    ``k0 : k0 + kc``: bp[k * NR + j], read from the padded images. Columns past N are zero."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR
    # The panel's columns as runs of consecutive output pixels of one output row of one image:
    # where each run starts in the panel, its length, and its first window's corner in xpad.
    cdef Py_ssize_t seg_col[64]
    cdef Py_ssize_t seg_len[64]
    cdef Py_ssize_t seg_src[64]
    cdef Py_ssize_t n_segs = 0, j = 0, n, p, oy, ox, length, valid
    cdef Py_ssize_t plane = g.hp * g.wp
    valid = g.N - n_start
    if valid > nr:
        valid = nr
    while j < valid:
        n = n_start + j
        p = n % g.P
        oy = p // g.out_w
        ox = p - oy * g.out_w
        length = g.out_w - ox
        if length > valid - j:
            length = valid - j
        seg_col[n_segs] = j
        seg_len[n_segs] = length
        seg_src[n_segs] = (n // g.P) * g.c * plane + oy * g.sy * g.wp + ox * g.sx
        n_segs += 1
        j += length
    cdef Py_ssize_t k, s, t, ci, ki, kj, offset
    cdef float* dst
    cdef const float* src
    ci = k0 // (g.kh * g.kw)
    ki = (k0 // g.kw) % g.kh
    kj = k0 % g.kw
    for k in range(kc):
        dst = bp + k * nr
        offset = ci * plane + ki * g.wp + kj  # row k's tap, relative to each window's corner
        if g.sx == 1:
            for s in range(n_segs):
                cnnx_copy_run(dst + seg_col[s], g.xpad + seg_src[s] + offset, seg_len[s])
        else:
            for s in range(n_segs):
                src = g.xpad + seg_src[s] + offset
                for t in range(seg_len[s]):
                    dst[seg_col[s] + t] = src[t * g.sx]
        cnnx_zero_run(dst + valid, nr - valid)
        kj += 1
        if kj == g.kw:
            kj = 0
            ki += 1
            if ki == g.kh:
                ki = 0
                ci += 1


cdef void _store_tile(const _ConvGemm* g, Py_ssize_t o0, Py_ssize_t n_start, const float* a, const float* b,
                      Py_ssize_t kc, bint accumulate, bint last) noexcept nogil:
    """Tile rows ``o0 : o0 + MR``, columns ``n_start : n_start + NR``: the micro-kernel straight
    into C when the tile's columns are contiguous there, else through a buffer."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    cdef int rows = <int>(g.M - o0 if g.M - o0 < mr else mr)
    cdef const float* bias = (g.bias + o0) if (last and g.bias != NULL) else NULL
    cdef int rectify = g.rectify if last else 0
    cdef Py_ssize_t image = n_start // g.P, p = n_start % g.P
    cdef float* c = g.out + o0 * g.row_stride + image * g.image_stride + p
    if n_start + nr <= g.N and (p + nr <= g.P or g.image_stride == g.P):
        cnnx_sgemm_micro(kc, a, b, c, g.row_stride, rows, accumulate, bias, rectify, g.slope)
        return
    cdef float tile[16 * 64]  # MR x NR, MR <= 16 and NR <= 64 in every build
    cdef Py_ssize_t r, j, n, valid = g.N - n_start
    if valid > nr:
        valid = nr
    if accumulate:
        for j in range(valid):
            n = n_start + j
            c = g.out + o0 * g.row_stride + (n // g.P) * g.image_stride + n % g.P
            for r in range(rows):
                tile[r * nr + j] = c[r * g.row_stride]
    cnnx_sgemm_micro(kc, a, b, tile, nr, rows, accumulate, bias, rectify, g.slope)
    for j in range(valid):
        n = n_start + j
        c = g.out + o0 * g.row_stride + (n // g.P) * g.image_stride + n % g.P
        for r in range(rows):
            c[r * g.row_stride] = tile[r * nr + j]


cdef void _gemm_block(const _ConvGemm* g, Py_ssize_t block, float* bp) noexcept nogil:
    """Columns ``block * nc : (block + 1) * nc`` of C, all rows, all of K (in KC blocks)."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    cdef Py_ssize_t n0 = block * g.nc
    cdef Py_ssize_t n1 = n0 + g.nc if n0 + g.nc < g.N else g.N
    cdef Py_ssize_t n_panels = (n1 - n0 + nr - 1) // nr
    cdef Py_ssize_t k0, kc, panel, o0
    k0 = 0
    while k0 < g.K:
        kc = g.K - k0 if g.K - k0 < g.kc_max else g.kc_max
        for panel in range(n_panels):
            if g.b_src == NULL:
                _pack_image_panel(g, n0 + panel * nr, k0, kc, bp + panel * kc * nr)
            else:
                _pack_matrix_panel(g, n0 + panel * nr, k0, kc, bp + panel * kc * nr)
        o0 = 0
        while o0 < g.M:
            for panel in range(n_panels):
                _store_tile(g, o0, n0 + panel * nr, g.a_packed + (o0 // mr) * g.K * mr + k0 * mr,
                            bp + panel * kc * nr, kc, k0 > 0, k0 + kc >= g.K)
            o0 += mr
        k0 += kc


cdef int _conv_gemm(_ConvGemm* g, int n_threads) noexcept nogil:
    """Run the whole product (blocking set here); 0 on success, -1 when out of memory."""
    return _conv_gemm_run(g, n_threads, NULL)


cdef int _conv_gemm_run(_ConvGemm* g, int n_threads, const _PoolTiles* pool) noexcept nogil:
    """``_conv_gemm``, or with ``pool`` its max-pooled form (``_gemm_pool_block``)."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    cdef Py_ssize_t n_kblocks = (g.K + CNNX_GEMM_KC_MAX - 1) // CNNX_GEMM_KC_MAX
    # Balanced K blocks (576 -> 2 x 288, not 512 + 64).
    g.kc_max = (g.K + n_kblocks - 1) // n_kblocks
    g.nc = (CNNX_GEMM_NC_BYTES // (g.kc_max * <Py_ssize_t>sizeof(float))) // nr * nr
    if g.nc < nr:
        g.nc = nr
    cdef Py_ssize_t n_blocks = (g.N + g.nc - 1) // g.nc
    if n_threads > n_blocks:
        n_threads = <int>n_blocks
    if n_threads < 1:
        n_threads = 1
    cdef float* ap = cnnx_alloc_floats(((g.M + mr - 1) // mr) * mr * g.K)
    cdef Py_ssize_t b_floats = g.kc_max * ((g.nc + nr - 1) // nr) * nr
    if pool != NULL and g.kc_max < g.K:
        b_floats += _pool_partial_floats(g)
    cdef float* bp = cnnx_alloc_floats(b_floats * n_threads)
    cdef Py_ssize_t block
    if ap == NULL or bp == NULL:
        cnnx_free_floats(ap)
        cnnx_free_floats(bp)
        return -1
    _pack_a(g, ap)
    g.a_packed = ap
    cdef float* xpad = NULL
    if g.b_src == NULL:
        if g.pad_top == 0 and g.pad_left == 0 and g.hp == g.h and g.wp == g.w:
            g.xpad = g.x  # no padding: read the images themselves
        else:
            xpad = cnnx_alloc_floats(g.images * g.c * g.hp * g.wp)
            if xpad == NULL:
                cnnx_free_floats(ap)
                cnnx_free_floats(bp)
                return -1
            _pad_images(g, xpad)
            g.xpad = xpad
    if n_threads == 1:
        for block in range(n_blocks):
            _run_block(g, pool, block, bp)
    else:
        for block in prange(n_blocks, schedule="static", num_threads=n_threads):
            _run_block(g, pool, block, bp + threadid() * b_floats)
    cnnx_free_floats(ap)
    cnnx_free_floats(bp)
    cnnx_free_floats(xpad)
    return 0


cdef inline void _run_block(const _ConvGemm* g, const _PoolTiles* pool, Py_ssize_t block, float* bp) noexcept nogil:
    if pool == NULL:
        _gemm_block(g, block, bp)
    else:
        _gemm_pool_block(g, pool, block, bp)


cdef int _run_image_group(const _ConvGemm* whole, const _PoolTiles* whole_pool, Py_ssize_t first,
                          Py_ssize_t count) noexcept nogil:
    """Images ``first : first + count`` of the call ``whole`` describes (set up for all its images),
    on the calling thread alone."""
    cdef _ConvGemm g = whole[0]
    cdef _PoolTiles pool
    g.x = whole.x + first * whole.c * whole.h * whole.w
    g.images = count
    g.N = count * whole.P
    g.out = whole.out + first * whole.image_stride
    if whole_pool == NULL:
        return _conv_gemm_run(&g, 1, NULL)
    pool = whole_pool[0]
    pool.windows = count * pool.ph * pool.pw
    if pool.code != NULL:
        pool.code = whole_pool.code + first * whole.image_stride  # addressed as g.out
    return _conv_gemm_run(&g, 1, &pool)


cdef int _conv_gemm_groups(_ConvGemm* whole, const _PoolTiles* pool, Py_ssize_t group, int n_threads) noexcept nogil:
    """The call ``whole`` by groups of ``group`` images, each group on one thread, handed out as
    threads free up; 0 on success, -1 when out of memory. ``group <= 0``: one call, its column
    blocks split over ``n_threads`` (``_conv_gemm_run``).

    Why in here rather than in Python worker threads: each group is one compiled call, so the
    whole loop runs without the GIL. On a machine whose idle cores sleep (virtual machines), a
    Python worker woken for a call and handed the GIL between groups cost 40-70 us per call."""
    if group <= 0 or group >= whole.images:
        return _conv_gemm_run(whole, n_threads, pool)
    cdef Py_ssize_t n_groups = (whole.images + group - 1) // group
    cdef Py_ssize_t i
    cdef int failures = 0
    if n_threads > n_groups:
        n_threads = <int>n_groups
    if n_threads <= 1:
        for i in range(n_groups):
            failures += _run_image_group(whole, pool, i * group, min(group, whole.images - i * group)) != 0
    else:
        for i in prange(n_groups, schedule="dynamic", num_threads=n_threads):
            failures += _run_image_group(whole, pool, i * group, min(group, whole.images - i * group)) != 0
    return -1 if failures else 0


cdef void _conv_gemm_setup(_ConvGemm* g, const float[:, :, :, ::1] x, Py_ssize_t first, Py_ssize_t g_images,
                           const float[:, ::1] weight, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sy,
                           Py_ssize_t sx, Py_ssize_t pad_top, Py_ssize_t pad_left, Py_ssize_t out_h,
                           Py_ssize_t out_w) noexcept:
    g.x = &x[first, 0, 0, 0]
    g.c = x.shape[1]
    g.h = x.shape[2]
    g.w = x.shape[3]
    g.kh, g.kw, g.sy, g.sx = kh, kw, sy, sx
    g.pad_top, g.pad_left, g.out_h, g.out_w = pad_top, pad_left, out_h, out_w
    g.M = weight.shape[0]
    g.K = weight.shape[1]
    g.a_src = &weight[0, 0]
    g.a_rs = g.K
    g.a_cs = 1
    g.b_src = NULL
    g.P = out_h * out_w
    g.N = g_images * g.P
    g.images = g_images
    # The padded extent every window reads: top/left padding, then up to the last window's end
    # (at least the image: rows / columns no window reads are copied but never packed).
    g.hp = max(pad_top + g.h, (out_h - 1) * sy + kh)
    g.wp = max(pad_left + g.w, (out_w - 1) * sx + kw)
    g.bias = NULL
    g.rectify = 0
    g.slope = 0


def conv_gemm_nchw(
    const float[:, :, :, ::1] x,
    Py_ssize_t first,
    Py_ssize_t count,
    const float[:, ::1] weight,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    const float[::1] bias,
    bint has_bias,
    bint leaky_relu,
    double negative_slope,
    float[:, :, ::1] y,
    int n_threads,
    Py_ssize_t group=0,
):
    """The float32 convolution forward of images ``x[first : first + count]`` into
    ``y[first : first + count]`` of shape ``(n, out_c, out_h * out_w)``, in one pass: the packed
    GEMM with ``weight`` of shape ``(out_c, c*kh*kw)`` over the implicit im2col matrix, plus
    ``bias[o]`` when ``has_bias``, then a leaky ReLU with ``negative_slope`` when ``leaky_relu``
    (as ``im2col`` + GEMM + ``gemm_to_nchw``). ``group > 0``: by groups of that many images, one
    thread each (see ``_conv_gemm_groups``). The caller checks the geometry."""
    cdef _ConvGemm g
    if weight.shape[1] == 0:
        raise ValueError("Expected a weight with at least one column (c*kh*kw > 0), received: shape (%d, 0)" % weight.shape[0])
    if count <= 0 or y.shape[1] == 0 or y.shape[2] == 0:
        return
    _conv_gemm_setup(&g, x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w)
    g.out = &y[first, 0, 0]
    g.row_stride = g.P
    g.image_stride = g.M * g.P
    g.bias = &bias[0] if has_bias else NULL
    g.rectify = leaky_relu
    g.slope = <float>negative_slope
    cdef int status
    with nogil:
        status = _conv_gemm_groups(&g, NULL, group, n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the packed GEMM panels")


def conv_gemm_columns(
    const float[:, :, :, ::1] x,
    Py_ssize_t first,
    const float[:, ::1] weight,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    float[:, :, ::1] y_gemm,
    int n_threads,
):
    """``y_gemm (out_c, g, out_h * out_w) = weight @ im2col(x[first : first + g])`` in float32,
    the GEMM layout ``gemm_to_nchw`` and its pooled variants read, without materialising the
    columns. ``weight`` of shape ``(out_c, c*kh*kw)``."""
    cdef _ConvGemm g
    if weight.shape[1] == 0:
        raise ValueError("Expected a weight with at least one column (c*kh*kw > 0), received: shape (%d, 0)" % weight.shape[0])
    if y_gemm.shape[0] == 0 or y_gemm.shape[1] == 0 or y_gemm.shape[2] == 0:
        return
    _conv_gemm_setup(&g, x, first, y_gemm.shape[1], weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w)
    g.out = &y_gemm[0, 0, 0]
    g.row_stride = g.N
    g.image_stride = g.P
    cdef int status
    with nogil:
        status = _conv_gemm(&g, n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the packed GEMM panels")


def gemm(const float[:, :] a, const float[:, :] b, float[:, ::1] c, int n_threads):
    """``c = a @ b`` in float32 with cnnx's packed GEMM: ``a (M, K)`` and ``b (K, N)`` of any strides
    (transposed views included), ``c (M, N)`` C-contiguous, overwritten. ``n_threads`` splits
    the columns; the values do not depend on it."""
    cdef _ConvGemm g
    if a.shape[1] != b.shape[0] or c.shape[0] != a.shape[0] or c.shape[1] != b.shape[1]:
        raise ValueError(f"Expected a (M, K), b (K, N), c (M, N), received: a ({a.shape[0]}, {a.shape[1]}), "
                         f"b ({b.shape[0]}, {b.shape[1]}), c ({c.shape[0]}, {c.shape[1]})")
    if c.shape[0] == 0 or c.shape[1] == 0:
        return
    if a.shape[1] == 0:
        c[:, :] = 0
        return
    g.M = a.shape[0]
    g.K = a.shape[1]
    g.N = c.shape[1]
    g.P = g.N  # one "image": C(o, n) = c[o, n]
    g.a_src = &a[0, 0]
    g.a_rs = a.strides[0] // sizeof(float)
    g.a_cs = a.strides[1] // sizeof(float)
    g.b_src = &b[0, 0]
    g.b_rs = b.strides[0] // sizeof(float)
    g.b_cs = b.strides[1] // sizeof(float)
    g.out = &c[0, 0]
    g.row_stride = c.shape[1]
    g.image_stride = 0
    g.bias = NULL
    g.rectify = 0
    g.slope = 0
    cdef int status
    with nogil:
        status = _conv_gemm(&g, n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the packed GEMM panels")


# --- The weight gradient dW = dY @ im2col(x)^T, with the pixels as the reduction -----------------
#
# Both factors run along the pixels: dY in GEMM layout (out_c, g * P) row by row, and each row of
# the implicit im2col matrix (one kernel tap) is runs of the zero-padded images. So the kernel
# keeps the pixels in the vectors and nothing is transposed: an MO x NK block of dW is MO * NK
# vector accumulators, each summing dY[o, pixels] * cols[k, pixels] over a block of pixels, then
# reduced across its lanes into dW. Loops: pixel blocks (dY's block of all out_c rows stays in L2)
# -> NK taps packed from the padded images (one panel of NK rows x the block's pixels) -> MO rows
# of dY -> micro-kernel. Threads split the tap panels of each pixel block: every dW value is the
# same sum in the same order whatever the split.

cdef extern from *:
    """
    /* MO rows of dY x NK taps per tile: MO * NK accumulators + NK tap vectors + one dY vector fit
       the register file (AVX-512: 24 + 6 + 1 of 32 zmm; AVX2 / SSE: 12 + 3 + 1 of 16). */
    #define CNNX_DW_MO 4
    #if CNNX_VW >= 16
      #define CNNX_DW_NK 6
    #else
      #define CNNX_DW_NK 3
    #endif
    static const int CNNX_GEMM_DW_MO = CNNX_DW_MO;
    static const int CNNX_GEMM_DW_NK = CNNX_DW_NK;

    /* Copy n floats (any n): whole vectors, then an overlapping last piece. */
    static inline void cnnx_copy_long(float *restrict dst, const float *restrict src, Py_ssize_t n) {
        Py_ssize_t t = 0;
    #if CNNX_GEMM_VECTOR
        for (; t + CNNX_VW <= n; t += CNNX_VW) cnnx_vstore(dst + t, cnnx_vload(src + t));
        if (t < n) {
            if (n >= CNNX_VW) cnnx_vstore(dst + n - CNNX_VW, cnnx_vload(src + n - CNNX_VW));
            else cnnx_copy_run(dst, src, n);
        }
    #else
        for (; t < n; ++t) dst[t] = src[t];
    #endif
    }

    #if CNNX_GEMM_VECTOR
    static inline float cnnx_hsum(cnnx_vf v) {
        float lanes[CNNX_VW];
        cnnx_vstore(lanes, v);
        /* Pairwise: halves added as vectors would need shuffles; a tree over the lanes keeps the
           chains short. */
        for (int width = CNNX_VW / 2; width >= 1; width /= 2)
            for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
        return lanes[0];
    }
    #define CNNX_DW_DECL(o) cnnx_vf d##o##0 = {0}, d##o##1 = {0}, d##o##2 = {0}; CNNX_DW_DECL_HI(o)
    #if CNNX_DW_NK == 6
      #define CNNX_DW_DECL_HI(o) cnnx_vf d##o##3 = {0}, d##o##4 = {0}, d##o##5 = {0};
      #define CNNX_DW_FMA(o, y) { d##o##0 += y * x0; d##o##1 += y * x1; d##o##2 += y * x2; \
                                  d##o##3 += y * x3; d##o##4 += y * x4; d##o##5 += y * x5; }
      #define CNNX_DW_STORE(o) { CNNX_DW_STORE1(o, 0) CNNX_DW_STORE1(o, 1) CNNX_DW_STORE1(o, 2) \
                                 CNNX_DW_STORE1(o, 3) CNNX_DW_STORE1(o, 4) CNNX_DW_STORE1(o, 5) }
    #else
      #define CNNX_DW_DECL_HI(o)
      #define CNNX_DW_FMA(o, y) { d##o##0 += y * x0; d##o##1 += y * x1; d##o##2 += y * x2; }
      #define CNNX_DW_STORE(o) { CNNX_DW_STORE1(o, 0) CNNX_DW_STORE1(o, 1) CNNX_DW_STORE1(o, 2) }
    #endif
    #define CNNX_DW_STORE1(o, k) if (o < rows && k < taps) dw[(o) * ldw + k] += cnnx_hsum(d##o##k);
    #define CNNX_DW_ROW(o) { cnnx_vf y = cnnx_vload(dy##o + t); CNNX_DW_FMA(o, y) }
    #define CNNX_DW_TAIL_ROW(o) { cnnx_vf y = {0}; memcpy(&y, dy##o + t, (size_t)tail * sizeof(float)); \
                                  CNNX_DW_FMA(o, y) }
    #endif

    /* dw[o, k] += sum_t dy_o[t] * cols[k * ldc + t] for o < rows, k < taps, t < n: the dY rows
       dy0..dy3 (rows past `rows` may repeat a valid row: their sums are dropped), the packed tap
       rows (ldc a multiple of the vector width, zero past n), dw with row stride ldw. */
    static void cnnx_dw_micro(Py_ssize_t n, const float *dy0, const float *dy1, const float *dy2,
                              const float *dy3, const float *restrict cols, Py_ssize_t ldc,
                              float *dw, Py_ssize_t ldw, int rows, int taps) {
    #if CNNX_GEMM_VECTOR
        CNNX_DW_DECL(0) CNNX_DW_DECL(1) CNNX_DW_DECL(2) CNNX_DW_DECL(3)
        Py_ssize_t t = 0;
        for (; t + CNNX_VW <= n; t += CNNX_VW) {
            const float *c = cols + t;
            cnnx_vf x0 = cnnx_vload(c), x1 = cnnx_vload(c + ldc), x2 = cnnx_vload(c + 2 * ldc);
    #if CNNX_DW_NK == 6
            cnnx_vf x3 = cnnx_vload(c + 3 * ldc), x4 = cnnx_vload(c + 4 * ldc), x5 = cnnx_vload(c + 5 * ldc);
    #endif
            CNNX_DW_ROW(0) CNNX_DW_ROW(1) CNNX_DW_ROW(2) CNNX_DW_ROW(3)
        }
        Py_ssize_t tail = n - t;
        if (tail > 0) {
            /* The last pixels: dY read only up to n (zero lanes past it; the taps are zero there). */
            const float *c = cols + t;
            cnnx_vf x0 = cnnx_vload(c), x1 = cnnx_vload(c + ldc), x2 = cnnx_vload(c + 2 * ldc);
    #if CNNX_DW_NK == 6
            cnnx_vf x3 = cnnx_vload(c + 3 * ldc), x4 = cnnx_vload(c + 4 * ldc), x5 = cnnx_vload(c + 5 * ldc);
    #endif
            CNNX_DW_TAIL_ROW(0) CNNX_DW_TAIL_ROW(1) CNNX_DW_TAIL_ROW(2) CNNX_DW_TAIL_ROW(3)
        }
        CNNX_DW_STORE(0) CNNX_DW_STORE(1) CNNX_DW_STORE(2) CNNX_DW_STORE(3)
    #else
        const float *dy[4] = {dy0, dy1, dy2, dy3};
        for (int o = 0; o < rows; ++o)
            for (int k = 0; k < taps; ++k) {
                float s = 0;
                for (Py_ssize_t t = 0; t < n; ++t) s += dy[o][t] * cols[k * ldc + t];
                dw[o * ldw + k] += s;
            }
    #endif
    }
    """
    const int CNNX_GEMM_DW_MO
    const int CNNX_GEMM_DW_NK
    void cnnx_copy_long(float* dst, const float* src, Py_ssize_t n) noexcept nogil
    void cnnx_dw_micro(Py_ssize_t n, const float* dy0, const float* dy1, const float* dy2, const float* dy3,
                       const float* cols, Py_ssize_t ldc, float* dw, Py_ssize_t ldw, int rows,
                       int taps) noexcept nogil


cdef struct _PixelRuns:
    # The pixels n0 : n0 + count of a block as runs of one output row of one image: where each
    # run starts in the block, its length, and its first window's corner in the padded images.
    Py_ssize_t n_runs
    Py_ssize_t* col
    Py_ssize_t* length
    Py_ssize_t* src


cdef void _pixel_runs(const _ConvGemm* g, Py_ssize_t n0, Py_ssize_t count, _PixelRuns* runs) noexcept nogil:
    cdef Py_ssize_t j = 0, n, p, oy, ox, length
    cdef Py_ssize_t plane = g.hp * g.wp
    runs.n_runs = 0
    while j < count:
        n = n0 + j
        p = n % g.P
        oy = p // g.out_w
        ox = p - oy * g.out_w
        length = g.out_w - ox
        if length > count - j:
            length = count - j
        runs.col[runs.n_runs] = j
        runs.length[runs.n_runs] = length
        runs.src[runs.n_runs] = (n // g.P) * g.c * plane + oy * g.sy * g.wp + ox * g.sx
        runs.n_runs += 1
        j += length


cdef void _dw_panel(const _ConvGemm* g, const float* dy, Py_ssize_t ldy, Py_ssize_t n0, Py_ssize_t count,
                    const _PixelRuns* runs, Py_ssize_t k0, float* panel, Py_ssize_t ldp, float* dw) noexcept nogil:
    """dW[:, k0 : k0 + NK] += dY[:, n0 : n0 + count] @ cols[k0 : k0 + NK, n0 : n0 + count]^T: pack the
    panel's taps from the padded images (rows of ``ldp`` floats, zero past ``count`` and past K),
    then every MO rows of dY."""
    cdef Py_ssize_t nk = CNNX_GEMM_DW_NK, mo = CNNX_GEMM_DW_MO
    cdef Py_ssize_t plane = g.hp * g.wp
    cdef Py_ssize_t r, k, s, t, offset, o0
    cdef int taps = <int>(g.K - k0 if g.K - k0 < nk else nk)
    cdef float* dst
    cdef const float* src
    cdef const float* rows_[4]
    for r in range(nk):
        dst = panel + r * ldp
        k = k0 + r
        if k >= g.K:
            memset(dst, 0, ldp * sizeof(float))
            continue
        offset = (k // (g.kh * g.kw)) * plane + ((k // g.kw) % g.kh) * g.wp + k % g.kw
        if g.sx == 1:
            for s in range(runs.n_runs):
                cnnx_copy_long(dst + runs.col[s], g.xpad + runs.src[s] + offset, runs.length[s])
        else:
            for s in range(runs.n_runs):
                src = g.xpad + runs.src[s] + offset
                for t in range(runs.length[s]):
                    dst[runs.col[s] + t] = src[t * g.sx]
        memset(dst + count, 0, (ldp - count) * sizeof(float))
    o0 = 0
    while o0 < g.M:
        for r in range(mo):
            rows_[r] = dy + (o0 + r if o0 + r < g.M else g.M - 1) * ldy + n0
        cnnx_dw_micro(count, rows_[0], rows_[1], rows_[2], rows_[3], panel, ldp, dw + o0 * g.K + k0, g.K,
                      <int>(g.M - o0 if g.M - o0 < mo else mo), taps)
        o0 += mo


def conv_weight_grad(
    const float[:, :, :, ::1] x,
    Py_ssize_t first,
    const float[:, :, ::1] dy_gemm,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    float[:, ::1] dweight,
    int n_threads,
):
    """``dweight (out_c, c*kh*kw) = dy_gemm @ im2col(x[first : first + g])^T`` in float32, with
    ``dy_gemm (out_c, g, out_h * out_w)`` the output gradient in GEMM layout, without
    materialising the columns (overwrites ``dweight``). The caller checks the geometry."""
    cdef _ConvGemm g
    cdef Py_ssize_t oc = dy_gemm.shape[0], m = dy_gemm.shape[1]
    if dweight.shape[0] != oc or dweight.shape[1] != x.shape[1] * kh * kw or dy_gemm.shape[2] != out_h * out_w:
        raise ValueError(f"Expected dweight ({oc}, {x.shape[1] * kh * kw}) and dy_gemm (out_c, g, {out_h * out_w}), "
                         f"received: dweight ({dweight.shape[0]}, {dweight.shape[1]}), dy_gemm ({oc}, {m}, {dy_gemm.shape[2]})")
    dweight[:, :] = 0
    # Empty images (only padding under the windows) have a zero weight gradient.
    if oc == 0 or m == 0 or dweight.shape[1] == 0 or out_h * out_w == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        return
    g.x = &x[first, 0, 0, 0]
    g.c, g.h, g.w = x.shape[1], x.shape[2], x.shape[3]
    g.kh, g.kw, g.sy, g.sx = kh, kw, sy, sx
    g.pad_top, g.pad_left, g.out_h, g.out_w = pad_top, pad_left, out_h, out_w
    g.M = oc
    g.K = dweight.shape[1]
    g.P = out_h * out_w
    g.N = m * g.P
    g.images = m
    g.hp = max(pad_top + g.h, (out_h - 1) * sy + kh)
    g.wp = max(pad_left + g.w, (out_w - 1) * sx + kw)
    cdef int status
    with nogil:
        status = _conv_weight_grad(&g, &dy_gemm[0, 0, 0], &dweight[0, 0], n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the weight gradient's panels")


cdef int _conv_weight_grad(_ConvGemm* g, const float* dy, float* dw, int n_threads) noexcept nogil:
    cdef Py_ssize_t vw = CNNX_GEMM_VW, nk = CNNX_GEMM_DW_NK
    # Pixel blocks: dY's block (out_c rows) within ~512 KiB of L2, 256..2048 pixels (longer blocks
    # spread each tile's lane reduction over more FMAs).
    cdef Py_ssize_t block = (512 * 1024 // (4 * g.M)) // vw * vw
    if block > 2048:
        block = 2048
    if block < 256:
        block = 256
    if block > (g.N + vw - 1) // vw * vw:
        block = (g.N + vw - 1) // vw * vw
    cdef Py_ssize_t n_panels = (g.K + nk - 1) // nk
    if n_threads > n_panels:
        n_threads = <int>n_panels
    if n_threads < 1:
        n_threads = 1
    cdef Py_ssize_t panel_floats = nk * block
    cdef float* panels = cnnx_alloc_floats(panel_floats * n_threads)
    cdef Py_ssize_t* run_data = <Py_ssize_t*>malloc(3 * (block + 1) * sizeof(Py_ssize_t))
    cdef float* xpad = NULL
    cdef _PixelRuns runs
    cdef Py_ssize_t n0, count, p
    if panels == NULL or run_data == NULL:
        cnnx_free_floats(panels)
        free(run_data)
        return -1
    runs.col = run_data
    runs.length = run_data + block + 1
    runs.src = run_data + 2 * (block + 1)
    if g.pad_top == 0 and g.pad_left == 0 and g.hp == g.h and g.wp == g.w:
        g.xpad = g.x
    else:
        xpad = cnnx_alloc_floats(g.images * g.c * g.hp * g.wp)
        if xpad == NULL:
            cnnx_free_floats(panels)
            free(run_data)
            return -1
        _pad_images(g, xpad)
        g.xpad = xpad
    n0 = 0
    while n0 < g.N:
        count = g.N - n0 if g.N - n0 < block else block
        _pixel_runs(g, n0, count, &runs)
        if n_threads == 1:
            for p in range(n_panels):
                _dw_panel(g, dy, g.N, n0, count, &runs, p * nk, panels, block, dw)
        else:
            for p in prange(n_panels, schedule="static", num_threads=n_threads):
                _dw_panel(g, dy, g.N, n0, count, &runs, p * nk, panels + threadid() * panel_floats, block, dw)
        n0 += count
    cnnx_free_floats(panels)
    cnnx_free_floats(xpad)
    free(run_data)
    return 0


# --- The convolution forward with a 2x2 / stride-2 max-pool fused into the tile stores ----------
#
# For inference (``conv2d(max_pool_2x2=True)``): the GEMM's columns are only the output pixels the
# floor pool keeps (rows and columns 0 : 2 * ph, 0 : 2 * pw), ordered so that one NR-wide tile
# holds whole windows: VW / 2 consecutive windows w0 .. w0 + VW/2 - 1 (numbered image by image,
# pooled row by pooled row), their top pixels (2 per window, output row 2 * py) in the tile's first
# vector and their bottom pixels (row 2 * py + 1) in the second. The packing reads each vector as
# runs of consecutive pixels of one output row, like ``_pack_image_panel``. The tile store takes the
# maximum of the two vectors (top against bottom), adds the bias, then the maximum of adjacent lane
# pairs (left against right), applies the (leaky) ReLU and writes VW / 2 pooled values per row
# straight to the NCHW output. The bias (x -> x + b, rounded) and the leaky ReLU with a slope >= 0
# are monotone non-decreasing, float rounding included, so the maximum commutes with them: these
# are exactly the values of activating all four pixels and pooling afterwards, for a quarter of the
# epilogue, and the pixels the pool drops (an odd last row or column) are never computed. The sums
# themselves are those of the unpooled GEMM (same packing values, K blocks and order); with more
# than one K block, the earlier blocks' sums wait in a per-thread buffer of whole tiles.

cdef extern from *:
    """
    #define CNNX_POOL_WINDOWS (CNNX_VW / 2)  /* windows per tile: NR = 4 * CNNX_POOL_WINDOWS columns */
    static const int CNNX_GEMM_POOL_WINDOWS = CNNX_POOL_WINDOWS;
    #if CNNX_GEMM_VECTOR
    /* max(a, b), NaN when either is NaN (the pooled value of a window holding a NaN is NaN). */
    static inline cnnx_vf cnnx_vmax_nan(cnnx_vf a, cnnx_vf b) {
        cnnx_vi take_a = (a > b) | (a != a);
        return (cnnx_vf)(((cnnx_vi)a & take_a) | ((cnnx_vi)b & ~take_a));
    }
    /* Lanes of two vectors x, y: (x0, x2, ..., y0, y2, ...) and (x1, x3, ..., y1, y3, ...). */
    #if CNNX_VW == 16
      #define CNNX_EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
      #define CNNX_ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
    #elif CNNX_VW == 8
      #define CNNX_EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14
      #define CNNX_ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15
    #else
      #define CNNX_EVEN_LANES 0, 2, 4, 6
      #define CNNX_ODD_LANES 1, 3, 5, 7
    #endif
    #if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
      #define CNNX_EVEN(x, y) __builtin_shufflevector(x, y, CNNX_EVEN_LANES)
      #define CNNX_ODD(x, y) __builtin_shufflevector(x, y, CNNX_ODD_LANES)
    #else
      #define CNNX_EVEN(x, y) __builtin_shuffle(x, y, (cnnx_vi){CNNX_EVEN_LANES})
      #define CNNX_ODD(x, y) __builtin_shuffle(x, y, (cnnx_vi){CNNX_ODD_LANES})
    #endif
    /* Row r of the tile, pooled over its top and bottom pixels, plus the bias: m<r>. */
    #define CNNX_POOL_ROW(r) \\
        cnnx_vf m##r = {0}; \\
        if (r < rows) { \\
            cnnx_vf t0 = c##r##0, t1 = c##r##1; \\
            if (partial) { t0 += cnnx_vload(partial + (r) * CNNX_NR); t1 += cnnx_vload(partial + (r) * CNNX_NR + CNNX_VW); } \\
            m##r = cnnx_vmax_nan(t0, t1); \\
            if (bias) m##r += cnnx_splat(bias[r]); \\
        }
    /* Rows r and s = r + 1 together: their left and right pixels de-interleaved into one vector
       (row r's windows in the low half, row s's in the high half), maximum, activation, store. */
    #define CNNX_POOL_ROW_PAIR(r, s) \\
        if (r < rows) { \\
            CNNX_POOL_ROW(r) CNNX_POOL_ROW(s) \\
            cnnx_vf p = cnnx_vmax_nan(CNNX_EVEN(m##r, m##s), CNNX_ODD(m##r, m##s)); \\
            if (rectify) p = cnnx_vleaky(p, slope); \\
            float lanes[CNNX_VW]; \\
            cnnx_vstore(lanes, p); \\
            memcpy(out + (Py_ssize_t)(r) * ldo, lanes, CNNX_POOL_WINDOWS * sizeof(float)); \\
            if (s < rows) memcpy(out + (Py_ssize_t)(s) * ldo, lanes + CNNX_POOL_WINDOWS, CNNX_POOL_WINDOWS * sizeof(float)); \\
        }
    /* Training: every pixel activated first (slope 1 without activation), then compared as
       max_pool2d does: left against right in each row, then the top row's winner against the
       bottom's; the first maximum (or the first NaN) in row-major order wins. */
    static inline cnnx_vi cnnx_vtakes(cnnx_vf v, cnnx_vf best) { return (v > best) | ((v != v) & (best == best)); }
    static inline cnnx_vf cnnx_vselect(cnnx_vi take, cnnx_vf v, cnnx_vf other) {
        return (cnnx_vf)(((cnnx_vi)v & take) | ((cnnx_vi)other & ~take));
    }
    #define CNNX_POOL_ACT(r) \
        cnnx_vf top##r = {0}, bottom##r = {0}; \
        if (r < rows) { \
            top##r = c##r##0; bottom##r = c##r##1; \
            if (partial) { top##r += cnnx_vload(partial + (r) * CNNX_NR); bottom##r += cnnx_vload(partial + (r) * CNNX_NR + CNNX_VW); } \
            if (bias) { cnnx_vf br = cnnx_splat(bias[r]); top##r += br; bottom##r += br; } \
            top##r = cnnx_vleaky(top##r, slope); bottom##r = cnnx_vleaky(bottom##r, slope); \
        }
    #define CNNX_POOL_ARGMAX_PAIR(r, s) \
        if (r < rows) { \
            CNNX_POOL_ACT(r) CNNX_POOL_ACT(s) \
            cnnx_vf tl = CNNX_EVEN(top##r, top##s), tr = CNNX_ODD(top##r, top##s); \
            cnnx_vf bl = CNNX_EVEN(bottom##r, bottom##s), br_ = CNNX_ODD(bottom##r, bottom##s); \
            cnnx_vi right_top = cnnx_vtakes(tr, tl), right_bottom = cnnx_vtakes(br_, bl); \
            cnnx_vf m_top = cnnx_vselect(right_top, tr, tl), m_bottom = cnnx_vselect(right_bottom, br_, bl); \
            cnnx_vi take_bottom = cnnx_vtakes(m_bottom, m_top); /* the top wins ties */ \
            cnnx_vi two = {0}; two += 2; \
            cnnx_vi k = (take_bottom & (two - right_bottom)) | (~take_bottom & -right_top); \
            cnnx_vf p = cnnx_vselect(take_bottom, m_bottom, m_top); \
            float lanes[CNNX_VW]; int codes[CNNX_VW]; \
            cnnx_vstore(lanes, p); memcpy(codes, &k, sizeof k); \
            memcpy(out + (Py_ssize_t)(r) * ldo, lanes, CNNX_POOL_WINDOWS * sizeof(float)); \
            memcpy(code + (Py_ssize_t)(r) * ldo, codes, CNNX_POOL_WINDOWS * sizeof(int)); \
            if (s < rows) { \
                memcpy(out + (Py_ssize_t)(s) * ldo, lanes + CNNX_POOL_WINDOWS, CNNX_POOL_WINDOWS * sizeof(float)); \
                memcpy(code + (Py_ssize_t)(s) * ldo, codes + CNNX_POOL_WINDOWS, CNNX_POOL_WINDOWS * sizeof(int)); \
            } \
        }
    #endif

    /* The training form of cnnx_sgemm_micro_pool2x2: the activated pooled values and each window's
       argmax code[r * ldo + i] = 2 * dy + dx, as gemm_to_nchw_max_pool_2x2_argmax computes them
       (slope 1: no activation). */
    static void cnnx_sgemm_micro_pool2x2_argmax(Py_ssize_t kc, const float *restrict a, const float *restrict b,
                                                const float *partial, float *out, int *code, Py_ssize_t ldo,
                                                int rows, const float *bias, float slope) {
    #if CNNX_GEMM_VECTOR
        CNNX_TILE_SUMS
        CNNX_POOL_ARGMAX_PAIR(0, 1) CNNX_POOL_ARGMAX_PAIR(2, 3) CNNX_POOL_ARGMAX_PAIR(4, 5)
        CNNX_ROW_PAIRS_HI(CNNX_POOL_ARGMAX_PAIR)
    #else
        float acc[CNNX_MR][CNNX_NR] = {{0}};
        for (Py_ssize_t k = 0; k < kc; ++k) {
            for (int r = 0; r < CNNX_MR; ++r)
                for (int j = 0; j < CNNX_NR; ++j)
                    acc[r][j] += a[r] * b[j];
            a += CNNX_MR;
            b += CNNX_NR;
        }
        for (int r = 0; r < rows; ++r) {
            float v[CNNX_NR];
            for (int j = 0; j < CNNX_NR; ++j) {
                float t = acc[r][j] + (partial ? partial[r * CNNX_NR + j] : 0.0f) + (bias ? bias[r] : 0.0f);
                float scaled = t * slope;
                v[j] = t > 0 ? t : scaled;
            }
            for (int i = 0; i < CNNX_POOL_WINDOWS; ++i) {
                float tl = v[2 * i], tr = v[2 * i + 1], bl = v[CNNX_VW + 2 * i], br = v[CNNX_VW + 2 * i + 1];
                int right_top = tr > tl || (tr != tr && tl == tl), right_bottom = br > bl || (br != br && bl == bl);
                float m_top = right_top ? tr : tl, m_bottom = right_bottom ? br : bl;
                int take_bottom = m_bottom > m_top || (m_bottom != m_bottom && m_top == m_top);
                out[(Py_ssize_t)r * ldo + i] = take_bottom ? m_bottom : m_top;
                code[(Py_ssize_t)r * ldo + i] = take_bottom ? 2 + right_bottom : right_top;
            }
        }
    #endif
    }

    /* One MR x NR tile of the pooled-order GEMM (a: kc x MR packed, b: kc x NR packed in the
       order above), plus `partial` (the earlier K blocks' sums, MR x NR, row stride NR) when given,
       max-pooled to MR x VW/2 windows, + bias[r] and the leaky ReLU when given: out[r * ldo + i]
       for the first `rows` rows. */
    static void cnnx_sgemm_micro_pool2x2(Py_ssize_t kc, const float *restrict a, const float *restrict b,
                                         const float *partial, float *out, Py_ssize_t ldo, int rows,
                                         const float *bias, int rectify, float slope) {
    #if CNNX_GEMM_VECTOR
        CNNX_TILE_SUMS
        CNNX_POOL_ROW_PAIR(0, 1) CNNX_POOL_ROW_PAIR(2, 3) CNNX_POOL_ROW_PAIR(4, 5)
        CNNX_ROW_PAIRS_HI(CNNX_POOL_ROW_PAIR)
    #else
        float acc[CNNX_MR][CNNX_NR] = {{0}};
        for (Py_ssize_t k = 0; k < kc; ++k) {
            for (int r = 0; r < CNNX_MR; ++r)
                for (int j = 0; j < CNNX_NR; ++j)
                    acc[r][j] += a[r] * b[j];
            a += CNNX_MR;
            b += CNNX_NR;
        }
        for (int r = 0; r < rows; ++r) {
            float m[CNNX_VW];
            for (int j = 0; j < CNNX_VW; ++j) {
                float top = acc[r][j] + (partial ? partial[r * CNNX_NR + j] : 0.0f);
                float bottom = acc[r][CNNX_VW + j] + (partial ? partial[r * CNNX_NR + CNNX_VW + j] : 0.0f);
                m[j] = (top > bottom || top != top ? top : bottom) + (bias ? bias[r] : 0.0f);
            }
            for (int i = 0; i < CNNX_POOL_WINDOWS; ++i) {
                float left = m[2 * i], right = m[2 * i + 1];
                float v = left > right || left != left ? left : right;
                if (rectify) v = v > 0 ? v : v * slope;
                out[(Py_ssize_t)r * ldo + i] = v;
            }
        }
    #endif
    }
    """
    const int CNNX_GEMM_POOL_WINDOWS
    void cnnx_sgemm_micro_pool2x2_argmax(Py_ssize_t kc, const float* a, const float* b, const float* partial,
                                         float* out, int* code, Py_ssize_t ldo, int rows, const float* bias,
                                         float slope) noexcept nogil
    void cnnx_sgemm_micro_pool2x2(Py_ssize_t kc, const float* a, const float* b, const float* partial, float* out,
                                  Py_ssize_t ldo, int rows, const float* bias, int rectify,
                                  float slope) noexcept nogil


cdef Py_ssize_t _pool_partial_floats(const _ConvGemm* g) noexcept nogil:
    """Floats of the buffer that keeps one NC block's sums between K blocks: all MR panels x NC."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR
    return ((g.M + mr - 1) // mr) * mr * g.nc


cdef void _pack_pool_panel(const _ConvGemm* g, const _PoolTiles* pool, Py_ssize_t n_start, Py_ssize_t k0,
                           Py_ssize_t kc, float* bp) noexcept nogil:
    """One KC x NR panel of the pooled-order implicit im2col matrix, rows ``k0 : k0 + kc``: the windows
    ``n_start // 4 ...`` (VW / 2 of them), top pixels in columns ``0 : VW``, bottom pixels in
    ``VW : NR`` (left, right of each window in turn), read from the padded images. Columns of
    windows past the last are zero."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR, vw = CNNX_GEMM_VW, per_tile = CNNX_GEMM_POOL_WINDOWS
    cdef Py_ssize_t pq = pool.ph * pool.pw
    cdef Py_ssize_t w0 = n_start // 4
    cdef Py_ssize_t valid = pool.windows - w0 if pool.windows - w0 < per_tile else per_tile
    cdef Py_ssize_t plane = g.hp * g.wp
    # Each half's windows as runs of one pooled row of one image: 2 * run consecutive pixels of
    # output row 2 * py + half. At most VW / 2 runs per half.
    cdef Py_ssize_t seg_col[64]
    cdef Py_ssize_t seg_len[64]
    cdef Py_ssize_t seg_src[64]
    cdef Py_ssize_t n_segs = 0, half, j, w, image, q, py, px, run
    for half in range(2):
        j = 0
        while j < valid:
            w = w0 + j
            image = w // pq
            q = w - image * pq
            py = q // pool.pw
            px = q - py * pool.pw
            run = pool.pw - px if pool.pw - px < valid - j else valid - j
            seg_col[n_segs] = half * vw + 2 * j
            seg_len[n_segs] = 2 * run
            seg_src[n_segs] = image * g.c * plane + (2 * py + half) * g.sy * g.wp + 2 * px * g.sx
            n_segs += 1
            j += run
    cdef Py_ssize_t gap = vw - 2 * valid
    cdef Py_ssize_t k, s, t, ci, ki, kj, offset
    cdef float* dst
    cdef const float* src
    cdef const float* top
    cdef const float* bottom
    ci = k0 // (g.kh * g.kw)
    ki = (k0 // g.kw) % g.kh
    kj = k0 % g.kw
    if g.sx == 1 and n_segs == 2 and seg_len[0] == vw and seg_len[1] == vw:
        # The common case (pooled rows of a multiple of VW / 2 windows): each half is one whole
        # vector of one output row, copied without the run loop.
        top = g.xpad + seg_src[0]
        bottom = g.xpad + seg_src[1]
        for k in range(kc):
            dst = bp + k * nr
            offset = ci * plane + ki * g.wp + kj
            cnnx_copy_run(dst, top + offset, CNNX_GEMM_VW)
            cnnx_copy_run(dst + vw, bottom + offset, CNNX_GEMM_VW)
            kj += 1
            if kj == g.kw:
                kj = 0
                ki += 1
                if ki == g.kh:
                    ki = 0
                    ci += 1
        return
    for k in range(kc):
        dst = bp + k * nr
        offset = ci * plane + ki * g.wp + kj  # row k's tap, relative to each window's corner
        if g.sx == 1:
            for s in range(n_segs):
                cnnx_copy_run(dst + seg_col[s], g.xpad + seg_src[s] + offset, seg_len[s])
        else:
            for s in range(n_segs):
                src = g.xpad + seg_src[s] + offset
                for t in range(seg_len[s]):
                    dst[seg_col[s] + t] = src[t * g.sx]
        if gap > 0:
            cnnx_zero_run(dst + 2 * valid, gap)
            cnnx_zero_run(dst + vw + 2 * valid, gap)
        kj += 1
        if kj == g.kw:
            kj = 0
            ki += 1
            if ki == g.kh:
                ki = 0
                ci += 1


cdef void _store_pool_tile(const _ConvGemm* g, const _PoolTiles* pool, Py_ssize_t o0, Py_ssize_t n_start,
                           const float* a, const float* b, Py_ssize_t kc, const float* partial) noexcept nogil:
    """The last K block of tile rows ``o0 : o0 + MR``, columns ``n_start : n_start + NR``, pooled
    into the NCHW output: straight there when its VW / 2 windows are consecutive in one image's
    plane, else through a buffer."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, per_tile = CNNX_GEMM_POOL_WINDOWS
    cdef int rows = <int>(g.M - o0 if g.M - o0 < mr else mr)
    cdef const float* bias = (g.bias + o0) if g.bias != NULL else NULL
    cdef Py_ssize_t pq = pool.ph * pool.pw
    cdef Py_ssize_t w0 = n_start // 4
    cdef Py_ssize_t q = w0 % pq
    cdef Py_ssize_t at = o0 * g.row_stride + (w0 // pq) * g.image_stride + q
    # Training always activates (slope 1 without an activation), as the argmax pass it replaces.
    cdef float slope = g.slope if g.rectify else 1
    if w0 + per_tile <= pool.windows and q + per_tile <= pq:
        if pool.code == NULL:
            cnnx_sgemm_micro_pool2x2(kc, a, b, partial, g.out + at, g.row_stride, rows, bias, g.rectify, g.slope)
        else:
            cnnx_sgemm_micro_pool2x2_argmax(kc, a, b, partial, g.out + at, pool.code + at, g.row_stride, rows,
                                            bias, slope)
        return
    cdef float tile[16 * 32]  # MR x VW / 2, MR <= 16 and VW <= 64 in every build
    cdef int tile_code[16 * 32]
    cdef Py_ssize_t r, j, w, valid = pool.windows - w0
    if valid > per_tile:
        valid = per_tile
    if pool.code == NULL:
        cnnx_sgemm_micro_pool2x2(kc, a, b, partial, tile, per_tile, rows, bias, g.rectify, g.slope)
    else:
        cnnx_sgemm_micro_pool2x2_argmax(kc, a, b, partial, tile, tile_code, per_tile, rows, bias, slope)
    for j in range(valid):
        w = w0 + j
        at = o0 * g.row_stride + (w // pq) * g.image_stride + w % pq
        for r in range(rows):
            g.out[at + r * g.row_stride] = tile[r * per_tile + j]
            if pool.code != NULL:
                pool.code[at + r * g.row_stride] = tile_code[r * per_tile + j]


cdef void _gemm_pool_block(const _ConvGemm* g, const _PoolTiles* pool, Py_ssize_t block, float* bp) noexcept nogil:
    """``_gemm_block`` for the pooled-order columns: every K block but the last leaves its sums in
    the buffer after the B panels (whole MR x NR tiles), the last one pools them into the output."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    cdef Py_ssize_t n0 = block * g.nc
    cdef Py_ssize_t n1 = n0 + g.nc if n0 + g.nc < g.N else g.N
    cdef Py_ssize_t n_panels = (n1 - n0 + nr - 1) // nr
    cdef float* partial = bp + g.kc_max * ((g.nc + nr - 1) // nr) * nr
    cdef Py_ssize_t k0, kc, panel, o0
    cdef const float* a
    cdef float* tile_sums
    k0 = 0
    while k0 < g.K:
        kc = g.K - k0 if g.K - k0 < g.kc_max else g.kc_max
        for panel in range(n_panels):
            _pack_pool_panel(g, pool, n0 + panel * nr, k0, kc, bp + panel * kc * nr)
        o0 = 0
        while o0 < g.M:
            a = g.a_packed + (o0 // mr) * g.K * mr + k0 * mr
            for panel in range(n_panels):
                tile_sums = partial + ((o0 // mr) * n_panels + panel) * mr * nr
                if k0 + kc < g.K:
                    cnnx_sgemm_micro(kc, a, bp + panel * kc * nr, tile_sums, nr, <int>mr, k0 > 0, NULL, 0, 0)
                else:
                    _store_pool_tile(g, pool, o0, n0 + panel * nr, a, bp + panel * kc * nr, kc,
                                     tile_sums if k0 > 0 else NULL)
            o0 += mr
        k0 += kc


def conv_gemm_nchw_max_pool_2x2(
    const float[:, :, :, ::1] x,
    Py_ssize_t first,
    Py_ssize_t count,
    const float[:, ::1] weight,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    const float[::1] bias,
    bint has_bias,
    bint leaky_relu,
    double negative_slope,
    float[:, :, ::1] y,
    int n_threads,
    Py_ssize_t group=0,
):
    """``conv_gemm_nchw`` followed by the floor 2x2 / stride-2 max-pool, in one pass (inference):
    ``y[first : first + count]`` of shape ``(n, out_c, (out_h // 2) * (out_w // 2))`` receives
    ``max_pool2d(leaky_relu(conv(x) + bias), 2)`` with only the pixels the pool keeps computed and
    no full-size output written. ``negative_slope`` must be >= 0 (the pool commutes with a
    monotone activation only). ``group`` as in ``conv_gemm_nchw``. The caller checks the geometry
    of ``x`` and ``weight``."""
    _conv_gemm_pooled(x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w, bias, has_bias,
                      leaky_relu, negative_slope, y, NULL, n_threads, group)


def conv_gemm_nchw_max_pool_2x2_argmax(
    const float[:, :, :, ::1] x,
    Py_ssize_t first,
    Py_ssize_t count,
    const float[:, ::1] weight,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    const float[::1] bias,
    bint has_bias,
    bint leaky_relu,
    double negative_slope,
    float[:, :, ::1] y,
    int[:, :, ::1] argmax,
    int n_threads,
    Py_ssize_t group=0,
):
    """The training form of ``conv_gemm_nchw_max_pool_2x2``: also ``argmax`` (shaped as ``y``), each
    window's winner ``2 * dy + dx``, with the values and codes of ``conv_gemm_columns`` +
    ``gemm_to_nchw_max_pool_2x2_argmax`` (all four pixels activated, then compared; the first
    maximum or the first NaN in row-major order wins)."""
    if argmax.shape[0] != y.shape[0] or argmax.shape[1] != y.shape[1] or argmax.shape[2] != y.shape[2]:
        raise ValueError(f"Expected argmax of y's shape ({y.shape[0]}, {y.shape[1]}, {y.shape[2]}), received: "
                         f"({argmax.shape[0]}, {argmax.shape[1]}, {argmax.shape[2]})")
    _conv_gemm_pooled(x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w, bias, has_bias,
                      leaky_relu, negative_slope, y, &argmax[0, 0, 0] if argmax.shape[0] > 0 and argmax.shape[1] > 0
                      and argmax.shape[2] > 0 else NULL, n_threads, group)


cdef _conv_gemm_pooled(const float[:, :, :, ::1] x, Py_ssize_t first, Py_ssize_t count, const float[:, ::1] weight,
                       Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sy, Py_ssize_t sx, Py_ssize_t pad_top,
                       Py_ssize_t pad_left, Py_ssize_t out_h, Py_ssize_t out_w, const float[::1] bias, bint has_bias,
                       bint leaky_relu, double negative_slope, float[:, :, ::1] y, int* code, int n_threads,
                       Py_ssize_t group):
    cdef _ConvGemm g
    cdef _PoolTiles pool
    if weight.shape[1] == 0:
        raise ValueError("Expected a weight with at least one column (c*kh*kw > 0), received: shape (%d, 0)" % weight.shape[0])
    if leaky_relu and not negative_slope >= 0:
        raise ValueError(f"Expected negative_slope >= 0 for the pooled leaky_relu, received: {negative_slope!r}")
    pool.ph, pool.pw = out_h // 2, out_w // 2
    if (y.shape[0] < first + count or y.shape[1] != weight.shape[0] or y.shape[2] != pool.ph * pool.pw
            or (has_bias and bias.shape[0] < weight.shape[0])):
        raise ValueError(f"Expected y of shape (>= {first + count}, {weight.shape[0]}, {pool.ph * pool.pw}) and a bias "
                         f"of {weight.shape[0]}, received: y ({y.shape[0]}, {y.shape[1]}, {y.shape[2]}), "
                         f"bias ({bias.shape[0]},)")
    if count <= 0 or y.shape[1] == 0 or pool.ph == 0 or pool.pw == 0:
        return
    _conv_gemm_setup(&g, x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w)
    pool.windows = count * pool.ph * pool.pw
    pool.code = code + first * y.shape[1] * y.shape[2] if code != NULL else NULL  # addressed as g.out
    g.P = 4 * pool.ph * pool.pw  # the GEMM's columns: 4 pixels per window
    g.N = count * g.P
    g.out = &y[first, 0, 0]
    g.row_stride = pool.ph * pool.pw
    g.image_stride = g.M * pool.ph * pool.pw
    g.bias = &bias[0] if has_bias else NULL
    g.rectify = leaky_relu
    g.slope = <float>negative_slope
    cdef int status
    with nogil:
        status = _conv_gemm_groups(&g, &pool, group, n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the packed GEMM panels")


# --- A convolution's backward by groups of images, inside one compiled call ---------------------
#
# What functional._conv_backward_groups does per group with Python worker threads, for the packed
# float32 path (one convolution group, no dilation, the implicit weight gradient, the packed dcols
# GEMM): the output gradient into GEMM layout (through the fused activation, and the pool's
# argmax where there is one) with each image's bias-gradient sums, the group's weight gradient,
# then dcols = W^T @ dY and col2im into dx. Here each group is one thread's task in an OpenMP loop
# (dynamic schedule) that never takes the GIL: with worker threads, the four kernel calls of each
# group and the Python between them passed the GIL back and forth, and on a virtual machine whose
# idle vCPUs halt every wait for it cost a wake-up. Same kernels, same sums in the same order:
# the results are the Python path's bit for bit.

cdef double _rectified_row(const float* dy, const float* y, float low, Py_ssize_t n, float* out) noexcept nogil:
    """``out[p] = dy[p]`` times the leaky ReLU's derivative read from its output (``low`` where
    ``y <= 0``; ``low`` 1: no activation); returns the row's sum, added in order (``nchw_to_gemm``)."""
    cdef float derivative[2]
    cdef double acc = 0
    cdef float v
    cdef Py_ssize_t p
    derivative[0] = low
    derivative[1] = 1
    for p in range(n):
        v = dy[p] * derivative[y[p] > 0]
        out[p] = v
        acc = acc + v
    return acc


cdef double _unpooled_row(const float* dy, const float* y, const int* code, Py_ssize_t oh, Py_ssize_t out_w,
                          float low, float* out) noexcept nogil:
    """One image-channel plane of ``max_pool_2x2_argmax_to_gemm``: the pooled gradient (times the
    derivative, as ``_rectified_row``) at each window's argmax, zero elsewhere; returns its sum."""
    cdef Py_ssize_t pw = out_w // 2, ph = oh // 2
    cdef Py_ssize_t py, px, cell, k, p
    cdef float derivative[2]
    cdef double acc = 0
    cdef float v
    if CNNX_POOL_SIMD and ph * pw > 0 and _pool_rows_need_chunks(pw):
        return cnnx_unpool2x2_f32(dy, y, code, oh, out_w, ph, pw, low, out)
    derivative[0] = low
    derivative[1] = 1
    for p in range(oh * out_w):
        out[p] = 0
    for py in range(ph):
        for px in range(pw):
            cell = py * pw + px
            v = dy[cell] * derivative[y[cell] > 0]
            k = code[cell] & 3
            out[(2 * py + k // 2) * out_w + 2 * px + k % 2] = v
            acc = acc + v
    return acc


cdef struct _ConvBackward:
    # One backward call: the forward's input and output gradient, the weight, and where each
    # group's results go. Planes are (image, channel) rows of `plane` floats.
    _ConvGemm geo          # the whole batch's geometry (as for the forward)
    const float* dy        # (n, out_c, dy_plane): the output gradient (pooled with `code`)
    const float* y         # the forward's (activated, pooled) output, shaped as dy
    const int* code        # the pool's argmax codes, shaped as dy; NULL: no pool
    Py_ssize_t dy_plane
    float low              # the activation's derivative where y <= 0 (1: none)
    double* dbias          # (n, out_c) per-image bias-gradient sums
    float* dweight_parts   # (groups, out_c, K)
    float* dx              # (n, c, h, w), or NULL
    float* scratch         # per thread: dY (out_c x group x P) then dcols (K x group x P)
    Py_ssize_t scratch_floats, group


cdef int _backward_group(const _ConvBackward* b, Py_ssize_t index, float* scratch) noexcept nogil:
    cdef const _ConvGemm* whole = &b.geo
    cdef Py_ssize_t first = index * b.group
    cdef Py_ssize_t m = min(b.group, whole.images - first)
    cdef Py_ssize_t oc = whole.M, K = whole.K, P = whole.P
    cdef Py_ssize_t j, o, ci, ki, kj, row
    cdef float* dy_gemm = scratch
    cdef float* dcols = scratch + oc * b.group * P
    cdef float* dw = b.dweight_parts + index * oc * K
    cdef _ConvGemm g
    cdef Geometry geo
    cdef TapRange t
    cdef float* plane
    # 1. dY of the group in GEMM layout (out_c, m, P), and each image's bias-gradient sums.
    for j in range(m):
        for o in range(oc):
            row = (first + j) * oc + o
            if b.code != NULL:
                b.dbias[row] = _unpooled_row(b.dy + row * b.dy_plane, b.y + row * b.dy_plane,
                                             b.code + row * b.dy_plane, whole.out_h, whole.out_w, b.low,
                                             dy_gemm + (o * m + j) * P)
            else:
                b.dbias[row] = _rectified_row(b.dy + row * b.dy_plane, b.y + row * b.dy_plane, b.low, P,
                                              dy_gemm + (o * m + j) * P)
    # 2. The group's weight gradient, straight from the images (``conv_weight_grad``).
    memset(dw, 0, oc * K * sizeof(float))
    g = whole[0]
    g.x = whole.x + first * whole.c * whole.h * whole.w
    g.images = m
    g.N = m * P
    if _conv_weight_grad(&g, dy_gemm, dw, 1) != 0:
        return -1
    if b.dx == NULL:
        return 0
    # 3. dcols (K, m * P) = W^T @ dY (the weight read transposed, as ``gemm(w.T, dy, dcols)``).
    g.M, g.K, g.N, g.P = K, oc, m * P, m * P
    g.a_src, g.a_rs, g.a_cs = whole.a_src, 1, K
    g.b_src, g.b_rs, g.b_cs = dy_gemm, m * P, 1
    g.out, g.row_stride, g.image_stride = dcols, m * P, 0
    g.bias, g.rectify, g.slope = NULL, 0, 0
    if _conv_gemm(&g, 1) != 0:
        return -1
    # 4. col2im of the group's images into dx (``col2im_dilated``, dilation 1).
    geo = Geometry(whole.h, whole.w, whole.out_h, whole.out_w, whole.sy, whole.sx, 1, 1, whole.pad_top,
                   whole.pad_left)
    for j in range(m):
        for ci in range(whole.c):
            plane = b.dx + ((first + j) * whole.c + ci) * whole.h * whole.w
            memset(plane, 0, whole.h * whole.w * sizeof(float))
            for ki in range(whole.kh):
                for kj in range(whole.kw):
                    t = _tap_range(ki, kj, &geo)
                    _tap_scatter_add(plane, dcols + ((ci * whole.kh + ki) * whole.kw + kj) * m * P + j * P,
                                     1, &t, &geo)
    return 0


def conv_backward_groups(
    const float[:, :, :, ::1] x,
    const float[:, :, ::1] dy,
    const float[:, :, ::1] y,
    const int[:, :, ::1] argmax,
    bint pooled,
    bint leaky_relu,
    double negative_slope,
    const float[:, ::1] weight,
    Py_ssize_t kh,
    Py_ssize_t kw,
    Py_ssize_t sy,
    Py_ssize_t sx,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    Py_ssize_t group,
    double[:, ::1] dbias_partial,
    float[:, :, ::1] dweight_parts,
    float[:, :, :, ::1] dx,
    bint need_dx,
    float[:, ::1] scratch,
    int n_threads,
):
    """The float32 backward of a plain convolution (``weight (out_c, c*kh*kw)``, no dilation) by
    groups of ``group`` images, one thread each, in one call (see the comment above):
    ``dbias_partial (n, out_c)`` gets each image's bias-gradient sums, ``dweight_parts (groups,
    out_c, c*kh*kw)`` each group's weight gradient, ``dx`` the input gradient when ``need_dx``.
    ``dy`` and ``y`` are ``(n, out_c, pixels)``: the output's gradient and the output itself (read
    for the leaky ReLU with ``negative_slope`` when ``leaky_relu``), pooled 2x2 with ``argmax``
    (its codes, shaped as ``dy``) when ``pooled``. ``scratch`` has one row per thread of at least
    ``(out_c + c*kh*kw) * group * out_h * out_w`` floats. The caller checks the geometry."""
    cdef _ConvBackward b
    cdef Py_ssize_t n = x.shape[0], oc = weight.shape[0], K = weight.shape[1]
    cdef Py_ssize_t P = out_h * out_w
    cdef Py_ssize_t dy_plane = (out_h // 2) * (out_w // 2) if pooled else P
    cdef Py_ssize_t n_groups, i
    cdef int failures = 0
    if group <= 0 or n == 0 or oc == 0 or K == 0 or P == 0:
        raise ValueError("conv_backward_groups: expected at least one image, output channel, tap and pixel")
    n_groups = (n + group - 1) // group
    if n_threads > n_groups:
        n_threads = <int>n_groups
    if n_threads < 1:
        n_threads = 1
    if (dy.shape[0] != n or dy.shape[1] != oc or dy.shape[2] != dy_plane or y.shape[0] != n or y.shape[1] != oc
            or y.shape[2] != dy_plane or (pooled and (argmax.shape[0] != n or argmax.shape[1] != oc
                                                       or argmax.shape[2] != dy_plane))
            or dbias_partial.shape[0] != n or dbias_partial.shape[1] != oc or dweight_parts.shape[0] < n_groups
            or dweight_parts.shape[1] != oc or dweight_parts.shape[2] != K or scratch.shape[0] < n_threads
            or scratch.shape[1] < (oc + K) * group * P or K != x.shape[1] * kh * kw
            or (need_dx and (dx.shape[0] != n or dx.shape[1] != x.shape[1] or dx.shape[2] != x.shape[2]
                             or dx.shape[3] != x.shape[3]))):
        raise ValueError("conv_backward_groups: dy, y, argmax, dbias_partial, dweight_parts, dx or scratch "
                         "do not match x, the weight and the geometry")
    _conv_gemm_setup(&b.geo, x, 0, n, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w)
    b.dy, b.y, b.dy_plane = &dy[0, 0, 0], &y[0, 0, 0], dy_plane
    b.code = &argmax[0, 0, 0] if pooled else NULL
    b.low = <float>negative_slope if leaky_relu else 1
    b.dbias = &dbias_partial[0, 0]
    b.dweight_parts = &dweight_parts[0, 0, 0]
    b.dx = &dx[0, 0, 0, 0] if need_dx else NULL
    b.scratch = &scratch[0, 0]
    b.scratch_floats = scratch.shape[1]
    b.group = group
    with nogil:
        if n_threads == 1:
            for i in range(n_groups):
                failures += _backward_group(&b, i, b.scratch) != 0
        else:
            for i in prange(n_groups, schedule="dynamic", num_threads=n_threads):
                failures += _backward_group(&b, i, b.scratch + threadid() * b.scratch_floats) != 0
    if failures:
        raise MemoryError("cnnx: no memory for the convolution backward's panels")
