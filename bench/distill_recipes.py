"""Bench: which brief recipe (3 epochs) gets closest to a long training of the same student? One job per call.

Generates the synthetic demo corpus in memory (microser.demo.generate_corpus; no
cache, no audio files), splits it by speaker (first 3/4 of the speakers train,
next 1/8 valid), trains a fresh wav2small-ref (torch seeded before build_model)
with one recipe variant and appends one JSON line (variant, seed, epochs,
validation CCC per epoch, seconds) to ``--out``. Run many jobs side by side,
one core each, e.g.::

    for v in default batch16 crop1x2; do for s in 0 1; do
      taskset -c $k python bench/distill_recipes.py --variant $v --seed $s --out r.jsonl & done; done

and compare each variant's CCC after 3 epochs with ``--variant long`` (the
default recipe for ``--long-epochs``).

Measured (16-core x86-64 VM, one job per core, torch 2.11.0 CPU; demo corpus of
320 clips / 16 speakers: 240 train, 40 valid; wav2small-ref; recipe = the
TrainConfig defaults at the time, 2 s crops x 1 per segment, batch 32, lr 3e-3,
mse_weight 0.5, augmentation on, plus the variant's change; seeds 0 / 1):

    variant                      epochs steps  valid mean CCC   train s (eval incl.)
    default                       3      21    .127 / .038      28 / 31
    lr 1e-2                       3      21    .227 / .102      27 / 26
    mse_weight 0 (1 - CCC only)   3      21    .057 / .056      30 / 30
    no augmentation               3      21    .019 / .066      27 / 28
    batch 16                      3      45    .481 / .367      29 / 30
    1 s crops x 2 per segment     3      45    .447 / .468      32 / 33
    1 s x 2, batch 16             3      90    .496 / .476      31 / 33
    long (default recipe)        15     105    .568 / .539     109 / 112

At the same audio per epoch, the number of optimizer steps decides the brief score;
TrainConfig now defaults to 1 s x 2, batch 16. One architecture only: this says the
brief run gets closer to the long one, not how well brief runs rank architectures
(bench/fidelity.py measures that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from microser.train_config import InMemoryData

VARIANTS = {
    "default": {},
    "batch16": {"batch_size": 16},
    "crop1x2": {"crop_seconds": 1.0, "crops_per_segment": 2},
    "crop1x2-batch16": {"crop_seconds": 1.0, "crops_per_segment": 2, "batch_size": 16},
    "lr1e-2": {"lr": 1e-2},
    "ccc-only": {"mse_weight": 0.0},
    "no-augment": {"augment": False},
    "long": {},
}


class DemoData(InMemoryData):
    """A generated demo corpus as a distill data source, split by speaker."""

    def __init__(self, n_clips: int, n_speakers: int, seed: int = 0):
        from microser.demo import generate_corpus

        c = generate_corpus(n_clips=n_clips, n_speakers=n_speakers, seed=seed)
        self.targets = c.targets.astype(np.float32)
        self._audio = c.audio
        spk = np.array([int(s[3:]) for s in c.speakers])
        n_tr, n_va = (3 * n_speakers) // 4, max(1, n_speakers // 8)
        self._split = {
            "train": np.flatnonzero(spk < n_tr),
            "valid": np.flatnonzero((spk >= n_tr) & (spk < n_tr + n_va)),
            "test": np.flatnonzero(spk >= n_tr + n_va),
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--long-epochs", type=float, default=20.0)
    ap.add_argument("--clips", type=int, default=320)
    ap.add_argument("--speakers", type=int, default=16)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from microser.distill import train
    from microser.models.spec import REFERENCES, build_model
    from microser.train_config import TrainConfig

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = DemoData(args.clips, args.speakers)
    gen_s = time.perf_counter() - t0
    epochs = args.long_epochs if args.variant == "long" else args.epochs
    config = dataclasses.replace(TrainConfig(epochs=epochs, seed=args.seed), **VARIANTS[args.variant])
    torch.manual_seed(args.seed)
    r = train(build_model(REFERENCES["wav2small-ref"]), data, config)
    line = {
        "variant": args.variant, "seed": args.seed, "epochs": epochs, "ccc": r.ccc,
        "valid_mean_per_epoch": [round(h["valid"]["mean"], 4) for h in r.history],
        "steps": r.steps, "train_seconds": r.train_seconds, "generate_seconds": gen_s,
        "collapsed": r.collapsed, "n_train": len(data.split_indices("train")),
        "n_valid": len(data.split_indices("valid")), "torch": torch.__version__, "cpus": os.cpu_count(),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
