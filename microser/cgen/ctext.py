"""C text: float literals, const arrays, and the C template files of microser/cgen/templates/.

Fixed C lives in template files filled with `string.Template` (``${name}`` fields, ``$$`` for a dollar), so C
braces are written as they are; Python builds only the shape-dependent parts. Two kinds of field hold lines of C:
one on a line of its own takes lines without a final newline (`block` of another template, or lines joined by
newlines); one glued to the start of the next line (``${prescan}    while ...``) is optional and takes lines each
ending in a newline, or nothing.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from string import Template

import numpy as np

from microser.errors import MicroserError

TEMPLATES = Path(__file__).resolve().parent / "templates"


def c_float(x) -> str:
    """A C float literal that round-trips float32 exactly (``0.75f``, ``1.0f``, ``1e-10f``); MicroserError when not
    finite."""
    v = float(np.float32(x))
    if not math.isfinite(v):
        raise MicroserError(f"cannot write non-finite value {v} into C: expected finite weights and constants; "
                            "check the model")
    s = f"{v:.9g}"
    if not any(ch in s for ch in ".e"):
        s += ".0"
    return s + "f"


def c_array(ctype: str, name: str, values, per_line: int = 8) -> str:
    """``static const ctype name[n] = {...};`` of ``values`` (floats as `c_float`, else integers), ``per_line`` a
    line; an empty array is written as one 0 (C has no empty arrays)."""
    vals = np.asarray(values).reshape(-1)
    if ctype == "float":
        items = [c_float(v) for v in vals]
    else:
        items = [str(int(v)) for v in vals]
    if not items:
        items = ["0"]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return f"static const {ctype} {name}[{len(items)}] = " + "{\n    " + ",\n    ".join(lines) + "\n};\n"


@cache
def template(name: str) -> Template:
    """The C template ``templates/<name>``."""
    return Template((TEMPLATES / name).read_text())


def fill(name: str, **fields) -> str:
    """Template ``name`` with every field filled (KeyError naming a missing field): the file's text."""
    return template(name).substitute(**fields)


def block(name: str, **fields) -> str:
    """`fill` without the file's final newline: lines of C for a field that stands on a line of its own."""
    return fill(name, **fields).removesuffix("\n")
