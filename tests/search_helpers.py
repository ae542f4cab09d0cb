"""A tiny real search set-up shared by the search and PostgreSQL tests: generated clips, a csv-teacher cache, a tiny space."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from teachers_helpers import write_clip

TINY_SPACE = """
family = "wav2small"
[frontend]
n_fft = 256
hop = 160
center = false
n_mels = { low = 16, high = 24, step = 4 }
[wav2small]
depth = { low = 2, high = 3 }
channels = { low = 4, high = 12 }
kernel = 3
norm = "batch"
pool_after = [1]
pooling = "attention"
"""


def build_tiny_search_root(root: Path, n_clips: int) -> Path:
    """``n_clips`` short clips of 6 speakers with random A/D/V labels, cached (``root/cache``) through the csv
    teacher, plus ``root/space.toml`` holding TINY_SPACE."""
    from microser.cache_build import build_cache

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_clips):
        write_clip(root / "wav" / f"c{i:02d}.wav", 0.6 + 0.02 * i, seed=i)
        a, d, v = rng.random(3)
        rows.append({"path": f"wav/c{i:02d}.wav", "speaker": f"s{i % 6}", "arousal": a, "dominance": d,
                     "valence": v})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_cache(root / "labels.csv", [f"csv:{root / 'labels.csv'}"], root / "cache")
    (root / "space.toml").write_text(TINY_SPACE)
    return root
