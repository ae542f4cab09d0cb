"""The teacher cache: audio segments plus the teacher's A/D/V outputs for exactly that audio; build, read, verify.

A cache is a folder readable with numpy + json/csv alone::

    meta.json        format, version, teachers' identities, settings, counts, checksums, "complete": true
    items.csv        index,source,segment,offset,length,start_s,end_s,speaker,split,source_sha256
    audio.i16        every segment's 16 kHz int16 samples, concatenated (np.memmap; item i at [offset, offset+length))
    targets.npy      float32 (N, 3) in TARGETS order
    embeddings.npy   optional float32 (N, D)
    skipped.csv      path,reason: files not cached (unreadable, empty, NaN, silent, shorter than MIN_SECONDS, a
                     second path to a file already listed)
    notes.csv        path,note: files cached with a change on the way in (float audio beyond full scale is
                     peak-normalised instead of clipped); absent in caches of older versions

Building one is ``microser.cache_build.build_cache``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from microser import MIN_SECONDS, SAMPLE_RATE, TARGETS, checks
from microser.audio import AUDIO_EXTENSIONS, from_int16
from microser.errors import MicroserError, one_line
from microser.teachers import listed, resolve_listed_path, sha256_file
from microser.train_config import MIN_SPLIT_SEGMENTS

FORMAT = "microser-cache"
VERSION = 1
SPLITS = ("train", "valid", "test")
ITEM_COLUMNS = ("index", "source", "segment", "offset", "length", "start_s", "end_s", "speaker", "split",
                "source_sha256")
# The shortest segment a cache holds: the shortest input every microser model accepts (microser.MIN_SECONDS,
# 0.25 s, above the largest STFT window any spec may have), so a cache serves every search space.
MIN_SEGMENT_SAMPLES = math.ceil(MIN_SECONDS * SAMPLE_RATE)


@dataclass(frozen=True)
class Source:
    """One audio file to read: what `list_sources` finds in a folder or an audio CSV."""

    path: Path  # the file
    key: str  # as written in items.csv: relative to the audio root (posix), or absolute when allowed
    speaker: str | None
    split: str | None  # from the audio CSV's split column


# ---------------------------------------------------------------------------------------------- reading


class Cache:
    """Read access to a complete cache (see the module docstring for the layout).

    >>> cache = Cache.open("cache_dir")                  # doctest: +SKIP
    >>> x, y = cache.audio(0), cache.targets[0]         # doctest: +SKIP
    """

    def __init__(self, path: Path, meta: dict, items: list[dict], targets: np.ndarray):
        self.path = path
        self.meta = meta
        self.items = items
        self.targets = targets
        self._audio: np.memmap | None = None
        self._embeddings = None

    @classmethod
    def open(cls, path) -> "Cache":
        """Open a cache folder; MicroserError (one line) when it is missing, incomplete, another version or truncated."""
        path = Path(path)
        fix = f"run `microser cache verify {path}` or rebuild it with `microser cache build`"
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            if (path / "build.json").is_file():
                raise MicroserError(f"cache {path} is an interrupted build (no meta.json yet): "
                                    "run the same `microser cache build` command again to finish it")
            raise MicroserError(f"{path} is not a microser cache (no meta.json): build one with "
                                "`microser cache build --audio ... --teacher ... --out DIR` or `microser demo`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise MicroserError(f"{meta_path} is not valid JSON ({e}): {fix}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise MicroserError(f"{meta_path} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                                f"expected {FORMAT!r} version {VERSION}: rebuild the cache with this microser")
        if meta.get("complete") is not True:
            raise MicroserError(f"cache {path} is incomplete (meta.json complete={meta.get('complete')}): "
                                "run the same `microser cache build` command again to finish it")
        try:
            items = read_items(path / "items.csv")
            targets = np.load(path / "targets.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError) as e:
            raise MicroserError(f"cache {path}: cannot read items.csv/targets.npy ({one_line(e)}): {fix}") from None
        n = int(meta.get("n_items", -1))
        if len(items) != n or targets.shape != (n, len(TARGETS)) or targets.dtype != np.float32:
            raise MicroserError(f"cache {path}: items.csv has {len(items)} rows and targets.npy shape "
                                f"{targets.shape} {targets.dtype}; expected {n} and ({n}, 3) float32: {fix}")
        audio = path / "audio.i16"
        want = 2 * (items[-1]["offset"] + items[-1]["length"]) if items else 0
        have = audio.stat().st_size if audio.is_file() else -1
        if have != want:
            raise MicroserError(f"cache file {audio} has {have} bytes; expected {want} (truncated or corrupt): {fix}")
        return cls(path, meta, items, targets)

    def __len__(self) -> int:
        return len(self.items)

    def audio(self, i: int) -> np.ndarray:
        """Item ``i``'s samples: float32 in [-1, 1), 16 kHz, a fresh array (memory-mapped read)."""
        it = self.items[i]
        return from_int16(self._samples()[it["offset"] : it["offset"] + it["length"]])

    def _samples(self) -> np.memmap:
        if self._audio is None:
            self._audio = np.memmap(self.path / "audio.i16", dtype=np.int16, mode="r")
        return self._audio

    def crop(self, i: int, start: int, length: int) -> np.ndarray:
        """Samples ``start:start+length`` of item ``i`` (float32, only that slice is read from disk)."""
        it = self.items[i]
        start = max(0, min(int(start), it["length"]))
        stop = min(start + int(length), it["length"])
        return from_int16(self._samples()[it["offset"] + start : it["offset"] + stop])

    def lengths(self, indices) -> np.ndarray:
        """Samples of each item in ``indices`` (from items.csv; no audio is read)."""
        return np.array([self.items[int(i)]["length"] for i in indices], dtype=np.int64)

    def speakers_of(self, indices) -> list[str]:
        """Speaker of each item in ``indices`` ("" where the audio named none)."""
        return [self.items[int(i)]["speaker"] for i in indices]

    @property
    def embeddings(self) -> np.ndarray | None:
        """float32 ``(N, D)`` (memory-mapped) when the cache was built with ``embeddings=True``, else None."""
        if self._embeddings is None and (self.path / "embeddings.npy").is_file():
            self._embeddings = np.load(self.path / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        return self._embeddings

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the items in ``split`` ("train", "valid" or "test"), ascending, int64."""
        if split not in SPLITS:
            raise MicroserError(f"split {split!r} is not one of {', '.join(SPLITS)}: pass one of those")
        return np.array([it["index"] for it in self.items if it["split"] == split], dtype=np.int64)

    @property
    def speakers(self) -> list[str]:
        """Distinct known speakers, sorted (empty when the audio named none)."""
        return sorted({it["speaker"] for it in self.items if it["speaker"]})

    @property
    def fingerprint(self) -> str:
        """Stable hash of the teachers' identities, the build settings and the items table (not created_at)."""
        return items_fingerprint(self.meta, self.items)

    def verify(self) -> list[str]:
        """Integrity problems, empty when none: sizes, checksums, shapes, NaN/Inf, item layout, fingerprint."""
        problems = []
        n = len(self.items)
        expected_offset = 0
        for it in self.items:
            if it["offset"] != expected_offset or it["length"] <= 0:
                problems.append(f"items.csv row {it['index']}: offset {it['offset']} length {it['length']}; "
                                f"expected offset {expected_offset} and length > 0")
                break
            expected_offset += it["length"]
            if it["split"] not in SPLITS:
                problems.append(f"items.csv row {it['index']}: split {it['split']!r} is not one of {SPLITS}")
                break
        if [it["index"] for it in self.items] != list(range(n)):
            problems.append("items.csv: index column is not 0..N-1")
        if not np.isfinite(self.targets).all():
            problems.append(f"targets.npy: {int((~np.isfinite(self.targets)).sum())} NaN/Inf values")
        for name, digest in self.meta.get("checksums", {}).items():
            f = self.path / name
            if not f.is_file():
                problems.append(f"{f}: missing")
            elif sha256_file(f) != digest:
                problems.append(f"{f}: sha256 differs from meta.json (file changed or corrupt)")
        emb_dim = self.meta.get("embedding_dim")
        if emb_dim:
            e = self.embeddings
            if e is None or e.shape != (n, emb_dim):
                problems.append(f"embeddings.npy: shape {None if e is None else e.shape}; expected ({n}, {emb_dim})")
            elif not np.isfinite(np.asarray(e)).all():
                problems.append("embeddings.npy: NaN/Inf values")
        if self.meta.get("fingerprint") != self.fingerprint:
            problems.append("meta.json fingerprint does not match teachers + items (items.csv or meta.json edited)")
        if not (self.path / "skipped.csv").is_file():
            problems.append(f"{self.path / 'skipped.csv'}: missing")
        return problems


def verify_cache(path) -> list[str]:
    """Problems of the cache at ``path`` (the open error itself when it does not open); empty when sound."""
    try:
        cache = Cache.open(path)
    except MicroserError as e:
        return [str(e)]
    return cache.verify()


def require_trainable(data) -> None:
    """Refuse, before any study is opened or any trial trained, data a search cannot train on (one line).

    For a `Cache`: what `microser cache verify` finds (`Cache.verify`: sizes, checksums of every file, item
    layout, fingerprint, NaN/Inf targets), and segments shorter than `MIN_SEGMENT_SAMPLES` (caches of older
    versions kept them). For any data with splits: fewer than ``train_config.MIN_SPLIT_SEGMENTS`` segments in the
    train or the valid split.
    """
    where = f"cache {data.path}" if isinstance(data, Cache) else "the training data"
    if isinstance(data, Cache):
        problems = data.verify()
        if problems:
            raise MicroserError(f"cache {data.path} fails `microser cache verify` ({listed(problems)}): rebuild it "
                                "with `microser cache build` (a new --out), then search again")
        short = [it for it in data.items if it["length"] < MIN_SEGMENT_SAMPLES]
        if short:
            it = short[0]
            raise MicroserError(f"cache {data.path}: {len(short)} segment(s) shorter than {MIN_SECONDS:g} s, the "
                                f"shortest input a microser model takes (first: item {it['index']}, {it['source']}, "
                                f"{it['length']} samples): rebuild the cache with this microser, which skips them")
    if not hasattr(data, "split_indices"):
        return
    for split in ("train", "valid"):
        n = len(data.split_indices(split))
        if n < MIN_SPLIT_SEGMENTS:
            raise MicroserError(f"{where}: the {split} split has {n} segment(s); training needs at least "
                                f"{MIN_SPLIT_SEGMENTS} in train and in valid: add audio (or speakers), or give "
                                "the audio CSV's split column train and valid rows, and build the cache again")


def cache_info(path) -> dict:
    """Summary of a cache: items, hours, speakers, items and speakers per split, target statistics, teachers."""
    cache = Cache.open(path)
    meta, items, t = cache.meta, cache.items, cache.targets.astype(np.float64)
    per_split = {s: [it for it in items if it["split"] == s] for s in SPLITS}
    stats = {}
    for j, name in enumerate(TARGETS):
        col = t[:, j] if len(t) else np.zeros(0)
        stats[name] = {k: (float(f(col)) if len(col) else None)
                       for k, f in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}
    return {
        "path": str(cache.path),
        "items": len(items),
        "sources": len({it["source"] for it in items}),
        "hours": sum(it["length"] for it in items) / SAMPLE_RATE / 3600.0,
        "speakers": len(cache.speakers),
        "split_by": meta.get("split_by"),
        "split_seed": meta.get("split_seed"),
        "items_per_split": {s: len(v) for s, v in per_split.items()},
        "speakers_per_split": {s: len({it["speaker"] for it in v if it["speaker"]}) for s, v in per_split.items()},
        "targets": stats,
        "teachers": meta.get("teachers", []),
        "teacher_specs": meta.get("teacher_specs", []),
        "skipped": int(meta.get("n_skipped", 0)),
        "notes": int(meta.get("n_notes", 0)),
        "max_seconds": meta.get("max_seconds"),
        "overlap_seconds": meta.get("overlap_seconds"),
        "target_range": meta.get("target_range"),
        "embedding_dim": meta.get("embedding_dim"),
        "created_at": meta.get("created_at"),
        "fingerprint": cache.fingerprint,
    }


def list_sources(audio, *, allow_absolute_paths: bool = False) -> tuple[list[Source], Path]:
    """The audio files in a folder (recursive, sorted) or listed in a CSV (its row order), and their root.

    A CSV needs a ``path`` column (relative to the CSV's folder unless
    ``allow_absolute_paths``) and may give ``speaker`` and ``split``; every
    listed file must exist and appear once.
    """
    audio = Path(audio)
    if audio.is_dir():
        files = sorted((p for p in audio.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS),
                       key=lambda p: p.relative_to(audio).as_posix())
        if not files:
            raise MicroserError(f"audio folder {audio} holds no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))}): "
                                "pass a folder with audio or a CSV listing it")
        return [Source(p, p.relative_to(audio).as_posix(), None, None) for p in files], audio
    if audio.suffix.lower() != ".csv" or not audio.is_file():
        raise MicroserError(f"--audio {audio} is neither a folder nor a CSV file: pass a folder of audio files or "
                            "a CSV with a path column")
    base = audio.parent
    reader = csv.DictReader(io.StringIO(checks.read_text(audio, "audio CSV"), newline=""))
    cols = reader.fieldnames or []
    if "path" not in cols:
        raise MicroserError(f"audio CSV {audio} has no 'path' column (has: {', '.join(cols) or 'none'}); "
                            "expected path[,speaker][,split]: rename the column holding file paths")
    rows = list(enumerate(reader, start=2))
    problems, sources, seen = [], [], set()
    for line, row in rows:
        text = (row.get("path") or "").strip()
        if not text:
            problems.append(f"line {line}: empty path")
            continue
        p = resolve_listed_path(base, text, where=f"{audio} line {line}", allow_absolute_paths=allow_absolute_paths)
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            problems.append(f"line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        try:
            exists = p.is_file()
        except OSError as e:  # a name too long for the file system, ...
            exists = False
            text = f"{text[:40]}{'...' if len(text) > 40 else ''} ({e.strerror})"
        if not exists:
            problems.append(f"line {line}: {text} does not exist")
        key = p.relative_to(os.path.normpath(base)).as_posix() if p.is_relative_to(os.path.normpath(base)) else str(p)
        if key in seen:
            problems.append(f"line {line}: {text} is listed twice")
        seen.add(key)
        sources.append(Source(p, key, (row.get("speaker") or "").strip() or None, split))
    if problems:
        raise MicroserError(f"audio CSV {audio}: {len(problems)} problem(s): {listed(problems)}; "
                            "fix or remove those rows")
    if not sources:
        raise MicroserError(f"audio CSV {audio} lists no files: add rows path[,speaker]")
    return sources, base


def items_fingerprint(meta: dict, items: list[dict]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"teachers": meta.get("teachers"), "settings": meta.get("identity", {}).get("settings")},
                        sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it[c] for c in ITEM_COLUMNS]).encode())
    return h.hexdigest()


def read_items(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"index": int(r["index"]), "source": r["source"], "segment": int(r["segment"]),
             "offset": int(r["offset"]), "length": int(r["length"]), "start_s": float(r["start_s"]),
             "end_s": float(r["end_s"]), "speaker": r["speaker"] or None, "split": r["split"],
             "source_sha256": r["source_sha256"]} for r in rows]
