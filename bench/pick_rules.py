"""Bench: which rule for the pick, judged on runs already made by ``bench/real_speech.py`` (no training).

With one or two validation speakers the final stage's validation ranking is
mostly noise (docs/DECISIONS.md, "An EmoDB-sized cache: the pick is a coin
flip"), so the rule that picks among the finalists matters. This reads
the summary rows that ``bench/real_speech.py`` stores for every run
(finalists and references, their costs and per-seed validation and test CCC)
and prints, per cache, the mean test margin over the first reference that
each rule's pick would have had in the same runs:

- ``best-valid``: the best mean validation CCC (the search's rule before the
  tie rule);
- ``tie->ram``: the least int8 RAM among the finalists that validation
  cannot separate from the best (the best does not lead on every seed's
  fold; the search's rule from 2026-12-02 afternoon to evening);
- ``search``: the search's rule now (``microser.final.choose_pick``): the
  same tie, then the fewest parameters among those within the reference's
  int8 RAM;
- ``valid<=ram``: the best mean validation CCC among the finalists within the
  reference's int8 RAM (none within: the best overall);
- ``best-rung``: the best CCC at the highest rung every finalist reached
  (the search's evidence before the final stage);
- ``oracle``: the best test CCC among the finalists (what no rule can beat;
  it reads the test split, so it is a bound, never a rule).

Rules read validation CCC and costs only, never test CCC (except ``oracle``).
Usage::

    python bench/real_speech.py --cache small=C1 --cache ravdess=C2 --seeds 0,1,2 --out RUNS.jsonl
    python bench/pick_rules.py RUNS.jsonl [MORE.jsonl ...]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from microser.final import choose_pick, compare


def tied_with_best(finalists: list[dict]) -> list[dict]:
    """The finalists that validation cannot separate from the best (the search's own tie, ``choose_pick``)."""
    tied = set(choose_pick(finalists)[1])
    return [r for r in finalists if r["number"] in tied]


def best_at_common_rung(finalists: list[dict]) -> dict:
    """The finalist with the best CCC at the highest rung that every finalist reached."""
    def reached(r: dict) -> list[int]:
        return [int(k) for k, v in (r.get("rungs") or {}).items() if v]

    rung = str(min(max(reached(r), default=0) for r in finalists))
    return max(finalists, key=lambda r: float(((r.get("rungs") or {}).get(rung) or {"mean": -np.inf})["mean"]))


RULES = {   # (finalists, reference) -> the pick
    "best-valid": lambda f, ref: max(f, key=lambda r: r["final_ccc"]["mean"]),
    "tie->ram": lambda f, ref: min(tied_with_best(f), key=lambda r: (r["costs"]["ram_bytes"], -r["final_ccc"]["mean"])),
    "search": lambda f, ref: choose_pick(f, ref["costs"]["ram_bytes"])[0],
    "valid<=ram": lambda f, ref: max(f, key=lambda r: (r["costs"]["ram_bytes"] <= ref["costs"]["ram_bytes"],
                                                        r["final_ccc"]["mean"])),
    "best-rung": lambda f, ref: best_at_common_rung(f),
    "oracle": lambda f, ref: max(f, key=lambda r: r["test_ccc"]["mean"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="JSON lines files bench/real_speech.py wrote (--out)")
    args = ap.parse_args()
    runs = [json.loads(line) for path in args.runs for line in open(path) if line.startswith("{")]
    runs = [r for r in runs if r.get("rows")]
    if not runs:
        raise SystemExit(f"{', '.join(args.runs)}: no run with summary rows "
                         "(made by a bench/real_speech.py that stores them)")
    print(f"{'cache':10s} {'rule':12s} runs  margin over ref (mean; per run)        pick int8 RAM (mean)  RAM <= ref")
    for cache in sorted({r["cache"] for r in runs}):
        mine = sorted((r for r in runs if r["cache"] == cache), key=lambda r: r["seed"])
        for name, rule in RULES.items():
            margins, rams = [], []
            for run in mine:
                finalists = [r for r in run["rows"] if not r.get("reference") and r.get("final_ccc")
                             and r.get("test_ccc")]
                ref = next(r for r in run["rows"] if r.get("reference"))
                pick = rule(finalists, ref)
                margins.append(compare(pick, ref)["mean"])
                rams.append((pick["costs"]["ram_bytes"], ref["costs"]["ram_bytes"]))
            within = sum(p <= r for p, r in rams)
            print(f"{cache:10s} {name:12s} {len(mine):4d}  {np.mean(margins):+.3f} ("
                  + " ".join(f"{m:+.3f}" for m in margins) + f")  {np.mean([p for p, _ in rams]) / 1000:8.0f} KB"
                  f"  {within}/{len(rams)}")


if __name__ == "__main__":
    main()
