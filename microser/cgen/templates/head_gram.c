    {
        int c2, g = 0;
        for (c = 0; c < ${C}; c++) {
            for (c2 = c; c2 < ${C}; c2++) {
                float acc = 0.0f;
                for (f = 0; f < ${F}; f++) acc += x[c * ${F} + f] * x[c2 * ${F} + f];
                st->gram[g++] += acc;
            }
        }
    }
