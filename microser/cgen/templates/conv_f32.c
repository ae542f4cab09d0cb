    ${dst}
${tmp}    int co, fo;
    for (co = 0; co < ${cout}; co++) {
        for (fo = 0; fo < ${fout}; fo++) {
            const int f0 = fo * ${S} - ${Pd};
            const int df_lo = f0 < 0 ? -f0 : 0, df_hi = f0 + ${K} > ${fin} ? ${fin} - f0 : ${K};
            int dt, ci, df;
            float acc = B${i}[co];
            for (dt = dt_lo; dt < dt_hi; dt++) {
                const ${xtype} *x = st->ring${i} + ((r0 + dt) % ${K}) * ${row};
                if (df_lo == 0 && df_hi == ${K}) { /* interior band: the ${K} taps unrolled */
                    for (ci = 0; ci < ${cin}; ci++) {
                        const float *w = W${i} + ((co * ${cin} + ci) * ${K} + dt) * ${K};
                        const int base = ci * ${fin} + f0;
                        ${unrolled}
                    }
                    continue;
                }
                for (ci = 0; ci < ${cin}; ci++) {
                    const float *w = W${i} + ((co * ${cin} + ci) * ${K} + dt) * ${K};
                    const int base = ci * ${fin} + f0;
                    for (df = df_lo; df < df_hi; df++)
                        ${inner}
                }
            }
            ${finish}
        }
    }
