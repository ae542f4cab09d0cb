"""Instructions as a cost: a per-operator model of the int8 C library, priced per target.

`instruction_features` counts, from the shape plan alone (no compile, about 10 ms), what the int8 library executes
per second of audio; `predict_instructions` prices those counts by `INSTR_COEFFS`, fitted by
``bench/instr_model.py --calibrate`` against libraries measured with callgrind (x86-64) and QEMU (Cortex-M4F).
"""

from __future__ import annotations

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.frontends import frame_padding, pcen_taps
from microser.models.spec import resolve_spec
from microser.cgen.plan import fft_factors, fft_points, frontend_tables, int8_c_unavailable, shape_plan

INSTR_TARGETS = ("x86-64", "cortex-m4")
# Instructions per unit of each `instruction_features` count, fitted (non-negative least squares on relative error)
# to instructions measured on the generated int8 library of random default-space specs: valgrind callgrind on
# x86-64 (gcc 12.2 -O2) and QEMU mps2-an386 for the Cortex-M4F (arm-none-eabi-gcc 12.2 -O2). Refit with
# `python bench/instr_model.py --calibrate 60` after changing the generated C; accuracy on 50 other specs:
# `python bench/instr_model.py`.
INSTR_COEFFS: dict[str, dict[str, float]] = {
    "x86-64": {"sample_none": 15.2777, "sample_clip": 31.5406, "sample_running": 48.9845, "sample_window": 19.4385,
               "frame_shift": 21.9821, "frame_sample_window_prenorm": 13.8665, "fft_radix2": 49.8938,
               "fft_radix4": 46.6339, "fft_radix_other": 37.3044, "mel_weight": 0.0888, "mel_band": 110.4022,
               "pcen_band": 315.0023, "pcen_tap": 5.8229, "conv_row": 3853.8118, "mm_call": 27.0831,
               "mm_tap": 2.6128, "im2col_tap": 6.2416, "requant": 7.7983, "pool_row": 4794.5611,
               "pool_out": 159.8456, "attention_elem": 61.2393, "attention_mac": 9.7691, "gram_mac": 6.9082},
    "cortex-m4": {"sample_none": 41.6614, "sample_clip": 238.808, "sample_running": 268.3028,
                  "sample_window": 37.2171, "frame_shift": 28.7714, "frame_sample_window_prenorm": 165.4167,
                  "fft_radix2": 68.4302, "fft_radix4": 55.6005, "fft_radix_other": 37.292, "mel_weight": 0.2233,
                  "pcen_band": 418.2823, "pcen_tap": 5.1368, "mm_tap": 5.2569, "im2col_tap": 6.5758,
                  "pool_row": 1155.567, "pool_out": 175.9801, "attention_elem": 112.6305, "attention_mac": 10.4441,
                  "gram_mac": 8.2341},
}


# the keys of `instruction_features`: the units the model prices
INSTR_FEATURES = ("sample_none", "sample_clip", "sample_running", "sample_window", "frame", "frame_sample",
                  "frame_shift", "frame_sample_window_prenorm", "fft_radix2", "fft_radix4", "fft_radix_other",
                  "fft_stage", "spectrum_bin", "mel_weight", "mel_band", "log_band", "pcen_band", "pcen_tap",
                  "conv_row", "mm_call", "mm_tap", "im2col_call", "im2col_tap", "requant", "pool_row", "pool_out",
                  "head_row", "head_elem", "attention_elem", "attention_mac", "gram_mac")


def instruction_features(spec) -> dict[str, float]:
    """Counts per second of audio (16,000 samples pushed, no flush) of what the int8 C library executes, from the
    spec alone (the shape plan; no compile): the units `predict_instructions` prices. All body convs int8, the
    front-end and head float, as microser.compress quantizes by default."""
    spec = _resolved(spec)
    plan = shape_plan(spec, int8=True)
    fe = spec.frontend
    n = SAMPLE_RATE
    left, _ = frame_padding(fe)
    frames = 1 + (n + left - fe.n_fft) // fe.hop if n + left >= fe.n_fft else 0
    m = fft_points(fe.n_fft)
    nf = fe.n_fft // 2 + 1
    f = {key: 0.0 for key in INSTR_FEATURES}
    f[f"sample_{fe.prenorm}"] = n
    f["frame"] = frames
    f["frame_sample"] = frames * fe.n_fft
    f["frame_shift"] = frames * max(fe.n_fft - fe.hop, 0)
    if fe.prenorm == "window":
        f["frame_sample_window_prenorm"] = frames * fe.n_fft
    for p in fft_factors(m):
        key = {2: "fft_radix2", 4: "fft_radix4"}.get(p)
        if key:
            f[key] += frames * m
        else:
            f["fft_radix_other"] += frames * m * p
        f["fft_stage"] += frames
    f["spectrum_bin"] = frames * nf
    f["mel_weight"] = frames * (_mel_nonzeros(spec) if fe.filterbank == "mel" else nf * fe.n_mels)
    f["mel_band"] = frames * fe.n_mels
    if fe.compression == "log":
        f["log_band"] = frames * fe.n_mels
    else:
        f["pcen_band"] = frames * fe.n_mels
        f["pcen_tap"] = frames * fe.n_mels * pcen_taps(fe.hop)
    rows = frames
    for st in plan.stages:
        dst = plan.tensors[st.dst]
        rows = (rows + st.p - st.k) // st.s + 1 if rows + st.p - st.k >= 0 else 0
        pairs = -(-dst.bands // 2)
        if st.kind == "conv":
            f["conv_row"] += rows
            f["mm_call"] += rows * pairs * -(-dst.channels // 2)
            f["mm_tap"] += rows * pairs * -(-dst.channels // 2) * st.padded_taps()
            f["im2col_call"] += rows * 2 * pairs
            f["im2col_tap"] += rows * 2 * pairs * st.taps
            f["requant"] += rows * dst.bands * dst.channels
        else:
            f["pool_row"] += rows
            f["pool_out"] += rows * dst.row
    c, b = plan.tensors[-1].channels, plan.tensors[-1].bands
    f["head_row"] = rows
    f["head_elem"] = rows * c * b
    if plan.pooling.startswith("attention"):
        f["attention_elem"] = rows * c * b
        f["attention_mac"] = rows * c * b * c
        if plan.pooling == "attention+gram":
            f["gram_mac"] = rows * c * (c + 1) // 2 * b
    return f


def _mel_nonzeros(spec) -> int:
    return int(frontend_tables(spec)[1].weights.size)


def _resolved(spec):
    spec = resolve_spec(spec)
    reason = int8_c_unavailable(spec)
    if reason:
        raise MicroserError(f"spec {spec.summary()!r}: {reason}")
    return spec


def predict_instructions(spec, *, target: str = "x86-64") -> int:
    """Instructions per second of audio of the spec's generated int8 C library (push, plus prescan for two-pass
    specs), predicted by the per-operator model: `instruction_features` priced by ``INSTR_COEFFS[target]``.
    ``x86-64`` is what valgrind callgrind counts on the host (the ``instr`` cost); ``cortex-m4`` what QEMU counts
    on the target ISA."""
    if target not in INSTR_COEFFS:
        raise MicroserError(f"instruction target {target!r} is unknown: expected one of {', '.join(INSTR_COEFFS)}")
    coeffs = INSTR_COEFFS[target]
    return int(round(sum(coeffs.get(k, 0.0) * v for k, v in instruction_features(spec).items())))

