"""Measure int8 quantization choices for one trained student: which body ops must stay float, symmetric or
asymmetric activations, with or without quant_pre_process; CCC (valid and test) and int8 bytes as shipped.

    python bench/compress_int8.py --cache /tmp/espeak-cache --weights ref.pt [--spec wav2small-ref]
    python bench/compress_int8.py --cache /tmp/espeak-cache --train-epochs 30 --save ref.pt

Prints one row per choice: CCC of the fp32 graph and of the int8 graph (each from its own outputs in
onnxruntime, one whole segment per run), the drop, the stripped int8 file size and the size goal
(1.1 x params + 4096 bytes, params: microser.costs.count_params of the fp32 graph). Quantization-aware int8 of the
whole network: bench/qat_int8.py.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx
import torch

from microser.cache import Cache
from microser.costs import count_params
from microser.graph import bundle_graph, strip_graph
from microser.models.spec import build_model, resolve_spec
from microser.onnxio import export_onnx, onnx_ccc
from microser.quantize import calibration_crops, keep_float_candidates, quantize_int8, size_accounting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--spec", default="wav2small-ref")
    ap.add_argument("--weights", help="state dict (torch.save) of a trained model")
    ap.add_argument("--train-epochs", type=float, default=0, help="train from scratch with distill.train first")
    ap.add_argument("--save", help="where to save the trained state dict")
    ap.add_argument("--input-seconds", type=float, default=1.0, help="calibration crop length")
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--json-out", help="also write every row as JSON here")
    args = ap.parse_args()

    data = Cache.open(args.cache)
    spec = resolve_spec(args.spec)
    torch.manual_seed(0)
    model = build_model(spec)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    if args.train_epochs:
        from microser.distill import train
        from microser.train_config import TrainConfig

        t0 = time.perf_counter()
        result = train(model, data, TrainConfig(epochs=args.train_epochs, seed=0))
        print(f"trained {args.train_epochs:g} epochs in {time.perf_counter() - t0:.0f} s: valid CCC {result.ccc}")
        if args.save:
            torch.save(result.state_dict, args.save)
    model.eval()
    print(f"spec {spec.summary()}; cache {args.cache}: segments "
          f"{ {s: len(data.split_indices(s)) for s in ('train', 'valid', 'test')} }")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = export_onnx(model, tmp / "model.onnx")
        ref = {s: onnx_ccc(fp32, data, s) for s in ("valid", "test")}
        fp32_stripped = len(strip_graph(onnx.load(str(fp32))).SerializeToString())
        print(f"fp32 ONNX: {fp32.stat().st_size} B named, {fp32_stripped} B stripped; CCC valid "
              f"{ref['valid']['mean']:.4f} test {ref['test']['mean']:.4f}")
        crops = calibration_crops(data, seconds=args.input_seconds, max_crops=args.crops)
        header = ("keep float (besides /frontend/, /head/)", "act sym", "pre", "valid int8", "drop", "test int8",
                  "drop", "int8 B", "goal B", "int8 vals", "float vals")
        print(" | ".join(header))
        rows = []
        choices = [(kf, False, True) for kf in keep_float_candidates(fp32)]
        choices += [([], True, True), ([], False, False)]
        for k, (keep, sym, pre) in enumerate(choices):
            path = tmp / f"q{k}.onnx"
            quantize_int8(fp32, crops, path, keep_float=keep, activation_symmetric=sym, preprocess=pre)
            stripped = tmp / f"q{k}.stripped.onnx"
            onnx.save(bundle_graph(onnx.load(str(path))), str(stripped))
            size = size_accounting(stripped, params=count_params(onnx.load(str(fp32))))
            got = {s: onnx_ccc(stripped, data, s) for s in ("valid", "test")}
            row = {"keep_float": keep, "activation_symmetric": sym, "preprocess": pre,
                   "ccc_valid": got["valid"], "ccc_test": got["test"],
                   "drop_valid": ref["valid"]["mean"] - got["valid"]["mean"],
                   "drop_test": ref["test"]["mean"] - got["test"]["mean"], "size": size}
            rows.append(row)
            q = size["int8_weight_elements"] + size["int32_bias_elements"]
            print(" | ".join([",".join(keep) or "-", str(sym), str(pre), f"{got['valid']['mean']:.4f}",
                              f"{row['drop_valid']:+.4f}", f"{got['test']['mean']:.4f}", f"{row['drop_test']:+.4f}",
                              str(size["file_bytes"]), str(size["size_goal_bytes"]), str(q),
                              str(size["float_elements"])]), flush=True)
        # For the record: what the pooling head costs in int8 (quantize_int8 never does this; measured only).
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from microser.quantize import _AudioReader

        named = onnx.load(str(fp32))
        head_q = tmp / "head-int8.onnx"
        quantize_static(str(fp32), str(head_q), _AudioReader("audio", crops), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=[n.name for n in named.graph.node if n.name.startswith("/frontend/")],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        got = {s: onnx_ccc(head_q, data, s) for s in ("valid", "test")}
        print(f"head quantized too (only /frontend/ float): valid {got['valid']['mean']:.4f} "
              f"({ref['valid']['mean'] - got['valid']['mean']:+.4f}), test {got['test']['mean']:.4f} "
              f"({ref['test']['mean'] - got['test']['mean']:+.4f})", flush=True)
        rows.append({"keep_float": "frontend only (head int8)", "ccc_valid": got["valid"], "ccc_test": got["test"]})
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"fp32": ref, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
