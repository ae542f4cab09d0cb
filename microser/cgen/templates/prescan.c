int ${P}_prescan(${P}_state *st, const float *samples, int n)
{
    int i;
    if (st->finished || st->clip_count > 0) return -1;
    for (i = 0; i < n; i++) {
        st->pn_count++;
        st->pn_sum += (double)samples[i];
        st->pn_sumsq += (double)samples[i] * (double)samples[i];
    }
    if (st->pn_count > 0) {
        const double cnt = (double)st->pn_count, mu = st->pn_sum / cnt;
        double var = st->pn_sumsq / cnt - mu * mu;
        if (var < 0.0) var = 0.0;
        st->clip_mean = (float)mu;
        st->clip_den = (float)sqrt(var) + ${eps};
    }
    return 0;
}
