/* terge._fastrank: DELLA and DELLA-linear on the CPU, row by row, straight from the inputs as
 * stored (no float64 copies of whole tensors).
 *
 * The reference is families.elementwise.della_merge (plain torch on float64 copies). For each
 * row of `width` entries (a 2-D or larger tensor's shape[0] rows, flattened; a 0-D or 1-D tensor
 * as one row) and each model i these loops do its float64 operations in its order, so the
 * results are equal bit for bit (tests/test_fast_della.py):
 *
 *     t_j = x_j - b_j                       (both widened to float64, exactly; one rounding)
 *     r_j = the rank of t_j's magnitude bits (primitives.magnitude_bits: the sign cleared, every
 *           NaN as inf + 1) in the row, ascending, equal magnitudes by position (a stable sort)
 *     p_j = ((double)r_j / (width - 1)) * two_eps + low    (density when width is 1)
 *     d_j = u_j < p_j ? t_j / p_j : +0      u_j = (mix64(key_i + (J + 1) GOLDEN) >> 11) 2**-53,
 *                                           J the entry's row-major index in the whole tensor
 *     e   = ((0 + d_0 w_0) + d_1 w_1) + ...        (each product rounded: never an FMA)
 *     della:  a_i = e >= 0 ? d_i > 0 : d_i < 0,  p = (0 + (a_i ? d_i : 0) w_i) + ...,
 *             q = (0 + (a_i ? 1 : 0) w_i) + ...,  m = q != 0 ? p / q : p   (TIES' consensus)
 *     della_linear:  m = e
 *     out = b + m * scale, rounded once into out's dtype (as kernels.store_whole does)
 *
 * `low` (density - epsilon) and `two_eps` (2 * epsilon) are computed by Python, as the reference
 * computes them.
 *
 * The ranking: each row's (magnitude - the row's least) is packed with the entry's position in
 * the low bits (the magnitude's lowest bits dropped when both do not fit in 64) and the packed
 * values, all distinct, are sorted by an MSD radix sort (insertion sort for small buckets): the
 * position decides between equal magnitudes, as a stable sort does. Where bits were dropped,
 * each run of equal packed magnitudes is packed again with the dropped bits and sorted: exact.
 * Extra memory: one row of each model and the keep probabilities by rank (float64), and three
 * rows of uint64, per call, i.e. per thread.
 *
 * Compile with -ffp-contract=off: a fused multiply-add rounds once where the reference rounds
 * twice.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_convert.h"
#include "_loops.h"

#define MAX_MODELS 64
#include "_args.h"
#ifndef RADIX
#define RADIX 13 /* most bits per radix level: 8192 buckets */
#endif
#define ENDS (12 << RADIX) /* bucket slots for every level of a sort: at most 11 levels deep */
#ifndef SMALL
#define SMALL 24 /* buckets this small are insertion sorted */
#endif
#ifndef EXTRA
#define EXTRA 1 /* 2**EXTRA buckets per value (or so) */
#endif
#define MAX_WIDTH (INT64_C(1) << 31)

static inline int bit_length(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

/* --- the ranking --------------------------------------------------------------------------------- */

/* counts[0..buckets) (buckets a power of two) turned into their exclusive prefix sums: each
 * bucket's start. Returns the largest count but the first's. */
static uint32_t bucket_starts_plain(uint32_t *counts, Py_ssize_t buckets) {
    uint32_t largest = 0, total = counts[0];
    counts[0] = 0;
    for (Py_ssize_t b = 1; b < buckets; b++) {
        const uint32_t size = counts[b];
        largest = size > largest ? size : largest;
        counts[b] = total;
        total += size;
    }
    return largest;
}

#ifdef HAVE_AVX512

/* bucket_starts_plain() 16 buckets at a time: each vector's sums by four shifted additions,
 * plus the total so far (a row's 2,048 buckets were a chain of 2,048 dependent additions). */
__attribute__((target("avx512f"))) static uint32_t bucket_starts_avx512(uint32_t *counts,
                                                                         Py_ssize_t buckets) {
    const __m512i zero = _mm512_setzero_si512(), top = _mm512_set1_epi32(15);
    __m512i carry = zero, largest = zero;
    for (Py_ssize_t b = 0; b < buckets; b += 16) {
        const __m512i v = _mm512_loadu_si512(counts + b);
        largest = _mm512_max_epu32(largest, b ? v : _mm512_mask_mov_epi32(v, 1, zero));
        __m512i x = _mm512_add_epi32(v, _mm512_alignr_epi32(v, zero, 15));
        x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 14));
        x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 12));
        x = _mm512_add_epi32(x, _mm512_alignr_epi32(x, zero, 8)); /* inclusive sums */
        _mm512_storeu_si512(counts + b, _mm512_add_epi32(carry, _mm512_sub_epi32(x, v)));
        carry = _mm512_add_epi32(carry, _mm512_permutexvar_epi32(top, x));
    }
    return _mm512_reduce_max_epu32(largest);
}
#endif

static inline uint32_t bucket_starts(uint32_t *counts, Py_ssize_t buckets) {
#ifdef HAVE_AVX512
    if (have_avx512 && buckets >= 16) return bucket_starts_avx512(counts, buckets);
#endif
    return bucket_starts_plain(counts, buckets);
}

static void insertion_sort(uint64_t *a, Py_ssize_t n) {
    for (Py_ssize_t i = 1; i < n; i++) {
        const uint64_t v = a[i];
        Py_ssize_t j = i;
        while (j > 0 && a[j - 1] > v) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = v;
    }
}

/* a[0..n) sorted ascending, the values distinct: MSD radix, each level on the top bits of the
 * bucket's own span (about 2 to 4 buckets per value, at most 2**RADIX). Values at or below `floor` (a
 * hint: 0 for none) share the first bucket, so that the others spread the bulk of the values
 * rather than a sparse tail. The first bucket and any other larger than SMALL are sorted again;
 * the rest of the array, each value already in its bucket and the buckets small, is finished
 * by one insertion sort (its cost the moves within the buckets). tmp has n slots; ends has
 * room for the levels' buckets (ENDS slots: a level's values span 7 bits fewer than its parent's). */
CLONED
static void radix_sort(uint64_t *a, uint64_t *tmp, Py_ssize_t n, uint64_t floor, uint32_t *ends) {
    if (n <= SMALL) {
        insertion_sort(a, n);
        return;
    }
    uint64_t lo = a[0], hi = a[0];
    for (Py_ssize_t k = 1; k < n; k++) {
        lo = a[k] < lo ? a[k] : lo;
        hi = a[k] > hi ? a[k] : hi;
    }
    lo = floor > lo && floor < hi ? floor : lo;
    const int span = bit_length(hi - lo);
    if (span == 0) return; /* one value */
    int digits = bit_length((uint64_t)n) + EXTRA;
    digits = digits > RADIX ? RADIX : digits;
    digits = digits > span ? span : digits;
    const int shift = span - digits;
    const Py_ssize_t buckets = (Py_ssize_t)1 << digits;
    /* ends[b]: first the start of bucket b, then (after the scatter) its end */
    memset(ends, 0, buckets * sizeof ends[0]);
    for (Py_ssize_t k = 0; k < n; k++) ends[a[k] > lo ? (a[k] - lo) >> shift : 0]++;
    const uint32_t largest = bucket_starts(ends, buckets);
    for (Py_ssize_t k = 0; k < n; k++) tmp[ends[a[k] > lo ? (a[k] - lo) >> shift : 0]++] = a[k];
    memcpy(a, tmp, n * sizeof *a);
    /* the first bucket: everything at or below lo (one value unless clamped) */
    if (ends[0] > 1) radix_sort(a, tmp, ends[0], 0, ends + buckets);
    if (largest <= SMALL) {
        insertion_sort(a + ends[0], n - ends[0]);
        return;
    }
    for (Py_ssize_t b = 1; b < buckets; b++) {
        const Py_ssize_t start = ends[b - 1], size = ends[b] - start;
        if (size > SMALL) {
            radix_sort(a + start, tmp + start, size, 0, ends + buckets);
        } else if (size > 1) {
            insertion_sort(a + start, size);
        }
    }
}

CLONED
static void pack(uint64_t *order, const uint64_t *keys, Py_ssize_t n, uint64_t lo, int dropped,
                 int bits) {
    for (Py_ssize_t k = 0; k < n; k++) order[k] = ((keys[k] - lo) >> dropped) << bits | (uint64_t)k;
}

/* order[0..n) = the positions 0..n-1 sorted by (keys[j], j): a stable sort of keys, n >= 2 and
 * below MAX_WIDTH. tmp: n slots. The positions come back in order's low `bits` bits. */
CLONED
static int rank_order(const uint64_t *keys, uint64_t *order, uint64_t *tmp, uint32_t *ends,
                      Py_ssize_t n) {
    const int bits = bit_length((uint64_t)(n - 1));
    uint64_t lo = keys[0], hi = keys[0];
    for (Py_ssize_t k = 1; k < n; k++) {
        lo = keys[k] < lo ? keys[k] : lo;
        hi = keys[k] > hi ? keys[k] : hi;
    }
    const int room = 64 - bits, span = bit_length(hi - lo);
    const int dropped = span > room ? span - room : 0; /* at most bits - 1 (span <= 63) */
    pack(order, keys, n, lo, dropped, bits);
    /* the hint: magnitudes below the largest's / 64 (its exponent less 6) share a bucket */
    const uint64_t below = hi > lo + (UINT64_C(6) << 52) ? hi - (UINT64_C(6) << 52) : lo;
    radix_sort(order, tmp, n, ((below - lo) >> dropped) << bits, ends);
    if (!dropped) return bits;
    /* runs of equal truncated magnitudes: sorted again on the dropped bits, then position */
    const uint64_t mask = ((uint64_t)1 << bits) - 1, low_bits = ((uint64_t)1 << dropped) - 1;
    Py_ssize_t first = 0;
    for (Py_ssize_t k = 1; k <= n; k++) {
        if (k < n && order[k] >> bits == order[first] >> bits) continue;
        if (k - first > 1) {
            for (Py_ssize_t q = first; q < k; q++) {
                const uint64_t j = order[q] & mask;
                order[q] = ((keys[j] - lo) & low_bits) << bits | j;
            }
            radix_sort(order + first, tmp + first, k - first, 0, ends);
        }
        first = k;
    }
    return bits;
}

/* --- the merge ------------------------------------------------------------------------------------ */

typedef struct {
    int count, consensus;
    double density, low, two_eps, scale;
    double weights[MAX_MODELS];
    uint64_t keys[MAX_MODELS];
} Spec;

/* t[k] = u_k < p[k] ? t[k] / p[k] : +0, u_k the draw of global index at + k. */
CLONED
static void keep_drawn(double *RESTRICT t, const double *RESTRICT p, Py_ssize_t m, uint64_t at,
                       uint64_t key) {
    for (Py_ssize_t k = 0; k < m; k++) {
        const int64_t z = (int64_t)(mix64(key + (at + (uint64_t)k + 1) * GOLDEN) >> 11);
        const double u = (double)z * 0x1p-53;
        t[k] = masked(t[k] / p[k], u < p[k]);
    }
}

/* t[k] = u_k < p[k] ? t[k] : +0 (kept as it is: mergekit's pruning, rescaled afterwards). */
CLONED
static void keep_drawn_plain(double *RESTRICT t, const double *RESTRICT p, Py_ssize_t m,
                             uint64_t at, uint64_t key) {
    for (Py_ssize_t k = 0; k < m; k++) {
        const int64_t z = (int64_t)(mix64(key + (at + (uint64_t)k + 1) * GOLDEN) >> 11);
        const double u = (double)z * 0x1p-53;
        t[k] = masked(t[k], u < p[k]);
    }
}

/* t = x - b and keys = the magnitude bits of t. */
CLONED
static void subtract(double *RESTRICT t, uint64_t *RESTRICT keys, const double *x, const double *b,
                     Py_ssize_t m) {
    for (Py_ssize_t k = 0; k < m; k++) {
        t[k] = x[k] - b[k];
        keys[k] = magnitude(t[k]);
    }
}

/* Model i's row (t in place, from row global index `at`) sparsified: d_j as in the comment up
 * top (divide), or u_j < p_j ? t_j : +0 (not divide). keys (magnitude bits of t), order and
 * tmp: width slots each. */
static void sparsify_row(double *t, Py_ssize_t width, uint64_t at, uint64_t key, const Spec *s,
                         const double *levels, const uint64_t *keys, uint64_t *order,
                         uint64_t *tmp, uint32_t *ends, int divide) {
    double *p = (double *)tmp; /* the keep probabilities by position, once tmp is free */
    if (width == 1) {
        p[0] = s->density;
    } else {
        const int bits = rank_order(keys, order, tmp, ends, width);
        const uint64_t mask = ((uint64_t)1 << bits) - 1;
        for (Py_ssize_t r = 0; r < width; r++) p[order[r] & mask] = levels[r];
    }
    if (divide) {
        keep_drawn(t, p, width, at, key);
    } else {
        keep_drawn_plain(t, p, width, at, key);
    }
}

/* levels[r] = the keep probability of rank r in a row of width entries (width >= 2): the same
 * for every row, so each row's scatter reads it rather than dividing again. */
static void probability_levels(double *levels, Py_ssize_t width, const Spec *s) {
    const double last = (double)(width - 1);
    for (Py_ssize_t r = 0; r < width; r++) levels[r] = ((double)r / last) * s->two_eps + s->low;
}

/* The merge of a row, element by element in registers; count known when compiled (1 to 4)
 * or not (0: any). */
static ALWAYS_INLINE void combine_n(double *RESTRICT result, const double *RESTRICT b,
                                    double *const *d, Py_ssize_t m, const Spec *s, const int fixed,
                                    const int consensus) {
    const int count = fixed ? fixed : s->count;
    const double scale = s->scale;
    for (Py_ssize_t k = 0; k < m; k++) {
        double e = 0.0;
        for (int i = 0; i < count; i++) e = e + d[i][k] * s->weights[i];
        if (consensus) {
            double num = 0.0, den = 0.0;
            for (int i = 0; i < count; i++) {
                const uint64_t a = agrees(e, d[i][k]);
                num = num + masked(d[i][k] * s->weights[i], a);
                den = den + masked(s->weights[i], a);
            }
            e = den != 0 ? num / den : num;
        }
        result[k] = b[k] + e * scale;
    }
}

#define COMBINE(N)                                                                                 \
    CLONED static void combine_##N(double *result, const double *b, double *const *d,             \
                                   Py_ssize_t m, const Spec *s) {                                  \
        if (s->consensus) {                                                                        \
            combine_n(result, b, d, m, s, N, 1);                                                   \
        } else {                                                                                   \
            combine_n(result, b, d, m, s, N, 0);                                                   \
        }                                                                                          \
    }
COMBINE(0)
COMBINE(1)
COMBINE(2)
COMBINE(3)
COMBINE(4)

typedef void (*combine_fn)(double *, const double *, double *const *, Py_ssize_t, const Spec *);
static const combine_fn COMBINE_FNS[] = {combine_0, combine_1, combine_2, combine_3, combine_4};

/* rows rows of width entries; first: the global index of the first entry. buffers: see
 * py_della. */
CLONED
static void della(char *out, int out_code, const char *base, int base_code, Py_ssize_t rows,
                  Py_ssize_t width, uint64_t first, char *const *models, const int *codes,
                  const Spec *s, double *buffers) {
    double *bbuf = buffers, *xbuf = bbuf + width, *result = xbuf + width;
    double *d[MAX_MODELS];
    for (int i = 0; i < s->count; i++) d[i] = result + (i + 1) * width;
    double *levels = d[s->count - 1] + width;
    uint64_t *keys = (uint64_t *)(levels + width), *order = keys + width, *tmp = order + width;
    uint32_t *ends = (uint32_t *)(tmp + width);
    if (width > 1) probability_levels(levels, width, s);
    for (Py_ssize_t row = 0; row < rows; row++) {
        const Py_ssize_t offset = row * width;
        const uint64_t at = first + (uint64_t)offset;
        const double *b = widen(bbuf, base + offset * ITEMSIZE[base_code], base_code, width);
        for (int i = 0; i < s->count; i++) {
            const double *x =
                widen(xbuf, models[i] + offset * ITEMSIZE[codes[i]], codes[i], width);
            subtract(d[i], keys, x, b, width);
            sparsify_row(d[i], width, at, s->keys[i], s, levels, keys, order, tmp, ends, 1);
        }
        COMBINE_FNS[s->count <= 4 ? s->count : 0](result, b, d, width, s);
        narrow(out + offset * ITEMSIZE[out_code], out_code, result, width);
    }
}

/* One model's task vector pruned by MagPrune, row by row, into out (float64): d_j as in the
 * comment up top (divide), or u_j < p_j ? t_j : +0 (not divide). buffers: see py_prune. */
static void prune(double *out, const char *base, int base_code, const char *model, int model_code,
                  Py_ssize_t rows, Py_ssize_t width, uint64_t first, uint64_t key,
                  const Spec *s, int divide, double *buffers) {
    double *bbuf = buffers, *xbuf = bbuf + width, *levels = xbuf + width;
    uint64_t *keys = (uint64_t *)(levels + width), *order = keys + width, *tmp = order + width;
    uint32_t *ends = (uint32_t *)(tmp + width);
    if (width > 1) probability_levels(levels, width, s);
    for (Py_ssize_t row = 0; row < rows; row++) {
        const Py_ssize_t offset = row * width;
        const double *b = widen(bbuf, base + offset * ITEMSIZE[base_code], base_code, width);
        const double *x = widen(xbuf, model + offset * ITEMSIZE[model_code], model_code, width);
        subtract(out + offset, keys, x, b, width);
        sparsify_row(out + offset, width, first + (uint64_t)offset, key, s, levels, keys, order,
                     tmp, ends, divide);
    }
}

/* --- Python bindings ----------------------------------------------------------------------------- */


PyDoc_STRVAR(della_doc,
             "della(out, out_code, base, base_code, rows, width, first, models, codes, weights,\n"
             "      keys, density, low, two_eps, scale, consensus)\n\n"
             "rows rows of width entries of DELLA (consensus) or DELLA-linear into out (see the\n"
             "file's comment): models' task vectors over base ranked row by row, drawn with\n"
             "keys (one per model) at global indices from first, combined with weights.");

static PyObject *py_della(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, base, first;
    int out_code, base_code;
    Py_ssize_t rows, width;
    PyObject *models_obj, *codes_obj, *weights_obj, *keys_obj;
    Spec *s = PyMem_Calloc(1, sizeof *s);
    if (!s) return PyErr_NoMemory();
    PyObject *result = NULL;
    char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    if (!PyArg_ParseTuple(args, "KiKinnKOOOOddddp", &out, &out_code, &base, &base_code, &rows,
                          &width, &first, &models_obj, &codes_obj, &weights_obj, &keys_obj,
                          &s->density, &s->low, &s->two_eps, &s->scale, &s->consensus)) {
        goto done;
    }
    s->count = -1;
    if (!check_code(out_code) || !check_code(base_code) ||
        !parse_sequence(models_obj, &s->count, "models", read_address, models) ||
        !parse_sequence(codes_obj, &s->count, "codes", read_code, codes) ||
        !parse_sequence(weights_obj, &s->count, "weights", read_double, s->weights) ||
        !parse_sequence(keys_obj, &s->count, "keys", read_u64, s->keys)) {
        goto done;
    }
    if (rows < 0 || width < 1 || width >= MAX_WIDTH) {
        PyErr_SetString(PyExc_ValueError, "della: rows >= 0 and 1 <= width < 2**31");
        goto done;
    }
    /* base, x, result, one row per model and the levels (float64); keys, order, tmp (uint64) */
    double *buffers = PyMem_RawMalloc((size_t)(s->count + 7) * (size_t)width * sizeof(double) +
                                      ENDS * sizeof(uint32_t));
    if (!buffers) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    della((char *)(uintptr_t)out, out_code, (const char *)(uintptr_t)base, base_code, rows, width,
          first, models, codes, s, buffers);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buffers);
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(s);
    return result;
}

PyDoc_STRVAR(prune_doc,
             "prune(out, base, base_code, model, model_code, rows, width, first, key, density,\n"
             "      low, two_eps, divide)\n\n"
             "rows rows of width entries of one model's task vector over base, pruned by DELLA's\n"
             "MagPrune (drawn with key at global indices from first), into out (float64): each\n"
             "kept entry divided by its keep probability (divide) or kept as it is.");

static PyObject *py_prune(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, base, model, first, key;
    int base_code, model_code, divide;
    Py_ssize_t rows, width;
    Spec s;
    memset(&s, 0, sizeof s);
    if (!PyArg_ParseTuple(args, "KKiKinnKKdddp", &out, &base, &base_code, &model, &model_code,
                          &rows, &width, &first, &key, &s.density, &s.low, &s.two_eps,
                          &divide)) {
        return NULL;
    }
    if (!check_code(base_code) || !check_code(model_code)) return NULL;
    if (rows < 0 || width < 1 || width >= MAX_WIDTH) {
        PyErr_SetString(PyExc_ValueError, "prune: rows >= 0 and 1 <= width < 2**31");
        return NULL;
    }
    /* base, x, levels (float64); keys, order, tmp (uint64); the buckets' ends */
    double *buffers =
        PyMem_RawMalloc((size_t)6 * (size_t)width * sizeof(double) + ENDS * sizeof(uint32_t));
    if (!buffers) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    prune((double *)(uintptr_t)out, (const char *)(uintptr_t)base, base_code,
          (const char *)(uintptr_t)model, model_code, rows, width, first, key, &s, divide,
          buffers);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buffers);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rank_doc,
             "rank(keys, n, ranks)\n\n"
             "ranks[j] = the rank (0-based) of keys[j] among the n uint64 at address keys,\n"
             "ascending, equal keys by position (a stable sort's order); ranks: n int64 slots.");

static PyObject *py_rank(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long keys_addr, ranks_addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KnK", &keys_addr, &n, &ranks_addr)) return NULL;
    if (n < 1 || n >= MAX_WIDTH) {
        PyErr_SetString(PyExc_ValueError, "rank: 1 <= n < 2**31");
        return NULL;
    }
    const uint64_t *keys = (const uint64_t *)(uintptr_t)keys_addr;
    int64_t *ranks = (int64_t *)(uintptr_t)ranks_addr;
    uint64_t *order = PyMem_RawMalloc(2 * (size_t)n * sizeof *order + ENDS * sizeof(uint32_t));
    if (!order) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (n == 1) {
        ranks[0] = 0;
    } else {
        const int bits = rank_order(keys, order, order + n, (uint32_t *)(order + 2 * n), n);
        const uint64_t mask = ((uint64_t)1 << bits) - 1;
        for (Py_ssize_t r = 0; r < n; r++) ranks[order[r] & mask] = r;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(order);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"della", py_della, METH_VARARGS, della_doc},
    {"prune", py_prune, METH_VARARGS, prune_doc},
    {"rank", py_rank, METH_VARARGS, rank_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastrank",
    "terge's CPU loops for DELLA (see families/elementwise.py for the reference path).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastrank(void) {
#ifdef HAVE_AVX512
    detect_avx512();
#endif
    return PyModule_Create(&module);
}
