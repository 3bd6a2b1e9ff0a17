/* One pass over a chunk of the [sampled, batch] logits right after its product, for heads/softmax_kernels.py.
 *
 * Each entry is scaled by its row's s / |w|, then replaced by exp(logit - shift) with a fixed shift, so the chunk
 * is exponentiated while it is still in cache and the buffer is not read again before backward. Beside it the
 * pass adds each column's exponentials into `sums` (row groups summed apart first, so that rounding grows with
 * the number of groups, not of rows), counts the entries filtered as too-similar negatives (stored as 0) and
 * the entries whose exponential fell under float's normal range (stored as 0: the caller bounds what they
 * could have added and falls back to the exact shift when that is not negligible), and takes the positives out
 * (their scaled logit saved, their entry 0) for the caller's margin. Compiled for AVX-512, AVX2 and plain
 * x86-64, chosen at load time (PFC_ONE_VARIANT builds only the one its flags ask for); each entry rounds the same
 * in every variant: the fused multiply-adds are written out (fmaf, which the plain variant takes from the C
 * library), and each column is summed in the same order. */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(PFC_ONE_VARIANT)
#define VARIANTS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VARIANTS
#endif

/* Below this the exponential is under FLT_MIN (1.18e-38) and counts as flushed: exp(-87) = 1.65e-38. */
#define FLUSH_BELOW -87.0f
#define ROW_GROUP 32

/* exp(x), to about 2 ulp, by Cody and Waite's reduction and Cephes' polynomial: 0 below FLUSH_BELOW (no
 * subnormal results, whose arithmetic is slow), infinity above 88.3, NaN kept. Branch-free, so it vectorises;
 * k = round(x / ln 2) comes from adding and removing 1.5 * 2^23, whose sum also holds k in its low bits. */
static inline float exp_or_zero(float x) {
    union {
        float value;
        int32_t bits;
    } rounded = {.value = x * 1.44269504088896341f + 12582912.0f}, power;
    float k = rounded.value - 12582912.0f;
    float r = fmaf(k, -0.693359375f, x);
    r = fmaf(k, 2.12194440e-4f, r);
    float p = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    power.bits = (rounded.bits - 0x4B400000 + 127) << 23; /* 2^k, for the k of x in [-87, 88.3] */
    float y = p * power.value;
    y = x < FLUSH_BELOW ? 0.0f : y;
    y = x > 88.3f ? INFINITY : y;
    return x != x ? x : y;
}

/* One group of rows; `filtering` is a constant at each call, so each caller gets a loop of its own. */
static inline void exponentiate_rows(float *restrict block, int64_t start, int64_t stop, int64_t cols,
                                     const float *restrict row_scale, float shift, float limit, int filtering,
                                     float *restrict filtered, float *restrict flushed,
                                     float *restrict group_sums) {
    for (int64_t r = start; r < stop; ++r) {
        float *restrict row = block + r * cols;
        float scale = row_scale[r];
        for (int64_t c = 0; c < cols; ++c) {
            float x = row[c] * scale;
            float shifted = x - shift;
            float e = exp_or_zero(shifted);
            int counted = shifted < FLUSH_BELOW && shifted > -INFINITY;
            if (filtering) {
                int too_similar = x > limit;
                e = too_similar ? 0.0f : e;
                filtered[c] += too_similar ? 1.0f : 0.0f;
                counted = counted && !too_similar;
            }
            flushed[c] += counted ? 1.0f : 0.0f;
            row[c] = e;
            group_sums[c] += e;
        }
    }
}

VARIANTS void pfc_exp_chunk(float *restrict block, int64_t rows, int64_t cols, const float *restrict row_scale,
                            float shift, float limit, const int64_t *restrict positives, int64_t positive_count,
                            float *restrict positive_logits, float *restrict sums, float *restrict filtered,
                            float *restrict flushed, float *restrict group_sums) {
    for (int64_t i = 0; i < positive_count; ++i) {
        int64_t at = positives[i];
        positive_logits[i] = block[at] * row_scale[at / cols];
        block[at] = -INFINITY;
    }
    for (int64_t start = 0; start < rows; start += ROW_GROUP) {
        int64_t stop = start + ROW_GROUP < rows ? start + ROW_GROUP : rows;
        for (int64_t c = 0; c < cols; ++c) group_sums[c] = 0.0f;
        if (limit < INFINITY)
            exponentiate_rows(block, start, stop, cols, row_scale, shift, limit, 1, filtered, flushed, group_sums);
        else
            exponentiate_rows(block, start, stop, cols, row_scale, shift, limit, 0, filtered, flushed, group_sums);
        for (int64_t c = 0; c < cols; ++c) sums[c] += group_sums[c];
    }
}

/* The center gradient's part along each center taken out: g -= w (g . w) / |w|^2, row by row. */
VARIANTS void pfc_remove_radial(float *restrict grad, const float *restrict centers, int64_t rows, int64_t dim,
                                const float *restrict squared_inverse_norms) {
    for (int64_t r = 0; r < rows; ++r) {
        float *restrict g = grad + r * dim;
        const float *restrict w = centers + r * dim;
        float lanes[16] = {0.0f};
        int64_t k = 0;
        for (; k + 16 <= dim; k += 16)
            for (int j = 0; j < 16; ++j) lanes[j] += g[k + j] * w[k + j];
        float dot = 0.0f;
        for (int j = 0; j < 16; ++j) dot += lanes[j];
        for (; k < dim; ++k) dot += g[k] * w[k];
        float radial = dot * squared_inverse_norms[r];
        for (k = 0; k < dim; ++k) g[k] = g[k] - w[k] * radial;
    }
}
