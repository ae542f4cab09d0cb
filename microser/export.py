"""The firmware bundle: stripped fp32 and int8 ONNX, a C header, a model card, parity and size reports.

``export_trial(study, trial, out)`` writes::

    model.onnx         fp32 graph, node names and doc strings stripped, tensors renamed t0, t1, ...
    model.int8.onnx    int8 QDQ graph (microser.compress.quantize_int8), stripped the same way
    model.h            model.int8.onnx as `const unsigned char[]`, its length, the input/output contract
    model_card.json    architecture, costs, CCC (test and validation, fp32 and int8), teacher, cache,
    MODEL_CARD.md      split, what was quantized and what stays float (and why), how to run it
    parity.json        fp32 ONNX vs PyTorch, int8 vs fp32; the tolerances; pass/fail

The export refuses (MicroserError, nothing half-written is left as a bundle)
when parity is worse than ``Tolerance``. ``c=True`` adds the C library made by
``microser.cgen.bundle.generate`` (when that module exists).

Using a model: :func:`evaluate_target` (CCC of a trial, a compressed trial, a
bundle or an ONNX file on a cache split) and :func:`predict_files` (A/D/V per
audio file, long files segmented like the cache, mean over segments).
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from microser import SAMPLE_RATE, TARGETS, __version__, checks
from microser.cgen.ctext import c_float
from microser.errors import MicroserError


@dataclass(frozen=True)
class Tolerance:
    """What parity the bundle must reach, else export fails.

    ``fp32_max_abs``: max abs difference between the fp32 ONNX graph and the
    PyTorch model on every validation segment (outputs live in about 0..1).
    ``int8_ccc_drop``: largest allowed drop of mean CCC (against the teacher)
    from the fp32 to the int8 graph, on the validation split and on the test
    split each.
    """

    fp32_max_abs: float = 1e-4
    int8_ccc_drop: float = 0.02


# ---- stripping ----

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
    from microser.onnxio import strip_doc_strings

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


# ---- C header ----


def c_header(int8_bytes: bytes, contract: dict) -> str:
    """``model.h``: the int8 ONNX file as a byte array, its length and the input/output contract macros."""
    lines = [
        "/* microser firmware bundle: the int8 ONNX model as bytes, and its input/output contract.",
        f" * Generated by microser {__version__}. Input: float32 mono audio at MICROSER_SAMPLE_RATE Hz,",
        " * shape (1, samples), MICROSER_MIN_SAMPLES <= samples <= MICROSER_MAX_SAMPLES (longer audio: segment it",
        " * and average the outputs). Output: float32 (1, 3) = arousal, dominance, valence, about",
        " * MICROSER_OUTPUT_MIN..MICROSER_OUTPUT_MAX. */",
        "#ifndef MICROSER_MODEL_H",
        "#define MICROSER_MODEL_H",
        "",
        f"#define MICROSER_SAMPLE_RATE {int(contract['sample_rate'])}",
        f"#define MICROSER_EXPECTED_SAMPLES {int(contract['expected_samples'])}",
        f"#define MICROSER_MIN_SAMPLES {int(contract['min_samples'])}",
        f"#define MICROSER_MAX_SAMPLES {int(contract['max_samples'])}",
        f"#define MICROSER_INPUT_NAME \"{contract['input_name']}\"",
        f"#define MICROSER_OUTPUT_NAME \"{contract['output_name']}\"",
        f"#define MICROSER_N_OUTPUTS {len(contract['outputs'])}",
        *[f"#define MICROSER_OUTPUT_{name.upper()} {k}" for k, name in enumerate(contract["outputs"])],
        f"#define MICROSER_OUTPUT_MIN {c_float(contract['output_range'][0])}",
        f"#define MICROSER_OUTPUT_MAX {c_float(contract['output_range'][1])}",
        f"#define MICROSER_MODEL_INT8_ONNX_LEN {len(int8_bytes)}u",
        "",
        f"static const unsigned int microser_model_int8_onnx_len = {len(int8_bytes)}u;",
        "static const unsigned char microser_model_int8_onnx[MICROSER_MODEL_INT8_ONNX_LEN] = {",
    ]
    for start in range(0, len(int8_bytes), 16):
        chunk = int8_bytes[start:start + 16]
        lines.append("  " + ", ".join(f"0x{b:02x}" for b in chunk) + ",")
    lines += ["};", "", "#endif /* MICROSER_MODEL_H */", ""]
    return "\n".join(lines)


# ---- parity ----


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How closely outputs ``a`` follow ``b``: max abs, RMSE, cosine and CCC per target."""
    from microser.metrics import ccc_report

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return {"max_abs": float(np.abs(a - b).max()), "rmse": float(np.sqrt(((a - b) ** 2).mean())),
            "cosine": cos, "ccc": ccc_report(a, b)}


def parity_report(model, fp32_path, int8_path, data, *, tolerance: Tolerance = Tolerance()) -> dict:
    """fp32 ONNX vs PyTorch and int8 vs fp32 on the validation and test splits; ``passed`` and ``failures``."""
    from microser.onnxio import onnx_predict
    from microser.distill import predict
    from microser.metrics import ccc_report

    report: dict = {"tolerance": asdict(tolerance), "splits": {}, "failures": []}
    for split in ("valid", "test"):
        idx = np.asarray(data.split_indices(split), dtype=np.int64)
        if len(idx) < 2:
            report["splits"][split] = {"segments": int(len(idx)), "skipped": "fewer than 2 segments"}
            continue
        truth = np.asarray(data.targets)[idx]
        torch_out = predict(model, data, idx)
        fp32 = onnx_predict(fp32_path, data, idx)
        int8 = onnx_predict(int8_path, data, idx)
        row = {
            "segments": int(len(idx)),
            "fp32_vs_pytorch_max_abs": float(np.abs(fp32 - torch_out).max()),
            "int8_vs_fp32": _agreement(int8, fp32),
            "ccc_pytorch": ccc_report(torch_out, truth),
            "ccc_fp32": ccc_report(fp32, truth),
            "ccc_int8": ccc_report(int8, truth),
        }
        row["ccc_drop"] = row["ccc_fp32"]["mean"] - row["ccc_int8"]["mean"]
        report["splits"][split] = row
        if not row["fp32_vs_pytorch_max_abs"] <= tolerance.fp32_max_abs:
            report["failures"].append(f"{split}: fp32 ONNX differs from PyTorch by {row['fp32_vs_pytorch_max_abs']:.3g}"
                                      f" > {tolerance.fp32_max_abs:g}")
        if not row["ccc_drop"] <= tolerance.int8_ccc_drop:
            report["failures"].append(f"{split}: int8 mean CCC {row['ccc_int8']['mean']:.4f} is "
                                      f"{row['ccc_drop']:.4f} below fp32 {row['ccc_fp32']['mean']:.4f} "
                                      f"> {tolerance.int8_ccc_drop:g}")
    report["passed"] = not report["failures"]
    return report


# ---- the bundle ----


@dataclass(frozen=True)
class BundleReport:
    """What ``export_bundle`` wrote (``card`` is model_card.json, ``parity`` is parity.json)."""

    folder: str
    files: list[str]
    card: dict
    parity: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _contract(data, input_seconds: float) -> dict:
    from microser.frontends import MIN_SECONDS

    meta = getattr(data, "meta", {}) or {}
    return {
        "input_name": "audio", "output_name": "adv", "sample_rate": SAMPLE_RATE,
        "expected_samples": int(round(input_seconds * SAMPLE_RATE)),
        "min_samples": int(round(MIN_SECONDS * SAMPLE_RATE)),
        "max_samples": int(round(float(meta.get("max_seconds") or input_seconds) * SAMPLE_RATE)),
        "segment_overlap_seconds": meta.get("overlap_seconds"),
        "outputs": list(TARGETS), "output_range": list(meta.get("target_range") or (0.0, 1.0)),
        "input_dtype": "float32, mono, [-1, 1]", "input_shape": ["batch", "samples"], "output_shape": ["batch", 3],
    }


def export_bundle(model, spec, out, *, data, fp32_named, int8_named, quant: dict, costs: dict,
                  source: dict, tolerance: Tolerance = Tolerance(), c: bool = False) -> BundleReport:
    """Write a bundle from a model, its named fp32 and int8 graphs and the facts around them.

    Args:
        model: the PyTorch model the graphs came from (parity reference).
        spec: its ArchSpec.
        out: the bundle folder (created, or an earlier bundle there replaced whole).
        data: the cache (``microser.cache.Cache``): validation and test
            splits for CCC and parity, meta for the teacher and contract.
        fp32_named, int8_named: the named graphs (``onnxio.export_onnx`` and
            ``compress.quantize_int8`` outputs).
        quant: ``QuantReport.to_dict()`` of ``int8_named``.
        costs: params, trainable_params, macs, ram_bytes, ram_bytes_fp32, input_seconds.
        source: where the model came from (study, trial, weights, compressed folder).
        c: also generate the C library (``microser.cgen.bundle.generate``).

    The bundle is written to a temporary folder beside ``out`` and renamed
    into place at the end, so ``out`` never mixes files of two exports and a
    failed export leaves an earlier bundle there as it was.

    Raises:
        MicroserError when ``out`` is a file or a non-empty folder that is
        not a microser bundle (before any work), when parity is worse than
        ``tolerance`` (the report goes to ``out/parity.FAILED.json``, or
        beside ``out`` as ``<out>.parity.FAILED.json`` when ``out`` holds an
        earlier bundle, which is kept) or when C export is unavailable.
    """
    final = check_bundle_out(out)
    if c and _c_generator() is None:
        raise MicroserError(f"C export is not available for family {spec.family!r}: this version's microser.cgen "
                            "has no generate(bundle_dir, model, spec, int8_onnx_path); export without --c")
    if c:
        from microser.cgen.plan import check_exportable

        check_exportable(spec)  # mobilenet: refused before any work
    fp32_named, int8_named = Path(fp32_named), Path(int8_named)
    parity = parity_report(model, fp32_named, int8_named, data, tolerance=tolerance)
    if not parity["passed"]:
        if (final / "model_card.json").is_file():   # keep the earlier bundle as it is
            failed = final.parent / f"{final.name}.parity.FAILED.json"
        else:
            final.mkdir(parents=True, exist_ok=True)
            failed = final / "parity.FAILED.json"
        failed.write_text(json.dumps(parity, indent=1) + "\n")
        raise MicroserError(f"export refused: parity is worse than the stated tolerance ({'; '.join(parity['failures'])}); "
                            f"see {failed}; fine-tune longer, keep more ops float, or pass a looser --tolerance")
    final.parent.mkdir(parents=True, exist_ok=True)
    out = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        report = _write_bundle(out, model, spec, data=data, fp32_named=fp32_named, int8_named=int8_named,
                               quant=quant, costs=costs, source=source, parity=parity, c=c)
        _replace_folder(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return BundleReport(folder=str(final), files=report.files, card=report.card, parity=report.parity)


def _write_bundle(out: Path, model, spec, *, data, fp32_named: Path, int8_named: Path, quant: dict, costs: dict,
                  source: dict, parity: dict, c: bool) -> BundleReport:
    """Every bundle file in ``out`` (a fresh folder)."""
    from microser.compress import classify_nodes, probe_agreement, size_accounting

    named_int8 = onnx.load(str(int8_named))
    stripped = {"model.onnx": strip_graph(onnx.load(str(fp32_named))), "model.int8.onnx": strip_graph(named_int8)}
    for name, proto in stripped.items():
        onnx.save(proto, str(out / name))
    _check_stripped(named_int8, out / "model.int8.onnx")
    int8_bytes = (out / "model.int8.onnx").read_bytes()
    contract = _contract(data, float(costs.get("input_seconds", 1.0)))
    (out / "model.h").write_text(c_header(int8_bytes, contract))

    floats, quantized = classify_nodes(named_int8)
    index = {id(n): k for k, n in enumerate(named_int8.graph.node)}
    reasons = {d["name"]: d["reason"] for d in quant.get("float_nodes", [])}
    float_ops = [{"index": index[id(n)], "op_type": n.op_type, "name": n.name,
                  "reason": reasons.get(n.name, "not quantized by onnxruntime")} for n in floats]
    quant_ops = [{"index": index[id(n)], "op_type": n.op_type, "name": n.name} for n in quantized]
    size = size_accounting(out / "model.int8.onnx", params=costs.get("params"))
    probes = probe_agreement(fp32_named, int8_named)
    qat = quant.get("method") == "qat"
    meta = getattr(data, "meta", {}) or {}
    valid, test = parity["splits"].get("valid", {}), parity["splits"].get("test", {})
    card = {
        "format": "microser-model-card", "version": 1, "microser_version": __version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "architecture": {"family": spec.family, "summary": spec.summary(), "spec": spec.to_dict()},
        "contract": contract,
        "costs": {**costs, "onnx_bytes_fp32": (out / "model.onnx").stat().st_size,
                  "onnx_bytes_int8": len(int8_bytes)},
        "ccc": {"test": {"fp32": test.get("ccc_fp32"), "int8": test.get("ccc_int8"), "pytorch": test.get("ccc_pytorch")},
                "valid": {"fp32": valid.get("ccc_fp32"), "int8": valid.get("ccc_int8"),
                          "pytorch": valid.get("ccc_pytorch")},
                "note": "test split: held out from search and selection; validation split: used to pick the "
                        "trial and the float/int8 split, so it is optimistic"},
        "data": {
            "cache": str(getattr(data, "path", "")), "fingerprint": getattr(data, "fingerprint", None),
            "teachers": meta.get("teachers"), "split_by": meta.get("split_by"), "split_seed": meta.get("split_seed"),
            "segments": {s: int(len(data.split_indices(s))) for s in ("train", "valid", "test")},
            "max_seconds": meta.get("max_seconds"), "overlap_seconds": meta.get("overlap_seconds"),
        },
        "quantization": {
            "method": "qat" if qat else "ptq",
            "tool": ("microser.qat (quantization-aware fine-tuning, fake int8 with straight-through gradients)" if qat
                     else "onnxruntime.quantization.quantize_static"),
            "format": "QDQ",
            "calibration": ("MinMax, ranges growing during fine-tuning (running MinMax), log-mel floor exact"
                            if qat else "MinMax"),
            "calibration_data": {**quant.get("calibration", {}), "split": "train",
                                 "extremes": "digital silence and a crop clipped at full scale"},
            "weights": "int8, symmetric (zero point 0), per output channel",
            "biases": "int32, scale = input scale x weight scale",
            "activations": ("int8 per tensor, " + ("symmetric" if quant.get("activation_symmetric")
                                                     else "asymmetric (ReLU is the QuantizeLinear clamp)")),
            "keep_float": quant.get("keep_float"),
            "float_ops": float_ops,
            "quantized_ops": quant_ops,
            "float_op_counts": _counts(float_ops), "quantized_op_counts": _counts(quant_ops),
            "stages": quant.get("stages"),
        },
        "probes": probes,
        "size": size,
        "parity": {"passed": parity["passed"], "tolerance": parity["tolerance"],
                   "int8_vs_fp32_valid": valid.get("int8_vs_fp32"),
                   "fp32_vs_pytorch_max_abs": valid.get("fp32_vs_pytorch_max_abs")},
    }
    files = ["model.onnx", "model.int8.onnx", "model.h", "model_card.json", "MODEL_CARD.md", "parity.json"]
    (out / "parity.json").write_text(json.dumps(parity, indent=1) + "\n")
    (out / "model_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card_markdown(card))
    if c:  # the C library and its measured flash/RAM/instructions go into the card's "c" section
        card["c"] = _c_generator()(out, model, spec, int8_named)
        (out / "model_card.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
        from microser.cgen.bundle import card_markdown

        (out / "MODEL_CARD.md").write_text(model_card_markdown(card) + "\n" + card_markdown(card["c"]))
        files.append("C library (microser.cgen)")
    return BundleReport(folder=str(out), files=files, card=card, parity=parity)


BUNDLE_FILES = frozenset({"model.onnx", "model.int8.onnx", "model.h", "model_card.json", "MODEL_CARD.md",
                          "parity.json", "parity.FAILED.json", "c"})


def check_bundle_out(out) -> Path:
    """``out`` as a Path if a bundle may be written there: absent, an empty folder, or a folder holding only a
    microser bundle (its model_card.json) or a failed export's parity.FAILED.json, which the new bundle replaces.
    MicroserError before any work for a file, an unwritable place, or a folder holding anything else."""
    out = checks.out_folder("--out", out)
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir())
        foreign = [n for n in names if n not in BUNDLE_FILES]
        if names and (foreign or not {"model_card.json", "parity.FAILED.json"} & set(names)):
            shown = foreign or names
            raise MicroserError(f"--out {out} holds files that are not a microser bundle ({', '.join(shown[:3])}"
                                f"{', ...' if len(shown) > 3 else ''}); a bundle replaces its folder whole: pass a new "
                                "or empty folder, or move those files away")
    return out


def _replace_folder(new: Path, final: Path) -> None:
    """Put folder ``new`` at ``final``: renamed into place; an earlier bundle there is renamed away, then deleted."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _c_generator():
    """``microser.cgen.bundle.generate`` when this installation has it, else None."""
    if importlib.util.find_spec("microser.cgen.bundle") is None:
        return None
    from microser.cgen import bundle

    return getattr(bundle, "generate", None)


def _counts(ops: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op["op_type"]] = counts.get(op["op_type"], 0) + 1
    return counts


def _check_stripped(named: onnx.ModelProto, stripped_path: Path) -> None:
    """The stripped graph must compute exactly what the named one does."""
    from microser.onnxio import ort_session, run_onnx

    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, SAMPLE_RATE)).astype(np.float32)
    a = run_onnx(ort_session(named), x)
    b = run_onnx(ort_session(str(stripped_path)), x)
    if not np.array_equal(a, b):
        raise MicroserError(f"{stripped_path}: stripping names changed the outputs by {np.abs(a - b).max():.3g}: "
                            "expected identical graphs; report this model's spec as a bug")


def _fmt_ccc(r: dict | None) -> str:
    if not r:
        return "n/a"
    return f"{r['mean']:.3f} (A {r['arousal']:.3f}, D {r['dominance']:.3f}, V {r['valence']:.3f})"


def model_card_markdown(card: dict) -> str:
    """MODEL_CARD.md: the model card in prose and tables."""
    a, cc, q, s, d, k = card["architecture"], card["ccc"], card["quantization"], card["size"], card["data"], card["costs"]
    ctr = card["contract"]
    src = card["source"]
    reasons = list(dict.fromkeys(o["reason"] for o in q["float_ops"]))
    lines = [
        f"# microser model card: {a['summary']}",
        "",
        f"Family `{a['family']}`; from study `{src.get('study')}`, trial {src.get('trial')}"
        + (f", compressed ({src.get('compressed')})" if src.get("compressed") else "")
        + f"; weights: {src.get('weights')}. microser {card['microser_version']}, {card['created_at']}.",
        "",
        "## Accuracy (CCC against the teacher, whole split, population statistics)",
        "",
        "| split | fp32 ONNX | int8 ONNX | PyTorch |",
        "| --- | --- | --- | --- |",
        f"| test | {_fmt_ccc(cc['test']['fp32'])} | {_fmt_ccc(cc['test']['int8'])} | {_fmt_ccc(cc['test']['pytorch'])} |",
        f"| validation | {_fmt_ccc(cc['valid']['fp32'])} | {_fmt_ccc(cc['valid']['int8'])} | "
        f"{_fmt_ccc(cc['valid']['pytorch'])} |",
        "",
        cc["note"] + ".",
        "",
        "## Data and teacher",
        "",
        f"- cache: `{d['cache']}` (fingerprint `{d['fingerprint']}`)",
        f"- teacher(s): `{json.dumps(d['teachers'])}`",
        f"- split by {d['split_by']} (seed {d['split_seed']}): segments {d['segments']}",
        f"- segments of at most {d['max_seconds']} s, overlap {d['overlap_seconds']} s",
        "",
        "## Input / output contract",
        "",
        f"- input `{ctr['input_name']}`: float32 mono audio in [-1, 1] at {ctr['sample_rate']} Hz, shape (batch, "
        f"samples), {ctr['min_samples']} <= samples <= {ctr['max_samples']} (costs measured at "
        f"{ctr['expected_samples']} samples); longer audio: cut into segments like the cache and average",
        f"- output `{ctr['output_name']}`: float32 (batch, 3) = {', '.join(ctr['outputs'])}, about "
        f"{ctr['output_range'][0]}..{ctr['output_range'][1]}",
        "",
        "## Costs",
        "",
        "| params | trainable | MACs | fp32 ONNX bytes | int8 ONNX bytes | peak RAM fp32 | peak RAM int8 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {k.get('params')} | {k.get('trainable_params')} | {k.get('macs')} | {k['onnx_bytes_fp32']} | "
        f"{k['onnx_bytes_int8']} | {k.get('ram_bytes_fp32')} | {k.get('ram_bytes')} |",
        "",
        f"MACs and RAM at {k.get('input_seconds')} s of audio; RAM is the tensor-liveness plan of "
        "microser.costs.ram_plan (the int8 plan counts front-end output and conv stack as 1 byte).",
        "",
        "## Quantization",
        "",
        f"{'Quantization-aware training' if q.get('method') == 'qat' else 'Post-training int8'}: {q['tool']}, "
        f"{q['format']}, {q['calibration']} calibration on {q['calibration_data'].get('crops')} crops "
        f"of {q['calibration_data'].get('seconds')} s from the training split plus "
        f"{q['calibration_data'].get('extremes')}. Weights: {q['weights']}; biases: "
        f"{q['biases']}; activations: {q['activations']}.",
        "",
        *_stages_markdown(q.get("stages")),
        f"Quantized ops: {q['quantized_op_counts']}. Ops that stay float: {q['float_op_counts']}. Why:",
        "",
        *[f"- ({k + 1}) {why}" for k, why in enumerate(reasons)],
        "",
        "The float ops by node index in model.int8.onnx (names are stripped there; the original names are "
        "the PyTorch module paths):",
        "",
        "| index | op | original name | why |",
        "| --- | --- | --- | --- |",
        *[f"| {o['index']} | {o['op_type']} | `{o['name']}` | ({reasons.index(o['reason']) + 1}) |"
          for o in q["float_ops"]],
        "",
        "## Size of model.int8.onnx",
        "",
        "| part | bytes |",
        "| --- | --- |",
        f"| int8 weights ({s['int8_weight_elements']} values) | {s['int8_weight_bytes']} |",
        f"| int32 biases ({s['int32_bias_elements']} values) | {s['int32_bias_bytes']} |",
        f"| scales | {s['scale_bytes']} |",
        f"| zero points | {s['zero_point_bytes']} |",
        f"| float leftovers ({s['float_elements']} values) | {s['float_bytes']} |",
        f"| integer shape constants | {s['other_bytes']} |",
        f"| graph overhead (file minus initializers) | {s['graph_overhead_bytes']} |",
        f"| **file** | **{s['file_bytes']}** |",
        "",
        (f"Goal: file <= 1.1 x params + 4096 = {s['size_goal_bytes']} bytes (params {s['params']}): "
         f"{'met' if s['size_goal_met'] else 'NOT met, ' + str(s['file_bytes'] - s['size_goal_bytes']) + ' B over'}."
         if s.get("size_goal_bytes") is not None else "Goal: params unknown, not checked."),
        "",
        "## Silence, quiet and clipping",
        "",
        f"int8 vs fp32 outputs on probe signals (tolerance {card['probes']['tolerance']} per output): "
        f"{'passed' if card['probes']['passed'] else 'FAILED'}.",
        "",
        "| signal | fp32 (A, D, V) | int8 (A, D, V) | max abs |",
        "| --- | --- | --- | --- |",
        *[f"| {name} | {', '.join(f'{v:.3f}' for v in r['fp32'])} | {', '.join(f'{v:.3f}' for v in r['int8'])} | "
          f"{r['max_abs']:.4f} |" for name, r in card["probes"]["signals"].items()],
        "",
        "## Parity",
        "",
        f"Passed: {card['parity']['passed']} (tolerance {card['parity']['tolerance']}); fp32 ONNX vs PyTorch max abs "
        f"{card['parity']['fp32_vs_pytorch_max_abs']}; details in parity.json.",
        "",
        "## How to run",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        "session = ort.InferenceSession('model.int8.onnx')",
        "audio = np.zeros((1, 16000), np.float32)  # mono 16 kHz in [-1, 1]",
        "arousal, dominance, valence = session.run(None, {'audio': audio})[0][0]",
        "```",
        "",
        "Or `microser predict BUNDLE AUDIO_DIR_OR_CSV --out preds.csv [--int8]`. In C, `model.h` embeds "
        "model.int8.onnx for an ONNX runtime on the device.",
        "",
    ]
    return "\n".join(lines)


def _stages_markdown(stages) -> list[str]:
    """The compressed trial's stages (post-training and quantization-aware int8 side by side) as markdown lines."""
    if not stages:
        return []
    lines = ["Measured by `microser compress` (validation split; PTQ: front-end and pooling head float; QAT: every "
             "operator after the log-mel int8):", "",
             "| stage | int8 | params | CCC fp32 ONNX | CCC int8 ONNX | int8 bytes |", "| --- | --- | --- | --- | --- | --- |"]
    for st in stages:
        lines.append(f"| {st['stage']} | {st['method'].upper()} | {st['params']} | {st['ccc_fp32_onnx']:.4f} | "
                     f"{st['ccc_int8_onnx']:.4f} | {st['int8_bytes']} |")
    return lines + [""]


def export_trial(study, trial: int, out, *, compressed: bool = False, cache=None, c: bool = False,
                 tolerance: Tolerance = Tolerance(), keep_float="auto", progress=None) -> BundleReport:
    """Write the bundle of one trial: its compressed model (``compressed=True``) or its trained weights.

    Without ``compressed`` the trial's most trained weights (`microser
    train`'s, else the final stage's, else the search's; the card's
    ``source.weights`` names the stage) are exported and quantized here (same
    quantizer and float split rule as ``microser compress``).
    """
    from microser.cache import Cache
    from microser.compress import calibration_crops, load_compressed, load_trial_model, measure_stage
    from microser.storage import study_settings

    check_bundle_out(out)   # before the work: a file, an unwritable place or a foreign folder is refused now
    checks.number("--tolerance", tolerance.int8_ccc_drop, low=0, example=0.02)
    settings = study_settings(study)
    data = Cache.open(cache or settings["cache"])
    input_seconds = float(settings.get("input_seconds", 1.0))
    emit = progress or (lambda event: None)
    source = {"study": study.study_name, "trial": int(trial)}
    with tempfile.TemporaryDirectory() as tmp:
        if compressed:
            model, spec, folder, report = load_compressed(study, trial)
            last = report["stages"][-1]
            fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
            quant = {**last["quantization"], "stages": [
                {"stage": st["stage"], "method": st.get("method", "ptq"), "params": st["params"],
                 "ccc_fp32_onnx": st["ccc_fp32_onnx"]["mean"], "ccc_int8_onnx": st["ccc_int8_onnx"]["mean"],
                 "int8_bytes": st["int8_bytes"]} for st in report["stages"]]}
            costs = {key: last[key] for key in ("params", "trainable_params", "macs", "ram_bytes", "ram_bytes_fp32",
                                                "input_seconds")}
            source.update(compressed=str(folder), weights=f"compressed ({report['start_weights']} weights, "
                                                          f"stages {[s['stage'] for s in report['stages']]})")
        else:
            model, spec, which = load_trial_model(study, trial)
            emit({"kind": "stage", "stage": "quantize"})
            crops = calibration_crops(data, seconds=input_seconds)
            row = measure_stage("trial", model, data, Path(tmp) / "trial", crops=crops, input_seconds=input_seconds,
                                keep_float=keep_float)
            fp32, int8, quant = Path(tmp) / "trial" / "model.onnx", Path(tmp) / "trial" / "model.int8.onnx", \
                row["quantization"]
            costs = {key: row[key] for key in ("params", "trainable_params", "macs", "ram_bytes", "ram_bytes_fp32",
                                               "input_seconds")}
            source.update(weights=which)
        emit({"kind": "stage", "stage": "bundle"})
        return export_bundle(model, spec, out, data=data, fp32_named=fp32, int8_named=int8, quant=quant,
                             costs=costs, source=source, tolerance=tolerance, c=c)


# ---- using a model ----


def _bundle_paths(path: Path, int8: bool) -> Path:
    if path.is_dir():
        f = path / ("model.int8.onnx" if int8 else "model.onnx")
        if not f.is_file():
            raise MicroserError(f"bundle {path} has no {f.name}: expected a folder written by `microser export`")
        return f
    if path.suffix != ".onnx" or not path.is_file():
        raise MicroserError(f"{path} is neither a bundle folder nor an .onnx file: pass one of those")
    return path


def _graph_session(path: Path):
    """An onnxruntime session for a bundle's graph; MicroserError when the file does not load (truncated, edited)."""
    from microser.errors import one_line
    from microser.onnxio import ort_session

    try:
        return ort_session(str(path))
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise MicroserError(f"{path} does not load in onnxruntime ({one_line(e, 120)}): the file is truncated or not "
                            "an ONNX graph; export the bundle again with `microser export`") from None


def _read_card(folder: Path) -> dict | None:
    """A bundle's model_card.json (None when the folder has none); MicroserError when it is not a JSON object."""
    card = folder / "model_card.json"
    if not card.is_file():
        return None
    try:
        value = json.loads(checks.read_text(card, "model card"))
    except ValueError as e:
        raise MicroserError(f"model card {card} is not valid JSON ({e}): export the bundle again with "
                            "`microser export`") from None
    if not isinstance(value, dict):
        raise MicroserError(f"model card {card} is not a JSON object: export the bundle again with `microser export`")
    return value


def evaluate_target(*, study=None, trial: int | None = None, compressed: bool = False, path=None, cache=None,
                    split: str = "test") -> dict:
    """CCC per target on a cache split for a trial, a compressed trial, a bundle folder or an ONNX file.

    Returns ``{"target", "cache", "split", "segments", "results": {name: ccc_report}}`` with results for
    every graph or model the target holds (``pytorch``; ``fp32``/``int8`` ONNX).
    """
    from microser.cache import Cache
    from microser.compress import load_compressed, load_trial_model
    from microser.onnxio import onnx_ccc
    from microser.distill import evaluate

    results: dict[str, dict] = {}
    if path is not None and (study is not None or trial is not None):
        raise MicroserError(f"evaluate got a model path ({path}) and --study/--trial: pass one of them (a bundle or "
                            "ONNX file, or --study with --trial)")
    if path is not None:
        path = Path(path)
        graphs = {"fp32": _bundle_paths(path, False), "int8": _bundle_paths(path, True)} if path.is_dir() \
            else {"onnx": _bundle_paths(path, False)}
        sessions = {name: _graph_session(g) for name, g in graphs.items()}
        if cache is None:
            card = _read_card(path) if path.is_dir() else None
            cache = ((card or {}).get("data") or {}).get("cache")
            if not cache:
                raise MicroserError(f"{path}: pass --cache CACHE_DIR to evaluate an ONNX file (only bundles record "
                                    "their cache)")
        data = Cache.open(cache)
        for name, session in sessions.items():
            results[name] = onnx_ccc(session, data, split)
        target = str(path)
    else:
        if study is None or trial is None:
            raise MicroserError("evaluate needs a bundle/ONNX path or --study with --trial: pass one of them")
        from microser.storage import study_settings

        data = Cache.open(cache or study_settings(study)["cache"])
        if compressed:
            model, spec, folder, _ = load_compressed(study, trial)
            results["pytorch"] = evaluate(model, data, split)
            results["fp32"] = onnx_ccc(folder / "model.onnx", data, split)
            results["int8"] = onnx_ccc(folder / "model.int8.onnx", data, split)
            target = f"study {study.study_name} trial {trial} (compressed)"
        else:
            model, spec, which = load_trial_model(study, trial)
            results["pytorch"] = evaluate(model, data, split)
            target = f"study {study.study_name} trial {trial} ({which} weights)"
    return {"target": target, "cache": str(getattr(data, "path", cache)), "split": split,
            "segments": int(len(data.split_indices(split))), "results": results}


def predict_files(model_path, audio, out, *, int8: bool = False, max_seconds: float | None = None,
                  overlap_seconds: float | None = None) -> dict:
    """A/D/V for every audio file, written to ``out`` (CSV: path, arousal, dominance, valence, segments).

    Any rate or channel count (``microser.audio``: mono mix, resampled to 16
    kHz). Files longer than ``max_seconds`` are cut into segments exactly as
    the cache did (``microser.audio.segment_bounds``; defaults from the
    bundle's card, else 8 s with 1 s overlap) and the outputs are the mean
    over segments. A file shorter than the model's minimum input (the card's
    ``min_samples``, 0.25 s) is zero-padded at the end to that length. A file
    that cannot be used (unreadable, empty, NaN, silent) is listed in the
    result's ``skipped`` with its reason and the others go on; when every file
    is skipped, MicroserError.
    """
    from microser.audio import check_audio, read_segment, segment_bounds
    from microser.cache import list_sources
    from microser.onnxio import run_onnx

    out = checks.out_file("--out", out)
    model_path = Path(model_path)
    graph = _bundle_paths(model_path, int8)
    card = _read_card(model_path) if model_path.is_dir() else None
    contract = (card or {}).get("contract") or {}
    if max_seconds is None:
        max_seconds = contract.get("max_samples", 8 * SAMPLE_RATE) / SAMPLE_RATE
    if overlap_seconds is None:
        overlap_seconds = contract.get("segment_overlap_seconds")
        overlap_seconds = 1.0 if overlap_seconds is None else float(overlap_seconds)
    overlap_seconds = min(overlap_seconds, max_seconds / 2)
    min_samples = int(contract.get("min_samples", 0))
    session = _graph_session(graph)
    rows, skipped = [], []
    for source in list_sources(audio, allow_absolute_paths=True)[0]:
        path = source.path
        try:
            info = check_audio(path)
            bounds = segment_bounds(info.n_samples, max_seconds, overlap_seconds)
            outs = []
            for start, end in bounds:
                x = read_segment(info, start, end)
                if len(x) < min_samples:
                    x = np.pad(x, (0, min_samples - len(x)))
                outs.append(run_onnx(session, x[None])[0])
        except MicroserError as e:  # listed with its reason; the other files go on
            skipped.append({"path": str(path), "reason": str(e).removeprefix(f"{path}: ")})
            continue
        mean = np.mean(outs, axis=0)
        rows.append({"path": str(path), **{t: float(v) for t, v in zip(TARGETS, mean)}, "segments": len(bounds)})
    if not rows:
        raise MicroserError(f"none of the {len(skipped)} audio file(s) could be used (first: {skipped[0]['path']}: "
                            f"{skipped[0]['reason']}): fix the audio, then predict again")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", *TARGETS, "segments"])
        writer.writeheader()
        writer.writerows(rows)
    return {"model": str(graph), "out": str(out), "files": len(rows), "int8": int8, "max_seconds": max_seconds,
            "overlap_seconds": overlap_seconds, "rows": rows, "skipped": skipped}
