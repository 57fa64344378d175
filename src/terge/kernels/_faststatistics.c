/* terge._faststatistics: SLERP's and Model Stock's float64 dot products on the CPU, straight from
 * the inputs as stored (no float64 copies), in one read of every input.
 *
 * The order of the sums is terge's definition (terge.kernels.statistics), which the plain-torch
 * reference there computes with the same IEEE operations, so both give the same bits:
 *
 *     x_i = t_i - b                   (both widened to float64, exactly; then one rounding;
 *                                      x_i = t_i without a base)
 *     the tensor in chunks of CHUNK = 32768 entries, the last padded with x = +0;
 *     a chunk as ROWS = 1024 rows of LANES = 32 lanes (entry r * 32 + l);
 *     p[r][l] = x_i[r][l] * x_j[r][l]            (rounded: never an FMA)
 *     the rows folded pairwise, neighbours first: p[r] = p[2r] + p[2r + 1], 10 times;
 *     then the lanes the same way: v[l] = v[2l] + v[2l + 1], 5 times: the chunk's sum;
 *     the chunks' sums added in chunk order, from +0 (total()).
 *
 * Here a leaf of 8 rows is folded directly and the leaves are combined by a binary counter (a
 * stack of partial sums, left + right), which is the same tree. chunks() computes the sums of a
 * range of chunks, so threads can share a tensor's chunks; everything runs without the GIL.
 *
 * Compile with -ffp-contract=off: a fused multiply-add rounds once where the reference rounds
 * twice. The hot loop is compiled for AVX-512, AVX2 and the baseline and chosen when the module
 * loads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_convert.h"
#include "_loops.h"

#define CHUNK 32768
#define LANES 32
#define LEAF_ROWS 8
#define LEAF (LANES * LEAF_ROWS) /* entries */
#define LEAVES (CHUNK / LEAF)    /* 128 */
#define LEVELS 8                 /* log2(LEAVES) + 1 */
#define AHEAD 4 /* leaves */
#define MAX_INPUTS 64
#define MAX_PAIRS 4096




/* m (<= LEAF) entries of an input widened to float64 into out, +0 after them up to LEAF. */
static inline void widen_leaf(double *out, const char *p, int code, Py_ssize_t m) {
    switch (code) {
    case F64: memcpy(out, p, (size_t)m * sizeof(double)); break;
    case F32:
        for (Py_ssize_t k = 0; k < m; k++) out[k] = ((const float *)p)[k];
        break;
    case BF16:
        for (Py_ssize_t k = 0; k < m; k++) out[k] = bf16_to_float(((const uint16_t *)p)[k]);
        break;
    default:
        for (Py_ssize_t k = 0; k < m; k++) out[k] = f16_to_float(((const uint16_t *)p)[k]);
        break;
    }
    for (Py_ssize_t k = m; k < LEAF; k++) out[k] = 0.0;
}

/* One leaf's 8 rows of products folded pairwise, neighbours first, per lane. */
static inline void leaf(double *out, const double *a, const double *b) {
    for (int l = 0; l < LANES; l++) {
        const double p0 = a[0 * LANES + l] * b[0 * LANES + l];
        const double p1 = a[1 * LANES + l] * b[1 * LANES + l];
        const double p2 = a[2 * LANES + l] * b[2 * LANES + l];
        const double p3 = a[3 * LANES + l] * b[3 * LANES + l];
        const double p4 = a[4 * LANES + l] * b[4 * LANES + l];
        const double p5 = a[5 * LANES + l] * b[5 * LANES + l];
        const double p6 = a[6 * LANES + l] * b[6 * LANES + l];
        const double p7 = a[7 * LANES + l] * b[7 * LANES + l];
        out[l] = ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7));
    }
}

/* The sums of chunks [first, last) of n entries into out[(k - first) * npairs + q]. scratch holds
 * (inputs + 1) * LEAF + (LEVELS + 1) * npairs * LANES doubles. */
CLONED static void chunks(const char *base, int base_code, Py_ssize_t n, Py_ssize_t first,
                          Py_ssize_t last, char *const *inputs, const int *codes, int count,
                          const int *left, const int *right, int npairs, double *out,
                          double *scratch) {
    double *x = scratch;                         /* count rows of LEAF */
    double *b = x + (size_t)count * LEAF;        /* the base's leaf */
    double *stack = b + LEAF;                    /* LEVELS * npairs * LANES */
    double *carry = stack + (size_t)LEVELS * npairs * LANES; /* npairs * LANES */
    for (Py_ssize_t k = first; k < last; k++) {
        for (int j = 0; j < LEAVES; j++) {
            const Py_ssize_t start = k * CHUNK + (Py_ssize_t)j * LEAF;
            const Py_ssize_t m = start >= n ? 0 : (n - start < LEAF ? n - start : LEAF);
            if (m == 0) { /* past the end: products of the padding, +0 */
                for (Py_ssize_t e = 0; e < (Py_ssize_t)npairs * LANES; e++) carry[e] = 0.0;
            } else {
                const Py_ssize_t ahead = start + AHEAD * LEAF;
                if (ahead + LEAF <= n) {
                    if (base) prefetch(base + ahead * ITEMSIZE[base_code], base_code, LEAF);
                    for (int i = 0; i < count; i++)
                        prefetch(inputs[i] + ahead * ITEMSIZE[codes[i]], codes[i], LEAF);
                }
                if (base) widen_leaf(b, base + start * ITEMSIZE[base_code], base_code, m);
                for (int i = 0; i < count; i++) {
                    double *xi = x + (size_t)i * LEAF;
                    widen_leaf(xi, inputs[i] + start * ITEMSIZE[codes[i]], codes[i], m);
                    if (base)
                        for (int e = 0; e < LEAF; e++) xi[e] = xi[e] - b[e];
                }
                for (int q = 0; q < npairs; q++) {
                    leaf(carry + (size_t)q * LANES, x + (size_t)left[q] * LEAF,
                         x + (size_t)right[q] * LEAF);
                }
            }
            /* the binary counter: the left subtree (on the stack) plus the right (carry) */
            int level = 0;
            for (int bits = j; bits & 1; bits >>= 1, level++) {
                const double *held = stack + (size_t)level * npairs * LANES;
                for (Py_ssize_t e = 0; e < (Py_ssize_t)npairs * LANES; e++)
                    carry[e] = held[e] + carry[e];
            }
            memcpy(stack + (size_t)level * npairs * LANES, carry,
                   (size_t)npairs * LANES * sizeof(double));
        }
        const double *rows = stack + (size_t)(LEVELS - 1) * npairs * LANES;
        for (int q = 0; q < npairs; q++) {
            double v[LANES];
            memcpy(v, rows + (size_t)q * LANES, sizeof v);
            for (int width = LANES / 2; width >= 1; width /= 2)
                for (int l = 0; l < width; l++) v[l] = v[2 * l] + v[2 * l + 1];
            out[(size_t)(k - first) * npairs + q] = v[0];
        }
    }
}

static int check_code(int code) {
    if (code < F64 || code > F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", code);
        return 0;
    }
    return 1;
}

/* count addresses and their dtype codes from two sequences of equal length. */
static int parse_inputs(PyObject *inputs_obj, PyObject *codes_obj, char **inputs, int *codes,
                        int *count) {
    PyObject *a = PySequence_Fast(inputs_obj, "inputs must be a sequence");
    PyObject *c = a ? PySequence_Fast(codes_obj, "codes must be a sequence") : NULL;
    int ok = a && c;
    Py_ssize_t m = ok ? PySequence_Fast_GET_SIZE(a) : 0;
    if (ok && (m < 1 || m > MAX_INPUTS || PySequence_Fast_GET_SIZE(c) != m)) {
        PyErr_SetString(PyExc_ValueError, "between 1 and 64 inputs, one code each");
        ok = 0;
    }
    for (Py_ssize_t i = 0; ok && i < m; i++) {
        inputs[i] = (char *)(uintptr_t)PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(a, i));
        codes[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(c, i));
        ok = !PyErr_Occurred() && check_code(codes[i]);
    }
    *count = (int)m;
    Py_XDECREF(a);
    Py_XDECREF(c);
    return ok;
}

PyDoc_STRVAR(chunks_doc,
             "chunks(base, base_code, n, first, last, inputs, codes, pairs, out)\n\n"
             "out[(k - first) * len(pairs) + q] = the sum of chunk k (first <= k < last) of the\n"
             "products of x_i and x_j for the q-th pair (i, j), x_i the i-th input (addresses,\n"
             "dtype codes) of n entries minus the base (address 0: none), in terge's order.");

static PyObject *py_chunks(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long base, out;
    int base_code, count;
    Py_ssize_t n, first, last;
    PyObject *inputs_obj, *codes_obj, *pairs_obj;
    if (!PyArg_ParseTuple(args, "KinnnOOOK", &base, &base_code, &n, &first, &last, &inputs_obj,
                          &codes_obj, &pairs_obj, &out)) {
        return NULL;
    }
    char *inputs[MAX_INPUTS];
    int codes[MAX_INPUTS];
    if ((base && !check_code(base_code)) ||
        !parse_inputs(inputs_obj, codes_obj, inputs, codes, &count)) {
        return NULL;
    }
    if (n < 0 || first < 0 || last < first || last > (n + CHUNK - 1) / CHUNK) {
        PyErr_SetString(PyExc_ValueError, "chunks out of range");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(pairs_obj, "pairs must be a sequence");
    if (!seq) return NULL;
    const Py_ssize_t npairs = PySequence_Fast_GET_SIZE(seq);
    int *left = NULL, *right = NULL;
    double *scratch = NULL;
    PyObject *result = NULL;
    if (npairs < 1 || npairs > MAX_PAIRS) {
        PyErr_SetString(PyExc_ValueError, "between 1 and 4096 pairs");
        goto done;
    }
    left = PyMem_Malloc(2 * (size_t)npairs * sizeof(int));
    if (!left) {
        PyErr_NoMemory();
        goto done;
    }
    right = left + npairs;
    for (Py_ssize_t q = 0; q < npairs; q++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, q), "ii;a pair", &left[q], &right[q]))
            goto done;
        if (left[q] < 0 || left[q] >= count || right[q] < 0 || right[q] >= count) {
            PyErr_SetString(PyExc_ValueError, "a pair names an input out of range");
            goto done;
        }
    }
    const size_t doubles = (size_t)(count + 1) * LEAF + (size_t)(LEVELS + 1) * npairs * LANES;
    scratch = PyMem_RawMalloc(doubles * sizeof(double));
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    chunks((const char *)(uintptr_t)base, base_code, n, first, last, inputs, codes, count, left,
           right, (int)npairs, (double *)(uintptr_t)out, scratch);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(scratch);
    PyMem_Free(left);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(total_doc,
             "total(sums, count, npairs) -> [float, ...]\n\n"
             "Each pair's chunk sums (sums: count rows of npairs float64) added in chunk order,\n"
             "from +0.");

static PyObject *py_total(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    Py_ssize_t count, npairs;
    if (!PyArg_ParseTuple(args, "Knn", &address, &count, &npairs)) return NULL;
    if (count < 0 || npairs < 1 || npairs > MAX_PAIRS) {
        PyErr_SetString(PyExc_ValueError, "a count >= 0 and between 1 and 4096 pairs");
        return NULL;
    }
    const double *sums = (const double *)(uintptr_t)address;
    double totals[MAX_PAIRS];
    for (Py_ssize_t q = 0; q < npairs; q++) totals[q] = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < count; k++)
        for (Py_ssize_t q = 0; q < npairs; q++) totals[q] = totals[q] + sums[k * npairs + q];
    Py_END_ALLOW_THREADS
    PyObject *result = PyList_New(npairs);
    for (Py_ssize_t q = 0; result && q < npairs; q++) {
        PyObject *value = PyFloat_FromDouble(totals[q]);
        if (!value) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, q, value);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"chunks", py_chunks, METH_VARARGS, chunks_doc},
    {"total", py_total, METH_VARARGS, total_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_faststatistics",
    "terge's CPU loop for SLERP's and Model Stock's dot products (see kernels/statistics.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__faststatistics(void) { return PyModule_Create(&module); }
