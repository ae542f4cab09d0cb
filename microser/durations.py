"""Wall-clock durations (``--time 10m``, ``90s``, ``1h30m``, ``600``): the one parser, and the one way to print them."""

from __future__ import annotations

import math
import re

from microser.errors import MicroserError

_UNITS = {"h": 3600.0, "min": 60.0, "m": 60.0, "sec": 1.0, "s": 1.0}
_ORDER = {"h": 0, "min": 1, "m": 1, "sec": 2, "s": 2}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|min|m|sec|s)")
EXAMPLES = "'10m', '90s', '1.5h', '1h30m' or '600' (seconds)"


def parse_duration(text: str | float | int, *, what: str = "duration") -> float:
    """Seconds in ``text``: a number of seconds, or parts ``NUMBER{h,m,s}`` in that order (``1h30m``).

    ``min`` and ``sec`` are accepted for ``m`` and ``s``; spaces are ignored.

    >>> parse_duration("10m"), parse_duration("1h30m"), parse_duration("45s"), parse_duration(90)
    (600.0, 5400.0, 45.0, 90.0)

    Raises:
        MicroserError: malformed, not finite, or not positive, naming ``what`` and the value.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(s)
        except ValueError:
            parts = _PART.findall(s)
            order = [_ORDER[u] for _, u in parts]
            if not parts or "".join(n + u for n, u in parts) != s or len(set(order)) != len(order) or \
                    order != sorted(order):
                raise MicroserError(f"{what} {text!r} is not understood: expected e.g. {EXAMPLES}") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise MicroserError(f"{what} {text!r} must be a positive, finite duration, e.g. {EXAMPLES}")
    return seconds


def format_duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above (``125.4`` -> ``2:05``)."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
