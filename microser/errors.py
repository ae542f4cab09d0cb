"""The one exception type users see: a one-line message with the value, the rule and the fix."""


class MicroserError(ValueError):
    """A problem with the user's input or environment, explained in one line.

    The CLI prints ``error: <message>`` and exits with status 2, without a
    traceback. Messages name the offending file or value, what was expected
    and what to do, e.g.::

        MicroserError("budget '80x-params' is not understood: expected NUMBER[k|M]-params, "
                      "e.g. '80k-params'")
    """


def one_line(e: BaseException, limit: int = 160) -> str:
    """A foreign exception's text folded onto one line (white space collapsed, at most ``limit`` characters),
    for quoting inside a MicroserError message; the type's name when the text is empty."""
    return " ".join(str(e).split())[:limit] or type(e).__name__
