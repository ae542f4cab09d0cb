"""Student model families and their specs: `ArchSpec` in, `build_model(spec)` out (see models/spec.py)."""

from microser.frontends import FrontendSpec
from microser.models.mobilenet import MobileNetBody
from microser.models.spec import REFERENCES, ArchSpec, build_model, resolve_spec
from microser.models.wav2small import Wav2SmallBody

__all__ = ["ArchSpec", "FrontendSpec", "MobileNetBody", "REFERENCES", "Wav2SmallBody", "build_model", "resolve_spec"]
