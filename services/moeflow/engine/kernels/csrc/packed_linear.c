/* y = x @ W^T for the rows of a decode batch, on W as oneDNN packs it for this CPU.
 *
 * The packed layouts (checked by kernels/linear.py against each weight before this runs):
 * blocks of B output rows, each block [Kp][B] with Kp = K rounded up to 16 (zero padded), so
 * element (n, k) sits at (n / B) * Kp * B + k * B + n % B. oneDNN packs fp32 weights with
 * B = 64 on AVX-512 CPUs and B = 16 on AVX2-only ones. For every k, the B outputs of a block
 * take one broadcast of x[r, k] and B / 8 (or B / 16) fused multiply-adds: the weight streams
 * through once, with no horizontal sums. oneDNN reads the same bytes at about 11 GB/s per core
 * when M = 1; this loop reads them at the memory's pace (measured ~22 GB/s on one core).
 *
 * Each output is one sequential sum over k in order (fused multiply-adds), whatever M, the
 * tiling or the thread count: a row's result does not depend on the rows beside it.
 *
 * Tiling, B = 64: rows in groups of up to 4 (16 accumulators); a block's panel is read from
 * memory by the first group and from cache by the others. Past ~12 rows oneDNN's blocking wins
 * (the caller switches at moeflow_packed_linear_rows(64)). Without AVX-512, an AVX2 tile of one
 * row x 64 columns reads the same layout (16 vector registers only).
 *
 * Tiling, B = 16 (AVX2): the 6 x 16 register tile of the classic AVX2 GEMM kernels (12
 * accumulators, two weight vectors, one broadcast): M is cut into about equal groups of up to 6
 * rows; the first group streams a block's panel from memory, the others re-read it from cache.
 * Consecutive blocks are consecutive in memory, so each thread reads one sequential stream.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define HAVE_PACKED_LINEAR 1
#endif

#define R_MAX 4

/* Fully unrolled loops over accumulator arrays: otherwise GCC turns a zeroing loop into a memset
 * and then keeps the whole array on the stack, storing every accumulator on every k (measured:
 * half the speed). */
#if defined(__clang__)
#define UNROLL8 _Pragma("unroll 8")
#else
#define UNROLL8 _Pragma("GCC unroll 8")
#endif

/* Up to how many rows this build beats oneDNN on the same bytes, for blocks of `block` rows
 * (measured crossovers, B = 64: 12-16 with AVX-512, 8-10 with AVX2); 0 when it has no packed
 * linear for that layout. B = 16: every batch (1-thread CPU time of a SmolLM2 layer's products
 * on an AVX2 EPYC, this loop vs oneDNN on the same bytes: 0.67x at M = 1, 0.94x at 32, equal
 * from 48 to 512, where both run at ~85 GFLOP/s per core), so a row's result never depends on
 * the batch it was computed in, prefill or decode, and no oneDNN primitive is made per M. */
#ifndef ROWS16
#define ROWS16 (1 << 30)
#endif
int moeflow_packed_linear_rows(int block)
{
#if defined(HAVE_PACKED_LINEAR)
    if (block == 16) return ROWS16;
    if (block != 64) return 0;
#if defined(__AVX512F__)
    return 12;
#else
    return 1;  /* past one row, oneDNN's own tiles beat re-reading the panel row by row */
#endif
#else
    (void)block;
    return 0;
#endif
}

#if defined(__AVX512F__)
/* Rows [0, R) of x (leading dimension ldx) times columns [c0 * 16, (c0 + C) * 16) of one
 * 64-row block; results to y (leading dimension ldy, first column of the slice). */
#define DEFINE_TILE(R, C)                                                                    \
    static void tile_##R##_##C(float *restrict y, int64_t ldy, const float *restrict x,     \
                               int64_t ldx, const float *restrict panel, int64_t K,         \
                               int64_t c0, int64_t ncols)                                   \
    {                                                                                        \
        __m512 acc[R][C];                                                                    \
        UNROLL8 for (int r = 0; r < R; r++)                                                  \
            UNROLL8 for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();             \
        const float *p = panel + c0 * 16;                                                    \
        for (int64_t k = 0; k < K; k++, p += 64) {                                           \
            __m512 w[C];                                                                     \
            for (int c = 0; c < C; c++) w[c] = _mm512_loadu_ps(p + 16 * c);                  \
            for (int r = 0; r < R; r++) {                                                    \
                const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);                            \
                for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(xb, w[c], acc[r][c]); \
            }                                                                                \
        }                                                                                    \
        for (int r = 0; r < R; r++)                                                          \
            for (int c = 0; c < C; c++) {                                                    \
                const int64_t left = ncols - 16 * c;                                         \
                if (left >= 16)                                                              \
                    _mm512_storeu_ps(y + r * ldy + 16 * c, acc[r][c]);                       \
                else if (left > 0)                                                           \
                    _mm512_mask_storeu_ps(y + r * ldy + 16 * c,                              \
                                          (__mmask16)((1u << left) - 1u), acc[r][c]);        \
            }                                                                                \
    }

DEFINE_TILE(1, 4)
DEFINE_TILE(2, 4)
DEFINE_TILE(3, 4)
DEFINE_TILE(4, 4)

typedef void (*tile_fn)(float *restrict, int64_t, const float *restrict, int64_t,
                        const float *restrict, int64_t, int64_t, int64_t);

static const tile_fn TILES[R_MAX + 1] = {NULL, tile_1_4, tile_2_4, tile_3_4, tile_4_4};
#define COLS_PER_PASS 64
#elif defined(HAVE_PACKED_LINEAR)
/* AVX2 (16 vector registers): one row at a time over a block's 64 columns (8 accumulators,
 * the weights as memory operands). The first row streams the panel from memory into cache,
 * the other rows re-read it from there. (Two passes of 32 columns instead would each fetch
 * half of every 256-byte row and leave the other half to a second trip to memory.) */
#undef R_MAX
#define R_MAX 1
static void tile8_1(float *restrict y, int64_t ldy, const float *restrict x, int64_t ldx,
                    const float *restrict panel, int64_t K, int64_t c0, int64_t ncols)
{
    (void)ldy, (void)ldx, (void)c0;
    __m256 acc[8];
    UNROLL8 for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
    const float *p = panel;
    for (int64_t k = 0; k < K; k++, p += 64) {
        const __m256 xb = _mm256_broadcast_ss(x + k);
        UNROLL8 for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(p + 8 * c), acc[c]);
    }
    UNROLL8 for (int c = 0; c < 8; c++) {
        const int64_t left = ncols - 8 * c;
        if (left >= 8) {
            _mm256_storeu_ps(y + 8 * c, acc[c]);
        } else if (left > 0) {
            float tmp[8];
            _mm256_storeu_ps(tmp, acc[c]);
            memcpy(y + 8 * c, tmp, sizeof(float) * (size_t)left);
        }
    }
}

typedef void (*tile_fn)(float *restrict, int64_t, const float *restrict, int64_t,
                        const float *restrict, int64_t, int64_t, int64_t);

static const tile_fn TILES[R_MAX + 1] = {NULL, tile8_1};
#define COLS_PER_PASS 64
#endif

#if defined(HAVE_PACKED_LINEAR)
/* Rows [0, R) of x times the 16 columns of one 16-row block (ncols of them are real). */
#define DEFINE_TILE16(R)                                                                     \
    static void tile16_##R(float *restrict y, int64_t ldy, const float *restrict x,         \
                           int64_t ldx, const float *restrict panel, int64_t K, int64_t ncols) \
    {                                                                                        \
        __m256 lo[R], hi[R];                                                                 \
        /* unrolled, so that GCC keeps the arrays in registers (not a memset'd stack copy) */ \
        UNROLL8 for (int r = 0; r < R; r++) {                                                \
            lo[r] = _mm256_setzero_ps();                                                     \
            hi[r] = _mm256_setzero_ps();                                                     \
        }                                                                                    \
        const float *p = panel;                                                              \
        for (int64_t k = 0; k < K; k++, p += 16) {                                           \
            const __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8);               \
            UNROLL8 for (int r = 0; r < R; r++) {                                            \
                const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);                      \
                lo[r] = _mm256_fmadd_ps(xb, w0, lo[r]);                                      \
                hi[r] = _mm256_fmadd_ps(xb, w1, hi[r]);                                      \
            }                                                                                \
        }                                                                                    \
        UNROLL8 for (int r = 0; r < R; r++) {                                                \
            if (ncols == 16) {                                                               \
                _mm256_storeu_ps(y + r * ldy, lo[r]);                                        \
                _mm256_storeu_ps(y + r * ldy + 8, hi[r]);                                    \
            } else {                                                                         \
                float tmp[16];                                                               \
                _mm256_storeu_ps(tmp, lo[r]);                                                \
                _mm256_storeu_ps(tmp + 8, hi[r]);                                            \
                memcpy(y + r * ldy, tmp, sizeof(float) * (size_t)ncols);                     \
            }                                                                                \
        }                                                                                    \
    }

DEFINE_TILE16(1)
DEFINE_TILE16(2)
DEFINE_TILE16(3)
DEFINE_TILE16(4)
DEFINE_TILE16(5)
DEFINE_TILE16(6)

typedef void (*tile16_fn)(float *restrict, int64_t, const float *restrict, int64_t,
                          const float *restrict, int64_t, int64_t);

static const tile16_fn TILES16[7] = {NULL, tile16_1, tile16_2, tile16_3,
                                     tile16_4, tile16_5, tile16_6};

/* 16-row blocks; rows in passes of up to ROWS_PER_PASS (so that a pass's rows of x stay in
 * the L2 cache while the weight streams by), each pass in about equal groups of up to 6. */
#ifndef ROWS_PER_PASS
#define ROWS_PER_PASS 96
#endif
static void packed_linear16(float *restrict y, const float *restrict x, int64_t M, int64_t ldx,
                            const float *restrict packed, int64_t N, int64_t K, int64_t Kp,
                            int num_threads)
{
    const int64_t blocks = (N + 15) / 16;
#pragma omp parallel num_threads(num_threads)
    for (int64_t m0 = 0; m0 < M; m0 += ROWS_PER_PASS) {
        const int64_t rows = M - m0 < ROWS_PER_PASS ? M - m0 : ROWS_PER_PASS;
        const int64_t groups = (rows + 5) / 6;
#pragma omp for schedule(static) nowait
        for (int64_t nb = 0; nb < blocks; nb++) {
            const float *panel = packed + nb * Kp * 16;
            const int64_t cols = N - nb * 16 < 16 ? N - nb * 16 : 16;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t r0 = m0 + g * rows / groups, r1 = m0 + (g + 1) * rows / groups;
                TILES16[r1 - r0](y + r0 * N + nb * 16, N, x + r0 * ldx, ldx, panel, K, cols);
            }
        }
    }
}
#endif

/* y [M, N] (row-major, contiguous) = x [M, K] (leading dimension ldx) @ W^T, W packed in blocks
 * of `block` rows (64 or 16). Returns 0, or -1 when this build has no loop for that layout (the
 * caller then uses oneDNN). */
int moeflow_packed_linear(float *restrict y, const float *restrict x, int64_t M, int64_t ldx,
                          const float *restrict packed, int64_t N, int64_t K, int64_t Kp,
                          int64_t block, int num_threads)
{
#if defined(HAVE_PACKED_LINEAR)
    if (block == 16) {
        packed_linear16(y, x, M, ldx, packed, N, K, Kp, num_threads);
        return 0;
    }
    if (block != 64) return -1;

    const int64_t blocks = (N + 63) / 64;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t nb = 0; nb < blocks; nb++) {
        const float *panel = packed + nb * Kp * 64;
        const int64_t cols = N - nb * 64 < 64 ? N - nb * 64 : 64;
        for (int64_t r0 = 0; r0 < M; r0 += R_MAX) {
            const int64_t rows = M - r0 < R_MAX ? M - r0 : R_MAX;
            for (int64_t c0 = 0; c0 * 16 < cols; c0 += COLS_PER_PASS / 16) {
                TILES[rows](y + r0 * N + nb * 64 + c0 * 16, N, x + r0 * ldx, ldx, panel, K, c0,
                            cols - c0 * 16);
            }
        }
    }
    return 0;
#else
    (void)y, (void)x, (void)M, (void)ldx, (void)packed, (void)N, (void)K, (void)Kp, (void)block,
        (void)num_threads;
    return -1;
#endif
}
