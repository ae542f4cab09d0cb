"""microser.cgen: the generated C99 library computes the model (float vs PyTorch, int8 vs onnxruntime), streams
exactly (any chunk sizes), keeps its RAM independent of the utterance length, and is clean under valgrind."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from cgen_helpers import sensitive_model, signal, spec_from
from microser.cgen import toolchain
from microser.cgen.bundle import card_markdown, generate, write_library
from microser.cgen.fixedpoint import conv_scales, fixed_multiplier, requantize_reference
from microser.cgen.plan import fft_factors, float_plan, frontend_tables
from microser.cgen.qdq import int8_plan
from microser.cgen.ram import streaming_costs, streaming_ram
from microser.cgen.toolchain import compile_driver, measure_cortex_m4, read_trace, run_driver, worst_stack
from microser.errors import MicroserError
from microser.models.spec import REFERENCES, ArchSpec, build_model

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found: the C export tests compile C")

RNG = np.random.default_rng(7)


# Specs covering every front-end and body option the generator handles differently.
SPECS = {
    # the paper's student with the streaming prenorm (the deployment default of this module)
    "ref-running": spec_from(frontend__prenorm="running"),
    # odd n_fft (complex FFT), hop > n_fft (skipped samples), centre + end padding, per-window prenorm,
    # no norm, mean+std head, stride-2 stem
    "odd-window-meanstd": ArchSpec.from_dict({
        "family": "wav2small",
        "frontend": {"prenorm": "window", "n_fft": 75, "hop": 90, "win_length": 60, "window": "hann", "center": True,
                     "pad_end": True, "n_mels": 12, "fmin": 50.0, "fmax": 7000.0, "compression": "log",
                     "filterbank": "mel"},
        "body": {"channels": [6, 5], "kernel": 3, "norm": "none", "pool_after": [0], "stem_stride": 2,
                 "pooling": "meanstd"}}),
    # PCEN, learnable filterbank, kernel 5, LayerNorm, attention without Gram, n_fft 400 (radix 5)
    "pcen-ln-k5": ArchSpec.from_dict({
        "family": "wav2small",
        "frontend": {"prenorm": "none", "n_fft": 400, "hop": 160, "win_length": None, "window": "hann",
                     "center": False, "pad_end": False, "n_mels": 20, "fmin": 0.0, "fmax": 8000.0,
                     "compression": "pcen", "filterbank": "learnable"},
        "body": {"channels": [8, 10, 7], "kernel": 5, "norm": "layer", "pool_after": [1], "stem_stride": 1,
                 "pooling": "attention"}}),
    # two-pass per-clip prenorm, BatchNorm, two pools
    "clip-bn": spec_from(frontend__prenorm="clip", frontend__n_fft=128, frontend__hop=64, frontend__n_mels=16,
                         body__channels=[8, 8, 8], body__pool_after=[0, 1]),
}


def random_chunks(n_chunks: int = 6) -> list[int]:
    return [int(c) for c in RNG.integers(1, 2500, n_chunks)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """For each spec: the sensitive model and its compiled float32 driver (compiled once per module)."""
    out = {}
    for name, spec in SPECS.items():
        model = sensitive_model(spec)
        d = tmp_path_factory.mktemp(name)
        write_library(float_plan(model, spec), d, "t_f32")
        out[name] = (spec, model, compile_driver(d, "t_f32"), d)
    return out


@pytest.fixture(scope="module")
def ref_int8(tmp_path_factory):
    """wav2small-ref (prenorm running): fp32 ONNX, int8 QDQ graph (microser.compress) and the compiled int8 driver."""
    from microser.onnxio import export_onnx, ort_session
    from microser.quantize import quantize_int8

    spec = SPECS["ref-running"]
    model = sensitive_model(spec)
    d = tmp_path_factory.mktemp("int8")
    export_onnx(model, d / "m.onnx")
    crops = [signal(k, 1.0, seed=5) for k in range(4)]
    quantize_int8(d / "m.onnx", crops, d / "m.int8.onnx")
    write_library(int8_plan(model, spec, d / "m.int8.onnx"), d, "t_int8")
    return model, compile_driver(d, "t_int8"), ort_session(d / "m.int8.onnx"), d


def torch_out(model, audio) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(audio)[None]).double().numpy()[0]


@pytest.mark.parametrize("name", list(SPECS))
def test_float_c_equals_pytorch_in_random_chunks(built, name):
    spec, model, exe, _ = built[name]
    outs = []
    for kind in range(3):
        audio = signal(kind, 1.1)
        expected = torch_out(model, audio)
        whole = run_driver(exe, audio)
        chunked = run_driver(exe, audio, random_chunks())
        np.testing.assert_allclose(whole, expected, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(chunked, whole)  # streaming is exact: same operations in the same order
        outs.append(expected)
    # the comparison means something only if the model's output depends on the input
    assert np.ptp(np.array(outs), axis=0).max() > 0.01


def test_result_on_a_copy_leaves_the_stream_untouched(built):
    _, model, exe, _ = built["ref-running"]
    audio = signal(1, 0.9)
    peeked = run_driver(exe, audio, [700, 1300], peek=True)
    np.testing.assert_array_equal(peeked, run_driver(exe, audio))


def test_too_short_input_is_refused_with_zeros(built):
    spec, _, exe, d = built["ref-running"]
    header = (d / "t_f32.h").read_text()
    min_samples = int(header.split("T_F32_MIN_SAMPLES ")[1].split()[0])
    assert min_samples == 64  # n_fft 64, center False: one frame is the shortest input the model accepts
    path = d / "short.f32"
    signal(0, 0.01)[: min_samples - 1].tofile(path)
    r = subprocess.run([str(exe), str(path)], capture_output=True, text=True)
    assert r.returncode == 11 and r.stdout.split() == ["0", "0", "0"]


def test_int8_c_equals_onnxruntime_int8_graph(ref_int8):
    from microser.onnxio import run_onnx

    model, exe, session, _ = ref_int8
    outs = []
    for kind in range(4):
        audio = signal(kind, 0.7 + 0.3 * kind, seed=3)
        expected = run_onnx(session, audio)[0].astype(np.float64)
        got = run_driver(exe, audio, random_chunks())
        assert np.max(np.abs(got - expected)) <= 0.01
        outs.append(expected)
    assert np.ptp(np.array(outs), axis=0).max() > 0.05  # outputs vary far more than the tolerance


def test_int8_reads_the_graph_front_end_arithmetic(ref_int8):
    """The exporter folds the x10 of 10*log10 into conv0: the C int8 front-end must compute ln(e) / ln(10)."""
    model, _, _, d = ref_int8
    plan = int8_plan(model, SPECS["ref-running"], d / "m.int8.onnx")
    assert plan.log_chain == [("div", pytest.approx(np.log(10), rel=1e-6))]
    assert plan.tensors[0].quant is not None and all(st.int8 for st in plan.stages if st.kind == "conv")


def conv_accumulators(x_q, x_zp, weight, bias, k, s, p) -> np.ndarray:
    """int32 accumulators of a QLinearConv in numpy: (T, cin, fin) int8 rows -> (T', cout, fout) int64,
    bias + sum of w * (x - x_zp), zero ("same") padding in the zero-point-removed domain."""
    t, cin, fin = x_q.shape
    xp = np.zeros((t + 2 * p, cin, fin + 2 * p), np.int64)
    xp[p:p + t, :, p:p + fin] = x_q.astype(np.int64) - x_zp
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(0, 2))[::s, :, ::s]  # (T', cin, F', k, k)
    return np.einsum("tcfab,ocab->tof", win, weight.astype(np.int64)) + bias.astype(np.int64)[None, :, None]


def ort_requantize(acc, scales, zp) -> np.ndarray:
    """onnxruntime's QLinearConv output: float32(acc) * float32 scale, clamped, rounded half to even, + zp."""
    v = acc.astype(np.float32) * scales.astype(np.float32)[None, :, None]
    v = np.clip(v, np.float32(-128 - zp), np.float32(127 - zp))
    return (np.rint(v).astype(np.int64) + zp).astype(np.int8)


def max_pool_reference(x_q) -> np.ndarray:
    """3x3 / 2 max-pool, padding 1 ignored: (T, C, F) int8 -> (ceil(T/2), C, ceil(F/2))."""
    t, c, f = x_q.shape
    xp = np.full((t + 2, c, f + 2), -129, np.int16)
    xp[1:1 + t, :, 1:1 + f] = x_q
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 2))[::2, :, ::2]
    return win.max(axis=(-2, -1)).astype(np.int8)


@pytest.fixture(scope="module")
def traced_int8(ref_int8, tmp_path_factory):
    """The int8 library of ``ref_int8`` built with -DMICROSER_TRACE, run on 1.3 s of speech-like audio."""
    model, _, _, d = ref_int8
    plan = int8_plan(model, SPECS["ref-running"], d / "m.int8.onnx")
    exe = compile_driver(d, "t_int8", extra_flags=("-DMICROSER_TRACE",), exe="t_int8_trace")
    trace = tmp_path_factory.mktemp("trace") / "trace.bin"
    out = run_driver(exe, signal(1, 1.3, seed=4), random_chunks(), trace=trace)
    return plan, read_trace(trace), out


def test_int8_stages_are_bit_exact_with_the_fixed_point_reference(traced_int8):
    """Every int8 stage of the C library, fed its own traced input rows, equals a numpy reference exactly: integer
    accumulators, requantization round(acc * scale) of the exact product with ties to even; max-pools."""
    plan, rows, _ = traced_int8
    checked = 0
    for st in plan.stages:
        src, dst = plan.tensors[st.src], plan.tensors[st.dst]
        x = rows[st.src].reshape(-1, src.channels, src.bands)
        got = rows[st.dst].reshape(-1, dst.channels, dst.bands)
        if st.kind == "pool":
            np.testing.assert_array_equal(got, max_pool_reference(x))
            continue
        assert st.int8
        acc = conv_accumulators(x, src.quant[1], st.weight, st.bias, st.k, st.s, st.p)
        assert np.abs(acc).max() < 2**24  # exactly representable as float32, as onnxruntime converts it
        want = requantize_reference(acc.transpose(0, 2, 1), conv_scales(plan, st), dst.quant[1])
        np.testing.assert_array_equal(got, want.transpose(0, 2, 1))
        checked += got.size
    assert checked > 100_000 and len(rows[0]) == 649  # frames of 1.3 s at hop 32 (n_fft 64, no padding)


def test_fixed_point_differs_from_onnxruntime_requantization_by_at_most_one_step_rarely(traced_int8):
    """The documented difference: onnxruntime rounds float32(acc) * scale, a float32 product, before rounding to
    an integer; the exact product can fall on the other side of a .5 boundary. Bound: 1 step, rare."""
    plan, rows, _ = traced_int8
    diffs, total = [], 0
    for st in plan.stages:
        if st.kind != "conv":
            continue
        src, dst = plan.tensors[st.src], plan.tensors[st.dst]
        x = rows[st.src].reshape(-1, src.channels, src.bands)
        acc = conv_accumulators(x, src.quant[1], st.weight, st.bias, st.k, st.s, st.p)
        ort = ort_requantize(acc, conv_scales(plan, st), dst.quant[1]).astype(np.int64)
        got = rows[st.dst].reshape(ort.shape).astype(np.int64)
        diffs.append(np.abs(got - ort).reshape(-1))
        total += got.size
    d = np.concatenate(diffs)
    assert d.max() <= 1
    assert np.count_nonzero(d) <= 1e-4 * total  # measured here: 0 of 877,786 outputs


def test_dsp_kernels_equal_the_portable_ones(ref_int8, traced_int8, tmp_path):
    """The SXTB16/SMLAD kernels (weights in dual-MAC order, intrinsics emulated in C) give the very same rows."""
    _, _, _, d = ref_int8
    plan, rows, out = traced_int8
    exe = compile_driver(d, "t_int8", extra_flags=("-DMICROSER_TRACE", "-DMICROSER_DSP_EMULATE"),
                         exe="t_int8_dsp")
    source = (d / "t_int8.c").read_text()
    assert "#if MICROSER_SIMD" in source and "SMLAD(a01, x, s00)" in source
    dsp = run_driver(exe, signal(1, 1.3, seed=4), random_chunks(), trace=tmp_path / "dsp.bin")
    dsp_rows = read_trace(tmp_path / "dsp.bin")
    assert sorted(dsp_rows) == sorted(rows) == list(range(len(plan.tensors)))
    for t in rows:
        np.testing.assert_array_equal(dsp_rows[t], rows[t])
    np.testing.assert_array_equal(dsp, out)


def test_fixed_multiplier_is_exact():
    for scale in np.float32([0.75, 1e-3, 3.0, 2.0**-31, 0.0123456789, 1.0]):
        mult, shift = fixed_multiplier(scale)
        assert mult * 2.0**-shift == float(scale) and (mult == 0 or 2**30 <= mult < 2**31) and 1 <= shift <= 62
    assert fixed_multiplier(np.float32(2.0**-33)) == (0, 1)  # every |acc| < 2**31 rounds to 0
    # ties to even, as onnxruntime rounds: 2.5 -> 2, -2.5 -> -2, 1.5 -> 2; saturation at the int8 range
    got = requantize_reference(np.array([[5, -5, 3, 1000, -1000]]).T, np.float32([0.5]), 0).reshape(-1)
    np.testing.assert_array_equal(got, [2, -2, 2, 127, -128])
    with pytest.raises(MicroserError, match="scale -1.0 is not a finite non-negative number"):
        fixed_multiplier(-1.0)


def test_espeak_clips_float_and_int8(espeak_dir, built, ref_int8):
    import soundfile as sf

    from microser.onnxio import run_onnx

    _, model, exe, _ = built["ref-running"]
    _, exe8, session, _ = ref_int8
    clips = sorted((espeak_dir).rglob("*.flac"))[:3]
    for path in clips:
        audio, sr = sf.read(path, dtype="float32")
        assert sr == 16000
        np.testing.assert_allclose(run_driver(exe, audio, random_chunks()), torch_out(model, audio),
                                   atol=1e-4, rtol=0)
        int8 = run_onnx(session, audio)[0]
        assert np.max(np.abs(run_driver(exe8, audio, random_chunks()) - int8)) <= 0.01


def test_random_default_space_specs_export_and_match(tmp_path):
    from microser.space import SearchSpace

    specs = [s for s in SearchSpace.load("default").sample(12, seed=3) if s.family == "wav2small"][:2]
    assert specs
    for k, spec in enumerate(specs):
        model = sensitive_model(spec, seed=k)
        d = tmp_path / str(k)
        write_library(float_plan(model, spec), d, "r")
        exe = compile_driver(d, "r")
        audio = signal(k, 0.8)
        np.testing.assert_allclose(run_driver(exe, audio, random_chunks()), torch_out(model, audio),
                                   atol=1e-4, rtol=0, err_msg=spec.summary())


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed (apt-get install valgrind)")
def test_valgrind_memcheck_reports_no_errors(built):
    _, _, exe, d = built["odd-window-meanstd"]
    path = d / "mc.f32"
    signal(1, 0.4).tofile(path)
    r = subprocess.run(["valgrind", "--error-exitcode=99", "--leak-check=full", str(exe), str(path), "-peek", "333",
                        "17"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    assert "ERROR SUMMARY: 0 errors" in r.stderr


def test_streaming_ram_is_independent_of_length_and_matches_the_struct(built):
    a = streaming_ram(SPECS["ref-running"], int8=False, input_seconds=1)
    b = streaming_ram(SPECS["ref-running"], int8=False, input_seconds=60)
    assert a == b and not a["two_pass"] and a["replay_bytes"] == 0
    header = (built["ref-running"][3] / "t_f32.h").read_text()  # the C build checks sizeof(state) == this macro
    assert f"T_F32_RAM_BYTES {a['ram_streaming_bytes']} " in header
    # hand count, float32 ref (n_fft 64, 26 mels, 7 x 13 channels, pool after block 2, 13 bands after it):
    rings = 3 * (1 * 26 + 3 * 13 * 26 + 4 * 13 * 13) * 4  # 3 rows each: conv0; conv1, conv2, pool; conv3..6
    head = (3 * 13 * 13 + 13 * 14 // 2) * 4
    scalars = 2 * 8 + 64 * 4 + (1 + 2 + 2 * 8 + 3) * 4  # prenorm double sums, frame, counters (2 per stage)
    assert a["state_bytes"] == -(-(rings + head + scalars) // 8) * 8
    int8 = streaming_ram(SPECS["ref-running"], int8=True)
    assert int8["ram_streaming_bytes"] < a["ram_streaming_bytes"]


def test_clip_prenorm_needs_the_replay_buffer():
    r = streaming_ram(REFERENCES["wav2small-ref"], input_seconds=5)
    assert r["two_pass"] and r["replay_bytes"] == 5 * 16000 * 4
    with pytest.raises(MicroserError, match="prenorm 'clip' needs input_seconds"):
        streaming_ram(REFERENCES["wav2small-ref"])


def test_mobilenet_is_refused(tmp_path):
    spec = REFERENCES["mobilenetv3-s"]
    with pytest.raises(MicroserError, match="C export supports the wav2small family; mobilenet specs export ONNX"):
        generate(tmp_path, None, spec)
    with pytest.raises(MicroserError, match="wav2small family"):
        streaming_ram(spec)


def test_worst_stack_follows_the_deepest_call_path():
    ci = """graph: { title: "x.c"
node: { title: "x.c:a" label: "a\\nx.c:1:1\\n40 bytes (static)" }
node: { title: "x.c:b" label: "b\\nx.c:2:1\\n100 bytes (static)" }
node: { title: "x.c:c" label: "c\\nx.c:3:1\\n30 bytes (static)" }
node: { title: "p_push" label: "p_push\\nx.c:4:1\\n8 bytes (static)" }
node: { title: "expf" label: "expf\\nmath.h:1:1" shape : ellipse }
edge: { sourcename: "p_push" targetname: "x.c:a" }
edge: { sourcename: "x.c:a" targetname: "x.c:b" }
edge: { sourcename: "p_push" targetname: "x.c:c" }
edge: { sourcename: "x.c:c" targetname: "expf" }
}"""
    assert worst_stack(ci, ["p_push", "p_result"]) == (148, "p_push > a > b")


def test_front_end_tables_come_from_the_spec_and_match_pytorch_exactly():
    """The window and the mel band table are computed from the spec's numbers (frontend_tables), stored sparse,
    and equal the tensors the PyTorch front-end multiplies by, bit for bit."""
    spec = spec_from(frontend__n_fft=512, frontend__hop=160, frontend__n_mels=40, frontend__win_length=400)
    model = build_model(spec)
    window, mel = frontend_tables(spec)
    padded = np.zeros(512)
    padded[56:456] = model.frontend.power.window.double().numpy()  # torch.stft centres the 400-sample window
    np.testing.assert_array_equal(window, padded)
    dense = model.frontend.fb.double().numpy()
    np.testing.assert_array_equal(mel.dense(), dense)
    # the non-zeros by hand from ONNX MelWeightMatrix's definition: 42 points (n_mels + 2) mel(8000)/42 apart, each
    # at bin floor(513 f / 16000); band i is non-zero on bins (b_i, b_i+2) (just b_i+1 where the rise is empty)
    mels = 2595 * np.log10(1 + 8000 / 700) / 42 * np.arange(42)
    b = np.floor(513 * 700 * (10 ** (mels / 2595) - 1) / 16000).astype(int)
    by_hand = sum(len(set(range(b[i] + 1, b[i + 1] + 1) if b[i + 1] > b[i] else {b[i + 1]}) | set(range(b[i + 1], b[i + 2])))
                  for i in range(40))
    assert mel.weights.size == np.count_nonzero(dense) == by_hand == 423  # of 257 x 40 = 10,280: only non-zeros stored
    assert list(mel.start[:3]) == [1, 2, 3] and int(mel.length.max()) == int((dense > 0).sum(0).max())
    learnable = spec_from(frontend__filterbank="learnable")
    with pytest.raises(MicroserError, match="learnable filterbank: its band table needs the trained model"):
        frontend_tables(learnable)


def test_fft_factors_cover_every_length():
    for n in (1, 2, 8, 32, 200, 256, 37, 75, 1024):
        assert int(np.prod(fft_factors(n))) == n
    assert fft_factors(200) == [4, 2, 5, 5]


def test_describe_ram_mode_streaming_prints_the_c_figure(tmp_path, capsys):
    import json

    from microser.cli import main

    spec = SPECS["ref-running"]
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    main(["describe", str(path), "--input-seconds", "5", "--ram-mode", "streaming", "--json"])
    out = json.loads(capsys.readouterr().out)
    streaming = out["streaming"]["int8"]["ram_streaming_bytes"]
    assert streaming == streaming_ram(spec)["ram_streaming_bytes"]
    assert out["ram_bytes"] > 100 * streaming  # 5 s offline int8 peak vs the stream's state + arena


def test_search_ram_mode_streaming_budgets_the_stream():
    from microser.search_config import SearchConfig

    assert SearchConfig(ram_mode="streaming").ram_mode == "streaming"
    with pytest.raises(MicroserError, match="ram_mode 'sometimes'"):
        SearchConfig(ram_mode="sometimes")
    spec = SPECS["ref-running"]
    costs = streaming_costs(spec, {"params": 1, "ram_bytes": 2_000_000}, 1.0)
    assert costs["ram_bytes"] == streaming_ram(spec)["ram_streaming_bytes"]
    assert costs["ram_bytes_offline"] == 2_000_000 and costs["ram_mode"] == "streaming"
    mobile = streaming_costs(REFERENCES["mobilenetv3-s"], {"ram_bytes": 5}, 1.0)
    assert mobile["ram_bytes"] == 5 and mobile["ram_mode"].startswith("offline")


def test_generate_writes_the_bundle_section(ref_int8, tmp_path):
    model, _, _, d = ref_int8
    section = generate(tmp_path, model, SPECS["ref-running"], d / "m.int8.onnx", callgrind=False)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["README.md", "ser_f32.c", "ser_f32.h", "ser_f32_main.c", "ser_int8.c", "ser_int8.h",
                     "ser_int8_main.c"]
    assert section["parity"]["float32"]["max_abs_diff"] <= 1e-4 and section["parity"]["int8"]["max_abs_diff"] <= 0.01
    f32, i8 = section["measured"]["float32"], section["measured"]["int8"]
    assert f32["bss_bytes"] == 0 and i8["bss_bytes"] == 0  # no globals: everything lives in the caller's state
    assert i8["flash_bytes"] > 10_806 and f32["flash_bytes"] > 4 * 10_806  # int8 vs float weights are in flash
    assert i8["state_plus_arena_bytes"] == streaming_ram(SPECS["ref-running"])["ram_streaming_bytes"]
    assert 0 < i8["stack_bytes"] < 4096 and i8["ram_bytes"] == i8["state_plus_arena_bytes"] + i8["stack_bytes"]
    if shutil.which("arm-none-eabi-gcc") is None:
        assert section["cortex_m4"]["skipped"].startswith("arm-none-eabi-gcc not found")
        return
    for v in ("float32", "int8"):  # the Cortex-M4F build: flash and RAM from arm-none-eabi-size and the map file
        m4, host = section["cortex_m4"][v], section["measured"][v]
        assert m4["bss_bytes"] == 0 and m4["data_bytes"] == 0
        assert m4["flash_bytes"] > m4["library_flash_bytes"] > 0  # plus the libm/libgcc members it pulls in
        assert any(r.startswith("libm.a:") for r in m4["runtime"])  # expf of the attention head at least
        assert m4["state_plus_arena_bytes"] == host["state_plus_arena_bytes"]  # the same struct on both ABIs
        assert m4["ram_bytes"] == m4["state_plus_arena_bytes"] + m4["stack_bytes"]
        if shutil.which("qemu-system-arm"):  # run on the target ISA: parity and instructions per audio second
            assert m4["parity"]["max_abs_diff"] <= m4["parity"]["tolerance"]
            assert m4["parity"]["max_abs_diff_vs_host_c"] <= 1e-5  # newlib's libm vs glibc's, nothing else
            assert 0 < m4["stack_bytes"] < 4096 and m4["instructions_per_audio_second"] > 1e6
    m4 = section["cortex_m4"]
    assert m4["int8"]["flash_bytes"] < 0.6 * m4["float32"]["flash_bytes"]
    if shutil.which("qemu-system-arm"):
        assert m4["int8"]["instructions_per_audio_second"] < 0.6 * m4["float32"]["instructions_per_audio_second"]
    assert "### Cortex-M4F" in card_markdown(section)


@pytest.mark.skipif(shutil.which("arm-none-eabi-gcc") is None or shutil.which("qemu-system-arm") is None,
                    reason="needs gcc-arm-none-eabi, libnewlib-arm-none-eabi and qemu-system-arm (as .ci/run installs)")
def test_dsp_kernels_on_the_cortex_m4_equal_the_portable_ones_and_are_faster(ref_int8):
    """On the target ISA (QEMU): the SXTB16/SMLAD build and the -DMICROSER_NO_DSP build give identical outputs."""
    _, _, _, d = ref_int8
    audio = signal(1, 1.0, seed=8)
    dsp = measure_cortex_m4(d, "t_int8", check_audio=audio)
    portable = measure_cortex_m4(d, "t_int8", check_audio=audio, extra_flags=("-DMICROSER_NO_DSP",))
    np.testing.assert_array_equal(dsp["outputs"], portable["outputs"])
    assert dsp["instructions_per_audio_second"] < 0.8 * portable["instructions_per_audio_second"]
    assert dsp["library_flash_bytes"] < portable["library_flash_bytes"]  # taps padded to 4, not 16


def test_cortex_m4_entry_says_what_to_install_without_the_toolchain(ref_int8, tmp_path, monkeypatch):
    model, _, _, d = ref_int8
    monkeypatch.setattr(toolchain, "m4_tools", lambda: {"gcc": None, "size": None, "qemu": None})
    section = generate(tmp_path, model, SPECS["ref-running"], d / "m.int8.onnx", measure_costs=False)
    assert section["cortex_m4"] == {"skipped": "arm-none-eabi-gcc not found: install the Debian packages "
                                               "gcc-arm-none-eabi, libnewlib-arm-none-eabi (and qemu-system-arm to "
                                               "run it), as .ci/run does"}
    assert "Not built: arm-none-eabi-gcc not found" in card_markdown(section)
    with pytest.raises(MicroserError, match="arm-none-eabi-gcc / arm-none-eabi-size not found on PATH"):
        measure_cortex_m4(tmp_path / "c", "ser_int8")


def test_export_trial_with_c_puts_the_measured_library_in_the_card(tmp_path):
    """End to end on a tiny trained trial (prenorm clip: the two-pass entry point): export --c."""
    import json

    from compress_helpers import build_tiny_cache, make_study
    from microser.export import export_trial

    cache = build_tiny_cache(tmp_path)
    study, _ = make_study(tmp_path, cache)
    export_trial(study, 0, tmp_path / "bundle", keep_float=[], c=True)
    card = json.loads((tmp_path / "bundle" / "model_card.json").read_text())
    c = card["c"]
    assert "## C library (c/)" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    assert c["two_pass"] and "ser_int8_prescan" in (tmp_path / "bundle" / "c" / "ser_int8.h").read_text()
    assert c["parity"]["float32"]["max_abs_diff"] <= 1e-4 and c["parity"]["int8"]["max_abs_diff"] <= 0.01
    for v in ("float32", "int8"):
        m = c["measured"][v]
        assert m["bss_bytes"] == 0 and m["flash_bytes"] > 0 and m["ram_bytes"] > m["state_plus_arena_bytes"]
        if shutil.which("valgrind"):
            assert m["instructions_per_audio_second"] > 0
