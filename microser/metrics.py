"""Concordance correlation coefficient: the one definition used for training, search and reports."""

from __future__ import annotations

import numpy as np

from microser import TARGETS


def ccc_terms(x, y):
    """``(2 sigma_xy, sigma_x^2 + sigma_y^2 + (mu_x - mu_y)^2)`` per column over axis 0, population statistics:
    CCC's numerator and denominator, the one definition for numpy arrays (:func:`ccc`) and torch tensors
    (``distill.ccc_loss`` differentiates through it)."""
    mx, my = x.mean(0), y.mean(0)
    dx, dy = x - mx, y - my
    return 2 * (dx * dy).mean(0), (dx * dx).mean(0) + (dy * dy).mean(0) + (mx - my) ** 2


def ccc(prediction, truth) -> np.ndarray:
    r"""Concordance correlation coefficient per column, population statistics.

    .. math::

        \rho_c = \frac{2 \sigma_{xy}}{\sigma_x^2 + \sigma_y^2 + (\mu_x - \mu_y)^2}

    with means, variances and the covariance taken over the whole set
    (``ddof=0``). Evaluation always calls this on the whole set, never
    averages per-batch values.

    Args:
        prediction: ``(N,)`` or ``(N, D)`` array.
        truth: same shape as ``prediction``.

    Returns:
        ``(D,)`` float64 array in ``[-1, 1]`` (a scalar array for 1-D input).
        A column where both inputs are constant and equal gives 1; one where
        the denominator is zero otherwise gives 0.

    >>> float(ccc(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])))
    1.0
    >>> round(float(ccc(np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0]))), 4)
    0.5714
    """
    x = np.asarray(prediction, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"ccc needs equal shapes, but got prediction {x.shape} and truth {y.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"ccc needs at least 2 samples, but got {x.shape[0]}")
    num, den = ccc_terms(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return out


def ccc_parts(prediction, truth) -> dict[str, np.ndarray]:
    r"""What a CCC is made of, per column: Pearson ``r``, ``bias`` (mean offset in truth standard deviations)
    and ``scale`` (prediction std over truth std), population statistics.

    .. math::

        \rho_c = \frac{2 r s}{1 + s^2 + b^2}, \quad b = \frac{\mu_x - \mu_y}{\sigma_y}, \quad
        s = \frac{\sigma_x}{\sigma_y}

    so a CCC far below ``r`` is lost to an offset or a wrong spread, not to ranking (for truth with
    ``sigma_y > 0`` and predictions that vary). Returns ``{"r", "bias", "scale"}``, each ``(D,)``.

    >>> parts = ccc_parts(np.array([2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0]))
    >>> [round(float(parts[k]), 4) for k in ("r", "bias", "scale")]
    [1.0, 1.2247, 1.0]
    """
    x = np.asarray(prediction, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(f"ccc_parts needs equal shapes with at least 2 samples, but got prediction {x.shape} "
                         f"and truth {y.shape}")
    sx, sy = x.std(0), y.std(0)
    two_cov, _ = ccc_terms(x, y)   # CCC's own covariance
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"r": two_cov / (2 * sx * sy), "bias": (x.mean(0) - y.mean(0)) / sy, "scale": sx / sy}


def ccc_report(prediction, truth) -> dict[str, float]:
    """CCC per target name plus their mean: ``{"arousal": .., "dominance": .., "valence": .., "mean": ..}``."""
    values = ccc(prediction, truth)
    report = {name: float(v) for name, v in zip(TARGETS, values)}
    report["mean"] = float(np.mean(values))
    return report


CCC_PARTS = ("r", "bias", "scale")


def parts_report(prediction, truth) -> dict[str, dict[str, float]]:
    """:func:`ccc_parts` per target name: ``{"r": {"arousal": .., ..}, "bias": {..}, "scale": {..}}``.

    A part that is undefined for a target (constant truth or constant predictions) is left out of that
    part's dict, so that JSON storage and :func:`report_mean_std` see only numbers.

    >>> parts_report(np.array([[2.0] * 3, [3.0] * 3, [4.0] * 3]), np.array([[1.0] * 3, [2.0] * 3, [3.0] * 3]))["bias"]
    {'arousal': 1.224744871391589, 'dominance': 1.224744871391589, 'valence': 1.224744871391589}
    """
    parts = ccc_parts(prediction, truth)
    return {part: {name: float(v) for name, v in zip(TARGETS, np.atleast_1d(parts[part])) if np.isfinite(v)}
            for part in CCC_PARTS}


def report_mean_std(reports) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and population standard deviation, key by key, of several ``ccc_report`` dicts (e.g. over seeds).

    >>> report_mean_std([{"mean": .5}, {"mean": .7}])
    ({'mean': 0.6}, {'mean': 0.1})
    """
    reports = [r for r in reports if r]
    if not reports:
        return {}, {}
    keys = [k for k in reports[0] if all(k in r for r in reports)]
    values = {k: np.array([float(r[k]) for r in reports]) for k in keys}
    return ({k: round(float(v.mean()), 12) for k, v in values.items()},
            {k: round(float(v.std()), 12) for k, v in values.items()})
