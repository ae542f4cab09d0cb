#if MICROSER_SIMD /* taps padded to ${dsp}; groups of 4 as (k, k+2, k+1, k+3) for SXTB16 */
#define KP${i} ${dsp}
#define MM${i} mm${dsp}
${weights_dsp}#else /* taps padded to ${portable} */
#define KP${i} ${portable}
#define MM${i} mm${portable}
${weights_portable}#endif
