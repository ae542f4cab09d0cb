"""Bench: validation CCC of wav2small-ref after brief vs longer distillation (microser.distill defaults).

For each epoch count and seed, trains a fresh wav2small-ref (torch seeded
before build_model) with ``TrainConfig(epochs=E, seed=S)`` plus any overrides,
and prints the validation CCC (whole split, whole segments), the seconds per
epoch (optimizer steps only, and with the per-epoch validation) and whether
training collapsed. Data as in bench/distill_threads.py (a cache, or espeak-emo
read directly: speakers d00-d05 train, d06 valid). Usage::

    python bench/distill_epochs.py --epochs 3,10,30 --seeds 0,1 [--set crop_seconds=1.0 --set crops_per_segment=2]

Measured on the espeak-emo cache (``microser cache build --audio labels.csv --teacher
csv:labels.csv``, split seed 0: 480 train / 80 valid clips), wav2small-ref, seed 0,
1 thread, on the shared 2-core dev VM at load average 5-10 (so seconds are
inflated 3-5x by other processes):

    recipe                         epochs  arousal  dom.   valence  mean   s/epoch
    2 s crops x 1, batch 32           3    .256     .232   .148     .212   88
    2 s crops x 1, batch 32          10    .646     .545   .321     .504   55
    1 s crops x 2, batch 16 (now)     3    .616     .536   .348     .500   41

The 30-epoch run was stopped for time and is not reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_threads import REPO, load_data, make_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="teacher cache folder (default: read espeak-emo directly)")
    ap.add_argument("--espeak", default=str(REPO.parent / "shared" / "data" / "espeak-emo"))
    ap.add_argument("--model", default="wav2small-ref")
    ap.add_argument("--epochs", default="3,10,30")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="TrainConfig override")
    ap.add_argument("--json", help="also append one JSON line per run to this file")
    args = ap.parse_args()

    import torch

    from microser.distill import train
    from microser.train_config import TrainConfig

    data, data_name = load_data(args)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if "noise_snr_db" in overrides:
        overrides["noise_snr_db"] = tuple(overrides["noise_snr_db"])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"data: {data_name}; train {len(data.split_indices('train'))}, valid {len(data.split_indices('valid'))} "
          f"segments; model {args.model}; TrainConfig overrides {overrides or 'none'}")
    print(f"{'epochs':>6} {'seed':>4} {'arousal':>7} {'dom.':>6} {'valence':>7} {'mean':>6} "
          f"{'s/epoch':>7} {'+eval':>7} {'collapsed':>9}", flush=True)
    for epochs in (float(e) for e in args.epochs.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            config = dataclasses.replace(TrainConfig(epochs=epochs, seed=seed, threads=args.threads), **overrides)
            torch.manual_seed(seed)
            model = make_model(args.model)
            t0 = time.perf_counter()
            r = train(model, data, config)
            wall = time.perf_counter() - t0
            eval_s = sum(h["eval_seconds"] for h in r.history)
            c = r.ccc
            print(f"{epochs:>6g} {seed:>4} {c['arousal']:>7.3f} {c['dominance']:>6.3f} {c['valence']:>7.3f} "
                  f"{c['mean']:>6.3f} {(wall - eval_s) / epochs:>7.2f} {wall / epochs:>7.2f} {str(r.collapsed):>9}",
                  flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"model": args.model, "data": data_name, "overrides": overrides,
                                        "wall_seconds": wall, **r.to_dict()}) + "\n")


if __name__ == "__main__":
    main()
