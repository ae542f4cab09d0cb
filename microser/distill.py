"""Distillation: train a student on cached teacher A/D/V outputs, predict on whole segments, score with CCC.

The recipe (``TrainConfig`` holds every knob): random crops of ``crop_seconds``
from the training segments, loss ``1 - CCC + mse_weight * MSE`` per batch,
AdamW with a linear warm-up then a cosine decay over exactly the steps the
budget allows, light augmentation (gain, additive white noise, SpecAugment-like
time/frequency masks on the model's ``frontend`` output; optionally speed
perturbation and mixing two crops). Evaluation runs on whole validation
segments and computes CCC once over the whole split
(``microser.metrics.ccc_report``), never as an average of batch values.

One loop serves the search's brief training and ``microser train``'s long
training. What long training adds is off by default, so a brief run is
unchanged: validation every ``eval_every`` steps, an exponential moving
average of the weights (``ema_decay``), the best evaluated weights kept
(``keep_best``), early stopping (``patience``) and a resumable checkpoint
(``train(..., checkpoint=PATH)``: model, optimizer, schedule position, EMA,
RNG states, step and history; a killed run given the same path continues
exactly where the last save left it).

The data is anything with ``len(data)``, ``data.targets`` (N, 3),
``data.audio(i)`` (float32, 16 kHz, [-1, 1]) and ``data.split_indices(name)``:
``microser.cache.Cache`` is one; tests build small in-memory ones.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from microser import SAMPLE_RATE, TARGETS
from microser.errors import MicroserError, one_line
from microser.metrics import ccc_report

DEFAULT_EPOCHS = 3
MIN_SPLIT_SEGMENTS = 2  # train and valid need at least this many segments (a batch CCC needs two items)
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" names one GPU
SCHEDULES = ("cosine", "hold")
CHECKPOINT_FORMAT = "microser-train-checkpoint"
# Settings that may differ between a checkpoint and the run resuming it: they change speed, not the result
# (on another thread count or device the floating-point sums may round differently; the run stays valid).
RESUMABLE_ACROSS = ("threads", "device")


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
    warmup: float = 0.1  # fraction of all steps with a linear warm-up from lr/100; then the schedule
    # After the warm-up: "cosine" decays to 0 over exactly the run's steps. "hold" keeps the peak lr until
    # validation stops improving (`patience`) or the last `decay` fraction of the steps begins, then decays it
    # (cosine to 0) over decay / (1 - decay) x the steps held, validating on, and stops there: early stopping
    # that still anneals (long training; a cosine laid out for many steps stops at a high lr).
    schedule: str = "cosine"
    decay: float = 0.2
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
    # Stronger augmentation (off by default; bench/train_recipe.py measures them).
    speed_perturb: float = 0.0  # resample each crop by a factor uniform in 1 +- this (tempo and pitch together)
    mixup_prob: float = 0.0  # chance per crop to be mixed with another crop of its batch, targets mixed alike
    mixup_alpha: float = 0.4  # the mix weight is Beta(alpha, alpha), folded so the crop's own share is >= 0.5
    seed: int = 0
    threads: int | None = 1  # torch intra-op threads during train(); None keeps the current setting
    # "cpu"; "auto": CUDA when torch sees a GPU, else CPU; "cuda" or "cuda:N" (an error if absent). CPU by default:
    # results on a GPU are not bit-reproducible (cuDNN), and callers choose (microser train --device auto).
    device: str = "cpu"
    eval_batch_seconds: float = 64.0  # audio seconds per batch in predict()
    collapse_std: float = 1e-3  # validation predictions with a smaller std on any target = collapsed
    # Long training (microser.trainer). Off by default: the search's brief runs validate once per epoch and
    # return their last weights.
    eval_every: int | None = None  # validate every N optimizer steps (and after the last); None: after every epoch
    ema_decay: float = 0.0  # exponential moving average of the weights (0: off); when on, it is what is
    #                         validated, kept and returned (the first steps use min(decay, (1+t)/(10+t)))
    keep_best: bool = False  # return the validated weights with the best mean CCC instead of the last ones
    patience: int | None = None  # stop (schedule "hold": start the decay) after this many validations in a row
    #                               without a better mean CCC

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
        if not 0 <= self.speed_perturb < 0.5:
            raise MicroserError(f"TrainConfig speed_perturb={self.speed_perturb}: expected a fraction in [0, 0.5), "
                                "e.g. 0.1 for factors 0.9..1.1")
        if not 0 <= self.mixup_prob <= 1 or not self.mixup_alpha > 0:
            raise MicroserError(f"TrainConfig mixup_prob={self.mixup_prob}, mixup_alpha={self.mixup_alpha}: expected "
                                "a probability in [0, 1] and alpha > 0, e.g. mixup_prob=0.5, mixup_alpha=0.4")
        if self.eval_every is not None and self.eval_every < 1:
            raise MicroserError(f"TrainConfig eval_every={self.eval_every}: expected steps >= 1, e.g. 500, or None "
                                "(after every epoch)")
        if not 0 <= self.ema_decay < 1:
            raise MicroserError(f"TrainConfig ema_decay={self.ema_decay}: expected 0 (off) or a decay in (0, 1), "
                                "e.g. 0.999")
        if self.patience is not None and self.patience < 1:
            raise MicroserError(f"TrainConfig patience={self.patience}: expected validations >= 1, e.g. 8, or None")
        if self.schedule not in SCHEDULES or not 0 < self.decay < 1:
            raise MicroserError(f"TrainConfig schedule={self.schedule!r}, decay={self.decay}: expected a schedule in "
                                f"{', '.join(SCHEDULES)} and a decay fraction in (0, 1), e.g. 0.2")
        if self.device not in DEVICES and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise MicroserError(f"device {self.device!r} is not known: expected auto, cpu, cuda or cuda:N")

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
    history: list[dict]  # per validation: epoch, step, loss (mean train loss since the last), lr, valid, seconds
    ccc: dict  # ccc_report of the returned weights on the validation split
    train_seconds: float  # wall time of the whole call, validation included
    samples_per_second: float  # training crops per second of optimizer-step time (validation excluded)
    audio_seconds_per_second: float  # seconds of training audio per second of optimizer-step time
    steps: int  # optimizer steps taken
    collapsed: bool = False
    collapse_message: str | None = None
    stopped: bool = False  # should_stop() ended training early (a checkpoint, if given, resumes it)
    config: dict = field(default_factory=dict)
    total_steps: int = 0  # the steps the schedule was laid out for
    best_step: int | None = None  # with keep_best: the step whose weights are returned
    early_stopped: bool = False  # patience ended the run before total_steps (after its decay, schedule "hold")
    resumed_at: int | None = None  # the step a checkpoint resumed from (None: started fresh)
    device: str = "cpu"  # where it trained

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
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for pos in _length_batches([len(c) for c in clips], batch_seconds):
                x = torch.from_numpy(np.stack([clips[p] for p in pos])).to(device)  # (B, T)
                out[pos] = model(x).float().cpu().numpy()
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``TrainConfig.device`` to a torch device: "auto" is CUDA when torch sees a GPU, else CPU.

    "cuda" (or "cuda:N") when torch sees none is a MicroserError: a run asked for a GPU it would not get.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise MicroserError(f"device {name!r}: torch {torch.__version__} sees no CUDA GPU here "
                                f"(torch.cuda.is_available() is False): pass --device cpu, or --device auto to use a "
                                "GPU only when there is one")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise MicroserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(0..{torch.cuda.device_count() - 1}): pass one of those, or --device auto")
        return torch.device(name)
    raise MicroserError(f"device {name!r} is not known: expected auto, cpu, cuda or cuda:N")


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
        out = np.empty((len(positions), length), dtype=np.float32)
        for b, (p, s) in enumerate(zip(positions, starts)):
            out[b] = self.crop(int(p), int(s), length)
        return torch.from_numpy(out)

    def crop(self, position: int, start: int, length: int) -> np.ndarray:
        """``length`` samples of segment ``indices[position]`` from sample ``start``."""
        i = int(self.indices[position])
        crop = getattr(self.data, "crop", None)
        return crop(i, start, length) if crop is not None else np.asarray(self.data.audio(i))[start : start + length]


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
        return torch.where(mask.view(shape).to(out.device), mean, out)


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


def _lr_factor(step: int, total: int, warmup: float, decay: tuple[int, int] | None = None) -> float:
    """LR multiplier for 0-based ``step``: linear warm-up to 1 over the first ceil(warmup*total) steps, then a
    cosine from 1 that reaches 0 just after the last step (every one of the ``total`` steps has lr > 0).

    With ``decay=(start, end)`` (schedule "hold") the factor stays 1 after the warm-up until ``start``, then
    the cosine runs from ``start`` to ``end`` instead.
    """
    w = int(math.ceil(warmup * total))
    if step < w:
        return 0.01 + 0.99 * (step + 1) / w
    start, end = (w, total) if decay is None else decay
    if step < start:
        return 1.0
    rest = max(end - start, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - start, rest) / rest))


def _indices(data: DistillData, given, split: str, need: int) -> np.ndarray:
    idx = np.asarray(data.split_indices(split) if given is None else given, dtype=np.int64)
    if len(idx) < need:
        raise MicroserError(
            f"{split} split has {len(idx)} segment(s): training needs at least {need}; "
            "use a cache with more segments or pass train_idx/valid_idx"
        )
    return idx



def _draw_batch(bank: _AudioBank, targets: torch.Tensor, pos: np.ndarray, config: TrainConfig,
                rng: np.random.Generator, gen: torch.Generator, mask_time: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One training batch on the CPU: (B, T) crops and their (B, 3) targets, augmented when ``config.augment``.

    T is ``crop_seconds`` or the batch's shortest segment, whichever is shorter. Random draws, in this order:
    speed factors (rng, if on), crop starts (rng), mixing (rng, if on), gain/noise/masks (gen).
    """
    lengths = bank.lengths[pos]
    length = int(min(round(config.crop_seconds * SAMPLE_RATE), lengths.min()))
    augment = config.augment
    if augment and config.speed_perturb > 0:
        # Read length * factor samples and resample them to length: factor > 1 is faster and higher.
        factors = rng.uniform(1 - config.speed_perturb, 1 + config.speed_perturb, len(pos))
        sources = np.minimum(np.round(length * factors).astype(np.int64), lengths)
        starts = rng.integers(0, lengths - sources + 1)
        x = torch.stack([_resample(bank.crop(int(p), int(s), int(n)), length)
                         for p, s, n in zip(pos, starts, sources)])  # (B, T)
    else:
        starts = rng.integers(0, lengths - length + 1)
        x = bank.crops(pos, starts, length)  # (B, T)
    y = targets[pos]  # (B, 3)
    if augment and config.mixup_prob > 0:
        x, y = _mix(x, y, config, rng)
    if augment:
        x = _augment_wave(x, config, gen, mask_time=mask_time)
    return x, y


def _resample(x: np.ndarray, length: int) -> torch.Tensor:
    """Linear-interpolation resampling of a 1-D crop to ``length`` samples (a speed change: tempo and pitch)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if len(t) == length:
        return t
    return torch.nn.functional.interpolate(t[None, None], size=length, mode="linear", align_corners=False)[0, 0]


def _mix(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, rng: np.random.Generator):
    """Mixup within the batch: crop b becomes ``w x_b + (1 - w) x_partner`` (targets alike) with chance mixup_prob."""
    b = x.shape[0]
    on = rng.random(b) < config.mixup_prob
    partner = rng.permutation(b)
    w = rng.beta(config.mixup_alpha, config.mixup_alpha, b)
    w = np.where(on, np.maximum(w, 1 - w), 1.0).astype(np.float32)
    wt = torch.from_numpy(w)[:, None]  # (B, 1)
    return wt * x + (1 - wt) * x[partner], wt * y + (1 - wt) * y[partner]


def _train_step(model: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, mse_weight: float,
                extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> float | None:
    """One optimizer step on a batch; the loss, or None (and no update) when it is not finite."""
    out = model(x)  # (B, 3)
    loss = ccc_loss(out, y) + mse_weight * torch.mean((out - y) ** 2)
    if extra_loss is not None:
        loss = loss + extra_loss(model)
    if not torch.isfinite(loss):
        return None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


class _EMA:
    """Exponential moving average of a model's state (float tensors averaged, BatchNorm statistics included;
    integer buffers copied). Decay ``min(decay, (1 + t) / (10 + t))`` after update t, so early weights fade fast."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.model = decay, model
        self.load({k: v.detach().clone() for k, v in model.state_dict().items()})

    def load(self, state: dict) -> None:
        """Take ``state`` (a checkpoint's EMA) as the average, on the model's device."""
        live = self.model.state_dict()  # tensors sharing the parameters' and buffers' storage
        self.state = {k: v.to(live[k].device, copy=True) for k, v in state.items()}
        self._floats = [(self.state[k], v) for k, v in live.items() if v.dtype.is_floating_point]
        self._others = [(self.state[k], v) for k, v in live.items() if not v.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, t: int) -> None:
        d = min(self.decay, (1 + t) / (10 + t))
        if self._floats:
            avg, live = zip(*self._floats)
            torch._foreach_mul_(avg, d)
            torch._foreach_add_(avg, live, alpha=1 - d)
        for avg, live in self._others:
            avg.copy_(live)


@dataclass
class _Loop:
    """Where a training run stands: everything a checkpoint holds besides weights, optimizer, EMA and RNGs."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches done in the current epoch
    order: np.ndarray | None = None  # the current epoch's segment order (positions into the training split)
    losses: list = field(default_factory=list)  # training losses since the last validation
    history: list = field(default_factory=list)
    best: float = -math.inf  # best validation mean CCC so far
    best_step: int | None = None
    best_state: dict | None = None  # (CPU) the weights validated best, with keep_best
    since_best: int = 0  # validations since the best one
    decay: tuple | None = None  # schedule "hold": (first, end) step of the lr decay; training ends at its end
    early_stopped: bool = False
    bad_step: int | None = None  # the step whose loss was non-finite (it was not applied)
    elapsed: float = 0.0  # wall seconds of earlier sessions (a resumed run counts on from there)
    step_time: float = 0.0
    crops_seen: int = 0
    audio_seen: int = 0

    @property
    def finished(self) -> bool:
        return self.early_stopped or self.bad_step is not None

    def to_blob(self) -> dict:
        d = asdict(self)
        d["order"] = None if self.order is None else torch.from_numpy(self.order)
        d["best"] = None if self.best == -math.inf else self.best
        return d

    @classmethod
    def from_blob(cls, d: dict) -> "_Loop":
        d = dict(d)
        d["order"] = None if d["order"] is None else d["order"].numpy()
        d["best"] = -math.inf if d["best"] is None else d["best"]
        d["decay"] = None if d.get("decay") is None else tuple(d["decay"])
        return cls(**d)


def _run_identity(config: TrainConfig, data: DistillData, tr: np.ndarray, va: np.ndarray, model: nn.Module) -> dict:
    """What a checkpoint must share with the run resuming it: settings, split and targets, parameter shapes."""
    h = hashlib.sha256()
    targets = np.asarray(data.targets, dtype=np.float32)
    for a in (tr, va, targets[tr], targets[va]):
        h.update(np.ascontiguousarray(a).tobytes())
    shapes = hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()]).encode())
    return {"config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_ACROSS},
            "data": h.hexdigest(), "model": shapes.hexdigest()}


def _save_checkpoint(path: Path, blob: dict) -> None:
    """Write ``blob`` to ``path`` atomically (a temporary file, then a rename): a kill leaves the old or the new."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_checkpoint(path: Path, identity: dict) -> dict | None:
    """The checkpoint at ``path`` if it exists; MicroserError if it is unreadable or belongs to another run."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise MicroserError(f"training checkpoint {path} cannot be read ({one_line(e)}): delete it to start "
                            "this run over") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise MicroserError(f"{path} is not a microser training checkpoint: delete it or pass another path")
    old = blob["identity"]
    if old != identity:
        diff = [f"{k} {old['config'].get(k)!r} there, {v!r} here" for k, v in identity["config"].items()
                if old["config"].get(k) != v]
        diff += [f"{k} differs" for k in ("data", "model") if old.get(k) != identity[k]]
        raise MicroserError(f"training checkpoint {path} was written by another run ({'; '.join(diff) or 'settings'}"
                            "): pass that run's settings to resume it, or delete the file to start over")
    return blob


def train(
    model: nn.Module,
    data: DistillData,
    config: TrainConfig = TrainConfig(),
    *,
    train_idx=None,
    valid_idx=None,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[dict], None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_seconds: float = 60.0,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """Distil ``model`` in place on ``data.targets``; return the weights it ends with, history and validation CCC.

    Batches: ``config.batch_size`` random crops (one per drawn segment) of
    ``crop_seconds``; a batch whose shortest segment is shorter is cropped to
    that length instead (segments are never padded). One epoch draws every
    training segment ``crops_per_segment`` times in a seeded random order; the
    last incomplete batch of an epoch is dropped unless it is the only one.
    The whole validation split is predicted on whole segments and scored with
    ``ccc_report`` after every epoch, or every ``eval_every`` steps and after
    the last. The model ends holding the returned weights: the last ones, or
    with ``keep_best`` the best validated ones (the EMA's when ``ema_decay``).

    Deterministic: the same initial weights, data, config (seed) and thread
    count give identical weights, resumed from a checkpoint or not. ``train``
    does not re-initialize the model; seed torch before ``build_model`` to
    make initialization reproducible too.

    Args:
        progress: called after every validation with ``{"epoch", "epochs", "step", "steps", "loss", "lr",
            "valid", "seconds", "eval_seconds", "best", "best_step"}`` (the history entry plus totals).
        should_stop: polled before every step; True ends training early (the result says ``stopped``;
            the checkpoint, if any, is saved first, so the same call again continues).
        on_step: called after every optimizer step with ``{"step", "steps", "epoch", "loss", "lr"}``.
        extra_loss: called with the model at every step after the batch's forward; its scalar is added to the
            loss (quantization-aware training anchors the outputs on silence and clipping with it, microser.qat).
        checkpoint: a file for the resumable state; when it exists the run continues from it (MicroserError
            if it belongs to other settings or data). Saved after every validation, every
            ``checkpoint_seconds`` of training, when stopped and at the end.
    """
    t_start = time.perf_counter()
    tr = _indices(data, train_idx, "train", MIN_SPLIT_SEGMENTS)
    va = _indices(data, valid_idx, "valid", MIN_SPLIT_SEGMENTS)
    device = resolve_device(config.device)  # before any work: a missing GPU is a one-line error
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    identity = _run_identity(config, data, tr, va, model) if checkpoint is not None else None
    blob = _load_checkpoint(checkpoint, identity) if checkpoint is not None else None
    targets_all = np.asarray(data.targets, dtype=np.float32)
    old_threads = torch.get_num_threads()
    home = model_device(model)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    hook = None
    try:
        model.to(device)
        bank = _AudioBank(data, tr)
        valid_clips = [np.asarray(data.audio(int(i)), dtype=np.float32) for i in va]  # read once per call
        valid_targets = targets_all[va]
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

        eval_model = copy.deepcopy(model) if config.ema_decay > 0 else model  # before the mask hook: no masks
        ema = _EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        frontend = getattr(model, "frontend", None)
        has_frontend = isinstance(frontend, nn.Module)
        if config.augment and has_frontend and (config.time_masks or config.freq_masks):
            hook = frontend.register_forward_hook(_FrontendMasks(config, gen))
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        hold = config.schedule == "hold"
        run = _Loop(decay=(total - int(round(config.decay * total)), total) if hold else None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, config.warmup, run.decay))
        if blob is not None:
            model.load_state_dict(blob["model"])
            opt.load_state_dict(blob["optimizer"])
            sched.load_state_dict(blob["schedule"])
            if ema is not None:
                ema.load(blob["ema"])
            rng.bit_generator.state = blob["rng"]["numpy"]
            gen.set_state(blob["rng"]["torch_gen"])
            torch.set_rng_state(blob["rng"]["torch"])
            if device.type == "cuda" and blob["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(blob["rng"]["cuda"], device)
            run = _Loop.from_blob(blob["loop"])
        resumed_at = run.step if blob is not None else None
        session_start, earlier = time.perf_counter(), run.elapsed
        last_save = session_start

        def elapsed() -> float:
            return earlier + time.perf_counter() - session_start

        def weights() -> dict:
            """The weights validated and returned: the EMA's when on, else the model's."""
            return ema.state if ema is not None else model.state_dict()

        def save() -> None:
            nonlocal last_save
            if checkpoint is None:
                return
            run.elapsed = elapsed()
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            _save_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "version": 1, "identity": identity, "total": total,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                "ema": ema.state if ema is not None else None,
                "rng": {"numpy": rng.bit_generator.state, "torch_gen": gen.get_state(),
                        "torch": torch.get_rng_state(), "cuda": cuda_rng},
                "loop": run.to_blob()})
            last_save = time.perf_counter()

        def validate() -> tuple[np.ndarray, dict]:
            t0 = time.perf_counter()
            if ema is not None:
                eval_model.load_state_dict(ema.state)
            pred = _predict_clips(eval_model, valid_clips, config.eval_batch_seconds)
            entry = {
                "epoch": run.epoch,
                "step": run.step,
                "loss": float(np.mean(run.losses)),
                "lr": float(sched.get_last_lr()[0]),
                "valid": ccc_report(pred, valid_targets),
                "seconds": elapsed(),
                "eval_seconds": time.perf_counter() - t0,
            }
            run.history.append(entry)
            run.losses = []
            score = entry["valid"]["mean"]
            if score > run.best:
                run.best, run.best_step, run.since_best = score, run.step, 0
                if config.keep_best:
                    run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()}
            else:
                run.since_best += 1
            if progress is not None:
                progress({**entry, "epochs": n_epochs, "steps": total, "best": run.best, "best_step": run.best_step})
            return pred, entry

        mask_time = not has_frontend
        stopped = False
        pred, pred_step = None, -1  # latest validation predictions (this session) and the step they belong to
        model.train()
        while run.step < (run.decay[1] if hold else total) and not run.finished:
            if should_stop is not None and should_stop():
                stopped = True
                break
            if run.order is None or run.batch >= per_epoch:  # a new epoch: a fresh order of the segments
                run.order = rng.permutation(np.repeat(np.arange(len(tr)), config.crops_per_segment))
                run.epoch += 1
                run.batch = 0
            t0 = time.perf_counter()
            pos = run.order[run.batch * config.batch_size : (run.batch + 1) * config.batch_size]
            x, y = _draw_batch(bank, targets, pos, config, rng, gen, mask_time)
            loss = _train_step(model, opt, sched, x.to(device), y.to(device), config.mse_weight, extra_loss)
            if loss is None:
                run.bad_step = run.step + 1
                break
            if ema is not None:
                ema.update(run.step)
            run.step += 1
            run.batch += 1
            run.losses.append(loss)
            run.step_time += time.perf_counter() - t0
            run.crops_seen += len(pos)
            run.audio_seen += len(pos) * x.shape[1]
            if on_step is not None:
                on_step({"step": run.step, "steps": total, "epoch": run.epoch, "loss": loss,
                         "lr": float(sched.get_last_lr()[0])})
            due = (run.step % config.eval_every == 0) if config.eval_every else run.batch >= per_epoch
            if due or run.step == (run.decay[1] if hold else total):
                pred, _ = validate()
                pred_step = run.step
                model.train()
                if config.patience is not None and run.since_best >= config.patience:
                    if hold and run.step < run.decay[0]:  # anneal from here, then stop
                        held = run.step
                        run.decay = (held, min(total, held + max(1, round(config.decay / (1 - config.decay) * held))))
                    elif not hold and run.step < total:
                        run.early_stopped = True
                if hold and run.step >= run.decay[1] and run.step < total:
                    run.early_stopped = True
                save()
            elif checkpoint is not None and time.perf_counter() - last_save >= checkpoint_seconds:
                save()
        if stopped or run.bad_step is not None:
            save()  # the resumable state, before the partial validation below (which a resumed run redoes)
            if run.losses:
                pred, _ = validate()
                pred_step = run.step

        if config.keep_best and run.best_state is not None:
            final = run.best_state
            model.load_state_dict(final)
            if pred is None or pred_step != run.best_step:  # the best was not the latest validation
                pred = _predict_clips(model, valid_clips, config.eval_batch_seconds)
        else:
            final = weights()
            if ema is not None:
                model.load_state_dict(final)
            if pred is None or pred_step != run.step:  # stopped before the first step, or resumed finished
                pred = _predict_clips(model, valid_clips, config.eval_batch_seconds)
    finally:
        if hook is not None:
            hook.remove()
        model.to(home)
        torch.set_num_threads(old_threads)

    if run.bad_step is not None:
        message = (
            f"collapsed: the training loss became non-finite at step {run.bad_step} (training stopped there); "
            "retrain with a lower lr or another seed"
        )
    else:
        message = collapse_check(pred, config.collapse_std)
    return TrainResult(
        state_dict={k: v.detach().to("cpu", copy=True) for k, v in final.items()},
        history=run.history,
        ccc=ccc_report(pred, valid_targets),
        train_seconds=time.perf_counter() - t_start,
        samples_per_second=run.crops_seen / run.step_time if run.step_time > 0 else 0.0,
        audio_seconds_per_second=run.audio_seen / SAMPLE_RATE / run.step_time if run.step_time > 0 else 0.0,
        steps=run.step,
        collapsed=message is not None,
        collapse_message=message,
        stopped=stopped,
        config=config.to_dict(),
        total_steps=total,
        best_step=run.best_step if config.keep_best else None,
        early_stopped=run.early_stopped,
        resumed_at=resumed_at,
        device=str(device),
    )
