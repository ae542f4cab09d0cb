"""Search orchestration: a multi-objective Optuna study, successive halving over rungs of optimizer steps, a final stage.

A candidate: the space suggests an ``ArchSpec``; its costs are measured (one
ONNX export); budgets become constraints (``trial.set_constraint``, value
``cost - limit``); a candidate over budget is recorded COMPLETE with its costs,
its constraints, the sentinel CCC ``REJECTED_CCC`` and the user attribute
``rejected`` and is never trained. Otherwise it is distilled for the first
rung's steps and scored by mean CCC on the validation subset
(``microser.splits.bounded``). Objectives: maximize that CCC, minimize the
costs in ``objectives``; the sampler learns from first-rung results only.

Fidelity is counted in optimizer steps (batches of ``batch_size`` crops of
``crop_seconds``), so a trial costs the same on any cache size. Whenever a
worker is free it promotes a trial to the next rung if one is due
(``microser.asha``: best ``1/eta`` of a rung by non-dominated sorting), else it
draws a new candidate. Promotions retrain from scratch at the higher step
count; they are jobs in the companion study (``microser.rungs``), claimed
atomically, so several workers, PostgreSQL and a kill -9 followed by the same
command lose nothing and train nothing twice.

A wall-clock budget (``time``) covers the whole command: the search stops
drawing new work when what it would start plus the estimated final stage no
longer fits. The final stage trains the ``final_k`` best trials of the highest
rungs and the references at ``final_steps`` with ``final_seeds`` seeds; where
the cache has few validation speakers, each seed holds out other speakers for
validation (``microser.splits.speaker_folds``). The summary compares the pick
(best mean validation CCC over seeds, or the fewest parameters within the reference's int8 RAM among the
finalists validation cannot separate from it: ``final.choose_pick``) with the first reference on the test
split, and calls it a win only when the margin exceeds its spread over seeds.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from microser.asha import finalists, promotions
from microser.budgets import describe_violations, parse_budgets, violations
from microser.components import Components, SearchEvent, TrainOutcome, open_data, open_space, open_study, probe_budgets
from microser.errors import MicroserError
from microser.pareto import is_feasible
from microser.fidelity import (
    ESTIMATE_MARGIN, FINAL_EVALUATION_SCALE, FINAL_TIME_SHARE, Fidelity, measure_time_plan, resolve_fidelity, speed_note,
)
from microser.samplers import TrialSeededSampler
from microser.search_config import REJECTED_CCC, SearchConfig, check_same_study, study_settings
from microser.final import FINAL_PLAN_ATTR, SearchSummary, run_final_stage, summarize
from microser.ladder import Ladder, read_ladder, references
from microser.rungs import FINAL, Job, RungQueue
from microser.splits import Split, bounded, speaker_folds
from microser.storage import (
    SETTINGS_ATTR, artifact_store, fail_dead_trials, heartbeat_seconds, heartbeats_on, save_weights, worker_tag,
)
from microser.urls import default_artifacts_dir, default_storage_url, safe_url

MAX_REJECTIONS_IN_A_ROW = 200   # then the budget is called impossible for this space
MAX_DUPLICATES_IN_A_ROW = 100   # draws that repeat an earlier trial; then the space is called exhausted
MAX_FAILURES_IN_A_ROW = 3
SEARCH_DONE_ATTR = "search_done"   # study user attr: the search stage ended (time or trials); a rerun goes on



def _threads(config: SearchConfig) -> int:
    if config.threads:
        return config.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // config.workers)


def _seed(base: int, *parts) -> int:
    """A training seed for (study seed, trial, rung, seed index): distinct per job, the same on every rerun."""
    codes = [int(p) if isinstance(p, int) else int(hashlib.sha256(str(p).encode()).hexdigest()[:8], 16) for p in parts]
    return int(np.random.SeedSequence([int(base) % 2**32, *codes]).generate_state(1)[0] % 2**31)


# ---- study state, read from storage (so every worker sees the same counts) ----


# ---- one search process ----


class _Searcher:
    """Runs jobs in one process: new candidates at the first rung, promotions, final-stage seeds. Shared by workers."""

    def __init__(self, config: SearchConfig, study: optuna.Study, budgets, components: Components, *,
                 worker: int, threads: int, progress=None, t0: float | None = None):
        self.config, self.study, self.budgets, self.c = config, study, budgets, components
        self.worker, self.threads, self.progress = worker, threads, progress
        settings = study.user_attrs[SETTINGS_ATTR]
        self.fidelity = Fidelity.from_dict(settings["fidelity"])
        self.objectives = tuple(settings["objectives"])
        self.store = artifact_store(settings["artifacts"])
        self.queue = RungQueue(study)
        self.cost_cache: dict[str, dict] = {}
        self.rejected_in_a_row = 0
        self.failed_in_a_row = 0
        self.duplicates_in_a_row = 0
        self.t0 = self.c.clock() if t0 is None else t0
        self.deadline = self.t0 + config.time if config.time else None
        self._splits: dict[int, Split] = {}
        self.current: int | None = None   # the trial the objective is running (this process)

    # -- reading the study --
    def state(self) -> Ladder:
        return read_ladder(self.study, self.queue, self.fidelity, self.objectives)

    # -- events --
    def emit(self, kind: str, stage: str, message: str = "", state: Ladder | None = None, **extra) -> None:
        if self.progress is None:
            return
        s = state or self.state()
        remaining = None if self.deadline is None else max(0.0, self.deadline - self.c.clock())
        if stage == "final":
            plan = self.study.user_attrs.get(FINAL_PLAN_ATTR) or {}
            extra.setdefault("final_total", len(plan.get("trials", [])) * int(plan.get("seeds", 0)))
            extra.setdefault("final_done", sum(v == "COMPLETE" for v in s.final_keys.values()))
            if remaining is not None:
                remaining = max(remaining, self._final_seconds(s, pending_only=True))
        self.progress(SearchEvent(kind=kind, stage=stage, trained=s.counts["trained"],
                                  rungs=[len(level) for level in s.ladder], rejected=s.counts["rejected"],
                                  best_ccc=s.counts["best"], eta_seconds=remaining, message=message, **extra))

    def measure(self, spec) -> dict:
        key = spec.to_json()
        if key not in self.cost_cache:
            self.cost_cache[key] = self.c.measure(spec, self.config.input_seconds)
            if self.config.ram_mode == "streaming":
                from microser.cgen.ram import streaming_costs

                self.cost_cache[key] = streaming_costs(spec, self.cost_cache[key], self.config.input_seconds)
        return self.cost_cache[key]

    # -- splits and training --
    def split(self, fold: int = 0, test: bool = False) -> Split:
        """Fold ``fold``'s train and bounded validation subset (final stage, ``test``: a larger subset, and the
        test split bounded the same way)."""
        key = fold * 2 + int(test)
        if key not in self._splits:
            data = self.c.data
            train, valid, speakers = speaker_folds(data, fold + 1)[fold]
            cap = self.fidelity.valid_seconds
            if cap is not None and test:
                cap *= FINAL_EVALUATION_SCALE
            test_idx = bounded(data, data.split_indices("test"), cap) if test else None
            self._splits[key] = Split(train=train, valid=bounded(data, valid, cap), test=test_idx, fold=fold,
                                      valid_speakers=speakers)
        return self._splits[key]

    def train(self, spec, steps: int, seed: int, split: Split, label: str) -> TrainOutcome:
        config = self.fidelity.train_config(steps, seed, self.threads)
        return self.c.trainer(spec, self.c.data, config, split=split, progress=self._step_progress(label))

    def _step_progress(self, label: str):
        if self.progress is None:
            return None

        def report(info: dict) -> None:
            self.emit("epoch", "search", f"{label}: step {info.get('step')}/{info.get('steps')}, "
                                         f"valid CCC {info.get('valid', {}).get('mean', float('nan')):.3f}")
        return report

    def _record(self, outcome: TrainOutcome, weights: dict) -> dict:
        record = {"ccc": outcome.ccc, "train_seconds": outcome.train_seconds,
                  "eval_seconds": outcome.eval_seconds, "steps": outcome.steps,
                  "samples_per_second": outcome.samples_per_second, "weights": weights}
        if outcome.test_ccc is not None:
            record["test_ccc"] = outcome.test_ccc
        if outcome.test_parts:
            record["test_parts"] = outcome.test_parts
        if outcome.collapsed:
            record["collapsed"] = outcome.collapsed
        return record

    # -- time --
    @staticmethod
    def _per_step(s: Ladder, trial: int | None) -> float:
        """Seconds per optimizer step of ``trial`` as measured (else the slowest measured so far)."""
        if trial is not None and trial in s.step_seconds:
            return s.step_seconds[trial]
        known = list(s.step_seconds.values())
        return max(known) if known else 0.1

    def _job_seconds(self, s: Ladder, trial: int | None, steps: int, final: bool = False) -> float:
        """Estimated wall seconds of a job of ``steps`` for ``trial``: the median job overhead (measuring,
        validation, saving, storage; a final-stage job's when ``final``) plus its own measured time per optimizer
        step (else the slowest measured)."""
        return (s.final_overhead_seconds if final else s.overhead_seconds) + self._per_step(s, trial) * steps

    def final_steps_that_fit(self, s: Ladder, members: list[int]) -> int:
        """Steps of the final stage: the planned ``final_steps``, fewer when ``members`` x seeds would not finish
        by the deadline at their measured speeds (never below the first rung); with no deadline, as planned."""
        f = self.fidelity
        if self.deadline is None or not members:
            return f.final_steps
        left = ESTIMATE_MARGIN * (self.deadline - self.c.clock())   # a tenth kept (the demo overran by 2 %)
        per_step = f.final_seeds * sum(self._per_step(s, n) for n in members) / self.config.workers
        fixed = f.final_seeds * len(members) * s.final_overhead_seconds / self.config.workers
        fit = int((left - fixed) / per_step) // 10 * 10 if per_step > 0 else f.final_steps
        return max(f.rungs[0], min(f.final_steps, fit))

    def _final_members(self, s: Ladder) -> list[int]:
        plan = self.study.user_attrs.get(FINAL_PLAN_ATTR)
        if plan and self.study.user_attrs.get(SEARCH_DONE_ATTR):
            return list(plan["trials"])
        refs = [t.number for t in references(self.study, self.config.references)]
        return finalists(s.ladder, self.config.final_k) + refs

    def _final_seconds(self, s: Ladder, pending_only: bool = False) -> float:
        """Estimated seconds of the final stage (finalists as they stand now, and the references), over workers."""
        f = self.fidelity
        total = 0.0
        members = self._final_members(s)
        plan = self.study.user_attrs.get(FINAL_PLAN_ATTR) if self.study.user_attrs.get(SEARCH_DONE_ATTR) else None
        steps = int((plan or {}).get("steps") or f.final_steps)
        for n in members:
            for seed in range(f.final_seeds):
                if pending_only and s.final_keys.get(f"{n}/{FINAL}/{seed}") == "COMPLETE":
                    continue
                total += self._job_seconds(s, n, steps, final=True)
        missing = max(0, self.config.final_k - (len(members) - len(self.config.references)))
        total += missing * f.final_seeds * self._job_seconds(s, None, steps, final=True)
        return total / self.config.workers

    def out_of_time(self, s: Ladder, next_seconds: float) -> bool:
        """True when starting ``next_seconds`` of work would leave too little time for the final stage: its
        estimate at the planned steps, but at most FINAL_TIME_SHARE of ``--time`` (it then trains fewer steps,
        ``final_steps_that_fit``) so that a slow reference cannot leave no time to search."""
        if self.deadline is None:
            return False
        reserve = min(self._final_seconds(s), FINAL_TIME_SHARE * self.config.time)
        return self.c.clock() + next_seconds + reserve > self.deadline

    # -- a new candidate (first rung) --
    def objective(self, trial: optuna.Trial):
        started = self.c.clock()
        self.current = trial.number
        trial.set_user_attr("worker", worker_tag())
        spec = self.c.space.suggest(trial)
        trial.set_user_attr("spec", spec.to_json())
        self._skip_duplicate(trial, spec.to_json())
        self.emit("measure", "search", f"trial {trial.number}: measuring {spec.summary()}")
        costs = self.measure(spec)
        trial.set_user_attr("family", spec.family)
        trial.set_user_attr("summary", spec.summary())
        trial.set_user_attr("costs", costs)
        for key, value in violations(self.budgets, costs).items():
            trial.set_constraint(key, value)
        cost_values = [float(costs[o]) for o in self.objectives]
        broken = describe_violations(self.budgets, costs)
        if broken:
            trial.set_user_attr("rejected", f"over budget: {broken}")
            self.rejected_in_a_row += 1
            return [REJECTED_CCC, *cost_values]
        self.rejected_in_a_row = 0
        trial.set_user_attr("stage", "training")
        steps = self.fidelity.rungs[0]
        self.emit("train", "search", f"trial {trial.number}: training {spec.summary()}, {steps} steps")
        first = trial.user_attrs.get("retry_of", trial.number)    # a retry repeats its dead trial's run exactly
        outcome = self.train(spec, steps, _seed(self.config.seed, first, 0, 0), self.split(), f"trial {trial.number}")
        weights = save_weights(outcome.state_dict, store=self.store, study_or_trial=trial,
                               name=f"trial-{trial.number}-search")
        for key, value in self._record(outcome, weights).items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("job_seconds", self.c.clock() - started)
        trial.set_user_attr("stage", "done")
        return [float(outcome.ccc["mean"]), *cost_values]

    def _skip_duplicate(self, trial: optuna.Trial, spec_json: str) -> None:
        """Prune a candidate an earlier trial (any worker, not failed) already has: it would only repeat it.

        Both workers of a simultaneous draw record the spec first, so the later trial number yields.
        """
        same = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number < trial.number and t.user_attrs.get("spec") == spec_json]
        sampler = self.study.sampler
        if not same:
            self.duplicates_in_a_row = 0
            if isinstance(sampler, TrialSeededSampler):
                sampler.explore = False
            return
        self.duplicates_in_a_row += 1
        if isinstance(sampler, TrialSeededSampler):
            sampler.explore = True
        trial.set_user_attr("duplicate_of", same[0])
        raise optuna.TrialPruned(f"same candidate as trial {same[0]}")

    def new_candidate(self) -> None:
        self.current = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.optimize(self.objective, n_trials=1, catch=(RuntimeError,), gc_after_trial=False)
        mine = [t for t in self.study.get_trials(deepcopy=False) if t.number == self.current]
        if mine and mine[-1].state == TrialState.FAIL:
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise MicroserError(f"study {self.study.study_name!r}: {self.failed_in_a_row} trials in a row "
                                    "failed (see the log above): fix the cause, then run the same command again")
        else:
            self.failed_in_a_row = 0
        if mine and mine[-1].state != TrialState.PRUNED:
            t = mine[-1]
            self.emit("rejected" if t.user_attrs.get("rejected") else "trial", "search", _trial_line(t))

    # -- queued jobs (promotions and final seeds) --
    def run_claimed(self, stage: str) -> bool:
        """Claim one waiting job and train it; False when none was waiting."""
        started = self.c.clock()
        claim = self.queue.claim()
        if claim is None:
            return False
        job = claim.job
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == job.of)
        spec = self.c.load_spec(trial.user_attrs["spec"])
        final = job.rung == FINAL
        label = (f"trial {job.of} final seed {job.seed + 1}/{self.fidelity.final_seeds}" if final
                 else f"trial {job.of} rung {job.rung + 1} ({job.steps} steps)")
        with claim:
            self.emit("train", stage, f"{label}: training")
            outcome = self.train(spec, job.steps, _seed(self.config.seed, job.of, job.rung, job.seed),
                                 self.split(job.fold, test=final), label)
            weights = save_weights(outcome.state_dict, store=self.store, study_or_trial=self.study,
                                   name=f"trial-{job.of}-{'final-' + str(job.seed) if final else 'rung-' + str(job.rung)}")
            self.queue.finish(claim, {**self._record(outcome, weights), "job_seconds": self.c.clock() - started})
        test = f", test {outcome.test_ccc['mean']:.3f}" if outcome.test_ccc else ""
        self.emit("final" if final else "trial", stage, f"{label}: CCC {outcome.ccc['mean']:.3f}{test}")
        return True

    def fail_lost(self) -> list[int]:
        """Fail (and queue again) jobs and trials of dead workers: by heartbeat (RDB storages), else by pid."""
        failed = []
        for study in (self.study, self.queue.queue):
            storage = study._storage
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeats_on(storage):
                    optuna.storages.fail_stale_trials(study)
                failed += fail_dead_trials(study)
        return failed

    # -- the search stage --
    def search(self) -> None:
        """First-rung candidates and promotions until the time or the trial cap says stop (for every worker).

        The first worker to stop closes the search stage (study attribute ``search_done``); the others
        see it before their next job, so every worker then waits for the same quiet ladder.
        """
        last_check = 0.0
        while not self.study.user_attrs.get(SEARCH_DONE_ATTR):
            if self.c.clock() - last_check > heartbeat_seconds():
                self.fail_lost()
                last_check = self.c.clock()
            s = self.state()
            due = promotions(s.ladder, s.taken, self.fidelity.eta)
            if due:
                trial, rung = due[0]
                steps = self.fidelity.rungs[rung]
                if self.out_of_time(s, self._job_seconds(s, trial, steps)):
                    return self.close(s, "time")
                self.queue.enqueue(Job(of=trial, rung=rung, steps=steps))
                self.run_claimed("search")
                continue
            if self.run_claimed("search"):     # a job queued by another worker, or retried after a kill
                continue
            # --trials counts candidates trained or being trained (a retry of a dead worker's trial is still due)
            if (self.config.trials is not None and s.counts["trained"] + s.counts["in_flight"] >= self.config.trials
                    and not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
                if s.counts["running"] == 0 and s.counts["in_flight"] == 0:
                    return self.close(s, "trials")
                time.sleep(min(2.0, heartbeat_seconds()))   # others still train: their results may be promotable
                continue
            if self.out_of_time(s, self._job_seconds(s, None, self.fidelity.rungs[0])):
                return self.close(s, "time")
            self._check_stuck(s)
            self.new_candidate()

    def close(self, s: Ladder, why: str) -> None:
        """End the search stage for every worker of this study."""
        self.study.set_user_attr(SEARCH_DONE_ATTR, {"why": why, "trained": s.counts["trained"]})

    def settle(self) -> None:
        """Wait until no search-stage work runs (others finish their job), then drop promotions nobody started."""
        while True:
            self.fail_lost()
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            jobs = [t for t in self.queue.running() if t.user_attrs["job"]["rung"] != FINAL]
            if not trials and not jobs:
                break
            time.sleep(min(2.0, heartbeat_seconds()))
        for t in self.queue.trials(states=(TrialState.WAITING,)):
            if t.user_attrs["job"]["rung"] != FINAL:
                self.queue.cancel(t, "the search stage closed before this promotion started")

    def _check_stuck(self, s: Ladder) -> None:
        space = self.study.user_attrs[SETTINGS_ATTR]["space"]
        if self.rejected_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
            raise MicroserError(
                f"budget {', '.join(b.text for b in self.budgets)}: {self.rejected_in_a_row} candidates in a "
                f"row were over budget in {space}: raise the budget or use a space with smaller models (--space)")
        if self.duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
            raise MicroserError(
                f"study {self.study.study_name!r}: the last {self.duplicates_in_a_row} candidates drawn from "
                f"{space} were all tried before ({s.counts['trained']} trained so far; the space has little left "
                "to draw): lower --trials or widen the space")

    # -- the final stage --
    def in_workers(self, mode: str) -> None:
        """Run ``mode`` ("search" or "final") in ``config.workers`` spawned processes."""
        _in_workers(self, mode)

    def drain(self, stage: str = "final") -> None:
        """Train queued jobs until none is waiting or running (failing and re-queuing those of dead workers)."""
        while True:
            if self.run_claimed(stage):
                continue
            self.fail_lost()
            if not self.queue.running() and not self.queue.trials(states=(TrialState.WAITING,)):
                return
            time.sleep(min(2.0, heartbeat_seconds()))


def _trial_line(t: optuna.trial.FrozenTrial) -> str:
    a = t.user_attrs
    if a.get("rejected"):
        return f"trial {t.number} rejected before training: {a['rejected']}"
    if t.state != TrialState.COMPLETE:
        return f"trial {t.number} {t.state.name.lower()}"
    return f"trial {t.number}: CCC {a['ccc']['mean']:.3f}, {int(a['costs']['params'])} params ({a.get('summary')})"


# ---- the whole search ----


def _worker_main(config_dict: dict, worker: int, threads: int, seconds_left: float | None, mode: str) -> None:
    """Entry point of a spawned worker process: the search stage (``mode="search"``) or draining final jobs."""
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads)
    config = SearchConfig.from_dict(config_dict)
    components = Components()
    components.data, _ = open_data(config, components)
    components.space, _ = open_space(config, components)
    from microser.models.spec import ArchSpec

    components.load_spec = ArchSpec.from_json
    study = open_study(config, worker=worker)
    searcher = _Searcher(config, study, parse_budgets(config.budgets), components, worker=worker, threads=threads)
    searcher.deadline = None if seconds_left is None else components.clock() + seconds_left
    if mode == "search":
        searcher.search()
    else:
        searcher.drain()


def _in_workers(searcher: _Searcher, mode: str) -> None:
    """Run ``mode`` in ``config.workers`` spawned processes (this one reports progress meanwhile)."""
    config = searcher.config
    left = None if searcher.deadline is None else max(0.0, searcher.deadline - searcher.c.clock())
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(config.to_dict(), k + 1, searcher.threads, left, mode))
             for k in range(config.workers)]
    for p in procs:
        p.start()
    try:
        seen = len(searcher.study.get_trials(deepcopy=False))
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            trials = searcher.study.get_trials(deepcopy=False)
            for t in trials[seen:]:
                if not t.state.is_finished():
                    break
                if t.state != TrialState.PRUNED:
                    searcher.emit("rejected" if t.user_attrs.get("rejected") else "trial", mode, _trial_line(t))
                seen += 1
    finally:
        for p in procs:
            p.join()


def run_search(config: SearchConfig, *, progress: Callable[[SearchEvent], None] | None = None,
               components: Components | None = None, started: float | None = None) -> SearchSummary:
    """Create or resume the study, run the search stage (in ``config.workers`` processes), then the final stage.
    ``config.time`` counts from ``started`` (a ``components.clock`` reading; default now): the CLI's start.

    Library code never prints: Optuna's own INFO log is turned down to
    WARNING, and ``progress`` (if given) receives a :class:`SearchEvent` at
    every step.
    """
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    c = replace(components) if components is not None else Components()
    t0 = c.clock() if started is None else started
    budgets = parse_budgets(config.budgets)
    threads = _threads(config)
    torch.set_num_threads(threads)
    c.data, cache_path = open_data(config, c)
    from microser.cache import require_trainable

    require_trainable(c.data)   # cache verify's checks, segment lengths, split sizes: before any study or trial
    c.space, space_path = open_space(config, c)
    if c.resolve_reference is None or c.load_spec is None:
        from microser.models.spec import ArchSpec, resolve_spec

        c.resolve_reference = c.resolve_reference or resolve_spec
        c.load_spec = c.load_spec or ArchSpec.from_json
    reference_specs = [(name, c.resolve_reference(name)) for name in config.references]

    name = config.study_name
    url = config.storage or default_storage_url(name)
    artifacts = Path(config.artifacts) if config.artifacts else default_artifacts_dir(config.storage, name)
    study = open_study(config, create=True)
    old = study.user_attrs.get(SETTINGS_ATTR)
    time_plan = measure_time_plan(config, old, lambda tc: c.step_seconds(c.data, tc), threads)
    fidelity = resolve_fidelity(config, c.data, *((time_plan["speed"], time_plan.get("final_share_steps"))
                                                  if time_plan else ()))
    settings = study_settings(config, budgets, c.data, cache_path, space_path, artifacts, fidelity)
    if time_plan:
        settings["time_plan"] = time_plan
    if old is not None:
        check_same_study(name, url, old, settings)
        settings = {**settings, "artifacts": old["artifacts"]}
    else:
        study.set_user_attr(SETTINGS_ATTR, settings)
        for params in getattr(c.space, "warm_starts", ()):  # known-good points first (space file)
            study.enqueue_trial(params, skip_if_exists=True)

    searcher = _Searcher(config, study, budgets, c, worker=0, threads=threads, progress=progress, t0=t0)
    stale = searcher.fail_lost()
    f = searcher.fidelity
    searcher.emit("start", "search", f"study {name} in {safe_url(url)}; rungs {', '.join(map(str, f.rungs))} steps, "
                  f"final {f.final_steps} steps x {f.final_seeds} seeds" + speed_note(time_plan)
                  + (f"; failed {len(stale)} trial(s) of a stopped run: {stale}" if stale else ""))
    s = searcher.state()
    if budgets and s.counts["trained"] == 0 and not any(is_feasible(t) for t in s.trials):
        probe_budgets(config, budgets, c.space, searcher.measure, space_path)

    done = study.user_attrs.get(SEARCH_DONE_ATTR)
    t_search = c.clock()
    if done and config.trials is not None and s.counts["trained"] < config.trials:   # asked for more: reopen
        study.set_user_attr(SEARCH_DONE_ATTR, None)
        study.set_user_attr(FINAL_PLAN_ATTR, None)
        done = None
    if not done:
        _train_references(searcher, reference_specs)
        if config.workers > 1:
            _in_workers(searcher, "search")
        else:
            searcher.search()
        if not study.user_attrs.get(SEARCH_DONE_ATTR):   # the workers stopped without closing (e.g. interrupted)
            searcher.close(searcher.state(), "stopped")
    searcher.settle()
    search_seconds = c.clock() - t_search

    t1 = c.clock()
    run_final_stage(searcher, [n for n, _ in reference_specs])
    final_seconds = c.clock() - t1
    searcher.emit("done", "final", "search finished")
    return summarize(study, settings, url, stale, search_seconds, final_seconds)


# ---- references ----


def _train_references(searcher: _Searcher, reference_specs) -> None:
    """Train each reference once per study at the first rung (same recipe as candidates), as a COMPLETE trial."""
    study = searcher.study
    done = {t.user_attrs["reference"] for t in references(study, [n for n, _ in reference_specs])}
    for name, spec in reference_specs:
        if name in done:
            continue
        searcher.emit("train", "references", f"reference {name}: training {spec.summary()}")
        started = searcher.c.clock()
        costs = searcher.measure(spec)
        number = len(study.get_trials(deepcopy=False))
        outcome = searcher.train(spec, searcher.fidelity.rungs[0], _seed(searcher.config.seed, "reference", name),
                                 searcher.split(), f"reference {name}")
        weights = save_weights(outcome.state_dict, store=searcher.store, study_or_trial=study,
                               name="reference-" + "".join(ch if ch.isalnum() or ch in "-_." else "_"
                                                           for ch in Path(name).name) + f"-{number}")
        attrs = {"spec": spec.to_json(), "family": spec.family, "summary": spec.summary(), "costs": costs,
                 **searcher._record(outcome, weights), "reference": name, "worker": worker_tag(),
                 "job_seconds": searcher.c.clock() - started}
        study.add_trial(optuna.create_trial(
            values=[float(outcome.ccc["mean"]), *(float(costs[o]) for o in searcher.objectives)],
            user_attrs=attrs, constraints=violations(searcher.budgets, costs)))
        searcher.emit("trial", "references", f"reference {name}: CCC {outcome.ccc['mean']:.3f}")
