/* Pooling head, fed one float row (C=${C} x F=${F}) at a time. */
static void head_push(${P}_state *st, const float *x)
{
    int c, f, ci;
    (void)ci; (void)f;
${pool}
    st->head_rows++;
}

static void head_final(${P}_state *st, float out3[3])
{
    float *feat = st->arena.f;
    int c, k;
${features}
    for (k = 0; k < 3; k++) {
        float acc = FC_B[k];
        for (c = 0; c < ${n_features}; c++) acc += FC_W[k * ${n_features} + c] * feat[c];
        out3[k] = acc;
    }
}
