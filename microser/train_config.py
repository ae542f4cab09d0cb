"""What one training run reads and is told, and what it returns: the data protocol, TrainConfig, TrainResult.

``microser.distill.train`` runs the recipe; the search, ``microser train``,
``compress`` and QAT build a ``TrainConfig`` and read a ``TrainResult``.
No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

from microser.errors import MicroserError

DEFAULT_EPOCHS = 3
MIN_SPLIT_SEGMENTS = 2  # train and valid need at least this many segments (a batch CCC needs two items)
DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" names one GPU
SCHEDULES = ("cosine", "hold")


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


def segment_lengths(data: DistillData, indices) -> np.ndarray:
    """Samples in each of the segments ``indices``: ``data.lengths(indices)`` when it exists, else read."""
    indices = np.asarray(indices, dtype=np.int64)
    lengths = getattr(data, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths(indices), dtype=np.int64)
    return np.array([len(data.audio(int(i))) for i in indices], dtype=np.int64)


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
    grad_clip: float = 0.0  # scale the gradient's global L2 norm down to at most this before a step (0: off)
    warmup: float = 0.1  # fraction of all steps with a linear warm-up from lr/100; then the schedule
    # After the warm-up: "cosine" decays to 0 over exactly the run's steps. "hold" keeps the peak lr until
    # validation stops improving (`patience`) or the last `decay` fraction of the steps begins, then decays it
    # (cosine to 0) over decay / (1 - decay) x the steps held, validating on, and stops there: early stopping
    # that still anneals (long training; a cosine laid out for many steps stops at a high lr).
    schedule: str = "cosine"
    decay: float = 0.2
    # 1 - CCC alone collapsed one run in four to a constant output (docs/DECISIONS.md); the MSE term
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
        if not self.grad_clip >= 0:
            raise MicroserError(f"TrainConfig grad_clip={self.grad_clip}: expected a gradient norm > 0, e.g. 1.0, "
                                "or 0 (off)")
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
