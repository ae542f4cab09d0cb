"""The console every renderer prints on, JSON output, and the number formats tables share."""

from __future__ import annotations

import json
import sys

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(obj) -> None:
    """Print ``obj`` as indented JSON on stdout (plain, no colour), for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def duration_text(seconds: float) -> str:
    from microser.durations import format_duration

    return format_duration(seconds)


def mean_std_text(mean: dict | None, std: dict | None) -> str:
    if not mean:
        return "-"
    return f"{mean['mean']:.3f}" + (f" ±{std['mean']:.3f}" if std and "mean" in std else "")


def kb_text(x) -> str:
    return "-" if x is None else f"{x / 1000:,.1f}"


def int_text(x) -> str:
    return "-" if x is None or x == float("inf") else f"{int(x):,}"


def ccc_cells(ccc: dict | None) -> list[str]:
    if not ccc:
        return ["-"] * 4
    return [f"{ccc[k]:.3f}" for k in ("arousal", "dominance", "valence", "mean")]
