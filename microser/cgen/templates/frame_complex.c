    for (k = 0; k < ${M}; k++) { xr[k] = st->frame[k] * WINDOW[k]; xi[k] = 0.0f; }
    fft(xr, xi, yr, yi);
    for (k = 0; k < ${nf}; k++) {
        float re = ${o}r[k], im = ${o}i[k];
