/* terge's dtype conversions for the compiled loops (_fastloop.c, _fastmethods.c): every one
 * bit-exact with c10's, so the loops store what torch's own conversions would.
 */
#ifndef TERGE_CONVERT_H
#define TERGE_CONVERT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { F64 = 0, F32 = 1, BF16 = 2, F16 = 3 };

/* --- half-precision conversions (bit-exact with c10's) ---------------------------------------- */

static inline float bits_to_float(uint32_t w) {
    float f;
    memcpy(&f, &w, sizeof f);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, sizeof w);
    return w;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
    /* c10::detail::round_to_nearest_even, NaN as 0x7FC0: written with a mask, not a branch, so
     * the loops storing bfloat16 vectorise (with the branch every bfloat16 store was scalar, and
     * a bfloat16 merge 8x slower than a float32 one). */
    const uint32_t u = float_to_bits(f);
    const uint32_t rounding_bias = ((u >> 16) & 1) + UINT32_C(0x7FFF);
    const uint32_t nan = (uint32_t)0 - (uint32_t)(f != f);
    return (uint16_t)((((u + rounding_bias) >> 16) & ~nan) | (UINT32_C(0x7FC0) & nan));
}

static inline float f16_to_float(uint16_t h) {
    /* c10::detail::fp16_ieee_to_fp32_value */
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = UINT32_C(0xE0) << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized_value = bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = UINT32_C(126) << 23;
    const float magic_bias = 0.5f;
    const float denormalized_value = bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
    const uint32_t small = (uint32_t)0 - (uint32_t)(two_w < denormalized_cutoff); /* a mask */
    const uint32_t result = sign | (float_to_bits(denormalized_value) & small) |
                            (float_to_bits(normalized_value) & ~small);
    return bits_to_float(result);
}

static inline uint16_t float_to_f16(float f) {
    /* c10::detail::fp16_ieee_from_fp32_value */
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    /* the branches of c10's code as masks, so that the loops storing float16 vectorise */
    const uint32_t high = shl1_w & UINT32_C(0xFF000000);
    const uint32_t low = (uint32_t)0 - (uint32_t)(high < UINT32_C(0x71000000));
    const uint32_t bias = (UINT32_C(0x71000000) & low) | (high & ~low);
    base = bits_to_float((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign = exp_bits + mantissa_bits;
    const uint32_t nan = (uint32_t)0 - (uint32_t)(shl1_w > UINT32_C(0xFF000000));
    return (uint16_t)((sign >> 16) | (UINT32_C(0x7E00) & nan) | (nonsign & ~nan));
}

/* float64 -> float32 rounded to odd: exact values stay, inexact ones get an odd last bit. That is
 * the value truncated toward zero with its last bit set: one ulp less in magnitude when rounding
 * to nearest went away from zero (the float's bits are sign and magnitude), then the bit set.
 * Without branches, so the loops vectorise; NaN passes through unchanged. */
static inline float round_to_odd(double v) {
    const float r = (float)v;
    const double back = (double)r;
    const uint32_t u = float_to_bits(r);
    const uint32_t inexact = (uint32_t)0 - ((uint32_t)(back != v) & (uint32_t)(v == v));
    const uint32_t away = (uint32_t)(fabs(back) > fabs(v));
    return bits_to_float((((u - away) | 1u) & inexact) | (u & ~inexact));
}

#endif
