"""The end of a search: the final stage's trials beside the references, the pick, and an honest verdict.

The pick is the finalist with the fewest parameters (within the reference's
int8 RAM) among those the final stage cannot separate from the one with the
best mean validation CCC over its seeds (``choose_pick``: each seed may
validate on other speakers, ``microser.splits.speaker_folds``, so a finalist
that beats the best on some seed's fold is not measurably worse).
Against the first reference it is compared on the test split, seed by seed
(the same seed index trains both on the same fold): the margin is the mean of
the paired differences and its spread their standard deviation; the pick
"beats" the reference only when the margin exceeds the spread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import optuna

from microser.asha import finalists
from microser.fidelity import Fidelity
from microser.ladder import read_ladder, references
from microser.pareto import is_feasible, non_dominated
from microser.rungs import FINAL, Evaluations, Job, RungQueue
from microser.urls import safe_url

FINAL_PLAN_ATTR = "final_plan"     # study user attr: finalists, steps, seeds, folds of the final stage


@dataclass
class SearchSummary:
    """The outcome of ``run_search``: counts, timings, the final stage and the verdict against the reference."""

    study: str
    storage: str
    artifacts: str
    cache: str
    settings: dict
    trained: int
    rejected: int
    failed: int
    rungs: list[int]           # trials completed at each rung
    stale_failed: list[int]
    search_seconds: float
    final_seconds: float
    rows: list[dict]           # finalists (front at final fidelity) then references, best final CCC first
    pick: dict | None          # choose_pick: best mean validation CCC, or the fewest params among the tied
    reference: dict | None     # the first reference's row
    margin: dict | None        # pick - reference, test CCC: {"mean", "spread", "per_seed", "verdict"}
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the final stage ----


def final_members(study: optuna.Study, state, k: int, names) -> list[int]:
    """The trials the final stage trains: the ``k`` best of the highest rungs, then the references ``names``."""
    return finalists(state.ladder, k) + [t.number for t in references(study, names)]


def run_final_stage(searcher, names) -> None:
    """Train the finalists and the references ``names`` with every seed (``searcher``: a ``search._Searcher``,
    its queue, ladder and workers): one plan per closed search stage, shared by every worker."""
    study, f = searcher.study, searcher.fidelity
    plan = study.user_attrs.get(FINAL_PLAN_ATTR)
    refs = [t.number for t in references(study, names)]
    if plan and all(n in plan["trials"] for n in refs):
        members, steps = list(plan["trials"]), int(plan.get("steps") or f.final_steps)
    else:   # computed on the settled ladder, so every worker that gets here computes the same plan
        state = searcher.state()
        members = final_members(study, state, searcher.config.final_k, names)
        steps = searcher.final_steps_that_fit(state, members)   # what the time left allows (--time)
        study.set_user_attr(FINAL_PLAN_ATTR, {"trials": members, "steps": steps, "seeds": f.final_seeds,
                                              "folds": f.folds})
    keys = searcher.queue.taken()
    total = len(members) * f.final_seeds
    for seed in range(f.final_seeds):   # seed-major: every member gets its first seed before any gets a second
        for n in members:
            job = Job(of=n, rung=FINAL, steps=steps, seed=seed, fold=seed % f.folds)
            if job.key not in keys:
                searcher.queue.enqueue(job)
    searcher.emit("start", "final", f"final stage: {len(members)} trials x {f.final_seeds} seeds = {total} runs of "
                  f"{steps} steps" + (f" (of {f.final_steps} planned: what --time leaves)" if steps < f.final_steps
                                      else "") + (f", validation rotating over {f.folds} speaker folds" if f.folds > 1
                                              else ""))
    if searcher.config.workers > 1:
        searcher.in_workers("final")
    searcher.drain()


# ---- the summary ----


def _row(t: optuna.trial.FrozenTrial, final: dict | None, rungs: dict[int, dict], on_front: bool) -> dict:
    a = t.user_attrs
    final = final or {}
    return {"number": t.number, "reference": a.get("reference"), "summary": a.get("summary"),
            "family": a.get("family"), "costs": a.get("costs"), "rungs": {0: a.get("ccc"), **{k: r.get("ccc") for k, r in rungs.items()}},
            "final_ccc": final.get("ccc"), "final_ccc_std": final.get("ccc_std"),
            "test_ccc": final.get("test_ccc"), "test_ccc_std": final.get("test_ccc_std"),
            "test_parts": final.get("test_parts"),
            "seeds": final.get("seeds", []), "feasible": is_feasible(t), "on_front": on_front,
            "collapsed": final.get("collapsed") or a.get("collapsed")}


def paired(a: dict, b: dict, key: str) -> list[float]:
    """``a`` minus ``b`` in mean CCC ``key`` ("ccc": validation, "test_ccc": test), seed by seed (the same seed
    index trains both on the same fold), over the seeds both have."""
    of_b = {s["seed"]: s for s in b.get("seeds", []) if s.get(key)}
    return [float(s[key]["mean"]) - float(of_b[s["seed"]][key]["mean"])
            for s in a.get("seeds", []) if s.get(key) and s["seed"] in of_b]


def separated(best: dict, other: dict) -> bool:
    """Whether ``best`` validates measurably above ``other``: the mean of their ``paired`` validation
    differences exceeds its spread, as ``compare`` judges test margins; with two seeds, whether ``best`` is
    ahead on both folds. Without a paired seed, by the means alone."""
    d = paired(best, other, "ccc")
    if not d:
        return best["final_ccc"]["mean"] > other["final_ccc"]["mean"]
    return float(np.mean(d)) > float(np.std(d))


def choose_pick(rows: list[dict], ram_ceiling: float | None = None) -> tuple[dict | None, list[int]]:
    """The pick among the finalists' ``rows`` and the trials tied with the best: the finalist with the best
    mean validation CCC, unless others are not ``separated`` from it; then, of those tied, the one with the
    fewest parameters, preferring those whose int8 RAM is within ``ram_ceiling`` (the reference's; ties: the
    better validation). With one or two validation speakers per fold the final stage's ranking is mostly
    noise; of models it cannot tell apart, the one with the fewest parameters tested as well as the best
    validating one over 19 benchmark runs, costs the firmware the least flash and is what ``--budget``
    measures, and the ceiling keeps the pick within the paper's student's working memory where any tied
    finalist is (docs/DECISIONS.md, "The pick among tied finalists")."""
    if not rows:
        return None, []
    best = max(rows, key=lambda r: r["final_ccc"]["mean"])
    tied = [r for r in rows if r is best or not separated(best, r)]

    def order(r: dict) -> tuple:
        over = ram_ceiling is not None and r["costs"]["ram_bytes"] > ram_ceiling
        return over, r["costs"]["params"], -r["final_ccc"]["mean"]

    return min(tied, key=order), [r["number"] for r in tied]


def compare(pick: dict, reference: dict) -> dict | None:
    """Pick minus reference in test CCC, paired by seed (same seed index = same validation fold).

    ``verdict`` is "beats" when the mean margin exceeds its spread (population
    std over seed pairs), "trails" when it is below minus the spread, else "ties".
    """
    pairs = paired(pick, reference, "test_ccc")
    if not pairs:
        return None
    mean, spread = float(np.mean(pairs)), float(np.std(pairs))
    verdict = "beats" if mean > spread and mean > 0 else "trails" if mean < -spread and mean < 0 else "ties"
    return {"mean": mean, "spread": spread, "per_seed": pairs, "verdict": verdict}


def summarize(study, settings, url, stale, search_seconds, final_seconds) -> SearchSummary:
    """The search's outcome, read back from storage: finalists and references at final fidelity, the verdict."""
    fidelity = Fidelity.from_dict(settings["fidelity"])
    objectives = tuple(settings["objectives"])
    queue = RungQueue(study, create=False)
    s = read_ladder(study, queue, fidelity, objectives)
    ev = Evaluations(study)
    by_number = {t.number: t for t in s.trials}
    plan = study.user_attrs.get(FINAL_PLAN_ATTR) or {"trials": []}
    if plan.get("steps"):   # the steps the final stage really trained (fewer than planned when time ran short)
        settings = {**settings, "fidelity": {**settings["fidelity"], "final_steps": plan["steps"]}}
    finals = {n: ev.final(by_number[n]) for n in plan["trials"] if n in by_number}
    candidates = [n for n in plan["trials"] if finals.get(n) and finals[n].get("ccc") and is_feasible(by_number[n])]
    rows = []
    if candidates:
        scores = np.array([finals[n]["ccc"]["mean"] for n in candidates])
        costs = np.array([[by_number[n].user_attrs["costs"][o] for o in objectives] for n in candidates], dtype=float)
        mask = non_dominated(scores, costs)
        rows = [_row(by_number[n], finals[n], ev.rungs(n), bool(m)) for n, m in zip(candidates, mask)]
    rows.sort(key=lambda r: -r["final_ccc"]["mean"])
    refs = [_row(t, finals.get(t.number), ev.rungs(t.number), False)
            for t in references(study, settings.get("references", ()))]
    reference = refs[0] if refs else None
    ceiling = reference["costs"]["ram_bytes"] if reference and reference.get("costs") else None
    pick, tied = choose_pick(rows, ceiling)
    notes = []
    if pick is not None and len(tied) > 1:
        within = " within the reference's int8 RAM" if ceiling is not None else ""
        notes.append(f"the final stage's validation cannot separate trials {', '.join(map(str, sorted(tied)))}: "
                     f"the pick, trial {pick['number']}, is the one of them with the fewest parameters{within}")
    if pick is None:
        notes.append("no candidate finished the final stage: run the same command again to finish it, or give "
                     "more --time")
    return SearchSummary(
        study=study.study_name, storage=safe_url(url), artifacts=settings["artifacts"], cache=settings["cache"],
        settings=settings, trained=s.counts["trained"], rejected=s.counts["rejected"], failed=s.counts["failed"],
        rungs=[len(level) for level in s.ladder], stale_failed=list(stale), search_seconds=search_seconds,
        final_seconds=final_seconds, rows=rows + refs, pick=pick, reference=reference,
        margin=compare(pick, reference) if pick and reference else None, notes=notes)
