"""Storage URLs (one contract for every kind), stale-trial recovery after a real kill, weights artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import optuna
import pytest
import torch
from optuna.trial import TrialState

from microser.errors import MicroserError
from microser.pareto import trial_row
from microser.rungs import (FINAL, TRAINED_PREFIX, WEIGHT_STAGES as STAGES, Job, RungQueue, final_record,
                            load_trial_weights, trained_record, weights_stage)
from microser.storage import (SETTINGS_ATTR, artifact_store, fail_dead_trials, load_study, open_storage, save_weights,
                              worker_tag)
from microser.urls import default_artifacts_dir

pytestmark = pytest.mark.filterwarnings("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(params=["sqlite", "journal"])
def url(request, tmp_path):
    return {"sqlite": f"sqlite:///{tmp_path}/sub/s.db", "journal": f"journal:{tmp_path}/sub/s.log"}[request.param]


def test_every_file_storage_creates_reopens_and_lists(url):
    study = optuna.create_study(study_name="a", storage=open_storage(url, "a"), directions=["maximize", "minimize"])
    study.tell(study.ask(), [0.5, 3.0])
    again = load_study("a", url)
    assert [t.values for t in again.trials] == [[0.5, 3.0]]
    with pytest.raises(MicroserError, match=r"study 'b' is not in .*it holds: a\)"):
        load_study("b", url)


def test_missing_storage_file_and_bad_url_are_one_line_errors(tmp_path):
    with pytest.raises(MicroserError, match="does not exist"):
        load_study("a", f"sqlite:///{tmp_path}/none.db")
    with pytest.raises(MicroserError, match="not understood.*sqlite:///FILE.db"):
        open_storage("studies/a.db", "a")


def test_refused_connection_names_the_url_in_one_line():
    with pytest.raises(MicroserError) as e:
        open_storage("postgresql://u:secret@127.0.0.1:1/x", "a")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("storage 'postgresql://u:***@127.0.0.1:1/x' ")
    assert "secret" not in message


def test_default_artifacts_folder_sits_beside_the_study(tmp_path):
    assert default_artifacts_dir(None, "s") == default_artifacts_dir("sqlite:///studies/s.db", "s")
    assert str(default_artifacts_dir(None, "s")) == os.path.join("studies", "s-artifacts")
    assert default_artifacts_dir(f"journal:{tmp_path}/j.log", "s") == tmp_path / "s-artifacts"


def _study_with_weights(url, tmp_path):
    study = optuna.create_study(study_name="w", storage=open_storage(url, "w"), directions=["maximize"])
    study.set_user_attr(SETTINGS_ATTR, {"artifacts": str(tmp_path / "art")})
    store = artifact_store(tmp_path / "art")
    trial = study.ask()
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    trial.set_user_attr("weights", save_weights(state, store=store, study_or_trial=trial, name="t0"))
    study.tell(trial, 0.5)
    return study, state, store


def test_weights_round_trip_and_final_stage_record(url, tmp_path):
    study, state, store = _study_with_weights(url, tmp_path)
    loaded = load_trial_weights(study, 0, stage="search")
    assert torch.equal(loaded["w"], state["w"])
    assert final_record(study, 0) is None
    assert torch.equal(load_trial_weights(study, 0)["w"], state["w"])   # no final stage yet: search weights
    final = {"w": -state["w"]}
    study.set_user_attr("final:0", {"ccc": {"mean": 0.7},      # a study from before rungs: one seed
                                    "weights": save_weights(final, store=store, study_or_trial=study, name="f0")})
    assert final_record(study, 0)["ccc"] == {"mean": 0.7}
    assert torch.equal(load_trial_weights(study, 0, stage="final")["w"], final["w"])
    assert torch.equal(load_trial_weights(study, 0, stage="search")["w"], state["w"])
    # the final stage now: one evaluation per seed in the companion study; its weights are the first seed's
    queue = RungQueue(study)
    for seed, (ccc, w) in enumerate(((0.6, 2 * state["w"]), (0.8, 3 * state["w"]))):
        job = Job(of=0, rung=FINAL, steps=1000, seed=seed, fold=seed)
        queue.enqueue(job)
        claim = queue.claim()
        with claim:
            queue.finish(claim, {"ccc": {"mean": ccc}, "test_ccc": {"mean": ccc - 0.1},
                                 "weights": save_weights({"w": w}, store=store, study_or_trial=study,
                                                         name=f"s{seed}")})
    record = final_record(study, 0)
    assert record["ccc"]["mean"] == pytest.approx(0.7) and record["ccc_std"]["mean"] == pytest.approx(0.1)
    assert record["test_ccc"]["mean"] == pytest.approx(0.6) and [s["fold"] for s in record["seeds"]] == [0, 1]
    assert torch.equal(load_trial_weights(study, 0, stage="final")["w"], 2 * state["w"])


def test_weight_stages_load_in_the_order_trained_final_search(url, tmp_path):
    study, state, store = _study_with_weights(url, tmp_path)
    assert [weights_stage(study, 0, s) for s in STAGES] == ["search", "search", "search"]
    final, trained = {"w": state["w"] + 1}, {"w": state["w"] + 2}
    study.set_user_attr("final:0", {"weights": save_weights(final, store=store, study_or_trial=study, name="f")})
    assert [weights_stage(study, 0, s) for s in STAGES] == ["final", "final", "search"]
    study.set_user_attr(f"{TRAINED_PREFIX}0", {"spec": "{}", "ccc": {"mean": 0.8},
                                               "weights": save_weights(trained, store=store, study_or_trial=study,
                                                                       name="t")})
    assert [weights_stage(study, 0, s) for s in STAGES] == ["trained", "final", "search"]
    assert trained_record(study, 0)["ccc"] == {"mean": 0.8}
    for stage, expected in zip(STAGES, (trained, final, state)):
        assert torch.equal(load_trial_weights(study, 0, stage)["w"], expected["w"]), stage
    assert torch.equal(load_trial_weights(study, 0)["w"], trained["w"])   # the default: the most trained
    with pytest.raises(MicroserError, match="weights stage 'best' is not known: expected one of trained, final, "
                                            "search"):
        weights_stage(study, 0, "best")


def test_deleted_or_changed_weights_are_clear_errors(tmp_path):
    study, _, _ = _study_with_weights(f"sqlite:///{tmp_path}/s.db", tmp_path)
    path = tmp_path / "art" / study.trials[0].user_attrs["weights"]["artifact_id"]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(MicroserError, match="trial 0 .* have sha256 .* changed"):
        load_trial_weights(study, 0)
    path.unlink()
    with pytest.raises(MicroserError, match=f"weights of trial 0 .* missing: {path} was deleted"):
        load_trial_weights(study, 0)


def test_trial_of_a_killed_process_is_failed_with_a_reason_and_requeued(url):
    script = textwrap.dedent(f"""
        import optuna, time, warnings
        warnings.simplefilter("ignore")
        from microser.storage import open_storage, worker_tag
        study = optuna.create_study(study_name="k", storage=open_storage({url!r}, "k"), load_if_exists=True)
        trial = study.ask()
        trial.suggest_int("width", 4, 64)
        trial.set_user_attr("worker", worker_tag())
        print("running", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        study = load_study("k", url)
        assert fail_dead_trials(study) == []            # alive: left alone
        assert trial_row(study.get_trials()[0], "search", {}).state == "RUNNING"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    study = load_study("k", url)
    # `microser trials` / `pareto` (which never write) tell a trial whose worker is gone from a live one
    assert trial_row(study.get_trials()[0], "search", {}).state == "RUNNING (worker gone)"
    assert fail_dead_trials(study) == [0]
    first, retry = study.get_trials()
    assert first.state == TrialState.FAIL
    assert f"worker {worker_tag()['host']}:{proc.pid} stopped" in first.user_attrs["fail_reason"]
    assert retry.state == TrialState.WAITING
    assert retry.user_attrs["retry_of"] == 0
    assert retry.system_attrs["fixed_params"] == first.params


def test_sqlite_transactions_take_the_write_lock_when_they_begin(tmp_path):
    """Optuna's WAITING -> RUNNING check reads, then writes: on SQLite that is one step only if the
    transaction holds the write lock from its start; else two workers pop the same waiting trial."""
    import sqlite3

    storage = open_storage(f"sqlite:///{tmp_path}/s.db", "s")
    with storage.engine.connect() as conn:
        with conn.begin():
            conn.exec_driver_sql("SELECT count(*) FROM trials")   # a read only, yet the lock is held
            other = sqlite3.connect(tmp_path / "s.db", timeout=0.1, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")   # released at commit
    other.execute("ROLLBACK")
    other.close()
