"""Long training of one trial's architecture (`microser train`): the recipe, K seeds, the "trained" stage."""

from __future__ import annotations

from microser.distill import TrainConfig

DEFAULT_STEPS = 12_000
EVAL_EVERY = 250
EMA_DECAY = 0.999
PATIENCE = None


def train_config(*, steps: int | None = None, seed: int = 0, threads: int | None = None, device: str = "auto",
                 **overrides) -> TrainConfig:
    """The long-training recipe of `microser train` (``steps`` default DEFAULT_STEPS), with ``overrides``."""
    base = dict(steps=steps or DEFAULT_STEPS, crop_seconds=1.0, crops_per_segment=2, batch_size=16,
                eval_every=EVAL_EVERY, ema_decay=EMA_DECAY, keep_best=True, patience=PATIENCE,
                seed=seed, threads=threads, device=device)
    return TrainConfig(**{**base, **overrides})
