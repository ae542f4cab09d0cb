"""Which segments a training run learns from and is judged on: bounded evaluation subsets and speaker folds.

A search evaluates many candidates, so its cost must not grow with the cache:
every evaluation reads at most ``max_seconds`` of audio (:func:`bounded`), a
deterministic subset spread over speakers; a cache smaller than that is used
whole. CCC is still computed once over the whole subset, never per batch.

With few validation speakers, the candidate best on validation is often not
the best on held-out speakers. :func:`speaker_folds` rotates the validation
speakers for the final stage: fold 0 is the cache's own split, fold ``f``
holds out another group of training speakers of the same size for validation
(and trains on the original validation speakers instead). The test split is
never touched, so test CCC stays a held-out measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from microser import SAMPLE_RATE
from microser.train_config import segment_lengths


@dataclass(frozen=True)
class Split:
    """Segment indices for one training run: learn from ``train``, select on ``valid``, report on ``test``."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray | None = None
    fold: int = 0
    valid_speakers: tuple[str, ...] = ()


def speakers_of(data, indices) -> list[str]:
    """The speaker of each segment (``data.speakers_of``), or empty strings when the data knows none."""
    get = getattr(data, "speakers_of", None)
    return list(get(indices)) if get is not None else [""] * len(indices)


def bounded(data, indices, max_seconds: float | None) -> np.ndarray:
    """At most ``max_seconds`` of audio from ``indices``, taken round-robin over speakers in a fixed order.

    All of ``indices`` when they fit (or ``max_seconds`` is None). Deterministic:
    segments are visited in a seeded permutation, speaker by speaker in turn,
    so every speaker keeps a share. Returns ascending indices.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if max_seconds is None or len(indices) == 0:
        return indices
    lengths = segment_lengths(data, indices)
    budget = float(max_seconds) * SAMPLE_RATE
    if lengths.sum() <= budget:
        return indices
    order = np.random.default_rng(0).permutation(len(indices))
    speakers = np.array(speakers_of(data, indices), dtype=object)
    queues = {s: [int(i) for i in order if speakers[i] == s] for s in sorted(set(speakers.tolist()))}
    chosen, used = [], 0
    while any(queues.values()):
        for s in list(queues):
            if not queues[s]:
                continue
            pos = queues[s].pop(0)
            if used + lengths[pos] > budget and chosen:
                return np.sort(indices[chosen])
            chosen.append(pos)
            used += lengths[pos]
    return np.sort(indices[chosen])


def speaker_folds(data, n: int) -> list[tuple[np.ndarray, np.ndarray, tuple[str, ...]]]:
    """Up to ``n`` (train, valid, validation speakers) folds; fold 0 is the data's own train/valid split.

    Later folds hold out a group of training speakers as large as the
    validation split's (a seeded shuffle of the training speakers, cut into
    consecutive groups) and train on everything else of train + valid. Fewer
    than ``n`` folds come back when the data names no speakers (only fold 0)
    or has too few training speakers.
    """
    train, valid = data.split_indices("train"), data.split_indices("valid")
    valid_spk = tuple(sorted({s for s in speakers_of(data, valid) if s}))
    folds = [(np.asarray(train), np.asarray(valid), valid_spk)]
    train_spk_of = speakers_of(data, train)
    train_spk = sorted({s for s in train_spk_of if s})
    if n <= 1 or not valid_spk or not train_spk:
        return folds
    size = len(valid_spk)
    shuffled = [train_spk[i] for i in np.random.default_rng(0).permutation(len(train_spk))]
    pool = np.concatenate([train, valid])
    pool_spk = np.array(train_spk_of + speakers_of(data, valid), dtype=object)
    for f in range(1, n):
        group = shuffled[(f - 1) * size : f * size]
        if len(group) < size or len(train_spk) - len(group) < 2:
            break
        held = np.isin(pool_spk, group)
        folds.append((np.sort(pool[~held]), np.sort(pool[held]), tuple(sorted(group))))
    return folds
