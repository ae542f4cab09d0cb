"""The toolchain around a generated library: build and run it on the host (gcc, the driver), measure it (flash with
``size``, stack from ``-fcallgraph-info=su``, instructions with valgrind callgrind), and build it for a Cortex-M4F
(arm-none-eabi-gcc: flash and RAM from the image and its map file) and run it in QEMU's mps2-an386 (parity on the
target ISA, instructions per audio second, the painted stack).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from microser import SAMPLE_RATE
from microser.errors import MicroserError
from microser.cgen.ctext import TEMPLATES, fill
from microser.cgen.instr import INSTR_TARGETS

GCC_FLAGS = ("-std=c99", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O2")


def compile_driver(out_dir, prefix: str, *, extra_flags=(), exe: str | None = None) -> Path:
    """Build ``<prefix>_main`` with the strict flags (GCC_FLAGS); MicroserError with gcc's first lines on failure."""
    out_dir = Path(out_dir)
    gcc = shutil.which("gcc")
    if gcc is None:
        raise MicroserError("gcc not found on PATH: the C export's checks need a C99 compiler; install gcc")
    exe = out_dir / (exe or f"{prefix}_main")
    cmd = [gcc, *GCC_FLAGS, *extra_flags, "-o", str(exe), str(out_dir / f"{prefix}.c"),
           str(out_dir / f"{prefix}_main.c"), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        first = " | ".join(r.stderr.strip().splitlines()[:3])
        raise MicroserError(f"gcc failed on {out_dir / (prefix + '.c')}: {first}; report the spec as a cgen bug")
    return exe


def run_driver(exe, audio: np.ndarray, chunks=(), *, peek: bool = False, workdir=None, wrapper=(),
               trace=None) -> np.ndarray:
    """Run a compiled driver on float32 audio pushed in ``chunks`` (cycled); returns the 3 outputs. ``trace``: the
    file a ``-DMICROSER_TRACE`` driver writes its int8 rows to (`read_trace`)."""
    env = dict(os.environ, MICROSER_TRACE_FILE=str(trace)) if trace is not None else None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "audio.f32"
        np.asarray(audio, dtype=np.float32).tofile(path)
        args = [*wrapper, str(exe), str(path)] + (["-peek"] if peek else []) + [str(int(c)) for c in chunks]
        r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise MicroserError(f"{exe} exited with {r.returncode} on {len(audio)} samples: {r.stderr.strip()[:200]}")
    return np.array([float(v) for v in r.stdout.split()], dtype=np.float64)


def read_trace(path) -> dict[int, np.ndarray]:
    """The rows a ``-DMICROSER_TRACE`` driver wrote: ``{tensor: (rows, n) int8}``, rows in the order made."""
    data = Path(path).read_bytes()
    rows: dict[int, list] = {}
    pos = 0
    while pos < len(data):
        tensor, row, n = np.frombuffer(data, np.int32, 3, pos)
        pos += 12
        rows.setdefault(int(tensor), []).append((int(row), np.frombuffer(data, np.int8, int(n), pos)))
        pos += int(n)
    out = {}
    for t, items in rows.items():
        if [r for r, _ in items] != list(range(len(items))):
            raise MicroserError(f"{path}: tensor {t} rows arrive out of order: expected 0, 1, 2, ... (a cgen bug)")
        out[t] = np.stack([v for _, v in items])
    return out


# ---- measurements: flash, RAM, stack, instructions ----


def measurement_signal(seconds: float = 1.0) -> np.ndarray:
    """The signal instruction counts are measured on: seeded Gaussian noise, standard deviation 0.1."""
    return (np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)


def worst_stack(ci_text: str, roots: list[str]) -> tuple[int, str]:
    """Deepest stack (bytes) over call paths from ``roots`` in a GCC ``-fcallgraph-info=su`` graph, and that path.

    Library calls (libm) have no stack figure and count 0 (they are leaf functions of a few dozen bytes).
    """
    size: dict[str, int] = {}
    name: dict[str, str] = {}
    edges: dict[str, list[str]] = {}
    for m in re.finditer(r'node: \{ title: "([^"]+)" label: "([^"\\]+)[^"]*?(\d+) bytes', ci_text):
        size[m.group(1)] = int(m.group(3))
        name[m.group(1)] = m.group(2)
    for m in re.finditer(r'edge: \{ sourcename: "([^"]+)" targetname: "([^"]+)"', ci_text):
        edges.setdefault(m.group(1), []).append(m.group(2))
    memo: dict[str, tuple[int, list[str]]] = {}

    def deepest(node: str, depth: int = 0) -> tuple[int, list[str]]:
        if node in memo:
            return memo[node]
        if depth > 200:
            raise MicroserError("call graph deeper than 200 in the generated C: expected no recursion")
        best = (0, [])
        for child in edges.get(node, []):
            sub = deepest(child, depth + 1)
            if sub[0] > best[0]:
                best = sub
        memo[node] = (size.get(node, 0) + best[0], [name.get(node, node)] + best[1])
        return memo[node]

    worst = max((deepest(r) for r in roots if r in size), key=lambda x: x[0], default=(0, []))
    return worst[0], " > ".join(worst[1])


def _callgrind_ir(exe: Path, audio: np.ndarray, functions, workdir: Path) -> int:
    """Instructions executed inside ``functions`` (a name or several, and what they call) while the driver runs on
    ``audio``."""
    path = workdir / "cg-audio.f32"
    np.asarray(audio, np.float32).tofile(path)
    out = workdir / "callgrind.out"
    functions = [functions] if isinstance(functions, str) else list(functions)
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           *(f"--toggle-collect={f}" for f in functions), str(exe), str(path), "4096"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise MicroserError(f"valgrind callgrind failed on {exe}: {r.stderr.strip()[-200:]}")
    m = re.search(r"^(?:summary|totals):\s+(\d+)", out.read_text(), re.M)
    return int(m.group(1)) if m else 0


def measure(c_dir, prefix: str, *, seconds: float = 1.0, callgrind: bool = True, workdir=None) -> dict:
    """Flash, RAM and instruction figures of one generated library (compiled here with GCC_FLAGS).

    * ``flash_bytes`` = text + data of ``size`` on the compiled object (text includes .rodata: the const
      weights and tables); ``bss_bytes`` must be 0 (no globals);
    * ``ram_bytes`` = ``sizeof(state)`` (state + arena) + ``stack_bytes``, the deepest call path of
      ``-fcallgraph-info=su`` from the API functions (libm leaf calls not included);
    * ``instructions_per_audio_second``: valgrind callgrind, instructions inside ``<prefix>_push`` (and
      ``_prescan``, the first pass of two-pass libraries) per second of `measurement_signal` (host x86-64, a proxy
      for DSP cycles), and
      ``result_instructions`` for the end-of-utterance flush and head (on 0.5 s). Needs valgrind; else None.
    """
    c_dir = Path(c_dir)
    gcc, size_tool = shutil.which("gcc"), shutil.which("size")
    if gcc is None or size_tool is None:
        raise MicroserError("gcc and size (binutils) are needed to measure the C library; install gcc")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for f in (f"{prefix}.c", f"{prefix}.h", f"{prefix}_main.c"):
            shutil.copy(c_dir / f, tmp / f)
        obj = tmp / f"{prefix}.o"
        r = subprocess.run([gcc, *GCC_FLAGS, "-fstack-usage", "-fcallgraph-info=su", "-c", f"{prefix}.c", "-o",
                            obj.name], cwd=tmp, capture_output=True, text=True)
        if r.returncode != 0:
            raise MicroserError(f"gcc failed on {c_dir / (prefix + '.c')}: {r.stderr.strip()[:300]}")
        sz = subprocess.run([size_tool, str(obj)], capture_output=True, text=True).stdout.splitlines()[1].split()
        text, data, bss = int(sz[0]), int(sz[1]), int(sz[2])
        ci = next(tmp.glob("*.ci")).read_text()
        roots = [f"{prefix}_{f}" for f in ("init", "reset", "push", "result", "prescan")]
        stack, path = worst_stack(ci, roots)
        ram = int(re.search(rf"#define {prefix.upper()}_RAM_BYTES (\d+)", (c_dir / f"{prefix}.h").read_text()).group(1))
        out = {"flash_bytes": text + data, "text_bytes": text, "data_bytes": data, "bss_bytes": bss,
               "state_plus_arena_bytes": ram, "stack_bytes": stack, "stack_path": path, "ram_bytes": ram + stack,
               "instructions_per_audio_second": None, "result_instructions": None,
               "compiler": subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
               "flags": " ".join(GCC_FLAGS)}
        if callgrind and shutil.which("valgrind"):
            exe = compile_driver(tmp, prefix)
            audio = measurement_signal(seconds)
            two_pass = f"{prefix.upper()}_TWO_PASS 1" in (c_dir / f"{prefix}.h").read_text()
            push = _callgrind_ir(exe, audio, [f"{prefix}_push"] + ([f"{prefix}_prescan"] if two_pass else []), tmp)
            result = _callgrind_ir(exe, audio[: SAMPLE_RATE // 2], f"{prefix}_result", tmp)
            out["instructions_per_audio_second"] = int(round(push / seconds))
            out["result_instructions"] = result
            out["callgrind"] = f"valgrind --tool=callgrind, {seconds:g} s of audio, host {os.uname().machine}"
    return out


def measure_instructions(c_dir, prefix: str, *, target: str = "x86-64", workdir=None) -> int:
    """Instructions per second of audio of one generated library: push (and prescan) on 1 s of
    `measurement_signal`, counted by valgrind callgrind (``x86-64``, the host) or in QEMU (``cortex-m4``)."""
    c_dir = Path(c_dir)
    if target == "cortex-m4":
        return measure_cortex_m4(c_dir, prefix, workdir=workdir)["instructions_per_audio_second"]
    if target != "x86-64":
        raise MicroserError(f"instruction target {target!r} is unknown: expected one of {', '.join(INSTR_TARGETS)}")
    if shutil.which("valgrind") is None:
        raise MicroserError("valgrind not found on PATH: counting x86-64 instructions needs callgrind; "
                            "install valgrind")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for f in (f"{prefix}.c", f"{prefix}.h", f"{prefix}_main.c"):
            shutil.copy(c_dir / f, tmp / f)
        exe = compile_driver(tmp, prefix)
        two_pass = f"{prefix.upper()}_TWO_PASS 1" in (c_dir / f"{prefix}.h").read_text()
        return _callgrind_ir(exe, measurement_signal(1.0), [f"{prefix}_push"] + ([f"{prefix}_prescan"] if two_pass
                                                                                 else []), tmp)


# ---- Cortex-M4F: cross-compiled flash and RAM, and a run in QEMU (mps2-an386) ----

ARM_GCC = "arm-none-eabi-gcc"
ARM_SIZE = "arm-none-eabi-size"
QEMU_ARM = "qemu-system-arm"
M4_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfpu=fpv4-sp-d16", "-mfloat-abi=hard", "-O2")
M4_CHUNKS = (160, 17, 999, 3, 4096, 1)  # samples per push() in the QEMU driver, cycled
QEMU_TIMEOUT_S = 120
M4_TOOLS_HINT = ("install the Debian packages gcc-arm-none-eabi, libnewlib-arm-none-eabi (and qemu-system-arm to "
                 "run it), as .ci/run does")


def m4_tools() -> dict:
    """Paths of the Cortex-M4 tools found on PATH (``gcc``, ``size``, ``qemu``), None where missing."""
    return {"gcc": shutil.which(ARM_GCC), "size": shutil.which(ARM_SIZE), "qemu": shutil.which(QEMU_ARM)}


def _arm(cmd: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        first = " | ".join(r.stderr.strip().splitlines()[:3])
        raise MicroserError(f"{ARM_GCC} failed on {what}: {first}; report the spec as a cgen bug")
    return r


def _arm_size(path: Path) -> tuple[int, int, int]:
    """text (code + rodata), data, bss of ``arm-none-eabi-size`` (Berkeley format)."""
    row = subprocess.run([ARM_SIZE, str(path)], capture_output=True, text=True).stdout.splitlines()[1].split()
    return int(row[0]), int(row[1]), int(row[2])


def _map_members(map_text: str) -> set[str]:
    """Archive members a GNU ld map file says were linked (``libm.a(libm_a-sf_exp.o)`` -> ``libm.a:sf_exp.o``)."""
    block = map_text.split("Memory Configuration")[0]
    members = re.findall(r"^(\S+\.a)\(([^)]+)\)", block, re.M)
    return {f"{Path(a).name}:{re.sub(r'^lib[a-z]+_a-', '', m)}" for a, m in members}


def measure_cortex_m4(c_dir, prefix: str, *, run: bool = True, workdir=None, check_audio=None,
                      extra_flags=()) -> dict:
    """Flash and RAM of one generated library built for a Cortex-M4F, and (``run``, needs qemu-system-arm) its run
    in QEMU's mps2-an386 board with semihosting.

    * ``flash_bytes``: text + data (``arm-none-eabi-size``) of a bare-metal image calling every API function, minus
      the same image with an empty main(): the library's code and const tables (``library_flash_bytes``, from its
      object) plus the runtime it pulls in (``runtime``: libm, libc, libgcc members, read from the map file);
    * ``ram_bytes`` = data + bss of the library object (0: no globals) + ``sizeof(state)`` (state + arena) + the
      stack: measured in QEMU (``stack_source`` "qemu": painted stack, deepest word below main's frame, libm
      included) or, without QEMU, the deepest path of ``-fcallgraph-info=su`` (libm calls not counted);
    * with ``run``: ``instructions_per_audio_second`` (push + prescan on `measurement_signal`, 1 s, counted with
      ``qemu -icount shift=0`` and the board's 25 MHz timer, calibrated on a loop of known length) and, when
      ``check_audio`` is given, ``outputs``, the library's 3 outputs on it in the emulated Cortex-M4.

    ``extra_flags`` go to the library's compile (e.g. ``-DMICROSER_NO_DSP`` for the portable kernels).
    MicroserError with the packages to install when the toolchain is missing.
    """
    c_dir = Path(c_dir)
    tools = m4_tools()
    if tools["gcc"] is None or tools["size"] is None:
        raise MicroserError(f"{ARM_GCC} / {ARM_SIZE} not found on PATH: the Cortex-M4 build needs them; "
                            + M4_TOOLS_HINT)
    header = (c_dir / f"{prefix}.h").read_text()
    two_pass = f"{prefix.upper()}_TWO_PASS 1" in header
    state_arena = int(re.search(rf"#define {prefix.upper()}_RAM_BYTES (\d+)", header).group(1))
    hop = 160
    flags = [*GCC_FLAGS[:-1], *M4_FLAGS, *extra_flags]  # the library's strict C99 flags, -O2 from M4_FLAGS
    harness = ["-std=gnu99", *M4_FLAGS, "-ffunction-sections", "-fdata-sections"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for f in (f"{prefix}.c", f"{prefix}.h"):
            shutil.copy(c_dir / f, tmp / f)
        for f in ("m4_startup.c", "mps2_an386.ld"):
            shutil.copy(TEMPLATES / f, tmp / f)
        _arm([ARM_GCC, *flags, "-ffunction-sections", "-fdata-sections", "-fstack-usage", "-fcallgraph-info=su",
              "-c", f"{prefix}.c", "-o", "lib.o"], tmp, f"{prefix}.c")
        text, data, bss = _arm_size(tmp / "lib.o")
        roots = [f"{prefix}_{f}" for f in ("init", "reset", "push", "result", "prescan")]
        static_stack, static_path = worst_stack(next(tmp.glob("*.ci")).read_text(), roots)
        prescan = f"    (void){prefix}_prescan(&st, (const float *)samples, {hop});\n" if two_pass else ""
        (tmp / "footprint.c").write_text(fill("m4_footprint.c", P=prefix, hop=hop, prescan=prescan))
        link = [*harness, "--specs=nano.specs", "--specs=nosys.specs", "-nostartfiles", "-T", "mps2_an386.ld",
                "-Wl,--gc-sections", "m4_startup.c", "footprint.c"]
        _arm([ARM_GCC, *link, "lib.o", "-lm", "-Wl,-Map=full.map", "-o", "full.elf"], tmp, "the footprint image")
        _arm([ARM_GCC, *link, "-DMICROSER_EMPTY", "-Wl,-Map=empty.map", "-o", "empty.elf"], tmp, "the empty image")
        full, empty = _arm_size(tmp / "full.elf"), _arm_size(tmp / "empty.elf")
        runtime = sorted(_map_members((tmp / "full.map").read_text()) - _map_members((tmp / "empty.map").read_text()))
        out = {"target": "Cortex-M4F", "compiler": subprocess.run([ARM_GCC, "--version"], capture_output=True,
                                                                 text=True).stdout.splitlines()[0],
               "flags": " ".join(flags), "flash_bytes": (full[0] + full[1]) - (empty[0] + empty[1]),
               "library_flash_bytes": text + data, "text_bytes": text, "data_bytes": data, "bss_bytes": bss,
               "runtime": runtime, "state_plus_arena_bytes": state_arena, "stack_bytes": static_stack,
               "stack_path": static_path, "stack_source": "-fcallgraph-info=su (libm calls not counted)",
               "ram_bytes": data + bss + state_arena + static_stack, "instructions_per_audio_second": None,
               "qemu": None}
        if run and tools["qemu"] is not None:
            prescan = fill("m4_main_prescan.c", P=prefix) if two_pass else ""
            (tmp / "m4_main.c").write_text(fill("m4_main.c", P=prefix, prescan=prescan,
                                                chunks=", ".join(map(str, M4_CHUNKS))))
            _arm([ARM_GCC, *harness, "--specs=nano.specs", "--specs=rdimon.specs", "-nostartfiles", "-T",
                  "mps2_an386.ld", "-Wl,--gc-sections", "-DMICROSER_SEMIHOSTING", "m4_startup.c", "m4_main.c",
                  "lib.o", "-lm", "-o", "qemu.elf"], tmp, "the QEMU driver")
            timed = _qemu_run(tmp, measurement_signal(1.0))
            out["instructions_per_audio_second"] = timed["instructions"]
            out["result_instructions"] = timed["result_instructions"]
            out["stack_bytes"], out["stack_path"] = timed["stack_bytes"], "measured (painted stack)"
            out["stack_source"] = "qemu: painted stack, deepest word below the caller's frame (libm included)"
            out["ram_bytes"] = data + bss + state_arena + timed["stack_bytes"]
            out["qemu"] = {"machine": "mps2-an386", "version": subprocess.run(
                [QEMU_ARM, "--version"], capture_output=True, text=True).stdout.splitlines()[0],
                "method": "qemu -icount shift=0 (1 ns per instruction) read through the CMSDK timer at 25 MHz, "
                          f"calibrated on a 2-instruction loop ({timed['per_tick']:.3f} instructions per tick); "
                          "instructions, not cycles", "static_stack_bytes": static_stack}
            if check_audio is not None:
                out["outputs"] = _qemu_run(tmp, check_audio)["outputs"]
    return out


def _qemu_run(tmp: Path, audio: np.ndarray) -> dict:
    """Run ``tmp/qemu.elf`` on ``audio`` in qemu-system-arm (mps2-an386, semihosting, -icount shift=0)."""
    np.asarray(audio, np.float32).tofile(tmp / "m4_input.f32")
    cmd = [QEMU_ARM, "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-icount", "shift=0", "-kernel", "qemu.elf"]
    try:
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=QEMU_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise MicroserError(f"{QEMU_ARM} did not finish within {QEMU_TIMEOUT_S} s on {len(audio)} samples: "
                            "the Cortex-M4 driver hangs or faults; report the spec as a cgen bug") from None
    m = re.search(r"^out (\w+) (\w+) (\w+) (-?\d+)$", r.stdout, re.M)
    t = re.search(r"^ticks (\d+) (\d+) (\d+) calib (\d+) (\d+) stack (\d+) samples (\d+)$", r.stdout, re.M)
    if r.returncode != 0 or m is None or t is None:
        raise MicroserError(f"the Cortex-M4 driver failed in {QEMU_ARM} (exit {r.returncode}): "
                            f"{(r.stdout + r.stderr).strip()[-200:]!r}; report the spec as a cgen bug")
    push, prescan, result, loop_insns, loop_ticks, stack, samples = (int(v) for v in t.groups())
    per_tick = loop_insns / loop_ticks
    outputs = np.array([np.frombuffer(int(v, 16).to_bytes(4, "little"), np.float32)[0] for v in m.groups()[:3]],
                       dtype=np.float64)
    return {"outputs": outputs, "status": int(m.group(4)), "per_tick": per_tick,
            "instructions": int(round((push + prescan) * per_tick * SAMPLE_RATE / samples)),
            "result_instructions": int(round(result * per_tick)), "stack_bytes": stack}

