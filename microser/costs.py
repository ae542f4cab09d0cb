"""Costs of a student model, one definition each: params, trainable params, MACs, ONNX bytes, peak RAM.

Every number is measured on the graph that gets deployed: the model is
exported once with :func:`microser.onnxio.export_onnx` (BatchNorm folded,
onnxsim-simplified, parity-checked) and

- ``params`` (:func:`count_params`) counts the elements of that graph's
  constant tensors: learned weights plus the mel matrix and the window, dense.
  The STFT is an ONNX operator, so no DFT matrix is counted;
- ``trainable_params`` counts ``requires_grad`` PyTorch parameters (BatchNorm
  gamma/beta included, before folding);
- ``macs`` (:func:`count_macs`) are multiply-accumulates for one clip of
  ``input_seconds``, with thop's rules plus microser's rules for functional ops;
- ``onnx_bytes`` is the size of the fp32 ``.onnx`` file;
- ``ram_bytes`` / ``ram_bytes_fp32`` (:func:`ram_plan`) are the peak bytes of
  simultaneously live activations in the ONNX graph's execution order for one
  clip of ``input_seconds``, for the int8 deployment plan and for fp32.
  Budgets on RAM limit the int8 figure;
- ``instr`` is the instructions per second of audio of the generated int8 C
  library (x86-64, as valgrind callgrind counts them), predicted from the spec by
  :func:`microser.cgen.instr.predict_instructions`, a per-operator model calibrated
  against callgrind (no compile); ``inf`` for a model without an int8 C library
  (MobileNet, LayerNorm bodies), so an ``instr`` budget rejects it.
"""

from __future__ import annotations

import copy
import math
import tempfile
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import onnx
import torch

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.onnxio import export_onnx, ort_session

# ---- the record every trial stores ----


@dataclass(frozen=True)
class Costs:
    """All costs of one model at one input duration (``to_dict()`` is what a trial's ``costs`` attr holds)."""

    params: int  # constant-tensor elements of the BN-folded, simplified ONNX graph (float ones; see count_params)
    trainable_params: int  # requires_grad PyTorch parameters
    macs: int  # multiply-accumulates for one clip of input_seconds (count_macs)
    onnx_bytes: int  # fp32 .onnx file size
    ram_bytes: int  # peak live activation bytes, int8 deployment plan (what RAM budgets limit)
    ram_bytes_fp32: int  # the same plan with every activation in float32
    input_seconds: float  # duration at which macs and RAM were measured
    instr: float = math.inf  # int8 C instructions per audio second (cgen.instr.predict_instructions); inf: no int8 C

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CostReport:
    """Costs plus the two RAM plans behind them (what ``microser describe`` shows)."""

    name: str  # the spec's summary line, or the model class name
    costs: Costs
    plan: "RamPlan"  # int8 plan
    plan_fp32: "RamPlan"

    def to_dict(self) -> dict:
        return {"name": self.name, **self.costs.to_dict(), "ram_peak_step": self.plan.peak_step,
                "ram_peak_step_fp32": self.plan_fp32.peak_step,
                "ram_live_at_peak": [t.to_dict() for t in self.plan.live]}


def measure_costs(spec_or_model, *, input_seconds: float = 1.0, workdir: str | PathLike | None = None) -> Costs:
    """Export ``spec_or_model`` once and measure every cost at ``input_seconds`` of 16 kHz audio.

    Args:
        spec_or_model: an ``ArchSpec``, a reference name / JSON string / JSON
            file accepted by ``resolve_spec``, or a ``torch.nn.Module`` mapping
            audio ``(B, T)`` to ``(B, 3)``.
        input_seconds: clip duration for MACs and RAM.
        workdir: folder for ``model.onnx``; a temporary folder when None.
    """
    return measure_report(spec_or_model, input_seconds=input_seconds, workdir=workdir).costs


def measure_report(spec_or_model, *, input_seconds: float = 1.0,
                   workdir: str | PathLike | None = None) -> CostReport:
    """:func:`measure_costs` plus the int8 and fp32 RAM plans (peak step, live tensors)."""
    if not input_seconds > 0:
        raise MicroserError(f"--input-seconds {input_seconds} must be > 0, e.g. 1 or 5")
    model, name = _as_model(spec_or_model)
    shortest = getattr(model, "min_seconds", 0.0)
    if input_seconds < shortest:
        raise MicroserError(f"--input-seconds {input_seconds:g} is shorter than the {shortest:g} s this model "
                            f"accepts: pass --input-seconds {shortest:g} or more")
    samples = seconds_to_samples(input_seconds)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="microser-costs-") as tmp:
            return _measure(model, name, input_seconds, samples, Path(tmp))
    return _measure(model, name, input_seconds, samples, Path(workdir))


def _measure(model, name, input_seconds, samples, workdir: Path) -> CostReport:
    path = export_onnx(model, workdir / "model.onnx")
    proto = onnx.load(path)
    plan8 = ram_plan(proto, samples, int8=True)
    plan32 = ram_plan(proto, samples, int8=False)
    costs = Costs(
        params=count_params(proto),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=count_macs(model, input_seconds),
        onnx_bytes=path.stat().st_size,
        ram_bytes=plan8.peak_bytes,
        ram_bytes_fp32=plan32.peak_bytes,
        input_seconds=float(input_seconds),
        instr=instructions(model),
    )
    return CostReport(name=name, costs=costs, plan=plan8, plan_fp32=plan32)


def instructions(model) -> float:
    """``instr``: predicted int8 C instructions per second of audio of ``model``'s spec, ``inf`` without one."""
    from microser.cgen.instr import predict_instructions
    from microser.cgen.plan import int8_c_unavailable

    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "family") or int8_c_unavailable(spec) is not None:
        return math.inf
    return float(predict_instructions(spec))


def _as_model(spec_or_model) -> tuple[torch.nn.Module, str]:
    if isinstance(spec_or_model, torch.nn.Module):
        spec = getattr(spec_or_model, "spec", None)
        return spec_or_model, spec.summary() if hasattr(spec, "summary") else type(spec_or_model).__name__
    from microser.models.spec import ArchSpec, build_model, resolve_spec

    spec = spec_or_model if isinstance(spec_or_model, ArchSpec) else resolve_spec(str(spec_or_model))
    return build_model(spec), spec.summary()


def seconds_to_samples(input_seconds: float) -> int:
    """Samples in ``input_seconds`` of audio at the package sample rate (rounded)."""
    return max(int(round(float(input_seconds) * SAMPLE_RATE)), 1)


# ---- params ----


def _load(onnx_model) -> onnx.ModelProto:
    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model
    if isinstance(onnx_model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(onnx_model))
    path = Path(onnx_model)
    if not path.is_file():
        raise MicroserError(f"ONNX model {path} does not exist: expected a .onnx file; "
                            "export one with microser.onnxio.export_onnx")
    return onnx.load(path)


def _constant_tensors(graph: onnx.GraphProto) -> dict[str, tuple[int, int]]:
    """``name -> (elements, onnx dtype)`` of initializers and Constant-node outputs."""
    out = {t.name: (int(np.prod(t.dims, dtype=np.int64)), t.data_type) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name in ("value", "sparse_value"):
                t = attr.t if attr.name == "value" else attr.sparse_tensor.values
                dims = attr.t.dims if attr.name == "value" else attr.sparse_tensor.dims
                out[node.output[0]] = (int(np.prod(dims, dtype=np.int64)), t.data_type)
            elif attr.name == "value_float":
                out[node.output[0]] = (1, onnx.TensorProto.FLOAT)
            elif attr.name == "value_floats":
                out[node.output[0]] = (len(attr.floats), onnx.TensorProto.FLOAT)
            elif attr.name == "value_int":
                out[node.output[0]] = (1, onnx.TensorProto.INT64)
            elif attr.name == "value_ints":
                out[node.output[0]] = (len(attr.ints), onnx.TensorProto.INT64)
    return out


def count_params(onnx_model) -> int:
    """Elements of every constant tensor (initializers and Constant nodes) of an ONNX graph, int64 ones excepted.

    On the graph :func:`microser.onnxio.export_onnx` writes (BatchNorm folded
    into conv weight + bias, simplified) this is what the deployed model
    stores: learned weights, the mel matrix and the window, counted dense,
    plus the few float scalars of the front-end (epsilons, log scale). The
    STFT is an ONNX operator, so no DFT matrix appears. int64 tensors are
    excluded: ONNX uses int64 only for shapes, axes and indices (graph
    metadata, not stored data). int8/int32 tensors of a quantized graph count.

    Args:
        onnx_model: ``onnx.ModelProto``, serialized bytes or a file path.
    """
    graph = _load(onnx_model).graph
    return sum(n for n, dtype in _constant_tensors(graph).values() if dtype != onnx.TensorProto.INT64)


# ---- MACs ----

# thop's per-layer rules, except BatchNorm: export_onnx folds it into the preceding conv, so it costs nothing.
def _zero_macs(module, inputs, output) -> None:
    module.total_ops += torch.zeros(1, dtype=torch.float64)


_CUSTOM_THOP_RULES = {
    torch.nn.BatchNorm1d: _zero_macs,
    torch.nn.BatchNorm2d: _zero_macs,
    torch.nn.BatchNorm3d: _zero_macs,
}


def stft_macs(n_fft: int, frames: int) -> int:
    """MACs of an STFT computed as an FFT: ``frames * (n_fft + round(2 * n_fft * log2(n_fft)))``.

    Per frame: ``n_fft`` window multiplies, then a radix-2 FFT of
    ``(n_fft / 2) * log2(n_fft)`` complex butterflies, each one complex
    multiply (4 real MACs). For an ``n_fft`` that is not a power of two the
    same formula with the real ``log2`` stands for a mixed-radix FFT. The
    power spectrum that follows (``z * z``) is counted where it is computed.
    The firmware runs an FFT, not a DFT matrix product.

    >>> stft_macs(64, 1)  # 64 + 4 * 32 * 6
    832
    """
    return int(frames) * (int(n_fft) + int(round(2 * n_fft * math.log2(n_fft))))


class _FunctionalMacs(torch.overrides.TorchFunctionMode):
    """Counts MACs of functional torch calls on activations made outside any layer that thop already counts.

    An activation is a tensor computed from the input audio (tracked through
    every torch call); calls on constants alone (parameters, buffers, their
    reshapes) cost nothing, as export folds them. Rules (one MAC = one
    multiply-accumulate):

    - ``matmul``/``@``/``mm``/``bmm``: ``numel(out) * K`` (K = the contracted size),
      e.g. the mel matrix product and the Gram product;
    - ``einsum`` of two operands: the product of the sizes of all indices;
    - ``conv1d/2d/3d``: ``numel(out) * (C_in / groups) * prod(kernel)``;
      ``linear``: ``numel(out) * in_features`` (thop's conv/linear rules);
    - ``stft``: :func:`stft_macs` per signal;
    - ``softmax``: thop's rule, ``rows * (3 n - 1)``;
    - ``mul``/``*`` of two activations: one MAC per output element, e.g.
      attention weights times values or a squeeze-excitation gate. Products
      with constants (scales, which deployment folds like BatchNorm) and other
      elementwise ops are free.
    """

    def __init__(self, audio: torch.Tensor):
        super().__init__()
        self.total = 0
        self.depth = 0  # > 0 while inside a layer that thop counts
        self.activations: dict[int, torch.Tensor] = {id(audio): audio}  # holding them keeps ids unique
        t, F = torch.Tensor, torch.nn.functional
        self.matmuls = {torch.matmul, t.matmul, t.__matmul__, torch.mm, t.mm, torch.bmm, t.bmm}
        self.convs = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
        self.softmaxes = {torch.softmax, F.softmax, t.softmax}
        self.muls = {torch.mul, t.mul, t.__mul__, t.__rmul__}

    def _is_activation(self, x) -> bool:
        return isinstance(x, torch.Tensor) and self.activations.get(id(x)) is x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(self._is_activation(x) for x in torch.utils._pytree.tree_leaves((args, kwargs))):
            for x in torch.utils._pytree.tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    self.activations[id(x)] = x
            if self.depth == 0:
                self.total += self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> int:
        F = torch.nn.functional
        if func in self.matmuls:
            return out.numel() * args[0].shape[-1]
        if func in self.convs:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            return out.numel() * int(np.prod(weight.shape[1:]))
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            return out.numel() * weight.shape[-1]
        if func in (torch.stft, torch.Tensor.stft):
            n_fft = args[1] if len(args) > 1 else kwargs["n_fft"]
            frames = out.shape[-1] if out.is_complex() else out.shape[-2]
            signals = int(np.prod(args[0].shape[:-1]))
            return signals * stft_macs(n_fft, frames)
        if func in self.softmaxes:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            n = out.shape[dim]
            return (out.numel() // n) * (3 * n - 1)
        if func is torch.einsum:
            return _einsum_macs(args, out)
        if func in self.muls and len(args) == 2 and all(self._is_activation(a) and a.numel() > 1 for a in args):
            return out.numel()
        return 0


def _einsum_macs(args, out) -> int:
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    if len(operands) != 2 or "..." in equation:
        return 0 if len(operands) < 2 else int(out.numel() * max(o.shape[-1] for o in operands))
    sizes: dict[str, int] = {}
    for term, op in zip(equation.split("->")[0].split(","), operands):
        sizes.update(zip(term.strip(), op.shape))
    return int(np.prod(list(sizes.values())))


def count_macs(model: torch.nn.Module, input_seconds: float = 1.0) -> int:
    """Multiply-accumulates of one forward pass on one clip of ``input_seconds`` of audio.

    Layers are counted by thop (conv: ``numel(out) * C_in/groups * prod(kernel)``,
    linear: ``numel(out) * in_features``, its norm/softmax/pool rules),
    except BatchNorm, which counts 0 because the exported graph folds it into
    the preceding conv. Everything computed functionally outside those layers
    (STFT, mel matmul, attention pooling, Gram product, ...) is counted by the
    rules of :class:`_FunctionalMacs`, so nothing functional counts as zero.
    The model is profiled on a deep copy, in eval mode, batch 1.
    """
    import thop
    from thop.profile import register_hooks

    model = copy.deepcopy(model).eval()
    audio = torch.zeros(1, seconds_to_samples(input_seconds))
    audio.normal_(generator=torch.Generator().manual_seed(0))
    counter = _FunctionalMacs(audio)
    rules = {**register_hooks, **_CUSTOM_THOP_RULES}
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)

    def enter(module, inputs):
        counter.depth += 1

    def leave(module, inputs, output):
        counter.depth -= 1

    for module in model.modules():
        if type(module) in rules and not isinstance(module, containers):
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)
    with counter:
        thop_macs, _ = thop.profile(model, inputs=(audio,), custom_ops=_CUSTOM_THOP_RULES, verbose=False)
    return int(round(thop_macs)) + int(counter.total)


# ---- peak RAM ----


@dataclass(frozen=True)
class LiveTensor:
    """One activation alive at a step of the plan."""

    name: str
    shape: tuple[int, ...]
    bytes_per_element: int
    bytes: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RamPlan:
    """Tensor-liveness plan of one inference; ``peak_bytes`` is the RAM cost."""

    peak_bytes: int
    peak_step: str  # name of the node executing at the peak (op type and index when unnamed)
    live: tuple[LiveTensor, ...]  # activations alive at the peak step, largest first
    step_bytes: tuple[int, ...]  # live bytes at every node, in execution order
    step_names: tuple[str, ...]  # the node at every step
    input_samples: int
    int8: bool


def ram_plan(onnx_model, input_samples: int, *, int8: bool = True) -> RamPlan:
    """Peak bytes of simultaneously live activation tensors for one clip of ``input_samples``.

    Model: nodes run one at a time in the graph's order (ONNX requires it to
    be topological). A tensor is live from the step of the node that produces
    it through the step of its last consumer; the graph input is live from
    step 0 through its last consumer, graph outputs through the last step. A
    tensor nobody consumes is live only at its own step. ``Shape`` and
    ``Size`` read only metadata, so they do not extend a tensor's life.

    Reuse rule: **no in-place reuse**, an output never shares memory with its
    inputs (also for elementwise ops such as ReLU); at a node's step its
    inputs and outputs are all live. Placement is ideal (no fragmentation).
    Weights (initializers, Constant nodes) are excluded: they sit in flash.

    Bytes per element: in the int8 plan (``int8=True``, the deployment
    split: front-end float, its output quantized, conv stack int8, pooling head
    float) float tensors produced by nodes whose name starts with ``/body/``,
    and the float activations the first ``/body/`` node reads (the front-end's
    final output), take 1 byte; every other activation takes its dtype's size
    (4 for float32, 8 for int64 shape tensors). With ``int8=False`` every
    activation takes its dtype's size.

    Shapes come from ONNX shape inference with the input bound to
    ``(1, input_samples)``; if that leaves a shape unknown, onnxruntime runs
    the graph once and reports the actual shapes.

    Args:
        onnx_model: ``onnx.ModelProto``, bytes or path of a graph with one
            input ``(batch, samples)``, node names as export_onnx keeps them.
        input_samples: audio samples of the clip (batch 1).
        int8: the int8 deployment plan (True) or all-float (False).
    """
    proto = _load(onnx_model)
    graph = proto.graph
    constants = set(_constant_tensors(graph))
    inputs = [i.name for i in graph.input if i.name not in constants]
    nodes = [n for n in graph.node if n.op_type != "Constant"]
    shapes = _activation_shapes(proto, inputs, int(input_samples))

    born: dict[str, int] = {name: 0 for name in inputs}
    last: dict[str, int] = {name: 0 for name in inputs}
    for step, node in enumerate(nodes):
        for name in node.output:
            if name:
                born[name] = last[name] = step
    for step, node in enumerate(nodes):
        if node.op_type in ("Shape", "Size"):
            continue
        for name in node.input:
            if name in born:
                last[name] = max(last[name], step)
    for out in graph.output:
        if out.name in born:
            last[out.name] = len(nodes) - 1

    quantized: set[str] = set()
    if int8:
        body = [n for n in nodes if n.name.startswith("/body/")]
        if body:
            quantized.update(name for name in body[0].input if name in born)
            quantized.update(name for n in body for name in n.output if name)
        quantized = {name for name in quantized if shapes[name][1] in _FLOAT_TYPES}

    def live_tensor(name: str) -> LiveTensor:
        shape, dtype = shapes[name]
        size = 1 if name in quantized else _itemsize(dtype)
        return LiveTensor(name, shape, size, int(np.prod(shape, dtype=np.int64)) * size)

    tensors = {name: live_tensor(name) for name in born}
    step_bytes = []
    for step in range(len(nodes)):
        step_bytes.append(sum(t.bytes for name, t in tensors.items() if born[name] <= step <= last[name]))
    if not step_bytes:
        raise MicroserError("the ONNX graph has no nodes: expected an exported model; "
                            "export one with microser.onnxio.export_onnx")
    peak = int(np.argmax(step_bytes))
    live = sorted((t for name, t in tensors.items() if born[name] <= peak <= last[name]), key=lambda t: -t.bytes)
    names = tuple(node.name or f"{node.op_type}#{step}" for step, node in enumerate(nodes))
    return RamPlan(
        peak_bytes=int(step_bytes[peak]),
        peak_step=names[peak],
        live=tuple(live),
        step_bytes=tuple(int(b) for b in step_bytes),
        step_names=names,
        input_samples=int(input_samples),
        int8=bool(int8),
    )


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _itemsize(dtype: int) -> int:
    return int(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype)).itemsize)


def _activation_shapes(proto: onnx.ModelProto, inputs: list[str], samples: int) -> dict[str, tuple[tuple, int]]:
    """``name -> (static shape, onnx dtype)`` of every activation for a batch-1 input of ``samples``."""
    bound = onnx.ModelProto.FromString(proto.SerializeToString())
    for info in bound.graph.input:
        if info.name in inputs:
            dims = info.type.tensor_type.shape.dim
            if len(dims) != 2:
                raise MicroserError(f"ONNX input {info.name!r} has rank {len(dims)}: expected (batch, samples) "
                                    "audio; export the model with microser.onnxio.export_onnx")
            dims[0].dim_value, dims[1].dim_value = 1, samples
    input_info = {i.name: i for i in bound.graph.input}
    wanted = set(inputs) | {o for n in bound.graph.node if n.op_type != "Constant" for o in n.output if o}
    try:
        inferred = onnx.shape_inference.infer_shapes(bound, strict_mode=False, data_prop=True)
        infos = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
    except Exception:  # noqa: BLE001 - fall back to running the graph
        infos = list(input_info.values())
    shapes = {}
    for info in infos:
        tt = info.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        if info.name in wanted and tt.HasField("shape") and None not in dims and tt.elem_type:
            shapes[info.name] = (dims, tt.elem_type)
    missing = wanted - set(shapes)
    if missing:
        shapes.update(_shapes_from_ort(bound, sorted(missing), samples))
    return shapes


def _shapes_from_ort(proto: onnx.ModelProto, names: list[str], samples: int) -> dict[str, tuple[tuple, int]]:
    """Run onnxruntime once with ``names`` exposed as outputs; their actual shapes and dtypes."""
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    session = ort_session(probe)
    feeds = {i.name: np.zeros((1, samples), np.float32) for i in session.get_inputs()}
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for name in names:
        if name in feeds:
            results[name] = feeds[name]
    return {n: (tuple(np.asarray(results[n]).shape),
                onnx.helper.np_dtype_to_tensor_dtype(np.asarray(results[n]).dtype)) for n in names}
