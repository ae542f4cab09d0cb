"""`microser train` on a tiny real study: the trained stage, seeds, --time, --init, compressed trials, the CLI, a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from compress_helpers import build_tiny_cache, make_study, tiny_spec
from microser import trainer
from microser.cli import main
from microser.distill import evaluate
from microser.errors import MicroserError
from microser.loading import load_trial_model
from microser.rungs import TRAINED_PREFIX, load_trial_weights, trained_record, weights_stage
from microser.storage import load_study
from microser.trainer import train_config, train_trial, trained_dir

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
QUICK = dict(threads=1, device="cpu", eval_every=20)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A sqlite study with one trial trained 6 epochs on a tiny learnable corpus (compress_helpers)."""
    from microser.cache import Cache

    folder = tmp_path_factory.mktemp("train")
    cache = build_tiny_cache(folder)
    study, url = make_study(folder, cache)
    return {"folder": folder, "study": study, "url": url, "cache": cache, "data": Cache.open(cache)}


def _fresh_study(tiny, tmp_path):
    """A copy of the tiny study (same trained trial) in ``tmp_path``: tests that write a trained stage get their own."""
    import shutil

    shutil.copytree(tiny["folder"] / "artifacts", tmp_path / "artifacts")
    shutil.copy(tiny["folder"] / "s.db", tmp_path / "s.db")
    url = f"sqlite:///{tmp_path}/s.db"
    study = load_study("s", url)
    settings = dict(study.user_attrs["config"], artifacts=str(tmp_path / "artifacts"))
    study.set_user_attr("config", settings)
    return study, url


def test_two_seeds_keep_the_best_on_validation_and_become_the_trained_stage(tiny, tmp_path):
    study, _ = _fresh_study(tiny, tmp_path)
    data = tiny["data"]
    search_model, _, which = load_trial_model(study, 0)
    assert which == "search"
    events = []
    report = train_trial(study, 0, steps=60, seeds=2, seed=4, progress=events.append, **QUICK)
    # one run per seed, validated at 20, 40, 60; the kept one is the best on validation
    assert [r.seed for r in report.seeds] == [4, 5]
    assert all([c[0] for c in r.curve] == [20, 40, 60] and r.steps == 60 for r in report.seeds)
    best = max(report.seeds, key=lambda r: r.ccc["mean"])
    assert report.kept_seed == best.seed and report.ccc == best.ccc and report.test_ccc == best.test_ccc
    means = [r.ccc["mean"] for r in report.seeds]
    assert report.spread["valid"] == {"min": min(means), "max": max(means), "std": pytest.approx(np.std(means))}
    # the stage compress/export/evaluate use now: the kept weights, scoring exactly what the report says
    assert weights_stage(study, 0) == "trained"
    model, spec, which = load_trial_model(study, 0)
    assert which == "trained" and spec.to_json() == tiny_spec().to_json()
    assert evaluate(model, data, "valid") == report.ccc and evaluate(model, data, "test") == report.test_ccc
    record = trained_record(study, 0)
    assert record["weights"] == report.weights and record["ccc"] == report.ccc and record["kept_seed"] == best.seed
    assert record["settings"]["steps"] == 60 and record["settings"]["ema_decay"] == trainer.EMA_DECAY
    assert [s["curve"] for s in record["seeds"]] == [r.curve for r in report.seeds]
    assert set(study.user_attrs) >= {f"{TRAINED_PREFIX}0"}
    # what compress/export used before: the search weights, scored on the same splits
    assert report.before["stage"] == "search" and report.before["ccc"] == evaluate(search_model, data, "valid")
    from microser.inference import evaluate_target

    target = evaluate_target(study=study, trial=0, split="test")
    assert target["target"] == "study s trial 0 (trained weights)" and target["results"]["pytorch"] == report.test_ccc
    assert Path(report.curves).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = [e["kind"] for e in events]
    assert kinds.count("seed") == 2 and kinds.count("eval") == 6 and kinds.count("step") == 120
    # the search weights are still there
    assert load_trial_weights(study, 0, stage="search").keys() == model.state_dict().keys()


def test_the_same_call_again_resumes_finished_checkpoints_without_training(tiny, tmp_path):
    study, _ = _fresh_study(tiny, tmp_path)
    first = train_trial(study, 0, steps=40, **QUICK)
    steps = []
    again = train_trial(study, 0, steps=40, progress=lambda e: steps.append(e) if e["kind"] == "step" else None,
                        **QUICK)
    assert steps == [] and again.seeds[0].resumed_at == 40 and again.ccc == first.ccc
    assert again.weights["sha256"] == first.weights["sha256"]
    # other settings are another run: a fresh checkpoint beside the first
    other = train_trial(study, 0, steps=20, **QUICK)
    assert other.seeds[0].resumed_at is None and len(list(trained_dir(study, 0).glob("seed-0-*.ckpt"))) == 2


def test_a_time_budget_becomes_steps_once_and_is_kept(tiny, tmp_path, monkeypatch):
    study, _ = _fresh_study(tiny, tmp_path)
    calls = []

    def plan(model, data, config, seconds):
        calls.append(seconds)
        return 30, 12.5

    monkeypatch.setattr(trainer, "plan_steps", plan)
    report = train_trial(study, 0, seconds=10.0, seeds=2, **QUICK)
    assert calls == [5.0]                                   # the budget is split over the seeds
    assert [r.total_steps for r in report.seeds] == [30, 30] and report.settings["time"] == 10.0
    train_trial(study, 0, seconds=10.0, seeds=2, **QUICK)
    assert calls == [5.0]                                   # the plan was kept: a resumed run trains the same steps


def test_plan_steps_times_real_steps(tiny):
    torch.manual_seed(0)
    from microser.models.spec import build_model

    steps, per_second = trainer.plan_steps(build_model(tiny_spec()), tiny["data"], train_config(**QUICK), 2.0)
    assert per_second > 0 and trainer.PROBE_STEPS <= steps <= max(trainer.PROBE_STEPS, 2.0 * per_second)


def test_init_starts_from_the_trials_most_trained_weights(tiny, tmp_path):
    study, _ = _fresh_study(tiny, tmp_path)
    spec, source, state, stage = trainer._resolve(study, 0, compressed=False, init=True)
    assert source == "trial" and stage == "search"
    assert all(torch.equal(v, load_trial_weights(study, 0, stage="search")[k]) for k, v in state.items())
    # one step at a tiny learning rate from the search weights stays next to them; from scratch it does not
    near = train_trial(study, 0, steps=1, init=True, eval_every=1, lr=1e-7, augment=False, threads=1, device="cpu")
    assert near.init == "search" and near.ccc["mean"] == pytest.approx(near.before["ccc"]["mean"], abs=0.02)
    _, _, _, stage = trainer._resolve(study, 0, compressed=False, init=True)
    assert stage == "trained"                          # the next --init starts from these weights


def test_a_compressed_trial_trains_its_pruned_architecture(tiny, tmp_path):
    from microser.compress import compress_trial
    from microser.loading import load_compressed

    study, _ = _fresh_study(tiny, tmp_path)
    compress_trial(study, 0, prune_ratio=0.5, prune_steps=1, epochs=0, finetune_epochs=0, keep_float=[],
                   calibration_crops_n=4)
    _, pruned, _, _ = load_compressed(study, 0)
    assert pruned.to_json() != tiny_spec().to_json()
    report = train_trial(study, 0, steps=20, compressed=True, init=True, **QUICK)
    assert report.source == "compressed" and report.init == "compressed" and report.spec == pruned.to_dict()
    model, spec, which = load_trial_model(study, 0)          # export/evaluate: the trained, pruned model
    assert which == "trained" and spec.to_json() == pruned.to_json()
    assert evaluate(model, tiny["data"], "valid") == report.ccc


def test_bad_requests_are_one_line_errors_before_any_training(tiny, tmp_path, monkeypatch):
    study, _ = _fresh_study(tiny, tmp_path)
    study.add_trial(optuna.create_trial(values=[-1.0, 9e9, 9e9], user_attrs={
        "spec": tiny_spec().to_json(), "rejected": "over budget: params 9e9 > 200000"}))
    cases = [
        (dict(steps=10, seconds=5.0), r"got --steps 10 and --time 5 s: give one of them"),
        (dict(seeds=0), r"--seeds 0: expected 1 or more"),
        (dict(steps=0), r"--steps 0: expected optimizer steps >= 1"),
        (dict(trial=9), r"study 's' has no trial 9"),
        (dict(trial=1, init=True), r"trial 1 of study 's' has no weights to start from \(--init; it was over budget"),
        (dict(compressed=True), r"trial 0 of study 's' has not been compressed: run `microser compress"),
    ]
    for kw, pattern in cases:
        trial = kw.pop("trial", 0)
        with pytest.raises(MicroserError, match=pattern):
            train_trial(study, trial, **{"threads": 1, **kw})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MicroserError, match=r"device 'cuda': .* sees no CUDA GPU here"):
        train_trial(study, 0, device="cuda")
    assert trained_record(study, 0) is None and not trained_dir(study, 0).exists()


def test_cli_trains_reports_json_and_evaluate_says_which_weights(tiny, tmp_path, capsys):
    study, url = _fresh_study(tiny, tmp_path)
    base = ["--study", "s", "--trial", "0", "--storage", url]
    main(["train", *base, "--steps", "40", "--eval-every", "20", "--seeds", "2", "--threads", "1", "--device", "cpu",
          "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["kept_seed"] in (0, 1) and len(out["seeds"]) == 2 and out["device"] == "cpu"
    assert out["settings"]["steps"] == 40 and out["settings"]["eval_every"] == 20
    assert out["settings"]["schedule"] == "hold" and out["settings"]["patience"] == 12   # the measured recipe
    main(["evaluate", *base, "--json"])
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["target"].endswith("(trained weights)")
    assert evaluation["results"]["pytorch"]["mean"] == pytest.approx(out["test_ccc"]["mean"], abs=1e-12)
    for extra, message in ((["--time", "15x"], "error: --time '15x' is not understood: expected e.g. '10m', "
                                               "'90s'"),
                           (["--steps", "5", "--time", "1m"], "error: got --steps 5 and --time 60 s: give one")):
        with pytest.raises(SystemExit) as e:
            main(["train", *base, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err


def test_cli_killed_with_sigkill_resumes_to_the_uninterrupted_result(tiny, tmp_path):
    """kill -9 while `microser train` runs, then the same command: it resumes from the last checkpoint and ends
    with exactly the best validation CCC of an uninterrupted run of that seed (same thread count)."""
    from microser.distill import train
    from microser.models.spec import build_model

    study, url = _fresh_study(tiny, tmp_path)
    steps, every = 300, 50
    command = [sys.executable, "-m", "microser.cli", "train", "--study", "s", "--trial", "0", "--storage", url,
               "--steps", str(steps), "--eval-every", str(every), "--patience", "0", "--threads", "1", "--device",
               "cpu", "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    folder = trained_dir(study, 0)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:   # the first checkpoint (a validation) exists
            if list(folder.glob("seed-0-*.ckpt")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert trained_record(load_study("s", url), 0) is None       # killed before the end: no stage yet
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads(done.stdout)
    run = resumed["seeds"][0]
    assert run["resumed_at"] is not None and every <= run["resumed_at"] < steps and run["steps"] == steps
    # the uninterrupted run of the same seed, in this process, one thread
    torch.manual_seed(0)
    model = build_model(tiny_spec())
    whole = train(model, tiny["data"], train_config(steps=steps, eval_every=every, patience=None, threads=1,
                                                    device="cpu", seed=0))
    assert resumed["ccc"] == whole.ccc and run["best_step"] == whole.best_step
    assert [c[1] for c in run["curve"]] == [h["valid"]["mean"] for h in whole.history]
