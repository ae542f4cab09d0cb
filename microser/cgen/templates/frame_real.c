    for (k = 0; k < ${M}; k++) {
        xr[k] = st->frame[2 * k] * WINDOW[2 * k];
        xi[k] = st->frame[2 * k + 1] * WINDOW[2 * k + 1];
    }
    fft(xr, xi, yr, yi);
    for (k = 0; k <= ${M}; k++) { /* split the packed real FFT: X[k] = E[k] + W^k O[k] */
        const int a = k % ${M}, bb = (${M} - k) % ${M};
        const float zr = ${o}r[a], zi = ${o}i[a], cr = ${o}r[bb], ci = -${o}i[bb];
        const float er = 0.5f * (zr + cr), ei = 0.5f * (zi + ci);
        const float or_ = 0.5f * (zi - ci), oi = -0.5f * (zr - cr);
        float re = er + RT_RE[k] * or_ - RT_IM[k] * oi;
        float im = ei + RT_RE[k] * oi + RT_IM[k] * or_;
