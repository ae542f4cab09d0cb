"""Front-ends inside the model graph: raw 16 kHz audio -> (B, 1, frames, n_mels) features, ONNX-exportable.

A front-end is four steps, each a `FrontendSpec` field, each computable in a
stream by firmware exactly as written here:

1. ``prenorm`` -- waveform normalisation, ``eps = PRENORM_EPS = 1e-7``:

   - ``"none"``: the audio as is;
   - ``"clip"``: per clip, ``(x - mean(x)) / (std(x) + eps)`` with the population
     std (ddof=0) over all T samples, as in Wav2Small (needs the whole clip);
   - ``"running"``: causal cumulative statistics, optionally with a prior of
     ``n0`` pseudo-samples of mean 0 and variance ``v0``::

         c_t   = (t + 1) + n0
         mu_t  = sum(x[:t+1]) / c_t
         var_t = max((sum(x[:t+1]**2) + n0 * v0) / c_t - mu_t**2, 0)
         y_t   = (x_t - mu_t) / (sqrt(var_t) + eps)

     with ``n0 = PRENORM_PRIOR_COUNT = 0`` and ``v0 = PRENORM_PRIOR_VAR = 0``:
     no prior, so ``y_0 = 0``. Two running sums in a stream (float64 cumsums in
     the graph, no loop; each sum rounded to float32 before use, as the C library
     does). Without a prior the first samples (often near-silence) are scaled to
     unit variance: the first 0.1 s of an espeak-emo clip comes out 10-15 dB
     louder in log-mel than under ``"clip"``. A prior (n0 = 800, v0 = 1e-4)
     cuts the mean log-mel gap over the first 0.5 s from 4.8 to 3.2 dB but
     trained wav2small-ref to a lower CCC on espeak-emo (2 seeds, bench/cgen_prenorm_ccc.py), so the
     definition keeps ``n0 = 0``;
   - ``"window"``: per analysis frame (the ``n_fft`` samples of that frame, after
     padding), zero mean / unit variance before the window is applied. Computed
     without re-framing: ``|X - m W|^2 / (s + eps)^2`` where ``X`` is the frame's
     spectrum, ``m`` and ``s`` its mean and std, and ``W`` the spectrum of the
     (zero-padded) window -- a (n_fft//2+1, 2) buffer, not a DFT matrix.

2. Framing (``center``, ``pad_end``): the padded signal is
   ``[L zeros] + x + [R zeros]`` with ``L = n_fft // 2 if center else 0`` and
   ``R = (n_fft // 2 if center else 0) + (hop - 1 if pad_end else 0)``. Frame
   ``k`` is ``padded[k*hop : k*hop + n_fft]`` for ``k = 0 .. frames-1``,

       frames = 1 + (T + L + R - n_fft) // hop,   which needs T + L + R >= n_fft,

   i.e. ``pad_end`` rounds the frame count up instead of down (a final partial
   hop becomes a frame). Zero padding, never reflection: a stream can produce it.

3. Power spectrum: ``torch.stft(center=False, onesided, return_complex=False)``
   with a periodic Hann window of ``win_length`` samples (zero-padded to
   ``n_fft``, centred, as torch does), then the sum of squares of real and
   imaginary parts. It exports as ONNX's STFT operator (opset >= 17); the
   firmware runs an FFT. No DFT matrix is ever stored as weights. The window
   is :func:`hann_window`: ``0.5 - 0.5 cos(2 pi n / win_length)`` exactly as
   onnxruntime's ``HannWindow`` computes it (cosine in float64, rounded to
   float32), and the exported graph makes it with that operator.

4. Filterbank, floor and compression: ``power @ fb`` with ``fb`` = :func:`mel_matrix`,
   the (n_fft//2+1, n_mels) triangles of ONNX's ``MelWeightMatrix`` (opset 17)
   exactly as onnxruntime computes them (``n_mels + 2`` points equally spaced on
   the mel scale ``2595 log10(1 + f/700)`` from fmin, ``(mel(fmax) - mel(fmin)) /
   (n_mels + 2)`` apart, each mapped to FFT bin ``floor((n_fft + 1) f / 16000)``;
   band ``i`` rises linearly from bin ``b_i`` to 1 at ``b_{i+1}`` and falls to 0 at
   ``b_{i+2}``; a band whose rise is empty is a single 1 at ``b_{i+1}``). The
   exported graph makes it with that operator from its five numbers, so it is
   not a weight. With ``filterbank="learnable"`` it is a Parameter initialised
   from that matrix and used as ``abs(fb)`` so energies stay >= 0 (a learned
   table: stored and counted). Then the **floor**: ``e = max(e, floor)`` with
   ``floor = E_fs * 10**(FLOOR_DB / 10)``, ``FLOOR_DB = -100`` dB re the full-scale
   energy ``E_fs = (win_length / 4)**2`` (what a sine of amplitude 1 puts in the
   band whose peak bin it hits). Digital silence, or anything quieter, gives
   exactly the floor, a value the int8 calibration always covers (the floor is
   the bottom of the log-mel quantizer's range), in training, fp32 and int8
   alike. Then ``"log"``: ``10 * log10(e)``, or
   ``"pcen"``: ``(e / (PCEN_EPS + M)**PCEN_ALPHA + PCEN_DELTA)**PCEN_R - PCEN_DELTA**PCEN_R``
   where ``M`` is the causal smoother ``M_t = sum_k h_k e_{t-k}`` (zeros before
   the first frame), a fixed FIR of ``pcen_taps(hop)`` taps
   ``h_k ∝ (1 - s)**k``, normalised to sum 1, ``s`` from a 0.4 s time constant
   (librosa's formula). It is a Conv2d with a (taps, 1) kernel: no loop.

The output is ``(B, 1, frames, n_mels)``. Models built on a front-end accept
any ``T >= frontend_min_samples(spec)``; the model contract promises
``microser.MIN_SECONDS = 0.25`` s (4000 samples), which covers every spec this module
accepts (n_fft <= 2048).

This module also holds the tiny field-rule helpers that every spec dataclass
(`FrontendSpec`, the family bodies) uses to validate itself.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from microser import SAMPLE_RATE
from microser.errors import MicroserError

PRENORM_EPS = 1e-7
PRENORM_PRIOR_COUNT = 0.0  # "running": prior pseudo-samples (none: measured no better, see the docstring)
PRENORM_PRIOR_VAR = 0.0  # "running": their variance; their mean is 0
FLOOR_DB = -100.0  # energy floor before log / PCEN, dB re full scale (full_scale_energy); module docstring
PCEN_ALPHA, PCEN_DELTA, PCEN_R, PCEN_EPS = 0.98, 2.0, 0.5, 1e-6  # librosa's defaults
PCEN_TIME_CONSTANT = 0.4  # seconds


# ---- field rules: one declaration per spec field, used by __post_init__, from_dict and the search spaces ----


@dataclass(frozen=True)
class Rule:
    """What one spec field accepts: a type, and either allowed choices or an inclusive range.

    ``per_item`` marks tuple fields (e.g. channels per block): the rule applies to
    each element. ``optional`` allows ``None``.
    """

    type: type
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    per_item: bool = False
    min_items: int = 0
    optional: bool = False
    help: str = ""

    def describe(self) -> str:
        """The allowed values in words, for error messages."""
        if self.choices:
            allowed = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.low is not None:
            allowed = f"a{'n' if self.type is int else ''} {self.type.__name__} in [{self.low}, {self.high}]"
        else:
            allowed = f"a {self.type.__name__}"
        if self.per_item:
            allowed = f"a list{f' of at least {self.min_items} items' if self.min_items else ''}, each {allowed}"
        return allowed + (" or null" if self.optional else "")

    def check_item(self, key: str, value: Any, label: str = "spec key") -> Any:
        """Return ``value`` converted to the field's type (int -> float only), or raise MicroserError.

        Messages read ``<label> '<key>': <value> ..., expected <allowed values>``.
        """
        ok_type = isinstance(value, self.type) and not (self.type is not bool and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok_type = float(value), True
        if not ok_type:
            raise MicroserError(f"{label} '{key}': {value!r} is a {type(value).__name__}, expected {self.describe()}")
        if self.choices and value not in self.choices:
            raise MicroserError(f"{label} '{key}': {value!r} is not allowed, expected {self.describe()}")
        if self.low is not None and not (self.low <= value <= self.high):
            raise MicroserError(f"{label} '{key}': {value!r} is out of range, expected {self.describe()}")
        return value

    def check(self, key: str, value: Any, label: str = "spec key") -> Any:
        """Validate and normalise a whole field value (lists become tuples for per-item fields)."""
        if value is None and self.optional:
            return None
        if self.per_item:
            if not isinstance(value, (list, tuple)) or len(value) < self.min_items:
                raise MicroserError(f"{label} '{key}': {value!r} is not allowed, expected {self.describe()}")
            return tuple(self.check_item(f"{key}[{i}]", v, label) for i, v in enumerate(value))
        return self.check_item(key, value, label)


def check_fields(obj, prefix: str) -> None:
    """Validate every field of a frozen spec dataclass against its class's ``RULES`` (normalising in place)."""
    for f in fields(obj):
        rule = obj.RULES[f.name]
        object.__setattr__(obj, f.name, rule.check(f"{prefix}{f.name}", getattr(obj, f.name)))


def spec_from_dict(cls, data: Any, prefix: str):
    """Build a spec dataclass from a JSON-like dict, refusing unknown and missing keys with MicroserError."""
    if not isinstance(data, dict):
        raise MicroserError(f"spec key '{prefix.rstrip('.')}': expected a JSON object, got {type(data).__name__}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise MicroserError(f"spec key '{prefix}{unknown[0]}' is unknown: allowed keys there are {', '.join(names)}")
    missing = [n for n in names if n not in data]
    if missing:
        raise MicroserError(f"spec key '{prefix}{missing[0]}' is missing: write all of {', '.join(names)}")
    return cls(**data)


def spec_to_dict(obj) -> dict:
    """Plain JSON-ready dict of a spec dataclass (tuples become lists)."""
    return {f.name: (list(v) if isinstance(v := getattr(obj, f.name), tuple) else v) for f in fields(obj)}


# ---- the front-end spec ----


@dataclass(frozen=True)
class FrontendSpec:
    """Front-end settings (see the module docstring for the exact computation of each)."""

    prenorm: str = "clip"
    n_fft: int = 512
    hop: int = 160
    win_length: int | None = None  # None: n_fft
    window: str = "hann"  # periodic Hann; the only window so far
    center: bool = False  # zero-pad n_fft//2 at both ends (not torch's reflection)
    pad_end: bool = False  # zero-pad hop-1 at the end: a final partial hop still makes a frame
    n_mels: int = 40
    fmin: float = 0.0
    fmax: float = 8000.0
    compression: str = "log"
    filterbank: str = "mel"

    RULES: ClassVar[dict[str, Rule]] = {
        "prenorm": Rule(str, choices=("none", "clip", "running", "window")),
        "n_fft": Rule(int, low=16, high=2048),
        "hop": Rule(int, low=1, high=2048),
        "win_length": Rule(int, low=4, high=2048, optional=True),
        "window": Rule(str, choices=("hann",)),
        "center": Rule(bool),
        "pad_end": Rule(bool),
        "n_mels": Rule(int, low=1, high=256),
        "fmin": Rule(float, low=0.0, high=SAMPLE_RATE / 2),
        "fmax": Rule(float, low=0.0, high=SAMPLE_RATE / 2),
        "compression": Rule(str, choices=("log", "pcen")),
        "filterbank": Rule(str, choices=("mel", "learnable")),
    }

    def __post_init__(self):
        check_fields(self, "frontend.")
        if self.win_length is not None and self.win_length > self.n_fft:
            raise MicroserError(f"spec key 'frontend.win_length': {self.win_length} exceeds n_fft {self.n_fft}; "
                                "use win_length <= n_fft or null")
        if self.fmin >= self.fmax:
            raise MicroserError(f"spec key 'frontend.fmin': {self.fmin} must be below fmax {self.fmax}")
        top = mel_bin(self.fmax, self.n_fft)
        if top > self.n_fft // 2:
            raise MicroserError(f"spec key 'frontend.fmax': {self.fmax:g} Hz maps to FFT bin floor((n_fft + 1) * fmax "
                                f"/ {SAMPLE_RATE}) = {top}, past the last bin {self.n_fft // 2} of n_fft {self.n_fft} "
                                "(ONNX MelWeightMatrix refuses it); use an even n_fft or a lower fmax")

    @property
    def window_length(self) -> int:
        return self.n_fft if self.win_length is None else self.win_length

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    def summary(self) -> str:
        """Short text, e.g. ``stft512/160 m40 log clip``."""
        win = f"w{self.win_length}" if self.win_length not in (None, self.n_fft) else ""
        parts = [f"stft{self.n_fft}/{self.hop}{win}"]
        if self.center:
            parts.append("center")
        if self.pad_end:
            parts.append("padend")
        mel = f"m{self.n_mels}"
        if (self.fmin, self.fmax) != (0.0, SAMPLE_RATE / 2):
            mel += f"[{self.fmin:g}-{self.fmax:g}Hz]"
        parts.append(mel)
        parts.append(self.compression + ("+learnfb" if self.filterbank == "learnable" else ""))
        parts.append(self.prenorm)
        return " ".join(parts)

    def to_dict(self) -> dict:
        return spec_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FrontendSpec":
        return spec_from_dict(cls, data, "frontend.")


def frame_padding(spec: FrontendSpec) -> tuple[int, int]:
    """Zeros added before and after the audio: ``(L, R)`` (module docstring, step 2)."""
    half = spec.n_fft // 2 if spec.center else 0
    return half, half + (spec.hop - 1 if spec.pad_end else 0)


def num_frames(spec: FrontendSpec, n_samples: int) -> int:
    """Number of frames the front-end makes from ``n_samples`` samples (0 if too short)."""
    left, right = frame_padding(spec)
    padded = n_samples + left + right
    return 0 if padded < spec.n_fft else 1 + (padded - spec.n_fft) // spec.hop


def frontend_min_samples(spec: FrontendSpec) -> int:
    """Smallest input length giving one frame."""
    left, right = frame_padding(spec)
    return max(1, spec.n_fft - left - right)


def pcen_taps(hop: int) -> int:
    """Length of the PCEN smoother FIR for a hop: three time constants, at least 1 tap."""
    frames_per_tc = PCEN_TIME_CONSTANT * SAMPLE_RATE / hop
    return max(1, math.ceil(3 * frames_per_tc))


def pcen_fir(hop: int) -> torch.Tensor:
    """The PCEN smoother taps h_0..h_{L-1} (h_0 weighs the current frame), normalised to sum 1."""
    t = PCEN_TIME_CONSTANT * SAMPLE_RATE / hop
    s = (math.sqrt(1 + 4 * t**2) - 1) / (2 * t**2)  # librosa.pcen's smoothing coefficient
    k = torch.arange(pcen_taps(hop), dtype=torch.float64)
    h = s * (1 - s) ** k
    return (h / h.sum()).float()


def mel_bin(hz: float, n_fft: int) -> int:
    """FFT bin of a frequency as onnxruntime's MelWeightMatrix range check computes it (float32)."""
    return int(np.floor(np.float32(n_fft + 1) * np.float32(hz) / np.float32(SAMPLE_RATE)))


def onnx_mel_matrix(n_mels: int, n_fft: int, fmin: float, fmax: float) -> np.ndarray:
    """ONNX ``MelWeightMatrix(n_mels, n_fft, 16000, fmin, fmax)`` as onnxruntime computes it: float32 (n_fft//2+1, n_mels).

    onnxruntime's kernel, step by step: the edges are float32 inputs; mel
    points ``mel(fmin) + k * step``, ``k = 0 .. n_mels+1``, with ``step =
    (mel(fmax) - mel(fmin)) / (n_mels + 2)`` in float64; each back to Hz and to
    bin ``floor((n_fft + 1) * hz / 16000)``; triangles as in the module docstring,
    each weight ``(j - left) / (centre - left)`` or ``(right - j) / (right - centre)``
    in float32 (a falling edge overwrites the rising edge's 1 at the centre with 1).
    """
    lo, hi = float(np.float32(fmin)), float(np.float32(fmax))
    points = n_mels + 2
    mel_lo, mel_hi = 2595 * np.log10(1 + lo / 700), 2595 * np.log10(1 + hi / 700)
    step = (mel_hi - mel_lo) / float(points)
    hz = 700 * (10 ** ((mel_lo + step * np.arange(points)) / 2595) - 1)
    bins = np.floor((n_fft + 1) * hz / SAMPLE_RATE).astype(np.int64)
    out = np.zeros((n_fft // 2 + 1, n_mels), np.float32)
    for i in range(n_mels):
        left, centre, right = (int(b) for b in bins[i:i + 3])
        if centre == left:
            out[centre, i] = 1.0
        else:
            j = np.arange(left, centre + 1)
            out[j, i] = (j - left).astype(np.float32) / np.float32(centre - left)
        if right > centre:
            j = np.arange(centre, right)
            out[j, i] = (right - j).astype(np.float32) / np.float32(right - centre)
    return out


def mel_matrix(spec: FrontendSpec) -> torch.Tensor:
    """The (n_fft//2+1, n_mels) mel filterbank of a spec: ONNX MelWeightMatrix, bit-exact with onnxruntime."""
    return torch.from_numpy(onnx_mel_matrix(spec.n_mels, spec.n_fft, spec.fmin, spec.fmax))


def hann_window(length: int) -> torch.Tensor:
    """Periodic Hann window of ``length`` samples exactly as onnxruntime's ``HannWindow`` makes it (float32)."""
    n = np.arange(length, dtype=np.float64)
    return torch.from_numpy((0.5 - 0.5 * np.cos(2 * np.pi / length * n)).astype(np.float32))


def full_scale_energy(spec: FrontendSpec) -> float:
    """``E_fs = (win_length / 4)**2``: the power a sine of amplitude 1 puts in its FFT bin (periodic Hann, sum win/2)."""
    return (spec.window_length / 4) ** 2


def energy_floor(spec: FrontendSpec) -> float:
    """The mel-energy floor ``E_fs * 10**(FLOOR_DB / 10)`` applied before the log or PCEN (as float32)."""
    return float(np.float32(full_scale_energy(spec) * 10 ** (FLOOR_DB / 10)))


@dataclass(frozen=True)
class GeneratedTable:
    """A constant table the exported graph computes with an ONNX operator instead of storing it.

    ``values`` is exactly what the operator yields (the module's buffer);
    ``op`` is ``"MelWeightMatrix"`` (``args``: n_mels, n_fft, sample rate, fmin,
    fmax) or ``"HannWindow"`` (``args``: window length, n_fft: the window is
    zero-padded, centred, to n_fft, as torch.stft uses it); ``name`` is the
    node-name prefix (``/frontend/...``).
    """

    op: str
    values: np.ndarray
    args: tuple
    name: str


# ---- the modules ----


class Prenorm(nn.Module):
    """Waveform normalisation ``"none" | "clip" | "running"`` on (B, T); ``"window"`` lives in `PowerSpectrum`.

    ``prior_count`` / ``prior_var`` are ``n0`` / ``v0`` of ``"running"`` (module
    docstring); only the defaults are the spec's definition (other values are
    for comparison benches: a spec cannot carry them, nor can the C library).
    """

    def __init__(self, mode: str, prior_count: float = PRENORM_PRIOR_COUNT, prior_var: float = PRENORM_PRIOR_VAR):
        super().__init__()
        self.mode = mode
        self.prior_count, self.prior_var = float(prior_count), float(prior_var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T)
        if self.mode == "clip":
            mu = x.mean(1, keepdim=True)
            sd = (x - mu).pow(2).mean(1, keepdim=True).sqrt()
            return (x - mu) / (sd + PRENORM_EPS)
        if self.mode == "running":
            # sums accumulated in float64 (ONNX CumSum would otherwise accumulate in float32: 5e-4 off after
            # 30 s), each rounded to float32 as the C library does; counts are exact in float32 below 2**24
            s1 = torch.cumsum(x.double(), 1).float()
            s2 = torch.cumsum((x * x).double(), 1).float()
            count = torch.cumsum(torch.ones_like(x), 1) + self.prior_count  # 1 + n0, ..., T + n0
            mu = s1 / count
            var = torch.clamp((s2 + self.prior_count * self.prior_var) / count - mu * mu, min=0.0)
            return (x - mu) / (var.sqrt() + PRENORM_EPS)
        return x


class PowerSpectrum(nn.Module):
    """Zero padding, STFT (ONNX STFT operator) and power: (B, T) -> (B, frames, n_fft//2+1)."""

    def __init__(self, spec: FrontendSpec):
        super().__init__()
        self.n_fft, self.hop, self.win = spec.n_fft, spec.hop, spec.window_length
        self.pad = frame_padding(spec)
        self.per_window = spec.prenorm == "window"
        self.register_buffer("window", hann_window(self.win), persistent=False)
        if self.per_window:
            # spectrum of the window, zero-padded and centred in n_fft as torch.stft does: (n_freqs, 2) real/imag
            left = (self.n_fft - self.win) // 2
            padded = torch.zeros(self.n_fft, dtype=torch.float64)
            padded[left:left + self.win] = hann_window(self.win).double()
            w = torch.fft.rfft(padded)
            self.register_buffer("window_spectrum", torch.stack([w.real, w.imag], -1).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad != (0, 0):
            x = nn.functional.pad(x, self.pad)  # (B, L + T + R)
        with warnings.catch_warnings():  # return_complex=False is deprecated but is what exports to ONNX STFT
            warnings.simplefilter("ignore", UserWarning)
            z = torch.stft(x, self.n_fft, self.hop, self.win, self.window, center=False,
                           onesided=True, return_complex=False)  # (B, F, frames, 2)
        if self.per_window:
            # per-frame mean and std over the frame's n_fft samples: (B, 1, frames, 1)
            frames = x.unsqueeze(1)  # (B, 1, T')
            m = nn.functional.avg_pool1d(frames, self.n_fft, self.hop)  # (B, 1, frames)
            m2 = nn.functional.avg_pool1d(frames * frames, self.n_fft, self.hop)
            sd = torch.clamp(m2 - m * m, min=0.0).sqrt()
            m, sd = m.unsqueeze(-1), sd.unsqueeze(-1)
            z = (z - m * self.window_spectrum.unsqueeze(1)) / (sd + PRENORM_EPS)  # (B, F, frames, 2)
        z = z.transpose(1, 2)  # (B, frames, F, 2): ONNX STFT's own layout, so the export has no transpose
        return (z * z).sum(-1)  # (B, frames, F)


class Frontend(nn.Module):
    """Audio (B, T) float32 at 16 kHz -> features (B, 1, frames, n_mels); see the module docstring.

    ``q_out`` is the quantization point of the features (``nn.Identity``; QAT
    puts a fake-quantizer there, ``microser.qat``).
    """

    def __init__(self, spec: FrontendSpec):
        super().__init__()
        self.spec = spec
        self.prenorm = Prenorm(spec.prenorm)
        self.power = PowerSpectrum(spec)
        fb = mel_matrix(spec)  # (F, n_mels)
        if spec.filterbank == "learnable":
            self.fb = nn.Parameter(fb)
        else:
            self.register_buffer("fb", fb)
        self.floor = energy_floor(spec)
        self.log = spec.compression == "log"
        if not self.log:
            taps = pcen_fir(spec.hop)
            self.register_buffer("pcen_fir", taps.flip(0).view(1, 1, -1, 1))  # conv weight: oldest tap first
        self.q_out = nn.Identity()

    def filterbank(self) -> torch.Tensor:
        """The (F, n_mels) matrix in use (abs of the learnable one)."""
        return self.fb.abs() if isinstance(self.fb, nn.Parameter) else self.fb

    def generated_tables(self) -> list[GeneratedTable]:
        """The tables the exported graph generates with ONNX operators (window; mel matrix unless learnable)."""
        spec = self.spec
        pad = torch.zeros(spec.n_fft)
        left = (spec.n_fft - self.power.win) // 2
        pad[left:left + self.power.win] = self.power.window
        tables = [GeneratedTable("HannWindow", pad.numpy(), (self.power.win, spec.n_fft), "/frontend/power/HannWindow")]
        if not isinstance(self.fb, nn.Parameter):
            tables.append(GeneratedTable("MelWeightMatrix", self.fb.numpy(),
                                         (spec.n_mels, spec.n_fft, SAMPLE_RATE, spec.fmin, spec.fmax),
                                         "/frontend/MelWeightMatrix"))
        return tables

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.prenorm(audio)  # (B, T)
        p = self.power(x)  # (B, frames, F)
        e = torch.matmul(p, self.filterbank()).unsqueeze(1)  # (B, 1, frames, n_mels)
        e = torch.clamp(e, min=self.floor)  # silence and anything quieter: exactly the floor
        if self.log:
            return self.q_out(10.0 * torch.log10(e))
        taps = self.pcen_fir.shape[2]
        smooth = nn.functional.conv2d(nn.functional.pad(e, (0, 0, taps - 1, 0)), self.pcen_fir)  # causal
        return self.q_out((e / (PCEN_EPS + smooth) ** PCEN_ALPHA + PCEN_DELTA) ** PCEN_R - PCEN_DELTA**PCEN_R)
