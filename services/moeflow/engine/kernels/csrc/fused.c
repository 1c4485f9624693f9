/* The decoder's small per-layer steps, fused: one call instead of 6-12 torch ops each, and the
 * sampler's greedy pick over the logits.
 *
 * A decode step is ~30 layers x ~35 ops on a few kilobytes of activations, so the ops' fixed
 * costs (dispatch, allocation, a parallel region each) add up to a fifth of the step. The
 * per-layer loops run on the calling thread: the data is too small to split (the greedy pick
 * reads B x V logits, megabytes, and splits its rows).
 *
 * Arithmetic mirrors the torch expressions they replace, operation for operation, in the same
 * float32 rounding (the library is built as ISO C, so a * b + c is never contracted into a
 * fused multiply-add): RoPE and the residual adds give the very same bits as torch. The one
 * difference is the order in which RMSNorm sums the squares of a row (torch's reduction
 * order is its own), a last-bit difference in the variance.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include "vexp.h"

/* x_out = x + delta (when delta is not NULL, else x_out = x, which may alias), then
 * h = weight * (x_out * (1 / sqrt(mean(x_out^2) + eps))), for T rows of E values:
 *   x + delta;  h = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))  */
void moeflow_add_rms_norm(float *x_out, float *restrict h, const float *x,
                          const float *restrict delta, const float *restrict weight,
                          int64_t rows, int64_t E, float eps)
{
    for (int64_t t = 0; t < rows; t++) {
        float *xo = x_out + t * E;
        const float *xr = x + t * E;
        if (delta != NULL) {
            const float *d = delta + t * E;
            for (int64_t i = 0; i < E; i++) xo[i] = xr[i] + d[i];
        } else if (xo != xr) {
            memcpy(xo, xr, sizeof(float) * (size_t)E);
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < E; i++) ss += xo[i] * xo[i];
        const float r = 1.0f / sqrtf(ss / (float)E + eps);
        float *hr = h + t * E;
        for (int64_t i = 0; i < E; i++) hr[i] = weight[i] * (xo[i] * r);
    }
}

/* RoPE on the q and k heads of each token's fused qkv row, then this step's K/V into the
 * cache:  qk = qkv[:, :H + K];  qk = (qk * cos) + (rotate_half(qk) * sin)  (rotate_half(x)
 * = cat(-x[half:], x[:half])), k and v rows to their slots.
 *   qkv    [T, ld] rows: H + 2K heads of Hd values (q, then k, then v)
 *   qk_out [T, H + K, Hd] contiguous
 *   cos/sin [T, Hd]: each token's rows of the RoPE tables; slots [T] (int64)
 *   k/v_cache [S, K, Hd] contiguous  */
void moeflow_rope_store(float *restrict qk_out, const float *restrict qkv, int64_t ld,
                        const float *restrict cos_rows, const float *restrict sin_rows,
                        float *restrict k_cache,
                        float *restrict v_cache, const int64_t *restrict slots, int64_t T,
                        int64_t H, int64_t K, int64_t Hd)
{
    const int64_t half = Hd / 2;
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_rows + t * Hd;
        const float *s = sin_rows + t * Hd;
        const float *row = qkv + t * ld;
        for (int64_t head = 0; head < H + K; head++) {
            const float *x = row + head * Hd;
            float *o = qk_out + (t * (H + K) + head) * Hd;
            for (int64_t i = 0; i < half; i++) o[i] = x[i] * c[i] + (-x[i + half]) * s[i];
            for (int64_t i = half; i < Hd; i++) o[i] = x[i] * c[i] + x[i - half] * s[i];
        }
        const int64_t slot = slots[t];
        memcpy(k_cache + slot * K * Hd, qk_out + (t * (H + K) + H) * Hd,
               sizeof(float) * (size_t)(K * Hd));
        memcpy(v_cache + slot * K * Hd, row + (H + K) * Hd, sizeof(float) * (size_t)(K * Hd));
    }
}

/* Greedy pick and validity of B rows of V logits (row stride ld), in one pass over each row
 * instead of torch's five (argmax, isfinite, == -inf, all, max):
 *   argmax[r] = the first index of the row's maximum (torch.argmax's tie rule);
 *   valid[r]  = 1 when the row has no NaN and no +inf and is not all -inf, else 0 (then
 *               argmax[r] is meaningless).
 * With AVX2, 8 lanes each keep their own maximum and its first index; the lanes are merged
 * at the end (the largest value, the smallest index among equals). Rows run in parallel. */
static void greedy_row(const float *restrict row, int64_t V, int64_t *restrict argmax,
                       uint8_t *restrict valid)
{
    float best = -INFINITY;
    int64_t best_i = 0, i = 0;
    int ok = 1;
#if defined(__AVX2__)
    if (V >= 8 && V <= INT32_MAX) {
        __m256 vbest = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
        __m256i vidx = _mm256_set1_epi32(0), cur = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i step = _mm256_set1_epi32(8);
        const __m256 inf = _mm256_set1_ps(INFINITY);
        for (; i + 8 <= V; i += 8) {
            const __m256 x = _mm256_loadu_ps(row + i);
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(x, inf, _CMP_EQ_OQ));
            const __m256 gt = _mm256_cmp_ps(x, vbest, _CMP_GT_OQ);
            vbest = _mm256_blendv_ps(vbest, x, gt);
            vidx = _mm256_blendv_epi8(vidx, cur, _mm256_castps_si256(gt));
            cur = _mm256_add_epi32(cur, step);
        }
        float lanes[8];
        int32_t idx[8];
        _mm256_storeu_ps(lanes, vbest);
        _mm256_storeu_si256((__m256i *)idx, vidx);
        for (int l = 0; l < 8; l++)
            if (lanes[l] > best || (lanes[l] == best && lanes[l] > -INFINITY && idx[l] < best_i)) {
                best = lanes[l];
                best_i = idx[l];
            }
        ok = _mm256_movemask_ps(bad) == 0;
    }
#endif
    for (; i < V; i++) {
        const float x = row[i];
        if (x != x || x == INFINITY) ok = 0; /* NaN or +inf */
        if (x > best) {
            best = x;
            best_i = i;
        }
    }
    *argmax = best_i;
    *valid = (uint8_t)(ok && best > -INFINITY);
}

void moeflow_greedy_rows(const float *logits, int64_t B, int64_t V, int64_t ld,
                         int64_t *restrict argmax, uint8_t *restrict valid, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (B > 1)
    for (int64_t r = 0; r < B; r++) greedy_row(logits + r * ld, V, argmax + r, valid + r);
}

/* The gated MLP's activation: out[r, i] = silu(g) * u with g = gate_up[r, i] and
 * u = gate_up[r, I + i] (gate rows then up rows, as the fused gate_up product writes them);
 * gate_up rows have stride ld, out is [rows, I] contiguous. One pass, no temporaries, instead
 * of torch's chunk + silu + mul. silu(g) = g * sigmoid(g), with e = exp(-|g|) so exp never
 * overflows: sigmoid = 1 / (1 + e) for g >= 0, e / (1 + e) below; torch computes
 * g / (1 + exp(-g)), so results differ from it by a few ulps (exp's own rounding). */
static void silu_mul_row(float *restrict out, const float *restrict g, const float *restrict u,
                         int64_t I)
{
    int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= I; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp_nonpositive8(_mm256_or_ps(x, sign)); /* exp(-|x|) */
        const __m256 num = _mm256_blendv_ps(one, e, x);           /* x < 0 (sign bit): e */
        const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < I; i++) {
        const float x = g[i], e = expf(-fabsf(x));
        out[i] = x * ((signbit(x) ? e : 1.0f) / (1.0f + e)) * u[i];
    }
}

void moeflow_silu_mul(float *restrict out, const float *restrict gate_up, int64_t rows,
                      int64_t I, int64_t ld, int num_threads)
{
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * I >= (1 << 16))
    for (int64_t r = 0; r < rows; r++)
        silu_mul_row(out + r * I, gate_up + r * ld, gate_up + r * ld + I, I);
}
