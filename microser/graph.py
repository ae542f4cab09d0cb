"""Reading and rewriting ONNX graphs without running them: constants, generated tables, stripping.

Pure ``onnx`` (no torch, no onnxruntime), so the exporter (``microser.onnxio``),
the cost model (``microser.costs``), the quantizers and the bundle all walk a
graph the same way:

    constants(graph)          name -> np.ndarray of initializers, Constant nodes and Identity aliases
    wiring(nodes)             (producer, consumers) of every tensor name
    constant_sizes(graph)     name -> (elements, onnx dtype) of initializers and Constant nodes
    generated_tensors(graph)  outputs computed from constants only (the Hann window, the mel matrix)
    strip_graph(proto)        a bundle's copy: no names, doc strings, metadata or default attributes
    fuse_qlinear_conv(proto)  a QDQ graph with its int8 convs as QLinearConv (what onnxruntime runs anyway)
    shipped_int8(proto)       the int8 graph microser measures and ships: fused, constants shared
    bundle_graph(proto)       a bundle's int8 file: shipped_int8, then stripped
    FLOAT_SCOPES, int8_scope  the int8 deployment split: which named scopes post-training int8 keeps float
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from microser import __version__

# ---- the int8 deployment split ----

# An exported graph keeps the PyTorch module paths as node names (microser.onnxio): the front-end under /frontend/,
# the conv stack under /body/, the pooling head under /head/. Post-training int8 quantizes the body and the log-mel
# image it reads; the front-end and the head compute in float, for the reasons below. Quantization-aware int8
# (microser.qat) quantizes the head too. The quantizer (quantize.float_reason), the RAM plan (costs.ram_plan) and the
# C library's shape plan (cgen.plan.shape_plan) all follow this one rule.
FRONTEND_SCOPE, BODY_SCOPE, HEAD_SCOPE = "/frontend/", "/body/", "/head/"
FLOAT_SCOPES = {
    FRONTEND_SCOPE: "front-end internals (prenorm, STFT, power, mel matrix, floor, log/PCEN) run in float; "
                    "their output, the log-mel image, is quantized to int8 before the first conv",
    HEAD_SCOPE: "attention-pooling head (1x1 score/value convs, softmax over time, value x softmax, the long "
                "sum over time, Gram product, Linear) stays float: int8 loses a lot in the softmax, the "
                "product and the long sum, and it is a small share of the weights",
}


def int8_scope(node_name: str) -> bool:
    """True for a node of the scope post-training int8 quantizes (the conv body), by its exported name."""
    return node_name.startswith(BODY_SCOPE)



# ---- constants ----


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers, Constant-node outputs with a tensor value and Identity aliases of either, by name."""
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in out:  # the exporter aliases equal constants
            out[node.output[0]] = out[node.input[0]]
    return out


def wiring(nodes) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """``(producer, consumers)`` of a node list: the node writing each tensor name, the nodes reading it (in order)."""
    nodes = list(nodes)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def constant_sizes(graph: onnx.GraphProto) -> dict[str, tuple[int, int]]:
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


def generated_tensors(graph: onnx.GraphProto) -> set[str]:
    """Outputs of nodes whose inputs are all constant (directly or through other such nodes): generated tables.

    They depend on no input, so firmware computes them once at start-up (or
    keeps them in flash); the RAM plan treats them like weights.
    """
    constant = set(constant_sizes(graph)) | {""}
    out: set[str] = set()
    for node in graph.node:
        if node.op_type != "Constant" and node.input and all(i in constant or i in out for i in node.input):
            out.update(o for o in node.output if o)
    return out


def strip_doc_strings(proto: onnx.ModelProto) -> None:
    """Remove every doc string (model, graph, nodes, value infos) in place; names are kept."""
    proto.doc_string = ""
    graph = proto.graph
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
    for info in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        info.doc_string = ""


# ---- stripping names for a bundle ----

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Attribute values that equal the ONNX default (opset 17), so a bundle can leave them out; "ones"/"zeros" mean
# a list of 1s / 0s of any length.
_DEFAULT_ATTRS = {
    "Conv": {"dilations": "ones", "group": 1, "pads": "zeros", "strides": "ones"},
    "QLinearConv": {"dilations": "ones", "group": 1, "pads": "zeros", "strides": "ones"},
    "MaxPool": {"ceil_mode": 0, "dilations": "ones", "pads": "zeros", "strides": "ones", "storage_order": 0},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
    "ReduceMean": {"keepdims": 1}, "ReduceSum": {"keepdims": 1, "noop_with_empty_axes": 0},
    "Reshape": {"allowzero": 0}, "Flatten": {"axis": 1}, "Gather": {"axis": 0}, "STFT": {"onesided": 1},
    "Softmax": {"axis": -1}, "DequantizeLinear": {"axis": 1}, "QuantizeLinear": {"axis": 1, "saturate": 1},
}


def _is_default(op_type: str, attr: onnx.AttributeProto) -> bool:
    default = _DEFAULT_ATTRS.get(op_type, {}).get(attr.name, None)
    if default is None:
        return False
    if attr.type == onnx.AttributeProto.INTS:
        values = list(attr.ints)
        return (default == "ones" and all(v == 1 for v in values)) or (default == "zeros" and not any(values))
    if attr.type == onnx.AttributeProto.INT:
        return attr.i == default
    if attr.type == onnx.AttributeProto.FLOAT:
        return attr.f == default
    return False


def strip_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with node names, doc strings, metadata, default-valued attributes and unused opset domains
    removed, and inner tensors renamed ``0``, ``1``, ... ``Z``, ``10``, ...

    The graph input and output keep their names (``audio``, ``adv``) and the
    node order is unchanged, so node ``k`` of the stripped graph is node ``k``
    of the named one (the model card lists float ops by that index).
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    keep = {i.name for i in graph.input} | {o.name for o in graph.output}
    names: dict[str, str] = {}
    skipped: list[str] = []

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            while True:  # base-62 names: 1 character for the first 62 tensors, 2 for the next 3844
                k, text = len(names) + len(skipped), ""
                while True:
                    text = _ALPHABET[k % 62] + text
                    k //= 62
                    if not k:
                        break
                if text not in keep:
                    break
                skipped.append(text)
            names[name] = text
        return names[name]

    for t in graph.initializer:
        t.name = short(t.name)
    for n in graph.node:
        n.ClearField("name")
        n.ClearField("doc_string")
        defaults = [a for a in n.attribute if _is_default(n.op_type, a)]
        for a in defaults:
            n.attribute.remove(a)
        for k, name in enumerate(n.input):
            n.input[k] = short(name)
        for k, name in enumerate(n.output):
            n.output[k] = short(name)
    del graph.value_info[:]
    used_domains = {n.domain for n in graph.node}  # the quantizer declares every domain it knows of
    kept = [o for o in proto.opset_import if o.domain in used_domains or o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    graph.name = "microser"
    del proto.metadata_props[:]
    proto.producer_name = "microser"
    proto.producer_version = __version__
    strip_doc_strings(proto)
    for n in graph.node:  # an explicitly empty string still costs two bytes per node
        n.ClearField("doc_string")
    for field in ("doc_string",):
        proto.ClearField(field)
        graph.ClearField(field)
    return proto


# ---- the shipped form of an int8 graph ----


def fuse_qlinear_conv(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ graph whose int8 convolutions are ``QLinearConv`` nodes.

    A ``Conv`` whose input, weight and bias come from ``DequantizeLinear``
    nodes (int8 input, int8 weight with zero point 0, int32 bias whose scale
    is input scale x weight scale) and whose only consumer is a
    ``QuantizeLinear`` becomes one ``QLinearConv`` reading the int8 tensors
    and writing the quantized output: int32 accumulation and one
    requantization, as the int8 C library and firmware compute it. The file
    drops four nodes and the bias scales per conv. onnxruntime builds the
    same node from that pattern where its optimizer can, but leaves some
    convs unfused (one whose dequantized input other nodes also read) and
    runs those in float between dequantize and quantize, so the QDQ graph
    and the fused one can differ by an int8 rounding step: every int8
    figure microser reports (CCC, probes, parity, size) is measured on the
    fused graph. Dequantize nodes still read by other nodes stay; node order
    is kept (a fused conv takes the conv's place); any other graph is
    returned unchanged.
    """
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    producer, consumers = wiring(graph.node)
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}

    def dq(name: str, dtype: int) -> onnx.NodeProto | None:
        node = producer.get(name)
        ok = (node is not None and node.op_type == "DequantizeLinear" and name not in outputs
              and (node.input[0] not in inits or inits[node.input[0]].data_type == dtype)
              and all(i in inits for i in node.input[1:]))
        return node if ok else None

    def value(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    zero = None
    fused: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 3 or not conv.input[2]:
            continue
        dx, dw, db = dq(conv.input[0], onnx.TensorProto.INT8), dq(conv.input[1], onnx.TensorProto.INT8), \
            dq(conv.input[2], onnx.TensorProto.INT32)
        users = consumers.get(conv.output[0], [])
        if not (dx and dw and db and dw.input[0] in inits and db.input[0] in inits and len(users) == 1
                and users[0].op_type == "QuantizeLinear" and conv.output[0] not in outputs):
            continue
        q = users[0]
        if len(dx.input) < 3 or len(q.input) < 3 or not all(i in inits for i in q.input[1:]):
            continue  # zero points are explicit in QLinearConv: only graphs that name theirs are fused
        if value(dx.input[2]).dtype != np.int8 or value(q.input[2]).dtype != np.int8:
            continue
        if len(dw.input) > 2 and np.any(value(dw.input[2])):
            continue  # asymmetric weights
        x_scale, w_scale, b_scale = value(dx.input[1]), value(dw.input[1]), value(db.input[1])
        expect = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
        if x_scale.size != 1 or b_scale.shape != expect.shape or not np.allclose(b_scale, expect, rtol=1e-6, atol=0):
            continue
        if zero is None:
            zero = "qlinear_zero"
            while zero in inits or zero in producer:
                zero += "_"
            graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero))
        node = onnx.helper.make_node(
            "QLinearConv", [dx.input[0], dx.input[1], dx.input[2], dw.input[0], dw.input[1],
                            dw.input[2] if len(dw.input) > 2 else zero, q.input[1], q.input[2], db.input[0]],
            [q.output[0]], name=conv.name)
        node.attribute.extend(conv.attribute)
        fused[id(conv)] = node
        dropped.add(id(q))
    if not fused:
        return proto
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in dropped]
    while True:  # dequantize nodes nothing reads any more
        read = {i for n in nodes for i in n.input} | outputs
        dead = [n for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] not in read]
        if not dead:
            break
        nodes = [n for n in nodes if n not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    read = {i for n in nodes for i in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


def share_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which identical initializers (same type, shape and bytes) are stored once."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for t in graph.initializer:
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        alias[t.name] = first.setdefault(key, t.name)
    if all(a == n for n, a in alias.items()):
        return proto
    for n in graph.node:
        for k, name in enumerate(n.input):
            n.input[k] = alias.get(name, name)
    kept = [t for t in graph.initializer if alias[t.name] == t.name]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


def shipped_int8(int8: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 graph microser measures and ships, names kept: convs fused (:func:`fuse_qlinear_conv`), constants
    shared (:func:`share_constants`)."""
    return share_constants(fuse_qlinear_conv(int8))


def bundle_graph(int8: onnx.ModelProto) -> onnx.ModelProto:
    """The int8 graph as a bundle's file: :func:`shipped_int8`, then stripped."""
    return strip_graph(shipped_int8(int8))
