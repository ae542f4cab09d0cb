"""What the streaming-compatible prenorm costs: wav2small-ref trained with prenorm "clip" vs "running".

Same recipe, same seed, same cache; CCC on the validation and test splits
(whole segments, population CCC over the split). "clip" (per-clip zero mean,
unit variance, as in the Wav2Small paper) needs the whole utterance before the
first frame; "running" (causal cumulative mean/variance) streams exactly in
the generated C library.

    microser cache build --audio /work/shared/data/espeak-emo/labels.csv \
        --teacher csv:/work/shared/data/espeak-emo/labels.csv --out /tmp/espeak-cache
    python bench/cgen_prenorm_ccc.py --cache /tmp/espeak-cache --epochs 15 --save /tmp/cgen-bench

Prints a table; with --save, writes each trained model's weights and spec there
(bench/c_inference.py --trained DIR uses them for the C int8 test-split CCC).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from microser.cache import Cache
from microser.distill import TrainConfig, evaluate, train
from microser.models.spec import REFERENCES, ArchSpec, build_model


def spec_with_prenorm(prenorm: str) -> ArchSpec:
    d = REFERENCES["wav2small-ref"].to_dict()
    d["frontend"]["prenorm"] = prenorm
    return ArchSpec.from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/espeak-cache")
    ap.add_argument("--epochs", type=float, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--save", default=None, help="folder for the trained weights (state_dict + spec per prenorm)")
    args = ap.parse_args()
    data = Cache.open(args.cache)
    rows = []
    for seed in args.seeds:
        for prenorm in ("clip", "running"):
            spec = spec_with_prenorm(prenorm)
            torch.manual_seed(seed)
            model = build_model(spec)
            t0 = time.perf_counter()
            result = train(model, data, TrainConfig(epochs=args.epochs, seed=seed))
            seconds = time.perf_counter() - t0
            valid = evaluate(model, data, "valid")
            test = evaluate(model, data, "test")
            rows.append({"prenorm": prenorm, "seed": seed, "valid": valid, "test": test, "seconds": seconds,
                         "collapsed": result.collapsed})
            if args.save:
                out = Path(args.save)
                out.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), out / f"{prenorm}-s{seed}.pt")
                (out / f"{prenorm}-s{seed}.json").write_text(spec.to_json())
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nwav2small-ref on {args.cache} ({len(data)} segments), {args.epochs:g} epochs, "
          f"{platform.processor() or platform.machine()}, torch threads 1")
    print(f"{'prenorm':8} {'seed':>4} {'valid mean':>10} {'test A':>7} {'test D':>7} {'test V':>7} {'test mean':>9} {'train s':>8}")
    for r in rows:
        t = r["test"]
        print(f"{r['prenorm']:8} {r['seed']:>4} {r['valid']['mean']:>10.3f} {t['arousal']:>7.3f} {t['dominance']:>7.3f} "
              f"{t['valence']:>7.3f} {t['mean']:>9.3f} {r['seconds']:>8.0f}")
    for seed in args.seeds:
        by = {r["prenorm"]: r for r in rows if r["seed"] == seed}
        print(f"seed {seed}: test mean CCC running - clip = {by['running']['test']['mean'] - by['clip']['test']['mean']:+.3f}")


if __name__ == "__main__":
    main()
