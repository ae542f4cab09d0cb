"""The C library's memory: the state struct's members (plain data, no pointers), its scratch arena, and the RAM
figures derived from them (`streaming_ram`: state + arena, independent of the utterance length; the cost behind
``--ram-mode streaming`` in `microser describe` and `microser search`).
"""

from __future__ import annotations

from dataclasses import dataclass

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.frontends import pcen_taps
from microser.models.spec import FAMILIES, resolve_spec
from microser.cgen.plan import Plan, fft_points, head_features, shape_plan


C_SIZES = {"double": 8, "float": 4, "int32_t": 4, "uint32_t": 4, "int8_t": 1}


def state_members(plan: Plan) -> list[tuple[str, str, int, str]]:
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
                  else pcen_taps(fe.hop) * fe.n_mels, "last taps mel rows (PCEN smoother)"))
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
            m.append(("int8_t", f"ring{i}", st.k * t.row,
                      f"stage {i} input rows, int8 ({st.k} x {t.channels} x {t.bands})"))
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


def arena_floats(plan: Plan) -> int:
    """Scratch floats: max over the phases (front-end frame, body row, head features) that never overlap in time."""
    fe = plan.fe
    front = 4 * fft_points(fe.n_fft) + fe.n_fft // 2 + 1 + 2 * fe.n_mels
    body = body_arena(plan).floats
    n = max(front, body, head_features(plan))
    return n + n % 2  # even: the struct size is a multiple of 8 on every ABI


def state_bytes(plan: Plan) -> dict:
    """Byte counts of the state struct: ``state`` (persistent), ``arena`` (scratch), ``total`` (= sizeof)."""
    persistent = sum(C_SIZES[t] * n for t, _, n, _ in state_members(plan))
    persistent = -(-persistent // 8) * 8  # the struct pads its int8 tail to 8 bytes (explicit member)
    arena = 4 * arena_floats(plan)
    return {"state": persistent, "arena": arena, "total": persistent + arena}


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
        by compiling, comes on top: see `microser.cgen.toolchain.measure`).
    """
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


# ---- streaming RAM as a cost (microser describe --ram-mode, microser search --ram-mode) ----


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
    if not FAMILIES[spec.family].c_export:
        out["ram_mode"] = "offline (no C export for this family)"
        return out
    out["ram_bytes"] = streaming_ram(spec, int8=True, input_seconds=input_seconds)["ram_streaming_bytes"]
    out["ram_mode"] = "streaming"
    return out

