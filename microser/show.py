"""Everything the CLI prints: rich tables, progress, JSON. Library modules never print."""

from __future__ import annotations

import json
import sys

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(obj) -> None:
    """Print ``obj`` as indented JSON on stdout (plain, no colour), for scripts."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---- cache (microser cache build | info | verify) ----


class cache_progress:
    """A rich progress bar for `microser.cache.build_cache`: items, ETA and the real-time factor.

    Use as ``with show.cache_progress() as cb: build_cache(..., progress=cb)``.
    The real-time factor (wall seconds per audio second; lower is faster)
    counts only this run, so a resumed build does not look faster than it is.
    """

    def __enter__(self):
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._time = time.perf_counter
        self.bar = Progress(TextColumn("cache"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[rtf]}"),
                            console=err_console, transient=False)
        self.bar.__enter__()
        self.task = None
        return self

    def __call__(self, done: int, total: int, audio_seconds: float) -> None:
        now = self._time()
        if self.task is None:
            self.start = (now, audio_seconds)
            self.task = self.bar.add_task("cache", total=total, completed=done, rtf="")
            return
        run_audio = audio_seconds - self.start[1]
        rtf = f"RTF {(now - self.start[0]) / run_audio:.4f}" if run_audio > 0 else ""
        self.bar.update(self.task, total=total, completed=done, rtf=rtf)

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


def cache_built(report) -> None:
    """One paragraph after `microser cache build`: what was written and how fast."""
    rtf = report.rtf
    speed = f"RTF {rtf:.4f} ({1 / rtf:.0f}x real time)" if rtf else "nothing to do: the cache was already complete"
    resumed = f", {report.resumed_items} resumed from an interrupted run" if report.resumed_items else ""
    console.print(
        f"cache [bold]{report.out}[/]: {report.n_items} items from {report.n_sources} files "
        f"({report.audio_seconds / 3600:.2f} h), {report.n_skipped} skipped{resumed}; "
        f"{report.elapsed_seconds:.1f} s, {speed}"
    )
    if report.n_skipped:
        console.print(f"skipped files and reasons: {report.out / 'skipped.csv'}")


def cache_info(info: dict, as_json: bool = False) -> None:
    """`microser cache info`: counts, splits, target statistics and teachers."""
    if as_json:
        print_json(info)
        return
    from rich.table import Table

    console.print(
        f"[bold]{info['path']}[/]: {info['items']} items, {info['sources']} files, {info['hours']:.2f} h, "
        f"{info['speakers']} speakers, split by {info['split_by']} (seed {info['split_seed']}), {info['skipped']} skipped"
    )
    splits = Table("split", "items", "speakers", title="splits")
    for s, n in info["items_per_split"].items():
        splits.add_row(s, str(n), str(info["speakers_per_split"][s]))
    console.print(splits)
    targets = Table("target", "mean", "std", "min", "max", title="teacher targets")
    for name, st in info["targets"].items():
        targets.add_row(name, *("-" if st[k] is None else f"{st[k]:.3f}" for k in ("mean", "std", "min", "max")))
    console.print(targets)
    for spec, ident in zip(info["teacher_specs"], info["teachers"]):
        console.print(f"teacher {spec}: {json.dumps(ident, default=str)}")
    extra = f", embeddings {info['embedding_dim']}-d" if info.get("embedding_dim") else ""
    console.print(f"segments <= {info['max_seconds']} s (overlap {info['overlap_seconds']} s), "
                  f"target range {info['target_range']}{extra}; fingerprint {info['fingerprint'][:16]}")


def cache_verified(path, problems: list[str]) -> None:
    """`microser cache verify`: "ok", or the problems one per line (on stderr)."""
    if not problems:
        console.print(f"{path}: ok")
        return
    for p in problems:
        err_console.print(f"{path}: {p}", markup=False, highlight=False, soft_wrap=True)


# ---- demo (microser demo) ----


def demo_built(report, as_json: bool = False) -> None:
    """`microser demo`: where the synthetic corpus and its cache are, counts, and the teacher-noise CCC ceiling."""
    if as_json:
        print_json(report.to_dict())
        return
    splits = ", ".join(f"{k} {v}" for k, v in sorted(report.splits.items()))
    ceiling = ", ".join(f"{k} {v:.3f}" for k, v in report.ceiling.items())
    console.print(f"demo cache [bold]{report.cache}[/] (SYNTHETIC speech, seed {report.seed})", highlight=False)
    console.print(f"  {report.n_items} items from {report.n_clips} clips, {report.n_speakers} speakers, "
                  f"{report.audio_seconds / 60:.1f} min; splits: {splits}", highlight=False)
    console.print(f"  corpus {report.corpus}", highlight=False)
    console.print(f"  CCC ceiling left by the simulated teacher's noise: {ceiling}", highlight=False)


# ---- costs (microser describe) ----


def cost_report(report, as_json: bool = False) -> None:
    """`microser describe`: every cost of one architecture, with the step where RAM peaks."""
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    c, plan, plan32 = report.costs, report.plan, report.plan_fp32
    table = Table("cost", "value", "", title=f"{report.name}  (at --input-seconds {c.input_seconds:g})")
    table.add_row("params", f"{c.params:,}", "constants of the BN-folded ONNX graph (weights, mel, window)")
    table.add_row("trainable params", f"{c.trainable_params:,}", "PyTorch, BN included")
    table.add_row("MACs", f"{c.macs:,}", "one clip; STFT as an FFT")
    table.add_row("ONNX", f"{c.onnx_bytes / 1000:,.1f} KB", "fp32 file")
    table.add_row("peak RAM int8", f"{c.ram_bytes / 1000:,.1f} KB", f"at {plan.peak_step} (budgets use this)")
    table.add_row("peak RAM fp32", f"{c.ram_bytes_fp32 / 1000:,.1f} KB", f"at {plan32.peak_step}")
    console.print(table)
    live = ", ".join(f"{t.name} {'x'.join(map(str, t.shape))} {'int8' if t.bytes_per_element == 1 else 'float'}"
                     for t in plan.live[:4])
    console.print(f"live at the int8 peak: {live}{', ...' if len(plan.live) > 4 else ''}")
    console.print("RAM: activations alive at once in graph order, no in-place reuse, weights excluded; "
                  "KB = 1000 bytes")
