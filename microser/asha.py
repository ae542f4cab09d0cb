"""Successive halving over rungs of optimizer steps, asynchronous (ASHA) and multi-objective: which trial goes up next.

Pure functions over plain numbers; the storage and the training live in
``microser.rungs`` and ``microser.search``. A study's rungs are increasing
step counts (e.g. 60, 200, 600). Every candidate is trained at the first rung.
A trial completed at rung ``k`` may be promoted to rung ``k+1`` when it is among
the best ``floor(n_k / eta)`` of the ``n_k`` trials completed at rung ``k``
(Li et al. 2020, "A system for massively parallel hyperparameter tuning"):
promotions are decided whenever a worker is free, never waiting for a rung to
fill, so several workers and a resumed run need no synchronisation beyond the
storage. Optuna's pruners refuse multi-objective studies; here "best" is
non-dominated sorting (``microser.pareto.pareto_ranks``) over (CCC at that rung,
the study's cost objectives), ties within a front broken by higher CCC, then by
trial number. Collapsed trials and trials with CCC <= 0 are never promoted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from microser.pareto import pareto_ranks


@dataclass(frozen=True)
class Result:
    """One trial's score at one rung: mean validation CCC and its cost objectives (lower is better)."""

    trial: int
    ccc: float
    costs: tuple[float, ...]
    collapsed: bool = False

    @property
    def promotable(self) -> bool:
        return not self.collapsed and self.ccc > 0


def promotion_order(results: Sequence[Result]) -> list[Result]:
    """``results`` best first: by Pareto rank over (CCC, costs), then higher CCC, then lower trial number.

    >>> rs = [Result(0, .3, (10.,)), Result(1, .5, (20.,)), Result(2, .2, (30.,)), Result(3, .4, (5.,))]
    >>> [r.trial for r in promotion_order(rs)]
    [1, 3, 0, 2]
    """
    if not results:
        return []
    ranks = pareto_ranks(np.array([r.ccc for r in results]), np.array([r.costs for r in results], dtype=float))
    order = sorted(range(len(results)), key=lambda i: (ranks[i], -results[i].ccc, results[i].trial))
    return [results[i] for i in order]


def promotions(ladder: Sequence[Sequence[Result]], taken: Sequence[Iterable[int]], eta: int) -> list[tuple[int, int]]:
    """``(trial, rung)`` promotions that are due, highest rung first (ASHA favours finishing what it started).

    Args:
        ladder: ``ladder[k]`` = results completed at rung ``k``.
        taken: ``taken[k]`` = trials at rung ``k`` already done, running or queued (for ``k >= 1``).
        eta: keep the best ``1/eta`` of a rung.
    """
    if eta < 2:
        raise ValueError(f"eta must be >= 2, but got {eta}")
    due = []
    for k in reversed(range(len(ladder) - 1)):
        top = len(ladder[k]) // eta
        done = set(taken[k + 1])
        best = promotion_order([r for r in ladder[k] if r.promotable])[:top]
        due += [(r.trial, k + 1) for r in best if r.trial not in done]
    return due


def finalists(ladder: Sequence[Sequence[Result]], k: int) -> list[int]:
    """The ``k`` trials to train at final fidelity, each judged by its result at the highest rung it reached:
    from the highest rung down, best CCC first (ties: lower trial number).

    Promotion ranks by Pareto rank over (CCC, costs) so that cheap candidates keep climbing; the final stage
    is there to confirm the best model within the budget (the pick: the finalist with the best validation
    CCC, or the fewest parameters among those it cannot be separated from, ``final.choose_pick``), so its seats go
    by CCC: a 4k-parameter model on the front because it is small no longer takes the seat of a better one
    (docs/DECISIONS.md, "Final-stage seats by CCC").
    Trials whose latest result could not be promoted (collapsed, CCC <= 0) come after all others, but still
    come: a search whose every candidate scored about 0 still ends with its best tried at final fidelity.
    """
    latest: dict[int, tuple[int, Result]] = {}
    for rung, level in enumerate(ladder):
        for r in level:
            latest[r.trial] = (rung, r)
    chosen: list[int] = []
    for usable in (True, False):
        for rung in reversed(range(len(ladder))):
            here = [r for k_, r in latest.values() if k_ == rung and r.promotable == usable]
            chosen += [r.trial for r in sorted(here, key=lambda r: (-r.ccc, r.trial))]
    return chosen[:k]
