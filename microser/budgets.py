"""Budget strings (``80k-params``, ``256KiB-ram``): the one parser, and how a budget becomes a constraint.

A budget is ``NUMBER[SUFFIX]-METRIC``:

========  ==============  =====================================================
metric    cost key        unit and suffixes
========  ==============  =====================================================
params    ``params``      ONNX initializer elements; k = x1000, M = x1,000,000
macs      ``macs``        multiply-accumulates at --input-seconds; k, M, G
onnx      ``onnx_bytes``  fp32 ONNX file bytes; KB/MB = x1000/x1000^2 (decimal),
                          KiB/MiB = x1024/x1024^2 (binary)
ram       ``ram_bytes``   peak activation bytes of the int8 plan at
                          --input-seconds; KB/MB/KiB/MiB as for onnx
instr     ``instr``       int8 C library instructions per second of audio
                          (predicted, x86-64 callgrind scale); k, M, G
========  ==============  =====================================================

Plain numbers (``80000-params``, ``65536-ram``) are accepted for every metric.
A budget is satisfied when ``cost <= limit``; as an Optuna constraint its value
is ``cost - limit`` (``<= 0`` is feasible). A candidate without an int8 C library
has ``instr`` = inf: an ``instr`` budget rejects it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from microser.errors import MicroserError

# The cost keys a trial records (microser.costs.Costs.to_dict()) that budgets, objectives and fronts name.
COST_KEYS = ("params", "ram_bytes", "onnx_bytes", "macs", "instr")
DEFAULT_OBJECTIVES = ("params", "ram_bytes")   # minimised beside mean CCC unless --objectives says otherwise
# metric name in a budget string -> its cost key
METRICS: dict[str, str] = {"params": "params", "macs": "macs", "onnx": "onnx_bytes", "ram": "ram_bytes",
                          "instr": "instr"}
_COUNT_SUFFIXES = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3}
_BYTE_SUFFIXES = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "KiB": 1024, "MiB": 1024**2}
_COUNT_METRICS = ("params", "macs", "instr")
_PATTERN = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<suffix>[A-Za-z]*)\s*-\s*(?P<metric>[a-z]+)\s*$")

EXAMPLES = "'80k-params', '64KB-onnx', '256KiB-ram', '20M-macs', '30M-instr'"
BUDGET_HELP = (
    "Budget NUMBER[SUFFIX]-METRIC, repeatable; a candidate over any budget is measured and rejected before "
    "training. params = ONNX initializer elements, macs = multiply-accumulates and instr = instructions per "
    "second of audio of the int8 C library (k = 1000, M = 10^6, G = 10^9); onnx = fp32 ONNX file bytes and "
    "ram = peak activation bytes of the int8 plan at --input-seconds (KB/MB = 1000/10^6 bytes, KiB/MiB = "
    "1024/1024^2 bytes). Examples: " + EXAMPLES + "."
)


@dataclass(frozen=True)
class Budget:
    """One cost limit: ``metric`` is a cost key (``params``, ``onnx_bytes``, ``ram_bytes``, ``macs``, ``instr``)."""

    metric: str
    limit: int | float
    text: str = ""

    def violation(self, costs: Mapping[str, float]) -> float:
        """``cost - limit``: the Optuna constraint value, ``<= 0`` when the budget holds."""
        return float(costs[self.metric]) - float(self.limit)

    def holds(self, costs: Mapping[str, float]) -> bool:
        return self.violation(costs) <= 0

    def to_dict(self) -> dict:
        return {"metric": self.metric, "limit": self.limit, "text": self.text}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Budget":
        return cls(metric=str(d["metric"]), limit=d["limit"], text=str(d.get("text", "")))

    def __str__(self) -> str:
        return self.text or f"{self.limit}-{self.metric}"


def parse_budget(text: str) -> Budget:
    """Parse ``"80k-params"`` into ``Budget("params", 80000)``; MicroserError with an example if malformed.

    >>> parse_budget("80k-params")
    Budget(metric='params', limit=80000, text='80k-params')
    >>> parse_budget("256KiB-ram").limit
    262144
    """
    m = _PATTERN.match(str(text))
    if not m:
        raise MicroserError(f"budget {text!r} is not understood: expected NUMBER[SUFFIX]-METRIC with METRIC one of "
                            f"{', '.join(METRICS)}, e.g. {EXAMPLES}")
    number, suffix, metric = m["number"], m["suffix"], m["metric"]
    if metric not in METRICS:
        raise MicroserError(f"budget {text!r} names an unknown metric {metric!r}: expected one of "
                            f"{', '.join(METRICS)}, e.g. {EXAMPLES}")
    if metric in _COUNT_METRICS:
        scales, kind = _COUNT_SUFFIXES, "a count (suffix k, M or G)"
    else:
        scales, kind = _BYTE_SUFFIXES, "bytes (suffix KB, MB, KiB or MiB)"
    if suffix not in scales:
        example = {"params": "'80k-params'", "macs": "'20M-macs'", "instr": "'30M-instr'"}.get(
            metric, "'64KB-onnx' or '256KiB-ram'")
        raise MicroserError(f"budget {text!r}: suffix {suffix!r} does not fit {metric}, which is {kind}; "
                            f"write e.g. {example}")
    value = float(number) * scales[suffix]
    if value <= 0:
        raise MicroserError(f"budget {text!r} must be positive, e.g. {EXAMPLES}")
    limit: int | float = int(value) if value == int(value) else value
    return Budget(metric=METRICS[metric], limit=limit, text=str(text).strip())


def parse_budgets(texts: Iterable[str]) -> tuple[Budget, ...]:
    """Parse several budgets; two budgets on the same metric are refused (keep the tighter one)."""
    budgets = tuple(parse_budget(t) for t in texts)
    seen: dict[str, Budget] = {}
    for b in budgets:
        if b.metric in seen:
            raise MicroserError(f"budgets {seen[b.metric].text!r} and {b.text!r} both limit {b.metric}: "
                                "pass one budget per metric")
        seen[b.metric] = b
    return budgets


def canonical_text(budget: Budget) -> str:
    """The one spelling of a budget: the largest exact suffix, e.g. ``80000-params`` -> ``80k-params``,
    ``262144-ram`` -> ``256KiB-ram``, ``64000-onnx`` -> ``64KB-onnx`` (binary before decimal for bytes)."""
    name = next(m for m, key in METRICS.items() if key == budget.metric)
    limit = budget.limit
    if float(limit) == int(limit):
        limit = int(limit)
        scales = (("G", 1000**3), ("M", 1000**2), ("k", 1000)) if name in _COUNT_METRICS else \
            (("MiB", 1024**2), ("MB", 1000**2), ("KiB", 1024), ("KB", 1000))
        for suffix, scale in scales:
            if limit % scale == 0:
                return f"{limit // scale}{suffix}-{name}"
        return f"{limit}-{name}"
    return f"{limit:g}-{name}"


def canonical(budgets: Iterable[Budget]) -> tuple[Budget, ...]:
    """Budgets as a study's identity records them: sorted by metric (params, macs, onnx, ram), each spelled by
    `canonical_text`, so ``80000-params`` and ``80k-params``, in any order, are the same study."""
    order = list(METRICS.values())
    ordered = sorted(budgets, key=lambda b: order.index(b.metric))
    return tuple(Budget(b.metric, b.limit, canonical_text(b)) for b in ordered)


def canonical_dicts(budgets: Iterable[Budget | Mapping | str]) -> list[dict]:
    """`canonical` of budgets given as Budgets, their ``to_dict()`` (a study's settings) or strings, as dicts."""
    parsed = [b if isinstance(b, Budget) else parse_budget(b) if isinstance(b, str) else Budget.from_dict(b)
              for b in budgets]
    return [b.to_dict() for b in canonical(parsed)]


def violations(budgets: Iterable[Budget], costs: Mapping[str, float]) -> dict[str, float]:
    """Constraint values keyed by cost key (``cost - limit``, ``<= 0`` feasible), for ``trial.set_constraint``."""
    return {b.metric: b.violation(costs) for b in budgets}


def describe_violations(budgets: Iterable[Budget], costs: Mapping[str, float]) -> str:
    """``"ram_bytes 412000 > 256000"`` for every broken budget, joined by ``"; "`` (empty if all hold)."""
    return "; ".join(f"{b.metric} {_fmt(costs[b.metric])} > {_fmt(b.limit)}"
                     for b in budgets if not b.holds(costs))


def _fmt(x: float) -> str:
    x = float(x)
    if math.isinf(x):
        return "inf (no int8 C library)" if x > 0 else "-inf"
    return str(int(x)) if x == int(x) else f"{x:g}"
