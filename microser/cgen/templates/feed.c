/* One sample of the (prenormalised, zero-padded) signal into the framer. */
static void feed(${P}_state *st, float y)
{
    if (st->frame_skip > 0) {
        st->frame_skip--;
        return;
    }
    st->frame[st->frame_fill++] = y;
    if (st->frame_fill == ${N}) {
        process_frame(st);
${after}
    }
}
