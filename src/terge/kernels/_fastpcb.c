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

/* A block's working rows: every model's task vector and clipped one, then the shared rows. */
typedef struct {
    double *tau, *clipped, *balance; /* count x BLOCK each */
    double *sum, *z, *y, *ez, *ty, *base, *x;
} Rows;

static double *rows_alloc(Rows *w, int count) {
    double *all = PyMem_RawMalloc((size_t)(3 * count + 7) * BLOCK * sizeof(double));
    if (!all) return NULL;
    w->tau = all;
    w->clipped = w->tau + (size_t)count * BLOCK;
    w->balance = w->clipped + (size_t)count * BLOCK;
    w->sum = w->balance + (size_t)count * BLOCK;
    w->z = w->sum + BLOCK;
    w->y = w->z + BLOCK;
    w->ez = w->y + BLOCK;
    w->ty = w->ez + BLOCK;
    w->base = w->ty + BLOCK;
    w->x = w->base + BLOCK;
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

/* A model's clipped task vector, and the arguments of its exp and tanh. */
CLONED static void arguments(double *RESTRICT clipped, double *RESTRICT z, double *RESTRICT y,
                             const double *RESTRICT tau, const double *RESTRICT sum,
                             Py_ssize_t m, double low, double high, double span,
                             double multiplier) {
    for (Py_ssize_t k = 0; k < m; k++) {
        const double t = tau[k];
        double c = fabs(t);
        c = c > high ? high : c;
        c = c < low ? low : c;
        clipped[k] = (double)((t > 0) - (t < 0)) * c;
        const double r = span > 0 ? (c - low) / span : 0.0;
        z[k] = (r * r) * multiplier;
        y[k] = t * sum[k];
    }
}

CLONED static void product(double *RESTRICT out, const double *RESTRICT a,
                           const double *RESTRICT b, Py_ssize_t m) {
    for (Py_ssize_t k = 0; k < m; k++) out[k] = a[k] * b[k];
}

/* The balances of m entries from offset (m <= BLOCK) into w->balance; the clipped task vectors
 * into w->clipped. Returns 0 where a task vector entry is not finite (nothing else done then:
 * the reference's NaN and infinity orders are left to it). */
static int balances(const Spec *s, const char *base, int base_code, Py_ssize_t offset,
                    Py_ssize_t m, Rows *w) {
    const double *b = widen(w->base, base + offset * (Py_ssize_t)ITEMSIZE[base_code], base_code, m);
    int finite = 1;
    for (Py_ssize_t k = 0; k < m; k++) w->sum[k] = 0.0;
    for (int i = 0; i < s->count; i++) {
        const double *x = widen(w->x, s->models[i] + offset * (Py_ssize_t)ITEMSIZE[s->codes[i]],
                                s->codes[i], m);
        finite &= subtract(w->tau + (size_t)i * BLOCK, w->sum, x, b, m);
    }
    if (!finite) return 0;
    if (m == 0) return 1;
    for (int i = 0; i < s->count; i++) {
        arguments(w->clipped + (size_t)i * BLOCK, w->z, w->y, w->tau + (size_t)i * BLOCK, w->sum,
                  m, s->lows[i], s->highs[i], s->spans[i], s->multiplier);
        vector_exp((int)m, w->z, w->ez, vector_mode);
        vector_tanh((int)m, w->y, w->ty, vector_mode);
        product(w->balance + (size_t)i * BLOCK, w->ez, w->ty, m);
    }
    return 1;
}

/* --- the passes ------------------------------------------------------------------------------------ */

/* runs runs of RUN entries spread evenly over total entries: each model's balances' order keys,
 * model i's at keys[i * runs * RUN ...]. 0 where a task vector entry is not finite. */
static int sample(const Spec *s, const char *base, int base_code, Py_ssize_t total,
                  Py_ssize_t runs, uint64_t *keys, Rows *w) {
    for (Py_ssize_t r = 0; r < runs; r++) {
        const Py_ssize_t start = runs > 1 ? r * (total - RUN) / (runs - 1) : 0;
        if (!balances(s, base, base_code, start, RUN, w)) return 0;
        for (int i = 0; i < s->count; i++) {
            const double *balance = w->balance + (size_t)i * BLOCK;
            uint64_t *into = keys + ((size_t)i * runs + r) * RUN;
            for (Py_ssize_t k = 0; k < RUN; k++) into[k] = order_key(balance[k]);
        }
    }
    return 1;
}

typedef struct {
    uint64_t lo[MAX_MODELS], hi[MAX_MODELS];
    Py_ssize_t cap;
    uint64_t *collected; /* count x cap */
    /* out */
    Py_ssize_t below[MAX_MODELS], at_lo[MAX_MODELS], inside[MAX_MODELS], at_hi[MAX_MODELS];
    uint64_t greatest[MAX_MODELS];
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
 * cap at most: the count goes on past it), equal to hi; and the greatest key. 0 where a task
 * vector entry is not finite. */
static int scan(const Spec *s, const char *base, int base_code, Py_ssize_t m, Scan *q, Rows *w) {
    for (int i = 0; i < s->count; i++) {
        q->below[i] = q->at_lo[i] = q->inside[i] = q->at_hi[i] = 0;
        q->greatest[i] = 0;
    }
    for (Py_ssize_t offset = 0; offset < m; offset += BLOCK) {
        const Py_ssize_t n = m - offset < BLOCK ? m - offset : BLOCK;
        if (!balances(s, base, base_code, offset, n, w)) return 0;
        for (int i = 0; i < s->count; i++) {
            uint64_t *keys = (uint64_t *)w->z; /* free once the balances are made */
            count_block(keys, w->balance + (size_t)i * BLOCK, n, q->lo[i], q->hi[i], q, i);
            const uint64_t lo = q->lo[i], hi = q->hi[i];
            uint64_t *collected = q->collected + (size_t)i * q->cap;
            Py_ssize_t inside = q->inside[i];
            for (Py_ssize_t k = 0; k < n; k++) {
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

/* A model's scores added to the block's numerators and denominators. */
CLONED static void accumulate(double *RESTRICT num, double *RESTRICT den,
                              const double *RESTRICT balance, const double *RESTRICT clipped,
                              Py_ssize_t n, double f, double g) {
    for (Py_ssize_t k = 0; k < n; k++) {
        double score = balance[k] > f ? balance[k] - f : 0.0;
        score = g > 0 ? score / g : 0.0;
        den[k] = den[k] + score;
        num[k] = num[k] + clipped[k] * score;
    }
}

CLONED static void finish(double *RESTRICT out, const double *RESTRICT num,
                          const double *RESTRICT den, const double *RESTRICT b, Py_ssize_t n,
                          double scale) {
    for (Py_ssize_t k = 0; k < n; k++) {
        const double merged = den[k] != 0 ? num[k] / den[k] : 0.0;
        out[k] = b[k] + merged * scale;
    }
}

/* m entries of the merge into out (floors and their spans per model). 0 where a task vector
 * entry is not finite (the block's output then not written; Python checked by scan() first). */
static int merge(const Spec *s, char *out, int out_code, const char *base, int base_code,
                 Py_ssize_t m, const double *floors, const double *gaps, double scale, Rows *w) {
    for (Py_ssize_t offset = 0; offset < m; offset += BLOCK) {
        const Py_ssize_t n = m - offset < BLOCK ? m - offset : BLOCK;
        if (!balances(s, base, base_code, offset, n, w)) return 0;
        double *num = w->z, *den = w->y; /* free once the balances are made */
        for (Py_ssize_t k = 0; k < n; k++) num[k] = den[k] = 0.0;
        for (int i = 0; i < s->count; i++) {
            accumulate(num, den, w->balance + (size_t)i * BLOCK, w->clipped + (size_t)i * BLOCK, n,
                       floors[i], gaps[i]);
        }
        /* widen() may have handed back base's own memory, and out may be base: the block's
         * base is read here, before its result is written below */
        const double *b =
            widen(w->base, base + offset * (Py_ssize_t)ITEMSIZE[base_code], base_code, n);
        finish(w->ez, num, den, b, n, scale);
        narrow(out + offset * (Py_ssize_t)ITEMSIZE[out_code], out_code, w->ez, n);
    }
    return 1;
}

/* --- Python bindings ----------------------------------------------------------------------------- */

static int check_code(int code) {
    if (code < F64 || code > F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", code);
        return 0;
    }
    return 1;
}

/* Every value of a sequence of count values (count < 0: 1 to 64 of them, count set), each read
 * by read(). 1 on success. */
static int parse_sequence(PyObject *obj, int *count, const char *what,
                          int (*read)(PyObject *, int, void *), void *into) {
    PyObject *seq = PySequence_Fast(obj, what);
    if (!seq) return 0;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int ok = 1;
    if (*count < 0) {
        if (n < 1 || n > MAX_MODELS) {
            PyErr_Format(PyExc_ValueError, "%s: between 1 and 64 values", what);
            ok = 0;
        } else {
            *count = (int)n;
        }
    } else if (n != *count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d values", what, *count);
        ok = 0;
    }
    for (int i = 0; ok && i < *count; i++) {
        ok = read(PySequence_Fast_GET_ITEM(seq, i), i, into) && !PyErr_Occurred();
    }
    Py_DECREF(seq);
    return ok;
}

static int read_address(PyObject *item, int i, void *into) {
    ((const char **)into)[i] = (const char *)(uintptr_t)PyLong_AsUnsignedLongLong(item);
    return 1;
}

static int read_code(PyObject *item, int i, void *into) {
    ((int *)into)[i] = (int)PyLong_AsLong(item);
    return PyErr_Occurred() ? 0 : check_code(((int *)into)[i]);
}

static int read_double(PyObject *item, int i, void *into) {
    ((double *)into)[i] = PyFloat_AsDouble(item);
    return 1;
}

static int read_u64(PyObject *item, int i, void *into) {
    ((uint64_t *)into)[i] = PyLong_AsUnsignedLongLong(item);
    return 1;
}

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
    double *all = rows_alloc(&w, s.count);
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
             "scan(base, base_code, m, models, codes, lows, highs, los, his, cap, collected)\n"
             "    -> list of (below, at_lo, inside, at_hi, greatest) per model, or None\n\n"
             "The balances of m entries counted against each model's key bracket [lo, hi]: the\n"
             "keys strictly inside collected into collected (uint64, cap per model; inside\n"
             "counts on past cap). None where a task vector entry is not finite.");

static PyObject *py_scan(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, collected;
    int base_code;
    Py_ssize_t m, cap;
    PyObject *models, *codes, *lows, *highs, *los, *his;
    Spec s;
    Scan *q = PyMem_Calloc(1, sizeof *q);
    if (!q) return PyErr_NoMemory();
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "KinOOOOOOnK", &base, &base_code, &m, &models, &codes, &lows,
                          &highs, &los, &his, &cap, &collected)) {
        goto done;
    }
    if (!configured() || !check_code(base_code) || !parse_spec(&s, models, codes, lows, highs) ||
        !parse_sequence(los, &s.count, "los", read_u64, q->lo) ||
        !parse_sequence(his, &s.count, "his", read_u64, q->hi)) {
        goto done;
    }
    if (m < 0 || cap < 0) {
        PyErr_SetString(PyExc_ValueError, "scan: m >= 0 and cap >= 0");
        goto done;
    }
    q->cap = cap;
    q->collected = (uint64_t *)(uintptr_t)collected;
    Rows w;
    double *all = rows_alloc(&w, s.count);
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
        PyObject *item = Py_BuildValue("(nnnnK)", q->below[i], q->at_lo[i], q->inside[i],
                                       q->at_hi[i], (unsigned long long)q->greatest[i]);
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
    double *all = rows_alloc(&w, s.count);
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

PyMODINIT_FUNC PyInit__fastpcb(void) { return PyModule_Create(&module); }
