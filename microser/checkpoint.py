"""A training run's resumable state: the weights' moving average, the loop position, the checkpoint file.

``microser.distill.train(..., checkpoint=PATH)`` saves one ``torch.save`` dict
(``format``, ``identity``, ``model``, ``optimizer``, ``schedule``, ``ema``,
``rng``, ``loop``) atomically and loads it with ``weights_only=True``; a file
written by another run (settings, split, parameter shapes) is refused in one line.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from microser.errors import MicroserError, one_line
from microser.train_config import DistillData, TrainConfig

CHECKPOINT_FORMAT = "microser-train-checkpoint"
# Settings that may differ between a checkpoint and the run resuming it: they change speed, not the result
# (on another thread count or device the floating-point sums may round differently; the run stays valid).
RESUMABLE_ACROSS = ("threads", "device")


class EMA:
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
class LoopState:
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
    def from_blob(cls, d: dict) -> "LoopState":
        d = dict(d)
        d["order"] = None if d["order"] is None else d["order"].numpy()
        d["best"] = -math.inf if d["best"] is None else d["best"]
        d["decay"] = None if d.get("decay") is None else tuple(d["decay"])
        return cls(**d)


def run_identity(config: TrainConfig, data: DistillData, tr: np.ndarray, va: np.ndarray, model: nn.Module) -> dict:
    """What a checkpoint must share with the run resuming it: settings, split and targets, parameter shapes."""
    h = hashlib.sha256()
    targets = np.asarray(data.targets, dtype=np.float32)
    for a in (tr, va, targets[tr], targets[va]):
        h.update(np.ascontiguousarray(a).tobytes())
    shapes = hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()]).encode())
    return {"config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_ACROSS},
            "data": h.hexdigest(), "model": shapes.hexdigest()}


def save_checkpoint(path: Path, blob: dict) -> None:
    """Write ``blob`` to ``path`` atomically (a temporary file, then a rename): a kill leaves the old or the new."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, identity: dict) -> dict | None:
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
