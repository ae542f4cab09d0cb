"""Shared fixtures. The core suite runs on data the tests generate; espeak-emo tests skip without ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
ESPEAK_DIR = Path(os.environ.get("MICROSER_ESPEAK_DIR", REPO.parent / "shared" / "data" / "espeak-emo"))


@pytest.fixture(scope="session")
def espeak_dir() -> Path:
    """The espeak-emo development corpus (../shared/data/espeak-emo); skips when this checkout has none."""
    if not (ESPEAK_DIR / "labels.csv").is_file():
        pytest.skip(f"espeak-emo corpus not found at {ESPEAK_DIR} (a user's clone has no ../shared; "
                    "set MICROSER_ESPEAK_DIR to run these tests)")
    return ESPEAK_DIR
