"""The int8 fixed-point contract of an int8 conv, in Python (the C side is templates/int8_support.c).

A conv accumulates ``sum w * (x - x_zp)`` in int32 from the int32 bias; the float32 scale ``x_scale * w_scale /
y_scale`` (onnxruntime's order) is held exactly as a 31-bit multiplier and a shift (`fixed_multiplier`), and the C
``requant()`` returns ``round(acc * scale)`` of the exact product, ties to even, plus the zero point, saturated to
int8, with no float (`requantize_reference` is the same in numpy). onnxruntime rounds the float32 product
``float(acc) * scale`` instead: the two differ by one step where that product falls on the other side of a .5
boundary (rare; bounded in tests).
"""

from __future__ import annotations

import math

import numpy as np

from microser.errors import MicroserError
from microser.cgen.plan import Plan, Stage


def conv_scales(plan: Plan, st: Stage) -> np.ndarray:
    """Per-output-channel float32 requantization scales of an int8 conv, in onnxruntime's order and precision:
    ``(x_scale * w_scale[c]) / y_scale``, each step rounded to float32 (as QLinearConv computes them)."""
    xs = np.float32(plan.tensors[st.src].quant[0])
    ys = np.float32(plan.tensors[st.dst].quant[0])
    return ((xs * st.w_scale.astype(np.float32)).astype(np.float32) / ys).astype(np.float32)


def fixed_multiplier(scale) -> tuple[int, int]:
    """``(mult, shift)`` with ``mult * 2**-shift == scale`` exactly, ``2**30 <= mult < 2**31``, ``1 <= shift <= 62``.

    A float32 scale has a 24-bit mantissa, so a 31-bit multiplier holds it without rounding: the C requant()
    computes ``round(acc * scale)`` of the exact real product (ties to even). Scales below ``2**-32`` map to
    ``(0, 1)`` (every int32 accumulator then rounds to 0, exactly as the real product does).

    >>> fixed_multiplier(0.75)
    (1610612736, 31)
    """
    value = float(np.float32(scale))
    if not math.isfinite(value) or value < 0:
        raise MicroserError(f"requantization scale {value!r} is not a finite non-negative number: expected the "
                            "scales of a calibrated int8 graph; re-run microser compress")
    if value == 0.0:
        return 0, 1
    m, e = math.frexp(value)  # value = m * 2**e, 0.5 <= m < 1
    mult, shift = int(m * 2**31), 31 - e
    if shift > 62:
        return 0, 1
    if shift < 1:
        raise MicroserError(f"requantization scale {value:g} is >= 2**30: the int8 conv's output scale is far "
                            "smaller than its input's, expected a calibrated int8 graph; re-run microser compress")
    assert mult * 2.0**-shift == value
    return mult, shift


def narrow(plan: Plan, st: Stage) -> bool:
    """Whether every requantization shift of an int8 conv is in 33..62 (scales below 2**-2): the 32-bit requant()
    handles it; otherwise the stage uses requant_wide()."""
    return all(fixed_multiplier(sc)[1] >= 33 for sc in conv_scales(plan, st))


def requantize_reference(acc, scales, zero_point: int) -> np.ndarray:
    """What the C requant() returns, in Python integers: ``clamp(round_half_even(acc * scale) + zp, -128, 127)``.

    ``acc`` (..., C) int32 values, ``scales`` (C,) float32 (the last axis is the channel). Exact: ``acc * mult``
    fits int64, then it is shifted with ties to even.
    """
    acc = np.asarray(acc, dtype=np.int64)
    pairs = np.array([fixed_multiplier(sc) for sc in np.asarray(scales, np.float32).reshape(-1)], dtype=np.int64)
    p = acc * pairs[:, 0]  # |acc| < 2**31 and mult < 2**31: exact in int64
    shift = pairs[:, 1]
    q = p >> shift  # floor
    rem = p - (q << shift)
    half = np.left_shift(1, shift - 1)
    out = q + ((rem > half) | ((rem == half) & (q % 2 == 1)))
    return np.clip(out + int(zero_point), -128, 127).astype(np.int8)

