"""One row of the compression table: a model exported, quantized and measured (costs, sizes, CCC, probes).

``measure_stage`` does it for post-training int8 (``microser.quantize``),
``qat_stage`` fine-tunes quantization-aware first (``microser.qat``); both
return a :class:`StageRow`, which ``microser compress`` (its table and
``report.json``), the model card and ``microser export`` read.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import onnx

from microser import SAMPLE_RATE, qat
from microser.costs import count_macs, count_params, ram_plan, seconds_to_samples
from microser.distill import evaluate, train
from microser.errors import MicroserError
from microser.graph import FLOAT_SCOPES, FRONTEND_SCOPE, shipped_int8, strip_graph
from microser.onnxio import export_onnx, onnx_ccc
from microser.quantize import choose_keep_float, classify_nodes, probe_agreement, quantize_int8, size_accounting

# The costs a bundle's model card copies from the row it exports (``StageRow.costs``).
CARD_COSTS = ("params", "trainable_params", "macs", "ram_bytes", "ram_bytes_fp32", "input_seconds")


@dataclass(frozen=True)
class StageRow:
    """One measured stage: costs of the model, sizes and CCC of its fp32 and int8 graphs, the probes.

    CCC values are ``{"arousal", "dominance", "valence", "mean"}`` dicts on
    ``split``, each from that model's own outputs. ``to_dict`` is the row of
    ``report.json``; ``from_dict`` reads one back.
    """

    stage: str                   # "trial", "fine-tuned", "pruned", "qat"
    method: str                  # "ptq" (post-training int8) or "qat" (quantization-aware)
    params: int                  # costs.count_params of the fp32 graph
    trainable_params: int
    macs: int
    onnx_bytes: int              # named fp32 ONNX file
    int8_bytes: int              # int8 file as a bundle ships it (graph.bundle_graph: what firmware stores)
    int8_bytes_named: int        # the QDQ graph with names, as written by the quantizer
    size: dict                   # quantize.size_accounting of the shipped int8 file (and the size goal)
    ram_bytes_fp32: int
    ram_bytes: int               # int8 deployment plan peak (costs.ram_plan)
    input_seconds: float
    ccc_fp32_onnx: dict
    ccc_int8_onnx: dict          # of the shipped int8 graph (graph.shipped_int8), as the probes
    split: str
    probes: dict                 # quantize.probe_agreement of int8 vs fp32
    ccc_torch: dict              # the PyTorch model (fake-quantized for QAT)
    keep_float: list             # extra float choices beyond the split rule (PTQ)
    keep_float_choices: list | None
    quantization: dict           # the quantizer's report (QuantReport.to_dict, or the QAT equivalent)
    train: dict | None = None    # QAT only: {"steps", "seconds", "valid_ccc", "collapsed"}

    @property
    def int8_drop(self) -> float:
        """Mean CCC the int8 graph loses against the fp32 graph (positive: int8 is worse)."""
        return float(self.ccc_fp32_onnx["mean"] - self.ccc_int8_onnx["mean"])

    def costs(self) -> dict:
        """The costs a model card copies (``CARD_COSTS``)."""
        return {key: getattr(self, key) for key in CARD_COSTS}

    def brief(self) -> dict:
        """The short form a model card lists per stage (mean CCC values)."""
        return {"stage": self.stage, "method": self.method, "params": self.params,
                "ccc_fp32_onnx": self.ccc_fp32_onnx["mean"], "ccc_int8_onnx": self.ccc_int8_onnx["mean"],
                "int8_bytes": self.int8_bytes}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict, *, source: str = "report.json") -> "StageRow":
        """A row of ``report.json`` back (rows written before ``method`` existed were post-training int8)."""
        names = {f.name for f in fields(cls)}
        row = {"method": "ptq", **row}
        missing = sorted(n for n in names - set(row) if n != "train")
        if missing:
            raise MicroserError(f"{source}: stage row {row.get('stage', '?')!r} lacks {', '.join(missing)}: "
                                "it was not written by microser compress; run microser compress again")
        return cls(**{k: v for k, v in row.items() if k in names})


def measure_stage(name: str, model, data, workdir, *, crops, input_seconds: float,
                  keep_float: Iterable[str] | str = "auto", split: str = "valid") -> StageRow:
    """Export ``model``, quantize it and measure everything the before/after table shows.

    Writes ``workdir/model.onnx`` (named fp32) and ``workdir/model.int8.onnx``.
    CCC is computed on ``split`` three times, each from that model's own
    outputs: the PyTorch model (``distill.evaluate``), the fp32 ONNX graph and
    the int8 ONNX graph (both in onnxruntime, one segment per run).

    ``keep_float="auto"`` measures :func:`choose_keep_float`; a list is used as given.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32_path = export_onnx(model, workdir / "model.onnx")
    proto = onnx.load(str(fp32_path))
    choices = None
    if keep_float == "auto":
        with tempfile.TemporaryDirectory() as tmp:
            keep_float, choices = choose_keep_float(fp32_path, crops, data, workdir=tmp, split=split)
    quant = quantize_int8(fp32_path, crops, workdir / "model.int8.onnx", keep_float=keep_float)
    return StageRow(
        stage=name, method="ptq",
        **_graph_row(model, proto, fp32_path, quant.int8_path, data, input_seconds, split),
        ccc_torch=evaluate(model, data, split), keep_float=list(keep_float), keep_float_choices=choices,
        quantization=quant.to_dict(),
    )


def _graph_row(model, proto, fp32_path, int8_path, data, input_seconds: float, split: str) -> dict:
    """The measured columns every stage row shares: costs, sizes, CCC of both graphs, the probes."""
    samples = seconds_to_samples(input_seconds)
    params = int(count_params(proto))
    with tempfile.TemporaryDirectory() as tmp:   # every int8 figure of the graph a bundle ships (graph.shipped_int8)
        shipped = shipped_int8(onnx.load(str(int8_path)))
        named, stripped = Path(tmp) / "int8.named.onnx", Path(tmp) / "int8.onnx"
        onnx.save(shipped, str(named))
        onnx.save(strip_graph(shipped), str(stripped))
        return {
            "params": params,
            "trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "macs": int(count_macs(model, input_seconds)),
            "onnx_bytes": Path(fp32_path).stat().st_size,
            "int8_bytes": stripped.stat().st_size,
            "int8_bytes_named": Path(int8_path).stat().st_size,
            "size": size_accounting(stripped, params=params),
            "ram_bytes_fp32": int(ram_plan(proto, samples, int8=False).peak_bytes),
            "ram_bytes": int(ram_plan(proto, samples, int8=True).peak_bytes),
            "input_seconds": float(input_seconds),
            "ccc_fp32_onnx": onnx_ccc(fp32_path, data, split),
            "ccc_int8_onnx": onnx_ccc(named, data, split),
            "split": split,
            "probes": probe_agreement(fp32_path, named),
        }


def qat_stage(name: str, model, spec, data, workdir, *, crops, input_seconds: float, config,
              split: str = "valid") -> tuple[StageRow, object]:
    """Quantization-aware fine-tuning of ``model`` (``microser.qat``) and the stage row of its int8 graph.

    ``prepare`` (BatchNorm folded, fake quantizers), MinMax calibration on
    ``crops`` (+ the extremes), ``distill.train`` with ``config`` (the
    quantizers' ranges stay frozen), then the float graph and the int8 QDQ
    graph of the result in ``workdir`` (``model.onnx``, ``model.int8.onnx``).
    CCC: ``ccc_torch`` is the fake-quantized PyTorch model's.

    Returns:
        ``(row, student)``: the :class:`StageRow` (``method`` ``"qat"``) and the fine-tuned weights as a plain ``build_model(spec)`` model.
    """
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
    row = StageRow(
        stage=name, method="qat",
        **_graph_row(student, proto, workdir / "model.onnx", workdir / "model.int8.onnx", data, input_seconds,
                     split),
        ccc_torch=evaluate(qmodel, data, split), keep_float=[], keep_float_choices=None,
        train={"steps": result.steps, "seconds": round(result.train_seconds, 1), "valid_ccc": result.ccc,
               "collapsed": result.collapse_message},
        quantization={
            "method": "qat", "fp32_path": str(workdir / "model.onnx"), "int8_path": str(workdir / "model.int8.onnx"),
            "activation_symmetric": False, "keep_float": [],
            "float_nodes": [{"name": n.name, "op_type": n.op_type, "reason": FLOAT_SCOPES[FRONTEND_SCOPE]}
                            for n in floats],
            "quantized_nodes": [{"name": n.name, "op_type": n.op_type} for n in quantized],
            "calibration": {"crops": len(crops), "extremes": 2, "seconds": round(len(crops[0]) / SAMPLE_RATE, 4)},
            "points": exported.points, "torch_vs_int8_max_abs": exported.torch_vs_int8_max_abs,
            "train_config": config.to_dict(),
        },
    )
    return row, student
