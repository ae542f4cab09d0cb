"""Durations on the command line (``--time 15m``): the one parser, shared by every command that takes one."""

from __future__ import annotations

import re

from microser.errors import MicroserError

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|min|m|sec|s)")
DURATION_HELP = "NUMBER followed by s, m (min) or h, parts added (90s, 15m, 1.5h, 1h30m), or plain seconds"


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration: ``"15m"`` -> 900.0, ``"1h30m"`` -> 5400.0, ``"90s"``/``"90"``/``90`` -> 90.0.

    Units: ``s`` (``sec``), ``m`` (``min``), ``h``; several parts add up (``1h30m``, ``2m30s``); a bare
    number is seconds. The result must be > 0.

    >>> parse_duration("15m"), parse_duration("1h30m"), parse_duration("2.5s")
    (900.0, 5400.0, 2.5)
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        try:
            seconds = float(raw)
        except ValueError:
            compact = raw.replace(" ", "")
            parts = _PART.findall(compact)
            if not parts or "".join(n + u for n, u in parts) != compact:
                raise MicroserError(f"duration {str(text)!r} is not understood: expected {DURATION_HELP}") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0 or seconds == float("inf"):
        raise MicroserError(f"duration {str(text)!r} is not a positive time: expected {DURATION_HELP}")
    return seconds


def format_duration(seconds: float) -> str:
    """``"1h02m"``, ``"15m00s"``, ``"42s"``: a duration for messages, the inverse of ``parse_duration`` to the second."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
