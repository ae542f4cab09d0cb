"""Checks of what a user passes in, run when a command starts: numbers, seeds, output paths and text encodings.

Every check raises a one-line `MicroserError` naming the option or file, the
rule and the fix, before any expensive work starts. The library calls them
at its entry points (``build_cache``, ``export_trial``, ``predict_files``,
``SearchConfig``), so a config file or a Python caller gets the same message
as the command line.

Text files (the audio and teacher CSVs, search spaces, study configs) are
decoded by their byte-order mark: UTF-8 (with or without a BOM), UTF-16 LE/BE
or UTF-32 LE/BE with a BOM. Anything else that is not valid UTF-8 (Latin-1,
Windows-1252, ...) is refused: no byte sequence is invalid Latin-1, so a guess
could silently turn ``é`` into ``Ã©`` in a path or a speaker name; the message
says how to re-save the file as UTF-8.
"""

from __future__ import annotations

import codecs
import math
import os
import tempfile
from pathlib import Path

from microser.errors import MicroserError, one_line

SEED_MAX = 2**32 - 1  # seeds feed numpy's SeedSequence and torch.manual_seed; both take 0 .. 2**32 - 1
# --input-seconds: measuring costs runs the model once on this much audio (MACs in PyTorch, shapes in ONNX);
# RAM and MACs grow linearly with the length, so a minute says all that longer inputs would, without
# allocating gigabytes for them.
MAX_INPUT_SECONDS = 60.0


def number(option: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           integer: bool = False, example=None) -> float | int:
    """``value`` if it is a finite number (an int when ``integer``) within ``[low, high]`` (``(low, high]`` when
    ``low_open``); else MicroserError naming ``option``, the rule and an example."""
    kind = "a whole number" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {_fmt(low)}")
    if high is not None:
        bounds.append(f"<= {_fmt(high)}")
    rule = kind + (" " + " and ".join(bounds) if bounds else "")
    fix = f": pass e.g. {option} {example}" if example is not None else ""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise MicroserError(f"{option} {value!r} is not {kind}; expected {rule}{fix}")
    if not math.isfinite(value):
        raise MicroserError(f"{option} {value!r} is not finite; expected {rule}{fix}")
    if low is not None and (value <= low if low_open else value < low):
        raise MicroserError(f"{option} {_fmt(value)} is out of range; expected {rule}{fix}")
    if high is not None and value > high:
        raise MicroserError(f"{option} {_fmt(value)} is out of range; expected {rule}{fix}")
    return value


def _fmt(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def seed(option: str, value) -> int:
    """A seed: a whole number in 0 .. 2**32 - 1."""
    return number(option, value, low=0, high=SEED_MAX, integer=True, example=0)


def _probe(option: str, path: Path, folder: Path, what: str) -> None:
    """Whether ``folder`` (``path`` itself, or the folder of the file ``path``) can be written: a temporary folder
    is made and removed in its nearest existing ancestor (permission bits say yes where /proc or a read-only
    mount says no)."""
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise MicroserError(f"{option} {path}: {base} is a file, so {what} cannot be created there: pass a path "
                            "in a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".microser-probe-", dir=base))
    except OSError as e:
        raise MicroserError(f"{option} {path}: {base} is not writable ({e.strerror or one_line(e)}): pass a path "
                            "in a folder you can write to") from None


def out_folder(option: str, path) -> Path:
    """An output folder that is absent (it can then be created) or an existing, writable folder; not a file.
    Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MicroserError(f"{option} {path} is a file, expected a folder: pass a new folder name")
    _probe(option, path, path, "the folder")
    return path


def out_file(option: str, path) -> Path:
    """An output file: not a folder, in a folder that exists or can be created and is writable. Nothing is
    created."""
    path = Path(path)
    if path.is_dir():
        raise MicroserError(f"{option} {path} is a folder, expected a file name: pass e.g. {option} "
                            f"{path / 'out.csv'}")
    _probe(option, path, path.parent, "the file")
    return path


_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def read_text(path, what: str) -> str:
    """A text file decoded by its byte-order mark (UTF-8 without one), BOM removed, newlines as written.

    ``what`` names the file in messages (e.g. ``"teacher CSV"``). MicroserError when the file cannot be read,
    is not valid in its encoding, or holds NUL characters (UTF-16 without a BOM).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MicroserError(f"{what} {path} cannot be read ({one_line(e)}): check the path and its "
                            "permissions") from None
    encoding, body = "utf-8", raw
    for bom, name in _BOMS:
        if raw.startswith(bom):
            encoding, body = name, raw[len(bom):]
            break
    if encoding == "utf-8" and b"\x00" in body:
        raise MicroserError(f"{what} {path} holds NUL bytes (UTF-16 without a byte-order mark?): re-save it as "
                            "UTF-8")
    try:
        text = body.decode(encoding)
    except UnicodeDecodeError as e:
        line = body[: e.start].count(b"\n") + 1
        bad = body[e.start : e.start + 1].hex()
        raise MicroserError(f"{what} {path} is not {encoding.upper()} (byte 0x{bad} on line {line}; Latin-1 or "
                            "Windows-1252?): re-save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or "
                            f"`iconv -f latin1 -t utf-8 {path.name}`)") from None
    return text
