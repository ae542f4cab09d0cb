"""Dependency-free C99 streaming inference for one Wav2Small-family student: the generator and its RAM plan.

``generate(bundle_dir, model, spec, int8_onnx_path)`` writes ``bundle_dir/c/``:

    <prefix>_f32.h/.c    float32 library: the whole graph from raw 16 kHz samples
    <prefix>_int8.h/.c   int8 library reproducing the int8 QDQ ONNX graph (microser.compress)
    <prefix>_*_main.c    a small driver: raw float32 audio file + chunk sizes -> 3 numbers
    README.md            the API, the memory figures, how to build

The C API (``P`` = prefix, e.g. ``ser_f32``)::

    P_state st;                      /* caller-owned, plain data (no pointers): sizeof == P_RAM_BYTES */
    P_init(&st);                     /* or P_reset(&st): same thing */
    P_push(&st, samples, n);         /* any n >= 0, as often as wanted; returns 0, or -1 after result() */
    P_result(&st, out3);             /* arousal, dominance, valence of everything pushed; 0, or -1 if too short */

``result`` is final: it flushes the zero padding the offline model applies at
the end (frames, "same" conv padding, max-pool padding) and leaves the state
finished (``push`` returns -1 until ``reset``). Because the state holds no
pointers, a running estimate is ``P_state copy = st; P_result(&copy, out3);``
and pushing into ``st`` goes on. Specs with ``prenorm = "clip"`` (a
whole-utterance statistic) get a documented two-pass entry point instead of a
stream: ``P_prescan(&st, samples, n)`` over the whole utterance first, then
``push`` the same samples again (see `CLIP_NOTE`).

What is computed, in order (the same definitions as microser.frontends and
microser.models.wav2small, read there):

* prenorm: none | running (double accumulators, each sum rounded to float as
  the graph does; a prior's pseudo-count and pseudo-sum of squares, when
  microser.frontends sets one, added in float) | window (per frame, in the spectrum, as the
  PyTorch graph does) | clip (two passes);
* framing with the spec's zero padding (``center``, ``pad_end``) kept as
  pending zeros, periodic Hann window zero-padded to ``n_fft``;
* FFT: a real FFT of even ``n_fft`` computed as a complex FFT of ``n_fft/2``
  points (iterative Stockham autosort, mixed radix 4/2/3/5/any, twiddles as
  const tables) plus the standard split step; odd ``n_fft`` runs the complex
  FFT on all points. No DFT matrix;
* mel filterbank stored as one contiguous non-zero range per band (`MelBands`); log
  (``10 log10 max(e, 1e-10)``) or PCEN with its causal FIR smoother kept as a
  ring of the last ``taps`` mel rows;
* conv blocks row by row (time is the streaming axis): each stage keeps a
  ring of ``k`` input rows (its receptive field in time), computes output row
  ``j`` as soon as input row ``j*s - p + k - 1`` arrived, and at ``result``
  the rows past the end count as the zero ("same") padding; BatchNorm folded
  into the conv; LayerNorm over (channels, bands) of each row; ReLU; 3x3/2
  max-pools the same way with padding ignored;
* head: attention pooling with an online softmax per (channel, band)
  (running max, running sum, running weighted sum), Gram matrix accumulated
  online (upper triangle), or mean+std with Welford's update; then the Linear.

int8 variant: every tensor the int8 ONNX graph quantizes is stored as int8
with the graph's scale and zero point. An int8 conv (cgen_templates/conv_s8.c)
builds im2col columns of two output positions (int16, input zero point
removed), runs a 2x2 int8 x int16 kernel over pairs of output channels with
int32 accumulators (cgen_templates/mm_s8.c: SXTB16/SMLAD dual 16-bit MACs on a
core with the DSP extension, a loop the host compiler vectorizes otherwise)
and requantizes each accumulator by an exact int32 multiplier and shift
(`fixed_multiplier`, ``requant()`` in cgen_templates/int8_support.c): round to
nearest, ties to even, as onnxruntime, but of the exact product where
onnxruntime rounds a float32 product first, so an output can differ from
onnxruntime's by one step, rarely (bounded in tests). QuantizeLinear of the
front-end output divides by the scale and rounds to nearest even; the
front-end and the head run in float exactly as in the float variant, on the
dequantized last body row.

Front-end tables (`frontend_tables`) come from the spec's numbers: the window
and the mel band table, never a dense matrix. The Cortex-M4F build
(`measure_cortex_m4`) and the instruction cost model (`instruction_features`,
`predict_instructions`) live here too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import numpy as np

from microser import SAMPLE_RATE, TARGETS
from microser.errors import MicroserError

DEFAULT_PREFIX = "ser"
TEMPLATES = Path(__file__).resolve().parent / "cgen_templates"
# int8 conv columns are padded with zero taps (zero weights) to the kernel's step: 4 taps for the dual-MAC kernel
# (two SMLAD words per step), 16 for the portable loop, whose int8 weight loads a host compiler auto-vectorizes 16
# lanes at a time (GCC -O2 does so only when the constant trip count is a multiple of that; measured with
# callgrind: 128 padded taps cost 390 x86 instructions per 2x2 block, 120 unpadded ones 1947).
TAP_ALIGN_DSP = 4
TAP_ALIGN_PORTABLE = 16
GCC_FLAGS = ("-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2")
CLIP_NOTE = ("prenorm 'clip' divides by whole-utterance statistics, which no stream knows in advance: the C "
             "library runs it in two passes (P_prescan over the whole utterance, then P_push of the same samples), "
             "so the caller must keep or re-read the utterance; retrain with frontend.prenorm = 'running' (or "
             "'window' or 'none') for a true stream")


# ---- the shape plan: what the C code keeps per stage (shared by the generator and streaming_ram) ----


@dataclass
class Tensor:
    """One row-streamed tensor: ``channels`` x ``bands`` per time row; ``quant`` = (scale, zero point) or None."""

    channels: int
    bands: int
    quant: tuple[float, int] | None = None

    @property
    def row(self) -> int:
        return self.channels * self.bands


@dataclass
class Stage:
    """A windowed op over time rows: conv (``kind="conv"``) or max-pool (``kind="pool"``), kernel k, stride s, pad p."""

    kind: str
    block: int
    src: int  # index of the input tensor
    dst: int  # index of the output tensor
    k: int
    s: int
    p: int
    norm: str = "none"  # conv only: "batch" (folded), "layer", "none"
    relu: bool = True  # conv only: apply ReLU in float before storing (False when the int8 graph folded it)
    int8: bool = False  # conv only: int8 weights, int32 accumulation, QLinearConv requantization
    weight: np.ndarray | None = None  # (cout, cin, k, k) float, or int8 when int8
    bias: np.ndarray | None = None  # (cout,) float, or int32 when int8
    w_scale: np.ndarray | None = None  # (cout,) float32 per-channel weight scales (int8)
    ln: tuple[np.ndarray, np.ndarray, float] | None = None  # LayerNorm gamma, beta (C, F), eps
    cin: int = 0  # conv only: input channels (set by shape_plan)

    @property
    def taps(self) -> int:
        """Multiply-accumulates per output element of a conv: ``cin * k * k``."""
        return self.cin * self.k * self.k

    def padded_taps(self, align: int = TAP_ALIGN_PORTABLE) -> int:
        """`taps` rounded up to a multiple of ``align``: an int8 kernel's column length (zero weights past taps)."""
        return -(-self.taps // align) * align


@dataclass
class Plan:
    """Everything the C code computes, as data: front-end settings, stages, tensors, head."""

    spec: object
    tensors: list[Tensor]
    stages: list[Stage]
    pooling: str
    # front-end constants (filled by _frontend_tables for generation; shapes only for streaming_ram)
    window: np.ndarray | None = None  # (n_fft,) zero-padded analysis window (frontend_tables)
    mel: MelBands | None = None  # the filterbank's band table (frontend_tables)
    pcen_fir: np.ndarray | None = None  # oldest tap first, as the PyTorch conv weight
    window_spectrum: np.ndarray | None = None
    head: dict = field(default_factory=dict)
    # log compression as the int8 graph computes it: ln(max(e, floor)) then scalar ops in order
    # (the exporter folds the x10 of 10*log10 into the first conv's weights); None: 10*log10(max(e, 1e-10))
    log_chain: list[tuple[str, float]] | None = None
    log_floor: float = 1e-10

    @property
    def fe(self):
        return self.spec.frontend


def check_exportable(spec) -> None:
    """MicroserError unless ``spec`` can be exported to C (the wav2small family)."""
    _check_family(spec)


def _check_family(spec) -> None:
    if spec.family != "wav2small":
        raise MicroserError(f"spec family {spec.family!r}: C export supports the wav2small family; "
                            "mobilenet specs export ONNX only (use the bundle's model.onnx / model.int8.onnx)")


def shape_plan(spec, *, int8: bool = True) -> Plan:
    """The stages and tensor shapes of a Wav2Small spec; with ``int8`` every body tensor is int8 (sized with a unit scale; real scales come from the int8 graph).

    This is the int8 deployment of microser.compress (front-end output and body
    quantized, head float) without reading a graph: enough to size the state.
    """
    from microser.models.wav2small import band_counts, halve

    _check_family(spec)
    body = spec.body
    q = (1.0, 0) if int8 else None
    tensors = [Tensor(1, spec.frontend.n_mels, q)]
    stages: list[Stage] = []
    f = spec.frontend.n_mels
    bands = band_counts(body, f)
    for i, c in enumerate(body.channels):
        s = body.stem_stride if i == 0 else 1
        f_out = halve(f) if s == 2 else f
        assert f_out == bands[i]
        tensors.append(Tensor(c, f_out, q))
        stages.append(Stage("conv", i, len(tensors) - 2, len(tensors) - 1, body.kernel, s, body.kernel // 2,
                            norm=body.norm, int8=int8, cin=tensors[-2].channels))
        f = f_out
        if i in body.pool_after:
            f = halve(f)
            tensors.append(Tensor(c, f, q))
            stages.append(Stage("pool", i, len(tensors) - 2, len(tensors) - 1, 3, 2, 1))
    return Plan(spec=spec, tensors=tensors, stages=stages, pooling=body.pooling)


# ---- the state layout (one struct, no pointers) and the RAM figures ----


_SIZES = {"double": 8, "float": 4, "int32_t": 4, "uint32_t": 4, "int8_t": 1}


def _members(plan: Plan) -> list[tuple[str, str, int, str]]:
    """(ctype, name, count, comment) of every persistent state member, largest alignment first."""
    fe = plan.fe
    m: list[tuple[str, str, int, str]] = []
    if fe.prenorm in ("running", "clip"):
        m.append(("double", "pn_sum", 1, "prenorm: sum of samples"))
        m.append(("double", "pn_sumsq", 1, "prenorm: sum of squared samples"))
    if fe.prenorm == "clip":
        m.append(("float", "clip_mean", 1, "clip: whole-utterance mean (prescan)"))
        m.append(("float", "clip_den", 1, "clip: std + eps (prescan)"))
    m.append(("float", "frame", fe.n_fft, "samples of the frame being filled"))
    if fe.compression == "pcen":
        m.append(("float", "pcen_ring", len(plan.pcen_fir) * fe.n_mels if plan.pcen_fir is not None
                  else _pcen_taps(fe.hop) * fe.n_mels, "last taps mel rows (PCEN smoother)"))
    for i, st in enumerate(plan.stages):
        t = plan.tensors[st.src]
        if t.quant is None:
            m.append(("float", f"ring{i}", st.k * t.row, f"stage {i} input rows ({st.k} x {t.channels} x {t.bands})"))
    c, f = plan.tensors[-1].channels, plan.tensors[-1].bands
    if plan.pooling.startswith("attention"):
        m += [("float", "att_max", c * f, "online softmax: running max"),
              ("float", "att_sum", c * f, "online softmax: running sum"),
              ("float", "att_acc", c * f, "online softmax: running weighted sum of values")]
        if plan.pooling == "attention+gram":
            m.append(("float", "gram", c * (c + 1) // 2, "Gram matrix, upper triangle, running sum"))
    else:
        m += [("float", "ms_mean", c * f, "Welford mean over time"), ("float", "ms_m2", c * f, "Welford M2")]
    if fe.prenorm in ("running", "clip"):  # integer counts: no double arithmetic per sample on an FPU-only-float core
        m.append(("uint32_t", "pn_count", 1, "prenorm: samples seen (up to 2^32, 74 h)"))
    if fe.prenorm == "clip":
        m.append(("uint32_t", "clip_count", 1, "clip: samples pushed in the second pass"))
    m.append(("int32_t", "frame_fill", 1, "samples in frame"))
    m.append(("int32_t", "frame_skip", 1, "samples to skip (hop > n_fft)"))
    if fe.compression == "pcen":
        m.append(("int32_t", "pcen_n", 1, "mel rows seen"))
    for i, _ in enumerate(plan.stages):
        m.append(("int32_t", f"n{i}", 1, f"stage {i}: input rows received"))
        m.append(("int32_t", f"next{i}", 1, f"stage {i}: next output row"))
    m.append(("int32_t", "head_rows", 1, "rows pooled by the head"))
    m.append(("int32_t", "finished", 1, "1 after result()"))
    m.append(("int32_t", "status", 1, "0 ok; -2 push before prescan (clip)"))
    for i, st in enumerate(plan.stages):
        t = plan.tensors[st.src]
        if t.quant is not None:
            m.append(("int8_t", f"ring{i}", st.k * t.row, f"stage {i} input rows, int8 ({st.k} x {t.channels} x {t.bands})"))
    return m


@dataclass(frozen=True)
class BodyArena:
    """Where the body phase keeps its scratch in the arena (units: floats from the arena start).

    ``[0, hrow)``: a float conv's pre-LayerNorm row, or the two int16 im2col columns of an int8 conv
    (``2 * padded_taps()`` int16 = ``padded_taps()`` floats, the longer, portable padding);
    ``[hrow, hrow + C*F)``: the last body row in float, as the head reads it; then, when the last body tensor is
    int8, that row as int8 (``i8_bytes`` from the arena start), before it is dequantized.
    """

    hrow: int
    i8_bytes: int
    floats: int


def body_arena(plan: Plan) -> BodyArena:
    temp = max([plan.tensors[st.dst].row for st in plan.stages if st.kind == "conv"]
               + [st.padded_taps() for st in plan.stages if st.kind == "conv" and st.int8], default=0)
    last = plan.tensors[-1]
    floats = temp + last.row + (-(-last.row // 4) if last.quant is not None else 0)
    return BodyArena(hrow=temp, i8_bytes=4 * (temp + last.row), floats=floats)


def _arena_floats(plan: Plan) -> int:
    """Scratch floats: max over the phases (front-end frame, body row, head features) that never overlap in time."""
    fe = plan.fe
    m = fe.n_fft // 2 if fe.n_fft % 2 == 0 else fe.n_fft
    front = 4 * m + fe.n_fft // 2 + 1 + 2 * fe.n_mels
    body = body_arena(plan).floats
    c, f = plan.tensors[-1].channels, plan.tensors[-1].bands
    feats = {"attention+gram": c * f + c * c, "attention": c * f, "meanstd": 2 * c * f}[plan.pooling]
    n = max(front, body, feats)
    return n + n % 2  # even: the struct size is a multiple of 8 on every ABI


def state_bytes(plan: Plan) -> dict:
    """Byte counts of the state struct: ``state`` (persistent), ``arena`` (scratch), ``total`` (= sizeof)."""
    persistent = sum(_SIZES[t] * n for t, _, n, _ in _members(plan))
    persistent = -(-persistent // 8) * 8  # the struct pads its int8 tail to 8 bytes (explicit member)
    arena = 4 * _arena_floats(plan)
    return {"state": persistent, "arena": arena, "total": persistent + arena}


def _pcen_taps(hop: int) -> int:
    from microser.frontends import pcen_taps

    return pcen_taps(hop)


def streaming_ram(spec, *, int8: bool = True, input_seconds: float | None = None) -> dict:
    """Streaming RAM of the C library for ``spec``: state + scratch, independent of the utterance length.

    Args:
        spec: an ArchSpec (or a name / JSON accepted by resolve_spec) of the wav2small family.
        int8: size the int8 deployment (front-end output and body int8, head float; the budget figure),
            else the float32 library.
        input_seconds: only used for ``prenorm = "clip"``, whose two-pass C entry point needs the
            caller to keep the utterance: ``replay_bytes`` = float32 samples of that duration.

    Returns:
        ``{"state_bytes", "arena_bytes", "replay_bytes", "ram_streaming_bytes", "two_pass", "note"}`` where
        ``ram_streaming_bytes = state_bytes + arena_bytes + replay_bytes`` (the worst stack, measured
        by compiling, comes on top: see `measure`).
    """
    from microser.models.spec import resolve_spec

    spec = resolve_spec(spec)
    plan = shape_plan(spec, int8=int8)
    sizes = state_bytes(plan)
    two_pass = spec.frontend.prenorm == "clip"
    replay = 0
    note = "state + scratch of the streaming C library, independent of the utterance length"
    if two_pass:
        if input_seconds is None:
            raise MicroserError("streaming_ram: prenorm 'clip' needs input_seconds (its two-pass C entry point "
                                "keeps the utterance); pass input_seconds, or retrain with prenorm 'running'")
        replay = 4 * int(round(input_seconds * SAMPLE_RATE))
        note = (f"prenorm 'clip' is not streamable: the C library takes two passes, so the caller keeps the "
                f"{input_seconds:g} s utterance ({replay} B float32) beside the state; retrain with "
                "frontend.prenorm 'running' to drop it")
    return {"state_bytes": sizes["state"], "arena_bytes": sizes["arena"], "replay_bytes": replay,
            "ram_streaming_bytes": sizes["total"] + replay, "two_pass": two_pass, "note": note}


# ---- instructions as a cost: a per-operator model of the int8 library, calibrated by bench/instr_model.py ----

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


def instruction_features(spec) -> dict[str, float]:
    """Counts per second of audio (16,000 samples pushed, no flush) of what the int8 C library executes, from the
    spec alone (the shape plan; no compile): the units `predict_instructions` prices. All body convs int8, the
    front-end and head float, as microser.compress quantizes by default."""
    from microser.frontends import frame_padding

    spec = _resolved(spec)
    plan = shape_plan(spec, int8=True)
    fe = spec.frontend
    n = SAMPLE_RATE
    left, _ = frame_padding(fe)
    frames = 1 + (n + left - fe.n_fft) // fe.hop if n + left >= fe.n_fft else 0
    m = fe.n_fft // 2 if fe.n_fft % 2 == 0 else fe.n_fft
    nf = fe.n_fft // 2 + 1
    f = {key: 0.0 for key in INSTR_FEATURES}
    f[f"sample_{fe.prenorm}"] = n
    f["frame"] = frames
    f["frame_sample"] = frames * fe.n_fft
    f["frame_shift"] = frames * max(fe.n_fft - fe.hop, 0)
    if fe.prenorm == "window":
        f["frame_sample_window_prenorm"] = frames * fe.n_fft
    for p in _factors(m):
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
        f["pcen_tap"] = frames * fe.n_mels * _pcen_taps(fe.hop)
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


INSTR_FEATURES = ("sample_none", "sample_clip", "sample_running", "sample_window", "frame", "frame_sample",
                  "frame_shift", "frame_sample_window_prenorm", "fft_radix2", "fft_radix4", "fft_radix_other",
                  "fft_stage", "spectrum_bin", "mel_weight", "mel_band", "log_band", "pcen_band", "pcen_tap",
                  "conv_row", "mm_call", "mm_tap", "im2col_call", "im2col_tap", "requant", "pool_row", "pool_out",
                  "head_row", "head_elem", "attention_elem", "attention_mac", "gram_mac")


def _mel_nonzeros(spec) -> int:
    return int(frontend_tables(spec)[1].weights.size)


def _resolved(spec):
    from microser.models.spec import resolve_spec

    spec = resolve_spec(spec)
    reason = int8_c_unavailable(spec)
    if reason:
        raise MicroserError(f"spec {spec.summary()!r}: {reason}")
    return spec


def int8_c_unavailable(spec) -> str | None:
    """Why ``spec`` gets no int8 C library (so no instruction count), or None when it does."""
    if spec.family != "wav2small":
        return f"the {spec.family} family has no C export (wav2small only)"
    if spec.body.norm == "layer":
        return "the int8 C library does not support body.norm 'layer' (use 'batch' or 'none')"
    return None


def predict_instructions(spec, *, target: str = "x86-64") -> int:
    """Instructions per second of audio of the spec's generated int8 C library (push, plus prescan for two-pass
    specs), predicted by the per-operator model: `instruction_features` priced by ``INSTR_COEFFS[target]``.
    ``x86-64`` is what valgrind callgrind counts on the host (the ``instr`` cost); ``cortex-m4`` what QEMU counts
    on the target ISA."""
    if target not in INSTR_COEFFS:
        raise MicroserError(f"instruction target {target!r} is unknown: expected one of {', '.join(INSTR_COEFFS)}")
    coeffs = INSTR_COEFFS[target]
    return int(round(sum(coeffs.get(k, 0.0) * v for k, v in instruction_features(spec).items())))


# ---- weights: the float plan from the PyTorch model, the int8 plan from the int8 ONNX graph ----


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@dataclass(frozen=True)
class MelBands:
    """A filterbank as the C library stores it: per band the first FFT bin and the length of one contiguous run
    holding all its non-zero weights, and those runs' weights concatenated (the 257 x 40 HTK mel matrix of
    stft512 m40: 493 weights and 80 small integers instead of 10,280 dense values)."""

    n_freqs: int
    start: np.ndarray  # (n_mels,) first bin of each band
    length: np.ndarray  # (n_mels,) bins in its run
    weights: np.ndarray  # (sum(length),) the runs, band after band

    @classmethod
    def from_dense(cls, fbank) -> "MelBands":
        """The band table of a dense (n_freqs, n_mels) matrix (a band without weights gets an empty run)."""
        fb = np.asarray(fbank, dtype=np.float64)
        start, length, weights = [], [], []
        for b in range(fb.shape[1]):
            nz = np.nonzero(fb[:, b])[0]
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
            start.append(lo)
            length.append(hi - lo)
            weights.append(fb[lo:hi, b])
        return cls(fb.shape[0], np.array(start), np.array(length), np.concatenate(weights) if weights else np.zeros(0))

    def dense(self) -> np.ndarray:
        """The (n_freqs, n_mels) matrix back (float64)."""
        out = np.zeros((self.n_freqs, len(self.start)))
        off = 0
        for b, (lo, n) in enumerate(zip(self.start, self.length)):
            out[lo:lo + n, b] = self.weights[off:off + n]
            off += n
        return out


def frontend_tables(spec, model=None) -> tuple[np.ndarray, MelBands]:
    """The front-end constants the C library stores, computed from the spec's few numbers: the analysis window
    (periodic Hann of ``win_length``, zero-padded to ``n_fft`` and centred, as microser.frontends.PowerSpectrum
    applies it) and the mel band table of `microser.frontends.mel_matrix` (the one definition of the filterbank; a
    ``learnable`` filterbank is read from ``model``, as ``abs`` of the learned matrix). This is the one place the C
    side gets them from, so it follows that definition when it changes."""
    import torch

    from microser.frontends import mel_matrix

    fe = spec.frontend
    window = np.zeros(fe.n_fft)
    left = (fe.n_fft - fe.window_length) // 2
    window[left:left + fe.window_length] = torch.hann_window(fe.window_length, periodic=True).double().numpy()
    if fe.filterbank == "learnable":
        if model is None:
            raise MicroserError(f"spec {spec.summary()!r} has a learnable filterbank: its band table needs the "
                                "trained model; pass the model")
        fbank = _np(model.frontend.filterbank())
    else:
        fbank = mel_matrix(fe).double().numpy()
    return window, MelBands.from_dense(fbank)


def float_plan(model, spec=None) -> Plan:
    """The float32 plan of an eval-mode Wav2Small `Student`: BatchNorm folded into the convs (in float64)."""
    from torch import nn

    from microser.frontends import PowerSpectrum

    spec = spec if spec is not None else model.spec
    plan = shape_plan(spec, int8=False)
    fe = spec.frontend
    power: PowerSpectrum = model.frontend.power
    plan.window, plan.mel = frontend_tables(spec, model)
    if fe.compression == "pcen":
        plan.pcen_fir = _np(model.frontend.pcen_fir).reshape(-1)
    if fe.prenorm == "window":
        plan.window_spectrum = _np(power.window_spectrum)
    for st in plan.stages:
        if st.kind != "conv":
            continue
        block = model.body[st.block]
        w = _np(block.conv.weight)
        b = _np(block.conv.bias) if block.conv.bias is not None else np.zeros(w.shape[0])
        if isinstance(block.norm, nn.BatchNorm2d):
            bn = block.norm
            s = _np(bn.weight) / np.sqrt(_np(bn.running_var) + bn.eps)
            w = w * s[:, None, None, None]
            b = (b - _np(bn.running_mean)) * s + _np(bn.bias)
        elif st.norm == "layer":
            ln = block.norm.norm
            st.ln = (_np(ln.weight), _np(ln.bias), float(ln.eps))
        st.weight, st.bias = w, b
    plan.head = _head_weights(model, plan)
    return plan


def _head_weights(model, plan: Plan) -> dict:
    pool, fc = model.head.pool, model.head.fc
    head = {"fc_w": _np(fc.weight), "fc_b": _np(fc.bias)}
    if plan.pooling.startswith("attention"):
        c = plan.tensors[-1].channels
        head.update(v_w=_np(pool.values.weight).reshape(c, c), v_b=_np(pool.values.bias),
                    s_w=_np(pool.scores.weight).reshape(c, c), s_b=_np(pool.scores.bias))
    else:
        from microser.models.wav2small import MEANSTD_EPS

        head["eps"] = MEANSTD_EPS
    return head


class _Graph:
    """Read-only helpers over an int8 QDQ ONNX graph."""

    def __init__(self, path):
        import onnx
        from onnx import numpy_helper

        self.path = Path(path)
        if not self.path.is_file():
            raise MicroserError(f"int8 ONNX model {self.path} does not exist: expected the file written by "
                                "microser.compress.quantize_int8")
        g = onnx.load(str(self.path)).graph
        self.nodes = list(g.node)
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.init[n.output[0]] = numpy_helper.to_array(a.t)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def dq(self, name: str):
        """(int array, scale, zero point) if ``name`` is a DequantizeLinear output of a constant, else None."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.input[0] not in self.init:
            return None
        zp = self.init[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(1, np.int8)
        return self.init[n.input[0]], np.asarray(self.init[n.input[1]], np.float32), np.asarray(zp)

    def act_quant(self, name: str) -> tuple[float, int] | None:
        """(scale, zero point) if the activation ``name`` is a DequantizeLinear output, else None (float)."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.input[0] in self.init:
            return None
        scale = np.asarray(self.init[n.input[1]], np.float32)
        zp = np.asarray(self.init[n.input[2]])
        if scale.size != 1 or zp.dtype != np.int8:
            raise MicroserError(f"{self.path}: activation {name!r} is quantized with shape {scale.shape} / "
                                f"{zp.dtype}: expected per-tensor int8 (microser.compress.quantize_int8)")
        return float(scale.reshape(())), int(zp.reshape(()))

    def weight(self, name: str) -> np.ndarray:
        if name in self.init:
            return np.asarray(self.init[name], np.float64)
        q = self.dq(name)
        if q is None:
            raise MicroserError(f"{self.path}: weight {name!r} is neither a constant nor a dequantized constant")
        vals, scale, zp = q
        shape = (-1,) + (1,) * (vals.ndim - 1)
        return (vals.astype(np.float64) - zp.reshape(shape)) * scale.astype(np.float64).reshape(shape)


def int8_plan(model, spec, int8_onnx_path) -> Plan:
    """The int8 plan: float plan for the float parts, scales, zero points and int8 weights read from the graph.

    Body convs are matched to the graph's Conv nodes with a k x k kernel in
    graph order, max-pools to its MaxPool nodes, the head input to the input
    of the attention score conv (or the first node of the head); names are
    not needed (bundle graphs have theirs stripped).
    """
    plan = float_plan(model, spec)
    g = _Graph(int8_onnx_path)
    k = spec.body.kernel
    convs = [n for n in g.nodes if n.op_type == "Conv" and _kernel(g, n) == (k, k)]
    pools = [n for n in g.nodes if n.op_type == "MaxPool"]
    conv_stages = [st for st in plan.stages if st.kind == "conv"]
    pool_stages = [st for st in plan.stages if st.kind == "pool"]
    if len(convs) != len(conv_stages) or len(pools) != len(pool_stages):
        raise MicroserError(f"{int8_onnx_path}: {len(convs)} {k}x{k} convs and {len(pools)} max-pools, but spec "
                            f"{spec.summary()!r} has {len(conv_stages)} and {len(pool_stages)}: expected the int8 "
                            "graph of this very model; re-run microser compress / export")
    if spec.body.norm == "layer" and any(g.dq(n.input[1]) is not None for n in convs):
        raise MicroserError(f"{int8_onnx_path}: int8 C export of body.norm 'layer' is not supported (the graph "
                            "requantizes around each LayerNormalization); export the float32 C library, or "
                            "use body.norm 'batch' or 'none'")
    consumers_of = {}
    for st, node in zip(conv_stages, convs):
        consumers_of[st.src] = node.input[0]
        q = g.dq(node.input[1])
        if q is not None:
            w, ws, wzp = q
            if w.dtype != np.int8 or np.any(wzp != 0) or ws.size != w.shape[0]:
                raise MicroserError(f"{int8_onnx_path}: conv weight {node.input[1]!r} is {w.dtype} with zero points "
                                    f"{np.unique(wzp)[:3]} and {ws.size} scales: expected int8 symmetric per-channel")
            bq = g.dq(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if bq is None or bq[0].dtype != np.int32:
                raise MicroserError(f"{int8_onnx_path}: quantized conv {node.name or node.output[0]!r} has no int32 "
                                    "bias: expected onnxruntime's QDQ conv (weight, bias both dequantized)")
            st.int8, st.weight, st.bias, st.w_scale = True, w, bq[0].astype(np.int64), ws.reshape(-1)
        else:
            st.int8 = False
            st.weight = g.weight(node.input[1])
            st.bias = g.weight(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(st.weight.shape[0])
        out = node.output[0]
        users = g.consumers.get(out, [])
        st.relu = any(u.op_type == "Relu" for u in users)
        if st.int8 and st.relu:
            raise MicroserError(f"{int8_onnx_path}: a Relu follows quantized conv {node.output[0]!r}: expected "
                                "asymmetric activations, whose QuantizeLinear clamp is the ReLU "
                                "(microser.compress.ACTIVATION_SYMMETRIC = False)")
    for st, node in zip(pool_stages, pools):
        consumers_of[st.src] = node.input[0]
    if spec.frontend.compression == "log":
        plan.log_chain, plan.log_floor = _log_chain(g, convs[0].input[0])
    head_in = _head_input(g, plan)
    consumers_of[len(plan.tensors) - 1] = head_in
    for i, t in enumerate(plan.tensors):
        if i not in consumers_of:  # the input of a pool that follows a conv is consumed by the pool: covered
            continue
        t.quant = g.act_quant(consumers_of[i])
    # a conv's output tensor that a pool reads is the pool's src: quant set above; check int8 convs write int8
    for st in conv_stages:
        if st.int8 and (plan.tensors[st.src].quant is None or plan.tensors[st.dst].quant is None):
            raise MicroserError(f"{int8_onnx_path}: quantized conv of block {st.block} reads or writes a float "
                                "tensor: expected QuantizeLinear/DequantizeLinear on both sides (QDQ format)")
    return plan


def _log_chain(g: _Graph, tensor: str) -> tuple[list[tuple[str, float]], float]:
    """The scalar Mul/Div ops between ``Log`` and the first conv's input, first op first, and the Clip floor."""
    dq = g.producer.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = g.producer[dq.input[0]]
        tensor = q.input[0]
    chain: list[tuple[str, float]] = []
    node = g.producer.get(tensor)
    while node is not None and node.op_type in ("Mul", "Div"):
        consts = [i for i in node.input if i in g.init]
        if len(consts) != 1 or np.asarray(g.init[consts[0]]).size != 1:
            break
        value = float(np.asarray(g.init[consts[0]]).reshape(()))
        if node.op_type == "Div" and node.input[1] != consts[0]:
            break
        chain.append(("mul" if node.op_type == "Mul" else "div", value))
        node = g.producer.get(next(i for i in node.input if i not in g.init))
    if node is None or node.op_type != "Log":
        raise MicroserError(f"{g.path}: the first conv does not read Log(...) through scalar Mul/Div ops: expected "
                            "the log-mel front-end of microser.frontends; re-export the model")
    clip = g.producer.get(node.input[0])
    floor = 1e-10
    if clip is not None and clip.op_type == "Clip" and len(clip.input) > 1 and clip.input[1] in g.init:
        floor = float(np.asarray(g.init[clip.input[1]]).reshape(()))
    elif clip is not None and clip.op_type == "Max":
        floor = float(np.asarray(g.init[[i for i in clip.input if i in g.init][0]]).reshape(()))
    return chain[::-1], floor


def _kernel(g: _Graph, node) -> tuple[int, ...]:
    for a in node.attribute:
        if a.name == "kernel_shape":
            return tuple(a.ints)
    try:
        return tuple(g.weight(node.input[1]).shape[2:])
    except MicroserError:
        return ()


def _head_input(g: _Graph, plan: Plan) -> str:
    """Name of the tensor the pooling head reads (the last body tensor as the head sees it)."""
    if plan.pooling.startswith("attention"):
        heads = [n for n in g.nodes if n.op_type == "Conv" and _kernel(g, n) == (1, 1)]
        if len(heads) != 2:
            raise MicroserError(f"{g.path}: expected the 2 attention 1x1 convs of the head, found {len(heads)}")
        return heads[0].input[0]
    means = [n for n in g.nodes if n.op_type == "ReduceMean"]
    if not means:
        raise MicroserError(f"{g.path}: no ReduceMean for the mean+std head")
    return means[-1].input[0] if len(means) == 1 else _first_head_mean(g, means)


def _first_head_mean(g: _Graph, means) -> str:
    # the head's mean over time reads the last body tensor; front-end ReduceMeans (clip prenorm) read audio
    body_out = [m.input[0] for m in means if g.producer.get(m.input[0]) is not None
                and g.producer[m.input[0]].op_type in ("DequantizeLinear", "Relu", "MaxPool", "Conv")]
    if not body_out:
        raise MicroserError(f"{g.path}: cannot find the mean+std head's input")
    return body_out[0]


# ---- fixed-point requantization (the int8 conv contract; C side in cgen_templates/int8_support.c) ----


def conv_scales(plan: Plan, st: Stage) -> np.ndarray:
    """Per-output-channel float32 requantization scales of an int8 conv, in onnxruntime's order and precision:
    ``(x_scale * w_scale[c]) / y_scale``, each step rounded to float32 (as QLinearConv computes them)."""
    xs = np.float32(plan.tensors[st.src].quant[0])
    ys = np.float32(plan.tensors[st.dst].quant[0])
    return ((xs * st.w_scale.astype(np.float32)).astype(np.float32) / ys).astype(np.float32)


def fixed_multiplier(scale) -> tuple[int, int]:
    """``(mult, shift)`` with ``mult * 2**-shift == scale`` exactly, ``2**30 <= mult < 2**31``, ``1 <= shift <= 62``.

    A float32 scale has a 24-bit mantissa, so a 31-bit multiplier holds it without rounding: the C requant()
    computes ``round(acc * scale)`` of the exact real product (ties to even). Scales below ``2**-32`` map to
    ``(0, 1)`` (every int32 accumulator then rounds to 0, exactly as the real product does).

    >>> fixed_multiplier(0.75)
    (1610612736, 31)
    """
    value = float(np.float32(scale))
    if not math.isfinite(value) or value < 0:
        raise MicroserError(f"requantization scale {value!r} is not a finite non-negative number: expected the "
                            "scales of a calibrated int8 graph; re-run microser compress")
    if value == 0.0:
        return 0, 1
    m, e = math.frexp(value)  # value = m * 2**e, 0.5 <= m < 1
    mult, shift = int(m * 2**31), 31 - e
    if shift > 62:
        return 0, 1
    if shift < 1:
        raise MicroserError(f"requantization scale {value:g} is >= 2**30: the int8 conv's output scale is far "
                            "smaller than its input's, expected a calibrated int8 graph; re-run microser compress")
    assert mult * 2.0**-shift == value
    return mult, shift


def _narrow(plan: Plan, st: Stage) -> bool:
    """Whether every requantization shift of an int8 conv is in 33..62 (scales below 2**-2): the 32-bit requant()
    handles it; otherwise the stage uses requant_wide()."""
    return all(fixed_multiplier(sc)[1] >= 33 for sc in conv_scales(plan, st))


def requantize_reference(acc, scales, zero_point: int) -> np.ndarray:
    """What the C requant() returns, in Python integers: ``clamp(round_half_even(acc * scale) + zp, -128, 127)``.

    ``acc`` (..., C) int32 values, ``scales`` (C,) float32 (the last axis is the channel). Exact: ``acc * mult``
    fits int64, then it is shifted with ties to even.
    """
    acc = np.asarray(acc, dtype=np.int64)
    pairs = np.array([fixed_multiplier(sc) for sc in np.asarray(scales, np.float32).reshape(-1)], dtype=np.int64)
    p = acc * pairs[:, 0]  # |acc| < 2**31 and mult < 2**31: exact in int64
    shift = pairs[:, 1]
    q = p >> shift  # floor
    rem = p - (q << shift)
    half = np.left_shift(1, shift - 1)
    out = q + ((rem > half) | ((rem == half) & (q % 2 == 1)))
    return np.clip(out + int(zero_point), -128, 127).astype(np.int8)


# ---- C emission ----


def _flit(x) -> str:
    """A C float literal that round-trips float32 exactly."""
    v = float(np.float32(x))
    if not math.isfinite(v):
        raise MicroserError(f"cannot write non-finite weight {v} into C: expected finite weights; check the model")
    s = f"{v:.9g}"
    if not any(ch in s for ch in ".en"):
        s += ".0"
    return s + "f"


def _array(ctype: str, name: str, values, per_line: int = 8) -> str:
    vals = np.asarray(values).reshape(-1)
    if ctype == "float":
        items = [_flit(v) for v in vals]
    else:
        items = [str(int(v)) for v in vals]
    if not items:
        items = ["0"]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return f"static const {ctype} {name}[{len(items)}] = {{\n    " + ",\n    ".join(lines) + "\n};\n"


def _factors(n: int) -> list[int]:
    out = []
    while n % 4 == 0 and n > 4:
        out.append(4)
        n //= 4
    for p in (4, 2, 3, 5):
        while n % p == 0 and n > 1:
            out.append(p)
            n //= p
    p = 7
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 2
    return out or [1]


def _qparams(t: Tensor) -> tuple[str, str]:
    scale, zp = t.quant
    return _flit(scale), str(zp)


class _Emitter:
    """Writes the header and source of one variant (float32 or int8) of a plan."""

    def __init__(self, plan: Plan, prefix: str, variant: str):
        self.plan, self.P, self.variant = plan, prefix, variant
        self.fe = plan.fe
        self.N = self.fe.n_fft
        self.real = self.N % 2 == 0
        self.M = self.N // 2 if self.real else self.N
        self.nf = self.N // 2 + 1
        self.members = _members(plan)
        sizes = state_bytes(plan)
        raw = sum(_SIZES[t] * n for t, _, n, _ in self.members)
        self.pad = sizes["state"] - raw
        self.arena = _arena_floats(plan)
        self.state_bytes = sizes["state"]
        self.arena_bytes = 4 * self.arena

    # -- header --
    def header(self) -> str:
        P, U = self.P, self.P.upper()
        fe, plan = self.fe, self.plan
        lines = [f"/* {P}.h: generated by microser.cgen ({self.variant}) for {plan.spec.summary()} */",
                 f"/* Streaming A/D/V inference from raw {SAMPLE_RATE} Hz float samples. C99, no malloc, no globals. */",
                 f"#ifndef {U}_H", f"#define {U}_H", "", "#include <stdint.h>", "",
                 f"#define {U}_SAMPLE_RATE {SAMPLE_RATE}",
                 f"#define {U}_N_OUTPUTS 3 /* {', '.join(TARGETS)} (the model's linear head, about 0..1) */",
                 f"#define {U}_STATE_BYTES {self.state_bytes} /* persistent streaming state */",
                 f"#define {U}_ARENA_BYTES {self.arena_bytes} /* scratch arena inside the state */",
                 f"#define {U}_RAM_BYTES {self.state_bytes + self.arena_bytes} /* == sizeof({P}_state) */",
                 f"#define {U}_MIN_SAMPLES {self._min_samples()} /* shorter input: result() returns -1 */",
                 f"#define {U}_TWO_PASS {1 if fe.prenorm == 'clip' else 0} /* 1: call {P}_prescan first (prenorm clip) */",
                 "", "typedef struct {"]
        for ctype, name, n, comment in self.members:
            dim = f"[{n}]" if n != 1 or name.startswith("ring") else ""
            lines.append(f"    {ctype} {name}{dim}; /* {comment} */")
        if self.pad:
            lines.append(f"    int8_t pad_[{self.pad}]; /* keeps the arena 8-byte aligned on every ABI */")
        lines.append(f"    union {{ float f[{self.arena}]; int32_t i[{self.arena}]; int16_t h[{2 * self.arena}]; "
                     f"int8_t b[{4 * self.arena}]; }} arena; /* scratch, meaningless between calls */")
        lines += [f"}} {P}_state;", "",
                  f"/* Start an utterance (zeroes the state). */",
                  f"void {P}_init({P}_state *st);",
                  f"/* Same as init: forget everything pushed. */",
                  f"void {P}_reset({P}_state *st);",
                  f"/* Push n >= 0 samples (float, {SAMPLE_RATE} Hz, about -1..1). 0 ok; -1 after result() (call reset); "
                  "-2 before prescan (two-pass specs). */",
                  f"int {P}_push({P}_state *st, const float *samples, int n);",
                  f"/* Final outputs for everything pushed; flushes the end padding, so the state is finished after it.",
                  f"   For a running estimate copy the state (plain data) and call result on the copy.",
                  f"   0 ok; -1 too short (fewer than {U}_MIN_SAMPLES samples: out3 is set to 0); -3 two-pass "
                  "sample counts differ. */",
                  f"int {P}_result({P}_state *st, float out3[3]);"]
        if fe.prenorm == "clip":
            lines += [f"/* Two-pass prenorm 'clip': push the WHOLE utterance here first, then push it again with "
                      f"{P}_push. */",
                      f"int {P}_prescan({P}_state *st, const float *samples, int n);"]
        lines += ["", f"#endif /* {U}_H */", ""]
        return "\n".join(lines)

    def _min_samples(self) -> int:
        """Fewest samples for which every stage yields at least one row (found by stepping the shape plan)."""
        from microser.frontends import num_frames

        n = 1
        while True:
            rows = num_frames(self.fe, n)
            ok = rows > 0
            for st in self.plan.stages:
                rows = (rows + 2 * st.p - st.k) // st.s + 1 if rows + 2 * st.p - st.k >= 0 else 0
                ok = ok and rows > 0
            if ok:
                return n
            n += 1

    # -- source --
    def source(self) -> str:
        P = self.P
        out = [f"/* {P}.c: generated by microser.cgen ({self.variant}) for {self.plan.spec.summary()} */",
               "/* Exact streaming computation of the offline model; see microser/cgen.py for the scheme. */",
               f'#include "{P}.h"', "#include <math.h>", "#include <string.h>", "",
               f"typedef char {P}_layout_check[(sizeof({P}_state) == {P.upper()}_RAM_BYTES) ? 1 : -1];", ""]
        if any(st.kind == "conv" and st.int8 for st in self.plan.stages):
            wide = any(not _narrow(self.plan, st) for st in self.plan.stages if st.kind == "conv" and st.int8)
            out.append(_template("int8_support.c").substitute(
                wide=(TEMPLATES / "requant_wide.c").read_text() if wide else ""))
        out.append(self._tables())
        out.append(self._quant_fn())
        out.append(self._trace())
        int8_convs = [st for st in self.plan.stages if st.kind == "conv" and st.int8]
        if int8_convs:
            for cond, align in (("#if MICROSER_SIMD", TAP_ALIGN_DSP), ("#else", TAP_ALIGN_PORTABLE)):
                out.append(cond)
                kps = sorted({st.padded_taps(align) for st in int8_convs})
                out += [_template("mm_s8.c").substitute(kp=kp) for kp in kps]
            out.append("#endif")
        out.append(self._fft())
        for i in reversed(range(len(self.plan.stages))):
            out.append(self._stage_decl(i))
        out.append(self._head_push())
        for i in range(len(self.plan.stages)):
            out.append(self._stage(i))
        out.append(self._frame())
        out.append(self._api())
        return "\n".join(out)

    def _tables(self) -> str:
        plan, fe, N, M = self.plan, self.fe, self.N, self.M
        t = []
        k = np.arange(M)
        t.append(_array("float", "TW_RE", np.cos(2 * np.pi * k / M)))
        t.append(_array("float", "TW_IM", -np.sin(2 * np.pi * k / M)))
        if self.real:
            kk = np.arange(M + 1)
            t.append(_array("float", "RT_RE", np.cos(2 * np.pi * kk / N)))
            t.append(_array("float", "RT_IM", -np.sin(2 * np.pi * kk / N)))
        t.append(_array("int", "FFT_FACTORS", _factors(M)))
        t.append(_array("float", "WINDOW", plan.window))
        t.append(_array("uint16_t", "MEL_START", plan.mel.start, 16))
        t.append(_array("uint16_t", "MEL_LEN", plan.mel.length, 16))
        t.append(_array("float", "MEL_W", plan.mel.weights))
        if fe.prenorm == "window":
            t.append(_array("float", "WSPEC", plan.window_spectrum))
        if fe.compression == "pcen":
            t.append(_array("float", "PCEN_H", plan.pcen_fir))
        for i, st in enumerate(plan.stages):
            if st.kind != "conv":
                continue
            if st.int8:
                dsp, portable = st.padded_taps(TAP_ALIGN_DSP), st.padded_taps(TAP_ALIGN_PORTABLE)
                t.append(f"#if MICROSER_SIMD /* taps padded to {dsp}; groups of 4 as (k, k+2, k+1, k+3) for SXTB16 */\n"
                         f"#define KP{i} {dsp}\n#define MM{i} mm{dsp}\n"
                         + _array("int8_t", f"W{i}", conv_weight_rows(st, TAP_ALIGN_DSP, dual=True), 16)
                         + f"#else /* taps padded to {portable} */\n"
                         f"#define KP{i} {portable}\n#define MM{i} mm{portable}\n"
                         + _array("int8_t", f"W{i}", conv_weight_rows(st, TAP_ALIGN_PORTABLE), 16) + "#endif\n")
                t.append(_array("int32_t", f"B{i}", np.append(st.bias, [0] * (len(st.bias) % 2))))
                mult, shift = zip(*(fixed_multiplier(sc) for sc in conv_scales(plan, st)))
                t.append(_array("int32_t", f"M{i}", mult))
                narrow = _narrow(plan, st)  # requant() takes shift - 32, requant_wide() the shift
                t.append(_array("uint8_t", f"R{i}", [r - 32 if narrow else r for r in shift], 16))
            else:
                t.append(_array("float", f"W{i}", st.weight))
                t.append(_array("float", f"B{i}", st.bias))
            if st.ln is not None:
                t.append(_array("float", f"LNG{i}", st.ln[0]))
                t.append(_array("float", f"LNB{i}", st.ln[1]))
        h = plan.head
        if plan.pooling.startswith("attention"):
            t += [_array("float", "HV_W", h["v_w"]), _array("float", "HV_B", h["v_b"]),
                  _array("float", "HS_W", h["s_w"]), _array("float", "HS_B", h["s_b"])]
        t += [_array("float", "FC_W", h["fc_w"]), _array("float", "FC_B", h["fc_b"])]
        return "\n".join(t)

    def _fft(self) -> str:
        M = self.M
        nfac = len(_factors(M))
        final = "x" if nfac % 2 == 0 else "y"
        return f"""
/* Complex FFT of {M} points: iterative Stockham autosort, mixed radix (factors in FFT_FACTORS), no recursion.
   Input in (xr, xi); the output lands in ({final}r, {final}i); both buffers are overwritten. */
static void fft(float *xr, float *xi, float *yr, float *yi)
{{
    int n = {M}, s = 1, f, i, q, k, r;
    for (f = 0; f < {nfac}; f++) {{
        const int p = FFT_FACTORS[f], m = n / p, tw = {M} / n;
        for (i = 0; i < m; i++) {{
            for (q = 0; q < s; q++) {{
                if (p == 2) {{
                    const float ar = xr[q + s * i], ai = xi[q + s * i];
                    const float br = xr[q + s * (i + m)], bi = xi[q + s * (i + m)];
                    const float dr = ar - br, di = ai - bi, wr = TW_RE[i * tw], wi = TW_IM[i * tw];
                    yr[q + s * (2 * i)] = ar + br;
                    yi[q + s * (2 * i)] = ai + bi;
                    yr[q + s * (2 * i + 1)] = dr * wr - di * wi;
                    yi[q + s * (2 * i + 1)] = dr * wi + di * wr;
                }} else if (p == 4) {{
                    const float a0r = xr[q + s * i], a0i = xi[q + s * i];
                    const float a1r = xr[q + s * (i + m)], a1i = xi[q + s * (i + m)];
                    const float a2r = xr[q + s * (i + 2 * m)], a2i = xi[q + s * (i + 2 * m)];
                    const float a3r = xr[q + s * (i + 3 * m)], a3i = xi[q + s * (i + 3 * m)];
                    const float t0r = a0r + a2r, t0i = a0i + a2i, t1r = a0r - a2r, t1i = a0i - a2i;
                    const float t2r = a1r + a3r, t2i = a1i + a3i, t3r = a1i - a3i, t3i = a3r - a1r;
                    float vr[4], vi[4];
                    vr[0] = t0r + t2r; vi[0] = t0i + t2i;
                    vr[1] = t1r + t3r; vi[1] = t1i + t3i;
                    vr[2] = t0r - t2r; vi[2] = t0i - t2i;
                    vr[3] = t1r - t3r; vi[3] = t1i - t3i;
                    for (k = 0; k < 4; k++) {{
                        const float wr = TW_RE[i * k * tw], wi = TW_IM[i * k * tw];
                        yr[q + s * (4 * i + k)] = vr[k] * wr - vi[k] * wi;
                        yi[q + s * (4 * i + k)] = vr[k] * wi + vi[k] * wr;
                    }}
                }} else {{
                    for (k = 0; k < p; k++) {{
                        float accr = 0.0f, acci = 0.0f;
                        for (r = 0; r < p; r++) {{
                            const int t = (r * k * ({M} / p)) % {M};
                            const float br = xr[q + s * (i + r * m)], bi = xi[q + s * (i + r * m)];
                            accr += br * TW_RE[t] - bi * TW_IM[t];
                            acci += br * TW_IM[t] + bi * TW_RE[t];
                        }}
                        {{
                            const float wr = TW_RE[i * k * tw], wi = TW_IM[i * k * tw];
                            yr[q + s * (p * i + k)] = accr * wr - acci * wi;
                            yi[q + s * (p * i + k)] = accr * wi + acci * wr;
                        }}
                    }}
                }}
            }}
        }}
        n = m;
        s *= p;
        {{ float *t = xr; xr = yr; yr = t; t = xi; xi = yi; yi = t; }}
    }}
}}
"""

    # -- stages --
    def _ctype(self, t: Tensor) -> str:
        return "float" if t.quant is None else "int8_t"

    def _stage_decl(self, i: int) -> str:
        return f"static void s{i}_push({self.P}_state *st);"

    def _dest(self, i: int) -> tuple[str, str]:
        """(C declaring ``dst``, the output row of stage i; C statements delivering it: the trace hook for int8
        rows, then the next stage, or the head, which reads the last row in float: dequantized when int8)."""
        plan = self.plan
        d = plan.stages[i].dst
        t = plan.tensors[d]
        trace = f"    TRACE({d}, j, dst, {t.row});\n" if t.quant is not None else ""
        if i + 1 < len(plan.stages):
            nst = plan.stages[i + 1]
            decl = f"{self._ctype(t)} *dst = st->ring{i + 1} + (st->n{i + 1} % {nst.k}) * {t.row};"
            return decl, f"{trace}    s{i + 1}_push(st);"
        arena = body_arena(plan)
        if t.quant is None:
            return f"float *dst = st->arena.f + {arena.hrow};", "    head_push(st, dst);"
        s, zp = _qparams(t)
        return (f"int8_t *dst = st->arena.b + {arena.i8_bytes};",
                f"""{trace}    {{ /* DequantizeLinear: the head reads floats */
        float *hrow = st->arena.f + {arena.hrow};
        int e;
        for (e = 0; e < {t.row}; e++) hrow[e] = (float)((int)dst[e] - ({zp})) * {s};
        head_push(st, hrow);
    }}""")

    def _store(self, i: int, value: str, index: str) -> str:
        """C statement storing float `value` at `index` of the stage's output (quantizing when it is int8)."""
        t = self.plan.tensors[self.plan.stages[i].dst]
        if t.quant is None:
            return f"dst[{index}] = {value};"
        s, zp = _qparams(t)
        return f"dst[{index}] = (int8_t)quant({value}, {s}, {zp});"

    def _conv_s8(self, i: int) -> str:
        """An int8 conv stage from cgen_templates/conv_s8.c: im2col pairs, the 2x2 dual-MAC kernel, requant()."""
        plan, st = self.plan, self.plan.stages[i]
        src, dst = plan.tensors[st.src], plan.tensors[st.dst]
        k, xzp = st.k, src.quant[1]
        decl, deliver = self._dest(i)
        unrolled = "\n".join(f"                    c[{d}] = (int16_t)(x[base + {d}] - ({xzp}));" for d in range(k))
        return _template("conv_s8.c").substitute(
            i=i, P=self.P, block=st.block, cin=src.channels, fin=src.bands, cout=dst.channels, fout=dst.bands,
            k=k, s=st.s, p=st.p, kk=st.taps, kk_ci=k * k, row=src.row, xzp=xzp,
            yzp=dst.quant[1], unrolled=unrolled, requant="requant" if _narrow(plan, st) else "requant_wide",
            dst=decl.split("=", 1)[1].strip().rstrip(";"), deliver=deliver)

    def _stage(self, i: int) -> str:
        plan, P = self.plan, self.P
        st = plan.stages[i]
        src, dst = plan.tensors[st.src], plan.tensors[st.dst]
        K, S, Pd = st.k, st.s, st.p
        fin, fout, cin, cout = src.bands, dst.bands, src.channels, dst.channels
        if st.kind == "conv" and st.int8:
            return self._conv_s8(i) + self._stage_push(i)
        decl, deliver = self._dest(i)
        last = i + 1 == len(plan.stages)
        body = []
        if st.kind == "conv":
            body.append(self._conv_body(i, st, src, dst, decl, last))
        else:
            body.append(self._pool_body(i, st, src, dst, decl, last))
        return f"""
/* stage {i}: {st.kind} of block {st.block}, {cin}x{fin} -> {cout}x{fout} per row, kernel {K}, stride {S}, pad {Pd} */
static void s{i}_row({P}_state *st, int32_t j)
{{
    const int32_t n = st->n{i}, r0 = j * {S} - {Pd};
    const int dt_lo = r0 < 0 ? (int)-r0 : 0;
    const int dt_hi = r0 + {K} > n ? (int)(n - r0) : {K};
{body[0]}
{deliver}
}}
""" + self._stage_push(i)

    def _stage_push(self, i: int) -> str:
        st, P = self.plan.stages[i], self.P
        K, S, Pd = st.k, st.s, st.p
        return f"""
static void s{i}_push({P}_state *st)
{{
    const int32_t r = st->n{i}++, t = r + {Pd} - {K} + 1;
    if (t >= 0 && t % {S} == 0) {{
        st->next{i} = t / {S} + 1;
        s{i}_row(st, t / {S});
    }}
}}

static void s{i}_flush({P}_state *st)
{{
    const int32_t len = st->n{i} + {2 * Pd - K};
    const int32_t nout = len >= 0 ? len / {S} + 1 : 0;
    while (st->next{i} < nout) {{
        const int32_t j = st->next{i}++;
        s{i}_row(st, j);
    }}
}}
"""

    def _conv_body(self, i, st, src, dst, decl, last) -> str:
        """A float conv (float32 library, or a conv the int8 graph keeps float): one register accumulator per
        output element; the interior band's taps unrolled."""
        K, S, Pd = st.k, st.s, st.p
        fin, fout, cin, cout = src.bands, dst.bands, src.channels, dst.channels
        ring = f"st->ring{i}"
        if src.quant is None:
            inner = "acc += w[df] * x[base + df];"
        else:
            xs, xzp = _qparams(src)
            inner = f"acc += w[df] * ((float)((int)x[base + df] - ({xzp})) * {xs});"
        acc_decl = f"float acc = B{i}[co];"
        xtype = self._ctype(src)
        if st.ln is not None:
            finish = f"tmp[co * {fout} + fo] = acc;"
        else:
            v = "(acc > 0.0f ? acc : 0.0f)" if st.relu else "acc"
            finish = self._store(i, v, f"co * {fout} + fo")
        unrolled = " ".join(inner.replace("[df]", f"[{d}]").replace("+ df]", f"+ {d}]") for d in range(K))
        code = f"""    {decl}
    int co, fo;
    for (co = 0; co < {cout}; co++) {{
        for (fo = 0; fo < {fout}; fo++) {{
            const int f0 = fo * {S} - {Pd};
            const int df_lo = f0 < 0 ? -f0 : 0, df_hi = f0 + {K} > {fin} ? {fin} - f0 : {K};
            int dt, ci, df;
            {acc_decl}
            for (dt = dt_lo; dt < dt_hi; dt++) {{
                const {xtype} *x = {ring} + ((r0 + dt) % {K}) * {src.row};
                if (df_lo == 0 && df_hi == {K}) {{ /* interior band: the {K} taps unrolled */
                    for (ci = 0; ci < {cin}; ci++) {{
                        const float *w = W{i} + ((co * {cin} + ci) * {K} + dt) * {K};
                        const int base = ci * {fin} + f0;
                        {unrolled}
                    }}
                    continue;
                }}
                for (ci = 0; ci < {cin}; ci++) {{
                    const float *w = W{i} + ((co * {cin} + ci) * {K} + dt) * {K};
                    const int base = ci * {fin} + f0;
                    for (df = df_lo; df < df_hi; df++)
                        {inner}
                }}
            }}
            {finish}
        }}
    }}"""
        if st.ln is not None:
            n = cout * fout
            v = "(y > 0.0f ? y : 0.0f)" if st.relu else "y"
            code = code.replace(f"    {decl}\n", f"    {decl}\n    float *tmp = st->arena.f;\n", 1)
            code += f"""
    {{ /* LayerNorm over (channels, bands) of this row, then ReLU */
        float mean = 0.0f, var = 0.0f;
        int e;
        for (e = 0; e < {n}; e++) mean += tmp[e];
        mean /= {float(n)}f;
        for (e = 0; e < {n}; e++) var += (tmp[e] - mean) * (tmp[e] - mean);
        var /= {float(n)}f;
        {{
            const float inv = 1.0f / sqrtf(var + {_flit(st.ln[2])});
            for (e = 0; e < {n}; e++) {{
                const float y = (tmp[e] - mean) * inv * LNG{i}[e] + LNB{i}[e];
                {self._store(i, v, 'e')}
            }}
        }}
    }}"""
        return code

    def _pool_body(self, i, st, src, dst, decl, last) -> str:
        K, S, Pd = st.k, st.s, st.p
        fin, fout, c = src.bands, dst.bands, src.channels
        ctype = self._ctype(src)
        if src.quant == dst.quant:
            store = "dst[c * %d + fo] = m;" % fout
        elif src.quant is None:
            store = self._store(i, "m", f"c * {fout} + fo")
        else:
            s, zp = _qparams(src)
            store = self._store(i, f"((float)((int)m - ({zp})) * {s})", f"c * {fout} + fo")
        return f"""    {decl}
    int c, fo;
    for (c = 0; c < {c}; c++) {{
        for (fo = 0; fo < {fout}; fo++) {{
            const int f0 = fo * {S} - {Pd};
            const int df_lo = f0 < 0 ? -f0 : 0, df_hi = f0 + {K} > {fin} ? {fin} - f0 : {K};
            int dt, df, first = 1;
            {ctype} m = 0;
            for (dt = dt_lo; dt < dt_hi; dt++) {{
                const {ctype} *x = st->ring{i} + ((r0 + dt) % {K}) * {src.row} + c * {fin} + f0;
                for (df = df_lo; df < df_hi; df++)
                    if (first || x[df] > m) {{ m = x[df]; first = 0; }}
            }}
            {store}
        }}
    }}"""

    def _head_push(self) -> str:
        plan, P = self.plan, self.P
        t = plan.tensors[-1]
        C, F = t.channels, t.bands
        code = [f"""
/* Pooling head, fed one float row (C={C} x F={F}) at a time. */
static void head_push({P}_state *st, const float *x)
{{
    int c, f, ci;
    (void)ci; (void)f;"""]
        if plan.pooling.startswith("attention"):
            code.append(f"""    for (c = 0; c < {C}; c++) {{
        for (f = 0; f < {F}; f++) {{
            float v = HV_B[c], s = HS_B[c];
            const int e = c * {F} + f;
            for (ci = 0; ci < {C}; ci++) {{
                v += HV_W[c * {C} + ci] * x[ci * {F} + f];
                s += HS_W[c * {C} + ci] * x[ci * {F} + f];
            }}
            if (st->head_rows == 0) {{
                st->att_max[e] = s; st->att_sum[e] = 1.0f; st->att_acc[e] = v;
            }} else if (s > st->att_max[e]) {{
                const float r = expf(st->att_max[e] - s);
                st->att_sum[e] = st->att_sum[e] * r + 1.0f;
                st->att_acc[e] = st->att_acc[e] * r + v;
                st->att_max[e] = s;
            }} else {{
                const float r = expf(s - st->att_max[e]);
                st->att_sum[e] += r;
                st->att_acc[e] += r * v;
            }}
        }}
    }}""")
            if plan.pooling == "attention+gram":
                code.append(f"""    {{
        int c2, g = 0;
        for (c = 0; c < {C}; c++) {{
            for (c2 = c; c2 < {C}; c2++) {{
                float acc = 0.0f;
                for (f = 0; f < {F}; f++) acc += x[c * {F} + f] * x[c2 * {F} + f];
                st->gram[g++] += acc;
            }}
        }}
    }}""")
        else:
            code.append(f"""    {{
        const float inv = 1.0f / (float)(st->head_rows + 1);
        for (c = 0; c < {C * F}; c++) {{
            const float d = x[c] - st->ms_mean[c];
            st->ms_mean[c] += d * inv;
            st->ms_m2[c] += d * (x[c] - st->ms_mean[c]);
        }}
    }}""")
        code.append("    st->head_rows++;\n}")
        # final
        nfeat = {"attention+gram": C * F + C * C, "attention": C * F, "meanstd": 2 * C * F}[plan.pooling]
        fin = [f"""
static void head_final({P}_state *st, float out3[3])
{{
    float *feat = st->arena.f;
    int c, k;"""]
        if plan.pooling.startswith("attention"):
            fin.append(f"    for (c = 0; c < {C * F}; c++) feat[c] = st->att_acc[c] / st->att_sum[c];")
            if plan.pooling == "attention+gram":
                fin.append(f"""    {{
        const float tf = (float)st->head_rows * {float(F)}f;
        int c2, g = 0;
        for (c = 0; c < {C}; c++) {{
            for (c2 = c; c2 < {C}; c2++, g++) {{
                feat[{C * F} + c * {C} + c2] = st->gram[g] / tf;
                feat[{C * F} + c2 * {C} + c] = st->gram[g] / tf;
            }}
        }}
    }}""")
        else:
            fin.append(f"""    {{
        const float n = (float)st->head_rows;
        for (c = 0; c < {C * F}; c++) {{
            feat[c] = st->ms_mean[c];
            feat[{C * F} + c] = sqrtf(st->ms_m2[c] / n + {_flit(plan.head['eps'])});
        }}
    }}""")
        fin.append(f"""    for (k = 0; k < 3; k++) {{
        float acc = FC_B[k];
        for (c = 0; c < {nfeat}; c++) acc += FC_W[k * {nfeat} + c] * feat[c];
        out3[k] = acc;
    }}
}}""")
        return "\n".join(code) + "\n" + "\n".join(fin)

    # -- front-end --
    def _frame(self) -> str:
        plan, fe, P = self.plan, self.fe, self.P
        N, M, nf = self.N, self.M, self.nf
        nm = fe.n_mels
        st0 = plan.stages[0]
        t0 = plan.tensors[0]
        nfac = len(_factors(M))
        o = "x" if nfac % 2 == 0 else "y"
        c = [f"""
/* One analysis frame (st->frame, {N} samples) -> one feature row -> stage 0. */
static void process_frame({P}_state *st)
{{
    float *xr = st->arena.f, *xi = xr + {M}, *yr = xr + {2 * M}, *yi = xr + {3 * M};
    float *pw = xr + {4 * M}, *mel = pw + {nf}, *feat = mel + {nm};
    int k, b;"""]
        if fe.prenorm == "window":
            c.append(f"""    float wm, wden;
    {{ /* per-frame mean and std of the {N} samples, removed in the spectrum as the PyTorch graph does */
        double s1 = 0.0, s2 = 0.0;
        float m2;
        for (k = 0; k < {N}; k++) {{ s1 += st->frame[k]; s2 += (double)(st->frame[k] * st->frame[k]); }}
        wm = (float)(s1 / {N}.0);
        m2 = (float)(s2 / {N}.0);
        m2 = m2 - wm * wm;
        wden = sqrtf(m2 > 0.0f ? m2 : 0.0f) + {_flit(1e-7)};
    }}""")
        if self.real:
            c.append(f"""    for (k = 0; k < {M}; k++) {{
        xr[k] = st->frame[2 * k] * WINDOW[2 * k];
        xi[k] = st->frame[2 * k + 1] * WINDOW[2 * k + 1];
    }}
    fft(xr, xi, yr, yi);
    for (k = 0; k <= {M}; k++) {{ /* split the packed real FFT: X[k] = E[k] + W^k O[k] */
        const int a = k % {M}, bb = ({M} - k) % {M};
        const float zr = {o}r[a], zi = {o}i[a], cr = {o}r[bb], ci = -{o}i[bb];
        const float er = 0.5f * (zr + cr), ei = 0.5f * (zi + ci);
        const float or_ = 0.5f * (zi - ci), oi = -0.5f * (zr - cr);
        float re = er + RT_RE[k] * or_ - RT_IM[k] * oi;
        float im = ei + RT_RE[k] * oi + RT_IM[k] * or_;""")
        else:
            c.append(f"""    for (k = 0; k < {M}; k++) {{ xr[k] = st->frame[k] * WINDOW[k]; xi[k] = 0.0f; }}
    fft(xr, xi, yr, yi);
    for (k = 0; k < {nf}; k++) {{
        float re = {o}r[k], im = {o}i[k];""")
        if fe.prenorm == "window":
            c.append("""        re = (re - wm * WSPEC[2 * k]) / wden;
        im = (im - wm * WSPEC[2 * k + 1]) / wden;""")
        c.append("""        pw[k] = re * re + im * im;
    }""")
        c.append(f"""    {{
        int off = 0;
        for (b = 0; b < {nm}; b++) {{
            float acc = 0.0f;
            for (k = 0; k < MEL_LEN[b]; k++) acc += pw[MEL_START[b] + k] * MEL_W[off + k];
            off += MEL_LEN[b];
            mel[b] = acc;
        }}
    }}""")
        if fe.compression == "log" and plan.log_chain is None:
            c.append(f"""    for (b = 0; b < {nm}; b++)
        feat[b] = 10.0f * log10f(mel[b] > {_flit(1e-10)} ? mel[b] : {_flit(1e-10)});""")
        elif fe.compression == "log":  # the int8 graph's own arithmetic (scalars folded by the exporter)
            ops = "".join(f" {'*' if op == 'mul' else '/'} {_flit(v)}" for op, v in plan.log_chain)
            fl = _flit(plan.log_floor)
            c.append(f"""    for (b = 0; b < {nm}; b++) {{
        float v = logf(mel[b] > {fl} ? mel[b] : {fl});
        feat[b] = v{ops};
    }}""")
        else:
            from microser.frontends import PCEN_ALPHA, PCEN_DELTA, PCEN_EPS, PCEN_R

            L = len(plan.pcen_fir)
            c.append(f"""    {{ /* PCEN: causal FIR smoother over the last {L} mel rows (ring), zeros before the first */
        const int32_t t = st->pcen_n++;
        int d;
        memcpy(st->pcen_ring + (t % {L}) * {nm}, mel, {nm} * sizeof(float));
        for (b = 0; b < {nm}; b++) {{
            float sm = 0.0f;
            for (d = (t < {L - 1} ? {L - 1} - (int)t : 0); d < {L}; d++)
                sm += PCEN_H[d] * st->pcen_ring[((t - {L - 1} + d) % {L}) * {nm} + b];
            feat[b] = powf(mel[b] / powf({_flit(PCEN_EPS)} + sm, {_flit(PCEN_ALPHA)}) + {_flit(PCEN_DELTA)}, {_flit(PCEN_R)})
                      - {_flit(PCEN_DELTA ** PCEN_R)};
        }}
    }}""")
        row = f"(st->n0 % {st0.k}) * {t0.row}"
        if t0.quant is None:
            c.append(f"    memcpy(st->ring0 + {row}, feat, {nm} * sizeof(float));")
        else:
            s, zp = _qparams(t0)
            c.append(f"""    {{
        int8_t *dst = st->ring0 + {row};
        for (b = 0; b < {nm}; b++) dst[b] = (int8_t)quant(feat[b], {s}, {zp});
        TRACE(0, st->n0, dst, {nm});
    }}""")
        c.append("    s0_push(st);\n}")
        fill = self._feed()
        return "\n".join(c) + "\n" + fill

    def _feed(self) -> str:
        fe, P, N, hop = self.fe, self.P, self.N, self.fe.hop
        if hop < N:
            after = f"""        memmove(st->frame, st->frame + {hop}, {N - hop} * sizeof(float));
        st->frame_fill = {N - hop};"""
        else:
            after = f"""        st->frame_fill = 0;
        st->frame_skip = {hop - N};"""
        return f"""
/* One sample of the (prenormalised, zero-padded) signal into the framer. */
static void feed({P}_state *st, float y)
{{
    if (st->frame_skip > 0) {{
        st->frame_skip--;
        return;
    }}
    st->frame[st->frame_fill++] = y;
    if (st->frame_fill == {N}) {{
        process_frame(st);
{after}
    }}
}}
"""

    def _api(self) -> str:
        from microser.frontends import PRENORM_EPS, PRENORM_PRIOR_COUNT, PRENORM_PRIOR_VAR, frame_padding

        fe, P, plan = self.fe, self.P, self.plan
        left, right = frame_padding(fe)
        U = P.upper()
        if fe.prenorm == "running":  # the prior's float terms (microser.frontends), left out when zero
            n0 = f" + {_flit(PRENORM_PRIOR_COUNT)}" if PRENORM_PRIOR_COUNT else ""
            n0v0 = f" + {_flit(PRENORM_PRIOR_COUNT * PRENORM_PRIOR_VAR)}" if PRENORM_PRIOR_COUNT * PRENORM_PRIOR_VAR else ""
            pre = f"""        st->pn_count++;
        st->pn_sum += (double)x;
        st->pn_sumsq += (double)(x * x);
        {{ /* torch: cumsum (double accumulation, float result) / count, var clamped at 0 */
            const float cnt = (float)st->pn_count{n0}, mu = (float)st->pn_sum / cnt;
            float var = ((float)st->pn_sumsq{n0v0}) / cnt - mu * mu;
            if (var < 0.0f) var = 0.0f;
            y = (x - mu) / (sqrtf(var) + {_flit(PRENORM_EPS)});
        }}"""
        elif fe.prenorm == "clip":
            pre = """        st->clip_count++;
        y = (x - st->clip_mean) / st->clip_den;"""
        else:
            pre = "        y = x;"
        flush_stages = "\n".join(f"    s{i}_flush(st);" for i in range(len(plan.stages)))
        prescan = ""
        push_guard = "    if (st->finished) return -1;"
        result_guard = ""
        if fe.prenorm == "clip":
            prescan = f"""
int {P}_prescan({P}_state *st, const float *samples, int n)
{{
    int i;
    if (st->finished || st->clip_count > 0) return -1;
    for (i = 0; i < n; i++) {{
        st->pn_count++;
        st->pn_sum += (double)samples[i];
        st->pn_sumsq += (double)samples[i] * (double)samples[i];
    }}
    if (st->pn_count > 0) {{
        const double cnt = (double)st->pn_count, mu = st->pn_sum / cnt;
        double var = st->pn_sumsq / cnt - mu * mu;
        if (var < 0.0) var = 0.0;
        st->clip_mean = (float)mu;
        st->clip_den = (float)sqrt(var) + {_flit(PRENORM_EPS)};
    }}
    return 0;
}}
"""
            push_guard += "\n    if (n > 0 && st->pn_count == 0) return -2;"
            result_guard = "    if (st->clip_count != st->pn_count) { out3[0] = out3[1] = out3[2] = 0.0f; st->finished = 1; return -3; }\n"
        return f"""
void {P}_init({P}_state *st)
{{
    memset(st, 0, sizeof *st);
    st->frame_fill = {left}; /* the left zero padding */
}}

void {P}_reset({P}_state *st)
{{
    {P}_init(st);
}}
{prescan}
int {P}_push({P}_state *st, const float *samples, int n)
{{
    int i;
{push_guard}
    for (i = 0; i < n; i++) {{
        const float x = samples[i];
        float y;
{pre}
        feed(st, y);
    }}
    return 0;
}}

int {P}_result({P}_state *st, float out3[3])
{{
    int i;
    if (st->finished) return -1;
{result_guard}    for (i = 0; i < {right}; i++) feed(st, 0.0f); /* the right zero padding */
{flush_stages}
    st->finished = 1;
    if (st->head_rows == 0) {{
        out3[0] = out3[1] = out3[2] = 0.0f;
        return -1;
    }}
    head_final(st, out3);
    return 0;
}}
"""

    def _trace(self) -> str:
        if not any(t.quant is not None for t in self.plan.tensors):
            return ""
        return """
/* -DMICROSER_TRACE: every int8 row is handed to microser_trace() (defined by the caller: tests compare each
   stage with a reference); tensor 0 is the quantized front-end output, tensor t the output of stage t - 1. */
#ifdef MICROSER_TRACE
void microser_trace(int tensor, int32_t row, const int8_t *q, int n);
#define TRACE(tensor, row, q, n) microser_trace((tensor), (row), (q), (n))
#else
#define TRACE(tensor, row, q, n) ((void)0)
#endif
"""

    def _quant_fn(self) -> str:
        if not any(t.quant is not None for t in self.plan.tensors):
            return ""
        return """
/* onnxruntime QuantizeLinear: x / scale, clamp to the int8 range, round half to even, + zero point */
static int quant(float x, float scale, int zp)
{
    float v = x / scale;
    const float lo = (float)(-128 - zp), hi = (float)(127 - zp);
    v = v < lo ? lo : (v > hi ? hi : v);
    return (int)lrintf(v) + zp;
}
"""


def _template(name: str) -> Template:
    """A C template of microser/cgen_templates/ (``string.Template``: ``${name}`` fields, ``$$`` for a dollar)."""
    return Template((TEMPLATES / name).read_text())


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


def emit(plan: Plan, prefix: str, variant: str) -> tuple[str, str]:
    """(header, source) of the C library for ``plan``."""
    e = _Emitter(plan, prefix, variant)
    src = e.source()
    return e.header(), src


def emit_driver(prefix: str, two_pass: bool) -> str:
    """A test/bench driver (cgen_templates/driver.c): ``prog AUDIO.f32 [-peek] [CHUNK ...]`` pushes raw float32
    audio in chunks (sizes cycled) and prints the 3 outputs; ``-peek`` also takes a running result on a copy of the
    state after every chunk; built with ``-DMICROSER_TRACE`` it writes every int8 row to ``$MICROSER_TRACE_FILE``
    (`read_trace`)."""
    prescan = f"    if ({prefix}_prescan(&st, x, (int)n) != 0) return 4;\n" if two_pass else ""
    return _template("driver.c").substitute(P=prefix, prescan=prescan)


def read_trace(path) -> dict[int, np.ndarray]:
    """The rows a ``-DMICROSER_TRACE`` driver wrote: ``{tensor: (rows, n) int8}``, rows in the order made."""
    data = Path(path).read_bytes()
    rows: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        tensor, row, n = np.frombuffer(data, np.int32, 3, pos)
        pos += 12
        rows.setdefault(int(tensor), []).append((int(row), np.frombuffer(data, np.int8, int(n), pos)))
        pos += int(n)
    out = {}
    for t, items in rows.items():
        if [r for r, _ in items] != list(range(len(items))):
            raise MicroserError(f"{path}: tensor {t} rows arrive out of order: expected 0, 1, 2, ... (a cgen bug)")
        out[t] = np.stack([v for _, v in items])
    return out


def write_library(plan: Plan, out_dir, prefix: str, variant: str) -> dict:
    """Write ``<prefix>.h``, ``<prefix>.c`` and ``<prefix>_main.c`` into ``out_dir``; returns paths and byte plan."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    e = _Emitter(plan, prefix, variant)
    (out_dir / f"{prefix}.h").write_text(e.header())
    (out_dir / f"{prefix}.c").write_text(e.source())
    (out_dir / f"{prefix}_main.c").write_text(emit_driver(prefix, plan.fe.prenorm == "clip"))
    return {"prefix": prefix, "variant": variant, "header": f"{prefix}.h", "source": f"{prefix}.c",
            "driver": f"{prefix}_main.c", "state_bytes": e.state_bytes, "arena_bytes": e.arena_bytes,
            "ram_bytes": e.state_bytes + e.arena_bytes, "min_samples": e._min_samples()}


def compile_driver(out_dir, prefix: str, *, extra_flags=(), exe: str | None = None) -> Path:
    """Build ``<prefix>_main`` with the strict flags (GCC_FLAGS); MicroserError with gcc's first lines on failure."""
    out_dir = Path(out_dir)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise MicroserError("gcc not found on PATH: the C export's checks need a C99 compiler; install gcc")
    exe = out_dir / (exe or f"{prefix}_main")
    cmd = [gcc, *GCC_FLAGS, *extra_flags, "-o", str(exe), str(out_dir / f"{prefix}.c"),
           str(out_dir / f"{prefix}_main.c"), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        first = " | ".join(r.stderr.strip().splitlines()[:3])
        raise MicroserError(f"gcc failed on {out_dir / (prefix + '.c')}: {first}; report the spec as a cgen bug")
    return exe


def run_driver(exe, audio: np.ndarray, chunks=(), *, peek: bool = False, workdir=None, wrapper=(),
               trace=None) -> np.ndarray:
    """Run a compiled driver on float32 audio pushed in ``chunks`` (cycled); returns the 3 outputs. ``trace``: the
    file a ``-DMICROSER_TRACE`` driver writes its int8 rows to (`read_trace`)."""
    env = dict(os.environ, MICROSER_TRACE_FILE=str(trace)) if trace is not None else None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "audio.f32"
        np.asarray(audio, dtype=np.float32).tofile(path)
        args = [*wrapper, str(exe), str(path)] + (["-peek"] if peek else []) + [str(int(c)) for c in chunks]
        r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise MicroserError(f"{exe} exited with {r.returncode} on {len(audio)} samples: {r.stderr.strip()[:200]}")
    return np.array([float(v) for v in r.stdout.split()], dtype=np.float64)


# ---- measurements: flash, RAM, stack, instructions ----


def measurement_signal(seconds: float = 1.0) -> np.ndarray:
    """The signal instruction counts are measured on: seeded Gaussian noise, standard deviation 0.1."""
    return (np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)


def _worst_stack(ci_text: str, roots: list[str]) -> tuple[int, str]:
    """Deepest stack (bytes) over call paths from ``roots`` in a GCC ``-fcallgraph-info=su`` graph, and that path.

    Library calls (libm) have no stack figure and count 0 (they are leaf functions of a few dozen bytes).
    """
    size: dict[str, int] = {}
    name: dict[str, str] = {}
    edges: dict[str, list[str]] = {}
    for m in re.finditer(r'node: \{ title: "([^"]+)" label: "([^"\\]+)[^"]*?(\d+) bytes', ci_text):
        size[m.group(1)] = int(m.group(3))
        name[m.group(1)] = m.group(2)
    for m in re.finditer(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"', ci_text):
        edges.setdefault(m.group(1), []).append(m.group(2))
    memo: dict[str, tuple[int, list[str]]] = {}

    def deepest(node: str, depth: int = 0) -> tuple[int, list[str]]:
        if node in memo:
            return memo[node]
        if depth > 200:
            raise MicroserError("call graph deeper than 200 in the generated C: expected no recursion")
        best = (0, [])
        for child in edges.get(node, []):
            sub = deepest(child, depth + 1)
            if sub[0] > best[0]:
                best = sub
        memo[node] = (size.get(node, 0) + best[0], [name.get(node, node)] + best[1])
        return memo[node]

    worst = max((deepest(r) for r in roots if r in size), key=lambda x: x[0], default=(0, []))
    return worst[0], " > ".join(worst[1])


def _callgrind_ir(exe: Path, audio: np.ndarray, functions, workdir: Path) -> int:
    """Instructions executed inside ``functions`` (a name or several, and what they call) while the driver runs on
    ``audio``."""
    path = workdir / "cg-audio.f32"
    np.asarray(audio, np.float32).tofile(path)
    out = workdir / "callgrind.out"
    functions = [functions] if isinstance(functions, str) else list(functions)
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           *(f"--toggle-collect={f}" for f in functions), str(exe), str(path), "4096"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise MicroserError(f"valgrind callgrind failed on {exe}: {r.stderr.strip()[-200:]}")
    m = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(), re.M)
    return int(m.group(1)) if m else 0


def measure(c_dir, prefix: str, *, seconds: float = 1.0, callgrind: bool = True, workdir=None) -> dict:
    """Flash, RAM and instruction figures of one generated library (compiled here with GCC_FLAGS).

    * ``flash_bytes`` = text + data of ``size`` on the compiled object (text includes .rodata: the const
      weights and tables); ``bss_bytes`` must be 0 (no globals);
    * ``ram_bytes`` = ``sizeof(state)`` (state + arena) + ``stack_bytes``, the deepest call path of
      ``-fcallgraph-info=su`` from the API functions (libm leaf calls not included);
    * ``instructions_per_audio_second``: valgrind callgrind, instructions inside ``<prefix>_push`` (and
      ``_prescan``, the first pass of two-pass libraries) per second of `measurement_signal` (host x86-64, a proxy
      for DSP cycles), and
      ``result_instructions`` for the end-of-utterance flush and head (on 0.5 s). Needs valgrind; else None.
    """
    c_dir = Path(c_dir)
    gcc, size_tool = shutil.which("gcc"), shutil.which("size")
    if gcc is None or size_tool is None:
        raise MicroserError("gcc and size (binutils) are needed to measure the C library; install gcc")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for f in (f"{prefix}.c", f"{prefix}.h", f"{prefix}_main.c"):
            shutil.copy(c_dir / f, tmp / f)
        obj = tmp / f"{prefix}.o"
        r = subprocess.run([gcc, *GCC_FLAGS, "-fstack-usage", "-fcallgraph-info=su", "-c", f"{prefix}.c", "-o",
                            obj.name], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise MicroserError(f"gcc failed on {c_dir / (prefix + '.c')}: {r.stderr.strip()[:300]}")
        sz = subprocess.run([size_tool, str(obj)], capture_output=True, text=True).stdout.splitlines()[1].split()
        text, data, bss = int(sz[0]), int(sz[1]), int(sz[2])
        ci = next(tmp.glob("*.ci")).read_text()
        roots = [f"{prefix}_{f}" for f in ("init", "reset", "push", "result", "prescan")]
        stack, path = _worst_stack(ci, roots)
        ram = int(re.search(rf"#define {prefix.upper()}_RAM_BYTES (\d+)", (c_dir / f"{prefix}.h").read_text()).group(1))
        out = {"flash_bytes": text + data, "text_bytes": text, "data_bytes": data, "bss_bytes": bss,
               "state_plus_arena_bytes": ram, "stack_bytes": stack, "stack_path": path, "ram_bytes": ram + stack,
               "instructions_per_audio_second": None, "result_instructions": None,
               "compiler": subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
               "flags": " ".join(GCC_FLAGS)}
        if callgrind and shutil.which("valgrind"):
            exe = compile_driver(tmp, prefix)
            audio = measurement_signal(seconds)
            two_pass = f"{prefix.upper()}_TWO_PASS 1" in (c_dir / f"{prefix}.h").read_text()
            push = _callgrind_ir(exe, audio, [f"{prefix}_push"] + ([f"{prefix}_prescan"] if two_pass else []), tmp)
            result = _callgrind_ir(exe, audio[: SAMPLE_RATE // 2], f"{prefix}_result", tmp)
            out["instructions_per_audio_second"] = int(round(push / seconds))
            out["result_instructions"] = result
            out["callgrind"] = f"valgrind --tool=callgrind, {seconds:g} s of audio, host {os.uname().machine}"
    return out


def measure_instructions(c_dir, prefix: str, *, target: str = "x86-64", workdir=None) -> int:
    """Instructions per second of audio of one generated library: push (and prescan) on 1 s of
    `measurement_signal`, counted by valgrind callgrind (``x86-64``, the host) or in QEMU (``cortex-m4``)."""
    c_dir = Path(c_dir)
    if target == "cortex-m4":
        return measure_cortex_m4(c_dir, prefix, workdir=workdir)["instructions_per_audio_second"]
    if target != "x86-64":
        raise MicroserError(f"instruction target {target!r} is unknown: expected one of {', '.join(INSTR_TARGETS)}")
    if shutil.which("valgrind") is None:
        raise MicroserError("valgrind not found on PATH: counting x86-64 instructions needs callgrind; "
                            "install valgrind")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for f in (f"{prefix}.c", f"{prefix}.h", f"{prefix}_main.c"):
            shutil.copy(c_dir / f, tmp / f)
        exe = compile_driver(tmp, prefix)
        two_pass = f"{prefix.upper()}_TWO_PASS 1" in (c_dir / f"{prefix}.h").read_text()
        return _callgrind_ir(exe, measurement_signal(1.0), [f"{prefix}_push"] + ([f"{prefix}_prescan"] if two_pass
                                                                                 else []), tmp)


# ---- Cortex-M4F: cross-compiled flash and RAM, and a run in QEMU (mps2-an386) ----

ARM_GCC = "arm-none-eabi-gcc"
ARM_SIZE = "arm-none-eabi-size"
QEMU_ARM = "qemu-system-arm"
M4_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard", "-O2")
M4_CHUNKS = (160, 17, 999, 3, 4096, 1)  # samples per push() in the QEMU driver, cycled
QEMU_TIMEOUT_S = 120
M4_TOOLS_HINT = ("install the Debian packages gcc-arm-none-eabi, libnewlib-arm-none-eabi (and qemu-system-arm to "
                 "run it), as .ci/run does")


def m4_tools() -> dict:
    """Paths of the Cortex-M4 tools found on PATH (``gcc``, ``size``, ``qemu``), None where missing."""
    return {"gcc": shutil.which(ARM_GCC), "size": shutil.which(ARM_SIZE), "qemu": shutil.which(QEMU_ARM)}


def _arm(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        first = " | ".join(r.stderr.strip().splitlines()[:3])
        raise MicroserError(f"{ARM_GCC} failed on {what}: {first}; report the spec as a cgen bug")
    return r


def _arm_size(path: Path) -> tuple[int, int, int]:
    """text (code + rodata), data, bss of ``arm-none-eabi-size`` (Berkeley format)."""
    row = subprocess.run([ARM_SIZE, str(path)], capture_output=True, text=True).stdout.splitlines()[1].split()
    return int(row[0]), int(row[1]), int(row[2])


def _map_members(map_text: str) -> set[str]:
    """Archive members a GNU ld map file says were linked (``libm.a(libm_a-sf_exp.o)`` -> ``libm.a:sf_exp.o``)."""
    block = map_text.split("Memory Configuration")[0]
    members = re.findall(r"^(\S+\.a)\(([^)]+)\)", block, re.M)
    return {f"{Path(a).name}:{re.sub(r'^lib[a-z]+_a-', '', m)}" for a, m in members}


def measure_cortex_m4(c_dir, prefix: str, *, run: bool = True, workdir=None, check_audio=None,
                      extra_flags=()) -> dict:
    """Flash and RAM of one generated library built for a Cortex-M4F, and (``run``, needs qemu-system-arm) its run
    in QEMU's mps2-an386 board with semihosting.

    * ``flash_bytes``: text + data (``arm-none-eabi-size``) of a bare-metal image calling every API function, minus
      the same image with an empty main(): the library's code and const tables (``library_flash_bytes``, from its
      object) plus the runtime it pulls in (``runtime``: libm, libc, libgcc members, read from the map file);
    * ``ram_bytes`` = data + bss of the library object (0: no globals) + ``sizeof(state)`` (state + arena) + the
      stack: measured in QEMU (``stack_source`` "qemu": painted stack, deepest word below main's frame, libm
      included) or, without QEMU, the deepest path of ``-fcallgraph-info=su`` (libm calls not counted);
    * with ``run``: ``instructions_per_audio_second`` (push + prescan on `measurement_signal`, 1 s, counted with
      ``qemu -icount shift=0`` and the board's 25 MHz timer, calibrated on a loop of known length) and, when
      ``check_audio`` is given, ``outputs``, the library's 3 outputs on it in the emulated Cortex-M4.

    ``extra_flags`` go to the library's compile (e.g. ``-DMICROSER_NO_DSP`` for the portable kernels).
    MicroserError with the packages to install when the toolchain is missing.
    """
    c_dir = Path(c_dir)
    tools = m4_tools()
    if tools["gcc"] is None or tools["size"] is None:
        raise MicroserError(f"{ARM_GCC} / {ARM_SIZE} not found on PATH: the Cortex-M4 build needs them; "
                            + M4_TOOLS_HINT)
    header = (c_dir / f"{prefix}.h").read_text()
    two_pass = f"{prefix.upper()}_TWO_PASS 1" in header
    state_arena = int(re.search(rf"#define {prefix.upper()}_RAM_BYTES (\d+)", header).group(1))
    hop = 160
    flags = [*GCC_FLAGS[:-1], *M4_FLAGS, *extra_flags]  # the library's strict C99 flags, -O2 from M4_FLAGS
    harness = ["-std=gnu99", *M4_FLAGS, "-ffunction-sections", "-fdata-sections"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for f in (f"{prefix}.c", f"{prefix}.h"):
            shutil.copy(c_dir / f, tmp / f)
        for f in ("m4_startup.c", "mps2_an386.ld"):
            shutil.copy(TEMPLATES / f, tmp / f)
        _arm([ARM_GCC, *flags, "-ffunction-sections", "-fdata-sections", "-fstack-usage", "-fcallgraph-info=su",
              "-c", f"{prefix}.c", "-o", "lib.o"], tmp, f"{prefix}.c")
        text, data, bss = _arm_size(tmp / "lib.o")
        roots = [f"{prefix}_{f}" for f in ("init", "reset", "push", "result", "prescan")]
        static_stack, static_path = _worst_stack(next(tmp.glob("*.ci")).read_text(), roots)
        prescan = (f"    (void){prefix}_prescan(&st, (const float *)samples, {hop});\n" if two_pass else "")
        (tmp / "footprint.c").write_text(_template("m4_footprint.c").substitute(P=prefix, hop=hop, prescan=prescan))
        link = [*harness, "--specs=nano.specs", "--specs=nosys.specs", "-nostartfiles", "-T", "mps2_an386.ld",
                "-Wl,--gc-sections", "m4_startup.c", "footprint.c"]
        _arm([ARM_GCC, *link, "lib.o", "-lm", "-Wl,-Map=full.map", "-o", "full.elf"], tmp, "the footprint image")
        _arm([ARM_GCC, *link, "-DMICROSER_EMPTY", "-Wl,-Map=empty.map", "-o", "empty.elf"], tmp, "the empty image")
        full, empty = _arm_size(tmp / "full.elf"), _arm_size(tmp / "empty.elf")
        runtime = sorted(_map_members((tmp / "full.map").read_text()) - _map_members((tmp / "empty.map").read_text()))
        out = {"target": "Cortex-M4F", "compiler": subprocess.run([ARM_GCC, "--version"], capture_output=True,
                                                                 text=True).stdout.splitlines()[0],
               "flags": " ".join(flags), "flash_bytes": (full[0] + full[1]) - (empty[0] + empty[1]),
               "library_flash_bytes": text + data, "text_bytes": text, "data_bytes": data, "bss_bytes": bss,
               "runtime": runtime, "state_plus_arena_bytes": state_arena, "stack_bytes": static_stack,
               "stack_path": static_path, "stack_source": "-fcallgraph-info=su (libm calls not counted)",
               "ram_bytes": data + bss + state_arena + static_stack, "instructions_per_audio_second": None,
               "qemu": None}
        if run and tools["qemu"] is not None:
            prescan = "" if not two_pass else f"""    while ((got = fread(buf, sizeof(float), 4096, f)) > 0) {{
        t0 = TIMER[1];
        if ({prefix}_prescan(&st, buf, (int)got) != 0) return 4;
        prescan_ticks += t0 - TIMER[1];
    }}
    rewind(f);
"""
            (tmp / "m4_main.c").write_text(_template("m4_main.c").substitute(
                P=prefix, prescan=prescan, chunks=", ".join(map(str, M4_CHUNKS))))
            _arm([ARM_GCC, *harness, "--specs=nano.specs", "--specs=rdimon.specs", "-nostartfiles", "-T",
                  "mps2_an386.ld", "-Wl,--gc-sections", "-DMICROSER_SEMIHOSTING", "m4_startup.c", "m4_main.c",
                  "lib.o", "-lm", "-o", "qemu.elf"], tmp, "the QEMU driver")
            timed = _qemu_run(tmp, measurement_signal(1.0))
            out["instructions_per_audio_second"] = timed["instructions"]
            out["result_instructions"] = timed["result_instructions"]
            out["stack_bytes"], out["stack_path"] = timed["stack_bytes"], "measured (painted stack)"
            out["stack_source"] = "qemu: painted stack, deepest word below the caller's frame (libm included)"
            out["ram_bytes"] = data + bss + state_arena + timed["stack_bytes"]
            out["qemu"] = {"machine": "mps2-an386", "version": subprocess.run(
                [QEMU_ARM, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
                "method": "qemu -icount shift=0 (1 ns per instruction) read through the CMSDK timer at 25 MHz, "
                          f"calibrated on a 2-instruction loop ({timed['per_tick']:.3f} instructions per tick); "
                          "instructions, not cycles", "static_stack_bytes": static_stack}
            if check_audio is not None:
                out["outputs"] = _qemu_run(tmp, check_audio)["outputs"]
    return out


def _qemu_run(tmp: Path, audio: np.ndarray) -> dict:
    """Run ``tmp/qemu.elf`` on ``audio`` in qemu-system-arm (mps2-an386, semihosting, -icount shift=0)."""
    np.asarray(audio, np.float32).tofile(tmp / "m4_input.f32")
    cmd = [QEMU_ARM, "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", "qemu.elf"]
    try:
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=QEMU_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MicroserError(f"{QEMU_ARM} did not finish within {QEMU_TIMEOUT_S} s on {len(audio)} samples: "
                            "the Cortex-M4 driver hangs or faults; report the spec as a cgen bug") from None
    m = re.search(r"^out (\w+) (\w+) (\w+) (-?\d+)$", r.stdout, re.M)
    t = re.search(r"^ticks (\d+) (\d+) (\d+) calib (\d+) (\d+) stack (\d+) samples (\d+)$", r.stdout, re.M)
    if r.returncode != 0 or m is None or t is None:
        raise MicroserError(f"the Cortex-M4 driver failed in {QEMU_ARM} (exit {r.returncode}): "
                            f"{(r.stdout + r.stderr).strip()[-200:]!r}; report the spec as a cgen bug")
    push, prescan, result, loop_insns, loop_ticks, stack, samples = (int(v) for v in t.groups())
    per_tick = loop_insns / loop_ticks
    outputs = np.array([np.frombuffer(int(v, 16).to_bytes(4, "little"), np.float32)[0] for v in m.groups()[:3]],
                       dtype=np.float64)
    return {"outputs": outputs, "status": int(m.group(4)), "per_tick": per_tick,
            "instructions": int(round((push + prescan) * per_tick * SAMPLE_RATE / samples)),
            "result_instructions": int(round(result * per_tick)), "stack_bytes": stack}


# ---- the bundle entry point ----

PARITY_F32 = 1e-4  # max abs difference, float C vs PyTorch
PARITY_INT8 = 0.01  # max abs difference, int8 C vs the int8 ONNX graph in onnxruntime


def check_signal(seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    """A generated test signal: a rising chirp with harmonics, amplitude modulation and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120 + 180 * t / max(seconds, 1e-9)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.3 + 0.25 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _readme(prefix: str, spec, libs: dict) -> str:
    lines = [f"# C99 inference for {spec.summary()}", "",
             "Generated by microser.cgen: dependency-free C99 (libm only), no malloc, no globals besides const "
             "weights, no recursion. Each library computes the whole model from raw 16 kHz float samples.", "",
             "```c", f'#include "{prefix}_int8.h"', f"{prefix}_int8_state st;   /* {libs.get('int8', libs['float32'])['ram_bytes']} bytes, plain data */",
             f"{prefix}_int8_init(&st);",
             f"{prefix}_int8_push(&st, samples, n);      /* any n, as often as wanted */",
             f"{prefix}_int8_result(&st, adv);           /* arousal, dominance, valence; final (flushes the end padding) */",
             "```", "",
             "A running estimate without ending the utterance: copy the state (`copy = st;`) and call result on the copy.",
             ""]
    if spec.frontend.prenorm == "clip":
        lines += [f"Two-pass: {CLIP_NOTE.replace('P_', prefix + '_*_')}.", ""]
    lines += ["| library | variant | state + arena (B) | min samples |", "| --- | --- | --- | --- |"]
    for v, info in libs.items():
        lines.append(f"| {info['source']} | {v} | {info['ram_bytes']} | {info['min_samples']} |")
    lines += ["", f"Build: `gcc {' '.join(GCC_FLAGS)} -o demo {prefix}_int8.c {prefix}_int8_main.c -lm`, "
              f"then `./demo audio.f32 [CHUNK ...]` (raw float32 samples).", ""]
    return "\n".join(lines)


def generate(bundle_dir, model, spec=None, int8_onnx_path=None, *, prefix: str = DEFAULT_PREFIX,
             check: bool = True, measure_costs: bool = True, callgrind: bool = True, cortex_m4: bool = True) -> dict:
    """Write ``bundle_dir/c/`` (float32 library, int8 library if ``int8_onnx_path``, drivers, README) and return the
    model card's ``c`` section.

    With ``check`` (needs gcc), each library is compiled with the strict flags and run on a generated
    signal pushed in uneven chunks: the float library against PyTorch (``PARITY_F32``), the int8 one
    against onnxruntime on ``int8_onnx_path`` (``PARITY_INT8``); a worse difference raises MicroserError.
    With ``measure_costs`` the section gets `measure`'s flash, RAM, stack and (``callgrind``, needs valgrind, about
    10 s per library) instruction figures, and with ``cortex_m4`` (needs arm-none-eabi-gcc) the
    ``cortex_m4`` entry: `measure_cortex_m4`'s flash and RAM, and where qemu-system-arm runs it, parity on the
    target ISA (same tolerances, same check signal) and instructions per audio second there. Without the
    toolchain that entry says what to install.
    """
    import torch

    spec = spec if spec is not None else model.spec
    _check_family(spec)
    out = Path(bundle_dir) / "c"
    model.eval()
    plans = {"float32": float_plan(model, spec)}
    if int8_onnx_path is not None:
        plans["int8"] = int8_plan(model, spec, int8_onnx_path)
    libs = {v: write_library(p, out, f"{prefix}_{'f32' if v == 'float32' else 'int8'}", v) for v, p in plans.items()}
    (out / "README.md").write_text(_readme(prefix, spec, libs))
    section = {"generator": "microser.cgen", "spec": spec.summary(), "prenorm": spec.frontend.prenorm,
               "two_pass": spec.frontend.prenorm == "clip", "fft": _fft_words(spec.frontend.n_fft),
               "api": [f"{prefix}_<variant>_init", f"{prefix}_<variant>_push", f"{prefix}_<variant>_result",
                       f"{prefix}_<variant>_reset"] + ([f"{prefix}_<variant>_prescan"]
                                                       if spec.frontend.prenorm == "clip" else []),
               "libraries": libs, "parity": {}, "measured": {}}
    audio = check_signal()
    refs = {}
    for v in libs:
        if v == "float32":
            with torch.no_grad():
                refs[v] = (model(torch.from_numpy(audio)[None]).double().numpy()[0], PARITY_F32, "PyTorch")
        else:
            from microser.onnxio import ort_session, run_onnx

            refs[v] = (run_onnx(ort_session(str(int8_onnx_path)), audio)[0].astype(np.float64), PARITY_INT8,
                       "onnxruntime int8 graph")
    host = {}
    if check:
        chunks = [1, 17, 160, 999, 3, 4096]
        with tempfile.TemporaryDirectory() as tmp:
            for v, info in libs.items():
                for f in (info["source"], info["header"], info["driver"]):
                    shutil.copy(out / f, Path(tmp) / f)
                exe = compile_driver(tmp, info["prefix"])
                host[v] = got = run_driver(exe, audio, chunks)
                ref, tol, against = refs[v]
                diff = float(np.max(np.abs(got - ref)))
                section["parity"][v] = {"max_abs_diff": diff, "tolerance": tol, "against": against,
                                        "signal": f"check_signal(), {len(audio)} samples, chunks {chunks} cycled"}
                if not diff <= tol:
                    raise MicroserError(f"C {v} library differs from {against} by {diff:.3g} on the check signal: "
                                        f"expected <= {tol:g}; report the spec ({spec.summary()}) as a cgen bug")
    if measure_costs:
        for v, info in libs.items():
            section["measured"][v] = measure(out, info["prefix"], callgrind=callgrind)
    if cortex_m4:
        section["cortex_m4"] = _cortex_m4_section(out, libs, refs, host, audio, spec)
    return section


def _cortex_m4_section(out: Path, libs: dict, refs: dict, host: dict, audio: np.ndarray, spec) -> dict:
    """The card's ``cortex_m4`` entry: per variant `measure_cortex_m4`, with parity on the target when QEMU ran."""
    tools = m4_tools()
    if tools["gcc"] is None:
        return {"skipped": f"{ARM_GCC} not found: {M4_TOOLS_HINT}"}
    section = {} if tools["qemu"] else {"qemu": f"{QEMU_ARM} not found: flash and RAM only (no run, static stack); "
                                                + M4_TOOLS_HINT}
    for v, info in libs.items():
        m = measure_cortex_m4(out, info["prefix"], check_audio=audio)
        got = m.pop("outputs", None)
        if got is not None:
            ref, tol, against = refs[v]
            diff = float(np.max(np.abs(got - ref)))
            m["parity"] = {"max_abs_diff": diff, "tolerance": tol, "against": against,
                           "max_abs_diff_vs_host_c": float(np.max(np.abs(got - host[v]))) if v in host else None,
                           "signal": f"check_signal(), {len(audio)} samples, chunks {list(M4_CHUNKS)} cycled"}
            if not diff <= tol:
                raise MicroserError(f"C {v} library on the Cortex-M4 (QEMU) differs from {against} by {diff:.3g} "
                                    f"on the check signal: expected <= {tol:g}; report the spec "
                                    f"({spec.summary()}) as a cgen bug")
        section[v] = m
    return section


def _fft_words(n_fft: int) -> str:
    if n_fft % 2 == 0:
        return (f"real FFT of {n_fft} points as a complex Stockham FFT of {n_fft // 2} points "
                f"(radices {_factors(n_fft // 2)}) plus the split step")
    return f"complex Stockham FFT of {n_fft} points (radices {_factors(n_fft)}), imaginary input zero"


# ---- streaming RAM as a cost (microser describe --ram-mode, microser search --ram-mode) ----

RAM_MODES = ("offline", "streaming")


def streaming_report(spec, input_seconds: float) -> dict:
    """`streaming_ram` of the int8 deployment (the budget figure) and of the float32 library: ``{"int8", "fp32"}``."""
    return {"int8": streaming_ram(spec, int8=True, input_seconds=input_seconds),
            "fp32": streaming_ram(spec, int8=False, input_seconds=input_seconds)}


def streaming_costs(spec, costs: dict, input_seconds: float) -> dict:
    """``costs`` for ``--ram-mode streaming``: ``ram_bytes`` becomes the int8 C library's streaming RAM
    (`streaming_ram`), the offline activation peak is kept as ``ram_bytes_offline``.

    MobileNet specs have no C export and run offline (ONNX), so their ``ram_bytes`` stays the offline peak and
    ``ram_mode`` says so.
    """
    out = dict(costs)
    out["ram_bytes_offline"] = costs.get("ram_bytes")
    if spec.family != "wav2small":
        out["ram_mode"] = "offline (no C export for this family)"
        return out
    out["ram_bytes"] = streaming_ram(spec, int8=True, input_seconds=input_seconds)["ram_streaming_bytes"]
    out["ram_mode"] = "streaming"
    return out


def card_markdown(section: dict) -> str:
    """The ``## C library`` block of MODEL_CARD.md for a `generate` section."""
    lines = ["## C library (c/)", "",
             f"Dependency-free C99 generated by microser.cgen for {section['spec']}; FFT: {section['fft']}. "
             "API: " + ", ".join(f"`{a}`" for a in section["api"]) + " (see c/README.md)."]
    if section["two_pass"]:
        lines.append(f"Two passes: {CLIP_NOTE.replace('P_', 'ser_*_')}.")
    lines += ["", "| variant | parity (max abs) | flash B | state+arena B | stack B | RAM B | instr / s audio |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for v, p in section["parity"].items():
        m = section["measured"].get(v, {})
        ips = m.get("instructions_per_audio_second")
        lines.append(f"| {v} | {p['max_abs_diff']:.1e} vs {p['against']} | {m.get('flash_bytes', '-')} | "
                     f"{m.get('state_plus_arena_bytes', '-')} | {m.get('stack_bytes', '-')} | {m.get('ram_bytes', '-')} | "
                     f"{'-' if ips is None else f'{ips / 1e6:.1f} M'} |")
    lines += ["", "Flash: text + data of `size` on the object (gcc " + " ".join(GCC_FLAGS) + "); RAM: sizeof(state) "
              "+ deepest stack path (-fcallgraph-info=su); instructions: valgrind callgrind inside push() (and "
              "prescan()), host x86-64, a proxy for DSP cycles.", ""]
    m4 = section.get("cortex_m4") or {}
    if "skipped" in m4:
        lines += ["### Cortex-M4F", "", f"Not built: {m4['skipped']}.", ""]
    elif m4:
        lines += ["### Cortex-M4F", "",
                  "| variant | flash B (library + runtime) | RAM B (state+arena + stack + data/bss) | instr / s audio "
                  "(QEMU) | parity on target |", "| --- | --- | --- | --- | --- |"]
        for v, m in m4.items():
            if not isinstance(m, dict):
                continue
            ips, par = m.get("instructions_per_audio_second"), m.get("parity")
            parity = "-" if par is None else f"{par['max_abs_diff']:.1e} vs {par['against']}"
            lines.append(f"| {v} | {m['flash_bytes']} ({m['library_flash_bytes']} + "
                         f"{m['flash_bytes'] - m['library_flash_bytes']}) | {m['ram_bytes']} "
                         f"({m['state_plus_arena_bytes']} + {m['stack_bytes']} + {m['data_bytes'] + m['bss_bytes']}) | "
                         f"{'-' if ips is None else f'{ips / 1e6:.1f} M'} | {parity} |")
        first = next(m for m in m4.values() if isinstance(m, dict))
        lines += ["", f"{first['compiler']}, `{first['flags']}`. Flash: arm-none-eabi-size of a bare-metal image "
                  "calling the API minus an empty one (the library's code and tables plus the libm/libgcc members it "
                  "pulls in, from the map file). Stack: " + first["stack_source"] + "."]
        if isinstance(m4.get("qemu"), str):
            lines.append(m4["qemu"] + ".")
        elif first.get("qemu"):
            lines.append(f"Run in {first['qemu']['version']}, machine {first['qemu']['machine']}: "
                         f"{first['qemu']['method']}.")
        lines.append("")
    return "\n".join(lines)
