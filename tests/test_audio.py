"""microser.audio: any rate/channels -> mono 16 kHz, clear errors for bad files, segmenting, segment-wise reads."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from microser.audio import audio_info, check_audio, from_int16, load_audio, read_segment, resampled_length, \
    segment_bounds, to_int16
from microser.errors import MicroserError


def _sine(freq, sr, seconds, amp=0.5):
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_sine_lands_at_its_frequency_at_16k(tmp_path, sr):
    freq = 1000.0 if sr > 8000 else 700.0
    path = tmp_path / f"sine_{sr}.wav"
    sf.write(path, _sine(freq, sr, 1.0), sr, subtype="FLOAT")
    y = load_audio(path)
    assert y.dtype == np.float32
    assert len(y) == 16000  # 1 s at any rate -> exactly 16000 samples
    assert abs(_peak_hz(y) - freq) <= 1.0  # 1 Hz bins
    assert np.abs(y[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)  # amplitude kept by the sinc resampler


def test_ogg_at_48k_reads(tmp_path):
    path = tmp_path / "sine.ogg"
    sf.write(path, _sine(1000.0, 48000, 1.0), 48000, format="OGG", subtype="VORBIS")
    y = load_audio(path)
    assert abs(_peak_hz(y) - 1000.0) <= 1.0


def test_stereo_is_mixed_down_to_the_channel_mean(tmp_path):
    x = _sine(300.0, 16000, 0.5)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([x, 0.5 * x], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), 0.75 * x, atol=1e-7)


@pytest.mark.parametrize("case, match", [
    ("garbage", "cannot read audio"),
    ("empty", "empty audio"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("silent", "silent"),
])
def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path, case, match):
    path = tmp_path / f"{case}.wav"
    x = _sine(200.0, 16000, 0.2)
    if case == "garbage":
        path.write_bytes(b"RIFF this is not a wave file at all")
    elif case == "empty":
        sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    elif case == "nan":
        x[50] = np.nan
        sf.write(path, x, 16000, subtype="FLOAT")
    elif case == "inf":
        x[-1] = np.inf
        sf.write(path, x, 16000, subtype="FLOAT")
    else:
        sf.write(path, np.zeros(3200, dtype=np.float32), 16000)
    with pytest.raises(MicroserError, match=match) as e:
        load_audio(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    if case in ("nan", "inf", "silent"):  # the block scanner used for long files agrees
        with pytest.raises(MicroserError, match=match):
            check_audio(path)


def test_segment_bounds_hand_computed():
    sr = 16000
    assert segment_bounds(5 * sr, 8.0, 1.0) == [(0, 5 * sr)]  # short clip stays whole
    assert segment_bounds(8 * sr, 8.0, 1.0) == [(0, 8 * sr)]
    # 20 s, 8 s segments, hop 7 s: starts 0, 7; the last one is pinned to the end (12 s)
    assert segment_bounds(20 * sr, 8.0, 1.0) == [(0, 8 * sr), (7 * sr, 15 * sr), (12 * sr, 20 * sr)]
    assert segment_bounds(0, 8.0, 1.0) == []


@pytest.mark.parametrize("n", [128001, 16000 * 15, 16000 * 3600 + 7])
def test_segments_cover_every_sample_with_full_length(n):
    b = segment_bounds(n, 8.0, 1.0)
    assert b[0][0] == 0 and b[-1][1] == n
    assert all(e - s == 128000 for s, e in b)
    assert all(b[k + 1][0] <= b[k][1] - 16000 for k in range(len(b) - 1))  # overlap >= 1 s, no gaps


@pytest.mark.parametrize("max_s, ov_s", [(0.0, 0.0), (4.0, 4.0), (4.0, -1.0)])
def test_segment_settings_are_checked(max_s, ov_s):
    with pytest.raises(MicroserError, match="must be"):
        segment_bounds(100, max_s, ov_s)


@pytest.mark.parametrize("sr, channels", [(44100, 1), (16000, 2), (8000, 1), (48000, 2)])
def test_read_segment_equals_slicing_the_whole_file(tmp_path, sr, channels):
    rng = np.random.default_rng(sr)
    x = (0.3 * rng.standard_normal((int(sr * 3.3), channels))).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, x, sr, subtype="FLOAT")
    whole = load_audio(path)
    info = audio_info(path)
    assert info.n_samples == len(whole) == resampled_length(len(x), sr)
    for a, b in [(0, 1000), (12345, 30000), (len(whole) - 777, len(whole)), (0, len(whole))]:
        np.testing.assert_allclose(read_segment(info, a, b), whole[a:b], atol=2e-6)


def test_int16_round_trip_is_within_half_a_step():
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    q = to_int16(x)
    assert q.dtype == np.int16 and q.min() == -32768 and q.max() == 32767
    assert np.abs(from_int16(q) - x)[1:-1].max() <= 0.5 / 32768 + 1e-9
