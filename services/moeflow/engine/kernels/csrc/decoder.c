/* Every decoder layer of a decode-only step in one call.
 *
 * Why: with the products, attention and the small steps all in C, a batch-1 decode step of
 * SmolLM2 (30 layers, ~9 kernel calls each) still spent ~4.6 ms of ~25 in Python between the
 * calls: argument checks, output allocations, ctypes conversions, views. The memory bus idles
 * meanwhile, and batch-1 decode is bound by how fast the weights stream.
 *
 * What: exactly the calls the Python decoder makes for a dense layer with C kernels
 * (models/decoder.py, DecoderModel.forward), in the same order, with the same arguments and
 * thread count, so every value is bit-identical to that path:
 *   h = norm(x)                                      (layer 0's input norm)
 *   per layer i:
 *     qkv = h @ Wqkv^T; RoPE on q, k; k, v -> cache    (moeflow_rope_store)
 *     a = attention(q, cache)                          (moeflow_paged_decode_attention)
 *     x += a @ Wo^T; h = norm(x)                       (post-attention norm)
 *     x += silu_mul(h @ Wgu^T) @ Wdown^T; h = norm(x)  (next layer's input norm, or the final)
 *
 * Arguments (float32, row-major, contiguous):
 *   x [T, E]: the embeddings in, the residual stream out; h [T, E]: the final normed rows out
 *   scratch: at least T * ((H + 2K) * Hd + (H + K) * Hd + H * Hd + E + 3 I) floats
 *   weights [L][6]: addresses of input_norm [E], post_norm [E], Wqkv, Wo, Wgu, Wdown (packed)
 *   packing [L][4][2]: (Kp, block rows) of Wqkv, Wo, Wgu, Wdown
 *   kv_cache: layer i's K cache at kv_cache + i * kv_layer_stride, its V cache kv_half_stride
 *     further on, each [S, K, Hd]
 *   cos_rows/sin_rows [T, Hd], slots [T] int64, block_tables [T, max_blocks] int32,
 *   context_lens [T] int32: the step's rows, one decoding sequence per token
 * Returns 0; -1 when a weight's block layout has no C loop in this build; -2 when attention
 * could not allocate its scratch memory (x, h and the cache are then incomplete).
 */
#include <stddef.h>
#include <stdint.h>

int moeflow_packed_linear(float *restrict y, const float *restrict x, int64_t M, int64_t ldx,
                          const float *restrict packed, int64_t N, int64_t K, int64_t Kp,
                          int64_t block, int num_threads);
void moeflow_add_rms_norm(float *x_out, float *restrict h, const float *x,
                          const float *restrict delta, const float *restrict weight,
                          int64_t rows, int64_t E, float eps);
void moeflow_rope_store(float *restrict qk_out, const float *restrict qkv, int64_t ld,
                        const float *restrict cos_rows, const float *restrict sin_rows,
                        float *restrict k_cache, float *restrict v_cache,
                        const int64_t *restrict slots, int64_t T, int64_t H, int64_t K,
                        int64_t Hd);
int moeflow_paged_decode_attention(
    float *restrict out, const float *restrict q, int64_t q_stride,
    const float *restrict k_cache, const float *restrict v_cache,
    const int32_t *restrict block_tables, int64_t max_blocks,
    const int32_t *restrict context_lens, int64_t num_seqs, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, int num_threads);
void moeflow_silu_mul(float *restrict out, const float *restrict gate_up, int64_t rows,
                      int64_t I, int64_t ld, int num_threads);

int moeflow_decoder_layers(
    float *x, float *h, float *scratch, const int64_t *weights, const int64_t *packing,
    const float *final_norm, int64_t L, int64_t T, int64_t E, int64_t H, int64_t K, int64_t Hd,
    int64_t I, const float *cos_rows, const float *sin_rows, const int64_t *slots,
    float *kv_cache, int64_t kv_layer_stride, int64_t kv_half_stride,
    const int32_t *block_tables, int64_t max_blocks, const int32_t *context_lens,
    int64_t block_size, float scale, float eps, int num_threads)
{
    const int64_t qkv_n = (H + 2 * K) * Hd, qk_n = (H + K) * Hd, attn_n = H * Hd;
    float *qkv = scratch;
    float *qk = qkv + T * qkv_n;
    float *attn = qk + T * qk_n;
    float *delta = attn + T * attn_n;
    float *gate_up = delta + T * E;
    float *act = gate_up + T * 2 * I;
#define W(i, j) ((const float *)(intptr_t)weights[(i) * 6 + (j)])
#define KP(i, p) packing[(i) * 8 + (p) * 2]
#define BLOCK(i, p) packing[(i) * 8 + (p) * 2 + 1]
    moeflow_add_rms_norm(x, h, x, NULL, W(0, 0), T, E, eps);
    for (int64_t i = 0; i < L; i++) {
        float *k_cache = kv_cache + i * kv_layer_stride;
        float *v_cache = k_cache + kv_half_stride;
        if (moeflow_packed_linear(qkv, h, T, E, W(i, 2), qkv_n, E, KP(i, 0), BLOCK(i, 0),
                                  num_threads))
            return -1;
        moeflow_rope_store(qk, qkv, qkv_n, cos_rows, sin_rows, k_cache, v_cache, slots, T, H, K,
                           Hd);
        if (moeflow_paged_decode_attention(attn, qk, qk_n, k_cache, v_cache, block_tables,
                                           max_blocks, context_lens, T, H, K, Hd, block_size,
                                           scale, num_threads))
            return -2;
        if (moeflow_packed_linear(delta, attn, T, attn_n, W(i, 3), E, attn_n, KP(i, 1),
                                  BLOCK(i, 1), num_threads))
            return -1;
        moeflow_add_rms_norm(x, h, x, delta, W(i, 1), T, E, eps);
        if (moeflow_packed_linear(gate_up, h, T, E, W(i, 4), 2 * I, E, KP(i, 2), BLOCK(i, 2),
                                  num_threads))
            return -1;
        moeflow_silu_mul(act, gate_up, T, I, 2 * I, num_threads);
        if (moeflow_packed_linear(delta, act, T, I, W(i, 5), E, I, KP(i, 3), BLOCK(i, 3),
                                  num_threads))
            return -1;
        moeflow_add_rms_norm(x, h, x, delta, i + 1 < L ? W(i + 1, 0) : final_norm, T, E, eps);
    }
#undef W
#undef KP
#undef BLOCK
    return 0;
}
