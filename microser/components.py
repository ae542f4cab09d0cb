"""What a search works with, opened: its data, its space, its study, the trainer and the cost measure.

``Components`` holds the pieces ``microser.search`` calls; the defaults are
the real ones (``distill_spec`` trains, ``measure_spec`` measures costs) and
tests swap in fakes with the same signatures. ``probe_budgets`` tells an
impossible budget before anything is trained.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import torch

from microser.budgets import describe_violations
from microser.cache import Cache
from microser.costs import measure_costs
from microser.distill import predict, train
from microser.errors import MicroserError
from microser.metrics import ccc_report, parts_report
from microser.models.spec import build_model
from microser.samplers import make_sampler
from microser.search_config import SearchConfig
from microser.space import SearchSpace, space_path
from microser.splits import Split
from microser.storage import open_storage
from microser.urls import safe_url

PROBE_DRAWS = 48                # random candidates measured up front to tell an impossible budget early
SPEED_PROBE_STEPS = (4, 12)     # optimizer steps of the speed probe: untimed warm-up, then timed


@dataclass
class SearchEvent:
    """What the progress callback receives (rendered by ``microser.show.search_live``)."""

    kind: str                 # "start" | "measure" | "train" | "epoch" | "trial" | "rejected" | "final" | "done"
    stage: str                # "references" | "search" | "final"
    trained: int              # candidates trained at the first rung (all workers)
    rungs: list[int]          # trials completed at each rung
    rejected: int
    best_ccc: float | None    # best mean validation CCC of a feasible trial at the highest rung reached
    eta_seconds: float | None  # until the command ends (search stage + final stage)
    message: str = ""
    final_done: int = 0
    final_total: int = 0


@dataclass
class TrainOutcome:
    """What a trainer returns for one candidate."""

    state_dict: dict
    ccc: dict                       # validation ccc_report (whole subset)
    train_seconds: float
    samples_per_second: float
    steps: int = 0
    collapsed: str | None = None    # the collapse message, when predictions were constant
    eval_seconds: float = 0.0       # of train_seconds, the time spent validating (the rest is optimizer steps)
    test_ccc: dict | None = None    # test ccc_report, when the split has a test part (final stage)
    test_parts: dict | None = None  # metrics.parts_report of the same test predictions (r, bias, scale)


def measure_spec(spec, input_seconds: float) -> dict:
    """Every cost of ``spec`` at ``input_seconds`` (``microser.costs.measure_costs``), plus the duration."""
    costs = measure_costs(spec, input_seconds=input_seconds).to_dict()
    return {**costs, "input_seconds": input_seconds}


def distill_spec(spec, data, train_config, *, split: Split, progress=None, should_stop=None) -> TrainOutcome:
    """Build ``spec`` (torch seeded with the config's seed), distil it on ``split``, score validation (and test)."""
    torch.manual_seed(train_config.seed)
    model = build_model(spec)
    result = train(model, data, train_config, train_idx=split.train, valid_idx=split.valid, progress=progress,
                   should_stop=should_stop)
    model.load_state_dict(result.state_dict)
    test_ccc = test_parts = None
    if split.test is not None and len(split.test) >= 2:
        test = np.asarray(split.test, dtype=np.int64)
        pred, truth = predict(model, data, test), np.asarray(data.targets, dtype=np.float32)[test]
        test_ccc, test_parts = ccc_report(pred, truth), parts_report(pred, truth)
    return TrainOutcome(state_dict=result.state_dict, ccc=result.ccc, train_seconds=result.train_seconds,
                        eval_seconds=float(sum(h.get("eval_seconds", 0.0) for h in result.history)),
                        samples_per_second=result.samples_per_second, steps=result.steps,
                        collapsed=result.collapse_message if result.collapsed else None, test_ccc=test_ccc,
                        test_parts=test_parts)


def probe_step_seconds(data, train_config) -> float:
    """Seconds per optimizer step of ``fidelity.PROBE_SPEC`` on ``data`` with ``train_config``'s recipe and threads.

    Trains ``SPEED_PROBE_STEPS`` steps (about 3 s on the calibration machine) and returns the median time between
    the timed steps' ends, so a first slow batch or one hiccup does not move it; validation is on two segments
    and not timed. What the time plan divides by (``fidelity.machine_speed``).
    """
    from dataclasses import replace

    from microser.fidelity import PROBE_SPEC
    from microser.models.spec import resolve_spec

    warm, timed = SPEED_PROBE_STEPS
    steps = warm + timed + 1
    torch.manual_seed(train_config.seed)
    model = build_model(resolve_spec(PROBE_SPEC))
    ends: list[float] = []
    valid = np.asarray(data.split_indices("valid"))[:2]
    train(model, data, replace(train_config, steps=steps, epochs=None, eval_every=steps, ema_decay=0.0,
                               keep_best=False, patience=None),
          valid_idx=valid, on_step=lambda info: ends.append(time.perf_counter()))
    gaps = np.diff(ends[warm:])
    return float(np.median(gaps))


@dataclass
class Components:
    """The pieces a search calls; defaults are the real ones, tests swap in fakes."""

    trainer: Callable = distill_spec
    measure: Callable = measure_spec
    space: Any = None          # an object with .suggest(trial) -> ArchSpec; None: load config.space
    data: Any = None           # a Cache; None: open config.cache (or the demo cache)
    resolve_reference: Callable | None = None   # name -> ArchSpec; None: microser.models.spec.resolve_spec
    load_spec: Callable | None = None           # JSON -> ArchSpec; None: ArchSpec.from_json
    clock: Callable[[], float] = time.monotonic  # seconds; the wall-clock budget and job times read it
    step_seconds: Callable = probe_step_seconds  # (data, TrainConfig) -> seconds per step; plans --time for this machine


def open_data(config: SearchConfig, components: Components):
    if components.data is not None:
        return components.data, str(getattr(components.data, "path", "<in-memory>"))

    if config.cache is None:
        from microser.demo import ensure_demo_cache

        path = Path(ensure_demo_cache())
    else:
        path = Path(config.cache)
    return Cache.open(path), str(path.resolve())


def open_space(config: SearchConfig, components: Components) -> tuple[Any, Path]:
    """The search space and its file (``space.space_path``: a packaged name is its file, so its sha256 is recorded)."""
    path = space_path(config.space)
    if components.space is not None:
        return components.space, path
    return SearchSpace.load(path), path


def open_study(config: SearchConfig, *, worker: int = 0, create: bool = False) -> optuna.Study:
    """Open (or, with ``create``, create) the study named by ``config`` with this worker's sampler."""
    name = config.study_name
    storage = open_storage(config.storage, name)
    directions = ["maximize"] + ["minimize"] * len(config.objectives)
    sampler = make_sampler(config)
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        if not create:
            raise MicroserError(f"study {name!r} is not in {safe_url(config.storage or '')}: start the search "
                                "first") from None
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["ccc_mean", *config.objectives])
    return study


def probe_budgets(config, budgets, space, measure, space_path: Path) -> None:
    """MicroserError when none of ``PROBE_DRAWS`` random candidates fits the budgets (nothing trained yet)."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=config.seed))
    smallest = {b.metric: math.inf for b in budgets}
    for _ in range(PROBE_DRAWS):
        trial = probe.ask()
        costs = measure(space.suggest(trial))
        if not describe_violations(budgets, costs):
            return
        for b in budgets:
            smallest[b.metric] = min(smallest[b.metric], float(costs[b.metric]))
        probe.tell(trial, 0.0)
    seen = ", ".join(f"{k} {int(v)}" for k, v in smallest.items())
    raise MicroserError(f"budget {', '.join(b.text for b in budgets)} looks impossible: none of {PROBE_DRAWS} "
                        f"candidates drawn from {space_path} fits (smallest seen: {seen}); raise the budget or "
                        "use a space with smaller models (--space)")
