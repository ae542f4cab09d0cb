"""Costs against hand counts: params and MACs of wav2small-ref, the RAM plan of a hand-built graph, ORT parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from microser.costs import Costs, count_macs, count_params, measure_costs, measure_report, ram_plan, stft_macs
from microser.errors import MicroserError

# ---- the RAM plan of a small graph, computed by hand ----


def _hand_graph() -> onnx.ModelProto:
    """audio (1, N) -> Mul -> Reshape (1,1,2,N/2) -> Conv(2) -> Relu -> Conv(2) -> Add(skip) -> ReduceMean -> Gemm.

    Step  node                  output shape (N = 16)   fp32 bytes   int8 bytes
    0     /frontend/Mul         a   (1, 16)             64           64
    1     /frontend/Reshape     f   (1, 1, 2, 8)        64           16 (read by the first /body/ node)
    2     /body/Conv            c1  (1, 2, 2, 8)        128          32
    3     /body/Relu            r1  (1, 2, 2, 8)        128          32
    4     /body/Conv_1          c2  (1, 2, 2, 8)        128          32
    5     /body/Add             s = c2 + r1             128          32
    6     /head/ReduceMean      m   (1, 2)              8            8
    7     /head/Shape           shp (2,) int64          16           16  (reads audio: metadata only)
    8     /head/Gemm            adv (1, 3)              12           12
    The graph input audio (1, 16) is 64 bytes in both plans.
    """
    init = [
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array([1, 1, 2, -1], np.int64), "shape"),
        numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w1"),
        numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w2"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.ones((2, 3), np.float32), "wg"),
        numpy_helper.from_array(np.zeros(3, np.float32), "bg"),
    ]
    nodes = [
        helper.make_node("Mul", ["audio", "half"], ["a"], name="/frontend/Mul"),
        helper.make_node("Reshape", ["a", "shape"], ["f"], name="/frontend/Reshape"),
        helper.make_node("Conv", ["f", "w1"], ["c1"], name="/body/Conv"),
        helper.make_node("Relu", ["c1"], ["r1"], name="/body/Relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="/body/Conv_1"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="/body/Add"),
        helper.make_node("ReduceMean", ["s", "axes"], ["m"], name="/head/ReduceMean", keepdims=0),
        helper.make_node("Shape", ["audio"], ["shp"], name="/head/Shape"),
        helper.make_node("Gemm", ["m", "wg", "bg"], ["adv"], name="/head/Gemm"),
    ]
    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["batch", "samples"])],
        [helper.make_tensor_value_info("adv", TensorProto.FLOAT, ["batch", 3])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_ram_plan_of_hand_graph_fp32():
    plan = ram_plan(_hand_graph(), 16, int8=False)
    # live at each step (no in-place reuse; a tensor lives from its producer to its last consumer):
    expected = [
        64 + 64,  # 0: audio, a
        64 + 64,  # 1: a, f
        64 + 128,  # 2: f, c1
        128 + 128,  # 3: c1, r1
        128 + 128,  # 4: r1, c2
        128 + 128 + 128,  # 5: r1 (skip), c2, s
        128 + 8,  # 6: s, m
        8 + 16,  # 7: m, shp (audio is not kept alive by Shape)
        8 + 12,  # 8: m, adv
    ]
    assert list(plan.step_bytes) == expected
    assert plan.peak_bytes == 384 and plan.peak_step == "/body/Add"
    assert sorted(t.name for t in plan.live) == ["c2", "r1", "s"]
    assert all(t.shape == (1, 2, 2, 8) and t.bytes == 128 for t in plan.live)


def test_ram_plan_of_hand_graph_int8():
    plan = ram_plan(_hand_graph(), 16, int8=True)
    # /body/ outputs and the first /body/ node's input f are 1 byte per element; the rest stays float
    expected = [64 + 64, 64 + 16, 16 + 32, 32 + 32, 32 + 32, 32 + 32 + 32, 32 + 8, 8 + 16, 8 + 12]
    assert list(plan.step_bytes) == expected
    assert plan.peak_bytes == 128 and plan.peak_step == "/frontend/Mul"  # the peak moved to the float front-end
    assert {t.name: t.bytes_per_element for t in plan.live} == {"audio": 4, "a": 4}


def test_ram_plan_scales_with_input_and_falls_back_to_onnxruntime(monkeypatch):
    assert ram_plan(_hand_graph(), 32, int8=False).peak_bytes == 2 * 384  # every big tensor doubles

    def broken(*args, **kwargs):
        raise RuntimeError("no shape inference")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    plan = ram_plan(_hand_graph(), 16, int8=False)  # shapes from one onnxruntime run
    assert plan.peak_bytes == 384 and plan.step_bytes[7] == 8 + 16


def test_count_params_of_hand_graph():
    # float initializers: half 1 + w1 2 + w2 4 + wg 6 + bg 3 = 16; int64 shape and axes are metadata
    assert count_params(_hand_graph()) == 16
    graph = _hand_graph()
    graph.graph.node.insert(0, helper.make_node("Constant", [], ["k"], name="k",
                                                value=numpy_helper.from_array(np.ones((4, 5), np.float32))))
    assert count_params(graph) == 16 + 20  # Constant nodes are stored too


def test_missing_onnx_file_is_refused(tmp_path):
    with pytest.raises(MicroserError, match=r"missing\.onnx does not exist"):
        count_params(tmp_path / "missing.onnx")


# ---- wav2small-ref: params, MACs and RAM by hand ----


@pytest.fixture(scope="module")
def ref_report():
    return measure_report("wav2small-ref", input_seconds=1.0)


def test_wav2small_ref_params_hand_count(ref_report):
    c = 13
    convs = 1 * c * 9 + 6 * c * c * 9  # 7 conv 3x3 weights, no bias: 117 + 9126 = 9243
    bn = 7 * 2 * c  # gamma, beta: 182
    attention = 2 * (c * c + c)  # values and scores 1x1 convs: 364
    linear = (c * 13 + c * c) * 3 + 3  # (att 13 ch x 13 bands + Gram 13x13 = 338) -> 3: 1017
    assert ref_report.costs.trainable_params == convs + bn + attention + linear == 10806
    folded = convs + 7 * c + attention + linear  # BN folded into each conv as a bias: 10715
    # the 33 x 26 mel matrix and the 64-sample window are made by MelWeightMatrix / HannWindow: not stored, only
    # their float arguments fmin and fmax (their int64 arguments n_mels, n_fft, rate, size are metadata)
    mel_edges = 2
    scalars = 4  # prenorm eps 1e-7 and exponent 2, energy floor (256e-10), ln(10)/10 of 10 log10
    assert ref_report.costs.params == folded + mel_edges + scalars == 10721


def test_window_and_mel_matrix_are_operators_in_the_graph_not_weights(tmp_path):
    from microser.frontends import FrontendSpec, hann_window, mel_matrix
    from microser.models.spec import REFERENCES, ArchSpec, build_model
    from microser.onnxio import export_onnx

    spec = ArchSpec("wav2small", FrontendSpec(prenorm="clip", n_fft=512, hop=160, win_length=400, n_mels=40),
                    REFERENCES["wav2small-ref"].body)
    model = build_model(spec)
    proto = onnx.load(export_onnx(model, tmp_path / "m.onnx"))  # ORT runs them (parity with PyTorch <= 1e-4)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MelWeightMatrix") == 1 and ops.count("HannWindow") == 1 and ops.count("Pad") == 1
    stored = [numpy_helper.to_array(t) for t in proto.graph.initializer]
    assert not any(a.size >= 40 and a.dtype == np.float32 and a.ndim <= 2 and a.shape[0] in (257, 400, 512)
                   for a in stored)  # no window, no mel matrix among the stored tensors
    # what the operators make is what PyTorch trains with: the STFT window (400 zero-padded to 512) and the matrix
    outputs = {n.output[0]: n for n in proto.graph.node if n.op_type in ("MelWeightMatrix", "Pad")}
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    from microser.onnxio import ort_session

    got = dict(zip([o.name for o in ort_session(probe).get_outputs()],
                   ort_session(probe).run(None, {"audio": np.zeros((1, 16000), np.float32)})))
    mel = next(got[n] for n, node in outputs.items() if node.op_type == "MelWeightMatrix")
    window = next(got[n] for n, node in outputs.items() if node.op_type == "Pad")
    assert np.array_equal(mel, mel_matrix(spec.frontend).numpy())
    assert np.array_equal(window[56:456], hann_window(400).numpy()) and not window[:56].any() and not window[456:].any()
    # params: the same 10,715 folded weights as wav2small-ref's 13x7 body on 40 mels (20 bands at the head),
    # + 6 front-end scalars; the 257 x 40 = 10,280 matrix no longer counts
    c = 13
    head = 2 * (c * c + c) + (c * 20 + c * c) * 3 + 3
    assert count_params(proto) == 1 * c * 9 + 6 * c * c * 9 + 7 * c + head + 6
    # the RAM plan treats generated tables like weights: no step holds the 41 KB matrix
    plan = ram_plan(proto, 16000, int8=False)
    assert all(t.name not in outputs for t in plan.live) and len(plan.step_names) == len(
        [n for n in proto.graph.node if n.op_type != "Constant"]) - 3


def test_wav2small_ref_macs_hand_count(ref_report):
    t, f = 499, 26  # frames (16000 - 64) // 32 + 1, mel bands
    t2, f2 = 250, 13  # after the 3x3/2 max-pool with padding 1: ceil(n / 2)
    c = 13
    frontend = (t * (64 + 4 * 32 * 6)  # STFT: window + (n_fft/2) log2(n_fft) butterflies x 4 real MACs
                + 33 * t * 2  # power z * z (real, imag)
                + t * 26 * 33)  # mel matmul
    body = (t * f * c * 1 * 9  # conv0: out elements x C_in x 3 x 3
            + 2 * t * f * c * c * 9  # conv1, conv2
            + 4 * t2 * f2 * c * c * 9)  # conv3..6 after the pool; BN folded (0), ReLU and pool 0
    head = (2 * t2 * f2 * c * c  # values and scores 1x1 convs
            + c * f2 * (3 * t2 - 1)  # softmax over time (thop's rule: exp, add, div)
            + c * t2 * f2  # values x weights
            + c * c * t2 * f2  # Gram product
            + 338 * 3)  # Linear
    assert frontend == 876_244 and body == 60_757_866 and head == 1_817_595
    assert ref_report.costs.macs == frontend + body + head == 63_451_705


def test_wav2small_ref_ram_plan_anchor(ref_report):
    conv_out = 13 * 499 * 26  # the anchor: two 13x499x26 activations alive
    fp32 = ref_report.plan_fp32
    assert fp32.peak_bytes == ref_report.costs.ram_bytes_fp32 == 2 * conv_out * 4 == 1_349_296
    assert [t.shape for t in fp32.live] == [(1, 13, 499, 26)] * 2
    int8 = ref_report.plan
    body_peak = max(b for b, name in zip(int8.step_bytes, int8.step_names) if name.startswith("/body/"))
    assert body_peak == 2 * conv_out == 337_324  # the same two tensors at 1 byte
    # the float attention head holds three 13x250x13 float tensors (scores softmax, values, their product)
    # while the int8 body output is still needed for the Gram product: the int8 plan's peak is there
    assert int8.peak_step.startswith("/head/") and int8.peak_bytes == 3 * 13 * 250 * 13 * 4 + 13 * 250 * 13
    assert ref_report.costs.ram_bytes == int8.peak_bytes == 549_250


def test_costs_record_and_workdir(tmp_path):
    model = _Functional()
    costs = measure_costs(model, input_seconds=0.5, workdir=tmp_path)
    assert isinstance(costs, Costs)
    assert list(costs.to_dict()) == ["params", "trainable_params", "macs", "onnx_bytes", "ram_bytes",
                                     "ram_bytes_fp32", "input_seconds", "instr"]
    assert costs.instr == float("inf")  # a module without a wav2small spec has no int8 C library
    assert costs.onnx_bytes == (tmp_path / "model.onnx").stat().st_size
    assert costs.input_seconds == 0.5
    with pytest.raises(MicroserError, match="--input-seconds 0 must be > 0"):
        measure_costs(model, input_seconds=0)
    model.min_seconds = 0.25  # what every Student declares
    with pytest.raises(MicroserError, match=r"--input-seconds 0\.1 is shorter than the 0\.25 s"):
        measure_costs(model, input_seconds=0.1)


# ---- the functional MAC rules, by hand ----


class _Functional(nn.Module):
    """Only functional ops and a buffer: every MAC here comes from microser's own rules."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(32))
        self.register_buffer("proj", torch.rand(17, 6))
        self.register_buffer("gain", torch.rand(6))
        self.frontend, self.body, self.head = nn.Identity(), nn.Identity(), nn.Identity()
        self.lin_w = nn.Parameter(torch.rand(3, 6))

    def forward(self, audio):  # (B, T)
        z = torch.stft(audio, 32, 16, window=self.window, center=False, return_complex=False)  # (B, 17, fr, 2)
        p = (z * z).sum(-1).transpose(1, 2)  # (B, fr, 17): z*z is a product of two activations
        e = p @ self.proj  # (B, fr, 6)
        e = e * self.gain  # product with a constant: free
        w = torch.softmax(e, dim=1)  # over frames
        pooled = torch.einsum("btc,btc->bc", w, e)  # (B, 6)
        return nn.functional.linear(pooled, self.lin_w)  # (B, 3)


def test_functional_mac_rules_hand_count():
    n = 8000  # 0.5 s
    fr = (n - 32) // 16 + 1  # 499 frames
    expected = (stft_macs(32, fr)  # fr * (32 + 2 * 32 * 5)
                + fr * 17 * 2  # z * z
                + fr * 6 * 17  # matmul
                + 6 * (3 * fr - 1)  # softmax over fr for each of 6 columns
                + fr * 6  # einsum: sizes of b, t, c multiplied
                + 3 * 6)  # linear
    assert stft_macs(32, fr) == fr * 352
    assert count_macs(_Functional(), 0.5) == expected


# ---- ORT parity for the references and a sample of random specs ----


def test_references_export_with_parity(tmp_path):
    from microser.models.spec import REFERENCES, build_model
    from microser.onnxio import export_onnx

    for name in REFERENCES:
        torch.manual_seed(0)
        path = export_onnx(build_model(name), tmp_path / f"{name}.onnx", sample_seconds=0.5)  # raises on mismatch
        assert "BatchNormalization" not in {n.op_type for n in onnx.load(path).graph.node}


def test_random_specs_from_default_space_pass_parity_and_plan(tmp_path):
    from microser.models.spec import build_model
    from microser.space import SearchSpace
    from microser.onnxio import export_onnx

    space = SearchSpace.load(_default_space())
    for i, spec in enumerate(space.sample(4, seed=11)):
        torch.manual_seed(i)
        model = build_model(spec)
        path = export_onnx(model, tmp_path / f"{i}.onnx", sample_seconds=0.5)  # ORT parity at 2 lengths
        plan8, plan32 = ram_plan(path, 8000, int8=True), ram_plan(path, 8000, int8=False)
        assert 0 < plan8.peak_bytes <= plan32.peak_bytes, spec.summary()


def _default_space():
    from pathlib import Path

    import microser

    return Path(microser.__file__).parent / "search_spaces" / "default.toml"


# ---- microser describe ----


def test_describe_command_json_matches_library(capsys):
    import json

    from microser.cli import main
    from microser.models.spec import REFERENCES, ArchSpec

    spec = REFERENCES["wav2small-ref"].to_dict()
    spec["body"]["channels"] = [4, 4]
    spec["body"]["pool_after"] = [0]
    text = json.dumps(spec)
    main(["describe", text, "--input-seconds", "0.5", "--json"])
    shown = json.loads(capsys.readouterr().out)
    costs = measure_costs(ArchSpec.from_dict(spec), input_seconds=0.5)
    assert {k: shown[k] for k in costs.to_dict()} == costs.to_dict()
    # two 4-channel conv outputs at 1 byte: frames (8000 - 64) // 32 + 1 = 249, 26 mels, or a float step above
    assert shown["ram_bytes"] >= 2 * 4 * 249 * 26 and shown["ram_peak_step"]
    assert shown["name"] == ArchSpec.from_dict(spec).summary()


def test_describe_command_refuses_bad_input(capsys):
    from microser.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["describe", "wav2small-ref", "--input-seconds", "0"])
    assert exit_.value.code == 2
    assert "--input-seconds 0.0 must be > 0" in capsys.readouterr().err
