"""Fidelity in optimizer steps: the rungs of a search and its final stage, planned from a wall-clock budget.

A step is one batch of ``batch_size`` random crops of ``crop_seconds``, so a
trial's cost does not depend on the cache's size (one epoch of a 100-hour
cache is about 20,000 steps; of a small real corpus a few dozen). Epochs stay
available and are converted to steps on the cache at hand. The fidelity is
fixed when a study is created and is part of its identity.

A ``--time`` budget buys steps at the speed of the machine it runs on: the
search times a few steps of a fixed probe model (``PROBE_SPEC``) before it
creates the study and plans for the budget that speed buys
(``machine_speed``), so a slower machine gets lower rungs and a final stage
that still sits above the top rung, and a faster one (or a GPU) trains longer.
The top rung is planned from what the final stage can train in its share of
the time at the probe's speed (``final_share_steps``; the probe model is the
reference, the final stage's slowest member as a rule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from microser.splits import speaker_folds

FINAL_TIME_SHARE = 0.5   # with --time, the search stage stops when the final stage's estimate or this share is left
FINAL_EVALUATION_SCALE = 4   # the final stage validates (and tests) on 4x the audio of a rung evaluation
FEW_VALID_SPEAKERS = 4   # a validation split of at most this many speakers gets rotating folds in the final stage

# The machine the 10-minute plan was calibrated on: a 2-core AMD EPYC (x86-64, torch 2.14.1) trains the probe
# model (the paper's Wav2Small) at this many seconds per optimizer step with the search's default recipe on 2
# threads (median of 10 probes on the espeak-emo and ravdess-dev caches, 0.149-0.177). Measure another machine
# with `python bench/machine_speed.py` (docs/DECISIONS.md, "The time plan measures the machine").
PROBE_SPEC = "wav2small-ref"        # a fixed model, so the probe measures the machine and the recipe, not a candidate
CALIBRATION_STEP_SECONDS = 0.162
SPEED_DEAD_BAND = (0.8, 1.25)       # a measured speed this close to the calibration plans exactly as calibrated
SPEED_LIMITS = (0.1, 30.0)          # beyond these the plan is clamped (a probe disturbed by other work)
# A finalist's seconds per step as a share of the reference's, set at a sixth (three seats: half) from a kept
# ravdess-small run (the reference took 190 of the final stage's 281 s). Optimistic: three finalists took 0.60-1.39
# of the reference's training time in the EPYC runs of docs/DECISIONS.md, "The top rung follows the final stage's
# share of the time" (median 0.72); the top rung's 0.6 kept the final stage above it there.
FINALIST_PER_REFERENCE = 1 / 6
ESTIMATE_MARGIN = 0.9   # the share of the time left that the final stage plans to use (a tenth for estimate error)


def plan_steps(seconds: float | None, speed: float = 1.0,
               final_share: int | None = None) -> tuple[tuple[int, ...], int]:
    """Rungs and final-stage steps for a wall-clock budget (None: the 10-minute plan) at a machine ``speed``.

    Calibrated on 2 CPU cores (docs/search.md): at 10 minutes, rungs of 60, 200
    and 600 steps and a final stage of 1,000 steps leave time for about 25
    candidates, 3 finalists and the reference with 2 seeds each. Longer budgets
    raise the top rungs and the final stage (fidelity grows like time^0.75, the
    number of candidates like time^0.25); shorter ones lower them. ``speed``
    (``machine_speed``: optimizer steps per second relative to the calibration
    machine) scales the steps: a faster machine plans like a longer budget; a
    slower one plans ``speed^1.5`` of the steps, because it is slower still on
    what the probe does not time (the final stage's validation on 4x the audio
    and its test, whole-clip inference): at ``speed^0.75`` (like a shorter
    budget) and at ``speed`` the final stage trained about half its planned
    steps there, under the top rung (docs/DECISIONS.md, "The time plan
    measures the machine"). The top rung is 0.6 of the final stage, or of
    ``final_share`` when that is lower (``final_share_steps``: the steps the
    final stage can train in its share of the time at the probe's speed, so
    that the final stage is not below the rung that ranked its finalists;
    the final stage still trains up to the planned steps when time is left);
    rungs grow about 3x from 60 steps, and a rung closer than 1.5x below the
    top one is dropped for it.
    """
    scale = (seconds or 600.0) / 600.0
    steps = 1000 * (scale * speed) ** 0.75 if speed >= 1 else 1000 * scale ** 0.75 * speed ** 1.5
    final = int(min(20_000, max(200, round(steps / 50) * 50)))
    top = int(max(60, round(0.6 * (final if final_share is None else min(final, final_share)) / 10) * 10))
    rungs = [60]
    while rungs[-1] * 3 < top:
        rungs.append(int(round(rungs[-1] * 10 / 3 / 10) * 10))
    if top > rungs[-1]:
        if len(rungs) > 1 and top < 1.5 * rungs[-1]:
            rungs.pop()
        rungs.append(top)
    return tuple(rungs), final


def machine_speed(step_seconds: float, workers: int = 1) -> float:
    """The speed a time plan uses: steps per second of ``workers`` (each timed at ``step_seconds`` per probe step)
    relative to the calibration machine; 1.0 inside ``SPEED_DEAD_BAND`` (timing noise does not move the plan),
    clamped to ``SPEED_LIMITS``, rounded to two digits."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds!r}")
    speed = workers * CALIBRATION_STEP_SECONDS / step_seconds
    if SPEED_DEAD_BAND[0] <= speed <= SPEED_DEAD_BAND[1]:
        return 1.0
    return round(min(SPEED_LIMITS[1], max(SPEED_LIMITS[0], speed)), 2)


def final_share_steps(seconds: float, step_seconds: float, workers: int, seeds: int, references: int,
                      finalists: int = 3) -> int | None:
    """Optimizer steps the final stage can train in its share of ``seconds`` (``FINAL_TIME_SHARE``, less the
    ``ESTIMATE_MARGIN``) when its ``references`` train at the probe's ``step_seconds`` (the probe model is the
    reference) and each of its ``finalists`` at ``FINALIST_PER_REFERENCE`` of that, ``seeds`` each, over
    ``workers``. What the top rung is planned from (``plan_steps``); None when there is no final stage to train
    (no references and ``--final-k 0``, or no seeds): nothing to keep the top rung under."""
    if not step_seconds > 0:
        raise ValueError(f"step_seconds must be positive, got {step_seconds!r}")
    members = references + finalists * FINALIST_PER_REFERENCE
    if members <= 0 or seeds <= 0:
        return None
    per_step = seeds * step_seconds * members / max(1, workers)
    return int(ESTIMATE_MARGIN * FINAL_TIME_SHARE * seconds / per_step)


def plans_from_time(config) -> bool:
    """Whether a search with ``config`` takes any of its steps from the ``--time`` plan (then the machine counts)."""
    if config.time is None:
        return False
    rungs_given = bool(config.rungs) or config.epochs is not None
    final_given = config.final_steps is not None or config.final_epochs is not None
    return not (rungs_given and final_given)


@dataclass(frozen=True)
class Fidelity:
    """What every number of a study means: steps per rung, the final stage, and the recipe (frozen at creation)."""

    rungs: tuple[int, ...]
    final_steps: int
    final_seeds: int
    folds: int                # speaker folds the final seeds rotate over (1: the cache's own split only)
    eta: int
    crop_seconds: float
    crops_per_segment: int
    batch_size: int
    valid_seconds: float | None

    def to_dict(self) -> dict:
        return {**asdict(self), "rungs": list(self.rungs)}

    @classmethod
    def from_dict(cls, d: dict) -> "Fidelity":
        return cls(**{**d, "rungs": tuple(d["rungs"])})

    def train_config(self, steps: int, seed: int, threads: int | None = None):
        """The `TrainConfig` of one job of the search (a rung or a final-stage seed): ``steps`` of this recipe,
        one validation after the last step (the only one a job reads)."""
        from microser.train_config import TrainConfig

        return TrainConfig(steps=steps, crop_seconds=self.crop_seconds, crops_per_segment=self.crops_per_segment,
                           batch_size=self.batch_size, seed=seed, threads=threads, eval_every=steps)


def measure_time_plan(config, old: dict | None, probe: Callable[[object], float], threads: int) -> dict | None:
    """How fast this machine trains, for a plan from ``--time`` (None when nothing is planned from time).

    A new study times the probe model: ``probe(train_config)`` returns seconds per step of the study's recipe on
    one worker's ``threads`` (``Components.step_seconds``); a resumed study keeps the speed it was planned at
    (``old``, its stored settings; older studies: the calibration, 1.0), so its fidelity, part of its identity,
    comes out the same on any machine that resumes it.
    """
    if not plans_from_time(config):
        return None
    if old is not None:
        return old.get("time_plan") or {"speed": 1.0}
    recipe = Fidelity(rungs=(1,), final_steps=1, final_seeds=1, folds=1, eta=config.eta,
                      crop_seconds=config.crop_seconds, crops_per_segment=config.crops_per_segment,
                      batch_size=config.batch_size, valid_seconds=config.valid_seconds)
    step_seconds = float(probe(recipe.train_config(1, config.seed, threads)))
    return {"step_seconds": round(step_seconds, 4), "calibration_step_seconds": CALIBRATION_STEP_SECONDS,
            "workers": config.workers, "speed": machine_speed(step_seconds, config.workers),
            "final_share_steps": final_share_steps(config.time, step_seconds, config.workers, config.final_seeds,
                                                   len(config.references), config.final_k)}


def speed_note(time_plan: dict | None) -> str:
    """The search's start line's account of the machine speed its plan assumed ("" when none was measured)."""
    if not time_plan or "step_seconds" not in time_plan:
        return ""
    share = time_plan.get("final_share_steps")
    return (f"; planned for {time_plan['speed']:g}x the calibration machine's speed (probe "
            f"{time_plan['step_seconds']:.3f} s per step, calibration {time_plan['calibration_step_seconds']:.3f})"
            + (f", top rung 0.6 of the {share} final-stage steps its share of the time trains at the probe's speed"
               if share is not None else ""))


def steps_for_epochs(epochs: float, n_train: int, config) -> int:
    """Optimizer steps of ``epochs`` passes over ``n_train`` segments (``crops_per_segment`` crops each)."""
    per_epoch = max(1, n_train * config.crops_per_segment // config.batch_size)
    return max(1, int(round(epochs * per_epoch)))


def resolve_fidelity(config, data, speed: float = 1.0, final_share: int | None = None) -> Fidelity:
    """The study's fidelity: rungs and final steps from the config, from epochs of this cache, or planned from time
    at the machine ``speed`` (``machine_speed``) with the top rung under the final stage's ``final_share`` of
    steps (``final_share_steps``; None: 0.6 of the planned final stage, as studies made before it)."""
    planned_rungs, planned_final = plan_steps(config.time, speed, final_share)
    n_train = len(data.split_indices("train")) if hasattr(data, "split_indices") else 0
    if config.epochs is not None:
        rungs = (steps_for_epochs(config.epochs, n_train, config),)
    else:
        rungs = tuple(config.rungs) if config.rungs else planned_rungs
    if config.final_epochs is not None:
        final = steps_for_epochs(config.final_epochs, n_train, config)
    else:
        final = config.final_steps or max(planned_final, rungs[-1])
    folds = 1
    if config.folds == "auto" and config.final_seeds > 1:
        folds = len(speaker_folds(data, config.final_seeds)) if hasattr(data, "split_indices") else 1
        if folds > 1 and len(speaker_folds(data, 1)[0][2]) > FEW_VALID_SPEAKERS:
            folds = 1
    return Fidelity(rungs=rungs, final_steps=final, final_seeds=config.final_seeds, folds=folds, eta=config.eta,
                    crop_seconds=config.crop_seconds, crops_per_segment=config.crops_per_segment,
                    batch_size=config.batch_size, valid_seconds=config.valid_seconds)

