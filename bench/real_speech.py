"""Bench: the main job on real-speech caches: does the pick beat wav2small-ref trained in the same run?

Runs ``microser search --cache CACHE --budget 80k-params --seed S --json`` as a
whole process (the README's command with only the cache and the seed given,
unless ``--args`` adds options) in a fresh folder per run, for every cache and
seed, and prints one row per run and one summary row per cache:

- the pick's and wav2small-ref's test CCC (mean over the final stage's seeds;
  the test speakers are never used for training or selection), their margin
  and the verdict the search printed;
- params and int8 RAM (1 s) of both; wall time of the whole command.

Goal (issue 10): on ravdess-dev and espeak-emo, 10 minutes or less per run on 2
cores, and over 3 seeds the pick beats wav2small-ref by >= +0.05 test CCC on
average, with int8 RAM no larger than its. Results are appended as JSON lines
to ``--out`` as they come; the same command again skips the runs already there
(an interrupted bench resumes) and prints the table over all of them. Each
row keeps the search summary's rows (finalists and references with their
costs and per-seed validation and test CCC), so that another rule for the
pick can be judged on the same runs without training again
(``bench/pick_rules.py``).

Usage::

    python bench/real_speech.py --cache ravdess=CACHE_DIR --cache espeak=CACHE_DIR [--seeds 0,1,2] [--args "..."]

A cache is built once with the csv teacher, split by speaker:
``microser cache build --audio DATA/labels.csv --teacher csv:DATA/labels.csv --out CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_one(cache: str, seed: int, extra: list[str], where: Path, log: str | None = None) -> dict:
    command = [sys.executable, "-m", "microser.cli", "search", "--cache", cache, "--budget", "80k-params",
               "--seed", str(seed), "--json", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=where, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})
    wall = time.perf_counter() - t0
    if log is not None:
        Path(log).write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"search failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = json.loads(done.stdout)
    pick, ref, margin = summary["pick"], summary["reference"], summary["margin"] or {}
    return {"seed": seed, "wall_seconds": wall, "trained": summary["trained"], "rungs": summary["rungs"],
            "pick": pick and {"number": pick["number"], "summary": pick["summary"], "params": pick["costs"]["params"],
                              "ram_bytes": pick["costs"]["ram_bytes"], "test": pick["test_ccc"]["mean"],
                              "valid": pick["final_ccc"]["mean"]},
            "reference": ref and {"params": ref["costs"]["params"], "ram_bytes": ref["costs"]["ram_bytes"],
                                  "test": ref["test_ccc"]["mean"], "valid": ref["final_ccc"]["mean"]},
            "margin": margin.get("mean"), "spread": margin.get("spread"), "verdict": margin.get("verdict"),
            "finalists": [(r["number"], r["summary"], r["test_ccc"] and r["test_ccc"]["mean"],
                           r["final_ccc"] and r["final_ccc"]["mean"]) for r in summary["rows"] if not r["reference"]],
            "fidelity": summary["settings"]["fidelity"],
            "rows": summary["rows"]}   # finalists and references: costs, rung CCCs, per-seed validation and test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--args", default="", help="extra `microser search` options, e.g. \"--time 5m\"")
    ap.add_argument("--out", default="real_speech.jsonl")
    args = ap.parse_args()
    extra = shlex.split(args.args)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"command: microser search --cache CACHE --budget 80k-params --seed S --json {args.args}".rstrip())
    caches = [spec.split("=", 1) for spec in args.cache]
    done = []   # rows of an earlier, interrupted run of the same command: not run again (the bench resumes)
    if os.path.exists(args.out):
        done = [r for r in map(json.loads, open(args.out)) if r.get("args") == args.args]
    results: dict[str, list[dict]] = {name: [] for name, _ in caches}
    for seed in seeds:                       # seeds outermost: an interrupted bench has every cache at some seeds
        for name, path in caches:
            old = [r for r in done if r["cache"] == name and r["seed"] == seed]
            if old:
                results[name].append(old[-1])
                continue
            with tempfile.TemporaryDirectory() as tmp:
                row = {"cache": name, **run_one(str(Path(path).resolve()), seed, extra, Path(tmp),
                                                log=f"{args.out}.{name}-{seed}.log")}   # its live view
            results[name].append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps({**row, "args": args.args}) + "\n")
            p, r = row["pick"], row["reference"]
            print(f"{name} seed {seed}: pick {p['summary']} ({p['params']:,} params, RAM {p['ram_bytes'] / 1000:.0f} KB) "
                  f"test {p['test']:.3f} vs ref {r['test']:.3f} -> {row['margin']:+.3f} +- {row['spread']:.3f} "
                  f"({row['verdict']}); {row['trained']} candidates {row['rungs']}; final stage "
                  f"{row['fidelity']['final_steps']} steps, top rung {row['fidelity']['rungs'][-1]}; "
                  f"{row['wall_seconds'] / 60:.1f} min",
                  flush=True)
    print()
    print("| cache | runs | pick test CCC | wav2small-ref test CCC | margin (mean, min..max) | pick params / int8 RAM "
          "| ref params / int8 RAM | RAM <= ref | wall (max) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        import numpy as np

        if not rows:
            continue

        pick = np.array([r["pick"]["test"] for r in rows])
        ref = np.array([r["reference"]["test"] for r in rows])
        margin = pick - ref
        ram_ok = sum(r["pick"]["ram_bytes"] <= r["reference"]["ram_bytes"] for r in rows)
        print(f"| {name} | {len(rows)} | {pick.mean():.3f} ± {pick.std():.3f} | {ref.mean():.3f} ± {ref.std():.3f} "
              f"| {margin.mean():+.3f} ({margin.min():+.3f}..{margin.max():+.3f}) "
              f"| {np.mean([r['pick']['params'] for r in rows]):,.0f} / "
              f"{np.mean([r['pick']['ram_bytes'] for r in rows]) / 1000:.0f} KB "
              f"| {rows[0]['reference']['params']:,} / {rows[0]['reference']['ram_bytes'] / 1000:.0f} KB "
              f"| {ram_ok}/{len(rows)} | {max(r['wall_seconds'] for r in rows) / 60:.1f} min |")


if __name__ == "__main__":
    main()
