# Winograd F(2x2, 3x3) for float32 3x3 stride-1 convolutions (included by _ops.pyx after _gemm.pxi,
# whose micro-kernel, vector helpers and aligned buffers it uses).
#
# Each 2x2 block of outputs ("tile") of one output channel is A^T [sum_c U_c * V_c] A, with
# U_c = G w_c G^T (the 3x3 kernel of input channel c as a 4x4 matrix) and V_c = B^T d_c B (the
# tile's 4x4 input window): 16 products per tile and channel instead of 36, i.e. 16 independent
# GEMMs (one per position xi of the 4x4 matrices) of (out_c, c) @ (c, tiles).
#
# The earlier attempt (docs/INTERNALS.md) wrote all 16 product planes of a group of images and
# read them back from L3 in a separate output transform. Here everything stays in cache:
# - U is transformed once per call straight into the micro-kernel's packed-A layout (one packed A
#   of MR-row panels per xi, its leading dimension padded off a power of two);
# - the tiles are processed in blocks (a multiple of NR tiles, sized so that the block's V, 16 x c
#   x tiles floats, stays in L2); the input transform writes V in packed-B layout (per xi: c rows
#   of NR tiles per panel), vectorised over NR / 2 consecutive tiles of a tile row;
# - for one MR panel of output channels and one NR panel of tiles, the 16 micro-kernel calls write
#   their MR x NR products to a 16-tile buffer in L1, and the output transform reads them back at
#   once, adds the bias, applies the (leaky) ReLU and writes NCHW rows, or, for a fused 2x2 max-pool
#   (each tile IS a pool window), the pooled value (and the argmax, for training).
# The tiles' grid is the output's (ceil(out / 2), a last partial row / column clipped), or with the
# pool the pooled output's (out // 2: the pixels the floor pool drops are never computed).
# Threads split the blocks; every output is the same sums in the same order whatever the split.
# The input gradient is the same kernel (``winograd_conv_input_grad``); the weight gradient, at the
# end of this file, is the transposed algebra with the tiles as the GEMMs' K.

cdef extern from *:
    """
    /* V's bytes per block: the block's tiles = this / (16 * c * 4), a multiple of NR. */
    #ifndef CNNX_WINO_V_BYTES
      #define CNNX_WINO_V_BYTES (512 * 1024)
    #endif
    #define CNNX_WINO_MAX_BLOCK (16 * CNNX_NR)
    /* Padding of the 16 planes' leading dimensions (floats): consecutive xi never alias in L1. */
    #define CNNX_WINO_PAD 16
    static const int CNNX_GEMM_WINO_V_BYTES = CNNX_WINO_V_BYTES;
    static const int CNNX_GEMM_WINO_MAX_BLOCK = CNNX_WINO_MAX_BLOCK;
    static const int CNNX_GEMM_WINO_PAD = CNNX_WINO_PAD;

    /* Ask for the cache lines of n floats from p (the next channel's rows, while this one's are
       transformed). */
    static inline void cnnx_prefetch_floats(const float *p, Py_ssize_t n) {
    #if defined(__GNUC__) || defined(__clang__)
        for (Py_ssize_t t = 0; t < n; t += 16) __builtin_prefetch(p + t);
        __builtin_prefetch(p + n - 1);
    #endif
    }

    /* U = G g G^T of one 3x3 kernel g (row-major), in double, rounded once: u[4 * i + j]. */
    static void cnnx_wino_kernel(const float *g, float *u) {
        double t[4][3];
        for (int j = 0; j < 3; ++j) {
            double a = g[j], b = g[3 + j], c = g[6 + j];
            t[0][j] = a; t[1][j] = 0.5 * (a + b + c); t[2][j] = 0.5 * (a - b + c); t[3][j] = c;
        }
        for (int i = 0; i < 4; ++i) {
            double a = t[i][0], b = t[i][1], c = t[i][2];
            u[4 * i + 0] = (float)a; u[4 * i + 1] = (float)(0.5 * (a + b + c));
            u[4 * i + 2] = (float)(0.5 * (a - b + c)); u[4 * i + 3] = (float)c;
        }
    }

    #if CNNX_GEMM_VECTOR
    /* Lanes interleaving two vectors x, y: (x0, y0, x1, y1, ...) low half, then high half. */
    #if CNNX_VW == 16
      #define CNNX_ZIP_LO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
      #define CNNX_ZIP_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
    #elif CNNX_VW == 8
      #define CNNX_ZIP_LO 0, 8, 1, 9, 2, 10, 3, 11
      #define CNNX_ZIP_HI 4, 12, 5, 13, 6, 14, 7, 15
    #else
      #define CNNX_ZIP_LO 0, 4, 1, 5
      #define CNNX_ZIP_HI 2, 6, 3, 7
    #endif
    #if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
      #define CNNX_ZIP_LOW(x, y) __builtin_shufflevector(x, y, CNNX_ZIP_LO)
      #define CNNX_ZIP_HIGH(x, y) __builtin_shufflevector(x, y, CNNX_ZIP_HI)
    #else
      #define CNNX_ZIP_LOW(x, y) __builtin_shuffle(x, y, (cnnx_vi){CNNX_ZIP_LO})
      #define CNNX_ZIP_HIGH(x, y) __builtin_shuffle(x, y, (cnnx_vi){CNNX_ZIP_HI})
    #endif
    #endif

    /* Input transform of n <= VW consecutive tiles of one tile row: strip holds their 4 input rows
       (row stride ws; the first tile's window starts at column 0, readable up to column 2 VW + 2);
       V = B^T d B goes to v[xi * xs + t] for xi = 4 i + j, tiles t < n. */
    static void cnnx_wino_input(const float *strip, Py_ssize_t ws, float *v, Py_ssize_t xs, int n) {
    #if CNNX_GEMM_VECTOR
        cnnx_vf r[4][4];
        for (int i = 0; i < 4; ++i) {
            const float *row = strip + i * ws;
            cnnx_vf a = cnnx_vload(row), b = cnnx_vload(row + CNNX_VW);
            cnnx_vf c = cnnx_vload(row + 2), d = cnnx_vload(row + 2 + CNNX_VW);
            /* The tiles' columns 2t, 2t + 1, 2t + 2, 2t + 3. */
            cnnx_vf x0 = CNNX_EVEN(a, b), x1 = CNNX_ODD(a, b), x2 = CNNX_EVEN(c, d), x3 = CNNX_ODD(c, d);
            r[i][0] = x0 - x2; r[i][1] = x1 + x2; r[i][2] = x2 - x1; r[i][3] = x1 - x3;
        }
        for (int j = 0; j < 4; ++j) {
            cnnx_vf t[4] = {r[0][j] - r[2][j], r[1][j] + r[2][j], r[2][j] - r[1][j], r[1][j] - r[3][j]};
            for (int i = 0; i < 4; ++i) {
                float *dst = v + (4 * i + j) * xs;
                if (n == CNNX_VW) {
                    cnnx_vstore(dst, t[i]);
                } else {
                    float lanes[CNNX_VW];
                    cnnx_vstore(lanes, t[i]);
                    cnnx_copy_run(dst, lanes, n);
                }
            }
        }
    #else
        for (int t = 0; t < n; ++t) {
            float r[4][4];
            for (int i = 0; i < 4; ++i) {
                const float *row = strip + i * ws + 2 * t;
                r[i][0] = row[0] - row[2]; r[i][1] = row[1] + row[2];
                r[i][2] = row[2] - row[1]; r[i][3] = row[1] - row[3];
            }
            for (int j = 0; j < 4; ++j) {
                v[(0 + j) * xs + t] = r[0][j] - r[2][j];
                v[(4 + j) * xs + t] = r[1][j] + r[2][j];
                v[(8 + j) * xs + t] = r[2][j] - r[1][j];
                v[(12 + j) * xs + t] = r[1][j] - r[3][j];
            }
        }
    #endif
    }

    /* Output transform of one output channel's row of a tile panel: m holds the NR products of
       position xi at m[xi * ms]; y = A^T m A + bias, then per mode:
       0: the (leaky) ReLU when rectify; top[2 t], top[2 t + 1] = tile t's top output row, bottom[..]
          its bottom row;
       1: pooled[t] = the (leaky) ReLU of the maximum of the 4 outputs (NaN if any is NaN): the
          bias and the activation (slope >= 0) are monotone, so they commute with the maximum;
       2: each output activated (slope 1 without an activation), then the 2x2 max-pool's value and
          argmax 2 * dy + dx as max_pool2d picks it (the first maximum or the first NaN in
          row-major order): pooled[t], code[t]. */
    static void cnnx_wino_output(const float *m, Py_ssize_t ms, int mode, float bias, int rectify, float slope,
                                 float *top, float *bottom, float *pooled, int *code) {
    #if CNNX_GEMM_VECTOR
        for (int h = 0; h < CNNX_NR / CNNX_VW; ++h) {
            const float *mh = m + h * CNNX_VW;
            cnnx_vf s0[4], s1[4];
            for (int j = 0; j < 4; ++j) {
                cnnx_vf m0 = cnnx_vload(mh + j * ms), m1 = cnnx_vload(mh + (4 + j) * ms);
                cnnx_vf m2 = cnnx_vload(mh + (8 + j) * ms), m3 = cnnx_vload(mh + (12 + j) * ms);
                s0[j] = m0 + m1 + m2; s1[j] = m1 - m2 - m3;
            }
            cnnx_vf y00 = s0[0] + s0[1] + s0[2], y01 = s0[1] - s0[2] - s0[3];
            cnnx_vf y10 = s1[0] + s1[1] + s1[2], y11 = s1[1] - s1[2] - s1[3];
            cnnx_vf b = cnnx_splat(bias);
            if (mode == 1) {
                cnnx_vf p = cnnx_vmax_nan(cnnx_vmax_nan(y00, y01), cnnx_vmax_nan(y10, y11)) + b;
                if (rectify) p = cnnx_vleaky(p, slope);
                cnnx_vstore(pooled + h * CNNX_VW, p);
                continue;
            }
            y00 += b; y01 += b; y10 += b; y11 += b;
            if (rectify) {
                y00 = cnnx_vleaky(y00, slope); y01 = cnnx_vleaky(y01, slope);
                y10 = cnnx_vleaky(y10, slope); y11 = cnnx_vleaky(y11, slope);
            }
            if (mode == 0) {
                cnnx_vstore(top + 2 * h * CNNX_VW, CNNX_ZIP_LOW(y00, y01));
                cnnx_vstore(top + (2 * h + 1) * CNNX_VW, CNNX_ZIP_HIGH(y00, y01));
                cnnx_vstore(bottom + 2 * h * CNNX_VW, CNNX_ZIP_LOW(y10, y11));
                cnnx_vstore(bottom + (2 * h + 1) * CNNX_VW, CNNX_ZIP_HIGH(y10, y11));
                continue;
            }
            cnnx_vi right_top = cnnx_vtakes(y01, y00), right_bottom = cnnx_vtakes(y11, y10);
            cnnx_vf m_top = cnnx_vselect(right_top, y01, y00), m_bottom = cnnx_vselect(right_bottom, y11, y10);
            cnnx_vi take_bottom = cnnx_vtakes(m_bottom, m_top);  /* the top wins ties */
            cnnx_vi two = {0}; two += 2;
            /* Comparisons are -1 where true: two - right_bottom = 2 + [right wins below],
               -right_top = [right wins above]. */
            cnnx_vi k = (take_bottom & (two - right_bottom)) | (~take_bottom & -right_top);
            cnnx_vstore(pooled + h * CNNX_VW, cnnx_vselect(take_bottom, m_bottom, m_top));
            memcpy(code + h * CNNX_VW, &k, sizeof k);
        }
    #else
        for (int t = 0; t < CNNX_NR; ++t) {
            float s0[4], s1[4];
            for (int j = 0; j < 4; ++j) {
                float m0 = m[j * ms + t], m1 = m[(4 + j) * ms + t], m2 = m[(8 + j) * ms + t], m3 = m[(12 + j) * ms + t];
                s0[j] = m0 + m1 + m2; s1[j] = m1 - m2 - m3;
            }
            float y[4] = {s0[0] + s0[1] + s0[2], s0[1] - s0[2] - s0[3], s1[0] + s1[1] + s1[2], s1[1] - s1[2] - s1[3]};
            if (mode == 1) {
                float a = y[0] > y[1] || y[0] != y[0] ? y[0] : y[1];
                float c = y[2] > y[3] || y[2] != y[2] ? y[2] : y[3];
                float p = (a > c || a != a ? a : c) + bias;
                pooled[t] = rectify && !(p > 0) ? p * slope : p;
                continue;
            }
            for (int q = 0; q < 4; ++q) {
                y[q] += bias;
                if (rectify && !(y[q] > 0)) y[q] *= slope;
            }
            if (mode == 0) {
                top[2 * t] = y[0]; top[2 * t + 1] = y[1]; bottom[2 * t] = y[2]; bottom[2 * t + 1] = y[3];
                continue;
            }
            int right_top = y[1] > y[0] || (y[1] != y[1] && y[0] == y[0]);
            int right_bottom = y[3] > y[2] || (y[3] != y[3] && y[2] == y[2]);
            float m_top = right_top ? y[1] : y[0], m_bottom = right_bottom ? y[3] : y[2];
            int take_bottom = m_bottom > m_top || (m_bottom != m_bottom && m_top == m_top);
            pooled[t] = take_bottom ? m_bottom : m_top;
            code[t] = take_bottom ? 2 + right_bottom : right_top;
        }
    #endif
    }
    """
    const int CNNX_GEMM_WINO_V_BYTES
    const int CNNX_GEMM_WINO_MAX_BLOCK
    const int CNNX_GEMM_WINO_PAD
    void cnnx_wino_kernel(const float* g, float* u) noexcept nogil
    void cnnx_prefetch_floats(const float* p, Py_ssize_t n) noexcept nogil
    void cnnx_wino_input(const float* strip, Py_ssize_t ws, float* v, Py_ssize_t xs, int n) noexcept nogil
    void cnnx_wino_output(const float* m, Py_ssize_t ms, int mode, float bias, int rectify, float slope,
                          float* top, float* bottom, float* pooled, int* code) noexcept nogil


cdef struct _Winograd:
    const float* x        # the call's first image: x[image * x_image + ci * x_channel + iy * w + ix]
    Py_ssize_t x_image, x_channel
    Py_ssize_t c, h, w    # input channels and size
    Py_ssize_t M          # output channels
    Py_ssize_t pad_top, pad_left, out_h, out_w
    Py_ssize_t tiles_h, tiles_w, tiles  # the tile grid of one image, and the call's tile count
    int mode              # 0: NCHW output; 1: pooled; 2: pooled with argmax (see cnnx_wino_output)
    const float* u        # the transformed weights: u[xi * u_stride + (panel * c + ci) * MR + r]
    Py_ssize_t u_stride
    Py_ssize_t block      # tiles per block, a multiple of NR
    Py_ssize_t v_stride   # floats between two xi planes of a block's V
    float* out            # out[image * image_stride + o * plane + pixel] (pixel in the pooled plane for modes 1, 2)
    int* code             # mode 2: the argmax, addressed as out
    Py_ssize_t plane, image_stride
    const float* bias     # NULL without bias
    int rectify
    float slope


cdef struct _WinoScratch:
    # One thread's buffers: V of a block, the 16 products of one register tile, 4 staged input rows,
    # the tile rows' runs of the block and the output transform's rows.
    float* v
    float* products
    float* strip
    Py_ssize_t strip_stride
    Py_ssize_t* run_tile  # block-relative tile index of the run's first tile
    Py_ssize_t* run_length
    Py_ssize_t* run_image
    Py_ssize_t* run_ty
    Py_ssize_t* run_tx
    Py_ssize_t* panel_runs  # runs panel_runs[p] : panel_runs[p + 1] lie in tile panel p
    float* top
    float* bottom
    float* pooled
    int* code


def winograd_config():
    """The Winograd kernel's blocking in this build: ``{"v_bytes", "max_block", "pad"}`` (bytes of a
    block's transformed input, most tiles per block, padding of the 16 planes in floats)."""
    return {"v_bytes": CNNX_GEMM_WINO_V_BYTES, "max_block": CNNX_GEMM_WINO_MAX_BLOCK, "pad": CNNX_GEMM_WINO_PAD}


cdef Py_ssize_t _wino_block_tiles(Py_ssize_t c) noexcept nogil:
    """Tiles per block for ``c`` input channels: V (16 x c x tiles floats) within CNNX_WINO_V_BYTES."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR
    cdef Py_ssize_t block = (CNNX_GEMM_WINO_V_BYTES // (16 * 4 * c)) // nr * nr
    if block < nr:
        block = nr
    if block > CNNX_GEMM_WINO_MAX_BLOCK:
        block = CNNX_GEMM_WINO_MAX_BLOCK
    return block


cdef void _wino_pack_weights(_Winograd* g, const float* weight, float* u) noexcept nogil:
    """U = G w G^T of every (o, ci) into 16 packed A matrices of MR-row panels (zero past M)."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR
    cdef Py_ssize_t panels = (g.M + mr - 1) // mr
    cdef Py_ssize_t o, ci, xi, at
    cdef float t[16]
    for o in range(panels * mr):
        for ci in range(g.c):
            if o < g.M:
                cnnx_wino_kernel(weight + (o * g.c + ci) * 9, t)
            else:
                memset(t, 0, 16 * sizeof(float))
            at = ((o // mr) * g.c + ci) * mr + o % mr
            for xi in range(16):
                u[xi * g.u_stride + at] = t[xi]


cdef void _wino_runs(const _Winograd* g, Py_ssize_t t0, Py_ssize_t t1, _WinoScratch* s) noexcept nogil:
    """The block's tiles t0 : t1 as runs within one tile row of one image and one tile panel."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR
    cdef Py_ssize_t per_image = g.tiles_h * g.tiles_w
    cdef Py_ssize_t t = t0, n = 0, q, tx, length, lane, panel = 0
    s.panel_runs[0] = 0
    while t < t1:
        q = t % per_image
        tx = q % g.tiles_w
        lane = (t - t0) % nr
        length = g.tiles_w - tx
        if length > t1 - t:
            length = t1 - t
        if length > nr - lane:
            length = nr - lane
        s.run_tile[n] = t - t0
        s.run_length[n] = length
        s.run_image[n] = t // per_image
        s.run_ty[n] = q // g.tiles_w
        s.run_tx[n] = tx
        n += 1
        t += length
        if (t - t0) % nr == 0 or t == t1:
            panel += 1
            s.panel_runs[panel] = n


cdef void _wino_stage_rows(const _Winograd* g, Py_ssize_t image, Py_ssize_t ci, Py_ssize_t ty, Py_ssize_t tx,
                           Py_ssize_t length, _WinoScratch* s) noexcept nogil:
    """The 4 input rows of tiles (ty, tx : tx + length) of channel ci into the strip, columns
    0 : 2 * length + 2, zero where the windows hang over the padding."""
    cdef Py_ssize_t width = 2 * length + 2
    cdef Py_ssize_t ix0 = 2 * tx - g.pad_left
    cdef Py_ssize_t lo = -ix0 if ix0 < 0 else 0
    cdef Py_ssize_t hi = g.w - ix0 if g.w - ix0 < width else width
    cdef Py_ssize_t i, iy, t
    cdef float* dst
    cdef const float* src
    for i in range(4):
        dst = s.strip + i * s.strip_stride
        iy = 2 * ty - g.pad_top + i
        if iy < 0 or iy >= g.h or hi <= lo:
            memset(dst, 0, width * sizeof(float))
            continue
        src = g.x + image * g.x_image + ci * g.x_channel + iy * g.w + ix0
        # The padding's few columns as plain stores (a memset call costs more).
        for t in range(lo):
            dst[t] = 0
        cnnx_copy_long(dst + lo, src + lo, hi - lo)
        for t in range(hi, width):
            dst[t] = 0
        if ci + 1 < g.c:
            cnnx_prefetch_floats(src + lo + g.x_channel, hi - lo)


cdef void _wino_input_block(const _Winograd* g, Py_ssize_t n_runs, _WinoScratch* s) noexcept nogil:
    """V of the block's runs, every input channel, in packed-B layout:
    v[xi * v_stride + (panel * c + ci) * NR + lane]."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR, vw = CNNX_GEMM_VW
    cdef Py_ssize_t r, ci, q, n, tile, panel
    # Channel by channel: each input plane is read in order (its rows stay in L1 between the
    # overlapping tile rows).
    for ci in range(g.c):
        for r in range(n_runs):
            tile = s.run_tile[r]
            panel = tile // nr
            _wino_stage_rows(g, s.run_image[r], ci, s.run_ty[r], s.run_tx[r], s.run_length[r], s)
            q = 0
            while q < s.run_length[r]:
                n = s.run_length[r] - q if s.run_length[r] - q < vw else vw
                cnnx_wino_input(s.strip + 2 * q, s.strip_stride,
                                s.v + (panel * g.c + ci) * nr + (tile + q) % nr, g.v_stride, <int>n)
                q += n


cdef void _wino_store_row(const _Winograd* g, Py_ssize_t o, Py_ssize_t panel, _WinoScratch* s) noexcept nogil:
    """Output channel o's transformed row of a tile panel (in s.top / s.bottom or s.pooled /
    s.code) to the output, run by run (clipped to the output for a partial last tile)."""
    cdef Py_ssize_t nr = CNNX_GEMM_NR
    cdef Py_ssize_t r, lane, oy, ox, count, first_run
    cdef float* dst
    cdef Py_ssize_t at
    r = s.panel_runs[panel]
    while r < s.panel_runs[panel + 1]:
        lane = s.run_tile[r] - panel * nr
        if g.mode == 0:
            oy = 2 * s.run_ty[r]
            ox = 2 * s.run_tx[r]
            count = g.out_w - ox if g.out_w - ox < 2 * s.run_length[r] else 2 * s.run_length[r]
            dst = g.out + s.run_image[r] * g.image_stride + o * g.plane + oy * g.out_w + ox
            cnnx_copy_long(dst, s.top + 2 * lane, count)
            if oy + 1 < g.out_h:
                cnnx_copy_long(dst + g.out_w, s.bottom + 2 * lane, count)
            r += 1
            continue
        # Pooled: the tile grid is the pooled plane, so one image's runs are contiguous there.
        first_run = r
        count = s.run_length[r]
        r += 1
        while r < s.panel_runs[panel + 1] and s.run_image[r] == s.run_image[first_run]:
            count += s.run_length[r]
            r += 1
        at = (s.run_image[first_run] * g.image_stride + o * g.plane + s.run_ty[first_run] * g.tiles_w
              + s.run_tx[first_run])
        cnnx_copy_long(g.out + at, s.pooled + lane, count)
        if g.mode == 2:
            memcpy(g.code + at, s.code + lane, count * sizeof(int))


cdef void _wino_block(const _Winograd* g, Py_ssize_t block, _WinoScratch* s) noexcept nogil:
    """Tiles ``block * g.block`` onwards: input transform, the 16 GEMMs per register tile, output
    transform and stores."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    cdef Py_ssize_t t0 = block * g.block
    cdef Py_ssize_t t1 = t0 + g.block if t0 + g.block < g.tiles else g.tiles
    cdef Py_ssize_t n_panels = (t1 - t0 + nr - 1) // nr
    cdef Py_ssize_t valid = t1 - t0 - (n_panels - 1) * nr
    cdef Py_ssize_t xi, ci, op, panel, r, rows
    _wino_runs(g, t0, t1, s)
    if valid < nr:  # the last panel's unused lanes: zeros (their products are never stored)
        for xi in range(16):
            for ci in range(g.c):
                memset(s.v + xi * g.v_stride + ((n_panels - 1) * g.c + ci) * nr + valid, 0,
                       (nr - valid) * sizeof(float))
    _wino_input_block(g, s.panel_runs[n_panels], s)
    for op in range((g.M + mr - 1) // mr):
        rows = g.M - op * mr if g.M - op * mr < mr else mr
        for panel in range(n_panels):
            for xi in range(16):
                cnnx_sgemm_micro(g.c, g.u + xi * g.u_stride + op * g.c * mr,
                                 s.v + xi * g.v_stride + panel * g.c * nr, s.products + xi * mr * nr, nr,
                                 <int>mr, 0, NULL, 0, 0)
            for r in range(rows):
                cnnx_wino_output(s.products + r * nr, mr * nr, g.mode,
                                 g.bias[op * mr + r] if g.bias != NULL else 0, g.rectify, g.slope,
                                 s.top, s.bottom, s.pooled, s.code)
                _wino_store_row(g, op * mr + r, panel, s)


cdef Py_ssize_t _wino_u_stride(Py_ssize_t M, Py_ssize_t c) noexcept nogil:
    """Floats between two xi planes of the transformed weights of M output and c input channels."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR
    return ((M + mr - 1) // mr) * mr * c + CNNX_GEMM_WINO_PAD


cdef int _wino_run(_Winograd* g, const float* weight, const float* transformed, int n_threads) noexcept nogil:
    """Transform the weights (unless ``transformed`` holds them already), then every block of tiles
    (over ``n_threads``); 0, or -1 when out of memory."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR, vw = CNNX_GEMM_VW, pad = CNNX_GEMM_WINO_PAD
    g.block = _wino_block_tiles(g.c)
    if g.block > (g.tiles + nr - 1) // nr * nr:
        g.block = (g.tiles + nr - 1) // nr * nr
    cdef Py_ssize_t n_blocks = (g.tiles + g.block - 1) // g.block
    if n_threads > n_blocks:
        n_threads = <int>n_blocks
    if n_threads < 1:
        n_threads = 1
    g.u_stride = _wino_u_stride(g.M, g.c)
    g.v_stride = g.block * g.c + pad
    cdef Py_ssize_t strip_stride = (2 * nr + 2 * vw + 4 + 15) // 16 * 16
    # Per thread: V, products, strip, top, bottom, pooled, code (floats; int and float are 4 bytes).
    cdef Py_ssize_t floats = 16 * g.v_stride + 16 * mr * nr + 4 * strip_stride + 2 * 2 * nr + 2 * nr
    cdef Py_ssize_t ints = 5 * g.block + g.block // nr + 1
    cdef float* u = cnnx_alloc_floats(16 * g.u_stride) if transformed == NULL else NULL
    cdef float* scratch = cnnx_alloc_floats(floats * n_threads)
    cdef Py_ssize_t* runs = <Py_ssize_t*>malloc(ints * n_threads * sizeof(Py_ssize_t))
    cdef _WinoScratch* s = <_WinoScratch*>malloc(n_threads * sizeof(_WinoScratch))
    cdef Py_ssize_t block, i
    cdef float* f
    cdef Py_ssize_t* p
    if (u == NULL and transformed == NULL) or scratch == NULL or runs == NULL or s == NULL:
        cnnx_free_floats(u)
        cnnx_free_floats(scratch)
        free(runs)
        free(s)
        return -1
    for i in range(n_threads):
        f = scratch + i * floats
        s[i].v = f
        s[i].products = f + 16 * g.v_stride
        s[i].strip = s[i].products + 16 * mr * nr
        s[i].strip_stride = strip_stride
        memset(s[i].strip, 0, 4 * strip_stride * sizeof(float))  # its slack is read (into lanes never stored)
        s[i].top = s[i].strip + 4 * strip_stride
        s[i].bottom = s[i].top + 2 * nr
        s[i].pooled = s[i].bottom + 2 * nr
        s[i].code = <int*>(s[i].pooled + nr)
        p = runs + i * ints
        s[i].run_tile = p
        s[i].run_length = p + g.block
        s[i].run_image = p + 2 * g.block
        s[i].run_ty = p + 3 * g.block
        s[i].run_tx = p + 4 * g.block
        s[i].panel_runs = p + 5 * g.block
    if transformed == NULL:
        _wino_pack_weights(g, weight, u)
        g.u = u
    else:
        g.u = transformed
    if n_threads == 1:
        for block in range(n_blocks):
            _wino_block(g, block, &s[0])
    else:
        for block in prange(n_blocks, schedule="static", num_threads=n_threads):
            _wino_block(g, block, &s[threadid()])
    cnnx_free_floats(u)
    cnnx_free_floats(scratch)
    free(runs)
    free(s)
    return 0


def winograd_weights(const float[:, ::1] weight, Py_ssize_t c):
    """The transformed weights U = G w G^T of ``weight (out_c, c * 9)`` (3x3 kernels) in the
    layout the Winograd kernels read, as a float32 array to pass them as ``transformed`` (the
    transform then runs once per convolution, not once per group of images)."""
    cdef _Winograd g
    if c <= 0 or weight.shape[1] != 9 * c:
        raise ValueError(f"Expected a weight of shape (out_c, {9 * c}) for {c} input channels, received: "
                         f"({weight.shape[0]}, {weight.shape[1]})")
    g.M, g.c = weight.shape[0], c
    import numpy
    g.u_stride = _wino_u_stride(g.M, c)
    u = numpy.zeros(16 * g.u_stride, numpy.float32)
    cdef float[::1] u_view = u
    if g.M > 0:
        _wino_pack_weights(&g, &weight[0, 0], &u_view[0])
    return u


cdef _winograd_checks(Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sy, Py_ssize_t sx, Py_ssize_t M, Py_ssize_t c,
                      Py_ssize_t weight_columns, transformed, Py_ssize_t out_h, Py_ssize_t out_w):
    if kh != 3 or kw != 3 or sy != 1 or sx != 1:
        raise ValueError(f"Expected a 3x3 kernel with stride 1 for Winograd F(2x2, 3x3), received: kernel "
                         f"({kh}, {kw}), stride ({sy}, {sx})")
    if weight_columns != 9 * c:
        raise ValueError(f"Expected a weight of shape (out_c, {9 * c}) for {c} input channels, "
                         f"received: ({M}, {weight_columns})")
    if transformed is not None and len(transformed) != 16 * _wino_u_stride(M, c):
        raise ValueError(f"Expected transformed weights of {16 * _wino_u_stride(M, c)} floats (winograd_weights), "
                         f"received: {len(transformed)}")
    if out_h < 0 or out_w < 0:
        raise ValueError(f"Expected a non-negative output size, received: ({out_h}, {out_w})")


cdef _winograd_run_checked(_Winograd* g, const float* weight, const float[::1] transformed, int n_threads):
    cdef int status
    cdef const float* u = &transformed[0] if transformed is not None else NULL
    with nogil:
        status = _wino_run(g, weight, u, n_threads)
    if status != 0:
        raise MemoryError("cnnx: no memory for the Winograd buffers")


cdef _winograd_call(const float[:, :, :, ::1] x, Py_ssize_t first, Py_ssize_t count, const float[:, ::1] weight,
                    Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sy, Py_ssize_t sx, Py_ssize_t pad_top,
                    Py_ssize_t pad_left, Py_ssize_t out_h, Py_ssize_t out_w, const float[::1] bias, bint has_bias,
                    bint leaky_relu, double negative_slope, float[:, :, ::1] y, int[:, :, ::1] argmax, int mode,
                    int n_threads, const float[::1] transformed):
    cdef _Winograd g
    _winograd_checks(kh, kw, sy, sx, weight.shape[0], x.shape[1], weight.shape[1], transformed, out_h, out_w)
    if mode != 0 and leaky_relu and not negative_slope >= 0:
        raise ValueError(f"Expected negative_slope >= 0 for the pooled leaky_relu, received: {negative_slope!r}")
    if first < 0 or count < 0 or first + count > x.shape[0]:
        raise ValueError(f"Expected images first : first + count within x's {x.shape[0]}, received: "
                         f"first={first}, count={count}")
    g.tiles_h, g.tiles_w = ((out_h + 1) // 2, (out_w + 1) // 2) if mode == 0 else (out_h // 2, out_w // 2)
    cdef Py_ssize_t plane = out_h * out_w if mode == 0 else g.tiles_h * g.tiles_w
    if (y.shape[0] < first + count or y.shape[1] != weight.shape[0] or y.shape[2] != plane
            or (has_bias and bias.shape[0] < weight.shape[0])):
        raise ValueError(f"Expected y of shape (>= {first + count}, {weight.shape[0]}, {plane}) and a bias "
                         f"of {weight.shape[0]}, received: y ({y.shape[0]}, {y.shape[1]}, {y.shape[2]}), "
                         f"bias ({bias.shape[0]},)")
    if mode == 2 and (argmax.shape[0] != y.shape[0] or argmax.shape[1] != y.shape[1] or argmax.shape[2] != y.shape[2]):
        raise ValueError(f"Expected argmax of y's shape ({y.shape[0]}, {y.shape[1]}, {y.shape[2]}), received: "
                         f"({argmax.shape[0]}, {argmax.shape[1]}, {argmax.shape[2]})")
    if count == 0 or y.shape[1] == 0 or plane == 0:
        return
    if x.shape[1] == 0:
        raise ValueError("Expected at least one input channel, received: x with 0 channels")
    g.x = &x[first, 0, 0, 0]
    g.c, g.h, g.w = x.shape[1], x.shape[2], x.shape[3]
    g.x_image, g.x_channel = g.c * g.h * g.w, g.h * g.w
    g.M = weight.shape[0]
    g.pad_top, g.pad_left, g.out_h, g.out_w = pad_top, pad_left, out_h, out_w
    g.tiles = count * g.tiles_h * g.tiles_w
    g.mode = mode
    g.plane = plane
    g.image_stride = g.M * plane
    g.out = &y[first, 0, 0]
    g.code = &argmax[first, 0, 0] if mode == 2 else NULL
    g.bias = &bias[0] if has_bias else NULL
    g.rectify = leaky_relu
    g.slope = <float>negative_slope
    _winograd_run_checked(&g, &weight[0, 0], transformed, n_threads)


def winograd_conv_nchw(
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
    const float[::1] transformed=None,
):
    """``conv_gemm_nchw`` (same arguments) by Winograd F(2x2, 3x3): the float32 3x3 stride-1
    convolution of images ``x[first : first + count]`` into ``y[first : first + count]`` of shape
    ``(n, out_c, out_h * out_w)``, plus ``bias[o]`` when ``has_bias``, then a leaky ReLU with
    ``negative_slope`` when ``leaky_relu``. Any zero padding: windows read zeros outside the image.
    ``transformed``: ``winograd_weights(weight, c)``, when the caller has it (else computed here).
    Round-off differs from the direct GEMM's (fewer products per sum, but transforms that add and
    subtract; see tests/test_winograd.py for the bound)."""
    _winograd_call(x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w, bias, has_bias,
                   leaky_relu, negative_slope, y, None, 0, n_threads, transformed)


def winograd_conv_nchw_max_pool_2x2(
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
    const float[::1] transformed=None,
):
    """``conv_gemm_nchw_max_pool_2x2`` (same arguments) by Winograd F(2x2, 3x3): each 2x2 output
    tile is one pool window, so ``y (n, out_c, (out_h // 2) * (out_w // 2))`` receives the maximum
    of its four outputs, + bias, then the leaky ReLU (``negative_slope >= 0``)."""
    _winograd_call(x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w, bias, has_bias,
                   leaky_relu, negative_slope, y, None, 1, n_threads, transformed)


def winograd_conv_nchw_max_pool_2x2_argmax(
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
    const float[::1] transformed=None,
):
    """The training form of ``winograd_conv_nchw_max_pool_2x2``, as
    ``conv_gemm_nchw_max_pool_2x2_argmax`` defines it: every output activated (+ bias), then each
    window's value and winner ``2 * dy + dx`` in ``argmax`` (the first maximum or the first NaN in
    row-major order)."""
    _winograd_call(x, first, count, weight, kh, kw, sy, sx, pad_top, pad_left, out_h, out_w, bias, has_bias,
                   leaky_relu, negative_slope, y, argmax, 2, n_threads, transformed)


def winograd_conv_input_grad(
    const float[:, :, ::1] dy_gemm,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    const float[::1] transformed,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    float[:, :, :, ::1] dx,
    Py_ssize_t first,
    int n_threads,
):
    """The input gradient of a 3x3 stride-1 convolution by Winograd F(2x2, 3x3): with ``dy_gemm
    (out_c, m, out_h * out_w)`` the output gradient of images ``first : first + m`` in GEMM layout,
    ``dx[first : first + m]`` (shape ``(n, c, h, w)``, overwritten) is the convolution of dy with
    the flipped, transposed kernels w'[ci, o] = w[o, ci, ::-1, ::-1] with zero padding ``pad_top``,
    ``pad_left`` (2 - the forward's top / left padding; dy's rows and columns past its end read as
    zeros), ``transformed = winograd_weights(w' as (c, out_c * 9), out_c)``."""
    cdef _Winograd g
    cdef Py_ssize_t oc = dy_gemm.shape[0], m = dy_gemm.shape[1], c = dx.shape[1]
    if transformed is None or len(transformed) != 16 * _wino_u_stride(c, oc):
        raise ValueError(f"Expected transformed weights of {16 * _wino_u_stride(c, oc)} floats (winograd_weights), "
                         f"received: {None if transformed is None else len(transformed)}")
    if dy_gemm.shape[2] != out_h * out_w or first < 0 or first + m > dx.shape[0]:
        raise ValueError(f"Expected dy_gemm (out_c, m, {out_h * out_w}) and images first : first + m within "
                         f"dx's {dx.shape[0]}, received: dy_gemm ({oc}, {m}, {dy_gemm.shape[2]}), first={first}")
    if pad_top < 0 or pad_left < 0:
        raise ValueError(f"Expected a non-negative padding, received: ({pad_top}, {pad_left})")
    if m == 0 or c == 0 or dx.shape[2] == 0 or dx.shape[3] == 0:
        return
    if oc == 0 or out_h * out_w == 0:
        dx[first:first + m] = 0
        return
    g.x = &dy_gemm[0, 0, 0]
    g.c, g.h, g.w = oc, out_h, out_w
    g.x_image, g.x_channel = out_h * out_w, m * out_h * out_w
    g.M = c
    g.pad_top, g.pad_left = pad_top, pad_left
    g.out_h, g.out_w = dx.shape[2], dx.shape[3]
    g.tiles_h, g.tiles_w = (g.out_h + 1) // 2, (g.out_w + 1) // 2
    g.tiles = m * g.tiles_h * g.tiles_w
    g.mode = 0
    g.plane = g.out_h * g.out_w
    g.image_stride = c * g.plane
    g.out = &dx[first, 0, 0, 0]
    g.code = NULL
    g.bias = NULL
    g.rectify = 0
    g.slope = 0
    _winograd_run_checked(&g, NULL, transformed, n_threads)


# --- The weight gradient by Winograd F(2x2, 3x3) -------------------------------------------------
#
# y = A^T [(G w G^T) * (B^T d B)] A is linear in U = G w G^T, so for one tile dL/dU = (A dy A^T) *
# (B^T d B) (entrywise) and dL/dw = G^T (dL/dU) G: the weight gradient is, per position xi, the
# GEMM M_xi (out_c, c) = sum over tiles of Y_xi (out_c, tile) V_xi (c, tile)^T with Y = A dy A^T,
# then dW = G^T M G per (o, ci). The tiles are the GEMM's K, so both transforms run with the
# channels in the vectors: the group's images and dy are first copied channels-last (zero padded,
# channels rounded up), then per block of tiles Y goes to the micro-kernel's packed A (MR output
# channels per tile) and V to its packed B (NR input channels per tile), and the 16 products
# accumulate into M (16 x out_c x c, in L2) block after block, in one fixed order.

cdef extern from *:
    """
    /* Y = A dy A^T of one tile for MR output channels: dy at d00, d01 (its top row) and d10, d11
       (bottom), MR floats each; y[xi * ys + r]. */
    static inline void cnnx_wino_dy_tile(const float *restrict d00, const float *restrict d01,
                                         const float *restrict d10, const float *restrict d11,
                                         float *restrict y, Py_ssize_t ys) {
        /* Rows of A dy (A = [[1, 0], [1, 1], [1, -1], [0, -1]]), then its columns; each step over
           the MR channels at once (one 8-float vector where MR is 8, else a loop the compiler
           vectorises). */
    #if CNNX_GEMM_VECTOR && CNNX_MR == 8
        typedef float cnnx_v8 __attribute__((vector_size(32)));
        cnnx_v8 a0, a1, b0, b1;
        memcpy(&a0, d00, sizeof a0); memcpy(&a1, d01, sizeof a1);
        memcpy(&b0, d10, sizeof b0); memcpy(&b1, d11, sizeof b1);
        cnnx_v8 zero = {0};
        cnnx_v8 rows[4][2] = {{a0, a1}, {a0 + b0, a1 + b1}, {a0 - b0, a1 - b1}, {zero - b0, zero - b1}};
        for (int i = 0; i < 4; ++i) {
            cnnx_v8 c0 = rows[i][0], c1 = rows[i][1];
            cnnx_v8 out[4] = {c0, c0 + c1, c0 - c1, zero - c1};
            for (int j = 0; j < 4; ++j) memcpy(y + (4 * i + j) * ys, &out[j], sizeof out[j]);
        }
        return;
    #endif
        float t[4][2][CNNX_MR];
        for (int r = 0; r < CNNX_MR; ++r) {
            float a0 = d00[r], a1 = d01[r], b0 = d10[r], b1 = d11[r];
            t[0][0][r] = a0; t[0][1][r] = a1;
            t[1][0][r] = a0 + b0; t[1][1][r] = a1 + b1;
            t[2][0][r] = a0 - b0; t[2][1][r] = a1 - b1;
            t[3][0][r] = -b0; t[3][1][r] = -b1;
        }
        for (int i = 0; i < 4; ++i) {
            float *y0 = y + (4 * i) * ys, *y1 = y0 + ys, *y2 = y1 + ys, *y3 = y2 + ys;
            for (int r = 0; r < CNNX_MR; ++r) {
                y0[r] = t[i][0][r];
                y1[r] = t[i][0][r] + t[i][1][r];
                y2[r] = t[i][0][r] - t[i][1][r];
                y3[r] = -t[i][1][r];
            }
        }
    }

    /* V = B^T d B of one tile for NR input channels: d[i][j] at p + i * row + j * pixel (NR floats
       each); v[xi * vs + 0 : NR]. */
    static inline void cnnx_wino_x_tile(const float *p, Py_ssize_t row, Py_ssize_t pixel, float *v, Py_ssize_t vs) {
    #if CNNX_GEMM_VECTOR
        for (int h = 0; h < CNNX_NR / CNNX_VW; ++h) {
            cnnx_vf r[4][4];
            for (int i = 0; i < 4; ++i) {
                const float *q = p + i * row + h * CNNX_VW;
                cnnx_vf x0 = cnnx_vload(q), x1 = cnnx_vload(q + pixel);
                cnnx_vf x2 = cnnx_vload(q + 2 * pixel), x3 = cnnx_vload(q + 3 * pixel);
                r[i][0] = x0 - x2; r[i][1] = x1 + x2; r[i][2] = x2 - x1; r[i][3] = x1 - x3;
            }
            for (int j = 0; j < 4; ++j) {
                cnnx_vstore(v + (0 + j) * vs + h * CNNX_VW, r[0][j] - r[2][j]);
                cnnx_vstore(v + (4 + j) * vs + h * CNNX_VW, r[1][j] + r[2][j]);
                cnnx_vstore(v + (8 + j) * vs + h * CNNX_VW, r[2][j] - r[1][j]);
                cnnx_vstore(v + (12 + j) * vs + h * CNNX_VW, r[1][j] - r[3][j]);
            }
        }
    #else
        for (int ch = 0; ch < CNNX_NR; ++ch) {
            float r[4][4];
            for (int i = 0; i < 4; ++i) {
                const float *q = p + i * row + ch;
                float x0 = q[0], x1 = q[pixel], x2 = q[2 * pixel], x3 = q[3 * pixel];
                r[i][0] = x0 - x2; r[i][1] = x1 + x2; r[i][2] = x2 - x1; r[i][3] = x1 - x3;
            }
            for (int j = 0; j < 4; ++j) {
                v[(0 + j) * vs + ch] = r[0][j] - r[2][j];
                v[(4 + j) * vs + ch] = r[1][j] + r[2][j];
                v[(8 + j) * vs + ch] = r[2][j] - r[1][j];
                v[(12 + j) * vs + ch] = r[1][j] - r[3][j];
            }
        }
    #endif
    }

    /* dst[q * ld + r] = src[r * ls + q] for r < rows, q < cols (rows, cols <= 16): a 16 x 16 block
       transposed in registers on AVX-512 (four shuffle stages), smaller blocks element by element. */
    #if defined(__AVX512F__)
    #include <immintrin.h>
    #endif
    static inline void cnnx_transpose_block(const float *src, Py_ssize_t ls, float *dst, Py_ssize_t ld,
                                            int rows, int cols) {
    #if defined(__AVX512F__)
        if (rows == 16 && cols == 16) {
            __m512 r[16], t[16];
            for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ls);
            for (int i = 0; i < 16; i += 2) {
                t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
                t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 16; i += 4) {
                r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
                r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
                r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
                r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
            }
            for (int i = 0; i < 16; i += 8) {
                for (int k = 0; k < 4; ++k) {
                    t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + 4 + k], 0x88);
                    t[i + 4 + k] = _mm512_shuffle_f32x4(r[i + k], r[i + 4 + k], 0xDD);
                }
            }
            for (int k = 0; k < 8; ++k) {
                r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
                r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
            }
            for (int q = 0; q < 16; ++q) _mm512_storeu_ps(dst + q * ld, r[q]);
            return;
        }
    #endif
        for (int q = 0; q < cols; ++q)
            for (int i = 0; i < rows; ++i) dst[q * ld + i] = src[i * ls + q];
    }

    /* dw[a * 3 + b] = (G^T m G)[a][b] for the 16 sums m[xi * ms], in double. */
    static inline void cnnx_wino_dw_kernel(const float *m, Py_ssize_t ms, float *dw) {
        double t[3][4];
        for (int j = 0; j < 4; ++j) {
            double m0 = m[j * ms], m1 = m[(4 + j) * ms], m2 = m[(8 + j) * ms], m3 = m[(12 + j) * ms];
            t[0][j] = m0 + 0.5 * (m1 + m2); t[1][j] = 0.5 * (m1 - m2); t[2][j] = 0.5 * (m1 + m2) + m3;
        }
        for (int a = 0; a < 3; ++a) {
            dw[a * 3 + 0] = (float)(t[a][0] + 0.5 * (t[a][1] + t[a][2]));
            dw[a * 3 + 1] = (float)(0.5 * (t[a][1] - t[a][2]));
            dw[a * 3 + 2] = (float)(0.5 * (t[a][1] + t[a][2]) + t[a][3]);
        }
    }
    """
    void cnnx_wino_dy_tile(const float* d00, const float* d01, const float* d10, const float* d11, float* y,
                           Py_ssize_t ys) noexcept nogil
    void cnnx_wino_x_tile(const float* p, Py_ssize_t row, Py_ssize_t pixel, float* v, Py_ssize_t vs) noexcept nogil
    void cnnx_wino_dw_kernel(const float* m, Py_ssize_t ms, float* dw) noexcept nogil
    void cnnx_transpose_block(const float* src, Py_ssize_t ls, float* dst, Py_ssize_t ld, int rows,
                              int cols) noexcept nogil


cdef struct _WinoGrad:
    Py_ssize_t m, c, oc, cp, ocp   # images; channels and their padded counts (NR, MR multiples)
    Py_ssize_t th, tw, hp, wp      # tile grid; the channels-last images' padded size (2 th + 2, 2 tw + 2)
    float* xcl                     # (m, hp, wp, cp)
    float* dycl                    # (m, 2 th, 2 tw, ocp)
    Py_ssize_t block               # tiles per block
    float* ya                      # per xi: ocp / MR panels of (block x MR)
    float* vb                      # per xi: cp / NR panels of (block x NR)
    Py_ssize_t ya_stride, vb_stride
    float* sums                    # M: per xi (ocp x cp), row stride cp
    Py_ssize_t sums_stride


cdef void _wino_grad_block(_WinoGrad* g, Py_ssize_t t0, Py_ssize_t t1) noexcept nogil:
    """Tiles t0 : t1 (image by image, row-major): transforms into the packed operands, then the 16
    GEMMs accumulated into the sums."""
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    cdef Py_ssize_t per_image = g.th * g.tw
    cdef Py_ssize_t kc = t1 - t0
    cdef Py_ssize_t t, k, j, q, ty, tx, panel, xi, op, cpn
    cdef const float* base
    cdef Py_ssize_t dyrow = 2 * g.tw * g.ocp
    for t in range(t0, t1):
        k = t - t0
        j = t // per_image
        q = t - j * per_image
        ty = q // g.tw
        tx = q - ty * g.tw
        base = g.dycl + ((j * 2 * g.th + 2 * ty) * 2 * g.tw + 2 * tx) * g.ocp
        for panel in range(g.ocp // mr):
            cnnx_wino_dy_tile(base + panel * mr, base + g.ocp + panel * mr, base + dyrow + panel * mr,
                              base + dyrow + g.ocp + panel * mr, g.ya + (panel * g.block + k) * mr, g.ya_stride)
        base = g.xcl + ((j * g.hp + 2 * ty) * g.wp + 2 * tx) * g.cp
        for panel in range(g.cp // nr):
            cnnx_wino_x_tile(base + panel * nr, g.wp * g.cp, g.cp, g.vb + (panel * g.block + k) * nr, g.vb_stride)
    for xi in range(16):
        for op in range(g.ocp // mr):
            for cpn in range(g.cp // nr):
                cnnx_sgemm_micro(kc, g.ya + xi * g.ya_stride + op * g.block * mr,
                                 g.vb + xi * g.vb_stride + cpn * g.block * nr,
                                 g.sums + xi * g.sums_stride + op * mr * g.cp + cpn * nr, g.cp, <int>mr, 1, NULL, 0, 0)


def winograd_conv_weight_grad(
    const float[:, :, :, ::1] x,
    Py_ssize_t first,
    const float[:, :, ::1] dy_gemm,
    Py_ssize_t pad_top,
    Py_ssize_t pad_left,
    Py_ssize_t out_h,
    Py_ssize_t out_w,
    float[:, ::1] dweight,
):
    """``conv_weight_grad`` (its arguments, less kernel and stride) of a 3x3 stride-1 convolution by
    Winograd F(2x2, 3x3): ``dweight (out_c, c * 9) = dy_gemm @ im2col(x[first : first + m])^T``
    with ``dy_gemm (out_c, m, out_h * out_w)`` the output gradient in GEMM layout (overwritten).
    One thread (callers run groups of images on their workers)."""
    cdef _WinoGrad g
    cdef Py_ssize_t mr = CNNX_GEMM_MR, nr = CNNX_GEMM_NR
    g.oc, g.m, g.c = dy_gemm.shape[0], dy_gemm.shape[1], x.shape[1]
    if dweight.shape[0] != g.oc or dweight.shape[1] != 9 * g.c or dy_gemm.shape[2] != out_h * out_w:
        raise ValueError(f"Expected dweight ({g.oc}, {9 * g.c}) and dy_gemm (out_c, m, {out_h * out_w}), received: "
                         f"dweight ({dweight.shape[0]}, {dweight.shape[1]}), "
                         f"dy_gemm ({g.oc}, {g.m}, {dy_gemm.shape[2]})")
    if first < 0 or first + g.m > x.shape[0] or pad_top < 0 or pad_left < 0 or out_h < 0 or out_w < 0:
        raise ValueError(f"Expected images first : first + m within x's {x.shape[0]} and a non-negative geometry, "
                         f"received: first={first}, m={g.m}, padding ({pad_top}, {pad_left}), "
                         f"output ({out_h}, {out_w})")
    dweight[:, :] = 0
    if g.oc == 0 or g.c == 0 or g.m == 0 or out_h * out_w == 0:
        return
    g.th, g.tw = (out_h + 1) // 2, (out_w + 1) // 2
    g.hp, g.wp = 2 * g.th + 2, 2 * g.tw + 2
    g.cp = (g.c + nr - 1) // nr * nr
    g.ocp = (g.oc + mr - 1) // mr * mr
    # Blocks: both packed operands (16 x tiles x (ocp + cp) floats) within CNNX_WINO_V_BYTES.
    g.block = CNNX_GEMM_WINO_V_BYTES // (16 * 4 * (g.ocp + g.cp))
    if g.block < 16:
        g.block = 16
    if g.block > 1024:
        g.block = 1024
    g.ya_stride = g.ocp * g.block + CNNX_GEMM_WINO_PAD
    g.vb_stride = g.cp * g.block + CNNX_GEMM_WINO_PAD
    g.sums_stride = g.ocp * g.cp + CNNX_GEMM_WINO_PAD
    cdef Py_ssize_t h = x.shape[2], w = x.shape[3]
    cdef Py_ssize_t xcl_floats = g.m * g.hp * g.wp * g.cp
    cdef Py_ssize_t dycl_floats = g.m * 2 * g.th * 2 * g.tw * g.ocp
    cdef float* buf = cnnx_alloc_floats(xcl_floats + dycl_floats + 16 * (g.ya_stride + g.vb_stride + g.sums_stride))
    if buf == NULL:
        raise MemoryError("cnnx: no memory for the Winograd weight gradient's buffers")
    g.xcl = buf
    g.dycl = buf + xcl_floats
    g.ya = g.dycl + dycl_floats
    g.vb = g.ya + 16 * g.ya_stride
    g.sums = g.vb + 16 * g.vb_stride
    cdef const float* xs = &x[first, 0, 0, 0]
    cdef const float* dys = &dy_gemm[0, 0, 0]
    cdef float* dw = &dweight[0, 0]
    cdef Py_ssize_t j, ci, iy, ix, o, oy, ox, t0, tiles, xi, n, q
    cdef Py_ssize_t P = out_h * out_w
    cdef float* dst
    cdef const float* src
    cdef float kernel9[9]
    with nogil:
        memset(buf, 0, (xcl_floats + dycl_floats) * sizeof(float))
        memset(g.sums, 0, 16 * g.sums_stride * sizeof(float))
        # Channels-last copies, zero where padded: xcl[j, pad_top + iy, pad_left + ix, ci], dycl[j, oy, ox, o].
        # In blocks of 16 pixels of a row x 16 channels, transposed in registers where the build
        # has AVX-512 (the chunk's destination lines stay in L1 meanwhile).
        for j in range(g.m):
            for iy in range(h if h + pad_top <= g.hp else g.hp - pad_top):
                ix = 0
                while ix < w and ix + pad_left < g.wp:
                    n = min(16, w - ix, g.wp - pad_left - ix)
                    dst = g.xcl + ((j * g.hp + iy + pad_top) * g.wp + pad_left + ix) * g.cp
                    for ci in range(0, g.c, 16):
                        cnnx_transpose_block(xs + ((j * g.c + ci) * h + iy) * w + ix, h * w, dst + ci, g.cp,
                                             <int>min(16, g.c - ci), <int>n)
                    ix += n
            for oy in range(out_h):
                ox = 0
                while ox < out_w:
                    n = min(16, out_w - ox)
                    dst = g.dycl + ((j * 2 * g.th + oy) * 2 * g.tw + ox) * g.ocp
                    for o in range(0, g.oc, 16):
                        cnnx_transpose_block(dys + (o * g.m + j) * P + oy * out_w + ox, g.m * P, dst + o, g.ocp,
                                             <int>min(16, g.oc - o), <int>n)
                    ox += n
        tiles = g.m * g.th * g.tw
        t0 = 0
        while t0 < tiles:
            _wino_grad_block(&g, t0, t0 + g.block if t0 + g.block < tiles else tiles)
            t0 += g.block
        for o in range(g.oc):
            for ci in range(g.c):
                cnnx_wino_dw_kernel(g.sums + o * g.cp + ci, g.sums_stride, kernel9)
                memcpy(dw + o * 9 * g.c + ci * 9, kernel9, 9 * sizeof(float))
    cnnx_free_floats(buf)
