"""The Pareto front of a study: which trials are worth keeping, as rows, JSON and paper-ready plots.

Everything here reads a finished (or running) Optuna study through the trial
user attributes that ``microser.search`` writes and the evaluations in its
companion study (``microser.rungs``; see docs/ARCHITECTURE.md, "Trials");
nothing here trains or measures. Rendering of tables lives in
``microser.show``; the plots are files, written here.

Levels: a study's fidelities are its rungs (optimizer steps, e.g. ``60``,
``200``, ``600``) and ``final`` (the final stage, mean over seeds). One front
is built at one level only, from the trials that reached it, never mixing
fidelities on one axis. ``level="auto"`` picks the highest level that at least
``MIN_FRONT_TRIALS`` feasible trials reached; ``first`` is the first rung
(every candidate). Studies made before rungs have the levels ``search`` and
``final``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from microser.budgets import COST_KEYS, DEFAULT_OBJECTIVES
from microser.errors import MicroserError
from microser.rungs import FINAL, Evaluations
from microser.storage import worker_gone

COMPRESSED_PREFIX = "compressed:"  # study user attr "compressed:<trial>": where `microser compress` wrote
MIN_FRONT_TRIALS = 3   # "auto" shows the highest level at least this many feasible trials reached
# The plot's three panels: cost key, axis label.
PANELS = (("params", "parameters (ONNX initializer elements)"),
          ("ram_bytes", "peak activation RAM, int8 plan"),
          ("onnx_bytes", "ONNX file size, fp32"))


def is_candidate(t: FrozenTrial) -> bool:
    """A candidate trained at the first rung (complete with a CCC, not rejected, not a reference)."""
    return (t.state == TrialState.COMPLETE and "ccc" in t.user_attrs and not t.user_attrs.get("rejected")
            and not t.user_attrs.get("reference"))


def is_feasible(t: FrozenTrial) -> bool:
    """A trained candidate within every budget: the one feasibility rule of search, pareto and summaries."""
    return is_candidate(t) and all(v <= 0 for v in (t.constraints or {}).values())


@dataclass(frozen=True)
class TrialRow:
    """One trial as pareto/trials/show present it (JSON-ready through ``asdict``)."""

    number: int
    state: str                      # optuna TrialState name
    family: str | None
    summary: str | None
    ccc: dict[str, float] | None    # per target + "mean", at ``level`` (None: the trial did not reach it)
    level: str                      # the fidelity of ``ccc``: a rung's steps ("200") or "final"
    levels: dict[str, float]        # mean CCC at every level the trial reached
    costs: dict[str, float]
    train_seconds: float | None
    reference: str | None
    rejected: str | None
    violations: dict[str, float]    # constraint name -> value > 0 (infeasible)
    feasible: bool                  # complete, not rejected, not a reference, all constraints <= 0
    on_front: bool = False
    ccc_std: dict[str, float] | None = None   # final level: std over seeds


@dataclass(frozen=True)
class FrontReport:
    """The front of one study at one level, plus what was left out and why."""

    study: str
    level: str
    levels: dict[str, int]          # every level -> feasible trials that reached it
    objectives: tuple[str, ...]     # cost keys minimised beside mean CCC
    budgets: dict[str, float]       # cost key -> limit
    feasible: list[TrialRow]        # every feasible trial at ``level``; ``on_front`` marks the N-D front
    references: list[TrialRow]      # references that reached ``level``
    counts: dict[str, int]          # trials, complete, feasible, front, infeasible, rejected, failed, ...
    panel_fronts: dict[str, list[int]] = field(default_factory=dict)  # cost key -> trial numbers, by cost

    @property
    def front(self) -> list[TrialRow]:
        """Feasible Pareto-optimal trials (mean CCC against ``objectives``), cheapest first."""
        return [r for r in self.feasible if r.on_front]

    @property
    def label(self) -> str:
        """The level in words, e.g. ``"600 steps"`` or ``"final stage"``."""
        return level_label(self.level)

    def to_dict(self) -> dict:
        """What ``--json`` prints; ``points`` is exactly what the plots draw."""
        return {
            "study": self.study,
            "level": self.level,
            "levels": self.levels,
            "objectives": ["ccc_mean", *self.objectives],
            "budgets": self.budgets,
            "counts": self.counts,
            "front": [asdict(r) for r in self.front],
            "references": [asdict(r) for r in self.references],
            "points": [_point(r) for r in (*self.feasible, *self.references)],
            "panel_fronts": self.panel_fronts,
        }


def level_label(level: str) -> str:
    if level == FINAL:
        return "final stage"
    if level == "search":
        return "search stage"
    return f"{level} steps"


def _spec_info(attrs: dict) -> tuple[str | None, str | None]:
    """(family, one-line summary) of a trial: its ``family``/``summary`` attrs, else parsed from ``spec``."""
    if attrs.get("family") and attrs.get("summary"):
        return attrs["family"], attrs["summary"]
    if not attrs.get("spec"):
        return None, None
    from microser.models.spec import ArchSpec

    spec = ArchSpec.from_json(attrs["spec"])
    return spec.family, spec.summary()


def _settings(study: optuna.Study) -> dict:
    from microser.storage import SETTINGS_ATTR

    settings = study.user_attrs.get(SETTINGS_ATTR)
    return settings if isinstance(settings, dict) else {}


def study_levels(study: optuna.Study) -> list[str]:
    """The study's levels, lowest first: its rungs' step counts and "final" (``search``, ``final`` before rungs)."""
    fidelity = _settings(study).get("fidelity") or {}
    rungs = fidelity.get("rungs") if isinstance(fidelity, dict) else None
    return [str(r) for r in rungs] + [FINAL] if rungs else ["search", FINAL]


def level_results(study: optuna.Study, trials, evaluations: Evaluations | None = None) -> dict[str, dict[int, dict]]:
    """``{level: {trial number: {"ccc", "ccc_std"}}}`` for every trial that reached each level."""
    ev = evaluations or Evaluations(study)
    levels = study_levels(study)
    out: dict[str, dict[int, dict]] = {level: {} for level in levels}
    for t in trials:
        a = t.user_attrs
        if a.get("ccc") and not a.get("rejected") and t.state == TrialState.COMPLETE:
            out[levels[0]][t.number] = {"ccc": dict(a["ccc"])}
        for k, record in ev.rungs(t.number).items():
            if 0 < k < len(levels) - 1 and record.get("ccc"):
                out[levels[k]][t.number] = {"ccc": dict(record["ccc"])}
        final = ev.final(t)
        if final and final.get("ccc"):
            out[FINAL][t.number] = {"ccc": dict(final["ccc"]), "ccc_std": final.get("ccc_std")}
    return out


def trial_row(trial: FrozenTrial, level: str, results: dict[str, dict[int, dict]]) -> TrialRow:
    """Read one trial into a :class:`TrialRow` with its CCC at ``level`` (None when it did not reach it)."""
    attrs = trial.user_attrs
    family, summary = _spec_info(attrs)
    here = results.get(level, {}).get(trial.number)
    costs = {k: v for k, v in (attrs.get("costs") or {}).items() if isinstance(v, (int, float))}
    violations = {k: float(v) for k, v in (trial.constraints or {}).items() if v > 0}
    state = trial.state.name
    if worker_gone(trial):   # killed: the next `microser search` fails it and queues it again
        state = "RUNNING (worker gone)"
    return TrialRow(number=trial.number, state=state, family=family, summary=summary,
                    ccc=here["ccc"] if here else None, level=level,
                    levels={lv: r[trial.number]["ccc"]["mean"] for lv, r in results.items() if trial.number in r},
                    costs=costs, train_seconds=attrs.get("train_seconds"), reference=attrs.get("reference"),
                    rejected=attrs.get("rejected"), violations=violations, feasible=is_feasible(trial),
                    ccc_std=here.get("ccc_std") if here else None)


def non_dominated(scores: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates.

    A point dominates another when its score is >= and every cost is <=, with
    at least one strict. Ties (equal score and costs) are all kept.

    Args:
        scores: ``(N,)`` higher is better.
        costs: ``(N, K)`` lower is better.

    >>> non_dominated(np.array([.5, .6, .4]), np.array([[10.], [20.], [30.]])).tolist()
    [True, True, False]
    """
    scores = np.asarray(scores, dtype=float)
    costs = np.asarray(costs, dtype=float).reshape(len(scores), -1)
    keep = np.ones(len(scores), dtype=bool)
    for i in range(len(scores)):
        no_worse = (scores >= scores[i]) & np.all(costs <= costs[i], axis=1)
        strictly = (scores > scores[i]) | np.any(costs < costs[i], axis=1)
        keep[i] = not np.any(no_worse & strictly)
    return keep


def pareto_ranks(scores: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Non-dominated sorting: 0 for the points no other point dominates, 1 for those only rank-0 points dominate, ...

    Same dominance as :func:`non_dominated` (score higher is better, costs lower).

    >>> pareto_ranks(np.array([.5, .6, .4, .3]), np.array([[10.], [20.], [30.], [30.]])).tolist()
    [0, 0, 1, 2]
    """
    scores = np.asarray(scores, dtype=float)
    costs = np.asarray(costs, dtype=float).reshape(len(scores), -1)
    ranks = np.full(len(scores), -1, dtype=int)
    rank = 0
    while (ranks < 0).any():
        left = np.flatnonzero(ranks < 0)
        ranks[left[non_dominated(scores[left], costs[left])]] = rank
        rank += 1
    return ranks


def study_objectives(study: optuna.Study) -> tuple[str, ...]:
    """Cost keys the study minimised (search settings, else metric names); default params, ram_bytes."""
    names = _settings(study).get("objectives") or study.metric_names or ()
    keys = tuple(n for n in names if n in COST_KEYS)
    return keys or DEFAULT_OBJECTIVES


def study_budgets(study: optuna.Study) -> dict[str, float]:
    """Budget limits per cost key from the study's search settings (``Budget.to_dict()`` mappings).

    When the study records none, the limits are recovered from any trial's
    constraints, which search sets to ``cost - limit``.
    """
    from microser.budgets import Budget

    raw = _settings(study).get("budgets")
    if raw:
        budgets = [Budget.from_dict(b) for b in raw]
        return {b.metric: float(b.limit) for b in budgets}
    for t in study.get_trials(deepcopy=False):
        costs = t.user_attrs.get("costs") or {}
        if t.constraints and all(k in costs for k in t.constraints):
            return {k: float(costs[k]) - float(v) for k, v in t.constraints.items()}
    return {}


def _choose_level(level: str, levels: list[str], reached: dict[str, int]) -> str:
    if level == "auto":
        for lv in reversed(levels):
            if reached[lv] >= MIN_FRONT_TRIALS:
                return lv
        return next((lv for lv in reversed(levels) if reached[lv]), levels[0])
    if level in ("first", "search"):
        return levels[0]
    if level not in levels:
        raise MicroserError(f"level {level!r} is not one of this study's levels ({', '.join(levels)}): pass "
                            "--rung with one of those, 'first' or 'auto'")
    return level


def front_report(study: optuna.Study, *, level: str = "auto") -> FrontReport:
    """The feasible Pareto-optimal trials of ``study`` at one ``level``, the references there, and counts."""
    trials = study.get_trials(deepcopy=False)
    results = level_results(study, trials)
    levels = list(results)
    feasible_numbers = {t.number for t in trials if is_feasible(t)}
    reached = {lv: len(set(r) & feasible_numbers) for lv, r in results.items()}
    level = _choose_level(str(level), levels, reached)
    rows = [trial_row(t, level, results) for t in trials]
    objectives = study_objectives(study)
    feasible = [r for r in rows if r.feasible and r.ccc is not None and all(k in r.costs for k in objectives)]
    if feasible:
        mask = non_dominated(np.array([r.ccc["mean"] for r in feasible]),
                             np.array([[r.costs[k] for k in objectives] for r in feasible]))
        feasible = [_on_front(r) if m else r for r, m in zip(feasible, mask)]
    feasible.sort(key=lambda r: (r.costs[objectives[0]], -r.ccc["mean"], r.number))
    references = [r for r in rows if r.reference and r.ccc is not None and r.state == "COMPLETE"]
    panel_fronts = {}
    for key, _ in PANELS:
        pts = sorted((r for r in feasible if key in r.costs), key=lambda r: (r.costs[key], -r.ccc["mean"]))
        if pts:
            m = non_dominated(np.array([r.ccc["mean"] for r in pts]), np.array([[r.costs[key]] for r in pts]))
            panel_fronts[key] = [r.number for r, k in zip(pts, m) if k]
    counts = {
        "trials": len(rows),
        "complete": sum(r.state == "COMPLETE" for r in rows),
        "feasible": len(feasible),
        "front": sum(r.on_front for r in feasible),
        "infeasible": sum(r.state == "COMPLETE" and not r.rejected and not r.reference and bool(r.violations)
                          for r in rows),
        "rejected": sum(bool(r.rejected) for r in rows),
        "failed": sum(r.state == "FAIL" for r in rows),
        "running": sum(r.state.startswith("RUNNING") for r in rows),
        "pruned": sum(r.state == "PRUNED" for r in rows),
        "references": len(references),
    }
    return FrontReport(study=study.study_name, level=level, levels=reached, objectives=objectives,
                       budgets=study_budgets(study), feasible=feasible, references=references, counts=counts,
                       panel_fronts=panel_fronts)


def _on_front(row: TrialRow) -> TrialRow:
    return TrialRow(**{**asdict(row), "on_front": True})


def all_rows(study: optuna.Study, *, level: str = "auto") -> list[TrialRow]:
    """Every trial of the study as a row (``microser trials``), ``on_front`` at ``level``."""
    report = front_report(study, level=level)
    on_front = {r.number for r in report.front}
    trials = study.get_trials(deepcopy=False)
    results = level_results(study, trials)
    return [_on_front(r) if r.number in on_front else r for r in (trial_row(t, report.level, results) for t in trials)]


def trial_detail(study: optuna.Study, number: int) -> dict:
    """Everything stored about one trial, JSON-ready (``microser show --trial N``): every rung and the final stage."""
    from microser.rungs import trained_record

    trials = study.get_trials(deepcopy=False)
    match = [t for t in trials if t.number == number]
    if not match:
        raise MicroserError(f"trial {number} is not in study {study.study_name!r} (it has trials 0.."
                            f"{len(trials) - 1}): pick a number from `microser trials --study {study.study_name}`")
    t = match[0]
    ev = Evaluations(study)
    levels = study_levels(study)
    rungs = {levels[0]: t.user_attrs.get("ccc")}
    rungs.update({levels[k]: r.get("ccc") for k, r in sorted(ev.rungs(t.number).items()) if k < len(levels) - 1})
    return {
        "number": t.number,
        "state": t.state.name,
        "values": list(t.values) if t.values is not None else None,
        "params": dict(t.params),
        "constraints": dict(t.constraints or {}),
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
        "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        "summary": _spec_info(t.user_attrs)[1],
        "rungs": {k: v for k, v in rungs.items() if v},
        "final": ev.final(t),
        "trained": trained_record(study, t),
        "compressed": study.user_attrs.get(f"{COMPRESSED_PREFIX}{t.number}"),
        "user_attrs": {k: (json.loads(v) if k == "spec" and isinstance(v, str) else v)
                       for k, v in t.user_attrs.items()},
    }


# ---- points and plots: both draw exactly FrontReport.to_dict()["points"] ----


def _point(row: TrialRow) -> dict:
    return {"number": row.number, "family": row.family, "summary": row.summary, "ccc": row.ccc["mean"],
            "level": row.level, "reference": row.reference, "on_front": row.on_front,
            **{key: row.costs.get(key) for key, _ in PANELS}}


def _require_points(report: FrontReport, points: list[dict]) -> None:
    if not points:
        c = report.counts
        raise MicroserError(f"study {report.study!r} has no feasible trial or reference to plot yet ({c['trials']} "
                            f"trials: {c['rejected']} rejected, {c['infeasible']} infeasible, {c['failed']} failed, "
                            f"{c['running']} running): run or resume `microser search --study {report.study}` first")


def plot_front(report: FrontReport, path: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """Write the 3-panel front plot (PNG, PDF or SVG by suffix) and return what each panel drew.

    Panels: mean CCC against params, int8 peak RAM and fp32 ONNX bytes, log x
    axes in the data's own units (bytes shown with SI prefixes). Every
    feasible trial is a dot; the 2-D front of each panel is a step line;
    budget limits are dashed vertical lines; references are labelled stars.

    Returns:
        ``{cost key: [(trial number, x, y), ...]}`` read back from the drawn
        artists (feasible trials, then references), for checking against
        :meth:`FrontReport.to_dict`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix and suffix not in formats:
        raise MicroserError(f"--plot {path}: matplotlib cannot write '.{suffix}' files; expected one of "
                            f"{', '.join('.' + f for f in sorted(formats))}: pass e.g. --plot front.png")
    points = report.to_dict()["points"]
    _require_points(report, points)
    by_number = {p["number"]: p for p in points}
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
                         "font.family": "DejaVu Sans"})
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 3.6), sharey=True, constrained_layout=True)
    drawn: dict[str, list[tuple[int, float, float]]] = {}
    for ax, (key, label) in zip(axes, PANELS):
        feas = [p for p in points if not p["reference"] and p[key] is not None]
        refs = [p for p in points if p["reference"] and p[key] is not None]
        sc = ax.scatter([p[key] for p in feas], [p["ccc"] for p in feas], s=18, color="#2c7fb8", edgecolor="white",
                        linewidth=0.4, alpha=0.9, zorder=2, label="feasible trial")
        groups = [(feas, sc)]
        front = [by_number[n] for n in report.panel_fronts.get(key, [])]
        if front:
            xs, ys = [p[key] for p in front], [p["ccc"] for p in front]
            ax.plot(xs, ys, drawstyle="steps-post", color="#d95f02", lw=1.4, zorder=3, label="front (this panel)")
            ax.scatter(xs, ys, s=36, color="#2c7fb8", edgecolors="#d95f02", linewidths=1.6, zorder=4)
            for p in front:
                ax.annotate(f"#{p['number']}", (p[key], p["ccc"]), xytext=(3, -9), textcoords="offset points",
                            fontsize=6.5, color="#a04000")
        rs = ax.scatter([p[key] for p in refs], [p["ccc"] for p in refs], marker="*", s=90, color="#1b1b1b",
                        edgecolor="white", linewidth=0.5, zorder=5, label="reference")
        rs.set_gid("references")
        for p in refs:
            ax.annotate(p["reference"], (p[key], p["ccc"]), xytext=(6, 5), textcoords="offset points",
                        fontsize=7.5, fontweight="bold", zorder=6,
                        bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        fmt = EngFormatter(unit="" if key == "params" else "B", sep=" ")
        if key in report.budgets:
            ax.axvline(report.budgets[key], color="#c0392b", ls="--", lw=1.0, zorder=1, label="budget")
            ax.annotate(f"budget {fmt(report.budgets[key])}", (report.budgets[key], 1), xycoords=("data", "axes fraction"),
                        xytext=(-3, -3), textcoords="offset points", ha="right", va="top", fontsize=7,
                        color="#c0392b")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_formatter(fmt)
        ax.set_xlabel(label)
        ax.grid(True, which="major", lw=0.4, alpha=0.5)
        ax.grid(True, which="minor", lw=0.2, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        drawn[key] = [(p["number"], float(x), float(y)) for pts, sc in [*groups, (refs, rs)]
                      for p, (x, y) in zip(pts, sc.get_offsets())]
    axes[0].set_ylabel(f"mean CCC (A/D/V), validation, {report.label}")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[-1].legend(handles, labels, loc="lower right", frameon=False)
    c = report.counts
    fig.suptitle(f"study {report.study} at {report.label}: {c['feasible']} feasible trials reached it, "
                 f"{c['front']} on the front "
                 f"({c['rejected']} rejected over budget, {c['infeasible']} infeasible, {c['failed']} failed)",
                 fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200)
    plt.close(fig)
    return drawn


def plot_front_html(report: FrontReport, path: str | Path) -> None:
    """Write the same three panels as an interactive plotly HTML file (hover shows trial and architecture)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    points = report.to_dict()["points"]
    _require_points(report, points)
    by_number = {p["number"]: p for p in points}
    fig = make_subplots(rows=1, cols=len(PANELS), shared_yaxes=True,
                        subplot_titles=[label for _, label in PANELS])
    for col, (key, label) in enumerate(PANELS, start=1):
        for group, style in (("feasible", dict(color="#9aa5b1", size=7)),
                             ("reference", dict(color="#1b1b1b", size=13, symbol="star"))):
            pts = [p for p in points if bool(p["reference"]) == (group == "reference") and p[key] is not None]
            fig.add_trace(go.Scatter(
                x=[p[key] for p in pts], y=[p["ccc"] for p in pts], mode="markers", marker=style,
                name=group, legendgroup=group, showlegend=col == 1,
                text=[f"#{p['number']} {p['reference'] or ''} {p['summary'] or ''}<br>CCC {p['ccc']:.3f} "
                      f"({report.label})" for p in pts], hoverinfo="text+x"), row=1, col=col)
        front = [by_number[n] for n in report.panel_fronts.get(key, [])]
        fig.add_trace(go.Scatter(x=[p[key] for p in front], y=[p["ccc"] for p in front], mode="lines+markers",
                                 line=dict(shape="hv", color="#d95f02"), marker=dict(color="#d95f02"),
                                 name="front", legendgroup="front", showlegend=col == 1,
                                 text=[f"#{p['number']}" for p in front], hoverinfo="text+x+y"),
                      row=1, col=col)
        if key in report.budgets:
            fig.add_vline(x=report.budgets[key], line_dash="dash", line_color="#c0392b", row=1, col=col)
        fig.update_xaxes(type="log", title_text=label, row=1, col=col)
    fig.update_yaxes(title_text=f"mean CCC, validation, {report.label}", row=1, col=1)
    fig.update_layout(title=f"study {report.study}", template="simple_white", height=460, width=1300)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)
