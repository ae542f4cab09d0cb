"""The one ONNX exporter (BatchNorm folded, onnxsim-simplified, parity-checked) and onnxruntime helpers.

Every stage that writes or runs an ONNX model goes through here, so that the
graph that costs are measured on is the graph that gets deployed:

    path = export_onnx(model, "model.onnx")          # (B, T) audio -> (B, 3) "adv"
    session = ort_session(path)
    adv = run_onnx(session, audio_batch)             # np.ndarray (B, 3)
    scores = onnx_ccc(path, cache, "valid")          # the graph's own CCC over a whole split

Node names are kept (``/frontend/...``, ``/body/...``, ``/head/...``): the RAM
planner (microser.costs) and the quantizer read them. Stripping names for the
firmware bundle is the export stage's job.

Tables that follow from a few numbers are not weights: the front-end's Hann
window and mel matrix are made in the graph by ONNX's ``HannWindow`` and
``MelWeightMatrix`` operators (:func:`generate_tables`), after simplification
(onnxsim would fold them back into stored constants).
"""

from __future__ import annotations

import io
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.graph import constants, generated_tensors, strip_doc_strings, wiring
from microser.metrics import ccc_report

INPUT_NAME = "audio"
OUTPUT_NAME = "adv"
PARITY_TOLERANCE = 1e-4  # max abs difference ORT vs PyTorch accepted by export_onnx


def export_onnx(
    model: torch.nn.Module,
    path: str | PathLike,
    *,
    opset: int = 17,
    check: bool = True,
    sample_seconds: float = 1.0,
) -> Path:
    """Export ``model`` (audio ``(B, T)`` -> ``(B, 3)``) to a deployable ONNX file and return its path.

    Steps, in order:

    1. eval mode (the previous mode is restored afterwards), legacy TorchScript
       exporter (``dynamo=False``; it maps ``torch.stft`` to ONNX ``STFT`` at
       opset >= 17), input ``"audio"`` with dynamic batch and samples axes,
       output ``"adv"`` with a dynamic batch axis;
    2. onnxsim simplification (constant folding, dead code), with the time
       axis left dynamic;
    3. BatchNorm folding: the exporter folds Conv+BN itself; any
       ``BatchNormalization`` left is folded into a preceding Conv or Gemm that
       only it consumes, or else replaced by a per-channel ``Mul`` + ``Add``,
       and the graph is simplified again. No ``BatchNormalization`` node remains;
    4. the front-ends' generated tables (window, mel matrix) put back as
       ``HannWindow`` / ``MelWeightMatrix`` nodes (:func:`generate_tables`);
    5. doc strings stripped (node names are kept);
    6. if ``check``: onnxruntime against PyTorch on random audio of batch 2 at
       two lengths (``sample_seconds`` and 1.37x that), max abs difference
       <= ``PARITY_TOLERANCE`` (1e-4), else :class:`MicroserError` naming the difference.

    Args:
        model: a module mapping float32 audio ``(B, T)`` to ``(B, D)``.
        path: where to write the ``.onnx`` file (parent folders are created).
        opset: ONNX opset, >= 17 (STFT).
        check: run the parity check.
        sample_seconds: audio duration used to trace and check.

    Returns:
        ``Path(path)``.
    """
    if opset < 17:
        raise MicroserError(f"ONNX opset {opset} has no STFT operator: expected opset >= 17; pass opset=17")
    if sample_seconds <= 0:
        raise MicroserError(f"sample_seconds={sample_seconds} must be > 0, e.g. 1.0")
    path = Path(path)
    n = max(int(round(sample_seconds * SAMPLE_RATE)), 1)
    was_training = model.training
    model.eval()
    try:
        proto = _trace(model, n, opset)
        proto = _simplify(proto)
        if any(node.op_type == "BatchNormalization" for node in proto.graph.node):
            proto = _simplify(fold_batchnorm(proto))
        proto = generate_tables(proto, _generated_tables(model))
        strip_doc_strings(proto)
        if check:
            for length in (n, int(n * 1.37) + 1):
                check_parity(model, proto, length)
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path)
    return path


def _trace(model: torch.nn.Module, n_samples: int, opset: int) -> onnx.ModelProto:
    """The legacy exporter's graph for ``model``, traced on random audio of batch 2."""
    audio = _random_audio(2, n_samples, seed=0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter and stft(return_complex=False) warn on every call
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (audio,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 1: "samples"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
            keep_initializers_as_inputs=True,  # True skips the exporter's deduplication of equal initializers
        )
    proto = onnx.load_from_string(buffer.getvalue())
    constant = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in constant]  # weights are constants, not inputs
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    return proto


def _simplify(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    # no deduplication of equal initializers: an untrained model's folded BN biases are all equal, a trained
    # one's are not, and the parameter count and file size must not depend on the weights' values
    simplified, ok = onnxsim.simplify(proto, skipped_optimizers=["eliminate_duplicate_initializer"])
    if not ok:
        raise MicroserError("onnxsim could not verify the simplified model: expected an equivalent graph; "
                            "report the model spec (spec.summary()) as a bug")
    return simplified


def _generated_tables(model: torch.nn.Module) -> list:
    from microser.frontends import Frontend

    return [t for m in model.modules() if isinstance(m, Frontend) for t in m.generated_tables()]


def generate_tables(proto: onnx.ModelProto, tables) -> onnx.ModelProto:
    """A copy of ``proto`` whose stored constants equal to a ``frontends.GeneratedTable`` are computed instead.

    Each constant tensor (initializer or ``Constant`` node output) whose
    float32 values equal a table's exactly is replaced by nodes that make it:
    ``MelWeightMatrix(n_mels, n_fft, sample_rate, fmin, fmax)``, or
    ``HannWindow(win_length)`` followed, when ``win_length < n_fft``, by a
    ``Pad`` to n_fft (zeros, centred). The operator's int64 inputs and float
    edges become scalar initializers. The new nodes go first (their inputs are
    all constant), named ``table.name`` + ``/op``. A table the graph does not
    hold raises MicroserError (it would stay stored and counted as weights).
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consts = {name: arr for name, arr in constants(graph).items()
              if name in constant_nodes or name in {t.name for t in graph.initializer}}
    new_nodes, new_inits = [], []
    for table in tables:
        want = np.asarray(table.values, np.float32)
        names = [name for name, arr in consts.items()
                 if arr.dtype == np.float32 and arr.shape == want.shape and np.array_equal(arr, want)]
        if not names:
            raise MicroserError(f"the exported graph holds no constant equal to the front-end's {table.op} table "
                                f"{want.shape}: expected the exporter to keep it as one tensor; report the model "
                                "spec as a bug")
        for k, name in enumerate(names):
            base = table.name + (f"_{k}" if k else "")
            nodes, inits = _table_nodes(table, base, name)
            new_nodes += nodes
            new_inits += inits
            if name in constant_nodes:
                graph.node.remove(constant_nodes[name])
            keep = [t for t in graph.initializer if t.name != name]
            del graph.initializer[:]
            graph.initializer.extend(keep)
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    return proto


def restore_generated_tables(reference: onnx.ModelProto, proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` (e.g. after onnxruntime's graph optimizer) with ``reference``'s table generators back.

    Optimizers fold ``HannWindow`` / ``MelWeightMatrix`` (and the window's
    ``Pad``) into stored constants named like the folded output. Every
    generator node of ``reference`` whose output ``proto`` now stores as a
    constant is put back (first in the graph, with its scalar inputs) and the
    stored copy removed, so the table is made, not stored, again.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    generated = generated_tensors(reference.graph)
    if not generated:
        return proto
    ref_inits = {t.name: t for t in reference.graph.initializer}
    ref_consts = {n.output[0]: n for n in reference.graph.node if n.op_type == "Constant"}
    stored = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    folded = {name for name in generated if name in stored}
    if not folded:
        return proto
    # the generator subgraphs that produce a folded tensor, with every node and constant they need
    producer, _ = wiring(reference.graph.node)
    nodes, needed = [], set()
    todo = list(folded)
    while todo:
        name = todo.pop()
        node = producer.get(name)
        if node is None or node.op_type == "Constant" or any(n is node for n in nodes):
            continue
        nodes.append(node)
        for i in node.input:
            if i in generated:
                todo.append(i)
            elif i:
                needed.add(i)
    order = {id(n): k for k, n in enumerate(reference.graph.node)}
    nodes.sort(key=lambda n: order[id(n)])
    remove = folded | {n.output[0] for n in nodes if n.output[0] not in folded}
    keep = [t for t in graph.initializer if t.name not in remove]
    have = {t.name for t in keep}
    keep += [ref_inits[i] for i in sorted(needed) if i in ref_inits and i not in have]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    rest = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in remove)]
    extra = [ref_consts[i] for i in sorted(needed) if i in ref_consts and i not in have]
    del graph.node[:]
    graph.node.extend(extra + nodes + rest)
    return proto


def _table_nodes(table, base: str, output: str) -> tuple[list, list]:
    """Nodes and scalar initializers that compute ``table`` into tensor ``output``."""
    def scalar(value, dtype, label):
        return numpy_helper.from_array(np.array(value, dtype), f"{base}/{label}")

    if table.op == "MelWeightMatrix":
        n_mels, n_fft, rate, fmin, fmax = table.args
        inits = [scalar(n_mels, np.int64, "num_mel_bins"), scalar(n_fft, np.int64, "dft_length"),
                 scalar(rate, np.int64, "sample_rate"), scalar(fmin, np.float32, "lower_edge_hertz"),
                 scalar(fmax, np.float32, "upper_edge_hertz")]
        return [helper.make_node("MelWeightMatrix", [t.name for t in inits], [output], name=base)], inits
    if table.op == "HannWindow":
        win, n_fft = table.args
        size = scalar(win, np.int64, "size")
        if win == n_fft:
            return [helper.make_node("HannWindow", [size.name], [output], name=base)], [size]
        left = (n_fft - win) // 2
        pads = numpy_helper.from_array(np.array([left, n_fft - win - left], np.int64), f"{base}/pads")
        return ([helper.make_node("HannWindow", [size.name], [f"{base}/window"], name=base),
                 helper.make_node("Pad", [f"{base}/window", pads.name], [output], name=f"{base}/Pad")],
                [size, pads])
    raise MicroserError(f"generated table op {table.op!r} is unknown: expected MelWeightMatrix or HannWindow")


# ---- BatchNorm folding ----


def fold_batchnorm(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``proto`` without ``BatchNormalization`` nodes (inference form).

    A BN with constant statistics computes ``y = x * s + b`` per channel with
    ``s = gamma / sqrt(var + eps)`` and ``b = beta - mean * s``. When its input
    is produced by a Conv or Gemm (constant weights, output used only by the
    BN) ``s`` and ``b`` are folded into that layer's weight and bias; otherwise
    the BN becomes ``Mul(x, s) + b`` with ``s``, ``b`` shaped ``(C, 1, ...)``.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    if not any(n.op_type == "BatchNormalization" for n in graph.node):
        return proto
    consts = constants(graph)
    producer = {o: node for node in graph.node for o in node.output}
    n_uses: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            n_uses[i] = n_uses.get(i, 0) + 1
    for o in graph.output:
        n_uses[o.name] = n_uses.get(o.name, 0) + 1
    ranks = _ranks(proto)

    new_nodes = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        x, gamma, beta, mean, var = node.input[:5]
        if any(name not in consts for name in (gamma, beta, mean, var)):
            raise MicroserError(f"BatchNormalization node {node.name!r} has non-constant statistics: expected an "
                                "eval-mode model; call model.eval() before exporting")
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        s = (consts[gamma] / np.sqrt(consts[var] + eps)).astype(np.float32)
        b = (consts[beta] - consts[mean] * s).astype(np.float32)
        prev = producer.get(x)
        if prev is not None and n_uses.get(x, 0) == 1 and _fold_into(graph, prev, s, b, consts):
            prev.output[0] = node.output[0]  # the folded layer now writes the BN's output
            continue
        rank = ranks.get(x)
        if rank is None:
            raise MicroserError(f"BatchNormalization node {node.name!r}: the rank of its input {x!r} is unknown: "
                                "expected shape inference to succeed; report the model spec as a bug")
        shape = (len(s),) + (1,) * (rank - 2)
        s_name, b_name, mid = node.name + "/scale", node.name + "/shift", node.name + "/scaled"
        graph.initializer.extend([numpy_helper.from_array(s.reshape(shape), s_name),
                                  numpy_helper.from_array(b.reshape(shape), b_name)])
        new_nodes.append(helper.make_node("Mul", [x, s_name], [mid], name=node.name + "/Mul"))
        new_nodes.append(helper.make_node("Add", [mid, b_name], [node.output[0]], name=node.name + "/Add"))
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def _fold_into(graph: onnx.GraphProto, node: onnx.NodeProto, s: np.ndarray, b: np.ndarray, consts: dict) -> bool:
    """Fold the per-channel affine ``(s, b)`` into a Conv or Gemm's constant weight/bias; False if impossible."""
    if node.op_type == "Conv":
        axis = 0
    elif node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "alpha" in attrs and attrs["alpha"].f != 1.0 or "beta" in attrs and attrs["beta"].f != 1.0:
            return False
        axis = 0 if ("transB" in attrs and attrs["transB"].i == 1) else 1
    else:
        return False
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if node.input[1] not in consts or (has_bias and node.input[2] not in consts):
        return False
    w = consts[node.input[1]].astype(np.float32)
    if w.shape[axis] != len(s):
        return False
    shape = [1] * w.ndim
    shape[axis] = len(s)
    bias = consts[node.input[2]].astype(np.float32) if has_bias else np.zeros(len(s), np.float32)
    if bias.shape != (len(s),):
        return False
    w_name, b_name = node.name + "/folded_weight", node.name + "/folded_bias"
    graph.initializer.extend([numpy_helper.from_array(w * s.reshape(shape), w_name),
                              numpy_helper.from_array(bias * s + b, b_name)])
    while len(node.input) < 3:
        node.input.append("")
    node.input[1], node.input[2] = w_name, b_name
    return True


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks from ONNX shape inference, with dynamic input dims bound (STFT needs a known length)."""
    bound = onnx.ModelProto.FromString(proto.SerializeToString())
    for info in bound.graph.input:
        for i, dim in enumerate(info.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                dim.dim_value = 1 if i == 0 else SAMPLE_RATE
    inferred = onnx.shape_inference.infer_shapes(bound, data_prop=True)
    graph = inferred.graph
    out = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.tensor_type.HasField("shape"):
            out[info.name] = len(info.type.tensor_type.shape.dim)
    return out


# ---- onnxruntime ----

# Session settings of every graph microser runs (and the model card tells users to set). On x86, onnxruntime turns
# int8 QDQ nodes into uint8-activation kernels (its QDQS8ToU8 rewrite) which, on CPUs without VNNI (AVX2; AVX-512
# before Cascade Lake; AMD before Zen 4), add uint8 x int8 products in int16 pairs that saturate: a trained
# wav2small's int8 outputs moved by up to 0.73 on an emulated Haswell (qemu-x86_64 -cpu Haswell) while VNNI CPUs and
# the generated C compute exactly. Allowing int8 QDQ keeps the int8 x int8 kernels, exact on every CPU (the convs of
# a shipped graph, graph.fuse_qlinear_conv, are int8 QLinearConv already). tests/test_qat.py checks it on the emulator.
ORT_SESSION_CONFIG = {"session.qdqisint8allowed": "1"}


def ort_session(path_or_bytes, threads: int = 1):
    """An onnxruntime CPU session for a file path, serialized bytes or an ``onnx.ModelProto``.

    ``threads`` sets intra-op threads; inter-op is 1 (sequential execution); ``ORT_SESSION_CONFIG`` keeps int8
    graphs exact on x86 CPUs without VNNI.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    for key, value in ORT_SESSION_CONFIG.items():
        options.add_session_config_entry(key, value)
    if isinstance(path_or_bytes, onnx.ModelProto):
        path_or_bytes = path_or_bytes.SerializeToString()
    elif isinstance(path_or_bytes, PathLike):
        path_or_bytes = str(path_or_bytes)
    if isinstance(path_or_bytes, str) and not Path(path_or_bytes).is_file():
        raise MicroserError(f"ONNX model {path_or_bytes} does not exist: expected a .onnx file; "
                            "export one with microser.onnxio.export_onnx")
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(session, audio_batch) -> np.ndarray:
    """Run ``session`` on float32 audio ``(B, T)`` (or ``(T,)``, treated as batch 1); returns the first output."""
    audio = np.asarray(audio_batch, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise MicroserError(f"audio batch has shape {audio.shape}: expected (batch, samples) float32 at "
                            f"{SAMPLE_RATE} Hz; stack clips of equal length")
    name = session.get_inputs()[0].name
    return session.run(None, {name: audio})[0]


def onnx_predict(model_or_session, data, indices) -> np.ndarray:
    """Outputs of an ONNX graph on whole segments ``indices`` of ``data``: float32 ``(len(indices), 3)``.

    Every segment runs as a batch of one at its own length (nothing padded or
    cropped), so this is what a device computes per utterance.
    """
    session = model_or_session
    if isinstance(model_or_session, (str, bytes, PathLike, onnx.ModelProto)):
        session = ort_session(model_or_session)
    indices = np.asarray(indices, dtype=np.int64)
    out = np.zeros((len(indices), 3), dtype=np.float32)
    for k, i in enumerate(indices):
        out[k] = run_onnx(session, np.asarray(data.audio(int(i)), dtype=np.float32)[None])[0]
    return out


def onnx_ccc(model_or_session, data, split: str = "valid") -> dict[str, float]:
    """``ccc_report`` of an ONNX graph's own outputs against ``data.targets`` over a whole split."""
    idx = np.asarray(data.split_indices(split), dtype=np.int64)
    if len(idx) < 2:
        raise MicroserError(f"split {split!r} has {len(idx)} segment(s): CCC needs at least 2; use a cache "
                            "with more speakers")
    return ccc_report(onnx_predict(model_or_session, data, idx), np.asarray(data.targets)[idx])


def check_parity(model: torch.nn.Module, proto, n_samples: int, *, batch: int = 2, seed: int = 1,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Max abs difference between onnxruntime on ``proto`` and ``model`` on random audio; raises above tolerance."""
    audio = _random_audio(batch, n_samples, seed=seed)
    with torch.no_grad():
        expected = model(audio).numpy()
    got = run_onnx(ort_session(proto), audio.numpy())
    if got.shape != expected.shape:
        raise MicroserError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape} on audio of "
                            f"{n_samples} samples: expected equal shapes; the time axis is probably not dynamic "
                            "(avoid Python ints computed from tensor sizes in forward)")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if not diff <= tolerance:
        raise MicroserError(f"ONNX output differs from PyTorch by max abs {diff:.3g} on random audio of "
                            f"{n_samples} samples: expected <= {tolerance:g}; check the ops in the model's "
                            "forward for ones the ONNX exporter maps inexactly")
    return diff


def _random_audio(batch: int, n_samples: int, seed: int) -> torch.Tensor:
    """Uniform noise in [-0.5, 0.5): audio-like amplitude, deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n_samples, generator=g) - 0.5
