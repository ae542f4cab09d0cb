"""The firmware bundle of a tiny trained trial: files, stripping, model.h compiled and run, card, parity gate, use."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import soundfile as sf
from onnx import numpy_helper

from compress_helpers import build_tiny_cache, make_study
from microser.audio import load_audio, segment_bounds
from microser.errors import MicroserError
from microser.export import Tolerance, export_bundle, export_trial
from microser.inference import evaluate_target, predict_files
from microser.loading import load_trial_model
from microser.onnxio import ort_session
from microser.quantize import classify_nodes

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    cache = build_tiny_cache(folder)
    study, url = make_study(folder, cache)
    report = export_trial(study, 0, folder / "bundle", keep_float=[])
    return {"folder": folder, "cache": cache, "study": study, "report": report, "out": folder / "bundle"}


def test_bundle_holds_every_file_and_graphs_are_stripped(bundle):
    out = bundle["out"]
    for name in ("model.onnx", "model.int8.onnx", "model.h", "model_card.json", "MODEL_CARD.md", "parity.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("model.onnx", "model.int8.onnx"):
        proto = onnx.load(out / name)
        assert all(not n.name and not n.doc_string for n in proto.graph.node)
        assert not proto.doc_string and not proto.graph.doc_string
        assert [i.name for i in proto.graph.input] == ["audio"] and [o.name for o in proto.graph.output] == ["adv"]
        assert not any("/" in t.name for t in proto.graph.initializer)
        assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}  # unused domains dropped
        convs = [n for n in proto.graph.node if n.op_type in ("Conv", "QLinearConv")]   # int8: fused body convs
        # defaults dropped (the tiny spec's convs all have stride 1, dilation 1, group 1); padding kept
        assert convs and all({a.name for a in n.attribute} <= {"kernel_shape", "pads"} for n in convs)
        assert any(a.name == "pads" and list(a.ints) == [1, 1, 1, 1] for n in convs for a in n.attribute)
    card = json.loads((out / "model_card.json").read_text())
    assert card["source"] == {"study": "s", "trial": 0, "weights": "search"}
    assert card["data"]["teachers"][0]["kind"] == "csv" and card["data"]["segments"]["test"] == 12
    assert card["size"]["file_bytes"] == (out / "model.int8.onnx").stat().st_size
    assert "| test |" in (out / "MODEL_CARD.md").read_text()


def test_the_model_cards_how_to_run_snippet_runs_and_gives_microsers_int8_outputs(bundle, monkeypatch):
    """The card's Python snippet is what a user pastes: it runs in the bundle folder with microser's session settings
    (int8 exact on x86 CPUs without VNNI) and gives what microser's own session gives."""
    from microser.onnxio import ORT_SESSION_CONFIG

    card = (bundle["out"] / "MODEL_CARD.md").read_text()
    snippet = card.split("## How to run")[1].split("```python")[1].split("```")[0]
    assert all(f"add_session_config_entry({k!r}, {v!r})" in snippet for k, v in ORT_SESSION_CONFIG.items())
    monkeypatch.chdir(bundle["out"])
    scope: dict = {}
    exec(compile(snippet, "MODEL_CARD.md", "exec"), scope)
    want = ort_session(bundle["out"] / "model.int8.onnx").run(None, {"audio": np.zeros((1, 16000), np.float32)})[0][0]
    assert [scope["arousal"], scope["dominance"], scope["valence"]] == [float(v) for v in want]


def test_model_h_compiles_and_embeds_exactly_the_int8_file(bundle, tmp_path):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = bundle["out"]
    program = tmp_path / "check.c"
    program.write_text(r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "model.h"
int main(int argc, char **argv) {
    if (argc != 2) return 9;
    FILE *f = fopen(argv[1], "rb");
    static unsigned char buf[1 << 22];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    if (n != microser_model_int8_onnx_len || n != sizeof microser_model_int8_onnx) return 1;
    if (memcmp(buf, microser_model_int8_onnx, n) != 0) return 2;
    if (MICROSER_SAMPLE_RATE != 16000 || MICROSER_N_OUTPUTS != 3 || MICROSER_OUTPUT_VALENCE != 2) return 3;
    if (!(MICROSER_MIN_SAMPLES <= MICROSER_EXPECTED_SAMPLES && MICROSER_EXPECTED_SAMPLES <= MICROSER_MAX_SAMPLES))
        return 4;
    printf("%u %d %.1f\n", microser_model_int8_onnx_len, MICROSER_EXPECTED_SAMPLES, MICROSER_OUTPUT_MAX);
    return 0;
}
""")
    exe = tmp_path / "check"
    build = subprocess.run([gcc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(out), str(program), "-o",
                            str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), str(out / "model.int8.onnx")], capture_output=True, text=True)
    assert run.returncode == 0, run.returncode
    assert run.stdout.split() == [str((out / "model.int8.onnx").stat().st_size), "8000", "1.0"]


def test_card_float_ops_are_float_in_the_stripped_int8_graph_by_index(bundle):
    card = bundle["report"].card
    int8 = onnx.load(bundle["out"] / "model.int8.onnx")
    floats, quantized = classify_nodes(int8)
    float_index = {k for k, n in enumerate(int8.graph.node) if any(n is f for f in floats)}
    listed = card["quantization"]["float_ops"]
    assert listed and {o["index"] for o in listed} == float_index
    for o in listed:
        assert int8.graph.node[o["index"]].op_type == o["op_type"]
        assert o["name"].startswith(("/frontend/", "/head/"))
    ops = {int8.graph.node[o["index"]].op_type for o in listed}
    assert {"STFT", "Softmax", "Gemm"} <= ops
    assert {o["op_type"] for o in card["quantization"]["quantized_ops"]} == {"QLinearConv", "MaxPool"}  # fused


def test_card_reports_test_and_validation_ccc_of_each_graph(bundle):
    card = bundle["report"].card
    parity = json.loads((bundle["out"] / "parity.json").read_text())
    for split in ("test", "valid"):
        for graph in ("fp32", "int8"):
            assert card["ccc"][split][graph] == parity["splits"][split][f"ccc_{graph}"]
    got = evaluate_target(path=bundle["out"], split="test")
    assert got["results"]["fp32"] == card["ccc"]["test"]["fp32"]
    assert got["results"]["int8"] == card["ccc"]["test"]["int8"]
    assert parity["passed"] and parity["splits"]["valid"]["fp32_vs_pytorch_max_abs"] <= 1e-4


def test_export_refuses_a_broken_int8_graph(bundle, tmp_path):
    """Zeroing the int8 conv weights makes the output constant: CCC 0, far below fp32."""
    from microser.cache import Cache
    from microser.onnxio import export_onnx

    study = bundle["study"]
    model, spec, _ = load_trial_model(study, 0)
    fp32 = export_onnx(model, tmp_path / "model.onnx")
    # take the named int8 graph the bundle came from: rebuild it, then break it
    from microser.quantize import calibration_crops, quantize_int8

    data = Cache.open(bundle["cache"])
    quant = quantize_int8(fp32, calibration_crops(data, seconds=0.5, max_crops=8), tmp_path / "good.int8.onnx",
                          keep_float=[])
    broken = onnx.load(quant.int8_path)
    for t in broken.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(t).size > 4:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    onnx.save(broken, tmp_path / "broken.int8.onnx")
    out = tmp_path / "refused"
    with pytest.raises(MicroserError, match="export refused: parity is worse than the stated tolerance"):
        export_bundle(model, spec, out, data=data, fp32_named=fp32, int8_named=tmp_path / "broken.int8.onnx",
                      quant=quant.to_dict(), costs={"input_seconds": 0.5}, source={"study": "s", "trial": 0},
                      tolerance=Tolerance())
    assert (out / "parity.FAILED.json").is_file() and not (out / "model.int8.onnx").exists()
    # the intact graph passes the same gate
    export_bundle(model, spec, out, data=data, fp32_named=fp32, int8_named=quant.int8_path, quant=quant.to_dict(),
                  costs={"input_seconds": 0.5}, source={"study": "s", "trial": 0}, tolerance=Tolerance(0.05))
    assert (out / "model.int8.onnx").is_file() and not (out / "parity.FAILED.json").exists()


def test_c_export_without_a_generator_is_a_clear_error(bundle, tmp_path, monkeypatch):
    import microser.export as export

    monkeypatch.setattr(export, "_c_generator", lambda: None)
    with pytest.raises(MicroserError, match="C export is not available for family 'wav2small'"):
        export_trial(bundle["study"], 0, tmp_path / "c", keep_float=[], c=True)


def test_predict_segments_long_files_like_the_cache_and_averages(bundle, tmp_path):
    corpus = bundle["folder"] / "corpus"
    short = sorted(corpus.glob("*.wav"))[0]
    # a long stereo 22.05 kHz file: 19 s, cut into 8 s segments with 1 s overlap
    rng = np.random.default_rng(0)
    t = np.arange(int(19 * 22050)) / 22050
    x = 0.1 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))
    sf.write(tmp_path / "long.wav", np.stack([x, 0.5 * x], 1).astype(np.float32), 22050)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path"], [str(short)], ["long.wav"]])
    result = predict_files(bundle["out"], tmp_path / "list.csv", tmp_path / "preds.csv", int8=True)
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert [r["segments"] for r in rows] == ["1", "3"] and result["files"] == 2
    session = ort_session(str(bundle["out"] / "model.int8.onnx"))
    expected = session.run(None, {"audio": load_audio(short)[None]})[0][0]
    assert np.allclose([float(rows[0][k]) for k in ("arousal", "dominance", "valence")], expected, atol=1e-6)
    audio = load_audio(tmp_path / "long.wav")
    segs = segment_bounds(len(audio), 8.0, 1.0)
    mean = np.mean([session.run(None, {"audio": audio[None, a:b]})[0][0] for a, b in segs], axis=0)
    assert np.allclose([float(rows[1][k]) for k in ("arousal", "dominance", "valence")], mean, atol=1e-3)
