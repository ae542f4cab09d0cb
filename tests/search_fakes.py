"""Fake search components whose costs and CCC are known in closed form (shared by the search and rung tests).

A candidate is a width 1..64: params = 1000 * width, RAM = 100 * width; CCC =
0.01 * width + steps / 100,000 (higher rungs score a little higher, as longer
training does). The fake data has 6 known speakers: 4 train, 1 valid, 1 test.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from microser import TARGETS
from microser.components import Components, TrainOutcome
from microser.fidelity import CALIBRATION_STEP_SECONDS
from microser.search_config import SearchConfig


@dataclass(frozen=True)
class FakeSpec:
    width: int
    family: str = "fake"

    def summary(self) -> str:
        return f"fake w{self.width}"

    def to_json(self) -> str:
        return json.dumps({"width": self.width})


class FakeSpace:
    def suggest(self, trial):
        return FakeSpec(trial.suggest_int("width", 1, 64))


def fake_measure(spec, input_seconds):
    w = spec.width
    return {"params": 1000 * w, "trainable_params": 1000 * w, "macs": 10_000 * w * input_seconds,
            "onnx_bytes": 4000 * w, "ram_bytes": 100 * w, "ram_bytes_fp32": 400 * w, "input_seconds": input_seconds}


def fake_ccc(width: int, steps: int) -> float:
    return 0.01 * width + steps / 100_000


class FakeClock:
    """A clock that moves only when a fake trainer says its run took time: wall-clock logic, tested exactly."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """Records every (width, steps, seed, fold, has_test) it trains; optionally sleeps and logs to a file.

    With a ``clock`` (:class:`FakeClock`), each run advances it by ``overhead + step_seconds * steps`` and
    reports that as its training time, instead of sleeping.
    """

    def __init__(self, sleep: float = 0.0, log: str | None = None, test_offset=None, step_sleep: float = 0.0,
                 clock: FakeClock | None = None, step_seconds: float = 0.0, overhead: float = 0.0,
                 valid_offset=None):
        self.calls = []
        self.sleep, self.log, self.step_sleep = sleep, log, step_sleep
        self.clock, self.step_seconds, self.overhead = clock, step_seconds, overhead
        self.test_offset = test_offset or (lambda width, fold: 0.0)
        self.valid_offset = valid_offset or (lambda width, fold: 0.0)   # added to validation CCC per fold

    def __call__(self, spec, data, train_config, *, split, progress=None, should_stop=None):
        start = time.monotonic()
        call = (spec.width, train_config.steps, train_config.seed, split.fold, split.test is not None)
        self.calls.append(call)
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "call": call, "t": time.time()}) + "\n")
        if self.sleep or self.step_sleep:
            time.sleep(self.sleep + self.step_sleep * train_config.steps)
        took = None
        if self.clock is not None:
            self.clock.now += self.overhead + self.step_seconds * train_config.steps
            took = self.step_seconds * train_config.steps
        base = fake_ccc(spec.width, train_config.steps)
        ccc = base + self.valid_offset(spec.width, split.fold)
        report = {"arousal": ccc, "dominance": ccc, "valence": ccc, "mean": ccc}
        test = parts = None
        if split.test is not None:
            t = base + self.test_offset(spec.width, split.fold)
            test = {"arousal": t, "dominance": t, "valence": t, "mean": t}
            # r 0.9 on every target; arousal offset -0.6 on fold 0, -0.5 on fold 1; spread 0.8
            parts = {"r": dict.fromkeys(TARGETS, 0.9), "bias": {**dict.fromkeys(TARGETS, 0.1),
                                                                "arousal": -0.6 + 0.1 * split.fold},
                     "scale": dict.fromkeys(TARGETS, 0.8)}
        return TrainOutcome(state_dict={"w": torch.full((2,), float(spec.width))}, ccc=report,
                            train_seconds=took if took is not None else time.monotonic() - start,
                            samples_per_second=100.0,
                            steps=train_config.steps, test_ccc=test, test_parts=parts)


class FakeData:
    """12 one-second segments of 6 speakers: s0..s3 train (2 each), s4 valid, s5 test."""

    fingerprint = "fake-data-1"
    path = "<fake>"
    _split = {"train": np.arange(8), "valid": np.array([8, 9]), "test": np.array([10, 11])}
    _speakers = ["s0", "s0", "s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4", "s5", "s5"]

    def split_indices(self, split):
        return self._split[split]

    def lengths(self, indices):
        return np.full(len(indices), 16000)

    def speakers_of(self, indices):
        return [self._speakers[int(i)] for i in indices]


def fake_components(trainer, step_seconds: float = CALIBRATION_STEP_SECONDS) -> Components:
    """Fake components on a machine whose speed probe times ``step_seconds`` per step (default: the calibration's)."""
    return Components(trainer=trainer, measure=fake_measure, space=FakeSpace(), data=FakeData(),
                      resolve_reference=lambda name: FakeSpec(10), load_spec=lambda s: FakeSpec(json.loads(s)["width"]),
                      step_seconds=lambda data, train_config: step_seconds)


def fake_config(tmp_path, **kw) -> SearchConfig:
    base = dict(study="s", storage=f"sqlite:///{tmp_path}/s.db", budgets=("20k-params",), trials=9, time=None,
                rungs=(10, 30, 90), final_steps=200, final_k=2, final_seeds=2, threads=1, seed=3, sampler="random",
                space=str(Path(tmp_path) / "space.toml"))
    base.update(kw)
    return SearchConfig(**base)


def run_fake_search(tmp_path: str, overrides: dict, log: str, sleep: float) -> None:
    """A worker process: the fake search on the shared storage (what `microser search` runs on each host)."""
    from microser.search import run_search

    trainer = FakeTrainer(sleep=sleep, log=log)
    run_search(fake_config(tmp_path, **overrides), components=fake_components(trainer))
