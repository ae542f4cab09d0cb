"""``microser search`` settings: one frozen config (CLI flags and study TOML files alike) and the study's identity.

``SearchConfig`` holds every setting with its default and checks every value's
type and range when it is made (a config file bypasses the CLI's types), so a
bad setting is a one-line error before anything is opened. ``study_settings``
is what a study records when it is created; a study resumed with any of
``IDENTITY_KEYS`` changed is refused (``check_same_study``): its numbers would
no longer mean the same thing.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from microser import MIN_SECONDS, __version__, checks
from microser.budgets import COST_KEYS, DEFAULT_OBJECTIVES, Budget, canonical, canonical_dicts, parse_budgets
from microser.durations import parse_duration
from microser.errors import MicroserError
from microser.fidelity import Fidelity
from microser.train_config import TrainConfig
from microser.urls import check_storage_url, check_study_name, safe_url

REJECTED_CCC = -1.0   # the CCC recorded for a candidate rejected before training (the lowest CCC possible)
SAMPLERS = ("tpe", "tpe-group", "nsga2", "gp", "random")
RAM_MODES = ("offline", "streaming")   # ram_bytes: the whole-clip int8 peak, or the C library's state + arena
FOLDS = ("auto", "none")
# Settings that define what a study's numbers mean: a study resumed with any of these changed is refused.
IDENTITY_KEYS = ("objectives", "budgets", "input_seconds", "cache_fingerprint", "space_sha256", "fidelity",
                 "ram_mode")


@dataclass(frozen=True)
class SearchConfig:
    """Every ``microser search`` setting; the same keys are read from ``--config studies/NAME.toml``.

    Defaults make ``microser search --budget 80k-params`` finish within 10 minutes
    on 2 cores, on the demo cache or on a real one of any size.
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
    time: float | None = 600.0        # wall-clock seconds of the whole command (search + final stage); None: no limit
    trials: int | None = None         # at most this many candidates trained at the first rung; None: what time allows
    workers: int = 1
    threads: int | None = None        # torch threads per worker; None: cores // workers
    seed: int = 0
    sampler: str = "tpe"
    # fidelity, in optimizer steps of batch_size crops of crop_seconds (None: planned from time, see plan_steps)
    rungs: tuple[int, ...] | None = None
    eta: int = 3                      # promote the best 1/eta of a rung
    epochs: float | None = None       # instead of rungs: one rung of this many epochs of the cache
    crop_seconds: float = TrainConfig.crop_seconds   # the training recipe's (one set of defaults)
    crops_per_segment: int = 1        # brief jobs: one crop per segment per epoch (long training draws TrainConfig's)
    batch_size: int = TrainConfig.batch_size
    # audio per validation evaluation (the final stage reads 4x as much, and as much of the test split);
    # larger splits are subsampled over speakers, so a trial costs the same on any cache. None: whole split
    valid_seconds: float | None = 300.0
    input_seconds: float = 1.0        # audio length at which RAM and MACs are measured
    ram_mode: str = "offline"         # "streaming": ram_bytes = the C library's state + arena (microser.cgen)
    # final stage: the best trials of the highest rungs and the references, each with final_seeds seeds;
    # 3 seats, not 2: the 600-step rung ranks its top trials by noise (docs/DECISIONS.md, "Three final seats")
    final_k: int = 3
    final_steps: int | None = None
    final_epochs: float | None = None  # instead of final_steps
    final_seeds: int = 2
    folds: str = "auto"               # "auto": seed s validates on speaker fold s when the cache has few; "none"
    references: tuple[str, ...] = ("wav2small-ref",)

    def __post_init__(self):
        self._check_values()
        if self.sampler not in SAMPLERS:
            raise MicroserError(f"sampler {self.sampler!r} is not known: expected one of {', '.join(SAMPLERS)}")
        bad = [o for o in self.objectives if o not in COST_KEYS]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise MicroserError(f"objectives {','.join(self.objectives)!r}: expected distinct cost keys from "
                                f"{', '.join(COST_KEYS)}, e.g. 'params,ram_bytes'")
        self._check_values()
        if self.time is None and self.trials is None:
            raise MicroserError("time=none and no trials: give a wall-clock budget (--time 10m) or a number of "
                                "candidates (--trials 30)")
        if self.epochs is not None and self.rungs is not None:
            raise MicroserError(f"epochs={self.epochs} and rungs={list(self.rungs)}: give one of them")
        if self.final_epochs is not None and self.final_steps is not None:
            raise MicroserError(f"final_epochs={self.final_epochs} and final_steps={self.final_steps}: give one")
        if self.rungs is not None:
            if not self.rungs or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in self.rungs) \
                    or list(self.rungs) != sorted(set(self.rungs)):
                raise MicroserError(f"rungs={list(self.rungs)}: expected increasing step counts >= 1, e.g. 60,200,600")
        parse_budgets(self.budgets)
        if self.ram_mode not in RAM_MODES:
            raise MicroserError(f"ram_mode {self.ram_mode!r}: expected one of {', '.join(RAM_MODES)}")
        if self.folds not in FOLDS:
            raise MicroserError(f"folds {self.folds!r}: expected one of {', '.join(FOLDS)}")
        check_study_name(self.study_name)
        if self.storage is not None:
            check_storage_url(self.storage)
        if self.artifacts is not None:
            checks.out_folder("--artifacts", self.artifacts)

    def _check_values(self) -> None:
        """Types and ranges of every value (a config file bypasses the CLI's types), as one-line errors."""
        for f in fields(self):
            value, option = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.name != "rungs" and isinstance(f.default, tuple) and not (
                    isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
                example = list(f.default) or ["80k-params"]
                raise MicroserError(f"{f.name} {value!r} is not a list of strings: write e.g. {f.name} = {example!r}")
            if f.type in ("str | None", "str") and not isinstance(value, str) and value is not None:
                raise MicroserError(f"{option} {value!r} is not a string: pass e.g. {option} {f.default or 'NAME'}")
        for name, low, example in (("trials", 1, 30), ("workers", 1, 1), ("final_k", 0, 2), ("batch_size", 2, 16),
                                   ("crops_per_segment", 1, 1), ("threads", 1, 1), ("eta", 2, 3),
                                   ("final_steps", 1, 1000), ("final_seeds", 1, 2)):
            if getattr(self, name) is not None:
                checks.number("--" + name.replace("_", "-"), getattr(self, name), low=low, integer=True,
                              example=example)
        checks.seed("--seed", self.seed)
        for name, example in (("epochs", 1), ("final_epochs", 8), ("time", 600), ("valid_seconds", 600),
                              ("crop_seconds", 1), ("input_seconds", 1)):
            value, option = getattr(self, name), "--" + name.replace("_", "-")
            if value is not None or name in ("crop_seconds", "input_seconds"):
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
        for key in ("budgets", "objectives", "references"):   # one string is accepted for a list
            if isinstance(d.get(key), str):
                d[key] = tuple(x.strip() for x in d[key].split(",") if x.strip())
        if isinstance(d.get("rungs"), str):
            d["rungs"] = _ints(d["rungs"], "rungs")
        if isinstance(d.get("time"), str):
            d["time"] = None if d["time"].strip().lower() in ("none", "off", "") else parse_duration(d["time"], what="time")
        if "trials" in d and "time" not in d and d["trials"] is not None:
            d["time"] = None   # a number of trials alone is not cut short by the default wall-clock budget
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


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MicroserError(f"{what} {text!r} is not understood: expected comma-separated integers, "
                            "e.g. 60,200,600") from None


def study_settings(config: SearchConfig, budgets: tuple[Budget, ...], data, cache_path: str, space_path: Path,
              artifacts: Path, fidelity: Fidelity) -> dict:
    return {
        "objectives": list(config.objectives),
        "budgets": canonical_dicts(budgets),
        "input_seconds": config.input_seconds,
        "cache": cache_path,
        "cache_fingerprint": getattr(data, "fingerprint", None),
        "space": str(space_path),
        "space_sha256": hashlib.sha256(space_path.read_bytes()).hexdigest() if space_path.is_file() else None,
        "fidelity": fidelity.to_dict(),
        "final": {"k": config.final_k, "steps": fidelity.final_steps, "seeds": fidelity.final_seeds},
        "artifacts": str(artifacts.resolve()),
        "sampler": config.sampler,
        "seed": config.seed,
        "references": list(config.references),
        "rejected_ccc": REJECTED_CCC,
        "microser_version": __version__,
        **({"ram_mode": config.ram_mode} if config.ram_mode != "offline" else {}),
    }


def check_same_study(name: str, url: str, old: dict, new: dict) -> None:
    old = {**old, "budgets": canonical_dicts(old.get("budgets") or [])}   # older studies kept budgets as typed
    for key in IDENTITY_KEYS:
        if key == "space_sha256" and old.get(key) != new.get(key) and old.get("space") == new.get("space"):
            raise MicroserError(f"study {name!r} in {safe_url(url)} searched the space file {new.get('space')} with "
                                f"sha256 {_short(old.get(key))}; that file has changed since (now "
                                f"{_short(new.get(key))}): restore it to resume the study, or pass another --study "
                                "name to search the new space")
        if old.get(key) != new.get(key):
            raise MicroserError(f"study {name!r} in {safe_url(url)} was created with {key} {_short(old.get(key))}, "
                                f"this run asks for {_short(new.get(key))}: pass another --study name, or the "
                                "study's own settings to resume it")


def _short(value) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict) and "text" in value[0]:
        return ",".join(v["text"] for v in value) or "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "..."
    return str(value)
