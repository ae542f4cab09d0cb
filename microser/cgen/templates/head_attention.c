    for (c = 0; c < ${C}; c++) {
        for (f = 0; f < ${F}; f++) {
            float v = HV_B[c], s = HS_B[c];
            const int e = c * ${F} + f;
            for (ci = 0; ci < ${C}; ci++) {
                v += HV_W[c * ${C} + ci] * x[ci * ${F} + f];
                s += HS_W[c * ${C} + ci] * x[ci * ${F} + f];
            }
            if (st->head_rows == 0) {
                st->att_max[e] = s; st->att_sum[e] = 1.0f; st->att_acc[e] = v;
            } else if (s > st->att_max[e]) {
                const float r = expf(st->att_max[e] - s);
                st->att_sum[e] = st->att_sum[e] * r + 1.0f;
                st->att_acc[e] = st->att_acc[e] * r + v;
                st->att_max[e] = s;
            } else {
                const float r = expf(s - st->att_max[e]);
                st->att_sum[e] += r;
                st->att_acc[e] += r * v;
            }
        }
    }
