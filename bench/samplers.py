"""Bench: which Optuna sampler finds good candidates fastest in microser's space? (3 seeds each)

For every sampler and seed, runs the search stage only (one rung, no final stage,
no references) with ``--trials N`` candidates on a cache, then reads the study:

- best feasible first-rung validation CCC after 10, 20 and N candidates (the
  quantity a sampler can improve: ASHA decides what goes up afterwards);
- the hypervolume of the feasible (CCC, params, int8 RAM) front, CCC from 0, params
  and RAM normalised by the budget's params and the largest RAM seen in all runs;
- draws rejected over budget and duplicates (wasted time).

Usage::

    python bench/samplers.py --cache CACHE [--samplers tpe,tpe-group,nsga2,gp,random] [--seeds 0,1,2]
                             [--trials 40] [--rung 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def hypervolume(points: np.ndarray) -> float:
    """Dominated volume of (ccc up, params down, ram down) points in the unit box, by Monte Carlo (fixed draws)."""
    if len(points) == 0:
        return 0.0
    rng = np.random.default_rng(0)
    u = rng.random((200_000, 3))
    dominated = np.zeros(len(u), dtype=bool)
    for c, p, r in points:
        dominated |= (u[:, 0] <= c) & (u[:, 1] >= p) & (u[:, 2] >= r)
    return float(dominated.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--samplers", default="tpe,tpe-group,nsga2,gp,random")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--rung", type=int, default=60)
    ap.add_argument("--budget", default="80k-params")
    ap.add_argument("--out", default="samplers.jsonl")
    args = ap.parse_args()

    import optuna

    from microser.pareto import is_candidate, is_feasible
    from microser.search import run_search
    from microser.search_config import SearchConfig
    from microser.storage import load_study

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; cache {args.cache}; {args.trials} candidates at "
          f"{args.rung} steps, budget {args.budget}")
    rows = []
    done = {}
    if os.path.exists(args.out):
        for line in open(args.out):
            r = json.loads(line)
            done[(r["sampler"], r["seed"])] = r
    for seed in (int(s) for s in args.seeds.split(",")):      # seeds outermost: a cut-short bench compares all
        for sampler in args.samplers.split(","):
            if (sampler, seed) in done:
                rows.append(done[(sampler, seed)])
                continue
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{tmp}/s.db"
                config = SearchConfig(study="s", storage=url, cache=args.cache, budgets=(args.budget,),
                                      trials=args.trials, time=None, rungs=(args.rung,), final_k=0, references=(),
                                      sampler=sampler, seed=seed, artifacts=f"{tmp}/art")
                t0 = time.perf_counter()
                run_search(config)
                wall = time.perf_counter() - t0
                trials = load_study("s", url).get_trials()
            trained = [t for t in trials if is_candidate(t)]
            feasible = [t for t in trials if is_feasible(t)]
            best = np.maximum.accumulate([t.user_attrs["ccc"]["mean"] if is_feasible(t) else -1 for t in trained])
            row = {"sampler": sampler, "seed": seed, "wall": wall,
                   "best": {str(n): float(best[min(n, len(best)) - 1]) for n in (10, 20, args.trials)},
                   "front": [(t.user_attrs["ccc"]["mean"], t.user_attrs["costs"]["params"],
                              t.user_attrs["costs"]["ram_bytes"]) for t in feasible],
                   "rejected": sum(bool(t.user_attrs.get("rejected")) for t in trials),
                   "duplicates": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)}
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{sampler:10s} seed {seed}: best {row['best']}, {row['rejected']} rejected, "
                  f"{row['duplicates']} duplicates, {wall:.0f} s", flush=True)
    budget_params = float(args.budget.split("k")[0]) * 1000 if "k-params" in args.budget else None
    ram_max = max((p[2] for r in rows for p in r["front"]), default=1.0)
    print(f"\n| sampler | best CCC @10 | @20 | @{args.trials} | hypervolume | rejected | duplicates | wall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        mine = [r for r in rows if r["sampler"] == sampler]
        hv = [hypervolume(np.array([(max(c, 0), p / (budget_params or max(q[1] for q in r["front"])), m / ram_max)
                                    for c, p, m in r["front"]])) for r in mine]

        def ms(values):
            return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

        print(f"| {sampler} | {ms([r['best']['10'] for r in mine])} | {ms([r['best']['20'] for r in mine])} "
              f"| {ms([r['best'][str(args.trials)] for r in mine])} | {ms(hv)} | {np.mean([r['rejected'] for r in mine]):.0f} "
              f"| {np.mean([r['duplicates'] for r in mine]):.0f} | {np.mean([r['wall'] for r in mine]) / 60:.1f} min |")


if __name__ == "__main__":
    main()
