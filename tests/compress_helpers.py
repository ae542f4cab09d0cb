"""Test helpers for pareto/compress/export: a tiny learnable corpus, its cache, and a study with trained trials.

The corpus: harmonic tones whose pitch, amplitude-modulation rate and
brightness set arousal, dominance and valence, so a 3-block Wav2Small learns a
visible CCC in a few seconds. The study mirrors what ``microser search`` stores
(docs/ARCHITECTURE.md, "Trials"): spec, costs, ccc, weights as an Optuna
artifact, the search settings as a study user attr.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

INPUT_SECONDS = 0.5


def tiny_spec(channels=(8, 8, 6), norm: str = "batch", n_mels: int = 12):
    """A 3-block Wav2Small on a 128/64 STFT with 12 mels: about 2k parameters."""
    from microser.frontends import FrontendSpec
    from microser.models.spec import ArchSpec
    from microser.models.wav2small import Wav2SmallBody

    return ArchSpec("wav2small", FrontendSpec(prenorm="clip", n_fft=128, hop=64, n_mels=n_mels),
                    Wav2SmallBody(channels=tuple(channels), kernel=3, norm=norm, pool_after=(0,),
                                  pooling="attention+gram"))


def write_corpus(folder: Path, *, n_speakers: int = 8, per_speaker: int = 6, seed: int = 0) -> Path:
    """Clips of 0.5-0.8 s and a labels.csv (path, speaker, split, arousal, dominance, valence)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    splits = ["train"] * (n_speakers - 4) + ["valid"] * 2 + ["test"] * 2
    for s in range(n_speakers):
        for k in range(per_speaker):
            a, d, v = rng.random(3)
            sr = 16000
            n = int(sr * rng.uniform(0.5, 0.8))
            t = np.arange(n) / sr
            f0 = 120 + 500 * a
            am = 2 + 10 * d
            x = sum((1.0 - 0.8 * v) ** (h - 1) * np.sin(2 * np.pi * h * f0 * t) for h in range(1, 6))
            x = x * (0.55 + 0.45 * np.sin(2 * np.pi * am * t)) * 0.15 + 0.003 * rng.standard_normal(n)
            name = f"s{s}_{k}.wav"
            sf.write(folder / name, x.astype(np.float32), sr, subtype="PCM_16")
            rows.append({"path": name, "speaker": f"spk{s}", "split": splits[s],
                         "arousal": round(a, 4), "dominance": round(d, 4), "valence": round(v, 4)})
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "labels.csv"


def build_tiny_cache(folder: Path) -> Path:
    from microser.cache_build import build_cache

    labels = write_corpus(folder / "corpus")
    build_cache(labels, [f"csv:{labels}"], folder / "cache")
    return folder / "cache"


def make_study(folder: Path, cache: Path, *, epochs: float = 6.0, budgets=("200k-params",),
               specs=None, reference=None):
    """A sqlite study with one trained trial per spec (and optionally a reference trial)."""
    import optuna

    from microser.budgets import parse_budgets, violations
    from microser.cache import Cache
    from microser.costs import measure_costs
    from microser.distill import train
    from microser.models.spec import build_model
    from microser.storage import SETTINGS_ATTR, artifact_store, open_storage, save_weights
    from microser.train_config import TrainConfig

    url = f"sqlite:///{folder}/s.db"
    study = optuna.create_study(study_name="s", storage=open_storage(url, "s"),
                                directions=["maximize", "minimize", "minimize"])
    budget_objs = parse_budgets(budgets)
    study.set_user_attr(SETTINGS_ATTR, {
        "objectives": ["params", "ram_bytes"], "budgets": [b.to_dict() for b in budget_objs],
        "input_seconds": INPUT_SECONDS, "cache": str(cache), "artifacts": str(folder / "artifacts"),
        "fidelity": {"crop_seconds": 0.5, "batch_size": 8},
    })
    store = artifact_store(folder / "artifacts")
    data = Cache.open(cache)
    specs = list(specs) if specs is not None else [tiny_spec()]
    for k, spec in enumerate([*specs, *([reference] if reference else [])]):
        torch.manual_seed(k)
        model = build_model(spec)
        result = train(model, data, TrainConfig(epochs=epochs, crop_seconds=0.5, batch_size=8, lr=1e-2, seed=k,
                                                augment=False))
        costs = {**measure_costs(spec, input_seconds=INPUT_SECONDS).to_dict()}
        trial = study.ask()
        trial.set_user_attr("spec", spec.to_json())
        trial.set_user_attr("family", spec.family)
        trial.set_user_attr("summary", spec.summary())
        trial.set_user_attr("costs", costs)
        trial.set_user_attr("ccc", result.ccc)
        trial.set_user_attr("train_seconds", result.train_seconds)
        if reference and k == len(specs):
            trial.set_user_attr("reference", "tiny-ref")
        trial.set_user_attr("weights", save_weights(result.state_dict, store=store, study_or_trial=trial,
                                                    name=f"trial-{trial.number}"))
        for key, value in violations(budget_objs, costs).items():
            trial.set_constraint(key, value)
        study.tell(trial, [result.ccc["mean"], costs["params"], costs["ram_bytes"]])
    return study, url
