"""Bench: on 2 cores, is brief distillation faster as 1 process x 2 torch threads or 2 processes x 1 thread?

Runs the same brief trials (``microser.distill.train``, one epoch each, fresh
model per trial) three ways and prints trial throughput:

- ``1x1``: one process, 1 intra-op thread, trials one after another (the baseline);
- ``1x2``: one process, 2 intra-op threads, trials one after another;
- ``2x1``: two processes side by side, 1 thread each, each running half the trials
  (what ``microser search --workers 2`` does).

Data: a teacher cache (``--cache DIR``, read with microser.cache), the espeak-emo
corpus read directly (``--espeak DIR``, default ../shared/data/espeak-emo; speakers
d00-d05 train, d06 valid), or ``--synthetic N`` clips of the same lengths. Each process loads the data before a barrier; only the
trials are timed. Usage::

    python bench/distill_threads.py [--trials 4] [--epochs 1] [--cores 0,1]

Measured (idle 16-core x86-64 VM, each run pinned to 2 cores with --cores, torch
2.11.0 CPU, ``--synthetic 160``: 120 train clips of 2-4.5 s, TrainConfig defaults;
wav2small-ref: 4 trials of 2 epochs, run twice on different core pairs;
wav2small-80k (7 x 36 channels, 78,771 params): 2 trials of 1 epoch):

    model           mode  s/trial   trials/h  vs 1x1
    wav2small-ref   1x1   8.5 / 9.2  424 / 390  1.00x
    wav2small-ref   1x2   5.1 / 5.2  706 / 691  1.67x / 1.77x
    wav2small-ref   2x1   4.9 / 5.0  740 / 727  1.75x / 1.87x
    wav2small-80k   1x1   20.6        175       1.00x
    wav2small-80k   1x2   11.5        313       1.80x
    wav2small-80k   2x1   11.1        323       1.85x

Both ways use the second core well; 2 processes x 1 thread is 3-5% ahead for both
sizes (about the spread between the two wav2small-ref runs), and it also overlaps
the single-threaded parts of a trial (ONNX export, cost measurement, Python).
Recommendation: ``--workers 2`` with 1 thread each on 2 cores (TrainConfig.threads
defaults to 1).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from microser.train_config import InMemoryData

REPO = Path(__file__).resolve().parents[1]


class EspeakData(InMemoryData):
    """espeak-emo as a distill data source: labels.csv targets, whole clips at 16 kHz, split by speaker."""

    VALID, TEST = ("d06",), ("d07",)

    def __init__(self, root: Path):
        from microser.audio import load_audio

        rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
        self.targets = np.array([[float(r[k]) for k in ("arousal", "dominance", "valence")] for r in rows], np.float32)
        self._audio = [load_audio(root / r["path"]) for r in rows]
        speakers = np.array([r["speaker"] for r in rows])
        self._split = {
            "valid": np.flatnonzero(np.isin(speakers, self.VALID)),
            "test": np.flatnonzero(np.isin(speakers, self.TEST)),
            "train": np.flatnonzero(~np.isin(speakers, self.VALID + self.TEST)),
        }


class SyntheticData(InMemoryData):
    """``n`` clips of 2-4.5 s (like espeak-emo) of tones in noise with random targets: throughput only, no files."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.targets = rng.uniform(0, 1, (n, 3)).astype(np.float32)
        self._audio = []
        for a, _, v in self.targets:
            t = np.arange(int(rng.uniform(2.0, 4.5) * 16000)) / 16000
            x = 0.3 * np.sin(2 * np.pi * (150 + 300 * a) * t) + 0.1 * (0.1 + v) * rng.standard_normal(len(t))
            self._audio.append(x.astype(np.float32))
        cut1, cut2 = int(0.75 * n), int(0.875 * n)
        self._split = {"train": np.arange(cut1), "valid": np.arange(cut1, cut2), "test": np.arange(cut2, n)}


def load_data(args):
    if getattr(args, "synthetic", None):
        return SyntheticData(args.synthetic), f"synthetic: {args.synthetic} clips of 2-4.5 s, 75% train / 12.5% valid"
    if args.cache:
        from microser.cache import Cache

        return Cache.open(args.cache), f"cache {args.cache}"
    return EspeakData(Path(args.espeak)), f"espeak-emo at {args.espeak} (train d00-d05, valid d06)"


def make_model(name: str):
    """'wav2small-ref' or the wav2small-ref spec widened to about 80k trainable parameters."""
    from microser.models.spec import REFERENCES, build_model

    spec = REFERENCES["wav2small-ref"]
    if name == "wav2small-ref":
        return build_model(spec)
    if name == "wav2small-80k":
        return build_model(widened_80k(spec))
    raise SystemExit(f"unknown model {name!r}: use wav2small-ref or wav2small-80k")


def widened_80k(spec):
    """The reference spec with all 7 conv blocks widened to the most channels that keep trainable params <= 80k."""
    from microser.models.spec import build_model

    def with_width(c):
        return dataclasses.replace(spec, body=dataclasses.replace(spec.body, channels=(c,) * spec.body.depth))

    c = spec.body.channels[0]
    while sum(p.numel() for p in build_model(with_width(c + 1)).parameters()) <= 80_000:
        c += 1
    return with_width(c)


def _worker(model_name, args, threads, n_trials, seed0, barrier, results):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from microser.distill import train
    from microser.train_config import TrainConfig

    torch.set_num_threads(threads)
    data, _ = load_data(args)
    config = TrainConfig(epochs=args.epochs, threads=threads)
    barrier.wait()
    t0 = time.time()
    for k in range(n_trials):
        torch.manual_seed(seed0 + k)
        train(make_model(model_name), data, dataclasses.replace(config, seed=seed0 + k))
    results.put((t0, time.time()))


def run_mode(model_name, args, processes, threads):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    per = args.trials // processes
    procs = [ctx.Process(target=_worker, args=(model_name, args, threads, per, 1000 * p, barrier, results))
             for p in range(processes)]
    for p in procs:
        p.start()
    spans = [results.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return per * processes, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", help="teacher cache folder (default: read espeak-emo directly)")
    ap.add_argument("--espeak", default=str(REPO.parent / "shared" / "data" / "espeak-emo"))
    ap.add_argument("--synthetic", type=int, help="use N synthetic clips instead (no audio files needed)")
    ap.add_argument("--trials", type=int, default=4, help="trials per mode (even)")
    ap.add_argument("--epochs", type=float, default=1.0, help="epochs per trial")
    ap.add_argument("--models", default="wav2small-ref,wav2small-80k")
    ap.add_argument("--modes", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    ap.add_argument("--cores", help="pin this process and its workers to these CPUs, e.g. 0,1")
    args = ap.parse_args()
    if args.cores:
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})

    import torch

    _, data_name = load_data(args)
    print(f"machine: {platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs "
          f"(of {os.cpu_count()}), load average at start {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"data: {data_name}; {args.epochs:g} epoch(s) per trial, microser.train_config.TrainConfig defaults otherwise")
    print(f"{'model':<15} {'params':>7} {'mode':>5} {'trials':>6} {'wall s':>7} {'s/trial':>8} {'trials/h':>9} {'vs 1x1':>7}")
    for name in args.models.split(","):
        params = sum(p.numel() for p in make_model(name).parameters())
        base = None
        for mode in args.modes.split(","):
            procs, threads = (int(v) for v in mode.split("x"))
            n, wall = run_mode(name, args, procs, threads)
            rate = n / wall * 3600
            base = base or rate
            print(f"{name:<15} {params:>7} {mode:>5} {n:>6} {wall:>7.1f} {wall / n:>8.2f} {rate:>9.0f} "
                  f"{rate / base:>6.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
