/* Whole-row copies between a big table and a small buffer by row index, for partial_fc/heads/row_copy.py.
 *
 * Each row is one memcpy; the rows a few indices ahead are prefetched, so that their cache misses overlap the
 * current copy. Every index is checked against the table's row count before anything is copied: a bad index
 * returns its position (>= 0) and leaves the memory untouched; success returns -1. */
#include <stdint.h>
#include <string.h>

#define AHEAD 4
#define LINE 64

static int64_t first_bad_index(const int64_t *index, int64_t count, int64_t table_rows) {
    for (int64_t i = 0; i < count; ++i)
        if (index[i] < 0 || index[i] >= table_rows) return i;
    return -1;
}

int64_t pfc_take_rows(const char *table, int64_t table_rows, const int64_t *index, int64_t count, int64_t row_bytes,
                      char *out) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) {
            const char *next = table + index[i + AHEAD] * row_bytes;
            for (int64_t byte = 0; byte < row_bytes; byte += LINE) __builtin_prefetch(next + byte, 0, 0);
        }
        memcpy(out + i * row_bytes, table + index[i] * row_bytes, (size_t)row_bytes);
    }
    return -1;
}

int64_t pfc_put_rows(char *table, int64_t table_rows, const int64_t *index, int64_t count, int64_t row_bytes,
                     const char *rows) {
    int64_t bad = first_bad_index(index, count, table_rows);
    if (bad >= 0) return bad;
    for (int64_t i = 0; i < count; ++i) {
        if (i + AHEAD < count) {
            char *next = table + index[i + AHEAD] * row_bytes;
            for (int64_t byte = 0; byte < row_bytes; byte += LINE) __builtin_prefetch(next + byte, 1, 0);
        }
        memcpy(table + index[i] * row_bytes, rows + i * row_bytes, (size_t)row_bytes);
    }
    return -1;
}
