"""The int8 plan: scales, zero points and int8 weights read from an int8 QDQ graph (microser.quantize, microser.qat).

Body convs are matched to the graph's k x k Conv nodes in graph order, max-pools to its MaxPool nodes, the head
input to the input of the attention score conv (or the head's mean); names are not needed (bundle graphs have
theirs stripped). The front-end and head keep the float plan's values, as the graph keeps them float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from microser.cgen.plan import Plan, float_plan
from microser.graph import constants, wiring
from microser.errors import MicroserError


class _Graph:
    """Read-only helpers over an int8 QDQ ONNX graph."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MicroserError(f"int8 ONNX model {self.path} does not exist: expected the file written by "
                                "microser.quantize.quantize_int8")
        g = onnx.load(str(self.path)).graph
        self.nodes = list(g.node)
        self.init = constants(g)   # initializers and Constant outputs (microser.graph: the one walker)
        self.producer, self.consumers = wiring(self.nodes)

    def dq(self, name: str):
        """(int array, scale, zero point) if ``name`` is a DequantizeLinear output of a constant, else None."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.input[0] not in self.init:
            return None
        zp = self.init[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros(1, np.int8)
        return self.init[n.input[0]], np.asarray(self.init[n.input[1]], np.float32), np.asarray(zp)

    def act_quant(self, name: str) -> tuple[float, int] | None:
        """(scale, zero point) if the activation ``name`` is a DequantizeLinear output, else None (float)."""
        n = self.producer.get(name)
        if n is None or n.op_type != "DequantizeLinear" or n.input[0] in self.init:
            return None
        scale = np.asarray(self.init[n.input[1]], np.float32)
        zp = np.asarray(self.init[n.input[2]])
        if scale.size != 1 or zp.dtype != np.int8:
            raise MicroserError(f"{self.path}: activation {name!r} is quantized with shape {scale.shape} / "
                                f"{zp.dtype}: expected per-tensor int8 (microser.quantize.quantize_int8)")
        return float(scale.reshape(())), int(zp.reshape(()))

    def weight(self, name: str) -> np.ndarray:
        if name in self.init:
            return np.asarray(self.init[name], np.float64)
        q = self.dq(name)
        if q is None:
            raise MicroserError(f"{self.path}: weight {name!r} is neither a constant nor a dequantized constant")
        vals, scale, zp = q
        shape = (-1,) + (1,) * (vals.ndim - 1)
        return (vals.astype(np.float64) - zp.reshape(shape)) * scale.astype(np.float64).reshape(shape)


def int8_plan(model, spec, int8_onnx_path) -> Plan:
    """The int8 plan: float plan for the float parts, scales, zero points and int8 weights read from the graph.

    Body convs are matched to the graph's Conv nodes with a k x k kernel in
    graph order, max-pools to its MaxPool nodes, the head input to the input
    of the attention score conv (or the first node of the head); names are
    not needed (bundle graphs have theirs stripped).
    """
    plan = float_plan(model, spec)
    plan.variant = "int8"
    g = _Graph(int8_onnx_path)
    k = spec.body.kernel
    convs = [n for n in g.nodes if n.op_type == "Conv" and _kernel(g, n) == (k, k)]
    pools = [n for n in g.nodes if n.op_type == "MaxPool"]
    conv_stages = [st for st in plan.stages if st.kind == "conv"]
    pool_stages = [st for st in plan.stages if st.kind == "pool"]
    if len(convs) != len(conv_stages) or len(pools) != len(pool_stages):
        raise MicroserError(f"{int8_onnx_path}: {len(convs)} {k}x{k} convs and {len(pools)} max-pools, but spec "
                            f"{spec.summary()!r} has {len(conv_stages)} and {len(pool_stages)}: expected the int8 "
                            "graph of this very model; re-run microser compress / export")
    if spec.body.norm == "layer" and any(g.dq(n.input[1]) is not None for n in convs):
        raise MicroserError(f"{int8_onnx_path}: int8 C export of body.norm 'layer' is not supported (the graph "
                            "requantizes around each LayerNormalization); export the float32 C library, or "
                            "use body.norm 'batch' or 'none'")
    consumers_of = {}
    for st, node in zip(conv_stages, convs):
        consumers_of[st.src] = node.input[0]
        q = g.dq(node.input[1])
        if q is not None:
            w, ws, wzp = q
            if w.dtype != np.int8 or np.any(wzp != 0) or ws.size != w.shape[0]:
                raise MicroserError(f"{int8_onnx_path}: conv weight {node.input[1]!r} is {w.dtype} with zero points "
                                    f"{np.unique(wzp)[:3]} and {ws.size} scales: expected int8 symmetric per-channel")
            bq = g.dq(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if bq is None or bq[0].dtype != np.int32:
                raise MicroserError(f"{int8_onnx_path}: quantized conv {node.name or node.output[0]!r} has no int32 "
                                    "bias: expected onnxruntime's QDQ conv (weight, bias both dequantized)")
            st.int8, st.weight, st.bias, st.w_scale = True, w, bq[0].astype(np.int64), ws.reshape(-1)
        else:
            st.int8 = False
            st.weight = g.weight(node.input[1])
            st.bias = g.weight(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(st.weight.shape[0])
        out = node.output[0]
        users = g.consumers.get(out, [])
        st.relu = any(u.op_type == "Relu" for u in users)
        if st.int8 and st.relu:
            raise MicroserError(f"{int8_onnx_path}: a Relu follows quantized conv {node.output[0]!r}: expected "
                                "asymmetric activations, whose QuantizeLinear clamp is the ReLU "
                                "(microser.quantize.ACTIVATION_SYMMETRIC = False)")
    for st, node in zip(pool_stages, pools):
        consumers_of[st.src] = node.input[0]
    if spec.frontend.compression == "log":
        plan.log_chain, floor = _log_chain(g, convs[0].input[0])
        plan.log_floor = plan.log_floor if floor is None else floor
    head_in = _head_input(g, plan)
    consumers_of[len(plan.tensors) - 1] = head_in
    for i, t in enumerate(plan.tensors):
        if i not in consumers_of:  # the input of a pool that follows a conv is consumed by the pool: covered
            continue
        t.quant = g.act_quant(consumers_of[i])
    # a conv's output tensor that a pool reads is the pool's src: quant set above; check int8 convs write int8
    for st in conv_stages:
        if st.int8 and (plan.tensors[st.src].quant is None or plan.tensors[st.dst].quant is None):
            raise MicroserError(f"{int8_onnx_path}: quantized conv of block {st.block} reads or writes a float "
                                "tensor: expected QuantizeLinear/DequantizeLinear on both sides (QDQ format)")
    return plan


def _log_chain(g: _Graph, tensor: str) -> tuple[list[tuple[str, float]], float]:
    """The scalar Mul/Div ops between ``Log`` and the first conv's input, first op first, and the Clip floor."""
    dq = g.producer.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = g.producer[dq.input[0]]
        tensor = q.input[0]
    chain: list[tuple[str, float]] = []
    node = g.producer.get(tensor)
    while node is not None and node.op_type in ("Mul", "Div"):
        consts = [i for i in node.input if i in g.init]
        if len(consts) != 1 or np.asarray(g.init[consts[0]]).size != 1:
            break
        value = float(np.asarray(g.init[consts[0]]).reshape(()))
        if node.op_type == "Div" and node.input[1] != consts[0]:
            break
        chain.append(("mul" if node.op_type == "Mul" else "div", value))
        node = g.producer.get(next(i for i in node.input if i not in g.init))
    if node is None or node.op_type != "Log":
        raise MicroserError(f"{g.path}: the first conv does not read Log(...) through scalar Mul/Div ops: expected "
                            "the log-mel front-end of microser.frontends; re-export the model")
    clip = g.producer.get(node.input[0])
    floor = None   # no Clip/Max found: the caller keeps the spec's energy_floor
    if clip is not None and clip.op_type == "Clip" and len(clip.input) > 1 and clip.input[1] in g.init:
        floor = float(np.asarray(g.init[clip.input[1]]).reshape(()))
    elif clip is not None and clip.op_type == "Max":
        floor = float(np.asarray(g.init[[i for i in clip.input if i in g.init][0]]).reshape(()))
    return chain[::-1], floor


def _kernel(g: _Graph, node) -> tuple[int, ...]:
    for a in node.attribute:
        if a.name == "kernel_shape":
            return tuple(a.ints)
    try:
        return tuple(g.weight(node.input[1]).shape[2:])
    except MicroserError:
        return ()


def _head_input(g: _Graph, plan: Plan) -> str:
    """Name of the tensor the pooling head reads (the last body tensor as the head sees it)."""
    if plan.pooling.startswith("attention"):
        heads = [n for n in g.nodes if n.op_type == "Conv" and _kernel(g, n) == (1, 1)]
        if len(heads) != 2:
            raise MicroserError(f"{g.path}: expected the 2 attention 1x1 convs of the head, found {len(heads)}")
        return heads[0].input[0]
    means = [n for n in g.nodes if n.op_type == "ReduceMean"]
    if not means:
        raise MicroserError(f"{g.path}: no ReduceMean for the mean+std head")
    return means[-1].input[0] if len(means) == 1 else _first_head_mean(g, means)


def float_head_graph(model, spec, int8_onnx_path) -> onnx.ModelProto | None:
    """The int8 graph as the C int8 library computes it, when that differs: None for a post-training graph
    (its head is float already); for a quantization-aware graph (microser.qat quantizes the head too), a copy
    whose head activations skip their QuantizeLinear/DequantizeLinear pairs.

    The C head is float and streaming (an online softmax over the frames pushed so far): the rounded
    exponentials of a QAT graph (``models.wav2small.softmax_pool``) need the whole clip's largest score, which a
    streaming head never holds,
    so the C library runs the head's arithmetic without the graph's head quantization points. Parity is checked
    against this graph; the difference to the full graph is reported beside it."""
    shape_only = float_plan(model, spec)
    g = _Graph(int8_onnx_path)
    head_in = _head_input(g, shape_only)
    proto = onnx.load(str(int8_onnx_path))
    nodes = list(proto.graph.node)
    producer, _ = wiring(nodes)
    ahead = set()    # tensors computed from the head input
    frontier = [head_in]
    while frontier:
        t = frontier.pop()
        for n in nodes:
            if t in n.input:
                for o in n.output:
                    if o not in ahead:
                        ahead.add(o)
                        frontier.append(o)
    rename, drop = {}, []
    for n in nodes:
        if n.op_type == "DequantizeLinear" and n.input[0] in ahead:
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                rename[n.output[0]] = q.input[0]
                drop += [q, n]
    if not rename:
        return None
    outputs = {o.name for o in proto.graph.output}
    for n in drop:
        proto.graph.node.remove(n)
    for n in proto.graph.node:
        for k, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[k] = name
    for out in list(rename):   # the graph's output was a DequantizeLinear: name the float tensor like it
        if out in outputs:
            src = rename[out]
            while src in rename:
                src = rename[src]
            for n in proto.graph.node:
                for k, name in enumerate(n.output):
                    if name == src:
                        n.output[k] = out
                for k, name in enumerate(n.input):
                    if name == src:
                        n.input[k] = out
    return proto


def _first_head_mean(g: _Graph, means) -> str:
    # the head's mean over time reads the last body tensor; front-end ReduceMeans (clip prenorm) read audio
    body_out = [m.input[0] for m in means if g.producer.get(m.input[0]) is not None
                and g.producer[m.input[0]].op_type in ("DequantizeLinear", "Relu", "MaxPool", "Conv")]
    if not body_out:
        raise MicroserError(f"{g.path}: cannot find the mean+std head's input")
    return body_out[0]

