/* 2x2 int8 x int16 matrix kernel over ${kp} taps: two output channels (weight rows w, w + ${kp}) times two im2col
   columns (c, c + ${kp}), added to the four int32 accumulators a = {w.c, w.c', w'.c, w'.c'}. With MICROSER_SIMD the
   weights are stored in groups of four taps as (k, k+2, k+1, k+3), so SXTB16 of a weight word yields (w_k, w_k+1)
   and SXTB16 of it rotated by 8 yields (w_k+2, w_k+3), each paired with one word of two int16 column values:
   per 16 MACs, 2 weight and 4 column loads, 4 SXTB16 and 8 SMLAD (as CMSIS-NN's arm_nn_mat_mult_kernel_s8_s16). */
static void mm${kp}(const int8_t *w, const int16_t *c, int32_t a[4])
{
    int32_t s00 = a[0], s01 = a[1], s10 = a[2], s11 = a[3];
#if MICROSER_SIMD
    const int8_t *const end = w + ${kp};
    for (; w < end; w += 4, c += 4) {
        int32_t wa, wb, x, y;
        memcpy(&wa, w, 4);
        memcpy(&wb, w + ${kp}, 4);
        {
            const int32_t a01 = SXTB16(wa), b01 = SXTB16(wb);
            memcpy(&x, c, 4);
            memcpy(&y, c + ${kp}, 4);
            s00 = SMLAD(a01, x, s00);
            s01 = SMLAD(a01, y, s01);
            s10 = SMLAD(b01, x, s10);
            s11 = SMLAD(b01, y, s11);
        }
        {
            const int32_t a23 = SXTB16_ROR8(wa), b23 = SXTB16_ROR8(wb);
            memcpy(&x, c + 2, 4);
            memcpy(&y, c + ${kp} + 2, 4);
            s00 = SMLAD(a23, x, s00);
            s01 = SMLAD(a23, y, s01);
            s10 = SMLAD(b23, x, s10);
            s11 = SMLAD(b23, y, s11);
        }
    }
#else
    int q;
    for (q = 0; q < ${kp}; q++) {
        const int16_t u = w[q], v = w[${kp} + q];
        s00 += u * c[q];
        s01 += u * c[${kp} + q];
        s10 += v * c[q];
        s11 += v * c[${kp} + q];
    }
#endif
    a[0] = s00;
    a[1] = s01;
    a[2] = s10;
    a[3] = s11;
}
