    {
        int8_t *dst = st->ring0 + ${row};
        for (b = 0; b < ${nm}; b++) dst[b] = (int8_t)quant(feat[b], ${scale}, ${zp});
        TRACE(0, st->n0, dst, ${nm});
    }
