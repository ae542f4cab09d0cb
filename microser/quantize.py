"""Post-training int8 of an exported graph: calibration crops, onnxruntime static QDQ, node classes, sizes, probes.

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
* kept float (excluded from quantization): the front-end and the pooling
  head, by the split rule of ``microser.graph`` (``FLOAT_SCOPES``: their
  node-name prefixes and why; the log-mel image the body reads is
  quantized), plus whatever ``keep_float`` adds (a measured choice, see
  ``choose_keep_float``).

Every int8 graph is also checked on three probe signals (``probe_agreement``:
digital silence, white noise at -60 dBFS, a clipped full-scale tone): int8
and fp32 outputs must agree within ``PROBE_TOLERANCE``. ``classify_nodes``
reads which operators of an int8 graph (post-training or QAT) run int8, and
``size_accounting`` where its bytes go. No torch here: graphs in, graphs out.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.graph import FLOAT_SCOPES, int8_scope, wiring
from microser.onnxio import onnx_ccc, ort_session, restore_generated_tables, run_onnx

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
    for prefix, why in FLOAT_SCOPES.items():
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
                            "split (microser.quantize.calibration_crops)")
    n_given = len(crops)
    crops = crops + extreme_crops(crops)
    keep_float = list(keep_float or [])
    model = onnx.load(str(fp32_onnx_path))
    if not any(n.name.startswith(tuple(FLOAT_SCOPES)) for n in model.graph.node):
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
    zero point absorb, which then counts as quantized too. The attention
    head's int8 softmax split (``models.wav2small.softmax_pool``) is integer
    step by step and counts as quantized: ``ReduceMax`` of a dequantized
    tensor and its difference to it (int8 code arithmetic), ``Exp`` of that
    difference into a QuantizeLinear (a 256-entry table), ``ReduceSum`` /
    ``Einsum`` of dequantized tensors (int32 accumulations) and the ``Div`` of
    two such accumulations into a QuantizeLinear (integer division, requantized). An input counts as dequantized also when
    shape ops only moved or joined DequantizeLinear outputs (a Flatten, the
    Concat of the pooled features: int8 parts, each with its own scale).
    Nodes that read only integer tensors (shape arithmetic) are skipped like
    shape ops; ``QLinear*`` nodes (a fused graph) are quantized. Everything else computes in float.
    """
    graph = int8.graph
    producer, consumers = wiring(graph.node)
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
                if accumulator_ratio(c) and outputs_quantized(c):
                    continue
                return False
        return True

    # the attention head's softmax split for int8 (`models.wav2small.softmax_pool`): every step is integer
    def accumulator(name: str) -> bool:
        """An int32 accumulation: a sum over an axis (ReduceSum, Einsum) of dequantized tensors."""
        node = producer.get(name)
        return node is not None and node.op_type in ("ReduceSum", "Einsum") and inputs_dequantized(node)

    def accumulator_ratio(n: onnx.NodeProto) -> bool:
        """A Div of two int32 accumulators: integer division, requantized by the QuantizeLinear after it."""
        return n.op_type == "Div" and len(n.input) == 2 and all(accumulator(i) for i in n.input)

    def code_max(n: onnx.NodeProto) -> bool:
        """The largest int8 code along an axis of a dequantized tensor."""
        return n.op_type == "ReduceMax" and inputs_dequantized(n)

    def code_difference(n: onnx.NodeProto) -> bool:
        """``x - max(x)`` of a dequantized ``x``: a difference of codes on one scale, an integer in [-255, 0]."""
        if n.op_type != "Sub" or len(n.input) != 2:
            return False
        x, m = n.input
        return dequantized(x) and m in producer and code_max(producer[m]) and producer[m].input[0] == x

    def integer_step(n: onnx.NodeProto) -> bool:
        """A node of the int8 softmax split, quantized when its result stays integer or reaches a QuantizeLinear:
        the code max and code difference (read only by the split), ``exp`` of a code difference (a 256-entry
        table), the two sums over time and their ratio."""
        users = [c for o in n.output for c in consumers.get(o, [])]
        if code_max(n):
            return bool(users) and all(code_difference(c) for c in users)
        if code_difference(n):
            return bool(users) and all(c.op_type == "Exp" and outputs_quantized(c) for c in users)
        if n.op_type == "Exp":
            return n.input[0] in producer and code_difference(producer[n.input[0]]) and outputs_quantized(n)
        if n.op_type in ("ReduceSum", "Einsum") and inputs_dequantized(n):
            return bool(users) and all(accumulator_ratio(c) and outputs_quantized(c) for c in users)
        return accumulator_ratio(n) and outputs_quantized(n)

    floats, quantized = [], []
    for n in graph.node:
        if n.op_type in QDQ_OPS or n.op_type in SHAPE_OPS:
            continue
        if n.op_type.startswith("QLinear"):  # int8 in, int8 out by definition (graph.fuse_qlinear_conv)
            quantized.append(n)
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
            ok = integer_step(n) or (inputs_dequantized(n) and outputs_quantized(n))
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
        scales and zero points are the inputs 1 and 2 of Q/DQ nodes (and the
        scale / zero-point inputs of ``QLinearConv``, whose weight and bias
        inputs count as int8 weights and int32 biases); ``float``
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
        elif n.op_type == "QLinearConv":  # x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias
            qdq_x.update(n.input[k] for k in (3, 8) if len(n.input) > k)
            scale_names.update(n.input[k] for k in (1, 4, 6))
            zp_names.update(n.input[k] for k in (2, 5, 7))
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
             if n.op_type == "Conv" and int8_scope(n.name)]
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
