"""The embedded synthetic demo corpus: a source-filter voice whose prosody follows latent A/D/V.

Nothing here is real speech. Every clip is synthesised in numpy/scipy from
three latents in 0..1 (arousal, dominance, valence) and a speaker:

- source: a Rosenberg glottal pulse train (flow derivative) on an f0 contour
  with per-period jitter, shimmer and a period-doubling roughness, plus
  aspiration noise (breathiness);
- filter: five cascaded formant resonators per syllable (a vowel from a small
  table, scaled by the speaker's vocal-tract length), gliding between vowels;
- articulation: syllables at a latent-driven rate with an attack/decay
  envelope, fricative noise bursts at some onsets, pauses;
- channel: mild random band-pass, a little reverb and noise at a random SNR.

How the latents act (each also through cues that survive level normalisation):

============  =================================================================
arousal       f0 level (+0.9 octave over 0..1) and accent height, speaking rate
              (2.6-6 syllables/s), fewer pauses, spectral tilt (return-phase
              low-pass from ~600 Hz to ~5 kHz, smaller open quotient, sharper
              closure), less breathiness, stronger fricatives, louder
dominance     lower f0 (-0.45 octave), less jitter, steeper syllable attack,
              shorter pauses, louder
valence       f0 contour slope (-8 semitones falling to +2 rising over the
              clip), smile formant shift (F1/F2 +/-5 %), shimmer, and
              period-doubling roughness below 0.5
============  =================================================================

Valence has the weakest and most speaker-confounded cues, so it is the hardest
target, as in real speech. The teacher's outputs are the latents plus Gaussian
noise (``TEACHER_NOISE_SD``), clipped to 0..1; the CCC between them is the
ceiling any student can reach and is stored in ``demo.json``.

Clip ``i`` of seed ``s`` is bit-identical across runs (it depends only on
``(s, i, n_speakers)``); 1,000 clips (about 46 min of audio) take about 11-17 s
on one core of the development machine (bench/demo_corpus.py).
"""

from __future__ import annotations

import csv
import fcntl
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import signal, special

from microser import SAMPLE_RATE, TARGETS, __version__
from microser.errors import MicroserError
from microser.metrics import ccc_report

GENERATOR_VERSION = 1  # bump whenever the audio or labels a seed produces change
TEACHER_NOISE_SD = 0.05  # the simulated teacher's error (sd, on the 0..1 scale)
MIN_SECONDS, MAX_SECONDS = 1.5, 4.0

# Correlation of the latents before they are mapped to 0..1: dominance follows
# arousal (as in MSP-Podcast), valence is only weakly tied to either, and each
# keeps independent variance.
LATENT_CORRELATION = np.array([[1.0, 0.55, 0.15], [0.55, 1.0, 0.25], [0.15, 0.25, 1.0]])

# Vowel formants F1..F5 (Hz) of an adult male tract (Peterson & Barney-like).
VOWELS = np.array(
    [
        [730, 1090, 2440, 3400, 4300],  # a
        [530, 1840, 2480, 3400, 4300],  # e
        [270, 2290, 3010, 3500, 4400],  # i
        [570, 840, 2410, 3300, 4200],  # o
        [300, 870, 2240, 3300, 4200],  # u
        [660, 1720, 2410, 3400, 4300],  # ae
        [490, 1350, 1690, 3300, 4200],  # er
    ],
    dtype=np.float64,
)
BANDWIDTHS = np.array([80.0, 100.0, 140.0, 220.0, 300.0])  # formant bandwidths (Hz)

# Speaker groups: (probability, base f0 range Hz, vocal-tract scale range).
SPEAKER_GROUPS = {
    "male": (0.45, (85.0, 135.0), (0.93, 1.04)),
    "female": (0.45, (165.0, 235.0), (1.10, 1.20)),
    "child": (0.10, (235.0, 300.0), (1.25, 1.38)),
}

_NYQ = SAMPLE_RATE / 2
_FRICATIVES = [  # band-pass filters for 's'-, 'sh'- and 'f'-like noise
    signal.butter(2, (lo / _NYQ, hi / _NYQ), btype="bandpass", output="sos")
    for lo, hi in ((3800.0, 7600.0), (2000.0, 5000.0), (1200.0, 7000.0))
]


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: voice range and habits that do not depend on emotion."""

    name: str
    group: str  # "male" | "female" | "child"
    f0: float  # base f0 (Hz) at neutral latents
    tract: float  # vocal-tract scale: formants are multiplied by it (shorter tract, higher formants)
    rate: float  # offset of the speaking rate (syllables/s)
    open_quotient: float  # offset of the glottal open quotient
    jitter: float  # base cycle-to-cycle f0 jitter (relative sd)


@dataclass(frozen=True)
class DemoCorpus:
    """Clips, speakers and labels of one generated corpus (arrays are float32/float64, 16 kHz audio)."""

    audio: tuple[np.ndarray, ...]  # float32 in [-1, 1], one per clip
    speakers: tuple[str, ...]  # speaker name per clip
    latents: np.ndarray  # (N, 3) float64 in 0..1: what the voice was generated from
    targets: np.ndarray  # (N, 3) float64 in 0..1: the teacher's outputs (latents + noise, clipped)
    seed: int
    speaker_table: tuple[Speaker, ...] = field(repr=False, default=())

    @property
    def ceiling(self) -> dict[str, float]:
        """CCC of the teacher outputs against the latents: the best a student of the teacher can score."""
        return ccc_report(self.targets, self.latents)

    @property
    def durations(self) -> np.ndarray:
        """Clip durations in seconds."""
        return np.array([len(a) / SAMPLE_RATE for a in self.audio])


def make_speakers(n_speakers: int, seed: int) -> tuple[Speaker, ...]:
    """The corpus's speakers; speaker ``k`` depends only on ``(seed, k)``."""
    names = list(SPEAKER_GROUPS)
    probs = np.array([SPEAKER_GROUPS[g][0] for g in names])
    out = []
    for k in range(n_speakers):
        rng = np.random.default_rng([seed, 1, k])
        # Alternate male/female for the first speakers so small corpora have both.
        group = names[k % 2] if k < 2 else names[rng.choice(len(names), p=probs)]
        _, (f_lo, f_hi), (t_lo, t_hi) = SPEAKER_GROUPS[group]
        out.append(
            Speaker(
                name=f"spk{k:02d}",
                group=group,
                f0=float(rng.uniform(f_lo, f_hi)),
                tract=float(rng.uniform(t_lo, t_hi)),
                rate=float(rng.normal(0.0, 0.35)),
                open_quotient=float(rng.normal(0.0, 0.04)),
                jitter=float(rng.uniform(0.004, 0.012)),
            )
        )
    return tuple(out)


def sample_latents(rng: np.random.Generator) -> np.ndarray:
    """One (arousal, dominance, valence) triple in 0..1, correlated like real A/D/V."""
    z = np.linalg.cholesky(LATENT_CORRELATION) @ rng.standard_normal(3)
    return special.ndtr(z)  # uniform marginals on 0..1


def generate_corpus(*, n_clips: int = 1000, n_speakers: int = 24, seed: int = 0) -> DemoCorpus:
    """Synthesise ``n_clips`` clips over ``n_speakers`` speakers, deterministically by ``seed``.

    Clip ``i`` depends only on ``(seed, i, n_speakers)``: its speaker is
    ``i % n_speakers``, so a small corpus is the start of a larger one.
    """
    clips = list(iter_clips(n_clips=n_clips, n_speakers=n_speakers, seed=seed))
    return DemoCorpus(
        audio=tuple(c[0] for c in clips),
        speakers=tuple(c[1].name for c in clips),
        latents=np.stack([c[2] for c in clips]),
        targets=np.stack([c[3] for c in clips]),
        seed=seed,
        speaker_table=make_speakers(n_speakers, seed),
    )


def iter_clips(*, n_clips: int, n_speakers: int, seed: int):
    """Yield ``(audio, speaker, latent, target)`` clip by clip, as `generate_corpus` makes them (low memory)."""
    if n_clips < 2:
        raise MicroserError(
            f"demo corpus n_clips={n_clips} is too small: expected at least 2 clips (--clips 2 or more)"
        )
    if not 1 <= n_speakers <= n_clips:
        raise MicroserError(
            f"demo corpus n_speakers={n_speakers} does not fit n_clips={n_clips}: expected 1 <= speakers <= clips "
            "(lower --speakers or raise --clips)"
        )
    speakers = make_speakers(n_speakers, seed)
    for i in range(n_clips):
        rng = np.random.default_rng([seed, 0, i])
        latent = sample_latents(rng)
        target = np.clip(latent + rng.normal(0.0, TEACHER_NOISE_SD, 3), 0.0, 1.0)
        speaker = speakers[i % n_speakers]
        yield synthesize(latent, speaker, rng), speaker, latent, target


# ---------------------------------------------------------------------------------------------
# synthesis of one clip
# ---------------------------------------------------------------------------------------------


def synthesize(latent, speaker: Speaker, rng: np.random.Generator) -> np.ndarray:
    """One clip (float32, 16 kHz, peak < 1) of ``speaker`` voicing ``latent = (arousal, dominance, valence)``."""
    a, d, v = (float(x) for x in latent)
    sr = SAMPLE_RATE
    n = int(rng.uniform(MIN_SECONDS, MAX_SECONDS) * sr)
    t = np.arange(n) / sr

    # --- articulation: syllables and pauses along the time axis ---
    rate = max(2.0, 2.6 + 3.4 * a + speaker.rate + rng.normal(0.0, 0.25))  # syllables per second
    syllables = _syllable_plan(n, rate, a, d, rng)  # (start, end, voiced_start) sample indices
    attack = 0.008 + 0.07 * (1.0 - d) ** 1.5  # seconds to reach the syllable's peak
    envelope, voiced = _envelope(n, syllables, attack, rng)

    # --- f0 contour (log2 Hz): level, declination/slope, accents, drift ---
    level = np.log2(speaker.f0) + 0.9 * (a - 0.5) - 0.45 * (d - 0.5) + rng.normal(0.0, 0.04)
    slope = (-3.0 + 10.0 * (v - 0.5)) / 12.0  # octaves over the clip: falling when negative, rising when positive
    log_f0 = level + slope * (t / t[-1] - 0.5)
    accent = (1.0 + 7.0 * a) / 12.0  # accent height in octaves
    for s0, s1, _ in syllables:
        c = 0.5 * (s0 + s1)
        w = max(s1 - s0, 1)
        bump = np.exp(-0.5 * ((np.arange(s0, s1) - c) / (0.3 * w)) ** 2)
        log_f0[s0:s1] += accent * rng.uniform(0.2, 1.0) * bump
    drift = np.cumsum(rng.normal(0.0, 1.0, n // 160 + 2))
    log_f0 += 0.005 * np.interp(np.arange(n) / 160, np.arange(drift.size), drift - drift.mean())
    f0 = np.clip(2.0**log_f0, 55.0, 600.0)

    # --- glottal source: Rosenberg pulses with jitter, shimmer, roughness, aspiration ---
    jitter = speaker.jitter * (1.7 - 1.3 * d)
    shimmer = 0.02 + 0.14 * (1.0 - v)
    rough = 0.25 * max(0.0, 0.5 - v) * 2.0  # period-doubling depth, only for negative valence
    oq = float(np.clip(0.78 - 0.38 * a + speaker.open_quotient, 0.3, 0.9))
    closing = 0.42 - 0.22 * a  # closing phase as a fraction of the open phase: shorter = brighter
    breath = 0.04 + 0.20 * (1.0 - a) ** 2
    # Return phase (as in the LF model): a one-pole low-pass on the pulses; lax voice rolls off from
    # ~600 Hz, tense voice from ~5 kHz, so arousal shows in the spectral tilt at any level.
    return_pole = np.exp(-2.0 * np.pi * 600.0 * 8.0**a * np.exp(rng.normal(0.0, 0.1)) / sr)

    phase0 = np.cumsum(f0) / sr
    n_periods = int(phase0[-1]) + 2
    f0j = f0 * (1.0 + jitter * rng.standard_normal(n_periods)[phase0.astype(np.int64)])
    phase = np.cumsum(f0j) / sr
    k = phase.astype(np.int64)
    frac = phase - k
    t_open = oq * (1.0 - closing)
    t_close = oq * closing
    flow = np.where(
        frac < t_open,
        0.5 * (1.0 - np.cos(np.pi * frac / t_open)),
        np.where(frac < oq, np.cos(0.5 * np.pi * (frac - t_open) / t_close), 0.0),
    )
    period_amp = 1.0 + shimmer * rng.standard_normal(k[-1] + 2)
    period_amp[1::2] *= 1.0 - rough
    flow *= period_amp[k]
    source = np.diff(flow, prepend=0.0) * (sr / f0.mean()) / 8.0  # flow derivative, about unit level
    source = signal.lfilter([1.0 - return_pole], [1.0, -return_pole], source)
    noise = rng.standard_normal(n)
    source += breath * (0.3 + flow) * noise * 0.1
    source *= envelope * voiced

    # --- vocal tract: cascaded formant resonators, gliding between syllable vowels ---
    smile = 1.0 + 0.10 * (v - 0.5)  # F1/F2 scale
    speech = _formant_filter(source, syllables, speaker.tract, smile, rng)

    # --- fricatives: band-passed noise bursts at some syllable onsets ---
    fric = np.zeros(n)
    for s0, _, sv in syllables:
        if sv > s0:
            burst = rng.standard_normal(sv - s0) * np.hanning(sv - s0)
            fric[s0:sv] += signal.sosfilt(_FRICATIVES[rng.integers(len(_FRICATIVES))], burst)
    if np.any(fric):
        burst_rms = np.sqrt(np.mean(fric[fric != 0] ** 2))
        fric *= (0.2 + 0.3 * a) * np.sqrt(np.mean(speech[voiced > 0.5] ** 2)) / burst_rms
    speech += fric
    return _channel(speech, a, d, rng)


def _syllable_plan(n: int, rate: float, a: float, d: float, rng) -> list[tuple[int, int, int]]:
    """Syllables as (start, end, voicing start) sample indices, with pauses between phrases."""
    sr = SAMPLE_RATE
    pos = int(rng.uniform(0.05, 0.2) * sr)
    end_margin = int(rng.uniform(0.05, 0.15) * sr)
    pause_prob = 0.08 + 0.16 * (1.0 - a)
    out = []
    while True:
        length = int(sr / rate * rng.uniform(0.7, 1.3))
        if pos + length > n - end_margin:
            break
        fric = int(rng.uniform(0.04, 0.09) * sr) if rng.random() < 0.35 else 0
        out.append((pos, pos + length, pos + min(fric, length // 2)))
        pos += length
        if rng.random() < pause_prob:
            pos += int(rng.uniform(0.08, 0.3) * (1.3 - 0.6 * d) * sr)
    if not out:  # a very short clip at a slow rate: one syllable filling it
        out.append((pos, n - end_margin, pos))
    return out


def _envelope(n: int, syllables, attack: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude envelope (attack, sustain, decay per syllable) and the voicing mask."""
    sr = SAMPLE_RATE
    env = np.zeros(n)
    voiced = np.zeros(n)
    for s0, s1, sv in syllables:
        m = s1 - sv
        x = np.arange(m) / sr
        rise = np.minimum(1.0, x / attack) ** 2
        fall_start = 0.65 * m / sr
        fall = np.clip(1.0 - (x - fall_start) / (m / sr - fall_start + 1e-9), 0.0, 1.0) ** 1.5
        env[sv:s1] = np.maximum(env[sv:s1], rise * (0.2 + 0.8 * fall) * rng.uniform(0.6, 1.0))
        voiced[sv:s1] = 1.0
    # Connected speech: voicing continues (weakly) across syllable boundaries without a pause.
    for (a0, a1, _), (b0, _, bv) in zip(syllables, syllables[1:]):
        if b0 == a1 and bv == b0:
            voiced[a1 - 1 : b0 + 1] = 1.0
    smooth = np.hanning(int(0.004 * sr))
    voiced = np.convolve(voiced, smooth / smooth.sum(), mode="same")
    return env, voiced


def _resonator(freq: float, bw: float) -> tuple[np.ndarray, np.ndarray]:
    """Second-order resonator (b, a) with unit gain at DC."""
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    theta = 2.0 * np.pi * freq / SAMPLE_RATE
    a = np.array([1.0, -2.0 * r * np.cos(theta), r * r])
    return np.array([a.sum()]), a


def _formant_filter(source: np.ndarray, syllables, tract: float, smile: float, rng) -> np.ndarray:
    """Cascade of five resonators whose frequencies step from vowel to vowel (3 steps per glide)."""
    n = source.size
    scale = np.array([smile, smile, 1.0, 1.0, 1.0]) * tract
    vowels = [VOWELS[rng.integers(len(VOWELS))] * scale * rng.uniform(0.97, 1.03, 5) for _ in syllables]
    # Segment boundaries: each syllable glides from the previous vowel over its first 30 %.
    bounds, targets = [0], []
    prev = vowels[0]
    for (s0, s1, _), vow in zip(syllables, vowels):
        glide = int(0.3 * (s1 - s0))
        for j, w in enumerate((0.25, 0.6, 1.0)):
            b = s0 + (glide * (j + 1)) // 3 if j < 2 else s1
            if b > bounds[-1]:
                bounds.append(b)
                targets.append(prev + w * (vow - prev))
        prev = vow
    if bounds[-1] < n:
        bounds.append(n)
        targets.append(prev)
    formants = np.minimum(np.array(targets), 0.9 * _NYQ)
    out = source.copy()
    for f in range(5):
        zi = np.zeros(2)
        for (b0, b1), freqs in zip(zip(bounds, bounds[1:]), formants):
            b, a = _resonator(freqs[f], BANDWIDTHS[f] * (1.0 + 0.2 * (tract - 1.0)))
            out[b0:b1], zi = signal.lfilter(b, a, out[b0:b1], zi=zi)
    return out


def _channel(speech: np.ndarray, a: float, d: float, rng) -> np.ndarray:
    """Loudness, mild random band-pass, a little reverb and noise at a random SNR; float32, peak < 1."""
    sr = SAMPLE_RATE
    n = speech.size
    lo = rng.uniform(60.0, 200.0)
    hi = rng.uniform(5500.0, 7600.0)
    speech = signal.sosfilt(signal.butter(2, (lo / _NYQ, hi / _NYQ), btype="bandpass", output="sos"), speech)
    rt60 = rng.uniform(0.08, 0.35)
    m = int(rt60 * sr)
    ir = rng.standard_normal(m) * np.exp(-6.9 * np.arange(m) / m)
    ir *= rng.uniform(0.05, 0.25) / np.sqrt(np.sum(ir**2))
    ir[0] += 1.0
    speech = signal.fftconvolve(speech, ir)[:n]
    active_rms = np.sqrt(np.mean(speech[np.abs(speech) > 1e-4] ** 2)) if np.any(np.abs(speech) > 1e-4) else 1.0
    snr_db = rng.uniform(15.0, 40.0)
    noise = rng.standard_normal(n)
    if rng.random() < 0.5:  # pinkish noise
        noise = signal.lfilter([1.0], [1.0, -0.9], noise)
    noise *= active_rms * 10 ** (-snr_db / 20) / np.sqrt(np.mean(noise**2))
    x = speech + noise
    level_db = -26.0 + 8.0 * (d - 0.5) + 6.0 * (a - 0.5) + rng.normal(0.0, 2.0)  # speech RMS in dBFS
    x *= 10 ** (level_db / 20) / active_rms
    peak = np.max(np.abs(x))
    if peak > 0.98:
        x *= 0.98 / peak
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# on disk: the corpus folder and the demo cache
# ---------------------------------------------------------------------------------------------

_MARKER = ".microser-demo"  # written first: a folder with it (and no demo.json) is an interrupted demo write


def _request(n_clips: int, n_speakers: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_clips": int(n_clips),
            "n_speakers": int(n_speakers), "sample_rate": SAMPLE_RATE}


def _matches(out_dir: Path, request: dict) -> bool:
    """Whether ``out_dir`` holds a complete corpus written for exactly ``request``."""
    try:
        meta = json.loads((out_dir / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in request.items()) and (out_dir / "labels.csv").is_file()


def write_demo_corpus(out_dir, *, n_clips: int = 1000, n_speakers: int = 24, seed: int = 0) -> Path:
    """Generate the corpus and write it as WAV files plus ``labels.csv`` and ``demo.json``; returns the CSV's path.

    Layout::

        out_dir/audio/<speaker>/<speaker>_<clip>.wav   16 kHz mono int16
        out_dir/labels.csv   path (relative to the CSV), speaker, arousal, dominance, valence (the teacher's
                             outputs: latents + noise), latent_arousal, latent_dominance, latent_valence
        out_dir/demo.json    generator version, seed, counts, CCC ceiling, durations (written last)

    Idempotent: when ``demo.json`` already describes this request, nothing is
    written. A folder that holds other files is refused, never overwritten.
    """
    import soundfile as sf

    out_dir = Path(out_dir)
    request = _request(n_clips, n_speakers, seed)
    if _matches(out_dir, request):
        return out_dir / "labels.csv"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (
        (out_dir / _MARKER).is_file() or (out_dir / "demo.json").is_file()
    ):
        raise MicroserError(
            f"demo folder {out_dir} already holds other files (no demo.json): pass an empty or new folder"
        )
    clips = iter_clips(n_clips=n_clips, n_speakers=n_speakers, seed=seed)  # validates the counts first
    next_clip = next(clips)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _MARKER).write_text("a microser demo corpus is being written here\n")
    (out_dir / "demo.json").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "audio", ignore_errors=True)
    rows, latents, targets, durations = [], [], [], []
    for i, (x, speaker, latent, target) in enumerate(itertools.chain([next_clip], clips)):
        rel = f"audio/{speaker.name}/{speaker.name}_{i:05d}.wav"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out_dir / rel, x, SAMPLE_RATE, subtype="PCM_16")
        rows.append([rel, speaker.name, *(f"{v:.6f}" for v in target), *(f"{v:.6f}" for v in latent)])
        latents.append(latent)
        targets.append(target)
        durations.append(len(x) / SAMPLE_RATE)
    tmp = out_dir / "labels.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "speaker", *TARGETS, *(f"latent_{t}" for t in TARGETS)])
        w.writerows(rows)
    os.replace(tmp, out_dir / "labels.csv")

    d = np.array(durations)
    speaker_table = make_speakers(n_speakers, seed)
    meta = {
        "format": "microser-demo",
        **request,
        "synthetic": True,
        "speaker_groups": {g: sum(s.group == g for s in speaker_table) for g in SPEAKER_GROUPS},
        "teacher_noise_sd": TEACHER_NOISE_SD,
        "ceiling_ccc": {k: round(v, 6) for k, v in ccc_report(np.array(targets), np.array(latents)).items()},
        "durations": {"total_seconds": round(float(d.sum()), 3), "min_seconds": round(float(d.min()), 3),
                      "max_seconds": round(float(d.max()), 3), "mean_seconds": round(float(d.mean()), 3)},
        "microser_version": __version__,
    }
    tmp = out_dir / "demo.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / "demo.json")
    (out_dir / _MARKER).unlink(missing_ok=True)
    return out_dir / "labels.csv"


def default_demo_dir() -> Path:
    """Where the demo lives by default: ``$MICROSER_HOME/demo``, with MICROSER_HOME defaulting to ~/.cache/microser."""
    return Path(os.environ.get("MICROSER_HOME") or "~/.cache/microser").expanduser() / "demo"


def ensure_demo_cache(root=None, *, progress=None, **gen_kwargs) -> Path:
    """The demo teacher cache at ``root/cache`` (corpus at ``root/corpus``), written if not already complete.

    ``root`` defaults to `default_demo_dir`; ``gen_kwargs`` (``n_clips``,
    ``n_speakers``, ``seed``) go to `write_demo_corpus`; ``progress`` to
    `microser.cache.build_cache`. A corpus written for another request is
    replaced, and the cache built from it is removed first, so the cache
    always describes the corpus beside it. An interrupted build resumes.
    """
    from microser.cache import Cache
    from microser.cache_build import build_cache

    root = Path(root) if root is not None else default_demo_dir()
    kwargs = {"n_clips": 1000, "n_speakers": 24, "seed": 0, **gen_kwargs}
    unknown = set(kwargs) - {"n_clips", "n_speakers", "seed"}
    if unknown:
        raise TypeError(f"ensure_demo_cache got unexpected arguments {sorted(unknown)}")
    corpus_dir, cache_dir = root / "corpus", root / "cache"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as lock:  # concurrent callers (search workers) wait for the first
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _matches(corpus_dir, _request(**kwargs)):
            _remove_cache(cache_dir)  # built from another corpus (or none): never mixed
        labels = write_demo_corpus(corpus_dir, **kwargs)
        try:
            if len(Cache.open(cache_dir)) == kwargs["n_clips"]:
                return cache_dir
        except MicroserError:
            pass  # missing or interrupted: build_cache creates or resumes it
        build_cache(labels, ["demo"], cache_dir, progress=progress)
    return cache_dir


def _remove_cache(cache_dir: Path) -> None:
    """Delete a demo cache folder, refusing one that is not a microser cache (someone else's folder)."""
    if not cache_dir.exists():
        return
    ours = (cache_dir / "meta.json").is_file() or (cache_dir / "build.json").is_file()
    if not ours and any(cache_dir.iterdir()):
        raise MicroserError(f"{cache_dir} exists but is not a microser cache: pass another --out folder for the demo")
    shutil.rmtree(cache_dir)


@dataclass(frozen=True)
class DemoReport:
    """What `build_demo` produced: where, how much, and the CCC ceiling the teacher noise leaves."""

    root: Path
    corpus: Path  # the labels.csv
    cache: Path
    n_clips: int
    n_speakers: int
    seed: int
    n_items: int
    splits: dict  # split name -> items
    audio_seconds: float
    ceiling: dict  # TARGETS + "mean" -> CCC
    elapsed_seconds: float

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def build_demo(root=None, *, n_clips: int = 1000, n_speakers: int = 24, seed: int = 0, progress=None) -> DemoReport:
    """`ensure_demo_cache` plus a summary, for `microser demo`."""
    from microser.cache import Cache

    t0 = time.perf_counter()
    root = Path(root) if root is not None else default_demo_dir()
    cache_dir = ensure_demo_cache(root, n_clips=n_clips, n_speakers=n_speakers, seed=seed, progress=progress)
    cache = Cache.open(cache_dir)
    meta = json.loads((root / "corpus" / "demo.json").read_text())
    splits = {}
    for item in cache.items:
        splits[item["split"]] = splits.get(item["split"], 0) + 1
    return DemoReport(
        root=root, corpus=root / "corpus" / "labels.csv", cache=cache_dir, n_clips=n_clips, n_speakers=n_speakers,
        seed=seed, n_items=len(cache), splits=splits, audio_seconds=meta["durations"]["total_seconds"],
        ceiling=meta["ceiling_ccc"], elapsed_seconds=time.perf_counter() - t0,
    )
