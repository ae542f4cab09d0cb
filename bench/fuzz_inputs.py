"""Bench: hostile input through the real command line; every outcome must be a result or a one-line error.

Runs ``microser.cli.main`` in this process (``SystemExit`` caught, stdout and
stderr captured: exactly what the console script runs) on ``--n`` random
inputs of three kinds, in a temporary folder:

- ``audio bytes``: a folder of good clips plus one file of random bytes
  (raw noise, a WAV/FLAC header followed by garbage, a valid WAV whose float
  payload holds NaN, Inf, huge, tiny or opposite-phase samples, any rate,
  channel count and length), through ``cache build`` (a csv teacher with a
  row for it) or ``predict``;
- ``csv cells``: an audio CSV and a teacher CSV whose cells are random
  (numbers, NaN, empty, paths that leave the folder or do not exist,
  quotes, commas, non-ASCII) in a random encoding (UTF-8, with a BOM,
  UTF-16, Latin-1, random bytes), through ``cache build``;
- ``options``: one command (cache build, search, describe, pareto, trials,
  show, compress, export, evaluate, predict, cache info/verify, demo) with a
  random subset of its options, each value drawn from the option's click
  type (ints, floats, strings, paths: negative, zero, NaN, Inf, huge, empty,
  unwritable, a file where a folder is expected, ...).

Options that only decide how much work a valid run does are held cheap when
their drawn value is valid (``search --trials 0 --final-k 0 --references ''``,
``compress --epochs 0``, at most 12 ``demo --clips``); invalid draws of them
are kept.

Outcomes: ``ok`` (exit 0), ``error`` (exit 2, ``error: ...`` on exactly one
line), ``usage`` (click's own usage message for a value of the wrong type,
exit 2), ``exit 1`` (``cache verify`` found problems), and the failures:
``traceback`` (any other exception), ``multi-line error`` (exit 2 without an
``error: ...`` last line, or more than one error line) and ``lost``
(a ``cache build`` that exited 0 but neither cached nor listed a source in
skipped.csv). The exit status is 1 when any failure occurred.

Usage::

    python bench/fuzz_inputs.py [--n 500] [--seed 0] [--show 5]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import random
import shutil
import string
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf

FAILURES = ("traceback", "multi-line error", "lost")


# ---- the fixed world the inputs land in ----


def _clip(path: Path, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 100 + 100 * rng.random()
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5)) * 0.2 + 0.01 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")


def _labels(path: Path, names: list[str], splits: list[str]) -> None:
    rows = [{"path": n, "speaker": f"s{k}", "split": sp, "arousal": round(0.1 + 0.1 * k, 2), "dominance": 0.5,
             "valence": 0.5} for k, (n, sp) in enumerate(zip(names, splits))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


class World:
    """A tiny corpus, its cache, a study with one trial (random weights), a bundle, and odd paths."""

    def __init__(self, root: Path):
        from microser.cache_build import build_cache

        self.root = root
        self.corpus = root / "corpus"
        self.names = [f"c{k}.wav" for k in range(8)]
        for k, n in enumerate(self.names):
            _clip(self.corpus / n, 0.5 + 0.05 * k, seed=k)
        self.splits = ["valid", "valid", "test", "test", "train", "train", "train", "train"]
        self.labels = self.corpus / "labels.csv"
        _labels(self.labels, self.names, self.splits)
        self.cache = build_cache(self.labels, [f"csv:{self.labels}"], root / "cache").out
        self.space = root / "space.toml"
        self.space.write_text('family = "wav2small"\n[frontend]\nn_fft = 256\nhop = 160\nn_mels = 16\n'
                              '[wav2small]\ndepth = 2\nchannels = 4\nkernel = 3\nnorm = "batch"\npool_after = [1]\n'
                              'pooling = "attention"\n')
        self.storage = f"sqlite:///{root}/studies/s.db"
        self._study()
        from microser.export import Tolerance, export_trial
        from microser.storage import load_study

        self.bundle = root / "bundle"
        export_trial(load_study("s", self.storage), 0, self.bundle, keep_float=[], tolerance=Tolerance(1.0, 1.0))
        self.file = root / "a-file.txt"
        self.file.write_text("not a folder\n")
        self.empty = root / "empty-dir"
        self.empty.mkdir()
        self.garbage = root / "garbage.csv"
        self.garbage.write_bytes(os.urandom(300))
        self.toml = root / "config.toml"
        self.toml.write_text('trials = "five"\n')

    def _study(self) -> None:
        import optuna
        import torch

        from microser.frontends import FrontendSpec
        from microser.models.spec import ArchSpec, build_model
        from microser.models.wav2small import Wav2SmallBody
        from microser.storage import SETTINGS_ATTR, artifact_store, open_storage, save_weights

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.create_study(study_name="s", storage=open_storage(self.storage, "s"),
                                    directions=["maximize", "minimize", "minimize"])
        study.set_user_attr(SETTINGS_ATTR, {"artifacts": str(self.root / "artifacts"), "cache": str(self.cache),
                                            "input_seconds": 0.5, "objectives": ["params", "ram_bytes"],
                                            "budgets": []})
        spec = ArchSpec("wav2small", FrontendSpec(n_fft=256, hop=160, n_mels=16),
                        Wav2SmallBody(channels=(4, 4), kernel=3, norm="batch", pool_after=(1,), pooling="attention"))
        torch.manual_seed(0)
        weights = save_weights(build_model(spec).state_dict(), store=artifact_store(self.root / "artifacts"),
                               study_or_trial=study, name="trial-0")
        study.add_trial(optuna.create_trial(values=[0.1, 1000.0, 1000.0], user_attrs={
            "spec": spec.to_json(), "family": "wav2small", "summary": spec.summary(), "weights": weights,
            "costs": {"params": 1000, "ram_bytes": 1000}, "ccc": {t: 0.1 for t in ("arousal", "dominance",
                                                                                     "valence", "mean")}}))


# ---- random values ----

ODD_TEXT = ["", " ", "../x", "/", "a?b#c", "a%20b", "é", "x" * 300, "-1", "nan", "1,2,3", "'", '"', ",", "\t",
            "sqlite://", "journal:", "80k-params", "0-params", "1e400-params", "80x-params", "wav2small-ref",
            "{\"family\": 1}", "csv:", "hf:", "demo", "params,params", "tpe", "random", "streaming", "final",
            "test", "none", "auto", "/proc/x/y"]


def rand_text(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(ODD_TEXT)
    alphabet = string.printable.strip() + "éßΩ漢 "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))


def rand_int(rng: random.Random) -> str:
    return str(rng.choice([-(2**63), -5, -1, 0, 1, 2, 3, 7, 2**31, 2**63, 10**30, rng.randint(-100, 100)]))


def rand_float(rng: random.Random) -> str:
    return rng.choice(["nan", "inf", "-inf", "-1", "0", "-0", "1e-9", "0.01", "0.25", "0.5", "1", "8", "59",
                       "61", "1e30", "1e309", "-1e309", f"{rng.uniform(-10, 10):.3f}", f"{rng.uniform(0, 2):.3f}"])


def rand_path(rng: random.Random, w: World, tmp: Path) -> str:
    fresh = tmp / f"new-{rng.randint(0, 10**9)}"
    return str(rng.choice([fresh, fresh / "deeper", w.file, w.empty, w.root / "missing", Path("/proc/x/y"),
                           Path("/dev/null"), w.garbage, w.cache, w.labels, w.bundle, w.bundle / "model.onnx",
                           w.corpus, w.space, w.toml, Path(""), tmp / "a b" / "c"]))


def option_type(param) -> type:
    """The Python type the command declares for an option: int, float, bool, str or Path (list/Optional removed)."""
    import typing

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:   # typer < 0.29 builds real click parameters
        import click

        t = param.type
        return {click.INT: int, click.FLOAT: float, click.BOOL: bool}.get(t, Path if isinstance(t, click.Path) else str)
    while typing.get_origin(annotation) in (list, typing.Union, getattr(__import__("types"), "UnionType", None)):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float, bool, str) else Path if annotation is Path else str


def rand_value(rng: random.Random, param, w: World, tmp: Path) -> str:
    t = option_type(param)
    if t is int:
        return rand_int(rng) if rng.random() < 0.85 else rand_text(rng)
    if t is float:
        return rand_float(rng) if rng.random() < 0.85 else rand_text(rng)
    if t is Path or param.name in ("out", "audio", "model", "cache", "space", "config", "storage", "plot", "html",
                                   "artifacts"):
        if param.name == "storage" and rng.random() < 0.5:
            return rng.choice(["sqlite://", "sqlite:///", "sqlite:////proc/x/y.db", "journal:", "journal:/proc/x.log",
                               f"journal:{tmp}/j.log", f"sqlite:///{tmp}/x.db", "postgresql://u:p@127.0.0.1:1/db",
                               "mysql://", "x.log", f"sqlite:///{w.file}", f"sqlite:///{w.empty}", w.storage])
        return rand_path(rng, w, tmp)
    return rand_text(rng)


# ---- one input of each kind ----


def _command(name: str):
    import typer.main

    from microser.cli import app

    group = typer.main.get_command(app)
    cmd = group.commands[name.split()[0]]
    if " " in name:
        cmd = cmd.commands[name.split()[1]]
    return cmd


BASE = {  # valid arguments, so a draw can get past the first check; drawn options replace these
    "cache build": lambda w, t: ["--audio", str(w.labels), "--teacher", f"csv:{w.labels}", "--out", str(t / "c")],
    "search": lambda w, t: ["--cache", str(w.cache), "--space", str(w.space), "--budget", "1G-params",
                            "--storage", f"sqlite:///{t}/s.db", "--study", "f", "--trials", "0", "--final-k", "0",
                            "--references", "", "--threads", "1"],
    "describe": lambda w, t: ["wav2small-ref", "--input-seconds", "0.5"],
    "pareto": lambda w, t: ["--study", "s", "--storage", w.storage],
    "trials": lambda w, t: ["--study", "s", "--storage", w.storage],
    "show": lambda w, t: ["--study", "s", "--storage", w.storage, "--trial", "0"],
    "compress": lambda w, t: ["--study", "s", "--storage", w.storage, "--trial", "0", "--epochs", "0"],
    "export": lambda w, t: ["--study", "s", "--storage", w.storage, "--trial", "0", "--out", str(t / "b"),
                            "--tolerance", "1"],
    "evaluate": lambda w, t: [str(w.bundle)],
    "predict": lambda w, t: [str(w.bundle), str(w.corpus), "--out", str(t / "p.csv")],
    "cache info": lambda w, t: [str(w.cache)],
    "cache verify": lambda w, t: [str(w.cache)],
    "demo": lambda w, t: ["--out", str(t / "demo"), "--clips", "6", "--speakers", "3"],
}
# option -> valid values that only mean more work: held at the base value when the draw is valid
HELD = {"search": {"trials", "final_k", "references", "workers"}, "compress": {"epochs", "prune_steps", "finetune_epochs"},
        "demo": {"clips", "speakers"}}


def _merge(base: list[str], drawn: dict[str, list[str]], cmd) -> list[str]:
    """``base`` with the options in ``drawn`` replaced (positional arguments stay first)."""
    out, skip = [], False
    opts = {o: p for p in cmd.params for o in getattr(p, "opts", [])}
    for k, a in enumerate(base):
        if skip:
            skip = False
            continue
        p = opts.get(a)
        if p is not None and p.name in drawn:
            skip = not p.is_flag
            continue
        out.append(a)
    for values in drawn.values():
        out += values
    return out


def _valid_for(param, value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return float(value) > 0 and float(value) == float(value) and abs(float(value)) != float("inf")


def option_input(rng: random.Random, w: World, tmp: Path) -> tuple[str, list[str]]:
    name = rng.choice(list(BASE))
    cmd = _command(name)
    options = [p for p in cmd.params if getattr(p, "opts", None) and p.opts[0].startswith("--")
               and p.name not in ("json_",)]
    drawn: dict[str, list[str]] = {}
    for p in rng.sample(options, k=min(len(options), rng.randint(1, 4))):
        if p.is_flag:
            drawn[p.name] = [p.opts[0]]
            continue
        values = [rand_value(rng, p, w, tmp) for _ in range(rng.randint(1, 2) if p.multiple else 1)]
        if p.name in HELD.get(name, ()) and all(_valid_for(p, v) for v in values):
            continue   # a valid amount of work: keep the cheap base value
        drawn[p.name] = [x for v in values for x in (p.opts[0], v)]
    args = name.split() + _merge(BASE[name](w, tmp), drawn, cmd)
    positional = [p for p in cmd.params if not getattr(p, "opts", [""])[0].startswith("--")]
    if positional and rng.random() < 0.3:   # a random value for a positional argument
        k = len(name.split())
        args[k] = rand_path(rng, w, tmp) if rng.random() < 0.7 else rand_text(rng)
    return "options", args


def _random_audio_file(rng: random.Random, path: Path) -> None:
    kind = rng.choice(["noise bytes", "wav header + garbage", "flac header + garbage", "float wav", "empty",
                       "int wav", "huge header"])
    if kind == "noise bytes":
        path.write_bytes(os.urandom(rng.randint(0, 5000)))
    elif kind == "wav header + garbage":
        path.write_bytes(b"RIFF" + os.urandom(4) + b"WAVEfmt " + os.urandom(rng.randint(0, 2000)))
    elif kind == "flac header + garbage":
        path.write_bytes(b"fLaC" + os.urandom(rng.randint(0, 2000)))
    elif kind == "huge header":
        path.write_bytes(b"RIFF\xff\xff\xff\x7fWAVEfmt \x10\x00\x00\x00\x01\x00\x02\x00" + os.urandom(64))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        rate = rng.choice([1, 8000, 11025, 16000, 22050, 44100, 48000, 96000, 192000])
        channels = rng.choice([1, 2, 3, 8])
        n = rng.choice([0, 1, 10, 160, 3999, 4000, 8000, 40000])
        scale = rng.choice([0.0, 1e-9, 1e-6, 1e-3, 0.5, 1.0, 50.0, 1e30])
        x = scale * np.random.default_rng(rng.randint(0, 10**6)).standard_normal((n, channels))
        if channels > 1 and rng.random() < 0.3:
            x[:, 1] = -x[:, 0]
        if n and rng.random() < 0.2:
            x[rng.randrange(n), 0] = rng.choice([np.nan, np.inf, -np.inf])
        if kind == "float wav":
            sf.write(path, x.astype(np.float32), rate, subtype="FLOAT", format="WAV")
        else:
            sf.write(path, np.clip(x, -1, 1), rate, subtype="PCM_16", format="WAV")


def audio_input(rng: random.Random, w: World, tmp: Path) -> tuple[str, list[str]]:
    folder = tmp / "audio"
    folder.mkdir()
    for n in w.names:
        shutil.copy(w.corpus / n, folder / n)
    odd = folder / rng.choice(["odd.wav", "odd.flac", "odd.mp3", "odd.ogg", "odd.WAV"])
    _random_audio_file(rng, odd)
    with open(tmp / "teacher.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["path", "speaker", "arousal", "dominance", "valence"])
        for k, n in enumerate([*w.names, odd.name]):
            wr.writerow([str(folder / n), f"s{k % 4}", 0.5, 0.5, 0.5])
    if rng.random() < 0.7:
        return "audio bytes", ["cache", "build", "--audio", str(folder), "--teacher", f"csv:{tmp / 'teacher.csv'}",
                               "--out", str(tmp / "c"), "--allow-absolute-paths"]
    return "audio bytes", ["predict", str(w.bundle), str(folder), "--out", str(tmp / "p.csv")]


CELLS = ["", " ", "nan", "NaN", "inf", "-inf", "1e309", "-1", "0", "0.5", "1", "2", "1e-300", "abc", "é",
         "a,b", 'a"b', "../outside.wav", "/etc/passwd", "missing.wav", "c0.wav", "c1.wav", "sub/../c2.wav",
         "train", "valid", "test", "dev", "s1", "x" * 200]


def csv_input(rng: random.Random, w: World, tmp: Path) -> tuple[str, list[str]]:
    folder = tmp / "d"
    folder.mkdir()
    for n in w.names[:6]:
        shutil.copy(w.corpus / n, folder / n)
    files = {}
    # half the inputs are a valid pair with one random cell in one of them (they get past the first check),
    # half are random
    one_cell = rng.random() < 0.5
    mutated = rng.choice(["audio.csv", "teacher.csv"])
    for which, columns in (("audio.csv", ["path", "speaker", "split"]),
                           ("teacher.csv", ["path", "arousal", "dominance", "valence", "speaker", "start", "end"])):
        if one_cell:
            cols = columns[:3] if which == "audio.csv" else columns[:5]
            rows = [[w.names[k], f"s{k}", ["valid", "test", "train"][min(k, 2)] if k < 2 else "train"]
                    if which == "audio.csv" else [w.names[k], f"{0.1 * k:.1f}", "0.5", "0.5", f"s{k}"]
                    for k in range(6)]
            if which == mutated:
                r, c = rng.randrange(len(rows)), rng.randrange(len(cols))
                rows[r][c] = rng.choice(CELLS) if rng.random() < 0.8 else rand_text(rng)
        else:
            cols = [c for c in columns if rng.random() < 0.85] or [rng.choice(columns)]
            if rng.random() < 0.2:
                cols.append(rand_text(rng))
            rows = []
            for k in range(rng.randint(0, 8)):
                row = []
                for c in cols:
                    if c == "path" and rng.random() < 0.6:
                        row.append(w.names[k % 6])
                    elif c in ("arousal", "dominance", "valence") and rng.random() < 0.6:
                        row.append(f"{rng.random():.3f}")
                    else:
                        row.append(rng.choice(CELLS) if rng.random() < 0.8 else rand_text(rng))
                rows.append(row)
        buf = io.StringIO()
        csv.writer(buf).writerows([cols, *rows])
        text = buf.getvalue()
        encoding = rng.choice(["utf-8", "utf-8-sig", "utf-16", "utf-32"] if one_cell else
                              ["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "bytes"])
        data = os.urandom(rng.randint(0, 400)) if encoding == "bytes" else text.encode(encoding, errors="replace")
        (folder / which).write_bytes(data)
        files[which] = folder / which
    return "csv cells", ["cache", "build", "--audio", str(files["audio.csv"]), "--teacher",
                         f"csv:{files['teacher.csv']}", "--out", str(tmp / "c")]


# ---- running one input ----


def run(argv: list[str]) -> tuple[str, str]:
    """(outcome, detail) of one command line, run in-process through microser.cli.main."""
    from microser.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - a traceback is exactly what this bench looks for
        if isinstance(e, KeyboardInterrupt):
            raise
        return "traceback", "".join(traceback.format_exception(e))[-1500:]
    text = err.getvalue()
    if "Traceback (most recent call last)" in text:
        return "traceback", text[-1500:]
    if code == 0:
        return "ok", ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if code == 2 and lines and lines[-1].startswith("error: "):   # progress lines may come before it
        return ("error", lines[-1]) if sum(ln.startswith("error") for ln in lines) == 1 else \
            ("multi-line error", text[-1500:])
    if code == 2 and any(ln.startswith("Usage:") for ln in lines):
        return "usage", lines[-1]
    if code == 1 and argv[:2] == ["cache", "verify"]:
        return "exit 1", ""
    return "multi-line error", f"exit {code}: {text[-1500:]}"


def lost_sources(argv: list[str]) -> list[str]:
    """Sources of a successful `cache build` that are neither cached nor listed in skipped.csv."""
    from microser.cache import Cache, list_sources

    out = Path(argv[argv.index("--out") + 1])
    sources, _ = list_sources(argv[argv.index("--audio") + 1], allow_absolute_paths="--allow-absolute-paths" in argv)
    cached = {it["source"] for it in Cache.open(out).items}
    with open(out / "skipped.csv", newline="") as f:
        skipped = {r["path"] for r in csv.DictReader(f)}
    return [s.key for s in sources if s.key not in cached | skipped]


def _state(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="inputs to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=5, help="failures printed in full")
    args = ap.parse_args()

    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"   # an hf:NAME draw must fail fast, not wait for the network
    import torch

    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    np.random.seed(args.seed)
    home = Path(tempfile.mkdtemp(prefix="microser-fuzz-"))
    os.environ["MICROSER_HOME"] = str(home / "home")
    cwd = os.getcwd()
    os.chdir(home)   # default paths (studies/...) land in the temporary folder
    t0 = time.perf_counter()
    try:
        world = World(home / "world")
        pristine = home / "world.pristine"
        shutil.copytree(world.root, pristine, symlinks=True)
        state = _state(world.root)
        setup = time.perf_counter() - t0
        counts: dict[str, Counter] = defaultdict(Counter)
        commands: Counter = Counter()
        failures = []
        kinds = [audio_input] * 3 + [csv_input] * 3 + [option_input] * 6
        for i in range(args.n):
            tmp = home / f"in{i:04d}"
            tmp.mkdir()
            kind, argv = rng.choice(kinds)(rng, world, tmp)
            commands[" ".join(argv[:2]) if argv[0] == "cache" else argv[0]] += 1
            outcome, detail = run(argv)
            if outcome == "ok" and argv[:2] == ["cache", "build"]:
                lost = lost_sources(argv)
                if lost:
                    outcome, detail = "lost", f"not cached, not in skipped.csv: {lost}"
            counts[kind][outcome] += 1
            if outcome in FAILURES:
                failures.append((kind, argv, outcome, detail))
            shutil.rmtree(tmp, ignore_errors=True)
            if _state(world.root) != state:   # a draw wrote into the shared world (e.g. --out CACHE): restore it
                shutil.rmtree(world.root)
                shutil.copytree(pristine, world.root, symlinks=True)
                state = _state(world.root)
        elapsed = time.perf_counter() - t0
    finally:
        os.chdir(cwd)
        shutil.rmtree(home, ignore_errors=True)

    outcomes = ["ok", "error", "usage", "exit 1", *FAILURES]
    print(f"microser fuzz: {args.n} inputs through microser.cli.main, seed {args.seed}; {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}; set-up {setup:.0f} s, total {elapsed:.0f} s")
    print(f"{'kind':<12}" + "".join(f"{o:>18}" for o in outcomes) + f"{'total':>8}")
    for kind in ("audio bytes", "csv cells", "options"):
        c = counts[kind]
        print(f"{kind:<12}" + "".join(f"{c[o]:>18}" for o in outcomes) + f"{sum(c.values()):>8}")
    total = sum(counts.values(), Counter())
    print(f"{'all':<12}" + "".join(f"{total[o]:>18}" for o in outcomes) + f"{sum(total.values()):>8}")
    print("commands: " + ", ".join(f"{k} {v}" for k, v in commands.most_common()))
    for kind, argv, outcome, detail in failures[: args.show]:
        print(f"\n{outcome} ({kind}): microser {' '.join(repr(a) if ' ' in a or not a else a for a in argv)}\n{detail}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
