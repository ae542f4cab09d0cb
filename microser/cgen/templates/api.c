void ${P}_init(${P}_state *st)
{
    memset(st, 0, sizeof *st);
    st->frame_fill = ${left}; /* the left zero padding */
}

void ${P}_reset(${P}_state *st)
{
    ${P}_init(st);
}
${prescan}
int ${P}_push(${P}_state *st, const float *samples, int n)
{
    int i;
    if (st->finished) return -1;
${push_guard}    for (i = 0; i < n; i++) {
        const float x = samples[i];
        float y;
${prenorm}
        feed(st, y);
    }
    return 0;
}

int ${P}_result(${P}_state *st, float out3[3])
{
    int i;
    if (st->finished) return -1;
${result_guard}    for (i = 0; i < ${right}; i++) feed(st, 0.0f); /* the right zero padding */
${flush}
    st->finished = 1;
    if (st->head_rows == 0) {
        out3[0] = out3[1] = out3[2] = 0.0f;
        return -1;
    }
    head_final(st, out3);
    return 0;
}
