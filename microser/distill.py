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

The settings and the result are ``microser.train_config``'s, the batches and
their augmentation ``microser.batches``', the resumable state
``microser.checkpoint``'s; the loop itself is here.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from microser import SAMPLE_RATE, TARGETS
from microser.batches import AudioBank, FrontendMasks, draw_batch
from microser.checkpoint import CHECKPOINT_FORMAT, EMA, LoopState, load_checkpoint, run_identity, save_checkpoint
from microser.errors import MicroserError
from microser.metrics import ccc_report, ccc_terms
from microser.train_config import DEFAULT_EPOCHS, MIN_SPLIT_SEGMENTS, DistillData, TrainConfig, TrainResult

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
    num, den = ccc_terms(pred, target)
    loss = 1 - num / (den + 1e-8)
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


def _train_step(model: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, mse_weight: float,
                extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                grad_clip: float = 0.0) -> float | None:
    """One optimizer step on a batch; the loss, or None (and no update) when it is not finite. With
    ``grad_clip``, the gradient's global L2 norm is scaled down to at most that before the step."""
    out = model(x)  # (B, 3)
    loss = ccc_loss(out, y) + mse_weight * torch.mean((out - y) ** 2)
    if extra_loss is not None:
        loss = loss + extra_loss(model)
    if not torch.isfinite(loss):
        return None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return float(loss.detach())


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
    identity = run_identity(config, data, tr, va, model) if checkpoint is not None else None
    blob = load_checkpoint(checkpoint, identity) if checkpoint is not None else None
    targets_all = np.asarray(data.targets, dtype=np.float32)
    old_threads = torch.get_num_threads()
    home = model_device(model)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    hook = None
    try:
        model.to(device)
        bank = AudioBank(data, tr)
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
        ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        frontend = getattr(model, "frontend", None)
        has_frontend = isinstance(frontend, nn.Module)
        if config.augment and has_frontend and (config.time_masks or config.freq_masks):
            hook = frontend.register_forward_hook(FrontendMasks(config, gen))
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        hold = config.schedule == "hold"
        run = LoopState(decay=(total - int(round(config.decay * total)), total) if hold else None)
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
            run = LoopState.from_blob(blob["loop"])
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
            save_checkpoint(checkpoint, {
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
            x, y = draw_batch(bank, targets, pos, config, rng, gen, mask_time)
            loss = _train_step(model, opt, sched, x.to(device), y.to(device), config.mse_weight, extra_loss,
                               config.grad_clip)
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
