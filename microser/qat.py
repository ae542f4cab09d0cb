"""Quantization-aware fine-tuning (QAT): fake int8 through the whole network after the log-mel, and its QDQ graph.

The int8 contract is the one of post-training int8 (``microser.quantize``),
extended to every operator after the front-end's log-mel:

* weights of every Conv and of the Linear head: int8, **symmetric per output
  channel**, ``scale_c = max|W_c| / 127`` recomputed from the float weights at
  every step (so the exported int8 weights are exactly the ones trained
  with); biases int32 at ``input scale x weight scale`` (not fake-quantized in
  training: their rounding error is below 1e-6 of the output);
* activations: int8 per tensor, asymmetric, at every quantization point of
  the model (``q_*`` modules: the log-mel, every block output, every value of
  the pooling head, the features and the output; see
  ``microser.models.wav2small``); ``scale = (max(hi, 0) - min(lo, 0)) / 255``,
  ``zero_point = round(-128 - min(lo, 0) / scale)`` as onnxruntime computes them;
* ranges ``lo, hi``: MinMax calibration of the float model (after BatchNorm
  folding) on calibration crops of the training split plus the input domain's
  two extremes (digital silence and a crop driven into full-scale clipping,
  ``quantize.extreme_crops``); during the fine-tuning the ranges keep growing
  to cover what each point sees in training (running MinMax), so the last
  step trains with the exported scales. The log-mel's lower bound is the
  front-end's floor (``10 log10(floor)``), exactly on code -128
  (``quantize.floor_qparams``), so silence is always in range and exact; the
  output's range is widened by its own width on both sides
  (``OUTPUT_WIDEN``: outputs past the targets on clipping stay representable);
* silence anchor (:class:`SilenceAnchor`): the fine-tuning loss also keeps the
  output on digital silence where the float model put it;
* straight-through gradients: ``d fq(x) / dx = 1`` where ``x`` is inside the
  representable range, 0 outside; the fake quantizer computes exactly what
  onnxruntime's QuantizeLinear/DequantizeLinear do (``x / scale``, round half
  to even, clamp, back), so PyTorch and the int8 graph agree up to float
  accumulation order.

BatchNorm is folded into its conv before calibration (the deployed graph has
no BatchNorm, so the trained weights are the deployed ones); LayerNorm stays
float between two quantization points.

The int8 graph (:func:`export_int8`): the fake-quantized model exports with
a QuantizeLinear/DequantizeLinear pair per quantization point (one scale and
zero point shared by the pair), then every Conv/Gemm weight becomes an int8
initializer behind a DequantizeLinear (per channel, axis 0, no zero point),
every bias int32 likewise, and a ReLU whose output goes only to a
QuantizeLinear with zero point -128 is removed (the clamp at -128 is the
ReLU), as onnxruntime's QDQ quantizer writes it for microser's C generator.

QAT covers the Wav2Small family (the MobileNet family has no quantization
points; compress it with post-training int8).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.frontends import Frontend
from microser.graph import constants, wiring
from microser.models.spec import FAMILIES, build_model
from microser.models.wav2small import FrameLayerNorm
from microser.onnxio import export_onnx, ort_session, run_onnx
from microser.quantize import extreme_crops, floor_qparams

QMIN, QMAX = -128, 127  # int8 activations
WMAX = 127  # int8 weights use -127..127 (symmetric)
# QAT fine-tuning learning rate: lower than distill's from-scratch 3e-3; the weights are trained already and only
# have to settle on the int8 grid (compress.FINETUNE_LR is the float fine-tuning one).
QAT_LR = 5e-4
# The output point's range is the calibrated one widened by its own width on both sides: outputs past the targets on
# unusual input (full-scale clipping gave 1.5 on 0..1 targets) stay representable; a step of 3 x width / 255
# (about 0.015 for outputs in 0..1.3) costs at most 0.008 per output.
OUTPUT_WIDEN = 1.0


# ---- the fake quantizer ----


class _FakeQuant(torch.autograd.Function):
    """onnxruntime's ``DequantizeLinear(QuantizeLinear(x))`` with a straight-through gradient inside the range."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int):
        s = torch.tensor(scale, dtype=x.dtype)
        q = torch.round(x / s) + zero_point  # round half to even, as QuantizeLinear
        ctx.save_for_backward((q >= QMIN) & (q <= QMAX))
        return (torch.clamp(q, QMIN, QMAX) - zero_point) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of an int8 asymmetric range, as onnxruntime's quantizer computes them (float32)."""
    rmin, rmax = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    if rmax == rmin:
        return 1.0, 0
    scale = np.float32((rmax - rmin) / np.float32(QMAX - QMIN))
    zero_point = int(np.clip(np.round(np.float32(QMIN) - rmin / scale), QMIN, QMAX))
    return float(scale), zero_point


class FakeQuant(nn.Module):
    """An activation quantization point: ``"observe"`` (MinMax calibration, passes x), ``"quant"``, ``"off"``.

    In ``"quant"`` mode during training (``module.training``) the range keeps
    growing to cover what the point sees (running MinMax: never shrinks), and
    scale and zero point follow before quantizing, so the last training step
    used exactly the exported ones; in eval mode they are fixed.
    ``lo_fixed`` pins the range's lower end (the log-mel floor): calibration
    then only moves ``hi``.
    """

    def __init__(self, name: str, lo_fixed: float | None = None, widen: float = 0.0):
        super().__init__()
        self.name = name
        self.lo_fixed = lo_fixed
        self.widen = widen  # the range is widened by this many of its own widths on both sides
        self.mode = "observe"
        self.track = True  # grow the range in training mode ("quant"); off while the anchors run
        self.lo, self.hi = (float("inf") if lo_fixed is None else lo_fixed), float("-inf")
        self.scale, self.zero_point = 1.0, 0

    def freeze(self) -> None:
        self.scale, self.zero_point = self.qparams()
        self.mode = "quant"

    def qparams(self) -> tuple[float, int]:
        """Scale and zero point of :meth:`range`; with ``lo_fixed`` < 0 (the log-mel floor) the floor is exactly on
        the grid (``quantize.floor_qparams``)."""
        if self.lo_fixed is not None and self.lo_fixed < 0:
            return floor_qparams(*self.range())
        return qparams(*self.range())

    def range(self) -> tuple[float, float]:
        """The quantized range: the observed ``lo, hi`` widened by ``widen`` widths on both sides."""
        width = self.hi - self.lo
        return self.lo - self.widen * width, self.hi + self.widen * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            with torch.no_grad():
                if self.lo_fixed is None:
                    self.lo = min(self.lo, float(x.min()))
                self.hi = max(self.hi, float(x.max()))
            return x
        if self.mode == "quant":
            if self.training and self.track:
                lo = self.lo if self.lo_fixed is not None else min(self.lo, float(x.detach().min()))
                hi = max(self.hi, float(x.detach().max()))
                if (lo, hi) != (self.lo, self.hi):
                    self.lo, self.hi = lo, hi
                    self.scale, self.zero_point = self.qparams()
            return _FakeQuant.apply(x, self.scale, self.zero_point)
        if self.mode == "export":  # torch's own op: the ONNX exporter writes it as QuantizeLinear + DequantizeLinear
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, QMIN, QMAX)
        return x

    def to_dict(self) -> dict:
        return {"name": self.name, "lo": self.lo, "hi": self.hi, "scale": self.scale, "zero_point": self.zero_point}


def weight_scales(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scales ``max|W_c| / 127`` (float32; 1 for an all-zero channel)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).max(1).values
    return torch.where(amax > 0, amax / WMAX, torch.ones_like(amax))


class WeightFakeQuant(nn.Module):
    """Parametrization of a Conv/Linear weight: int8 symmetric per output channel (``enabled``), else identity."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = weight_scales(w).reshape((-1,) + (1,) * (w.ndim - 1))
        q = torch.clamp(torch.round(w / s), -WMAX, WMAX)
        return w + (q * s - w).detach()  # straight-through: the gradient reaches the float weights unchanged


# ---- preparing a model ----


def check_qat(spec) -> None:
    """MicroserError unless ``spec``'s family has quantization points (Wav2Small)."""
    if not FAMILIES[spec.family].qat:
        raise MicroserError(f"quantization-aware training is not available for family {spec.family!r}: its model "
                            "has no quantization points; compress it without --qat (post-training int8)")


def fold_batchnorm_(model) -> None:
    """Fold every body BatchNorm into its conv in place: conv gets the bias, the norm becomes Identity."""
    for block in model.body:
        if isinstance(block.norm, nn.BatchNorm2d):
            bn, conv = block.norm, block.conv
            with torch.no_grad():
                s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                bias = bn.bias - bn.running_mean * s
                if conv.bias is not None:
                    bias = bias + conv.bias * s
                conv.weight.mul_(s.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias.detach().clone())
            block.norm = nn.Identity()


def prepare(model, spec) -> nn.Module:
    """A copy of a trained Student ready for QAT: BatchNorm folded, a FakeQuant at every ``q_*`` point (observing),
    every Conv/Linear weight fake-quantized. Calibrate it with :func:`calibrate` before training."""
    check_qat(spec)
    qmodel = copy.deepcopy(model).eval()
    fold_batchnorm_(qmodel)
    for name, module in list(qmodel.named_modules()):
        for child_name, child in list(module.named_children()):
            if not child_name.startswith("q") or not isinstance(child, nn.Identity):
                continue
            if child_name == "q_conv" and not _reads_layernorm(module):
                continue
            full = f"{name}.{child_name}" if name else child_name
            lo = None
            if isinstance(module, Frontend) and module.log:
                lo = float(10.0 * torch.log10(torch.tensor(module.floor, dtype=torch.float32)))  # as forward does
            setattr(module, child_name, FakeQuant(full, lo_fixed=lo, widen=OUTPUT_WIDEN if full == "head.q_out" else 0.0))
    for module in qmodel.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not _in_frontend(qmodel, module):
            parametrize.register_parametrization(module, "weight", WeightFakeQuant())
    return qmodel


def _reads_layernorm(block) -> bool:
    return isinstance(getattr(block, "norm", None), FrameLayerNorm)


def _in_frontend(qmodel, module) -> bool:
    return any(m is module for m in qmodel.frontend.modules())


def quant_points(qmodel) -> list[FakeQuant]:
    return [m for m in qmodel.modules() if isinstance(m, FakeQuant)]


def set_mode(qmodel, mode: str) -> None:
    """``"observe"``, ``"quant"`` or ``"off"`` for every activation point; weights quantized unless ``"off"``."""
    for q in quant_points(qmodel):
        q.mode = mode
    for m in qmodel.modules():
        if isinstance(m, WeightFakeQuant):
            m.enabled = mode != "off"


ANCHOR_WEIGHT = 0.1  # weight of the silence anchor's MSE beside the training loss 1 - CCC + 0.5 MSE


class SilenceAnchor:
    """``distill.train(extra_loss=...)`` for QAT: keep the output on digital silence where the float model put it.

    No teacher labels silence, and QAT moves the weights: silence is a
    constant image (the floor everywhere) unlike any speech, its rounding
    errors do not average out, and without an anchor the int8 network drifts
    there (measured on wav2small-ref, 100 QAT steps on espeak-emo: 0.28 from
    its float twin, 1.3 from the model it started from; with the anchor 0.03
    and 0.02). The loss is ``weight`` x the MSE between the fake-quantized
    network's output on ``seconds`` of zeros and the float model's (before
    QAT), run with the ranges held (the anchor does not widen them).
    """

    def __init__(self, float_model, seconds: float, weight: float = ANCHOR_WEIGHT):
        self.x = torch.zeros(1, max(1, int(round(seconds * SAMPLE_RATE))))
        was = float_model.training
        float_model.eval()
        with torch.no_grad():
            self.y = float_model(self.x).detach()
        float_model.train(was)
        self.weight = weight

    def __call__(self, qmodel) -> torch.Tensor:
        points = quant_points(qmodel)
        for q in points:
            q.track = False
        try:
            out = qmodel(self.x)
        finally:
            for q in points:
                q.track = True
        return self.weight * torch.mean((out - self.y) ** 2)


def calibrate(qmodel, crops: Sequence[np.ndarray]) -> None:
    """MinMax ranges of every quantization point over ``crops`` and ``quantize.extreme_crops(crops)`` (float
    network, batch of one each), then freeze them and switch fake quantization on."""
    set_mode(qmodel, "observe")
    qmodel.eval()
    crops = [np.asarray(c, np.float32).reshape(-1) for c in crops]
    with torch.no_grad():
        for c in crops + extreme_crops(crops):
            qmodel(torch.from_numpy(np.asarray(c, np.float32))[None])
    for module in list(qmodel.modules()):  # points this architecture never runs (the Gram's without Gram) go
        for child_name, child in list(module.named_children()):
            if isinstance(child, FakeQuant) and not np.isfinite(child.hi):
                setattr(module, child_name, nn.Identity())
    for q in quant_points(qmodel):
        q.freeze()
    set_mode(qmodel, "quant")


def to_student(qmodel, spec) -> nn.Module:
    """A plain ``build_model(spec)`` Student computing ``qmodel``'s float network (fake quantization off).

    Folded convs go back into the spec's BatchNorm form: the BatchNorm is
    made an exact identity plus the folded bias (mean 0, gamma 1, and a
    variance whose float32 sum with eps is exactly 1).
    """
    student = build_model(spec)
    # the float (latent) weights; removing the parametrizations instead would change the shared module class
    state = {k.replace(".parametrizations.weight.original", ".weight"): v.detach().clone()
             for k, v in qmodel.state_dict().items()}
    for i, block in enumerate(student.body):
        if isinstance(block.norm, nn.BatchNorm2d):
            bias = state.pop(f"body.{i}.conv.bias")
            eps = torch.tensor(block.norm.eps, dtype=torch.float32)
            var = torch.tensor(1.0, dtype=torch.float32) - eps
            while float(var + eps) != 1.0:
                var = torch.nextafter(var, torch.tensor(2.0) if float(var + eps) < 1.0 else torch.tensor(0.0))
            n = bias.numel()
            state[f"body.{i}.norm.weight"] = torch.ones(n)
            state[f"body.{i}.norm.bias"] = bias
            state[f"body.{i}.norm.running_mean"] = torch.zeros(n)
            state[f"body.{i}.norm.running_var"] = torch.full((n,), float(var))
            state[f"body.{i}.norm.num_batches_tracked"] = torch.tensor(0)
    student.load_state_dict(state, strict=True)
    return student.eval()


# ---- the int8 graph ----


@dataclass(frozen=True)
class QatExport:
    """What :func:`export_int8` wrote."""

    fp32_path: str
    int8_path: str
    points: list[dict]            # FakeQuant.to_dict() per activation point
    torch_vs_int8_max_abs: float  # fake-quantized PyTorch vs the int8 graph, random audio (float accumulation order)

    def to_dict(self) -> dict:
        return asdict(self)


def export_int8(qmodel, spec, fp32_path, int8_path, *, sample_seconds: float = 1.0) -> QatExport:
    """Write the float graph of ``qmodel`` (``onnxio.export_onnx`` of :func:`to_student`) and its int8 QDQ graph.

    The int8 graph: ``export_onnx`` of that Student with ``qmodel``'s fake
    quantizers at its ``q_*`` points (QDQ pairs at the activation points, float
    weights), then :func:`quantize_weights`. Both exports go through the plain
    Student: no weight parametrization is traced.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    student = to_student(qmodel, spec)
    export_onnx(student, fp32_path, sample_seconds=sample_seconds)
    quantized = copy.deepcopy(student)
    points = {q.name: q for q in quant_points(qmodel)}
    for name, module in list(quantized.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in points:
                q = copy.deepcopy(points[full]).eval()
                q.mode = "export"
                setattr(module, child_name, q)
    with tempfile.TemporaryDirectory() as tmp:
        qdq = onnx.load(str(export_onnx(quantized, Path(tmp) / "qdq.onnx", check=False,
                                        sample_seconds=sample_seconds)))
    int8 = quantize_weights(qdq)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(int8, str(int8_path))
    diff = _torch_vs_graph(qmodel, int8, int(sample_seconds * SAMPLE_RATE))
    return QatExport(str(fp32_path), str(int8_path), [q.to_dict() for q in quant_points(qmodel)], diff)


def _torch_vs_graph(qmodel, proto, n: int) -> float:
    x = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) - 0.5
    with torch.no_grad():
        want = qmodel.eval()(x).numpy()
    return float(np.abs(run_onnx(ort_session(proto), x.numpy()) - want).max())


def quantize_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The QDQ graph with int8 weights and int32 biases behind DequantizeLinear, ReLUs folded into their clamp.

    For every Conv / Gemm whose input 0 is a DequantizeLinear output (or a
    Flatten/Concat of such outputs: the pooled features) and whose weight is
    a float constant: weight -> int8 ``round(W / s)`` with ``s = max|W_c| /
    127`` per output channel (axis 0; Gemm must have ``transB=1``), bias ->
    int32 ``round(b / (s_in * s))`` (``s_in``: the input's scale, of its first
    part for a concatenation); both read through a
    DequantizeLinear with no zero point (0). A Relu whose every consumer is a
    QuantizeLinear with zero point -128 is removed. The QuantizeLinear and
    DequantizeLinear of one point share one scale and zero point initializer.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    _share_qparams(graph)
    consts = constants(graph)
    producer, _ = wiring(graph.node)
    inits = {t.name: t for t in graph.initializer}
    new_inits, new_nodes = [], []
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in consts:
            continue
        dq_in = _dequantized_from(node.input[0], producer)
        if not dq_in:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if "transB" not in attrs or attrs["transB"].i != 1:
                raise MicroserError(f"Gemm {node.name!r} has transB != 1: expected torch.nn.Linear's export")
        s_in = float(np.asarray(consts[dq_in[0].input[1]]).reshape(()))  # several parts (concat): the first's
        w = np.asarray(consts[node.input[1]], np.float32)
        s = weight_scales(torch.from_numpy(w.copy())).numpy().astype(np.float32)
        wq = np.clip(np.round(w / s.reshape((-1,) + (1,) * (w.ndim - 1))), -WMAX, WMAX).astype(np.int8)
        base = node.name or node.output[0]
        new_inits += [numpy_helper.from_array(wq, f"{base}/weight_q"), numpy_helper.from_array(s, f"{base}/weight_s")]
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}/weight_q", f"{base}/weight_s"],
                                          [f"{base}/weight"], name=f"{base}/weight/DequantizeLinear", axis=0))
        node.input[1] = f"{base}/weight"
        if len(node.input) > 2 and node.input[2]:
            b = np.asarray(consts[node.input[2]], np.float32)
            sb = (np.float32(s_in) * s).astype(np.float32)
            bq = np.round(b.astype(np.float64) / sb).astype(np.int32)
            new_inits += [numpy_helper.from_array(bq, f"{base}/bias_q"), numpy_helper.from_array(sb, f"{base}/bias_s")]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}/bias_q", f"{base}/bias_s"],
                                              [f"{base}/bias"], name=f"{base}/bias/DequantizeLinear", axis=0))
            node.input[2] = f"{base}/bias"
    _fold_relus(graph)
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for n in [n for n in graph.node if n.op_type == "Constant"]:  # stored as initializers: fewer bytes per value
        graph.node.remove(n)
        if n.output[0] in used:
            value = next(a for a in n.attribute if a.name == "value").t
            value.name = n.output[0]
            graph.initializer.append(value)
    del inits
    return proto


def _dequantized_from(name: str, producer: dict) -> list:
    """The DequantizeLinear nodes whose outputs reach ``name`` through data-moving ops only (Flatten, Concat, ...)."""
    node = producer.get(name)
    if node is None:
        return []
    if node.op_type == "DequantizeLinear":
        return [node]
    if node.op_type not in ("Flatten", "Reshape", "Concat", "Transpose", "Squeeze", "Unsqueeze"):
        return []
    found = []
    for i in (node.input if node.op_type == "Concat" else node.input[:1]):  # the others are shapes / axes
        part = _dequantized_from(i, producer)
        if not part:
            return []
        found += part
    return found


def _share_qparams(graph: onnx.GraphProto) -> None:
    """Point every activation DequantizeLinear at its QuantizeLinear's scale and zero point (one copy each)."""
    producer, _ = wiring(graph.node)
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[1], node.input[2] = q.input[1], q.input[2]


def _fold_relus(graph: onnx.GraphProto) -> None:
    consts = constants(graph)
    _, consumers = wiring(graph.node)
    outputs = {o.name for o in graph.output}
    for relu in [n for n in graph.node if n.op_type == "Relu"]:
        users = consumers.get(relu.output[0], [])
        if relu.output[0] in outputs or not users:
            continue
        if all(u.op_type == "QuantizeLinear" and u.input[0] == relu.output[0] and len(u.input) > 2
               and u.input[2] in consts and int(np.asarray(consts[u.input[2]]).reshape(())) == QMIN for u in users):
            for u in users:
                u.input[0] = relu.input[0]
            graph.node.remove(relu)
