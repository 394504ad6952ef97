/* The small ops of a decode step on the CPU, fused per stage of a decoder layer (L1t).
 *
 * Built at run time by tokenloom/kernels/cpu_decode.py with the machine's C compiler and called
 * through ctypes; the matmuls stay torch's kernels. Each function here replaces several torch ops
 * (each costs microseconds of dispatch for vectors this small): residual add + RMSNorm + cast,
 * rotary + KV write, paged decode attention, SiLU-and-multiply + cast.
 *
 * Numerics follow the eager torch path: float32 throughout, bfloat16 rounding (round to nearest
 * even, as torch) only where the eager path casts for the int4 kernel. Compiled with
 * -ffp-contract=off so that a * b + c * d rounds as torch's separate ops do.
 *
 * Activation buffers are float32 (dtype 0) or bfloat16 (dtype 1), row-major and contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float load(const void *p, int dtype, int64_t i) {
    return dtype ? bf16_to_f32(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int dtype, int64_t i, float v) {
    if (dtype)
        ((bf16 *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* exp(x) to about 1 ulp (Cephes' expf: exp(r) * 2^k with |r| <= ln2 / 2), written so that the
 * compiler vectorizes it: libm's expf is a call per element. Inputs are clamped to [-87, 88]
 * (results below 1.7e-38 or above 1.6e38 are of no use here). */
static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float k = rintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &bits, 4);
    return y * two_k;
}

/* hidden[r] += delta[r] (when delta is given), then out[r] = weight * hidden[r] / rms(hidden[r]).
 * hidden: float32 [rows, dim], updated in place; delta: [rows, dim] of delta_dtype or NULL. */
void tl_add_rmsnorm(float *hidden, const void *delta, int delta_dtype, const float *weight, float eps,
                    int rows, int dim, void *out, int out_dtype) {
    for (int r = 0; r < rows; r++) {
        float *h = hidden + (int64_t)r * dim;
        if (delta) {
            if (delta_dtype) {
                const bf16 *d = (const bf16 *)delta + (int64_t)r * dim;
                for (int i = 0; i < dim; i++) h[i] = h[i] + bf16_to_f32(d[i]);
            } else {
                const float *d = (const float *)delta + (int64_t)r * dim;
                for (int i = 0; i < dim; i++) h[i] = h[i] + d[i];
            }
        }
        if (!out) continue;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < dim; i++) sum += h[i] * h[i];
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        int64_t base = (int64_t)r * dim;
        if (out_dtype) {
            bf16 *o = (bf16 *)out + base;
            for (int i = 0; i < dim; i++) o[i] = f32_to_bf16(weight[i] * (h[i] * inv));
        } else {
            float *o = (float *)out + base;
            for (int i = 0; i < dim; i++) o[i] = weight[i] * (h[i] * inv);
        }
    }
}

/* Rotary embedding of q and k, and the KV-cache write, for one token per row.
 * qkv: [rows, (heads + 2 * kv_heads) * head_dim] of qkv_dtype (q heads, then k, then v);
 * cos, sin: float32 [rows, head_dim] (sin's first half negated: out = x * cos + roll(x) * sin);
 * k_cache, v_cache: float32 [slots, kv_heads, head_dim]; slots: [rows];
 * q_out: float32 [rows, heads, head_dim]. */
void tl_rope_write(const void *qkv, int qkv_dtype, int rows, int heads, int kv_heads, int head_dim,
                   const float *cos, const float *sin, float *k_cache, float *v_cache,
                   const int64_t *slots, float *q_out) {
    int half = head_dim / 2;
    int64_t width = (int64_t)(heads + 2 * kv_heads) * head_dim;
    int64_t kv_width = (int64_t)kv_heads * head_dim;
    float x[1024];
    for (int r = 0; r < rows; r++) {
        int64_t row = (int64_t)r * width;
        const float *c = cos + (int64_t)r * head_dim, *s = sin + (int64_t)r * head_dim;
        float *k_dst = k_cache + slots[r] * kv_width, *v_dst = v_cache + slots[r] * kv_width;
        for (int h = 0; h < heads + kv_heads; h++) {
            for (int i = 0; i < head_dim; i++) x[i] = load(qkv, qkv_dtype, row + (int64_t)h * head_dim + i);
            float *dst = h < heads ? q_out + ((int64_t)r * heads + h) * head_dim : k_dst + (int64_t)(h - heads) * head_dim;
            for (int i = 0; i < head_dim; i++) {
                float rolled = x[i < half ? i + half : i - half];
                float a = x[i] * c[i];
                float b = rolled * s[i];
                dst[i] = a + b;
            }
        }
        int64_t v_start = row + (int64_t)(heads + kv_heads) * head_dim;
        for (int64_t i = 0; i < kv_width; i++) v_dst[i] = load(qkv, qkv_dtype, v_start + i);
    }
}

/* sum of a[i] * b[i] in 16 partial sums (one vector register), then added up */
static inline float dot(const float *a, const float *b, int n) {
    float lanes[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lanes[j] += a[i + j] * b[i + j];
    float sum = 0.0f;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int j = 0; j < 16; j++) sum += lanes[j];
    return sum;
}

/* Decode attention over the paged cache: row r's query attends the keys at positions
 * 0 .. seq_lens[r] - 1, which live at slots block_table[r][p / block_size] * block_size +
 * p % block_size. q: float32 [rows, heads, head_dim]; block_table: int64, row stride
 * table_stride; out: [rows, heads * head_dim] of out_dtype. Query head h reads KV head
 * h / (heads / kv_heads), as torch's grouped-query SDPA. Returns 0, or -1 when out of memory. */
int tl_attend(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_table,
              int64_t table_stride, const int64_t *seq_lens, int block_size, int rows, int heads,
              int kv_heads, int head_dim, float scale, void *out, int out_dtype) {
    int64_t max_len = 1;
    for (int r = 0; r < rows; r++) max_len = seq_lens[r] > max_len ? seq_lens[r] : max_len;
    int group = heads / kv_heads;
    int64_t width = (int64_t)heads * head_dim, kv_width = (int64_t)kv_heads * head_dim;
    float *scores = (float *)malloc(sizeof(float) * (size_t)(max_len * heads));
    float *acc = (float *)malloc(sizeof(float) * (size_t)width);
    if (!scores || !acc) {
        free(scores);
        free(acc);
        return -1;
    }
    for (int r = 0; r < rows; r++) {
        int64_t len = seq_lens[r];
        const int64_t *table = block_table + r * table_stride;
        const float *qr = q + (int64_t)r * width;
        for (int64_t p = 0; p < len; p++) {
            int64_t slot = table[p / block_size] * block_size + p % block_size;
            const float *k = k_cache + slot * kv_width;
            for (int h = 0; h < heads; h++)
                scores[h * len + p] = dot(qr + (int64_t)h * head_dim, k + (int64_t)(h / group) * head_dim, head_dim) * scale;
        }
        for (int h = 0; h < heads; h++) {
            float *sh = scores + h * len;
            float top = -INFINITY;
            for (int64_t p = 0; p < len; p++) top = sh[p] > top ? sh[p] : top;
#pragma omp simd
            for (int64_t p = 0; p < len; p++) sh[p] = vexp(sh[p] - top);
            float total = 0.0f;
            for (int64_t p = 0; p < len; p++) total += sh[p];
            float inv = 1.0f / total;
#pragma omp simd
            for (int64_t p = 0; p < len; p++) sh[p] = sh[p] * inv;
        }
        memset(acc, 0, sizeof(float) * (size_t)width);
        for (int64_t p = 0; p < len; p++) {
            int64_t slot = table[p / block_size] * block_size + p % block_size;
            const float *v = v_cache + slot * kv_width;
            for (int h = 0; h < heads; h++) {
                float w = scores[h * len + p];
                float *a = acc + (int64_t)h * head_dim;
                const float *vh = v + (int64_t)(h / group) * head_dim;
#pragma omp simd
                for (int i = 0; i < head_dim; i++) a[i] += w * vh[i];
            }
        }
        for (int64_t i = 0; i < width; i++) store(out, out_dtype, (int64_t)r * width + i, acc[i]);
    }
    free(scores);
    free(acc);
    return 0;
}

/* out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]: gate_up [rows, 2 * inter] of in_dtype
 * (gate columns first), out [rows, inter] of out_dtype. silu(x) = x / (1 + exp(-x)). */
void tl_silu_mul(const void *gate_up, int in_dtype, int rows, int inter, void *out, int out_dtype) {
    for (int r = 0; r < rows; r++) {
        int64_t src = (int64_t)r * 2 * inter, dst = (int64_t)r * inter;
        for (int i = 0; i < inter; i++) {
            float g = load(gate_up, in_dtype, src + i);
            float u = load(gate_up, in_dtype, src + inter + i);
            float act = g / (1.0f + vexp(-g));
            store(out, out_dtype, dst + i, act * u);
        }
    }
}

int tl_abi_version(void) { return 1; }
