"""The plan of a C library: what it computes, as data (stages, row-streamed tensors, front-end tables, weights).

`shape_plan` sizes a Wav2Small spec (no weights: enough for RAM figures and the instruction model); `float_plan`
fills it from an eval-mode PyTorch model (BatchNorm folded in float64); the int8 plan, read from the int8 QDQ
graph, is `microser.cgen.qdq.int8_plan`. `frontend_tables` is the one place the C side gets the window and the mel
band table from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import nn

from microser.errors import MicroserError
from microser.frontends import energy_floor, hann_window, mel_matrix, num_frames
from microser.models.spec import FAMILIES, families_that
from microser.models.wav2small import MEANSTD_EPS, band_counts, halve

# int8 conv columns are padded with zero taps (zero weights) to the kernel's step: 4 taps for the dual-MAC kernel
# (two SMLAD words per step), 16 for the portable loop, whose int8 weight loads a host compiler auto-vectorizes 16
# lanes at a time (GCC -O2 does so only when the constant trip count is a multiple of that; measured with
# callgrind: 128 padded taps cost 390 x86 instructions per 2x2 block, 120 unpadded ones 1947).
TAP_ALIGN_DSP = 4
TAP_ALIGN_PORTABLE = 16


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
    variant: str = "float32"  # "float32" (float_plan) or "int8" (the int8 graph's plan): the library's label
    # front-end constants (filled by frontend_tables for generation; shapes only for streaming_ram)
    window: np.ndarray | None = None  # (n_fft,) zero-padded analysis window (frontend_tables)
    mel: MelBands | None = None  # the filterbank's band table (frontend_tables)
    pcen_fir: np.ndarray | None = None  # oldest tap first, as the PyTorch conv weight
    window_spectrum: np.ndarray | None = None
    head: dict = field(default_factory=dict)
    # log compression as the int8 graph computes it: ln(max(e, floor)) then scalar ops in order
    # (the exporter folds the x10 of 10*log10 into the first conv's weights); None: 10*log10(max(e, log_floor))
    log_chain: list[tuple[str, float]] | None = None
    log_floor: float = 0.0  # the mel-energy floor before log / PCEN: frontends.energy_floor (shape_plan sets it)

    @property
    def fe(self):
        return self.spec.frontend


def check_exportable(spec) -> None:
    """MicroserError unless ``spec`` can be exported to C (the wav2small family)."""
    if not FAMILIES[spec.family].c_export:
        raise MicroserError(f"spec family {spec.family!r}: C export supports the {families_that('c_export')} "
                            f"family; {spec.family} specs export ONNX only (use the bundle's model.onnx / "
                            "model.int8.onnx)")


def int8_c_unavailable(spec) -> str | None:
    """Why ``spec`` gets no int8 C library (so no instruction count), or None when it does."""
    if not FAMILIES[spec.family].c_export:
        return f"the {spec.family} family has no C export ({families_that('c_export')} only)"
    if spec.body.norm == "layer":
        return "the int8 C library does not support body.norm 'layer' (use 'batch' or 'none')"
    return None


def shape_plan(spec, *, int8: bool = True) -> Plan:
    """The stages and tensor shapes of a Wav2Small spec; with ``int8`` every body tensor is int8 (sized with a unit
    scale; real scales come from the int8 graph).

    This is the post-training int8 deployment (``microser.graph.int8_scope``:
    front-end output and body quantized, head float) without reading a graph:
    enough to size the state.
    """
    check_exportable(spec)
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
    return Plan(spec=spec, tensors=tensors, stages=stages, pooling=body.pooling, variant="int8" if int8 else "float32",
                log_floor=energy_floor(spec.frontend))


def fft_points(n_fft: int) -> int:
    """Points of the complex FFT the C library runs: ``n_fft / 2`` for an even ``n_fft`` (a real FFT packed into a
    complex one of half the length, then split), else ``n_fft``."""
    return n_fft // 2 if n_fft % 2 == 0 else n_fft


def fft_factors(n: int) -> list[int]:
    """The radices of the mixed-radix FFT of ``n`` points, in the order the C code runs them: 4s (while more than 4
    remain), then 4, 2, 3, 5, then odd factors from 7 up; ``[1]`` for one point."""
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


def head_features(plan: Plan) -> int:
    """Length of the pooled feature vector the head's Linear reads."""
    c, f = plan.tensors[-1].channels, plan.tensors[-1].bands
    return {"attention+gram": c * f + c * c, "attention": c * f, "meanstd": 2 * c * f}[plan.pooling]


def min_samples(plan: Plan) -> int:
    """Fewest samples for which every stage yields at least one row (found by stepping the shape plan)."""
    n = 1
    while True:
        rows = num_frames(plan.fe, n)
        ok = rows > 0
        for st in plan.stages:
            rows = (rows + 2 * st.p - st.k) // st.s + 1 if rows + 2 * st.p - st.k >= 0 else 0
            ok = ok and rows > 0
        if ok:
            return n
        n += 1


# ---- weights: the float plan from the PyTorch model ----


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
    (periodic Hann of ``win_length`` as `microser.frontends.hann_window` makes it, zero-padded to ``n_fft`` and centred, as microser.frontends.PowerSpectrum
    applies it) and the mel band table of `microser.frontends.mel_matrix` (the one definition of the filterbank; a
    ``learnable`` filterbank is read from ``model``, as ``abs`` of the learned matrix). This is the one place the C
    side gets them from, so it follows that definition when it changes."""
    fe = spec.frontend
    window = np.zeros(fe.n_fft)
    left = (fe.n_fft - fe.window_length) // 2
    window[left:left + fe.window_length] = hann_window(fe.window_length).double().numpy()
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
    spec = spec if spec is not None else model.spec
    plan = shape_plan(spec, int8=False)
    fe = spec.frontend
    power = model.frontend.power
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
        head["eps"] = MEANSTD_EPS
    return head

