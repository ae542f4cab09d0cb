"""The Pareto front of a study: which trials are worth keeping, as rows, JSON and paper-ready plots.

Everything here reads a finished (or running) Optuna study through the trial
user attributes that ``microser.search`` writes (see docs/ARCHITECTURE.md,
"Trials"); nothing here trains or measures. Rendering of tables lives in
``microser.show``; the plots are files, written here.

Stages: ``stage="final"`` scores each trial by its final-fidelity CCC when it
was retrained in the search's final stage, else by its search-fidelity CCC
(each row says which: ``ccc_stage``); ``stage="search"`` uses the
search-fidelity CCC for every trial. The front is recomputed here from those
scores and the study's cost objectives, so it is the front at the stage shown.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna

from microser.errors import MicroserError

STAGES = ("search", "final")
COMPRESSED_PREFIX = "compressed:"  # study user attr "compressed:<trial>": where `microser compress` wrote
COST_KEYS = ("params", "ram_bytes", "onnx_bytes", "macs")
DEFAULT_OBJECTIVES = ("params", "ram_bytes")
# The plot's three panels: cost key, axis label.
PANELS = (("params", "parameters (ONNX initializer elements)"),
          ("ram_bytes", "peak activation RAM, int8 plan"),
          ("onnx_bytes", "ONNX file size, fp32"))


@dataclass(frozen=True)
class TrialRow:
    """One trial as pareto/trials/show present it (JSON-ready through ``asdict``)."""

    number: int
    state: str                      # optuna TrialState name
    family: str | None
    summary: str | None
    ccc: dict[str, float] | None    # per target + "mean", at ``ccc_stage``
    ccc_stage: str | None           # "final" | "search" | None (no CCC)
    costs: dict[str, float]
    train_seconds: float | None
    reference: str | None
    rejected: str | None
    violations: dict[str, float]    # constraint name -> value > 0 (infeasible)
    feasible: bool                  # complete, not rejected, not a reference, all constraints <= 0
    on_front: bool = False


@dataclass(frozen=True)
class FrontReport:
    """The front of one study at one stage, plus what was left out and why."""

    study: str
    stage: str
    objectives: tuple[str, ...]     # cost keys minimised beside mean CCC
    budgets: dict[str, float]       # cost key -> limit
    feasible: list[TrialRow]        # every feasible trial; ``on_front`` marks the N-D front
    references: list[TrialRow]
    counts: dict[str, int]          # trials, complete, feasible, front, infeasible, rejected, failed, ...
    panel_fronts: dict[str, list[int]] = field(default_factory=dict)  # cost key -> trial numbers, by cost

    @property
    def front(self) -> list[TrialRow]:
        """Feasible Pareto-optimal trials (mean CCC against ``objectives``), cheapest first."""
        return [r for r in self.feasible if r.on_front]

    def to_dict(self) -> dict:
        """What ``--json`` prints; ``points`` is exactly what the plots draw."""
        return {
            "study": self.study,
            "stage": self.stage,
            "objectives": ["ccc_mean", *self.objectives],
            "budgets": self.budgets,
            "counts": self.counts,
            "front": [asdict(r) for r in self.front],
            "references": [asdict(r) for r in self.references],
            "points": [_point(r) for r in (*self.feasible, *self.references)],
            "panel_fronts": self.panel_fronts,
        }


def _spec_info(attrs: dict) -> tuple[str | None, str | None]:
    """(family, one-line summary) of a trial: its ``family``/``summary`` attrs, else parsed from ``spec``."""
    if attrs.get("family") and attrs.get("summary"):
        return attrs["family"], attrs["summary"]
    if not attrs.get("spec"):
        return None, None
    from microser.models.spec import ArchSpec

    spec = ArchSpec.from_json(attrs["spec"])
    return spec.family, spec.summary()


def _final(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict | None:
    """The final stage's record of a trial (``microser.storage.final_record``), None if not retrained."""
    from microser.storage import final_record

    return final_record(study, trial)


def trial_row(trial: optuna.trial.FrozenTrial, stage: str = "final", final: dict | None = None) -> TrialRow:
    """Read one trial's user attributes into a :class:`TrialRow` (CCC at ``stage``, see module doc).

    ``final`` is the trial's final-stage record (``microser.storage.final_record``).
    """
    if stage not in STAGES:
        raise MicroserError(f"stage {stage!r} is not known: expected one of {', '.join(STAGES)}")
    attrs = trial.user_attrs
    family, summary = _spec_info(attrs)
    ccc, ccc_stage = None, None
    if stage == "final" and final and final.get("ccc"):
        ccc, ccc_stage = dict(final["ccc"]), "final"
    elif attrs.get("ccc") and not attrs.get("rejected"):
        ccc, ccc_stage = dict(attrs["ccc"]), "search"
    costs = {k: v for k, v in (attrs.get("costs") or {}).items() if isinstance(v, (int, float))}
    violations = {k: float(v) for k, v in (trial.constraints or {}).items() if v > 0}
    state = trial.state.name
    feasible = (state == "COMPLETE" and ccc is not None and not attrs.get("rejected")
                and not attrs.get("reference") and not violations)
    return TrialRow(number=trial.number, state=state, family=family, summary=summary, ccc=ccc,
                    ccc_stage=ccc_stage, costs=costs, train_seconds=attrs.get("train_seconds"),
                    reference=attrs.get("reference"), rejected=attrs.get("rejected"),
                    violations=violations, feasible=feasible)


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


def _settings(study: optuna.Study) -> dict:
    from microser.storage import SETTINGS_ATTR

    settings = study.user_attrs.get(SETTINGS_ATTR)
    return settings if isinstance(settings, dict) else {}


def study_objectives(study: optuna.Study) -> tuple[str, ...]:
    """Cost keys the study minimised (search settings, else metric names); default params, ram_bytes."""
    names = _settings(study).get("objectives") or study.metric_names or ()
    keys = tuple(n for n in names if n in COST_KEYS)
    return keys or DEFAULT_OBJECTIVES


def study_budgets(study: optuna.Study) -> dict[str, float]:
    """Budget limits per cost key from the study's search settings.

    ``budgets`` (in the search settings, ``microser.storage.SETTINGS_ATTR``)
    may hold budget strings (``"80k-params"``, parsed by :func:`microser.budgets.parse_budget`),
    ``Budget.to_dict()`` mappings, or one ``{cost key: limit}`` mapping. When
    the study records none, the limits are recovered from any trial's
    constraints, which search sets to ``cost - limit``.
    """
    from microser.budgets import Budget, parse_budget

    raw = _settings(study).get("budgets")
    if isinstance(raw, dict):
        return {str(k): float(v) for k, v in raw.items()}
    if raw:
        budgets = [parse_budget(b) if isinstance(b, str) else Budget.from_dict(b) for b in raw]
        return {b.metric: float(b.limit) for b in budgets}
    for t in study.get_trials(deepcopy=False):
        costs = t.user_attrs.get("costs") or {}
        if t.constraints and all(k in costs for k in t.constraints):
            return {k: float(costs[k]) - float(v) for k, v in t.constraints.items()}
    return {}


def front_report(study: optuna.Study, *, stage: str = "final") -> FrontReport:
    """The feasible Pareto-optimal trials of ``study`` at ``stage``, the references, and counts."""
    rows = [trial_row(t, stage, _final(study, t)) for t in study.get_trials(deepcopy=False)]
    objectives = study_objectives(study)
    feasible = [r for r in rows if r.feasible and all(k in r.costs for k in objectives)]
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
        "running": sum(r.state == "RUNNING" for r in rows),
        "pruned": sum(r.state == "PRUNED" for r in rows),
        "references": len(references),
        "final_stage": sum(r.ccc_stage == "final" for r in rows),
    }
    return FrontReport(study=study.study_name, stage=stage, objectives=objectives, budgets=study_budgets(study),
                       feasible=feasible, references=references, counts=counts, panel_fronts=panel_fronts)


def _on_front(row: TrialRow) -> TrialRow:
    return TrialRow(**{**asdict(row), "on_front": True})


def all_rows(study: optuna.Study, *, stage: str = "final") -> list[TrialRow]:
    """Every trial of the study as a row (``microser trials``), with ``on_front`` filled in."""
    on_front = {r.number for r in front_report(study, stage=stage).front}
    return [_on_front(r) if r.number in on_front else r
            for r in (trial_row(t, stage, _final(study, t)) for t in study.get_trials(deepcopy=False))]


def trial_detail(study: optuna.Study, number: int) -> dict:
    """Everything stored about one trial, JSON-ready (``microser show --trial N``)."""
    from microser.storage import trained_record

    trials = study.get_trials(deepcopy=False)
    match = [t for t in trials if t.number == number]
    if not match:
        raise MicroserError(f"trial {number} is not in study {study.study_name!r} (it has trials 0.."
                            f"{len(trials) - 1}): pick a number from `microser trials --study {study.study_name}`")
    t = match[0]
    return {
        "number": t.number,
        "state": t.state.name,
        "values": list(t.values) if t.values is not None else None,
        "params": dict(t.params),
        "constraints": dict(t.constraints or {}),
        "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
        "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        "summary": _spec_info(t.user_attrs)[1],
        "final": _final(study, t),
        "trained": trained_record(study, t),
        "compressed": study.user_attrs.get(f"{COMPRESSED_PREFIX}{t.number}"),
        "user_attrs": {k: (json.loads(v) if k == "spec" and isinstance(v, str) else v)
                       for k, v in t.user_attrs.items()},
    }


# ---- points and plots: both draw exactly FrontReport.to_dict()["points"] ----


def _point(row: TrialRow) -> dict:
    return {"number": row.number, "family": row.family, "summary": row.summary, "ccc": row.ccc["mean"],
            "ccc_stage": row.ccc_stage, "reference": row.reference, "on_front": row.on_front,
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
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

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
        # a trial's CCC is final-stage (retrained longer) or search-stage (brief training): different markers
        groups = []
        for stage, style in (("search", dict(s=16, color="#9aa5b1", edgecolor="none", label="trial, search-stage CCC")),
                             ("final", dict(s=22, color="#2c7fb8", edgecolor="white", linewidth=0.5,
                                            label="trial, final-stage CCC"))):
            pts = [p for p in feas if (p["ccc_stage"] == "final") == (stage == "final")]
            if pts:
                sc = ax.scatter([p[key] for p in pts], [p["ccc"] for p in pts], alpha=0.9, zorder=2, **style)
                groups.append((pts, sc))
        front = [by_number[n] for n in report.panel_fronts.get(key, [])]
        if front:
            xs, ys = [p[key] for p in front], [p["ccc"] for p in front]
            ax.plot(xs, ys, drawstyle="steps-post", color="#d95f02", lw=1.4, zorder=3, label="front (this panel)")
            ax.scatter(xs, ys, s=36, c=["#2c7fb8" if p["ccc_stage"] == "final" else "#9aa5b1" for p in front],
                       edgecolors="#d95f02", linewidths=1.6, zorder=4)  # fill keeps the CCC-stage colour
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
    axes[0].set_ylabel("mean CCC (A/D/V), validation split")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[-1].legend(handles, labels, loc="lower right", frameon=False)
    c = report.counts
    fig.suptitle(f"study {report.study}: {c['feasible']} feasible trials, {c['front']} on the front "
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
                      f"({p['ccc_stage']})" for p in pts], hoverinfo="text+x"), row=1, col=col)
        front = [by_number[n] for n in report.panel_fronts.get(key, [])]
        fig.add_trace(go.Scatter(x=[p[key] for p in front], y=[p["ccc"] for p in front], mode="lines+markers",
                                 line=dict(shape="hv", color="#d95f02"), marker=dict(color="#d95f02"),
                                 name="front", legendgroup="front", showlegend=col == 1,
                                 text=[f"#{p['number']}" for p in front], hoverinfo="text+x+y"),
                      row=1, col=col)
        if key in report.budgets:
            fig.add_vline(x=report.budgets[key], line_dash="dash", line_color="#c0392b", row=1, col=col)
        fig.update_xaxes(type="log", title_text=label, row=1, col=col)
    fig.update_yaxes(title_text=f"mean CCC ({report.stage} stage)", row=1, col=1)
    fig.update_layout(title=f"study {report.study}", template="simple_white", height=460, width=1300)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)
