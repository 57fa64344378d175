/* The argument parsing shared by the compiled loops' entry points that take one value per model
 * (_fastrank.c, _fastpcb.c): dtype codes checked, sequences of 1 to MAX_MODELS values read.
 * Include after Python.h and _convert.h (the dtype codes), with MAX_MODELS defined.
 */
#ifndef TERGE_ARGS_H
#define TERGE_ARGS_H

#include <stdint.h>

static int check_code(int code) {
    if (code < F64 || code > F16) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", code);
        return 0;
    }
    return 1;
}

/* count values of a sequence, each read by read() (1 on success). */
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
    ((char **)into)[i] = (char *)(uintptr_t)PyLong_AsUnsignedLongLong(item);
    return 1;
}

static int read_code(PyObject *item, int i, void *into) {
    ((int *)into)[i] = (int)PyLong_AsLong(item);
    return PyErr_Occurred() ? 0 : check_code(((int *)into)[i]);
}

static int read_u64(PyObject *item, int i, void *into) {
    ((uint64_t *)into)[i] = PyLong_AsUnsignedLongLong(item);
    return 1;
}

static int read_double(PyObject *item, int i, void *into) {
    ((double *)into)[i] = PyFloat_AsDouble(item);
    return 1;
}

#endif
