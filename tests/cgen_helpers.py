"""Helpers shared by the C export tests: spec variants, random models whose outputs depend on the input, test audio."""

from __future__ import annotations

import numpy as np
import torch

from microser.cgen.bundle import check_signal
from microser.models.spec import REFERENCES, ArchSpec, build_model


def spec_from(base: str = "wav2small-ref", **changes) -> ArchSpec:
    d = REFERENCES[base].to_dict()
    for key, value in changes.items():
        part, name = key.split("__")
        d[part][name] = value
    return ArchSpec.from_dict(d)


def sensitive_model(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    """A random model whose outputs depend clearly on the input: BatchNorm statistics taken from audio (as
    training would set them), LayerNorm/conv weights random, head scaled so outputs spread by ~0.1."""
    torch.manual_seed(seed)
    model = build_model(spec)
    if isinstance(model.frontend.fb, torch.nn.Parameter):
        with torch.no_grad():
            model.frontend.fb.mul_(torch.empty_like(model.frontend.fb).uniform_(0.5, 1.5))
    audio = torch.from_numpy(np.stack([signal(k, 0.6) for k in range(6)]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batch below
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(audio)
    model.eval()
    with torch.no_grad():
        out = model(audio)
        spread = out.std(0).clamp(min=1e-6)
        model.head.fc.weight.mul_((0.1 / spread)[:, None])
        model.head.fc.bias.sub_(model(audio).mean(0) - 0.5)
    return model


def signal(kind: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Generated test audio: noise at several levels, a chirp, a tone burst with silence."""
    rng = np.random.default_rng(seed + 100 * kind)
    n = int(seconds * 16000)
    t = np.arange(n) / 16000
    if kind % 3 == 0:
        x = rng.standard_normal(n) * (0.02 + 0.1 * kind)
    elif kind % 3 == 1:
        x = check_signal(seconds, seed=kind)[:n]
    else:
        x = 0.4 * np.sin(2 * np.pi * (200 + 40 * kind) * t) * (t > 0.2 * seconds) + 0.003 * rng.standard_normal(n)
    return x.astype(np.float32)
