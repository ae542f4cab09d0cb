"""Quantization-aware int8 (microser.qat) and the silence/quiet/clipping probes: the fake quantizer is onnxruntime's
arithmetic, the exported graph is int8 after the log-mel and computes what was trained, compress reports both."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compress_helpers import INPUT_SECONDS, build_tiny_cache, make_study
from microser import qat
from microser.compress import compress_trial
from microser.errors import MicroserError
from microser.frontends import FrontendSpec, energy_floor
from microser.graph import shipped_int8
from microser.loading import load_compressed, load_trial_model
from microser.models.spec import REFERENCES, ArchSpec, build_model
from microser.models.wav2small import Wav2SmallBody
from microser.onnxio import export_onnx, onnx_ccc, ort_session, run_onnx
from microser.quantize import (PROBE_TOLERANCE, calibration_crops, classify_nodes, extreme_crops, floor_qparams,
                               probe_agreement, probe_signals, quantize_int8)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qat")
    cache = build_tiny_cache(folder)
    study, url = make_study(folder, cache)
    from microser.cache import Cache

    data = Cache.open(cache)
    return {"folder": folder, "cache": data, "study": study, "url": url,
            "crops": calibration_crops(data, seconds=INPUT_SECONDS, max_crops=16)}


@pytest.fixture(scope="module")
def trained_qat(tiny, tmp_path_factory):
    """The tiny trained trial after 30 QAT steps, and its float and int8 graphs."""
    from microser.distill import train
    from microser.train_config import TrainConfig

    out = tmp_path_factory.mktemp("qat-export")
    model, spec, _ = load_trial_model(tiny["study"], 0)
    qmodel = qat.prepare(model, spec)
    qat.calibrate(qmodel, tiny["crops"])
    train(qmodel, tiny["cache"], TrainConfig(steps=30, crop_seconds=0.5, batch_size=8, lr=qat.QAT_LR, augment=False),
          extra_loss=qat.SilenceAnchor(model, INPUT_SECONDS))
    qmodel.eval()
    exported = qat.export_int8(qmodel, spec, out / "model.onnx", out / "model.int8.onnx", sample_seconds=INPUT_SECONDS)
    return {"model": model, "spec": spec, "qmodel": qmodel, "exported": exported, "out": out}


# ---- the fake quantizer is onnxruntime's arithmetic ----


def _ort_qdq(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zero_point, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort_session(model).run(None, {"x": x})[0]


def test_fake_quant_is_onnxruntime_quantize_dequantize_bit_for_bit_with_a_clipped_straight_through_gradient():
    scale, zp = qat.qparams(-1.3, 2.1)
    # onnxruntime's rule: range includes 0, scale = (2.1 + 1.3) / 255, zero point round(-128 + 1.3 / scale) =
    # round(-128 + 97.5) = -30 (half to even)
    assert scale == np.float32((np.float32(2.1) - np.float32(-1.3)) / np.float32(255)) and zp == -30
    rng = np.random.default_rng(0)
    ties = (np.arange(-40, 40) + 0.5).astype(np.float32) * np.float32(scale)  # exact half steps: round half to even
    x = np.concatenate([rng.uniform(-2, 3, 5000).astype(np.float32), ties, np.float32([-5, 7, 0])])
    t = torch.from_numpy(x).requires_grad_()
    y = qat._FakeQuant.apply(t, scale, zp)
    assert np.array_equal(y.detach().numpy(), _ort_qdq(x, scale, zp))
    y.sum().backward()  # gradient 1 inside the representable range [(-128 - zp) s, (127 - zp) s], 0 outside
    lo, hi = (-128 - zp) * scale, (127 - zp) * scale
    inside = (x >= lo - scale / 2) & (x <= hi + scale / 2)
    assert np.array_equal(t.grad.numpy(), inside.astype(np.float32))
    assert t.grad.numpy()[-3] == 0 and t.grad.numpy()[-2] == 0 and t.grad.numpy()[-1] == 1


def test_floor_qparams_put_the_log_mel_floor_exactly_on_code_minus_128():
    floor_db = float(np.float32(10 * np.log10(energy_floor(FrontendSpec(n_fft=64, win_length=64)))))  # -75.92 dB
    scale, zp = floor_qparams(floor_db, 40.0)
    k = int(np.floor(255 * -floor_db / (40.0 - floor_db)))  # 167: the floor is k steps below zero
    assert (scale, zp) == (float(np.float32(-floor_db / k)), k - 128) == (scale, 39)
    y = _ort_qdq(np.float32([floor_db, 40.0, 0.0]), scale, zp)
    assert abs(y[0] - floor_db) <= 1e-5 * abs(floor_db)  # silence dequantizes to itself
    assert y[1] >= 40.0 - scale and y[2] == 0.0  # the top of the range and zero are covered


def test_weight_fake_quant_is_symmetric_per_output_channel():
    w = torch.tensor([[[[0.5, -1.0], [0.25, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]], [[[0.003, 0.001], [-0.002, 0.0]]]])
    s = qat.weight_scales(w)
    assert torch.equal(s, torch.tensor([1.0 / 127, 1.0, 0.003 / 127]))  # an all-zero channel gets scale 1
    q = qat.WeightFakeQuant()(w)
    assert torch.equal(q[0, 0, 0], torch.tensor([64 / 127, -1.0]))  # 0.5 * 127 = 63.5 rounds to the even 64
    assert torch.equal(q[1], w[1])


# ---- the QAT model and its graphs ----


def test_prepare_folds_batchnorm_and_puts_a_quantizer_at_every_point():
    spec = REFERENCES["wav2small-ref"]
    torch.manual_seed(0)
    model = build_model(spec).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    qmodel = qat.prepare(model, spec)
    names = [q.name for q in qat.quant_points(qmodel)]
    assert names == ["frontend.q_out", *[f"body.{i}.q" for i in range(7)], "head.pool.q_values", "head.pool.q_scores",
                     "head.pool.q_weights", "head.pool.q_att", "head.pool.q_gram", "head.q_out"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in qmodel.modules())
    qat.set_mode(qmodel, "off")
    x = torch.rand(2, 16000) - 0.5
    with torch.no_grad():
        assert torch.allclose(qmodel(x), model(x), atol=1e-5)  # the folded float network is the same network
        assert torch.allclose(qat.to_student(qmodel, spec)(x), model(x), atol=1e-5)  # and stores as the spec's Student
    with pytest.raises(MicroserError, match="quantization-aware training is not available for family 'mobilenet'"):
        qat.prepare(build_model("mobilenetv3-s"), REFERENCES["mobilenetv3-s"])


def test_every_operator_after_the_log_mel_is_int8_and_the_graph_computes_what_was_trained(trained_qat):
    int8 = onnx.load(trained_qat["exported"].int8_path)
    floats, quantized = classify_nodes(int8)
    assert floats and all(n.name.startswith("/frontend/") for n in floats), [n.name for n in floats]
    ops = sorted({n.op_type for n in quantized})
    # Div: the Gram product's 1 / (T*F) and the softmax split's ratio of sums; ReduceMax, Sub, Exp: its exp(s - max)
    assert ops == ["Conv", "Div", "Einsum", "Exp", "Gemm", "MaxPool", "ReduceMax", "ReduceSum", "Sub"]
    assert "Softmax" not in {n.op_type for n in int8.graph.node}
    assert "Relu" not in {n.op_type for n in int8.graph.node}  # the clamp at zero point -128 is the ReLU
    # the int8 graph runs in onnxruntime and equals the fake-quantized PyTorch model up to accumulation order
    x = (torch.rand(2, 9000, generator=torch.Generator().manual_seed(5)) - 0.5) * 0.3
    with torch.no_grad():
        want = trained_qat["qmodel"](x).numpy()
    got = run_onnx(ort_session(int8), x.numpy())
    assert np.abs(got - want).max() < 0.02 and trained_qat["exported"].torch_vs_int8_max_abs < 0.02


def test_int8_attention_weights_keep_their_precision_on_clips_longer_than_the_calibration_crops():
    """The rounded part of the int8 softmax is exp(s - max) in (0, 1], exactly 1 at each peak: its error does not
    grow with the clip's length. Rounding the softmax weights themselves (about 1 / frames each) on a scale
    calibrated on short crops loses most of the pooled value on long clips."""
    from microser.models.wav2small import softmax_pool

    g = torch.Generator().manual_seed(0)

    def clip(frames):
        return torch.randn(2, 4, frames, 3, generator=g), torch.randn(2, 4, frames, 3, generator=g)

    v, s = clip(50)   # calibration on short crops, as qat.calibrate does
    q_exp, q_softmax = qat.FakeQuant("head.pool.q_weights"), qat.FakeQuant("softmax weights")
    q_exp(torch.exp(s - s.amax(2, keepdim=True)))
    q_softmax(torch.softmax(s, 2))
    q_exp.freeze()
    q_softmax.freeze()
    assert q_exp.qparams() == (pytest.approx(1 / 255), -128)   # [0, 1] on the int8 grid, 0 exactly at code -128
    for frames in (50, 500, 5000):
        v, s = clip(frames)
        want = torch.einsum("bctf,bctf->bcf", v, torch.softmax(s, 2))
        err = (softmax_pool(v, s, q_exp) - want).abs().max()
        assert err < 0.003 and err < 0.05 * want.abs().max(), (frames, err)
    old = (torch.einsum("bctf,bctf->bcf", v, q_softmax(torch.softmax(s, 2))) - want).abs().max()
    assert old > 0.3 * want.abs().max(), old   # what the int8 graph did before the split (5000 frames)


def test_the_softmax_split_counts_as_int8_only_in_its_integer_form(trained_qat):
    """exp of a code difference (x - max x on one scale, an integer in [-255, 0]) is a 256-entry table; x minus the
    max of another tensor (another scale) is not, and the Div of the two time sums is integer only when both are
    int32 sums."""
    int8 = onnx.load(trained_qat["exported"].int8_path)
    producer = {o: n for n in int8.graph.node for o in n.output}
    exp = next(n for n in int8.graph.node if n.op_type == "Exp")
    sub = producer[exp.input[0]]
    assert sub.op_type == "Sub" and producer[sub.input[1]].op_type == "ReduceMax"
    einsum = next(n for n in int8.graph.node if n.op_type == "Einsum" and producer[n.input[0]].name.startswith(
        "/head/pool/q_values"))
    producer[sub.input[1]].input[0] = einsum.input[0]   # s - max(v): two scales
    floats, _ = classify_nodes(int8)
    assert {"Sub", "Exp"} <= {n.op_type for n in floats}
    int8 = onnx.load(trained_qat["exported"].int8_path)
    div = next(n for n in int8.graph.node if n.op_type == "Div" and n.input[1] in producer
               and producer[n.input[1]].op_type == "ReduceSum")
    div.input[1] = producer[div.input[1]].input[0]   # divided by the dequantized exponentials, not by their sum
    floats, _ = classify_nodes(int8)
    assert div.name in {n.name for n in floats}


def test_int8_weights_biases_and_scales_are_the_trained_ones(trained_qat):
    int8 = onnx.load(trained_qat["exported"].int8_path)
    inits = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer}
    producer = {o: n for n in int8.graph.node for o in n.output}
    qmodel = trained_qat["qmodel"]
    convs = [n for n in int8.graph.node if n.op_type in ("Conv", "Gemm")]
    layers = [m for m in qmodel.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(convs) == len(layers) == 3 + 2 + 1  # body, attention 1x1 convs, Linear
    by_shape = {}
    for m in layers:
        by_shape.setdefault(tuple(m.parametrizations.weight.original.shape), []).append(m)
    for node in convs:
        dq_w = producer[node.input[1]]
        wq, ws = inits[dq_w.input[0]], inits[dq_w.input[1]]
        assert wq.dtype == np.int8 and len(dq_w.input) == 2 and ws.shape == (wq.shape[0],)
        float_w = [m for m in by_shape[wq.shape]]
        trained = [m.weight.detach().numpy() for m in float_w]  # the fake-quantized weights PyTorch trained with
        assert any(np.array_equal(wq.astype(np.float32) * ws.reshape((-1,) + (1,) * (wq.ndim - 1)), t) for t in trained)
        dq_b = producer[node.input[2]]
        bq, bs = inits[dq_b.input[0]], inits[dq_b.input[1]]
        dq_x = producer[node.input[0]] if producer[node.input[0]].op_type == "DequantizeLinear" else None
        assert bq.dtype == np.int32
        if dq_x is not None:  # bias scale = input scale x weight scale
            assert np.array_equal(bs, (np.float32(inits[dq_x.input[1]]) * ws).astype(np.float32))
    # activation scales are the FakeQuant ones; the log-mel's lowest code is the front-end's floor exactly
    points = {p["name"]: p for p in trained_qat["exported"].points}
    first_q = next(n for n in int8.graph.node if n.op_type == "QuantizeLinear")
    assert float(inits[first_q.input[1]]) == np.float32(points["frontend.q_out"]["scale"])
    floor_db = points["frontend.q_out"]["lo"]
    zp = int(inits[first_q.input[2]])
    assert abs((-128 - zp) * float(inits[first_q.input[1]]) - floor_db) < 1e-4


@pytest.mark.parametrize("which", ["ptq", "qat"])
def test_silence_quiet_noise_and_clipping_agree_in_int8_and_fp32(which, tiny, trained_qat, tmp_path):
    if which == "qat":
        fp32, int8 = trained_qat["exported"].fp32_path, trained_qat["exported"].int8_path
    else:
        model, _, _ = load_trial_model(tiny["study"], 0)
        fp32 = export_onnx(model, tmp_path / "m.onnx", sample_seconds=INPUT_SECONDS)
        int8 = quantize_int8(fp32, tiny["crops"], tmp_path / "m.int8.onnx", keep_float=[]).int8_path
    signals = probe_signals(1.0)
    assert not signals["silence"].any() and abs(20 * np.log10(signals["noise-60dB"].std()) + 60) < 0.2
    assert np.abs(signals["clipped"]).max() == 1.0 and (np.abs(signals["clipped"]) == 1.0).mean() > 0.5
    got = probe_agreement(fp32, int8)
    assert got["passed"] and got["tolerance"] == PROBE_TOLERANCE, got
    for name, row in got["signals"].items():  # the outputs are the graphs' own
        a = run_onnx(ort_session(str(int8)), signals[name][None])[0]
        assert row["int8"] == [float(v) for v in a]


@pytest.mark.parametrize("prenorm,compression", [("none", "log"), ("clip", "log"), ("running", "pcen"),
                                                 ("window", "log")])
def test_probes_agree_for_every_front_end(prenorm, compression, tiny, tmp_path):
    """Post-training int8 of models on each prenorm, log and PCEN (trained briefly, so the outputs depend on the input)."""
    from microser.distill import train
    from microser.train_config import TrainConfig

    spec = ArchSpec("wav2small", FrontendSpec(prenorm=prenorm, n_fft=128, hop=64, n_mels=12, compression=compression),
                    Wav2SmallBody(channels=(6, 6), kernel=3, norm="batch", pool_after=(0,), pooling="attention+gram"))
    torch.manual_seed(1)
    model = build_model(spec)
    train(model, tiny["cache"], TrainConfig(steps=40, crop_seconds=0.5, batch_size=8, lr=3e-3, augment=False))
    fp32 = export_onnx(model.eval(), tmp_path / "m.onnx", sample_seconds=INPUT_SECONDS)
    int8 = quantize_int8(fp32, tiny["crops"], tmp_path / "m.int8.onnx", keep_float=[]).int8_path
    got = probe_agreement(fp32, int8)
    assert got["passed"], got
    outs = np.array([r["fp32"] for r in got["signals"].values()])
    assert np.ptp(outs, axis=0).max() > 1e-3  # the probes do reach the output


def test_extreme_crops_are_silence_and_full_scale_clipping():
    crop = np.float32([0.1, -0.2, 0.05, 0.0])
    silence, clipped = extreme_crops([crop])
    assert not silence.any() and silence.shape == crop.shape
    assert np.array_equal(clipped, np.float32([1.0, -1.0, 1.0, 0.0]))  # 4 x past the peak 0.2, clipped to +-1


# ---- compress: both methods reported, QAT when asked or when PTQ loses too much ----


def test_compress_with_qat_reports_ptq_and_qat_and_saves_the_qat_model(tiny, capsys):
    from microser.cli import main
    from microser.storage import load_study

    main(["compress", "--study", "s", "--storage", tiny["url"], "--trial", "0", "--epochs", "0", "--keep-float",
          "none", "--qat", "--finetune-steps", "12", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [(s["stage"], s["method"]) for s in report["stages"]] == [("trial", "ptq"), ("qat", "qat")]
    ptq, qrow = report["stages"]
    assert qrow["train"]["steps"] == 12 and report["settings"]["qat_reason"] == "--qat"
    assert qrow["params"] == ptq["params"]  # one params definition: the fp32 graph's stored constants
    assert qrow["size"]["size_goal_bytes"] == int(1.1 * qrow["params"] + 4096)
    assert all(n["name"].startswith("/frontend/") for n in qrow["quantization"]["float_nodes"])
    assert qrow["probes"]["passed"]
    study = load_study("s", tiny["url"])
    model, spec, folder, saved = load_compressed(study, 0)
    assert study.user_attrs["compressed:0"]["method"] == "qat"
    shipped = tiny["folder"] / "shipped.int8.onnx"   # every int8 figure is of the graph a bundle ships
    onnx.save(shipped_int8(onnx.load(str(folder / "model.int8.onnx"))), str(shipped))
    assert onnx_ccc(shipped, tiny["cache"], "valid") == qrow["ccc_int8_onnx"]
    from microser.distill import evaluate

    assert abs(evaluate(model, tiny["cache"])["mean"] - qrow["ccc_fp32_onnx"]["mean"]) < 1e-3  # weights.pt = model.onnx

    from microser.export import export_trial

    bundle = export_trial(study, 0, tiny["folder"] / "bundle-qat", compressed=True)
    card = bundle.card
    assert card["quantization"]["method"] == "qat" and card["probes"]["passed"]
    assert [s["method"] for s in card["quantization"]["stages"]] == ["ptq", "qat"]
    assert card["size"]["size_goal_bytes"] == int(1.1 * card["costs"]["params"] + 4096)
    text = (tiny["folder"] / "bundle-qat" / "MODEL_CARD.md").read_text()
    assert "Quantization-aware training" in text and "| qat | QAT |" in text and "| silence |" in text


def test_qat_is_the_default_only_when_post_training_int8_loses_more_than_the_tolerance(tiny, monkeypatch, capsys):
    import microser.compress as compress
    from microser import show

    monkeypatch.setattr(compress, "INT8_TOLERANCE", 1.0)  # no drop is that large: PTQ stays
    report = compress_trial(tiny["study"], 0, epochs=0, keep_float=[], finetune_steps=4)
    assert [s.method for s in report.stages] == ["ptq"] and not report.settings["qat"]
    assert report.settings["qat_reason"].startswith("auto: post-training int8 lost")
    monkeypatch.setattr(compress, "INT8_TOLERANCE", -1.0)  # every drop is larger: QAT follows
    report = compress_trial(tiny["study"], 0, epochs=0, keep_float=[], finetune_steps=4)
    assert [s.method for s in report.stages] == ["ptq", "qat"] and report.settings["qat"]
    show.compress_result(report)
    text = capsys.readouterr().out
    assert "PTQ" in text and "QAT" in text and "quantization-aware training: yes (auto: post-training int8 lost" in text


def test_compress_refuses_bad_qat_options_before_any_work(tiny):
    with pytest.raises(MicroserError, match=r"--finetune-steps 0 is out of range; expected a whole number >= 1"):
        compress_trial(tiny["study"], 0, finetune_steps=0, qat=True)


@pytest.mark.parametrize("norm,pooling,compression", [("none", "attention", "log"), ("batch", "meanstd", "pcen"),
                                                      ("layer", "attention+gram", "log")])
def test_every_head_exports_int8_after_the_log_mel(norm, pooling, compression, tmp_path):
    """Attention without Gram, mean+std (its epsilon is absorbed by the requantization) and PCEN; LayerNorm stays
    float between two quantization points (documented), every other operator after the front-end is int8."""
    spec = ArchSpec("wav2small", FrontendSpec(prenorm="running", n_fft=256, hop=128, n_mels=16, compression=compression),
                    Wav2SmallBody(channels=(6, 5), kernel=3, norm=norm, pool_after=(0,), stem_stride=2, pooling=pooling))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    qmodel = qat.prepare(model, spec)
    crops = [np.random.default_rng(k).standard_normal(8000).astype(np.float32) * 0.1 for k in range(3)]
    qat.calibrate(qmodel, crops)
    exported = qat.export_int8(qmodel, spec, tmp_path / "m.onnx", tmp_path / "m.int8.onnx", sample_seconds=0.5)
    floats, _ = classify_nodes(onnx.load(exported.int8_path))
    after = [n.op_type for n in floats if not n.name.startswith("/frontend/")]
    assert after == (["LayerNormalization"] * 2 if norm == "layer" else []), after
    assert exported.torch_vs_int8_max_abs < 1e-3
    assert ("head.pool.q_gram" in [p["name"] for p in exported.points]) == (pooling == "attention+gram")
    # the generated C runs the QAT graph: its int8 library matches onnxruntime on that graph within PARITY_INT8
    # (generate compiles it with gcc and raises otherwise), whichever head the graph has
    from microser.cgen.bundle import generate

    student = qat.to_student(qmodel, spec)
    if norm == "layer":   # LayerNorm between two quantization points has no int8 C kernel: a clear refusal
        with pytest.raises(MicroserError, match="int8 C export of body.norm 'layer' is not supported"):
            generate(tmp_path / "bundle", student, spec, exported.int8_path, measure_costs=False, cortex_m4=False)
        return
    section = generate(tmp_path / "bundle", student, spec, exported.int8_path, measure_costs=False, cortex_m4=False)
    parity = section["parity"]["int8"]
    assert parity["max_abs_diff"] <= parity["tolerance"] == 0.01
    assert parity["against"] == "onnxruntime int8 graph, head without its quantization points"
    assert 0 < parity["vs_full_graph_max_abs_diff"] < 0.05   # the graph's head rounding, reported, not hidden


# ---- the shipped int8 graph: convs fused to QLinearConv, same outputs, within the size goal ----


def test_the_shipped_graph_fuses_every_int8_conv_into_qlinearconv(trained_qat, tiny):
    """Fused convs compute in int8 (int32 accumulation, one requantization); onnxruntime runs some convs of the QDQ
    graph in float between dequantize and quantize, so the two may differ by int8 rounding, never by more than the
    probes allow; stripping the fused graph changes nothing."""
    from microser.graph import bundle_graph, fuse_qlinear_conv, shipped_int8, strip_graph

    int8 = onnx.load(trained_qat["exported"].int8_path)
    convs = [n for n in int8.graph.node if n.op_type == "Conv"]
    fused = fuse_qlinear_conv(int8)
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("QLinearConv") == len(convs) and "Conv" not in ops
    assert len(fused.graph.node) < len(int8.graph.node) - 3 * len(convs)   # DQ x/w/b and Q y of each conv gone
    floats, quantized = classify_nodes(fused)
    assert all(n.name.startswith("/frontend/") for n in floats)
    assert sum(n.op_type == "QLinearConv" for n in quantized) == len(convs)
    shipped = bundle_graph(int8)
    assert len(shipped.SerializeToString()) < len(strip_graph(int8).SerializeToString())
    for x in list(probe_signals(INPUT_SECONDS).values()) + tiny["crops"][:4]:
        x = np.asarray(x, np.float32)[None, :]
        got = run_onnx(ort_session(shipped), x)
        assert np.array_equal(got, run_onnx(ort_session(shipped_int8(int8)), x))
        assert np.abs(got - run_onnx(ort_session(int8), x)).max() < PROBE_TOLERANCE


def test_wav2small_ref_after_qat_ships_within_1_1_x_params_plus_4_kib(tmp_path):
    """The issue-11 size goal: with every operator after the log-mel int8, the shipped file of the paper's
    Wav2Small is at most 1.1 x params + 4096 bytes (the size does not depend on the weights' values)."""
    from microser.costs import count_params
    from microser.graph import bundle_graph
    from microser.quantize import size_accounting

    spec = REFERENCES["wav2small-ref"]
    torch.manual_seed(0)
    model = build_model(spec).eval()
    qmodel = qat.prepare(model, spec)
    qat.calibrate(qmodel, [np.random.default_rng(k).standard_normal(16000).astype(np.float32) * 0.1 for k in range(2)])
    exported = qat.export_int8(qmodel, spec, tmp_path / "m.onnx", tmp_path / "m.int8.onnx", sample_seconds=1.0)
    onnx.save(bundle_graph(onnx.load(exported.int8_path)), str(tmp_path / "shipped.onnx"))
    size = size_accounting(tmp_path / "shipped.onnx", params=count_params(onnx.load(str(tmp_path / "m.onnx"))))
    assert size["params"] == 10721 and size["int8_weight_elements"] == 10595   # every learned weight int8
    assert size["float_elements"] < 16   # front-end scalars only
    assert size["size_goal_met"], size


# ---- every x86 CPU computes the same int8 graph ----

_RUN_GRAPHS = """
import json, sys, numpy as np, onnxruntime as ort
x, config = np.load(sys.argv[1]), json.loads(sys.argv[3])
outs = {}
for i, path in enumerate(sys.argv[4:]):
    for setting in ("plain", "microser", "float"):
        options = ort.SessionOptions()
        for key, value in (config.items() if setting == "microser" else ()):
            options.add_session_config_entry(key, value)
        if setting == "float":   # no fusion: QDQ runs as dequantize, float op, quantize (no integer kernels)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        outs[f"{i}-{setting}"] = np.stack([s.run(None, {s.get_inputs()[0].name: row[None]})[0][0] for row in x])
np.savez(sys.argv[2], **outs)
"""


def _run_graphs(prefix: list[str], paths: list[Path], x: np.ndarray, folder: Path) -> dict:
    """Each graph's outputs on the rows of ``x`` with a plain onnxruntime session, with microser's session
    settings (``onnxio.ORT_SESSION_CONFIG``) and unfused (``"float"``: the int8 arithmetic emulated in float, the same
    on every CPU), in a Python started with ``prefix`` (an emulator, or nothing)."""
    from microser.onnxio import ORT_SESSION_CONFIG

    script, inputs, out = folder / "run_graphs.py", folder / "x.npy", folder / f"out{len(prefix)}.npz"
    script.write_text(_RUN_GRAPHS)
    np.save(inputs, x)
    subprocess.run([*prefix, sys.executable, str(script), str(inputs), str(out), json.dumps(ORT_SESSION_CONFIG),
                    *map(str, paths)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    with np.load(out) as got:
        return {key: got[key] for key in got.files}


@pytest.mark.slow
def test_int8_graphs_compute_the_same_on_an_x86_cpu_without_vnni(tiny, trained_qat, tmp_path):
    """On x86 CPUs without VNNI (AVX2: Haswell to Skylake; AMD before Zen 4) onnxruntime's uint8 x int8 kernels add
    products in int16 pairs that saturate, and by default it rewrites int8 QDQ graphs onto them. With microser's
    session settings the post-training QDQ graph, the QAT QDQ graph and the shipped graph give the same outputs on an
    emulated Haswell (qemu-x86_64 -cpu Haswell) as on this CPU, up to the float front-end's last bit, so every int8
    CCC microser reports is the int8 arithmetic of the C library on any machine."""
    qemu = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64" or qemu is None:
        pytest.skip("needs an x86-64 host and qemu-x86_64 (Debian's qemu-user; .ci/run installs it)")
    model, _, _ = load_trial_model(tiny["study"], 0)
    fp32 = export_onnx(model, tmp_path / "m.onnx", sample_seconds=INPUT_SECONDS)
    paths = [Path(quantize_int8(fp32, tiny["crops"], tmp_path / "m.int8.onnx", keep_float=[]).int8_path),
             Path(trained_qat["exported"].int8_path), tmp_path / "qat.shipped.onnx"]
    onnx.save(shipped_int8(onnx.load(str(paths[1]))), str(paths[2]))
    x = np.stack([np.asarray(v, np.float32) for v in probe_signals(INPUT_SECONDS).values()]
                 + [np.asarray(c, np.float32) for c in tiny["crops"][:5]])
    here, haswell = _run_graphs([], paths, x, tmp_path), _run_graphs([qemu, "-cpu", "Haswell"], paths, x, tmp_path)
    ref = {i: here[f"{i}-float"] for i in range(len(paths))}   # host-independent: no integer kernels
    off = {f"{where}-{key}": float(np.abs(got[key] - ref[int(key[0])]).max())
           for where, got in (("here", here), ("haswell", haswell)) for key in got if not key.endswith("float")}
    if off["haswell-0-plain"] < 0.01:
        pytest.skip(f"the emulated Haswell did not take onnxruntime's saturating int8 path (plain sessions agree: {off})")
    # microser's sessions compute the int8 arithmetic on both CPUs (within an int8 rounding of the float emulation)
    assert max(v for k, v in off.items() if k.endswith("microser")) < 0.01, off
    for i in range(len(paths)):   # and the same integers on both, up to the float front-end's last bit
        assert float(np.abs(here[f"{i}-microser"] - haswell[f"{i}-microser"]).max()) < 1e-5, i
