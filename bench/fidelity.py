"""Bench: does brief training rank architectures like longer training does? (Spearman per rung, bootstrap interval)

Draws architectures within the budget from a search space (``SearchSpace.sample``),
adds wav2small-ref and the space's warm starts, and trains each at every step
count of ``--steps`` (the search's rungs and its final stage), for every seed,
with the search's recipe (``microser.components.distill_spec``: 1 s crops, batches of
16, validation on the bounded validation subset, test on the test split). Prints
one row per architecture and, for every step count, the Spearman correlation of
the seed-mean validation CCC with the seed-mean validation and test CCC at the
largest step count, with a 95 % bootstrap interval (architectures resampled).
Results are appended as JSON lines to ``--out`` as they come (a rerun skips what
is there), so a long run can be read while it goes.

Usage::

    python bench/fidelity.py --cache CACHE [--n 10] [--steps 60,200,600,2000] [--seeds 0,1] [--budget 80k-params]
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


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import rankdata

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


def architectures(space, n: int, budget: str, seed: int) -> list[tuple[str, object]]:
    """wav2small-ref, the space's warm starts, then ``n`` random specs within ``budget``."""
    import optuna

    from microser.budgets import describe_violations, parse_budgets
    from microser.models.spec import REFERENCES
    from microser.components import measure_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    specs = [("wav2small-ref", REFERENCES["wav2small-ref"])]
    study = optuna.create_study()
    for k, params in enumerate(space.warm_starts):
        study.enqueue_trial(params)
        trial = study.ask()
        specs.append((f"warm{k}", space.suggest(trial)))
        study.tell(trial, 0.0)
    budgets, draw = parse_budgets((budget,)), 0
    while len(specs) < n + 1 + len(space.warm_starts):
        for spec in space.sample(4 * n, seed=seed + draw):
            if len(specs) == n + 1 + len(space.warm_starts):
                break
            if not describe_violations(budgets, measure_spec(spec, 1.0)) and spec.to_json() not in {
                    s.to_json() for _, s in specs}:
                specs.append((f"r{len(specs) - 1 - len(space.warm_starts)}", spec))
        draw += 1
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--space", default="default", help="search space (a packaged name or a TOML file)")
    ap.add_argument("--n", type=int, default=10, help="random architectures within budget")
    ap.add_argument("--steps", default="60,200,600,2000")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--budget", default="80k-params")
    ap.add_argument("--sample-seed", type=int, default=123)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="fidelity.jsonl")
    args = ap.parse_args()

    from microser.cache import Cache
    from microser.components import distill_spec
    from microser.search_config import SearchConfig
    from microser.space import SearchSpace
    from microser.splits import Split, bounded
    from microser.train_config import TrainConfig

    torch.set_num_threads(args.threads)
    data = Cache.open(args.cache)
    space = SearchSpace.load(args.space)
    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = SearchConfig()
    split = Split(train=data.split_indices("train"), valid=bounded(data, data.split_indices("valid"),
                                                                   recipe.valid_seconds),
                  test=bounded(data, data.split_indices("test"), recipe.valid_seconds))
    specs = architectures(space, args.n, args.budget, args.sample_seed)
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} threads")
    print(f"data: {args.cache} ({len(data)} segments; train/valid/test "
          f"{'/'.join(str(len(data.split_indices(s))) for s in ('train', 'valid', 'test'))}), space {space.path}, "
          f"budget {args.budget}; steps {steps} of {recipe.batch_size} x {recipe.crop_seconds:g} s crops; seeds {seeds}")
    out = Path(args.out)
    done = {}
    if out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["name"], r["steps"], r["seed"])] = r
    for seed in seeds:
        for n_steps in steps:
            for name, spec in specs:
                if (name, n_steps, seed) in done:
                    continue
                t0 = time.perf_counter()
                config = TrainConfig(steps=n_steps, crop_seconds=recipe.crop_seconds,
                                     crops_per_segment=recipe.crops_per_segment, batch_size=recipe.batch_size,
                                     seed=seed, threads=args.threads)
                outcome = distill_spec(spec, data, config, split=split)
                row = {"name": name, "summary": spec.summary(), "steps": n_steps, "seed": seed,
                       "valid": outcome.ccc["mean"], "test": outcome.test_ccc["mean"],
                       "seconds": time.perf_counter() - t0}
                done[(name, n_steps, seed)] = row
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name:14s} {n_steps:5d} steps seed {seed}: valid {row['valid']:.3f} test {row['test']:.3f} "
                      f"({row['seconds']:.0f} s)  {spec.summary()}", flush=True)

    def mean(name, n_steps, key):
        return float(np.mean([done[(name, n_steps, s)][key] for s in seeds]))

    names = [name for name, _ in specs]
    top = steps[-1]
    print(f"\n| steps | Spearman with valid CCC at {top} (95 % CI) | Spearman with test CCC at {top} (95 % CI) |")
    print("| --- | --- | --- |")
    for n_steps in steps:
        a = [mean(n, n_steps, "valid") for n in names]
        for key in ("valid", "test"):
            b = [mean(n, top, key) for n in names]
            lo, hi = bootstrap(a, b)
            cell = f"{spearman(a, b):.2f} ({lo:.2f}..{hi:.2f})"
            if key == "valid":
                line = f"| {n_steps} | {cell} "
            else:
                print(line + f"| {cell} |")
    print(f"\n{len(names)} architectures, seed means over {seeds}:")
    for name in sorted(names, key=lambda n: -mean(n, top, "valid")):
        print(f"  {name:14s} " + " ".join(f"{s}:{mean(name, s, 'valid'):.3f}/{mean(name, s, 'test'):.3f}"
                                          for s in steps) + f"  {dict(specs)[name].summary()}")


if __name__ == "__main__":
    main()
