"""Training batches: random crops of the training segments read on demand, and their augmentation.

A batch's random draws come in a fixed order (speed factors, crop starts,
mixing: numpy; gain, noise, masks: torch), so a run is a function of its
seed. ``FrontendMasks`` is the SpecAugment-like hook on a model's front-end.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from microser import SAMPLE_RATE
from microser.train_config import DistillData, TrainConfig, segment_lengths


class AudioBank:
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


def span_mask(n: int, size: int, masks: int, fraction: float, gen: torch.Generator) -> torch.Tensor | None:
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


class FrontendMasks:
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
        tmask = span_mask(b, t, c.time_masks, c.time_mask_fraction, self.gen)  # (B, T)
        fmask = span_mask(b, f, c.freq_masks, c.freq_mask_fraction, self.gen)  # (B, F)
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


def augment_wave(x: torch.Tensor, config: TrainConfig, gen: torch.Generator, mask_time: bool) -> torch.Tensor:
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
        m = span_mask(b, t, config.time_masks, config.time_mask_fraction, gen)
        if m is not None:
            x = x.masked_fill(m, 0.0)
    return x


def draw_batch(bank: AudioBank, targets: torch.Tensor, pos: np.ndarray, config: TrainConfig,
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
        x = torch.stack([resample(bank.crop(int(p), int(s), int(n)), length)
                         for p, s, n in zip(pos, starts, sources)])  # (B, T)
    else:
        starts = rng.integers(0, lengths - length + 1)
        x = bank.crops(pos, starts, length)  # (B, T)
    y = targets[pos]  # (B, 3)
    if augment and config.mixup_prob > 0:
        x, y = mix(x, y, config, rng)
    if augment:
        x = augment_wave(x, config, gen, mask_time=mask_time)
    return x, y


def resample(x: np.ndarray, length: int) -> torch.Tensor:
    """Linear-interpolation resampling of a 1-D crop to ``length`` samples (a speed change: tempo and pitch)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if len(t) == length:
        return t
    return torch.nn.functional.interpolate(t[None, None], size=length, mode="linear", align_corners=False)[0, 0]


def mix(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, rng: np.random.Generator):
    """Mixup within the batch: crop b becomes ``w x_b + (1 - w) x_partner`` (targets alike) with chance mixup_prob."""
    b = x.shape[0]
    on = rng.random(b) < config.mixup_prob
    partner = rng.permutation(b)
    w = rng.beta(config.mixup_alpha, config.mixup_alpha, b)
    w = np.where(on, np.maximum(w, 1 - w), 1.0).astype(np.float32)
    wt = torch.from_numpy(w)[:, None]  # (B, 1)
    return wt * x + (1 - wt) * x[partner], wt * y + (1 - wt) * y[partner]
