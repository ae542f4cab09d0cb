"""Successive halving: promotion rules by hand, the job queue's claim/dedupe contract, and several workers killed
between rungs with nothing lost and nothing trained twice."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import optuna
import pytest
from optuna.trial import TrialState

from microser.asha import Result, finalists, promotion_order, promotions
from microser.rungs import FINAL, Evaluations, Job, RungQueue
from microser.storage import fail_dead_trials, load_study, open_storage
from search_fakes import fake_ccc, run_fake_search

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- promotion rules (pure) ----


def test_promotion_order_is_pareto_rank_then_ccc():
    # (CCC, params): 0 and 1 and 3 are non-dominated; 2 is dominated by 1 (better CCC, fewer params)
    rs = [Result(0, .30, (10.,)), Result(1, .50, (20.,)), Result(2, .45, (25.,)), Result(3, .20, (5.,))]
    assert [r.trial for r in promotion_order(rs)] == [1, 0, 3, 2]


def test_asha_promotes_the_best_third_of_each_rung_once_and_highest_rung_first():
    r0 = [Result(n, .1 * n, (1.,)) for n in range(7)]        # equal costs: CCC alone decides
    assert promotions([r0, [], []], [set(), set(), set()], eta=3) == [(6, 1), (5, 1)]   # floor(7/3) = 2
    assert promotions([r0, [], []], [set(), {6}, set()], eta=3) == [(5, 1)]           # 6 already taken
    r1 = [Result(6, .9, (1.,)), Result(5, .8, (1.,)), Result(4, .7, (1.,))]
    # rung 1 full enough (3 // 3 = 1): its best goes to rung 2 before anything else
    assert promotions([r0, r1, []], [set(), {4, 5, 6}, set()], eta=3) == [(6, 2)]
    # collapsed or non-positive CCC never goes up
    bad = [Result(0, .9, (1.,), collapsed=True), Result(1, 0.0, (1.,)), Result(2, .2, (1.,))]
    assert promotions([bad, []], [set(), set()], eta=3) == [(2, 1)]
    with pytest.raises(ValueError, match="eta must be >= 2"):
        promotions([r0], [set()], eta=1)


def test_finalists_come_from_the_highest_rungs_first():
    r0 = [Result(n, .1 * n, (1.,)) for n in range(6)]
    r1 = [Result(5, .55, (1.,)), Result(4, .60, (1.,))]
    r2 = [Result(4, .62, (1.,))]
    assert finalists([r0, r1, r2], 3) == [4, 5, 3]
    assert finalists([r0, r1, r2], 1) == [4]
    # a trial that collapsed at its highest rung comes after every usable one; with nothing usable, the
    # best tried still come
    r2_collapsed = [Result(4, .62, (1.,), collapsed=True)]
    assert finalists([r0, r1, r2_collapsed], 2) == [5, 3]
    assert finalists([r0, r1, r2_collapsed], 6) == [5, 3, 2, 1, 4, 0]   # 0: CCC 0 at rung 0
    flat = [Result(n, -.01 * n, (1.,)) for n in range(3)]
    assert finalists([flat], 2) == [0, 1]


def test_finalist_seats_go_by_ccc_not_by_pareto_rank():
    # at the top rung, trial 7 is on the front because it is 7x cheaper, trial 8 is dominated by 9; the final
    # stage confirms the best models within the budget, so the two seats go to the two best CCCs
    top = [Result(7, .48, (4_000.,)), Result(8, .49, (40_000.,)), Result(9, .50, (30_000.,))]
    assert [r.trial for r in promotion_order(top)][:2] == [9, 7]     # what promotion would choose
    assert finalists([top, top], 2) == [9, 8]
    assert finalists([[Result(1, .5, (1.,)), Result(0, .5, (2.,))]], 2) == [0, 1]   # a tie: lower number first


# ---- the queue ----


def _queue(tmp_path, url=None):
    url = url or f"sqlite:///{tmp_path}/q.db"
    study = optuna.create_study(study_name="q", storage=open_storage(url, "q"), directions=["maximize"])
    return study, RungQueue(study)


def test_a_key_enqueued_twice_is_trained_once_and_claims_are_oldest_first(tmp_path):
    study, queue = _queue(tmp_path)
    a, b = Job(of=3, rung=1, steps=200), Job(of=4, rung=1, steps=200)
    queue.enqueue(a)
    queue.enqueue(b)
    queue.enqueue(a)                      # a second worker decided the same promotion
    first = queue.claim()
    assert first.job == a
    with first:
        queue.finish(first, {"ccc": {"mean": .5}})
    second = queue.claim()
    assert second.job == b                # the duplicate of `a` (enqueued last) was pruned on the way
    with second:
        queue.finish(second, {"ccc": {"mean": .4}})
    assert queue.claim() is None
    states = [(t.user_attrs["key"], t.state, t.user_attrs.get("duplicate_of")) for t in queue.trials()]
    assert states == [("3/1/0", TrialState.COMPLETE, None), ("4/1/0", TrialState.COMPLETE, None),
                      ("3/1/0", TrialState.PRUNED, first.trial.number)]
    assert queue.taken() == {"3/1/0": "COMPLETE", "4/1/0": "COMPLETE"}


def test_a_job_of_a_dead_worker_is_failed_queued_again_and_finished_once(tmp_path):
    study, queue = _queue(tmp_path, f"journal:{tmp_path}/q.log")   # no heartbeats: failed by pid
    queue.enqueue(Job(of=1, rung=FINAL, steps=500, seed=1, fold=1))
    claim = queue.claim()
    storage = queue.queue._storage
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()                           # a pid that no longer exists
    claim.set("worker", {"host": os.uname().nodename, "pid": dead.pid})
    assert fail_dead_trials(queue.queue) == [claim.trial.number]
    assert storage.get_trial(claim.trial._trial_id).state == TrialState.FAIL
    assert queue.taken() == {"1/final/1": "WAITING"}
    again = queue.claim()
    assert again.job == Job(of=1, rung=FINAL, steps=500, seed=1, fold=1)
    with again:
        queue.finish(again, {"ccc": {"mean": .7}})
    assert [job for job, _ in queue.records()] == [again.job]


def test_a_live_job_failed_by_a_late_heartbeat_hands_its_result_to_the_retry(tmp_path):
    study, queue = _queue(tmp_path, f"journal:{tmp_path}/q.log")
    queue.enqueue(Job(of=5, rung=2, steps=600))
    claim = queue.claim()
    storage = queue.queue._storage
    # another worker saw no heartbeat in time: it failed the job and queued a retry
    storage.set_trial_state_values(claim.trial._trial_id, state=TrialState.FAIL)
    queue.queue.add_trial(optuna.create_trial(state=TrialState.WAITING, user_attrs=dict(claim.trial.user_attrs)))
    queue.finish(claim, {"ccc": {"mean": .6}})             # the result is not lost, nor trained again
    (job, attrs), = queue.records()
    assert job.key == "5/2/0" and attrs["ccc"]["mean"] == .6 and attrs["adopted_from"] == claim.trial.number
    assert queue.claim() is None


def test_an_exception_in_training_fails_the_job_and_the_key_is_free_again(tmp_path):
    study, queue = _queue(tmp_path)
    queue.enqueue(Job(of=2, rung=1, steps=60))
    with pytest.raises(RuntimeError, match="boom"):
        with queue.claim():
            raise RuntimeError("boom")
    failed = queue.trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == "RuntimeError: boom"
    assert queue.taken() == {}            # not given up after one failure: ASHA may queue it again


# ---- several workers, kill -9 between rungs, then resume ----


def _spawn(ctx, tmp_path, overrides, log, sleep):
    p = ctx.Process(target=run_fake_search, args=(str(tmp_path), overrides, log, sleep))
    p.start()
    return p


@pytest.mark.slow
def test_three_workers_one_killed_mid_promotion_then_resume_nothing_lost_nothing_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROSER_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("MICROSER_GRACE_SECONDS", "15")
    log = str(tmp_path / "calls.jsonl")
    ctx = multiprocessing.get_context("spawn")
    overrides = {"trials": 9, "references": ()}
    # the first worker creates the study; the others join it
    workers = [_spawn(ctx, tmp_path, overrides, log, 0.4)]
    url = f"sqlite:///{tmp_path}/s.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            load_study("s", url)
            break
        except Exception:
            time.sleep(0.2)
    workers += [_spawn(ctx, tmp_path, overrides, log, 0.4) for _ in range(2)]
    victim = workers[0]         # it started first: it trains from the start
    killed_job = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed_job is None and victim.is_alive():   # kill it in its 2nd run
        mine = [json.loads(line)["call"] for line in (open(log) if os.path.exists(log) else [])
                if json.loads(line)["pid"] == victim.pid]
        if len(mine) >= 2:
            killed_job = mine[1]
            os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.05)
    assert killed_job, "the victim never started two training runs"
    for p in workers:
        p.join(timeout=300)
    assert all(not p.is_alive() for p in workers)
    # resume: the same command once more finishes whatever is left (nothing, or the final stage)
    run_fake_search(str(tmp_path), overrides, log, 0.0)
    run_fake_search(str(tmp_path), overrides, log, 0.0)

    study = load_study("s", url)
    queue = RungQueue(study)
    assert not study.get_trials(states=(TrialState.RUNNING,)) and not queue.running()
    assert not queue.trials(states=(TrialState.WAITING,))
    done = [t.user_attrs["key"] for t in queue.trials(states=(TrialState.COMPLETE,))]
    assert len(done) == len(set(done))                          # nothing promoted (or final-trained) twice
    candidates = [t for t in study.get_trials() if "ccc" in t.user_attrs and not t.user_attrs.get("rejected")]
    assert len(candidates) == 9
    ev = Evaluations(study)
    for t in candidates:
        for k, record in ev.rungs(t.number).items():              # every result is the one of its fidelity
            assert record["ccc"]["mean"] == pytest.approx(fake_ccc(t.params["width"], (10, 30, 90)[k]))
    # the killed run was failed by heartbeat, queued again and completed by another worker: a promotion in the
    # rung queue, or a first-rung candidate in the study (its parameters retried)
    restarted = True
    if killed_job[1] == 10:
        dead, = study.get_trials(states=(TrialState.FAIL,))
        retry, = [t for t in study.get_trials() if dead.number in (t.user_attrs.get("retry_of"),
                                                                  t.system_attrs.get("failed_trial"))]
        assert retry.params == dead.params
        # trained again, or left queued because the others had reached --trials meanwhile (nothing half-done)
        assert retry in candidates or retry.state == TrialState.WAITING
        restarted = retry in candidates
    else:
        failed = queue.trials(states=(TrialState.FAIL,))
        assert len(failed) == 1 and failed[0].user_attrs["key"] in done
    # the final stage: 2 finalists x 2 seeds, each once
    finals = [k for k in done if k.split("/")[1] == FINAL]
    assert len(finals) == 4
    # every run was started once, but the killed one, which was started again
    started = {}
    for width, steps, seed, fold, _ in (json.loads(line)["call"] for line in open(log)):
        started[(width, steps, seed)] = started.get((width, steps, seed), 0) + 1
    assert {k: n for k, n in started.items() if n > 1} == ({tuple(killed_job[:3]): 2} if restarted else {})
