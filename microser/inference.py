"""Using a model: CCC of a trial, a compressed trial, a bundle or an ONNX file on a cache split; A/D/V per file.

:func:`evaluate_target` is ``microser evaluate``; :func:`predict_files` is
``microser predict`` (long files segmented like the cache, the outputs the
mean over segments). A bundle is read as ``microser.export`` wrote it: an
unloadable graph or a broken model_card.json is a MicroserError.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from microser import SAMPLE_RATE, TARGETS, checks
from microser.audio import check_audio, read_segment, segment_bounds
from microser.cache import Cache, list_sources
from microser.distill import evaluate
from microser.errors import MicroserError, one_line
from microser.loading import load_compressed, load_trial_model
from microser.onnxio import onnx_ccc, ort_session, run_onnx
from microser.storage import study_settings


def _bundle_paths(path: Path, int8: bool) -> Path:
    if path.is_dir():
        f = path / ("model.int8.onnx" if int8 else "model.onnx")
        if not f.is_file():
            raise MicroserError(f"bundle {path} has no {f.name}: expected a folder written by `microser export`")
        return f
    if path.suffix != ".onnx" or not path.is_file():
        raise MicroserError(f"{path} is neither a bundle folder nor an .onnx file: pass one of those")
    return path


def _graph_session(path: Path):
    """An onnxruntime session for a bundle's graph; MicroserError when the file does not load (truncated, edited)."""
    try:
        return ort_session(str(path))
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise MicroserError(f"{path} does not load in onnxruntime ({one_line(e, 120)}): the file is truncated or not "
                            "an ONNX graph; export the bundle again with `microser export`") from None


def _read_card(folder: Path) -> dict | None:
    """A bundle's model_card.json (None when the folder has none); MicroserError when it is not a JSON object."""
    card = folder / "model_card.json"
    if not card.is_file():
        return None
    try:
        value = json.loads(checks.read_text(card, "model card"))
    except ValueError as e:
        raise MicroserError(f"model card {card} is not valid JSON ({e}): export the bundle again with "
                            "`microser export`") from None
    if not isinstance(value, dict):
        raise MicroserError(f"model card {card} is not a JSON object: export the bundle again with `microser export`")
    return value


def evaluate_target(*, study=None, trial: int | None = None, compressed: bool = False, path=None, cache=None,
                    split: str = "test") -> dict:
    """CCC per target on a cache split for a trial, a compressed trial, a bundle folder or an ONNX file.

    Returns ``{"target", "cache", "split", "segments", "results": {name: ccc_report}}`` with results for
    every graph or model the target holds (``pytorch``; ``fp32``/``int8`` ONNX).
    """
    results: dict[str, dict] = {}
    if path is not None and (study is not None or trial is not None):
        raise MicroserError(f"evaluate got a model path ({path}) and --study/--trial: pass one of them (a bundle or "
                            "ONNX file, or --study with --trial)")
    if path is not None:
        path = Path(path)
        graphs = {"fp32": _bundle_paths(path, False), "int8": _bundle_paths(path, True)} if path.is_dir() \
            else {"onnx": _bundle_paths(path, False)}
        sessions = {name: _graph_session(g) for name, g in graphs.items()}
        if cache is None:
            card = _read_card(path) if path.is_dir() else None
            cache = ((card or {}).get("data") or {}).get("cache")
            if not cache:
                raise MicroserError(f"{path}: pass --cache CACHE_DIR to evaluate an ONNX file (only bundles record "
                                    "their cache)")
        data = Cache.open(cache)
        for name, session in sessions.items():
            results[name] = onnx_ccc(session, data, split)
        target = str(path)
    else:
        if study is None or trial is None:
            raise MicroserError("evaluate needs a bundle/ONNX path or --study with --trial: pass one of them")
        data = Cache.open(cache or study_settings(study)["cache"])
        if compressed:
            model, spec, folder, _ = load_compressed(study, trial)
            results["pytorch"] = evaluate(model, data, split)
            results["fp32"] = onnx_ccc(folder / "model.onnx", data, split)
            results["int8"] = onnx_ccc(folder / "model.int8.onnx", data, split)
            target = f"study {study.study_name} trial {trial} (compressed)"
        else:
            model, spec, which = load_trial_model(study, trial)
            results["pytorch"] = evaluate(model, data, split)
            target = f"study {study.study_name} trial {trial} ({which} weights)"
    return {"target": target, "cache": str(getattr(data, "path", cache)), "split": split,
            "segments": int(len(data.split_indices(split))), "results": results}


def predict_files(model_path, audio, out, *, int8: bool = False, max_seconds: float | None = None,
                  overlap_seconds: float | None = None) -> dict:
    """A/D/V for every audio file, written to ``out`` (CSV: path, arousal, dominance, valence, segments).

    Any rate or channel count (``microser.audio``: mono mix, resampled to 16
    kHz). Files longer than ``max_seconds`` are cut into segments exactly as
    the cache did (``microser.audio.segment_bounds``; defaults from the
    bundle's card, else 8 s with 1 s overlap) and the outputs are the mean
    over segments. A file shorter than the model's minimum input (the card's
    ``min_samples``, 0.25 s) is zero-padded at the end to that length. A file
    that cannot be used (unreadable, empty, NaN, silent) is listed in the
    result's ``skipped`` with its reason and the others go on; when every file
    is skipped, MicroserError.
    """
    out = checks.out_file("--out", out)
    model_path = Path(model_path)
    graph = _bundle_paths(model_path, int8)
    card = _read_card(model_path) if model_path.is_dir() else None
    contract = (card or {}).get("contract") or {}
    if max_seconds is None:
        max_seconds = contract.get("max_samples", 8 * SAMPLE_RATE) / SAMPLE_RATE
    if overlap_seconds is None:
        overlap_seconds = contract.get("segment_overlap_seconds")
        overlap_seconds = 1.0 if overlap_seconds is None else float(overlap_seconds)
    overlap_seconds = min(overlap_seconds, max_seconds / 2)
    min_samples = int(contract.get("min_samples", 0))
    session = _graph_session(graph)
    rows, skipped = [], []
    for source in list_sources(audio, allow_absolute_paths=True)[0]:
        path = source.path
        try:
            info = check_audio(path)
            bounds = segment_bounds(info.n_samples, max_seconds, overlap_seconds)
            outs = []
            for start, end in bounds:
                x = read_segment(info, start, end)
                if len(x) < min_samples:
                    x = np.pad(x, (0, min_samples - len(x)))
                outs.append(run_onnx(session, x[None])[0])
        except MicroserError as e:  # listed with its reason; the other files go on
            skipped.append({"path": str(path), "reason": str(e).removeprefix(f"{path}: ")})
            continue
        mean = np.mean(outs, axis=0)
        rows.append({"path": str(path), **{t: float(v) for t, v in zip(TARGETS, mean)}, "segments": len(bounds)})
    if not rows:
        raise MicroserError(f"none of the {len(skipped)} audio file(s) could be used (first: {skipped[0]['path']}: "
                            f"{skipped[0]['reason']}): fix the audio, then predict again")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", *TARGETS, "segments"])
        writer.writeheader()
        writer.writerows(rows)
    return {"model": str(graph), "out": str(out), "files": len(rows), "int8": int8, "max_seconds": max_seconds,
            "overlap_seconds": overlap_seconds, "rows": rows, "skipped": skipped}
