"""The synthetic demo corpus: deterministic, latents recoverable from level-invariant cues, files and cache on disk."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from microser import SAMPLE_RATE, TARGETS
from microser.demo import (
    TEACHER_NOISE_SD,
    default_demo_dir,
    ensure_demo_cache,
    generate_corpus,
    write_demo_corpus,
)
from microser.errors import MicroserError
from microser.metrics import ccc_report

# ---- cues measured independently of the generator (numpy/scipy only) ----


def f0_track(x: np.ndarray) -> np.ndarray:
    """f0 (Hz) per 10 ms frame from the normalised cross-correlation (as in RAPT); NaN where unvoiced."""
    y = signal.sosfiltfilt(signal.butter(4, 1000 / (SAMPLE_RATE / 2), output="sos"), x)
    n, lo, hi, hop = 400, SAMPLE_RATE // 500, SAMPLE_RATE // 60, 160
    span = n + hi
    m = 1 + (len(y) - span) // hop
    fr = y[np.arange(span)[None, :] + hop * np.arange(m)[:, None]]  # (m, span)
    xc = np.fft.irfft(np.conj(np.fft.rfft(fr[:, :n], 2 * span)) * np.fft.rfft(fr, 2 * span))[:, : hi + 1]
    c2 = np.concatenate([np.zeros((m, 1)), np.cumsum(fr**2, 1)], 1)
    energy = c2[:, n + np.arange(hi + 1)] - c2[:, np.arange(hi + 1)]  # (m, lags): energy of the shifted window
    nccf = (xc / np.sqrt(energy[:, :1] * energy + 1e-12))[:, lo:]
    best = nccf.max(1)
    lag = lo + np.argmax(nccf >= 0.95 * best[:, None], 1)  # shortest lag near the best: no octave-down errors
    loud = np.log10(energy[:, 0] + 1e-12) > np.log10(energy[:, 0].max() + 1e-12) - 3
    return np.where((best > 0.7) & loud, SAMPLE_RATE / lag, np.nan)


def cues(x: np.ndarray) -> dict[str, float]:
    """Level-invariant cues of one clip: median log2 f0, f0 slope, spectral tilt of voiced frames, syllable rate."""
    x = x / np.max(np.abs(x))  # peak-normalised: nothing below depends on the level
    f0 = f0_track(x)
    voiced = ~np.isnan(f0)
    log_f0, t = np.log2(f0[voiced]), np.nonzero(voiced)[0] / len(f0)
    n = 400 + SAMPLE_RATE // 60
    frames = x[np.arange(n)[None, :] + 160 * np.arange(len(f0))[:, None]] * np.hanning(n)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freq = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    pv = power[voiced]
    tilt = np.median(10 * np.log10(pv[:, (freq > 1500) & (freq < 5000)].sum(1) / pv[:, freq < 1000].sum(1)))
    vowel_db = 10 * np.log10(power[:, (freq > 250) & (freq < 2500)].sum(1) + 1e-12)
    vowel_db = np.convolve(vowel_db, np.ones(3) / 3, "same")
    peaks, _ = signal.find_peaks(vowel_db, prominence=6, height=vowel_db.max() - 25)
    return {
        "log_f0": float(np.median(log_f0)),
        "f0_slope": float(np.polyfit(t, log_f0, 1)[0]),  # octaves per clip
        "tilt": float(tilt),
        "rate": len(peaks) / (len(x) / SAMPLE_RATE),
    }


def cue_table(corpus, gains=None) -> dict[str, np.ndarray]:
    """Cues of every clip (optionally scaled by ``gains`` first); f0 and tilt centred per speaker."""
    rows = [cues(a * (1.0 if gains is None else g)) for a, g in zip(corpus.audio, gains or [None] * len(corpus.audio))]
    table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    speakers = np.array(corpus.speakers)
    for k in ("log_f0", "tilt"):  # speakers differ in base f0 and tract length: compare within a speaker
        for s in np.unique(speakers):
            table[k][speakers == s] -= table[k][speakers == s].mean()
    return table


def corr(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(n_clips=40, n_speakers=4, seed=0)


@pytest.fixture(scope="module")
def table(corpus):
    return cue_table(corpus)


# ---- generation ----


def test_same_seed_same_audio_other_seed_other_audio():
    a = generate_corpus(n_clips=4, n_speakers=2, seed=3)
    b = generate_corpus(n_clips=4, n_speakers=2, seed=3)
    c = generate_corpus(n_clips=4, n_speakers=2, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.audio, b.audio))
    assert np.array_equal(a.latents, b.latents) and np.array_equal(a.targets, b.targets)
    assert not any(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a.audio, c.audio))
    assert not np.allclose(a.latents, c.latents)
    # clip i depends only on (seed, i, n_speakers): a small corpus is the start of a larger one
    small = generate_corpus(n_clips=2, n_speakers=2, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(small.audio, a.audio[:2]))


def test_clips_are_16k_float32_within_range(corpus):
    d = corpus.durations
    assert d.min() >= 1.5 and d.max() <= 4.0
    for x in corpus.audio:
        assert x.dtype == np.float32 and np.isfinite(x).all()
        assert 0.0 < np.max(np.abs(x)) < 1.0
    assert corpus.speakers[:4] == ("spk00", "spk01", "spk02", "spk03")
    assert set(corpus.speakers) == {"spk00", "spk01", "spk02", "spk03"}


def test_latents_are_in_range_and_correlated_like_ADV():
    from microser.demo import sample_latents

    rng = np.random.default_rng(0)
    lat = np.stack([sample_latents(rng) for _ in range(4000)])
    assert lat.min() >= 0.0 and lat.max() <= 1.0
    r = np.corrcoef(lat.T)
    assert 0.35 < r[0, 1] < 0.7  # dominance follows arousal
    assert abs(r[0, 2]) < 0.3 and abs(r[1, 2]) < 0.4  # valence mostly independent
    assert np.all(lat.std(0) > 0.25)  # each keeps its own spread (uniform: 0.289)


def test_teacher_outputs_are_noisy_latents_and_the_ceiling_is_their_ccc(corpus):
    noise = corpus.targets - corpus.latents
    assert corpus.targets.min() >= 0.0 and corpus.targets.max() <= 1.0
    assert 0.6 * TEACHER_NOISE_SD < noise.std() < 1.4 * TEACHER_NOISE_SD
    # by hand: ccc = 2 cov / (var_x + var_y + (mean_x - mean_y)^2), population statistics
    x, y = corpus.targets[:, 0], corpus.latents[:, 0]
    by_hand = 2 * np.mean((x - x.mean()) * (y - y.mean())) / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert corpus.ceiling["arousal"] == pytest.approx(by_hand, rel=1e-12)
    assert corpus.ceiling == ccc_report(corpus.targets, corpus.latents)
    assert 0.9 < corpus.ceiling["mean"] < 1.0


# ---- each latent shows in a level-invariant cue ----


# Thresholds: the lowest correlation over seeds 0-9 (40 clips, 4 speakers) was f0 .86, rate .70, tilt .38,
# f0-given-arousal vs dominance -.53, f0 slope vs valence .57; each bound leaves a margin below it.


def test_arousal_raises_f0_rate_and_brightness(corpus, table):
    t = table
    arousal = corpus.latents[:, 0]
    assert corr(t["log_f0"], arousal) > 0.7
    assert corr(t["rate"], arousal) > 0.55
    assert corr(t["tilt"], arousal) > 0.25


def test_dominance_lowers_f0_at_equal_arousal(corpus, table):
    t = table
    arousal, dominance = corpus.latents[:, 0], corpus.latents[:, 1]
    residual = t["log_f0"] - np.polyval(np.polyfit(arousal, t["log_f0"], 1), arousal)
    assert corr(residual, dominance) < -0.4


def test_valence_tilts_the_f0_contour_upwards(corpus, table):
    t = table
    assert corr(t["f0_slope"], corpus.latents[:, 2]) > 0.45


def test_cues_survive_any_level(corpus, table):
    """Students normalise the level: at random gains (40 dB range) every cue still carries its latent."""
    gains = list(10 ** np.random.default_rng(1).uniform(-2.0, 0.0, len(corpus.audio)))
    scaled = cue_table(corpus, gains)
    for k in table:
        np.testing.assert_allclose(scaled[k], table[k], rtol=1e-4, atol=1e-4)
    assert corr(scaled["log_f0"], corpus.latents[:, 0]) > 0.7


# ---- on disk ----


def test_write_demo_corpus_files_read_back(tmp_path):
    labels = write_demo_corpus(tmp_path / "d", n_clips=6, n_speakers=3, seed=5)
    corpus = generate_corpus(n_clips=6, n_speakers=3, seed=5)
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "speaker", *TARGETS, *(f"latent_{t}" for t in TARGETS)]
    assert len(rows) == 6
    for i, row in enumerate(rows):
        x, sr = sf.read(labels.parent / row["path"], dtype="float32")
        assert sr == SAMPLE_RATE and sf.info(labels.parent / row["path"]).subtype == "PCM_16"
        np.testing.assert_allclose(x, corpus.audio[i], atol=1.01 / 32768)
        assert row["speaker"] == corpus.speakers[i] and row["path"].startswith(f"audio/{row['speaker']}/")
        np.testing.assert_allclose([float(row[t]) for t in TARGETS], corpus.targets[i], atol=1e-6)
        np.testing.assert_allclose([float(row[f"latent_{t}"]) for t in TARGETS], corpus.latents[i], atol=1e-6)
    meta = json.loads((labels.parent / "demo.json").read_text())
    assert (meta["seed"], meta["n_clips"], meta["n_speakers"], meta["synthetic"]) == (5, 6, 3, True)
    assert meta["ceiling_ccc"]["valence"] == pytest.approx(corpus.ceiling["valence"], abs=1e-6)
    assert meta["durations"]["total_seconds"] == pytest.approx(corpus.durations.sum(), abs=1e-3)


def test_write_demo_corpus_is_idempotent_and_replaces_another_request(tmp_path):
    out = tmp_path / "d"
    labels = write_demo_corpus(out, n_clips=3, n_speakers=3, seed=0)
    stamp = (labels.stat().st_mtime_ns, (out / "demo.json").stat().st_mtime_ns)
    assert write_demo_corpus(out, n_clips=3, n_speakers=3, seed=0) == labels
    assert (labels.stat().st_mtime_ns, (out / "demo.json").stat().st_mtime_ns) == stamp
    write_demo_corpus(out, n_clips=2, n_speakers=1, seed=1)
    assert sorted(p.name for p in (out / "audio").rglob("*.wav")) == ["spk00_00000.wav", "spk00_00001.wav"]
    assert json.loads((out / "demo.json").read_text())["seed"] == 1


def test_write_demo_corpus_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(MicroserError, match="already holds other files.*empty or new folder"):
        write_demo_corpus(tmp_path, n_clips=2, n_speakers=1)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_bad_counts_are_one_line_errors():
    with pytest.raises(MicroserError, match=r"n_clips=1 is too small.*--clips 2"):
        generate_corpus(n_clips=1)
    with pytest.raises(MicroserError, match=r"n_speakers=5 does not fit n_clips=3"):
        generate_corpus(n_clips=3, n_speakers=5)


def test_default_demo_dir_follows_microser_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MICROSER_HOME", str(tmp_path))
    assert default_demo_dir() == tmp_path / "demo"
    monkeypatch.delenv("MICROSER_HOME")
    assert str(default_demo_dir()).endswith("/.cache/microser/demo")


def test_ensure_demo_cache_builds_once_and_follows_the_request(tmp_path):
    from microser.cache import Cache

    cache_dir = ensure_demo_cache(tmp_path, n_clips=8, n_speakers=4, seed=2)
    assert cache_dir == tmp_path / "cache"
    cache = Cache.open(cache_dir)
    corpus = generate_corpus(n_clips=8, n_speakers=4, seed=2)
    assert len(cache) == 8
    by_source = {item["source"]: i for i, item in enumerate(cache.items)}
    for i in range(8):
        j = by_source[f"audio/{corpus.speakers[i]}/{corpus.speakers[i]}_{i:05d}.wav"]
        np.testing.assert_allclose(cache.targets[j], corpus.targets[i], atol=1e-6)
        np.testing.assert_allclose(cache.audio(j), corpus.audio[i], atol=1.01 / 32768)
        assert cache.items[j]["speaker"] == corpus.speakers[i]
    created = cache.meta["created_at"]
    assert ensure_demo_cache(tmp_path, n_clips=8, n_speakers=4, seed=2) == cache_dir
    assert Cache.open(cache_dir).meta["created_at"] == created  # reused, not rebuilt
    ensure_demo_cache(tmp_path, n_clips=6, n_speakers=3, seed=3)  # another request: corpus and cache replaced
    other = Cache.open(cache_dir)
    assert len(other) == 6
    np.testing.assert_allclose(np.sort(other.targets[:, 0]),
                               np.sort(generate_corpus(n_clips=6, n_speakers=3, seed=3).targets[:, 0]), atol=1e-6)


def test_ensure_demo_cache_never_deletes_a_foreign_cache_folder(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(MicroserError, match="is not a microser cache: pass another --out folder"):
        ensure_demo_cache(tmp_path, n_clips=2, n_speakers=1)
    assert (tmp_path / "cache" / "notes.txt").read_text() == "mine"


def test_ensure_demo_cache_concurrent_callers_get_one_cache(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from microser.cache import Cache

    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_demo_cache(tmp_path, n_clips=4, n_speakers=2, seed=0), range(3)))
    assert paths == [tmp_path / "cache"] * 3
    cache = Cache.open(tmp_path / "cache")
    assert len(cache) == 4
    np.testing.assert_allclose(np.sort(cache.targets[:, 2]),
                               np.sort(generate_corpus(n_clips=4, n_speakers=2, seed=0).targets[:, 2]), atol=1e-6)


def test_cli_demo_prints_where_counts_and_ceiling(tmp_path, capsys):
    from microser.cli import main

    main(["demo", "--out", str(tmp_path), "--clips", "6", "--speakers", "3", "--seed", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["cache"] == str(tmp_path / "cache") and report["n_items"] == 6
    assert sum(report["splits"].values()) == 6
    expected = generate_corpus(n_clips=6, n_speakers=3, seed=1).ceiling
    assert report["ceiling"]["mean"] == pytest.approx(expected["mean"], abs=1e-6)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "x"), "--clips", "1"])
    assert e.value.code == 2
    assert "n_clips=1 is too small" in capsys.readouterr().err
