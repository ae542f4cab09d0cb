/* stage ${i}: ${kind} of block ${block}, ${cin}x${fin} -> ${cout}x${fout} per row, kernel ${K}, stride ${S}, pad ${Pd} */
static void s${i}_row(${P}_state *st, int32_t j)
{
    const int32_t n = st->n${i}, r0 = j * ${S} - ${Pd};
    const int dt_lo = r0 < 0 ? (int)-r0 : 0;
    const int dt_hi = r0 + ${K} > n ? (int)(n - r0) : ${K};
${body}
${deliver}
}
