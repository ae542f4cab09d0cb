    {
        const float tf = (float)st->head_rows * ${bands_float};
        int c2, g = 0;
        for (c = 0; c < ${C}; c++) {
            for (c2 = c; c2 < ${C}; c2++, g++) {
                feat[${CF} + c * ${C} + c2] = st->gram[g] / tf;
                feat[${CF} + c2 * ${C} + c] = st->gram[g] / tf;
            }
        }
    }
