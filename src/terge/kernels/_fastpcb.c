/* terge._fastpcb: PCB's balance scores and merge on the CPU, straight from the inputs as stored
 * (no n x d float64 buffers).
 *
 * The reference is families.elementwise.pcb_merge (plain torch on float64 copies). For each entry
 * j and model i these loops do its float64 operations in its order, so the results are equal
 * bit for bit (tests/kernels/test_fastpcb.py):
 *
 *     t_i = x_i - b                   (both widened to float64, exactly; one rounding)
 *     S   = ((0 + t_0) + t_1) + ...
 *     c_i = max(min(|t_i|, high_i), low_i)          (low_i, high_i: Python's order statistics)
 *     z_i = (r * r) * n,  r = span_i > 0 ? (c_i - low_i) / span_i : 0,  span_i = high_i - low_i
 *     bal_i = exp(z_i) * tanh(t_i * S)
 *     s_i = (bal_i > f_i ? bal_i - f_i : 0);  s_i = g_i > 0 ? s_i / g_i : 0
 *           (f_i: the floor Python selects from scan()'s counts, g_i = max bal_i - f_i)
 *     p = (0 + (sign(t_i) * c_i) * s_i) + ...,  q = (0 + s_0) + s_1 + ...
 *     out = b + (q != 0 ? p / q : 0) * scale, rounded once into out's dtype
 *
 * exp and tanh are the functions torch's own float64 exp and tanh call on this build (MKL's
 * vmdExp and vmdTanh, high accuracy: kernels/fastpcb.py finds them in libtorch_cpu and checks
 * them against torch before any use), given as addresses to configure(). Work goes a block of
 * BLOCK entries at a time, all models' task vectors of the block kept in cache.
 *
 * Three passes, each over any range of entries (Python splits a tensor between threads):
 *     sample(): the balances of runs of RUN entries spread over the tensor, as order keys;
 *     scan():   per model, how many balances fall below, at, inside and at the top of a key
 *               bracket, the inside ones collected, and the greatest; or a non-finite t_i;
 *     merge():  the scores and the result, written into out.
 *
 * Compile with -ffp-contract=off: a fused multiply-add rounds once where the reference rounds
 * twice.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_convert.h"
#include "_loops.h"

#define MAX_MODELS 64
#include "_args.h"
#define BLOCK 1024
#define RUN 16

/* MKL VML's signature: void vmdExp(MKL_INT n, const double *a, double *r, MKL_INT64 mode). */
typedef void (*vector_fn)(int n, const double *a, double *r, long long mode);
static vector_fn vector_exp, vector_tanh;
static long long vector_mode;
/* MKL's MKL_SET_NUM_THREADS_LOCAL (the number by address): VML threads a call made outside an
 * OpenMP region, and two such threads calling it at once ran four times slower each. */
typedef int (*threads_fn)(const int *);
static threads_fn set_local_threads;

/* MKL's calls from this thread on one thread; what to restore after. */
static inline int serial_begin(void) {
    const int one = 1;
    return set_local_threads ? set_local_threads(&one) : -1;
}

static inline void serial_end(int previous) {
    if (set_local_threads && previous >= 0) set_local_threads(&previous);
}

typedef struct {
    int count;
    const char *models[MAX_MODELS];
    int codes[MAX_MODELS];
    double lows[MAX_MODELS], highs[MAX_MODELS], spans[MAX_MODELS];
    double multiplier; /* n, as the reference's mul_(n) */
} Spec;

/* A block's working rows: every model's task vector, then one model's rows at a time. */
typedef struct {
    double *tau;                     /* count x BLOCK */
    double *sum, *base, *x;          /* the block's */
    double *magnitude, *y;           /* a model's clipped magnitudes, tanh arguments */
    double *z, *t, *ez, *ty, *balance; /* its candidates' exp and tanh arguments and balances */
    double *num, *den;               /* the merge's sums */
    int32_t *index;                  /* the candidates' positions in the block */
    int32_t *stamp, *touched;        /* the merge's: which block's sums an entry holds; which */
    uint8_t *keep;
} Rows;

#define ROWS 13

static void *rows_alloc(Rows *w, int count) {
    char *all = PyMem_RawMalloc((size_t)(count + ROWS) * BLOCK * sizeof(double) +
                                BLOCK * (3 * sizeof(int32_t) + 1));
    if (!all) return NULL;
    double *d = (double *)all;
    w->tau = d, d += (size_t)count * BLOCK;
    w->sum = d, d += BLOCK;
    w->base = d, d += BLOCK;
    w->x = d, d += BLOCK;
    w->magnitude = d, d += BLOCK;
    w->y = d, d += BLOCK;
    w->z = d, d += BLOCK;
    w->t = d, d += BLOCK;
    w->ez = d, d += BLOCK;
    w->ty = d, d += BLOCK;
    w->balance = d, d += BLOCK;
    w->num = d, d += BLOCK;
    w->den = d, d += BLOCK;
    w->index = (int32_t *)d;
    w->stamp = w->index + BLOCK;
    w->touched = w->stamp + BLOCK;
    w->keep = (uint8_t *)(w->touched + BLOCK);
    for (Py_ssize_t k = 0; k < BLOCK; k++) w->stamp[k] = -1;
    return all;
}

/* A float64's order key: unsigned order of keys is the numbers' order; both zeros are +0's key
 * (they compare equal, and the reference's order statistic is +0 for either). */
static inline uint64_t order_key(double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    const uint64_t key = u ^ ((uint64_t)((int64_t)u >> 63) | TOP); /* ~u if negative, else u | TOP */
    return v == 0 ? TOP : key;
}

/* The number of an order key (NaN for the keys no number has). */
static inline double key_number(uint64_t key) {
    const uint64_t u = key >= TOP ? key & ~TOP : ~key;
    double v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* t = x - b into tau, and sum += t; 0 where a t is not finite. */
CLONED static int subtract(double *RESTRICT tau, double *RESTRICT sum, const double *RESTRICT x,
                           const double *RESTRICT b, Py_ssize_t m) {
    int finite = 1;
    for (Py_ssize_t k = 0; k < m; k++) {
        const double t = x[k] - b[k];
        tau[k] = t;
        sum[k] = sum[k] + t;
        finite &= (t - t) == 0; /* NaN for an infinity or a NaN */
    }
    return finite;
}

/* subtract() from float32 inputs as stored: each widened as it is read (exactly). */
CLONED static int subtract_f32(double *RESTRICT tau, double *RESTRICT sum, const float *RESTRICT x,
                               const double *RESTRICT b, Py_ssize_t m) {
    int finite = 1;
    for (Py_ssize_t k = 0; k < m; k++) {
        const double t = (double)x[k] - b[k];
        tau[k] = t;
        sum[k] = sum[k] + t;
        finite &= (t - t) == 0;
    }
    return finite;
}

/* The task vectors of m entries from offset and their sum, into the block's rows from slot
 * `at` on (the samples fill a block with many runs). 0 where a task vector entry is not finite
 * (the reference's NaN and infinity orders are left to it). */
CLONED static int prepare(const Spec *s, const char *base, int base_code, Py_ssize_t offset,
                          Py_ssize_t m, Py_ssize_t at, Rows *w) {
    const double *b =
        widen(w->base + at, base + offset * (Py_ssize_t)ITEMSIZE[base_code], base_code, m);
    int finite = 1;
    double *sum = w->sum + at;
    for (Py_ssize_t k = 0; k < m; k++) sum[k] = 0.0;
    for (int i = 0; i < s->count; i++) {
        const char *p = s->models[i] + offset * (Py_ssize_t)ITEMSIZE[s->codes[i]];
        double *tau = w->tau + (size_t)i * BLOCK + at;
        if (s->codes[i] == F32) {
            finite &= subtract_f32(tau, sum, (const float *)p, b, m);
        } else {
            finite &= subtract(tau, sum, widen(w->x, p, s->codes[i], m), b, m);
        }
    }
    return finite;
}

/* The screen: a balance is exp(z) tanh(y) with z = n r^2 >= 0. Where z <= 1/2, exp(z) <=
 * 1 + z + z^2 (true up to z = 1.79), and tanh(y) <= min(y, 1) for y > 0, <= 0 for y <= 0: so
 * (1 + z + z^2) min(y, 1), times SLACK, bounds the balance from above. SLACK (1 + 2**-30) covers
 * this bound's own roundings, z's from a reciprocal rather than a division (a few ulps), and
 * exp's and tanh's errors (VML's high accuracy: under 1 ulp) a million times over. A balance so
 * bounded below a threshold need not be computed: it is below it. The threshold is a positive
 * normal number (SCREENED and above), so no subnormal rounding enters. */
#define SLACK (1.0 + 0x1p-30)
#define SCREENED 0x1p-990

/* The screen's upper bound of exp(z) tanh(v) for 0 <= z <= 1/2 and v > 0. */
static ALWAYS_INLINE double upper_bound(double z, double v) {
    return ((1.0 + z + z * z) * (v < 1.0 ? v : 1.0)) * SLACK;
}

/* A model's clipped magnitudes and tanh arguments, and which entries may have a balance at
 * threshold or above (all of them when not screening). */
CLONED static void screen(double *RESTRICT magnitude, double *RESTRICT y, uint8_t *RESTRICT keep,
                          const double *RESTRICT tau, const double *RESTRICT sum, Py_ssize_t m,
                          double low, double high, double inverse, double multiplier,
                          double threshold, int screening) {
    for (Py_ssize_t k = 0; k < m; k++) {
        const double t = tau[k];
        double c = fabs(t);
        c = c > high ? high : c;
        c = c < low ? low : c;
        magnitude[k] = c;
        const double v = t * sum[k];
        y[k] = v;
        const double r = (c - low) * inverse;
        const double z = (r * r) * multiplier;
        const int below = (z <= 0.5) & ((v <= 0) | (upper_bound(z, v) < threshold));
        keep[k] = (uint8_t)(1 - (screening & below));
    }
}

/* The kept entries' positions; how many. */
static Py_ssize_t compact_plain(int32_t *RESTRICT index, const uint8_t *RESTRICT keep,
                                Py_ssize_t k, Py_ssize_t j, Py_ssize_t m) {
    for (; k < m; k++) {
        index[j] = (int32_t)k;
        j += keep[k];
    }
    return j;
}

#ifdef HAVE_AVX512
/* compact_plain() 16 flags at a time: the kept lanes' positions stored by one compress. */
__attribute__((target("avx512f"))) static Py_ssize_t compact_avx512(int32_t *RESTRICT index,
                                                                    const uint8_t *RESTRICT keep,
                                                                    Py_ssize_t m) {
    Py_ssize_t j = 0, k = 0;
    __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    for (; k + 16 <= m; k += 16) {
        const __m512i flags = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(keep + k)));
        const __mmask16 mask = _mm512_test_epi32_mask(flags, flags);
        _mm512_mask_compressstoreu_epi32(index + j, mask, lanes);
        j += __builtin_popcount((unsigned)mask);
        lanes = _mm512_add_epi32(lanes, step);
    }
    return compact_plain(index, keep, k, j, m);
}
#endif

static Py_ssize_t compact(int32_t *RESTRICT index, const uint8_t *RESTRICT keep, Py_ssize_t m) {
#ifdef HAVE_AVX512
    if (have_avx512) return compact_avx512(index, keep, m);
#endif
    return compact_plain(index, keep, 0, 0, m);
}

/* The candidates' exact exp and tanh arguments, as the reference computes them. */
CLONED static void arguments(double *RESTRICT z, double *RESTRICT t, const int32_t *RESTRICT index,
                             const double *RESTRICT magnitude, const double *RESTRICT y,
                             Py_ssize_t j, double low, double span, double multiplier) {
    for (Py_ssize_t q = 0; q < j; q++) {
        const int32_t k = index[q];
        const double r = span > 0 ? (magnitude[k] - low) / span : 0.0;
        z[q] = (r * r) * multiplier;
        t[q] = y[k];
    }
}

CLONED static void product(double *RESTRICT out, const double *RESTRICT a,
                           const double *RESTRICT b, Py_ssize_t m) {
    for (Py_ssize_t k = 0; k < m; k++) out[k] = a[k] * b[k];
}

/* Model i's balances in the block (after prepare()) where they may reach threshold (screening:
 * a positive normal threshold; else all of them), into w->balance, their positions in
 * w->index. Returns how many. */
static Py_ssize_t balances(const Spec *s, int i, Py_ssize_t m, double threshold, Rows *w) {
    const double span = s->spans[i];
    const int screening = threshold >= SCREENED;
    screen(w->magnitude, w->y, w->keep, w->tau + (size_t)i * BLOCK, w->sum, m, s->lows[i],
           s->highs[i], span > 0 ? 1.0 / span : 0.0, s->multiplier, threshold, screening);
    const Py_ssize_t j = compact(w->index, w->keep, m);
    if (j == 0) return 0;
    arguments(w->z, w->t, w->index, w->magnitude, w->y, j, s->lows[i], span, s->multiplier);
    vector_exp((int)j, w->z, w->ez, vector_mode);
    vector_tanh((int)j, w->t, w->ty, vector_mode);
    product(w->balance, w->ez, w->ty, j);
    return j;
}

/* --- the passes ------------------------------------------------------------------------------------ */

/* runs runs of RUN entries spread evenly over total entries: each model's balances' order keys,
 * model i's at keys[i * runs * RUN ...]. 0 where a task vector entry is not finite. */
static int sample(const Spec *s, const char *base, int base_code, Py_ssize_t total,
                  Py_ssize_t runs, uint64_t *keys, Rows *w) {
    const Py_ssize_t per = BLOCK / RUN; /* runs a block holds: exp and tanh called once for them */
    for (Py_ssize_t first = 0; first < runs; first += per) {
        const Py_ssize_t batch = runs - first < per ? runs - first : per;
        for (Py_ssize_t r = 0; r < batch; r++) {
            const Py_ssize_t run = first + r;
            const Py_ssize_t start = runs > 1 ? run * (total - RUN) / (runs - 1) : 0;
            if (!prepare(s, base, base_code, start, RUN, r * RUN, w)) return 0;
        }
        for (int i = 0; i < s->count; i++) {
            balances(s, i, batch * RUN, 0.0, w); /* not screened: every entry, in order */
            uint64_t *into = keys + ((size_t)i * runs + first) * RUN;
            for (Py_ssize_t q = 0; q < batch * RUN; q++) into[q] = order_key(w->balance[q]);
        }
    }
    return 1;
}

typedef struct {
    uint64_t lo[MAX_MODELS], hi[MAX_MODELS];
    Py_ssize_t cap, stride;
    uint64_t *collected; /* model i's cap slots at collected + i * stride */
    /* out */
    Py_ssize_t below[MAX_MODELS], at_lo[MAX_MODELS], inside[MAX_MODELS], at_hi[MAX_MODELS];
    uint64_t greatest[MAX_MODELS];
    Py_ssize_t computed[MAX_MODELS]; /* balances computed: not screened out */
} Scan;

/* The order keys of n balances, and the counts of those below lo, at lo and at hi (not lo),
 * and the greatest, added to model i's. */
CLONED static void count_block(uint64_t *RESTRICT keys, const double *RESTRICT balance,
                               Py_ssize_t n, uint64_t lo, uint64_t hi, Scan *q, int i) {
    Py_ssize_t below = 0, at_lo = 0, at_hi = 0;
    uint64_t greatest = q->greatest[i];
    const int distinct = hi != lo;
    for (Py_ssize_t k = 0; k < n; k++) {
        const uint64_t key = order_key(balance[k]);
        keys[k] = key;
        greatest = key > greatest ? key : greatest;
        below += key < lo;
        at_lo += key == lo;
        at_hi += (key == hi) & distinct;
    }
    q->below[i] += below;
    q->at_lo[i] += at_lo;
    q->at_hi[i] += at_hi;
    q->greatest[i] = greatest;
}

/* Per model, the balances' keys below lo, equal to lo, strictly between lo and hi (collected,
 * cap at most: the count goes on past it), equal to hi; and the greatest key (of those at lo
 * or above when lo is screened: the greatest is there whenever the bracket holds the floor).
 * Balances screened below lo are counted below it, not computed. 0 where a task vector entry
 * is not finite. */
static int scan(const Spec *s, const char *base, int base_code, Py_ssize_t m, Scan *q, Rows *w) {
    for (int i = 0; i < s->count; i++) {
        q->below[i] = q->at_lo[i] = q->inside[i] = q->at_hi[i] = q->computed[i] = 0;
        q->greatest[i] = 0;
    }
    for (Py_ssize_t offset = 0; offset < m; offset += BLOCK) {
        const Py_ssize_t n = m - offset < BLOCK ? m - offset : BLOCK;
        if (!prepare(s, base, base_code, offset, n, 0, w)) return 0;
        for (int i = 0; i < s->count; i++) {
            const uint64_t lo = q->lo[i], hi = q->hi[i];
            const double threshold = lo >= TOP ? key_number(lo) : 0.0;
            const Py_ssize_t j = balances(s, i, n, threshold, w);
            q->below[i] += n - j; /* screened out: below lo */
            q->computed[i] += j;
            uint64_t *keys = (uint64_t *)w->z; /* free once the balances are made */
            count_block(keys, w->balance, j, lo, hi, q, i);
            uint64_t *collected = q->collected + (size_t)i * q->stride;
            Py_ssize_t inside = q->inside[i];
            for (Py_ssize_t k = 0; k < j; k++) {
                const uint64_t key = keys[k];
                if (key > lo && key < hi) {
                    if (inside < q->cap) collected[inside] = key;
                    inside++;
                }
            }
            q->inside[i] = inside;
        }
    }
    return 1;
}

/* A model's scores added to the block's numerators and denominators at the candidates'
 * positions; an entry's sums start at +0 the first time the block (id) touches it, and its
 * position is listed in touched (used so far; returns the new count). A screened entry's score
 * is +0: adding it, or +-0 times its clipped value, to sums that start at +0 changes nothing,
 * so an entry no model touched merges as 0. */
static Py_ssize_t accumulate(double *RESTRICT num, double *RESTRICT den,
                             const double *RESTRICT balance, const int32_t *RESTRICT index,
                             const double *RESTRICT tau, const double *RESTRICT magnitude,
                             Py_ssize_t j, double f, double g, int32_t *RESTRICT stamp,
                             int32_t *RESTRICT touched, Py_ssize_t used, int32_t id) {
    for (Py_ssize_t q = 0; q < j; q++) {
        const int32_t k = index[q];
        double score = balance[q] > f ? balance[q] - f : 0.0;
        score = score / g;
        const double t = tau[k];
        const double clipped = (double)((t > 0) - (t < 0)) * magnitude[k];
        if (stamp[k] != id) {
            stamp[k] = id;
            num[k] = den[k] = 0.0;
            touched[used++] = k;
        }
        den[k] = den[k] + score;
        num[k] = num[k] + clipped * score;
    }
    return used;
}

/* out = b + merged * scale: merged is +0 (q = 0, or no model touched the entry) but at the
 * touched entries, where it is p / q where q is not 0. */
CLONED static void finish(double *RESTRICT out, const double *RESTRICT num,
                          const double *RESTRICT den, const double *RESTRICT b, Py_ssize_t n,
                          const int32_t *RESTRICT touched, Py_ssize_t used, double scale) {
    const double zero = 0.0 * scale;
    for (Py_ssize_t k = 0; k < n; k++) out[k] = b[k] + zero;
    for (Py_ssize_t q = 0; q < used; q++) {
        const int32_t k = touched[q];
        const double merged = den[k] != 0 ? num[k] / den[k] : 0.0;
        out[k] = b[k] + merged * scale;
    }
}

/* m entries of the merge into out (floors and their gaps per model). A model whose gap is not
 * above 0 scores 0 everywhere, so adds nothing. 0 where a task vector entry is not finite (the
 * block's output then not written; Python checked by scan() first). */
CLONED static int merge(const Spec *s, char *out, int out_code, const char *base, int base_code,
                        Py_ssize_t m, const double *floors, const double *gaps, double scale,
                        Rows *w) {
    for (Py_ssize_t offset = 0; offset < m; offset += BLOCK) {
        const Py_ssize_t n = m - offset < BLOCK ? m - offset : BLOCK;
        const int32_t id = (int32_t)(offset / BLOCK);
        if (!prepare(s, base, base_code, offset, n, 0, w)) return 0;
        Py_ssize_t used = 0;
        for (int i = 0; i < s->count; i++) {
            if (!(gaps[i] > 0)) continue;
            const Py_ssize_t j = balances(s, i, n, floors[i], w);
            used = accumulate(w->num, w->den, w->balance, w->index, w->tau + (size_t)i * BLOCK,
                              w->magnitude, j, floors[i], gaps[i], w->stamp, w->touched, used, id);
        }
        /* widen() may have handed back base's own memory, and out may be base: the block's
         * base is read here, before its result is written below */
        const double *b =
            widen(w->base, base + offset * (Py_ssize_t)ITEMSIZE[base_code], base_code, n);
        finish(w->ez, w->num, w->den, b, n, w->touched, used, scale);
        narrow(out + offset * (Py_ssize_t)ITEMSIZE[out_code], out_code, w->ez, n);
    }
    return 1;
}

/* --- Python bindings ----------------------------------------------------------------------------- */


/* The models, their codes and their clipping bounds: the arguments every pass shares. */
static int parse_spec(Spec *s, PyObject *models, PyObject *codes, PyObject *lows,
                      PyObject *highs) {
    s->count = -1;
    if (!parse_sequence(models, &s->count, "models", read_address, (void *)s->models) ||
        !parse_sequence(codes, &s->count, "codes", read_code, s->codes) ||
        !parse_sequence(lows, &s->count, "lows", read_double, s->lows) ||
        !parse_sequence(highs, &s->count, "highs", read_double, s->highs)) {
        return 0;
    }
    for (int i = 0; i < s->count; i++) s->spans[i] = s->highs[i] - s->lows[i];
    s->multiplier = (double)s->count;
    return 1;
}

static int configured(void) {
    if (vector_exp && vector_tanh) return 1;
    PyErr_SetString(PyExc_RuntimeError, "_fastpcb: configure() the exp and tanh first");
    return 0;
}

PyDoc_STRVAR(configure_doc,
             "configure(exp, tanh, mode, threads)\n\n"
             "The addresses of the vector exp and tanh (MKL VML's signature), their mode, and\n"
             "of MKL_SET_NUM_THREADS_LOCAL (0: none), which each pass sets to 1 while it runs.");

static PyObject *py_configure(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long exp_address, tanh_address, threads_address;
    long long mode;
    if (!PyArg_ParseTuple(args, "KKLK", &exp_address, &tanh_address, &mode, &threads_address)) {
        return NULL;
    }
    if (!exp_address || !tanh_address) {
        PyErr_SetString(PyExc_ValueError, "configure: null function address");
        return NULL;
    }
    vector_exp = (vector_fn)(uintptr_t)exp_address;
    vector_tanh = (vector_fn)(uintptr_t)tanh_address;
    vector_mode = mode;
    set_local_threads = (threads_fn)(uintptr_t)threads_address;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(balance_doc,
             "balance(values, n, out)\n\n"
             "exp(values[j]) * tanh(values[n + j]) for j < n into out (float64 addresses): the\n"
             "configured functions as the passes call them, for checking them against torch.");

static PyObject *py_balance(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long values, out;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KnK", &values, &n, &out)) return NULL;
    if (!configured()) return NULL;
    if (n < 0 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "balance: 0 <= n < 2**31");
        return NULL;
    }
    const double *v = (const double *)(uintptr_t)values;
    double *r = (double *)(uintptr_t)out;
    double *tmp = PyMem_RawMalloc((size_t)(2 * n + 1) * sizeof(double));
    if (!tmp) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    const int previous = serial_begin();
    vector_exp((int)n, v, tmp, vector_mode);
    vector_tanh((int)n, v + n, tmp + n, vector_mode);
    for (Py_ssize_t k = 0; k < n; k++) r[k] = tmp[k] * tmp[n + k];
    serial_end(previous);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(tmp);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(bounds_doc,
             "bounds(values, n, out)\n\n"
             "The screen's upper bounds of exp(values[j]) * tanh(values[n + j]) for j < n into\n"
             "out (float64 addresses; for 0 <= values[j] <= 1/2 and values[n + j] > 0).");

static PyObject *py_bounds(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long values, out;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KnK", &values, &n, &out)) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "bounds: n >= 0");
        return NULL;
    }
    const double *v = (const double *)(uintptr_t)values;
    double *r = (double *)(uintptr_t)out;
    for (Py_ssize_t k = 0; k < n; k++) r[k] = upper_bound(v[k], v[n + k]);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(sample_doc,
             "sample(base, base_code, total, models, codes, lows, highs, runs, keys) -> bool\n\n"
             "runs runs of 16 balances spread over the total entries, as order keys (uint64) into\n"
             "keys, model by model; False where a task vector entry is not finite.");

static PyObject *py_sample(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, keys;
    int base_code;
    Py_ssize_t total, runs;
    PyObject *models, *codes, *lows, *highs;
    Spec s;
    if (!PyArg_ParseTuple(args, "KinOOOOnK", &base, &base_code, &total, &models, &codes, &lows,
                          &highs, &runs, &keys)) {
        return NULL;
    }
    if (!configured() || !check_code(base_code) || !parse_spec(&s, models, codes, lows, highs)) {
        return NULL;
    }
    if (total < RUN || runs < 1 || runs > total / RUN) {
        PyErr_SetString(PyExc_ValueError, "sample: 1 <= runs <= total / 16");
        return NULL;
    }
    Rows w;
    void *all = rows_alloc(&w, s.count);
    if (!all) return PyErr_NoMemory();
    int ok;
    Py_BEGIN_ALLOW_THREADS
    const int previous = serial_begin();
    ok = sample(&s, (const char *)(uintptr_t)base, base_code, total, runs,
                (uint64_t *)(uintptr_t)keys, &w);
    serial_end(previous);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(all);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(scan_doc,
             "scan(base, base_code, m, models, codes, lows, highs, los, his, cap, collected,\n"
             "     stride)\n"
             "    -> list of (below, at_lo, inside, at_hi, greatest, computed) per model, or None\n\n"
             "The balances of m entries counted against each model's key bracket [lo, hi]: the\n"
             "keys strictly inside collected at collected + i * stride for model i (uint64, cap at\n"
             "most; inside counts on past cap). None where a task vector entry is not finite.");

static PyObject *py_scan(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, collected;
    int base_code;
    Py_ssize_t m, cap, stride;
    PyObject *models, *codes, *lows, *highs, *los, *his;
    Spec s;
    Scan *q = PyMem_Calloc(1, sizeof *q);
    if (!q) return PyErr_NoMemory();
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "KinOOOOOOnKn", &base, &base_code, &m, &models, &codes, &lows,
                          &highs, &los, &his, &cap, &collected, &stride)) {
        goto done;
    }
    if (!configured() || !check_code(base_code) || !parse_spec(&s, models, codes, lows, highs) ||
        !parse_sequence(los, &s.count, "los", read_u64, q->lo) ||
        !parse_sequence(his, &s.count, "his", read_u64, q->hi)) {
        goto done;
    }
    if (m < 0 || cap < 0 || stride < cap) {
        PyErr_SetString(PyExc_ValueError, "scan: m >= 0 and 0 <= cap <= stride");
        goto done;
    }
    q->cap = cap;
    q->stride = stride;
    q->collected = (uint64_t *)(uintptr_t)collected;
    Rows w;
    void *all = rows_alloc(&w, s.count);
    if (!all) {
        PyErr_NoMemory();
        goto done;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS
    const int previous = serial_begin();
    ok = scan(&s, (const char *)(uintptr_t)base, base_code, m, q, &w);
    serial_end(previous);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(all);
    if (!ok) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    result = PyList_New(s.count);
    for (int i = 0; result && i < s.count; i++) {
        PyObject *item = Py_BuildValue("(nnnnKn)", q->below[i], q->at_lo[i], q->inside[i],
                                       q->at_hi[i], (unsigned long long)q->greatest[i],
                                       q->computed[i]);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, item);
    }
done:
    PyMem_Free(q);
    return result;
}

PyDoc_STRVAR(merge_doc,
             "merge(out, out_code, base, base_code, m, models, codes, lows, highs, floors, gaps,\n"
             "      scale) -> bool\n\n"
             "m entries of PCB's merge into out: each model's balances above its floor, over its\n"
             "gap (greatest - floor), weight its clipped task vector. False where a task vector\n"
             "entry is not finite (from its block on, nothing written).");

static PyObject *py_merge(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out, base;
    int out_code, base_code;
    Py_ssize_t m;
    double scale;
    PyObject *models, *codes, *lows, *highs, *floors_obj, *gaps_obj;
    Spec s;
    double floors[MAX_MODELS], gaps[MAX_MODELS];
    if (!PyArg_ParseTuple(args, "KiKinOOOOOOd", &out, &out_code, &base, &base_code, &m, &models,
                          &codes, &lows, &highs, &floors_obj, &gaps_obj, &scale)) {
        return NULL;
    }
    if (!configured() || !check_code(out_code) || !check_code(base_code) ||
        !parse_spec(&s, models, codes, lows, highs) ||
        !parse_sequence(floors_obj, &s.count, "floors", read_double, floors) ||
        !parse_sequence(gaps_obj, &s.count, "gaps", read_double, gaps)) {
        return NULL;
    }
    if (m < 0) {
        PyErr_SetString(PyExc_ValueError, "merge: m >= 0");
        return NULL;
    }
    Rows w;
    void *all = rows_alloc(&w, s.count);
    if (!all) return PyErr_NoMemory();
    int ok;
    Py_BEGIN_ALLOW_THREADS
    const int previous = serial_begin();
    ok = merge(&s, (char *)(uintptr_t)out, out_code, (const char *)(uintptr_t)base, base_code, m,
               floors, gaps, scale, &w);
    serial_end(previous);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(all);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"configure", py_configure, METH_VARARGS, configure_doc},
    {"balance", py_balance, METH_VARARGS, balance_doc},
    {"bounds", py_bounds, METH_VARARGS, bounds_doc},
    {"sample", py_sample, METH_VARARGS, sample_doc},
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"merge", py_merge, METH_VARARGS, merge_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpcb",
    "terge's CPU loops for PCB (see families/elementwise.py for the reference path).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastpcb(void) {
#ifdef HAVE_AVX512
    detect_avx512();
#endif
    return PyModule_Create(&module);
}
