/* What terge's compiled loops share (_fastmethods.c, _fastrank.c, _faststatistics.c): item sizes,
 * the per-instruction-set clones, and the element-wise helpers that must be the same in every
 * loop for the loops to agree with each other and with the torch references bit for bit.
 * Include after Python.h (Py_ssize_t) and _convert.h (the dtype codes and conversions).
 */
#ifndef TERGE_LOOPS_H
#define TERGE_LOOPS_H

#include <stdint.h>
#include <string.h>

#define TOP (UINT64_C(1) << 63) /* above every magnitude's bit pattern */
#define INF UINT64_C(0x7FF0000000000000)
#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)
#define MIX1 UINT64_C(0xBF58476D1CE4E5B9)
#define MIX2 UINT64_C(0x94D049BB133111EB)

static const size_t ITEMSIZE[] = {8, 4, 2, 2};

/* The loops with an AVX-512 path picked at run time (-DTERGE_NO_AVX512 builds without it):
 * have_avx512 is set by detect_avx512() when the module loads. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(TERGE_NO_AVX512)
#include <immintrin.h>
#define HAVE_AVX512 1
static int have_avx512;
static inline void detect_avx512(void) {
    __builtin_cpu_init();
    have_avx512 = __builtin_cpu_supports("avx512f");
}
#endif

#if defined(_MSC_VER)
#define RESTRICT __restrict
#define ALWAYS_INLINE __forceinline
#else
#define RESTRICT restrict
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

/* The hot loops are compiled once per instruction set (AVX-512, AVX2, baseline) and picked at
 * load time, where the compiler can: wider vectors, the same IEEE operations. */
#ifndef CLONED
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__) && !defined(__clang__) &&     \
    __GNUC__ >= 12
#define CLONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONED
#endif
#endif

/* --- element-wise helpers ---------------------------------------------------------------------- */

/* |t|'s bit pattern (the sign bit cleared: -0 as +0), every NaN as INF + 1: as
 * primitives.magnitude_bits, for which a NaN's payload does not count. */
static inline uint64_t magnitude(double t) {
    uint64_t u;
    memcpy(&u, &t, sizeof u);
    u &= ~TOP;
    return u < INF + 1 ? u : INF + 1;
}

/* v where keep is 1, +0 where it is 0. */
static inline double masked(double v, uint64_t keep) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    u &= -keep;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* a where pick is 1, b where it is 0. */
static inline double choose(uint64_t pick, double a, double b) {
    uint64_t u, v;
    memcpy(&u, &a, sizeof u);
    memcpy(&v, &b, sizeof v);
    u = (u & -pick) | (v & (pick - 1));
    memcpy(&a, &u, sizeof a);
    return a;
}

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    return z ^ (z >> 31);
}

/* Ask for the cache lines of m elements ahead of their use (the loops read several streams a
 * block at a time, which the hardware prefetchers follow poorly). */
static inline void prefetch(const char *p, int code, Py_ssize_t m) {
#if defined(__GNUC__)
    const Py_ssize_t bytes = m * (Py_ssize_t)ITEMSIZE[code];
    for (Py_ssize_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
#else
    (void)p, (void)code, (void)m;
#endif
}

/* m elements of an input widened to float64: the input itself when it is float64. */
static inline const double *widen(double *buffer, const char *p, int code, Py_ssize_t m) {
    switch (code) {
    case F64: return (const double *)p;
    case F32:
        for (Py_ssize_t k = 0; k < m; k++) buffer[k] = ((const float *)p)[k];
        break;
    case BF16:
        for (Py_ssize_t k = 0; k < m; k++) buffer[k] = bf16_to_float(((const uint16_t *)p)[k]);
        break;
    default:
        for (Py_ssize_t k = 0; k < m; k++) buffer[k] = f16_to_float(((const uint16_t *)p)[k]);
        break;
    }
    return buffer;
}

/* m float64 values rounded once into out's dtype (bfloat16/float16 through float32 to odd). */
static inline void narrow(char *out, int code, const double *r, Py_ssize_t m) {
    switch (code) {
    case F64:
        for (Py_ssize_t k = 0; k < m; k++) ((double *)out)[k] = r[k];
        break;
    case F32:
        for (Py_ssize_t k = 0; k < m; k++) ((float *)out)[k] = (float)r[k];
        break;
    case BF16:
        for (Py_ssize_t k = 0; k < m; k++)
            ((uint16_t *)out)[k] = float_to_bf16(round_to_odd(r[k]));
        break;
    default:
        for (Py_ssize_t k = 0; k < m; k++) ((uint16_t *)out)[k] = float_to_f16(round_to_odd(r[k]));
        break;
    }
}

/* 1 if d agrees with the elected sign (e >= 0: positive), else 0; every comparison evaluated,
 * no branches, so that the loops vectorise.
 *
 * Where d disagrees, the reference adds (0 * w) to the numerator and the denominator: +0 or -0.
 * The loops add +0 instead (masked(d * w, a), masked(w, a): one product fewer), which is the same:
 * both sums start at +0 and never become -0 (in round-to-nearest, x + y is -0 only when x and y
 * both are), and adding +-0 to anything else leaves it unchanged. */
static inline uint64_t agrees(double e, double d) {
    uint64_t u; /* positive (e >= 0) ? d > 0 : d < 0, as (positive ? d : -d) > 0 */
    memcpy(&u, &d, sizeof u);
    u ^= (uint64_t)!(e >= 0) << 63;
    memcpy(&d, &u, sizeof d);
    return d > 0;
}

#endif
