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
 * few sequences for the threads); the query heads of a KV group share its K/V reads. The library links the OpenMP runtime torch
 * already loaded (same soname), so it shares torch's thread pool; the caller passes the thread
 * count torch uses.
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

int moeflow_kernels_abi(void) { return 2; }

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

/* Heads [h0, h0 + nh) of one sequence (whole KV groups). The context's rows come block by
 * block, each block's slots contiguous in the cache. scores: nh * len floats; acc: nh *
 * head_dim floats; sums: nh floats. */
static void attend(float *restrict og, const float *restrict qg, const float *restrict k_cache,
                   const float *restrict v_cache, const int32_t *restrict table, int64_t len,
                   int64_t h0, int64_t nh, int64_t group, int64_t row, int64_t head_dim,
                   int64_t block_size, float scale, float *restrict scores,
                   float *restrict acc, float *restrict sums)
{
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
