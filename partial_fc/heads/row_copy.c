/* Whole-row copies between a big table and a small buffer by row index, for partial_fc/heads/row_copy.py.
 *
 * Each row is one memcpy, or one pass converting between a bfloat16 table and a float32 buffer (rounded to
 * nearest even, as torch rounds), or one pass through SparseSGD's int8 momentum codes; the rows a few indices
 * ahead are prefetched, so that their cache misses overlap the current row's work. Every index is checked against the table's row count before anything is copied:
 * a bad index returns its position (>= 0) and leaves the memory untouched; success returns -1. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define AHEAD 4
#define LINE 64

static int64_t first_bad_index(const int64_t *index, int64_t count, int64_t table_rows) {
    for (int64_t i = 0; i < count; ++i)
        if (index[i] < 0 || index[i] >= table_rows) return i;
    return -1;
}

static void prefetch_for_read(const char *row, int64_t row_bytes) {
    for (int64_t byte = 0; byte < row_bytes; byte += LINE) __builtin_prefetch(row + byte, 0, 0);
}

static void prefetch_for_write(char *row, int64_t row_bytes) {
    for (int64_t byte = 0; byte < row_bytes; byte += LINE) __builtin_prefetch(row + byte, 1, 0);
}

/* float32 of a bfloat16: its 16 bits on top. */
static void widen_row(const uint16_t *in, uint32_t *out, int64_t width) {
    for (int64_t j = 0; j < width; ++j) out[j] = (uint32_t)in[j] << 16;
}

/* bfloat16 of a float32, rounded to nearest even; a NaN becomes the quiet NaN 0x7FC0, as c10::BFloat16 does. */
static void narrow_row(const uint32_t *in, uint16_t *out, int64_t width) {
    for (int64_t j = 0; j < width; ++j) {
        uint32_t bits = in[j];
        uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        out[j] = (bits & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : rounded;
    }
}

int64_t pfc_take_rows(const char *table, int64_t table_rows, const int64_t *index, int64_t count, int64_t row_bytes,
                      char *out) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) prefetch_for_read(table + index[i + AHEAD] * row_bytes, row_bytes);
        memcpy(out + i * row_bytes, table + index[i] * row_bytes, (size_t)row_bytes);
    }
    return -1;
}

int64_t pfc_put_rows(char *table, int64_t table_rows, const int64_t *index, int64_t count, int64_t row_bytes,
                     const char *rows) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) prefetch_for_write(table + index[i + AHEAD] * row_bytes, row_bytes);
        memcpy(table + index[i] * row_bytes, rows + i * row_bytes, (size_t)row_bytes);
    }
    return -1;
}

/* out[i] = float32(table[index[i]]) for a bfloat16 table of `width` elements per row. */
int64_t pfc_take_rows_bf16_f32(const uint16_t *table, int64_t table_rows, const int64_t *index, int64_t count,
                               int64_t width, uint32_t *out) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) prefetch_for_read((const char *)(table + index[i + AHEAD] * width), width * 2);
        widen_row(table + index[i] * width, out + i * width, width);
    }
    return -1;
}

/* table[index[i]] = bfloat16(rows[i]) for a bfloat16 table of `width` elements per row. */
int64_t pfc_put_rows_f32_bf16(uint16_t *table, int64_t table_rows, const int64_t *index, int64_t count,
                              int64_t width, const uint32_t *rows) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) prefetch_for_write((char *)(table + index[i + AHEAD] * width), width * 2);
        narrow_row(rows + i * width, table + index[i] * width, width);
    }
    return -1;
}

/* SparseSGD's int8 momentum (partial_fc/heads/sparse_sgd.py) of rows `index`, in one pass over each row: the new
 * velocity grad + c |c| row_max momentum / 127^2 from the stored codes c, then its codes and row maximum stored in
 * their place. The arithmetic is torch's, operation for operation, so that the results are bit for bit the same:
 * the sum is one fused multiply-add, as torch's vectorised addcmul makes it (fmaf is exact also where the CPU has no
 * FMA, only slower; the "fma" clone is chosen at load time where it has), and the code is
 * copysign(round(sqrt(|v| (1 / max) 127^2)), v), 0 for rows whose max is below `smallest_row_max`. */
__attribute__((target_clones("fma", "default")))
int64_t pfc_int8_momentum(int8_t *codes, float *row_max, int64_t table_rows, const int64_t *index, int64_t count,
                          int64_t width, const float *grad, float momentum_over_levels_squared,
                          float levels_squared, float smallest_row_max, float *velocity) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) prefetch_for_write((char *)(codes + index[i + AHEAD] * width), width);
        int8_t *code = codes + index[i] * width;
        const float *g = grad + i * width;
        float *v = velocity + i * width;
        const float gain = row_max[index[i]] * momentum_over_levels_squared;
        float largest = 0.0f;
        int any_nan = 0;
        for (int64_t j = 0; j < width; ++j) {
            const float c = (float)code[j];
            v[j] = fmaf(c, fabsf(c) * gain, g[j]);
            any_nan |= v[j] != v[j];
            largest = fabsf(v[j]) > largest ? fabsf(v[j]) : largest;
        }
        if (any_nan) largest = NAN;
        const float scale = largest >= smallest_row_max ? (1.0f / largest) * levels_squared : 0.0f;
        for (int64_t j = 0; j < width; ++j) {
            const float magnitude = rintf(sqrtf(fabsf(v[j]) * scale));
            code[j] = magnitude == magnitude ? (int8_t)copysignf(magnitude, v[j]) : 0;
        }
        row_max[index[i]] = largest;
    }
    return -1;
}

/* One row of SparseSGD's step in float32: g += weight_decay w (skipped at 0, as SparseSGD skips it); v = g +
 * momentum v_old where there is momentum (else v = g); w -= lr v. Each sum is one fused multiply-add, as torch's
 * vectorised add with alpha makes it. `v` holds v_old on entry and v on return; `w` is updated in place. */
static inline void sgd_row(float *w, const float *g, float *v, int64_t width, float lr, float momentum,
                           float weight_decay, int has_momentum) {
    for (int64_t j = 0; j < width; ++j) {
        const float decayed = weight_decay != 0.0f ? fmaf(w[j], weight_decay, g[j]) : g[j];
        const float velocity = has_momentum ? fmaf(v[j], momentum, decayed) : decayed;
        v[j] = velocity;
        w[j] = fmaf(velocity, -lr, w[j]);
    }
}

/* SparseSGD's step of rows `index` of a float32 shard `table`, its momentum in the float32 `velocity_table` (NULL:
 * none), in one pass per row. `rows` is the rows' float32 working copy and `grad` their gradient; `velocity` [count,
 * width] receives v. The updated rows and velocities are stored straight into the tables. */
__attribute__((target_clones("fma", "default")))
int64_t pfc_sgd_rows_f32(float *table, float *velocity_table, int64_t table_rows, const int64_t *index, int64_t count,
                         int64_t width, float *rows, const float *grad, float *velocity, float lr, float momentum,
                         float weight_decay) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    const int has_momentum = velocity_table != NULL;
    for (int64_t i = 0; i < count; ++i) {
        if (has_momentum && i + AHEAD < count)
            prefetch_for_read((const char *)(velocity_table + index[i + AHEAD] * width), width * 4);
        if (i + AHEAD < count) prefetch_for_write((char *)(table + index[i + AHEAD] * width), width * 4);
        float *v = velocity + i * width, *w = rows + i * width;
        if (has_momentum) memcpy(v, velocity_table + index[i] * width, (size_t)width * 4);
        sgd_row(w, grad + i * width, v, width, lr, momentum, weight_decay, has_momentum);
        if (has_momentum) memcpy(velocity_table + index[i] * width, v, (size_t)width * 4);
        memcpy(table + index[i] * width, w, (size_t)width * 4);
    }
    return -1;
}

/* The same step for a bfloat16 shard and momentum: v_old widened, v and w computed in float32 (w from the float32
 * working copy `rows`), both stored rounded to nearest even, as torch's ops round them. */
__attribute__((target_clones("fma", "default")))
int64_t pfc_sgd_rows_bf16(uint16_t *table, uint16_t *velocity_table, int64_t table_rows, const int64_t *index,
                          int64_t count, int64_t width, float *rows, const float *grad, float *velocity, float lr,
                          float momentum, float weight_decay) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    const int has_momentum = velocity_table != NULL;
    for (int64_t i = 0; i < count; ++i) {
        if (has_momentum && i + AHEAD < count)
            prefetch_for_read((const char *)(velocity_table + index[i + AHEAD] * width), width * 2);
        if (i + AHEAD < count) prefetch_for_write((char *)(table + index[i + AHEAD] * width), width * 2);
        float *v = velocity + i * width, *w = rows + i * width;
        if (has_momentum) widen_row(velocity_table + index[i] * width, (uint32_t *)v, width);
        sgd_row(w, grad + i * width, v, width, lr, momentum, weight_decay, has_momentum);
        if (has_momentum) narrow_row((const uint32_t *)v, velocity_table + index[i] * width, width);
        narrow_row((const uint32_t *)w, table + index[i] * width, width);
    }
    return -1;
}
