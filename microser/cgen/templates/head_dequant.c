${trace}    { /* DequantizeLinear: the head reads floats */
        float *hrow = st->arena.f + ${hrow};
        int e;
        for (e = 0; e < ${n}; e++) hrow[e] = (float)((int)dst[e] - (${zp})) * ${scale};
        head_push(st, hrow);
    }
