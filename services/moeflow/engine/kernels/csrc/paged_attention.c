/* Decode attention over the paged KV cache, read in place.
 *
 * One new token per sequence attends to its whole context, whose K/V rows sit in the cache
 * blocks listed in the sequence's block table. The torch path copies every context out of the
 * cache (a gather) before SDPA, once per layer; this kernel reads the rows where they are.
 *
 * Arithmetic follows ATen's CPU flash attention (what transformers runs in float32), so the
 * result differs from it only by rounding: scores = (q . k) * scale, m = max, p = exp(s - m),
 * out = (sum_t p_t v_t) * (1 / sum_t p_t). Grouped-query attention: query head h reads KV head
 * h / (H / K), as transformers' repeat_kv does.
 *
 * Work is split over sequences with OpenMP (over (sequence, KV head) pairs when there are too
 * few sequences for the threads). The library links the OpenMP runtime torch already loaded
 * (same soname), so it shares torch's thread pool; the caller passes torch's thread count.
 *
 * With AVX-512 and a head dim of 32, 64 or 128, the query heads of one KV group (up to 4 at a
 * time) run together with their q, the K/V row chunks and the output accumulators in vector
 * registers, and the softmax exponentials are computed 16 at a time (a Cephes-style expf,
 * within 2 ulp of libm's). With AVX2 only, head dims 32 and 64 run one query head per pass
 * the same way. Other shapes take the portable loop.
 *
 * Layouts (float32, row-major):
 *   q            [D, H, Hd], token stride q_stride (floats), heads and dims contiguous
 *   out          [D, H, Hd] contiguous
 *   k/v_cache    [S, K, Hd] contiguous, S = num_blocks * block_size, slot = block * bs + offset
 *   block_tables [D, max_blocks] int32, context_lens [D] int32 (each >= 1)
 * Returns 0, or -1 when scratch memory could not be allocated (out is then incomplete).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include "vexp.h"

/* Fully unrolled loops over vector arrays: otherwise GCC may turn a zeroing loop into a memset
 * and keep the array on the stack, storing it on every iteration. */
#if defined(__clang__)
#define UNROLL8 _Pragma("unroll 8")
#else
#define UNROLL8 _Pragma("GCC unroll 8")
#endif

/* Set by kernels/native.py at build time (its ABI), so the two cannot drift apart. */
int moeflow_kernels_abi(void) { return MOEFLOW_KERNELS_ABI; }

/* q . k with fused multiply-adds and a tree reduction at the end (a compiler's own `simd
 * reduction` ends in 16 dependent scalar adds, measured as most of this kernel's time). */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n)
{
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    s = _mm_cvtss_f32(x);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#if defined(__AVX512F__)
#define HAVE_GROUP_PASS 1
/* exp(x) for x <= 0 (scores minus their max): Cody-Waite reduction by ln 2, Cephes' degree-6
 * polynomial, 2^n applied with scalef (which also flushes very negative x to 0). */
static inline __m512 exp_nonpositive(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* In place: sc[t] = exp(sc[t] - max); returns the sum. */
static inline float softmax_numerators(float *restrict sc, int64_t len)
{
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sc + t));
    const __mmask16 tail = (__mmask16)((1u << (len - t)) - 1u);
    vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, sc + t));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= len; t += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sc + t), m));
        _mm512_storeu_ps(sc + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (tail) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + t), m));
        _mm512_mask_storeu_ps(sc + t, tail, e);
        vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
    }
    return _mm512_reduce_add_ps(vsum);
}

/* The rows of the block after block b (NULL at the context's end): blocks sit anywhere in the
 * cache, so the hardware prefetcher loses the stream at each block edge; row j of the next
 * block is requested while row j of this one is read. */
static inline const float *next_rows(const float *cache, const int32_t *restrict table,
                                     int64_t b, int64_t next_t, int64_t len,
                                     int64_t block_size, int64_t row)
{
    return next_t < len ? cache + (int64_t)table[b + 1] * block_size * row : NULL;
}

/* NH query heads sharing one KV head, head dim 16 * HD16: q (heads contiguous) -> out. */
#define DEFINE_GROUP_PASS(HD16, NH)                                                          \
    static void group_##HD16##_##NH(                                                         \
        float *restrict out, const float *restrict q, const float *restrict k_cache,        \
        const float *restrict v_cache, const int32_t *restrict table, int64_t len,          \
        int64_t kv_offset, int64_t row, int64_t block_size, float scale,                    \
        float *restrict scores)                                                              \
    {                                                                                        \
        __m512 qv[NH][HD16], acc[NH][HD16];                                                  \
        UNROLL8 for (int g = 0; g < NH; g++)                                                 \
            UNROLL8 for (int c = 0; c < HD16; c++) {                                         \
                qv[g][c] = _mm512_loadu_ps(q + (g * HD16 + c) * 16);                         \
                acc[g][c] = _mm512_setzero_ps();                                             \
            }                                                                                \
        for (int64_t b = 0, t = 0; t < len; b++) {                                           \
            const int64_t n = len - t < block_size ? len - t : block_size;                   \
            const float *kr = k_cache + (int64_t)table[b] * block_size * row + kv_offset;    \
            const float *kn = next_rows(k_cache, table, b, t + n, len, block_size, row);     \
            for (int64_t j = 0; j < n; j++, t++, kr += row) {                                \
                if (kn != NULL)                                                                \
                    UNROLL8 for (int c = 0; c < HD16; c++) _mm_prefetch(kn + kv_offset + j * row + 16 * c, _MM_HINT_T0); \
                __m512 kc[HD16];                                                             \
                UNROLL8 for (int c = 0; c < HD16; c++) kc[c] = _mm512_loadu_ps(kr + 16 * c); \
                UNROLL8 for (int g = 0; g < NH; g++) {                                       \
                    __m512 d = _mm512_mul_ps(qv[g][0], kc[0]);                               \
                    UNROLL8 for (int c = 1; c < HD16; c++) d = _mm512_fmadd_ps(qv[g][c], kc[c], d);  \
                    scores[g * len + t] = _mm512_reduce_add_ps(d) * scale;                   \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        float inv[NH];                                                                       \
        UNROLL8 for (int g = 0; g < NH; g++) inv[g] = 1.0f / softmax_numerators(scores + g * len, len); \
        for (int64_t b = 0, t = 0; t < len; b++) {                                           \
            const int64_t n = len - t < block_size ? len - t : block_size;                   \
            const float *vr = v_cache + (int64_t)table[b] * block_size * row + kv_offset;    \
            const float *vn = next_rows(v_cache, table, b, t + n, len, block_size, row);     \
            for (int64_t j = 0; j < n; j++, t++, vr += row) {                                \
                if (vn != NULL)                                                                \
                    UNROLL8 for (int c = 0; c < HD16; c++) _mm_prefetch(vn + kv_offset + j * row + 16 * c, _MM_HINT_T0); \
                __m512 vc[HD16];                                                             \
                UNROLL8 for (int c = 0; c < HD16; c++) vc[c] = _mm512_loadu_ps(vr + 16 * c); \
                UNROLL8 for (int g = 0; g < NH; g++) {                                       \
                    const __m512 p = _mm512_set1_ps(scores[g * len + t]);                    \
                    UNROLL8 for (int c = 0; c < HD16; c++)                                   \
                        acc[g][c] = _mm512_fmadd_ps(p, vc[c], acc[g][c]);                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        UNROLL8 for (int g = 0; g < NH; g++) {                                               \
            const __m512 s = _mm512_set1_ps(inv[g]);                                         \
            UNROLL8 for (int c = 0; c < HD16; c++)                                           \
                _mm512_storeu_ps(out + (g * HD16 + c) * 16, _mm512_mul_ps(acc[g][c], s));    \
        }                                                                                    \
    }

DEFINE_GROUP_PASS(2, 1)
DEFINE_GROUP_PASS(2, 2)
DEFINE_GROUP_PASS(2, 3)
DEFINE_GROUP_PASS(2, 4)
DEFINE_GROUP_PASS(4, 1)
DEFINE_GROUP_PASS(4, 2)
DEFINE_GROUP_PASS(4, 3)
DEFINE_GROUP_PASS(4, 4)
DEFINE_GROUP_PASS(8, 1)
DEFINE_GROUP_PASS(8, 2)

typedef void (*group_fn)(float *restrict, const float *restrict, const float *restrict,
                         const float *restrict, const int32_t *restrict, int64_t, int64_t,
                         int64_t, int64_t, float, float *restrict);

/* The pass for head_dim and up to `heads` heads (NULL: no fast path), and how many it takes. */
static group_fn group_pass(int64_t head_dim, int64_t heads, int64_t *taken)
{
    static const group_fn by_hd2[4] = {group_2_1, group_2_2, group_2_3, group_2_4};
    static const group_fn by_hd4[4] = {group_4_1, group_4_2, group_4_3, group_4_4};
    static const group_fn by_hd8[2] = {group_8_1, group_8_2};
    switch (head_dim) {
    case 32: *taken = heads < 4 ? heads : 4; return by_hd2[*taken - 1];
    case 64: *taken = heads < 4 ? heads : 4; return by_hd4[*taken - 1];
    case 128: *taken = heads < 2 ? heads : 2; return by_hd8[*taken - 1];
    default: *taken = heads; return NULL;
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define HAVE_GROUP_PASS 1
/* AVX2 (16 vector registers): one query head per pass, head dims 32 and 64; exp as in the
 * AVX-512 path (vexp.h). */
static inline float hsum8(__m256 v)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

static inline __m256i tail_mask8(int64_t left)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float softmax_numerators(float *restrict sc, int64_t len)
{
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sc + t));
    float m = -INFINITY;
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    for (int64_t u = t; u < len; u++) m = sc[u] > m ? sc[u] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (t = 0; t + 8 <= len; t += 8) {
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), vm));
        _mm256_storeu_ps(sc + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    if (t < len) {
        const __m256i mask = tail_mask8(len - t);
        const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(sc + t, mask), vm));
        _mm256_maskstore_ps(sc + t, mask, e);
        vsum = _mm256_add_ps(vsum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
    }
    return hsum8(vsum);
}

#define DEFINE_GROUP_PASS8(HD8)                                                              \
    static void group8_##HD8(float *restrict out, const float *restrict q,                  \
                             const float *restrict k_cache, const float *restrict v_cache,  \
                             const int32_t *restrict table, int64_t len, int64_t kv_offset, \
                             int64_t row, int64_t block_size, float scale,                  \
                             float *restrict scores)                                         \
    {                                                                                        \
        __m256 qv[HD8];                                                                      \
        UNROLL8 for (int c = 0; c < HD8; c++) qv[c] = _mm256_loadu_ps(q + 8 * c);            \
        for (int64_t b = 0, t = 0; t < len; b++) {                                           \
            const int64_t n = len - t < block_size ? len - t : block_size;                   \
            const float *kr = k_cache + (int64_t)table[b] * block_size * row + kv_offset;    \
            for (int64_t j = 0; j < n; j++, t++, kr += row) {                                \
                __m256 d = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kr));                        \
                UNROLL8 for (int c = 1; c < HD8; c++)                                        \
                    d = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kr + 8 * c), d);              \
                scores[t] = hsum8(d) * scale;                                                \
            }                                                                                \
        }                                                                                    \
        const float inv = 1.0f / softmax_numerators(scores, len);                           \
        __m256 acc[HD8];                                                                     \
        UNROLL8 for (int c = 0; c < HD8; c++) acc[c] = _mm256_setzero_ps();                  \
        for (int64_t b = 0, t = 0; t < len; b++) {                                           \
            const int64_t n = len - t < block_size ? len - t : block_size;                   \
            const float *vr = v_cache + (int64_t)table[b] * block_size * row + kv_offset;    \
            for (int64_t j = 0; j < n; j++, t++, vr += row) {                                \
                const __m256 p = _mm256_set1_ps(scores[t]);                                  \
                UNROLL8 for (int c = 0; c < HD8; c++)                                        \
                    acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * c), acc[c]);        \
            }                                                                                \
        }                                                                                    \
        const __m256 s = _mm256_set1_ps(inv);                                                \
        UNROLL8 for (int c = 0; c < HD8; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], s)); \
    }

DEFINE_GROUP_PASS8(4)
DEFINE_GROUP_PASS8(8)

typedef void (*group_fn)(float *restrict, const float *restrict, const float *restrict,
                         const float *restrict, const int32_t *restrict, int64_t, int64_t,
                         int64_t, int64_t, float, float *restrict);

static group_fn group_pass(int64_t head_dim, int64_t heads, int64_t *taken)
{
    *taken = heads < 1 ? heads : 1;
    switch (head_dim) {
    case 32: return group8_4;
    case 64: return group8_8;
    default: *taken = heads; return NULL;
    }
}
#endif

/* Heads [h0, h0 + nh) of one sequence (whole KV groups). The context's rows come block by
 * block, each block's slots contiguous in the cache. scores: nh * len floats; acc: nh *
 * head_dim floats; sums: nh floats. */
static void attend(float *restrict og, const float *restrict qg, const float *restrict k_cache,
                   const float *restrict v_cache, const int32_t *restrict table, int64_t len,
                   int64_t h0, int64_t nh, int64_t group, int64_t row, int64_t head_dim,
                   int64_t block_size, float scale, float *restrict scores,
                   float *restrict acc, float *restrict sums)
{
#if defined(HAVE_GROUP_PASS)
    int64_t taken = 0;
    if (group_pass(head_dim, group, &taken) != NULL) {
        for (int64_t h = 0; h < nh; h += taken) {
            /* heads [h0 + h, ...) of one KV group; a pass never crosses a group's end */
            const int64_t in_group = group - (h0 + h) % group;
            const group_fn pass = group_pass(head_dim, in_group, &taken);
            pass(og + h * head_dim, qg + h * head_dim, k_cache, v_cache, table, len,
                 ((h0 + h) / group) * head_dim, row, block_size, scale, scores);
        }
        return;
    }
#endif
    for (int64_t b = 0, t = 0; t < len; b++) {
        const int64_t n = len - t < block_size ? len - t : block_size;
        const float *kr = k_cache + (int64_t)table[b] * block_size * row;
        for (int64_t j = 0; j < n; j++, t++, kr += row) {
            for (int64_t h = 0; h < nh; h++) {
                const float *qr = qg + h * head_dim;
                const float *kh = kr + ((h0 + h) / group) * head_dim;
                scores[h * len + t] = dot(qr, kh, head_dim) * scale;
            }
        }
    }
    for (int64_t h = 0; h < nh; h++) {
        float *sc = scores + h * len;
        float m = -INFINITY;
        for (int64_t t = 0; t < len; t++) m = sc[t] > m ? sc[t] : m;
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        sums[h] = sum;
    }
    memset(acc, 0, sizeof(float) * (size_t)(nh * head_dim));
    for (int64_t b = 0, t = 0; t < len; b++) {
        const int64_t n = len - t < block_size ? len - t : block_size;
        const float *vr = v_cache + (int64_t)table[b] * block_size * row;
        for (int64_t j = 0; j < n; j++, t++, vr += row) {
            for (int64_t h = 0; h < nh; h++) {
                const float p = scores[h * len + t];
                const float *vh = vr + ((h0 + h) / group) * head_dim;
                float *a = acc + h * head_dim;
#pragma omp simd
                for (int64_t i = 0; i < head_dim; i++) a[i] += p * vh[i];
            }
        }
    }
    for (int64_t h = 0; h < nh; h++) {
        const float inv = 1.0f / sums[h];
        const float *a = acc + h * head_dim;
        float *o = og + h * head_dim;
#pragma omp simd
        for (int64_t i = 0; i < head_dim; i++) o[i] = a[i] * inv;
    }
}

int moeflow_paged_decode_attention(
    float *restrict out, const float *restrict q, int64_t q_stride,
    const float *restrict k_cache, const float *restrict v_cache,
    const int32_t *restrict block_tables, int64_t max_blocks,
    const int32_t *restrict context_lens, int64_t num_seqs, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
    int num_threads)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t row = num_kv_heads * head_dim; /* floats per cache slot */
    /* One task per sequence reads each slot's K/V row whole (all KV heads: one contiguous
     * stretch per block). With too few sequences to keep every thread busy, one task per
     * (sequence, KV head) instead. Either way each head's arithmetic is the same. */
    const int64_t splits = num_seqs >= 2 * (int64_t)num_threads ? 1 : num_kv_heads;
    const int64_t nh = num_heads / splits;
    const int64_t tasks = num_seqs * splits;
    int64_t max_len = 1;
    for (int64_t d = 0; d < num_seqs; d++) {
        if (context_lens[d] > max_len) max_len = context_lens[d];
    }
    int failed = 0;

#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(nh * max_len));
        float *acc = malloc(sizeof(float) * (size_t)(nh * head_dim));
        float *sums = malloc(sizeof(float) * (size_t)nh);
        const int ok = scores != NULL && acc != NULL && sums != NULL;

#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            if (!ok) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const int64_t d = task / splits;
            const int64_t h0 = (task % splits) * nh;
            attend(out + (d * num_heads + h0) * head_dim, q + d * q_stride + h0 * head_dim,
                   k_cache, v_cache, block_tables + d * max_blocks, context_lens[d], h0, nh,
                   group, row, head_dim, block_size, scale, scores, acc, sums);
        }
        free(scores);
        free(acc);
        free(sums);
    }
    return failed ? -1 : 0;
}
