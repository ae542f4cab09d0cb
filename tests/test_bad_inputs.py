"""The bad-input matrix: every case is a one-line error (value, rule, fix) or a skip with its reason, and
nothing already done is lost; README's Troubleshooting table is checked against the errors the code raises.

Each case is tested once. ``MATRIX`` says where: cases another module's tests already cover are referenced
there (``test_matrix_references_exist`` keeps the references honest); the rest are tested in this file.
``MESSAGES`` triggers each documented error cheaply, so the README rows are matched against real messages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import soundfile as sf
from optuna.trial import TrialState

from microser.audio import audio_info, load_audio
from microser.cache import Cache, build_cache
from microser.cli import main
from microser.errors import MicroserError
from teachers_helpers import write_clip

pytestmark = pytest.mark.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
HERE = "tests/test_bad_inputs.py"

# case -> the tests that cover it ("file::test_name"); ``HERE`` tests live below.
MATRIX = {
    "unreadable file (not audio)": ["tests/test_audio.py::test_bad_files_raise_one_line_errors_naming_the_file",
                                    "tests/test_cache.py::test_bad_files_are_skipped_with_reasons_and_the_build_continues"],
    "unreadable file (no read permission)": [f"{HERE}::test_unreadable_file_is_skipped_and_the_rest_is_cached"],
    "zero-length file": ["tests/test_audio.py::test_bad_files_raise_one_line_errors_naming_the_file",
                         "tests/test_cache.py::test_bad_files_are_skipped_with_reasons_and_the_build_continues"],
    "NaN/Inf samples": ["tests/test_audio.py::test_bad_files_raise_one_line_errors_naming_the_file",
                        "tests/test_cache.py::test_bad_files_are_skipped_with_reasons_and_the_build_continues"],
    "all-silent file": ["tests/test_audio.py::test_bad_files_raise_one_line_errors_naming_the_file",
                        "tests/test_cache.py::test_bad_files_are_skipped_with_reasons_and_the_build_continues"],
    "8 kHz and 48 kHz files": ["tests/test_audio.py::test_sine_lands_at_its_frequency_at_16k",
                               f"{HERE}::test_8k_and_48k_files_are_cached_at_16k_with_the_right_lengths"],
    "stereo": ["tests/test_audio.py::test_stereo_is_mixed_down_to_the_channel_mean",
               f"{HERE}::test_8k_and_48k_files_are_cached_at_16k_with_the_right_lengths"],
    "1-hour file": [f"{HERE}::test_one_hour_file_is_segmented_with_bounded_memory"],
    "CSV row pointing to a missing file": ["tests/test_cache.py::test_audio_csv_problems_are_refused_listing_the_first_few"],
    "CSV missing the valence column": ["tests/test_teachers.py::test_csv_refuses_missing_columns",
                                       f"{HERE}::test_readme_troubleshooting_rows_match_real_errors"],
    "NaN targets": ["tests/test_teachers.py::test_csv_refuses_nan_naming_the_line"],
    "targets outside the declared range": [
        "tests/test_teachers.py::test_csv_reports_out_of_range_values_with_count_min_max_and_fix"],
    "cache whose audio file is truncated": [
        "tests/test_cache.py::test_corrupt_cache_fails_on_open_and_verify_names_the_problem"],
    "cache built with another teacher": [
        "tests/test_cache.py::test_existing_cache_with_another_teacher_is_never_mixed",
        f"{HERE}::test_study_refuses_a_cache_of_another_teacher_and_keeps_its_trials"],
    "search space file with an unknown key": [
        "tests/test_space.py::test_invalid_space_files_are_refused_naming_file_and_key"],
    "impossible budget": ["tests/test_search.py::test_impossible_budget_is_said_before_training_anything"],
    "more trials than the space holds": [
        f"{HERE}::test_a_space_smaller_than_trials_trains_each_candidate_once_then_says_so"],
    "storage URL that refuses connections": [
        "tests/test_storage.py::test_refused_connection_names_the_url_in_one_line",
        f"{HERE}::test_refused_storage_is_a_one_line_cli_error_with_exit_code_2"],
    "study name that exists with different objectives": [
        "tests/test_search.py::test_existing_study_with_other_objectives_or_budgets_is_refused"],
    "trial whose weights file was deleted": [
        "tests/test_storage.py::test_deleted_or_changed_weights_are_clear_errors",
        f"{HERE}::test_compress_and_export_say_that_a_trials_weights_were_deleted"],
    "CSV path escaping its root": ["tests/test_security.py::test_csv_paths_cannot_escape_their_root_unless_allowed"],
    "worker killed mid-trial (PostgreSQL)": [
        "tests/test_postgres.py::test_three_workers_finish_the_study_after_one_is_killed_mid_trial"],
    "workers started together on an empty database": [
        "tests/test_postgres.py::test_workers_started_together_on_an_empty_database_all_open_it"],
}


def test_matrix_references_exist():
    for case, refs in MATRIX.items():
        assert refs, case
        for ref in refs:
            path, name = ref.split("::")
            text = (REPO / path).read_text()
            assert re.search(rf"^def {re.escape(name)}\(", text, re.M), f"{case}: {ref} does not exist"


def _error(fn, *args, **kwargs) -> str:
    """The MicroserError ``fn`` raises, checked to be one line."""
    with pytest.raises(MicroserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def _labels(path: Path, rows: list[tuple], header: str = "path,speaker,arousal,dominance,valence") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _tiny_corpus(root: Path, n: int = 4) -> Path:
    """``n`` short clips of ``n`` speakers with per-file targets; returns labels.csv (audio list and teacher)."""
    rows = []
    for k in range(n):
        write_clip(root / f"c{k}.wav", 0.5, seed=k)
        rows.append((f"c{k}.wav", f"s{k}", round(0.1 + 0.8 * k / max(n - 1, 1), 2), 0.5, 0.5))
    return _labels(root / "labels.csv", rows)


# ---- audio files ----------------------------------------------------------------------------------


def test_unreadable_file_is_skipped_and_the_rest_is_cached(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop root from reading (the not-audio case in "
                    "tests/test_audio.py covers the same 'cannot read audio' path)")
    labels = _tiny_corpus(tmp_path / "d", n=3)
    (tmp_path / "d" / "c1.wav").chmod(0)
    try:
        report = build_cache(labels, [f"csv:{labels}"], tmp_path / "c")
    finally:
        (tmp_path / "d" / "c1.wav").chmod(0o644)
    assert report.n_items == 2 and report.n_skipped == 1
    assert [it["source"] for it in Cache.open(tmp_path / "c").items] == ["c0.wav", "c2.wav"]
    assert "cannot read audio" in (tmp_path / "c" / "skipped.csv").read_text()


def test_8k_and_48k_files_are_cached_at_16k_with_the_right_lengths(tmp_path):
    # frames at the source rate -> ceil(frames * 16000 / rate) samples at 16 kHz, by hand:
    files = {"n8k.wav": (8000, 10_000, 1, 20_000),        # 1.25 s
             "w48k.flac": (48_000, 33_600, 1, 11_200),    # 0.7 s
             "st48k.wav": (48_000, 48_001, 2, 16_001)}    # 1.000021 s, stereo: ceil(16000.33) = 16001
    rows = []
    for k, (name, (rate, frames, channels, _)) in enumerate(files.items()):
        t = np.arange(frames) / rate
        x = 0.3 * np.sin(2 * np.pi * 440 * t)
        sf.write(tmp_path / name, np.stack([x, -x / 3], 1) if channels == 2 else x, rate, subtype="PCM_16")
        rows.append((name, f"s{k}", 0.5, 0.5, 0.5))
    labels = _labels(tmp_path / "labels.csv", rows)
    cache = Cache.open(build_cache(labels, [f"csv:{labels}"], tmp_path / "c").out)
    assert {it["source"]: it["length"] for it in cache.items} == {n: v[3] for n, v in files.items()}
    stereo = cache.audio([it["source"] for it in cache.items].index("st48k.wav"))
    mid = stereo[4000:12000]   # channel mean (x - x/3) / 2 = x/3: a 440 Hz sine of amplitude 0.1
    assert np.abs(mid).max() == pytest.approx(0.1, abs=2e-3)


_HOUR_CHILD = """
import json, resource, sys
from microser.cache import build_cache
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = build_cache(sys.argv[1], ["csv:" + sys.argv[2]], sys.argv[3], max_seconds=30.0, overlap_seconds=0.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kb": after - before, "items": report.n_items}))
"""


def test_one_hour_file_is_segmented_with_bounded_memory(tmp_path):
    # One hour at 8 kHz, written block by block (a minute at a time) so the test never holds it whole.
    rate, minute = 8000, 8000 * 60
    rng = np.random.default_rng(0)
    with sf.SoundFile(tmp_path / "hour.flac", "w", samplerate=rate, channels=1, subtype="PCM_16") as f:
        for m in range(60):
            t = (np.arange(minute) + m * minute) / rate
            f.write((0.2 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(minute)).astype(np.float32))
    # per-segment targets: one row per 10 minutes; 30 s segments fall inside one row each
    teacher = _labels(tmp_path / "teacher.csv",
                      [("hour.flac", 600 * k, 600 * (k + 1), round(0.1 * k, 1), 0.5, round(1 - 0.1 * k, 1))
                       for k in range(6)], header="path,start,end,arousal,dominance,valence")
    audio = _labels(tmp_path / "audio.csv", [("hour.flac", "s1")], header="path,speaker")
    done = subprocess.run([sys.executable, "-c", _HOUR_CHILD, str(audio), str(teacher), str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    cache = Cache.open(tmp_path / "c")
    # 3600 s in 30 s segments, no overlap: starts 0, 30, ..., 3570
    assert result["items"] == len(cache) == 120
    assert [it["start_s"] for it in cache.items] == [30.0 * k for k in range(120)]
    assert all(it["length"] == 30 * 16000 for it in cache.items)
    k = np.arange(120) // 20   # the 10-minute row each segment lies in
    np.testing.assert_allclose(cache.targets, np.stack([0.1 * k, np.full(120, 0.5), 1 - 0.1 * k], 1), atol=1e-6)
    # Decoded whole, the hour would need 230 MB as float32 at 16 kHz (57.6M samples) before resampling copies;
    # segment-wise reading keeps the peak growth of the build process far below that.
    assert result["growth_kb"] < 150 * 1024, result


# ---- caches and studies ---------------------------------------------------------------------------


def _fake_search(tmp_path, **kw):
    from test_search import FakeTrainer, fake_components, fake_config

    trainer = FakeTrainer()
    components = fake_components(trainer)
    if "data" in kw:
        components.data = kw.pop("data")
    from microser.search import run_search

    return run_search(fake_config(tmp_path, **kw), components=components), trainer


def test_study_refuses_a_cache_of_another_teacher_and_keeps_its_trials(tmp_path):
    from test_search import FakeData

    first, _ = _fake_search(tmp_path, trials=2, final_k=0, references=())

    class OtherTeacher(FakeData):
        fingerprint = "fake-data-of-another-teacher"

    message = _error(lambda: _fake_search(tmp_path, trials=3, final_k=0, references=(), data=OtherTeacher()))
    assert re.fullmatch(r"study 's' in sqlite:///.*/s\.db was created with cache_fingerprint fake-data-1, this run "
                        r"asks for fake-data-of\.\.\.: pass another --study name, or the study's own settings to "
                        r"resume it", message), message
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE and "ccc" in t.user_attrs]) == first.trained == 2


class FourWidths:
    """A space of four candidates."""

    def suggest(self, trial):
        from test_search import FakeSpec

        return FakeSpec(trial.suggest_int("width", 1, 4))


def _exhaust(tmp_path, trainer=None):
    from test_search import FakeTrainer, fake_components, fake_config

    from microser.search import run_search

    from unittest import mock

    components = fake_components(trainer or FakeTrainer())
    components.space = FourWidths()
    with mock.patch("microser.search.MAX_DUPLICATES_IN_A_ROW", 12):    # 100 by default; fewer keep the test quick
        return _error(run_search, fake_config(tmp_path, trials=5, final_k=0, references=()), components=components)


def test_a_space_smaller_than_trials_trains_each_candidate_once_then_says_so(tmp_path):
    from test_search import FakeTrainer

    trainer = FakeTrainer()
    message = _exhaust(tmp_path, trainer)
    assert re.fullmatch(r"study 's': the last 12 candidates drawn from .*space\.toml were all tried before \(4 "
                        r"trained so far; the space has little left to draw\): lower --trials or widen the space",
                        message), message
    assert sorted(width for width, _, _ in trainer.calls) == [1, 2, 3, 4]     # each candidate trained once
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    trained = {t.number: t.params for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(trained) == 4
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 12 and all(trained[t.user_attrs["duplicate_of"]] == t.params for t in pruned)


def _study_with_two_trained_trials(tmp_path):
    """A study as `microser search` leaves it: settings, a tiny cache, two trials with spec and weights."""
    from microser.frontends import FrontendSpec
    from microser.models.spec import ArchSpec, build_model
    from microser.models.wav2small import Wav2SmallBody
    from microser.storage import SETTINGS_ATTR, artifact_store, open_storage, save_weights

    labels = _tiny_corpus(tmp_path / "d", n=6)
    cache = build_cache(labels, [f"csv:{labels}"], tmp_path / "cache").out
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url, "s"), directions=["maximize", "minimize"])
    artifacts = tmp_path / "artifacts"
    study.set_user_attr(SETTINGS_ATTR, {"artifacts": str(artifacts), "cache": str(cache), "input_seconds": 0.5,
                                        "objectives": ["params"]})
    spec = ArchSpec("wav2small", FrontendSpec(n_fft=256, hop=160, center=False, n_mels=16),
                    Wav2SmallBody(channels=(4, 4), kernel=3, norm="batch", pool_after=(1,), pooling="attention"))
    for seed in (0, 1):
        import torch

        torch.manual_seed(seed)
        weights = save_weights(build_model(spec).state_dict(), store=artifact_store(artifacts), study_or_trial=study,
                               name=f"trial-{seed}")
        study.add_trial(optuna.create_trial(values=[0.1, 1000.0], user_attrs={
            "spec": spec.to_json(), "family": "wav2small", "summary": spec.summary(), "weights": weights,
            "ccc": {"arousal": 0.1, "dominance": 0.1, "valence": 0.1, "mean": 0.1}}))
    return url, study, artifacts


def test_compress_and_export_say_that_a_trials_weights_were_deleted(tmp_path, capsys):
    from microser.storage import load_study, load_trial_weights

    url, study, artifacts = _study_with_two_trained_trials(tmp_path)
    gone = artifacts / study.trials[0].user_attrs["weights"]["artifact_id"]
    gone.unlink()
    for command in (["compress", "--epochs", "0"], ["export", "--out", str(tmp_path / "bundle")]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--study", "s", "--trial", "0", "--storage", url])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err == (f"error: weights of trial 0 (study 's') are missing: {gone} was deleted or moved: put the "
                       "file back, or retrain the trial\n")
    assert not (tmp_path / "bundle").exists()
    # nothing else lost: the other trial's weights still load, the study is intact
    again = load_study("s", url)
    assert len(again.trials) == 2
    assert load_trial_weights(again, 1, stage="search").keys() == load_trial_weights(study, 1).keys()


def test_refused_storage_is_a_one_line_cli_error_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pareto", "--study", "s", "--storage", "postgresql://u:secret@127.0.0.1:1/db"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "secret" not in err
    assert err.startswith("error: storage 'postgresql://u:***@127.0.0.1:1/db' refused the connection (")
    assert err.endswith("): start the database or pass another --storage, e.g. sqlite:///studies/NAME.db\n")


# ---- README: the Troubleshooting table matches the errors the code raises -------------------------


def _msg_audio(tmp_path, case: str) -> str:
    path = tmp_path / f"{case}.wav"
    if case == "garbage":
        path.write_bytes(b"RIFF not a wave file")
        return _error(audio_info, path)
    if case == "empty":
        sf.write(path, np.zeros(0, np.float32), 16000)
        return _error(audio_info, path)
    x = np.zeros(1600, np.float32)
    if case == "nan":
        x[:] = 0.1
        x[7] = np.nan
    sf.write(path, x, 16000, subtype="FLOAT")
    return _error(load_audio, path)


def _msg_missing_file(tmp_path) -> str:
    labels = _tiny_corpus(tmp_path / "d", n=2)
    listing = _labels(tmp_path / "d" / "list.csv", [("c0.wav",), ("gone.wav",)], header="path")
    return _error(build_cache, listing, [f"csv:{labels}"], tmp_path / "c")


def _msg_escape(tmp_path) -> str:
    labels = _tiny_corpus(tmp_path / "d", n=2)
    listing = _labels(tmp_path / "d" / "list.csv", [("../outside.wav",)], header="path")
    return _error(build_cache, listing, [f"csv:{labels}"], tmp_path / "c")


def _msg_teacher_csv(tmp_path, case: str) -> str:
    from microser.teachers import CsvTeacher

    rows = {"no-valence": ("path,arousal,dominance", "a.wav,0.1,0.2"),
            "nan": ("path,arousal,dominance,valence", "a.wav,0.1,nan,0.3"),
            "range": ("path,arousal,dominance,valence", "a.wav,1,4,7")}[case]
    path = tmp_path / f"{case}.csv"
    path.write_text("\n".join(rows) + "\n")
    return _error(CsvTeacher, path)


def _msg_truncated_cache(tmp_path) -> str:
    labels = _tiny_corpus(tmp_path / "d", n=2)
    out = build_cache(labels, [f"csv:{labels}"], tmp_path / "c").out
    with open(out / "audio.i16", "r+b") as f:
        f.truncate(10)
    return _error(Cache.open, out)


def _msg_other_teacher(tmp_path) -> str:
    labels = _tiny_corpus(tmp_path / "d", n=2)
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c")
    other = _labels(tmp_path / "d" / "other.csv", [("c0.wav", "s0", 0.9, 0.9, 0.9), ("c1.wav", "s1", 0.1, 0.1, 0.1)])
    return _error(build_cache, labels, [f"csv:{other}"], tmp_path / "c")


def _msg_study_other_cache(tmp_path) -> str:
    from test_search import FakeData

    _fake_search(tmp_path, trials=1, final_k=0, references=())

    class Other(FakeData):
        fingerprint = "another-teacher"

    return _error(lambda: _fake_search(tmp_path, trials=1, final_k=0, references=(), data=Other()))


def _msg_study_other_objectives(tmp_path) -> str:
    _fake_search(tmp_path, trials=1, final_k=0, references=())
    return _error(lambda: _fake_search(tmp_path, trials=1, final_k=0, references=(), objectives=("params", "macs")))


def _msg_impossible_budget(tmp_path) -> str:
    return _error(lambda: _fake_search(tmp_path, budgets=("500-params",)))


def _msg_space_key(tmp_path) -> str:
    from microser.space import SearchSpace

    path = tmp_path / "space.toml"
    path.write_text("family = 'wav2small'\n[frontend]\nn_fft = 512\ncolour = 'red'\n")
    return _error(SearchSpace.load, path)


def _msg_refused_storage(tmp_path) -> str:
    from microser.storage import open_storage

    return _error(open_storage, "postgresql://u:secret@127.0.0.1:1/db", "s")


def _msg_deleted_weights(tmp_path) -> str:
    from microser.storage import load_trial_weights

    url, study, artifacts = _study_with_two_trained_trials(tmp_path)
    (artifacts / study.trials[0].user_attrs["weights"]["artifact_id"]).unlink()
    return _error(load_trial_weights, study, 0)


def _msg_no_gpu(tmp_path) -> str:
    import torch

    from microser.distill import resolve_device

    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: False   # as on a machine without a GPU
    try:
        return _error(resolve_device, "cuda")
    finally:
        torch.cuda.is_available = real


MESSAGES = {
    "garbage": lambda p: _msg_audio(p, "garbage"),
    "empty": lambda p: _msg_audio(p, "empty"),
    "nan": lambda p: _msg_audio(p, "nan"),
    "silent": lambda p: _msg_audio(p, "silent"),
    "missing file": _msg_missing_file,
    "escape": _msg_escape,
    "no valence": lambda p: _msg_teacher_csv(p, "no-valence"),
    "nan targets": lambda p: _msg_teacher_csv(p, "nan"),
    "out of range": lambda p: _msg_teacher_csv(p, "range"),
    "truncated cache": _msg_truncated_cache,
    "other teacher": _msg_other_teacher,
    "study other cache": _msg_study_other_cache,
    "space key": _msg_space_key,
    "impossible budget": _msg_impossible_budget,
    "refused storage": _msg_refused_storage,
    "study other objectives": _msg_study_other_objectives,
    "deleted weights": _msg_deleted_weights,
    "no gpu": _msg_no_gpu,
    "space exhausted": _exhaust,
}


def readme_troubleshooting() -> list[tuple[str, str, str]]:
    """(symptom, message pattern, what to do) for each row of README's Troubleshooting table."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("|") or len(cells) != 3 or set(cells[1]) <= set("-: ") or cells[1] == "message":
            continue
        code = re.fullmatch(r"(`+) ?(.*?) ?\1", cells[1])   # `message`, or ``message with `code` inside``
        assert code, f"README Troubleshooting: the message cell {cells[1]!r} is not a code span"
        rows.append((cells[0], code.group(2), cells[2]))
    return rows


def readme_pattern(text: str) -> re.Pattern:
    """A README message with ``…`` for the parts that vary (paths, numbers) as a regex over the whole message."""
    return re.compile(".*".join(re.escape(part) for part in text.split("…")), re.S)


def test_readme_troubleshooting_rows_match_real_errors(tmp_path):
    rows = readme_troubleshooting()
    assert len(rows) == len(MESSAGES)
    unmatched = [r[1] for r in rows]
    for name, produce in MESSAGES.items():
        (tmp_path / name).mkdir()
        message = produce(tmp_path / name)
        hits = [r for r in rows if readme_pattern(r[1]).fullmatch(message)]
        assert len(hits) == 1, f"{name}: {message!r} matches {len(hits)} README rows"
        if hits[0][1] in unmatched:
            unmatched.remove(hits[0][1])
    assert unmatched == [], f"README rows matching no real error: {unmatched}"
    assert all(symptom and fix for symptom, _, fix in rows)
