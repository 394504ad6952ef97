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

/* ---- loading: GGUF blocks straight into float32 or the int4 kernel's layout ---------------- */

/* IEEE half -> float, exactly (subnormals, infinities and NaN payloads as numpy converts them). */
static inline float half_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 14;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float read_half(const uint8_t *p) { return half_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

/* Q8_0 blocks (half d, int8 q[32]) -> float32 d * q, as gguf.quants computes it. */
void tl_dequant_q8_0(const uint8_t *blocks, int64_t n_blocks, float *out) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint8_t *block = blocks + b * 34;
        float d = read_half(block);
        const int8_t *q = (const int8_t *)(block + 2);
        float *o = out + b * 32;
        for (int i = 0; i < 32; i++) o[i] = (float)q[i] * d;
    }
}

/* Q4_0 (half d, 16 bytes: w = d * (q - 8)) or Q4_1 (half d, half m, 16 bytes: w = d * q + m) blocks
 * -> float32, as gguf.quants computes them; byte j holds weight j (low nibble) and j + 16. */
void tl_dequant_q4(const uint8_t *blocks, int64_t n_blocks, int has_min, float *out) {
    int size = has_min ? 20 : 18, start = has_min ? 4 : 2;
    for (int64_t b = 0; b < n_blocks; b++) {
        const uint8_t *block = blocks + b * size, *qs = block + start;
        float d = read_half(block), m = has_min ? read_half(block + 2) : 0.0f;
        float *o = out + b * 32;
        for (int j = 0; j < 16; j++) {
            float lo = (float)(qs[j] & 0x0F), hi = (float)(qs[j] >> 4);
            if (has_min) {
                o[j] = lo * d + m;
                o[j + 16] = hi * d + m;
            } else {
                o[j] = (lo - 8.0f) * d;
                o[j + 16] = (hi - 8.0f) * d;
            }
        }
    }
}

/* Q4_0 / Q4_1 rows [n_rows, k / 32 blocks] -> torch's CPU int4 layout (blocks of 64 rows: for each
 * input column, byte j holds row j in its low nibble and row j + 32 in its high one; a last block of
 * 16, 32 or 48 rows holds rows 2i and 2i + 1 in byte i) and scale_and_zeros bfloat16
 * [k / 32, n_rows, 2] with w = (q - 8) * scale + zero: scale = d, zero = m + 8 d (Q4_1) or 0 (Q4_0),
 * rounded to bfloat16 as torch rounds. n_rows must be a multiple of 16. Returns 0, or -1. */
int tl_pack_q4(const uint8_t *rows, int has_min, int n_rows, int k, uint8_t *packed, bf16 *scale_and_zeros) {
    if (n_rows % 16 || k % 32) return -1;
    int size = has_min ? 20 : 18, start = has_min ? 4 : 2, groups = k / 32;
    int64_t row_bytes = (int64_t)groups * size;
    uint8_t *codes = (uint8_t *)malloc((size_t)64 * (size_t)k);
    if (!codes) return -1;
    for (int base = 0; base < n_rows; base += 64) {
        int count = n_rows - base < 64 ? n_rows - base : 64;
        for (int r = 0; r < count; r++) { /* this block's codes, row-major [count, k] */
            const uint8_t *row = rows + (int64_t)(base + r) * row_bytes;
            for (int g = 0; g < groups; g++) {
                const uint8_t *block = row + (int64_t)g * size, *qs = block + start;
                uint8_t *c = codes + (int64_t)r * k + g * 32;
                for (int j = 0; j < 16; j++) {
                    c[j] = qs[j] & 0x0F;
                    c[j + 16] = qs[j] >> 4;
                }
                float d = read_half(block);
                float zero = has_min ? read_half(block + 2) + 8.0f * d : -8.0f * d + 8.0f * d;
                bf16 *sz = scale_and_zeros + ((int64_t)g * n_rows + base + r) * 2;
                sz[0] = f32_to_bf16(d);
                sz[1] = f32_to_bf16(zero);
            }
        }
        uint8_t *dst = packed + (int64_t)base * k / 2;
        if (count == 64) {
            for (int c = 0; c < k; c++)
                for (int j = 0; j < 32; j++)
                    dst[(int64_t)c * 32 + j] = (uint8_t)(codes[(int64_t)j * k + c] | (codes[(int64_t)(j + 32) * k + c] << 4));
        } else {
            int half = count / 2;
            for (int c = 0; c < k; c++)
                for (int i = 0; i < half; i++)
                    dst[(int64_t)c * half + i] =
                        (uint8_t)(codes[(int64_t)(2 * i) * k + c] | (codes[(int64_t)(2 * i + 1) * k + c] << 4));
        }
    }
    free(codes);
    return 0;
}

int tl_abi_version(void) { return 2; }
