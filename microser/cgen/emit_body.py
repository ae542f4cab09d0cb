"""C of the body: each stage's weights and its row function (float conv, int8 conv, max-pool), the ring
bookkeeping that runs a stage as rows arrive (`push`) and at the end (`flush`), and the int8 helpers the stages
use (requantization, the dual-MAC kernels, QuantizeLinear, the trace hook)."""

from __future__ import annotations

import numpy as np

from microser.cgen.ctext import block, c_array, c_float, fill
from microser.cgen.fixedpoint import conv_scales, fixed_multiplier, narrow
from microser.cgen.plan import TAP_ALIGN_DSP, TAP_ALIGN_PORTABLE, Plan, Stage, Tensor
from microser.cgen.ram import body_arena


def conv_weight_rows(st: Stage, align: int, *, dual: bool = False) -> np.ndarray:
    """An int8 conv's weights as (cout, padded_taps(align)) rows, tap order (ci, dt, df), zero taps at the end, and a
    zero row after an odd cout (the 2x2 kernel takes channels in pairs); with ``dual`` every group of 4 taps is stored
    (k, k+2, k+1, k+3), the order the SXTB16/SMLAD kernel reads."""
    w = np.asarray(st.weight).reshape(st.weight.shape[0], -1)
    rows = np.zeros((w.shape[0] + w.shape[0] % 2, st.padded_taps(align)), dtype=np.int8)
    rows[:w.shape[0], :w.shape[1]] = w
    if dual:
        rows = rows.reshape(rows.shape[0], -1, 4)[:, :, [0, 2, 1, 3]].reshape(rows.shape)
    return rows


def _int8_convs(plan: Plan) -> list[Stage]:
    return [st for st in plan.stages if st.kind == "conv" and st.int8]


def _quantized(plan: Plan) -> bool:
    return any(t.quant is not None for t in plan.tensors)


def int8_support(plan: Plan) -> list[str]:
    """The dual-MAC primitives and requant() (plus requant_wide() when a stage's shifts need it); none without an
    int8 conv."""
    convs = _int8_convs(plan)
    if not convs:
        return []
    text = fill("int8_support.c")
    if any(not narrow(plan, st) for st in convs):
        text += "\n" + fill("requant_wide.c")
    return [text]


def tables(plan: Plan) -> list[str]:
    """Each conv's const weights: float (BatchNorm folded) or int8 rows in both kernel orders, with the int32 bias
    and the requantization multipliers and shifts; LayerNorm's gamma and beta."""
    t = []
    for i, st in enumerate(plan.stages):
        if st.kind != "conv":
            continue
        if st.int8:
            dsp, portable = st.padded_taps(TAP_ALIGN_DSP), st.padded_taps(TAP_ALIGN_PORTABLE)
            t.append(fill("conv_s8_weights.c", i=i, dsp=dsp, portable=portable,
                          weights_dsp=c_array("int8_t", f"W{i}", conv_weight_rows(st, TAP_ALIGN_DSP, dual=True), 16),
                          weights_portable=c_array("int8_t", f"W{i}", conv_weight_rows(st, TAP_ALIGN_PORTABLE), 16)))
            t.append(c_array("int32_t", f"B{i}", np.append(st.bias, [0] * (len(st.bias) % 2))))
            mult, shift = zip(*(fixed_multiplier(sc) for sc in conv_scales(plan, st)))
            t.append(c_array("int32_t", f"M{i}", mult))
            shifts_narrow = narrow(plan, st)  # requant() takes shift - 32, requant_wide() the shift
            t.append(c_array("uint8_t", f"R{i}", [r - 32 if shifts_narrow else r for r in shift], 16))
        else:
            t.append(c_array("float", f"W{i}", st.weight))
            t.append(c_array("float", f"B{i}", st.bias))
        if st.ln is not None:
            t.append(c_array("float", f"LNG{i}", st.ln[0]))
            t.append(c_array("float", f"LNB{i}", st.ln[1]))
    return t


def helpers(plan: Plan) -> list[str]:
    """quant() (QuantizeLinear) and the TRACE hook when the plan has int8 tensors; two empty parts (two blank lines
    in the source) when it has none."""
    if not _quantized(plan):
        return ["", ""]
    return ["\n" + fill("quant.c"), "\n" + fill("trace.c")]


def kernels(plan: Plan) -> list[str]:
    """The 2x2 int8 x int16 kernels, one per padded tap count, for the dual-MAC and the portable build."""
    convs = _int8_convs(plan)
    if not convs:
        return []
    out = []
    for cond, align in (("#if MICROSER_SIMD", TAP_ALIGN_DSP), ("#else", TAP_ALIGN_PORTABLE)):
        out.append(cond)
        out += [fill("mm_s8.c", kp=kp) for kp in sorted({st.padded_taps(align) for st in convs})]
    out.append("#endif")
    return out


def declarations(plan: Plan, prefix: str) -> list[str]:
    """Forward declarations of the stages' push functions (each stage calls the next)."""
    return [f"static void s{i}_push({prefix}_state *st);" for i in reversed(range(len(plan.stages)))]


def stage(plan: Plan, i: int, prefix: str) -> str:
    """Stage ``i``'s row function, then its push and flush."""
    st = plan.stages[i]
    push = fill("stage_push.c", i=i, P=prefix, K=st.k, S=st.s, Pd=st.p, flush=2 * st.p - st.k)
    if st.kind == "conv" and st.int8:
        return _conv_s8(plan, i, prefix) + "\n" + push
    src, dst = plan.tensors[st.src], plan.tensors[st.dst]
    body = _conv_f32(plan, i) if st.kind == "conv" else _pool(plan, i)
    row = fill("stage_row.c", i=i, P=prefix, kind=st.kind, block=st.block, cin=src.channels, fin=src.bands,
               cout=dst.channels, fout=dst.bands, K=st.k, S=st.s, Pd=st.p, body=body, deliver=_deliver(plan, i))
    return "\n" + row + "\n" + push


def _ctype(t: Tensor) -> str:
    return "float" if t.quant is None else "int8_t"


def _dst(plan: Plan, i: int) -> tuple[str, str]:
    """(C type, C address) of stage ``i``'s output row: the next stage's ring slot, or the head's row in the arena
    (as int8 first when the last tensor is int8)."""
    t = plan.tensors[plan.stages[i].dst]
    if i + 1 < len(plan.stages):
        return _ctype(t), f"st->ring{i + 1} + (st->n{i + 1} % {plan.stages[i + 1].k}) * {t.row}"
    arena = body_arena(plan)
    if t.quant is None:
        return "float", f"st->arena.f + {arena.hrow}"
    return "int8_t", f"st->arena.b + {arena.i8_bytes}"


def _dst_decl(plan: Plan, i: int) -> str:
    ctype, address = _dst(plan, i)
    return f"{ctype} *dst = {address};"


def _deliver(plan: Plan, i: int) -> str:
    """C handing stage ``i``'s finished row on: the trace hook for an int8 row, then the next stage, or the head
    (which reads floats: an int8 last row is dequantized first)."""
    d = plan.stages[i].dst
    t = plan.tensors[d]
    trace = f"    TRACE({d}, j, dst, {t.row});\n" if t.quant is not None else ""
    if i + 1 < len(plan.stages):
        return f"{trace}    s{i + 1}_push(st);"
    if t.quant is None:
        return "    head_push(st, dst);"
    scale, zp = t.quant
    return block("head_dequant.c", trace=trace, hrow=body_arena(plan).hrow, n=t.row, zp=zp, scale=c_float(scale))


def _store(plan: Plan, i: int, value: str, index: str) -> str:
    """C storing float ``value`` at ``index`` of stage ``i``'s output (quantized when it is int8)."""
    t = plan.tensors[plan.stages[i].dst]
    if t.quant is None:
        return f"dst[{index}] = {value};"
    scale, zp = t.quant
    return f"dst[{index}] = (int8_t)quant({value}, {c_float(scale)}, {zp});"


def _conv_s8(plan: Plan, i: int, prefix: str) -> str:
    """An int8 conv stage (templates/conv_s8.c): im2col pairs, the 2x2 dual-MAC kernel, requant()."""
    st = plan.stages[i]
    src, dst = plan.tensors[st.src], plan.tensors[st.dst]
    k, xzp = st.k, src.quant[1]
    unrolled = "\n".join(f"                    c[{d}] = (int16_t)(x[base + {d}] - ({xzp}));" for d in range(k))
    return fill("conv_s8.c", i=i, P=prefix, block=st.block, cin=src.channels, fin=src.bands, cout=dst.channels,
                fout=dst.bands, k=k, s=st.s, p=st.p, kk=st.taps, kk_ci=k * k, row=src.row, xzp=xzp,
                yzp=dst.quant[1], unrolled=unrolled, requant="requant" if narrow(plan, st) else "requant_wide",
                dst=_dst(plan, i)[1], deliver=_deliver(plan, i))


def _conv_f32(plan: Plan, i: int) -> str:
    """A float conv (float32 library, or a conv the int8 graph keeps float): one register accumulator per output
    element, the interior band's taps unrolled; then LayerNorm when the block has one."""
    st = plan.stages[i]
    src, dst = plan.tensors[st.src], plan.tensors[st.dst]
    if src.quant is None:
        def tap(d: str) -> str:
            return f"acc += w[{d}] * x[base + {d}];"
    else:
        xs, xzp = c_float(src.quant[0]), src.quant[1]

        def tap(d: str) -> str:
            return f"acc += w[{d}] * ((float)((int)x[base + {d}] - ({xzp})) * {xs});"
    index = f"co * {dst.bands} + fo"
    if st.ln is not None:
        finish = f"tmp[{index}] = acc;"
    else:
        finish = _store(plan, i, "(acc > 0.0f ? acc : 0.0f)" if st.relu else "acc", index)
    tmp = "    float *tmp = st->arena.f;\n" if st.ln is not None else ""  # LayerNorm's row before normalizing
    code = block("conv_f32.c", i=i, dst=_dst_decl(plan, i), tmp=tmp,
                 cin=src.channels, fin=src.bands, cout=dst.channels, fout=dst.bands, K=st.k, S=st.s, Pd=st.p,
                 row=src.row, xtype=_ctype(src), inner=tap("df"), unrolled=" ".join(tap(str(d)) for d in range(st.k)),
                 finish=finish)
    if st.ln is None:
        return code
    n = dst.row
    store = _store(plan, i, "(y > 0.0f ? y : 0.0f)" if st.relu else "y", "e")
    return code + "\n" + block("layernorm.c", i=i, n=n, n_float=c_float(n), eps=c_float(st.ln[2]), store=store)


def _pool(plan: Plan, i: int) -> str:
    """A 3x3/2 max-pool row over the ring (padding ignored); its output requantized when its tensors differ."""
    st = plan.stages[i]
    src, dst = plan.tensors[st.src], plan.tensors[st.dst]
    index = f"c * {dst.bands} + fo"
    if src.quant == dst.quant:
        store = f"dst[{index}] = m;"
    elif src.quant is None:
        store = _store(plan, i, "m", index)
    else:
        store = _store(plan, i, f"((float)((int)m - ({src.quant[1]})) * {c_float(src.quant[0])})", index)
    return block("pool.c", i=i, dst=_dst_decl(plan, i), channels=src.channels, fin=src.bands, fout=dst.bands, K=st.k,
                 S=st.s, Pd=st.p, row=src.row, ctype=_ctype(src), store=store)
