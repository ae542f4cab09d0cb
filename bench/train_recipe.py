"""Bench: which long-training recipe for `microser train`? Variants x corpora x seeds, test CCC per variant.

Trains one architecture (``--model``: ``pick``, ``w2s 16x7 k3 bn pool@2 att+gram |
stft512/160 m40 log clip``, the main job's usual winner when this bench was
written and a warm start of the default space until the 2026-11-30 change;
``warm<K>``; ``ref``, wav2small-ref; or a spec JSON) with the
long-training base recipe (``microser.trainer.train_config`` at ``--steps``:
validation every ``eval_every`` steps, EMA, best checkpoint, no early
stopping unless the variant sets ``patience``) plus one variant's overrides,
on each cache in ``--caches``, for each seed. torch is seeded with the seed
before ``build_model``, as the search does. Each finished run appends one JSON
line to ``--out`` (variant, cache, seed, steps, validation and test CCC of the
returned weights, best step, curve, seconds); runs already in ``--out`` are
skipped, so an interrupted bench continues, and ``--shard K/N`` splits the
jobs over N processes (e.g. two 1-thread processes on two cores). ``--report``
prints the table from ``--out``: per corpus and variant the mean test and
validation CCC over seeds, the difference to ``base``, and the seed values.

Usage::

    nice -n 10 python bench/train_recipe.py --caches ESPEAK_CACHE,RAVDESS_CACHE \\
        --variants base,crop2,speed,mixup,mse0,mse1 --seeds 0,1,2 --steps 2000 --shard 0/2 &
    nice -n 10 python bench/train_recipe.py ... --shard 1/2
    python bench/train_recipe.py --report --out bench/train_recipe.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Overrides on top of microser.trainer.train_config(steps=...). "base" is that recipe unchanged.
VARIANTS = {
    "base": {},
    "crop2": {"crop_seconds": 2.0},                      # longer crops (a batch is cut to its shortest segment)
    "crop2-b8": {"crop_seconds": 2.0, "batch_size": 8},   # the same audio per step as base
    "speed": {"speed_perturb": 0.1},                     # resample by 0.9..1.1: tempo and pitch
    "speed05": {"speed_perturb": 0.05},                  # resample by 0.95..1.05
    "mixup": {"mixup_prob": 0.5},                        # half the crops mixed with another, targets mixed alike
    "mse0": {"mse_weight": 0.0},                         # 1 - CCC only
    "mse1": {"mse_weight": 1.0},
    "mse2": {"mse_weight": 2.0},
    "noema": {"ema_decay": 0.0},                          # the raw weights instead of their moving average
    "lr1e-3": {"lr": 1e-3},
    "noaug": {"augment": False},
}


PICK = json.dumps({"family": "wav2small",
                   "frontend": {"prenorm": "clip", "n_fft": 512, "hop": 160, "win_length": None, "window": "hann",
                                "center": False, "pad_end": False, "n_mels": 40, "fmin": 0.0, "fmax": 8000.0,
                                "compression": "log", "filterbank": "mel"},
                   "body": {"channels": [16] * 7, "kernel": 3, "norm": "batch", "pool_after": [2], "stem_stride": 1,
                            "pooling": "attention+gram"}})


def resolve_model(name: str):
    """``pick`` (16x7 on STFT 512/160, fixed here so that old rows stay comparable: it was the default space's
    second warm start until 2026-11-30), ``warm<K>`` (the default space's K-th warm start), ``ref``
    (wav2small-ref) or any spec text (a reference name, a JSON object, a JSON file)."""
    import optuna

    from microser.models.spec import resolve_spec
    from microser.space import SearchSpace

    if name == "pick":
        return resolve_spec(PICK)
    if name.startswith("warm") and name[4:].isdigit():
        space = SearchSpace.load("default")
        k = int(name[4:])
        if k >= len(space.warm_starts):
            raise SystemExit(f"--models {name}: the default space has {len(space.warm_starts)} warm starts "
                             f"(warm0..warm{len(space.warm_starts) - 1})")
        return space.suggest(optuna.trial.FixedTrial(space.warm_starts[k]))
    return resolve_spec("wav2small-ref" if name == "ref" else name)


def machine_line(threads: int) -> str:
    import torch

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, torch "
            f"{torch.__version__}, {threads} thread(s) per run, load average {load} at start")


def run_one(cache_path: str, spec, config, *, test: bool = True) -> dict:
    """Train a fresh model (torch seeded with ``config.seed`` before build_model); validation and test CCC."""
    import torch

    from microser.cache import Cache
    from microser.distill import evaluate, train
    from microser.models.spec import build_model

    data = Cache.open(cache_path)
    torch.manual_seed(config.seed)
    model = build_model(spec)
    t0 = time.perf_counter()
    result = train(model, data, config)
    seconds = time.perf_counter() - t0
    return {"valid": result.ccc, "test": evaluate(model, data, "test") if test else None,
            "steps": result.steps, "best_step": result.best_step, "early_stopped": result.early_stopped,
            "collapsed": result.collapse_message, "seconds": seconds,
            "steps_per_second": result.samples_per_second / config.batch_size,
            "curve": [(h["step"], round(h["valid"]["mean"], 4), round(h["loss"], 4)) for h in result.history]}


def done_keys(out: Path) -> set:
    if not out.is_file():
        return set()
    return {tuple(r["key"]) for r in map(json.loads, out.read_text().splitlines()) if r.get("key")}


def append(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def report_or_train(ap: argparse.ArgumentParser, report_fn) -> argparse.Namespace | None:
    """Parse the command line; with --report print ``report_fn(out)`` and return None, else check --caches."""
    args = ap.parse_args()
    if args.report:
        report_fn(Path(args.out))
        return None
    if not args.caches:
        ap.error("--caches C1,C2 is required to train (only --report reads without it)")
    return args


def read_rows(out: Path) -> list[dict]:
    """The rows of ``out``, after printing the machine lines (``head``) of the runs that wrote them."""
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    for head in sorted({r["head"] for r in rows if r.get("head")}):
        print(head)
    return rows


def report(out: Path, group: str = "variant", base: str = "base") -> None:
    rows = read_rows(out)
    by = {}
    for r in rows:
        if "key" in r:
            by.setdefault((r["cache"], r["model"], r["steps_asked"]), {}).setdefault(r[group], []).append(r)
    for (cache, model, steps), groups in sorted(by.items()):
        print(f"\ndata: {cache}   model: {model}   steps: {steps}")
        ref = groups.get(base)
        ref_test = np.mean([r["test"]["mean"] for r in ref]) if ref else None
        print(f"{group:10s} seeds  test CCC  d(test)  valid CCC  best step   min/run  test per seed")
        for name, rs in sorted(groups.items(), key=lambda kv: list(VARIANTS).index(kv[0]) if kv[0] in VARIANTS else 99):
            rs = sorted(rs, key=lambda r: r["seed"])
            test = np.mean([r["test"]["mean"] for r in rs])
            valid = np.mean([r["valid"]["mean"] for r in rs])
            delta = f"{test - ref_test:+.3f}" if ref_test is not None and name != base else "   -  "
            best = "/".join(str(r["best_step"]) for r in rs)
            minutes = np.mean([r["seconds"] for r in rs]) / 60
            print(f"{name:10s} {len(rs):5d}  {test:8.3f}  {delta:>7s}  {valid:9.3f}  {best:>10s}  {minutes:7.1f}  "
                  + " ".join(f"{r['test']['mean']:.3f}" for r in rs)
                  + ("  collapsed: " + ",".join(str(r["seed"]) for r in rs if r["collapsed"])
                     if any(r["collapsed"] for r in rs) else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default=None, help="comma-separated cache folders (built with the csv teacher)")
    ap.add_argument("--model", default="pick")
    ap.add_argument("--variants", default="base,crop2,speed,mixup,mse0,mse1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th job starting at K")
    ap.add_argument("--out", default="bench/train_recipe.jsonl")
    ap.add_argument("--report", action="store_true", help="only print the table of --out")
    args = report_or_train(ap, report)
    if args is None:
        return
    out = Path(args.out)

    from dataclasses import replace

    from microser.trainer import train_config

    spec = resolve_model(args.model)
    base = train_config(steps=args.steps, threads=args.threads, device="cpu", patience=None)
    k, n = (int(x) for x in args.shard.split("/"))
    jobs = [(c, v, int(s)) for s in args.seeds.split(",") for c in args.caches.split(",")
            for v in args.variants.split(",")]  # seed-major: every variant's first seed comes first
    head = f"{machine_line(args.threads)}; base recipe: {json.dumps(base.to_dict())}"
    append(out, {"head": head})
    print(head, flush=True)
    done = done_keys(out)
    for j, (cache, variant, seed) in enumerate(jobs):
        key = [cache, args.model, args.steps, variant, seed]
        if j % n != k or tuple(key) in done:
            continue
        config = replace(base, seed=seed, **VARIANTS[variant])
        row = run_one(cache, spec, config)
        append(out, {"key": key, "cache": cache, "model": args.model, "summary": spec.summary(),
                     "steps_asked": args.steps, "variant": variant, "seed": seed, "config": config.to_dict(), **row})
        print(f"{Path(cache).name:12s} {variant:8s} seed {seed}: test {row['test']['mean']:.3f} valid "
              f"{row['valid']['mean']:.3f} best step {row['best_step']} {row['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
