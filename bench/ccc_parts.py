"""Bench: where does a model's CCC go on held-out speakers -- ranking (Pearson r), an offset, or the spread?

Trains each model (``warm<K>``, ``ref``, ``pick`` or a spec JSON, as in
bench/train_lift.py) with the search's final-stage recipe (1,000 steps at
the default ``--time``, fold 0: the cache's own split) for each seed, then
prints per split (a third of train, valid, test) and target the CCC and its
parts (``microser.metrics.ccc_parts``: CCC = 2 r s / (1 + s^2 + b^2), with
``b`` the mean offset in target standard deviations and ``s`` the spread
ratio). A CCC well below ``r`` with a large ``|b|`` on the test speakers is
a per-speaker offset, which no ranking of architectures on validation can
see. Usage::

    python bench/ccc_parts.py --cache CACHE --models warm1,ref --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_recipe import machine_line, resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="a cache folder (split by speaker)")
    ap.add_argument("--models", default="warm1")
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from microser import TARGETS
    from microser.cache import Cache
    from microser.distill import predict, train
    from microser.fidelity import resolve_fidelity
    from microser.metrics import ccc, ccc_parts
    from microser.models.spec import build_model
    from microser.search_config import SearchConfig

    data = Cache.open(args.cache)
    fidelity = resolve_fidelity(SearchConfig(), data)
    print(f"{machine_line(args.threads)}; cache {args.cache}; {fidelity.final_steps} steps (the final stage's "
          "recipe, fold 0)")
    print(f"{'model':8s} {'seed':>4s} {'split':5s} {'mean CCC':>8s}  " + "  ".join(
        f"{t[:3]} CCC   r   bias scale" for t in TARGETS))
    for name in args.models.split(","):
        spec = resolve_model(name)
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = build_model(spec)
            train(model, data, fidelity.train_config(fidelity.final_steps, seed=seed, threads=args.threads))
            for split in ("train", "valid", "test"):
                idx = data.split_indices(split)
                idx = idx[::3] if split == "train" else idx
                pred, truth = predict(model, data, idx), np.asarray(data.targets[idx])
                c, parts = ccc(pred, truth), ccc_parts(pred, truth)
                cells = "  ".join(f"{c[d]:7.2f} {parts['r'][d]:4.2f} {parts['bias'][d]:+5.2f} {parts['scale'][d]:5.2f}"
                                  for d in range(len(TARGETS)))
                print(f"{Path(name).stem[:8]:8s} {seed:4d} {split:5s} {c.mean():8.3f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
