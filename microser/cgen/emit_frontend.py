"""C of the front-end: its const tables (twiddles, window, mel bands, PCEN smoother), the FFT, the framer (`feed`)
and one frame's features (`process_frame`: window, FFT, power, mel, log or PCEN, into stage 0's ring)."""

from __future__ import annotations

import numpy as np

from microser.frontends import PCEN_ALPHA, PCEN_DELTA, PCEN_EPS, PCEN_R, PRENORM_EPS
from microser.cgen.ctext import block, c_array, c_float, fill
from microser.cgen.plan import Plan, fft_factors, fft_points


def _fft_out(plan: Plan) -> str:
    """The buffer (``x`` or ``y``) the Stockham FFT leaves its output in: it swaps them once per radix pass."""
    return "x" if len(fft_factors(fft_points(plan.fe.n_fft))) % 2 == 0 else "y"


def tables(plan: Plan) -> list[str]:
    """The front-end's const arrays: FFT twiddles (and the real-FFT split twiddles), radices, window, mel bands,
    the per-window prenorm's window spectrum, the PCEN smoother."""
    fe, n, m = plan.fe, plan.fe.n_fft, fft_points(plan.fe.n_fft)
    k = np.arange(m)
    t = [c_array("float", "TW_RE", np.cos(2 * np.pi * k / m)), c_array("float", "TW_IM", -np.sin(2 * np.pi * k / m))]
    if n % 2 == 0:
        kk = np.arange(m + 1)
        t += [c_array("float", "RT_RE", np.cos(2 * np.pi * kk / n)),
              c_array("float", "RT_IM", -np.sin(2 * np.pi * kk / n))]
    t += [c_array("int", "FFT_FACTORS", fft_factors(m)), c_array("float", "WINDOW", plan.window),
          c_array("uint16_t", "MEL_START", plan.mel.start, 16), c_array("uint16_t", "MEL_LEN", plan.mel.length, 16),
          c_array("float", "MEL_W", plan.mel.weights)]
    if fe.prenorm == "window":
        t.append(c_array("float", "WSPEC", plan.window_spectrum))
    if fe.compression == "pcen":
        t.append(c_array("float", "PCEN_H", plan.pcen_fir))
    return t


def fft(plan: Plan) -> str:
    """``fft()``: the complex Stockham FFT of `fft_points` points (templates/fft.c)."""
    m = fft_points(plan.fe.n_fft)
    return fill("fft.c", M=m, nfac=len(fft_factors(m)), final=_fft_out(plan))


def process_frame(plan: Plan, prefix: str) -> str:
    """``process_frame()``: one analysis frame to one feature row, handed to stage 0 (templates/frame*.c)."""
    fe = plan.fe
    n, m, nm, o = fe.n_fft, fft_points(plan.fe.n_fft), fe.n_mels, _fft_out(plan)
    window_stats = fill("frame_window_stats.c", N=n, eps=c_float(PRENORM_EPS)) if fe.prenorm == "window" else ""
    if n % 2 == 0:
        spectrum = block("frame_real.c", M=m, o=o)
    else:
        spectrum = block("frame_complex.c", M=m, nf=n // 2 + 1, o=o)
    spectrum_prenorm = ("        re = (re - wm * WSPEC[2 * k]) / wden;\n"
                        "        im = (im - wm * WSPEC[2 * k + 1]) / wden;\n") if fe.prenorm == "window" else ""
    return fill("frame.c", P=prefix, N=n, M=m, M2=2 * m, M3=3 * m, M4=4 * m, nf=n // 2 + 1, nm=nm,
                window_stats=window_stats, spectrum=spectrum, spectrum_prenorm=spectrum_prenorm,
                compress=_compress(plan), store=_to_stage0(plan))


def _compress(plan: Plan) -> str:
    """Mel energies to features: 10 log10 (float graph), the int8 graph's own log arithmetic, or PCEN."""
    nm = plan.fe.n_mels
    if plan.fe.compression == "pcen":
        taps = len(plan.pcen_fir)
        return block("frame_pcen.c", L=taps, L1=taps - 1, nm=nm, floor=c_float(plan.log_floor), eps=c_float(PCEN_EPS), alpha=c_float(PCEN_ALPHA),
                     delta=c_float(PCEN_DELTA), r=c_float(PCEN_R), offset=c_float(PCEN_DELTA ** PCEN_R))
    if plan.log_chain is None:
        return block("frame_log.c", nm=nm, floor=c_float(plan.log_floor))
    # ln(max(e, floor)) then the scalars the exporter folded (x10 / ln 10, ...), in the graph's order
    ops = "".join(f" {'*' if op == 'mul' else '/'} {c_float(v)}" for op, v in plan.log_chain)
    return block("frame_log_graph.c", nm=nm, floor=c_float(plan.log_floor), ops=ops)


def _to_stage0(plan: Plan) -> str:
    """Store the feature row in stage 0's ring: copied, or quantized (QuantizeLinear) and traced."""
    nm, t0 = plan.fe.n_mels, plan.tensors[0]
    row = f"(st->n0 % {plan.stages[0].k}) * {t0.row}"
    if t0.quant is None:
        return f"    memcpy(st->ring0 + {row}, feat, {nm} * sizeof(float));"
    scale, zp = t0.quant
    return block("frame_store_int8.c", row=row, nm=nm, scale=c_float(scale), zp=zp)


def feed(plan: Plan, prefix: str) -> str:
    """``feed()``: one sample into the framer; a full frame is processed, then shifted by the hop (or the samples
    between frames skipped when the hop exceeds the frame)."""
    n, hop = plan.fe.n_fft, plan.fe.hop
    if hop < n:
        after = (f"        memmove(st->frame, st->frame + {hop}, {n - hop} * sizeof(float));\n"
                 f"        st->frame_fill = {n - hop};")
    else:
        after = f"        st->frame_fill = 0;\n        st->frame_skip = {hop - n};"
    return fill("feed.c", P=prefix, N=n, after=after)
