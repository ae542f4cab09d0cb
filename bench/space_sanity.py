"""Bench: N random specs of a search space all build, export and pass ORT parity; their cost distribution; planned vs measured RAM.

For every spec sampled from the space (``SearchSpace.sample(n, seed)``):
``build_model`` -> ``microser.costs.measure_report`` (export with
``onnxio.export_onnx``: BN folded, onnxsim, onnxruntime vs PyTorch max abs
diff <= 1e-4 at two lengths, else an error that is counted here as a failure).
It prints min / median / max of params, MACs, ONNX bytes and peak RAM.

Then, for ``--measure`` specs spread over the fp32 RAM range, it compares the
planner's fp32 peak (``costs.ram_plan(..., int8=False)``) with what
onnxruntime actually allocates, measured in a fresh subprocess per figure
with a malloc counter (a small C library compiled here with ``cc`` and
``LD_PRELOAD``-ed: it adds ``malloc_usable_size`` of every block on
malloc/calloc/realloc/memalign and subtracts it on free, keeping the peak):

- session with ``enable_cpu_mem_arena=False`` and ``enable_mem_pattern=False``
  (every tensor is its own malloc/free), 1 thread, sequential;
- one warm-up run (lazy kernel state, weight prepacking), then the peak is
  reset to the bytes currently allocated, the input array is allocated and the
  session runs once: the measurement is peak minus bytes before.

Limits: it counts what ORT allocates, not what a firmware arena would need:
ORT's kernels add scratch buffers the planner does not model (im2col for
convs, STFT work buffers); with graph optimizations on, ORT fuses nodes
(Conv+ReLU) so fewer tensors exist, and it may reuse an input buffer for an
output. Both optimization levels are reported. Python's own small objects use
pymalloc arenas (mmap), which the counter does not see.

Usage::

    python bench/space_sanity.py [--n 200] [--seed 0] [--input-seconds 1] [--measure 6] [--space FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# A malloc counter preloaded into the measuring process: bytes currently allocated and their peak, from
# malloc_usable_size of every block (so alignment and size classes count as the allocator really spends them).
_SHIM_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);
static long long current_bytes = 0, peak_bytes = 0;
static void add(void *p) {
    if (!p) return;
    long long now = __atomic_add_fetch(&current_bytes, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
    long long seen = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (now > seen && !__atomic_compare_exchange_n(&peak_bytes, &seen, now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
}
static void sub(void *p) {
    if (p) __atomic_sub_fetch(&current_bytes, (long long)malloc_usable_size(p), __ATOMIC_RELAXED);
}
void *malloc(size_t n) { void *p = __libc_malloc(n); add(p); return p; }
void *calloc(size_t a, size_t b) { void *p = __libc_calloc(a, b); add(p); return p; }
void *realloc(void *q, size_t n) {
    sub(q);
    void *p = __libc_realloc(q, n);
    if (p) add(p); else if (q && n) add(q);
    return p;
}
void free(void *p) { sub(p); __libc_free(p); }
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); add(p); return p; }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
void *valloc(size_t n) { return memalign(4096, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    add(p);
    *out = p;
    return 0;
}
long long memcount_current(void) { return current_bytes; }
long long memcount_peak(void) { return peak_bytes; }
void memcount_reset_peak(void) { peak_bytes = current_bytes; }
"""

_CHILD = r"""
import ctypes, json, sys
import numpy as np
import onnxruntime as ort

shim_path, path, samples, level = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
shim = ctypes.CDLL(shim_path)  # the preloaded library: same counters
shim.memcount_current.restype = shim.memcount_peak.restype = ctypes.c_longlong

options = ort.SessionOptions()
options.enable_cpu_mem_arena = False
options.enable_mem_pattern = False
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
warm = np.random.default_rng(0).uniform(-0.5, 0.5, (1, samples)).astype(np.float32)
result = session.run(None, {name: warm})
del warm, result
shim.memcount_reset_peak()
before = shim.memcount_current()
audio = np.random.default_rng(1).uniform(-0.5, 0.5, (1, samples)).astype(np.float32)
result = session.run(None, {name: audio})
print(json.dumps({"peak_bytes": shim.memcount_peak() - before}))
"""


def build_shim(folder: Path) -> Path | None:
    """Compile the malloc counter with the system C compiler; None when there is none."""
    source, lib = folder / "memcount.c", folder / "memcount.so"
    source.write_text(_SHIM_C)
    try:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return lib


def measure_ort_peak(shim: Path, path: Path, samples: int, level: str) -> int:
    """Peak bytes malloc'ed at once during one onnxruntime inference, in a fresh process (module docstring)."""
    env = dict(os.environ, LD_PRELOAD=str(shim), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(shim), str(path), str(samples), level], env=env,
                         capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="random specs to check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-seconds", type=float, default=1.0)
    parser.add_argument("--measure", type=int, default=6, help="specs whose RAM is also measured in onnxruntime")
    parser.add_argument("--space", type=Path, default=REPO / "microser" / "search_spaces" / "default.toml")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from microser.costs import measure_report, seconds_to_samples
    from microser.models.spec import build_model
    from microser.space import SearchSpace

    specs = SearchSpace.load(args.space).sample(args.n, seed=args.seed)
    samples = seconds_to_samples(args.input_seconds)
    rows, failures = [], []
    workdir = Path(tempfile.mkdtemp(prefix="space-sanity-"))
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        try:
            torch.manual_seed(i)
            report = measure_report(build_model(spec), input_seconds=args.input_seconds, workdir=workdir / str(i))
            rows.append((spec, report, workdir / str(i) / "model.onnx"))
        except Exception as e:  # noqa: BLE001 - a bench counts every failure and says which spec
            failures.append((spec, f"{type(e).__name__}: {e}".splitlines()[0][:300]))
            traceback.print_exc(limit=1, file=sys.stderr)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(specs)} specs, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0

    print(f"\n# space sanity: {args.space.name}, {len(specs)} random specs (seed {args.seed}), "
          f"costs at --input-seconds {args.input_seconds:g}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {elapsed:.0f} s in all ({elapsed / max(len(specs), 1):.2f} s per spec)")
    families = {}
    for spec, _, _ in rows:
        families[spec.family] = families.get(spec.family, 0) + 1
    print(f"built, exported and ORT parity (max abs diff <= 1e-4 at 2 lengths) passed: {len(rows)}/{len(specs)} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(families.items()))}); failures: {len(failures)}")
    for spec, error in failures:
        print(f"  FAILED {spec.summary()}: {error}")
    if not rows:
        return

    def dist(name: str, values, unit: str = "") -> str:
        v = np.asarray(values, dtype=np.float64)
        return f"| {name:<26} | {v.min():>13,.0f} | {np.median(v):>13,.0f} | {v.max():>13,.0f} |"

    print("\n| cost                       |           min |        median |           max |")
    print("|----------------------------|---------------|---------------|---------------|")
    c = [r.costs for _, r, _ in rows]
    print(dist("params", [x.params for x in c]))
    print(dist("trainable params", [x.trainable_params for x in c]))
    print(dist("MACs", [x.macs for x in c]))
    print(dist("ONNX bytes (fp32)", [x.onnx_bytes for x in c]))
    print(dist("peak RAM int8 plan (bytes)", [x.ram_bytes for x in c]))
    print(dist("peak RAM fp32 plan (bytes)", [x.ram_bytes_fp32 for x in c]))
    where = {}
    for _, r, _ in rows:
        part = r.plan.peak_step.split("/")[1] if r.plan.peak_step.startswith("/") else "other"
        where[part] = where.get(part, 0) + 1
    print(f"int8 plan peaks in: {', '.join(f'{k} {v}' for k, v in sorted(where.items(), key=lambda kv: -kv[1]))}")

    shim = build_shim(workdir) if args.measure > 0 else None
    if shim is None:
        print("\nno RAM measurement: --measure 0 or no C compiler (cc) to build the malloc counter")
        return
    order = sorted(range(len(rows)), key=lambda j: rows[j][1].costs.ram_bytes_fp32)
    picks = sorted({order[int(round(q))] for q in np.linspace(0, len(order) - 1, min(args.measure, len(order)))},
                   key=lambda j: rows[j][1].costs.ram_bytes_fp32)
    print(f"\nPlanned fp32 peak vs onnxruntime {__import__('onnxruntime').__version__} measured peak, one clip of "
          f"{samples} samples. Measured: peak of bytes malloc'ed at once (an LD_PRELOAD malloc counter, "
          "malloc_usable_size per block) during one run after a warm-up run, in a fresh process; CPU arena and "
          "memory pattern off, 1 thread. It includes the input, the output and kernel scratch (im2col, STFT "
          "buffers) the plan does not model, and excludes anything ORT keeps from the warm-up run; 'all' = "
          "graph optimizations on (fused Conv+ReLU etc.), 'none' = node by node like the plan.\n")
    print("| spec                                                    | plan fp32 KB | ORT all KB | ORT none KB | none / plan |")
    print("|---------------------------------------------------------|--------------|------------|-------------|-------------|")
    from microser.models.spec import REFERENCES

    references = []
    for name in REFERENCES:
        torch.manual_seed(0)
        report = measure_report(build_model(name), input_seconds=args.input_seconds, workdir=workdir / name)
        references.append((f"{name}: {REFERENCES[name].summary()}", report, workdir / name / "model.onnx"))
    for spec, report, path in references + [rows[j] for j in picks]:
        label = spec if isinstance(spec, str) else spec.summary()
        planned = report.costs.ram_bytes_fp32
        measured = {level: measure_ort_peak(shim, path, samples, level) for level in ("all", "none")}
        print(f"| {label[:55]:<55} | {planned / 1000:>12,.1f} | {measured['all'] / 1000:>10,.1f} | "
              f"{measured['none'] / 1000:>11,.1f} | {measured['none'] / planned:>11.2f} |")


if __name__ == "__main__":
    main()
