"""Shrink a trained student: structured channel pruning (Torch-Pruning) and int8 post-training quantization.

Quantization contract (the C generator, microser/cgen/, reproduces the int8
graph written here, reading every scale and zero point from it):

* onnxruntime ``quantize_static``, QDQ format, calibrated with MinMax on crops
  of the cache's *training* split (``calibration_crops``) plus the input
  domain's two ends (``extreme_crops``: digital silence, and full-scale
  clipping), so silence and clipping map inside the calibrated ranges;
* weights: int8, symmetric (zero point 0), per output channel (axis 0 of
  Conv weights); biases: int32 with scale ``input_scale * weight_scale``;
* activations: int8 per tensor, **asymmetric** (``ACTIVATION_SYMMETRIC =
  False``): almost every quantized activation follows a ReLU or is the
  log-mel image, whose ranges are one-sided; a symmetric range would waste
  one of the eight bits on values that never occur (measured: see the model
  card of a bundle and ``QuantReport.choices``);
* kept float (excluded from quantization, by ONNX node-name prefix):
  ``/frontend/`` (prenorm, STFT, power, mel matrix, log or PCEN: their
  *output*, the log-mel image, is quantized before the first conv) and
  ``/head/`` (attention pooling: score and value 1x1 convs, softmax over time,
  value x softmax, the long sum over time, the Gram product and the Linear);
  plus whatever ``keep_float`` adds (a measured choice, see
  ``choose_keep_float``).

This is the fast path (post-training int8, "PTQ"). When it loses more than
``INT8_TOLERANCE`` of validation CCC, or with ``qat=True``, ``compress_trial``
fine-tunes with quantization-aware training (``microser.qat``): every
operator after the log-mel int8, head included, scales learned with the
weights. Both are measured and reported (the stage rows).

Every int8 graph is also checked on three probe signals (``probe_agreement``:
digital silence, white noise at -60 dBFS, a clipped full-scale tone): int8
and fp32 outputs must agree within ``PROBE_TOLERANCE``.

Pruning removes whole output channels of the ``body`` conv blocks with
Torch-Pruning's dependency graph (magnitude importance), never touching the
head or the last block's output channels (the head's Gram product couples
them through a matmul that the dependency graph does not trace), and
fine-tunes with ``microser.distill.train`` between steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from microser import SAMPLE_RATE, checks
from microser.errors import MicroserError
from microser.onnxio import restore_generated_tables

ACTIVATION_SYMMETRIC = False
# Largest drop of validation mean CCC int8 may cost (fp32 ONNX -> int8 ONNX): choose_keep_float stops at the first
# float split within it, and compress_trial switches to quantization-aware training when post-training int8 loses more.
INT8_TOLERANCE = 0.01
# Largest max-abs difference of the outputs (A/D/V, about 0..1) between the int8 and the fp32 graph on each probe
# signal (silence, -60 dBFS noise, clipped full scale): a tenth of the 0..1 target range. Before the front-end floor,
# silence gave 0.85 (issue 11). Measured on wav2small-ref (150 steps on espeak-emo): post-training int8 differs by
# 0.047 on silence (a constant image rounds the same way everywhere, so its errors add up in the Gram product) and
# 0.004 at most on validation speech; the all-int8 QAT graph by up to 0.085 from its float twin on speech.
PROBE_TOLERANCE = 0.1
EXTREME_GAIN = 4.0  # full-scale extreme: a crop scaled to peak 4 (+12 dB over full scale), then clipped to [-1, 1]
# Fine-tuning a trained model: distill's from-scratch peak lr (3e-3) first undoes training. On the demo study's
# best trial (final CCC .749, one seed), 1 epoch at 3e-3 gave .711, at 1e-3 .763; 3 epochs gave .777 with either.
FINETUNE_LR = 1e-3
FLOAT_PREFIXES = {
    "/frontend/": "front-end internals (prenorm, STFT, power, mel matrix, log/PCEN) run in float; "
                  "their output, the log-mel image, is quantized to int8 before the first conv",
    "/head/": "attention-pooling head (1x1 score/value convs, softmax over time, value x softmax, the long "
              "sum over time, Gram product, Linear) stays float: int8 loses a lot in the softmax, the "
              "product and the long sum, and it is a small share of the weights",
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Ops that only move or reshape data: they compute nothing an int8 kernel must get right.
SHAPE_OPS = frozenset({"Shape", "Gather", "Squeeze", "Unsqueeze", "Cast", "Constant", "ConstantOfShape",
                       "Reshape", "Flatten", "Concat", "Slice", "Range", "Expand", "Identity", "Transpose"})


# ---- calibration data ----


def calibration_crops(data, *, seconds: float, split: str = "train", max_crops: int = 64,
                      seed: int = 0) -> list[np.ndarray]:
    """Deterministic crops of ``seconds`` from segments of ``split`` (whole segment if shorter).

    ``data`` is a ``microser.cache.Cache`` (or anything with ``audio(i)`` and
    ``split_indices``). At most ``max_crops`` segments are drawn, evenly
    spread over the split; the crop's start is random with ``seed``.
    """
    idx = np.asarray(data.split_indices(split), dtype=np.int64)
    if len(idx) == 0:
        raise MicroserError(f"the cache's {split!r} split is empty: calibration needs audio from it; "
                            "rebuild the cache with more speakers")
    if len(idx) > max_crops:
        idx = idx[np.linspace(0, len(idx) - 1, max_crops).round().astype(int)]
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    crops = []
    for i in idx:
        audio = np.asarray(data.audio(int(i)), dtype=np.float32)
        start = int(rng.integers(0, len(audio) - n + 1)) if len(audio) > n else 0
        crops.append(np.ascontiguousarray(audio[start:start + n]))
    return crops


def extreme_crops(crops: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The input domain's two ends at the first crop's length: digital silence, and that crop driven
    ``EXTREME_GAIN`` times past its peak and clipped at full scale (+-1). Calibration adds them to its crops."""
    first = np.asarray(crops[0], np.float32).reshape(-1)
    peak = float(np.abs(first).max()) or 1.0
    return [np.zeros_like(first), np.clip(first * (EXTREME_GAIN / peak), -1.0, 1.0).astype(np.float32)]


def probe_signals(seconds: float = 1.0) -> dict[str, np.ndarray]:
    """The quiet and loud inputs every int8 graph must handle like its fp32 graph (1-D float32, 16 kHz).

    ``silence``: zeros. ``noise-60dB``: white Gaussian noise at -60 dBFS RMS
    (seeded). ``clipped``: a 440 Hz tone at amplitude 4 clipped to +-1 (a
    nearly square full-scale wave).
    """
    n = max(1, int(round(seconds * SAMPLE_RATE)))
    t = np.arange(n) / SAMPLE_RATE
    noise = np.random.default_rng(60).standard_normal(n) * 10 ** (-60 / 20)
    return {"silence": np.zeros(n, np.float32), "noise-60dB": noise.astype(np.float32),
            "clipped": np.clip(4.0 * np.sin(2 * np.pi * 440 * t), -1, 1).astype(np.float32)}


def probe_agreement(fp32_onnx, int8_onnx, *, seconds: float = 1.0, tolerance: float = PROBE_TOLERANCE) -> dict:
    """Outputs of the fp32 and the int8 graph on each :func:`probe_signals` input, their max abs difference, pass/fail.

    Returns ``{"tolerance", "passed", "signals": {name: {"fp32": [a, d, v], "int8": [...], "max_abs"}}}``.
    """
    from microser.onnxio import ort_session, run_onnx

    s32, s8 = ort_session(fp32_onnx), ort_session(int8_onnx)
    rows = {}
    for name, x in probe_signals(seconds).items():
        a, b = run_onnx(s32, x[None])[0], run_onnx(s8, x[None])[0]
        rows[name] = {"fp32": [float(v) for v in a], "int8": [float(v) for v in b],
                      "max_abs": float(np.abs(a - b).max())}
    return {"tolerance": tolerance, "passed": all(r["max_abs"] <= tolerance for r in rows.values()), "signals": rows}


class _AudioReader:
    """onnxruntime ``CalibrationDataReader``: one crop per call, batch of one."""

    def __init__(self, input_name: str, crops: Sequence[np.ndarray]):
        self._items = iter([{input_name: np.asarray(c, dtype=np.float32)[None]} for c in crops])

    def get_next(self):
        return next(self._items, None)


# ---- quantization ----


@dataclass(frozen=True)
class QuantReport:
    """What ``quantize_int8`` wrote and which nodes stayed float (names from the named fp32 graph)."""

    fp32_path: str
    int8_path: str
    fp32_bytes: int
    int8_bytes: int
    activation_symmetric: bool
    keep_float: list[str]                 # extra prefixes / op types kept float beyond /frontend/ and /head/
    float_nodes: list[dict]               # {"name", "op_type", "reason"} computing ops left in float
    quantized_nodes: list[dict]           # {"name", "op_type"} ops with int8 inputs, weights and outputs
    excluded: list[str]                   # nodes_to_exclude passed to quantize_static
    calibration: dict                     # {"crops", "seconds"}
    size: dict                            # size_accounting of the int8 file
    preprocessed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _matches(node: onnx.NodeProto, rule: str) -> bool:
    return node.name.startswith(rule) if rule.startswith("/") else node.op_type == rule


def float_reason(node: onnx.NodeProto, keep_float: Iterable[str] = ()) -> str | None:
    """Why ``node`` (of the named fp32 graph) is excluded from quantization, or None if it is quantized."""
    for prefix, why in FLOAT_PREFIXES.items():
        if node.name.startswith(prefix):
            return why
    for rule in keep_float:
        if _matches(node, rule):
            return f"kept float by choice ({rule}): int8 here cost CCC on the validation split (measured)"
    return None


def quantize_int8(fp32_onnx_path, calibration_audio: Sequence[np.ndarray], out_path, *,
                  keep_float: Iterable[str] | None = None,
                  activation_symmetric: bool = ACTIVATION_SYMMETRIC,
                  preprocess: bool = True) -> QuantReport:
    """Write the int8 QDQ graph of a named fp32 ONNX file (``onnxio.export_onnx`` output) and report it.

    Args:
        fp32_onnx_path: the fp32 model with its node names (``/frontend/...``,
            ``/body/...``, ``/head/...``).
        calibration_audio: 1-D float32 16 kHz crops (``calibration_crops`` of the
            training split), each run as a batch of one; :func:`extreme_crops` are added.
        out_path: where the int8 ``.onnx`` goes.
        keep_float: extra node-name prefixes (starting with ``/``) or op types
            to keep float besides ``/frontend/`` and ``/head/``.
        activation_symmetric: int8 activation zero points fixed at 0 (default False, see module doc).
        preprocess: run ``quant_pre_process`` (shape inference, ORT graph
            optimisation) on a copy first; skipped if it fails.

    Returns:
        a :class:`QuantReport`; ``float_nodes`` is read back from the written graph.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32_onnx_path, out_path = Path(fp32_onnx_path), Path(out_path)
    if not fp32_onnx_path.is_file():
        raise MicroserError(f"fp32 ONNX model {fp32_onnx_path} does not exist: expected the file written by "
                            "microser.onnxio.export_onnx")
    crops = [np.asarray(c, dtype=np.float32).reshape(-1) for c in calibration_audio]
    if not crops:
        raise MicroserError("quantize_int8 got no calibration audio: expected crops of the cache's training "
                            "split (microser.compress.calibration_crops)")
    n_given = len(crops)
    crops = crops + extreme_crops(crops)
    keep_float = list(keep_float or [])
    model = onnx.load(str(fp32_onnx_path))
    if not any(n.name.startswith(tuple(FLOAT_PREFIXES)) for n in model.graph.node):
        raise MicroserError(f"{fp32_onnx_path} has no /frontend/ or /head/ node names: expected a named graph "
                            "from microser.onnxio.export_onnx (bundle files have their names stripped)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, preprocessed = model, False
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            try:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                with _quiet():
                    quant_pre_process(str(fp32_onnx_path), str(pre), skip_symbolic_shape=True)
                # its graph optimizer folds HannWindow / MelWeightMatrix into stored tables: make them again; having
                # folded, it writes every Conv out with auto_pad="NOTSET", the default: drop that again
                candidate = restore_generated_tables(model, onnx.load(str(pre)))
                for node in candidate.graph.node:
                    for attr in [a for a in node.attribute if a.name == "auto_pad" and a.s == b"NOTSET"]:
                        node.attribute.remove(attr)
                kept = {n.name for n in candidate.graph.node}
                if all(n.name in kept for n in model.graph.node if n.op_type not in ("Constant", "Identity")):
                    src, preprocessed = candidate, True
            except Exception:  # pre-processing is an optimisation; the plain graph quantizes too
                src = model
        excluded = [n.name for n in src.graph.node if float_reason(n, keep_float)]
        src_path = Path(tmp) / "src.onnx"
        onnx.save(src, str(src_path))
        with _quiet():
            quantize_static(
                str(src_path), str(out_path), _AudioReader(src.graph.input[0].name, crops),
                quant_format=QuantFormat.QDQ, per_channel=True,
                weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": bool(activation_symmetric)},
            )
    int8 = drop_zero_points(onnx.load(str(out_path)))
    onnx.save(int8, str(out_path))
    floats, quantized = classify_nodes(int8)
    reasons = {n.name: float_reason(n, keep_float) for n in src.graph.node}
    float_nodes = [{"name": n.name, "op_type": n.op_type,
                    "reason": reasons.get(n.name) or "no int8 kernel input: not quantized by onnxruntime"}
                   for n in floats]
    return QuantReport(
        fp32_path=str(fp32_onnx_path), int8_path=str(out_path),
        fp32_bytes=fp32_onnx_path.stat().st_size, int8_bytes=out_path.stat().st_size,
        activation_symmetric=bool(activation_symmetric), keep_float=keep_float,
        float_nodes=float_nodes, quantized_nodes=[{"name": n.name, "op_type": n.op_type} for n in quantized],
        excluded=excluded, calibration={"crops": n_given, "extremes": len(crops) - n_given,
                                        "seconds": round(len(crops[0]) / SAMPLE_RATE, 4)},
        size=size_accounting(out_path), preprocessed=preprocessed,
    )


def floor_qparams(lo: float, hi: float) -> tuple[float, int]:
    """int8 asymmetric ``(scale, zero_point)`` covering ``[lo, max(hi, 0)]`` with ``lo < 0`` exactly on code -128.

    ``k = floor(255 * -lo / (hi - lo))`` (at least 1), ``scale = -lo / k``,
    ``zero_point = k - 128``: ``lo / scale = -k`` exactly, so the log-mel of
    silence (the front-end's floor, the range's lower end) dequantizes to
    itself instead of up to half a step away; the top of the range,
    ``(255 - k) * scale``, is >= hi. Quantization-aware training quantizes the
    log-mel with it (``microser.qat``).
    """
    hi = max(float(hi), 0.0)
    k = max(1, min(255, int(math.floor(255.0 * -lo / (hi - lo)))))
    return float(np.float32(-lo / k)), k - 128


def classify_nodes(int8: onnx.ModelProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(float nodes, quantized nodes) of a QDQ graph, skipping Q/DQ and pure shape/move ops.

    A node is *quantized* when every floating-point input it reads (weights
    and biases included) is the output of a ``DequantizeLinear`` and every
    output goes only to ``QuantizeLinear`` nodes, directly or through a
    ``Relu``/``Clip`` (which then counts as quantized too: with symmetric
    activations onnxruntime keeps the ReLU; with asymmetric ones it removes
    it, and the clamp of the QuantizeLinear at the zero point is the ReLU) or
    a ``Div``/``Mul`` by a scalar computed from tensor shapes (the Gram
    product's ``1 / (T*F)``) or an ``Add``/``Sub`` of a constant scalar (the
    mean+std head's epsilon): an affine map the requantization multiplier and
    zero point absorb, which then counts as quantized too. An input counts as dequantized also when
    shape ops only moved or joined DequantizeLinear outputs (a Flatten, the
    Concat of the pooled features: int8 parts, each with its own scale).
    Nodes that read only integer tensors (shape arithmetic) are skipped like
    shape ops. Everything else computes in float.
    """
    graph = int8.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    int_tensors = _int_tensors(int8)
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}

    def dequantized(name: str) -> bool:
        """A DequantizeLinear output, or data only moved or joined (shape ops) from such outputs."""
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        ins = [i for i in node.input if i and i not in int_tensors and i not in constants]
        return node.op_type in SHAPE_OPS and node.op_type not in ("Shape", "Cast") and bool(ins) and all(
            dequantized(i) for i in ins)

    def inputs_dequantized(n: onnx.NodeProto) -> bool:
        ins = [i for i in n.input if i and i not in int_tensors]
        return bool(ins) and all(dequantized(i) for i in ins)

    def shape_derived(name: str) -> bool:
        if name in constants:
            return True
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type in ("Shape", "Size"):
            return True
        if node.op_type in SHAPE_OPS or node.op_type in ("Mul", "Div", "Add", "Sub"):
            return all(shape_derived(i) for i in node.input if i)
        return False

    scalars = {t.name for t in graph.initializer if int(np.prod(t.dims)) == 1 and t.data_type == onnx.TensorProto.FLOAT}

    def rescaled_input(n: onnx.NodeProto) -> str | None:
        """The activation a Div/Mul by a shape-derived scalar, or an Add/Sub of a constant scalar, rescales or
        shifts (an affine map the requantization absorbs: multiplier and zero point), else None."""
        if len(n.input) != 2:
            return None
        x, k = n.input
        if n.op_type in ("Mul", "Add") and (shape_derived(x) or x in scalars) and not (shape_derived(k) or k in scalars):
            x, k = k, x
        if n.op_type in ("Div", "Mul"):
            return x if shape_derived(k) and not shape_derived(x) else None
        if n.op_type in ("Add", "Sub"):
            return x if k in scalars and not shape_derived(x) else None
        return None

    def outputs_quantized(n: onnx.NodeProto) -> bool:
        for o in n.output:
            users = consumers.get(o, [])
            if not users:
                return False
            for c in users:
                if c.op_type == "QuantizeLinear":
                    continue
                if c.op_type in ("Relu", "Clip") and outputs_quantized(c):
                    continue
                if rescaled_input(c) == o and outputs_quantized(c):
                    continue
                return False
        return True

    floats, quantized = [], []
    for n in graph.node:
        if n.op_type in QDQ_OPS or n.op_type in SHAPE_OPS:
            continue
        if all(i in int_tensors or shape_derived(i) for i in n.input if i):
            continue  # shape arithmetic
        if n.op_type in ("Relu", "Clip") and n.input[0] in producer and producer[n.input[0]].op_type not in QDQ_OPS:
            ok = inputs_dequantized(producer[n.input[0]]) and outputs_quantized(n)
        elif rescaled_input(n) is not None and rescaled_input(n) in producer:
            src = producer[rescaled_input(n)]
            while rescaled_input(src) is not None and rescaled_input(src) in producer:  # a chain: Div then Add
                src = producer[rescaled_input(src)]
            ok = inputs_dequantized(src) and outputs_quantized(n)
        else:
            ok = inputs_dequantized(n) and outputs_quantized(n)
        (quantized if ok else floats).append(n)
    return floats, quantized


def _int_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of integer-typed tensors (shapes, indices, axes): not activations."""
    ints = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
            onnx.TensorProto.BOOL}
    out = {t.name for t in model.graph.initializer if t.data_type in ints}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if info.type.tensor_type.elem_type in ints:
                out.add(info.name)
    except Exception:  # no inferred shapes: the initializers and Shape/Size outputs below still mark most
        pass
    for n in model.graph.node:
        if n.op_type in ("Shape", "Size"):
            out.update(n.output)
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in ints:
                    out.update(n.output)
    return out


def drop_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove all-zero zero points of constant ``DequantizeLinear`` inputs (int8 weights, int32 biases).

    ONNX defines an absent ``x_zero_point`` of DequantizeLinear as 0, so the
    graph computes the same; activation Q/DQ pairs keep theirs (a
    QuantizeLinear needs it to fix its output type). Saves the zero arrays,
    their initializer records and one input name per weight and bias.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dropped = set()
    for n in graph.node:
        if (n.op_type == "DequantizeLinear" and n.input[0] in inits and len(n.input) > 2 and n.input[2] in inits
                and not numpy_helper.to_array(inits[n.input[2]]).any()):
            dropped.add(n.input[2])
            del n.input[2]
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name not in dropped or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


@contextlib.contextmanager
def _quiet():
    """Silence onnxruntime.quantization's root-logger advice while it runs (library code never prints)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ---- size accounting ----


def size_accounting(onnx_path, *, params: int | None = None) -> dict:
    """Where the bytes of a (quantized) ONNX file go, and the size goal ``file <= 1.1 x params + 4096``.

    Returns:
        ``{"file_bytes", "int8_weight_bytes", "int8_weight_elements", "int32_bias_bytes",
        "int32_bias_elements", "scale_bytes", "zero_point_bytes", "float_bytes",
        "float_elements", "other_bytes", "initializer_bytes", "graph_overhead_bytes"}``;
        scales and zero points are the inputs 1 and 2 of Q/DQ nodes; ``float``
        is every other float initializer (parameters kept float); ``other`` is
        integer shape constants; graph overhead = file bytes - initializer bytes
        (node list, names, attributes, protobuf framing). ``size_goal_bytes`` is
        ``floor(1.1 * params + 4096)`` with ``params`` the model's params cost
        (``microser.costs.count_params`` of its fp32 graph): one byte per value
        plus 10 % for biases and scales plus 4 KiB of graph; None (and
        ``size_goal_met`` None) when ``params`` is not given.
    """
    path = Path(onnx_path)
    model = onnx.load(str(path))
    graph = model.graph
    scale_names, zp_names, qdq_x = set(), set(), set()
    for n in graph.node:
        if n.op_type in QDQ_OPS:
            qdq_x.add(n.input[0])
            if len(n.input) > 1:
                scale_names.add(n.input[1])
            if len(n.input) > 2 and n.input[2]:
                zp_names.add(n.input[2])
    tensors = list(graph.initializer)
    for n in graph.node:
        if n.op_type == "Constant":
            tensors.extend(a.t for a in n.attribute if a.name == "value")
    out = {k: 0 for k in ("int8_weight_bytes", "int8_weight_elements", "int32_bias_bytes", "int32_bias_elements",
                          "scale_bytes", "zero_point_bytes", "float_bytes", "float_elements", "other_bytes",
                          "initializer_bytes")}
    for t in tensors:
        arr = numpy_helper.to_array(t)
        nbytes = int(arr.nbytes)
        out["initializer_bytes"] += nbytes
        if t.name in scale_names:
            out["scale_bytes"] += nbytes
        elif t.name in zp_names:
            out["zero_point_bytes"] += nbytes
        elif arr.dtype == np.int8 and t.name in qdq_x:
            out["int8_weight_bytes"] += nbytes
            out["int8_weight_elements"] += int(arr.size)
        elif arr.dtype == np.int32 and t.name in qdq_x:
            out["int32_bias_bytes"] += nbytes
            out["int32_bias_elements"] += int(arr.size)
        elif arr.dtype in (np.float32, np.float16, np.float64):
            out["float_bytes"] += nbytes
            out["float_elements"] += int(arr.size)
        else:
            out["other_bytes"] += nbytes
    out["file_bytes"] = path.stat().st_size
    out["graph_overhead_bytes"] = out["file_bytes"] - out["initializer_bytes"]
    out["params"] = None if params is None else int(params)
    out["size_goal_bytes"] = None if params is None else int(math.floor(1.1 * params + 4096))
    out["size_goal_met"] = None if params is None else out["file_bytes"] <= out["size_goal_bytes"]
    return out


# ---- which body ops must stay float: measured ----


def keep_float_candidates(fp32_onnx_path) -> list[list[str]]:
    """Choices to measure, cheapest first: nothing more, the first body conv, the last one, both.

    Each entry lists exact node names (used as prefixes) of ``/body/`` convs to
    keep float beside the front-end and the head.
    """
    convs = [n.name for n in onnx.load(str(fp32_onnx_path)).graph.node
             if n.op_type == "Conv" and n.name.startswith("/body/")]
    if not convs:
        return [[]]
    first, last = convs[0], convs[-1]
    out = [[], [first]]
    if last != first:
        out += [[last], [first, last]]
    return out


def choose_keep_float(fp32_onnx_path, crops, data, *, tolerance: float = INT8_TOLERANCE, workdir,
                      split: str = "valid") -> tuple[list[str], list[dict]]:
    """Quantize with each :func:`keep_float_candidates` choice and keep the first whose int8 CCC is within
    ``tolerance`` of the fp32 graph's on ``split`` (else the best one).

    Returns:
        ``(chosen keep_float, [{"keep_float", "ccc" (int8, mean), "int8_bytes"}, ...])``; the fp32
        graph's CCC is the row with ``keep_float`` None.
    """
    from microser.onnxio import onnx_ccc

    workdir = Path(workdir)
    fp32 = onnx_ccc(fp32_onnx_path, data, split)["mean"]
    rows = [{"keep_float": None, "ccc": fp32, "int8_bytes": None}]
    chosen = None
    for k, choice in enumerate(keep_float_candidates(fp32_onnx_path)):
        path = workdir / f"choice-{k}.int8.onnx"
        report = quantize_int8(fp32_onnx_path, crops, path, keep_float=choice)
        ccc = onnx_ccc(path, data, split)["mean"]
        rows.append({"keep_float": choice, "ccc": ccc, "int8_bytes": report.int8_bytes})
        if chosen is None and ccc >= fp32 - tolerance:
            chosen = choice
            break
    if chosen is None:
        chosen = max(rows[1:], key=lambda r: r["ccc"])["keep_float"]
    return chosen, rows


# ---- structured pruning ----


def _frame_layer_norm_pruner():
    """Torch-Pruning handler for wav2small's FrameLayerNorm: LayerNorm over (C, F), prune axis C (dim 0)."""
    import torch
    import torch_pruning as tp

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
    import torch

    return [m for m in model.body.modules() if isinstance(m, torch.nn.Conv2d)]


def _pruner(model, ratio: float, steps: int):
    """A Torch-Pruning pruner over ``model.body`` (traced on front-end features), head and last conv ignored."""
    import torch
    import torch_pruning as tp

    from microser.models.wav2small import FrameLayerNorm

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

    Only the Wav2Small family describes its body by per-block channels;
    other families raise MicroserError (their pruned module would have to be
    kept as a module, which microser does not store).
    """
    import dataclasses

    if spec.family != "wav2small":
        raise MicroserError(f"pruning is not available for family {spec.family!r}: its spec cannot describe "
                            "pruned per-layer widths; compress it without --target-params/--prune-ratio "
                            "(int8 quantization only)")
    channels = tuple(block.conv.out_channels for block in model.body)
    return dataclasses.replace(spec, body=dataclasses.replace(spec.body, channels=channels))


def rebuild_pruned(spec, model):
    """``build_model(pruned_spec)`` loaded with ``model``'s weights; checks both give the same outputs."""
    import torch

    from microser.models.spec import build_model

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
    from microser.costs import count_params
    from microser.onnxio import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return int(count_params(onnx.load(str(export_onnx(model, Path(tmp) / "m.onnx", check=False)))))


def ratio_for_params(model, target_params: int, *, max_ratio: float = 0.95, tol: float = 0.005) -> float:
    """The smallest uniform pruning ratio that brings ``params`` to ``target_params`` or below (bisection)."""
    import copy

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
        finetune: a ``microser.distill.TrainConfig`` used after every step (None: no fine-tuning).
        progress: called with a dict after every step.

    Returns:
        ``(pruned spec, rebuilt model, history)``; history rows hold step, channels, params, valid CCC.
    """
    from microser.distill import evaluate, train

    if not 0 < ratio < 1:
        raise MicroserError(f"--prune-ratio {ratio} must be in (0, 1): the fraction of channels removed from "
                            "every body block but the last, e.g. 0.3")
    if steps < 1:
        raise MicroserError(f"pruning steps={steps}: expected >= 1, e.g. 3")
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


# ---- one stage of the before/after table ----


def measure_stage(name: str, model, data, workdir, *, crops, input_seconds: float,
                  keep_float: Iterable[str] | str = "auto", split: str = "valid") -> dict:
    """Export ``model``, quantize it and measure everything the before/after table shows.

    Writes ``workdir/model.onnx`` (named fp32) and ``workdir/model.int8.onnx``.
    CCC is computed on ``split`` three times, each from that model's own
    outputs: the PyTorch model (``distill.evaluate``), the fp32 ONNX graph and
    the int8 ONNX graph (both in onnxruntime, one segment per run).

    ``keep_float="auto"`` measures :func:`choose_keep_float`; a list is used as given.
    """
    from microser.distill import evaluate
    from microser.onnxio import export_onnx

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32_path = export_onnx(model, workdir / "model.onnx")
    proto = onnx.load(str(fp32_path))
    choices = None
    if keep_float == "auto":
        with tempfile.TemporaryDirectory() as tmp:
            keep_float, choices = choose_keep_float(fp32_path, crops, data, workdir=tmp, split=split)
    quant = quantize_int8(fp32_path, crops, workdir / "model.int8.onnx", keep_float=keep_float)
    return {
        "stage": name,
        "method": "ptq",
        **_graph_row(model, proto, fp32_path, quant.int8_path, data, input_seconds, split),
        "ccc_torch": evaluate(model, data, split),
        "keep_float": list(keep_float),
        "keep_float_choices": choices,
        "quantization": quant.to_dict(),
    }


def _graph_row(model, proto, fp32_path, int8_path, data, input_seconds: float, split: str) -> dict:
    """The measured columns every stage row shares: costs, sizes, CCC of both graphs, the probes."""
    from microser.costs import count_macs, count_params, ram_plan, seconds_to_samples
    from microser.export import strip_graph
    from microser.onnxio import onnx_ccc

    samples = seconds_to_samples(input_seconds)
    params = int(count_params(proto))
    with tempfile.TemporaryDirectory() as tmp:
        stripped = Path(tmp) / "int8.onnx"
        onnx.save(strip_graph(onnx.load(str(int8_path))), str(stripped))
        size = size_accounting(stripped, params=params)
    return {
        "params": params,
        "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "macs": int(count_macs(model, input_seconds)),
        "onnx_bytes": Path(fp32_path).stat().st_size,
        "int8_bytes": size["file_bytes"],  # as in a bundle: names stripped (what firmware stores)
        "int8_bytes_named": Path(int8_path).stat().st_size,
        "size": size,
        "ram_bytes_fp32": int(ram_plan(proto, samples, int8=False).peak_bytes),
        "ram_bytes": int(ram_plan(proto, samples, int8=True).peak_bytes),
        "input_seconds": float(input_seconds),
        "ccc_fp32_onnx": onnx_ccc(fp32_path, data, split),
        "ccc_int8_onnx": onnx_ccc(int8_path, data, split),
        "split": split,
        "probes": probe_agreement(fp32_path, int8_path),
    }


def qat_stage(name: str, model, spec, data, workdir, *, crops, input_seconds: float, config,
              split: str = "valid") -> tuple[dict, object]:
    """Quantization-aware fine-tuning of ``model`` (``microser.qat``) and the stage row of its int8 graph.

    ``prepare`` (BatchNorm folded, fake quantizers), MinMax calibration on
    ``crops`` (+ the extremes), ``distill.train`` with ``config`` (the
    quantizers' ranges stay frozen), then the float graph and the int8 QDQ
    graph of the result in ``workdir`` (``model.onnx``, ``model.int8.onnx``).
    CCC: ``ccc_torch`` is the fake-quantized PyTorch model's.

    Returns:
        ``(row, student)``: the row (keys as :func:`measure_stage`'s, ``method``
        ``"qat"``) and the fine-tuned weights as a plain ``build_model(spec)`` model.
    """
    from microser import qat
    from microser.distill import evaluate, train

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    qmodel = qat.prepare(model, spec)
    qat.calibrate(qmodel, crops)
    extra = qat.SilenceAnchor(model, len(crops[0]) / SAMPLE_RATE)
    result = train(qmodel, data, config, extra_loss=extra)
    qmodel.eval()
    exported = qat.export_int8(qmodel, spec, workdir / "model.onnx", workdir / "model.int8.onnx")
    student = qat.to_student(qmodel, spec)
    proto = onnx.load(str(workdir / "model.onnx"))
    int8 = onnx.load(str(workdir / "model.int8.onnx"))
    floats, quantized = classify_nodes(int8)
    row = {
        "stage": name,
        "method": "qat",
        **_graph_row(student, proto, workdir / "model.onnx", workdir / "model.int8.onnx", data, input_seconds,
                     split),
        "ccc_torch": evaluate(qmodel, data, split),
        "keep_float": [],
        "keep_float_choices": None,
        "train": {"steps": result.steps, "seconds": round(result.train_seconds, 1), "valid_ccc": result.ccc,
                  "collapsed": result.collapse_message},
        "quantization": {
            "method": "qat", "fp32_path": str(workdir / "model.onnx"), "int8_path": str(workdir / "model.int8.onnx"),
            "activation_symmetric": False, "keep_float": [],
            "float_nodes": [{"name": n.name, "op_type": n.op_type,
                             "reason": "front-end internals (prenorm, STFT, power, mel matrix, floor, log/PCEN) run "
                                       "in float; their output, the log-mel image, is int8"} for n in floats],
            "quantized_nodes": [{"name": n.name, "op_type": n.op_type} for n in quantized],
            "calibration": {"crops": len(crops), "extremes": 2, "seconds": round(len(crops[0]) / SAMPLE_RATE, 4)},
            "points": exported.points, "torch_vs_int8_max_abs": exported.torch_vs_int8_max_abs,
            "train_config": config.to_dict(),
        },
    }
    return row, student


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
    stages: list[dict]          # measure_stage rows: "trial", "fine-tuned", "pruned"
    prune_history: list[dict]
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)


def compressed_dir(study, trial: int) -> Path:
    """``<study artifacts>/compressed/trial-<N>``: where ``compress_trial`` writes."""
    from microser.storage import study_settings

    return Path(study_settings(study)["artifacts"]) / "compressed" / f"trial-{int(trial)}"


def _trial_spec(study, trial: int):
    from microser.models.spec import ArchSpec
    from microser.rungs import trial_of

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
    from microser.models.spec import ArchSpec, build_model
    from microser.rungs import load_trial_weights, trained_record, weights_stage

    t, spec = _trial_spec(study, trial)
    which = weights_stage(study, t, stage) or "search"   # no weights at all: load_trial_weights says so
    if which == "trained" and trained_record(study, t).get("spec"):
        spec = ArchSpec.from_json(trained_record(study, t)["spec"])
    model = build_model(spec)
    model.load_state_dict(load_trial_weights(study, t, stage=which))
    return model.eval(), spec, which


def compress_trial(study, trial: int, *, target_params: int | None = None, prune_ratio: float | None = None,
                   steps: int = 3, epochs: float = 10.0, finetune_epochs: float = 2.0,
                   finetune_steps: int | None = None, qat: bool | None = None, cache=None,
                   keep_float: Iterable[str] | str = "auto", seed: int = 0, calibration_crops_n: int = 64,
                   lr: float = FINETUNE_LR, qat_lr: float | None = None, progress=None) -> CompressReport:
    """Fine-tune, prune and quantize one trial; write ``compressed_dir(study, trial)``; record it on the study.

    Steps: load the trial's most trained weights (`microser train`'s, else the
    final stage's, else the search's; ``start_weights`` says which); measure it ("trial" row); fine-tune ``epochs`` more with
    ``distill.train`` ("fine-tuned" row, skipped when ``epochs`` is 0); if
    ``target_params`` or ``prune_ratio`` is given, prune the body in
    ``steps`` steps with ``finetune_epochs`` (or ``finetune_steps``) of
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
    import torch

    from microser import qat as qat_module
    from microser.cache import Cache
    from microser.distill import TrainConfig, train
    from microser.pareto import COMPRESSED_PREFIX
    from microser.storage import study_settings

    if target_params is not None and prune_ratio is not None:
        raise MicroserError(f"got --target-params {target_params} and --prune-ratio {prune_ratio}: give one of them")
    _check_compress_values(target_params=target_params, prune_ratio=prune_ratio, steps=steps, epochs=epochs,
                           finetune_epochs=finetune_epochs, finetune_steps=finetune_steps, seed=seed, lr=lr)
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
    base = dict(crop_seconds=fidelity.get("crop_seconds") or 2.0, batch_size=fidelity.get("batch_size") or 32,
                seed=seed, lr=lr)
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
                spec, model, history = prune(model, spec, data, ratio=ratio, steps=steps, finetune=finetune,
                                             progress=emit)
                stages.append(measure_stage("pruned", model, data, tmp / "pruned", crops=crops,
                                            input_seconds=input_seconds, keep_float=keep_float))
                last = tmp / "pruned"
        ptq = stages[-1]
        ptq_drop = ptq["ccc_fp32_onnx"]["mean"] - ptq["ccc_int8_onnx"]["mean"]
        if qat is None:
            run_qat = ptq_drop > INT8_TOLERANCE and spec.family == "wav2small"
            why = (f"auto: post-training int8 lost {ptq_drop:.4f} of validation CCC "
                   f"{'>' if ptq_drop > INT8_TOLERANCE else '<='} {INT8_TOLERANCE}"
                   + ("" if spec.family == "wav2small" else f"; family {spec.family} has no QAT"))
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
        settings={"target_params": target_params, "prune_ratio": prune_ratio, "steps": steps, "epochs": epochs,
                  "finetune_epochs": finetune_epochs, "finetune_steps": finetune_steps, "seed": seed,
                  "keep_float": keep_float, "calibration_crops": len(crops), "input_seconds": input_seconds,
                  "qat": run_qat, "qat_reason": why, "int8_tolerance": INT8_TOLERANCE, **base},
    )
    (folder / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    final = stages[-1]
    study.set_user_attr(f"{COMPRESSED_PREFIX}{int(trial)}", {
        "folder": str(folder), "summary": spec.summary(), "params": final["params"],
        "int8_bytes": final["int8_bytes"], "ccc_int8_onnx": final["ccc_int8_onnx"], "method": final["method"]})
    return report


def _check_compress_values(*, target_params, prune_ratio, steps, epochs, finetune_epochs, finetune_steps, seed,
                           lr) -> None:
    """`compress_trial`'s numbers, refused in one line before the study is read or anything trained."""
    if prune_ratio is not None:
        checks.number("--prune-ratio", prune_ratio, example=0.3)
        if not 0 < prune_ratio < 1:  # the rule prune() applies, said before fine-tuning rather than after
            raise MicroserError(f"--prune-ratio {prune_ratio:g} must be in (0, 1): the fraction of channels removed "
                                "from every body block but the last, e.g. --prune-ratio 0.3")
    if target_params is not None:
        checks.number("--target-params", target_params, low=1, integer=True, example=20000)
    checks.number("--steps", steps, low=1, integer=True, example=3)
    checks.number("--epochs", epochs, low=0, example=10)
    checks.number("--finetune-epochs", finetune_epochs, low=0, example=2)
    if finetune_steps is not None:
        checks.number("--finetune-steps", finetune_steps, low=1, integer=True, example=500)
    checks.seed("--seed", seed)
    checks.number("--lr", lr, low=0, low_open=True, example=FINETUNE_LR)


def load_compressed(study, trial: int):
    """``(model, spec, folder, report dict)`` of a compressed trial; MicroserError naming what is missing."""
    import torch

    from microser.models.spec import ArchSpec, build_model
    from microser.pareto import COMPRESSED_PREFIX

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
