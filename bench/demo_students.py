"""Demo corpus benchmark: is it learnable by tiny conv students, and does the front-end matter?

    python bench/demo_students.py [--root DIR] [--epochs 8] [--seeds 0,1] [--jobs N]

Builds (or reuses) the demo cache under ``--root``, then distils each student
below with `microser.distill.train` (one process per model and seed, one
thread each) and prints validation and test CCC per dimension. The students:
the paper's reference Wav2Small (STFT 64/32, 26 mels, 7x13 channels) and the
same stack on a finer STFT (512/160, 40 mels) with 8 and 13 channels.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

STUDENTS = ("wav2small-ref", "w8-stft512", "w13-stft512")


def _spec(name: str):
    from microser.frontends import FrontendSpec
    from microser.models.spec import REFERENCES, ArchSpec
    from microser.models.wav2small import Wav2SmallBody

    if name == "wav2small-ref":
        return REFERENCES[name]
    width = {"w8-stft512": 8, "w13-stft512": 13}[name]
    return ArchSpec("wav2small", FrontendSpec(prenorm="clip", n_fft=512, hop=160, n_mels=40),
                    Wav2SmallBody(channels=(width,) * 7, pool_after=(2,)))


def _run(job: tuple[str, int, float, str]) -> dict:
    name, seed, epochs, cache_dir = job
    import torch

    from microser.cache import Cache
    from microser.distill import evaluate, train
    from microser.models.spec import build_model
    from microser.train_config import TrainConfig

    torch.set_num_threads(1)
    cache = Cache.open(cache_dir)
    torch.manual_seed(seed)
    model = build_model(_spec(name))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    result = train(model, cache, TrainConfig(epochs=epochs, seed=seed, threads=1))
    return {"name": name, "seed": seed, "params": n_params, "seconds": time.perf_counter() - t0,
            "valid": result.ccc, "test": evaluate(model, cache, split="test"), "collapsed": result.collapsed}


def _fmt(report: dict) -> str:
    dims = " ".join(f"{k[0].upper()} {v:.3f}" for k, v in report.items() if k != "mean")
    return f"{dims} mean {report['mean']:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="demo folder (default: microser.demo.default_demo_dir())")
    p.add_argument("--epochs", type=float, default=8.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--students", default=",".join(STUDENTS), help=f"comma-separated subset of {', '.join(STUDENTS)}")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: one per run, up to cores)")
    args = p.parse_args()

    from microser.demo import ensure_demo_cache

    t0 = time.perf_counter()
    cache_dir = str(ensure_demo_cache(args.root))
    print(f"demo cache {cache_dir} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    jobs = [(n, int(s), args.epochs, cache_dir) for n in args.students.split(",") for s in args.seeds.split(",")]
    with mp.get_context("spawn").Pool(args.jobs or min(len(jobs), mp.cpu_count())) as pool:
        for r in pool.imap_unordered(_run, jobs):
            print(f"{r['name']:14s} seed {r['seed']} {r['params']:6d} params {args.epochs:g} epochs "
                  f"{r['seconds']:5.0f} s | valid {_fmt(r['valid'])} | test {_fmt(r['test'])}"
                  + ("  COLLAPSED" if r["collapsed"] else ""), flush=True)


if __name__ == "__main__":
    main()
