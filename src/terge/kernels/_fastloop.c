/* terge._fastloop: the fused CPU loop for linear merges.
 *
 * One pass over memory: every element of every input is read once and every output element is
 * written once, with the float64 accumulation held in an L1-sized block. The arithmetic is the
 * reference path's (src/terge/kernels.py), operation for operation, so results are equal bit for
 * bit:
 *
 *     acc = x_0            (widened to float64: exact)
 *     acc = acc * c_0      (only when c_0 != 1)
 *     acc = acc + x_i      (c_i == 1)   or   acc = acc + (x_i * c_i)   (two roundings, no FMA)
 *     out = round(acc / d) (only when a divisor is given), rounded once more into out's dtype
 *
 * Rounding into bfloat16/float16 goes through float32 rounded *to odd*, which makes the second
 * rounding exact (see kernels.store_rounded). The file must be compiled with -ffp-contract=off:
 * a fused multiply-add would round once where the reference rounds twice.
 *
 * The work runs without the GIL, so Python threads can split a tensor between cores.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_convert.h"

#define BLOCK 1024

/* The element loops are compiled for AVX-512 and AVX2 too, picked at load time on x86-64 (GCC,
 * clang): the same IEEE operations in wider vectors, so the same bits (fp-contract stays off). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(TERGE_NO_CLONES)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif
#define MAX_INPUTS 64
#define STEP 256   /* elements per fused call, each with its hints */
#define AHEAD 2048 /* elements between the hints and their use */
#define HINTED 32768 /* the fewest elements that a call gives hints for */
#if defined(__GNUC__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)(p))
#endif

/* --- fused loops -------------------------------------------------------------------------------
 *
 * Multiplying by a coefficient of 1 is exact, so the loops always do it: the results equal the
 * reference's, which skips it. Inputs of one dtype (the usual case) run fused
 * loops of up to four inputs at a time, element by element, so the accumulator stays in registers;
 * inputs of mixed dtypes go through a float64 block buffer one input at a time.
 */

#define LOAD_F64(p, k) (((const double *)(p))[k])
#define LOAD_F32(p, k) ((double)((const float *)(p))[k])
#define LOAD_BF16(p, k) ((double)bf16_to_float(((const uint16_t *)(p))[k]))
#define LOAD_F16(p, k) ((double)f16_to_float(((const uint16_t *)(p))[k]))

#define STORE_F64(p, k, v) (((double *)(p))[k] = (v))
#define STORE_F32(p, k, v) (((float *)(p))[k] = (float)(v))
#define STORE_BF16(p, k, v) (((uint16_t *)(p))[k] = float_to_bf16(round_to_odd(v)))
#define STORE_F16(p, k, v) (((uint16_t *)(p))[k] = float_to_f16(round_to_odd(v)))

/* The sum of g (1..4) weighted inputs at element k, added to START in order. */
#define SUM1(L, START) ((START) + L(x0, k) * c0)
#define SUM2(L, START) (SUM1(L, START) + L(x1, k) * c1)
#define SUM3(L, START) (SUM2(L, START) + L(x2, k) * c2)
#define SUM4(L, START) (SUM3(L, START) + L(x3, k) * c3)
#define FIRST1(L) (L(x0, k) * c0)
#define FIRST2(L) (FIRST1(L) + L(x1, k) * c1)
#define FIRST3(L) (FIRST2(L) + L(x2, k) * c2)
#define FIRST4(L) (FIRST3(L) + L(x3, k) * c3)

#define UNPACK                                                                                     \
    const char *x0 = xs[0], *x1 = g > 1 ? xs[1] : NULL, *x2 = g > 2 ? xs[2] : NULL,                \
               *x3 = g > 3 ? xs[3] : NULL;                                                         \
    const double c0 = cs[0], c1 = g > 1 ? cs[1] : 0, c2 = g > 2 ? cs[2] : 0,                       \
                 c3 = g > 3 ? cs[3] : 0;                                                           \
    (void)x1; (void)x2; (void)x3; (void)c1; (void)c2; (void)c3;

/* acc[k] (= or +=) the group's weighted inputs. */
#define DEFINE_ACCUMULATE(NAME, L)                                                                 \
    VECTOR_CLONES static void NAME(double *acc, int fresh, char *const *xs, const double *cs, int g,             \
                     Py_ssize_t n) {                                                               \
        UNPACK                                                                                     \
        if (fresh) {                                                                               \
            switch (g) {                                                                           \
            case 1: for (Py_ssize_t k = 0; k < n; k++) acc[k] = FIRST1(L); break;                  \
            case 2: for (Py_ssize_t k = 0; k < n; k++) acc[k] = FIRST2(L); break;                  \
            case 3: for (Py_ssize_t k = 0; k < n; k++) acc[k] = FIRST3(L); break;                  \
            default: for (Py_ssize_t k = 0; k < n; k++) acc[k] = FIRST4(L); break;                 \
            }                                                                                      \
        } else {                                                                                   \
            switch (g) {                                                                           \
            case 1: for (Py_ssize_t k = 0; k < n; k++) acc[k] = SUM1(L, acc[k]); break;            \
            case 2: for (Py_ssize_t k = 0; k < n; k++) acc[k] = SUM2(L, acc[k]); break;            \
            case 3: for (Py_ssize_t k = 0; k < n; k++) acc[k] = SUM3(L, acc[k]); break;            \
            default: for (Py_ssize_t k = 0; k < n; k++) acc[k] = SUM4(L, acc[k]); break;           \
            }                                                                                      \
        }                                                                                          \
    }

/* out[k] = round((acc[k] + the group's weighted inputs) / d); acc NULL starts from nothing.
 * Dividing by 1 is exact, so d == 1 skips the division (a divide per element would bound the
 * loop: an EMA update has no divisor). */
#define DIVIDE_BY_D(v) ((v) / d)
#define AS_IS(v) (v)
#define FINISH_LOOPS(L, S, DIV)                                                                    \
    if (acc == NULL) {                                                                             \
        switch (g) {                                                                               \
        case 1: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(FIRST1(L))); break;               \
        case 2: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(FIRST2(L))); break;               \
        case 3: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(FIRST3(L))); break;               \
        default: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(FIRST4(L))); break;              \
        }                                                                                          \
    } else {                                                                                       \
        switch (g) {                                                                               \
        case 1: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(SUM1(L, acc[k]))); break;         \
        case 2: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(SUM2(L, acc[k]))); break;         \
        case 3: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(SUM3(L, acc[k]))); break;         \
        default: for (Py_ssize_t k = 0; k < n; k++) S(out, k, DIV(SUM4(L, acc[k]))); break;        \
        }                                                                                          \
    }
#define DEFINE_FINISH(NAME, L, S)                                                                  \
    VECTOR_CLONES static void NAME(char *out, const double *acc, char *const *xs, const double *cs, int g,       \
                     double d, Py_ssize_t n) {                                                     \
        UNPACK                                                                                     \
        if (d == 1.0) {                                                                            \
            FINISH_LOOPS(L, S, AS_IS)                                                              \
        } else {                                                                                   \
            FINISH_LOOPS(L, S, DIVIDE_BY_D)                                                        \
        }                                                                                          \
    }

DEFINE_ACCUMULATE(accumulate_f64, LOAD_F64)
DEFINE_ACCUMULATE(accumulate_f32, LOAD_F32)
DEFINE_ACCUMULATE(accumulate_bf16, LOAD_BF16)
DEFINE_ACCUMULATE(accumulate_f16, LOAD_F16)

#define DEFINE_FINISH_ALL(IN, L)                                                                   \
    DEFINE_FINISH(finish_##IN##_f64, L, STORE_F64)                                                 \
    DEFINE_FINISH(finish_##IN##_f32, L, STORE_F32)                                                 \
    DEFINE_FINISH(finish_##IN##_bf16, L, STORE_BF16)                                               \
    DEFINE_FINISH(finish_##IN##_f16, L, STORE_F16)

DEFINE_FINISH_ALL(f64, LOAD_F64)
DEFINE_FINISH_ALL(f32, LOAD_F32)
DEFINE_FINISH_ALL(bf16, LOAD_BF16)
DEFINE_FINISH_ALL(f16, LOAD_F16)

typedef void (*accumulate_fn)(double *, int, char *const *, const double *, int, Py_ssize_t);
typedef void (*finish_fn)(char *, const double *, char *const *, const double *, int, double,
                          Py_ssize_t);

static const accumulate_fn ACCUMULATE[4] = {accumulate_f64, accumulate_f32, accumulate_bf16,
                                            accumulate_f16};
static const finish_fn FINISH[4][4] = {
    {finish_f64_f64, finish_f64_f32, finish_f64_bf16, finish_f64_f16},
    {finish_f32_f64, finish_f32_f32, finish_f32_bf16, finish_f32_f16},
    {finish_bf16_f64, finish_bf16_f32, finish_bf16_bf16, finish_bf16_f16},
    {finish_f16_f64, finish_f16_f32, finish_f16_bf16, finish_f16_f16},
};

static const size_t ITEMSIZE[] = {8, 4, 2, 2};

/* Inputs of mixed dtypes: one input at a time through the block buffer, then the store. */
static void combine_mixed(char *out, int out_code, Py_ssize_t m, int count, char *const *inputs,
                          const int *codes, const double *coefs, double divisor, double *acc,
                          Py_ssize_t start) {
    for (int i = 0; i < count; i++) {
        char *x = inputs[i] + start * ITEMSIZE[codes[i]];
        ACCUMULATE[codes[i]](acc, i == 0, &x, &coefs[i], 1, m);
    }
    /* acc / d stored through a float64 "input" of one element stride: reuse FINISH from acc. */
    FINISH[F64][out_code](out + start * ITEMSIZE[out_code], NULL, (char *const *)&acc,
                          (const double[]){1.0}, 1, divisor, m);
}

static void combine(char *out, int out_code, Py_ssize_t n, int count, char *const *inputs,
                    const int *codes, const double *coefs, double divisor) {
    double acc[BLOCK];
    int same = 1;
    for (int i = 1; i < count; i++) same &= codes[i] == codes[0];
    const int in_code = codes[0];
    const size_t in_size = ITEMSIZE[in_code], out_size = ITEMSIZE[out_code];
    for (Py_ssize_t start = 0; start < n; start += BLOCK) {
        Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;
        if (!same) {
            combine_mixed(out, out_code, m, count, inputs, codes, coefs, divisor, acc, start);
            continue;
        }
        char *xs[MAX_INPUTS];
        for (int i = 0; i < count; i++) xs[i] = inputs[i] + start * in_size;
        int done = 0;
        while (count - done > 4) {
            ACCUMULATE[in_code](acc, done == 0, xs + done, coefs + done, 4, m);
            done += 4;
        }
        if (done) {
            FINISH[in_code][out_code](out + start * out_size, acc, xs + done, coefs + done,
                                      count - done, divisor, m);
            continue;
        }
        /* Up to four inputs, fused: in steps of STEP elements, each step first asking for the
         * inputs' cache lines AHEAD elements on. The loop converts to float64 and back, which
         * leaves fewer loads in flight than a float32 loop: without these hints it ran 1.3x
         * slower than a float32 lerp over the same bytes, with them at par. Hints never fault,
         * and none is given past the end. */
        if (n < HINTED) { /* too short for the hints to pay (its data likely cached): one call */
            FINISH[in_code][out_code](out + start * out_size, NULL, xs, coefs, count, divisor, m);
            continue;
        }
        for (Py_ssize_t step = 0; step < m; step += STEP) {
            const Py_ssize_t k = m - step < STEP ? m - step : STEP;
            const Py_ssize_t ahead = start + step + AHEAD;
            if (ahead + k <= n) {
                for (int i = 0; i < count; i++) {
                    const char *p = inputs[i] + ahead * in_size;
                    for (size_t b = 0; b < (size_t)k * in_size; b += 64) PREFETCH(p + b);
                }
            }
            char *here[4];
            for (int i = 0; i < count; i++) here[i] = xs[i] + step * in_size;
            FINISH[in_code][out_code](out + (start + step) * out_size, NULL, here, coefs, count,
                                      divisor, k);
        }
    }
}

/* --- Python binding ---------------------------------------------------------------------------- */

static int check_code(int code) {
    if (code < F64 || code > F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", code);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(combine_doc,
             "combine(out, out_code, n, inputs, codes, coefficients, divisor)\n\n"
             "out = (sum_i coefficients[i] * inputs[i]) / divisor over n elements, in float64.\n"
             "Addresses are integers (tensor.data_ptr()), codes 0 float64, 1 float32, 2 bfloat16,\n"
             "3 float16; divisor None divides by nothing. Runs without the GIL.");

static PyObject *py_combine(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long out_addr;
    int out_code;
    Py_ssize_t n;
    PyObject *inputs_obj, *codes_obj, *coefs_obj, *divisor_obj;
    if (!PyArg_ParseTuple(args, "KinOOOO", &out_addr, &out_code, &n, &inputs_obj, &codes_obj,
                          &coefs_obj, &divisor_obj)) {
        return NULL;
    }
    if (!check_code(out_code)) return NULL;
    PyObject *inputs = PySequence_Fast(inputs_obj, "inputs must be a sequence");
    PyObject *codes = inputs ? PySequence_Fast(codes_obj, "codes must be a sequence") : NULL;
    PyObject *coefs = codes ? PySequence_Fast(coefs_obj, "coefficients must be a sequence") : NULL;
    PyObject *result = NULL;
    if (!coefs) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(inputs);
    if (count < 1 || count > MAX_INPUTS || PySequence_Fast_GET_SIZE(codes) != count ||
        PySequence_Fast_GET_SIZE(coefs) != count) {
        PyErr_SetString(PyExc_ValueError, "inputs, codes and coefficients must have the same "
                                          "length, between 1 and 64");
        goto done;
    }
    char *addresses[MAX_INPUTS];
    int input_codes[MAX_INPUTS];
    double coefficients[MAX_INPUTS];
    for (Py_ssize_t i = 0; i < count; i++) {
        addresses[i] = (char *)(uintptr_t)PyLong_AsUnsignedLongLong(
            PySequence_Fast_GET_ITEM(inputs, i));
        input_codes[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(codes, i));
        coefficients[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(coefs, i));
        if (PyErr_Occurred() || !check_code(input_codes[i])) goto done;
    }
    double divisor = divisor_obj == Py_None ? 1.0 : PyFloat_AsDouble(divisor_obj);
    if (PyErr_Occurred()) goto done;
    Py_BEGIN_ALLOW_THREADS
    combine((char *)(uintptr_t)out_addr, out_code, n, (int)count, addresses, input_codes,
            coefficients, divisor);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(inputs);
    Py_XDECREF(codes);
    Py_XDECREF(coefs);
    return result;
}

/* --- many tensors, and threads sharing them -------------------------------------------------- */

typedef struct {
    unsigned long long *outs, *ns, **inputs;
    const int *codes;
    const double *coefficients;
    double divisor;
    int out_code, count;
} Batch;

/* Tensors [first, stop) whole, or (stop == first + 1 and until > 0) elements [from, until) of
 * tensor first. */
static void combine_range(const Batch *b, Py_ssize_t first, Py_ssize_t stop, Py_ssize_t from,
                          Py_ssize_t until) {
    for (Py_ssize_t j = first; j < stop; j++) {
        const Py_ssize_t start = until > 0 ? from : 0, end = until > 0 ? until : (Py_ssize_t)b->ns[j];
        char *addresses[MAX_INPUTS];
        for (int i = 0; i < b->count; i++) {
            addresses[i] = (char *)(uintptr_t)b->inputs[i][j] + start * ITEMSIZE[b->codes[i]];
        }
        combine((char *)(uintptr_t)b->outs[j] + start * ITEMSIZE[b->out_code], b->out_code,
                end - start, b->count, addresses, b->codes, b->coefficients, b->divisor);
    }
}

#if defined(__GNUC__)
#define HAVE_SHARED_WORK 1
#define PIECE 262144 /* elements per claim: a large tensor's piece, or a run of small tensors */
/* (32K-element pieces measured 2-3% slower on two threads, a ResNet-50 average read from memory:
 * the threads switch pieces eight times as often, and the stream prefetch restarts each time.) */

/* Every thread calls this with the same batch and counter (0 before the first): each claims the
 * next piece in order with one atomic add, so the threads stay balanced whatever the caches
 * hold, and move through memory together. The pieces: a tensor of PIECE elements or more is cut
 * into PIECE-element pieces; smaller ones are taken in runs of at least PIECE elements. Each
 * element is computed as combine() computes it, so the split cannot change a bit. */
static void combine_shared(const Batch *b, Py_ssize_t tensors, int64_t *counter) {
    Py_ssize_t j = 0, offset = 0; /* where this thread's walk over the pieces stands */
    int64_t next = 0;             /* the index of the piece starting there */
    for (int64_t claim = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); j < tensors;
         next++) {
        const Py_ssize_t n = (Py_ssize_t)b->ns[j], first = j;
        Py_ssize_t stop, from = 0, until = 0; /* until 0: tensors [first, stop) whole */
        if (n >= PIECE) {
            from = offset;
            until = n - offset > PIECE ? offset + PIECE : n;
            stop = j + 1;
            if (until < n) {
                offset = until;
            } else {
                j++, offset = 0;
            }
        } else {
            Py_ssize_t total = 0;
            for (stop = j; stop < tensors && (Py_ssize_t)b->ns[stop] < PIECE && total < PIECE;) {
                total += (Py_ssize_t)b->ns[stop++];
            }
            j = stop;
        }
        if (next == claim) {
            combine_range(b, first, stop, from, until);
            claim = __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
        }
    }
}

#if defined(__linux__)
#include <dlfcn.h>
#define HAVE_TEAM 1
/* The threads of the OpenMP runtime that torch loaded, for combine_shared: torch's own loops run
 * on them, and right after one (an optimizer step) they spin waiting for more work, holding the
 * cores that threads of terge's own would need (an EMA update then waited for its second thread,
 * sometimes for milliseconds). GOMP_parallel(fn, data, threads, flags) is the entry point that
 * `#pragma omp parallel` compiles to, exported by GNU's libgomp and by Intel's libiomp5. */
typedef void (*team_fn)(void (*)(void *), void *, unsigned, unsigned);
static team_fn team_parallel;

typedef struct {
    const Batch *batch;
    Py_ssize_t tensors;
    int64_t *counter;
} Shared;

static void shared_entry(void *data) {
    const Shared *s = data;
    combine_shared(s->batch, s->tensors, s->counter);
}
#endif
#endif

PyDoc_STRVAR(combine_many_doc,
             "combine_many(out_code, outs, ns, codes, inputs, coefficients, divisor, counter=None,\n"
             "             team=0)\n\n"
             "combine() over many small tensors in one call: for each j, outs[j] (ns[j] elements)\n"
             "= (sum_i coefficients[i] * inputs[i][j]) / divisor. Every output has out_code,\n"
             "every inputs[i][j] has codes[i]; inputs is one sequence of addresses per input.\n"
             "Runs without the GIL, each tensor exactly as combine() would. With counter (the\n"
             "address of an int64 holding 0), every thread that calls it with the same arguments\n"
             "shares the work: pieces claimed in order, one atomic add each. With team > 1\n"
             "(after join_team()), that many threads of the OpenMP team share it in one call.");

/* Reads a sequence of n addresses (or lengths) into a fresh array; NULL with an error set. */
static unsigned long long *read_integers(PyObject *sequence, Py_ssize_t n, const char *what) {
    PyObject *fast = PySequence_Fast(sequence, what);
    if (!fast) return NULL;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd entries, got %zd", what, n,
                     PySequence_Fast_GET_SIZE(fast));
        Py_DECREF(fast);
        return NULL;
    }
    unsigned long long *values = PyMem_Malloc((size_t)(n ? n : 1) * sizeof *values);
    if (!values) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t j = 0; j < n; j++) values[j] = PyLong_AsUnsignedLongLong(items[j]);
    Py_DECREF(fast);
    if (PyErr_Occurred()) {
        PyMem_Free(values);
        return NULL;
    }
    return values;
}

static PyObject *py_combine_many(PyObject *self, PyObject *args) {
    (void)self;
    int out_code;
    PyObject *outs_obj, *ns_obj, *codes_obj, *inputs_obj, *coefs_obj, *divisor_obj;
    PyObject *counter_obj = Py_None;
    int team = 0;
    if (!PyArg_ParseTuple(args, "iOOOOOO|Oi", &out_code, &outs_obj, &ns_obj, &codes_obj,
                          &inputs_obj, &coefs_obj, &divisor_obj, &counter_obj, &team)) {
        return NULL;
    }
#ifdef HAVE_TEAM
    if (team > 1 && (!team_parallel || counter_obj == Py_None)) {
#else
    if (team > 1) {
#endif
        PyErr_SetString(PyExc_ValueError, "a team needs join_team() first, and a counter");
        return NULL;
    }
    int64_t *counter = NULL;
    if (counter_obj != Py_None) {
#ifdef HAVE_SHARED_WORK
        counter = (int64_t *)(uintptr_t)PyLong_AsUnsignedLongLong(counter_obj);
        if (PyErr_Occurred()) return NULL;
#else
        PyErr_SetString(PyExc_ValueError, "shared work needs GCC or clang atomics");
        return NULL;
#endif
    }
    if (!check_code(out_code)) return NULL;
    PyObject *result = NULL;
    unsigned long long *outs = NULL, *ns = NULL, *inputs[MAX_INPUTS] = {NULL};
    PyObject *codes = PySequence_Fast(codes_obj, "codes must be a sequence");
    PyObject *coefs = codes ? PySequence_Fast(coefs_obj, "coefficients must be a sequence") : NULL;
    PyObject *per_input = coefs ? PySequence_Fast(inputs_obj, "inputs must be a sequence") : NULL;
    if (!per_input) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(codes);
    if (count < 1 || count > MAX_INPUTS || PySequence_Fast_GET_SIZE(coefs) != count ||
        PySequence_Fast_GET_SIZE(per_input) != count) {
        PyErr_SetString(PyExc_ValueError, "inputs, codes and coefficients must have the same "
                                          "length, between 1 and 64");
        goto done;
    }
    int input_codes[MAX_INPUTS];
    double coefficients[MAX_INPUTS];
    for (Py_ssize_t i = 0; i < count; i++) {
        input_codes[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(codes, i));
        coefficients[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(coefs, i));
        if (PyErr_Occurred() || !check_code(input_codes[i])) goto done;
    }
    double divisor = divisor_obj == Py_None ? 1.0 : PyFloat_AsDouble(divisor_obj);
    if (PyErr_Occurred()) goto done;
    Py_ssize_t tensors = PySequence_Length(outs_obj);
    if (tensors < 0) goto done;
    outs = read_integers(outs_obj, tensors, "outs must be a sequence of addresses");
    ns = outs ? read_integers(ns_obj, tensors, "ns must be a sequence of lengths") : NULL;
    if (!ns) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        inputs[i] = read_integers(PySequence_Fast_GET_ITEM(per_input, i), tensors,
                                  "inputs[i] must be a sequence of addresses");
        if (!inputs[i]) goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    Batch batch = {outs, ns, inputs, input_codes, coefficients, divisor, out_code, (int)count};
    if (counter && team > 1) {
#ifdef HAVE_TEAM
        Shared shared = {&batch, tensors, counter};
        team_parallel(shared_entry, &shared, (unsigned)team, 0);
#endif
    } else if (counter) {
        combine_shared(&batch, tensors, counter);
    } else {
        combine_range(&batch, 0, tensors, 0, 0);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (Py_ssize_t i = 0; i < MAX_INPUTS; i++) PyMem_Free(inputs[i]);
    PyMem_Free(outs);
    PyMem_Free(ns);
    Py_XDECREF(codes);
    Py_XDECREF(coefs);
    Py_XDECREF(per_input);
    return result;
}

PyDoc_STRVAR(join_team_doc,
             "join_team(path) -> bool\n\n"
             "Use the OpenMP runtime already loaded from path (torch's libgomp) for\n"
             "combine_many(..., counter, team): True when its GOMP_parallel was found. Never\n"
             "loads a library that is not loaded already.");

static PyObject *py_join_team(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
#ifdef HAVE_TEAM
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (!handle) Py_RETURN_FALSE;
    team_fn found = (team_fn)dlsym(handle, "GOMP_parallel");
    if (found) team_parallel = found;
    return PyBool_FromLong(found != NULL);
#else
    (void)path;
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"combine", py_combine, METH_VARARGS, combine_doc},
    {"combine_many", py_combine_many, METH_VARARGS, combine_many_doc},
    {"join_team", py_join_team, METH_VARARGS, join_team_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastloop",
    "terge's fused CPU loop for linear merges (see kernels.py for the reference path).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__fastloop(void) {
    PyObject *m = PyModule_Create(&module);
#ifdef HAVE_SHARED_WORK
    if (m && (PyModule_AddIntConstant(m, "SHARED_WORK", 1) < 0 ||
              PyModule_AddIntConstant(m, "PIECE", PIECE) < 0 ||
              PyModule_AddIntConstant(m, "AHEAD", AHEAD) < 0 ||
              PyModule_AddIntConstant(m, "HINTED", HINTED) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    return m;
}
