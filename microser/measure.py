"""One row of the compression table: a model exported, quantized and measured (costs, sizes, CCC, probes).

``measure_stage`` does it for post-training int8 (``microser.quantize``),
``qat_stage`` fine-tunes quantization-aware first (``microser.qat``); both
rows have the same keys, which ``microser compress``, the model card and
``microser export`` read.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import onnx

from microser import SAMPLE_RATE, qat
from microser.costs import count_macs, count_params, ram_plan, seconds_to_samples
from microser.distill import evaluate, train
from microser.graph import strip_graph
from microser.onnxio import export_onnx, onnx_ccc
from microser.quantize import choose_keep_float, classify_nodes, probe_agreement, quantize_int8, size_accounting



def measure_stage(name: str, model, data, workdir, *, crops, input_seconds: float,
                  keep_float: Iterable[str] | str = "auto", split: str = "valid") -> dict:
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
