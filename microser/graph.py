"""Reading and rewriting ONNX graphs without running them: constants, generated tables, stripping.

Pure ``onnx`` (no torch, no onnxruntime), so the exporter (``microser.onnxio``),
the cost model (``microser.costs``), the quantizers and the bundle all walk a
graph the same way:

    constants(graph)          name -> np.ndarray of initializers, Constant nodes and Identity aliases
    constant_sizes(graph)     name -> (elements, onnx dtype) of initializers and Constant nodes
    generated_tensors(graph)  outputs computed from constants only (the Hann window, the mel matrix)
    strip_graph(proto)        a bundle's copy: no names, doc strings, metadata or default attributes
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from microser import __version__


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
