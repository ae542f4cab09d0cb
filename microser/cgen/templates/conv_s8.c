/* stage ${i}: int8 conv of block ${block}, ${cin}x${fin} -> ${cout}x${fout} per row, kernel ${k}, stride ${s}, pad ${p}.
   Two output positions at a time: their im2col columns (${kk} taps in weight order (ci, dt, df), zeros up to KP${i},
   the kernel's step; int16 with the input zero point ${xzp} removed, so "same" padding is 0), then MM${i} per pair
   of output channels; int32 accumulators start at the int32 bias; requant() per output. */
static void s${i}_im2col(const int8_t *ring, int16_t *col, int32_t r0, int dt_lo, int dt_hi, int f0)
{
    const int df_lo = f0 < 0 ? -f0 : 0, df_hi = f0 + ${k} > ${fin} ? ${fin} - f0 : ${k};
    int dt, ci, df;
    for (dt = 0; dt < ${k}; dt++) {
        int16_t *c = col + dt * ${k};
        if (dt < dt_lo || dt >= dt_hi) { /* a row of time padding */
            for (ci = 0; ci < ${cin}; ci++, c += ${kk_ci})
                for (df = 0; df < ${k}; df++) c[df] = 0;
            continue;
        }
        {
            const int8_t *x = ring + ((r0 + dt) % ${k}) * ${row};
            int base = f0;
            if (df_lo == 0 && df_hi == ${k}) { /* interior band: the ${k} taps unrolled */
                for (ci = 0; ci < ${cin}; ci++, c += ${kk_ci}, base += ${fin}) {
${unrolled}
                }
            } else {
                for (ci = 0; ci < ${cin}; ci++, c += ${kk_ci}, base += ${fin})
                    for (df = 0; df < ${k}; df++)
                        c[df] = (int16_t)((df >= df_lo && df < df_hi) ? x[base + df] - (${xzp}) : 0);
            }
        }
    }
}

static void s${i}_row(${P}_state *st, int32_t j)
{
    const int32_t n = st->n${i}, r0 = j * ${s} - ${p};
    const int dt_lo = r0 < 0 ? (int)-r0 : 0;
    const int dt_hi = r0 + ${k} > n ? (int)(n - r0) : ${k};
    int16_t *c0 = st->arena.h, *c1 = c0 + KP${i};
    int8_t *dst = ${dst};
    int fo, co, q;
    for (q = ${kk}; q < KP${i}; q++) {
        c0[q] = 0;
        c1[q] = 0;
    }
    for (fo = 0; fo < ${fout}; fo += 2) { /* an odd last position pairs with a column of padding (discarded) */
        s${i}_im2col(st->ring${i}, c0, r0, dt_lo, dt_hi, fo * ${s} - ${p});
        s${i}_im2col(st->ring${i}, c1, r0, dt_lo, dt_hi, (fo + 1) * ${s} - ${p});
        for (co = 0; co < ${cout}; co += 2) { /* an odd last channel pairs with a zero weight row (discarded) */
            int32_t a[4];
            a[0] = a[1] = B${i}[co];
            a[2] = a[3] = B${i}[co + 1];
            MM${i}(W${i} + co * KP${i}, c0, a);
            dst[co * ${fout} + fo] = ${requant}(a[0], M${i}[co], R${i}[co], ${yzp});
            if (fo + 1 < ${fout})
                dst[co * ${fout} + fo + 1] = ${requant}(a[1], M${i}[co], R${i}[co], ${yzp});
            if (co + 1 < ${cout}) {
                dst[(co + 1) * ${fout} + fo] = ${requant}(a[2], M${i}[co + 1], R${i}[co + 1], ${yzp});
                if (fo + 1 < ${fout})
                    dst[(co + 1) * ${fout} + fo + 1] = ${requant}(a[3], M${i}[co + 1], R${i}[co + 1], ${yzp});
            }
        }
    }
${deliver}
}
