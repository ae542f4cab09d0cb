    ${dst}
    int c, fo;
    for (c = 0; c < ${channels}; c++) {
        for (fo = 0; fo < ${fout}; fo++) {
            const int f0 = fo * ${S} - ${Pd};
            const int df_lo = f0 < 0 ? -f0 : 0, df_hi = f0 + ${K} > ${fin} ? ${fin} - f0 : ${K};
            int dt, df, first = 1;
            ${ctype} m = 0;
            for (dt = dt_lo; dt < dt_hi; dt++) {
                const ${ctype} *x = st->ring${i} + ((r0 + dt) % ${K}) * ${row} + c * ${fin} + f0;
                for (df = df_lo; df < df_hi; df++)
                    if (first || x[df] > m) { m = x[df]; first = 0; }
            }
            ${store}
        }
    }
