"""Search orchestration: budgets reject before training, counting, resume, refusal, final stage; then real searches."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch
from optuna.trial import TrialState

from microser.errors import MicroserError
from microser.search import REJECTED_CCC, Components, SearchConfig, TrainOutcome, run_search
from microser.storage import final_record, load_study, load_trial_weights

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- fakes: a one-dimensional space whose costs and CCC are known in closed form ----


@dataclass(frozen=True)
class FakeSpec:
    width: int
    family: str = "fake"

    def summary(self) -> str:
        return f"fake w{self.width}"

    def to_json(self) -> str:
        return json.dumps({"width": self.width})


class FakeSpace:
    def suggest(self, trial):
        return FakeSpec(trial.suggest_int("width", 1, 64))


def fake_measure(spec, input_seconds):
    w = spec.width
    return {"params": 1000 * w, "trainable_params": 1000 * w, "macs": 10_000 * w * input_seconds,
            "onnx_bytes": 4000 * w, "ram_bytes": 100 * w, "ram_bytes_fp32": 400 * w, "input_seconds": input_seconds}


class FakeTrainer:
    """CCC rises with width (0.01 per unit); records every (width, epochs, seed) it trains."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec, data, train_config, *, test=False, progress=None, should_stop=None):
        self.calls.append((spec.width, train_config.epochs, train_config.seed))
        ccc = 0.01 * spec.width + (0.1 if train_config.epochs >= 8 else 0.0)
        report = {"arousal": ccc, "dominance": ccc, "valence": ccc, "mean": ccc}
        return TrainOutcome(state_dict={"w": torch.full((2,), float(spec.width))}, ccc=report,
                            train_seconds=0.01, samples_per_second=100.0,
                            test_ccc=dict(report) if test else None)


class FakeData:
    fingerprint = "fake-data-1"
    path = "<fake>"


def fake_components(trainer):
    return Components(trainer=trainer, measure=fake_measure, space=FakeSpace(), data=FakeData(),
                      resolve_reference=lambda name: FakeSpec(10), load_spec=lambda s: FakeSpec(json.loads(s)["width"]))


def fake_config(tmp_path, **kw):
    base = dict(study="s", storage=f"sqlite:///{tmp_path}/s.db", budgets=("20k-params",), trials=6, epochs=1.0,
                final_epochs=8.0, final_k=2, threads=1, seed=3, sampler="random", space=str(tmp_path / "space.toml"))
    base.update(kw)
    return SearchConfig(**base)


def test_over_budget_candidates_are_recorded_and_never_trained(tmp_path):
    trainer = FakeTrainer()
    summary = run_search(fake_config(tmp_path), components=fake_components(trainer))
    study = load_study("s", f"sqlite:///{tmp_path}/s.db")
    trials = study.get_trials()
    search_widths = [w for w, epochs, _ in trainer.calls if epochs == 1.0]
    rejected = [t for t in trials if t.user_attrs.get("rejected")]
    trained = [t for t in trials if "ccc" in t.user_attrs and not t.user_attrs.get("reference")
               and not t.user_attrs.get("rejected")]
    # references (width 10) train once at search fidelity; every other trained width fits the budget
    assert sorted(search_widths) == sorted([10] + [t.params["width"] for t in trained])
    assert all(t.params["width"] <= 20 for t in trained)
    assert len(trained) == 6 and summary.trained == 6
    assert summary.rejected == len(rejected) > 0     # width is uniform in 1..64: most draws are over budget
    for t in rejected:
        w = t.params["width"]
        assert t.state == TrialState.COMPLETE
        assert t.values == [REJECTED_CCC, 1000.0 * w, 100.0 * w]
        assert t.constraints == {"params": 1000.0 * w - 20_000}
        assert t.user_attrs["rejected"] == f"over budget: params {1000 * w} > 20000"
        assert "weights" not in t.user_attrs
    for t in trained:
        assert t.values == pytest.approx([0.01 * t.params["width"], 1000.0 * t.params["width"], 100.0 * t.params["width"]])
        assert t.constraints["params"] <= 0


def test_final_stage_retrains_top_k_and_references_with_a_fresh_seed(tmp_path):
    trainer = FakeTrainer()
    summary = run_search(fake_config(tmp_path), components=fake_components(trainer))
    study = load_study("s", f"sqlite:///{tmp_path}/s.db")
    finals = [(w, seed) for w, epochs, seed in trainer.calls if epochs == 8.0]
    assert len(finals) == 3                       # final_k = 2 candidates + 1 reference
    trained = [t for t in study.get_trials() if "ccc" in t.user_attrs and not t.user_attrs.get("rejected")
               and not t.user_attrs.get("reference")]
    # with CCC = 0.01 * width and cost = width, every trained trial is on the front: the top 2 by CCC go on
    top2 = sorted(trained, key=lambda t: -t.params["width"])[:2]
    assert sorted(w for w, _ in finals) == sorted([10] + [t.params["width"] for t in top2])
    for t in top2:
        record = final_record(study, t)
        assert record["ccc"]["mean"] == pytest.approx(0.01 * t.params["width"] + 0.1)
        assert record["seed"] != 3 + t.number
        assert torch.equal(load_trial_weights(study, t)["w"], torch.full((2,), float(t.params["width"])))
    assert summary.best["number"] == top2[0].number
    assert summary.reference["reference"] == "fake" or summary.reference["summary"] == "fake w10"
    assert summary.margin_test == pytest.approx(0.01 * (top2[0].params["width"] - 10))


def test_resume_continues_to_n_trained_and_skips_done_work(tmp_path):
    trainer = FakeTrainer()
    run_search(fake_config(tmp_path, trials=3), components=fake_components(trainer))
    first = len(trainer.calls)
    summary = run_search(fake_config(tmp_path, trials=5), components=fake_components(trainer))
    again = trainer.calls[first:]
    assert summary.trained == 5
    assert len([c for c in again if c[1] == 1.0]) == 2          # two new search trials, reference not retrained
    summary = run_search(fake_config(tmp_path, trials=5), components=fake_components(trainer))
    assert summary.trained == 5


def test_impossible_budget_is_said_before_training_anything(tmp_path):
    trainer = FakeTrainer()
    with pytest.raises(MicroserError, match=r"budget 500-params looks impossible: none of \d+ candidates .* "
                                            r"\(smallest seen: params \d+000\)"):
        run_search(fake_config(tmp_path, budgets=("500-params",)), components=fake_components(trainer))
    assert trainer.calls == []


def test_existing_study_with_other_objectives_or_budgets_is_refused(tmp_path):
    run_search(fake_config(tmp_path, trials=1, final_k=0, references=()), components=fake_components(FakeTrainer()))
    with pytest.raises(MicroserError, match="created with objectives params,ram_bytes, this run asks for "
                                            "params,onnx_bytes"):
        run_search(fake_config(tmp_path, objectives=("params", "onnx_bytes")), components=fake_components(FakeTrainer()))
    with pytest.raises(MicroserError, match="created with budgets 20k-params, this run asks for 30k-params"):
        run_search(fake_config(tmp_path, budgets=("30k-params",)), components=fake_components(FakeTrainer()))


def test_config_file_keys_match_the_cli_and_flags_override(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('budgets = ["80k-params"]\ntrials = 7\nfinal-epochs = 20\nobjectives = "params,macs"\n')
    config = SearchConfig.load(path, trials=9, seed=None)
    assert (config.budgets, config.trials, config.final_epochs, config.objectives) == (
        ("80k-params",), 9, 20, ("params", "macs"))
    assert config.study_name == "search-80k-params"
    (tmp_path / "bad.toml").write_text("trails = 3\n")
    with pytest.raises(MicroserError, match="key\\(s\\) trails not known"):
        SearchConfig.load(tmp_path / "bad.toml")


# ---- real searches: tiny generated cache, tiny space, 1 epoch ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """30 short clips of 6 speakers with random A/D/V labels, cached through the csv teacher; a tiny space."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from search_helpers import build_tiny_search_root

    root = build_tiny_search_root(tmp_path_factory.mktemp("tiny"), 30)
    from microser.frontends import FrontendSpec
    from microser.models.spec import ArchSpec
    from microser.models.wav2small import Wav2SmallBody

    reference = ArchSpec("wav2small", FrontendSpec(n_fft=256, hop=160, center=False, n_mels=24),
                         Wav2SmallBody(channels=(16, 16), kernel=3, norm="batch", pool_after=(1,), pooling="attention"))
    (root / "ref.json").write_text(reference.to_json())
    return root


def tiny_config(tiny, where, **kw):
    base = dict(study="t", storage=f"sqlite:///{where}/t.db", cache=str(tiny / "cache"), space=str(tiny / "space.toml"),
                budgets=("3k-params",), trials=2, epochs=1.0, batch_size=8, crop_seconds=0.5, crops_per_segment=1,
                final_k=1, final_epochs=2.0, references=(), threads=1, seed=5)
    base.update(kw)
    return SearchConfig(**base)


def _trained_values(url):
    study = load_study("t", url)
    return [(t.params, t.values) for t in study.get_trials()
            if t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected")]


@pytest.mark.slow
def test_real_two_trial_search_records_the_contract_and_repeats_with_the_same_seed(tiny, tmp_path):
    ref_json = str(tiny / "ref.json")    # any spec JSON is a reference; this one is small, so the test is quick
    summary = run_search(tiny_config(tiny, tmp_path / "a", references=(ref_json,)))
    study = load_study("t", f"sqlite:///{tmp_path}/a/t.db")
    assert summary.trained == 2
    trained = [t for t in study.get_trials() if _is_search(t)]
    assert len(trained) == 2
    for t in trained:
        a = t.user_attrs
        assert set(a) >= {"spec", "family", "summary", "costs", "ccc", "train_seconds", "samples_per_second", "weights"}
        assert a["costs"]["params"] <= 3000 and a["costs"]["input_seconds"] == 1.0
        assert t.values[0] == pytest.approx(a["ccc"]["mean"])
        assert -1 <= a["ccc"]["mean"] <= 1
        assert set(load_trial_weights(study, t, stage="search")) == set(
            __import__("microser.models.spec", fromlist=["build_model"]).build_model(
                __import__("microser.models.spec", fromlist=["ArchSpec"]).ArchSpec.from_json(a["spec"])).state_dict())
    ref = [t for t in study.get_trials() if t.user_attrs.get("reference") == ref_json]
    assert len(ref) == 1 and ref[0].user_attrs["costs"]["params"] > 3000    # outside the budget, still trained
    assert final_record(study, ref[0])["ccc"]["mean"] == pytest.approx(summary.reference["final_ccc"]["mean"])
    assert [r["number"] for r in summary.rows if not r["reference"]] == [summary.best["number"]]
    # same seed, one worker, fixed threads: the same candidates get the same values
    run_search(tiny_config(tiny, tmp_path / "b", references=(ref_json,), final_k=0))
    assert _trained_values(f"sqlite:///{tmp_path}/b/t.db") == _trained_values(f"sqlite:///{tmp_path}/a/t.db")


def _is_search(t):
    return t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected") and not t.user_attrs.get("reference")


@pytest.mark.slow
def test_two_workers_on_one_storage_produce_distinct_complete_trials(tiny, tmp_path):
    url = f"journal:{tmp_path}/t.log"
    summary = run_search(tiny_config(tiny, tmp_path, storage=url, workers=2, trials=4, final_k=0, epochs=None, steps=60))
    study = load_study("t", url)
    trained = [t for t in study.get_trials() if _is_search(t)]
    assert summary.trained == len(trained) >= 4
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["worker"]["pid"] for t in trained}) == 2      # both processes trained trials
    specs = [t.user_attrs["spec"] for t in trained]
    assert len(set(specs)) == len(specs)                                    # distinct candidates


@pytest.mark.slow
def test_resume_after_a_real_kill_mid_trial(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    config = tmp_path / "study.toml"
    config.write_text(f'study = "t"\ncache = "{tiny / "cache"}"\nspace = "{tiny / "space.toml"}"\n'
                      f'budgets = ["3k-params"]\ntrials = 2\nsteps = 150\nbatch_size = 8\ncrop_seconds = 0.5\n'
                      f'final_k = 0\nreferences = []\nthreads = 1\nseed = 5\n')
    command = [sys.executable, "-m", "microser.cli", "search", "--config", str(config)]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    url = f"sqlite:///{tmp_path}/studies/t.db"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:      # wait until a trial is training, then kill -9
            try:
                running = [t for t in load_study("t", url).get_trials()
                           if t.state == TrialState.RUNNING and t.user_attrs.get("stage") == "training"]
            except MicroserError:   # the database or the study is not created yet
                running = []
            if running:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no trial started training within 120 s: " + (proc.stdout.read() if proc.poll() else ""))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = running[0].number
    assert load_study("t", url).trials[killed].state == TrialState.RUNNING
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    study = load_study("t", url)
    assert not [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    assert len([t for t in study.get_trials() if _is_search(t)]) == 2
    dead = study.trials[killed]
    assert dead.state == TrialState.FAIL and "stopped while the trial was running" in dead.user_attrs["fail_reason"]
    retried = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == killed]
    assert retried and retried[0].params == dead.params


def test_studies_demo_toml_spells_out_the_defaults():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "studies" / "demo.toml"
    config, default = SearchConfig.load(path), SearchConfig()
    for key in ("objectives", "trials", "sampler", "seed", "workers", "epochs", "crop_seconds", "crops_per_segment",
                "batch_size", "input_seconds", "final_k", "final_epochs", "references"):
        assert getattr(config, key) == getattr(default, key), key
    assert config.budgets == ("80k-params",)


def test_warm_starts_of_the_space_are_the_first_trials_of_a_new_study(tmp_path):
    class WarmSpace(FakeSpace):
        warm_starts = ({"width": 7}, {"width": 12})

    trainer = FakeTrainer()
    components = fake_components(trainer)
    components.space = WarmSpace()
    run_search(fake_config(tmp_path, trials=4, final_k=0), components=components)
    study = load_study("s", f"sqlite:///{tmp_path}/s.db")
    searched = [t for t in study.get_trials() if not t.user_attrs.get("reference")]
    assert [t.params["width"] for t in searched[:2]] == [7, 12]
    # resuming the same study does not enqueue them again
    run_search(fake_config(tmp_path, trials=5, final_k=0), components=components)
    enqueued = [t.params["width"] for t in load_study("s", f"sqlite:///{tmp_path}/s.db").get_trials()
                if "fixed_params" in t.system_attrs]
    assert enqueued == [7, 12]


def test_a_search_fidelity_of_few_optimizer_steps_is_warned_about():
    from microser.search import _few_steps_warning

    class Data:
        def __init__(self, n):
            self.n = n

        def split_indices(self, split):
            return list(range(self.n))

    # 480 training segments, 1 crop each, batch 16: 30 steps per epoch (espeak-emo)
    warning = _few_steps_warning(SearchConfig(epochs=1.0, batch_size=16), Data(480))
    assert "30 optimizer steps per trial (480 training segments, batch 16)" in warning
    assert "--steps 200" in warning
    assert _few_steps_warning(SearchConfig(epochs=4.0, batch_size=16), Data(480)) == ""   # 120 steps
    assert _few_steps_warning(SearchConfig(epochs=None, steps=150), Data(480)) == ""
    assert _few_steps_warning(SearchConfig(epochs=1.0), object()) == ""                  # no split info: no claim
