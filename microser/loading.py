"""A trial's model, loaded: its most trained weights (trained > final > search), or its compressed result.

``compress``, ``export``, ``evaluate`` and ``train`` start from here, so they
agree on which weights a trial number means.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from microser.errors import MicroserError
from microser.models.spec import ArchSpec, build_model
from microser.pareto import COMPRESSED_PREFIX
from microser.rungs import load_trial_weights, trained_record, trial_of, weights_stage
from microser.storage import study_settings

def compressed_dir(study, trial: int) -> Path:
    """``<study artifacts>/compressed/trial-<N>``: where ``compress_trial`` writes."""
    return Path(study_settings(study)["artifacts"]) / "compressed" / f"trial-{int(trial)}"


def _trial_spec(study, trial: int):
    t = trial_of(study, trial)
    if not t.user_attrs.get("spec"):
        raise MicroserError(f"trial {t.number} of study {study.study_name!r} has no spec ({t.state.name}): pick a "
                            f"trained trial from `microser trials --study {study.study_name}`")
    return t, ArchSpec.from_json(t.user_attrs["spec"])


def load_trial_model(study, trial: int, *, stage: str = "trained"):
    """``(model, spec, which weights)`` for a trial: the first stage it has of trained > final > search.

    ``stage`` is where to start (``microser.rungs.weights_stage``); ``which`` names the stage loaded.
    Trained weights come with their own spec (a compressed trial's pruned architecture may be trained).
    """
    t, spec = _trial_spec(study, trial)
    which = weights_stage(study, t, stage) or "search"   # no weights at all: load_trial_weights says so
    if which == "trained" and trained_record(study, t).get("spec"):
        spec = ArchSpec.from_json(trained_record(study, t)["spec"])
    model = build_model(spec)
    model.load_state_dict(load_trial_weights(study, t, stage=which))
    return model.eval(), spec, which


def load_compressed(study, trial: int):
    """``(model, spec, folder, report dict)`` of a compressed trial; MicroserError naming what is missing."""
    record = study.user_attrs.get(f"{COMPRESSED_PREFIX}{int(trial)}")
    if not record:
        raise MicroserError(f"trial {trial} of study {study.study_name!r} has not been compressed: run "
                            f"`microser compress --study {study.study_name} --trial {trial}` first")
    folder = Path(record["folder"])
    for name in ("spec.json", "weights.pt", "model.onnx", "model.int8.onnx", "report.json"):
        if not (folder / name).is_file():
            raise MicroserError(f"compressed trial {trial} (study {study.study_name!r}) is missing {folder / name}: "
                                f"it was deleted or moved; rerun `microser compress --study {study.study_name} "
                                f"--trial {trial}`")
    spec = ArchSpec.from_json((folder / "spec.json").read_text())
    model = build_model(spec)
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec, folder, json.loads((folder / "report.json").read_text())
