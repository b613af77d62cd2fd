# cnnx's packed float32 GEMM for dense layers (included by _ops.pyx after _gemm.pxi, whose
# micro-kernel, vector helpers and blocking constants it reuses).
#
# z (M, N) = act(x (M, K) @ w (N, K)^T + bias (N,)): both operands row-major with K contiguous
# (a dense layer's input rows and its PyTorch-layout weight), so B = w^T is read as rows of w.
# Why not `gemm(x, w.T, z)`: that packs all of A (the whole batch, 6.4 MB for seed-mnist's 256 x
# 6272 input) once per call, and per-call buffers of that size go back to the operating system on
# free (glibc trims / unmaps them), so every call page-faulted them in again, and the freed space
# made the next layers' NumPy arrays fault too (docs/PERFORMANCE_LOG.md). Here every buffer is
# small: one KC x NC block of B (<= CNNX_NC_BYTES) and one MR x KC micro-panel of A (in L1)
# per thread.
#
# Loops (BLIS's), per thread on its own range of rows or columns: NC blocks of outputs -> KC blocks of K ->
# pack the B block -> MR panels of rows: pack the A micro-panel, then one micro-kernel call per NR
# panel of the block. Every z value is the same sum in the same order whatever the thread count. The bias is written into z before
# the first K block (the micro-kernel's own bias runs along its rows, here the samples); the
# (leaky) ReLU is applied by the micro-kernel's store on the last K block.

cdef extern from *:
    """
    typedef struct {
        const float *x; Py_ssize_t ldx;  /* A: row i at x + i * ldx, K floats */
        const float *w; Py_ssize_t ldw;  /* B^T: output j's weights at w + j * ldw, K floats */
        float *z; Py_ssize_t ldz;        /* C: row i at z + i * ldz, N floats */
        Py_ssize_t M, N, K;
        const float *bias;               /* N floats, or NULL */
        int rectify;
        float slope;
    } cnnx_dense;

    /* B panel from `valid` rows of w (one output each), columns k0 .. k0 + kc of them:
       bp[k * NR + j] = w[j * ldw + k]; zero for j >= valid. Blocks of 8 rows x 8 k, so that each
       row is read along its contiguous direction and each panel row is written 8 floats at once. */
    static void cnnx_dense_pack_b(const float *w, Py_ssize_t ldw, Py_ssize_t valid, Py_ssize_t kc,
                                  float *bp) {
        Py_ssize_t j0 = 0, k, j;
        for (; j0 + 8 <= valid; j0 += 8) {
            const float *r0 = w + j0 * ldw;
            for (k = 0; k + 8 <= kc; k += 8) {
                float blk[8][8];
                for (j = 0; j < 8; ++j) memcpy(blk[j], r0 + j * ldw + k, 8 * sizeof(float));
                for (Py_ssize_t t = 0; t < 8; ++t)
                    for (j = 0; j < 8; ++j) bp[(k + t) * CNNX_NR + j0 + j] = blk[j][t];
            }
            for (; k < kc; ++k)
                for (j = 0; j < 8; ++j) bp[k * CNNX_NR + j0 + j] = r0[j * ldw + k];
        }
        for (; j0 < valid; ++j0)
            for (k = 0; k < kc; ++k) bp[k * CNNX_NR + j0] = w[j0 * ldw + k];
        if (valid < CNNX_NR)
            for (k = 0; k < kc; ++k) cnnx_zero_run(bp + k * CNNX_NR + valid, CNNX_NR - valid);
    }

    /* A micro-panel from `rows` rows of x, columns k0 .. k0 + kc: ap[k * MR + r] = x[r * ldx + k];
       zero for r >= rows. Full panels in blocks of 8 k (each row read 8 floats at once). */
    static void cnnx_dense_pack_a(const float *x, Py_ssize_t ldx, int rows, Py_ssize_t kc,
                                  float *ap) {
        Py_ssize_t k = 0;
        if (rows == CNNX_MR) {
            for (; k + 8 <= kc; k += 8) {
                float blk[CNNX_MR][8];
                for (int r = 0; r < CNNX_MR; ++r) memcpy(blk[r], x + r * ldx + k, 8 * sizeof(float));
                for (int t = 0; t < 8; ++t)
                    for (int r = 0; r < CNNX_MR; ++r) ap[(k + t) * CNNX_MR + r] = blk[r][t];
            }
        }
        for (; k < kc; ++k)
            for (int r = 0; r < CNNX_MR; ++r) ap[k * CNNX_MR + r] = r < rows ? x[r * ldx + k] : 0.0f;
    }

    /* One MR x NR tile of z at rows i0.., columns n0.. (`cols` of them valid): accumulate onto z
       when `accumulate`, rectify when `rectify` (the last K block). */
    static void cnnx_dense_tile(const cnnx_dense *d, Py_ssize_t i0, Py_ssize_t n0, Py_ssize_t cols,
                                const float *ap, const float *bp, Py_ssize_t kc, int accumulate,
                                int rectify) {
        int rows = (int)(d->M - i0 < CNNX_MR ? d->M - i0 : CNNX_MR);
        float *c = d->z + i0 * d->ldz + n0;
        if (cols == CNNX_NR) {
            cnnx_sgemm_micro(kc, ap, bp, c, d->ldz, rows, accumulate, NULL, rectify, d->slope);
            return;
        }
        float tile[CNNX_MR * CNNX_NR];
        if (accumulate)
            for (int r = 0; r < rows; ++r) memcpy(tile + r * CNNX_NR, c + r * d->ldz, (size_t)cols * sizeof(float));
        cnnx_sgemm_micro(kc, ap, bp, tile, CNNX_NR, rows, accumulate, NULL, rectify, d->slope);
        for (int r = 0; r < rows; ++r) memcpy(c + r * d->ldz, tile + r * CNNX_NR, (size_t)cols * sizeof(float));
    }

    /* Rows i_begin .. i_end and columns n_begin .. n_end of the product (whole MR panels and NR
       panels but the last), on the calling thread with its own B block `bp` (kc_max x nc floats)
       and A micro-panel `ap` (kc_max x MR). */
    static void cnnx_dense_block(const cnnx_dense *d, Py_ssize_t i_begin, Py_ssize_t i_end,
                                 Py_ssize_t n_begin, Py_ssize_t n_end,
                                 Py_ssize_t kc_max, Py_ssize_t nc, float *bp, float *ap) {
        const Py_ssize_t mr = CNNX_MR, nr = CNNX_NR;
        for (Py_ssize_t n0 = n_begin; n0 < n_end; n0 += nc) {
            Py_ssize_t nb = n_end - n0 < nc ? n_end - n0 : nc;
            Py_ssize_t n_panels = (nb + nr - 1) / nr;
            for (Py_ssize_t k0 = 0; k0 < d->K; k0 += kc_max) {
                Py_ssize_t kc = d->K - k0 < kc_max ? d->K - k0 : kc_max;
                int accumulate = k0 > 0 || d->bias != NULL;
                int rectify = d->rectify && k0 + kc >= d->K;
                for (Py_ssize_t p = 0; p < n_panels; ++p) {
                    Py_ssize_t cols = nb - p * nr < nr ? nb - p * nr : nr;
                    cnnx_dense_pack_b(d->w + (n0 + p * nr) * d->ldw + k0, d->ldw, cols, kc, bp + p * kc * nr);
                }
                for (Py_ssize_t i0 = i_begin; i0 < i_end; i0 += mr) {
                    int rows = (int)(i_end - i0 < mr ? i_end - i0 : mr);
                    cnnx_dense_pack_a(d->x + i0 * d->ldx + k0, d->ldx, rows, kc, ap);
                    for (Py_ssize_t p = 0; p < n_panels; ++p) {
                        Py_ssize_t cols = nb - p * nr < nr ? nb - p * nr : nr;
                        cnnx_dense_tile(d, i0, n0 + p * nr, cols, ap, bp + p * kc * nr, kc, accumulate, rectify);
                    }
                }
            }
        }
    }

    /* The whole product; 0 on success, -1 when out of memory. Each thread takes a contiguous
       range of MR-row panels, or of NR-column panels when the weight is the larger operand, and
       packs what it reads itself: no barrier inside the call (with OpenMP's passive waiting, a
       barrier per K block cost more than packing an operand twice). Splitting the operand that
       is larger means each thread packs only its share of it and all of the smaller one (the
       weight of a 4096 -> 128 layer at batch 64 is twice the input: a row split packed 2 MB per
       thread and ran no faster on 2 threads than on 1). */
    static int cnnx_dense_gemm(const cnnx_dense *d, int n_threads) {
        const Py_ssize_t mr = CNNX_MR, nr = CNNX_NR;
        Py_ssize_t n_kblocks = (d->K + CNNX_KC_MAX - 1) / CNNX_KC_MAX;
        Py_ssize_t kc_max = (d->K + n_kblocks - 1) / n_kblocks;  /* balanced: 576 -> 2 x 288 */
        Py_ssize_t nc = (CNNX_NC_BYTES / (kc_max * (Py_ssize_t)sizeof(float))) / nr * nr;
        if (nc < nr) nc = nr;
        if (nc > (d->N + nr - 1) / nr * nr) nc = (d->N + nr - 1) / nr * nr;
        Py_ssize_t m_panels = (d->M + mr - 1) / mr, n_panels = (d->N + nr - 1) / nr;
        int split_columns = d->N > d->M && n_panels >= n_threads;
        Py_ssize_t panels = split_columns ? n_panels : m_panels;
        if (n_threads > panels) n_threads = (int)panels;
        if (n_threads < 1) n_threads = 1;
        Py_ssize_t per_thread = kc_max * (nc + mr);
        float *buffers = cnnx_alloc_floats(per_thread * n_threads);
        if (buffers == NULL) return -1;
        if (d->bias != NULL)
            for (Py_ssize_t i = 0; i < d->M; ++i) memcpy(d->z + i * d->ldz, d->bias, (size_t)d->N * sizeof(float));
        if (n_threads == 1) {
            cnnx_dense_block(d, 0, d->M, 0, d->N, kc_max, nc, buffers, buffers + kc_max * nc);
        } else {
            Py_ssize_t t;
            #pragma omp parallel for schedule(static) num_threads(n_threads)
            for (t = 0; t < n_threads; ++t) {
                /* Thread t takes panels first .. last - 1 of the split axis. */
                Py_ssize_t first = panels * t / n_threads, last = panels * (t + 1) / n_threads;
                float *bp = buffers + t * per_thread;
                if (split_columns) {
                    Py_ssize_t n_end = last * nr < d->N ? last * nr : d->N;
                    cnnx_dense_block(d, 0, d->M, first * nr, n_end, kc_max, nc, bp, bp + kc_max * nc);
                } else {
                    Py_ssize_t i_end = last * mr < d->M ? last * mr : d->M;
                    cnnx_dense_block(d, first * mr, i_end, 0, d->N, kc_max, nc, bp, bp + kc_max * nc);
                }
            }
        }
        cnnx_free_floats(buffers);
        return 0;
    }
    """
    ctypedef struct cnnx_dense:
        const float* x
        Py_ssize_t ldx
        const float* w
        Py_ssize_t ldw
        float* z
        Py_ssize_t ldz
        Py_ssize_t M, N, K
        const float* bias
        int rectify
        float slope
    int cnnx_dense_gemm(const cnnx_dense* d, int n_threads) noexcept nogil


def dense_gemm(
    const float[:, ::1] x,
    const float[:, ::1] weight,
    const float[::1] bias,
    bint has_bias,
    bint leaky_relu,
    double negative_slope,
    float[:, ::1] z,
    int n_threads,
):
    """``z (n, out) = x (n, in) @ weight (out, in)^T (+ bias) (then leaky ReLU)`` in float32, with
    cnnx's packed GEMM: the weight read in its PyTorch layout (no transposed copy), bias and
    activation applied in the tile stores. ``negative_slope`` 0 is ReLU. ``n_threads`` splits the
    rows, or the outputs when the weight is larger than ``x``; the values do not depend on it. Overwrites ``z``."""
    cdef cnnx_dense d
    if x.shape[1] != weight.shape[1] or z.shape[0] != x.shape[0] or z.shape[1] != weight.shape[0] \
            or (has_bias and bias.shape[0] != weight.shape[0]):
        raise ValueError(f"Expected x (n, in), weight (out, in), bias (out,), z (n, out), received: "
                         f"x ({x.shape[0]}, {x.shape[1]}), weight ({weight.shape[0]}, {weight.shape[1]}), "
                         f"bias ({bias.shape[0]},), z ({z.shape[0]}, {z.shape[1]})")
    if z.shape[0] == 0 or z.shape[1] == 0:
        return
    if x.shape[1] == 0:  # an empty sum: the bias (or zero), activated
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                v = bias[j] if has_bias else 0.0
                z[i, j] = v if (not leaky_relu or v > 0) else <float>(v * negative_slope)
        return
    d.x = &x[0, 0]
    d.ldx = x.shape[1]
    d.w = &weight[0, 0]
    d.ldw = weight.shape[1]
    d.z = &z[0, 0]
    d.ldz = z.shape[1]
    d.M, d.N, d.K = z.shape[0], z.shape[1], x.shape[1]
    d.bias = &bias[0] if has_bias else NULL
    d.rectify = leaky_relu
    d.slope = <float>negative_slope
    cdef int status
    with nogil:
        status = cnnx_dense_gemm(&d, n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the dense GEMM's panels")
