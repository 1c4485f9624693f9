/* y = x @ W^T for a few rows of x, on W as oneDNN packs it for AVX-512 machines.
 *
 * The packed layout (checked by kernels/linear.py against each weight before this runs):
 * blocks of 64 output rows, each block [Kp][64] with Kp = K rounded up to 16 (zero padded), so
 * element (n, k) sits at (n / 64) * Kp * 64 + k * 64 + n % 64. For every k, the 64 outputs of a
 * block take one broadcast of x[r, k] and four 16-wide fused multiply-adds: the weight streams
 * through once, with no horizontal sums. oneDNN reads the same bytes at about 11 GB/s per core
 * when M = 1; this loop reads them at the memory's pace (measured ~22 GB/s on one core).
 *
 * Each output is one sequential sum over k in order (fused multiply-adds), whatever M, the
 * tiling or the thread count: a row's result does not depend on the rows beside it.
 *
 * Tiling: rows in groups of up to 4 (16 accumulators); a block's panel is read from memory by
 * the first group and from cache by the others. Past ~12 rows oneDNN's blocking wins (the
 * caller switches at moeflow_packed_linear_rows()). Without AVX-512, an AVX2 tile of one row x 64
 * columns reads the same layout (16 vector registers only).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define HAVE_PACKED_LINEAR 1
#endif

#define R_MAX 4

/* Up to how many rows this build beats oneDNN on the same bytes (measured crossovers: 12-16
 * with AVX-512, 8-10 with AVX2); 0 when it has no packed linear. */
int moeflow_packed_linear_rows(void)
{
#if defined(__AVX512F__)
    return 12;
#elif defined(HAVE_PACKED_LINEAR)
    return 8;
#else
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
        for (int r = 0; r < R; r++)                                                          \
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();                     \
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
    for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
    const float *p = panel;
    for (int64_t k = 0; k < K; k++, p += 64) {
        const __m256 xb = _mm256_broadcast_ss(x + k);
        for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(xb, _mm256_loadu_ps(p + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; c++) {
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

/* y [M, N] (row-major, contiguous) = x [M, K] (leading dimension ldx) @ W^T. Returns 0, or -1
 * when this build has no AVX-512 (the caller then uses oneDNN). */
int moeflow_packed_linear(float *restrict y, const float *restrict x, int64_t M, int64_t ldx,
                          const float *restrict packed, int64_t N, int64_t K, int64_t Kp,
                          int num_threads)
{
#if defined(HAVE_PACKED_LINEAR)
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
    (void)y, (void)x, (void)M, (void)ldx, (void)packed, (void)N, (void)K, (void)Kp,
        (void)num_threads;
    return -1;
#endif
}
