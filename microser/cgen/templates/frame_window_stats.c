    float wm, wden;
    { /* per-frame mean and std of the ${N} samples, removed in the spectrum as the PyTorch graph does */
        double s1 = 0.0, s2 = 0.0;
        float m2;
        for (k = 0; k < ${N}; k++) { s1 += st->frame[k]; s2 += (double)(st->frame[k] * st->frame[k]); }
        wm = (float)(s1 / ${N}.0);
        m2 = (float)(s2 / ${N}.0);
        m2 = m2 - wm * wm;
        wden = sqrtf(m2 > 0.0f ? m2 : 0.0f) + ${eps};
    }
