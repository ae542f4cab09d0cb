/* ---- int8 support (microser/cgen/templates/int8_support.c): dual 16-bit MAC primitives and requantization ----

   MICROSER_SIMD selects the dual-MAC kernels: 1 on a core with the DSP extension (__ARM_FEATURE_DSP: Cortex-M4/M7/
   M33 with DSP), where SXTB16 widens two int8 lanes to int16 and SMLAD does two 16x16 MACs into one int32; 1 also with
   -DMICROSER_DSP_EMULATE, which runs the same kernels on any host with the intrinsics written in C (how the tests
   check the DSP path equal to the portable one); 0 otherwise, or with -DMICROSER_NO_DSP, for the portable loops
   (which GCC/Clang auto-vectorize on hosts with SIMD). Both paths compute the same int32 sums: bit-identical output.
   Little-endian targets only (two int16 column values are read as one 32-bit word). */
#if defined(__ARM_FEATURE_DSP) && !defined(MICROSER_NO_DSP) && !defined(MICROSER_DSP_EMULATE)
#include <arm_acle.h>
#define MICROSER_SIMD 1
#define SXTB16(x) __sxtb16(x)
#define SMLAD(a, b, acc) __smlad((a), (b), (acc))
#if defined(__GNUC__) /* SXTB16 with its rotation operand: one instruction (arm_acle.h has no rotated form) */
static int32_t sxtb16_ror8(int32_t x)
{
    int32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(x));
    return r;
}
#define SXTB16_ROR8(x) sxtb16_ror8(x)
#else
#define SXTB16_ROR8(x) __sxtb16((int32_t)(((uint32_t)(x) >> 8) | ((uint32_t)(x) << 24)))
#endif
#elif defined(MICROSER_DSP_EMULATE) && !defined(MICROSER_NO_DSP)
#define MICROSER_SIMD 1
/* SXTB16: sign-extend bytes 0 and 2 of x into the low and high halfwords */
static int32_t sxtb16_c(uint32_t x)
{
    const uint32_t lo = (uint32_t)(uint16_t)(int16_t)(int8_t)(x & 0xffu);
    const uint32_t hi = (uint32_t)(uint16_t)(int16_t)(int8_t)((x >> 16) & 0xffu);
    return (int32_t)(lo | (hi << 16));
}
/* SMLAD: acc + lo(a) * lo(b) + hi(a) * hi(b), halfwords signed */
static int32_t smlad_c(int32_t a, int32_t b, int32_t acc)
{
    const int32_t alo = (int16_t)((uint32_t)a & 0xffffu), ahi = (int16_t)((uint32_t)a >> 16);
    const int32_t blo = (int16_t)((uint32_t)b & 0xffffu), bhi = (int16_t)((uint32_t)b >> 16);
    return acc + alo * blo + ahi * bhi;
}
#define SXTB16(x) sxtb16_c((uint32_t)(x))
#define SXTB16_ROR8(x) sxtb16_c(((uint32_t)(x) >> 8) | ((uint32_t)(x) << 24))
#define SMLAD(a, b, acc) smlad_c((a), (b), (acc))
#else
#define MICROSER_SIMD 0
#endif

/* Requantize an int32 accumulator to int8: round(acc * mult / 2^(32 + t)) to nearest, ties to even (onnxruntime's
   rounding), plus the output zero point, clamped to [-128, 127]. ``mult`` (2^30 <= mult < 2^31) and ``t`` hold the
   float32 scale x_scale * w_scale / y_scale exactly (its 24-bit mantissa in a 31-bit multiplier), so the only
   difference from onnxruntime's float(acc) * scale is that float32 product's own rounding (see
   microser/cgen/fixedpoint.py). No float; 32-bit operations on the high word of one 32x32->64 multiply (SMULL):
   the high word plus half a step, shifted by t (1 <= t <= 30, scales below 2^-2), then a tie (remainder exactly
   half: low word 0, low t bits of the high word 2^(t-1)) is rounded to the even neighbour. Assumes arithmetic right
   shifts (GCC, Clang, Arm Compiler). */
static int8_t requant(int32_t acc, int32_t mult, int t, int zp)
{
    const int64_t p = (int64_t)acc * mult;
    const int32_t hi = (int32_t)(p >> 32);
    const uint32_t lo = (uint32_t)((uint64_t)p & 0xFFFFFFFFu);
    const uint32_t half = 1u << (t - 1);
    int32_t q = (hi + (int32_t)half) >> t;
    if (lo == 0u && ((uint32_t)hi & (2u * half - 1u)) == half) q &= ~1;
    q += zp;
    return (int8_t)(q < -128 ? -128 : (q > 127 ? 127 : q));
}
