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
from microser.cache import Cache
from microser.cache_build import build_cache
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
        "tests/test_search.py::test_existing_study_with_other_objectives_budgets_or_fidelity_is_refused"],
    "trial whose weights file was deleted": [
        "tests/test_storage.py::test_deleted_or_changed_weights_are_clear_errors",
        f"{HERE}::test_compress_and_export_say_that_a_trials_weights_were_deleted"],
    "CSV path escaping its root": ["tests/test_security.py::test_csv_paths_cannot_escape_their_root_unless_allowed"],
    "worker killed mid-trial (PostgreSQL)": [
        "tests/test_postgres.py::test_three_workers_finish_the_study_after_one_is_killed_mid_trial"],
    "workers started together on an empty database": [
        "tests/test_postgres.py::test_workers_started_together_on_an_empty_database_all_open_it"],
    # round two (issue 12): numbered as in the issue; each failed on the code before it and passes now
    "1. clip shorter than any model's window (10 ms, 1 sample)": [
        f"{HERE}::test_too_short_clips_are_skipped_with_a_reason_and_the_rest_is_cached"],
    "1. --max-seconds below the shortest model input": [
        f"{HERE}::test_max_seconds_below_the_model_minimum_is_refused_before_reading_audio"],
    "1. --crop-seconds below the shortest model input": [
        f"{HERE}::test_crop_seconds_below_the_model_minimum_is_refused_before_training"],
    "1. search on a cache holding too-short segments (built by an older version)": [
        f"{HERE}::test_search_refuses_a_cache_with_segments_shorter_than_the_model_minimum"],
    "2. --storage sqlite:// or sqlite:/// (in memory)": [
        f"{HERE}::test_in_memory_sqlite_storage_is_refused_before_training"],
    "3. export --out holding an older bundle or other files": [
        f"{HERE}::test_export_replaces_an_older_bundle_whole_and_refuses_a_foreign_folder"],
    "4. study names with ?, #, %20, ../ or /": [
        f"{HERE}::test_unsafe_study_names_are_refused_the_same_way_by_every_command"],
    "5. links (symbolic, hard) to one audio file": [
        f"{HERE}::test_links_to_one_file_are_cached_once_so_they_never_straddle_splits"],
    "6. CSVs with a byte-order mark (UTF-8, UTF-16 LE/BE, UTF-32)": [
        f"{HERE}::test_csvs_with_a_byte_order_mark_decode_like_utf8"],
    "6. Latin-1 (and BOM-less UTF-16) audio and teacher CSVs": [
        f"{HERE}::test_latin1_csvs_are_a_one_line_error_naming_the_file"],
    "7. search on a cache cache verify rejects (NaN target, edited audio, edited items)": [
        f"{HERE}::test_search_refuses_a_cache_that_cache_verify_rejects"],
    "8. audio silent after conversion; float audio beyond full scale": [
        f"{HERE}::test_audio_silent_after_conversion_is_skipped_and_float_overshoot_is_peak_normalised"],
    "9. the same budgets written differently or in another order": [
        f"{HERE}::test_resume_accepts_the_same_budgets_written_differently_or_reordered"],
    "10. bad paths and numbers (cache build --out, /proc and journal: storages, nan/inf/negative values, "
    "trials = 'five', non-UTF-8 config or space, predict --out a folder)": [
        f"{HERE}::test_bad_paths_and_numbers_are_one_line_errors_before_any_work"],
    "10. export --out a file or an unwritable path": [
        f"{HERE}::test_export_out_a_file_or_unwritable_is_refused_before_the_work"],
    "10. bundle with a truncated model.onnx or a broken model_card.json": [
        f"{HERE}::test_a_bundle_with_a_truncated_graph_or_a_broken_card_is_a_one_line_error"],
    "10. journal file with a corrupt line in the middle": [
        f"{HERE}::test_a_journal_with_a_corrupt_line_in_the_middle_is_a_one_line_error"],
    "11. --rungs 0 (was --steps 0), --epochs 0": [f"{HERE}::test_bad_paths_and_numbers_are_one_line_errors_before_any_work"],
    "11. cache whose rows are all split=test, or a single training segment": [
        f"{HERE}::test_splits_a_trial_cannot_train_on_are_refused_before_the_first_trial"],
    "12. compress --prune-ratio -0.5 (outside (0, 1))": [
        f"{HERE}::test_compress_refuses_a_prune_ratio_outside_0_1_before_any_work"],
    "smaller: a rerun of a complete build says something was resumed": [
        f"{HERE}::test_rerun_of_a_complete_build_says_nothing_was_resumed"],
    "smaller: --time -5 (was --timeout -5)": [f"{HERE}::test_bad_paths_and_numbers_are_one_line_errors_before_any_work"],
    "smaller: predict stops at the first bad file": [f"{HERE}::test_predict_lists_unusable_files_and_predicts_the_rest"],
    "smaller: evaluate BUNDLE --study X --trial N ignores --study/--trial": [
        f"{HERE}::test_evaluate_refuses_a_bundle_together_with_study_and_trial"],
    # found by bench/fuzz_inputs.py
    "fuzz: usage errors (a float option given 'abc', an unknown option, a missing one)": [
        f"{HERE}::test_usage_errors_are_a_usage_message_not_a_traceback"],
    "fuzz: demo --out a file, search --artifacts a file, describe --input-seconds 1e6": [
        f"{HERE}::test_bad_paths_and_numbers_are_one_line_errors_before_any_work"],
    "fuzz: a CSV path too long for the file system": [
        f"{HERE}::test_a_csv_path_too_long_for_the_file_system_is_a_listed_problem"],
    "fuzz: pareto --plot with a suffix matplotlib cannot write": [
        f"{HERE}::test_pareto_plot_with_a_suffix_matplotlib_cannot_write_is_a_one_line_error"],
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


def _tiny_corpus(root: Path, n: int = 4, splits: dict[int, str] | None = None) -> Path:
    """``n`` short clips of ``n`` speakers with per-file targets; returns labels.csv (audio list and teacher).
    ``splits`` adds a split column: that split for those clip numbers, train for the others."""
    rows = []
    for k in range(n):
        write_clip(root / f"c{k}.wav", 0.5, seed=k)
        rows.append((f"c{k}.wav", f"s{k}", round(0.1 + 0.8 * k / max(n - 1, 1), 2), 0.5, 0.5)
                    + ((splits.get(k, "train"),) if splits else ()))
    return _labels(root / "labels.csv", rows,
                   header="path,speaker,arousal,dominance,valence" + (",split" if splits else ""))


# two clips each in valid and test, the rest in train: enough for every CCC a command computes
TWO_HELD_OUT = {0: "valid", 1: "valid", 2: "test", 3: "test"}


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
from microser.cache_build import build_cache
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
    from search_fakes import FakeTrainer, fake_components, fake_config

    trainer = FakeTrainer()
    components = fake_components(trainer)
    if "data" in kw:
        components.data = kw.pop("data")
    from microser.search import run_search

    return run_search(fake_config(tmp_path, **kw), components=components), trainer


def test_study_refuses_a_cache_of_another_teacher_and_keeps_its_trials(tmp_path):
    from search_fakes import FakeData

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
        from search_fakes import FakeSpec

        return FakeSpec(trial.suggest_int("width", 1, 4))


def _exhaust(tmp_path, trainer=None):
    from search_fakes import FakeTrainer, fake_components, fake_config

    from microser.search import run_search

    from unittest import mock

    components = fake_components(trainer or FakeTrainer())
    components.space = FourWidths()
    with mock.patch("microser.search.MAX_DUPLICATES_IN_A_ROW", 12):    # 100 by default; fewer keep the test quick
        return _error(run_search, fake_config(tmp_path, trials=5, final_k=0, references=()), components=components)


def test_a_space_smaller_than_trials_trains_each_candidate_once_then_says_so(tmp_path):
    from search_fakes import FakeTrainer

    trainer = FakeTrainer()
    message = _exhaust(tmp_path, trainer)
    assert re.fullmatch(r"study 's': the last 12 candidates drawn from .*space\.toml were all tried before \(4 "
                        r"trained so far; the space has little left to draw\): lower --trials or widen the space",
                        message), message
    assert sorted(c[0] for c in trainer.calls if c[1] == 10) == [1, 2, 3, 4]   # each candidate trained once
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

    labels = _tiny_corpus(tmp_path / "d", n=8, splits=TWO_HELD_OUT)
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
            "ccc": {"arousal": 0.1, "dominance": 0.1, "valence": 0.1, "mean": 0.1},
            "costs": {"params": 1000 + seed, "ram_bytes": 500, "onnx_bytes": 4000, "macs": 10**6}}))
    return url, study, artifacts


def test_compress_and_export_say_that_a_trials_weights_were_deleted(tmp_path, capsys):
    from microser.rungs import load_trial_weights
    from microser.storage import load_study

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


# ---- round two: hostile input that used to crash, leak or lose work (issue 12) ---------------------------


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the real command line run in-process."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _cli_error(argv: list[str], capsys) -> str:
    """The one-line error a command prints (exit status 2), without 'error: ' and the newline."""
    code, _, err = _cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err[len("error: "):-1]


def _skipped(cache: Path) -> dict[str, str]:
    import csv

    with open(cache / "skipped.csv", newline="") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f)}


def _tiny_cache(root: Path, n: int = 6, splits: dict[int, str] | None = TWO_HELD_OUT) -> Path:
    """A csv-teacher cache of `_tiny_corpus` clips (two each in valid and test by default)."""
    labels = _tiny_corpus(root, n, splits)
    return build_cache(labels, [f"csv:{labels}"], root / "cache").out


def _search_on(tmp_path, cache: Path, **kw):
    """`run_search` with the fake trainer and space on a real cache; returns (message, trainer)."""
    from search_fakes import FakeTrainer, fake_components, fake_config

    from microser.search import run_search

    trainer = FakeTrainer()
    components = fake_components(trainer)
    components.data = Cache.open(cache)
    return _error(run_search, fake_config(tmp_path, **kw), components=components), trainer


# 1. clips shorter than a model's window


def test_too_short_clips_are_skipped_with_a_reason_and_the_rest_is_cached(tmp_path):
    labels = _tiny_corpus(tmp_path / "d", n=3)
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(160) / 16000)
    sf.write(tmp_path / "d" / "ten_ms.wav", x, 16000, subtype="PCM_16")            # 10 ms
    sf.write(tmp_path / "d" / "one.wav", x[5:6], 16000, subtype="PCM_16")          # 1 sample
    sf.write(tmp_path / "d" / "edge.wav", np.tile(x, 25), 16000, subtype="PCM_16")  # 4000 samples: the minimum
    teacher = _labels(tmp_path / "d" / "all.csv", [(f"{n}.wav", "s", 0.5, 0.5, 0.5)
                                                    for n in ("c0", "c1", "c2", "ten_ms", "one", "edge")])
    report = build_cache(tmp_path / "d", [f"csv:{teacher}"], tmp_path / "c")
    rule = "expected at least 4000 (0.25 s, the shortest input a microser model takes): remove the file or join it " \
           "with its neighbours"
    assert _skipped(tmp_path / "c") == {"one.wav": f"audio is 1 sample at 16 kHz (6.25e-05 s); {rule}",
                                        "ten_ms.wav": f"audio is 160 samples at 16 kHz (0.01 s); {rule}"}
    cache = Cache.open(tmp_path / "c")
    assert report.n_items == 4 and sorted(it["source"] for it in cache.items) == ["c0.wav", "c1.wav", "c2.wav",
                                                                                  "edge.wav"]
    assert min(it["length"] for it in cache.items) == 4000 and cache.verify() == []
    assert labels.is_file()


def test_max_seconds_below_the_model_minimum_is_refused_before_reading_audio(tmp_path, capsys):
    labels = _tiny_corpus(tmp_path / "d", n=2)
    message = _cli_error(["cache", "build", "--audio", str(labels), "--teacher", f"csv:{labels}", "--out",
                          str(tmp_path / "c"), "--max-seconds", "0.01"], capsys)
    assert message == ("--max-seconds 0.01 is shorter than 0.25 s, the shortest input a microser model takes: pass "
                       "--max-seconds 0.25 or more, e.g. 8")
    assert not (tmp_path / "c").exists()


def test_crop_seconds_below_the_model_minimum_is_refused_before_training(tmp_path, capsys):
    message = _cli_error(["search", "--budget", "80k-params", "--crop-seconds", "0.01", "--storage",
                          f"sqlite:///{tmp_path}/s.db"], capsys)
    assert message == ("--crop-seconds 0.01 is shorter than 0.25 s, the shortest input a microser model takes (its "
                       "STFT window must fit): pass --crop-seconds 0.25 or more, e.g. 1")
    assert list(tmp_path.iterdir()) == []        # no study, no demo cache, nothing trained


def test_search_refuses_a_cache_with_segments_shorter_than_the_model_minimum(tmp_path):
    from unittest import mock

    labels = _tiny_corpus(tmp_path / "d", n=4)
    sf.write(tmp_path / "d" / "short.wav", 0.3 * np.sin(np.arange(160) / 3), 16000, subtype="PCM_16")
    teacher = _labels(tmp_path / "d" / "all.csv", [(f"c{k}.wav", f"s{k}", 0.5, 0.5, 0.5) for k in range(4)]
                      + [("short.wav", "s9", 0.5, 0.5, 0.5)])
    with mock.patch("microser.cache_build.MIN_SEGMENT_SAMPLES", 1):     # a cache as older microser versions built it
        build_cache(tmp_path / "d", [f"csv:{teacher}"], tmp_path / "c")
    short = [it for it in Cache.open(tmp_path / "c").items if it["source"] == "short.wav"][0]
    message, trainer = _search_on(tmp_path, tmp_path / "c")
    assert message == (f"cache {tmp_path / 'c'}: 1 segment(s) shorter than 0.25 s, the shortest input a microser "
                       f"model takes (first: item {short['index']}, short.wav, 160 samples): rebuild the cache with "
                       "this microser, which skips them")
    assert trainer.calls == [] and not (tmp_path / "s.db").exists()


# 2. in-memory SQLite


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_in_memory_sqlite_storage_is_refused_before_training(tmp_path, capsys, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    message = _cli_error(["search", "--budget", "80k-params", "--storage", url], capsys)
    assert message == (f"storage {url!r} names no database file (SQLite would keep the study in memory and lose it "
                       "at exit): pass e.g. --storage sqlite:///studies/NAME.db")
    assert list(tmp_path.iterdir()) == []


# 3. export into a folder holding an older bundle, or other files


def test_export_replaces_an_older_bundle_whole_and_refuses_a_foreign_folder(tmp_path, capsys):
    from microser.export import Tolerance, export_trial

    url, study, _ = _study_with_two_trained_trials(tmp_path)
    old = tmp_path / "bundle"
    (old / "c").mkdir(parents=True)
    (old / "c" / "ser_int8.h").write_text("/* the C library of another model */\n")
    (old / "model_card.json").write_text('{"format": "microser-model-card", "source": {"trial": 99}}\n')
    # parity worse than the tolerance: the export is refused and the older bundle stays exactly as it was
    with pytest.raises(MicroserError, match=r"export refused: parity is worse .* see .*bundle\.parity\.FAILED\.json"):
        export_trial(study, 0, old, keep_float=[], tolerance=Tolerance(fp32_max_abs=-1.0, int8_ccc_drop=1.0))
    assert sorted(p.name for p in old.rglob("*")) == ["c", "model_card.json", "ser_int8.h"]
    assert (tmp_path / "bundle.parity.FAILED.json").is_file()
    # a passing export replaces the whole folder: nothing of the older model is left beside the new one
    code, _, err = _cli(["export", "--study", "s", "--trial", "1", "--storage", url, "--out", str(old),
                         "--keep-float", "none", "--tolerance", "1"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in old.iterdir()) == ["MODEL_CARD.md", "model.h", "model.int8.onnx", "model.onnx",
                                                     "model_card.json", "parity.json"]
    assert json.loads((old / "model_card.json").read_text())["source"]["trial"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []   # no temporary folder left
    # a folder with anything else is refused before any work, its files untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    message = _cli_error(["export", "--study", "s", "--trial", "1", "--storage", url, "--out", str(mine)], capsys)
    assert message == (f"--out {mine} holds files that are not a microser bundle (notes.txt); a bundle replaces its "
                       "folder whole: pass a new or empty folder, or move those files away")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


# 4. study names


@pytest.mark.parametrize("name,bad", [("ok?name#1", "'#', '?'"), ("a%20b", "'%'"), ("../escaped", "'/'"),
                                      ("a/b", "'/'")])
def test_unsafe_study_names_are_refused_the_same_way_by_every_command(tmp_path, capsys, monkeypatch, name, bad):
    monkeypatch.chdir(tmp_path)
    expected = (f"study name {name!r} has {bad}; expected 1-100 characters from A-Z a-z 0-9 . _ - starting with a "
                "letter or digit (it names files under studies/): pass e.g. --study ser80k")
    for argv in (["search", "--budget", "80k-params", "--study", name], ["pareto", "--study", name],
                 ["trials", "--study", name], ["show", "--study", name, "--trial", "0"],
                 ["export", "--study", name, "--trial", "0", "--out", "b"]):
        assert _cli_error(argv, capsys) == expected, argv
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escaped.db").exists()


# 5. links to one file


def test_links_to_one_file_are_cached_once_so_they_never_straddle_splits(tmp_path):
    d = tmp_path / "d"
    for k in range(8):
        write_clip(d / f"c{k}.wav", 0.5, seed=k)
    teacher = _labels(tmp_path / "t.csv", [(str(d / f"c{k}.wav"), "", 0.1 * k, 0.5, 0.5) for k in range(8)])
    plain = Cache.open(build_cache(d, [f"csv:{teacher}"], tmp_path / "plain",
                                   allow_absolute_paths=True).out)
    os.symlink("c3.wav", d / "z_link.wav")
    os.symlink(d / "c5.wav", d / "sub_abs.wav")
    os.link(d / "c6.wav", d / "y_hard.wav")
    report = build_cache(d, [f"csv:{teacher}"], tmp_path / "c", allow_absolute_paths=True)
    assert _skipped(tmp_path / "c") == {
        name: f"same file as {orig} (a link or another path to it): cached once, so one recording never lands in "
              "two splits" for name, orig in (("sub_abs.wav", "c5.wav"), ("y_hard.wav", "c6.wav"),
                                              ("z_link.wav", "c3.wav"))}
    cache = Cache.open(tmp_path / "c")
    assert report.n_items == 8 and report.n_skipped == 3
    # every recording once, in the split it gets without the links (split by file, seed 0)
    assert [(it["source"], it["split"]) for it in cache.items] == [(it["source"], it["split"]) for it in plain.items]
    np.testing.assert_array_equal(cache.targets, plain.targets)


# 6. CSV encodings


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be-bom", "utf-32"])
def test_csvs_with_a_byte_order_mark_decode_like_utf8(tmp_path, encoding):
    labels = _tiny_corpus(tmp_path / "d", n=3)
    text = labels.read_text().replace("s0", "Zoë")          # a non-ASCII speaker name survives the round trip
    enc = {"utf-16-be-bom": "utf-16-be"}.get(encoding, encoding)
    bom = "\ufeff" if encoding == "utf-16-be-bom" else ""
    recoded = labels.with_name("recoded.csv")
    recoded.write_bytes((bom + text).encode(enc))
    assert recoded.read_bytes()[:2] in (b"\xef\xbb", b"\xff\xfe", b"\xfe\xff")
    cache = Cache.open(build_cache(recoded, [f"csv:{recoded}"], tmp_path / "c").out)
    assert [it["speaker"] for it in cache.items] == ["Zoë", "s1", "s2"]
    np.testing.assert_allclose(cache.targets[:, 0], [0.1, 0.5, 0.9], atol=1e-6)


@pytest.mark.parametrize("which", ["audio", "teacher"])
def test_latin1_csvs_are_a_one_line_error_naming_the_file(tmp_path, capsys, which):
    labels = _tiny_corpus(tmp_path / "d", n=2)
    latin = labels.with_name("latin.csv")
    latin.write_bytes(labels.read_text().replace("s1", "Zoë").encode("latin-1"))
    audio, teacher = (latin, labels) if which == "audio" else (labels, latin)
    message = _cli_error(["cache", "build", "--audio", str(audio), "--teacher", f"csv:{teacher}", "--out",
                          str(tmp_path / "c")], capsys)
    assert message == (f"{which} CSV {latin} is not UTF-8 (byte 0xeb on line 3; Latin-1 or Windows-1252?): re-save it "
                       "as UTF-8 (a spreadsheet's 'CSV UTF-8', or `iconv -f latin1 -t utf-8 latin.csv`)")
    assert not (tmp_path / "c").exists()
    utf16_no_bom = labels.with_name("nobom.csv")
    utf16_no_bom.write_bytes(labels.read_text().encode("utf-16-le"))
    assert _error(build_cache, utf16_no_bom, [f"csv:{labels}"], tmp_path / "c") == (
        f"audio CSV {utf16_no_bom} holds NUL bytes (UTF-16 without a byte-order mark?): re-save it as UTF-8")


# 7. a cache that `cache verify` rejects


@pytest.mark.parametrize("damage", ["nan target", "edited audio", "edited items"])
def test_search_refuses_a_cache_that_cache_verify_rejects(tmp_path, damage):
    cache = _tiny_cache(tmp_path / "d")
    if damage == "nan target":
        targets = np.load(cache / "targets.npy")
        targets[2, 1] = np.nan
        np.save(cache / "targets.npy", targets)
        problems = (f"targets.npy: 1 NaN/Inf values; {cache / 'targets.npy'}: sha256 differs from meta.json (file "
                    "changed or corrupt)")
    elif damage == "edited audio":
        with open(cache / "audio.i16", "r+b") as f:
            f.seek(1000)
            f.write(b"\x00\x10")
        problems = f"{cache / 'audio.i16'}: sha256 differs from meta.json (file changed or corrupt)"
    else:
        text = (cache / "items.csv").read_text()
        (cache / "items.csv").write_text(text.replace(",s2,", ",s3,"))
        problems = (f"{cache / 'items.csv'}: sha256 differs from meta.json (file changed or corrupt); meta.json "
                    "fingerprint does not match teachers + items (items.csv or meta.json edited)")
    message, trainer = _search_on(tmp_path, cache)
    assert message == (f"cache {cache} fails `microser cache verify` ({problems}): rebuild it with `microser cache "
                       "build` (a new --out), then search again")
    assert trainer.calls == [] and not (tmp_path / "s.db").exists()


# 8. audio that is silent after conversion, and float audio beyond full scale


def test_audio_silent_after_conversion_is_skipped_and_float_overshoot_is_peak_normalised(tmp_path):
    from microser.audio import to_int16

    d = tmp_path / "d"
    for k in range(3):
        write_clip(d / f"c{k}.wav", 0.5, seed=k)
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    sf.write(d / "phase.wav", np.stack([x, -x], 1), 16000, subtype="PCM_16")      # mixes to zeros
    sf.write(d / "quiet.wav", 1e-6 * x / 0.3, 16000, subtype="FLOAT")             # rounds to zero in int16
    loud = 50 * x / 0.3
    sf.write(d / "loud.wav", loud, 16000, subtype="FLOAT")                        # peaks at +-50
    teacher = _labels(tmp_path / "t.csv", [(str(p), "", 0.5, 0.5, 0.5) for p in sorted(d.iterdir())])
    report = build_cache(d, [f"csv:{teacher}"], tmp_path / "c", allow_absolute_paths=True)
    fix = ("opposite-phase channels, or a level below 1/65536 of full scale); expected audible speech: fix the "
           "channels or the level, or remove the file")
    assert _skipped(tmp_path / "c") == {
        "phase.wav": f"audio is silent after the mix to mono and 16-bit rounding (peak 0.3 in the file: {fix}",
        "quiet.wav": f"audio is silent after the mix to mono and 16-bit rounding (peak 1e-06 in the file: {fix}"}
    import csv

    with open(tmp_path / "c" / "notes.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"path": "loud.wav", "note": "float samples beyond full scale (peak 50, "
                                            "would clip in 16-bit): peak-normalised, gain -34.0 dB"}]
    cache = Cache.open(tmp_path / "c")
    assert report.n_items == 4 and report.n_notes == 1 and cache.verify() == []
    stored = cache.audio([it["source"] for it in cache.items].index("loud.wav"))
    # the waveform is kept, scaled by 1/50: no sample clipped (before: 49 % sat at full scale)
    np.testing.assert_array_equal(to_int16(stored), to_int16(loud / 50.0))
    assert np.mean(np.abs(stored) >= 32767 / 32768) < 0.01


# 9. budgets written differently


def test_resume_accepts_the_same_budgets_written_differently_or_reordered(tmp_path):
    from microser.search_config import SearchConfig

    first, _ = _fake_search(tmp_path, trials=2, final_k=0, references=(), budgets=("20k-params", "2048-ram"))
    again, _ = _fake_search(tmp_path, trials=3, final_k=0, references=(), budgets=("2KiB-ram", "20000-params"))
    assert (first.trained, again.trained) == (2, 3)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    assert study.user_attrs["config"]["budgets"] == [{"metric": "params", "limit": 20000, "text": "20k-params"},
                                                     {"metric": "ram_bytes", "limit": 2048, "text": "2KiB-ram"}]
    names = {SearchConfig(budgets=b).study_name for b in (("80000-params", "262144-ram"), ("256KiB-ram", "80k-params"))}
    assert names == {"search-80k-params-256KiB-ram"}


# 10. paths and numbers: one line before any work


def _bad_argv(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """(argv, expected message) of one bad value; ``tmp_path`` holds labels.csv, a file ``f`` and a tiny cache."""
    labels, build = tmp_path / "d" / "labels.csv", ["cache", "build", "--teacher", f"csv:{tmp_path / 'd' / 'labels.csv'}"]
    search = ["search", "--budget", "80k-params", "--storage", f"sqlite:///{tmp_path}/s.db", "--cache",
              str(tmp_path / "cache")]
    proc = "(…): pass a path in a folder you can write to"   # the OS's reason differs for root and other users
    return {
        "cache build --out a file": (build + ["--audio", str(labels), "--out", str(tmp_path / "f")],
                                     f"--out {tmp_path / 'f'} is a file, expected a folder: pass a new folder name"),
        "cache build --out unwritable": (build + ["--audio", str(labels), "--out", "/proc/x/y"],
                                         f"--out /proc/x/y: /proc is not writable {proc}"),
        "--max-seconds inf": (build + ["--audio", str(labels), "--out", str(tmp_path / "c"), "--max-seconds", "inf"],
                              "--max-seconds inf is not finite; expected a number > 0: pass e.g. --max-seconds 8"),
        "--split-seed -1": (build + ["--audio", str(labels), "--out", str(tmp_path / "c"), "--split-seed", "-1"],
                            "--split-seed -1 is out of range; expected a whole number >= 0 and <= 4294967295: pass "
                            "e.g. --split-seed 0"),
        "sqlite in /proc": (["search", "--budget", "80k-params", "--storage", "sqlite:////proc/x/y.db"],
                            f"--storage /proc/x/y.db: /proc is not writable {proc}"),
        "journal in /proc": (["search", "--budget", "80k-params", "--storage", "journal:/proc/x.log"],
                             f"--storage /proc/x.log: /proc is not writable {proc}"),
        "journal:": (["search", "--budget", "80k-params", "--storage", "journal:"],
                     "storage 'journal:' names no journal file: pass e.g. --storage journal:studies/NAME.log"),
        "--epochs nan": (search + ["--epochs", "nan"],
                         "--epochs nan is not finite; expected a number > 0: pass e.g. --epochs 1"),
        "--crop-seconds inf": (search + ["--crop-seconds", "inf"],
                               "--crop-seconds inf is not finite; expected a number > 0: pass e.g. --crop-seconds 1"),
        "--seed -1": (search + ["--seed", "-1"], "--seed -1 is out of range; expected a whole number >= 0 and <= "
                                                 "4294967295: pass e.g. --seed 0"),
        "--time -5": (search + ["--time", "-5"],
                      "time '-5' must be a positive, finite duration, e.g. '10m', '90s', '1.5h', '1h30m' or '600' (seconds)"),
        "--rungs 0": (search + ["--rungs", "0"],
                      "rungs=[0]: expected increasing step counts >= 1, e.g. 60,200,600"),
        "--epochs 0": (search + ["--epochs", "0"],
                       "--epochs 0 is out of range; expected a number > 0: pass e.g. --epochs 1"),
        "config trials = 'five'": (search + ["--config", str(tmp_path / "five.toml")],
                                   "--trials 'five' is not a whole number; expected a whole number >= 1: pass e.g. "
                                   "--trials 30"),
        "non-UTF-8 config": (search + ["--config", str(tmp_path / "latin.toml")],
                             f"study config {tmp_path / 'latin.toml'} is not UTF-8 (byte 0xe9 on line 1; Latin-1 or "
                             "Windows-1252?): re-save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or `iconv -f latin1 "
                             "-t utf-8 latin.toml`)"),
        "non-UTF-8 space": (search + ["--space", str(tmp_path / "latin.toml")],
                            f"search space {tmp_path / 'latin.toml'} is not UTF-8 (byte 0xe9 on line 1; Latin-1 or "
                            "Windows-1252?): re-save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or `iconv -f latin1 "
                            "-t utf-8 latin.toml`)"),
        "predict --out a folder": (["predict", str(tmp_path / "bundle"), str(tmp_path / "d"), "--out", str(tmp_path)],
                                   f"--out {tmp_path} is a folder, expected a file name: pass e.g. --out "
                                   f"{tmp_path / 'out.csv'}"),
        # found by bench/fuzz_inputs.py
        "demo --out a file": (["demo", "--out", str(tmp_path / "f")],
                              f"--out {tmp_path / 'f'} is a file, expected a folder: pass a new folder name"),
        "--artifacts a file": (search + ["--artifacts", str(tmp_path / "f")],
                               f"--artifacts {tmp_path / 'f'} is a file, expected a folder: pass a new folder name"),
        "describe --input-seconds 1e6": (["describe", "wav2small-ref", "--input-seconds", "1e6"],
                                         "--input-seconds 1e+06 is out of range; expected a number <= 60: pass e.g. "
                                         "--input-seconds 1"),
    }[case]


BAD_ARGV = ["cache build --out a file", "cache build --out unwritable", "--max-seconds inf", "--split-seed -1",
            "sqlite in /proc", "journal in /proc", "journal:", "--epochs nan", "--crop-seconds inf", "--seed -1",
            "--time -5", "--rungs 0", "--epochs 0", "config trials = 'five'", "non-UTF-8 config",
            "non-UTF-8 space", "predict --out a folder", "demo --out a file", "--artifacts a file",
            "describe --input-seconds 1e6"]


@pytest.fixture(scope="module")
def bad_argv_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-argv")
    _tiny_cache(root / "d")
    (root / "cache").symlink_to(root / "d" / "cache")
    (root / "f").write_text("a file, not a folder")
    (root / "five.toml").write_text('trials = "five"\n')
    (root / "latin.toml").write_bytes('description = "café"\n'.encode("latin-1"))
    return root


@pytest.mark.parametrize("case", BAD_ARGV)
def test_bad_paths_and_numbers_are_one_line_errors_before_any_work(bad_argv_root, capsys, case):
    before = sorted(str(p) for p in bad_argv_root.rglob("*"))
    argv, expected = _bad_argv(bad_argv_root, case)
    assert _os_reason(_cli_error(argv, capsys)) == expected
    assert sorted(str(p) for p in bad_argv_root.rglob("*")) == before       # nothing created, nothing removed
    assert (bad_argv_root / "f").read_text() == "a file, not a folder"


@pytest.mark.parametrize("argv,usage", [(["search", "--epochs", "abc"], "Invalid value for '--epochs'"),
                                        (["search", "--bogus"], "No such option: --bogus"),
                                        (["export", "--study", "s"], "Missing option '--trial'")])
def test_usage_errors_are_a_usage_message_not_a_traceback(capsys, argv, usage):
    code, out, err = _cli(argv, capsys)     # typer >= 0.29 raises its own click's exceptions
    assert code == 2 and "Traceback" not in err and err.startswith(f"Usage: microser {argv[0]} [OPTIONS]")
    assert err.rstrip().endswith(usage) or usage in err.splitlines()[-1]


def test_a_csv_path_too_long_for_the_file_system_is_a_listed_problem(tmp_path):
    labels = _tiny_corpus(tmp_path / "d", n=2)
    listing = _labels(tmp_path / "d" / "list.csv", [("c0.wav",), ("x" * 300 + ".wav",)], header="path")
    assert _error(build_cache, listing, [f"csv:{labels}"], tmp_path / "c") == (
        f"audio CSV {listing}: 1 problem(s): line 3: {'x' * 40}... (File name too long) does not exist; fix or remove "
        "those rows")


def test_pareto_plot_with_a_suffix_matplotlib_cannot_write_is_a_one_line_error(tmp_path, capsys):
    url, _, _ = _study_with_two_trained_trials(tmp_path)
    message = _cli_error(["pareto", "--study", "s", "--storage", url, "--plot", str(tmp_path / "front.toml")], capsys)
    assert message.startswith(f"--plot {tmp_path / 'front.toml'}: matplotlib cannot write '.toml' files; expected one "
                              "of ") and message.endswith(": pass e.g. --plot front.png") and ".png" in message
    assert not (tmp_path / "front.toml").exists()


def _os_reason(message: str) -> str:
    """``message`` with the operating system's reason for an unwritable place replaced by ``…``."""
    return re.sub(r"is not writable \([^)]*\)", "is not writable (…)", message)


def test_export_out_a_file_or_unwritable_is_refused_before_the_work(tmp_path, capsys):
    url, _, _ = _study_with_two_trained_trials(tmp_path)
    (tmp_path / "f").write_text("mine")
    base = ["export", "--study", "s", "--trial", "0", "--storage", url, "--out"]
    assert _cli_error(base + [str(tmp_path / "f")], capsys) == (f"--out {tmp_path / 'f'} is a file, expected a "
                                                                "folder: pass a new folder name")
    assert _os_reason(_cli_error(base + ["/proc/x"], capsys)) == ("--out /proc/x: /proc is not writable (…): pass a "
                                                                  "path in a folder you can write to")
    assert (tmp_path / "f").read_text() == "mine"


def test_a_bundle_with_a_truncated_graph_or_a_broken_card_is_a_one_line_error(tmp_path, capsys):
    labels = _tiny_corpus(tmp_path / "d", n=2)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("model.onnx", "model.int8.onnx"):
        (bundle / name).write_bytes(b"\x08\x07\x12\x08microser")      # the first bytes of an ONNX file, cut off
    (bundle / "model_card.json").write_text('{"contract": {"min_samples": 4000}, "data": {"cache"')
    assert _cli_error(["predict", str(bundle), str(labels), "--out", str(tmp_path / "p.csv")], capsys).startswith(
        f"model card {bundle / 'model_card.json'} is not valid JSON (")
    (bundle / "model_card.json").write_text('{"contract": {"min_samples": 4000}}')
    message = _cli_error(["evaluate", str(bundle), "--cache", str(tmp_path / "nocache")], capsys)
    assert re.fullmatch(rf"{re.escape(str(bundle / 'model.onnx'))} does not load in onnxruntime \(.+\): the file is "
                        r"truncated or not an ONNX graph; export the bundle again with `microser export`", message)
    assert not (tmp_path / "p.csv").exists()


def test_a_journal_with_a_corrupt_line_in_the_middle_is_a_one_line_error(tmp_path, capsys):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = tmp_path / "j.log"
    study = optuna.create_study(study_name="j", storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = lines[4][:12] + "\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    message = _cli_error(["trials", "--study", "j", "--storage", f"journal:{path}"], capsys)
    assert message == (f"journal file {path}: line 5 of {len(lines)} is not valid JSON (the file was edited or "
                       "damaged): restore it from a backup, or pass another --storage to start afresh")
    assert path.read_bytes() == before
    # valid JSON that Optuna cannot replay (an entry without its fields) is the same kind of error
    path.write_text('{"op_code": 0}\n')
    message = _cli_error(["trials", "--study", "j", "--storage", f"journal:{path}"], capsys)
    assert message == (f"journal file {path}: an entry cannot be replayed (KeyError: 'study_name') (the file was "
                       "edited or damaged): restore it from a backup, or pass another --storage to start afresh")


# 11. settings a trial would fail on


@pytest.mark.parametrize("layout,split,n", [("all rows split=test", "train", 0), ("one training segment", "train", 1)])
def test_splits_a_trial_cannot_train_on_are_refused_before_the_first_trial(tmp_path, layout, split, n):
    splits = {k: "test" for k in range(6)} if n == 0 else {0: "train", 1: "valid", 2: "valid", 3: "test", 4: "test",
                                                           5: "test"}
    cache = _tiny_cache(tmp_path / "d", splits=splits)
    message, trainer = _search_on(tmp_path, cache)
    assert message == (f"cache {cache}: the {split} split has {n} segment(s); training needs at least 2 in train and "
                       "in valid: add audio (or speakers), or give the audio CSV's split column train and valid rows, "
                       "and build the cache again")
    assert trainer.calls == [] and not (tmp_path / "s.db").exists()


# 12. compress --prune-ratio outside (0, 1)


@pytest.mark.parametrize("ratio", ["-0.5", "1", "nan"])
def test_compress_refuses_a_prune_ratio_outside_0_1_before_any_work(tmp_path, capsys, ratio):
    url, study, _ = _study_with_two_trained_trials(tmp_path)
    message = _cli_error(["compress", "--study", "s", "--trial", "0", "--storage", url, "--prune-ratio", ratio],
                         capsys)
    expected = ("--prune-ratio nan is not finite; expected a number: pass e.g. --prune-ratio 0.3" if ratio == "nan"
                else f"--prune-ratio {float(ratio):g} must be in (0, 1): the fraction of channels removed from every "
                     "body block but the last, e.g. --prune-ratio 0.3")
    assert message == expected
    assert not any(k.startswith("compressed:") for k in optuna.load_study(study_name="s", storage=url).user_attrs)
    assert not (tmp_path / "s-compressed").exists() and not list(tmp_path.glob("**/report.json"))


# smaller cases


def test_rerun_of_a_complete_build_says_nothing_was_resumed(tmp_path, capsys):
    labels = _tiny_corpus(tmp_path / "d", n=3)
    argv = ["cache", "build", "--audio", str(labels), "--teacher", f"csv:{labels}", "--out", str(tmp_path / "c")]
    assert _cli(argv, capsys)[0] == 0
    code, out, _ = _cli(argv, capsys)
    out = " ".join(out.split())
    assert code == 0 and "resumed" not in out and "nothing to do: the cache was already complete" in out
    assert build_cache(labels, [f"csv:{labels}"], tmp_path / "c").resumed_items == 0


def test_predict_lists_unusable_files_and_predicts_the_rest(tmp_path, capsys):
    import csv

    from microser.frontends import FrontendSpec
    from microser.models.spec import ArchSpec, build_model
    from microser.models.wav2small import Wav2SmallBody
    from microser.onnxio import export_onnx, ort_session, run_onnx

    spec = ArchSpec("wav2small", FrontendSpec(n_fft=256, hop=160, n_mels=16),
                    Wav2SmallBody(channels=(4, 4), kernel=3, norm="batch", pool_after=(1,), pooling="attention"))
    (tmp_path / "bundle").mkdir()
    export_onnx(build_model(spec).eval(), tmp_path / "bundle" / "model.onnx")
    d = tmp_path / "audio"
    write_clip(d / "a.wav", 0.5, seed=1)
    (d / "b.wav").write_bytes(b"RIFF not a wave file")
    write_clip(d / "c.wav", 0.6, seed=2)
    code, out, _ = _cli(["predict", str(tmp_path / "bundle"), str(d), "--out", str(tmp_path / "p.csv")], capsys)
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [Path(r["path"]).name for r in rows] == ["a.wav", "c.wav"]
    session = ort_session(str(tmp_path / "bundle" / "model.onnx"))
    expected = run_onnx(session, load_audio(d / "c.wav")[None])[0]
    np.testing.assert_allclose([float(rows[1][t]) for t in ("arousal", "dominance", "valence")], expected, atol=1e-6)
    assert f"skipped {d / 'b.wav'}: cannot read audio (" in out


def test_evaluate_refuses_a_bundle_together_with_study_and_trial(tmp_path, capsys):
    url, _, _ = _study_with_two_trained_trials(tmp_path)
    (tmp_path / "bundle").mkdir()
    message = _cli_error(["evaluate", str(tmp_path / "bundle"), "--study", "s", "--trial", "0", "--storage", url],
                         capsys)
    assert message == (f"evaluate got a model path ({tmp_path / 'bundle'}) and --study/--trial: pass one of them (a "
                       "bundle or ONNX file, or --study with --trial)")


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
    from search_fakes import FakeData

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
    from microser.rungs import load_trial_weights

    url, study, artifacts = _study_with_two_trained_trials(tmp_path)
    (artifacts / study.trials[0].user_attrs["weights"]["artifact_id"]).unlink()
    return _error(load_trial_weights, study, 0)


def _msg_too_short(tmp_path) -> str:
    """The reason skipped.csv gives, with the file name the build strips from it."""
    labels = _tiny_corpus(tmp_path / "d", n=2)
    sf.write(tmp_path / "d" / "c1.wav", np.full(160, 0.1), 16000, subtype="PCM_16")
    build_cache(labels, [f"csv:{labels}"], tmp_path / "c")
    return f"{tmp_path / 'd' / 'c1.wav'}: {_skipped(tmp_path / 'c')['c1.wav']}"


def _msg_converted_silent(tmp_path) -> str:
    x = 0.3 * np.sin(np.arange(8000) / 5)
    sf.write(tmp_path / "phase.wav", np.stack([x, -x], 1), 16000, subtype="PCM_16")
    return _error(load_audio, tmp_path / "phase.wav")


def _msg_latin1(tmp_path) -> str:
    from microser.teachers import CsvTeacher

    (tmp_path / "t.csv").write_bytes("path,arousal,dominance,valence\ncafé.wav,1,1,1\n".encode("latin-1"))
    return _error(CsvTeacher, tmp_path / "t.csv")


def _msg_config(**kw) -> str:
    from microser.search_config import SearchConfig

    return _error(SearchConfig, **kw)


def _msg_unwritable(tmp_path) -> str:
    from microser.checks import out_folder

    return _error(out_folder, "--out", "/proc/x/y")


def _msg_journal(tmp_path) -> str:
    from microser.storage import open_storage

    path = tmp_path / "j.log"
    optuna.create_study(study_name="j", storage=open_storage(f"journal:{path}", "j")).enqueue_trial({"x": 1})
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0][:9] + "\n" + "".join(lines[1:]))
    return _error(open_storage, f"journal:{path}", "j")


def _msg_damaged_cache(tmp_path) -> str:
    cache = _tiny_cache(tmp_path / "d")
    targets = np.load(cache / "targets.npy")
    targets[0, 0] = np.nan
    np.save(cache / "targets.npy", targets)
    return _search_on(tmp_path, cache)[0]


def _msg_split(tmp_path) -> str:
    return _search_on(tmp_path, _tiny_cache(tmp_path / "d", splits={k: "test" for k in range(6)}))[0]


def _msg_foreign_out(tmp_path) -> str:
    from microser.export import check_bundle_out

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return _error(check_bundle_out, tmp_path / "out")


def _msg_truncated_graph(tmp_path) -> str:
    from microser.inference import evaluate_target

    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12")
    return _error(evaluate_target, path=tmp_path / "m.onnx", cache=tmp_path / "no-cache")


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
    "too short": _msg_too_short,
    "silent after conversion": _msg_converted_silent,
    "latin-1 csv": _msg_latin1,
    "crop below the minimum": lambda p: _msg_config(crop_seconds=0.01),
    "bad number": lambda p: _msg_config(epochs=float("nan")),
    "unwritable output": _msg_unwritable,
    "study name": lambda p: _msg_config(study="ok?name#1"),
    "in-memory sqlite": lambda p: _msg_config(storage="sqlite://"),
    "corrupt journal": _msg_journal,
    "damaged cache": _msg_damaged_cache,
    "too few training segments": _msg_split,
    "foreign export folder": _msg_foreign_out,
    "truncated graph": _msg_truncated_graph,
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
