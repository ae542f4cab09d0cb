"""microser.cache: round trip, splits, several teachers, bad input, kill-and-resume, corruption, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from microser.audio import load_audio, segment_bounds
from microser.cache import Cache, cache_info, verify_cache
from microser.cache_build import build_cache
from microser.cli import main
from microser.errors import MicroserError
from teachers_helpers import hf_reference, onnx_reference, tiny_hf_model, tiny_onnx, write_clip

REPO = Path(__file__).resolve().parents[1]


def _corpus(root: Path, n: int = 12, *, speakers: int | None = 4, long_seconds: float | None = 20.0,
            split_col: dict | None = None) -> Path:
    """``n`` short clips (0.5-1.4 s, various rates) plus one long file; labels.csv with targets per file."""
    rows = ["path,speaker,arousal,dominance,valence" + (",split" if split_col else "")]
    rates = [16000, 22050, 44100, 8000]
    for k in range(n):
        name = f"spk{k % speakers if speakers else 0}/clip{k:02d}.wav"
        write_clip(root / name, 0.5 + 0.1 * (k % 10), seed=k, sr=rates[k % 4], channels=1 + (k % 3 == 0))
        spk = f"s{k % speakers}" if speakers else ""
        v = (k / n, 1 - k / n, (k % 5) / 4)
        rows.append(f"{name},{spk},{v[0]:.4f},{v[1]:.4f},{v[2]:.4f}" + (f",{split_col.get(k, '')}" if split_col else ""))
    if long_seconds:
        write_clip(root / "long.wav", long_seconds, seed=99, sr=48000)
        rows.append(f"long.wav,{'s0' if speakers else ''},0.5,0.5,0.5" + ("," if split_col else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def _targets_of(csv_path: Path) -> dict[str, np.ndarray]:
    import csv

    with open(csv_path) as f:
        return {r["path"]: np.array([float(r[t]) for t in ("arousal", "dominance", "valence")], np.float32)
                for r in csv.DictReader(f)}


def _same_cache(a: Path, b: Path) -> None:
    for name in ("audio.i16", "targets.npy", "items.csv", "skipped.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created_at")
    assert ma == mb
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def test_round_trip(tmp_path):
    labels = _corpus(tmp_path / "data")
    report = build_cache(labels, [f"csv:{labels}"], tmp_path / "c", teacher_batch_size=5)
    cache = Cache.open(tmp_path / "c")
    long_segments = segment_bounds(20 * 16000, 8.0, 1.0)
    assert len(cache) == report.n_items == 12 + len(long_segments) == 15
    assert report.n_sources == 13 and report.n_skipped == 0 and report.resumed_items == 0
    assert cache.meta["complete"] is True and cache.meta["sample_rate"] == 16000
    assert cache.meta["teachers"][0]["kind"] == "csv"
    truth = _targets_of(labels)
    for i, it in enumerate(cache.items):
        x = cache.audio(i)
        assert x.dtype == np.float32 and len(x) == it["length"]
        whole = load_audio(tmp_path / "data" / it["source"])
        a, b = round(it["start_s"] * 16000), round(it["end_s"] * 16000)
        np.testing.assert_allclose(x, whole[a:b], atol=1 / 32768)  # int16 storage: within one step
        np.testing.assert_allclose(cache.targets[i], truth[it["source"]], atol=1e-6)
        # training reads crops and lengths without the whole segment: the same samples
        np.testing.assert_array_equal(cache.crop(i, 100, 257), x[100:357])
        np.testing.assert_array_equal(cache.crop(i, it["length"] - 5, 50), x[-5:])
    assert cache.lengths([2, 0]).tolist() == [cache.items[2]["length"], cache.items[0]["length"]]
    long_items = [it for it in cache.items if it["source"] == "long.wav"]
    assert [(round(it["start_s"] * 16000), round(it["end_s"] * 16000)) for it in long_items] == long_segments
    assert cache.targets.dtype == np.float32 and cache.targets.shape == (15, 3)
    assert cache.embeddings is None
    assert cache.speakers == ["s0", "s1", "s2", "s3"]
    assert cache.verify() == []
    # offsets are contiguous and the memmap holds exactly the items
    assert (tmp_path / "c" / "audio.i16").stat().st_size == 2 * sum(it["length"] for it in cache.items)
    # same inputs, another folder: same fingerprint; another teacher: another one
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c2")
    assert Cache.open(tmp_path / "c2").fingerprint == cache.fingerprint
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c3", split_seed=5)
    assert Cache.open(tmp_path / "c3").fingerprint != cache.fingerprint
    # building again into a complete cache with the same identity does nothing
    again = build_cache(labels, [f"csv:{labels}"], tmp_path / "c", teacher_batch_size=5)
    assert again.run_audio_seconds == 0 and again.n_items == 15


def test_splits_by_speaker_are_deterministic_and_disjoint(tmp_path):
    labels = _corpus(tmp_path / "data", n=40, speakers=10, long_seconds=None)
    build_cache(labels, [f"csv:{labels}"], tmp_path / "a", split_seed=3)
    build_cache(labels, [f"csv:{labels}"], tmp_path / "b", split_seed=3)
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c", split_seed=4)
    a, b, c = (Cache.open(tmp_path / x) for x in "abc")
    spk = {s: {a.items[i]["speaker"] for i in a.split_indices(s)} for s in ("train", "valid", "test")}
    assert [len(spk[s]) for s in ("train", "valid", "test")] == [8, 1, 1]  # 80/10/10 of 10 speakers
    assert not (spk["train"] & spk["valid"]) and not (spk["train"] & spk["test"]) and not (spk["valid"] & spk["test"])
    assert a.meta["split_by"] == "speaker"
    assert [it["split"] for it in a.items] == [it["split"] for it in b.items]
    assert {s: set(a.split_indices(s)) for s in ("valid", "test")} != {s: set(c.split_indices(s)) for s in ("valid", "test")}
    info = cache_info(tmp_path / "a")
    assert info["speakers_per_split"] == {"train": 8, "valid": 1, "test": 1}
    assert info["items_per_split"] == {"train": 32, "valid": 4, "test": 4}


def test_without_speakers_splits_are_by_file_and_a_split_column_wins(tmp_path):
    labels = _corpus(tmp_path / "d1", n=20, speakers=None, long_seconds=None)
    c = Cache.open(build_cache(labels, [f"csv:{labels}"], tmp_path / "a").out)
    assert c.meta["split_by"] == "source" and c.speakers == []
    assert [len(c.split_indices(s)) for s in ("train", "valid", "test")] == [16, 2, 2]
    labels = _corpus(tmp_path / "d2", n=20, speakers=None, long_seconds=None, split_col={0: "test", 1: "test"})
    c = Cache.open(build_cache(labels, [f"csv:{labels}"], tmp_path / "b").out)
    assert c.items[0]["split"] == "test" and c.items[1]["split"] == "test"
    assert c.meta["split_by"] == "csv+source"


def test_several_teachers_are_averaged_and_each_recorded(tmp_path):
    labels = _corpus(tmp_path / "data", n=4, long_seconds=None)
    other = tmp_path / "data" / "other.csv"
    truth = _targets_of(labels)
    other.write_text("path,arousal,dominance,valence\n" + "".join(
        f"{p},{1 - v[0]:.4f},{v[1] / 2:.4f},0.0\n" for p, v in truth.items()))
    c = Cache.open(build_cache(labels, [f"csv:{labels}", f"csv:{other}"], tmp_path / "c").out)
    assert [t["file"] for t in c.meta["teachers"]] == ["labels.csv", "other.csv"]
    for i, it in enumerate(c.items):
        v = truth[it["source"]]
        np.testing.assert_allclose(c.targets[i], [(v[0] + 1 - v[0]) / 2, (v[1] + v[1] / 2) / 2, v[2] / 2], atol=1e-4)


def test_bad_files_are_skipped_with_reasons_and_the_build_continues(tmp_path):
    d = tmp_path / "audio"
    write_clip(d / "good1.wav", 0.5, seed=1)
    write_clip(d / "good2.flac", 0.6, seed=2, sr=44100)
    (d / "broken.wav").write_bytes(b"RIFF garbage that is not audio")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    x = np.full(800, 0.1, np.float32)
    x[10] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")
    sf.write(d / "silent.wav", np.zeros(1600, np.float32), 16000)
    (d / "notes.txt").write_text("ignored: not audio")
    onnx = tiny_onnx(tmp_path / "t.onnx")
    report = build_cache(d, [f"onnx:{onnx}"], tmp_path / "c")
    assert report.n_items == 2 and report.n_skipped == 4
    import csv

    with open(tmp_path / "c" / "skipped.csv") as f:
        reasons = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert set(reasons) == {"broken.wav", "empty.wav", "nan.wav", "silent.wav"}
    assert "cannot read audio" in reasons["broken.wav"] and "empty" in reasons["empty.wav"]
    assert "NaN" in reasons["nan.wav"] and "silent" in reasons["silent.wav"]
    c = Cache.open(tmp_path / "c")
    assert [it["source"] for it in c.items] == ["good1.wav", "good2.flac"]
    for i in range(2):  # onnx teacher saw exactly the stored audio
        np.testing.assert_allclose(c.targets[i], onnx_reference(c.audio(i))[0], atol=1e-5)
    assert cache_info(tmp_path / "c")["skipped"] == 4


def test_audio_csv_problems_are_refused_listing_the_first_few(tmp_path):
    labels = _corpus(tmp_path / "data", n=3, long_seconds=None)
    bad = tmp_path / "data" / "bad.csv"
    bad.write_text("file,arousal\nx.wav,0.1\n")
    with pytest.raises(MicroserError, match=r"has no 'path' column \(has: file, arousal\)"):
        build_cache(bad, [f"csv:{labels}"], tmp_path / "c")
    bad.write_text("path\n" + "".join(f"gone{k}.wav\n" for k in range(7)) + "spk0/clip00.wav\n")
    with pytest.raises(MicroserError, match=r"7 problem\(s\): line 2: gone0.wav does not exist; .*"
                                            r"line 6: gone4.wav does not exist; \.\.\. and 2 more"):
        build_cache(bad, [f"csv:{labels}"], tmp_path / "c")
    bad.write_text("path,split\nspk0/clip00.wav,dev\n")
    with pytest.raises(MicroserError, match=r"split 'dev' is not one of train, valid, test"):
        build_cache(bad, [f"csv:{labels}"], tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_audio_csv_paths_cannot_escape_unless_allowed(tmp_path):
    outside = write_clip(tmp_path / "outside.wav", 0.5, seed=1)
    (tmp_path / "d").mkdir()
    lst = tmp_path / "d" / "list.csv"
    lst.write_text("path\n../outside.wav\n")
    t = tmp_path / "t.csv"
    t.write_text(f"path,arousal,dominance,valence\n{outside},0.1,0.2,0.3\n")
    with pytest.raises(MicroserError, match=r"'../outside.wav' leaves the CSV's folder .*--allow-absolute-paths"):
        build_cache(lst, [f"csv:{t}"], tmp_path / "c")
    c = Cache.open(build_cache(lst, [f"csv:{t}"], tmp_path / "c", allow_absolute_paths=True).out)
    assert c.items[0]["source"] == str(outside)


def test_existing_cache_with_another_teacher_is_never_mixed(tmp_path):
    labels = _corpus(tmp_path / "data", n=3, long_seconds=None)
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c")
    onnx = tiny_onnx(tmp_path / "t.onnx")
    with pytest.raises(MicroserError, match=r"holds a cache of teachers \[csv:labels.csv@.*\] .* but this build is "
                                            r"teachers \[onnx:t.onnx@.*pass another --out, or delete"):
        build_cache(labels, [f"onnx:{onnx}"], tmp_path / "c")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(MicroserError, match="exists and is not a microser cache"):
        build_cache(labels, [f"csv:{labels}"], tmp_path / "junk")


_CHILD = """
import sys, time
from pathlib import Path
from microser.cache_build import build_cache
marker = Path(sys.argv[3])
def progress(done, total, seconds):
    marker.write_text(str(done))
    time.sleep(0.15)
build_cache(sys.argv[1], ["csv:" + sys.argv[1]], sys.argv[2], teacher_batch_size=2, progress=progress)
"""


def test_killed_build_resumes_to_the_same_cache(tmp_path):
    labels = _corpus(tmp_path / "data", n=24)
    ref = build_cache(labels, [f"csv:{labels}"], tmp_path / "ref", teacher_batch_size=2)
    marker = tmp_path / "done.txt"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(labels), str(tmp_path / "c"), str(marker)],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if marker.is_file() and (marker.read_text() or "0").isdigit() and int(marker.read_text() or 0) >= 6:
            break
        time.sleep(0.02)
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "c" / "meta.json").exists()
    with pytest.raises(MicroserError, match="interrupted build .* run the same `microser cache build` command again"):
        Cache.open(tmp_path / "c")
    seen = []
    resumed = build_cache(labels, [f"csv:{labels}"], tmp_path / "c", teacher_batch_size=2,
                          progress=lambda d, t, s: seen.append(d))
    assert 6 <= resumed.resumed_items < ref.n_items and seen[0] == resumed.resumed_items
    _same_cache(tmp_path / "ref", tmp_path / "c")
    assert Cache.open(tmp_path / "c").fingerprint == Cache.open(tmp_path / "ref").fingerprint


def test_torn_writes_after_the_last_journal_line_are_discarded(tmp_path):
    labels = _corpus(tmp_path / "data", n=10)
    build_cache(labels, [f"csv:{labels}"], tmp_path / "ref", teacher_batch_size=3)

    class Stop(Exception):
        pass

    def stop_after_two_batches(done, total, seconds):
        if done >= 6:
            raise Stop

    with pytest.raises(Stop):
        build_cache(labels, [f"csv:{labels}"], tmp_path / "c", teacher_batch_size=3, progress=stop_after_two_batches)
    out = tmp_path / "c"
    with open(out / "audio.i16.part", "ab") as f:  # a batch that was being written when the power went
        f.write(b"\x01\x02" * 999)
    with open(out / "targets.f32.part", "ab") as f:
        f.write(b"\x00" * 7)
    with open(out / "journal.jsonl", "ab") as f:
        f.write(b'{"items": [{"sourc')
    build_cache(labels, [f"csv:{labels}"], out, teacher_batch_size=3)
    _same_cache(tmp_path / "ref", out)


def test_corrupt_cache_fails_on_open_and_verify_names_the_problem(tmp_path):
    labels = _corpus(tmp_path / "data", n=4, long_seconds=None)
    out = build_cache(labels, [f"csv:{labels}"], tmp_path / "c").out
    t = np.load(out / "targets.npy")
    t[0, 0] = 0.123
    np.save(out / "targets.npy", t)  # same size, different bytes
    problems = verify_cache(out)
    assert problems == [f"{out / 'targets.npy'}: sha256 differs from meta.json (file changed or corrupt)"]
    with open(out / "audio.i16", "r+b") as f:
        f.truncate(100)
    with pytest.raises(MicroserError, match=r"audio.i16 has 100 bytes; expected \d+ .*microser cache verify"):
        Cache.open(out)
    assert "has 100 bytes" in verify_cache(out)[0]
    with pytest.raises(MicroserError, match="not a microser cache"):
        Cache.open(tmp_path / "data")


def test_hf_teacher_cache_equals_a_direct_forward_pass(tmp_path):
    labels = _corpus(tmp_path / "data", n=5, long_seconds=6.0)
    folder = tiny_hf_model(tmp_path / "hf")
    c = Cache.open(build_cache(labels, [f"hf:{folder}"], tmp_path / "c", embeddings=True, teacher_batch_size=4,
                               max_seconds=4.0, overlap_seconds=0.5).out)
    clips = [c.audio(i) for i in range(len(c))]
    want_t, want_e = hf_reference(folder, clips)
    np.testing.assert_allclose(c.targets, want_t, atol=2e-5)
    assert c.embeddings.shape == (len(c), 32) and c.meta["embedding_dim"] == 32
    np.testing.assert_allclose(c.embeddings, want_e, atol=2e-5)
    assert c.verify() == []
    with pytest.raises(MicroserError, match="--embeddings needs a teacher with embeddings"):
        build_cache(labels, [f"csv:{labels}"], tmp_path / "c2", embeddings=True)


def test_cli_build_info_verify(tmp_path, capsys):
    labels = _corpus(tmp_path / "data", n=6, long_seconds=None)
    out = tmp_path / "c"
    main(["cache", "build", "--audio", str(labels), "--teacher", f"csv:{labels}", "--out", str(out)])
    assert "6 items from 6 files" in " ".join(capsys.readouterr().out.split())  # rich wraps at 80 columns
    main(["cache", "info", str(out), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 6 and info["speakers"] == 4 and info["split_by"] == "speaker"
    assert info["targets"]["arousal"]["max"] == pytest.approx(5 / 6, abs=1e-4)
    main(["cache", "verify", str(out)])  # returns normally: exit status 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    with open(out / "audio.i16", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(SystemExit) as e:
        main(["cache", "verify", str(out)])
    assert e.value.code == 1 and "audio.i16 has" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["cache", "build", "--audio", str(labels), "--teacher", f"csv:{labels}", "--out", str(tmp_path / "x"),
              "--target-range", "0-1"])
    assert e.value.code == 2 and "--target-range '0-1' is not understood" in capsys.readouterr().err


def test_espeak_emo_builds_by_speaker(espeak_dir, tmp_path):
    labels = espeak_dir / "labels.csv"
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c")
    info = cache_info(tmp_path / "c")
    assert info["items"] == 640 and info["speakers"] == 8 and info["split_by"] == "speaker"
    assert info["speakers_per_split"] == {"train": 6, "valid": 1, "test": 1}


def test_long_files_are_read_segment_by_segment_with_the_same_result(tmp_path, monkeypatch):
    import microser.cache_build as cache_mod

    labels = _corpus(tmp_path / "data", n=3, long_seconds=20.0)
    whole = Cache.open(build_cache(labels, [f"csv:{labels}"], tmp_path / "whole").out)
    monkeypatch.setattr(cache_mod, "_WHOLE_FILE_SECONDS", 0.1)  # every file takes the long-file path
    seg = Cache.open(build_cache(labels, [f"csv:{labels}"], tmp_path / "seg").out)
    assert [it["length"] for it in seg.items] == [it["length"] for it in whole.items]
    for i in range(len(whole)):
        np.testing.assert_allclose(seg.audio(i), whole.audio(i), atol=1 / 32768)  # at most one int16 step apart
