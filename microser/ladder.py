"""One consistent read of a running study: every trial's result at every rung, what is taken, and how fast it trains.

Workers never talk to each other; each decides from this read of the storage
(``microser.asha`` on ``Ladder.ladder`` and ``Ladder.taken``), so a decision
is as good on many hosts and after a restart as in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from microser.asha import Result
from microser.fidelity import FINAL_EVALUATION_SCALE, Fidelity
from microser.pareto import is_candidate, is_feasible
from microser.rungs import FINAL, RungQueue


@dataclass
class Ladder:
    """One read of a study and its companion: results at each rung, what is taken, speeds and counts."""

    trials: list
    ladder: list[list[Result]]
    taken: list[set[int]]
    step_seconds: dict[int, float]       # trial -> seconds per optimizer step (its fastest measured rung)
    overhead_seconds: float              # median seconds a job spends beside its steps (measuring, validating,
    #                                      saving, storage)
    final_overhead_seconds: float        # the same for a final-stage job (larger validation subset, and the test)
    counts: dict
    final_keys: dict[str, str]


def read_ladder(study: optuna.Study, queue: RungQueue, fidelity: Fidelity, objectives) -> Ladder:
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    feasible = [t for t in trials if is_feasible(t)]
    ladder: list[list[Result]] = [[] for _ in fidelity.rungs]
    taken: list[set[int]] = [set() for _ in fidelity.rungs]
    per_step: dict[int, float] = {}
    overheads: list[float] = []
    final_overheads: list[float] = []
    evals: list[float] = []

    def busy(a) -> float:
        """Seconds of optimizer steps in a run: its training time less its validations."""
        return max(1e-9, float(a["train_seconds"]) - float(a.get("eval_seconds") or 0.0))

    def overhead(a) -> float:
        return max(0.0, float(a["job_seconds"]) - busy(a))

    def costs_of(t):
        return tuple(float(t.user_attrs["costs"][o]) for o in objectives)

    for t in trials:
        a = t.user_attrs
        if t.state == TrialState.COMPLETE and "ccc" in a and a.get("train_seconds") and a.get("steps"):
            per_step[t.number] = busy(a) / float(a["steps"])
            if a.get("job_seconds"):
                overheads.append(overhead(a))
            if a.get("eval_seconds"):
                evals.append(float(a["eval_seconds"]))
    for t in feasible:
        ladder[0].append(Result(t.number, float(t.user_attrs["ccc"]["mean"]), costs_of(t),
                                bool(t.user_attrs.get("collapsed"))))
        taken[0].add(t.number)
    keys = queue.taken()
    for job, a in queue.records():
        if job.rung == FINAL and a.get("job_seconds") and a.get("train_seconds"):
            final_overheads.append(overhead(a))
        if job.rung == FINAL or not isinstance(job.rung, int) or job.rung >= len(fidelity.rungs):
            continue
        t = by_number.get(job.of)
        if t is None or not is_feasible(t):
            continue
        ladder[job.rung].append(Result(job.of, float(a["ccc"]["mean"]), costs_of(t), bool(a.get("collapsed"))))
        if a.get("train_seconds") and job.steps:
            per_step[job.of] = min(per_step.get(job.of, math.inf), busy(a) / job.steps)
        if a.get("job_seconds") and a.get("train_seconds"):
            overheads.append(overhead(a))
    for key, state in keys.items():
        of, rung, _ = key.split("/")
        if rung != FINAL and int(rung) < len(fidelity.rungs):
            taken[int(rung)].add(int(of))
    candidates = [t for t in trials if is_candidate(t)]
    best_rung = max((k for k, level in enumerate(ladder) if level), default=None)
    best = max((r.ccc for r in ladder[best_rung]), default=None) if best_rung is not None else None
    counts = {
        "trained": len(candidates),
        "running": sum(t.state == TrialState.RUNNING and t.user_attrs.get("stage") == "training" for t in trials)
        + sum(1 for s in keys.values() if s == "RUNNING"),
        # new candidates in any state of their run (drawing, measuring, training), references excluded
        "in_flight": sum(t.state == TrialState.RUNNING and "reference" not in t.user_attrs for t in trials),
        "rejected": sum(t.state == TrialState.COMPLETE and bool(t.user_attrs.get("rejected")) for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best": best,
    }
    final_keys = {k: v for k, v in keys.items() if k.split("/")[1] == FINAL}
    overhead = _median(overheads, 1.0)
    # a final-stage job validates on FINAL_EVALUATION_SCALE x the subset and tests as much: until one has run,
    # a search job's overhead plus that many more validations
    final_overhead = _median(final_overheads, overhead + _median(evals, 0.0) * (2 * FINAL_EVALUATION_SCALE - 1))
    return Ladder(trials, ladder, taken, per_step, overhead, final_overhead, counts, final_keys)


def _median(values: list[float], default: float) -> float:
    return float(sorted(values)[len(values) // 2]) if values else default


def references(study: optuna.Study, names) -> list[optuna.trial.FrozenTrial]:
    """The reference trials named ``names``, in that order (those trained so far)."""
    by_name = {t.user_attrs["reference"]: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.user_attrs.get("reference")}
    return [by_name[n] for n in names if n in by_name]
