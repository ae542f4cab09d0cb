"""Quantization-aware int8 of wav2small-ref against fp32 and post-training int8: test CCC and int8 file bytes.

    python bench/qat_int8.py --cache ESPEAK_CACHE --cache RAVDESS_CACHE --seeds 0 1 \
        --train-steps 2000 --qat-steps 400

For every cache and seed: train wav2small-ref from scratch (distill.train, its default recipe, ``--train-steps``
optimizer steps), export it (fp32 ONNX), quantize it post-training (quantize.quantize_int8: front-end and pooling
head float) and quantization-aware (measure.qat_stage: every operator after the log-mel int8, ``--qat-steps``
steps at qat.QAT_LR), and score each graph on the cache's test split (one whole segment per run, CCC over the split).
Prints one row per run, then per cache the means over seeds and the issue-11 goals: QAT int8 test CCC within 0.01
of fp32, and the shipped int8 file (graph.bundle_graph: convs fused to QLinearConv, names stripped)
<= 1.1 x params + 4096 bytes (params: microser.costs.count_params).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from microser.cache import Cache
from microser.costs import count_params
from microser.distill import train
from microser.graph import bundle_graph, shipped_int8
from microser.measure import qat_stage
from microser.models.spec import build_model, resolve_spec
from microser.onnxio import export_onnx, onnx_ccc
from microser.qat import QAT_LR
from microser.quantize import calibration_crops, classify_nodes, probe_agreement, quantize_int8, size_accounting
from microser.train_config import TrainConfig


def shipped(path: Path) -> Path:
    """The int8 graph as microser measures and ships it (graph.shipped_int8: convs fused to QLinearConv), named."""
    out = path.with_suffix(".shipped.onnx")
    onnx.save(shipped_int8(onnx.load(str(path))), str(out))
    return out


def stripped_size(path: Path, params: int) -> dict:
    out = path.with_suffix(".stripped.onnx")
    onnx.save(bundle_graph(onnx.load(str(path))), str(out))
    return size_accounting(out, params=params)


def one_run(cache_path: str, seed: int, args, workdir: Path) -> dict:
    data = Cache.open(cache_path)
    spec = resolve_spec(args.spec)
    torch.manual_seed(seed)
    model = build_model(spec)
    t0 = time.perf_counter()
    result = train(model, data, TrainConfig(steps=args.train_steps, seed=seed, threads=1))
    train_s = time.perf_counter() - t0
    model.eval()
    fp32 = export_onnx(model, workdir / "model.onnx")
    params = count_params(onnx.load(str(fp32)))
    crops = calibration_crops(data, seconds=args.input_seconds, max_crops=args.crops, seed=seed)
    ptq = quantize_int8(fp32, crops, workdir / "ptq.int8.onnx", keep_float=[])
    t0 = time.perf_counter()
    row, _ = qat_stage("qat", model, spec, data, workdir / "qat", crops=crops, input_seconds=args.input_seconds,
                       config=TrainConfig(steps=args.qat_steps, seed=seed, threads=1, lr=QAT_LR,
                                          **({} if args.qat_crop_seconds is None else {"crop_seconds": args.qat_crop_seconds})))
    qat_s = time.perf_counter() - t0
    qat_int8 = workdir / "qat" / "model.int8.onnx"
    floats, _ = classify_nodes(onnx.load(str(qat_int8)))
    after_logmel = [n.op_type for n in floats if not n.name.startswith("/frontend/")]
    return {
        "cache": cache_path, "seed": seed, "params": params, "train_steps": result.steps, "train_s": train_s,
        "qat_steps": row.train["steps"], "qat_s": qat_s, "train_valid": result.ccc["mean"],
        "fp32": onnx_ccc(fp32, data, "test")["mean"],
        "ptq": onnx_ccc(shipped(Path(ptq.int8_path)), data, "test")["mean"],
        "qat": onnx_ccc(shipped(qat_int8), data, "test")["mean"],
        "qat_qdq": onnx_ccc(qat_int8, data, "test")["mean"],   # the QDQ graph as onnxruntime optimizes it
        "qat_twin": onnx_ccc(workdir / "qat" / "model.onnx", data, "test")["mean"],
        "ptq_bytes": stripped_size(Path(ptq.int8_path), params)["file_bytes"],
        "qat_size": stripped_size(qat_int8, params),
        "float_ops_after_logmel": after_logmel,
        "probes_qat": probe_agreement(workdir / "qat" / "model.onnx", shipped(qat_int8)),
        "probes_ptq": probe_agreement(fp32, shipped(Path(ptq.int8_path))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", action="append", required=True, help="a teacher cache (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--spec", default="wav2small-ref")
    ap.add_argument("--train-steps", type=int, default=2000)
    ap.add_argument("--qat-steps", type=int, default=400)
    ap.add_argument("--input-seconds", type=float, default=1.0, help="calibration crop length")
    ap.add_argument("--qat-crop-seconds", type=float, default=None,
                    help="crop length of the QAT fine-tuning (default: TrainConfig's)")
    ap.add_argument("--crops", type=int, default=64, help="calibration crops from the training split")
    ap.add_argument("--json-out", help="also write every run as JSON here")
    ap.add_argument("--keep", help="keep every run's graphs in this folder (<cache>-<seed>/) instead of a temp folder")
    args = ap.parse_args()
    torch.set_num_threads(1)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; torch threads 1")
    print(f"spec {resolve_spec(args.spec).summary()}; {args.train_steps} training steps, {args.qat_steps} QAT steps; "
          "CCC on each cache's test split")
    header = ("cache", "seed", "params", "fp32", "PTQ int8", "QAT int8", "QAT-fp32", "PTQ B", "QAT B", "goal B",
              "probes QAT (max abs)", "train s", "QAT s")
    print(" | ".join(header), flush=True)
    runs = []
    for cache in args.cache:
        for seed in args.seeds:
            if args.keep:
                keep = Path(args.keep) / f"{Path(cache).name}-{seed}"
                keep.mkdir(parents=True, exist_ok=True)
                r = one_run(cache, seed, args, keep)
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    r = one_run(cache, seed, args, Path(tmp))
            runs.append(r)
            s = r["qat_size"]
            probes = ", ".join(f"{k} {v['max_abs']:.3f}" for k, v in r["probes_qat"]["signals"].items())
            print(" | ".join([Path(cache).name, str(seed), str(r["params"]), f"{r['fp32']:.4f}", f"{r['ptq']:.4f}",
                              f"{r['qat']:.4f}", f"{r['qat'] - r['fp32']:+.4f}", str(r["ptq_bytes"]),
                              str(s["file_bytes"]), str(s["size_goal_bytes"]), probes, f"{r['train_s']:.0f}",
                              f"{r['qat_s']:.0f}"]), flush=True)
    print("\nmeans over seeds | fp32 | PTQ int8 | QAT int8 | QAT - fp32 (goal >= -0.01) | QAT bytes vs goal")
    for cache in args.cache:
        rs = [r for r in runs if r["cache"] == cache]
        fp32, ptq, qat = (float(np.mean([r[k] for r in rs])) for k in ("fp32", "ptq", "qat"))
        size = max((r["qat_size"] for r in rs), key=lambda z: z["file_bytes"])
        over = size["file_bytes"] - size["size_goal_bytes"]
        print(f"{Path(cache).name} ({len(rs)} seeds) | {fp32:.4f} | {ptq:.4f} | {qat:.4f} | {qat - fp32:+.4f} "
              f"({'met' if qat - fp32 >= -0.01 else 'NOT met'}) | largest {size['file_bytes']} vs {size['size_goal_bytes']} "
              f"({'met' if over <= 0 else f'NOT met, {over} B over'})")
    floats = sorted({op for r in runs for op in r["float_ops_after_logmel"]})
    print(f"float operators after the log-mel in the QAT graphs: {floats or 'none'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
