static void s${i}_push(${P}_state *st)
{
    const int32_t r = st->n${i}++, t = r + ${Pd} - ${K} + 1;
    if (t >= 0 && t % ${S} == 0) {
        st->next${i} = t / ${S} + 1;
        s${i}_row(st, t / ${S});
    }
}

static void s${i}_flush(${P}_state *st)
{
    const int32_t len = st->n${i} + ${flush};
    const int32_t nout = len >= 0 ? len / ${S} + 1 : 0;
    while (st->next${i} < nout) {
        const int32_t j = st->next${i}++;
        s${i}_row(st, j);
    }
}
