"""microser.cgen.emit without a compiler: the text of a library is a pure function of its plan, every template field
is filled, the API the header declares is what the source defines, and every const array holds exactly the plan's
values (counted by hand for wav2small-ref)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cgen_helpers import signal, spec_from
from microser.cgen.bundle import bundle_files
from microser.cgen.emit import emit
from microser.cgen.plan import TAP_ALIGN_DSP, TAP_ALIGN_PORTABLE, fft_points, float_plan
from microser.cgen.qdq import int8_plan
from microser.cgen.ram import state_bytes, state_members
from microser.models.spec import ArchSpec, build_model

REF = spec_from(frontend__prenorm="running")  # n_fft 64, 26 mels, 7 convs of 13 channels, 3x3, pool after 2
# two passes (prescan), odd n_fft (complex FFT), hop > n_fft, LayerNorm, mean+std head
CLIP = ArchSpec.from_dict({
    "family": "wav2small",
    "frontend": {"prenorm": "clip", "n_fft": 75, "hop": 90, "win_length": 60, "window": "hann", "center": True,
                 "pad_end": True, "n_mels": 12, "fmin": 50.0, "fmax": 7000.0, "compression": "log",
                 "filterbank": "mel"},
    "body": {"channels": [6, 5], "kernel": 3, "norm": "layer", "pool_after": [0], "stem_stride": 2,
             "pooling": "meanstd"}})


def _model(spec):
    torch.manual_seed(0)
    return build_model(spec).eval()


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """float32 plans of REF and CLIP, and REF's int8 plan read from its real int8 QDQ graph (no C compiler)."""
    from microser.onnxio import export_onnx
    from microser.quantize import quantize_int8

    d = tmp_path_factory.mktemp("emit")
    ref = _model(REF)
    export_onnx(ref, d / "m.onnx")
    quantize_int8(d / "m.onnx", [signal(k, 1.0, seed=5) for k in range(2)], d / "m.int8.onnx")
    return {"ref-f32": float_plan(ref, REF), "ref-int8": int8_plan(ref, REF, d / "m.int8.onnx"),
            "clip-f32": float_plan(_model(CLIP), CLIP)}


def _prefix(plan) -> str:
    return "ser_f32" if plan.variant == "float32" else "ser_int8"


def _code(text: str) -> str:
    """C text without its comments."""
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def _arrays(source: str) -> dict[str, list[tuple[int, int]]]:
    """Every ``static const T NAME[n] = {...};``: name -> [(declared n, values written)] (int8 weights appear twice:
    the dual-MAC order and the portable order)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for m in re.finditer(r"static const \w+ (\w+)\[(\d+)\] = \{([^}]*)\};", source):
        out.setdefault(m.group(1), []).append((int(m.group(2)), len(m.group(3).split(","))))
    return out


@pytest.mark.parametrize("name", ["ref-f32", "ref-int8", "clip-f32"])
def test_emit_is_pure_and_fills_every_template_field(plans, name):
    plan = plans[name]
    files = emit(plan)
    p = _prefix(plan)
    assert sorted(files) == [f"{p}.c", f"{p}.h", f"{p}_main.c"]
    assert emit(plan) == files  # the same plan, the same text
    for fname, text in files.items():
        leftover = re.findall(r"\$\{?\w+", text.replace("$MICROSER_TRACE_FILE", ""))
        assert leftover == [], (fname, leftover)
        code = _code(text)
        assert code.count("{") == code.count("}") and code.count("(") == code.count(")"), fname


@pytest.mark.parametrize("name", ["ref-f32", "ref-int8", "clip-f32"])
def test_the_header_declares_the_api_the_source_defines(plans, name):
    plan = plans[name]
    p = _prefix(plan)
    files = emit(plan)
    header, source = _code(files[f"{p}.h"]), _code(files[f"{p}.c"])
    declared = set(re.findall(rf"^(?:void|int) ({p}_\w+)\(.*\);$", header, re.M))
    defined = set(re.findall(rf"^(?:void|int) ({p}_\w+)\(.*\)\n\{{", source, re.M))
    api = {f"{p}_init", f"{p}_reset", f"{p}_push", f"{p}_result"} | ({f"{p}_prescan"} if name == "clip-f32" else set())
    assert declared == defined == api
    for i in range(len(plan.stages)):  # each stage: a row function, push (declared ahead: stages call forward), flush
        assert re.search(rf"^static void s{i}_push\({p}_state \*st\);$", source, re.M)
        for fn in ("row", "push", "flush"):
            assert re.search(rf"^static void s{i}_{fn}\({p}_state \*st(, int32_t j)?\)\n\{{", source, re.M), (i, fn)
    # the struct the header defines is the one the RAM figures count
    sizes = state_bytes(plan)
    assert f"#define {p.upper()}_RAM_BYTES {sizes['total']} " in header
    struct = header[header.index("typedef struct {"):header.index(f"}} {p}_state;")]
    members = [(t, m, int(n or 1)) for t, m, n in re.findall(r"^    (\w+) (\w+)(?:\[(\d+)\])?;", struct, re.M)]
    want = [(t, m, n) for t, m, n, _ in state_members(plan)]
    assert members[:len(want)] == want and len(members) - len(want) == (1 if "pad_" in struct else 0)
    assert f"union {{ float f[{sizes['arena'] // 4}];" in struct


def test_const_arrays_hold_the_plans_values(plans):
    """wav2small-ref, by hand: 64-point real FFT as 32 complex points; 26 mel bands; 7 3x3 convs of 13 channels
    (the first reads 1 channel); int8 rows padded to 4 taps (dual-MAC) or 16 (portable), 13 channels -> 14 rows."""
    for name in ("ref-f32", "ref-int8"):
        plan = plans[name]
        arrays = _arrays(emit(plan)[f"{_prefix(plan)}.c"])
        assert all(n == written for entries in arrays.values() for n, written in entries)  # declared == written
        size = {k: [n for n, _ in v] for k, v in arrays.items()}
        assert fft_points(64) == 32 and size["TW_RE"] == size["TW_IM"] == [32] and size["RT_RE"] == [33]
        assert size["WINDOW"] == [64] and size["MEL_START"] == size["MEL_LEN"] == [26]
        assert size["MEL_W"] == [plan.mel.weights.size] and plan.mel.weights.size == int(plan.mel.length.sum())
        assert size["HV_W"] == size["HS_W"] == [13 * 13] and size["FC_W"] == [3 * (13 * 13 + 13 * 13)]
        convs = [i for i, st in enumerate(plan.stages) if st.kind == "conv"]
        assert convs == [0, 1, 2, 4, 5, 6, 7]  # stage 3 is the max-pool
        if name == "ref-f32":
            assert [size[f"W{i}"] for i in convs] == [[117]] + [[1521]] * 6  # 13 x cin x 3 x 3 floats
            assert all(size[f"B{i}"] == [13] for i in convs)
            continue
        # int8: taps 9 (conv0) and 117; padded to 12 / 120 (dual-MAC) and 16 / 128 (portable); 14 rows
        assert [size[f"W{i}"] for i in convs] == [[14 * 12, 14 * 16]] + [[14 * 120, 14 * 128]] * 6
        assert all(size[f"B{i}"] == [14] and size[f"M{i}"] == size[f"R{i}"] == [13] for i in convs)
        st = plan.stages[1]
        assert (st.padded_taps(TAP_ALIGN_DSP), st.padded_taps(TAP_ALIGN_PORTABLE)) == (120, 128)
        source = emit(plan)["ser_int8.c"]
        bias = re.search(r"static const int32_t B1\[14\] = \{([^}]*)\};", source).group(1)
        np.testing.assert_array_equal([int(v) for v in bias.split(",")], list(st.bias) + [0])


def test_bundle_files_are_both_libraries_and_the_readme(plans):
    files = bundle_files(REF, {"float32": plans["ref-f32"], "int8": plans["ref-int8"]})
    assert sorted(files) == ["README.md", "ser_f32.c", "ser_f32.h", "ser_f32_main.c", "ser_int8.c", "ser_int8.h",
                             "ser_int8_main.c"]
    ram = state_bytes(plans["ref-int8"])["total"]
    assert f"ser_int8_state st;   /* {ram} bytes, plain data */" in files["README.md"]
