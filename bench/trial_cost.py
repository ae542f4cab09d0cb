"""Bench: does a first-rung trial cost the same on a small cache and on a 20-hour one? (the same candidates)

Runs the search stage only (``--trials K`` candidates at one rung of ``--rung``
steps, random sampler with a fixed seed, so every cache trains the same
candidates; no references, no final stage) on each cache, and prints per cache
the median whole-job time of a first-rung trial (measuring its costs, training,
validation on the bounded subset, saving weights: the ``job_seconds`` the search
records) and its split into training and the rest, with the ratio to the first
cache. Goal (issue 10): within 20 % on the demo cache, espeak-emo and a 20-hour
cache.

A 20-hour cache is the demo generator with more clips::

    microser demo --clips 26000 --speakers 200 --out /tmp/demo20h

Usage::

    python bench/trial_cost.py --cache demo=DIR --cache espeak=DIR --cache demo20h=/tmp/demo20h/cache [--trials 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--rung", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from microser.cache import Cache
    from microser.pareto import is_candidate
    from microser.search import run_search
    from microser.search_config import SearchConfig
    from microser.storage import load_study

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.trials} candidates (random sampler, seed "
          f"{args.seed}) at {args.rung} steps, budget 80k-params")
    print("| cache | hours | segments | job s (median) | training s | rest s | job vs first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    first = None
    for spec in args.cache:
        name, path = spec.split("=", 1)
        data = Cache.open(path)
        hours = sum(it["length"] for it in data.items) / 16000 / 3600
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/s.db"
            run_search(SearchConfig(study="s", storage=url, cache=path, budgets=("80k-params",), trials=args.trials,
                                    time=None, rungs=(args.rung,), final_k=0, references=(), sampler="random",
                                    seed=args.seed, artifacts=f"{tmp}/art"))
            trials = [t for t in load_study("s", url).get_trials() if is_candidate(t)]
        job = float(np.median([t.user_attrs["job_seconds"] for t in trials]))
        train = float(np.median([t.user_attrs["train_seconds"] for t in trials]))
        first = first or job
        print(f"| {name} | {hours:.2f} | {len(data)} | {job:.2f} | {train:.2f} | {job - train:.2f} | "
              f"{job / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
