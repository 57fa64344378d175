/* terge._fastmethods: the task-vector methods (task arithmetic, TIES, DARE, breadcrumbs) on the
 * CPU, straight from the inputs as stored (no float64 copies of whole tensors); and the
 * element-wise methods (MagMax, TALL-mask consensus, NearSwap, SCE: see elementwise() below),
 * which share the widening, the rounding and, for SCE's selection, scan/sample/kth_largest.
 *
 * The reference is methods._task_vector_merge (plain torch on float64 copies). These loops do its
 * float64 operations in its order, so the results are equal bit for bit (tests/test_fast_methods):
 *
 *     t_i = x_i - b                  (both widened to float64, exactly; then one rounding)
 *     d_i = t_i where kept, else +0  (kept: magnitude bits in [lo_i, hi_i), the trims'
 *                                     thresholds; DARE: the draw below density, d_i = t_i / density)
 *     e   = ((0 + d_0 w_0) + d_1 w_1) + ...         (each product rounded: never an FMA)
 *     no consensus:  m = e, or e / D once with D the weights' sum when they are given as given
 *     sign:          a_i = e >= 0 ? d_i > 0 : d_i < 0
 *                    p = (0 + (a_i ? d_i : 0) w_i) + ...,  q = (0 + (a_i ? 1 : 0) w_i) + ...
 *                    m = q != 0 ? p / q : p
 *     out = b + m * scale, rounded once into out's dtype (as kernels.store_whole does)
 *
 * Divisions by powers of two (DARE's density 0.5, TIES' denominators with two equal weights) are
 * multiplications by the exact inverse: the same real number, rounded the same way.
 *
 * The thresholds (each t_i's k-th largest magnitude bits, as primitives.magnitude_bits and
 * kth_largest_magnitude_bits: the sign cleared, every NaN as inf + 1) come from scan(): one read
 * of the base and the models counting the magnitudes above a bracket and collecting (or binning)
 * those inside it; kth_largest() selects among those collected. terge.fastmethods chooses the
 * brackets (from sample()), splits the work between threads and falls back to narrower passes
 * where a bracket misses; everything here runs without the GIL.
 *
 * Compile with -ffp-contract=off: a fused multiply-add rounds once where the reference rounds
 * twice. The hot loops are compiled for AVX-512, AVX2 and the baseline and chosen when the module
 * loads; -DCLONED= (baseline only) and -DTERGE_NO_AVX512 (no compress loop) build the others for
 * testing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_convert.h"
#include "_loops.h"

#define BLOCK 1024
#define SCAN_BLOCK 128
#define AHEAD 4 /* blocks */
#define MAX_MODELS 64
#define BINS 65536

enum { NO_SPARSIFY = 0, KEEP_RANGE = 1, KEEP_DRAWN = 2 };
enum { NO_CONSENSUS = 0, SIGN = 1 };




/* --- element-wise helpers ---------------------------------------------------------------------- */








/* --- the thresholds: scan and select ----------------------------------------------------------- */

/* One k-th largest being searched for in one model's task vector. It counts the magnitudes u in
 * [hi, top) (above), and those in [lo, hi): when collecting (shift < 0), u == lo and u == hi - 1
 * are only counted (floor, ceiling: a massive tie, such as the zeros of a task vector that is
 * mostly unchanged, costs nothing) and those strictly between are collected into out (cap + 8
 * slots; past cap only counted); when binning, all are counted in out[(u - lo) >> shift]. */
typedef struct {
    int model;
    uint64_t lo, hi, top;
    int shift;
    uint64_t *out;
    Py_ssize_t cap;
    uint64_t from, width, floor_at, ceiling_at; /* kept: u - from < width; the ends (or TOP) */
    Py_ssize_t above, inside, floor, ceiling;
} Query;

#ifdef HAVE_AVX512

/* count_and_collect()'s collecting case with AVX-512's compress, where the whole block fits
 * below the cap (each store writes 8 slots: the out buffer has cap + 8). */
__attribute__((target("avx512f"))) static void collect_avx512(Query *q, const uint64_t *u,
                                                               Py_ssize_t m) {
    const __m512i hi = _mm512_set1_epi64((long long)q->hi);
    const __m512i over = _mm512_set1_epi64((long long)(q->top - q->hi));
    const __m512i from = _mm512_set1_epi64((long long)q->from);
    const __m512i width = _mm512_set1_epi64((long long)q->width);
    const __m512i floor_at = _mm512_set1_epi64((long long)q->floor_at);
    const __m512i ceiling_at = _mm512_set1_epi64((long long)q->ceiling_at);
    const __m512i one = _mm512_set1_epi64(1);
    __m512i above = _mm512_setzero_si512(), floor = above, ceiling = above; /* lane counts */
    uint64_t *out = q->out + q->inside;
    Py_ssize_t w = 0;
    for (Py_ssize_t k = 0; k < m; k += 8) {
        const __mmask8 valid = m - k >= 8 ? 0xFF : (__mmask8)((1u << (m - k)) - 1);
        const __m512i v = _mm512_maskz_loadu_epi64(valid, u + k);
        const __mmask8 in = _mm512_mask_cmplt_epu64_mask(valid, _mm512_sub_epi64(v, from), width);
        _mm512_storeu_si512(out + w, _mm512_maskz_compress_epi64(in, v));
        w += __builtin_popcount(in);
        const __mmask8 a = _mm512_mask_cmplt_epu64_mask(valid, _mm512_sub_epi64(v, hi), over);
        above = _mm512_mask_add_epi64(above, a, above, one);
        if (q->floor_at != TOP) {
            floor = _mm512_mask_add_epi64(
                floor, _mm512_mask_cmpeq_epu64_mask(valid, v, floor_at), floor, one);
            ceiling = _mm512_mask_add_epi64(
                ceiling, _mm512_mask_cmpeq_epu64_mask(valid, v, ceiling_at), ceiling, one);
        }
    }
    q->above += _mm512_reduce_add_epi64(above);
    q->inside += w;
    q->floor += _mm512_reduce_add_epi64(floor);
    q->ceiling += _mm512_reduce_add_epi64(ceiling);
}
#endif

/* Count a block's magnitudes u above and inside the query's ranges, and collect (or bin) those
 * inside. flags (SCAN_BLOCK bytes, zero past m) mark them, so groups of 8 without any are skipped. */
static inline void count_and_collect(Query *q, const uint64_t *u, uint8_t *flags, Py_ssize_t m) {
#ifdef HAVE_AVX512
    if (have_avx512 && q->shift < 0 && q->inside + m <= q->cap) {
        collect_avx512(q, u, m);
        return;
    }
#endif
    const uint64_t hi = q->hi, over = q->top - q->hi, from = q->from, width = q->width;
    const uint64_t floor_at = q->floor_at, ceiling_at = q->ceiling_at;
    Py_ssize_t above = 0, inside = 0, floor = 0, ceiling = 0;
    for (Py_ssize_t k = 0; k < m; k++) {
        above += u[k] - hi < over;
        flags[k] = u[k] - from < width;
        inside += flags[k];
        floor += u[k] == floor_at;
        ceiling += u[k] == ceiling_at;
    }
    q->above += above;
    q->floor += floor;
    q->ceiling += ceiling;
    if (inside == 0) return;
    const Py_ssize_t had = q->inside;
    q->inside += inside;
    if (q->shift < 0 && q->inside > q->cap) return; /* past the cap only the count goes on */
    uint64_t *out = q->out + (q->shift < 0 ? had : 0);
    Py_ssize_t w = 0;
    for (Py_ssize_t g = 0; g < m; g += 8) {
        uint64_t any;
        memcpy(&any, flags + g, sizeof any);
        if (!any) continue;
        for (Py_ssize_t k = g; k < g + 8; k++) {
            if (q->shift >= 0) { /* bin 0 takes the + 0 of those outside */
                out[flags[k] ? (u[k] - from) >> q->shift : 0] += flags[k];
            } else {
                out[w] = u[k]; /* within the cap + 8 slots: w <= inside */
                w += flags[k];
            }
        }
    }
}

/* SCE's n^2 times the population variance of m entries, sum_{i<j} (d_i - d_j)^2 with
 * d_i = x_i - b, added in that order from +0 (as elementwise.sce_merge adds them). */
static inline void variance(double *RESTRICT v, const double *b, const double *const *x,
                            int count, Py_ssize_t m) {
    for (Py_ssize_t k = 0; k < m; k++) v[k] = 0.0;
    for (int i = 0; i < count; i++) {
        for (int j = i + 1; j < count; j++) {
            for (Py_ssize_t k = 0; k < m; k++) {
                const double diff = (x[i][k] - b[k]) - (x[j][k] - b[k]);
                v[k] = v[k] + diff * diff;
            }
        }
    }
}

/* x_i = the models' m elements from start widened (into xbuf's rows where not float64). */
static inline void widen_all(const double **x, double *xbuf, Py_ssize_t stride,
                             char *const *models, const int *codes, int count, Py_ssize_t start,
                             Py_ssize_t m) {
    for (int i = 0; i < count; i++) {
        x[i] = widen(xbuf + i * stride, models[i] + start * ITEMSIZE[codes[i]], codes[i], m);
    }
}

CLONED
static void scan_models(const char *base, int base_code, Py_ssize_t n, char *const *models,
                 const int *codes, Query *queries, int count) {
    double bbuf[SCAN_BLOCK], xbuf[SCAN_BLOCK];
    uint64_t u[SCAN_BLOCK] = {0}; /* read past m (and ignored) in the last group of 8 */
    uint8_t flags[SCAN_BLOCK];
    for (Py_ssize_t start = 0; start < n; start += SCAN_BLOCK) {
        const Py_ssize_t m = n - start < SCAN_BLOCK ? n - start : SCAN_BLOCK;
        const Py_ssize_t ahead = start + AHEAD * SCAN_BLOCK;
        const Py_ssize_t later = n - ahead < SCAN_BLOCK ? n - ahead : SCAN_BLOCK;
        if (m < SCAN_BLOCK) memset(flags, 0, sizeof flags);
        if (later > 0) prefetch(base + ahead * ITEMSIZE[base_code], base_code, later);
        const double *b = widen(bbuf, base + start * ITEMSIZE[base_code], base_code, m);
        int current = -1;
        for (int q = 0; q < count; q++) {
            const int i = queries[q].model;
            if (i != current) { /* queries come grouped by model */
                if (later > 0) prefetch(models[i] + ahead * ITEMSIZE[codes[i]], codes[i], later);
                const double *x = widen(xbuf, models[i] + start * ITEMSIZE[codes[i]], codes[i], m);
                for (Py_ssize_t k = 0; k < m; k++) u[k] = magnitude(x[k] - b[k]);
                current = i;
            }
            count_and_collect(&queries[q], u, flags, m);
        }
    }
}

/* scan() with SCE's variance among the queries (model -1): kept apart so that TIES' scan (every
 * query one model's task vector) compiles as lean as before (the variance made it 15% slower). */
CLONED
static void scan_variance(const char *base, int base_code, Py_ssize_t n, char *const *models,
                 const int *codes, int models_count, Query *queries, int count) {
    double bbuf[SCAN_BLOCK], xbuf[SCAN_BLOCK];
    double *all = NULL; /* every model's block, for the variance (model -1) */
    const double *x[MAX_MODELS];
    for (int q = 0; q < count; q++) {
        if (queries[q].model < 0 && !all) all = malloc(sizeof(double) * SCAN_BLOCK * models_count);
    }
    uint64_t u[SCAN_BLOCK] = {0}; /* read past m (and ignored) in the last group of 8 */
    uint8_t flags[SCAN_BLOCK];
    for (Py_ssize_t start = 0; start < n; start += SCAN_BLOCK) {
        const Py_ssize_t m = n - start < SCAN_BLOCK ? n - start : SCAN_BLOCK;
        const Py_ssize_t ahead = start + AHEAD * SCAN_BLOCK;
        const Py_ssize_t later = n - ahead < SCAN_BLOCK ? n - ahead : SCAN_BLOCK;
        if (m < SCAN_BLOCK) memset(flags, 0, sizeof flags);
        if (later > 0) prefetch(base + ahead * ITEMSIZE[base_code], base_code, later);
        const double *b = widen(bbuf, base + start * ITEMSIZE[base_code], base_code, m);
        int current = -2; /* no model yet (-1 is the variance) */
        for (int q = 0; q < count; q++) {
            const int i = queries[q].model;
            if (i != current && i < 0) { /* SCE's variance over every model */
                for (int j = 0; j < models_count; j++) {
                    if (later > 0) prefetch(models[j] + ahead * ITEMSIZE[codes[j]], codes[j], later);
                }
                widen_all(x, all, SCAN_BLOCK, models, codes, models_count, start, m);
                variance(xbuf, b, x, models_count, m);
                for (Py_ssize_t k = 0; k < m; k++) u[k] = magnitude(xbuf[k]);
                current = i;
            } else if (i != current) { /* queries come grouped by model */
                if (later > 0) prefetch(models[i] + ahead * ITEMSIZE[codes[i]], codes[i], later);
                const double *x = widen(xbuf, models[i] + start * ITEMSIZE[codes[i]], codes[i], m);
                for (Py_ssize_t k = 0; k < m; k++) u[k] = magnitude(x[k] - b[k]);
                current = i;
            }
            count_and_collect(&queries[q], u, flags, m);
        }
    }
    free(all);
}

/* --- the first pass in float32 keys ------------------------------------------------------------
 *
 * For float32, bfloat16 and float16 inputs the first pass after the samples compares 32-bit keys,
 * 16 to a vector rather than 8: key = |fl32(x - b)|'s bits (every NaN as 0x7F800001), from the
 * inputs widened exactly to float32 and subtracted there. That is the float32 rounding of the
 * float64 magnitude u, K(u) (key_of): where x - b is not exact in float64 (exponents more than 29
 * apart), the smaller input is too small to move it to a float32 rounding boundary, so rounding
 * it once or twice gives the same float32. K never decreases as u grows, so with `above`
 * entries whose key is at least hi, the k-th largest u is the (k - above)-th largest u of the
 * entries whose key is in [lo, hi), when above < k <= above + inside: those are collected (their
 * float32 x and b, from which u is computed exactly afterwards, see kth_pairs). Entries tied in
 * key but not in u are told apart there; entries tied in u share their key. */
typedef struct {
    int model;
    uint32_t lo, hi; /* the key bracket [lo, hi) */
    float *xs, *bs;  /* cap + KEY_SLACK slots each */
    Py_ssize_t cap;
    Py_ssize_t above, inside;
} KeyQuery;

#define KEY_SLACK 16
#define KEY_BLOCK 2048
#define KEY_AHEAD 1024 /* elements prefetched ahead: measured 30% faster than the prefetchers alone */
#define KEY_NAN UINT32_C(0x7F800001)

/* K(u): the float32 key of a float64 magnitude's bits, as scan_keys makes it for an entry whose
 * float64 magnitude bits are u. */
static inline uint32_t key_of(uint64_t u) {
    if (u > INF) return KEY_NAN;
    double d;
    memcpy(&d, &u, sizeof d);
    return float_to_bits((float)d);
}

/* Elements k..m of an input widened to float32 (exactly) into out. */
static inline void widen_float(float *out, const char *p, int code, Py_ssize_t k, Py_ssize_t m) {
    for (Py_ssize_t j = k; j < m; j++) {
        const uint16_t *h = (const uint16_t *)p;
        out[j - k] = code == F32    ? ((const float *)p)[j]
                     : code == BF16 ? bf16_to_float(h[j])
                                    : f16_to_float(h[j]);
    }
}

#ifdef HAVE_AVX512
/* 16 entries of an input at p (element k) widened to float32, exactly; lanes past m are 0. */
__attribute__((target("avx512f"))) static ALWAYS_INLINE __m512 load16(const char *p, int code,
                                                                      Py_ssize_t k, Py_ssize_t m) {
    if (k + 16 <= m) {
        if (code == F32) return _mm512_loadu_ps((const float *)p + k);
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + k));
        if (code == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        return _mm512_cvtph_ps(h);
    }
    float tail[16] = {0};
    widen_float(tail, p, code, k, m);
    return _mm512_loadu_ps(tail);
}

__attribute__((target("avx512f"))) static ALWAYS_INLINE void keys_body(
    KeyQuery *qs, const int nq, const char *b, int b_code, const char *x, int x_code, Py_ssize_t m) {
    const __m512i clear_sign = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i nan = _mm512_set1_epi32((int)KEY_NAN);
    const __m512i one = _mm512_set1_epi32(1);
    __m512i lo[2], width[2], hi[2], above[2];
    Py_ssize_t w[2];
    for (int j = 0; j < nq; j++) {
        lo[j] = _mm512_set1_epi32((int)qs[j].lo);
        width[j] = _mm512_set1_epi32((int)(qs[j].hi - qs[j].lo));
        hi[j] = _mm512_set1_epi32((int)qs[j].hi);
        above[j] = _mm512_setzero_si512();
        w[j] = qs[j].inside;
    }
    for (Py_ssize_t k = 0; k < m; k += 16) {
        const __mmask16 valid = m - k >= 16 ? 0xFFFF : (__mmask16)((1u << (m - k)) - 1);
        __builtin_prefetch(x + (k + KEY_AHEAD) * ITEMSIZE[x_code]);
        __builtin_prefetch(b + (k + KEY_AHEAD) * ITEMSIZE[b_code]);
        const __m512 bv = load16(b, b_code, k, m), xv = load16(x, x_code, k, m);
        const __m512i key = _mm512_min_epu32(
            _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(xv, bv)), clear_sign), nan);
        for (int j = 0; j < nq; j++) {
            const __mmask16 in =
                _mm512_mask_cmplt_epu32_mask(valid, _mm512_sub_epi32(key, lo[j]), width[j]);
            if (w[j] <= qs[j].cap) { /* past the cap only counted (each store writes 16 slots) */
                _mm512_storeu_ps(qs[j].xs + w[j], _mm512_maskz_compress_ps(in, xv));
                _mm512_storeu_ps(qs[j].bs + w[j], _mm512_maskz_compress_ps(in, bv));
            }
            w[j] += __builtin_popcount(in);
            const __mmask16 a = _mm512_mask_cmpge_epu32_mask(valid, key, hi[j]);
            above[j] = _mm512_mask_add_epi32(above[j], a, above[j], one);
        }
    }
    for (int j = 0; j < nq; j++) {
        qs[j].above += _mm512_reduce_add_epi32(above[j]); /* at most KEY_BLOCK / 16 a lane */
        qs[j].inside = w[j];
    }
}

#define KEYS_FN(name, nq)                                                                          \
    __attribute__((target("avx512f"))) static void name(KeyQuery *qs, const char *b, int b_code,  \
                                                        const char *x, int x_code,                 \
                                                        Py_ssize_t m) {                            \
        keys_body(qs, nq, b, b_code, x, x_code, m);                                                \
    }
KEYS_FN(keys_1, 1)
KEYS_FN(keys_2, 2)

/* One read of the base and the models for queries grouped by model (one or two a model), a
 * block at a time so that the base's block is read from memory once. */
static void scan_keys(const char *base, int base_code, Py_ssize_t n, char *const *models,
                      const int *codes, KeyQuery *queries, int count) {
    for (Py_ssize_t start = 0; start < n; start += KEY_BLOCK) {
        const Py_ssize_t m = n - start < KEY_BLOCK ? n - start : KEY_BLOCK;
        const char *b = base + start * ITEMSIZE[base_code];
        for (int q = 0; q < count;) {
            const int i = queries[q].model;
            const int same = q + 1 < count && queries[q + 1].model == i ? 2 : 1;
            const char *x = models[i] + start * ITEMSIZE[codes[i]];
            if (same == 2) {
                keys_2(&queries[q], b, base_code, x, codes[i], m);
            } else {
                keys_1(&queries[q], b, base_code, x, codes[i], m);
            }
            q += same;
        }
    }
}
#endif

/* m samples of each model's magnitudes (m a multiple of RUN, n >= m): runs of RUN adjacent
 * elements, one at a pseudo-random place in each of m / RUN equal strata, so that no stride of
 * the tensor's layout lines up with them. A run starts at a multiple of RUN elements where its
 * stratum has room: one cache line of float32 (the misses, not the samples, cost the time; 16
 * aligned samples took as long as 8 anywhere). */
#define RUN 16
#define RUNS_AHEAD 16

/* The first element of run r of runs over n elements. */
static inline Py_ssize_t run_start(Py_ssize_t r, Py_ssize_t runs, Py_ssize_t n) {
    const Py_ssize_t first = (Py_ssize_t)((double)r * (double)n / (double)runs);
    const Py_ssize_t last = (Py_ssize_t)((double)(r + 1) * (double)n / (double)runs);
    const uint64_t draw = mix64((uint64_t)r + 1);
    const Py_ssize_t aligned = (first + RUN - 1) / RUN * RUN;
    if (aligned + RUN <= last) {
        return aligned + (Py_ssize_t)(draw % (uint64_t)((last - RUN - aligned) / RUN + 1)) * RUN;
    }
    const Py_ssize_t room = last - first > RUN ? last - first - RUN + 1 : 1;
    return first + (Py_ssize_t)(draw % (uint64_t)room);
}

static void sample(const char *base, int base_code, Py_ssize_t n, char *const *models,
                   const int *codes, int count, Py_ssize_t m, uint64_t *out, int of_variance,
                   Py_ssize_t from, Py_ssize_t to) {
    const Py_ssize_t runs = m / RUN;
    double bbuf[RUN], xbuf[RUN], all[MAX_MODELS * RUN];
    const double *x[MAX_MODELS];
    for (Py_ssize_t r = from; r < to; r++) {
        if (r + RUNS_AHEAD < to) { /* the runs are far apart: many cache misses in flight */
            const Py_ssize_t ahead = run_start(r + RUNS_AHEAD, runs, n);
            prefetch(base + ahead * ITEMSIZE[base_code], base_code, RUN);
            for (int i = 0; i < count; i++) {
                prefetch(models[i] + ahead * ITEMSIZE[codes[i]], codes[i], RUN);
            }
        }
        const Py_ssize_t j = run_start(r, runs, n);
        const double *b = widen(bbuf, base + j * ITEMSIZE[base_code], base_code, RUN);
        if (of_variance) { /* one row: SCE's variance */
            widen_all(x, all, RUN, models, codes, count, j, RUN);
            variance(xbuf, b, x, count, RUN);
            for (int k = 0; k < RUN; k++) out[r * RUN + k] = magnitude(xbuf[k]);
            continue;
        }
        for (int i = 0; i < count; i++) {
            const double *x = widen(xbuf, models[i] + j * ITEMSIZE[codes[i]], codes[i], RUN);
            for (int k = 0; k < RUN; k++) out[i * m + r * RUN + k] = magnitude(x[k] - b[k]);
        }
    }
}

/* The k-th largest (1 <= k <= n) of a[0..n), all in [lo, hi) (lo < hi), and in *equal how
 * many of them equal it: radix selection from the top, 11 bits at a time, moving the bin that
 * holds it to the front (a is permuted, its values unchanged). */
CLONED
static uint64_t kth_largest(uint64_t *a, Py_ssize_t n, Py_ssize_t k, uint64_t lo, uint64_t hi,
                            Py_ssize_t *equal) {
    Py_ssize_t bins[1 << 11];
    if (n >= 64) { /* the values' own range: far narrower than [lo, hi) for a sample's */
        uint64_t least = a[0], most = a[0];
        for (Py_ssize_t i = 1; i < n; i++) {
            least = a[i] < least ? a[i] : least;
            most = a[i] > most ? a[i] : most;
        }
        lo = least;
        hi = most + 1;
    }
    uint64_t span = hi - lo - 1;
    for (;;) {
        if (span == 0) { /* what is left is the one value */
            *equal = n;
            return lo;
        }
        int bits = 0;
        while (bits < 64 && span >> bits) bits++;
        const int shift = bits > 11 ? bits - 11 : 0;
        const Py_ssize_t used = (Py_ssize_t)(span >> shift) + 1;
        memset(bins, 0, used * sizeof bins[0]);
        for (Py_ssize_t i = 0; i < n; i++) bins[(a[i] - lo) >> shift]++;
        Py_ssize_t bin = used - 1;
        while (bins[bin] < k) k -= bins[bin--];
        Py_ssize_t w = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((Py_ssize_t)((a[i] - lo) >> shift) == bin) {
                uint64_t t = a[i];
                a[i] = a[w];
                a[w++] = t;
            }
        }
        n = w;
        lo += (uint64_t)bin << shift;
        span = shift ? ((uint64_t)1 << shift) - 1 : 0;
    }
}

/* --- order statistics of float64 rows (PCB) ----------------------------------------------------- */

/* x's place in the order of float64 values, as an unsigned integer: -inf < ... < -0 = +0 < ...
 * < +inf (the two zeros one key: they compare equal). x is not a NaN. */
static inline uint64_t order_key(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    if (u << 1 == 0) return TOP; /* +-0 */
    return u >> 63 ? ~u : u | TOP;
}

static inline double from_order_key(uint64_t key) {
    const uint64_t u = key & TOP ? key & ~TOP : ~key;
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

#define ORDER_BITS 16

/* The index-th smallest (0-based) of x[0..n), +0 for a zero, into *value; 0 (nothing written)
 * where x holds a NaN. One pass bins the values' keys by their top ORDER_BITS bits, a second
 * collects the bin that holds the index-th (malloc'd, its size), then radix selection. */
static int order_statistic(const double *x, Py_ssize_t n, Py_ssize_t index, double *value) {
    Py_ssize_t *bins = calloc((size_t)1 << ORDER_BITS, sizeof *bins);
    if (!bins) return -1;
    const int shift = 64 - ORDER_BITS;
    int nan = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        nan |= x[k] != x[k];
        bins[order_key(x[k]) >> shift]++;
    }
    if (nan) {
        free(bins);
        return 0;
    }
    uint64_t bin = 0;
    Py_ssize_t below = 0; /* values in the bins under bin */
    while (below + bins[bin] <= index) below += bins[bin++];
    const Py_ssize_t size = bins[bin];
    free(bins);
    uint64_t *chosen = malloc((size_t)(size + 1) * sizeof *chosen); /* + 1: written, not kept */
    if (!chosen) return -1;
    Py_ssize_t w = 0;
    for (Py_ssize_t j = 0; j < n && w < size; j++) { /* no branch on the data */
        const uint64_t key = order_key(x[j]);
        chosen[w] = key;
        w += key >> shift == bin;
    }
    Py_ssize_t equal;
    /* the bins of keys run to +inf's (0xFFF0...): hi never wraps */
    const uint64_t lo = bin << shift, hi = lo + ((uint64_t)1 << shift);
    const uint64_t key = kth_largest(chosen, size, size - (index - below), lo, hi, &equal);
    free(chosen);
    *value = from_order_key(key);
    return 1;
}

/* --- the merge ---------------------------------------------------------------------------------- */

typedef struct {
    int sparsify, consensus, count;
    int multiply; /* every division is by a power of two: multiply by its exact inverse instead */
    double scale, density, inverse; /* inverse: 1 / density, exact when multiply */
    int divide; /* the weighted sum is divided once: 0 not, DIVIDE by divisor, BY_INVERSE */
    double divisor, reciprocal; /* reciprocal: 1 / divisor, exact (a power of two) for BY_INVERSE */
    uint64_t below; /* DARE keeps entry j when mix64(key + (j + 1) GOLDEN) >> 11 < below */
    double weights[MAX_MODELS];
    uint64_t lo[MAX_MODELS], hi[MAX_MODELS], keys[MAX_MODELS];
    int unit; /* the sign consensus with every weight and the scale 1: no products by them */
} Spec;

/* 1 / d for d = +-2^e, e in [-1022, 1022], exactly (the exponent negated in its bits), so that
 * x * (1 / d) is x / d rounded the same way (both round the same real number). */
static inline double power_of_two_inverse(double d) {
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    u = (u & TOP) | ((UINT64_C(0x7FE) << 52) - (u & ~TOP));
    memcpy(&d, &u, sizeof d);
    return d;
}

static inline double quotient(double num, double den, const int multiply) {
    return multiply ? num * power_of_two_inverse(den) : num / den;
}

/* The weighted sum divided once by the weights' sum, as the reference's _divided(): by a power
 * of two as a product with its exact inverse (the same real number, so the same rounding). */
enum { NO_DIVIDE = 0, DIVIDE = 1, BY_INVERSE = 2 };
static inline double divided(double e, const Spec *s, const int divide) {
    if (divide == DIVIDE) return e / s->divisor;
    if (divide == BY_INVERSE) return e * s->reciprocal;
    return e;
}

/* Model i's task vector entry t at global index j, sparsified. */
static inline double sparsified(double t, const Spec *s, int i, uint64_t j, const int sparsify,
                                const int multiply) {
    /* bit masks rather than conditionals, which the compiler could turn into branches */
    if (sparsify == KEEP_RANGE) return masked(t, magnitude(t) - s->lo[i] < s->hi[i] - s->lo[i]);
    if (sparsify == KEEP_DRAWN) {
        const double scaled = multiply ? t * s->inverse : t / s->density;
        return masked(scaled, mix64(s->keys[i] + (j + 1) * GOLDEN) >> 11 < s->below);
    }
    return t;
}


/* The merge of one block, each element in registers: for up to FUSED models, the count known
 * when compiled (the loops over the models unrolled, the loop over the elements vectorised).
 * Float32 inputs and output (f32) are read and written where they lie; otherwise the inputs
 * are float64 blocks (widened) and out a float64 block (narrowed after). */
#define FUSED 4
#define AT(p, k) (f32 ? (double)((const float *)(p))[k] : ((const double *)(p))[k])
static ALWAYS_INLINE void fused(
    void *out, const void *b, const void *const *xs, Py_ssize_t m, const Spec *s, uint64_t first,
    const int count, const int sparsify, const int consensus, const int multiply, const int divide,
    const int unit, const int f32) {
    const void *x[FUSED];
    double w[FUSED];
    for (int i = 0; i < count; i++) x[i] = xs[i], w[i] = unit ? 1.0 : s->weights[i];
    const double scale = unit ? 1.0 : s->scale;
    for (Py_ssize_t k = 0; k < m; k++) {
        const double bk = AT(b, k);
        double d[FUSED], dw[FUSED], e = 0.0;
        for (int i = 0; i < count; i++) {
            d[i] = sparsified(AT(x[i], k) - bk, s, i, first + (uint64_t)k, sparsify, multiply);
            dw[i] = d[i] * w[i];
            e = e + dw[i];
        }
        if (consensus == SIGN && unit && count == 2 && multiply) {
            /* two unit weights: den is 0, 1 or 2, so num * (1 / den) is num, num or num * 0.5 */
            const uint64_t a0 = agrees(e, d[0]), a1 = agrees(e, d[1]);
            const double num = (0.0 + masked(d[0], a0)) + masked(d[1], a1);
            e = choose(a0 & a1, num * 0.5, num);
        } else if (consensus == SIGN) {
            double num = 0.0, den = 0.0;
            for (int i = 0; i < count; i++) { /* see agrees() */
                const uint64_t a = agrees(e, d[i]);
                num = num + masked(dw[i], a);
                den = den + masked(w[i], a);
            }
            e = choose(den != 0, quotient(num, den, multiply), num);
        }
        e = divided(e, s, divide);
        const double r = bk + e * scale;
        if (f32) {
            ((float *)out)[k] = (float)r;
        } else {
            ((double *)out)[k] = r;
        }
    }
}

typedef void (*fused_fn)(void *, const void *, const void *const *, Py_ssize_t, const Spec *,
                         uint64_t, int);

#define FUSED_KEY(SPARSIFY, CONSENSUS, MULTIPLY, DIVIDE, UNIT)                                     \
    ((((SPARSIFY) * 4 + (CONSENSUS) * 2 + (MULTIPLY)) * 3 + (DIVIDE)) * 2 + (UNIT))
#define FUSED_CASE(COUNT, SPARSIFY, CONSENSUS, MULTIPLY, DIVIDE, UNIT)                             \
    case FUSED_KEY(SPARSIFY, CONSENSUS, MULTIPLY, DIVIDE, UNIT):                                   \
        if (f32) {                                                                                 \
            fused(out, b, xs, m, s, first, COUNT, SPARSIFY, CONSENSUS, MULTIPLY, DIVIDE, UNIT, 1); \
        } else {                                                                                   \
            fused(out, b, xs, m, s, first, COUNT, SPARSIFY, CONSENSUS, MULTIPLY, DIVIDE, UNIT, 0); \
        }                                                                                          \
        break;
#define SUM_CASES(COUNT, SPARSIFY, MULTIPLY)                                                       \
    FUSED_CASE(COUNT, SPARSIFY, NO_CONSENSUS, MULTIPLY, NO_DIVIDE, 0)                              \
    FUSED_CASE(COUNT, SPARSIFY, NO_CONSENSUS, MULTIPLY, DIVIDE, 0)                                 \
    FUSED_CASE(COUNT, SPARSIFY, NO_CONSENSUS, MULTIPLY, BY_INVERSE, 0)
/* the sign consensus with unit weights and scale (TIES' and breadcrumbs' defaults) has its own */
#define FUSED_CASES(COUNT, SPARSIFY)                                                               \
    SUM_CASES(COUNT, SPARSIFY, 0)                                                                  \
    FUSED_CASE(COUNT, SPARSIFY, SIGN, 0, NO_DIVIDE, 0)                                             \
    FUSED_CASE(COUNT, SPARSIFY, SIGN, 1, NO_DIVIDE, 0)                                             \
    FUSED_CASE(COUNT, SPARSIFY, SIGN, 0, NO_DIVIDE, 1)                                             \
    FUSED_CASE(COUNT, SPARSIFY, SIGN, 1, NO_DIVIDE, 1)
/* py_merge refuses a divisor with the sign consensus, so every Spec has its case here */
#define DEFINE_FUSED(COUNT)                                                                        \
    CLONED static void fused_##COUNT(void *out, const void *b, const void *const *xs,             \
                                     Py_ssize_t m, const Spec *s, uint64_t first, int f32) {       \
        switch (FUSED_KEY(s->sparsify, s->consensus, s->multiply, s->divide, s->unit)) {           \
            FUSED_CASES(COUNT, NO_SPARSIFY)                                                        \
            FUSED_CASES(COUNT, KEEP_RANGE)                                                         \
            FUSED_CASES(COUNT, KEEP_DRAWN)                                                         \
            SUM_CASES(COUNT, KEEP_DRAWN, 1)                                                        \
        }                                                                                          \
    }

DEFINE_FUSED(1)
DEFINE_FUSED(2)
DEFINE_FUSED(3)
DEFINE_FUSED(4)

static const fused_fn FUSED_FNS[FUSED + 1] = {NULL, fused_1, fused_2, fused_3, fused_4};

/* More models: one model at a time through block buffers (deltas: count rows). */
CLONED
static void unfused(double *RESTRICT result, const double *RESTRICT b, const double *const *xs,
                    Py_ssize_t m, const Spec *s, uint64_t first, double (*deltas)[BLOCK]) {
    double e[BLOCK], num[BLOCK], den[BLOCK];
    for (int i = 0; i < s->count; i++) {
        const double w = s->weights[i], *x = xs[i];
        double *d = deltas[i];
        for (Py_ssize_t k = 0; k < m; k++) {
            d[k] = sparsified(x[k] - b[k], s, i, first + (uint64_t)k, s->sparsify, s->multiply);
            e[k] = (i ? e[k] : 0.0) + d[k] * w;
        }
    }
    if (s->consensus == SIGN) {
        for (Py_ssize_t k = 0; k < m; k++) num[k] = den[k] = 0.0;
        for (int i = 0; i < s->count; i++) {
            const double w = s->weights[i], *d = deltas[i];
            for (Py_ssize_t k = 0; k < m; k++) { /* see agrees() */
                const uint64_t a = agrees(e[k], d[k]);
                num[k] = num[k] + masked(d[k] * w, a);
                den[k] = den[k] + masked(w, a);
            }
        }
        for (Py_ssize_t k = 0; k < m; k++) {
            e[k] = den[k] != 0 ? quotient(num[k], den[k], s->multiply) : num[k];
        }
    }
    if (s->divide == DIVIDE) {
        for (Py_ssize_t k = 0; k < m; k++) e[k] = divided(e[k], s, DIVIDE);
    } else if (s->divide == BY_INVERSE) {
        for (Py_ssize_t k = 0; k < m; k++) e[k] = divided(e[k], s, BY_INVERSE);
    }
    for (Py_ssize_t k = 0; k < m; k++) result[k] = b[k] + e[k] * s->scale;
}

CLONED
static void merge(char *out, int out_code, const char *base, int base_code, Py_ssize_t n,
                  uint64_t first, char *const *models, const int *codes, const Spec *s,
                  double (*buffers)[BLOCK]) {
    double bbuf[BLOCK], result[BLOCK];
    const void *xs[MAX_MODELS];
    double (*deltas)[BLOCK] = buffers + s->count;
    int f32 = s->count <= FUSED && out_code == F32 && base_code == F32;
    for (int i = 0; i < s->count; i++) f32 &= codes[i] == F32;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;
        const uint64_t at = first + (uint64_t)start;
        if (f32) { /* straight from the inputs into out */
            for (int i = 0; i < s->count; i++) xs[i] = models[i] + start * sizeof(float);
            FUSED_FNS[s->count](out + start * sizeof(float), base + start * sizeof(float), xs, m,
                                s, at, 1);
            continue;
        }
        const double *b = widen(bbuf, base + start * ITEMSIZE[base_code], base_code, m);
        for (int i = 0; i < s->count; i++) {
            xs[i] = widen(buffers[i], models[i] + start * ITEMSIZE[codes[i]], codes[i], m);
        }
        if (s->count <= FUSED) {
            FUSED_FNS[s->count](result, b, xs, m, s, at, 0);
        } else {
            unfused(result, b, (const double *const *)xs, m, s, at, deltas);
        }
        narrow(out + start * ITEMSIZE[out_code], out_code, result, m);
    }
}

/* --- the element-wise methods: MagMax, TALL-mask consensus, NearSwap, SCE ----------------------- */
/* Up to FUSED models each entry is computed in registers (elementwise_entry); more go through
 * block buffers one model at a time (elementwise_block), in the same order. */

/* The references are elementwise.magmax_merge, consensus_merge, nearswap_merge and sce_merge;
 * with d_i = x_i - b (widened, then one rounding) each entry is, in their order:
 *
 *     magmax:     t = d_0; t = d_i where magnitude(d_i) > magnitude(t)     out = b + t * scale
 *     consensus:  s = (0 + d_0) + d_1 + ...; votes = #{i: |d_i| >= |s - d_i| * lambda}
 *                 e = (0 + d_0 w_0) + d_1 w_1 + ..., +0 where votes < k   out = b + e * scale
 *     nearswap:   q = t / |x_0 - b|; w = 1 where q is NaN, else min(q, 1)
 *                 out = x_0 w + b (1 - w)
 *     sce:        d_i = +0 where magnitude(variance) < threshold (when selecting);
 *                 e = (0 + d_0) + d_1 + ...; a_i = e >= 0 ? d_i > 0 : d_i < 0;
 *                 p = (0 + (a_i ? d_i : 0) c_i) + ..., q = (0 + (a_i ? 1 : 0) c_i) + ...
 *                 out = b + (q != 0 ? p / q : p) * scale
 *     base:       out = b (SCE when it selects nothing)
 *
 * SCE's coefficients c_i are the sums of the kept d_i^2, which square_sums() adds up exactly:
 * per binary exponent of d_i^2, two int64 sums of its 53-bit significand's high and low 26 bits
 * (terge.kernels.primitives.exact_total rounds their total once). */
enum { MAGMAX = 0, CONSENSUS = 1, NEARSWAP = 2, SCE = 3, BASE = 4, SCE_SELECT = 5 /* loops only */ };
#define EXPONENTS 2048 /* the last one counts NaNs (slot 0) and infinities (slot 1) */
#define HALF 26

typedef struct {
    int kind, count;
    double scale, lambda, t;
    Py_ssize_t votes;   /* consensus: the masks an entry needs (k) */
    int select;         /* sce: entries kept where magnitude(variance) >= threshold */
    uint64_t threshold;
    double weights[MAX_MODELS]; /* consensus: the merge weights; sce: the coefficients */
} Elementwise;

/* SCE's d_i (rows of d), +0 where the variance's magnitude is below the threshold. */
static inline void sce_deltas(double (*d)[BLOCK], double *v, const double *b,
                              const double *const *x, const Elementwise *s, Py_ssize_t m) {
    for (int i = 0; i < s->count; i++) {
        for (Py_ssize_t k = 0; k < m; k++) d[i][k] = x[i][k] - b[k];
    }
    if (!s->select) return;
    variance(v, b, x, s->count, m);
    for (int i = 0; i < s->count; i++) {
        for (Py_ssize_t k = 0; k < m; k++) {
            d[i][k] = masked(d[i][k], magnitude(v[k]) >= s->threshold);
        }
    }
}

/* One entry of an element-wise method (kind and count known when compiled: the loops over the
 * models unrolled, the loop over the entries vectorised), from b and the models' x[i]. */
static ALWAYS_INLINE double elementwise_entry(const int kind, const int count, const double b,
                                              const double *x, const Elementwise *s) {
    double d[FUSED];
    for (int i = 0; i < count; i++) d[i] = x[i] - b;
    if (kind == MAGMAX) {
        double best = d[0];
        uint64_t u = magnitude(best);
        for (int i = 1; i < count; i++) {
            const uint64_t ut = magnitude(d[i]), larger = ut > u;
            best = choose(larger, d[i], best);
            u = larger ? ut : u;
        }
        return b + best * s->scale;
    }
    if (kind == CONSENSUS) {
        double total = 0.0, e = 0.0;
        uint64_t votes = 0;
        for (int i = 0; i < count; i++) total = total + d[i];
        for (int i = 0; i < count; i++) votes += fabs(d[i]) >= fabs(total - d[i]) * s->lambda;
        for (int i = 0; i < count; i++) e = e + d[i] * s->weights[i];
        return b + masked(e, votes >= (uint64_t)s->votes) * s->scale;
    }
    if (kind == NEARSWAP) {
        const double q = s->t / fabs(d[0]);
        const double w = q != q ? 1.0 : (q > 1.0 ? 1.0 : q);
        return x[0] * w + b * (1.0 - w);
    }
    if (kind == BASE) return b;
    /* SCE */
    if (kind == SCE_SELECT) {
        double v = 0.0;
        for (int i = 0; i < count; i++) { /* j from 0, not i + 1: a fixed count, so unrolled */
            for (int j = 0; j < count; j++) {
                if (j > i) v = v + (d[i] - d[j]) * (d[i] - d[j]);
            }
        }
        const uint64_t keep = magnitude(v) >= s->threshold;
        for (int i = 0; i < count; i++) d[i] = masked(d[i], keep);
    }
    double e = 0.0, num = 0.0, den = 0.0;
    for (int i = 0; i < count; i++) e = e + d[i];
    for (int i = 0; i < count; i++) { /* literally: c may be inf or NaN */
        const uint64_t a = agrees(e, d[i]);
        num = num + choose(a, d[i], 0.0) * s->weights[i];
        den = den + choose(a, 1.0, 0.0) * s->weights[i];
    }
    return b + choose(den != 0, num / den, num) * s->scale;
}

/* m entries from b and xs (float32 where they lie when f32, else float64 blocks) into out
 * (float32 where it lies when f32, else a float64 block). */
static ALWAYS_INLINE void elementwise_fused(void *out, const void *b, const void *const *xs,
                                            Py_ssize_t m, const Elementwise *s, const int kind,
                                            const int count, const int f32) {
    const void *p[FUSED];
    for (int i = 0; i < count; i++) p[i] = xs[i];
    for (Py_ssize_t k = 0; k < m; k++) {
        double x[FUSED];
        for (int i = 0; i < count; i++) x[i] = AT(p[i], k);
        const double r = elementwise_entry(kind, count, AT(b, k), x, s);
        if (f32) {
            ((float *)out)[k] = (float)r;
        } else {
            ((double *)out)[k] = r;
        }
    }
}

typedef void (*elementwise_fn)(void *, const void *, const void *const *, Py_ssize_t,
                               const Elementwise *, int);
#define FUSED_KIND(s) ((s)->kind == SCE && (s)->select ? SCE_SELECT : (s)->kind)
#define ELEMENTWISE_CASE(KIND, COUNT)                                                              \
    case KIND:                                                                                     \
        if (f32) {                                                                                 \
            elementwise_fused(out, b, xs, m, s, KIND, COUNT, 1);                                   \
        } else {                                                                                   \
            elementwise_fused(out, b, xs, m, s, KIND, COUNT, 0);                                   \
        }                                                                                          \
        break;
#define DEFINE_ELEMENTWISE(COUNT)                                                                  \
    CLONED static void elementwise_##COUNT(void *out, const void *b, const void *const *xs,       \
                                           Py_ssize_t m, const Elementwise *s, int f32) {          \
        switch (FUSED_KIND(s)) {                                                                   \
            ELEMENTWISE_CASE(MAGMAX, COUNT)                                                        \
            ELEMENTWISE_CASE(CONSENSUS, COUNT)                                                     \
            ELEMENTWISE_CASE(NEARSWAP, COUNT)                                                      \
            ELEMENTWISE_CASE(SCE, COUNT)                                                           \
            ELEMENTWISE_CASE(BASE, COUNT)                                                          \
            ELEMENTWISE_CASE(SCE_SELECT, COUNT)                                                    \
        }                                                                                          \
    }
DEFINE_ELEMENTWISE(1)
DEFINE_ELEMENTWISE(2)
DEFINE_ELEMENTWISE(3)
DEFINE_ELEMENTWISE(4)
static const elementwise_fn ELEMENTWISE_FNS[FUSED + 1] = {NULL, elementwise_1, elementwise_2,
                                                          elementwise_3, elementwise_4};

CLONED
static void elementwise_block(double *RESTRICT r, const double *RESTRICT b,
                              const double *const *x, Py_ssize_t m, const Elementwise *s,
                              double (*d)[BLOCK]) {
    double e[BLOCK], v[BLOCK];
    uint64_t u[BLOCK];
    const double scale = s->scale;
    switch (s->kind) {
    case MAGMAX: {
        double *best = d[0];
        for (Py_ssize_t k = 0; k < m; k++) {
            best[k] = x[0][k] - b[k];
            u[k] = magnitude(best[k]);
        }
        for (int i = 1; i < s->count; i++) {
            for (Py_ssize_t k = 0; k < m; k++) {
                const double t = x[i][k] - b[k];
                const uint64_t ut = magnitude(t), larger = ut > u[k];
                best[k] = choose(larger, t, best[k]);
                u[k] = larger ? ut : u[k];
            }
        }
        for (Py_ssize_t k = 0; k < m; k++) r[k] = b[k] + best[k] * scale;
        break;
    }
    case CONSENSUS: {
        const double lambda = s->lambda;
        for (int i = 0; i < s->count; i++) {
            for (Py_ssize_t k = 0; k < m; k++) {
                d[i][k] = x[i][k] - b[k];
                v[k] = (i ? v[k] : 0.0) + d[i][k];
            }
        }
        for (Py_ssize_t k = 0; k < m; k++) u[k] = 0;
        for (int i = 0; i < s->count; i++) {
            for (Py_ssize_t k = 0; k < m; k++) {
                u[k] += fabs(d[i][k]) >= fabs(v[k] - d[i][k]) * lambda;
            }
        }
        for (int i = 0; i < s->count; i++) {
            const double w = s->weights[i];
            for (Py_ssize_t k = 0; k < m; k++) e[k] = (i ? e[k] : 0.0) + d[i][k] * w;
        }
        const uint64_t votes = (uint64_t)s->votes;
        for (Py_ssize_t k = 0; k < m; k++) r[k] = b[k] + masked(e[k], u[k] >= votes) * scale;
        break;
    }
    case NEARSWAP: {
        const double t = s->t;
        for (Py_ssize_t k = 0; k < m; k++) {
            const double q = t / fabs(x[0][k] - b[k]);
            const double w = q != q ? 1.0 : (q > 1.0 ? 1.0 : q);
            r[k] = x[0][k] * w + b[k] * (1.0 - w);
        }
        break;
    }
    case BASE:
        for (Py_ssize_t k = 0; k < m; k++) r[k] = b[k];
        break;
    default: { /* SCE */
        sce_deltas(d, v, b, x, s, m);
        for (int i = 0; i < s->count; i++) {
            for (Py_ssize_t k = 0; k < m; k++) e[k] = (i ? e[k] : 0.0) + d[i][k];
        }
        double num[BLOCK], den[BLOCK];
        for (Py_ssize_t k = 0; k < m; k++) num[k] = den[k] = 0.0;
        for (int i = 0; i < s->count; i++) {
            const double c = s->weights[i];
            for (Py_ssize_t k = 0; k < m; k++) { /* literally: c may be inf or NaN */
                const uint64_t a = agrees(e[k], d[i][k]);
                num[k] = num[k] + choose(a, d[i][k], 0.0) * c;
                den[k] = den[k] + choose(a, 1.0, 0.0) * c;
            }
        }
        for (Py_ssize_t k = 0; k < m; k++) {
            const double merged = den[k] != 0 ? num[k] / den[k] : num[k];
            r[k] = b[k] + merged * scale;
        }
        break;
    }
    }
}

CLONED
static void elementwise(char *out, int out_code, const char *base, int base_code, Py_ssize_t n,
                        char *const *models, const int *codes, const Elementwise *s,
                        double *xbuf, double (*d)[BLOCK]) {
    double bbuf[BLOCK], result[BLOCK];
    const double *x[MAX_MODELS];
    const void *xs[MAX_MODELS];
    int f32 = s->count <= FUSED && out_code == F32 && base_code == F32;
    for (int i = 0; i < s->count; i++) f32 &= codes[i] == F32;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;
        if (f32) { /* straight from the inputs into out */
            for (int i = 0; i < s->count; i++) xs[i] = models[i] + start * sizeof(float);
            ELEMENTWISE_FNS[s->count](out + start * sizeof(float), base + start * sizeof(float),
                                      xs, m, s, 1);
            continue;
        }
        const double *b = widen(bbuf, base + start * ITEMSIZE[base_code], base_code, m);
        widen_all(x, xbuf, BLOCK, models, codes, s->count, start, m);
        if (s->count <= FUSED) {
            for (int i = 0; i < s->count; i++) xs[i] = x[i];
            ELEMENTWISE_FNS[s->count](result, b, xs, m, s, 0);
        } else {
            elementwise_block(result, b, x, m, s, d);
        }
        narrow(out + start * ITEMSIZE[out_code], out_code, result, m);
    }
}

/* sums[i][e] += the high and low halves of significands with biased exponent e (subnormals: e = 0,
 * no hidden bit) whose signed total is the exact sum of d_i^2; NaNs and infinities counted in
 * sums[i][EXPONENTS - 1] (terge.kernels.primitives.exact_total rounds the total once).
 *
 * Fast path, in vectors: Rump, Ogita and Oishi's error-free extraction ("Accurate floating-point
 * summation", SIAM J. Sci. Comput. 31(1), 2008, Lemma 3.3). With sigma = 2^s and |p| <= 2^-10
 * sigma, t = (sigma + p) - sigma and p - t are exact, p = t + (p - t), t is a multiple of 2^-53
 * sigma and |p - t| <= 2^-53 sigma; and any sum of at most 2^10 such t is exact, in any order.
 * A block (BLOCK = 2^10 entries) of squares is split level by level, sigma stepping down by
 * 2^42, until every residual is 0 (the level whose sigma is at most the least square's
 * exponent is the last: counted, not checked); each level's exact float64 sum goes into the
 * integer sums as one signed significand. Where two levels take it all (squares spanning at
 * most 31 binades: the common case) both are extracted in one read of the block. Blocks with
 * NaNs, infinities or squares near overflow take the plain path: each significand added whole
 * into a uint64 slot per exponent (at most 2^10 significands of 53 bits: below 2^63), then
 * split into the int64 sums. */
#define LANES 32     /* partial sums per level (independent chains of additions) */
#define LEVEL_STEP 42 /* binades between levels: 53 - 10 - 1 (one to spare) */

/* The least and greatest rows of the sums written (0 to EXPONENTS - 2; the last, NaNs and
 * infinities, apart): the rest are left 0, so the rounding reads only these. */
typedef struct {
    int least, most;
} Used;

static inline void note_used(Used *used, int least, int most) {
    used->least = least < used->least ? least : used->least;
    used->most = most > used->most ? most : used->most;
}

/* Add the exact float64 value t (finite) into the signed integer sums. */
static void add_exact(int64_t (*row)[2], double t, Used *used) {
    uint64_t bits;
    memcpy(&bits, &t, sizeof bits);
    const uint64_t e = (bits >> 52) & 0x7FF, fraction = bits & ((UINT64_C(1) << 52) - 1);
    note_used(used, (int)e, (int)e);
    const int64_t significand = (int64_t)(fraction | (uint64_t)(e != 0) << 52);
    const int64_t high = significand >> HALF, low = significand & ((INT64_C(1) << HALF) - 1);
    if (bits >> 63) {
        row[e][0] -= high, row[e][1] -= low;
    } else {
        row[e][0] += high, row[e][1] += low;
    }
}

/* The plain path for one block of squares q (m of them). */
static void square_sums_plain(int64_t (*row)[2], uint64_t *table, const double *q, Py_ssize_t m,
                              Used *used) {
    uint64_t least = EXPONENTS, most = 0;
    for (Py_ssize_t k = 0; k < m; k++) {
        uint64_t bits;
        memcpy(&bits, &q[k], sizeof bits);
        const uint64_t e = (bits >> 52) & 0x7FF, fraction = bits & ((UINT64_C(1) << 52) - 1);
        if (e == 0x7FF) { /* NaNs and infinities: counted, and out of the tables */
            row[0x7FF][fraction == 0]++;
            continue;
        }
        const uint64_t significand = fraction | (uint64_t)(e != 0) << 52;
        if (!significand) continue;
        table[e] += significand;
        least = e < least ? e : least;
        most = e > most ? e : most;
    }
    if (least <= most) note_used(used, (int)least, (int)most);
    for (uint64_t e = least; e <= most && least <= most; e++) {
        const uint64_t total = table[e];
        row[e][0] += (int64_t)(total >> HALF);
        row[e][1] += (int64_t)(total & ((UINT64_C(1) << HALF) - 1));
        table[e] = 0;
    }
}

/* q[k] = the square of x[k] - b[k] (+0 where keep[k] is 0, with select); returns the greatest
 * bit pattern of the squares (+0 or more, or NaN), and in *least the least of the nonzero ones
 * (UINT64_MAX when all are 0). */
static ALWAYS_INLINE uint64_t squares(double *RESTRICT q, const void *x, const void *b,
                                      const uint64_t *keep, Py_ssize_t m, uint64_t *least,
                                      const int f32, const int b32, const int select) {
    uint64_t most = 0, fewest = UINT64_MAX;
    for (Py_ssize_t k = 0; k < m; k++) { /* vectorised */
        const double bk = b32 ? (double)((const float *)b)[k] : ((const double *)b)[k];
        double t = AT(x, k) - bk;
        if (select) t = masked(t, keep[k]);
        q[k] = t * t;
        uint64_t bits;
        memcpy(&bits, &q[k], sizeof bits);
        most = bits > most ? bits : most;
        fewest = bits - 1 < fewest ? bits - 1 : fewest; /* +0 wraps to the top */
    }
    *least = fewest + 1 ? fewest + 1 : UINT64_MAX;
    return most;
}

/* One level of the extraction: t = (sigma + q) - sigma added up, q left with q - t; returns the
 * level's exact sum. */
static ALWAYS_INLINE double extract(double *RESTRICT q, Py_ssize_t m, double sigma) {
    double lanes[LANES] = {0.0};
    Py_ssize_t k = 0;
    for (; k + LANES <= m; k += LANES) { /* vectorised: each lane's sum is exact */
        for (int l = 0; l < LANES; l++) {
            const double t = (sigma + q[k + l]) - sigma;
            q[k + l] = q[k + l] - t;
            lanes[l] = lanes[l] + t;
        }
    }
    for (; k < m; k++) {
        const double t = (sigma + q[k]) - sigma;
        q[k] = q[k] - t;
        lanes[0] = lanes[0] + t;
    }
    double level = 0.0; /* exact, in any order */
    for (int l = 0; l < LANES; l++) level = level + lanes[l];
    return level;
}

/* Two levels of the extraction in one read of q, where the second leaves nothing: returns the
 * first level's exact sum, the second's in *second. */
static ALWAYS_INLINE double extract2(const double *RESTRICT q, Py_ssize_t m, double sigma,
                                     double sigma2, double *second) {
    double lanes[LANES] = {0.0}, lanes2[LANES] = {0.0};
    Py_ssize_t k = 0;
    for (; k + LANES <= m; k += LANES) {
        for (int l = 0; l < LANES; l++) {
            const double t = (sigma + q[k + l]) - sigma;
            const double r = q[k + l] - t;
            lanes[l] = lanes[l] + t;
            lanes2[l] = lanes2[l] + ((sigma2 + r) - sigma2);
        }
    }
    for (; k < m; k++) {
        const double t = (sigma + q[k]) - sigma;
        const double r = q[k] - t;
        lanes[0] = lanes[0] + t;
        lanes2[0] = lanes2[0] + ((sigma2 + r) - sigma2);
    }
    double level = 0.0, level2 = 0.0;
    for (int l = 0; l < LANES; l++) level = level + lanes[l], level2 = level2 + lanes2[l];
    *second = level2;
    return level;
}

/* One block's squares for each model, added into sums[i] (see above). */
CLONED
static void square_sums_block(int64_t (*sums)[EXPONENTS][2], uint64_t *table, const void *b,
                              const void *const *x, const uint64_t *keep, Py_ssize_t m,
                              int count, int f32, Used *used) {
    double q[BLOCK], wide[BLOCK];
    const int b32 = f32 && count == 1; /* else a float32 base is widened once for every model */
    if (f32 && !b32) {
        for (Py_ssize_t k = 0; k < m; k++) wide[k] = ((const float *)b)[k];
        b = wide;
    }
    for (int i = 0; i < count; i++) {
        int64_t (*row)[2] = sums[i];
        uint64_t most, least;
        if (f32) { /* float32 models: only without a selection (see square_sums) */
            most = b32 ? squares(q, x[i], b, keep, m, &least, 1, 1, 0)
                       : squares(q, x[i], b, keep, m, &least, 1, 0, 0);
        } else {
            most = keep ? squares(q, x[i], b, keep, m, &least, 0, 0, 1)
                        : squares(q, x[i], b, keep, m, &least, 0, 0, 0);
        }
        if (!most) continue; /* only zeros */
        const int top = (int)(most >> 52);
        if (top >= 0x7FF - 11) { /* NaNs, infinities, or sigma would overflow */
            square_sums_plain(row, table, q, m, used);
            continue;
        }
        /* sigma = 2^(top - 1012) >= 2^10 * every square, then 2^42 less level by level. Every
         * square (and every residual) is a multiple of the least square's ulp, 2^(low - 52)
         * with low its exponent (-1022 for a subnormal): the level whose sigma is 2^low or
         * less takes what is left whole, and nothing remains. Below 2^-1000 (squares near the
         * subnormals) the few left are added one by one, exactly, as signed significands. */
        const int low = (least >> 52 ? (int)(least >> 52) : 1) - 1023;
        int e = top - 1023 + 11;
        if (e - LEVEL_STEP <= low && e - LEVEL_STEP >= -1000) { /* the common case: two levels */
            double second;
            const double first = extract2(q, m, ldexp(1.0, e), ldexp(1.0, e - LEVEL_STEP), &second);
            if (first != 0.0) add_exact(row, first, used);
            if (second != 0.0) add_exact(row, second, used);
            continue;
        }
        for (; e >= -1000; e -= LEVEL_STEP) {
            const double level = extract(q, m, ldexp(1.0, e));
            if (level != 0.0) add_exact(row, level, used);
            if (e <= low) break;
        }
        if (e < -1000) {
            for (Py_ssize_t k = 0; k < m; k++) {
                if (q[k] != 0.0) add_exact(row, q[k], used);
            }
        }
    }
}

/* The exact total of rows least..most of parts tables of sums (each EXPONENTS x 2 int64, row e
 * holding the signed sums of the high and low halves of significands with biased exponent e),
 * correctly rounded to float64 (ties to even), as terge.kernels.primitives.exact_totals rounds
 * it: in units of 2^-1074 the total is sum_e (high_e 2^26 + low_e) 2^max(e - 1, 0). The
 * positive and negative terms are added into two unsigned integers of LIMBS 64-bit limbs, then
 * the smaller taken from the larger. Returns 0, or -1 where the total is negative (a sum of
 * squares cannot be: left to the caller's exact_totals, which says what it is). */
#define LIMBS 36 /* 2,304 bits: shifts up to 2,045, terms below 2^90, carries */

static void add_shifted(uint64_t *big, unsigned __int128 v, int shift) {
    int w = shift / 64;
    const int r = shift % 64;
    uint64_t parts[3] = {(uint64_t)(v << r), (uint64_t)(v >> 64), 0}; /* v 2^r, limb by limb */
    if (r) {
        const unsigned __int128 high = v >> (64 - r); /* the bits shifted past the first limb */
        parts[1] = (uint64_t)high;
        parts[2] = (uint64_t)(high >> 64);
    }
    unsigned __int128 carry = 0;
    for (int k = 0; w < LIMBS && (k < 3 || carry); k++, w++) {
        carry += (unsigned __int128)big[w] + (k < 3 ? parts[k] : 0);
        big[w] = (uint64_t)carry;
        carry >>= 64;
    }
}

static int round_total(const int64_t *tables, Py_ssize_t parts, Py_ssize_t stride, int least,
                       int most, double *total) {
    uint64_t plus[LIMBS] = {0}, minus[LIMBS] = {0};
    for (int e = least; e <= most; e++) {
        __int128 term = 0;
        for (Py_ssize_t p = 0; p < parts; p++) {
            const int64_t *row = tables + p * stride + 2 * (Py_ssize_t)e;
            term += (__int128)row[0] * ((__int128)1 << HALF) + row[1];
        }
        if (term == 0) continue;
        const int shift = e > 1 ? e - 1 : 0;
        if (term > 0) {
            add_shifted(plus, (unsigned __int128)term, shift);
        } else {
            add_shifted(minus, (unsigned __int128)(-term), shift);
        }
    }
    int top = LIMBS - 1; /* compare, then take the smaller from the larger */
    while (top >= 0 && plus[top] == minus[top]) top--;
    if (top < 0) {
        *total = 0.0;
        return 0;
    }
    if (plus[top] < minus[top]) return -1;
    uint64_t borrow = 0;
    for (int w = 0; w < LIMBS; w++) {
        const uint64_t a = plus[w], b = minus[w];
        plus[w] = a - b - borrow;
        borrow = (a < b) || (a - b < borrow);
    }
    while (plus[top] == 0) top--; /* the difference is not 0 */
    const int bit = 63 - __builtin_clzll(plus[top]), p = top * 64 + bit; /* the leading 1 */
    if (p < 53) { /* fewer than 54 bits: exact */
        *total = ldexp((double)plus[0], -1074);
        return 0;
    }
    /* the 53 bits from p down, then the rounding bit (p - 53) and whether any below is set */
    uint64_t mantissa = 0;
    for (int k = p; k > p - 53; k--) mantissa = mantissa << 1 | ((plus[k / 64] >> (k % 64)) & 1);
    const int r = p - 53;
    const int round = (plus[r / 64] >> (r % 64)) & 1;
    int sticky = (plus[r / 64] & ((UINT64_C(1) << (r % 64)) - 1)) != 0;
    for (int w = r / 64 - 1; w >= 0 && !sticky; w--) sticky = plus[w] != 0;
    if (round && (sticky || (mantissa & 1))) mantissa++; /* 2^53 at most: exact as a double */
    *total = ldexp((double)mantissa, p - 52 - 1074); /* a normal result, or infinity */
    return 0;
}

/* Float32 inputs are read where they lie; others (and SCE's selection, whose variance reads
 * float64 blocks) are widened a block at a time. */
CLONED
static void square_sums(const char *base, int base_code, Py_ssize_t n, char *const *models,
                        const int *codes, const Elementwise *s, int64_t (*sums)[EXPONENTS][2],
                        double *xbuf, Used *used) {
    double bbuf[BLOCK], v[BLOCK];
    uint64_t table[EXPONENTS] = {0}, keep[BLOCK];
    const double *x[MAX_MODELS];
    const void *p[MAX_MODELS];
    int f32 = base_code == F32 && !s->select;
    for (int i = 0; i < s->count; i++) f32 &= codes[i] == F32;
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        const Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;
        const Py_ssize_t ahead = start + AHEAD * BLOCK;
        const Py_ssize_t later = n - ahead < BLOCK ? n - ahead : BLOCK;
        if (later > 0) { /* the streams are read a block each in turn: ask for them early */
            prefetch(base + ahead * ITEMSIZE[base_code], base_code, later);
            for (int i = 0; i < s->count; i++) {
                prefetch(models[i] + ahead * ITEMSIZE[codes[i]], codes[i], later);
            }
        }
        if (f32) {
            for (int i = 0; i < s->count; i++) p[i] = models[i] + start * sizeof(float);
            square_sums_block(sums, table, base + start * sizeof(float), p, NULL, m, s->count, 1,
                              used);
            continue;
        }
        const double *b = widen(bbuf, base + start * ITEMSIZE[base_code], base_code, m);
        widen_all(x, xbuf, BLOCK, models, codes, s->count, start, m);
        if (s->select) {
            variance(v, b, x, s->count, m);
            for (Py_ssize_t k = 0; k < m; k++) keep[k] = magnitude(v[k]) >= s->threshold;
        }
        for (int i = 0; i < s->count; i++) p[i] = x[i];
        square_sums_block(sums, table, b, p, s->select ? keep : NULL, m, s->count, 0, used);
    }
}

/* --- Python bindings ----------------------------------------------------------------------------- */

static int check_code(int code) {
    if (code < F64 || code > F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", code);
        return 0;
    }
    return 1;
}

/* Addresses and dtype codes of the models, checked. */
static int parse_models(PyObject *addresses_obj, PyObject *codes_obj, char **addresses,
                        int *codes, int *count) {
    PyObject *addresses_seq = PySequence_Fast(addresses_obj, "models must be a sequence");
    if (!addresses_seq) return 0;
    PyObject *codes_seq = PySequence_Fast(codes_obj, "codes must be a sequence");
    int ok = 0;
    if (!codes_seq) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(addresses_seq);
    if (n < 1 || n > MAX_MODELS || PySequence_Fast_GET_SIZE(codes_seq) != n) {
        PyErr_SetString(PyExc_ValueError, "models and codes must have the same length, 1 to 64");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        addresses[i] = (char *)(uintptr_t)PyLong_AsUnsignedLongLong(
            PySequence_Fast_GET_ITEM(addresses_seq, i));
        codes[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(codes_seq, i));
        if (PyErr_Occurred() || !check_code(codes[i])) goto done;
    }
    *count = (int)n;
    ok = 1;
done:
    Py_DECREF(addresses_seq);
    Py_XDECREF(codes_seq);
    return ok;
}

/* The unsigned 64-bit integers of a sequence of count of them. */
static int parse_u64s(PyObject *obj, uint64_t *values, int count, const char *what) {
    PyObject *seq = PySequence_Fast(obj, what);
    if (!seq) return 0;
    int ok = PySequence_Fast_GET_SIZE(seq) == count;
    if (!ok) PyErr_Format(PyExc_ValueError, "%s: expected %d values", what, count);
    for (int i = 0; ok && i < count; i++) {
        values[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        ok = !PyErr_Occurred();
    }
    Py_DECREF(seq);
    return ok;
}

PyDoc_STRVAR(scan_doc,
             "scan(base, base_code, n, models, codes, queries)\n"
             "    -> [(above, inside, floor, ceiling), ...]\n\n"
             "One read of n elements of the base and the models (addresses, dtype codes). Each\n"
             "query (model, lo, hi, top, shift, out, cap) counts the task vector's magnitude bits\n"
             "(model -1: those of SCE's variance over every model, sum_{i<j} (t_i - t_j)^2)\n"
             "u in [hi, top) (above). With shift < 0 it counts u == lo (floor) and u == hi - 1 > lo\n"
             "(ceiling) and collects those between into out (cap + 8 uint64 slots; past cap only\n"
             "counted: inside); else it counts [lo, hi) (inside) in out[(u - lo) >> shift].\n"
             "Queries of one model must be adjacent.");

static PyObject *py_scan(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base;
    int base_code, count;
    Py_ssize_t n;
    PyObject *models_obj, *codes_obj, *queries_obj;
    if (!PyArg_ParseTuple(args, "KinOOO", &base, &base_code, &n, &models_obj, &codes_obj,
                          &queries_obj)) {
        return NULL;
    }
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!check_code(base_code) || !parse_models(models_obj, codes_obj, models, codes, &count)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(queries_obj, "queries must be a sequence");
    if (!seq) return NULL;
    const Py_ssize_t nq = PySequence_Fast_GET_SIZE(seq);
    Query queries[2 * MAX_MODELS];
    PyObject *result = NULL;
    if (nq < 1 || nq > 2 * MAX_MODELS) {
        PyErr_SetString(PyExc_ValueError, "between 1 and 128 queries");
        goto done;
    }
    for (Py_ssize_t q = 0; q < nq; q++) {
        Query *query = &queries[q];
        unsigned long long out;
        int ends;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, q), "iKKKiKnp;a query",
                              &query->model, &query->lo, &query->hi, &query->top, &query->shift,
                              &out, &query->cap, &ends)) {
            goto done;
        }
        const int binned = query->shift >= 0;
        if (query->model < -1 || query->model >= count || query->lo > query->hi ||
            query->hi > query->top ||
            (binned && (query->shift > 63 || query->hi == query->lo ||
                        (query->hi - query->lo - 1) >> query->shift >= BINS))) {
            PyErr_SetString(PyExc_ValueError, "a query out of range");
            goto done;
        }
        query->out = (uint64_t *)(uintptr_t)out;
        query->above = query->inside = query->floor = query->ceiling = 0;
        query->from = query->lo;
        query->width = query->hi - query->lo;
        query->floor_at = query->ceiling_at = TOP; /* no magnitude */
        if (query->shift < 0 && ends) { /* collecting, the ends only counted */
            const int two = query->width >= 2;
            query->floor_at = query->lo;
            query->ceiling_at = two ? query->hi - 1 : TOP;
            query->from = query->lo + 1;
            query->width = two ? query->width - 2 : 0;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    int of_variance = 0;
    for (Py_ssize_t q = 0; q < nq; q++) of_variance |= queries[q].model < 0;
    if (of_variance) {
        scan_variance((const char *)(uintptr_t)base, base_code, n, models, codes, count, queries,
                      (int)nq);
    } else {
        scan_models((const char *)(uintptr_t)base, base_code, n, models, codes, queries, (int)nq);
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(nq);
    for (Py_ssize_t q = 0; result && q < nq; q++) {
        const Query *query = &queries[q];
        PyList_SET_ITEM(result, q, Py_BuildValue("(nnnn)", query->above, query->inside,
                                                 query->floor, query->ceiling));
    }
done:
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(sample_doc,
             "sample(base, base_code, n, models, codes, m, out, of_variance=False)\n\n"
             "out[i * m:(i + 1) * m] = m samples (uint64) of the i-th model's task vector's\n"
             "magnitude bits, in runs of 16 spread over the n elements (n >= m, m a multiple of\n"
             "16); of_variance: one row, SCE's variance's (see scan). Only runs [start, stop) of the\n"
             "m / 16 (all by default) are taken: threads share the work that way.");

static PyObject *py_sample(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, out_addr;
    int base_code, count;
    Py_ssize_t n, m;
    PyObject *models_obj, *codes_obj;
    int of_variance = 0;
    Py_ssize_t start = 0, stop = -1;
    if (!PyArg_ParseTuple(args, "KinOOnK|pnn", &base, &base_code, &n, &models_obj, &codes_obj, &m,
                          &out_addr, &of_variance, &start, &stop)) {
        return NULL;
    }
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!check_code(base_code) || !parse_models(models_obj, codes_obj, models, codes, &count)) {
        return NULL;
    }
    if (m < RUN || m % RUN || n < m) {
        PyErr_SetString(PyExc_ValueError, "sample: n >= m, m a multiple of 16");
        return NULL;
    }
    if (stop < 0) stop = m / RUN;
    if (start < 0 || start > stop || stop > m / RUN) {
        PyErr_SetString(PyExc_ValueError, "sample: runs 0 <= start <= stop <= m / 16");
        return NULL;
    }
    uint64_t *out = (uint64_t *)(uintptr_t)out_addr;
    Py_BEGIN_ALLOW_THREADS
    sample((const char *)(uintptr_t)base, base_code, n, models, codes, count, m, out, of_variance,
           start, stop);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(kth_largest_doc,
             "kth_largest(values, segments, k, lo, hi) -> (value, equal)\n\n"
             "The k-th largest of the uint64 values at address values in the (offset, count)\n"
             "segments (all in [lo, hi)), which are first moved together (the memory is reused),\n"
             "and how many of them equal it.");

static PyObject *py_kth_largest(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long values_addr, lo, hi;
    Py_ssize_t k;
    PyObject *segments_obj;
    if (!PyArg_ParseTuple(args, "KOnKK", &values_addr, &segments_obj, &k, &lo, &hi)) return NULL;
    PyObject *seq = PySequence_Fast(segments_obj, "segments must be a sequence");
    if (!seq) return NULL;
    uint64_t *values = (uint64_t *)(uintptr_t)values_addr;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        Py_ssize_t offset, count;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "nn;a segment", &offset, &count)) {
            Py_DECREF(seq);
            return NULL;
        }
        memmove(values + total, values + offset, count * sizeof *values);
        total += count;
    }
    Py_DECREF(seq);
    if (k < 1 || k > total || lo >= hi) {
        PyErr_Format(PyExc_ValueError, "k = %zd is not between 1 and %zd", k, total);
        return NULL;
    }
    uint64_t result;
    Py_ssize_t equal;
    Py_BEGIN_ALLOW_THREADS
    result = kth_largest(values, total, k, lo, hi, &equal);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(Kn)", (unsigned long long)result, equal);
}

PyDoc_STRVAR(scan_keys_doc,
             "scan_keys(base, base_code, n, models, codes, queries) -> [(above, inside), ...]\n\n"
             "The first pass in float32 keys (float32, bfloat16 and float16 inputs, AVX-512; see the\n"
             "comment above scan_keys): each query (model, lo, hi, out, cap) counts the entries of\n"
             "the model's task vector whose key is at least hi (above) and in [lo, hi) (inside),\n"
             "and collects the first cap of those inside as float32 x at out and b at out + 4 *\n"
             "(cap + 16) bytes (cap + 16 uint64 slots in all). At most two queries a model, those of\n"
             "one model adjacent. None where this build or machine has no such pass.");

static PyObject *py_scan_keys(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base;
    int base_code, count;
    Py_ssize_t n;
    PyObject *models_obj, *codes_obj, *queries_obj;
    if (!PyArg_ParseTuple(args, "KinOOO", &base, &base_code, &n, &models_obj, &codes_obj,
                          &queries_obj)) {
        return NULL;
    }
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!check_code(base_code) || !parse_models(models_obj, codes_obj, models, codes, &count)) {
        return NULL;
    }
#ifndef HAVE_AVX512
    (void)base, (void)n, (void)queries_obj;
    Py_RETURN_NONE;
#else
    if (!have_avx512) Py_RETURN_NONE;
    if (base_code == F64) goto refuse;
    for (int i = 0; i < count; i++) {
        if (codes[i] == F64) goto refuse;
    }
    PyObject *seq = PySequence_Fast(queries_obj, "queries must be a sequence");
    if (!seq) return NULL;
    const Py_ssize_t nq = PySequence_Fast_GET_SIZE(seq);
    KeyQuery queries[2 * MAX_MODELS];
    PyObject *result = NULL;
    if (nq < 1 || nq > 2 * MAX_MODELS) {
        PyErr_SetString(PyExc_ValueError, "between 1 and 128 queries");
        goto done;
    }
    for (Py_ssize_t q = 0; q < nq; q++) {
        KeyQuery *query = &queries[q];
        unsigned long long out;
        unsigned int lo, hi;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, q), "iIIKn;a key query",
                              &query->model, &lo, &hi, &out, &query->cap)) {
            goto done;
        }
        const int grouped = q == 0 || queries[q - 1].model != query->model ||
                            (q < 2 || queries[q - 2].model != query->model);
        if (query->model < 0 || query->model >= count || lo > hi || query->cap < 0 || !grouped ||
            (q > 0 && queries[q - 1].model > query->model)) {
            PyErr_SetString(PyExc_ValueError, "a key query out of range or out of order");
            goto done;
        }
        query->lo = lo;
        query->hi = hi;
        query->xs = (float *)(uintptr_t)out;
        query->bs = query->xs + query->cap + KEY_SLACK;
        query->above = query->inside = 0;
    }
    Py_BEGIN_ALLOW_THREADS
    scan_keys((const char *)(uintptr_t)base, base_code, n, models, codes, queries, (int)nq);
    Py_END_ALLOW_THREADS
    result = PyList_New(nq);
    for (Py_ssize_t q = 0; result && q < nq; q++) {
        PyList_SET_ITEM(result, q, Py_BuildValue("(nn)", queries[q].above, queries[q].inside));
    }
done:
    Py_DECREF(seq);
    return result;
refuse:
    PyErr_SetString(PyExc_ValueError, "scan_keys takes float32, bfloat16 and float16 inputs");
    return NULL;
#endif
}

PyDoc_STRVAR(key_bounds_doc,
             "key_bounds(lo, hi) -> (key_lo, key_hi)\n\n"
             "The key bracket of the entries whose float64 magnitude bits u are in [lo, hi)\n"
             "(lo < hi <= 2**63): K(lo) and K(hi - 1) + 1, K the float32 rounding (see scan_keys).");

static PyObject *py_key_bounds(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long lo, hi;
    if (!PyArg_ParseTuple(args, "KK", &lo, &hi)) return NULL;
    if (lo >= hi || hi > TOP) {
        PyErr_SetString(PyExc_ValueError, "key_bounds needs lo < hi <= 2**63");
        return NULL;
    }
    return Py_BuildValue("(II)", key_of(lo), key_of(hi - 1) + 1);
}

PyDoc_STRVAR(kth_pairs_doc,
             "kth_pairs(address, segments, cap, k, scratch) -> int\n\n"
             "The k-th largest float64 magnitude bits |x - b| of the pairs scan_keys collected:\n"
             "segments (offset, count) in uint64 slots from address, x at the offset and b cap + 16\n"
             "float32 slots after it; scratch: room for as many uint64 as there are pairs.");

/* The pairs' magnitude bits into u (n of them), and their least and most. */
CLONED
static void pair_magnitudes(const float *xs, const float *bs, Py_ssize_t n, uint64_t *u,
                            uint64_t *least, uint64_t *most) {
    uint64_t low = *least, high = *most;
    for (Py_ssize_t j = 0; j < n; j++) {
        const uint64_t v = magnitude((double)xs[j] - (double)bs[j]);
        low = v < low ? v : low;
        high = v > high ? v : high;
        u[j] = v;
    }
    *least = low;
    *most = high;
}

static PyObject *py_kth_pairs(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address, scratch;
    Py_ssize_t cap, k;
    PyObject *segments_obj;
    if (!PyArg_ParseTuple(args, "KOnnK", &address, &segments_obj, &cap, &k, &scratch)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(segments_obj, "segments must be a sequence");
    if (!seq) return NULL;
    const Py_ssize_t parts = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t total = 0;
    /* one segment a thread's range: as many as the machine has threads */
    Py_ssize_t *offsets = PyMem_Malloc(sizeof *offsets * (size_t)(2 * parts + 1));
    if (!offsets) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    Py_ssize_t *counts = offsets + parts;
    int ok = cap >= 0;
    if (!ok) PyErr_SetString(PyExc_ValueError, "kth_pairs: cap must be at least 0");
    for (Py_ssize_t i = 0; ok && i < parts; i++) {
        ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "nn;a segment", &offsets[i],
                              &counts[i]);
        if (ok && (counts[i] < 0 || counts[i] > cap)) {
            PyErr_SetString(PyExc_ValueError, "a segment's count must be between 0 and cap");
            ok = 0;
        }
        if (ok) total += counts[i];
    }
    Py_DECREF(seq);
    if (ok && (k < 1 || k > total)) {
        PyErr_Format(PyExc_ValueError, "k = %zd is not between 1 and %zd", k, total);
        ok = 0;
    }
    if (!ok) {
        PyMem_Free(offsets);
        return NULL;
    }
    uint64_t *u = (uint64_t *)(uintptr_t)scratch;
    uint64_t result;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t w = 0;
    uint64_t least = TOP, most = 0;
    for (Py_ssize_t i = 0; i < parts; i++) {
        const float *xs = (const float *)(uintptr_t)(address + 8 * (uint64_t)offsets[i]);
        pair_magnitudes(xs, xs + cap + KEY_SLACK, counts[i], u + w, &least, &most);
        w += counts[i];
    }
    Py_ssize_t equal;
    result = kth_largest(u, total, k, least, most + 1, &equal);
    Py_END_ALLOW_THREADS
    PyMem_Free(offsets);
    return PyLong_FromUnsignedLongLong(result);
}

PyDoc_STRVAR(kth_many_doc,
             "kth_many(values, n, ks) -> [(value, equal), ...]\n\n"
             "For each k of ks (1 <= k <= n), the k-th largest of the n uint64 values at address\n"
             "values and how many equal it, from one histogram of them all (the values are\n"
             "permuted, not changed): a sample's several order statistics at once.");

CLONED
static void histogram11(const uint64_t *a, Py_ssize_t n, uint64_t lo, int shift, Py_ssize_t *bins) {
    for (Py_ssize_t i = 0; i < n; i++) bins[(a[i] - lo) >> shift]++;
}

CLONED
static void value_range(const uint64_t *a, Py_ssize_t n, uint64_t *least, uint64_t *most) {
    uint64_t low = a[0], high = a[0];
    for (Py_ssize_t i = 1; i < n; i++) {
        low = a[i] < low ? a[i] : low;
        high = a[i] > high ? a[i] : high;
    }
    *least = low;
    *most = high;
}

/* ks[0..count) from a sequence of at most 16 ranks, each in [1, n]; 0 with an exception set. */
static int parse_ranks(PyObject *obj, Py_ssize_t n, Py_ssize_t *ks, Py_ssize_t *count) {
    PyObject *seq = PySequence_Fast(obj, "ks must be a sequence");
    if (!seq) return 0;
    *count = PySequence_Fast_GET_SIZE(seq);
    int ok = *count <= 16;
    if (!ok) PyErr_SetString(PyExc_ValueError, "kth_many: at most 16 ranks");
    for (Py_ssize_t j = 0; ok && j < *count; j++) {
        ks[j] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, j));
        ok = !(ks[j] == -1 && PyErr_Occurred());
        if (ok && (ks[j] < 1 || ks[j] > n)) {
            PyErr_Format(PyExc_ValueError, "k = %zd is not between 1 and %zd", ks[j], n);
            ok = 0;
        }
    }
    Py_DECREF(seq);
    return ok;
}

/* The ks' largest of a[0..n) (a permuted at most) and how many equal each, from one histogram of
 * them all; 0 where memory ran out. No Python calls: runs without the GIL. */
static int kth_many(uint64_t *a, Py_ssize_t n, const Py_ssize_t *ks, Py_ssize_t count,
                    uint64_t *values, Py_ssize_t *equals) {
    if (!count) return 1;
    uint64_t least, most;
    value_range(a, n, &least, &most);
    const uint64_t span = most - least;
    int bits = 0;
    while (bits < 64 && span >> bits) bits++;
    const int shift = bits > 11 ? bits - 11 : 0;
    Py_ssize_t bins[1 << 11] = {0};
    histogram11(a, n, least, shift, bins);
    /* each rank's bin and its rank within it; then the wanted bins' values copied out in one
     * read (a stays whole), each bin's after the one before */
    Py_ssize_t bin_of[16], rank_in[16], start[1 << 11];
    uint16_t slot[1 << 11] = {0}; /* 1 + the wanted bin's place, 0 for the others */
    Py_ssize_t wanted = 0, total = 0;
    for (Py_ssize_t j = 0; j < count; j++) {
        Py_ssize_t bin = (Py_ssize_t)(span >> shift), rank = ks[j];
        while (bins[bin] < rank) rank -= bins[bin--];
        bin_of[j] = bin;
        rank_in[j] = rank;
        if (!slot[bin]) {
            slot[bin] = (uint16_t)++wanted;
            start[bin] = total;
            total += bins[bin];
        }
    }
    uint64_t *chosen = malloc(sizeof *chosen * (size_t)total);
    if (!chosen) return 0;
    Py_ssize_t fill[1 << 11];
    for (Py_ssize_t j = 0; j < count; j++) fill[bin_of[j]] = start[bin_of[j]];
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t bin = (a[i] - least) >> shift;
        if (slot[bin]) chosen[fill[bin]++] = a[i];
    }
    for (Py_ssize_t j = 0; j < count; j++) {
        const Py_ssize_t bin = bin_of[j];
        const uint64_t from = least + ((uint64_t)bin << shift);
        const uint64_t to = shift ? from + (((uint64_t)1 << shift) - 1) : from;
        values[j] = kth_largest(chosen + start[bin], bins[bin], rank_in[j], from,
                                (to < most ? to : most) + 1, &equals[j]);
    }
    free(chosen);
    return 1;
}

static PyObject *order_statistics_list(const uint64_t *values, const Py_ssize_t *equals,
                                       Py_ssize_t count) {
    PyObject *result = PyList_New(count);
    for (Py_ssize_t j = 0; result && j < count; j++) {
        PyList_SET_ITEM(result, j, Py_BuildValue("(Kn)", (unsigned long long)values[j], equals[j]));
    }
    return result;
}

static PyObject *py_kth_many(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    Py_ssize_t n, count, ks[16], equals[16];
    PyObject *ks_obj;
    if (!PyArg_ParseTuple(args, "KnO", &address, &n, &ks_obj)) return NULL;
    if (!parse_ranks(ks_obj, n, ks, &count)) return NULL;
    uint64_t values[16];
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = kth_many((uint64_t *)(uintptr_t)address, n, ks, count, values, equals);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    return order_statistics_list(values, equals, count);
}

PyDoc_STRVAR(small_thresholds_doc,
             "small_thresholds(base, base_code, n, models, codes, ranks, scratch)\n"
             "    -> [[(value, equal), ...], ...]\n\n"
             "A small tensor's thresholds in one call: for each model, its task vector's\n"
             "magnitude bits (as scan's) into scratch (n uint64 slots), then the ranks[i]-th\n"
             "largest of them (kth_many).");

/* Model x's task vector's magnitude bits over the base (as scan_models makes them) into u. */
CLONED
static void task_magnitudes(const char *base, int base_code, const char *x, int code,
                            Py_ssize_t n, uint64_t *u) {
    double bbuf[SCAN_BLOCK], xbuf[SCAN_BLOCK];
    for (Py_ssize_t start = 0; start < n; start += SCAN_BLOCK) {
        const Py_ssize_t m = n - start < SCAN_BLOCK ? n - start : SCAN_BLOCK;
        const double *b = widen(bbuf, base + start * ITEMSIZE[base_code], base_code, m);
        const double *v = widen(xbuf, x + start * ITEMSIZE[code], code, m);
        for (Py_ssize_t k = 0; k < m; k++) u[start + k] = magnitude(v[k] - b[k]);
    }
}

static PyObject *py_small_thresholds(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, scratch;
    int base_code, count;
    Py_ssize_t n;
    PyObject *models_obj, *codes_obj, *ranks_obj;
    if (!PyArg_ParseTuple(args, "KinOOOK", &base, &base_code, &n, &models_obj, &codes_obj,
                          &ranks_obj, &scratch)) {
        return NULL;
    }
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!check_code(base_code) || !parse_models(models_obj, codes_obj, models, codes, &count)) {
        return NULL;
    }
    PyObject *seq = PySequence_Fast(ranks_obj, "ranks must be a sequence");
    if (!seq) return NULL;
    PyObject *result = NULL;
    if (PySequence_Fast_GET_SIZE(seq) != count || n < 1) {
        PyErr_SetString(PyExc_ValueError, "small_thresholds: one list of ranks a model, n >= 1");
        goto done;
    }
    result = PyList_New(count);
    for (int i = 0; result && i < count; i++) {
        Py_ssize_t ks[16], equals[16], many;
        uint64_t values[16];
        int ok = 0;
        if (!parse_ranks(PySequence_Fast_GET_ITEM(seq, i), n, ks, &many)) goto failed;
        Py_BEGIN_ALLOW_THREADS
        uint64_t *u = (uint64_t *)(uintptr_t)scratch;
        if (many) task_magnitudes((const char *)(uintptr_t)base, base_code, models[i], codes[i], n, u);
        ok = kth_many(u, n, ks, many, values, equals);
        Py_END_ALLOW_THREADS
        if (!ok) {
            PyErr_NoMemory();
            goto failed;
        }
        PyObject *found = order_statistics_list(values, equals, many);
        if (!found) goto failed;
        PyList_SET_ITEM(result, i, found);
    }
    goto done;
failed:
    Py_CLEAR(result);
done:
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(merge_doc,
             "merge(out, out_code, base, base_code, n, first, models, codes, weights, sparsify,\n"
             "      lows, highs, keys, density, below, consensus, scale, multiply, divisor)\n\n"
             "n elements of base + scale * combine_i(w_i, sparsify(model_i - base)) into out (see\n"
             "the file's comment); first is the global index of element 0 (DARE's draw).");

static PyObject *py_merge(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, base, first, below;
    int out_code, base_code;
    Py_ssize_t n;
    PyObject *models_obj, *codes_obj, *weights_obj, *lows_obj, *highs_obj, *keys_obj;
    Spec *s = PyMem_Calloc(1, sizeof *s);
    if (!s) return PyErr_NoMemory();
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "KiKinKOOOiOOOdKidpd", &out, &out_code, &base, &base_code, &n,
                          &first, &models_obj, &codes_obj, &weights_obj, &s->sparsify,
                          &lows_obj, &highs_obj, &keys_obj, &s->density, &below, &s->consensus,
                          &s->scale, &s->multiply, &s->divisor)) {
        goto done;
    }
    /* divisor 0: weights as given; a power of two: a product with its exact inverse */
    s->divide = s->divisor == 0 || s->divisor == 1 ? NO_DIVIDE : DIVIDE;
    if (s->divide && fabs(s->divisor) >= 0x1p-1022 && fabs(s->divisor) <= 0x1p1022) {
        int exponent;
        if (fabs(frexp(s->divisor, &exponent)) == 0.5) {
            s->divide = BY_INVERSE;
            s->reciprocal = power_of_two_inverse(s->divisor);
        }
    }
    if (s->divide && s->consensus == SIGN) {
        PyErr_SetString(PyExc_ValueError, "the sign consensus takes no divisor (its weights' ratios)");
        goto done;
    }
    if (s->divide && !isfinite(s->divisor)) {
        PyErr_SetString(PyExc_ValueError, "the divisor must be finite");
        goto done;
    }
    s->below = below;
    s->inverse = 1.0 / s->density;
    /* only divisions matter: the fused loops are compiled for these combinations */
    s->multiply = s->multiply && (s->sparsify == KEEP_DRAWN || s->consensus == SIGN);
    if (s->sparsify < NO_SPARSIFY || s->sparsify > KEEP_DRAWN || s->consensus < NO_CONSENSUS ||
        s->consensus > SIGN) {
        PyErr_SetString(PyExc_ValueError, "unknown sparsification or consensus");
        goto done;
    }
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!check_code(out_code) || !check_code(base_code) ||
        !parse_models(models_obj, codes_obj, models, codes, &s->count) ||
        !parse_u64s(lows_obj, s->lo, s->count, "lows") ||
        !parse_u64s(highs_obj, s->hi, s->count, "highs") ||
        !parse_u64s(keys_obj, s->keys, s->count, "keys")) {
        goto done;
    }
    PyObject *weights = PySequence_Fast(weights_obj, "weights must be a sequence");
    if (!weights) goto done;
    if (PySequence_Fast_GET_SIZE(weights) != s->count) {
        PyErr_SetString(PyExc_ValueError, "one weight per model");
    }
    for (int i = 0; !PyErr_Occurred() && i < s->count; i++) {
        s->weights[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, i));
    }
    Py_DECREF(weights);
    if (PyErr_Occurred()) goto done;
    s->unit = s->consensus == SIGN && s->scale == 1.0;
    for (int i = 0; i < s->count; i++) s->unit &= s->weights[i] == 1.0;
    double (*buffers)[BLOCK] = PyMem_RawMalloc(2 * s->count * sizeof *buffers);
    if (!buffers) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    merge((char *)(uintptr_t)out, out_code, (const char *)(uintptr_t)base, base_code, n, first,
          models, codes, s, buffers);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buffers);
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(s);
    return result;
}

/* Parse the element-wise settings shared by elementwise() and square_sums(); models and codes
 * filled in, s->count set. */
static int parse_elementwise(Elementwise *s, PyObject *models_obj, PyObject *codes_obj,
                             PyObject *weights_obj, char **models, int *codes) {
    if (!parse_models(models_obj, codes_obj, models, codes, &s->count)) return 0;
    PyObject *weights = PySequence_Fast(weights_obj, "weights must be a sequence");
    if (!weights) return 0;
    if (PySequence_Fast_GET_SIZE(weights) != s->count) {
        PyErr_SetString(PyExc_ValueError, "one weight per model");
    }
    for (int i = 0; !PyErr_Occurred() && i < s->count; i++) {
        s->weights[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(weights, i));
    }
    Py_DECREF(weights);
    if (PyErr_Occurred()) return 0;
    if (s->kind < MAGMAX || s->kind > BASE || (s->kind == NEARSWAP && s->count != 1)) {
        PyErr_SetString(PyExc_ValueError, "unknown element-wise method, or nearswap of many");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(elementwise_doc,
             "elementwise(kind, out, out_code, base, base_code, n, models, codes, weights, scale,\n"
             "            mask_lambda, t, votes, select, threshold)\n\n"
             "n elements of MagMax (kind 0), TALL-mask consensus (1), NearSwap (2), SCE (3) or the\n"
             "base itself (4)\n"
             "into out (see the comment above elementwise()); weights are consensus' merge\n"
             "weights or SCE's coefficients; SCE keeps the entries whose variance's magnitude bits\n"
             "are at least threshold when select is true.");

static PyObject *py_elementwise(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, base, threshold;
    int out_code, base_code;
    Py_ssize_t n;
    PyObject *models_obj, *codes_obj, *weights_obj;
    Elementwise *s = PyMem_Calloc(1, sizeof *s);
    if (!s) return PyErr_NoMemory();
    PyObject *result = NULL;
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!PyArg_ParseTuple(args, "iKiKinOOOdddnpK", &s->kind, &out, &out_code, &base, &base_code,
                          &n, &models_obj, &codes_obj, &weights_obj, &s->scale, &s->lambda,
                          &s->t, &s->votes, &s->select, &threshold) ||
        !check_code(out_code) || !check_code(base_code) ||
        !parse_elementwise(s, models_obj, codes_obj, weights_obj, models, codes)) {
        goto done;
    }
    s->threshold = threshold;
    double *buffers = PyMem_RawMalloc(2 * (size_t)s->count * BLOCK * sizeof(double));
    if (!buffers) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    elementwise((char *)(uintptr_t)out, out_code, (const char *)(uintptr_t)base, base_code, n,
                models, codes, s, buffers, (double (*)[BLOCK])(buffers + s->count * BLOCK));
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buffers);
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(s);
    return result;
}

PyDoc_STRVAR(square_sums_doc,
             "square_sums(base, base_code, n, models, codes, select, threshold, out)\n\n"
             "Add SCE's kept task vector entries' squares into out (int64, models x 2048 x 2):\n"
             "per biased exponent, the high and low 26 bits of the significands; in row 2047 the\n"
             "NaNs (slot 0) and infinities (slot 1) counted. Returns the least and greatest\n"
             "row written below 2047 (least > greatest: none).");

static PyObject *py_square_sums(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, threshold, out;
    int base_code;
    Py_ssize_t n;
    PyObject *models_obj, *codes_obj;
    Elementwise *s = PyMem_Calloc(1, sizeof *s);
    if (!s) return PyErr_NoMemory();
    PyObject *result = NULL;
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    s->kind = SCE;
    if (!PyArg_ParseTuple(args, "KinOOpKK", &base, &base_code, &n, &models_obj, &codes_obj,
                          &s->select, &threshold, &out) ||
        !check_code(base_code) || !parse_models(models_obj, codes_obj, models, codes, &s->count)) {
        goto done;
    }
    s->threshold = threshold;
    double *buffers = PyMem_RawMalloc((size_t)s->count * BLOCK * sizeof(double));
    if (!buffers) {
        PyErr_NoMemory();
        goto done;
    }
    Used used = {EXPONENTS - 1, -1};
    Py_BEGIN_ALLOW_THREADS
    square_sums((const char *)(uintptr_t)base, base_code, n, models, codes, s,
                (int64_t (*)[EXPONENTS][2])(uintptr_t)out, buffers, &used);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buffers);
    result = Py_BuildValue("ii", used.least, used.most);
done:
    PyMem_Free(s);
    return result;
}

PyDoc_STRVAR(order_statistic_doc,
             "order_statistic(values, n, index) -> float | None\n\n"
             "The index-th smallest (0-based) of the n float64 at address values, +0.0 for a\n"
             "zero of either sign; None where they hold a NaN.");

static PyObject *py_order_statistic(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long values_addr;
    Py_ssize_t n, index;
    if (!PyArg_ParseTuple(args, "Knn", &values_addr, &n, &index)) return NULL;
    if (n < 1 || index < 0 || index >= n) {
        PyErr_Format(PyExc_ValueError, "order_statistic: index %zd is not in [0, %zd)", index, n);
        return NULL;
    }
    double value = 0.0;
    int found;
    Py_BEGIN_ALLOW_THREADS
    found = order_statistic((const double *)(uintptr_t)values_addr, n, index, &value);
    Py_END_ALLOW_THREADS
    if (found < 0) return PyErr_NoMemory();
    if (!found) Py_RETURN_NONE;
    return PyFloat_FromDouble(value);
}

PyDoc_STRVAR(round_sums_doc,
             "round_sums(tables, parts, models, least, most)\n\n"
             "Each model's exact total of parts tables of square_sums (int64, parts x models x\n"
             "2048 x 2; rows least..most, the others 0), correctly rounded to float64: NaN where\n"
             "a square was NaN, else infinity where one was infinite or the total overflows.\n"
             "None where a total is negative (not a sum of squares).");

static PyObject *py_round_sums(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    Py_ssize_t parts, models;
    int least, most;
    if (!PyArg_ParseTuple(args, "Knnii", &address, &parts, &models, &least, &most)) return NULL;
    if (parts < 1 || models < 1 || least < 0 || most > EXPONENTS - 2) {
        PyErr_Format(PyExc_ValueError,
                     "round_sums: %zd parts of %zd models, rows %d..%d: expected at least one "
                     "of each, rows within 0..%d",
                     parts, models, least, most, EXPONENTS - 2);
        return NULL;
    }
    const int64_t *tables = (const int64_t *)(uintptr_t)address;
    const Py_ssize_t stride = models * EXPONENTS * 2; /* one part's tables */
    PyObject *totals = PyList_New(models);
    if (!totals) return NULL;
    for (Py_ssize_t i = 0; i < models; i++) {
        const int64_t *own = tables + i * EXPONENTS * 2;
        int64_t nans = 0, infinities = 0;
        for (Py_ssize_t p = 0; p < parts; p++) {
            nans += own[p * stride + 2 * (EXPONENTS - 1)];
            infinities += own[p * stride + 2 * (EXPONENTS - 1) + 1];
        }
        double total = NAN;
        if (!nans) {
            total = INFINITY;
            if (!infinities && round_total(own, parts, stride, least, most, &total) < 0) {
                Py_DECREF(totals);
                Py_RETURN_NONE;
            }
        }
        PyObject *value = PyFloat_FromDouble(total);
        if (!value) {
            Py_DECREF(totals);
            return NULL;
        }
        PyList_SET_ITEM(totals, i, value);
    }
    return totals;
}

static PyMethodDef methods[] = {
    {"round_sums", py_round_sums, METH_VARARGS, round_sums_doc},
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"sample", py_sample, METH_VARARGS, sample_doc},
    {"kth_largest", py_kth_largest, METH_VARARGS, kth_largest_doc},
    {"kth_many", py_kth_many, METH_VARARGS, kth_many_doc},
    {"small_thresholds", py_small_thresholds, METH_VARARGS, small_thresholds_doc},
    {"scan_keys", py_scan_keys, METH_VARARGS, scan_keys_doc},
    {"key_bounds", py_key_bounds, METH_VARARGS, key_bounds_doc},
    {"kth_pairs", py_kth_pairs, METH_VARARGS, kth_pairs_doc},
    {"order_statistic", py_order_statistic, METH_VARARGS, order_statistic_doc},
    {"merge", py_merge, METH_VARARGS, merge_doc},
    {"elementwise", py_elementwise, METH_VARARGS, elementwise_doc},
    {"square_sums", py_square_sums, METH_VARARGS, square_sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastmethods",
    "terge's CPU loops for the task-vector and element-wise methods (see methods.py and\n"
    "families/elementwise.py for the reference paths).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastmethods(void) {
#ifdef HAVE_AVX512
    detect_avx512();
#endif
    return PyModule_Create(&module);
}
