"""Pruning and int8 quantization on a tiny trained Wav2Small: graphs checked node by node, CCC from their own outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress_helpers import INPUT_SECONDS, build_tiny_cache, make_study, tiny_spec
from microser.compress import compress_trial, params_of, prune, pruned_spec, ratio_for_params
from microser.errors import MicroserError
from microser.graph import shipped_int8
from microser.loading import load_compressed, load_trial_model
from microser.metrics import ccc_report
from microser.models.spec import REFERENCES, build_model
from microser.onnxio import export_onnx, onnx_ccc, ort_session
from microser.quantize import calibration_crops, quantize_int8, size_accounting

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compress")
    cache = build_tiny_cache(folder)
    study, url = make_study(folder, cache)
    from microser.cache import Cache

    return {"folder": folder, "cache": Cache.open(cache), "study": study, "url": url}


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """The trained trial exported (named fp32) and quantized with nothing extra kept float."""
    out = tmp_path_factory.mktemp("quant")
    model, spec, _ = load_trial_model(tiny["study"], 0)
    fp32 = export_onnx(model, out / "model.onnx")
    crops = calibration_crops(tiny["cache"], seconds=INPUT_SECONDS, max_crops=16)
    report = quantize_int8(fp32, crops, out / "model.int8.onnx", keep_float=[])
    return {"model": model, "spec": spec, "fp32": fp32, "report": report, "crops": crops}


def test_calibration_crops_come_from_the_training_split_at_input_seconds(tiny):
    cache = tiny["cache"]
    crops = calibration_crops(cache, seconds=INPUT_SECONDS, max_crops=5, seed=1)
    assert len(crops) == 5 and all(len(c) == int(INPUT_SECONDS * 16000) for c in crops)
    train = [np.asarray(cache.audio(int(i))) for i in cache.split_indices("train")]
    for c in crops:  # every crop is a contiguous piece of some training segment
        assert any(len(a) >= len(c) and np.any([np.array_equal(a[s:s + len(c)], c)
                                                for s in range(len(a) - len(c) + 1)]) for a in train)


def test_int8_graph_quantizes_the_conv_body_symmetric_per_channel_and_keeps_frontend_and_head_float(quantized):
    int8 = onnx.load(quantized["report"].int8_path)
    graph = int8.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name.startswith("/body/")]
    assert len(convs) == 3
    for conv in convs:  # weights: DequantizeLinear of an int8 tensor, one scale per output channel, zero point 0
        dq = producer[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)
        assert len(dq.input) == 2  # all-zero zero points dropped: ONNX reads an absent one as 0 (symmetric)
        bias = producer[conv.input[2]]  # int32 bias, scale = input scale x weight scale
        assert inits[bias.input[0]].dtype == np.int32 and len(bias.input) == 2
        act = producer[conv.input[0]]
        assert act.op_type == "DequantizeLinear" and inits[act.input[2]].dtype == np.int8  # int8 activation in
        assert np.allclose(inits[bias.input[1]], inits[act.input[1]] * scale)
    # the front-end's output (the log-mel image) is quantized before the first conv
    first_in = producer[producer[convs[0].input[0]].input[0]]
    assert first_in.op_type == "QuantizeLinear" and producer[first_in.input[0]].name.startswith("/frontend/")
    # nothing under /frontend/ or /head/ reads a dequantized weight
    for n in graph.node:
        if n.name.startswith(("/frontend/", "/head/")):
            for i in n.input[1:]:
                assert not (i in producer and producer[i].op_type == "DequantizeLinear"
                            and producer[i].input[0] in inits), n.name


def test_ops_reported_float_are_float_in_the_int8_graph(quantized):
    report = quantized["report"]
    int8 = onnx.load(report.int8_path)
    by_name = {n.name: n for n in int8.graph.node}
    producer = {o: n for n in int8.graph.node for o in n.output}
    consumers = {}
    for n in int8.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    listed = {d["name"] for d in report.float_nodes}
    for op in ("STFT", "Softmax", "Gemm", "MatMul", "ReduceSum"):
        assert any(by_name[name].op_type == op for name in listed), op
    for name in listed:  # float: some float input is not dequantized, or the output is not re-quantized
        n = by_name[name]
        weights_float = any(i in {t.name for t in int8.graph.initializer} and
                            int8.graph.initializer[[t.name for t in int8.graph.initializer].index(i)].data_type
                            == TensorProto.FLOAT for i in n.input)
        in_dq = all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input if i)
        out_q = all(c.op_type == "QuantizeLinear" for o in n.output for c in consumers.get(o, [None]) if c)
        assert weights_float or not in_dq or not out_q, name
    assert {d["op_type"] for d in report.quantized_nodes} == {"Conv", "MaxPool"}


def test_int8_ccc_is_computed_from_the_int8_graphs_own_outputs(tiny, quantized):
    cache = tiny["cache"]
    idx = cache.split_indices("valid")
    truth = np.asarray(cache.targets)[idx]
    outs = {}
    for key, path in (("fp32", quantized["fp32"]), ("int8", quantized["report"].int8_path)):
        session = ort_session(str(path))
        outs[key] = np.stack([session.run(None, {"audio": cache.audio(int(i))[None]})[0][0] for i in idx])
    assert onnx_ccc(quantized["report"].int8_path, cache, "valid") == ccc_report(outs["int8"], truth)
    assert onnx_ccc(quantized["fp32"], cache, "valid") == ccc_report(outs["fp32"], truth)
    assert not np.array_equal(outs["int8"], outs["fp32"])  # really a different graph
    assert np.abs(outs["int8"] - outs["fp32"]).max() < 0.1


def test_size_accounting_of_a_hand_built_qdq_graph(tmp_path):
    # Conv with int8 weight (2 out, 1 in, 3x3) per-channel scales, int32 bias, and a float Mul constant
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.int8), "w")
    ws = numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "ws")
    wz = numpy_helper.from_array(np.zeros(2, np.int8), "wz")
    b = numpy_helper.from_array(np.array([1, 2], np.int32), "b")
    bs = numpy_helper.from_array(np.array([0.01, 0.02], np.float32), "bs")
    bz = numpy_helper.from_array(np.zeros(2, np.int32), "bz")
    k = numpy_helper.from_array(np.full((1, 2, 1, 1), 3.0, np.float32), "k")
    nodes = [helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bf"], axis=0),
             helper.make_node("Conv", ["x", "wf", "bf"], ["y"]),
             helper.make_node("Mul", ["y", "k"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 5, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              initializer=[w, ws, wz, b, bs, bz, k])
    path = tmp_path / "hand.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    s = size_accounting(path, params=20 + 2)
    assert (s["int8_weight_bytes"], s["int8_weight_elements"]) == (18, 18)
    assert (s["int32_bias_bytes"], s["int32_bias_elements"]) == (8, 2)
    assert s["scale_bytes"] == 16 and s["zero_point_bytes"] == 2 + 8
    assert (s["float_bytes"], s["float_elements"]) == (8, 2)
    assert s["initializer_bytes"] == 18 + 8 + 16 + 10 + 8
    assert s["graph_overhead_bytes"] == path.stat().st_size - s["initializer_bytes"]
    assert s["size_goal_bytes"] == int(1.1 * 22 + 4096) and s["size_goal_met"] == (s["file_bytes"] <= 4120)
    assert size_accounting(path)["size_goal_bytes"] is None  # no params, no goal


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_pruning_reduces_params_rebuilds_from_the_new_spec_and_exports_with_parity(norm, tmp_path, tiny):
    spec = tiny_spec(channels=(8, 8, 6), norm=norm)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    before = params_of(model)
    new_spec, rebuilt, history = prune(model, spec, tiny["cache"], ratio=0.5, steps=2, finetune=None)
    assert new_spec.body.channels == (4, 4, 6)  # half of 8 removed; the last block (feeds the head) kept
    assert [h["channels"] for h in history] == [[6, 6, 6], [4, 4, 6]]
    after = params_of(rebuilt)
    assert after < before and history[-1]["params"] == after
    # the new spec alone, loaded with the saved weights, computes what the pruned module computes
    torch.save(rebuilt.state_dict(), tmp_path / "w.pt")
    fresh = build_model(new_spec).eval()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    x = torch.rand(2, 9000) - 0.5
    with torch.no_grad():
        assert torch.allclose(fresh(x), model.eval()(x), atol=1e-6)
    path = export_onnx(fresh, tmp_path / "pruned.onnx")  # raises if ORT disagrees with PyTorch (> 1e-4)
    with torch.no_grad():
        expected = fresh(x[:1, :8000]).numpy()
    got = ort_session(str(path)).run(None, {"audio": x[:1, :8000].numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4


def test_target_params_finds_a_ratio_that_meets_it(tiny):
    spec = tiny_spec(channels=(8, 8, 6))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    target = params_of(model) - 300
    ratio = ratio_for_params(model, target)
    new_spec, rebuilt, _ = prune(model, spec, tiny["cache"], ratio=ratio, steps=1, finetune=None)
    assert params_of(rebuilt) <= target
    with pytest.raises(MicroserError, match="--target-params 10 is below what pruning can reach"):
        ratio_for_params(build_model(spec), 10)


def test_pruning_refuses_a_family_whose_spec_cannot_hold_pruned_widths():
    with pytest.raises(MicroserError, match="pruning is not available for family 'mobilenet'"):
        pruned_spec(REFERENCES["mobilenetv3-s"], None)


def test_compress_trial_writes_the_folder_records_it_and_reports_every_stage(tiny, capsys):
    study = tiny["study"]
    report = compress_trial(study, 0, prune_ratio=0.3, prune_steps=1, epochs=0, finetune_epochs=0.5, keep_float=[],
                            qat=False)
    assert [s.stage for s in report.stages] == ["trial", "pruned"]
    trial_row, pruned_row = report.stages
    assert pruned_row.params < trial_row.params and pruned_row.macs < trial_row.macs
    for row in report.stages:
        for key in ("ccc_torch", "ccc_fp32_onnx", "ccc_int8_onnx"):
            assert set(getattr(row, key)) == {"arousal", "dominance", "valence", "mean"}
        assert abs(row.ccc_torch["mean"] - row.ccc_fp32_onnx["mean"]) < 1e-3
    assert report.start_weights == "search"
    # the before/after table renders every stage row (typed rows), one column per stage: readable at 80 columns
    from microser.show import compress_result

    compress_result(report)
    table = capsys.readouterr().out
    assert " trial " in table and " pruned " in table and " PTQ " in table
    assert f"{pruned_row.ccc_int8_onnx['mean']:.3f}" in table
    folder = tiny["folder"] / "artifacts" / "compressed" / "trial-0"
    assert report.folder == str(folder)
    assert study.user_attrs["compressed:0"]["folder"] == str(folder)
    model, spec, _, saved = load_compressed(study, 0)
    assert spec.body.channels == tuple(report.spec["body"]["channels"]) and saved["trial"] == 0
    assert json.loads((folder / "report.json").read_text())["stages"][1] == pruned_row.to_dict()
    # the saved int8 graph is the one whose CCC was reported
    shipped = tiny["folder"] / "shipped.int8.onnx"   # as a bundle ships it (convs fused)
    onnx.save(shipped_int8(onnx.load(str(folder / "model.int8.onnx"))), str(shipped))
    assert onnx_ccc(shipped, tiny["cache"], "valid") == pruned_row.ccc_int8_onnx

    (folder / "weights.pt").unlink()
    with pytest.raises(MicroserError, match=r"compressed trial 0 .* is missing .*weights\.pt"):
        load_compressed(study, 0)


def test_deleted_trial_weights_name_the_trial_and_the_file(tiny, tmp_path):
    import shutil

    study = tiny["study"]
    art = tiny["folder"] / "artifacts"
    weights = study.trials[0].user_attrs["weights"]["artifact_id"]
    shutil.move(art / weights, tmp_path / "kept")
    try:
        with pytest.raises(MicroserError, match=f"weights of trial 0 .* are missing: .*{weights}"):
            load_trial_model(study, 0)
    finally:
        shutil.move(tmp_path / "kept", art / weights)
