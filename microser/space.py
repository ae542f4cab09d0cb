"""Search spaces: a TOML file -> Optuna suggestions -> one ArchSpec per trial.

A space file has up to four top-level entries::

    family = { choices = ["wav2small", "mobilenet"] }   # or a fixed "wav2small"
    [frontend]      # FrontendSpec fields
    [wav2small]     # Wav2SmallBody fields, plus `depth`; used only when the trial's family is wav2small
    [mobilenet]     # MobileNetBody fields; used only when the trial's family is mobilenet

(and an optional ``description`` string, and optional ``[[warm_start]]`` tables, below).
Every field is written in one of three forms:

- a fixed value: ``n_fft = 512``, ``pool_after = [2]`` (not an Optuna parameter);
- choices: ``norm = { choices = ["batch", "layer"] }`` (``suggest_categorical``);
- a range: ``n_mels = { low = 20, high = 64, step = 4 }``, ``width = { low = 0.1, high = 1.0, log = true }``
  (``suggest_int`` / ``suggest_float``; ``step`` and ``log`` are optional, not both).

A field the file leaves out takes the spec dataclass's default (see
`microser.frontends.FrontendSpec` and the family bodies). Per-block fields of
wav2small are suggested once per block, after ``depth``, so they are
conditional parameters named ``wav2small.channels.0``, ``wav2small.channels.1``, ...:

- ``channels``: a list (fixed; then ``depth`` must match or be left out), one
  integer for every block, or choices / a range drawn per block;
- ``pool_after``: a list of block indices (fixed), or ``{ choices = [false, true] }``
  drawn per block (``wav2small.pool_after.3 = true`` puts a 3x3/2 max-pool after block 3).

Parameter names are ``<table>.<field>`` (``frontend.hop``, ``mobilenet.width``) and
``family``. Each ``[[warm_start]]`` table maps some of these names to values; a new
study enqueues them as its first trials (Optuna's ``enqueue_trial``), so known-good
points are measured first and the sampler starts from them; parameters a warm start
leaves out are drawn as usual::

    [[warm_start]]   # an 8-channel stack on STFT 512/160 with 40 mels
    family = "wav2small"
    "frontend.n_fft" = 512
    "frontend.hop" = 160 A file that breaks any rule is refused with a MicroserError naming the
file, the key and the reason, when it is loaded, not in the middle of a search.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna

from microser import checks
from microser.errors import MicroserError
from microser.frontends import FrontendSpec, Rule
from microser.models.spec import FAMILIES, ArchSpec

SPACES_DIR = Path(__file__).resolve().parent / "search_spaces"
DEPTH_RULE = Rule(int, low=1, high=32)
DEFAULT_SPACE = "default"


def space_path(name_or_path: str | Path | None = None) -> Path:
    """The file a ``--space`` value names: a packaged space's name (``default``, ``wav2small``, ...) is its file in
    ``SPACES_DIR``; anything else is a path, returned as given. None is the default space.

    The one resolver: the space a search loads and the file whose sha256 its study records are the same file.
    """
    path = Path(DEFAULT_SPACE if name_or_path is None else name_or_path)
    if not path.is_file() and not path.parent.name and (SPACES_DIR / f"{path.stem}.toml").is_file():
        return SPACES_DIR / f"{path.stem}.toml"
    return path


@dataclass(frozen=True)
class Param:
    """One field of a space: ``fixed`` value, ``choices``, or an ``int``/``float`` range."""

    kind: str
    value: Any = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "choices":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        value = trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)
        return round(value, 10) if self.step else value  # 0.30000000000000004 -> 0.3

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this field can take (a warm start's value, say)."""
        if self.kind == "fixed":
            return value == self.value
        if self.kind == "choices":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.kind == "float" or float(value).is_integer())

    def describe_range(self) -> str:
        if self.kind == "fixed":
            return f"fixed value {self.value!r}"
        if self.kind == "choices":
            return f"choices {list(self.choices)}"
        return f"range [{self.low}, {self.high}]"


def _parse_param(where: str, raw: Any, rule: Rule, per_item: bool) -> Param:
    """Turn one TOML value into a Param, checking it against the field's rule.

    ``per_item``: the distribution describes one element of a tuple field (per block).
    """
    item_rule = Rule(rule.type, rule.choices, rule.low, rule.high)  # the rule of one element
    if not isinstance(raw, dict):
        if rule.per_item and not per_item and not isinstance(raw, list):
            raise MicroserError(f"key '{where}': {raw!r} is not allowed, expected {rule.describe()}")
        return Param("fixed", value=(item_rule if per_item else rule).check(where, raw, "key"))
    allowed = {"choices"} if "choices" in raw else {"low", "high", "step", "log"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise MicroserError(f"key '{where}.{unknown[0]}' is not understood; write a value, "
                            "{ choices = [...] } or { low = .., high = .., step = .., log = .. }")
    if "choices" in raw:
        choices = raw["choices"]
        if not isinstance(choices, list) or not choices:
            raise MicroserError(f"key '{where}.choices': {choices!r} must be a non-empty list")
        checked = (item_rule.check(f"{where}.choices[{i}]", c, "key") for i, c in enumerate(choices))
        return Param("choices", choices=tuple(checked))
    if rule.type not in (int, float):
        raise MicroserError(f"key '{where}': a low/high range needs a numeric field, but this one is a "
                            f"{rule.type.__name__}; use {{ choices = [...] }}")
    if "low" not in raw or "high" not in raw:
        raise MicroserError(f"key '{where}': a range needs both low and high, got {sorted(raw)}")
    low, high = (item_rule.check(f"{where}.{k}", raw[k], "key") for k in ("low", "high"))
    if low > high:
        raise MicroserError(f"key '{where}': `low <= high` must hold, but got (low={low}, high={high})")
    log, step = raw.get("log", False), raw.get("step")
    if not isinstance(log, bool):
        raise MicroserError(f"key '{where}.log': {log!r} must be true or false")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 \
                or (rule.type is int and not isinstance(step, int)):
            raise MicroserError(f"key '{where}.step': {step!r} must be a positive {rule.type.__name__}")
        if log and step != 1:
            raise MicroserError(f"key '{where}': log = true cannot be combined with step = {step}; drop one of them")
    if log and low <= 0:
        raise MicroserError(f"key '{where}': log = true needs low > 0, got low = {low}")
    kind = "int" if rule.type is int else "float"
    return Param(kind, low=low, high=high, step=None if (log and kind == "float") else step, log=log)


def _parse_table(where: str, raw: Any, cls, extra: dict[str, Rule]) -> dict[str, Param]:
    if not isinstance(raw, dict):
        raise MicroserError(f"key '{where}': expected a table [{where}], got {type(raw).__name__}")
    rules = {**cls.RULES, **extra}
    names = [f.name for f in fields(cls)] + list(extra)
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise MicroserError(f"key '{where}.{unknown[0]}' is unknown; allowed keys are {', '.join(names)}")
    return {k: _parse_param(f"{where}.{k}", v, rules[k], per_item=False) for k, v in raw.items()}


class SearchSpace:
    """A validated search space; `suggest` turns one Optuna trial into one ArchSpec."""

    def __init__(self, path: Path, text: str, family: Param, frontend: dict[str, Param],
                 bodies: dict[str, dict[str, Param]], warm_starts: tuple[dict[str, Any], ...] = ()):
        self.path, self.text = path, text
        self.family, self.frontend, self.bodies = family, frontend, bodies
        self.warm_starts = warm_starts

    @property
    def families(self) -> tuple[str, ...]:
        return (self.family.value,) if self.family.kind == "fixed" else self.family.choices

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        """Read and validate a space file: a path, or the name of a packaged space (``default``, ``wav2small``...)."""
        path = space_path(path)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.toml")))
            raise MicroserError(f"search space {path} does not exist; pass a TOML file or one of: {known}")
        text = checks.read_text(path, "search space")
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise MicroserError(f"{path}: not valid TOML ({e}); fix the syntax") from None
        try:
            return cls._parse(path, text, raw)
        except MicroserError as e:
            raise MicroserError(f"{path}: {e}") from None

    @classmethod
    def _parse(cls, path: Path, text: str, raw: dict) -> "SearchSpace":
        allowed = ["description", "family", "frontend", *FAMILIES, "warm_start"]
        unknown = sorted(set(raw) - set(allowed))
        if unknown:
            raise MicroserError(f"key '{unknown[0]}' is unknown; allowed top-level keys are {', '.join(allowed)}")
        if "family" not in raw:
            raise MicroserError(f"key 'family' is missing; write e.g. family = {{ choices = {list(FAMILIES)} }}")
        family = _parse_param("family", raw["family"], Rule(str, choices=tuple(FAMILIES)), per_item=False)
        frontend = _parse_table("frontend", raw.get("frontend", {}), FrontendSpec, {})
        names = (family.value,) if family.kind == "fixed" else family.choices
        bodies = {}
        for name in FAMILIES:
            if name not in names and name in raw:
                raise MicroserError(f"key '{name}': table given but family {name!r} is not in 'family'; "
                                    "add it to family or remove the table")
        for name in names:
            body_cls = FAMILIES[name].body
            table = raw.get(name, {})
            if not isinstance(table, dict):
                raise MicroserError(f"key '{name}': expected a table [{name}], got {type(table).__name__}")
            per_block = set(FAMILIES[name].per_block)
            extra = {"depth": DEPTH_RULE} if per_block else {}
            parsed = _parse_table(name, {k: v for k, v in table.items() if k not in per_block}, body_cls, extra)
            for key in sorted(per_block & set(table)):
                value, rule = table[key], body_cls.RULES[key]
                if key == "pool_after":
                    if not isinstance(value, (list, dict)):
                        raise MicroserError(f"key '{name}.pool_after': {value!r} is not allowed; write a list of "
                                            "block indices or { choices = [false, true] } (drawn per block)")
                    if isinstance(value, dict):
                        rule = Rule(bool)  # drawn per block: a pool after this block or not
                parsed[key] = _parse_param(f"{name}.{key}", value, rule, per_item=not isinstance(value, list))
            cls._check_depth(name, parsed)
            bodies[name] = parsed
        space = cls(path, text, family, frontend, bodies)
        space.warm_starts = space._check_warm_starts(raw.get("warm_start", []))
        return space

    def _check_warm_starts(self, raw: Any) -> tuple[dict[str, Any], ...]:
        """Each warm start must name only parameters this space draws, with values inside their ranges."""
        if not isinstance(raw, list) or not all(isinstance(w, dict) for w in raw):
            raise MicroserError("key 'warm_start': expected [[warm_start]] tables of parameter = value")
        checked = []
        for i, params in enumerate(raw):
            for key, value in params.items():
                param = self._param_named(key)
                if param is not None and not param.contains(value):
                    raise MicroserError(f"key 'warm_start[{i}].{key}': {value!r} is outside the space's "
                                        f"{param.describe_range()}; change the value or widen the space")
            logger = logging.getLogger("optuna")
            level = logger.level
            logger.setLevel(logging.ERROR)  # no "study created"; out-of-range fixed values are refused below
            try:
                probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
                probe.enqueue_trial(params)
                trial = probe.ask()
                self.suggest(trial)
            finally:
                logger.setLevel(level)
            for key, value in params.items():
                if key not in trial.distributions:
                    raise MicroserError(f"key 'warm_start[{i}].{key}' is not a parameter this space draws for "
                                        f"that warm start; its parameters are {', '.join(sorted(trial.params))}")
            checked.append(dict(params))
        return tuple(checked)

    def _param_named(self, name: str) -> "Param | None":
        """The Param behind an Optuna parameter name (``frontend.hop``, ``wav2small.channels.3``), or None."""
        head, _, rest = name.partition(".")
        if name == "family":
            return self.family
        if head == "frontend":
            return self.frontend.get(rest)
        if head in self.bodies:
            return self.bodies[head].get(rest.split(".")[0])
        return None

    @staticmethod
    def _check_depth(name: str, parsed: dict[str, Param]) -> None:
        """Per-block fields against depth: a fixed channel list fixes the depth; pool indices must exist."""
        if not FAMILIES[name].per_block:
            return
        channels, depth, pools = parsed.get("channels"), parsed.get("depth"), parsed.get("pool_after")
        fixed_list = channels is not None and channels.kind == "fixed" and isinstance(channels.value, tuple)
        if fixed_list and depth is not None and not (depth.kind == "fixed" and depth.value == len(channels.value)):
            raise MicroserError(f"key '{name}.depth': must be left out (or equal {len(channels.value)}) "
                                "when channels is a fixed list")
        if not fixed_list and depth is None and channels is not None:
            raise MicroserError(f"key '{name}.depth' is missing; a per-block channels value needs a depth "
                                "(fixed or a range)")
        if fixed_list:
            min_depth = len(channels.value)
        elif depth is None:
            min_depth = len(FAMILIES[name].body().channels)
        else:
            min_depth = depth.value if depth.kind == "fixed" else min(depth.choices or (depth.low,))
        if pools is not None and pools.kind == "fixed" and (
                any(i >= min_depth for i in pools.value) or list(pools.value) != sorted(set(pools.value))):
            raise MicroserError(f"key '{name}.pool_after': {list(pools.value)} must be increasing block indices "
                                f"below the smallest depth {min_depth}; fix the list or draw per block")

    def suggest(self, trial: optuna.Trial) -> ArchSpec:
        """Ask ``trial`` for every free parameter of this space; return the ArchSpec it describes."""
        family = self.family.suggest(trial, "family")
        frontend = {k: p.suggest(trial, f"frontend.{k}") for k, p in self.frontend.items()}
        params = self.bodies[family]
        body: dict[str, Any] = {}
        depth = None
        per_block = FAMILIES[family].per_block
        if per_block:
            channels = params.get("channels")
            if "depth" in params:
                depth = params["depth"].suggest(trial, f"{family}.depth")
            elif channels is not None and channels.kind == "fixed" and isinstance(channels.value, tuple):
                depth = len(channels.value)
            else:
                depth = len(FAMILIES[family].body().channels)
        for key, p in params.items():
            if key == "depth":
                continue
            if key in per_block and not (p.kind == "fixed" and isinstance(p.value, tuple)):
                values = [p.suggest(trial, f"{family}.{key}.{i}") for i in range(depth)]
                body[key] = tuple(i for i, v in enumerate(values) if v) if key == "pool_after" else tuple(values)
            else:
                body[key] = p.suggest(trial, f"{family}.{key}")
        if per_block and "channels" not in body:
            body["channels"] = FAMILIES[family].body().channels[:1] * depth
        if per_block and "pool_after" not in body:
            body["pool_after"] = tuple(i for i in FAMILIES[family].body().pool_after if i < depth)
        try:
            return ArchSpec(family, FrontendSpec(**frontend), FAMILIES[family].body(**body))
        except MicroserError as e:
            raise MicroserError(f"{self.path}: trial {trial.number} drew an invalid spec ({e}); "
                                "narrow the ranges in the space file") from None

    def sample(self, n: int, seed: int = 0) -> list[ArchSpec]:
        """``n`` specs drawn at random (an in-memory Optuna study with RandomSampler(seed))."""
        logger = logging.getLogger("optuna")
        level = logger.level
        logger.setLevel(logging.WARNING)  # no "study created" / "trial finished" lines from a library call
        try:
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
            specs = []
            for _ in range(n):
                trial = study.ask()
                specs.append(self.suggest(trial))
                study.tell(trial, 0.0)
            return specs
        finally:
            logger.setLevel(level)
