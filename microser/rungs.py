"""Evaluations beyond the first rung: a job queue and its records in a companion Optuna study.

The main study holds one trial per candidate, trained at the first rung (its
values are what the sampler learns from). Every later evaluation of a trial
(trained again from scratch at a higher rung, or at the final fidelity with
seed ``s``) is a trial of the companion study ``<study>:rungs`` in the same
storage (Optuna refuses to change finished trials, and a separate study keeps
these repeats out of the sampler's history). Its user attributes:

```
job           {"of": N, "rung": k | "final", "steps": n, "seed": s, "fold": f}
key           "N/k/s": the job's identity (one result per key)
worker        {"host", "pid"} of the process running it
ccc, test_ccc  ccc_report on the validation subset (and, final stage, the test split)
weights       {"artifact_id", "sha256"} of the state dict
train_seconds, step_seconds, collapsed
duplicate_of  a job claimed while an earlier trial with its key existed: PRUNED, not run
```

Queue contract (safe for many workers on one storage, and after kill -9):

- ``enqueue(job)`` adds a WAITING trial; several workers may enqueue the same key.
- ``claim()`` moves the lowest-numbered WAITING trial to RUNNING through the
  storage's own atomic transition (the same one ``Study.ask`` uses to pop an
  enqueued trial), then prunes it as a duplicate when a lower-numbered trial
  with its key is WAITING, RUNNING or COMPLETE: so each key is trained once.
- A claimed job beats a heartbeat (RDB storages); a worker that dies leaves it
  RUNNING until :func:`microser.storage.fail_stale` fails it and queues it
  again (up to twice); failed keys are therefore never lost and never doubled.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from microser.errors import MicroserError
from microser.metrics import CCC_PARTS, report_mean_std
from microser.storage import heartbeat_seconds, heartbeats_on, load_weights, worker_tag

FINAL = "final"
COMPANION_SUFFIX = ":rungs"
MAX_ATTEMPTS = 3   # a key whose job failed this often is given up (a bug, not a lost worker)
CLAIM_SETTLE_SECONDS = 0.3   # longer than a storage write takes; see RungQueue.claim


@dataclass(frozen=True)
class Job:
    """Train main-study trial ``of`` at ``rung`` (index >= 1 or ``"final"``) for ``steps``, seed index ``seed``."""

    of: int
    rung: int | str
    steps: int
    seed: int = 0
    fold: int = 0

    @property
    def key(self) -> str:
        return f"{self.of}/{self.rung}/{self.seed}"

    def to_dict(self) -> dict:
        return {"of": self.of, "rung": self.rung, "steps": self.steps, "seed": self.seed, "fold": self.fold}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        return cls(int(d["of"]), d["rung"], int(d["steps"]), int(d.get("seed", 0)), int(d.get("fold", 0)))


def companion_name(study_name: str) -> str:
    return study_name + COMPANION_SUFFIX


class Claim:
    """A job this process owns until :meth:`finish` (context manager: heartbeats while open)."""

    def __init__(self, queue: optuna.Study, trial: FrozenTrial, job: Job):
        self.queue, self.trial, self.job = queue, trial, job
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def set(self, key: str, value) -> None:
        self.queue._storage.set_trial_user_attr(self.trial._trial_id, key, value)

    def finish(self, record: dict) -> bool:
        """Store the result (``record["ccc"]["mean"]`` is the trial's value) and mark it COMPLETE.

        False when another worker already failed this job (a heartbeat that came too late); the result is
        then handed to the job's queued retry if nobody has claimed it yet (see :meth:`RungQueue.adopt`).
        """
        try:
            for k, v in record.items():
                self.set(k, v)
            self.set("stage", "done")
            self.queue._storage.set_trial_state_values(self.trial._trial_id, state=TrialState.COMPLETE,
                                                       values=[float(record["ccc"]["mean"])])
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def __enter__(self) -> "Claim":
        storage = self.queue._storage
        if heartbeats_on(storage):
            storage.record_heartbeat(self.trial._trial_id)
            interval = heartbeat_seconds()

            def beat():
                while not self._stop.wait(interval):
                    try:
                        storage.record_heartbeat(self.trial._trial_id)
                    except Exception:   # a busy database: the next beat tries again
                        continue

            self._beat = threading.Thread(target=beat, daemon=True)
            self._beat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if exc_type is not None:   # training raised (or Ctrl-C): FAIL; the key is queued again while it is due
            try:
                self.set("fail_reason", f"{exc_type.__name__}: {' '.join(str(exc).split())[:200]}")
                self.queue._storage.set_trial_state_values(self.trial._trial_id, state=TrialState.FAIL)
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                pass


class RungQueue:
    """The companion study of ``study``: enqueue, claim, and read the evaluations of its trials.

    ``create=False`` (readers such as ``microser pareto``) never writes: a study without a companion
    simply has no evaluations beyond the first rung.
    """

    def __init__(self, study: optuna.Study, *, create: bool = True):
        self.study = study
        name = companion_name(study.study_name)
        self.queue: optuna.Study | None = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if create:
                self.queue = optuna.create_study(study_name=name, storage=study._storage, direction="maximize",
                                                 load_if_exists=True)
            else:
                try:
                    self.queue = optuna.load_study(study_name=name, storage=study._storage)
                except KeyError:
                    self.queue = None

    def trials(self, states=None) -> list[FrozenTrial]:
        if self.queue is None:
            return []
        return [t for t in self.queue.get_trials(deepcopy=False, states=states) if "job" in t.user_attrs]

    def enqueue(self, job: Job) -> None:
        self.queue.add_trial(optuna.create_trial(state=TrialState.WAITING,
                                                 user_attrs={"job": job.to_dict(), "key": job.key}))

    def taken(self) -> dict[str, str]:
        """Key -> state name of every key that is queued, running or done (failed keys count once given up)."""
        out: dict[str, str] = {}
        attempts: dict[str, int] = {}
        for t in self.trials():
            key = t.user_attrs["key"]
            if t.state in (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE):
                if out.get(key) != "COMPLETE":
                    out[key] = t.state.name
            elif t.state == TrialState.FAIL:
                attempts[key] = attempts.get(key, 0) + 1
        for key, n in attempts.items():
            if n >= MAX_ATTEMPTS and key not in out:
                out[key] = "GIVEN_UP"
        return out

    def claim(self) -> Claim | None:
        """Claim the oldest waiting job (None when there is none); duplicates of an earlier key are pruned.

        The WAITING -> RUNNING transition is atomic on PostgreSQL and, since ``microser.storage`` begins
        SQLite transactions with the write lock, on SQLite too; as a second guard each winner writes a nonce
        and reads it back after ``CLAIM_SETTLE_SECONDS``: only the last writer keeps the job, the other
        moves on.
        """
        storage = self.queue._storage
        for t in self.trials(states=(TrialState.WAITING,)):
            try:
                if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    continue   # another worker took it first
                nonce = f"{worker_tag()['host']}:{worker_tag()['pid']}:{uuid.uuid4().hex}"
                storage.set_trial_user_attr(t._trial_id, "claim", nonce)
                time.sleep(CLAIM_SETTLE_SECONDS)
                if storage.get_trial(t._trial_id).user_attrs.get("claim") != nonce:
                    continue   # taken by another worker in the same instant
                storage.set_trial_user_attr(t._trial_id, "worker", worker_tag())
                storage.set_trial_user_attr(t._trial_id, "stage", "training")
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue
            earlier = [o.number for o in self.trials(states=(TrialState.WAITING, TrialState.RUNNING,
                                                             TrialState.COMPLETE))
                       if o.number < t.number and o.user_attrs["key"] == t.user_attrs["key"]]
            if earlier:
                storage.set_trial_user_attr(t._trial_id, "duplicate_of", earlier[0])
                storage.set_trial_state_values(t._trial_id, state=TrialState.PRUNED)
                continue
            return Claim(self.queue, storage.get_trial(t._trial_id), Job.from_dict(t.user_attrs["job"]))
        return None

    def finish(self, claim: Claim, record: dict) -> None:
        """Finish ``claim`` with ``record``; if it was failed meanwhile, give the result to its waiting retry."""
        if claim.finish(record):
            return
        storage = self.queue._storage
        for t in self.trials(states=(TrialState.WAITING,)):
            if t.user_attrs["key"] != claim.job.key:
                continue
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    Claim(self.queue, t, claim.job).finish({**record, "worker": worker_tag(),
                                                            "adopted_from": claim.trial.number})
                    return
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue

    def cancel(self, trial: FrozenTrial, reason: str) -> None:
        """Drop a waiting job nobody needs any more (PRUNED with ``cancelled``); a claimed one is left alone."""
        storage = self.queue._storage
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
                storage.set_trial_user_attr(trial._trial_id, "cancelled", reason)
                storage.set_trial_state_values(trial._trial_id, state=TrialState.PRUNED)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            pass

    def records(self) -> Iterator[tuple[Job, dict]]:
        """Every completed evaluation: (job, user attributes)."""
        for t in self.trials(states=(TrialState.COMPLETE,)):
            yield Job.from_dict(t.user_attrs["job"]), t.user_attrs

    def running(self) -> list[FrozenTrial]:
        return self.trials(states=(TrialState.RUNNING,))


def _legacy_final(study: optuna.Study, trial: FrozenTrial) -> dict | None:
    """The final-stage record of a study made before rungs existed (one seed, in a study user attribute)."""
    if "final_ccc" in trial.user_attrs:
        return {"ccc": trial.user_attrs["final_ccc"], "weights": trial.user_attrs.get("final_weights"), "seeds": []}
    old = study.user_attrs.get(f"{LEGACY_FINAL_PREFIX}{trial.number}")
    return {**old, "seeds": []} if old else None


LEGACY_FINAL_PREFIX = "final:"


class Evaluations:
    """Every evaluation of a study's trials beyond the first rung, read from storage once."""

    def __init__(self, study: optuna.Study, *, create: bool = False):
        self.study = study
        self.by_trial: dict[int, list[tuple[Job, dict]]] = {}
        for job, attrs in RungQueue(study, create=create).records():
            self.by_trial.setdefault(job.of, []).append((job, attrs))

    def rungs(self, number: int) -> dict[int, dict]:
        """``{rung index: record}`` of trial ``number`` at the search rungs above the first."""
        return {int(job.rung): attrs for job, attrs in self.by_trial.get(number, []) if job.rung != FINAL}

    def final(self, trial: FrozenTrial) -> dict | None:
        """The final stage of ``trial`` over its seeds, or None if it has none.

        ``{"steps", "seeds": [{"seed", "fold", "ccc", "test_ccc", "test_parts", "weights", "train_seconds",
        "collapsed"}], "ccc"/"test_ccc": per-target means over seeds, "ccc_std"/"test_ccc_std": population std
        over seeds, "test_parts": the test CCC's parts (``metrics.parts_report``), each averaged over seeds,
        "weights": the first seed's (fold 0: the cache's own split), "collapsed": the first collapse message}``.
        """
        runs = sorted(((job, a) for job, a in self.by_trial.get(trial.number, []) if job.rung == FINAL),
                      key=lambda x: x[0].seed)
        if not runs:
            return _legacy_final(self.study, trial)
        seeds = [{"seed": job.seed, "fold": job.fold, "ccc": a.get("ccc"), "test_ccc": a.get("test_ccc"),
                  "test_parts": a.get("test_parts"),
                  "weights": a.get("weights"), "train_seconds": a.get("train_seconds"),
                  "collapsed": a.get("collapsed")} for job, a in runs]
        ccc, ccc_std = report_mean_std([s["ccc"] for s in seeds])
        test, test_std = report_mean_std([s["test_ccc"] for s in seeds])
        with_parts = [s["test_parts"] for s in seeds if s.get("test_parts")]
        parts = {p: report_mean_std([x.get(p) or {} for x in with_parts])[0] for p in CCC_PARTS} if with_parts else None
        return {"steps": runs[0][0].steps, "seeds": seeds, "ccc": ccc, "ccc_std": ccc_std,
                "test_ccc": test or None, "test_ccc_std": test_std or None, "test_parts": parts,
                "weights": seeds[0]["weights"],
                "collapsed": next((s["collapsed"] for s in seeds if s["collapsed"]), None)}


def trial_of(study: optuna.Study, trial: FrozenTrial | int) -> FrozenTrial:
    """Trial ``trial`` (a number) of ``study``; MicroserError naming the range when there is none."""
    if isinstance(trial, FrozenTrial):
        return trial
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.number == int(trial):
            return t
    raise MicroserError(f"study {study.study_name!r} has no trial {trial} (trials 0..{len(trials) - 1}): "
                        "pick one from `microser pareto`")


def final_record(study: optuna.Study, trial: FrozenTrial | int) -> dict | None:
    """The final stage of one trial over its seeds (:meth:`Evaluations.final`), or None if it has none."""
    return Evaluations(study).final(trial_of(study, trial))


TRAINED_PREFIX = "trained:"  # study user attr "trained:<trial number>": `microser train`'s record
WEIGHT_STAGES = ("trained", "final", "search")   # a trial's weights, most trained first


def trained_record(study: optuna.Study, trial: FrozenTrial | int) -> dict | None:
    """`microser train`'s record for a trial: ``{"spec", "ccc", "test_ccc", "weights", "settings", ...}``, or None."""
    return study.user_attrs.get(f"{TRAINED_PREFIX}{trial_of(study, trial).number}")


def _stage_weights(study: optuna.Study, t: FrozenTrial, stage: str) -> dict | None:
    if stage == "trained":
        record = trained_record(study, t)
    elif stage == "final":
        record = final_record(study, t)
    else:
        return t.user_attrs.get("weights")
    return (record or {}).get("weights")


def weights_stage(study: optuna.Study, trial: FrozenTrial | int, stage: str = "trained") -> str | None:
    """The first of ``WEIGHT_STAGES`` from ``stage`` downwards whose weights the trial has (None: it has none).

    ``stage="trained"`` (trained > final > search) is what compress, export and evaluate use.
    """
    if stage not in WEIGHT_STAGES:
        raise MicroserError(f"weights stage {stage!r} is not known: expected one of {', '.join(WEIGHT_STAGES)}")
    t = trial_of(study, trial)
    return next((s for s in WEIGHT_STAGES[WEIGHT_STAGES.index(stage):] if _stage_weights(study, t, s)), None)


def load_trial_weights(study: optuna.Study, trial: FrozenTrial | int, stage: str = "trained", *,
                       artifacts: str | Path | None = None) -> dict:
    """The trial's state dict, checked against its recorded sha256.

    The weights of the first stage from ``stage`` downwards that the trial has
    (``weights_stage``): ``"trained"`` gives `microser train`'s weights, else
    the final stage's (its first seed), else the first rung's; ``"final"``
    skips trained ones; ``"search"`` always gives the first-rung weights. A
    trained record may hold another architecture than the trial's (a
    compressed trial trained): build the model from
    ``trained_record(...)["spec"]`` then. ``artifacts`` overrides the folder
    recorded in the study (for a moved study).
    """
    t = trial_of(study, trial)
    which = weights_stage(study, t, stage)
    weights = _stage_weights(study, t, which) if which else None
    if not weights:
        raise MicroserError(f"trial {t.number} of study {study.study_name!r} has no weights (it was "
                            f"{t.user_attrs.get('rejected') or t.state.name}): pick a trained trial")
    return load_weights(study, weights, what=f"trial {t.number}", artifacts=artifacts)
