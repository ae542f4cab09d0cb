"""Audio in: any file soundfile reads, any rate and channel count -> mono float32 at 16 kHz, and segmenting.

Reading is segment-wise where it matters: `read_segment` seeks into the file
with ``sf.SoundFile`` and resamples only the samples a segment needs (plus the
resampling filter's context), so an hour-long recording never sits in memory
whole. Its output equals slicing the whole-file resample (up to float rounding),
because every chunk starts on the resampler's phase grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from microser import SAMPLE_RATE
from microser.errors import MicroserError, one_line

# Extensions scanned in an audio folder (what libsndfile >= 1.1 reads).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64"}
)
_LOWPASS_WIDTH = 6  # torchaudio's default sinc filter half-width, in zero crossings
_ROLLOFF = 0.99  # torchaudio's default
_SCAN_BLOCK = 1 << 18  # frames per block when scanning a long file for NaN/Inf/silence
_LSB_HALF = 0.5 / 32768.0  # a mono 16 kHz signal whose peak is below this rounds to all zeros in int16


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds before decoding: source rate, channels, frames, and its length at 16 kHz."""

    path: Path
    sample_rate: int
    channels: int
    frames: int

    @property
    def n_samples(self) -> int:
        """Number of samples after resampling to 16 kHz (torchaudio's ceil rule)."""
        return resampled_length(self.frames, self.sample_rate)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def resampled_length(frames: int, sample_rate: int) -> int:
    """Length of ``frames`` samples at ``sample_rate`` after resampling to 16 kHz: ``ceil(frames * 16k / sr)``."""
    g = math.gcd(int(sample_rate), SAMPLE_RATE)
    orig, new = int(sample_rate) // g, SAMPLE_RATE // g
    return -(-frames * new // orig)


def audio_info(path) -> AudioInfo:
    """Header of an audio file; MicroserError naming the file when soundfile cannot read it or it is empty."""
    path = Path(path)
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError by format
        raise MicroserError(
            f"{path}: cannot read audio ({one_line(e)}); expected a file soundfile reads (WAV, FLAC, OGG, MP3): "
            "re-encode it or remove it"
        ) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise MicroserError(f"{path}: empty audio (0 samples); expected at least one sample: remove the file")
    return AudioInfo(path=path, sample_rate=int(info.samplerate), channels=int(info.channels), frames=int(info.frames))


def load_audio(path) -> np.ndarray:
    """The whole file as float32 mono at 16 kHz (channel mean, torchaudio sinc resampling).

    Raises MicroserError naming the file for unreadable, empty, NaN/Inf and
    all-zero (silent) audio.
    """
    info = audio_info(path)
    data = _read_frames(info, 0, info.frames)
    _check_samples(info.path, data)
    y = _resample(data, info.sample_rate)
    if float(np.abs(y).max()) <= _LSB_HALF:
        raise MicroserError(_converted_silent_message(info.path, float(np.abs(data).max())))
    return y


def check_audio(path) -> AudioInfo:
    """Scan a file block by block (constant memory) for NaN/Inf, all-zero and conversion-silent audio; return
    its header. Raises MicroserError naming the file and the reason, like `load_audio`."""
    return scan_audio(path)[0]


def scan_audio(path) -> tuple[AudioInfo, float]:
    """`check_audio` that also returns the peak magnitude of the mono mix (at the source rate)."""
    info = audio_info(path)
    peak = mono_peak = 0.0
    try:
        with sf.SoundFile(str(info.path)) as f:
            for block in f.blocks(blocksize=_SCAN_BLOCK, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise MicroserError(_nonfinite_message(info.path))
                if block.size:
                    peak = max(peak, float(np.abs(block).max()))
                    mono_peak = max(mono_peak, float(np.abs(block.mean(axis=1)).max()))
    except MicroserError:
        raise
    except Exception as e:
        raise MicroserError(f"{info.path}: cannot decode audio ({one_line(e)}): re-encode it or remove it") from None
    if peak == 0.0:
        raise MicroserError(_silent_message(info.path))
    if mono_peak <= _LSB_HALF:
        raise MicroserError(_converted_silent_message(info.path, peak))
    return info, mono_peak


def read_segment(info: AudioInfo, start: int, end: int) -> np.ndarray:
    """Samples ``[start, end)`` (16 kHz indices) of the file as float32 mono 16 kHz, reading only that part.

    Equals ``load_audio(path)[start:end]`` up to float rounding: the chunk read
    starts on the resampler's phase grid and carries the sinc filter's context.
    """
    n = info.n_samples
    if not 0 <= start < end <= n:
        raise ValueError(f"segment [{start}, {end}) must lie inside [0, {n}) of {info.path}")
    if info.sample_rate == SAMPLE_RATE:
        data = _read_frames(info, start, end)
        return np.ascontiguousarray(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0], dtype=np.float32)
    g = math.gcd(info.sample_rate, SAMPLE_RATE)
    orig, new = info.sample_rate // g, SAMPLE_RATE // g
    width = math.ceil(_LOWPASS_WIDTH * orig / (min(orig, new) * _ROLLOFF))  # filter half-width, source samples
    ctx_blocks = -(-(width + orig) // orig) + 1
    blk0 = max(0, start // new - ctx_blocks)  # chunk starts at source frame blk0 * orig (phase-aligned)
    src0 = blk0 * orig
    src1 = min(info.frames, -(-end * orig // new) + (ctx_blocks + 1) * orig)
    y = _resample(_read_frames(info, src0, src1), info.sample_rate)
    off = start - blk0 * new
    return np.ascontiguousarray(y[off : off + (end - start)])


def segment_bounds(n_samples: int, max_seconds: float, overlap_seconds: float) -> list[tuple[int, int]]:
    """Split ``n_samples`` (16 kHz) into segments of at most ``max_seconds`` that overlap by ``overlap_seconds``.

    A clip no longer than ``max_seconds`` stays whole. A longer one is cut
    into full-length segments with hop ``max_seconds - overlap_seconds``; the
    last segment ends at the end of the file (it may overlap its neighbour
    more), so every sample is covered and no segment is shorter than
    ``max_seconds``.

    >>> segment_bounds(100, 8.0, 1.0)
    [(0, 100)]
    >>> segment_bounds(20 * 16000, 8.0, 1.0)
    [(0, 128000), (112000, 240000), (192000, 320000)]
    """
    if max_seconds <= 0:
        raise MicroserError(f"max_seconds={max_seconds} must be > 0: pass e.g. --max-seconds 8")
    if not 0 <= overlap_seconds < max_seconds:
        raise MicroserError(
            f"overlap_seconds={overlap_seconds} must be >= 0 and < max_seconds={max_seconds}: pass a smaller overlap"
        )
    if n_samples <= 0:
        return []
    size = int(round(max_seconds * SAMPLE_RATE))
    hop = size - int(round(overlap_seconds * SAMPLE_RATE))
    if n_samples <= size:
        return [(0, n_samples)]
    starts = list(range(0, n_samples - size, hop))
    starts.append(n_samples - size)
    return [(s, s + size) for s in starts]


def to_int16(x: np.ndarray) -> np.ndarray:
    """float audio in [-1, 1] -> int16 (scaled by 32768, rounded, clipped): the cache's storage format."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 32768.0), -32768, 32767).astype(np.int16)


def from_int16(x: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1) (divided by 32768): the inverse of `to_int16` up to rounding."""
    return np.asarray(x, dtype=np.float32) / np.float32(32768.0)


# ---- internals ----


def _read_frames(info: AudioInfo, start: int, stop: int) -> np.ndarray:
    """Frames ``[start, stop)`` at the source rate as float32 ``(frames, channels)``."""
    try:
        with sf.SoundFile(str(info.path)) as f:
            if start:
                f.seek(start)
            data = f.read(stop - start, dtype="float32", always_2d=True)
    except Exception as e:
        raise MicroserError(f"{info.path}: cannot decode audio ({one_line(e)}): re-encode it or remove it") from None
    if data.shape[0] == 0:
        raise MicroserError(f"{info.path}: empty audio (0 samples decoded); expected audio: remove the file")
    return data


def _resample(data: np.ndarray, sample_rate: int) -> np.ndarray:
    """``(frames, channels)`` float32 at ``sample_rate`` -> float32 mono 16 kHz."""
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate == SAMPLE_RATE:
        return np.ascontiguousarray(mono, dtype=np.float32)
    import torch  # heavy: loaded only when a file needs resampling, so reading a cache (cache info) stays light

    with torch.inference_mode():
        y = _resampler(int(sample_rate))(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)))
    return y.numpy()


@functools.lru_cache(maxsize=8)
def _resampler(sample_rate: int):
    """torchaudio's sinc resampler to 16 kHz with its kernel computed once per source rate (it costs more than
    applying it to a few seconds of audio); same output as ``torchaudio.functional.resample``."""
    import torchaudio  # heavy, as torch in _resample

    return torchaudio.transforms.Resample(sample_rate, SAMPLE_RATE)


def _check_samples(path: Path, data: np.ndarray) -> None:
    if not np.isfinite(data).all():
        raise MicroserError(_nonfinite_message(path))
    if not np.any(data):
        raise MicroserError(_silent_message(path))


def _nonfinite_message(path: Path) -> str:
    return f"{path}: audio contains NaN or Inf samples; expected finite samples: re-export the file or remove it"


def _silent_message(path: Path) -> str:
    return f"{path}: audio is silent (all samples are zero); expected speech: remove the file"


def _converted_silent_message(path: Path, peak: float) -> str:
    return (f"{path}: audio is silent after the mix to mono and 16-bit rounding (peak {peak:.3g} in the file: "
            "opposite-phase channels, or a level below 1/65536 of full scale); expected audible speech: fix the "
            "channels or the level, or remove the file")
