"""Search orchestration: an Optuna multi-objective study over a search space, with budgets, workers and a final stage.

One trial: the space suggests an ``ArchSpec``; its costs are measured (cheap:
one ONNX export); budgets become constraints (``trial.set_constraint``, value
``cost - limit``); a candidate over budget is recorded COMPLETE with its
costs, its constraints, the sentinel CCC ``REJECTED_CCC`` and the user
attribute ``rejected: "over budget: ..."`` and is never trained. Otherwise it
is distilled briefly (``microser.distill``) and scored by the mean validation
CCC. Objectives: maximize that CCC, minimize the costs in ``objectives``.

``trials`` counts trained trials only (not rejected candidates, not
references); the same call again resumes up to that count. ``workers`` runs
that many processes on one storage. After the search, the final stage
retrains the top-``final_k`` feasible Pareto candidates and the references for
``final_epochs`` with a fresh seed; Optuna refuses to change finished trials,
so those results go to the study user attribute ``final:<trial number>``
(read them with ``microser.storage.final_record``), their weights to the
artifact store. User attributes of each trial are listed in
docs/ARCHITECTURE.md ("Trials").
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from microser import __version__, checks
from microser.budgets import Budget, canonical, canonical_dicts, describe_violations, parse_budgets, violations
from microser.errors import MicroserError
from microser.pareto import COST_KEYS, DEFAULT_OBJECTIVES
from microser.storage import (
    FINAL_PREFIX, SETTINGS_ATTR, artifact_store, check_storage_url, check_study_name, default_artifacts_dir,
    fail_dead_trials, final_record, heartbeat_seconds, open_storage, safe_url, save_weights, worker_tag,
)

REJECTED_CCC = -1.0   # the CCC recorded for a candidate rejected before training (the lowest CCC possible)
SAMPLERS = ("tpe", "nsga2", "random")
MAX_REJECTIONS_IN_A_ROW = 200   # then the budget is called impossible for this space
MAX_DUPLICATES_IN_A_ROW = 100   # draws that repeat an earlier trial; then the space is called exhausted
PROBE_DRAWS = 48                # random candidates measured up front to tell an impossible budget early
MAX_FAILURES_IN_A_ROW = 3

# Settings that define what a study's numbers mean: a study resumed with any of these changed is refused.
IDENTITY_KEYS = ("objectives", "budgets", "input_seconds", "cache_fingerprint", "space_sha256", "fidelity",
                 "ram_mode")


@dataclass(frozen=True)
class SearchConfig:
    """Every ``microser search`` setting; the same keys are read from ``--config studies/NAME.toml``.

    Defaults make ``microser search --budget 80k-params`` finish on the demo
    cache in under 10 minutes on 2 cores (see ``bench/search_throughput.py``).
    """

    study: str | None = None          # None: "search-<budgets>" (e.g. search-80k-params)
    storage: str | None = None        # None: sqlite:///studies/<study>.db
    artifacts: str | None = None      # None: <folder of the study file>/<study>-artifacts
    cache: str | None = None          # None: the embedded demo cache (built on first use)
    space: str | None = None          # None: search_spaces/default.toml
    budgets: tuple[str, ...] = ()
    # fp32 ONNX bytes track params closely and a 4-D front keeps almost every trial,
    # so by default CCC is traded against params and int8 peak RAM only.
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    trials: int = 20                  # trained trials (rejected candidates and references not counted)
    timeout: float | None = None      # seconds for the search stage; the running trial finishes
    workers: int = 1
    threads: int | None = None        # torch threads per worker; None: cores // workers
    seed: int = 0
    sampler: str = "tpe"
    # search fidelity: brief; 1 s crops in batches of 16 give twice the optimizer steps of distill's
    # 2 s x 32 for the same audio, and distill fits its warm-up + cosine schedule to the steps given.
    # On the demo cache (834 training clips) one epoch is 52 steps: 4-9 CPU seconds for a candidate.
    epochs: float | None = 1.0
    steps: int | None = None          # instead of epochs
    crop_seconds: float = 1.0
    crops_per_segment: int = 1
    batch_size: int = 16
    input_seconds: float = 1.0        # audio length at which RAM and MACs are measured
    ram_mode: str = "offline"         # "streaming": ram_bytes = the C library's state + arena (microser.cgen)
    # final stage: the top-K feasible Pareto candidates and the references, retrained longer
    final_k: int = 3
    final_epochs: float = 8.0
    references: tuple[str, ...] = ("wav2small-ref",)

    def __post_init__(self):
        self._check_values()
        if self.sampler not in SAMPLERS:
            raise MicroserError(f"sampler {self.sampler!r} is not known: expected one of {', '.join(SAMPLERS)}")
        bad = [o for o in self.objectives if o not in COST_KEYS]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise MicroserError(f"objectives {','.join(self.objectives)!r}: expected distinct cost keys from "
                                f"{', '.join(COST_KEYS)}, e.g. 'params,ram_bytes'")
        if self.epochs is not None and self.steps is not None:
            raise MicroserError(f"epochs={self.epochs} and steps={self.steps}: give one of them (e.g. --epochs 4)")
        parse_budgets(self.budgets)
        if self.ram_mode not in ("offline", "streaming"):
            raise MicroserError(f"ram_mode {self.ram_mode!r}: expected 'offline' or 'streaming'")
        check_study_name(self.study_name)
        if self.storage is not None:
            check_storage_url(self.storage)
        if self.artifacts is not None:
            checks.out_folder("--artifacts", self.artifacts)

    def _check_values(self) -> None:
        """Types and ranges of every value (a config file bypasses the CLI's types), as one-line errors."""
        from microser.frontends import MIN_SECONDS

        for f in fields(self):
            value, option = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(f.default, tuple) and not (isinstance(value, tuple) and all(isinstance(v, str)
                                                                                      for v in value)):
                example = list(f.default) or ["80k-params"]
                raise MicroserError(f"{f.name} {value!r} is not a list of strings: write e.g. {f.name} = {example!r}")
            if f.type in ("str | None", "str") and not isinstance(value, str) and value is not None:
                raise MicroserError(f"{option} {value!r} is not a string: pass e.g. {option} {f.default or 'NAME'}")
        for name, low, example in (("trials", 0, 20), ("workers", 1, 1), ("final_k", 0, 3), ("batch_size", 2, 16),
                                   ("crops_per_segment", 1, 1), ("threads", 1, 1), ("steps", 1, 200)):
            if getattr(self, name) is not None:
                checks.number("--" + name.replace("_", "-"), getattr(self, name), low=low, integer=True,
                              example=example)
        checks.seed("--seed", self.seed)
        for name, example in (("epochs", 1), ("final_epochs", 8), ("timeout", 3600), ("crop_seconds", 1),
                              ("input_seconds", 1)):
            value, option = getattr(self, name), "--" + name.replace("_", "-")
            if value is not None or name not in ("epochs", "timeout"):   # those two may be None
                checks.number(option, value, low=0, low_open=True, example=example,
                              high=checks.MAX_INPUT_SECONDS if name == "input_seconds" else None)
            if name in ("crop_seconds", "input_seconds") and value < MIN_SECONDS:
                raise MicroserError(f"{option} {value:g} is shorter than {MIN_SECONDS:g} s, the shortest input a "
                                    f"microser model takes (its STFT window must fit): pass {option} "
                                    f"{MIN_SECONDS:g} or more, e.g. 1")

    @property
    def study_name(self) -> str:
        """``--study``, else ``search-<budgets>`` with the budgets canonical (sorted, one spelling each)."""
        return self.study or "-".join(["search", *(b.text for b in canonical(parse_budgets(self.budgets)))])

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MicroserError(f"search config key(s) {', '.join(unknown)} not known: expected keys among "
                                f"{', '.join(sorted(known))}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if d.get("steps") is not None and "epochs" not in d:
            d["epochs"] = None    # steps replace the default epochs
        for key in ("budgets", "objectives", "references"):   # one string is accepted for a list
            if isinstance(d.get(key), str):
                d[key] = tuple(x.strip() for x in d[key].split(",") if x.strip())
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> "SearchConfig":
        """Read a study config TOML (the CLI's keys, ``-`` or ``_``), then apply ``overrides`` that are not None."""
        base: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise MicroserError(f"study config {path} does not exist: pass an existing TOML, "
                                    "e.g. --config studies/demo.toml")
            try:
                base = tomllib.loads(checks.read_text(path, "study config"))
            except tomllib.TOMLDecodeError as e:
                raise MicroserError(f"study config {path} is not valid TOML ({e}): fix the file") from None
            section = base.get("search", base)
            if not isinstance(section, dict):
                raise MicroserError(f"study config {path}: [search] is not a table: write the settings under "
                                    "[search] or at the top level")
            base = {k.replace("-", "_"): v for k, v in section.items()}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)


@dataclass
class TrainOutcome:
    """What a trainer returns for one candidate."""

    state_dict: dict
    ccc: dict                       # validation ccc_report (whole split)
    train_seconds: float
    samples_per_second: float
    collapsed: str | None = None    # the collapse message, when predictions were constant
    test_ccc: dict | None = None    # test ccc_report, when asked for (final stage)


@dataclass
class SearchEvent:
    """What the progress callback receives (rendered by ``microser.show.SearchLive``)."""

    kind: str                 # "start" | "measure" | "train" | "epoch" | "trial" | "final" | "done"
    stage: str                # "references" | "search" | "final"
    trained: int              # trained search trials in the study (all workers)
    total: int                # the trained trials asked for
    rejected: int
    best_ccc: float | None    # best mean validation CCC of a feasible trained trial
    eta_seconds: float | None
    message: str = ""
    final_done: int = 0
    final_total: int = 0


@dataclass
class SearchSummary:
    """The outcome of ``run_search``: counts, timings and the front at final fidelity."""

    study: str
    storage: str
    artifacts: str
    cache: str
    settings: dict
    trained: int
    rejected: int
    failed: int
    stale_failed: list[int]
    search_seconds: float
    final_seconds: float
    mean_trial_seconds: float | None
    rows: list[dict]          # final-stage candidates and references, best final CCC first
    best: dict | None         # the best feasible candidate at final fidelity
    reference: dict | None    # the first reference's row
    margin_test: float | None  # best test mean CCC - reference test mean CCC (held-out speakers)
    margin_valid: float | None

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the default components (tests inject fakes with the same signatures) ----


def measure_spec(spec, input_seconds: float) -> dict:
    """Every cost of ``spec`` at ``input_seconds`` (``microser.costs.measure_costs``), plus the duration."""
    from microser.costs import measure_costs

    costs = measure_costs(spec, input_seconds=input_seconds).to_dict()
    return {**costs, "input_seconds": input_seconds}


def distill_spec(spec, data, train_config, *, test: bool = False, progress=None, should_stop=None) -> TrainOutcome:
    """Build ``spec`` (torch seeded with the config's seed), distil it, score validation (and test) CCC."""
    import torch

    from microser.distill import evaluate, train
    from microser.models.spec import build_model

    torch.manual_seed(train_config.seed)
    model = build_model(spec)
    result = train(model, data, train_config, progress=progress, should_stop=should_stop)
    model.load_state_dict(result.state_dict)
    test_ccc = None
    if test and len(data.split_indices("test")) >= 2:
        test_ccc = evaluate(model, data, "test")
    return TrainOutcome(state_dict=result.state_dict, ccc=result.ccc, train_seconds=result.train_seconds,
                        samples_per_second=result.samples_per_second,
                        collapsed=result.collapse_message if result.collapsed else None, test_ccc=test_ccc)


@dataclass
class Components:
    """The pieces a search calls; defaults are the real ones, tests swap in fakes."""

    trainer: Callable = distill_spec
    measure: Callable = measure_spec
    space: Any = None          # an object with .suggest(trial) -> ArchSpec; None: load config.space
    data: Any = None           # a Cache; None: open config.cache (or the demo cache)
    resolve_reference: Callable | None = None   # name -> ArchSpec; None: microser.models.spec.resolve_spec
    load_spec: Callable | None = None           # JSON -> ArchSpec; None: ArchSpec.from_json


def default_space_path() -> Path:
    return Path(__file__).resolve().parent / "search_spaces" / "default.toml"


def _train_config(config: SearchConfig, *, seed: int, threads: int, final: bool = False):
    from microser.distill import TrainConfig

    if final:
        return TrainConfig(epochs=config.final_epochs, crop_seconds=config.crop_seconds,
                           crops_per_segment=config.crops_per_segment, batch_size=config.batch_size,
                           seed=seed, threads=threads)
    return TrainConfig(epochs=config.epochs, steps=config.steps, crop_seconds=config.crop_seconds,
                       crops_per_segment=config.crops_per_segment, batch_size=config.batch_size,
                       seed=seed, threads=threads)


MIN_RANKING_STEPS = 100  # below this many optimizer steps per trial, search-fidelity CCC barely ranks candidates


def _few_steps_warning(config: SearchConfig, data) -> str:
    """A warning when the search fidelity gives each trial fewer than MIN_RANKING_STEPS optimizer steps.

    On espeak-emo (480 training segments) one epoch of 1 s crops in batches of
    16 is 30 steps, and every candidate, wav2small-ref included, scored about
    0 CCC: the search was blind. Users with small caches need --steps.
    """
    try:
        n_train = len(data.split_indices("train"))
    except (AttributeError, TypeError):
        return ""
    per_epoch = max(1, n_train * config.crops_per_segment // config.batch_size)
    steps = config.steps if config.steps is not None else int(round((config.epochs or 1.0) * per_epoch))
    if steps >= MIN_RANKING_STEPS:
        return ""
    return (f"warning: search fidelity is {steps} optimizer steps per trial ({n_train} training segments, "
            f"batch {config.batch_size}); below {MIN_RANKING_STEPS} brief training barely ranks candidates: "
            f"pass --steps {2 * MIN_RANKING_STEPS} (or more --epochs) for a small cache")


def _threads(config: SearchConfig) -> int:
    if config.threads:
        return config.threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // config.workers)


def _sampler(config: SearchConfig, worker: int) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded per trial number (see `TrialSeededSampler`); the same for every worker."""

    def make(seed: int) -> optuna.samplers.BaseSampler:
        if config.sampler == "tpe":
            startup = max(3, min(10, config.trials // 3))
            return optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=startup)
        if config.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, config.trials // 2)))
        return optuna.samplers.RandomSampler(seed=seed)

    return TrialSeededSampler(make, config.seed)


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Trial ``n`` draws with a sampler seeded by ``(seed, n)`` only.

    Workers started with the same command on many hosts would otherwise draw
    the same candidates (same seed, same sequence); trial numbers are unique
    in the storage, so here every trial draws differently, and a one-worker
    run repeats exactly. The inner sampler reads the study's history from
    the storage, so making a fresh one per trial loses nothing.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self._make, self._seed = make, int(seed)
        self._inner = self._fresh(0)

    def _fresh(self, number: int) -> optuna.samplers.BaseSampler:
        seed = int(np.random.SeedSequence([self._seed, int(number)]).generate_state(1)[0])
        with warnings.catch_warnings():   # multivariate TPE is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._make(seed)

    def before_trial(self, study, trial) -> None:
        self._inner = self._fresh(trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial's seed is fixed by its number."""


# ---- study state, read from storage (so every worker sees the same counts) ----


def _is_trained(t: optuna.trial.FrozenTrial) -> bool:
    return (t.state == TrialState.COMPLETE and "ccc" in t.user_attrs and not t.user_attrs.get("rejected")
            and not t.user_attrs.get("reference"))


def _feasible(t: optuna.trial.FrozenTrial) -> bool:
    return _is_trained(t) and all(v <= 0 for v in t.constraints.values())


def _counts(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    trained = [t for t in trials if _is_trained(t)]
    feasible = [t for t in trained if all(v <= 0 for v in t.constraints.values())]
    training_now = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("stage") == "training"]
    return {
        "trained": len(trained),
        "training_now": len(training_now),
        "rejected": sum(t.state == TrialState.COMPLETE and bool(t.user_attrs.get("rejected")) for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "best": max((t.user_attrs["ccc"]["mean"] for t in feasible), default=None),
        "mean_seconds": float(np.mean([t.duration.total_seconds() for t in trained])) if trained else None,
    }


def _settings(config: SearchConfig, budgets: tuple[Budget, ...], data, cache_path: str, space_path: Path,
              artifacts: Path) -> dict:
    fidelity = {"epochs": config.epochs, "steps": config.steps, "crop_seconds": config.crop_seconds,
                "crops_per_segment": config.crops_per_segment, "batch_size": config.batch_size}
    return {
        "objectives": list(config.objectives),
        "budgets": canonical_dicts(budgets),
        "input_seconds": config.input_seconds,
        "cache": cache_path,
        "cache_fingerprint": getattr(data, "fingerprint", None),
        "space": str(space_path),
        "space_sha256": hashlib.sha256(space_path.read_bytes()).hexdigest() if space_path.is_file() else None,
        "fidelity": fidelity,
        "final": {"k": config.final_k, "epochs": config.final_epochs},
        "artifacts": str(artifacts.resolve()),
        "sampler": config.sampler,
        "seed": config.seed,
        "references": list(config.references),
        "rejected_ccc": REJECTED_CCC,
        "microser_version": __version__,
        **({"ram_mode": config.ram_mode} if config.ram_mode != "offline" else {}),
    }


def _check_same_study(name: str, url: str, old: dict, new: dict) -> None:
    old = {**old, "budgets": canonical_dicts(old.get("budgets") or [])}   # older studies kept budgets as typed
    for key in IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            raise MicroserError(f"study {name!r} in {safe_url(url)} was created with {key} {_short(old.get(key))}, "
                                f"this run asks for {_short(new.get(key))}: pass another --study name, or the "
                                "study's own settings to resume it")


def _short(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict) and "text" in value[0]:
        return ",".join(v["text"] for v in value) or "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "..."
    return str(value)


# ---- one search process ----


class _Searcher:
    """Runs trials in one process: measure, reject or train, record. Shared by the parent and workers."""

    def __init__(self, config: SearchConfig, study: optuna.Study, budgets, components: Components, *,
                 worker: int, threads: int, progress=None):
        self.config, self.study, self.budgets, self.c = config, study, budgets, components
        self.worker, self.threads, self.progress = worker, threads, progress
        self.store = artifact_store(study.user_attrs[SETTINGS_ATTR]["artifacts"])
        self.cost_cache: dict[str, dict] = {}
        self.rejected_in_a_row = 0
        self.failed_in_a_row = 0
        self.duplicates_in_a_row = 0

    # -- events --
    def emit(self, kind: str, stage: str, message: str = "", **extra) -> None:
        if self.progress is None:
            return
        counts = _counts(self.study)
        remaining = max(0, self.config.trials - counts["trained"])
        eta = counts["mean_seconds"] * remaining / self.config.workers if counts["mean_seconds"] else None
        self.progress(SearchEvent(kind=kind, stage=stage, trained=counts["trained"], total=self.config.trials,
                                  rejected=counts["rejected"], best_ccc=counts["best"], eta_seconds=eta,
                                  message=message, **extra))

    def measure(self, spec) -> dict:
        key = spec.to_json()
        if key not in self.cost_cache:
            self.cost_cache[key] = self.c.measure(spec, self.config.input_seconds)
            if self.config.ram_mode == "streaming":
                from microser.cgen import streaming_costs

                self.cost_cache[key] = streaming_costs(spec, self.cost_cache[key], self.config.input_seconds)
        return self.cost_cache[key]

    # -- the objective --
    def objective(self, trial: optuna.Trial):
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
        cost_values = [float(costs[o]) for o in self.config.objectives]
        broken = describe_violations(self.budgets, costs)
        if broken:
            trial.set_user_attr("rejected", f"over budget: {broken}")
            self.rejected_in_a_row += 1
            return [REJECTED_CCC, *cost_values]
        self.rejected_in_a_row = 0
        trial.set_user_attr("stage", "training")
        self.emit("train", "search", f"trial {trial.number}: training {spec.summary()}")
        outcome = self.c.trainer(spec, self.c.data,
                                 _train_config(self.config, seed=self.config.seed + trial.number,
                                               threads=self.threads),
                                 progress=self._epoch_progress(trial.number))
        trial.set_user_attr("ccc", outcome.ccc)
        trial.set_user_attr("train_seconds", outcome.train_seconds)
        trial.set_user_attr("samples_per_second", outcome.samples_per_second)
        if outcome.collapsed:
            trial.set_user_attr("collapsed", outcome.collapsed)
        trial.set_user_attr("weights", save_weights(outcome.state_dict, store=self.store, study_or_trial=trial,
                                                    name=f"trial-{trial.number}-search"))
        trial.set_user_attr("stage", "done")
        return [float(outcome.ccc["mean"]), *cost_values]

    def _skip_duplicate(self, trial: optuna.Trial, spec_json: str) -> None:
        """Prune a candidate an earlier trial (any worker, not failed) already has: it would only repeat it.

        Both workers of a simultaneous draw record the spec first, so the later trial number yields.
        """
        same = [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number < trial.number and t.user_attrs.get("spec") == spec_json]
        if not same:
            self.duplicates_in_a_row = 0
            return
        self.duplicates_in_a_row += 1
        trial.set_user_attr("duplicate_of", same[0])
        raise optuna.TrialPruned(f"same candidate as trial {same[0]}")

    def _fail_lost_trials(self) -> None:
        """Fail (and re-queue) RUNNING trials of dead workers: by heartbeat (RDB storages), else by pid (this host)."""
        storage = self.study._storage
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
                optuna.storages.fail_stale_trials(self.study)
            else:
                fail_dead_trials(self.study)

    def _epoch_progress(self, number: int):
        if self.progress is None:
            return None

        def report(info: dict) -> None:
            self.emit("epoch", "search", f"trial {number}: epoch {info.get('epoch')}/{info.get('epochs')}, "
                                         f"valid CCC {info.get('valid', {}).get('mean', float('nan')):.3f}")
        return report

    # -- the loop --
    def run(self, deadline: float | None) -> None:
        while True:
            counts = _counts(self.study)
            if counts["trained"] >= self.config.trials:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            if counts["trained"] + counts["training_now"] >= self.config.trials:
                # The last trials are training in other workers. Wait for them rather than leave: a worker
                # that dies (kill -9, a lost host) leaves its trial RUNNING; once its heartbeat is stale it
                # is failed and re-queued here, and this worker trains it.
                self._fail_lost_trials()
                time.sleep(min(2.0, heartbeat_seconds()))
                continue
            if self.rejected_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
                raise MicroserError(
                    f"budget {', '.join(b.text for b in self.budgets)}: {self.rejected_in_a_row} candidates in a "
                    f"row were over budget in {self.study.user_attrs[SETTINGS_ATTR]['space']}: raise the budget "
                    "or use a space with smaller models (--space)")
            if self.duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                raise MicroserError(
                    f"study {self.study.study_name!r}: the last {self.duplicates_in_a_row} candidates drawn from "
                    f"{self.study.user_attrs[SETTINGS_ATTR]['space']} were all tried before ({counts['trained']} "
                    "trained so far; the space has little left to draw): lower --trials or widen the space")
            before = len(self.study.get_trials(deepcopy=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.optimize(self.objective, n_trials=1, catch=(RuntimeError,), gc_after_trial=False)
            last = [t for t in self.study.get_trials(deepcopy=False)[before:]
                    if t.user_attrs.get("worker", {}).get("pid") == os.getpid()]
            if last and last[-1].state == TrialState.FAIL:
                self.failed_in_a_row += 1
                if self.failed_in_a_row >= MAX_FAILURES_IN_A_ROW:
                    raise MicroserError(f"study {self.study.study_name!r}: {self.failed_in_a_row} trials in a row "
                                        "failed (see the log above): fix the cause, then run the same command again")
            else:
                self.failed_in_a_row = 0
            if last:
                t = last[-1]
                kind = "rejected" if t.user_attrs.get("rejected") else "trial"
                self.emit(kind, "search", _trial_line(t))


def _trial_line(t: optuna.trial.FrozenTrial) -> str:
    a = t.user_attrs
    if a.get("rejected"):
        return f"trial {t.number} rejected before training: {a['rejected']}"
    if t.state != TrialState.COMPLETE:
        return f"trial {t.number} {t.state.name.lower()}"
    return f"trial {t.number}: CCC {a['ccc']['mean']:.3f}, {int(a['costs']['params'])} params ({a.get('summary')})"


# ---- the whole search ----


def _open_data(config: SearchConfig, components: Components):
    if components.data is not None:
        return components.data, str(getattr(components.data, "path", "<in-memory>"))
    from microser.cache import Cache

    if config.cache is None:
        from microser.demo import ensure_demo_cache

        path = Path(ensure_demo_cache())
    else:
        path = Path(config.cache)
    return Cache.open(path), str(path.resolve())


def _open_space(config: SearchConfig, components: Components) -> tuple[Any, Path]:
    path = Path(config.space) if config.space else default_space_path()
    if components.space is not None:
        return components.space, path
    from microser.space import SearchSpace

    return SearchSpace.load(path), path


def open_study(config: SearchConfig, *, worker: int = 0, data=None, space_path: Path | None = None,
               create: bool = False) -> optuna.Study:
    """Open (or, with ``create``, create) the study named by ``config`` with this worker's sampler."""
    name = config.study_name
    storage = open_storage(config.storage, name)
    directions = ["maximize"] + ["minimize"] * len(config.objectives)
    sampler = _sampler(config, worker)
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


def _probe_budgets(config, budgets, space, measure, space_path: Path) -> None:
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


def _worker_main(config_dict: dict, worker: int, threads: int) -> None:
    """Entry point of a spawned worker process: the same search loop on the same storage."""
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(threads)
    config = SearchConfig.from_dict(config_dict)
    components = Components()
    components.data, _ = _open_data(config, components)
    components.space, _ = _open_space(config, components)
    study = open_study(config, worker=worker)
    deadline = time.monotonic() + config.timeout if config.timeout else None
    _Searcher(config, study, parse_budgets(config.budgets), components, worker=worker, threads=threads).run(deadline)


def run_search(config: SearchConfig, *, progress: Callable[[SearchEvent], None] | None = None,
               components: Components | None = None) -> SearchSummary:
    """Create or resume the study, run the search (in ``config.workers`` processes), then the final stage.

    Library code never prints: Optuna's own INFO log is turned down to
    WARNING, and ``progress`` (if given) receives a :class:`SearchEvent` at
    every step.
    """
    import torch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    c = replace(components) if components is not None else Components()
    budgets = parse_budgets(config.budgets)
    threads = _threads(config)
    torch.set_num_threads(threads)
    c.data, cache_path = _open_data(config, c)
    from microser.cache import require_trainable

    require_trainable(c.data)   # cache verify's checks, segment lengths, split sizes: before any study or trial
    c.space, space_path = _open_space(config, c)
    if c.resolve_reference is None or c.load_spec is None:
        from microser.models.spec import ArchSpec, resolve_spec

        c.resolve_reference = c.resolve_reference or resolve_spec
        c.load_spec = c.load_spec or ArchSpec.from_json
    reference_specs = [(name, c.resolve_reference(name)) for name in config.references]

    name = config.study_name
    url = config.storage or f"sqlite:///studies/{name}.db"
    artifacts = Path(config.artifacts) if config.artifacts else default_artifacts_dir(config.storage, name)
    study = open_study(config, create=True)
    settings = _settings(config, budgets, c.data, cache_path, space_path, artifacts)
    old = study.user_attrs.get(SETTINGS_ATTR)
    if old is not None:
        _check_same_study(name, url, old, settings)
        settings = {**settings, "artifacts": old["artifacts"]}
    else:
        study.set_user_attr(SETTINGS_ATTR, settings)
        for params in getattr(c.space, "warm_starts", ()):  # known-good points first (space file)
            study.enqueue_trial(params, skip_if_exists=True)
    stale = fail_dead_trials(study)

    searcher = _Searcher(config, study, budgets, c, worker=0, threads=threads, progress=progress)
    searcher.emit("start", "search", f"study {name} in {safe_url(url)}"
                  + (f"; failed {len(stale)} stale trial(s) of a stopped run: {stale}" if stale else ""))
    few = _few_steps_warning(config, c.data)
    if few:
        searcher.emit("start", "search", few)
    counts = _counts(study)
    if budgets and counts["trained"] == 0 and not any(_feasible(t) for t in study.get_trials(deepcopy=False)):
        _probe_budgets(config, budgets, c.space, searcher.measure, space_path)

    t0 = time.monotonic()
    deadline = t0 + config.timeout if config.timeout else None
    procs = []
    if config.workers > 1 and counts["trained"] < config.trials:
        # N spawned processes search; this one trains the references meanwhile, then reports progress.
        ctx = multiprocessing.get_context("spawn")
        for k in range(config.workers):
            p = ctx.Process(target=_worker_main, args=(config.to_dict(), k + 1, threads), daemon=False)
            p.start()
            procs.append(p)
    try:
        _train_references(searcher, reference_specs)
        if procs:
            seen = len(study.get_trials(deepcopy=False))
            while any(p.is_alive() for p in procs):
                time.sleep(1.0)
                trials = study.get_trials(deepcopy=False)
                for t in trials[seen:]:
                    if t.state.is_finished():
                        searcher.emit("rejected" if t.user_attrs.get("rejected") else "trial", "search",
                                      _trial_line(t))
                        seen += 1
                    else:
                        break
        else:
            searcher.run(deadline)
    finally:
        for p in procs:
            p.join()
    search_seconds = time.monotonic() - t0

    t1 = time.monotonic()
    _final_stage(searcher, reference_specs)
    final_seconds = time.monotonic() - t1
    searcher.emit("done", "final", "search finished")
    return _summary(study, config, url, settings, stale, search_seconds, final_seconds)


# ---- references ----


def _reference_trials(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["reference"]: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("reference")}


def _train_references(searcher: _Searcher, reference_specs) -> None:
    """Train each reference once per study (same recipe and seed as the search), as a COMPLETE trial."""
    study, config = searcher.study, searcher.config
    done = _reference_trials(study)
    for name, spec in reference_specs:
        if name in done:
            continue
        searcher.emit("train", "references", f"reference {name}: training {spec.summary()}")
        costs = searcher.measure(spec)
        outcome = searcher.c.trainer(spec, searcher.c.data,
                                     _train_config(config, seed=config.seed, threads=searcher.threads),
                                     progress=None)
        weights = save_weights(outcome.state_dict, store=searcher.store, study_or_trial=study,
                               name="reference-" + "".join(ch if ch.isalnum() or ch in "-_." else "_"
                                                           for ch in Path(name).name) + "-search")
        attrs = {"spec": spec.to_json(), "family": spec.family, "summary": spec.summary(), "costs": costs,
                 "ccc": outcome.ccc, "train_seconds": outcome.train_seconds,
                 "samples_per_second": outcome.samples_per_second, "weights": weights, "reference": name,
                 "worker": worker_tag()}
        if outcome.collapsed:
            attrs["collapsed"] = outcome.collapsed
        study.add_trial(optuna.create_trial(
            values=[float(outcome.ccc["mean"]), *(float(costs[o]) for o in config.objectives)],
            user_attrs=attrs, constraints=violations(searcher.budgets, costs)))
        searcher.emit("trial", "references", f"reference {name}: CCC {outcome.ccc['mean']:.3f}")


# ---- final stage ----


def final_candidates(study: optuna.Study, objectives, k: int) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` feasible trained trials to retrain: Pareto-optimal ones by search CCC first, then the next best."""
    from microser.pareto import non_dominated

    feasible = [t for t in study.get_trials(deepcopy=False) if _feasible(t)]
    if not feasible or k == 0:
        return []
    scores = np.array([t.user_attrs["ccc"]["mean"] for t in feasible])
    costs = np.array([[t.user_attrs["costs"][o] for o in objectives] for t in feasible], dtype=float)
    on_front = non_dominated(scores, costs)
    order = sorted(range(len(feasible)), key=lambda i: (not on_front[i], -scores[i], feasible[i].number))
    return [feasible[i] for i in order[:k]]


def _final_stage(searcher: _Searcher, reference_specs) -> None:
    study, config = searcher.study, searcher.config
    refs = _reference_trials(study)
    todo = final_candidates(study, config.objectives, config.final_k)
    todo += [refs[name] for name, _ in reference_specs if name in refs]
    todo = [t for t in todo if (final_record(study, t) or {}).get("epochs") != config.final_epochs]
    for i, t in enumerate(todo):
        spec = searcher.c.load_spec(t.user_attrs["spec"])
        seed = config.seed + 10_000 + t.number   # a fresh seed: not the one the search used
        searcher.emit("final", "final", f"final stage: trial {t.number} ({t.user_attrs.get('summary')}), "
                      f"{config.final_epochs:g} epochs", final_done=i, final_total=len(todo))
        outcome = searcher.c.trainer(spec, searcher.c.data,
                                     _train_config(config, seed=seed, threads=searcher.threads, final=True),
                                     test=True, progress=None)
        weights = save_weights(outcome.state_dict, store=searcher.store, study_or_trial=study,
                               name=f"trial-{t.number}-final")
        record = {"ccc": outcome.ccc, "test_ccc": outcome.test_ccc, "weights": weights,
                  "epochs": config.final_epochs, "seed": seed, "train_seconds": outcome.train_seconds,
                  "collapsed": outcome.collapsed}
        study.set_user_attr(f"{FINAL_PREFIX}{t.number}", record)
        searcher.emit("final", "final", f"final stage: trial {t.number}: CCC {outcome.ccc['mean']:.3f}",
                      final_done=i + 1, final_total=len(todo))


def _row(study: optuna.Study, t: optuna.trial.FrozenTrial, on_front: bool) -> dict:
    a = t.user_attrs
    final = final_record(study, t) or {}
    return {"number": t.number, "reference": a.get("reference"), "summary": a.get("summary"),
            "family": a.get("family"), "costs": a.get("costs"), "ccc": a.get("ccc"),
            "final_ccc": final.get("ccc"), "test_ccc": final.get("test_ccc"),
            "feasible": _feasible(t), "on_front": on_front, "train_seconds": a.get("train_seconds"),
            "collapsed": final.get("collapsed") or a.get("collapsed")}


def _summary(study, config, url, settings, stale, search_seconds, final_seconds) -> SearchSummary:
    from microser.pareto import non_dominated

    counts = _counts(study)
    finalists = [t for t in study.get_trials(deepcopy=False) if final_record(study, t) and _feasible(t)]
    rows = []
    if finalists:
        scores = np.array([final_record(study, t)["ccc"]["mean"] for t in finalists])
        costs = np.array([[t.user_attrs["costs"][o] for o in config.objectives] for t in finalists], dtype=float)
        mask = non_dominated(scores, costs)
        rows = [_row(study, t, bool(m)) for t, m in zip(finalists, mask)]
    refs = _reference_trials(study)
    ref_rows = [_row(study, refs[n], False) for n in config.references if n in refs]
    rows.sort(key=lambda r: -(r["final_ccc"] or {}).get("mean", -math.inf))
    best = rows[0] if rows else None
    reference = ref_rows[0] if ref_rows else None

    def margin(key):
        if best and reference and best.get(key) and reference.get(key):
            return float(best[key]["mean"] - reference[key]["mean"])
        return None

    return SearchSummary(
        study=study.study_name, storage=safe_url(url), artifacts=settings["artifacts"], cache=settings["cache"],
        settings=settings, trained=counts["trained"], rejected=counts["rejected"], failed=counts["failed"],
        stale_failed=list(stale), search_seconds=search_seconds, final_seconds=final_seconds,
        mean_trial_seconds=counts["mean_seconds"], rows=rows + ref_rows, best=best, reference=reference,
        margin_test=margin("test_ccc"), margin_valid=margin("final_ccc"))
