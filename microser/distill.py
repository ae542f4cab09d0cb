"""Brief distillation: train a student on cached teacher A/D/V outputs, predict on whole segments, score with CCC.

The recipe (``TrainConfig`` holds every knob): random crops of ``crop_seconds``
from the training segments, loss ``1 - CCC + mse_weight * MSE`` per batch,
AdamW with a linear warm-up then a cosine decay over exactly the steps the
budget allows, light augmentation (gain, additive white noise, SpecAugment-like
time/frequency masks on the model's ``frontend`` output). Evaluation runs on
whole validation segments and computes CCC once over the whole split
(``microser.metrics.ccc_report``), never as an average of batch values.

The data is anything with ``len(data)``, ``data.targets`` (N, 3),
``data.audio(i)`` (float32, 16 kHz, [-1, 1]) and ``data.split_indices(name)``:
``microser.cache.Cache`` is one; tests build small in-memory ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from microser import SAMPLE_RATE, TARGETS
from microser.errors import MicroserError
from microser.metrics import ccc_report

DEFAULT_EPOCHS = 3
MIN_SPLIT_SEGMENTS = 2  # train and valid need at least this many segments (a batch CCC needs two items)


class DistillData(Protocol):
    """What training and prediction read: ``microser.cache.Cache`` or any in-memory equivalent.

    Optional, for speed on large data: ``lengths(indices) -> (n,) int`` (samples per segment, without
    reading audio) and ``crop(i, start, length) -> (length,) float32`` (a slice of segment ``i``).
    """

    targets: np.ndarray  # (N, 3) float32, columns in TARGETS order

    def __len__(self) -> int: ...

    def audio(self, i: int) -> np.ndarray: ...  # (T,) float32 in [-1, 1], 16 kHz

    def split_indices(self, split: str) -> np.ndarray: ...


class InMemoryData:
    """A DistillData held in memory: clips, their (N, 3) targets and index arrays per split.

    For training from arrays without a cache (benches, tests, notebooks).
    Subclasses may fill ``targets``, ``_audio`` and ``_split`` themselves.
    """

    def __init__(self, audio, targets, splits: dict[str, np.ndarray]):
        self._audio = [np.asarray(a, dtype=np.float32) for a in audio]
        self.targets = np.asarray(targets, dtype=np.float32)
        self._split = {k: np.asarray(v) for k, v in splits.items()}

    def __len__(self) -> int:
        return len(self._audio)

    def audio(self, i: int) -> np.ndarray:
        return self._audio[i]

    def split_indices(self, split: str) -> np.ndarray:
        return self._split[split]

    def lengths(self, indices) -> np.ndarray:
        return np.array([len(self._audio[int(i)]) for i in indices], dtype=np.int64)

    def crop(self, i: int, start: int, length: int) -> np.ndarray:
        return self._audio[i][start : start + length]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one brief training run; frozen, JSON-able through ``to_dict()``."""

    # Length of training: give epochs or steps, not both; neither means DEFAULT_EPOCHS epochs.
    # One epoch = crops_per_segment random crops from every training segment.
    epochs: float | None = None
    steps: int | None = None
    # Brief training is step-starved: at 3 epochs, 1 s crops x 2 per segment in batches of 16 (4x the
    # optimizer steps of 2 s x 1 x 32 for the same audio and time) reached mean CCC .48/.50 vs .13/.04
    # (2 seeds, wav2small-ref, demo corpus; bench/distill_recipes.py), near 15 epochs of 2 s x 32 (.57/.54).
    crop_seconds: float = 1.0  # a batch whose shortest segment is shorter uses that length (no padding)
    crops_per_segment: int = 2  # crops drawn from every training segment per epoch
    batch_size: int = 16
    lr: float = 3e-3  # peak learning rate, reached at the end of the warm-up
    weight_decay: float = 1e-2
    warmup: float = 0.1  # fraction of all steps with a linear warm-up from lr/100; then cosine to 0
    # 1 - CCC alone collapsed one run in four to a constant output (DESIGN.md); the MSE term
    # keeps a gradient toward the targets' mean and scale when the batch CCC is flat.
    mse_weight: float = 0.5
    # Augmentation (training only). augment=False turns all of it off.
    augment: bool = True
    gain_db: float = 6.0  # random gain, uniform in +-gain_db (0: off)
    noise_prob: float = 0.3  # chance per crop of additive white noise ...
    noise_snr_db: tuple[float, float] = (15.0, 40.0)  # ... at an SNR uniform in this range (dB)
    time_masks: int = 1  # masks on the frontend output's time axis (on the waveform if no frontend)
    time_mask_fraction: float = 0.1  # max width of one mask, as a fraction of the frames
    freq_masks: int = 1  # masks on the frontend output's last axis (skipped if no frontend)
    freq_mask_fraction: float = 0.15  # max width of one mask, as a fraction of the bands
    seed: int = 0
    threads: int | None = 1  # torch intra-op threads during train(); None keeps the current setting
    eval_batch_seconds: float = 64.0  # audio seconds per batch in predict()
    collapse_std: float = 1e-3  # validation predictions with a smaller std on any target = collapsed

    def __post_init__(self):
        if self.epochs is not None and self.steps is not None:
            raise MicroserError(
                f"TrainConfig got epochs={self.epochs} and steps={self.steps}: give one of them (e.g. epochs=3)"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise MicroserError(f"TrainConfig epochs={self.epochs}: expected a number > 0, e.g. epochs=3")
        if self.steps is not None and self.steps < 1:
            raise MicroserError(f"TrainConfig steps={self.steps}: expected an integer >= 1, e.g. steps=200")
        if not self.crop_seconds > 0:
            raise MicroserError(f"TrainConfig crop_seconds={self.crop_seconds}: expected > 0, e.g. 2.0")
        if self.batch_size < 2:
            raise MicroserError(
                f"TrainConfig batch_size={self.batch_size}: expected >= 2 (a batch CCC needs two items), e.g. 32"
            )
        if self.crops_per_segment < 1:
            raise MicroserError(f"TrainConfig crops_per_segment={self.crops_per_segment}: expected >= 1")
        if not 0 <= self.warmup < 1:
            raise MicroserError(f"TrainConfig warmup={self.warmup}: expected a fraction in [0, 1), e.g. 0.1")
        lo, hi = self.noise_snr_db
        if lo > hi:
            raise MicroserError(f"TrainConfig noise_snr_db={self.noise_snr_db}: expected (low, high) with low <= high")
        if self.threads is not None and self.threads < 1:
            raise MicroserError(f"TrainConfig threads={self.threads}: expected >= 1 or None")

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (tuples become lists)."""
        d = asdict(self)
        d["noise_snr_db"] = list(self.noise_snr_db)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of ``to_dict``."""
        d = dict(d)
        if "noise_snr_db" in d:
            d["noise_snr_db"] = tuple(d["noise_snr_db"])
        return cls(**d)


@dataclass
class TrainResult:
    """What ``train`` returns. ``ccc`` is the final validation report (whole split)."""

    state_dict: dict
    history: list[dict]  # per epoch: epoch, step, loss (mean train loss), lr, valid (ccc_report), seconds
    ccc: dict  # ccc_report of the final weights on the validation split
    train_seconds: float  # wall time of the whole call, validation included
    samples_per_second: float  # training crops per second of optimizer-step time (validation excluded)
    audio_seconds_per_second: float  # seconds of training audio per second of optimizer-step time
    steps: int  # optimizer steps taken
    collapsed: bool = False
    collapse_message: str | None = None
    stopped: bool = False  # should_stop() ended training early
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the weights, JSON-able (for trial attributes)."""
        d = asdict(self)
        d.pop("state_dict")
        return d


# ---- loss ----


def ccc_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    r"""``1 - CCC`` per column of ``(B, D)`` tensors, differentiable; population statistics like ``metrics.ccc``.

    .. math::  1 - \frac{2 \sigma_{xy}}{\sigma_x^2 + \sigma_y^2 + (\mu_x - \mu_y)^2 + \epsilon}

    with ``epsilon = 1e-8`` so a constant batch gives a finite loss of about 1.

    Returns:
        the mean over columns (``reduction="mean"``) or the ``(D,)`` values (``"none"``), each in [0, 2].
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"ccc_loss needs equal (B, D) shapes, but got {tuple(pred.shape)} and {tuple(target.shape)}")
    mx, my = pred.mean(0), target.mean(0)
    vx = ((pred - mx) ** 2).mean(0)
    vy = ((target - my) ** 2).mean(0)
    cov = ((pred - mx) * (target - my)).mean(0)
    loss = 1 - 2 * cov / (vx + vy + (mx - my) ** 2 + 1e-8)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"ccc_loss reduction={reduction!r}: expected 'mean' or 'none'")


# ---- prediction and evaluation ----


def _length_batches(lengths: Sequence[int], batch_seconds: float) -> list[np.ndarray]:
    """Positions grouped by exact length, each group cut to at most batch_seconds of audio (>= 1 item)."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    batches = []
    start = 0
    while start < len(order):
        n = lengths[order[start]]
        stop = start
        while stop < len(order) and lengths[order[stop]] == n:
            stop += 1
        per = max(1, int(batch_seconds * SAMPLE_RATE // max(int(n), 1)))
        for s in range(start, stop, per):
            batches.append(order[s : min(s + per, stop)])
        start = stop
    return batches


def predict(
    model: nn.Module, data: DistillData, indices, *, batch_seconds: float = TrainConfig.eval_batch_seconds
) -> np.ndarray:
    """Model outputs on WHOLE segments ``indices`` of ``data``: float32 ``(len(indices), 3)`` in that order.

    Segments are sorted by length and only segments of exactly the same length
    share a batch (at most ``batch_seconds`` of audio), so nothing is padded:
    padding would change the waveform prenorm and the pooling. Runs in eval
    mode under ``torch.inference_mode``; the model's mode is restored afterwards.
    """
    clips = [np.asarray(data.audio(int(i)), dtype=np.float32) for i in np.asarray(indices, dtype=np.int64)]
    return _predict_clips(model, clips, batch_seconds)


def _predict_clips(model: nn.Module, clips: list[np.ndarray], batch_seconds: float) -> np.ndarray:
    out = np.zeros((len(clips), len(TARGETS)), dtype=np.float32)
    if not clips:
        return out
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for pos in _length_batches([len(c) for c in clips], batch_seconds):
                x = torch.from_numpy(np.stack([clips[p] for p in pos]))  # (B, T)
                out[pos] = model(x).float().numpy()
    finally:
        model.train(was_training)
    return out


def evaluate(
    model: nn.Module,
    data: DistillData,
    split: str = "valid",
    *,
    indices=None,
    batch_seconds: float = TrainConfig.eval_batch_seconds,
) -> dict[str, float]:
    """``ccc_report`` of the model against ``data.targets`` over the whole split (or ``indices``), whole segments."""
    idx = np.asarray(data.split_indices(split) if indices is None else indices, dtype=np.int64)
    if len(idx) < 2:
        raise MicroserError(
            f"split '{split}' has {len(idx)} segment(s): CCC needs at least 2; use a cache with more speakers/segments"
        )
    pred = predict(model, data, idx, batch_seconds=batch_seconds)
    return ccc_report(pred, np.asarray(data.targets, dtype=np.float32)[idx])


def collapse_check(pred: np.ndarray, min_std: float = TrainConfig.collapse_std) -> str | None:
    """A message when predictions are (near) constant on any target (std < ``min_std``), else None."""
    std = np.asarray(pred, dtype=np.float64).std(0)
    flat = [f"{name} std {s:.2g}" for name, s in zip(TARGETS, std) if not s >= min_std]
    if not flat:
        return None
    return (
        f"collapsed: validation predictions are (near) constant ({', '.join(flat)} < {min_std:g}); "
        "CCC is meaningless here: retrain with another seed, a larger mse_weight or a lower lr"
    )


# ---- training ----


class _AudioBank:
    """Random crops of the training segments, read on demand: nothing is copied up front.

    A trial's cost must not grow with the cache (a 20-hour cache has 1.8 GB of training audio; a
    brief trial reads a few thousand crops of it). Segment lengths come from ``data.lengths`` and
    crops from ``data.crop`` when the data has them (``Cache``: items table and a memory-mapped
    slice; ``InMemoryData``: array slices), else from ``data.audio(i)``.
    """

    def __init__(self, data: DistillData, indices: np.ndarray):
        self.data, self.indices = data, np.asarray(indices, dtype=np.int64)
        self.lengths = segment_lengths(data, self.indices)

    def crops(self, positions: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
        """(B, length) float32 crops; segment ``indices[positions[b]]`` from sample ``starts[b]``."""
        crop = getattr(self.data, "crop", None)
        out = np.empty((len(positions), length), dtype=np.float32)
        for b, (p, s) in enumerate(zip(positions, starts)):
            i, s = int(self.indices[p]), int(s)
            out[b] = crop(i, s, length) if crop is not None else np.asarray(self.data.audio(i))[s : s + length]
        return torch.from_numpy(out)


def segment_lengths(data: DistillData, indices) -> np.ndarray:
    """Samples in each of the segments ``indices``: ``data.lengths(indices)`` when it exists, else read."""
    indices = np.asarray(indices, dtype=np.int64)
    lengths = getattr(data, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths(indices), dtype=np.int64)
    return np.array([len(data.audio(int(i))) for i in indices], dtype=np.int64)


def _span_mask(n: int, size: int, masks: int, fraction: float, gen: torch.Generator) -> torch.Tensor | None:
    """(n, size) bool: per row, ``masks`` spans of random width <= fraction*size at random places."""
    max_w = int(fraction * size)
    if masks <= 0 or max_w < 1:
        return None
    pos = torch.arange(size)
    mask = torch.zeros(n, size, dtype=torch.bool)
    for _ in range(masks):
        w = torch.randint(0, max_w + 1, (n, 1), generator=gen)
        s = (torch.rand(n, 1, generator=gen) * (size - w + 1)).floor().long()
        mask |= (pos >= s) & (pos < s + w)
    return mask


class _FrontendMasks:
    """Forward hook on ``model.frontend``: SpecAugment-like masks on its (B, ..., T, F) output, training only.

    Masked cells get the example's mean value (a zero in log-mel units would be a loud band, not silence).
    """

    def __init__(self, config: TrainConfig, gen: torch.Generator):
        self.config, self.gen = config, gen

    def __call__(self, module: nn.Module, inputs, out):
        if not module.training or not isinstance(out, torch.Tensor) or out.ndim < 3:
            return out
        c = self.config
        b, t, f = out.shape[0], out.shape[-2], out.shape[-1]
        tmask = _span_mask(b, t, c.time_masks, c.time_mask_fraction, self.gen)  # (B, T)
        fmask = _span_mask(b, f, c.freq_masks, c.freq_mask_fraction, self.gen)  # (B, F)
        if tmask is None and fmask is None:
            return out
        mask = torch.zeros(b, t, f, dtype=torch.bool)
        if tmask is not None:
            mask |= tmask[:, :, None]
        if fmask is not None:
            mask |= fmask[:, None, :]
        shape = (b,) + (1,) * (out.ndim - 3) + (t, f)
        mean = out.detach().mean(dim=tuple(range(1, out.ndim)), keepdim=True)
        return torch.where(mask.view(shape), mean, out)


def _augment_wave(x: torch.Tensor, config: TrainConfig, gen: torch.Generator, mask_time: bool) -> torch.Tensor:
    """Gain and additive white noise on (B, T) crops; waveform time masks when the model has no frontend."""
    b, t = x.shape
    if config.gain_db > 0:
        db = (torch.rand(b, 1, generator=gen) * 2 - 1) * config.gain_db
        x = x * 10 ** (db / 20)
    if config.noise_prob > 0:
        lo, hi = config.noise_snr_db
        snr = lo + torch.rand(b, 1, generator=gen) * (hi - lo)
        on = torch.rand(b, 1, generator=gen) < config.noise_prob
        power = x.pow(2).mean(1, keepdim=True).clamp_min(1e-10)
        noise = torch.randn(b, t, generator=gen) * torch.sqrt(power / 10 ** (snr / 10))
        x = x + noise * on
    if mask_time:
        m = _span_mask(b, t, config.time_masks, config.time_mask_fraction, gen)
        if m is not None:
            x = x.masked_fill(m, 0.0)
    return x


def _lr_factor(step: int, total: int, warmup: float) -> float:
    """LR multiplier for 0-based ``step``: linear warm-up to 1 over the first ceil(warmup*total) steps, then a
    cosine from 1 that reaches 0 just after the last step (every one of the ``total`` steps has lr > 0)."""
    w = int(math.ceil(warmup * total))
    if step < w:
        return 0.01 + 0.99 * (step + 1) / w
    rest = max(total - w, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - w, rest) / rest))


def _indices(data: DistillData, given, split: str, need: int) -> np.ndarray:
    idx = np.asarray(data.split_indices(split) if given is None else given, dtype=np.int64)
    if len(idx) < need:
        raise MicroserError(
            f"{split} split has {len(idx)} segment(s): training needs at least {need}; "
            "use a cache with more segments or pass train_idx/valid_idx"
        )
    return idx


def train(
    model: nn.Module,
    data: DistillData,
    config: TrainConfig = TrainConfig(),
    *,
    train_idx=None,
    valid_idx=None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """Distil ``model`` in place on ``data.targets`` and return its final weights, history and validation CCC.

    Batches: ``config.batch_size`` random crops (one per drawn segment) of
    ``crop_seconds``; a batch whose shortest segment is shorter is cropped to
    that length instead (segments are never padded). One epoch draws every
    training segment ``crops_per_segment`` times in a seeded random order; the
    last incomplete batch of an epoch is dropped unless it is the only one.
    After every epoch the whole validation split is predicted on whole
    segments and scored with ``ccc_report``.

    Deterministic: the same initial weights, data, config (seed) and thread
    count give identical weights. ``train`` does not re-initialize the model;
    seed torch before ``build_model`` to make initialization reproducible too.

    Args:
        progress: called after every epoch with ``{"epoch", "epochs", "step", "steps", "loss", "lr",
            "valid", "seconds"}`` (the history entry plus totals).
        should_stop: polled before every step; True ends training early (the result says ``stopped``).
        extra_loss: called with the model at every step after the batch's forward; its scalar is added to the
            loss (quantization-aware training anchors the outputs on silence and clipping with it, microser.qat).
    """
    t_start = time.perf_counter()
    tr = _indices(data, train_idx, "train", MIN_SPLIT_SEGMENTS)
    va = _indices(data, valid_idx, "valid", MIN_SPLIT_SEGMENTS)
    targets_all = np.asarray(data.targets, dtype=np.float32)
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    hook = None
    try:
        bank = _AudioBank(data, tr)
        valid_clips = [np.asarray(data.audio(int(i)), dtype=np.float32) for i in va]  # read once per call
        targets = torch.from_numpy(targets_all[tr])  # (N, 3)
        rng = np.random.default_rng(config.seed)
        gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # dropout and anything else drawing from the global generator

        draws = len(tr) * config.crops_per_segment
        per_epoch = max(1, draws // config.batch_size)
        if config.steps is not None:
            total = config.steps
        else:
            total = max(1, int(round((config.epochs or DEFAULT_EPOCHS) * per_epoch)))
        n_epochs = math.ceil(total / per_epoch)

        frontend = getattr(model, "frontend", None)
        has_frontend = isinstance(frontend, nn.Module)
        if config.augment and has_frontend and (config.time_masks or config.freq_masks):
            hook = frontend.register_forward_hook(_FrontendMasks(config, gen))
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, config.warmup))
        crop = int(round(config.crop_seconds * SAMPLE_RATE))

        history: list[dict] = []
        step, step_time, crops_seen, audio_seen = 0, 0.0, 0, 0
        stopped = False
        bad_step = None  # the step whose loss was non-finite (it was not applied)
        pred, pred_step = None, -1  # latest validation predictions and the step they belong to
        for epoch in range(1, n_epochs + 1):
            order = rng.permutation(np.repeat(np.arange(len(tr)), config.crops_per_segment))
            model.train()
            losses = []
            for b in range(min(per_epoch, total - step)):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                t0 = time.perf_counter()
                pos = order[b * config.batch_size : (b + 1) * config.batch_size]
                length = int(min(crop, bank.lengths[pos].min()))
                starts = rng.integers(0, bank.lengths[pos] - length + 1)
                x = bank.crops(pos, starts, length)  # (B, T)
                if config.augment:
                    x = _augment_wave(x, config, gen, mask_time=not has_frontend)
                y = targets[pos]  # (B, 3)
                out = model(x)  # (B, 3)
                loss = ccc_loss(out, y) + config.mse_weight * torch.mean((out - y) ** 2)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                if not torch.isfinite(loss):
                    bad_step = step + 1
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                losses.append(float(loss.detach()))
                step_time += time.perf_counter() - t0
                crops_seen += len(pos)
                audio_seen += len(pos) * length
            if losses:
                t0 = time.perf_counter()
                pred, pred_step = _predict_clips(model, valid_clips, config.eval_batch_seconds), step
                entry = {
                    "epoch": epoch,
                    "step": step,
                    "loss": float(np.mean(losses)),
                    "lr": float(sched.get_last_lr()[0]),
                    "valid": ccc_report(pred, targets_all[va]),
                    "seconds": time.perf_counter() - t_start,
                    "eval_seconds": time.perf_counter() - t0,
                }
                history.append(entry)
                if progress is not None:
                    progress({**entry, "epochs": n_epochs, "steps": total})
            if stopped or bad_step is not None:
                break
        if pred_step != step:  # stopped before the first step
            pred = _predict_clips(model, valid_clips, config.eval_batch_seconds)
    finally:
        if hook is not None:
            hook.remove()
        torch.set_num_threads(old_threads)

    if bad_step is not None:
        message = (
            f"collapsed: the training loss became non-finite at step {bad_step} (training stopped there); "
            "retrain with a lower lr or another seed"
        )
    else:
        message = collapse_check(pred, config.collapse_std)
    return TrainResult(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        history=history,
        ccc=ccc_report(pred, targets_all[va]),
        train_seconds=time.perf_counter() - t_start,
        samples_per_second=crops_seen / step_time if step_time > 0 else 0.0,
        audio_seconds_per_second=audio_seen / SAMPLE_RATE / step_time if step_time > 0 else 0.0,
        steps=step,
        collapsed=message is not None,
        collapse_message=message,
        stopped=stopped,
        config=config.to_dict(),
    )
