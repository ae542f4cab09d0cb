"""Bench: does search-fidelity CCC rank architectures like final-fidelity CCC does? (Spearman + bootstrap interval)

Samples architectures from the default search space (``SearchSpace.sample``),
keeps those within the budget (measured with ``microser.costs``), and trains
each with two seeds at the search fidelity and at the final fidelity that
``microser search`` uses (``SearchConfig`` defaults unless overridden), on the
espeak-emo corpus: a teacher cache is built once from
``../shared/data/espeak-emo/labels.csv`` with the csv teacher (its labels) in
``--cache`` (default ``/tmp/microser-espeak-cache``). Prints one row per
architecture and the Spearman correlation between the seed-mean search CCC
and the seed-mean final CCC over architectures, with a 95 % bootstrap interval
(architectures resampled). Goal: >= 0.8. Results are appended as JSON lines to
``--out`` as they come, so a long run can be read while it goes.

Usage::

    python bench/fidelity.py [--n 12] [--seeds 0,1] [--budget 80k-params] [--set epochs=1 --set final_epochs=8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import rankdata  # scipy ships with optuna's dependencies

    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap(a, b, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        r = spearman(a[idx], b[idx])
        if not np.isnan(r):
            values.append(r)
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def espeak_cache(espeak: Path, out: Path) -> Path:
    from microser.cache import build_cache

    if not (out / "meta.json").exists():
        build_cache(espeak / "labels.csv", [f"csv:{espeak / 'labels.csv'}"], out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--espeak", default=str(REPO.parent / "shared" / "data" / "espeak-emo"))
    ap.add_argument("--cache", default="/tmp/microser-espeak-cache")
    ap.add_argument("--space", default=None, help="search space TOML (default search_spaces/default.toml)")
    ap.add_argument("--n", type=int, default=12, help="architectures within budget")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", default="80k-params")
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="SearchConfig override")
    ap.add_argument("--out", default="bench/fidelity.jsonl")
    args = ap.parse_args()

    from microser.budgets import describe_violations, parse_budgets
    from microser.cache import Cache
    from microser.search import SearchConfig, _train_config, default_space_path, distill_spec, measure_spec
    from microser.space import SearchSpace

    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    config = SearchConfig(budgets=(args.budget,), threads=args.threads, **overrides)
    budgets = parse_budgets(config.budgets)
    data = Cache.open(espeak_cache(Path(args.espeak), Path(args.cache)))
    space = SearchSpace.load(args.space or default_space_path())
    seeds = [int(s) for s in args.seeds.split(",")]

    specs, draw = [], 0
    while len(specs) < args.n:
        batch = space.sample(4 * args.n, seed=args.sample_seed + draw)
        draw += 1
        for spec in batch:
            costs = measure_spec(spec, config.input_seconds)
            if not describe_violations(budgets, costs) and spec.to_json() not in {s.to_json() for s, _ in specs}:
                specs.append((spec, costs))
            if len(specs) == args.n:
                break

    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} threads")
    print(f"data: {args.cache} ({len(data)} segments; train/valid/test "
          f"{'/'.join(str(len(data.split_indices(s))) for s in ('train', 'valid', 'test'))}), space "
          f"{args.space or default_space_path()}, budget {args.budget}")
    print(f"search fidelity: epochs {config.epochs} steps {config.steps} crop {config.crop_seconds} s x "
          f"{config.crops_per_segment} per segment, batch {config.batch_size}; final fidelity: "
          f"{config.final_epochs} epochs; seeds {seeds}; validation CCC (mean of A/D/V)")
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, (spec, costs) in enumerate(specs):
        row = {"spec": spec.to_json(), "summary": spec.summary(), "params": costs["params"], "search": [], "final": []}
        t0 = time.perf_counter()
        for seed in seeds:
            for stage, final in (("search", False), ("final", True)):
                outcome = distill_spec(spec, data, _train_config(config, seed=seed, threads=args.threads, final=final))
                row[stage].append(outcome.ccc["mean"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{i:2d} {spec.summary()[:64]:64s} {int(costs['params']):6d} params  search "
              f"{np.mean(row['search']):.3f} ({', '.join(f'{v:.3f}' for v in row['search'])})  final "
              f"{np.mean(row['final']):.3f} ({', '.join(f'{v:.3f}' for v in row['final'])})  {row['seconds']:.0f} s",
              flush=True)
    search = [np.mean(r["search"]) for r in rows]
    final = [np.mean(r["final"]) for r in rows]
    lo, hi = bootstrap(search, final)
    seed_agree = [spearman([r["search"][k] for r in rows], [r["final"][k] for r in rows]) for k in range(len(seeds))]
    print(f"Spearman(search CCC, final CCC) over {len(rows)} architectures, seed means: {spearman(search, final):.3f} "
          f"(95 % bootstrap interval {lo:.3f} .. {hi:.3f}); per seed: {', '.join(f'{r:.3f}' for r in seed_agree)}")
    if len(seeds) > 1:
        print(f"seed-to-seed Spearman at search fidelity: {spearman(*[[r['search'][k] for r in rows] for k in (0, 1)]):.3f}, "
              f"at final fidelity: {spearman(*[[r['final'][k] for r in rows] for k in (0, 1)]):.3f}")


if __name__ == "__main__":
    main()
