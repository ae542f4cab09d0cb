/* Complex FFT of ${M} points: iterative Stockham autosort, mixed radix (factors in FFT_FACTORS), no recursion.
   Input in (xr, xi); the output lands in (${final}r, ${final}i); both buffers are overwritten. */
static void fft(float *xr, float *xi, float *yr, float *yi)
{
    int n = ${M}, s = 1, f, i, q, k, r;
    for (f = 0; f < ${nfac}; f++) {
        const int p = FFT_FACTORS[f], m = n / p, tw = ${M} / n;
        for (i = 0; i < m; i++) {
            for (q = 0; q < s; q++) {
                if (p == 2) {
                    const float ar = xr[q + s * i], ai = xi[q + s * i];
                    const float br = xr[q + s * (i + m)], bi = xi[q + s * (i + m)];
                    const float dr = ar - br, di = ai - bi, wr = TW_RE[i * tw], wi = TW_IM[i * tw];
                    yr[q + s * (2 * i)] = ar + br;
                    yi[q + s * (2 * i)] = ai + bi;
                    yr[q + s * (2 * i + 1)] = dr * wr - di * wi;
                    yi[q + s * (2 * i + 1)] = dr * wi + di * wr;
                } else if (p == 4) {
                    const float a0r = xr[q + s * i], a0i = xi[q + s * i];
                    const float a1r = xr[q + s * (i + m)], a1i = xi[q + s * (i + m)];
                    const float a2r = xr[q + s * (i + 2 * m)], a2i = xi[q + s * (i + 2 * m)];
                    const float a3r = xr[q + s * (i + 3 * m)], a3i = xi[q + s * (i + 3 * m)];
                    const float t0r = a0r + a2r, t0i = a0i + a2i, t1r = a0r - a2r, t1i = a0i - a2i;
                    const float t2r = a1r + a3r, t2i = a1i + a3i, t3r = a1i - a3i, t3i = a3r - a1r;
                    float vr[4], vi[4];
                    vr[0] = t0r + t2r; vi[0] = t0i + t2i;
                    vr[1] = t1r + t3r; vi[1] = t1i + t3i;
                    vr[2] = t0r - t2r; vi[2] = t0i - t2i;
                    vr[3] = t1r - t3r; vi[3] = t1i - t3i;
                    for (k = 0; k < 4; k++) {
                        const float wr = TW_RE[i * k * tw], wi = TW_IM[i * k * tw];
                        yr[q + s * (4 * i + k)] = vr[k] * wr - vi[k] * wi;
                        yi[q + s * (4 * i + k)] = vr[k] * wi + vi[k] * wr;
                    }
                } else {
                    for (k = 0; k < p; k++) {
                        float accr = 0.0f, acci = 0.0f;
                        for (r = 0; r < p; r++) {
                            const int t = (r * k * (${M} / p)) % ${M};
                            const float br = xr[q + s * (i + r * m)], bi = xi[q + s * (i + r * m)];
                            accr += br * TW_RE[t] - bi * TW_IM[t];
                            acci += br * TW_IM[t] + bi * TW_RE[t];
                        }
                        {
                            const float wr = TW_RE[i * k * tw], wi = TW_IM[i * k * tw];
                            yr[q + s * (p * i + k)] = accr * wr - acci * wi;
                            yi[q + s * (p * i + k)] = accr * wi + acci * wr;
                        }
                    }
                }
            }
        }
        n = m;
        s *= p;
        { float *t = xr; xr = yr; yr = t; t = xi; xi = yi; yi = t; }
    }
}
