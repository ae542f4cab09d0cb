"""Search orchestration: budgets reject before training, counting, resume, refusal, final stage; then real searches."""

from __future__ import annotations

import time

import pytest
import torch
from optuna.trial import TrialState

from microser import TARGETS
from microser.errors import MicroserError
from microser.fidelity import CALIBRATION_STEP_SECONDS, final_share_steps, machine_speed, plan_steps, plans_from_time
from microser.final import choose_pick, compare, separated
from microser.pareto import is_candidate
from microser.rungs import Evaluations, RungQueue, final_record, load_trial_weights
from microser.search import run_search
from microser.search_config import REJECTED_CCC, SearchConfig
from microser.storage import SETTINGS_ATTR, load_study
from search_fakes import FakeClock, FakeSpace, FakeTrainer, fake_ccc, fake_components, fake_config

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- fake components (tests/search_fakes.py): costs and CCC known in closed form ----


def _study(tmp_path):
    return load_study("s", f"sqlite:///{tmp_path}/s.db")


def _rung_calls(trainer, steps):
    return [c for c in trainer.calls if c[1] == steps]


def test_over_budget_candidates_are_recorded_and_never_trained(tmp_path):
    trainer = FakeTrainer()
    summary = run_search(fake_config(tmp_path), components=fake_components(trainer))
    trials = _study(tmp_path).get_trials()
    first_rung = [c[0] for c in _rung_calls(trainer, 10)]
    rejected = [t for t in trials if t.user_attrs.get("rejected")]
    trained = [t for t in trials if is_candidate(t)]
    # the reference (width 10) trains once at the first rung; every other trained width fits the budget
    assert sorted(first_rung) == sorted([10] + [t.params["width"] for t in trained])
    assert all(t.params["width"] <= 20 for t in trained)
    assert len(trained) == 9 and summary.trained == 9
    assert summary.rejected == len(rejected) > 0     # width is uniform in 1..64: most draws are over budget
    for t in rejected:
        w = t.params["width"]
        assert t.state == TrialState.COMPLETE
        assert t.values == [REJECTED_CCC, 1000.0 * w, 100.0 * w]
        assert t.constraints == {"params": 1000.0 * w - 20_000}
        assert t.user_attrs["rejected"] == f"over budget: params {1000 * w} > 20000"
        assert "weights" not in t.user_attrs
    for t in trained:
        w = t.params["width"]
        assert t.values == pytest.approx([fake_ccc(w, 10), 1000.0 * w, 100.0 * w])
        assert t.constraints["params"] <= 0 and t.user_attrs["steps"] == 10


def test_candidates_climb_the_rungs_by_successive_halving_each_once(tmp_path):
    trainer = FakeTrainer()
    summary = run_search(fake_config(tmp_path, final_k=0, references=()), components=fake_components(trainer))
    study = _study(tmp_path)
    width = {t.number: t.params["width"] for t in study.get_trials() if is_candidate(t)}
    ev = Evaluations(study)
    at = [set(width)] + [{n for n in width if k in ev.rungs(n)} for k in (1, 2)]
    assert summary.rungs == [len(x) for x in at] == [9, *summary.rungs[1:]]
    # ASHA: the best 1/3 of a rung (by non-dominated sorting; here CCC and cost both grow with width, so all
    # are on the front and CCC decides) is always among those promoted; earlier promotions stay
    for k in (0, 1):
        top = sorted(at[k], key=lambda n: (-width[n], n))[:len(at[k]) // 3]
        assert set(top) <= at[k + 1] and at[k + 1] <= at[k]
    assert len(at[1]) >= 3 and len(at[2]) >= 1
    # every promotion trained once, at its rung's steps, with the CCC of that fidelity
    assert len(_rung_calls(trainer, 30)) == len(at[1]) and len(_rung_calls(trainer, 90)) == len(at[2])
    for k, steps in ((1, 30), (2, 90)):
        for n in at[k]:
            assert ev.rungs(n)[k]["ccc"]["mean"] == pytest.approx(fake_ccc(width[n], steps))
    assert not [t for t in RungQueue(study).trials() if t.state != TrialState.COMPLETE]


def test_final_stage_trains_finalists_and_references_with_seeds_on_rotating_speaker_folds(tmp_path, capsys):
    # test CCC: the pick gains 0.04 on fold 1 over fold 0, the reference (width 10) does not: spread 0.02
    trainer = FakeTrainer(test_offset=lambda w, fold: 0.04 * fold if w != 10 else 0.0)
    summary = run_search(fake_config(tmp_path), components=fake_components(trainer))
    study = _study(tmp_path)
    finals = [c for c in trainer.calls if c[1] == 200]
    assert len(finals) == 3 * 2                     # final_k = 2 candidates + 1 reference, 2 seeds each
    assert all(has_test for *_, has_test in finals)
    assert sorted(fold for *_, fold, _ in finals) == [0, 0, 0, 1, 1, 1]   # one speaker fold per seed
    assert len({seed for _, _, seed, _, _ in finals}) == 6              # every run its own seed
    search_seeds = {seed for w, steps, seed, *_ in trainer.calls if steps != 200}
    assert not search_seeds & {seed for _, _, seed, _, _ in finals}
    width = {t.number: t.params["width"] for t in study.get_trials() if is_candidate(t)}
    best_two = sorted(width, key=lambda n: -width[n])[:2]            # the two widest reached the top rung
    assert [r["number"] for r in summary.rows if not r["reference"]] == best_two
    pick = summary.pick
    assert pick["number"] == best_two[0]
    assert pick["final_ccc"]["mean"] == pytest.approx(fake_ccc(width[best_two[0]], 200))
    assert pick["test_ccc_std"]["mean"] == pytest.approx(0.02)      # (x, x + 0.04): population std 0.02
    record = final_record(study, pick["number"])
    assert [s["fold"] for s in record["seeds"]] == [0, 1] and record["steps"] == 200
    assert torch.equal(load_trial_weights(study, pick["number"])["w"], torch.full((2,), float(width[pick["number"]])))
    gap = fake_ccc(width[best_two[0]], 200) - fake_ccc(10, 200)
    assert summary.margin["per_seed"] == pytest.approx([gap, gap + 0.04])
    assert summary.margin["mean"] == pytest.approx(gap + 0.02) and summary.margin["spread"] == pytest.approx(0.02)
    assert summary.margin["verdict"] == "beats"
    # the summary table shows every finalist's CCC at each rung it reached (the pick reached the top rung)
    assert summary.rows[0]["rungs"][2]["mean"] == pytest.approx(fake_ccc(width[best_two[0]], 90))
    from microser import show

    show.search_summary(summary)
    shown = capsys.readouterr().out
    assert f"{fake_ccc(width[best_two[0]], 90):.3f}" in shown and "beats" in shown
    # at 80 columns (pytest's console) the numbers stay whole in the table, the architectures are listed below
    assert f"{pick['test_ccc']['mean']:.3f} ±" in shown and f"trial {pick['number']}: " in shown
    assert max(len(line) for line in shown.splitlines()) <= 80
    # where the test CCC goes: the parts averaged over the two seeds (folds), and the offset named
    assert pick["test_parts"]["bias"]["arousal"] == pytest.approx(-0.55)
    assert pick["test_parts"]["r"] == pytest.approx({"arousal": 0.9, "dominance": 0.9, "valence": 0.9})
    assert summary.reference["test_parts"]["scale"]["valence"] == pytest.approx(0.8)
    flat = " ".join(shown.split())
    assert f"pick (trial {pick['number']}): aro r 0.90 b -0.55 s 0.80, dom r 0.90 b +0.10 s 0.80" in flat
    assert "on arousal with r 0.90 but its predictions sit -0.55 target SDs off" in flat


def test_verdict_needs_the_margin_above_its_spread():
    def row(*tests):
        return {"seeds": [{"seed": i, "test_ccc": {"mean": t}} for i, t in enumerate(tests)]}

    won = compare(row(.50, .54), row(.40, .46))
    assert won["per_seed"] == pytest.approx([.10, .08]) and won["verdict"] == "beats"
    assert (won["mean"], won["spread"]) == pytest.approx((.09, .01))
    assert compare(row(.50, .44), row(.45, .45))["verdict"] == "ties"          # +.02 +- .03
    assert compare(row(.30, .32), row(.45, .45))["verdict"] == "trails"
    assert compare(row(.50), row())  is None                                   # no pair: no claim


def test_pick_is_the_fewest_params_finalist_that_validation_cannot_separate_from_the_best():
    def row(number, params, ram, *valid):
        return {"number": number, "costs": {"params": params, "ram_bytes": ram},
                "final_ccc": {"mean": sum(valid) / len(valid)},
                "seeds": [{"seed": i, "ccc": {"mean": v}} for i, v in enumerate(valid)]}

    best, small = row(1, 60_000, 150_000, .44, .40), row(2, 5_000, 150_000, .30, .20)
    assert choose_pick([best, small]) == (best, [1])     # behind on both folds: separated, size does not count
    level = row(3, 9_000, 150_000, .30, .45)              # behind on fold 0, ahead on fold 1: mean .045 <= spread .095
    assert choose_pick([best, small, level]) == (level, [1, 3])
    assert separated(best, small) and not separated(best, level)
    # of the tied, those within the reference's int8 RAM come first, then the fewest parameters
    greedy = row(4, 3_000, 1_100_000, .31, .46)          # fewest params, but twice the reference's RAM
    assert choose_pick([best, level, greedy]) == (greedy, [1, 3, 4])
    assert choose_pick([best, level, greedy], ram_ceiling=549_250) == (level, [1, 3, 4])
    assert choose_pick([greedy], ram_ceiling=549_250) == (greedy, [4])       # nothing within: the best there is
    twin = row(5, 9_000, 150_000, .42, .44)              # tied at equal params: the better validation wins
    assert choose_pick([twin, row(6, 9_000, 100_000, .45, .39)]) == (twin, [5, 6])
    assert choose_pick([]) == (None, [])


def test_search_picks_the_fewest_params_finalist_when_the_folds_disagree_and_says_so(tmp_path):
    # fold 1 reverses the ranking (narrower validates higher there), fold 0 keeps it: the widest finalist has
    # the best mean validation, but the other leads it on fold 1, so they tie and the narrower (fewer params) ships
    trainer = FakeTrainer(valid_offset=lambda w, fold: 0.015 * (100 - w) * fold)
    summary = run_search(fake_config(tmp_path), components=fake_components(trainer))
    finalists = [r for r in summary.rows if not r["reference"]]
    widest, other = sorted(finalists, key=lambda r: -r["costs"]["params"])
    assert widest["final_ccc"]["mean"] > other["final_ccc"]["mean"]
    assert summary.pick["number"] == other["number"]
    tied = ", ".join(map(str, sorted(r["number"] for r in finalists)))
    assert any(f"cannot separate trials {tied}" in note and f"trial {other['number']}, is the one of them with the "
               "fewest parameters" in note for note in summary.notes)


def test_resume_continues_to_n_candidates_and_never_trains_a_job_twice(tmp_path):
    trainer = FakeTrainer()
    run_search(fake_config(tmp_path, trials=3), components=fake_components(trainer))
    first = list(trainer.calls)
    summary = run_search(fake_config(tmp_path, trials=5), components=fake_components(trainer))
    assert summary.trained == 5
    assert len(_rung_calls(trainer, 10)) == 3 + 1 + 2         # 3 + reference, then 2 new; the reference kept
    again = list(trainer.calls)
    run_search(fake_config(tmp_path, trials=5), components=fake_components(trainer))
    assert trainer.calls == again                              # search and final stage done: nothing to train
    keys = [t.user_attrs["key"] for t in RungQueue(_study(tmp_path)).trials(states=(TrialState.COMPLETE,))]
    assert len(keys) == len(set(keys))
    assert len(first) < len(again)


def test_impossible_budget_is_said_before_training_anything(tmp_path):
    trainer = FakeTrainer()
    with pytest.raises(MicroserError, match=r"budget 500-params looks impossible: none of \d+ candidates .* "
                                            r"\(smallest seen: params \d+000\)"):
        run_search(fake_config(tmp_path, budgets=("500-params",)), components=fake_components(trainer))
    assert trainer.calls == []


def test_existing_study_with_other_objectives_budgets_or_fidelity_is_refused(tmp_path):
    run_search(fake_config(tmp_path, trials=1, final_k=0, references=()), components=fake_components(FakeTrainer()))
    with pytest.raises(MicroserError, match="created with objectives params,ram_bytes, this run asks for "
                                            "params,onnx_bytes"):
        run_search(fake_config(tmp_path, objectives=("params", "onnx_bytes")), components=fake_components(FakeTrainer()))
    with pytest.raises(MicroserError, match="created with budgets 20k-params, this run asks for 30k-params"):
        run_search(fake_config(tmp_path, budgets=("30k-params",)), components=fake_components(FakeTrainer()))
    with pytest.raises(MicroserError, match="created with fidelity .*rungs=10,30,90.*this run asks for .*rungs=10,40"):
        run_search(fake_config(tmp_path, rungs=(10, 40)), components=fake_components(FakeTrainer()))


def test_plan_scales_with_the_measured_machine_speed():
    # slower: speed^1.5 of the steps (slower still beside the steps); faster: as more time
    assert plan_steps(600, 0.5) == ((60, 210), 350)
    assert plan_steps(600, 2.0) == plan_steps(1200)
    for seconds in (60, 150, 300, 600, 900, 3600, 36000):
        for speed in (0.1, 0.3, 0.56, 1.0, 3.0, 30.0):
            rungs, final = plan_steps(seconds, speed)
            assert rungs[0] == 60 and final >= rungs[-1]          # the final stage never below the top rung
            assert all(b >= 1.5 * a for a, b in zip(rungs, rungs[1:])), rungs   # no near-duplicate rungs
    # timing noise within the dead band plans as calibrated; a machine half as fast plans like half the time
    assert machine_speed(CALIBRATION_STEP_SECONDS * 1.2) == machine_speed(CALIBRATION_STEP_SECONDS / 1.2) == 1.0
    assert machine_speed(CALIBRATION_STEP_SECONDS * 2) == 0.5
    assert machine_speed(CALIBRATION_STEP_SECONDS * 4, workers=2) == 0.5     # two workers, each 4x slower
    assert machine_speed(CALIBRATION_STEP_SECONDS * 100) == 0.1 and machine_speed(1e-6) == 30.0   # clamped
    with pytest.raises(ValueError, match="step_seconds must be positive, got 0"):
        machine_speed(0.0)
    assert plans_from_time(SearchConfig()) and not plans_from_time(SearchConfig(time=None, trials=5))
    assert not plans_from_time(SearchConfig(rungs=(60,), final_steps=100))   # nothing left to plan
    assert plans_from_time(SearchConfig(rungs=(60,)))                         # the final stage still is


def test_the_top_rung_is_under_what_the_final_stage_can_train_in_its_share_of_the_time():
    # 0.9 x 0.5 x 600 s over 2 seeds x 0.15 s per probe step x (1 reference + 0.5 for the finalists): 600 steps
    assert final_share_steps(600, 0.15, workers=1, seeds=2, references=1) == 600
    assert final_share_steps(600, 0.15, workers=2, seeds=2, references=1) == 1200    # two jobs at a time
    assert final_share_steps(600, 0.15, workers=1, seeds=2, references=0) == 1800    # finalists only
    # no final stage (no references, --final-k 0): no share, the top rung stays 0.6 of the planned final stage
    assert final_share_steps(600, 0.15, workers=1, seeds=2, references=0, finalists=0) is None
    # six seats: 270 / (2 x 0.15 x (1 + 6 x 1/6)) = 450
    assert final_share_steps(600, 0.15, workers=1, seeds=2, references=1, finalists=6) == 450
    assert plan_steps(600, 1.0, 600) == ((60, 200, 360), 1000)    # the final stage keeps its 1,000 when time allows
    assert plan_steps(600, 1.0, 5000) == plan_steps(600, 1.0) == ((60, 200, 600), 1000)   # never above 0.6 x final
    assert plan_steps(600, 1.0, 10) == ((60,), 1000)              # never below the first rung
    assert plan_steps(600, 1.0, 0) == ((60,), 1000)               # a share of 0 steps is a share, not none
    for share in (50, 300, 555, 800, 2000):
        rungs, final = plan_steps(600, 1.0, share)
        assert rungs[-1] <= max(60, 0.6 * share + 5) and all(b >= 1.5 * a for a, b in zip(rungs, rungs[1:]))
    with pytest.raises(ValueError, match="step_seconds must be positive, got 0"):
        final_share_steps(600, 0.0, 1, 2, 1)


def test_a_slow_machine_gets_a_lower_plan_and_a_resume_keeps_it(tmp_path):
    def start_line(events):
        return next(e.message for e in events if e.kind == "start")

    events = []
    slow = fake_components(FakeTrainer(), step_seconds=2 * CALIBRATION_STEP_SECONDS)
    config = fake_config(tmp_path, trials=3, time=600.0, rungs=None, final_steps=None)
    summary = run_search(config, components=slow, progress=events.append)
    # final: 0.5^1.5 of the calibrated steps. Top rung: the final stage's share, 0.9 x 300 s, trains
    # 270 / (2 seeds x 0.324 s x (1 reference + 2 finalists x 1/6)) = 312 steps at the probe's speed; 0.6 x 312
    # is 190, within 1.5x of the 200-step rung, which stays the top one
    assert summary.settings["fidelity"]["rungs"] == [60, 200]
    assert summary.settings["fidelity"]["final_steps"] == 350
    assert summary.settings["time_plan"] == {"step_seconds": round(2 * CALIBRATION_STEP_SECONDS, 4),
                                             "calibration_step_seconds": CALIBRATION_STEP_SECONDS, "workers": 1,
                                             "speed": 0.5, "final_share_steps": 312}
    assert "rungs 60, 200 steps, final 350 steps x 2 seeds; planned for 0.5x the calibration machine's " \
           "speed (probe 0.324 s per step, calibration 0.162), top rung 0.6 of the 312 final-stage steps its " \
           "share of the time trains at the probe's speed" in start_line(events)
    # resumed on a fast machine: the study keeps the plan it was created with (no probe, no identity error)
    probed = []
    fast = fake_components(FakeTrainer())
    fast.step_seconds = lambda data, cfg: probed.append(cfg) or CALIBRATION_STEP_SECONDS / 4
    again = run_search(config, components=fast)
    assert not probed and again.settings["fidelity"] == summary.settings["fidelity"]
    # at the calibration speed the final stage is the calibrated one; the top rung is 0.6 of the
    # 270 / (2 x 0.162 x (1 + 2 x 1/6)) = 625 steps the final stage's share trains, not 0.6 of its 1,000
    calibrated = run_search(fake_config(tmp_path / "c", trials=3, time=600.0, rungs=None, final_steps=None),
                            components=fake_components(FakeTrainer()))
    assert calibrated.settings["fidelity"]["rungs"] == [60, 200, 380]
    assert calibrated.settings["fidelity"]["final_steps"] == 1000
    # a study made before the top rung followed the final stage's share (no "final_share_steps" in its plan)
    # resumes with the rungs it was made with: 0.6 of its final stage
    study = load_study("s", f"sqlite:///{tmp_path}/c/s.db")
    made = study.user_attrs[SETTINGS_ATTR]
    study.set_user_attr(SETTINGS_ATTR, {**made, "fidelity": {**made["fidelity"], "rungs": [60, 200, 600]},
                                        "time_plan": {k: v for k, v in made["time_plan"].items()
                                                      if k != "final_share_steps"}})
    resumed = run_search(fake_config(tmp_path / "c", trials=3, time=600.0, rungs=None, final_steps=None),
                         components=fake_components(FakeTrainer()))
    assert resumed.settings["fidelity"]["rungs"] == [60, 200, 600]


def test_time_budget_plans_the_fidelity_and_leaves_room_for_the_final_stage(tmp_path):
    assert plan_steps(600) == ((60, 200, 600), 1000)
    rungs, final = plan_steps(3600)
    assert rungs[0] == 60 and rungs[-1] > 600 and final > 1000
    assert plan_steps(120)[1] < 1000
    # on a fake clock, each run takes 0.5 s plus 0.05 s per step: a final stage of 3 trials x 2 seeds x 200 steps
    # (63 s). With 150 s the search stops drawing in time for all of it; with 90 s it keeps half the budget
    # (FINAL_TIME_SHARE) and the final stage trains fewer steps, as many as fit
    for budget in (150.0, 90.0):
        clock = FakeClock()
        trainer = FakeTrainer(clock=clock, step_seconds=0.05, overhead=0.5)
        components = fake_components(trainer)
        components.clock = clock
        start = clock()
        summary = run_search(fake_config(tmp_path / str(budget), trials=None, time=budget, budgets=("64k-params",)),
                             components=components)
        took = clock() - start
        final_steps = {c[1] for c in trainer.calls[-6:]}
        assert len(final_steps) == 1 and len([c for c in trainer.calls if c[1] in final_steps]) >= 6
        if budget == 150.0:
            assert 160 <= final_steps.pop() <= 200          # about as planned (estimates are conservative, 10 % kept)
        else:
            assert 10 <= final_steps.pop() < 200              # fewer, never below the first rung
        assert summary.settings["fidelity"]["final_steps"] == trainer.calls[-1][1]   # the summary says which
        assert budget - 10 < took <= budget, took             # used the budget, and did not overrun it
        assert summary.trained >= 6 and summary.rungs[1] >= 2


def test_the_time_budget_counts_from_when_the_command_began(tmp_path, monkeypatch):
    # the command's own imports (torch, optuna: seconds) come before run_search; --time is the whole command's
    clock = FakeClock()
    trainer = FakeTrainer(clock=clock, step_seconds=0.05, overhead=0.5)
    components = fake_components(trainer)
    components.clock = clock
    began = clock() - 30.0
    run_search(fake_config(tmp_path, trials=None, time=150.0, budgets=("64k-params",)), components=components,
               started=began)
    assert 150.0 - 10 < clock() - began <= 150.0, clock() - began

    # and the command line passes the moment it began (before it imports torch), not the moment the search starts
    from microser import cli

    seen = {}

    def fake_run_search(config, *, progress=None, components=None, started=None):
        seen["started"] = started
        raise MicroserError("stopped by the test")

    monkeypatch.setattr("microser.search.run_search", fake_run_search)
    before = time.monotonic()
    with pytest.raises(SystemExit):
        cli.main(["search", "--budget", "80k-params", "--cache", str(tmp_path / "none")])
    assert before <= seen["started"] <= time.monotonic()


def test_config_file_keys_match_the_cli_and_flags_override(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('budgets = ["80k-params"]\ntrials = 7\nfinal-steps = 900\nobjectives = "params,macs"\n'
                    'rungs = "50,150"\n')
    config = SearchConfig.load(path, trials=9, seed=None)
    assert (config.budgets, config.trials, config.final_steps, config.objectives, config.rungs) == (
        ("80k-params",), 9, 900, ("params", "macs"), (50, 150))
    assert config.time is None                      # trials alone: no default wall-clock cut
    assert SearchConfig.load(None, time="1h30m").time == 5400.0
    assert config.study_name == "search-80k-params"
    (tmp_path / "bad.toml").write_text("trails = 3\n")
    with pytest.raises(MicroserError, match="key\\(s\\) trails not known"):
        SearchConfig.load(tmp_path / "bad.toml")
    with pytest.raises(MicroserError, match="rungs=\\[200, 60\\]: expected increasing step counts"):
        SearchConfig(rungs=(200, 60))
    with pytest.raises(MicroserError, match="time 'ten minutes' is not understood"):
        SearchConfig.load(None, time="ten minutes")


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
                budgets=("3k-params",), trials=2, time=None, rungs=(20,), batch_size=8, crop_seconds=0.5,
                final_k=1, final_steps=30, final_seeds=2, references=(), threads=1, seed=5)
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
        assert set(a) >= {"spec", "family", "summary", "costs", "ccc", "train_seconds", "samples_per_second", "weights",
                          "steps"}
        assert a["costs"]["params"] <= 3000 and a["costs"]["input_seconds"] == 1.0
        assert t.values[0] == pytest.approx(a["ccc"]["mean"])
        assert -1 <= a["ccc"]["mean"] <= 1
        assert set(load_trial_weights(study, t, stage="search")) == set(
            __import__("microser.models.spec", fromlist=["build_model"]).build_model(
                __import__("microser.models.spec", fromlist=["ArchSpec"]).ArchSpec.from_json(a["spec"])).state_dict())
    ref = [t for t in study.get_trials() if t.user_attrs.get("reference") == ref_json]
    assert len(ref) == 1 and ref[0].user_attrs["costs"]["params"] > 3000    # outside the budget, still trained
    assert final_record(study, ref[0])["ccc"]["mean"] == pytest.approx(summary.reference["final_ccc"]["mean"])
    assert [r["number"] for r in summary.rows if not r["reference"]] == [summary.pick["number"]]
    assert len(summary.pick["seeds"]) == 2 and summary.margin is not None
    # each final-stage seed stores the parts of its test CCC, measured on the same predictions: they rebuild it
    checked = 0
    for seed in summary.pick["seeds"]:
        parts, test = seed["test_parts"], seed["test_ccc"]
        for t in TARGETS:
            if all(t in parts[p] for p in ("r", "bias", "scale")):
                r, b, s = parts["r"][t], parts["bias"][t], parts["scale"][t]
                assert 2 * r * s / (1 + s * s + b * b) == pytest.approx(test[t], abs=1e-9)
                checked += 1
    assert checked >= 1
    # same seed, one worker, fixed threads: the same candidates get the same values
    run_search(tiny_config(tiny, tmp_path / "b", references=(ref_json,), final_k=0))
    assert _trained_values(f"sqlite:///{tmp_path}/b/t.db") == _trained_values(f"sqlite:///{tmp_path}/a/t.db")


def _is_search(t):
    return t.state == TrialState.COMPLETE and not t.user_attrs.get("rejected") and not t.user_attrs.get("reference")


@pytest.mark.slow
def test_speed_probe_times_real_steps_of_the_probe_model(tiny):
    from microser.cache import Cache
    from microser.components import SPEED_PROBE_STEPS, probe_step_seconds
    from microser.train_config import TrainConfig

    threads = torch.get_num_threads()
    started = time.perf_counter()
    per_step = probe_step_seconds(Cache.open(tiny / "cache"), TrainConfig(steps=1, batch_size=8, crop_seconds=0.5,
                                                                          threads=1, seed=0))
    took = time.perf_counter() - started
    # a real median step of Wav2Small: positive, and the timed steps fit inside the probe's own wall time
    assert 0 < per_step and per_step * SPEED_PROBE_STEPS[1] < took
    assert torch.get_num_threads() == threads        # the probe's thread setting does not leak


@pytest.mark.slow
def test_two_workers_on_one_storage_produce_distinct_complete_trials(tiny, tmp_path):
    url = f"journal:{tmp_path}/t.log"
    summary = run_search(tiny_config(tiny, tmp_path, storage=url, workers=2, trials=4, final_k=0, rungs=(60,)))
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
                      f'budgets = ["3k-params"]\ntrials = 2\nrungs = [150]\nbatch_size = 8\ncrop_seconds = 0.5\n'
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
    for key in ("objectives", "time", "trials", "sampler", "seed", "workers", "rungs", "eta", "crop_seconds",
                "batch_size", "valid_seconds", "input_seconds", "final_k", "final_steps", "final_seeds", "folds",
                "references"):
        assert getattr(config, key) == getattr(default, key), key
    assert config.budgets == ("80k-params",)


def test_warm_starts_of_the_space_are_the_first_trials_of_a_new_study(tmp_path):
    class WarmSpace(FakeSpace):
        warm_starts = ({"width": 7}, {"width": 12})

    trainer = FakeTrainer()
    components = fake_components(trainer)
    components.space = WarmSpace()
    run_search(fake_config(tmp_path, trials=4, final_k=0, references=()), components=components)
    study = load_study("s", f"sqlite:///{tmp_path}/s.db")
    searched = [t for t in study.get_trials() if not t.user_attrs.get("reference")]
    assert [t.params["width"] for t in searched[:2]] == [7, 12]
    # resuming the same study does not enqueue them again
    run_search(fake_config(tmp_path, trials=5, final_k=0, references=()), components=components)
    enqueued = [t.params["width"] for t in load_study("s", f"sqlite:///{tmp_path}/s.db").get_trials()
                if "fixed_params" in t.system_attrs]
    assert enqueued == [7, 12]


def test_a_packaged_space_records_its_sha256_and_a_changed_one_refuses_the_resume(tmp_path, monkeypatch):
    import hashlib
    import shutil

    import microser.space as space_mod

    spaces = tmp_path / "spaces"                     # a copy of the packaged spaces, to change one of them
    shutil.copytree(space_mod.SPACES_DIR, spaces)
    monkeypatch.setattr(space_mod, "SPACES_DIR", spaces)
    config = fake_config(tmp_path, space="wav2small", trials=1, final_k=0, references=())
    run_search(config, components=fake_components(FakeTrainer()))
    settings = _study(tmp_path).user_attrs["config"]
    packaged = spaces / "wav2small.toml"
    assert settings["space"] == str(packaged)
    assert settings["space_sha256"] == hashlib.sha256(packaged.read_bytes()).hexdigest()
    run_search(config, components=fake_components(FakeTrainer()))        # the same file: the study resumes
    packaged.write_text(packaged.read_text().replace("[[warm_start]]", "# edited\n[[warm_start]]", 1))
    with pytest.raises(MicroserError, match=r"searched the space file .*wav2small\.toml with sha256 "
                                            r"\w{12}\.\.\.; that file has changed since .*restore it") as e:
        run_search(config, components=fake_components(FakeTrainer()))
    assert "\n" not in str(e.value)
