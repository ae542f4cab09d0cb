"""Bench: how fast `microser search` runs trials, and how much of a trial is training vs measuring/bookkeeping.

Runs ``microser.search.run_search`` with the real components, each wrapped to
time it, on a fresh study in a temporary folder, and prints:

- trained trials per hour of search-stage wall time (rejected candidates are
  counted separately; the final stage is timed apart);
- the share of trained-trial wall time spent in training (``distill.train`` +
  building the model + validation), in measuring costs (ONNX export, onnxsim,
  RAM plan, MACs) and in the rest (sampling, storage, artifact upload).
  Goal: training >= 85 %.

Usage::

    python bench/search_throughput.py [--cache DIR] [--trials 8] [--budget 80k-params] [--set rungs=[60] ...]

Without ``--cache`` the embedded demo cache is used (built on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from collections import defaultdict

import torch

from microser.components import Components, distill_spec, measure_spec
from microser.search import run_search
from microser.search_config import SearchConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--budget", action="append", default=None)
    ap.add_argument("--final-k", type=int, default=0, help="final-stage candidates (default 0: search stage only)")
    ap.add_argument("--references", default="", help="comma-separated references (default none)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="SearchConfig override")
    args = ap.parse_args()

    timings: dict[str, list[float]] = defaultdict(list)

    def timed_trainer(*a, **kw):
        t = time.perf_counter()
        out = distill_spec(*a, **kw)
        timings["train"].append(time.perf_counter() - t)
        return out

    def timed_measure(*a, **kw):
        t = time.perf_counter()
        out = measure_spec(*a, **kw)
        timings["measure"].append(time.perf_counter() - t)
        return out

    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        config = SearchConfig(study="throughput", storage=f"sqlite:///{tmp}/t.db", cache=args.cache,
                              trials=args.trials, budgets=tuple(args.budget or ("80k-params",)),
                              final_k=args.final_k,
                              references=tuple(r for r in args.references.split(",") if r), **overrides)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        summary = run_search(config, components=Components(trainer=timed_trainer, measure=timed_measure))
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        import optuna

        from microser.storage import load_study

        study = load_study("throughput", config.storage)
        trained = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE
                   and "ccc" in t.user_attrs and not t.user_attrs.get("rejected")
                   and not t.user_attrs.get("reference")]
        rejected = [t for t in study.get_trials() if t.user_attrs.get("rejected")]
        trial_wall = sum(t.duration.total_seconds() for t in trained)
        train_s = sum(t.user_attrs["train_seconds"] for t in trained)
        rejected_wall = sum(t.duration.total_seconds() for t in rejected)
    n_measure = len(timings["measure"])
    measure_total = sum(timings["measure"])
    measure_per = measure_total / max(1, n_measure)
    measured_in_trained = measure_per * len(trained)   # each trained trial measured once (cached per spec)

    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at the end")
    print("settings:", json.dumps({k: v for k, v in summary.settings.items()
                                   if k in ("objectives", "budgets", "input_seconds", "fidelity", "cache")}))
    print(f"search stage: {summary.search_seconds:.1f} s wall for {len(trained)} trained + {len(rejected)} rejected "
          f"trials; process CPU {cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime:.1f} s over "
          f"{wall:.1f} s wall in all")
    print(f"trained trials per hour: {3600 * len(trained) / summary.search_seconds:.0f} "
          f"(mean {trial_wall / max(1, len(trained)):.2f} s per trained trial, "
          f"{rejected_wall / max(1, len(rejected)):.2f} s per rejected candidate)")
    print(f"share of trained-trial time: training {100 * train_s / trial_wall:.1f} %, measuring costs "
          f"{100 * measured_in_trained / trial_wall:.1f} % ({measure_per:.2f} s per spec, {n_measure} specs "
          f"measured incl. the budget probe), other {100 * (trial_wall - train_s - measured_in_trained) / trial_wall:.1f} %"
          " (sampling, storage, weights upload)")


if __name__ == "__main__":
    main()
