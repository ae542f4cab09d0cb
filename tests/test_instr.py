"""Instructions as a search cost: the per-operator counts by hand, the prediction against callgrind (and QEMU), and a
tiny real search under an instruction budget whose candidates' int8 C libraries are measured against it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from cgen_helpers import sensitive_model, signal, spec_from
from microser.budgets import parse_budget
from microser.cgen.bundle import write_library
from microser.cgen.instr import instruction_features, predict_instructions
from microser.cgen.qdq import int8_plan
from microser.cgen.toolchain import measure_instructions
from microser.costs import measure_costs
from microser.errors import MicroserError
from microser.models.spec import REFERENCES, ArchSpec, build_model

needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None or shutil.which("gcc") is None,
                                    reason="valgrind and gcc are needed to count instructions (apt-get install valgrind)")


def test_instruction_features_of_wav2small_ref_by_hand():
    """wav2small-ref: 1 s pushed = 16,000 samples -> 1 + (16000 - 64) // 32 = 499 frames of a 64-point real FFT
    (a 32-point complex FFT, radices 4, 4, 2); 7 3x3 convs of 13 channels, max-pool after the third."""
    f = instruction_features(REFERENCES["wav2small-ref"])
    assert f["sample_clip"] == 16000 and f["sample_running"] == 0
    assert f["frame"] == 499 and f["frame_sample"] == 499 * 64 and f["frame_shift"] == 499 * 32
    assert f["fft_radix4"] == 499 * 32 * 2 and f["fft_radix2"] == 499 * 32 and f["fft_stage"] == 499 * 3
    assert f["spectrum_bin"] == 499 * 33 and f["mel_band"] == f["log_band"] == 499 * 26
    # a stage makes output row j once input row j*s - p + k - 1 has arrived: 3x3 "same" convs lag one row each
    conv_rows = [498, 497, 496] + [247, 246, 245, 244]  # the pool: (496 + 1 - 3) // 2 + 1 = 248 rows
    assert f["conv_row"] == sum(conv_rows) and f["pool_row"] == 248 and f["pool_out"] == 248 * 13 * 13
    pairs = [13, 13, 13, 7, 7, 7, 7]  # output positions in pairs: 26 bands, 13 after the pool
    taps = [9] + [117] * 6
    assert f["mm_tap"] == sum(r * p * 7 * (-(-t // 16) * 16) for r, p, t in zip(conv_rows, pairs, taps))
    assert f["im2col_tap"] == sum(r * 2 * p * t for r, p, t in zip(conv_rows, pairs, taps))
    assert f["requant"] == sum(r * b * 13 for r, b in zip(conv_rows, [26] * 3 + [13] * 4))
    assert f["head_elem"] == 244 * 13 * 13 and f["attention_mac"] == 244 * 13 * 13 * 13
    assert f["gram_mac"] == 244 * 13 * 14 // 2 * 13


def test_instr_is_recorded_in_the_costs_and_inf_without_an_int8_library():
    spec = spec_from(frontend__prenorm="running")
    costs = measure_costs(spec)
    assert costs.instr == predict_instructions(spec) > 1e6
    assert measure_costs(REFERENCES["mobilenetv3-s"]).instr == math.inf
    layer = spec_from(body__norm="layer")
    assert measure_costs(layer).instr == math.inf
    with pytest.raises(MicroserError, match="does not support body.norm 'layer'"):
        predict_instructions(layer)
    with pytest.raises(MicroserError, match="instruction target 'z80' is unknown"):
        predict_instructions(spec, target="z80")


def _int8_library(spec: ArchSpec, where: Path, model=None) -> Path:
    """The real int8 deployment of ``spec`` (exported, quantized by microser.compress, generated) in ``where``."""
    from microser.onnxio import export_onnx
    from microser.quantize import quantize_int8

    model = model if model is not None else sensitive_model(spec)
    export_onnx(model, where / "m.onnx")
    quantize_int8(where / "m.onnx", [signal(k, 1.0, seed=5) for k in range(4)], where / "m.int8.onnx")
    write_library(int8_plan(model, spec, where / "m.int8.onnx"), where / "c", "q")
    return where / "c"


# the 2-pass wav2small-ref; a streaming spec with PCEN, kernel 5, a stride-2 stem and no pooling of the head
PREDICTED_SPECS = {
    "wav2small-ref": REFERENCES["wav2small-ref"],
    "pcen-k5-s2": spec_from(frontend__prenorm="running", frontend__n_fft=400, frontend__hop=160,
                            frontend__n_mels=32, frontend__compression="pcen", body__channels=[12, 20, 20],
                            body__kernel=5, body__stem_stride=2, body__pool_after=[], body__pooling="meanstd",
                            body__norm="none"),
}


@needs_valgrind
@pytest.mark.parametrize("name", list(PREDICTED_SPECS))
def test_predicted_instructions_are_within_15_percent_of_callgrind(name, tmp_path):
    spec = PREDICTED_SPECS[name]
    c_dir = _int8_library(spec, tmp_path)
    measured = measure_instructions(c_dir, "q")
    assert abs(predict_instructions(spec) - measured) <= 0.15 * measured
    if shutil.which("qemu-system-arm") and shutil.which("arm-none-eabi-gcc"):  # and on the Cortex-M4F
        m4 = measure_instructions(c_dir, "q", target="cortex-m4")
        assert abs(predict_instructions(spec, target="cortex-m4") - m4) <= 0.15 * m4


# ---- a tiny real search under an instruction budget ----

INSTR_SPACE = """
family = "wav2small"
[frontend]
prenorm = { choices = ["clip", "running"] }
n_fft = 256
hop = { choices = [128, 160] }
center = false
n_mels = { low = 16, high = 32, step = 8 }
[wav2small]
depth = { low = 2, high = 4 }
channels = { low = 4, high = 16 }
kernel = 3
norm = "batch"
pool_after = [1]
pooling = "attention+gram"
"""
INSTR_BUDGET = "12M-instr"


@needs_valgrind
@pytest.mark.slow
def test_a_search_under_an_instr_budget_returns_only_candidates_whose_int8_c_meets_it(tmp_path):
    """`microser search --budget 80k-params --budget 12M-instr` on a tiny cache and space: every trained candidate's
    int8 C library, built from its trained weights, is measured with callgrind within 15% of the budget."""
    import torch

    from microser.cache import Cache
    from microser.onnxio import export_onnx
    from microser.quantize import calibration_crops, quantize_int8
    from microser.rungs import load_trial_weights
    from microser.search import run_search
    from microser.search_config import SearchConfig
    from microser.storage import load_study
    from search_helpers import build_tiny_search_root

    root = build_tiny_search_root(tmp_path / "tiny", 24)
    (root / "space.toml").write_text(INSTR_SPACE)
    config = SearchConfig(study="i", storage=f"sqlite:///{tmp_path}/i.db", cache=str(root / "cache"),
                          space=str(root / "space.toml"), budgets=("80k-params", INSTR_BUDGET), trials=3,
                          rungs=(4,), batch_size=8, crop_seconds=0.5, final_k=0, references=(), threads=1,
                          seed=3, objectives=("params", "instr"))
    summary = run_search(config)
    study = load_study("i", f"sqlite:///{tmp_path}/i.db")
    limit = parse_budget(INSTR_BUDGET).limit
    trials = [t for t in study.get_trials() if t.user_attrs.get("costs")]
    rejected = [t for t in trials if "instr" in t.user_attrs.get("rejected", "")]
    trained = [t for t in trials if "ccc" in t.user_attrs]
    assert summary.trained == len(trained) == 3 and rejected  # the budget bit: some draws were over it
    data = Cache.open(root / "cache")
    crops = calibration_crops(data, seconds=1.0, max_crops=8)
    for t in trained:
        spec = ArchSpec.from_json(t.user_attrs["spec"])
        assert t.user_attrs["costs"]["instr"] <= limit and t.values[2] == t.user_attrs["costs"]["instr"]
        model = build_model(spec)
        model.load_state_dict(load_trial_weights(study, t, stage="search"))
        model.eval()
        where = tmp_path / f"t{t.number}"
        where.mkdir()
        with torch.no_grad():
            export_onnx(model, where / "m.onnx")
        quantize_int8(where / "m.onnx", crops, where / "m.int8.onnx")
        write_library(int8_plan(model, spec, where / "m.int8.onnx"), where / "c", "q")
        assert measure_instructions(where / "c", "q") <= 1.15 * limit, spec.summary()
    # and a rejected draw really was over: its int8 C library (weights do not change the count) measures above
    over = ArchSpec.from_json(rejected[0].user_attrs["spec"])
    assert measure_instructions(_int8_library(over, tmp_path), "q") > 0.85 * limit, over.summary()
