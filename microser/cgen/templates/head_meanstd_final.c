    {
        const float n = (float)st->head_rows;
        for (c = 0; c < ${CF}; c++) {
            feat[c] = st->ms_mean[c];
            feat[${CF} + c] = sqrtf(st->ms_m2[c] / n + ${eps});
        }
    }
