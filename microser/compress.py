"""Shrink a trained student: fine-tuning, structured channel pruning (Torch-Pruning), then int8.

``compress_trial`` is the stage behind ``microser compress``: it loads a
trial's most trained weights (``microser.loading``), measures every step as a
row of the before/after table (``microser.measure``: post-training int8 of
``microser.quantize``, or quantization-aware training of ``microser.qat``
when post-training int8 loses more than ``INT8_TOLERANCE`` of validation CCC,
or with ``qat=True``), and writes the result beside the study.

Pruning removes whole output channels of the ``body`` conv blocks with
Torch-Pruning's dependency graph (magnitude importance), never touching the
head or the last block's output channels (the head's Gram product couples
them through a matmul that the dependency graph does not trace), and
fine-tunes with ``microser.distill.train`` between steps.
"""



from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import onnx
import torch
import torch_pruning as tp

from microser import SAMPLE_RATE, checks
from microser import qat as qat_module
from microser.cache import Cache
from microser.costs import count_params
from microser.distill import evaluate, train
from microser.errors import MicroserError
from microser.loading import compressed_dir, load_trial_model
from microser.measure import StageRow, measure_stage, qat_stage
from microser.models.spec import FAMILIES, build_model
from microser.models.wav2small import FrameLayerNorm
from microser.onnxio import export_onnx
from microser.pareto import COMPRESSED_PREFIX
from microser.quantize import INT8_TOLERANCE, calibration_crops
from microser.storage import study_settings
from microser.train_config import TrainConfig

# Fine-tuning a trained model: distill's from-scratch peak lr (3e-3) first undoes training. On the demo study's
# best trial (final CCC .749, one seed), 1 epoch at 3e-3 gave .711, at 1e-3 .763; 3 epochs gave .777 with either.
FINETUNE_LR = 1e-3


# ---- structured pruning ----


def _frame_layer_norm_pruner():
    """Torch-Pruning handler for wav2small's FrameLayerNorm: LayerNorm over (C, F), prune axis C (dim 0)."""
    class FrameLayerNormPruner(tp.pruner.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            ln = layer.norm
            keep = sorted(set(range(ln.normalized_shape[0])) - set(int(i) for i in idxs))
            ln.weight = torch.nn.Parameter(ln.weight.data[keep].clone())
            ln.bias = torch.nn.Parameter(ln.bias.data[keep].clone())
            ln.normalized_shape = (len(keep), *ln.normalized_shape[1:])
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return layer.norm.normalized_shape[0]

        get_in_channels = get_out_channels

    return FrameLayerNormPruner()


def _body_convs(model):
    return [m for m in model.body.modules() if isinstance(m, torch.nn.Conv2d)]


def _pruner(model, ratio: float, steps: int):
    """A Torch-Pruning pruner over ``model.body`` (traced on front-end features), head and last conv ignored."""
    with torch.no_grad():
        features = model.frontend(torch.zeros(1, SAMPLE_RATE).uniform_(-0.5, 0.5))
    # The last conv's output channels feed the head: attention 1x1 convs, a Gram matmul and the Linear over
    # C*F + C*C features. The matmul coupling is not traced, so those channels stay.
    return tp.pruner.BasePruner(
        model.body, features, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        iterative_steps=steps, ignored_layers=[_body_convs(model)[-1]],
        customized_pruners={FrameLayerNorm: _frame_layer_norm_pruner()},
    )


def pruned_spec(spec, model):
    """The ArchSpec of a pruned model: the family's per-block channels read from ``model.body``.

    Only a family the registry marks ``prunable`` (``models.spec.FAMILIES``: Wav2Small) describes its body by
    per-block channels; other families raise MicroserError (their pruned module would have to be kept as a
    module, which microser does not store).
    """
    if not FAMILIES[spec.family].prunable:
        raise MicroserError(f"pruning is not available for family {spec.family!r}: its spec cannot describe "
                            "pruned per-layer widths; compress it without --target-params/--prune-ratio "
                            "(int8 quantization only)")
    channels = tuple(block.conv.out_channels for block in model.body)
    return dataclasses.replace(spec, body=dataclasses.replace(spec.body, channels=channels))


def rebuild_pruned(spec, model):
    """``build_model(pruned_spec)`` loaded with ``model``'s weights; checks both give the same outputs."""
    new_spec = pruned_spec(spec, model)
    rebuilt = build_model(new_spec)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    was = model.training
    model.eval()
    x = torch.zeros(2, SAMPLE_RATE).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = float((rebuilt(x) - model(x)).abs().max())
    model.train(was)
    if not diff <= 1e-5:
        raise MicroserError(f"the pruned model rebuilt from its spec ({new_spec.summary()}) differs by {diff:.3g}: "
                            "expected identical outputs; report this spec as a bug")
    return new_spec, rebuilt


def params_of(model) -> int:
    """``params`` cost of a model (``microser.costs.count_params`` of its exported graph)."""
    with tempfile.TemporaryDirectory() as tmp:
        return int(count_params(onnx.load(str(export_onnx(model, Path(tmp) / "m.onnx", check=False)))))


def ratio_for_params(model, target_params: int, *, max_ratio: float = 0.95, tol: float = 0.005) -> float:
    """The smallest uniform pruning ratio that brings ``params`` to ``target_params`` or below (bisection)."""
    def after(ratio: float) -> int:
        trial = copy.deepcopy(model)
        _pruner(trial, ratio, 1).step()
        return params_of(trial)

    now = params_of(model)
    if now <= target_params:
        return 0.0
    # Torch-Pruning skips a layer that a ratio would empty, so params are not monotonic near 1: step down
    # from max_ratio to the largest ratio that prunes at all; below it they fall monotonically with the ratio.
    floor = after(max_ratio)
    while floor >= now and max_ratio > 0.1:
        max_ratio = round(max_ratio - 0.05, 4)
        floor = after(max_ratio)
    if floor > target_params:
        raise MicroserError(f"--target-params {target_params} is below what pruning can reach: {floor} params at "
                            f"a pruning ratio of {max_ratio} (the head, front-end and last block are not pruned); "
                            f"ask for at least {floor}")
    lo, hi = 0.0, max_ratio
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if after(mid) <= target_params:
            hi = mid
        else:
            lo = mid
    return hi


def prune(model, spec, data, *, ratio: float, steps: int, finetune=None, progress=None):
    """Prune ``model.body`` channels to ``ratio`` in ``steps`` iterative steps, fine-tuning after each.

    Args:
        finetune: a ``microser.train_config.TrainConfig`` used after every step (None: no fine-tuning).
        progress: called with a dict after every step.

    Returns:
        ``(pruned spec, rebuilt model, history)``; history rows hold step, channels, params, valid CCC.
    """
    if not 0 < ratio < 1:
        raise MicroserError(f"--prune-ratio {ratio} must be in (0, 1): the fraction of channels removed from "
                            "every body block but the last, e.g. 0.3")
    if steps < 1:
        raise MicroserError(f"--prune-steps {steps}: expected >= 1, e.g. 3")
    pruned_spec(spec, model)  # refuses families that cannot be rewritten, before any work
    pruner = _pruner(model, ratio, steps)
    history = []
    for step in range(1, steps + 1):
        pruner.step()
        if finetune is not None:
            train(model, data, finetune)
        row = {"step": step, "channels": [c.out_channels for c in _body_convs(model)],
               "params": params_of(model), "valid_ccc": evaluate(model, data, "valid")}
        history.append(row)
        if progress:
            progress({"kind": "prune", **row})
    new_spec, rebuilt = rebuild_pruned(spec, model)
    return new_spec, rebuilt, history


# ---- compress a trial ----


@dataclass(frozen=True)
class CompressReport:
    """What ``compress_trial`` did, the before/after table and where the result lies."""

    study: str
    trial: int
    folder: str
    spec: dict
    start_weights: str          # "trained" | "final" | "search"
    cache: str
    stages: list[StageRow]      # "trial", "fine-tuned", "pruned", "qat" (to_dict: report.json rows)
    prune_history: list[dict]
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)



def compress_trial(study, trial: int, *, target_params: int | None = None, prune_ratio: float | None = None,
                   prune_steps: int = 3, epochs: float = 10.0, finetune_epochs: float = 2.0,
                   finetune_steps: int | None = None, qat: bool | None = None, cache=None,
                   keep_float: Iterable[str] | str = "auto", seed: int = 0, calibration_crops_n: int = 64,
                   lr: float = FINETUNE_LR, qat_lr: float | None = None, progress=None) -> CompressReport:
    """Fine-tune, prune and quantize one trial; write ``compressed_dir(study, trial)``; record it on the study.

    Steps: load the trial's most trained weights (`microser train`'s, else the
    final stage's, else the search's; ``start_weights`` says which); measure it ("trial" row); fine-tune ``epochs`` more with
    ``distill.train`` ("fine-tuned" row, skipped when ``epochs`` is 0); if
    ``target_params`` or ``prune_ratio`` is given, prune the body in
    ``prune_steps`` steps with ``finetune_epochs`` (or ``finetune_steps``) of
    fine-tuning after each ("pruned" row). Every row so far is measured with
    post-training int8 (PTQ). Then quantization-aware training ("qat" row,
    ``microser.qat``, as long as one post-pruning fine-tuning run, at
    ``qat_lr``) when ``qat`` is True, or when it is None and the last row's
    PTQ lost more than ``INT8_TOLERANCE`` of validation CCC (Wav2Small
    family only). The last model is saved as ``spec.json`` + ``weights.pt``
    (a state dict, ``torch.load(..., weights_only=True)``), ``model.onnx``,
    ``model.int8.onnx`` and ``report.json``; the study's user attr
    ``compressed:<N>`` points at the folder.

    Args:
        study: an ``optuna.Study`` made by ``microser search``.
        finetune_steps: optimizer steps of every post-pruning fine-tuning run and of QAT; replaces
            ``finetune_epochs`` (give one of them).
        qat: True: always fine-tune quantization-aware; False: never; None: when PTQ loses too much.
        cache: cache folder (default: the study's cache); calibration uses
            its training split, every CCC its validation split.
        lr: peak learning rate of every float fine-tuning run (``FINETUNE_LR``).
        qat_lr: peak learning rate of QAT (default ``microser.qat.QAT_LR``).
    """
    if target_params is not None and prune_ratio is not None:
        raise MicroserError(f"got --target-params {target_params} and --prune-ratio {prune_ratio}: give one of them")
    _check_compress_values(target_params=target_params, prune_ratio=prune_ratio, prune_steps=prune_steps,
                           epochs=epochs, finetune_epochs=finetune_epochs, finetune_steps=finetune_steps, seed=seed,
                           lr=lr)
    settings = study_settings(study)
    cache_path = str(cache or settings["cache"])
    data = Cache.open(cache_path)
    input_seconds = float(settings.get("input_seconds", 1.0))
    model, spec, which = load_trial_model(study, trial)
    if qat:
        qat_module.check_qat(spec)  # refused before any work
    folder = compressed_dir(study, trial)
    crops = calibration_crops(data, seconds=input_seconds, max_crops=calibration_crops_n, seed=seed)
    fidelity = settings.get("fidelity") or {}
    base = dict(crop_seconds=fidelity.get("crop_seconds") or TrainConfig.crop_seconds,   # the study's recipe,
                batch_size=fidelity.get("batch_size") or TrainConfig.batch_size, seed=seed, lr=lr)  # else the default
    emit = progress or (lambda event: None)
    stages, history = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        emit({"kind": "stage", "stage": "trial"})
        stages.append(measure_stage("trial", model, data, tmp / "trial", crops=crops, input_seconds=input_seconds,
                                    keep_float=keep_float))
        last = tmp / "trial"
        if epochs and epochs > 0:
            emit({"kind": "stage", "stage": "fine-tune", "epochs": epochs})
            train(model, data, TrainConfig(epochs=epochs, **base))
            stages.append(measure_stage("fine-tuned", model, data, tmp / "tuned", crops=crops,
                                        input_seconds=input_seconds, keep_float=keep_float))
            last = tmp / "tuned"
        if target_params is not None or prune_ratio is not None:
            ratio = prune_ratio if prune_ratio is not None else ratio_for_params(model, int(target_params))
            emit({"kind": "stage", "stage": "prune", "ratio": ratio})
            if ratio > 0:
                finetune = (TrainConfig(steps=finetune_steps, **base) if finetune_steps is not None
                            else TrainConfig(epochs=finetune_epochs, **base) if finetune_epochs > 0 else None)
                spec, model, history = prune(model, spec, data, ratio=ratio, steps=prune_steps, finetune=finetune,
                                             progress=emit)
                stages.append(measure_stage("pruned", model, data, tmp / "pruned", crops=crops,
                                            input_seconds=input_seconds, keep_float=keep_float))
                last = tmp / "pruned"
        ptq_drop = stages[-1].int8_drop
        if qat is None:
            run_qat = ptq_drop > INT8_TOLERANCE and FAMILIES[spec.family].qat
            why = (f"auto: post-training int8 lost {ptq_drop:.4f} of validation CCC "
                   f"{'>' if ptq_drop > INT8_TOLERANCE else '<='} {INT8_TOLERANCE}"
                   + ("" if FAMILIES[spec.family].qat else f"; family {spec.family} has no QAT"))
        else:
            run_qat, why = bool(qat), "--qat" if qat else "--no-qat"
        if run_qat:
            length = (dict(steps=finetune_steps) if finetune_steps is not None
                      else dict(epochs=finetune_epochs if finetune_epochs > 0 else 2.0))
            config = TrainConfig(**length, **{**base, "lr": qat_lr or qat_module.QAT_LR})
            emit({"kind": "stage", "stage": "qat", **length})
            row, model = qat_stage("qat", model, spec, data, tmp / "qat", crops=crops, input_seconds=input_seconds,
                                   config=config)
            stages.append(row)
            last = tmp / "qat"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "model.int8.onnx"):
            shutil.copyfile(last / name, folder / name)
    (folder / "spec.json").write_text(spec.to_json() + "\n")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "weights.pt")
    report = CompressReport(
        study=study.study_name, trial=int(trial), folder=str(folder), spec=spec.to_dict(), start_weights=which,
        cache=cache_path, stages=stages, prune_history=history,
        settings={"target_params": target_params, "prune_ratio": prune_ratio, "prune_steps": prune_steps,
                  "epochs": epochs,
                  "finetune_epochs": finetune_epochs, "finetune_steps": finetune_steps, "seed": seed,
                  "keep_float": keep_float, "calibration_crops": len(crops), "input_seconds": input_seconds,
                  "qat": run_qat, "qat_reason": why, "int8_tolerance": INT8_TOLERANCE, **base},
    )
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    final = stages[-1]
    study.set_user_attr(f"{COMPRESSED_PREFIX}{int(trial)}", {
        "folder": str(folder), "summary": spec.summary(), "params": final.params,
        "int8_bytes": final.int8_bytes, "ccc_int8_onnx": final.ccc_int8_onnx, "method": final.method})
    return report


def _check_compress_values(*, target_params, prune_ratio, prune_steps, epochs, finetune_epochs, finetune_steps, seed,
                           lr) -> None:
    """`compress_trial`'s numbers, refused in one line before the study is read or anything trained."""
    if prune_ratio is not None:
        checks.number("--prune-ratio", prune_ratio, example=0.3)
        if not 0 < prune_ratio < 1:  # the rule prune() applies, said before fine-tuning rather than after
            raise MicroserError(f"--prune-ratio {prune_ratio:g} must be in (0, 1): the fraction of channels removed "
                                "from every body block but the last, e.g. --prune-ratio 0.3")
    if target_params is not None:
        checks.number("--target-params", target_params, low=1, integer=True, example=20000)
    checks.number("--prune-steps", prune_steps, low=1, integer=True, example=3)
    checks.number("--epochs", epochs, low=0, example=10)
    checks.number("--finetune-epochs", finetune_epochs, low=0, example=2)
    if finetune_steps is not None:
        checks.number("--finetune-steps", finetune_steps, low=1, integer=True, example=500)
    checks.seed("--seed", seed)
    checks.number("--lr", lr, low=0, low_open=True, example=FINETUNE_LR)
