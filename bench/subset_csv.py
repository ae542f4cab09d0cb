"""Bench helper: a smaller corpus from a labels CSV, to measure the main job on an EmoDB-sized cache.

Keeps the first ``--speakers`` speakers (sorted by name) and, of each one's
rows in path order, every ``--every``-th from the first; writes the rows to
``--out`` with absolute paths, so the cache is built with
``--allow-absolute-paths`` and the source folder is left untouched::

    python bench/subset_csv.py --csv DATA/labels.csv --speakers 10 --every 2 --out small/labels.csv
    microser cache build --audio small/labels.csv --teacher csv:small/labels.csv --out CACHE --allow-absolute-paths
    python bench/real_speech.py --cache small=CACHE --seeds 0,1,2

The CSV needs ``path`` and ``speaker`` columns (others are copied as they are).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def subset(rows: list[dict], speakers: int, every: int) -> list[dict]:
    """The rows of the first ``speakers`` speakers (sorted), every ``every``-th of each in path order."""
    names = sorted({r["speaker"] for r in rows})[:speakers]
    out = []
    for name in names:
        own = sorted((r for r in rows if r["speaker"] == name), key=lambda r: r["path"])
        out.extend(own[::every])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, type=Path)
    ap.add_argument("--speakers", type=int, required=True)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if args.speakers < 3 or args.every < 1:
        raise SystemExit(f"--speakers {args.speakers} --every {args.every}: expected at least 3 speakers (a cache "
                         "splits by speaker from 3) and --every >= 1")
    with open(args.csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    if "path" not in fields or "speaker" not in fields:
        raise SystemExit(f"{args.csv}: expected 'path' and 'speaker' columns, found {fields}")
    kept = subset(rows, args.speakers, args.every)
    for r in kept:
        r["path"] = str((args.csv.parent / r["path"]).resolve())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)
    print(f"{args.out}: {len(kept)} of {len(rows)} rows, {len({r['speaker'] for r in kept})} speakers")


if __name__ == "__main__":
    main()
