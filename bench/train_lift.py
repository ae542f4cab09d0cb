"""Bench: does `microser train` with its defaults lift test CCC over the search's final stage? (goal: +0.03)

For each cache, model (``pick``: 16x7 on STFT 512/160, the main job's usual
winner before the 400/320 warm start came first and no longer a warm start;
``warm<K>``: the default space's K-th warm start, ``warm0`` the 24x7 on STFT 400/320;
``ref``: wav2small-ref; or a spec JSON file) and seed, trains a fresh model
(torch seeded before build_model) three ways and scores the test split:

* ``final-1000``: the search's final stage as the main job plans it at its
  default ``--time`` (``Fidelity.train_config`` of ``resolve_fidelity`` with
  ``SearchConfig`` defaults: 1,000 steps of 1 s crops, one per segment, batch
  16; the last weights);
* ``final-<N>``: the same recipe for ``--baseline-steps`` optimizer steps
  (default 2,000);
* ``trained``: ``microser.trainer.train_config`` with its defaults (what
  ``microser train`` runs: DEFAULT_STEPS, validation every EVAL_EVERY steps,
  EMA, best checkpoint, early stopping);
* ``METHOD+FIELD=VALUE[+FIELD=VALUE]``: any of the above with TrainConfig fields
  changed (a recipe candidate, e.g. ``trained+speed_perturb=0.1`` or
  ``final-1000+speed_perturb=0.1``).

Rows go to ``--out`` as JSON lines (runs already there are skipped;
``--shard K/N`` splits the jobs over processes). ``--report`` prints, per cache
and model, the mean test CCC over seeds of each method and the lift of
``trained`` over each baseline. Usage::

    nice -n 10 python bench/train_lift.py --caches C1,C2 --shard 0/2 & nice -n 10 python bench/train_lift.py --caches C1,C2 --shard 1/2
    python bench/train_lift.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_recipe import append, machine_line, read_rows, report_or_train, resolve_model, run_one  # noqa: E402


def configs(baseline_steps: int, threads: int) -> dict:
    from microser.fidelity import Fidelity, plan_steps
    from microser.search_config import SearchConfig
    from microser.trainer import train_config

    config = SearchConfig()
    rungs, final_steps = plan_steps(config.time)
    fidelity = Fidelity(rungs=rungs, final_steps=final_steps, final_seeds=config.final_seeds, folds=1, eta=config.eta,
                        crop_seconds=config.crop_seconds, crops_per_segment=config.crops_per_segment,
                        batch_size=config.batch_size, valid_seconds=config.valid_seconds)
    final = fidelity.train_config(final_steps, seed=0, threads=threads)
    return {
        f"final-{final_steps}": replace(final, device="cpu"),
        f"final-{baseline_steps}": replace(final, epochs=None, steps=baseline_steps, device="cpu"),
        "trained": train_config(threads=threads, device="cpu"),
    }


IGNORED = ("seed", "threads", "device")   # fields a row may differ in and still measure the same recipe


def changed_fields(row: dict, methods: dict) -> dict:
    """The TrainConfig fields in which ``row`` was trained differently from what its method means now
    (a default changed since): ``{field: value the row used}``."""
    now = variant(methods, row["method"]).to_dict()
    return {k: v for k, v in row["config"].items() if k not in IGNORED and now.get(k) != v}


def label(row: dict, methods: dict) -> str:
    """The row's method, with the fields it was trained with where they are not its method's defaults now."""
    old = changed_fields(row, methods)
    return row["method"] + "".join(f" [{k}={json.dumps(v)}]" for k, v in sorted(old.items()))


def report(out: Path) -> None:
    rows = read_rows(out)
    methods = configs(2000, 1)
    by = {}
    for r in rows:
        if "key" in r:
            by.setdefault((r["cache"], r["model"]), {}).setdefault(label(r, methods), {})[r["seed"]] = r
    print(f"\n{'data':12s} {'model':5s} {'method':28s} seeds  test CCC (per seed)          valid   steps (best)"
          f"          min/run")
    for (cache, model), methods in sorted(by.items()):
        for method, seeds in sorted(methods.items(), key=lambda kv: (kv[0] == "trained", kv[0])):
            rs = [seeds[s] for s in sorted(seeds)]
            test = np.mean([r["test"]["mean"] for r in rs])
            steps = "/".join(f"{r['steps']}" + (f"({r['best_step']})" if r.get("best_step") else "") for r in rs)
            print(f"{Path(cache).name:12s} {model:5s} {method:28s} {len(rs):5d}  {test:.3f} ("
                  + " ".join(f"{r['test']['mean']:.3f}" for r in rs) + f")  {np.mean([r['valid']['mean'] for r in rs]):.3f}"
                  f"   {steps:22s} {np.mean([r['seconds'] for r in rs]) / 60:6.1f}")
        for name, trained in sorted(methods.items()):
            if not name.startswith("trained"):
                continue
            for method, seeds in sorted(methods.items()):
                common = sorted(set(seeds) & set(trained))
                if method.startswith("trained") or not common:
                    continue
                lift = np.mean([trained[s]["test"]["mean"] - seeds[s]["test"]["mean"] for s in common])
                print(f"{'':12s} {'':5s} lift of {name} over {method}: {lift:+.3f} mean test CCC "
                      f"(seeds {','.join(map(str, common))}; goal +0.030: {'met' if lift >= 0.03 else 'NOT met'})")


def variant(methods: dict, name: str):
    """The TrainConfig of a method name: a known one, or ``METHOD+FIELD=VALUE[+...]`` (that one, changed)."""
    if name in methods:
        return methods[name]
    base, *changes = name.split("+")
    if base not in methods or not changes:
        raise SystemExit(f"unknown method {name!r}: expected one of {', '.join(methods)}, optionally with "
                         "+FIELD=VALUE (e.g. trained+speed_perturb=0.1, final-1000+speed_perturb=0.1)")
    fields = {}
    for change in changes:
        field, _, value = change.partition("=")
        fields[field] = json.loads(value)
    return replace(methods[base], **fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default=None, help="comma-separated cache folders (built with the csv teacher)")
    ap.add_argument("--models", default="pick,ref")
    ap.add_argument("--methods", default=None, help="comma-separated subset of final-<N>, trained, "
                    "each optionally +FIELD=VALUE (a TrainConfig field changed)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--baseline-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", default="0/1")
    ap.add_argument("--out", default="bench/train_lift.jsonl")
    ap.add_argument("--report", action="store_true")
    args = report_or_train(ap, report)
    if args is None:
        return
    out = Path(args.out)
    methods = configs(args.baseline_steps, args.threads)
    chosen = args.methods.split(",") if args.methods else list(methods)
    k, n = (int(x) for x in args.shard.split("/"))
    jobs = [(c, m, meth, int(s)) for s in args.seeds.split(",") for m in args.models.split(",")
            for c in args.caches.split(",") for meth in chosen]
    head = f"{machine_line(args.threads)}; trained = {json.dumps(methods['trained'].to_dict())}"
    append(out, {"head": head})
    print(head, flush=True)
    done = {tuple(r["key"]) for r in read_rows(out) if r.get("key") and not changed_fields(r, methods)} \
        if out.is_file() else set()   # a row trained before a default changed is not done
    specs = {}
    for j, (cache, model, method, seed) in enumerate(jobs):
        key = [cache, model, method, seed]
        if j % n != k or tuple(key) in done:
            continue
        spec = specs.setdefault(model, resolve_model(model))
        config = replace(variant(methods, method), seed=seed)
        row = run_one(cache, spec, config)
        append(out, {"key": key, "cache": cache, "model": model, "summary": spec.summary(), "method": method,
                     "seed": seed, "config": config.to_dict(), **row})
        print(f"{Path(cache).name:12s} {model:5s} {method:11s} seed {seed}: test {row['test']['mean']:.3f} valid "
              f"{row['valid']['mean']:.3f} steps {row['steps']} best {row['best_step']} {row['seconds']:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
