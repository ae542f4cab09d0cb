"""Everything the CLI prints: rich tables, progress, JSON. Library modules never print.

``microser.show.base`` holds the console and the shared formats, ``microser.show.study`` a study's tables;
every renderer is reached as ``show.NAME``.
"""

from __future__ import annotations

import json

from microser.show.base import (ccc_cells, console, duration_text, err_console, int_text, kb_text, mean_std_text,
                                print_json)
from microser.show.study import pareto_front, trial_full, trials_table  # noqa: F401 (reached as show.NAME)


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
        self.task = None
        return self

    def __call__(self, done: int, total: int, audio_seconds: float) -> None:
        now = self._time()
        if self.task is None:  # the bar starts with the first report, so an early error is the only line
            self.bar.__enter__()
            self.start = (now, audio_seconds)
            self.task = self.bar.add_task("cache", total=total, completed=done, rtf="")
            return
        run_audio = audio_seconds - self.start[1]
        rtf = f"RTF {(now - self.start[0]) / run_audio:.4f}" if run_audio > 0 else ""
        self.bar.update(self.task, total=total, completed=done, rtf=rtf)

    def __exit__(self, *exc):
        if self.task is not None:
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
    if report.n_notes:
        console.print(f"{report.n_notes} file(s) changed on the way in (float audio beyond full scale, "
                      f"peak-normalised instead of clipped): {report.out / 'notes.csv'}")


def cache_info(info: dict, as_json: bool = False) -> None:
    """`microser cache info`: counts, splits, target statistics and teachers."""
    if as_json:
        print_json(info)
        return
    from rich.table import Table

    console.print(
        f"[bold]{info['path']}[/]: {info['items']} items, {info['sources']} files, {info['hours']:.2f} h, "
        f"{info['speakers']} speakers, split by {info['split_by']} (seed {info['split_seed']}), {info['skipped']} skipped"
        + (f", {info['notes']} peak-normalised (notes.csv)" if info.get('notes') else "")
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


# ---- search (microser search) ----


class search_live:
    """The live view of `microser.search.run_search`: trials at each rung, the final stage, best CCC, ETA.

    Use as ``with show.search_live() as cb: run_search(config, progress=cb)``.
    Trial lines (first rung, promotions, rejected, references, final seeds) scroll above the status bar;
    the bar fills with the command's time (elapsed / elapsed + ETA).
    """

    def __enter__(self):
        import time

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._time = time.monotonic
        self.start = self._time()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                            TextColumn("ETA {task.fields[eta]}"), TextColumn("best {task.fields[best]}"),
                            TextColumn("[dim]{task.fields[now]}"), console=err_console, transient=False)
        self.task = None
        return self

    def __call__(self, event) -> None:
        from microser.durations import format_duration

        elapsed = self._time() - self.start
        rungs = " ".join(f"r{k + 1}:{n}" for k, n in enumerate(event.rungs))
        description = f"trials at rungs {rungs}, rejected {event.rejected}"
        if event.final_total:
            description += f" | final {event.final_done}/{event.final_total}"
        fields = {"best": "-" if event.best_ccc is None else f"{event.best_ccc:.3f}",
                  "eta": "-" if event.eta_seconds is None else format_duration(event.eta_seconds),
                  "now": event.message[:50] if event.kind in ("measure", "train", "epoch") else ""}
        total = elapsed + (event.eta_seconds or 0.0) if event.eta_seconds is not None else None
        if self.task is None:  # the bar starts with the first event, so an early error is the only line
            self.bar.__enter__()
            self.task = self.bar.add_task(description, total=total, completed=elapsed, **fields)
        else:
            self.bar.update(self.task, description=description, total=total, completed=elapsed, **fields)
        if event.kind in ("start", "trial", "rejected", "final"):
            self.bar.console.print(event.message, markup=False, highlight=False)

    def __exit__(self, *exc):
        if self.task is not None:
            self.bar.__exit__(*exc)


SUMMARY_WIDE_COLUMNS = 140   # a terminal at least this wide shows the architectures and rungs in the table


def search_summary(summary, as_json: bool = False) -> None:
    """The end of `microser search`: the final stage's trials beside the references, counts, timings, the verdict."""
    if as_json:
        print_json(summary.to_dict())
        return
    from rich.table import Column, Table

    objectives = summary.settings["objectives"]
    fid = summary.settings["fidelity"]
    rung_names = [f"r{k + 1}" for k in range(len(fid["rungs"]))]
    wide = console.width >= SUMMARY_WIDE_COLUMNS    # else numbers in the table, architectures listed below it
    title = (f"study {summary.study}: final stage ({fid['final_steps']} steps x {fid['final_seeds']} seeds), "
             "references below")
    caption = (f"mean CCC; r1..: validation at rungs of {', '.join(map(str, fid['rungs']))} steps; final: mean ± std "
               "over seeds" + (f" (validation speakers rotate over {fid['folds']} folds)" if fid.get("folds", 1) > 1
                               else "") + "; test = held-out speakers")
    if wide:
        table = Table("trial", Column("architecture", overflow="fold"), *objectives, *rung_names, "final valid",
                      "final test", "", title=title, caption=caption)
    else:
        table = Table(*(Column(c, no_wrap=True, justify="right") for c in ("trial", *objectives, "final valid",
                                                                            "final test")),
                      Column("", no_wrap=True), title=title, caption=caption)
    listed = []
    for r in summary.rows:
        tag = "ref" if r["reference"] else ("pick" if summary.pick and r["number"] == summary.pick["number"]
                                            else "front" if r["on_front"] else "")
        if r.get("collapsed"):
            tag += " collapsed"
        name = f"{r['reference']}: {r['summary']}" if r["reference"] else (r["summary"] or "-")
        rungs = r.get("rungs") or {}
        cells = [f"{rungs[k]['mean']:.3f}" if rungs.get(k) else "-" for k in range(len(rung_names))]
        finals = [mean_std_text(r["final_ccc"], r["final_ccc_std"]), mean_std_text(r["test_ccc"], r["test_ccc_std"])]
        costs = [int_text(r["costs"][o]) for o in objectives]
        if wide:
            table.add_row(str(r["number"]), name, *costs, *cells, *finals, tag)
        else:
            table.add_row(str(r["number"]), *costs, *finals, tag)
            listed.append(f"  trial {r['number']}: {name}; " + ", ".join(f"{n} {c}" for n, c in zip(rung_names, cells)))
    console.print(table)
    for line in listed:
        console.print(line, highlight=False, soft_wrap=False)
    budgets = ", ".join(b["text"] for b in summary.settings["budgets"]) or "none"
    at_rungs = ", ".join(f"{n} at {steps} steps" for n, steps in zip(summary.rungs, fid["rungs"]))
    console.print(f"{summary.trained} candidates trained ({at_rungs}), {summary.rejected} rejected over budget "
                  f"({budgets}), {summary.failed} failed; search {duration_text(summary.search_seconds)}, final stage "
                  f"{duration_text(summary.final_seconds)}", highlight=False)
    if summary.stale_failed:
        console.print(f"failed {len(summary.stale_failed)} trial(s) left running by a stopped run: "
                      f"{summary.stale_failed}", highlight=False)
    m = summary.margin
    if summary.pick and summary.reference and m:
        verdict = {"beats": "beats", "trails": "trails", "ties": "ties with"}[m["verdict"]]
        console.print(f"pick: trial {summary.pick['number']} {verdict} {summary.reference['reference']}: test CCC "
                      f"{m['mean']:+.3f} ± {m['spread']:.3f} over {len(m['per_seed'])} seed pair(s) (held-out "
                      "speakers; a win needs the margin above its spread)", highlight=False)
    for line in parts_lines(summary.pick, summary.reference):
        console.print(line, highlight=False)
    for note in summary.notes:
        console.print(note, highlight=False)
    console.print(f"storage {summary.storage}, artifacts {summary.artifacts}; next: microser pareto --study "
                  f"{summary.study}", highlight=False)


PARTS_OFFSET_NOTE = 0.5  # |mean offset| in target SDs above which the summary names the offset as the loss


def parts_lines(pick: dict | None, reference: dict | None) -> list[str]:
    """Where the pick's and the reference's test CCC goes: Pearson r, mean offset b (target SDs) and spread
    ratio s per target (``metrics.ccc_parts``, means over seeds), and a note when the pick loses its CCC to
    an offset rather than to ranking."""
    from microser import TARGETS
    from microser.metrics import CCC_PARTS

    parts = (pick or {}).get("test_parts")
    rows = [(label, row["test_parts"]) for label, row in
            ((f"pick (trial {pick['number']})" if pick else "", pick),
             ((reference or {}).get("reference") or "reference", reference)) if row and row.get("test_parts")]
    if not rows:
        return []
    lines = ["test CCC = 2rs / (1 + s^2 + b^2): r ranking (Pearson), b mean offset in target SDs, s spread ratio"]
    for label, p in rows:
        cells = [f"{t[:3]} r {p['r'][t]:.2f} b {p['bias'][t]:+.2f} s {p['scale'][t]:.2f}"
                 for t in TARGETS if all(t in p.get(name, {}) for name in CCC_PARTS)]
        lines.append(f"  {label}: " + ", ".join(cells))
    if parts and parts.get("bias"):
        worst = max(parts["bias"], key=lambda t: abs(parts["bias"][t]))
        b, r = parts["bias"][worst], parts.get("r", {}).get(worst)
        if abs(b) >= PARTS_OFFSET_NOTE and r is not None:
            lines.append(f"the pick ranks the held-out speakers' clips on {worst} with r {r:.2f} but its predictions "
                         f"sit {b:+.2f} target SDs off: the CCC it loses there is an offset of those speakers, "
                         "not ranking, and validation on other speakers does not show it")
    return lines


# ---- train (microser train) ----


class train_live:
    """The live view of `microser.trainer.train_trial`: seed k of K, steps, ETA, train loss, latest and best CCC.

    Use as ``with show.train_live() as cb: train_trial(..., progress=cb)``. One bar per seed; a resumed seed's
    bar starts at the step its checkpoint held, so the ETA counts only this run's speed. Each validation's
    line and each seed's result scroll above the bars.
    """

    def __enter__(self):
        self.bar, self.task, self.seed, self.fields = None, None, None, {}
        return self

    def _start(self):
        """The rich display, started at the first event (an input error before it leaves stderr one line)."""
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                TextColumn("loss {task.fields[loss]}  valid CCC {task.fields[valid]}  best "
                                           "{task.fields[best]}"), console=err_console, transient=False)
            self.bar.__enter__()
        return self.bar

    def __call__(self, event: dict) -> None:
        kind = event.get("kind")
        self._start()
        if kind == "plan" and "steps" in event:
            self.bar.console.print(f"--time {duration_text(event['seconds'])}: {event['steps']:,} steps per seed "
                                   f"(measured {event['steps_per_second']:.1f} steps/s)", highlight=False)
        elif kind == "plan":
            self.bar.console.print("timing a few steps to size --time ...", highlight=False)
        elif kind == "seed":
            self.seed, self.task = event, None
            self.fields = {"loss": "-", "valid": "-", "best": "-"}
        elif kind == "step":
            self.fields["loss"] = f"{event['loss']:.3f}"
            if self.task is None:   # created at the first step seen: a resumed run starts where it was
                description = f"seed {event['seed']} ({self.seed['index'] + 1}/{self.seed['count']})"
                self.task = self.bar.add_task(description, total=event["steps"], completed=event["step"],
                                              **self.fields)
            else:
                self.bar.update(self.task, completed=event["step"], **self.fields)
        elif kind == "eval":
            self.fields["valid"] = f"{event['valid']['mean']:.3f}"
            self.fields["best"] = f"{event['best']:.3f} @ {event['best_step']}" if event.get("best_step") else "-"
            if self.task is not None:
                self.bar.update(self.task, **self.fields)
        elif kind == "seed_done":
            test = f", test {event['test_ccc']['mean']:.3f}" if event.get("test_ccc") else ""
            self.bar.console.print(f"seed {event['seed']}: valid CCC {event['ccc']['mean']:.3f}{test}",
                                   highlight=False)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def train_result(report, *, as_json: bool = False) -> None:
    """`microser train`: one row per seed, the kept one, the stage it replaces, where the curves are."""
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    def ccc(d):
        return "-" if not d else f"{d['mean']:.3f}"

    table = Table("seed", "steps", "best step", "stopped", "A", "D", "V", "valid CCC", "test CCC", "minutes", "",
                  title=f"study {report.study} trial {report.trial} ({report.source}): {report.summary}",
                  caption="CCC of the weights each seed kept (best validation, EMA); valid = validation split, "
                          "test = test split (held-out speakers)")
    for r in report.seeds:
        stopped = "early" if r.early_stopped else ("collapsed" if r.collapsed else "")
        note = "kept" if r.seed == report.kept_seed else ""
        if r.resumed_at is not None:
            note += (" (had finished)" if r.resumed_at >= r.steps else f" (resumed at {r.resumed_at:,})")
        table.add_row(str(r.seed), f"{r.steps:,}/{r.total_steps:,}", "-" if r.best_step is None else f"{r.best_step:,}",
                      stopped, *ccc_cells(r.ccc)[:3], ccc(r.ccc), ccc(r.test_ccc), f"{r.train_seconds / 60:.1f}",
                      note.strip())
    console.print(table)
    if len(report.seeds) > 1 and report.spread.get("valid"):
        parts = [f"{split} {d['min']:.3f}..{d['max']:.3f} (std {d['std']:.3f})"
                 for split, d in report.spread.items() if d]
        console.print(f"spread over {len(report.seeds)} seeds: {', '.join(parts)}", highlight=False)
    if report.before:
        b = report.before
        lift = ""
        if b.get("test_ccc") and report.test_ccc:
            lift = f" ({report.test_ccc['mean'] - b['test_ccc']['mean']:+.3f} on test)"
        console.print(f"before: {b['stage']} weights valid {ccc(b['ccc'])}, test {ccc(b.get('test_ccc'))}; now "
                      f"trained weights valid {ccc(report.ccc)}, test {ccc(report.test_ccc)}{lift}", highlight=False)
    start = f"from the trial's {report.init} weights" if report.init else "from scratch"
    console.print(f"trained {start} on {report.device}; stored as the trial's \"trained\" stage (compress, export "
                  f"and evaluate use it); learning curves {report.curves}", highlight=False)
    console.print(f"next: microser compress --study {report.study} --trial {report.trial}  or  microser export "
                  f"--study {report.study} --trial {report.trial} --out bundle", highlight=False)


# ---- costs (microser describe) ----


def cost_report(report, as_json: bool = False, streaming: dict | None = None) -> None:
    """`microser describe`: every cost of one architecture, with the step where RAM peaks.

    ``streaming``: `microser.cgen.ram.streaming_report` (``--ram-mode streaming``), shown beside the offline peak.
    """
    if as_json:
        print_json({**report.to_dict(), **({"streaming": streaming} if streaming else {})})
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
    table.add_row("int8 C instructions", "-" if c.instr == float("inf") else f"{c.instr / 1e6:,.1f} M / s audio",
                  "no int8 C library" if c.instr == float("inf") else "predicted, x86-64 callgrind scale")
    console.print(table)
    live = ", ".join(f"{t.name} {'x'.join(map(str, t.shape))} {'int8' if t.bytes_per_element == 1 else 'float'}"
                     for t in plan.live[:4])
    console.print(f"live at the int8 peak: {live}{', ...' if len(plan.live) > 4 else ''}")
    console.print("RAM: activations alive at once in graph order, no in-place reuse, weights excluded; "
                  "KB = 1000 bytes")
    if streaming:
        s8, s32 = streaming["int8"], streaming["fp32"]
        t = Table("streaming C library", "value", "", title="--ram-mode streaming (microser.cgen)")
        t.add_row("streaming RAM int8", f"{s8['ram_streaming_bytes'] / 1000:,.1f} KB",
                  f"state {s8['state_bytes']:,} B + arena {s8['arena_bytes']:,} B"
                  + (f" + replay {s8['replay_bytes']:,} B" if s8["replay_bytes"] else "") + " (budgets use this)")
        t.add_row("streaming RAM fp32", f"{s32['ram_streaming_bytes'] / 1000:,.1f} KB",
                  f"state {s32['state_bytes']:,} B + arena {s32['arena_bytes']:,} B"
                  + (f" + replay {s32['replay_bytes']:,} B" if s32["replay_bytes"] else ""))
        console.print(t)
        console.print(f"streaming int8 RAM is {c.ram_bytes / s8['ram_streaming_bytes']:,.1f}x below the offline "
                      f"int8 peak at {c.input_seconds:g} s (worst C stack, measured at export, comes on top); "
                      f"{s8['note']}")


# ---- pareto, trials, show, compress, export, evaluate, predict ----


def _stage_table(stages, title: str):
    """One column per stage, one row per measure: readable at 80 columns for the usual 2-4 stages."""
    from rich.table import Table

    def probes(s) -> str:
        if not s.probes:
            return "n/a"
        worst = max(r["max_abs"] for r in s.probes["signals"].values())
        return ("ok" if s.probes["passed"] else "FAIL") + f" (max {worst:.3f})"

    rows = [
        ("int8", lambda s: "QAT" if s.method == "qat" else "PTQ"),
        ("params", lambda s: int_text(s.params)),
        ("MACs", lambda s: int_text(s.macs)),
        ("ONNX KB fp32", lambda s: kb_text(s.onnx_bytes)),
        ("int8 KB (shipped)", lambda s: kb_text(s.int8_bytes)),
        ("RAM KB fp32", lambda s: kb_text(s.ram_bytes_fp32)),
        ("RAM KB int8", lambda s: kb_text(s.ram_bytes)),
        ("CCC PyTorch", lambda s: f"{s.ccc_torch['mean']:.3f}"),
        ("CCC fp32 ONNX", lambda s: f"{s.ccc_fp32_onnx['mean']:.3f}"),
        ("CCC int8 ONNX", lambda s: f"{s.ccc_int8_onnx['mean']:.3f}"),
        ("kept float", lambda s: "front-end" if s.method == "qat"
         else "front-end, head" + "".join(f", {k}" for k in s.keep_float)),
        ("probes", probes),
    ]
    table = Table("", *(s.stage for s in stages), title=title)
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in stages))
    return table


class step_progress:
    """Stage lines for compress/export (``progress(event_dict)``), on stderr."""

    def __enter__(self):
        return self

    def __call__(self, event: dict) -> None:
        if event.get("kind") == "prune":
            text = (f"prune step {event['step']}: channels {event['channels']}, {event['params']:,} params, "
                    f"valid CCC {event['valid_ccc']['mean']:.3f}")
        else:
            text = f"{event.get('stage', '')} " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in event.items() if k not in ("kind", "stage"))
        err_console.print(f"[dim]{text}[/]", highlight=False)

    def __exit__(self, *exc):
        return False


def compress_result(report, *, as_json: bool = False) -> None:
    """`microser compress`: the before/after table (CCC on the validation split) and where the result is."""
    if as_json:
        print_json(report.to_dict())
        return
    split = report.stages[0].split if report.stages else "valid"
    console.print(_stage_table(report.stages, f"study {report.study} trial {report.trial}: before / after "
                                              f"(CCC on the {split} split, from each graph's own outputs)"))
    for h in report.prune_history:
        console.print(f"prune step {h['step']}: channels {h['channels']}, {h['params']:,} params, valid CCC "
                      f"{h['valid_ccc']['mean']:.3f}", highlight=False)
    qat = report.settings.get("qat_reason")
    if qat:
        console.print(f"quantization-aware training: {'yes' if report.settings.get('qat') else 'no'} ({qat}); "
                      "PTQ: post-training int8 with front-end and head float; QAT: every operator after the log-mel "
                      "int8 (its PyTorch CCC is the fake-quantized model's); probes: int8 vs fp32 outputs on silence, "
                      "-60 dBFS noise and clipped full scale", highlight=False)
    console.print(f"started from {report.start_weights} weights; wrote {report.folder} (spec.json, weights.pt, "
                  f"model.onnx, model.int8.onnx, report.json). KB = 1000 bytes.", highlight=False)


def bundle_result(report, *, as_json: bool = False) -> None:
    """`microser export`: files, CCC (test and validation), size accounting and parity."""
    if as_json:
        print_json(report.to_dict())
        return
    from rich.table import Table

    card = report.card
    table = Table("split", "graph", "A", "D", "V", "CCC", title=f"{card['architecture']['summary']}")
    for split in ("test", "valid"):
        for graph in ("fp32", "int8"):
            table.add_row(split, graph, *ccc_cells(card["ccc"][split][graph]))
    console.print(table)
    s = card["size"]
    console.print(f"model.int8.onnx {s['file_bytes']:,} B = int8 weights {s['int8_weight_bytes']:,} + int32 biases "
                  f"{s['int32_bias_bytes']:,} + scales {s['scale_bytes']:,} + zero points {s['zero_point_bytes']:,} "
                  f"+ float {s['float_bytes']:,} + shape constants {s['other_bytes']:,} + graph "
                  f"{s['graph_overhead_bytes']:,} (goal 1.1 x params + 4096 = "
                  f"{'n/a' if s['size_goal_bytes'] is None else format(s['size_goal_bytes'], ',')}: "
                  f"{'met' if s['size_goal_met'] else 'not met'})", highlight=False)
    probes = card.get("probes")
    if probes:
        console.print("silence / -60 dBFS noise / clipped full scale, int8 vs fp32 max abs: "
                      + ", ".join(f"{r['max_abs']:.3f}" for r in probes["signals"].values())
                      + f" ({'within' if probes['passed'] else 'NOT within'} {probes['tolerance']})", highlight=False)
    floats = card["quantization"]["float_op_counts"]
    console.print(f"float ops: {floats}; parity passed (tolerance {card['parity']['tolerance']})", highlight=False)
    console.print(f"weights: {card['source'].get('weights')}; wrote {report.folder}: {', '.join(report.files)}",
                  highlight=False)


def evaluation(result: dict, *, as_json: bool = False) -> None:
    """`microser evaluate`: CCC per dimension for every graph or model of the target."""
    if as_json:
        print_json(result)
        return
    from rich.table import Table

    table = Table("model", "A", "D", "V", "CCC",
                  title=f"{result['target']} on {result['cache']} ({result['split']} split, "
                        f"{result['segments']} segments)")
    for name, ccc in result["results"].items():
        table.add_row(name, *ccc_cells(ccc))
    console.print(table)


def predictions(result: dict, *, as_json: bool = False) -> None:
    """`microser predict`: how many files, where the CSV is, and the segmentation rule used."""
    if as_json:
        print_json(result)
        return
    console.print(f"{result['files']} files -> {result['out']} ({'int8' if result['int8'] else 'fp32'} "
                  f"{result['model']}); files longer than {result['max_seconds']:g} s were cut into segments "
                  f"overlapping {result['overlap_seconds']:g} s and their outputs averaged", highlight=False)
    for row in result.get("skipped", []):
        console.print(f"skipped {row['path']}: {row['reason']}", highlight=False, markup=False, soft_wrap=True)
