/* The same rounding for any shift 1 <= shift <= 62 (a stage with a scale of 2^-2 or more): 64-bit arithmetic. */
static int8_t requant_wide(int32_t acc, int32_t mult, int shift, int zp)
{
    const int64_t p = (int64_t)acc * mult;
    const int64_t half = (int64_t)1 << (shift - 1);
    int64_t q = p >> shift; /* floor */
    const int64_t rem = (int64_t)((uint64_t)p & (((uint64_t)1 << shift) - 1u)); /* p - q * 2^shift, >= 0 */
    q += (rem > half || (rem == half && (q & 1))) ? 1 : 0;
    q += zp;
    return (int8_t)(q < -128 ? -128 : (q > 127 ? 127 : q));
}
