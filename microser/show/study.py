"""A study's tables (`microser pareto`, `trials`, `show`): 80 columns by default, every column with ``wide``."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement

from microser.show.base import ccc_cells, console, int_text, kb_text, print_json


_WIDE_MAX = 10_000   # --wide: no table is wider than this many characters


def _print_table(table, wide: bool) -> None:
    """Print ``table``; ``wide``: at its natural width (every column whole, lines as long as they need)."""
    if not wide:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update(max_width=_WIDE_MAX), table).maximum
    Console(width=max(console.width, natural)).print(table)   # console.print caps width at the terminal's


def _cell(text: str, width: int, **kw) -> dict:
    """Keyword arguments of a column that never shrinks below ``width`` (numbers stay whole at 80 columns)."""
    return dict(min_width=max(width, len(text)), no_wrap=True, **kw)


def pareto_front(report, *, as_json: bool = False, files: tuple = (), wide: bool = False) -> None:
    """`microser pareto`: the feasible front (references marked below it), counts, and the plot files.

    By default the columns fit 80 characters (trial, mean CCC, params, int8 RAM, then the architecture with the
    reference tag folded under it); ``wide`` adds family, A/D/V, ONNX size, MACs and training time.
    """
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    c = report.counts
    table = Table(title=f"study {report.study}: feasible Pareto front (mean CCC vs "
                        f"{', '.join(report.objectives)}; {report.label}, validation split)")
    if wide:
        for name in ("trial", "family", "architecture", "A", "D", "V", "CCC", "params", "ONNX KB", "RAM int8 KB",
                     "MACs", "train s", ""):
            table.add_column(name, no_wrap=True)
    else:
        for name, width in (("trial", 5), ("CCC", 5), ("params", 7), ("RAM KB", 6)):
            table.add_column(name, **_cell(name, width, justify="right"))
        table.add_column("architecture", min_width=24, ratio=1, overflow="fold")

    def add(r, tag):
        if wide:
            table.add_row(str(r.number), r.family or "-", r.summary or "-", *ccc_cells(r.ccc),
                          int_text(r.costs.get("params")), kb_text(r.costs.get("onnx_bytes")), kb_text(r.costs.get("ram_bytes")),
                          int_text(r.costs.get("macs")), "-" if r.train_seconds is None else f"{r.train_seconds:.0f}", tag)
        else:
            table.add_row(str(r.number), ccc_cells(r.ccc)[3], int_text(r.costs.get("params")),
                          kb_text(r.costs.get("ram_bytes")), (r.summary or "-") + (f"\n{tag}" if tag else ""))

    for r in report.front:
        add(r, "")
    if report.references:
        table.add_section()
        for r in report.references:
            add(r, f"reference {r.reference}")
    _print_table(table, wide)
    budgets = ", ".join(f"{k} <= {v:,.0f}" for k, v in report.budgets.items()) or "none"
    levels = ", ".join(f"{_level(lv)} {n}" for lv, n in report.levels.items())
    console.print(f"{c['front']} on the front of {c['feasible']} feasible trials at {report.label}; {c['rejected']} "
                  f"rejected over budget ({budgets}), {c['infeasible']} infeasible, {c['failed']} failed, "
                  f"{c['running']} running. Feasible trials per level: {levels} (--rung LEVEL). KB = 1000 bytes"
                  + ("." if wide else "; --wide for every column."), highlight=False)
    for f in files:
        console.print(f"wrote {f}", highlight=False)


def _level(level: str) -> str:
    from microser.pareto import level_label

    return level_label(level)


def trials_table(rows, *, as_json: bool = False, wide: bool = False) -> None:
    """`microser trials`: every trial, its state, CCC at every level it reached, costs, and notes.

    By default the columns fit 80 characters: the CCC at the highest level the trial reached (``at``), params,
    int8 RAM, and the architecture with the note folded under it; ``wide`` has a CCC column per level.
    """
    if as_json:
        from dataclasses import asdict

        print_json([asdict(r) for r in rows])
        return
    from rich.table import Table

    levels = list(dict.fromkeys(lv for r in rows for lv in r.levels))
    table = Table(title=f"all trials (CCC = validation mean at each level; front at {_level(rows[0].level)})"
                  if rows else "all trials")
    if wide:
        for name in ("trial", "state", "architecture", *levels, "params", "RAM int8 KB", "note"):
            table.add_column(name, no_wrap=True)
    else:
        for name, width, justify in (("trial", 5, "right"), ("state", 8, "left"), ("CCC", 5, "right"),
                                     ("at", max([len(lv) for lv in levels] + [2]), "right"),
                                     ("params", 7, "right"), ("RAM KB", 6, "right")):
            table.add_column(name, **_cell(name, width, justify=justify))
        table.add_column("architecture / note", min_width=20, ratio=1, overflow="fold")
    for r in rows:
        if r.reference:
            note = f"reference {r.reference}"
        elif r.rejected:
            note = r.rejected
        elif r.violations:
            note = "infeasible: " + ", ".join(f"{k} over by {v:,.0f}" for k, v in r.violations.items())
        else:
            note = "front" if r.on_front else ""
        if wide:
            table.add_row(str(r.number), r.state, r.summary or "-",
                          *(f"{r.levels[lv]:.3f}" if lv in r.levels else "-" for lv in levels),
                          int_text(r.costs.get("params")), kb_text(r.costs.get("ram_bytes")), note)
        else:
            top = next((lv for lv in reversed(levels) if lv in r.levels), None)
            table.add_row(str(r.number), r.state, "-" if top is None else f"{r.levels[top]:.3f}", top or "-",
                          int_text(r.costs.get("params")), kb_text(r.costs.get("ram_bytes")),
                          (r.summary or "-") + (f"\n{note}" if note else ""))
    _print_table(table, wide)
    if not wide and rows:
        console.print("CCC at the highest level each trial reached (at); --wide for every level.", highlight=False)


def trial_full(detail: dict, *, as_json: bool = False) -> None:
    """`microser show --trial N`: everything stored about one trial."""
    if as_json:
        print_json(detail)
        return
    from rich.pretty import Pretty

    console.print(f"[bold]trial {detail['number']}[/] {detail['state']}: {detail['summary'] or '-'}", highlight=False)
    console.print(Pretty({k: v for k, v in detail.items() if k not in ("number", "state", "summary")}))
