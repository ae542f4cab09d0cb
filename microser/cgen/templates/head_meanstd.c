    {
        const float inv = 1.0f / (float)(st->head_rows + 1);
        for (c = 0; c < ${CF}; c++) {
            const float d = x[c] - st->ms_mean[c];
            st->ms_mean[c] += d * inv;
            st->ms_m2[c] += d * (x[c] - st->ms_mean[c]);
        }
    }
