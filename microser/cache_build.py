"""Building a teacher cache (``microser.cache`` reads it): list audio, split, segment, annotate, write.

Building is resumable and crash-safe. While it runs the folder holds
``build.json`` (the build's identity), append-only data files
(``audio.i16.part``, ``targets.f32.part``, ``embeddings.f32.part``) and
``journal.jsonl``: after each batch the data are written and fsync'ed, then one
journal line records the batch's items and the data files' new ends. Run
again after a kill, the build truncates the data files to the last journal
line and continues; the result equals an uninterrupted build (same items,
audio, targets; ``created_at`` is the first start). ``meta.json`` is written
last, atomically, so a folder without a complete meta.json is never read as a
cache.
"""

from __future__ import annotations

import csv
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import microser
from microser import MIN_SECONDS, SAMPLE_RATE, TARGETS, checks
from microser.audio import audio_info, from_int16, load_audio, read_segment, scan_audio, segment_bounds, to_int16
from microser.cache import FORMAT, ITEM_COLUMNS, MIN_SEGMENT_SAMPLES, VERSION, Source, items_fingerprint, list_sources
from microser.errors import MicroserError
from microser.teachers import Segment, listed, make_teacher, match_key, sha256_file

_WHOLE_FILE_SECONDS = 600.0  # files up to this long are decoded whole; longer ones segment by segment
_PARTS = ("audio.i16.part", "targets.f32.part", "embeddings.f32.part")
Progress = Callable[[int, int, float], None]  # (items done, items total, audio seconds done)


@dataclass(frozen=True)
class BuildReport:
    """What one `build_cache` call did. ``rtf``: wall seconds per audio second in this run (lower is faster)."""

    out: Path
    n_items: int
    n_sources: int
    n_skipped: int
    audio_seconds: float  # audio cached in total (all items)
    run_audio_seconds: float  # audio processed by this call (0 when the cache was already complete)
    elapsed_seconds: float
    resumed_items: int  # items found done from an earlier, interrupted run (0 when it was already complete)
    fingerprint: str
    n_notes: int = 0  # files changed on the way in (peak-normalised), listed in notes.csv

    @property
    def rtf(self) -> float | None:
        return self.elapsed_seconds / self.run_audio_seconds if self.run_audio_seconds > 0 else None


def build_cache(
    audio,
    teachers: Sequence[str],
    out,
    *,
    max_seconds: float = 8.0,
    overlap_seconds: float = 1.0,
    split_seed: int = 0,
    target_range: tuple[float, float] = (0.0, 1.0),
    rescale_from: tuple[float, float] | None = None,
    embeddings: bool = False,
    teacher_batch_size: int = 8,
    device: str | None = None,
    allow_absolute_paths: bool = False,
    progress: Progress | None = None,
) -> BuildReport:
    """Run the teacher(s) once over every segment of ``audio`` and write a cache folder at ``out``.

    Args:
        audio: a folder (scanned recursively for audio files) or a CSV with a
            ``path`` column (relative to the CSV) and optional ``speaker`` and
            ``split`` (train/valid/test) columns.
        teachers: specs (``csv:FILE``, ``hf:NAME_OR_PATH``, ``onnx:FILE``,
            ``demo``); with several, targets are their mean and each identity
            is recorded.
        out: the cache folder. An interrupted build there is resumed; a
            cache with another identity (teachers, settings, audio list) is
            refused, never mixed.
        max_seconds, overlap_seconds: longer files are cut into overlapping
            segments of ``max_seconds`` (see `microser.audio.segment_bounds`).
        split_seed: seed of the train/valid/test assignment (by speaker when
            at least 3 speakers are known, else by source file; a CSV
            ``split`` value wins).
        target_range, rescale_from: the scale of the targets; CSV labels on
            the scale ``rescale_from`` are mapped linearly onto it.
        embeddings: also store the teachers' embeddings (hf, or onnx with a
            hidden-state output), concatenated across teachers.
        teacher_batch_size: segments per teacher call and per journal entry.
        progress: called as ``progress(done, total, audio_seconds)`` at the
            start and after each batch (counts include resumed items).

    Returns:
        A `BuildReport`. Unusable audio files are skipped and listed in
        ``skipped.csv``; bad lists, teachers or settings raise MicroserError.
    """
    t0 = time.perf_counter()
    out = checks.out_folder("--out", out)
    checks.number("--teacher-batch-size", teacher_batch_size, low=1, integer=True, example=8)
    if not teachers:
        raise MicroserError("no teacher given: pass --teacher SPEC (csv:FILE, hf:NAME_OR_PATH, onnx:FILE or demo)")
    checks.number("--max-seconds", max_seconds, low=0, low_open=True, example=8)
    if max_seconds < MIN_SECONDS:
        raise MicroserError(f"--max-seconds {max_seconds:g} is shorter than {MIN_SECONDS:g} s, the shortest input a "
                            f"microser model takes: pass --max-seconds {MIN_SECONDS:g} or more, e.g. 8")
    checks.number("--overlap-seconds", overlap_seconds, low=0, example=1)
    segment_bounds(1, max_seconds, overlap_seconds)  # validates the two settings
    checks.seed("--split-seed", split_seed)
    for option, pair in (("--target-range", target_range), ("--rescale-from", rescale_from or (0.0, 1.0))):
        for x in pair:
            checks.number(option, x, example="0,1")
    lo, hi = float(target_range[0]), float(target_range[1])
    if not lo < hi:
        raise MicroserError(f"target range {lo:g},{hi:g} must have LO < HI: pass e.g. --target-range 0,1")

    sources, root = list_sources(audio, allow_absolute_paths=allow_absolute_paths)
    models = [make_teacher(s, audio=audio, device=device, target_range=(lo, hi), rescale_from=rescale_from,
                           allow_absolute_paths=allow_absolute_paths) for s in teachers]
    sources = _fill_speakers(sources, models)
    same = same_files(sources)
    for m in models:  # a second path to a file is skipped, so the teacher need not know it
        m.check([s.path for i, s in enumerate(sources) if i not in same])
    splits, split_by = _assign_splits(sources, split_seed, same)
    settings = {"max_seconds": float(max_seconds), "overlap_seconds": float(overlap_seconds),
                "split_seed": int(split_seed), "target_range": [lo, hi],
                "rescale_from": None if rescale_from is None else [float(x) for x in rescale_from],
                "embeddings": bool(embeddings)}
    listing = hashlib.sha256(json.dumps([[s.key, s.speaker, sp] for s, sp in zip(sources, splits)]).encode())
    identity = {"teachers": [m.identity() for m in models], "settings": settings,
                "audio_listing_sha256": listing.hexdigest()}

    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        done = _existing_build(out, identity, teachers)
        if done is not None:
            meta = done
            return BuildReport(out, meta["n_items"], meta["n_sources"], meta["n_skipped"], meta["audio_seconds"],
                               0.0, time.perf_counter() - t0, 0, meta["fingerprint"], meta.get("n_notes", 0))
        state = _start_or_resume(out, identity, teachers)
        writer = _Writer(out)
        resumed = len(writer.items)
        try:
            run_seconds = _run(sources, splits, models, writer, settings, teacher_batch_size, progress, same)
        finally:
            writer.close()
        meta = _finalise(out, writer, state, identity, teachers, split_by)
    return BuildReport(out, meta["n_items"], meta["n_sources"], meta["n_skipped"], meta["audio_seconds"],
                       run_seconds, time.perf_counter() - t0, resumed, meta["fingerprint"], meta["n_notes"])


def _fill_speakers(sources: list[Source], models) -> list[Source]:
    """Take a speaker from a csv teacher's speaker column where the audio list has none."""
    known = {}
    for m in models:
        for k, v in getattr(m, "speakers", {}).items():
            known.setdefault(k, v)
    if not known:
        return sources
    return [s if s.speaker else Source(s.path, s.key, known.get(match_key(s.path)), s.split) for s in sources]


def same_files(sources: list[Source]) -> dict[int, int]:
    """``{i: j}`` for every source ``i`` that is the same file as an earlier source ``j`` (a symbolic or hard
    link, or another path to it: same device and inode). Such a copy is skipped, never split on its own."""
    first: dict[tuple[int, int], int] = {}
    same = {}
    for i, s in enumerate(sources):
        try:
            st = os.stat(s.path)
        except OSError:
            continue  # unreadable: the build skips it with its reason
        key = (st.st_dev, st.st_ino)
        if key in first:
            same[i] = first[key]
        else:
            first[key] = i
    return same


def _assign_splits(sources: list[Source], seed: int, same: dict[int, int] | None = None) -> tuple[list[str], str]:
    """train/valid/test per source: by speaker when >= 3 speakers are known, else by file; a given split wins.

    Groups (speakers, or files) are shuffled with ``seed``; about 10 % go to
    valid and 10 % to test, at least one each when there are >= 3 groups
    (with 2: one train, one valid; with 1: train). A source in ``same`` (see
    `same_files`) takes the split of the file it repeats and forms no group.
    """
    same = same or {}
    own = [s for i, s in enumerate(sources) if i not in same]
    speakers = sorted({s.speaker for s in own if s.speaker and s.split is None})
    by_speaker = len(speakers) >= 3
    groups = sorted({_group(s, by_speaker) for s in own if s.split is None})
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    n = len(order)
    n_held = max(1, round(0.1 * n)) if n >= 3 else 0
    n_valid = n_held if n >= 3 else (1 if n == 2 else 0)
    assign = {g: "valid" for g in order[:n_valid]}
    assign.update({g: "test" for g in order[n_valid : n_valid + n_held]})
    splits = [s.split or assign.get(_group(s, by_speaker), "train") for s in sources]
    for i, j in same.items():
        splits[i] = splits[j]
    given = any(s.split for s in own)
    split_by = ("csv+" if given else "") + ("speaker" if by_speaker else "source")
    return splits, split_by


def _group(s: Source, by_speaker: bool) -> str:
    return f"speaker:{s.speaker}" if by_speaker and s.speaker else f"file:{s.key}"


class _locked:
    """An exclusive lock on ``out/.lock`` for the duration of a build (two builds never write one folder)."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise MicroserError(f"another `microser cache build` is writing {self.path.parent}: wait for it, "
                                "or pass another --out") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
        self.path.unlink(missing_ok=True)


def _describe(identity: dict, specs) -> str:
    """A short human description of a build identity for refusal messages."""
    t = ", ".join(f"{d.get('kind')}:{d.get('file') or d.get('name') or ''}"
                  f"@{(d.get('sha256') or d.get('weights_sha256') or '')[:8]}" for d in identity.get("teachers", []))
    s = identity.get("settings", {})
    return (f"teachers [{t}] max_seconds={s.get('max_seconds')} overlap={s.get('overlap_seconds')} "
            f"split_seed={s.get('split_seed')} target_range={s.get('target_range')} "
            f"rescale_from={s.get('rescale_from')} embeddings={s.get('embeddings')} "
            f"audio list {identity.get('audio_listing_sha256', '')[:8]}")


def _refuse_mix(out: Path, old: dict, new: dict, specs) -> MicroserError:
    return MicroserError(f"{out} holds a cache of {_describe(old, specs)} but this build is {_describe(new, specs)}; "
                         f"they are never mixed: pass another --out, or delete {out} to rebuild")


def _existing_build(out: Path, identity: dict, specs) -> dict | None:
    """The meta of a complete cache with this identity (nothing to do), None to build; refuses a different one."""
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise MicroserError(f"{meta_path} is not valid JSON: delete {out} and build again") from None
        old = meta.get("identity", {})
        if old != identity:
            raise _refuse_mix(out, old, identity, specs)
        if meta.get("complete") is True:
            for name in (*_PARTS, "journal.jsonl", "build.json"):  # left if killed right after finalising
                (out / name).unlink(missing_ok=True)
            return meta
    elif not (out / "build.json").is_file():
        other = [p.name for p in out.iterdir() if p.name != ".lock"]
        if other:
            raise MicroserError(f"--out {out} exists and is not a microser cache (holds {', '.join(sorted(other)[:3])}"
                                f"{'...' if len(other) > 3 else ''}): pass a new or empty folder")
    return None


def _start_or_resume(out: Path, identity: dict, specs) -> dict:
    state_path = out / "build.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("identity") != identity:
            raise _refuse_mix(out, state.get("identity", {}), identity, specs)
        if not (out / _PARTS[0]).exists() and (out / "audio.i16").is_file():
            os.replace(out / "audio.i16", out / _PARTS[0])  # killed while finalising: undo the rename
        return state
    state = {"identity": identity, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(state_path, json.dumps(state, indent=1))
    for name in (*_PARTS, "journal.jsonl"):
        (out / name).unlink(missing_ok=True)
    return state


class _Writer:
    """Append-only data files plus a journal; on open, replays the journal and truncates torn writes."""

    def __init__(self, out: Path):
        self.out = out
        self.items: list[dict] = []
        self.skipped: dict[int, tuple[str, str]] = {}  # source index -> (key, reason)
        self.notes: dict[int, tuple[str, str]] = {}  # source index -> (key, what was changed on the way in)
        self.ends = {"audio": 0, "targets": 0, "embeddings": 0}  # bytes
        self.emb_dim: int | None = None
        journal = out / "journal.jsonl"
        if journal.is_file():
            raw = journal.read_bytes()
            good = 0
            for line in raw.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # torn last line: ignored, truncated below
                try:
                    entry = json.loads(line)
                except ValueError:
                    break
                good += len(line)
                if "skip" in entry:
                    self.skipped[entry["source"]] = (entry["key"], entry["skip"])
                elif "note" in entry:
                    self.notes[entry["source"]] = (entry["key"], entry["note"])
                else:
                    self.items.extend(entry["items"])
                    self.ends = entry["ends"]
                    self.emb_dim = entry.get("emb_dim")
            if good != len(raw):
                with open(journal, "r+b") as f:
                    f.truncate(good)
        self.files = {}
        for name, part in zip(("audio", "targets", "embeddings"), _PARTS):
            f = open(out / part, "a+b")
            f.truncate(self.ends[name])  # drop bytes written after the last journal line
            f.seek(0, os.SEEK_END)
            self.files[name] = f
        self.journal = open(journal, "ab")

    def position(self) -> tuple[int, int]:
        """(source index, segment index) of the next segment to process."""
        if not self.items:
            return 0, 0
        last = self.items[-1]
        return last["_source"], last["segment"] + 1

    def commit(self, items: list[dict], audio: list[np.ndarray], targets: np.ndarray, emb: np.ndarray | None):
        for x in audio:
            self.files["audio"].write(x.tobytes())
        self.files["targets"].write(np.ascontiguousarray(targets, dtype="<f4").tobytes())
        if emb is not None:
            self.files["embeddings"].write(np.ascontiguousarray(emb, dtype="<f4").tobytes())
            self.emb_dim = int(emb.shape[1])
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        self.ends = {k: f.tell() for k, f in self.files.items()}
        self._append({"items": items, "ends": self.ends, "emb_dim": self.emb_dim})
        self.items.extend(items)

    def skip(self, source: int, key: str, reason: str) -> None:
        if source not in self.skipped:
            self._append({"source": source, "key": key, "skip": reason})
            self.skipped[source] = (key, reason)

    def note(self, source: int, key: str, note: str) -> None:
        if source not in self.notes:
            self._append({"source": source, "key": key, "note": note})
            self.notes[source] = (key, note)

    def _append(self, entry: dict) -> None:
        self.journal.write((json.dumps(entry) + "\n").encode())
        self.journal.flush()
        os.fsync(self.journal.fileno())

    def close(self) -> None:
        for f in (*self.files.values(), self.journal):
            f.close()


def _run(sources, splits, models, writer: _Writer, settings: dict, batch_size: int, progress,
         same: dict[int, int]) -> float:
    """Process every segment after the journal's position; returns the audio seconds processed in this call."""
    max_s, ov_s = settings["max_seconds"], settings["overlap_seconds"]
    infos, bounds, total = {}, {}, 0
    for i, s in enumerate(sources):  # headers only: cheap; unreadable/empty files are skipped here
        if i in same:
            writer.skip(i, s.key, f"same file as {sources[same[i]].key} (a link or another path to it): cached "
                                  "once, so one recording never lands in two splits")
        if i in writer.skipped:
            continue
        try:
            infos[i] = audio_info(s.path)
        except MicroserError as e:
            writer.skip(i, s.key, _reason(e, s.path))
            continue
        bounds[i] = segment_bounds(infos[i].n_samples, max_s, ov_s)
        total += len(bounds[i])
    done_seconds = sum(it["length"] for it in writer.items) / SAMPLE_RATE
    run_seconds = 0.0
    if progress:
        progress(len(writer.items), total, done_seconds)
    src0, seg0 = writer.position()
    pending: list[tuple[dict, np.ndarray, Segment]] = []

    def flush():
        nonlocal done_seconds, run_seconds
        if not pending:
            return
        segs = [p[2] for p in pending]
        outs = [m.predict(segs, embeddings=settings["embeddings"]) for m in models]
        targets = np.mean([o[0] for o in outs], axis=0).astype(np.float32)  # (B, 3)
        if not np.isfinite(targets).all():
            bad = sorted({p[0]["source"] for p, ok in zip(pending, np.isfinite(targets).all(1)) if not ok})
            raise MicroserError(f"teacher output is NaN/Inf for {listed(bad)}: check the teacher model")
        emb = None
        if settings["embeddings"]:
            parts = [o[1] for o in outs if o[1] is not None]
            if not parts:
                raise MicroserError("--embeddings needs a teacher with embeddings (hf:..., or onnx:... with a "
                                    "hidden_states output); these teachers give none: drop --embeddings")
            emb = np.concatenate(parts, axis=1).astype(np.float32)
        writer.commit([p[0] for p in pending], [p[1] for p in pending], targets, emb)
        seconds = sum(len(p[1]) for p in pending) / SAMPLE_RATE
        done_seconds += seconds
        run_seconds += seconds
        pending.clear()
        if progress:
            progress(len(writer.items), total, done_seconds)

    for i in range(src0, len(sources)):
        if i not in bounds:
            continue
        s, info = sources[i], infos[i]
        first = seg0 if i == src0 else 0
        if first >= len(bounds[i]):
            continue
        try:
            if info.seconds <= _WHOLE_FILE_SECONDS:
                whole = load_audio(s.path)
                peak = float(np.abs(whole).max())
            else:
                whole, (_, peak) = None, scan_audio(s.path)
            if info.n_samples < MIN_SEGMENT_SAMPLES:
                n = info.n_samples
                raise MicroserError(f"{s.path}: audio is {n} sample{'s' * (n != 1)} at 16 kHz "
                                    f"({n / SAMPLE_RATE:.3g} s); expected at least "
                                    f"{MIN_SEGMENT_SAMPLES} ({MIN_SECONDS:g} s, the shortest input a microser model "
                                    "takes): remove the file or join it with its neighbours")
            digest = sha256_file(s.path)
        except MicroserError as e:
            flush()  # earlier sources first, so the journal stays in order
            writer.skip(i, s.key, _reason(e, s.path))
            total -= len(bounds[i])
            continue
        gain = 1.0
        if peak > 1.0:  # float audio beyond full scale: scale the whole file down rather than clip it in int16
            gain = 1.0 / peak
            flush()
            writer.note(i, s.key, f"float samples beyond full scale (peak {peak:.3g}, would clip in 16-bit): "
                                  f"peak-normalised, gain {20 * math.log10(gain):.1f} dB")
        for j in range(first, len(bounds[i])):
            a, b = bounds[i][j]
            x = to_int16(gain * (whole[a:b] if whole is not None else read_segment(info, a, b)))
            item = {"_source": i, "source": s.key, "segment": j, "offset": 0, "length": b - a,
                    "start_s": round(a / SAMPLE_RATE, 6), "end_s": round(b / SAMPLE_RATE, 6),
                    "speaker": s.speaker, "split": splits[i], "source_sha256": digest}
            pending.append((item, x, Segment(from_int16(x), s.path, a / SAMPLE_RATE, b / SAMPLE_RATE)))
            if len(pending) >= batch_size:
                flush()
    flush()
    return run_seconds


def _reason(e: MicroserError, path: Path) -> str:
    """The skip reason: the error message without the leading file name."""
    text = str(e)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _finalise(out: Path, writer: _Writer, state: dict, identity: dict, specs, split_by: str) -> dict:
    """Turn the journal and parts into the final files; meta.json (complete) last, then drop the build files."""
    if not writer.items:
        _write_skipped(out / "skipped.csv", writer.skipped)
        raise MicroserError(f"no usable audio: all {len(writer.skipped)} file(s) were skipped (reasons in "
                            f"{out / 'skipped.csv'}): fix the audio, then build again")
    items, offset = [], 0
    notes = {i: n for i, n in writer.notes.items() if i not in writer.skipped}
    for k, it in enumerate(writer.items):
        row = {c: it[c] for c in ITEM_COLUMNS if c in it}
        row.update(index=k, offset=offset)
        offset += it["length"]
        items.append(row)
    n = len(items)
    targets = np.fromfile(out / _PARTS[1], dtype="<f4").reshape(n, len(TARGETS)).astype(np.float32)
    np.save(out / "targets.npy", targets)
    emb_dim = writer.emb_dim if identity["settings"]["embeddings"] else None
    if emb_dim:
        np.save(out / "embeddings.npy", np.fromfile(out / _PARTS[2], dtype="<f4").reshape(n, emb_dim))
    _write_items(out / "items.csv", items)
    _write_skipped(out / "skipped.csv", writer.skipped)
    _write_skipped(out / "notes.csv", notes, header=("path", "note"))
    os.replace(out / _PARTS[0], out / "audio.i16")
    names = ["audio.i16", "targets.npy", "items.csv", "skipped.csv", "notes.csv"] + (["embeddings.npy"] if emb_dim
                                                                                     else [])
    s = identity["settings"]
    meta = {
        "format": FORMAT, "version": VERSION, "complete": True,
        "sample_rate": SAMPLE_RATE, "targets": list(TARGETS),
        "teachers": identity["teachers"], "teacher_specs": list(specs),
        "created_at": state["created_at"], "microser_version": microser.__version__,
        "split_seed": s["split_seed"], "split_by": split_by,
        "max_seconds": s["max_seconds"], "overlap_seconds": s["overlap_seconds"],
        "target_range": s["target_range"], "rescale_from": s["rescale_from"],
        "n_items": n, "n_sources": len({it["source"] for it in items}), "n_skipped": len(writer.skipped),
        "n_notes": len(notes),
        "audio_seconds": offset / SAMPLE_RATE, "embedding_dim": emb_dim,
        "identity": identity,
        "checksums": {name: sha256_file(out / name) for name in names},
    }
    meta["fingerprint"] = items_fingerprint(meta, items)
    _write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    for name in (*_PARTS, "journal.jsonl", "build.json"):
        (out / name).unlink(missing_ok=True)
    return meta


def _write_skipped(path: Path, skipped: dict[int, tuple[str, str]], header=("path", "reason")) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in sorted(skipped):
            w.writerow(skipped[i])


def _write_items(path: Path, items: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ITEM_COLUMNS)
        for it in items:
            w.writerow(["" if it[c] is None else it[c] for c in ITEM_COLUMNS])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
