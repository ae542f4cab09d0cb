"""Long training of one trial's architecture (`microser train`): the recipe, K seeds, the "trained" stage.

The search trains each candidate briefly and its final stage a few hundred
steps; the architecture chosen for firmware deserves a training to
convergence. :func:`train_trial` takes a trial of a study (a search trial, a
reference, or with ``compressed`` the pruned architecture `microser
compress` wrote for it), trains it from scratch or from its most trained
weights (``init``) with the long-training recipe (:func:`train_config`:
``microser.distill.train`` with validation every ``EVAL_EVERY`` steps on the
whole validation split, an EMA of the weights, the best validated weights
kept, the "hold" schedule: the peak learning rate until validation stops
improving, then an anneal to zero and a stop), for ``steps`` or a wall-clock budget, with K seeds of
which the best on validation is kept. The result is the trial's "trained"
stage: its weights as an Optuna artifact, and the study user attribute
``trained:<N>`` (``microser.rungs.trained_record``) with its spec,
settings, validation and test CCC and learning curves. `compress`,
`export` and `evaluate` then use these weights (stage order trained > final
> search, ``microser.rungs.weights_stage``).

Resumable: every seed trains with a checkpoint in ``trained_dir(study,
trial)`` named by the seed and a digest of the settings, so the same command
after a kill continues where the last checkpoint left it (at most
``CHECKPOINT_SECONDS`` of training lost) and ends with the same result.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from microser.errors import MicroserError

# Length: measured on the 2-core development machine, the main job's pick (27,151 params, 16,467 trainable)
# trains at DEFAULT_STEPS in about 15 minutes with 2 threads; see docs/ARCHITECTURE.md ("Long training").
DEFAULT_STEPS = 12_000
EVAL_EVERY = 250          # optimizer steps between validations on the whole validation split
EMA_DECAY = 0.999         # averages over about the last 1,000 steps
PATIENCE = 12             # validations without a better mean CCC before the anneal starts (3,000 steps)
SCHEDULE = "hold"         # peak lr until validation plateaus, then anneal and stop (docs/DECISIONS.md)
CHECKPOINT_SECONDS = 30.0
PROBE_STEPS = 40          # steps timed to turn a --time budget into steps


def train_config(*, steps: int | None = None, seed: int = 0, threads: int | None = None, device: str = "auto",
                 **overrides) -> TrainConfig:
    """The long-training recipe of `microser train` (``steps`` default ``DEFAULT_STEPS``), with ``overrides``."""
    from microser.train_config import TrainConfig

    base = dict(steps=steps or DEFAULT_STEPS, crop_seconds=1.0, crops_per_segment=2, batch_size=16,
                eval_every=EVAL_EVERY, ema_decay=EMA_DECAY, keep_best=True, patience=PATIENCE, schedule=SCHEDULE,
                seed=seed, threads=threads, device=device)
    return TrainConfig(**{**base, **overrides})


@dataclass
class SeedRun:
    """One seed's training: validation CCC of the weights it returned, their test CCC, its curve."""

    seed: int
    ccc: dict                       # validation ccc_report of the returned (best validated) weights
    test_ccc: dict | None           # the same weights on the test split (None: fewer than 2 test segments)
    steps: int                      # optimizer steps taken
    total_steps: int                # steps the schedule was laid out for
    best_step: int | None
    early_stopped: bool
    resumed_at: int | None          # the step its checkpoint resumed from in this call (None: started fresh;
    #                                 equal to steps: it had finished before)
    train_seconds: float            # wall seconds of training, earlier sessions included
    collapsed: str | None
    curve: list[list[float]]        # [step, validation mean CCC, mean train loss since the previous point]
    checkpoint: str


@dataclass
class TrainReport:
    """What ``train_trial`` did: per seed, the kept seed, the stage before, where everything went."""

    study: str
    trial: int
    source: str                     # "trial", "reference NAME" or "compressed"
    summary: str
    spec: dict
    init: str | None                # the weights training started from ("trained", "final", "search",
    #                                 "compressed"), None: from scratch
    seeds: list[SeedRun]
    kept_seed: int
    ccc: dict                       # validation CCC of the kept weights
    test_ccc: dict | None
    spread: dict                    # {"valid": {"min", "max", "std"}, "test": ...} of mean CCC over seeds
    before: dict | None             # {"stage", "ccc", "test_ccc"}: the weights compress/export used before
    settings: dict                  # the TrainConfig (seed of the kept run), plus "time" and "seeds"
    weights: dict                   # {"artifact_id", "sha256"}
    folder: str                     # checkpoints and curves.png
    curves: str                     # the PNG of the learning curves
    device: str
    seconds: float                  # wall seconds of this call

    def to_dict(self) -> dict:
        return asdict(self)


def trained_dir(study, trial: int) -> Path:
    """``<study artifacts>/trained/trial-<N>``: checkpoints and learning curves of `microser train`."""
    from microser.storage import study_settings

    return Path(study_settings(study)["artifacts"]) / "trained" / f"trial-{int(trial)}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _resolve(study, trial: int, *, compressed: bool, init: bool):
    """(spec, source, initial state dict or None, init stage or None) of a trial, checked before any training."""
    from microser.loading import load_compressed, load_trial_model
    from microser.models.spec import ArchSpec
    from microser.rungs import trial_of as _trial, weights_stage

    t = _trial(study, trial)
    if compressed:
        model, spec, _, _ = load_compressed(study, t.number)
        return spec, "compressed", (model.state_dict() if init else None), ("compressed" if init else None)
    if not t.user_attrs.get("spec"):
        raise MicroserError(f"trial {t.number} of study {study.study_name!r} has no architecture ({t.state.name}): "
                            f"pick a trial with one from `microser trials --study {study.study_name}`")
    source = f"reference {t.user_attrs['reference']}" if t.user_attrs.get("reference") else "trial"
    if not init:
        return ArchSpec.from_json(t.user_attrs["spec"]), source, None, None
    if weights_stage(study, t) is None:
        raise MicroserError(f"trial {t.number} of study {study.study_name!r} has no weights to start from (--init; "
                            f"it was {t.user_attrs.get('rejected') or t.state.name}): drop --init to train it from "
                            "scratch")
    model, spec, which = load_trial_model(study, t.number)
    return spec, source, model.state_dict(), which


def _before(study, trial: int, data, compressed: bool) -> dict | None:
    """Validation and test CCC of the weights compress/export would have used before this training."""
    from microser.distill import evaluate
    from microser.loading import load_compressed, load_trial_model
    from microser.rungs import weights_stage

    if compressed:
        model, stage = load_compressed(study, trial)[0], "compressed"
    elif weights_stage(study, trial) is None:
        return None
    else:
        model, _, stage = load_trial_model(study, trial)
    test = evaluate(model, data, "test") if len(data.split_indices("test")) >= 2 else None
    return {"stage": stage, "ccc": evaluate(model, data, "valid"), "test_ccc": test}


def plan_steps(model, data, config: TrainConfig, seconds: float) -> tuple[int, float]:
    """Steps that fill ``seconds`` of training on this machine, and the measured steps per second.

    Times ``PROBE_STEPS`` steps and one validation of a copy of ``model`` (a few seconds), then counts a
    validation every ``config.eval_every`` steps.
    """
    from microser.distill import train

    probe = replace(config, steps=PROBE_STEPS, epochs=None, eval_every=None, ema_decay=0.0, keep_best=False,
                    patience=None)
    result = train(copy.deepcopy(model), data, probe)
    per_second = result.samples_per_second / config.batch_size
    eval_seconds = result.history[-1]["eval_seconds"] if result.history else 0.0
    per_step = 1.0 / per_second + eval_seconds / (config.eval_every or PROBE_STEPS)
    return max(PROBE_STEPS, int(seconds / per_step)), per_second


def train_trial(study, trial: int, *, steps: int | None = None, seconds: float | None = None, seeds: int = 1,
                seed: int = 0, init: bool = False, compressed: bool = False, device: str = "auto",
                threads: int | None = None, cache=None, progress: Callable[[dict], None] | None = None,
                **overrides) -> TrainReport:
    """Train one trial's architecture long, keep the best of ``seeds`` runs, store it as the "trained" stage.

    Args:
        study: an ``optuna.Study`` made by ``microser search``.
        trial: its trial number (a search trial, a reference, or with ``compressed`` a compressed trial).
        steps: optimizer steps per seed (default ``DEFAULT_STEPS``); or
        seconds: a wall-clock budget for the whole call, split evenly over the seeds and turned into steps by
            timing a few (``plan_steps``; the plan is kept, so a resumed run trains the same steps).
        seeds: train seeds ``seed .. seed + seeds - 1``; the best on validation is kept, the spread reported.
        init: start from the trial's most trained weights (trained > final > search; the compressed weights
            with ``compressed``) instead of a fresh initialization.
        compressed: train the pruned architecture of `microser compress` for this trial.
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
        threads: torch threads (default: every core this process may use).
        cache: cache folder (default: the study's).
        progress: receives dicts: ``{"kind": "plan" | "seed" | "step" | "eval" | "seed_done", ...}``.
        overrides: other ``TrainConfig`` fields (e.g. ``eval_every``, ``patience``) on top of ``train_config``.

    Returns:
        a :class:`TrainReport`; the study gets ``trained:<trial>`` and the weights artifact.
    """
    import time

    import torch

    from microser.cache import Cache
    from microser.distill import evaluate, resolve_device, train
    from microser.models.spec import build_model
    from microser.rungs import TRAINED_PREFIX
    from microser.storage import artifact_store, save_weights, study_settings

    t_start = time.perf_counter()
    if steps is not None and seconds is not None:
        raise MicroserError(f"got --steps {steps} and --time {seconds:g} s: give one of them")
    if steps is not None and steps < 1:
        raise MicroserError(f"--steps {steps}: expected optimizer steps >= 1, e.g. --steps {DEFAULT_STEPS}")
    if seeds < 1:
        raise MicroserError(f"--seeds {seeds}: expected 1 or more seeds to train, e.g. --seeds 3")
    emit = progress or (lambda event: None)
    torch_device = resolve_device(device)
    settings = study_settings(study)
    data = Cache.open(cache or settings["cache"])
    spec, source, init_state, init_stage = _resolve(study, trial, compressed=compressed, init=init)
    threads = threads or _cores()
    config = train_config(steps=steps, threads=threads, device=device, **overrides)
    folder = trained_dir(study, trial)
    folder.mkdir(parents=True, exist_ok=True)
    init_digest = None
    if init_state is not None:
        init_digest = _digest({k: hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()
                               for k, v in init_state.items()})
    identity = {"spec": spec.to_json(), "init": [init_stage, init_digest],
                "config": {k: v for k, v in config.to_dict().items() if k not in ("seed", "threads", "device")}}

    def fresh_model(s: int):
        torch.manual_seed(s)
        model = build_model(spec)
        if init_state is not None:
            model.load_state_dict(init_state)
        return model

    if seconds is not None:   # a time budget becomes steps once; the plan is kept for a resumed run
        plan_file = folder / f"plan-{_digest({**identity, 'seconds': seconds, 'seeds': seeds})}.json"
        if plan_file.is_file():
            plan = json.loads(plan_file.read_text())
        else:
            emit({"kind": "plan", "seconds": seconds})
            n, per_second = plan_steps(fresh_model(seed), data, config, seconds / seeds)
            plan = {"seconds": seconds, "seeds": seeds, "steps": n, "steps_per_second": per_second}
            plan_file.write_text(json.dumps(plan) + "\n")
        config = replace(config, steps=int(plan["steps"]))
        identity["config"]["steps"] = config.steps
        emit({"kind": "plan", **plan})

    before = _before(study, trial, data, compressed)
    runs, states = [], {}
    has_test = len(data.split_indices("test")) >= 2
    for k in range(seeds):
        s = seed + k
        run_config = replace(config, seed=s)
        checkpoint = folder / f"seed-{s}-{_digest(identity)}.ckpt"
        emit({"kind": "seed", "index": k, "count": seeds, "seed": s, "steps": config.steps})
        model = fresh_model(s)
        result = train(model, data, run_config, checkpoint=checkpoint, checkpoint_seconds=CHECKPOINT_SECONDS,
                       on_step=lambda info, s=s: emit({"kind": "step", "seed": s, **info}),
                       progress=lambda info, s=s: emit({"kind": "eval", "seed": s, **info}))
        test = evaluate(model, data, "test") if has_test else None
        runs.append(SeedRun(
            seed=s, ccc=result.ccc, test_ccc=test, steps=result.steps, total_steps=result.total_steps,
            best_step=result.best_step, early_stopped=result.early_stopped,
            resumed_at=result.resumed_at,
            train_seconds=result.history[-1]["seconds"] if result.history else result.train_seconds,
            collapsed=result.collapse_message, checkpoint=str(checkpoint),
            curve=[[h["step"], h["valid"]["mean"], h["loss"]] for h in result.history]))
        states[s] = result.state_dict
        emit({"kind": "seed_done", "seed": s, "ccc": result.ccc, "test_ccc": test})

    kept = max(runs, key=lambda r: (r.ccc["mean"] if r.ccc["mean"] == r.ccc["mean"] else -2.0, -r.seed))
    spread = {split: _spread([getattr(r, key)["mean"] for r in runs if getattr(r, key)])
              for split, key in (("valid", "ccc"), ("test", "test_ccc"))}
    curves = folder / "curves.png"
    store = artifact_store(settings["artifacts"])
    weights = save_weights(states[kept.seed], store=store, study_or_trial=study, name=f"trial-{int(trial)}-trained")
    report_settings = {**replace(config, seed=kept.seed).to_dict(), "time": seconds, "seeds": seeds,
                       "first_seed": seed}
    report = TrainReport(
        study=study.study_name, trial=int(trial), source=source, summary=spec.summary(), spec=spec.to_dict(),
        init=init_stage, seeds=runs, kept_seed=kept.seed, ccc=kept.ccc, test_ccc=kept.test_ccc, spread=spread,
        before=before, settings=report_settings, weights=weights, folder=str(folder), curves=str(curves),
        device=str(torch_device), seconds=time.perf_counter() - t_start)
    plot_curves(report, curves)
    study.set_user_attr(f"{TRAINED_PREFIX}{int(trial)}", {
        "spec": spec.to_json(), "summary": spec.summary(), "source": source, "init": init_stage,
        "ccc": kept.ccc, "test_ccc": kept.test_ccc, "weights": weights, "settings": report_settings,
        "kept_seed": kept.seed, "spread": spread, "before": before, "curves": str(curves),
        "seeds": [{"seed": r.seed, "ccc": r.ccc["mean"], "test_ccc": (r.test_ccc or {}).get("mean"),
                   "steps": r.steps, "best_step": r.best_step, "early_stopped": r.early_stopped,
                   "curve": r.curve} for r in runs],
        "train_seconds": sum(r.train_seconds for r in runs), "device": str(torch_device),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return report


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"min": float(v.min()), "max": float(v.max()), "std": float(v.std())}


def plot_curves(report: TrainReport, path) -> Path:
    """PNG of the learning curves: validation mean CCC and train loss against steps, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True, constrained_layout=True)
    for r in report.seeds:
        if not r.curve:
            continue
        steps, valid, loss = (np.asarray(c, dtype=float) for c in zip(*r.curve))
        kept = r.seed == report.kept_seed
        style = dict(linewidth=2.0 if kept else 1.0, alpha=1.0 if kept else 0.6)
        label = f"seed {r.seed}" + (" (kept)" if kept else "")
        line, = top.plot(steps, valid, marker=".", label=label, **style)
        if r.best_step is not None and r.best_step in steps:
            top.plot([r.best_step], [valid[list(steps).index(r.best_step)]], "*", color=line.get_color(),
                     markersize=12)
        bottom.plot(steps, loss, color=line.get_color(), **style)
    top.set_ylabel("validation mean CCC")
    top.set_title(f"study {report.study} trial {report.trial}: {report.summary}", fontsize=9)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="lower right")
    bottom.set_ylabel("train loss (1 - CCC + w MSE)")
    bottom.set_xlabel("optimizer step (star: the kept weights)")
    bottom.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
