"""ArchSpec: the frozen, JSON-serialisable description of a student; `build_model` turns it into a model.

One spec, one builder (timm style): ``ArchSpec(family, frontend, body)`` where
``body`` is the family's own frozen dataclass (`Wav2SmallBody`,
`MobileNetBody`). The JSON form is exactly ``to_dict()``::

    {"family": "wav2small",
     "frontend": {"prenorm": "clip", "n_fft": 64, ...},   # every FrontendSpec field
     "body": {"channels": [13, 13, ...], ...}}            # every field of the family's body

Every model maps audio (B, T) float32 at 16 kHz, any ``T >= MIN_SECONDS``
(0.25 s), to (B, 3) = (arousal, dominance, valence) through three top-level
submodules: ``frontend`` -> ``body`` -> ``head``. Post-training int8 quantizes
the front-end output and ``body``, keeps ``head`` (pooling + Linear) in float;
quantization-aware int8 (``microser.qat``, Wav2Small family) quantizes every
operator after the front-end's output; the exported ONNX node names start with
``/frontend/``, ``/body/``, ``/head/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from microser import MIN_SECONDS
from microser.errors import MicroserError
from microser.frontends import Frontend, FrontendSpec
from microser.models import mobilenet, wav2small
from microser.models.mobilenet import MobileNetBody
from microser.models.wav2small import Wav2SmallBody

@dataclass(frozen=True)
class Family:
    """A model family: its body dataclass, its builder, and what the rest of microser can do with it."""

    body: type                   # the body dataclass (a spec's ``body``)
    build: Callable              # build(body, frontend) -> (body module, head module)
    per_block: tuple[str, ...]   # body fields with one value per block (a space draws them per block)
    prunable: bool               # channel pruning can be written back into a spec (``compress``)
    qat: bool                    # the model has quantization points (quantization-aware training)
    c_export: bool               # ``microser.cgen`` generates its C library (and so its streaming RAM, instr)


FAMILIES = {
    "wav2small": Family(Wav2SmallBody, wav2small.build, per_block=("channels", "pool_after"), prunable=True,
                        qat=True, c_export=True),
    "mobilenet": Family(MobileNetBody, mobilenet.build, per_block=(), prunable=False, qat=False, c_export=False),
}


def families_that(ability: str) -> str:
    """The names of the families with ``ability`` (a ``Family`` flag), for messages: e.g. ``"wav2small"``."""
    return ", ".join(name for name, f in FAMILIES.items() if getattr(f, ability))


@dataclass(frozen=True)
class ArchSpec:
    """A student architecture: family, front-end and the family's body fields. No torch inside."""

    family: str
    frontend: FrontendSpec
    body: Wav2SmallBody | MobileNetBody

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise MicroserError(f"spec key 'family': {self.family!r} is unknown, expected one of "
                                f"{', '.join(FAMILIES)}")
        if not isinstance(self.frontend, FrontendSpec):
            raise MicroserError(f"spec key 'frontend': expected a FrontendSpec, got {type(self.frontend).__name__}")
        body_cls = FAMILIES[self.family].body
        if not isinstance(self.body, body_cls):
            raise MicroserError(f"spec key 'body': family {self.family!r} needs a {body_cls.__name__}, "
                                f"got {type(self.body).__name__}")

    def summary(self) -> str:
        """One line, e.g. ``w2s 13x7 k3 bn pool@2 att+gram | stft64/32 m26 log clip``."""
        return f"{self.body.summary()} | {self.frontend.summary()}"

    def to_dict(self) -> dict:
        return {"family": self.family, "frontend": self.frontend.to_dict(), "body": self.body.to_dict()}

    @classmethod
    def from_dict(cls, data) -> "ArchSpec":
        """Inverse of `to_dict`; unknown, missing or invalid keys raise MicroserError naming the key."""
        if not isinstance(data, dict):
            raise MicroserError(f"spec: expected a JSON object with family, frontend, body; got {type(data).__name__}")
        unknown = sorted(set(data) - {"family", "frontend", "body"})
        if unknown:
            raise MicroserError(f"spec key '{unknown[0]}' is unknown: allowed keys are family, frontend, body")
        for key in ("family", "frontend", "body"):
            if key not in data:
                raise MicroserError(f"spec key '{key}' is missing: a spec needs family, frontend and body")
        family = data["family"]
        if family not in FAMILIES:
            raise MicroserError(f"spec key 'family': {family!r} is unknown, expected one of {', '.join(FAMILIES)}")
        return cls(family, FrontendSpec.from_dict(data["frontend"]), FAMILIES[family].body.from_dict(data["body"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MicroserError(f"spec JSON is not valid JSON ({e.msg} at char {e.pos}); "
                                "pass a reference name, a JSON object or a .json file") from None
        return cls.from_dict(data)


# The log-mel front-end of the MobileNet references: 25 ms Hann windows every 10 ms in a 512-point FFT, 64 mels.
_MEL64 = FrontendSpec(prenorm="clip", n_fft=512, hop=160, win_length=400, n_mels=64)

REFERENCES: dict[str, ArchSpec] = {
    # Kounadis-Bastian et al. 2024, Wav2Small: 26 log-mels on a 64/32 STFT, 7x13 3x3 convs, 10,806 parameters.
    "wav2small-ref": ArchSpec(
        "wav2small",
        FrontendSpec(prenorm="clip", n_fft=64, hop=32, n_mels=26),
        Wav2SmallBody(channels=(13,) * 7, kernel=3, norm="batch", pool_after=(2,), pooling="attention+gram"),
    ),
    "mobilenetv3-s": ArchSpec("mobilenet", _MEL64, MobileNetBody("v3", 1.0, 8, mobilenet.V3_HEAD)),
    "mobilenetv4-s": ArchSpec("mobilenet", _MEL64, MobileNetBody("v4", 1.0, 8, mobilenet.V4_HEAD)),
}


def resolve_spec(text: str | ArchSpec) -> ArchSpec:
    """An ArchSpec from a reference name, a JSON string or a path to a JSON file."""
    if isinstance(text, ArchSpec):
        return text
    text = str(text).strip()
    if text in REFERENCES:
        return REFERENCES[text]
    if text.startswith("{"):
        return ArchSpec.from_json(text)
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise MicroserError(f"spec file {path} does not exist; pass a reference name "
                                f"({', '.join(REFERENCES)}), a JSON object or an existing .json file")
        try:
            return ArchSpec.from_json(path.read_text())
        except MicroserError as e:
            raise MicroserError(f"{path}: {e}") from None
    raise MicroserError(f"spec {text!r} is not a known name ({', '.join(REFERENCES)}), a JSON object "
                        "or a .json file; pass one of those")


class Student(nn.Module):
    """audio (B, T) -> frontend -> (B, 1, frames, n_mels) -> body -> (B, C, T', F') -> head -> (B, 3)."""

    min_seconds = MIN_SECONDS

    def __init__(self, spec: ArchSpec, frontend: nn.Module, body: nn.Module, head: nn.Module):
        super().__init__()
        self.spec = spec
        self.frontend = frontend
        self.body = body
        self.head = head

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.frontend(audio)))


def build_model(spec: ArchSpec | str) -> nn.Module:
    """The one way to get a model: a freshly initialised `Student` for a spec (or a name / JSON, via resolve_spec)."""
    spec = resolve_spec(spec)
    body, head = FAMILIES[spec.family].build(spec.body, spec.frontend)
    return Student(spec, Frontend(spec.frontend), body, head)
