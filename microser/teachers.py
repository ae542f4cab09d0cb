"""Teacher back-ends: what annotates each cached segment with arousal, dominance, valence.

A teacher is three methods (the `Teacher` protocol):

- ``identity() -> dict``: JSON-able, stable, names exactly what produced the
  outputs (kind, file checksum or weights hash, settings). The cache records it
  and refuses to mix outputs of different identities.
- ``check(sources) -> None``: refuse up front (MicroserError) when the teacher
  cannot annotate some source file, before any work is done.
- ``predict(segments, *, embeddings=False) -> (targets, embeddings | None)``:
  ``targets`` float32 ``(N, 3)`` in `TARGETS` order; ``embeddings`` float32
  ``(N, D)`` when asked for and the teacher has them (else None). Model
  teachers read ``segment.audio``; table teachers (csv, demo) look up
  ``segment.path`` and its time span, which is why a segment carries both.

Specs (``make_teacher``): ``csv:FILE``, ``hf:NAME_OR_PATH``, ``onnx:FILE``, ``demo``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from microser import SAMPLE_RATE, TARGETS
from microser.checks import read_text
from microser.errors import MicroserError

_MAX_LISTED = 5  # problems named in one message before "... and N more"


@dataclass(frozen=True)
class Segment:
    """One piece of audio to annotate: the 16 kHz samples the cache stores, and where they came from."""

    audio: np.ndarray  # (T,) float32, 16 kHz, exactly what the cache stores (after int16 rounding)
    path: Path  # the source file
    start_s: float = 0.0  # position of the segment in the source file, seconds
    end_s: float = field(default=math.inf)


class Teacher(Protocol):
    def identity(self) -> dict: ...

    def check(self, sources: Sequence[Path]) -> None: ...

    def predict(self, segments: Sequence[Segment], *, embeddings: bool = False) -> tuple[np.ndarray, np.ndarray | None]: ...


def make_teacher(
    spec: str,
    *,
    audio: str | os.PathLike | None = None,
    device: str | None = None,
    target_range: tuple[float, float] = (0.0, 1.0),
    rescale_from: tuple[float, float] | None = None,
    allow_absolute_paths: bool = False,
) -> Teacher:
    """Build a teacher from its spec.

    ``audio`` is the build's ``--audio`` (the ``demo`` teacher reads its CSV).
    ``target_range`` / ``rescale_from`` apply to table teachers (csv, demo):
    labels on the scale ``rescale_from`` are mapped linearly onto
    ``target_range``, then values outside ``target_range`` are refused.
    """
    kind, _, arg = spec.partition(":")
    if kind == "csv" and arg:
        return CsvTeacher(arg, target_range=target_range, rescale_from=rescale_from,
                          allow_absolute_paths=allow_absolute_paths)
    if kind == "demo" and not arg:
        if audio is None or Path(audio).suffix.lower() != ".csv":
            raise MicroserError(
                f"teacher 'demo' reads the targets of the demo corpus's labels.csv, but --audio is {audio}: "
                "pass --audio DEMO_DIR/labels.csv (written by `microser demo`)"
            )
        return CsvTeacher(audio, kind="demo", target_range=target_range, rescale_from=rescale_from,
                          allow_absolute_paths=allow_absolute_paths)
    if kind == "hf" and arg:
        return HFTeacher(arg, device=device)
    if kind == "onnx" and arg:
        return OnnxTeacher(arg)
    raise MicroserError(
        f"teacher spec {spec!r} is not understood: expected csv:FILE, hf:NAME_OR_PATH, onnx:FILE or demo"
    )


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_listed_path(base: Path, text: str, *, where: str, allow_absolute_paths: bool) -> Path:
    """A path written in a CSV, relative to the CSV's folder; refuses escapes unless allowed.

    The check is lexical (``..`` and absolute paths), so a symlink the corpus
    owner placed inside the folder is followed as usual.
    """
    p = Path(text)
    joined = Path(os.path.normpath(base / p))
    if not allow_absolute_paths:
        if p.is_absolute() or not joined.is_relative_to(os.path.normpath(base)):
            raise MicroserError(
                f"{where}: path {text!r} leaves the CSV's folder {base}; expected a path relative to it: "
                "move the audio under that folder or pass --allow-absolute-paths"
            )
    return joined


def match_key(path) -> str:
    """The key that identifies one audio file across CSVs (its real path)."""
    return os.path.realpath(path)


def listed(problems: list[str]) -> str:
    """The first few problems joined for a one-line message."""
    more = len(problems) - _MAX_LISTED
    return "; ".join(problems[:_MAX_LISTED]) + (f"; ... and {more} more" if more > 0 else "")


# ---- csv / demo ----


class CsvTeacher:
    """Precomputed teacher outputs or human labels from a CSV: path, arousal, dominance, valence.

    Optional columns: ``speaker`` (used when the audio list has none), and
    ``start``/``end`` seconds for per-segment outputs: a cached segment then
    gets the overlap-weighted mean of the rows that overlap it (a row with
    empty start/end covers the whole file).
    """

    def __init__(self, path, *, kind: str = "csv", target_range=(0.0, 1.0), rescale_from=None,
                 allow_absolute_paths: bool = False):
        self.path = Path(path)
        self.kind = kind
        self.target_range = (float(target_range[0]), float(target_range[1]))
        self.rescale_from = None if rescale_from is None else (float(rescale_from[0]), float(rescale_from[1]))
        if not self.path.is_file():
            raise MicroserError(f"teacher CSV {self.path} does not exist: pass csv:FILE with an existing file")
        lo, hi = self.target_range
        if not lo < hi:
            raise MicroserError(f"target range {lo},{hi} must have LO < HI: pass e.g. --target-range 0,1")
        if self.rescale_from is not None and not self.rescale_from[0] < self.rescale_from[1]:
            raise MicroserError(f"rescale range {self.rescale_from} must have LO < HI: pass e.g. --rescale-from 1,7")
        self.sha256 = sha256_file(self.path)
        self.rows: dict[str, list[tuple[float, float, np.ndarray]]] = {}
        self.speakers: dict[str, str] = {}
        self._read(allow_absolute_paths)

    def _read(self, allow_absolute_paths: bool) -> None:
        with io.StringIO(read_text(self.path, "teacher CSV"), newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in ("path", *TARGETS) if c not in cols]
            if missing:
                raise MicroserError(
                    f"teacher CSV {self.path} lacks column(s) {', '.join(missing)} (has: {', '.join(cols) or 'none'}); "
                    "expected path,arousal,dominance,valence: rename the columns"
                )
            timed = "start" in cols or "end" in cols
            base = self.path.parent
            values, problems = [], []
            for line, row in enumerate(reader, start=2):
                try:
                    v = np.array([float(row[t]) for t in TARGETS], dtype=np.float64)
                except (TypeError, ValueError):
                    problems.append(f"line {line}: {', '.join(f'{t}={row[t]!r}' for t in TARGETS)} is not a number")
                    continue
                if not np.isfinite(v).all():
                    problems.append(f"line {line} ({row['path']}): NaN/Inf in {', '.join(TARGETS)}")
                    continue
                start = _opt_float(row.get("start"), 0.0) if timed else 0.0
                end = _opt_float(row.get("end"), math.inf) if timed else math.inf
                if start is None or end is None or not end > start:
                    problems.append(f"line {line}: start={row.get('start')!r} end={row.get('end')!r} is not a span")
                    continue
                key = match_key(resolve_listed_path(base, row["path"], where=f"{self.path} line {line}",
                                                    allow_absolute_paths=allow_absolute_paths))
                if not timed and key in self.rows:
                    problems.append(f"line {line}: {row['path']} is listed twice")
                    continue
                self.rows.setdefault(key, []).append((start, end, v))
                values.append(v)
                if (row.get("speaker") or "").strip():
                    self.speakers[key] = row["speaker"].strip()
        if problems:
            raise MicroserError(f"teacher CSV {self.path}: {listed(problems)}; expected finite numbers: fix those rows")
        if not values:
            raise MicroserError(f"teacher CSV {self.path} has no rows: expected one row per audio file")
        if self.rescale_from is not None:
            for spans in self.rows.values():
                for i, (s, e, v) in enumerate(spans):
                    spans[i] = (s, e, self._rescale(v))
        self._check_range(np.stack([v for spans in self.rows.values() for _, _, v in spans]))

    def _rescale(self, v: np.ndarray) -> np.ndarray:
        (a, b), (lo, hi) = self.rescale_from, self.target_range
        return lo + (v - a) * (hi - lo) / (b - a)

    def _check_range(self, v: np.ndarray) -> None:
        lo, hi = self.target_range
        eps = 1e-9 * (hi - lo)
        out = (v < lo - eps) | (v > hi + eps)
        if out.any():
            scale = f" after rescaling from {self.rescale_from[0]:g},{self.rescale_from[1]:g}" if self.rescale_from else ""
            raise MicroserError(
                f"teacher CSV {self.path}: {int(out.sum())} value(s) outside the target range {lo:g},{hi:g}{scale} "
                f"(min {v.min():g}, max {v.max():g}); expected values in range: pass --target-range LO,HI "
                "to declare the scale, or --rescale-from LO,HI to map labels onto it"
            )

    def identity(self) -> dict:
        ident = {"kind": self.kind, "file": self.path.name, "sha256": self.sha256}
        if self.rescale_from is not None:
            ident["rescale_from"] = list(self.rescale_from)
            ident["target_range"] = list(self.target_range)
        if self.kind == "demo":
            demo_json = self.path.parent / "demo.json"
            ident["demo"] = json.loads(demo_json.read_text()) if demo_json.is_file() else None
        return ident

    def check(self, sources: Sequence[Path]) -> None:
        missing = [str(p) for p in sources if match_key(p) not in self.rows]
        if missing:
            raise MicroserError(
                f"teacher CSV {self.path} has no row for {len(missing)} audio file(s): {listed(missing)}; "
                "expected a row per file: add rows, or list only covered files in an --audio CSV"
            )

    def predict(self, segments, *, embeddings=False):
        out = np.empty((len(segments), len(TARGETS)), dtype=np.float32)
        for i, seg in enumerate(segments):
            spans = self.rows.get(match_key(seg.path))
            if spans is None:
                raise MicroserError(f"teacher CSV {self.path} has no row for {seg.path}: add one")
            w = np.array([max(0.0, min(e, seg.end_s) - max(s, seg.start_s)) for s, e, _ in spans])
            if len(spans) == 1 and math.isinf(spans[0][1]) and spans[0][0] == 0.0:
                w = np.ones(1)
            if not w.sum() > 0:
                raise MicroserError(
                    f"teacher CSV {self.path}: no row for {seg.path} covers {seg.start_s:.2f}-{seg.end_s:.2f} s; "
                    "expected start/end rows covering the whole file: add rows or drop the start/end columns"
                )
            out[i] = (w[:, None] * np.stack([v for _, _, v in spans])).sum(0) / w.sum()
        return out, None


def _opt_float(text, default):
    if text is None or str(text).strip() == "":
        return default
    try:
        x = float(text)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


# ---- onnx ----


class OnnxTeacher:
    """An ONNX model on raw 16 kHz waveform, audonnx-style.

    Input: float32 ``(1, T)`` or ``(B, T)`` (or ``(T,)``). Outputs: one with
    last dimension 3 (``logits`` preferred) in arousal, dominance, valence
    order, or three outputs of one value each (by name when they are called
    arousal/dominance/valence, else in graph order). A remaining 2-D output
    (``hidden_states`` preferred) serves as embeddings. Segments of equal
    length are batched when the batch axis is dynamic, others run one by one,
    so no padding ever reaches the model.
    """

    def __init__(self, path):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise MicroserError(f"ONNX teacher {self.path} does not exist: pass onnx:FILE with an existing model")
        self.sha256 = sha256_file(self.path)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=_ort_providers(ort))
        except Exception as e:
            raise MicroserError(f"ONNX teacher {self.path} does not load in onnxruntime ({str(e)[:160]}): "
                                "export it again (opset >= 17)") from None
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_rank = inp.name, len(inp.shape)
        if self.input_rank not in (1, 2):
            raise MicroserError(f"ONNX teacher {self.path}: input {inp.name} has shape {inp.shape}; "
                                "expected a raw waveform (1, T) or (B, T): export the model on raw audio")
        self.batchable = self.input_rank == 2 and not isinstance(inp.shape[0], int)
        probe = np.random.default_rng(0).standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1
        outs = self._run(probe[None])
        names = [o.name for o in self.session.get_outputs()]
        flat = {n: o.reshape(1, -1) for n, o in zip(names, outs)}
        three = [n for n in names if flat[n].shape[1] == len(TARGETS)]
        if three:
            self.target_outputs = ["logits"] if "logits" in three else three[:1]
        elif sum(flat[n].shape[1] == 1 for n in names) >= 3:
            ones = [n for n in names if flat[n].shape[1] == 1]
            self.target_outputs = list(TARGETS) if set(TARGETS) <= set(ones) else ones[:3]
        else:
            shapes = ", ".join(f"{n} {tuple(o.shape)}" for n, o in zip(names, outs))
            raise MicroserError(f"ONNX teacher {self.path} outputs {shapes}; expected one output with 3 values "
                                "(arousal, dominance, valence) or three outputs of one value each")
        rest = [n for n in names if n not in self.target_outputs and flat[n].shape[1] > 1]
        self.embedding_output = "hidden_states" if "hidden_states" in rest else (rest[0] if rest else None)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        x = batch[0] if self.input_rank == 1 else batch
        return self.session.run(None, {self.input_name: x})

    def identity(self) -> dict:
        return {"kind": "onnx", "file": self.path.name, "sha256": self.sha256, "outputs": self.target_outputs}

    def check(self, sources) -> None:
        return None

    def predict(self, segments, *, embeddings=False):
        names = [o.name for o in self.session.get_outputs()]
        targets = np.empty((len(segments), len(TARGETS)), dtype=np.float32)
        emb: list | None = [None] * len(segments) if embeddings and self.embedding_output else None
        for idx in _length_groups(segments, self.batchable):
            outs = dict(zip(names, self._run(np.stack([segments[i].audio for i in idx]))))
            n = len(idx)
            if len(self.target_outputs) == 1:
                t = outs[self.target_outputs[0]].reshape(n, len(TARGETS))
            else:
                t = np.concatenate([outs[k].reshape(n, 1) for k in self.target_outputs], axis=1)
            targets[idx] = t
            if emb is not None:
                e = outs[self.embedding_output].reshape(n, -1)
                for j, i in enumerate(idx):
                    emb[i] = e[j]
        return targets, (np.stack(emb).astype(np.float32) if emb is not None else None)


def _length_groups(segments, batchable: bool) -> list[list[int]]:
    """Indices grouped by equal length (or one per group when the model takes no batch)."""
    if not batchable:
        return [[i] for i in range(len(segments))]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(segments):
        groups.setdefault(len(s.audio), []).append(i)
    return list(groups.values())


def _ort_providers(ort) -> list[str]:
    avail = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]


# ---- hf ----


def _emotion_model_class():
    """The audeering dimensional model layout (wav2vec2 + mean pooling + dense/tanh/out_proj head).

    Built lazily so importing microser does not need transformers (the ``hf`` extra).
    """
    import torch
    from torch import nn
    from transformers import Wav2Vec2Model, Wav2Vec2PreTrainedModel

    class RegressionHead(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.dropout = nn.Dropout(getattr(config, "final_dropout", 0.0))
            self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

        def forward(self, x):  # (B, H) -> (B, num_labels)
            return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))

    class EmotionModel(Wav2Vec2PreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.wav2vec2 = Wav2Vec2Model(config)
            self.classifier = RegressionHead(config)
            self.post_init()

        def forward(self, input_values, attention_mask=None):
            """``(B, T)`` normalised waveform -> pooled ``(B, H)``, outputs ``(B, 3)``."""
            hidden = self.wav2vec2(input_values, attention_mask=attention_mask)[0]  # (B, F, H)
            if attention_mask is None:
                pooled = hidden.mean(dim=1)
            else:
                mask = self.wav2vec2._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)  # (B, F)
                m = mask.to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * m).sum(1) / m.sum(1)
            return pooled, self.classifier(pooled)

    return EmotionModel


def normalize_waveform(x: np.ndarray) -> np.ndarray:
    """Per-utterance zero mean, unit variance, as Wav2Vec2FeatureExtractor(do_normalize=True) does."""
    x = np.asarray(x, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


class HFTeacher:
    """A Hugging Face wav2vec2 dimensional model laid out like audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim.

    Weights load with transformers' safetensors or weights-only loader; no
    remote code runs. Inputs get the processor's per-utterance normalisation
    (``do_normalize`` from preprocessor_config.json, default on). Batches are
    padded with an attention mask when the feature encoder normalises per
    frame (``feat_extract_norm="layer"``, as in the large models), which gives
    the same outputs as one-by-one; with group norm (which would see the
    padding) only equal-length segments share a batch.
    """

    def __init__(self, name: str, *, device: str | None = None):
        import torch

        try:
            import transformers  # noqa: F401
        except ImportError:
            raise MicroserError("teacher hf:... needs transformers: pip install 'microser[hf]'") from None
        self.name = name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from transformers.utils import logging as hf_logging

        cls = _emotion_model_class()
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # library code does not print; the CLI shows its own progress
        try:
            model, info = cls.from_pretrained(name, output_loading_info=True, weights_only=True)
        except pickle.UnpicklingError as e:  # a pickled checkpoint holding more than tensors: never executed
            raise MicroserError(f"hf teacher {name!r} has a pickle checkpoint that does not load weights-only "
                                f"({' '.join(str(e).split())[:120]}): use its model.safetensors, or re-save "
                                "the model with save_pretrained(safe_serialization=True)") from None
        except (OSError, ValueError) as e:
            raise MicroserError(f"hf teacher {name!r} does not load ({' '.join(str(e).split())[:200]}): "
                                "pass a local folder or hub name of a wav2vec2 dimensional model") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        missing = [k for k in info.get("missing_keys", []) if k.startswith(("classifier.", "wav2vec2."))]
        if missing:
            raise MicroserError(
                f"hf teacher {name!r} lacks weights {', '.join(sorted(missing)[:4])}; expected the layout of "
                "audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim (wav2vec2.*, classifier.dense, classifier.out_proj)"
            )
        if model.config.num_labels != len(TARGETS):
            raise MicroserError(f"hf teacher {name!r} has {model.config.num_labels} outputs; expected 3 "
                                "(arousal, dominance, valence)")
        self.model = model.to(self.device).eval()
        self.do_normalize = _read_do_normalize(name)
        self.pad_ok = getattr(model.config, "feat_extract_norm", "group") == "layer"
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        self.weights_sha256 = h.hexdigest()

    def identity(self) -> dict:
        return {"kind": "hf", "name": self.name, "weights_sha256": self.weights_sha256,
                "normalize": self.do_normalize, "hidden_size": int(self.model.config.hidden_size)}

    def check(self, sources) -> None:
        return None

    def predict(self, segments, *, embeddings=False):
        import torch

        n = len(segments)
        targets = np.empty((n, len(TARGETS)), dtype=np.float32)
        emb = np.empty((n, self.model.config.hidden_size), dtype=np.float32) if embeddings else None
        groups = [list(range(n))] if self.pad_ok else _length_groups(segments, True)
        for idx in groups:
            xs = [normalize_waveform(segments[i].audio) if self.do_normalize else segments[i].audio for i in idx]
            length = max(len(x) for x in xs)
            batch = np.zeros((len(xs), length), dtype=np.float32)  # (B, T), zero padded like the processor
            mask = np.zeros((len(xs), length), dtype=np.int64)
            for j, x in enumerate(xs):
                batch[j, : len(x)] = x
                mask[j, : len(x)] = 1
            padded = bool((mask == 0).any())
            with torch.inference_mode():
                pooled, out = self.model(torch.from_numpy(batch).to(self.device),
                                         attention_mask=torch.from_numpy(mask).to(self.device) if padded else None)
            targets[idx] = out.float().cpu().numpy()
            if emb is not None:
                emb[idx] = pooled.float().cpu().numpy()
        return targets, emb


def _read_do_normalize(name: str) -> bool:
    """``do_normalize`` from the model's preprocessor_config.json (local folder or hub), default True."""
    path = Path(name) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
            path = Path(found) if found else None
        except Exception:
            path = None
    if path is None or not path.is_file():
        return True
    return bool(json.loads(path.read_text()).get("do_normalize", True))
