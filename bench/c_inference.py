"""The generated C99 library, measured: flash, RAM, stack, instructions per second of audio, parity.

    python bench/c_inference.py                      # the main job's winner, wav2small-ref (+ running prenorm) and
                                                     # a ~80k-params spec; x86-64 and, with the Arm toolchain and
                                                     # QEMU, Cortex-M4F
    python bench/c_inference.py --sample 100         # + 100 random default-space wav2small specs: C vs PyTorch
    python bench/c_inference.py --trained /tmp/cgen-bench --cache /tmp/espeak-cache
                                                     # + test-split CCC: C int8 vs the int8 ONNX graph

Flash = text + data of ``size`` on the object compiled with ``gcc -std=c99 -pedantic -Wall -Wextra -Werror -O2``;
RAM = sizeof(state) (persistent state + scratch arena) + the deepest stack path of ``-fcallgraph-info=su``;
instructions = valgrind callgrind inside ``push`` (and ``prescan``) per second of audio (host x86-64: a proxy for
DSP cycles, not a DSP measurement). Cortex-M4F (microser.cgen.toolchain.measure_cortex_m4): arm-none-eabi-gcc with
the same strict flags and -mcpu=cortex-m4 -mfpu=fpv4-sp-d16 -mfloat-abi=hard -O2; flash = the library's code and
tables plus the runtime it links (libm, libgcc), RAM = state + arena + the stack painted in QEMU (mps2-an386),
instructions counted in QEMU (-icount), parity on the target ISA. Weights are random where no trained model is given:
sizes and instruction counts do not depend on their values.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from microser.cgen import bundle, plan, qdq, ram, toolchain
from microser.costs import count_params
from microser.models.spec import REFERENCES, ArchSpec, build_model
from microser.onnxio import export_onnx, ort_session, run_onnx


def machine() -> str:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()} {cpu or platform.processor()}, {platform.system()} {platform.release()}"


def variant(spec: ArchSpec, **changes) -> ArchSpec:
    d = spec.to_dict()
    for key, value in changes.items():
        part, name = key.split("__")
        d[part][name] = value
    return ArchSpec.from_dict(d)


def calibrated(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    """A random model with BatchNorm statistics taken from audio (so int8 scales are realistic)."""
    torch.manual_seed(seed)
    model = build_model(spec)
    audio = torch.from_numpy(np.stack([bundle.check_signal(1.0, seed=k) for k in range(4)]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(audio)
    return model.eval()


def main_job_winner() -> ArchSpec:
    """The main job's best feasible model (README): 16x7 3x3 convs, BN, pool after block 2, attention+Gram, on a
    512/160 STFT with 40 mels, log, per-clip prenorm (27,151 params)."""
    return variant(REFERENCES["wav2small-ref"], frontend__n_fft=512, frontend__hop=160, frontend__n_mels=40,
                   body__channels=[16] * 7)


def spec_near_80k(tmp: Path, seed: int = 0) -> ArchSpec:
    """The first default-space wav2small spec (seeded draw order) with 70k..80k params (ONNX constants)."""
    from microser.compress import params_of
    from microser.space import SearchSpace

    for spec in SearchSpace.load("default").sample(200, seed=seed):
        if spec.family == "wav2small" and 70_000 <= params_of(build_model(spec)) <= 80_000:
            return spec
    raise SystemExit("no default-space spec with 70k..80k params in 200 draws")


def measure_spec(name: str, spec: ArchSpec, tmp: Path, model=None, crops=None) -> list[dict]:
    model = model if model is not None else calibrated(spec)
    export_onnx(model, tmp / f"{name}.onnx")
    from microser.quantize import quantize_int8

    crops = crops if crops is not None else [bundle.check_signal(1.0, seed=10 + k) for k in range(4)]
    quantize_int8(tmp / f"{name}.onnx", crops, tmp / f"{name}.int8.onnx")
    section = bundle.generate(tmp / name, model, spec, tmp / f"{name}.int8.onnx", prefix="b")
    rows = []
    for v, m in section["measured"].items():
        rows.append({"name": name, "variant": v, "params": count_params(tmp / f"{name}.onnx"), **m,
                     "parity": section["parity"][v]["max_abs_diff"], "summary": spec.summary(),
                     "m4": section.get("cortex_m4", {}).get(v)})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\nC library measurements on {machine()}; {rows[0]['compiler']}, {rows[0]['flags']}")
    print(f"{'model':22} {'var':7} {'params':>7} {'flash B':>8} {'state+arena B':>13} {'stack B':>7} "
          f"{'RAM B':>7} {'Minstr/s audio':>14} {'result kinstr':>13} {'parity':>8}")
    for r in rows:
        ips = "-" if r["instructions_per_audio_second"] is None else f"{r['instructions_per_audio_second'] / 1e6:.1f}"
        res = "-" if r["result_instructions"] is None else f"{r['result_instructions'] / 1e3:.0f}"
        print(f"{r['name']:22} {r['variant']:7} {r['params']:>7,} {r['flash_bytes']:>8,} "
              f"{r['state_plus_arena_bytes']:>13,} {r['stack_bytes']:>7,} {r['ram_bytes']:>7,} {ips:>14} {res:>13} "
              f"{r['parity']:>8.1e}")
    for name, summary in dict((r["name"], r["summary"]) for r in rows).items():
        print(f"  {name}: {summary}")
    print("parity: max abs difference on cgen.bundle.check_signal() in uneven chunks, float32 vs PyTorch, int8 vs the "
          "onnxruntime int8 graph; instructions: callgrind inside push() (+ prescan()) on 1 s of noise (host x86-64)")
    ratios = [(name, i8["instructions_per_audio_second"] / f32["instructions_per_audio_second"])
              for name in dict.fromkeys(r["name"] for r in rows)
              for f32, i8 in [[next(r for r in rows if r["name"] == name and r["variant"] == v)
                               for v in ("float32", "int8")]]
              if f32["instructions_per_audio_second"] and i8["instructions_per_audio_second"]]
    print("int8 / float32 instructions (x86-64): " + ", ".join(f"{n} {q:.2f}" for n, q in ratios))
    m4 = [r for r in rows if r["m4"] and "flash_bytes" in r["m4"]]
    if not m4:
        print("Cortex-M4F: not measured (install gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm)")
        return
    print(f"\nCortex-M4F: {m4[0]['m4']['compiler']}, {m4[0]['m4']['flags']}")
    print(f"{'model':22} {'var':7} {'flash B':>8} {'lib B':>7} {'runtime B':>9} {'state+arena':>11} {'stack B':>7} "
          f"{'RAM B':>7} {'Minstr/s (QEMU)':>15} {'parity':>8} {'vs host C':>9}")
    for r in m4:
        m = r["m4"]
        ips = m["instructions_per_audio_second"]
        par = m.get("parity") or {}
        print(f"{r['name']:22} {r['variant']:7} {m['flash_bytes']:>8,} {m['library_flash_bytes']:>7,} "
              f"{m['flash_bytes'] - m['library_flash_bytes']:>9,} {m['state_plus_arena_bytes']:>11,} "
              f"{m['stack_bytes']:>7,} {m['ram_bytes']:>7,} {'-' if ips is None else f'{ips / 1e6:.1f}':>15} "
              f"{par.get('max_abs_diff', float('nan')):>8.1e} {par.get('max_abs_diff_vs_host_c', float('nan')):>9.1e}")
    q = m4[0]["m4"].get("qemu")
    if q:
        print(f"QEMU: {q['version']}, {q['machine']}; {q['method']}; stack: {m4[0]['m4']['stack_source']}")


def sample_specs(n: int, tmp: Path, seed: int = 1) -> None:
    """``n`` random default-space wav2small specs: float C vs PyTorch in random chunks (max abs diff)."""
    from microser.space import SearchSpace

    specs, draw = [], 0
    while len(specs) < n:
        specs += [s for s in SearchSpace.load("default").sample(4 * n, seed=seed + draw) if s.family == "wav2small"]
        draw += 1
    rng = np.random.default_rng(seed)
    worst, t0 = [], time.perf_counter()
    for k, spec in enumerate(specs[:n]):
        model = calibrated(spec, seed=k)
        d = tmp / f"s{k}"
        bundle.write_library(plan.float_plan(model, spec), d, "s")
        exe = toolchain.compile_driver(d, "s")
        audio = bundle.check_signal(float(rng.uniform(0.5, 2.0)), seed=k)
        with torch.no_grad():
            expected = model(torch.from_numpy(audio)[None]).double().numpy()[0]
        got = toolchain.run_driver(exe, audio, rng.integers(1, 4000, 5))
        worst.append((float(np.max(np.abs(got - expected))), spec.summary(), ram.state_bytes(
            plan.shape_plan(spec, int8=True))["total"]))
    diffs = np.array([w[0] for w in worst])
    ram_bytes = np.array([w[2] for w in worst])
    print(f"\n{n} random default-space wav2small specs, float C vs PyTorch on check_signal in random chunks "
          f"({time.perf_counter() - t0:.0f} s): max abs diff median {np.median(diffs):.1e}, max {diffs.max():.1e}; "
          f"all <= 1e-4: {bool((diffs <= 1e-4).all())}")
    print(f"int8 streaming state+arena over those specs: min {ram_bytes.min():,} B, "
          f"median {int(np.median(ram_bytes)):,} B, max {ram_bytes.max():,} B")
    for d, s, _ in sorted(worst, reverse=True)[:3]:
        print(f"  worst: {d:.1e}  {s}")


def trained_ccc(trained: Path, cache_path: str, tmp: Path) -> None:
    """Test-split CCC of the C int8 library vs the int8 ONNX graph for the trained prenorm-running model."""
    from microser.cache import Cache
    from microser.metrics import ccc_report
    from microser.quantize import calibration_crops, quantize_int8

    data = Cache.open(cache_path)
    for weights in sorted(trained.glob("running-s*.pt")):
        spec = ArchSpec.from_json(weights.with_suffix(".json").read_text())
        model = build_model(spec)
        model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        export_onnx(model, tmp / "t.onnx")
        crops = calibration_crops(data, seconds=2.0, max_crops=64, seed=0)
        quantize_int8(tmp / "t.onnx", crops, tmp / "t.int8.onnx")
        bundle.write_library(qdq.int8_plan(model, spec, tmp / "t.int8.onnx"), tmp / "t", "t")
        exe = toolchain.compile_driver(tmp / "t", "t")
        session = ort_session(tmp / "t.int8.onnx")
        idx = data.split_indices("test")
        c_out, ort_out = [], []
        rng = np.random.default_rng(0)
        for i in idx:
            audio = data.audio(int(i))
            c_out.append(toolchain.run_driver(exe, audio, rng.integers(1, 4000, 4)))
            ort_out.append(run_onnx(session, audio)[0])
        c_out, ort_out = np.array(c_out), np.array(ort_out)
        truth = np.asarray(data.targets)[idx]
        cc, co = ccc_report(c_out, truth), ccc_report(ort_out, truth)
        print(f"\n{weights.name} ({spec.summary()}), test split {len(idx)} segments:")
        print(f"  CCC int8 ONNX (onnxruntime) {co['mean']:.4f}  C int8 {cc['mean']:.4f}  "
              f"difference {abs(cc['mean'] - co['mean']):.1e}; max abs output diff {np.abs(c_out - ort_out).max():.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=0, help="also check N random default-space specs (float C)")
    ap.add_argument("--trained", type=Path, default=None, help="folder from bench/cgen_prenorm_ccc.py --save")
    ap.add_argument("--cache", default="/tmp/espeak-cache")
    ap.add_argument("--no-80k", action="store_true", help="skip the ~80k-params spec")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cgen-bench-") as tmp:
        tmp = Path(tmp)
        ref = REFERENCES["wav2small-ref"]
        rows = measure_spec("main-job winner", main_job_winner(), tmp)
        rows += measure_spec("wav2small-ref", ref, tmp)
        rows += measure_spec("wav2small-ref running", variant(ref, frontend__prenorm="running"), tmp)
        if not args.no_80k:
            rows += measure_spec("~80k default-space", spec_near_80k(tmp), tmp)
        print_table(rows)
        if args.sample:
            sample_specs(args.sample, tmp)
        if args.trained:
            trained_ccc(args.trained, args.cache, tmp)


if __name__ == "__main__":
    main()
