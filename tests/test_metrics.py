"""microser.metrics.ccc against hand-computed values and an independent numpy formulation."""

import json

import numpy as np
import pytest

from microser import TARGETS
from microser.metrics import ccc, ccc_parts, ccc_report, parts_report


def reference_ccc(x, y):
    """Lin's CCC written through Pearson's r: 2 r sx sy / (sx^2 + sy^2 + (mx - my)^2), population moments."""
    r = np.corrcoef(x, y)[0, 1]
    sx, sy = np.std(x), np.std(y)
    return 2 * r * sx * sy / (sx**2 + sy**2 + (np.mean(x) - np.mean(y)) ** 2)


def test_hand_computed_values():
    # x = 1,2,3 and y = 2,3,4: var 2/3 each, cov 2/3, mean gap 1 -> 2(2/3) / (4/3 + 1) = 4/7
    assert float(ccc(np.array([1.0, 2, 3]), np.array([2.0, 3, 4]))) == pytest.approx(4 / 7)
    # perfect agreement and perfect negation
    assert float(ccc(np.array([0.1, 0.5, 0.9]), np.array([0.1, 0.5, 0.9]))) == pytest.approx(1.0)
    assert float(ccc(np.array([1.0, 2, 3]), np.array([3.0, 2, 1]))) == pytest.approx(-1.0)


def test_equals_the_pearson_formulation_per_column_with_population_statistics():
    rng = np.random.default_rng(0)
    truth = rng.random((200, 3))
    pred = 0.6 * truth + rng.normal(0.1, 0.2, size=(200, 3))
    got = ccc(pred, truth)
    want = [reference_ccc(pred[:, k], truth[:, k]) for k in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # population (ddof=0), not sample, variance: a batch-of-two example differs between the two
    x, y = np.array([0.0, 1.0]), np.array([0.0, 2.0])
    assert float(ccc(x, y)) == pytest.approx(2 * 0.5 / (0.25 + 1.0 + 0.25))


def test_report_names_targets_and_mean():
    rng = np.random.default_rng(1)
    truth = rng.random((50, 3))
    report = ccc_report(truth + 0.1 * rng.standard_normal((50, 3)), truth)
    assert list(report) == ["arousal", "dominance", "valence", "mean"]
    assert report["mean"] == pytest.approx(np.mean([report["arousal"], report["dominance"], report["valence"]]))


def test_constant_columns_and_bad_shapes():
    const = np.full(5, 0.5)
    assert float(ccc(const, const)) == 1.0                     # both constant and equal
    assert float(ccc(const, np.full(5, 0.7))) == 0.0           # both constant, different: 0 (no division)
    with pytest.raises(ValueError, match="equal shapes"):
        ccc(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        ccc(np.zeros(1), np.zeros(1))


def test_ccc_parts_rebuild_the_ccc_and_match_numpy():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(200, 3)) * [1.0, 0.5, 2.0] + [0.2, -0.1, 0.4]
    pred = 0.6 * truth + rng.normal(size=(200, 3)) * 0.3 - [0.5, 0.0, 0.8]
    parts = ccc_parts(pred, truth)
    for d in range(3):
        assert parts["r"][d] == pytest.approx(np.corrcoef(pred[:, d], truth[:, d])[0, 1], abs=1e-12)
        assert parts["bias"][d] == pytest.approx((pred[:, d].mean() - truth[:, d].mean()) / truth[:, d].std(), abs=1e-12)
        assert parts["scale"][d] == pytest.approx(pred[:, d].std() / truth[:, d].std(), abs=1e-12)
    r, b, s = parts["r"], parts["bias"], parts["scale"]
    np.testing.assert_allclose(2 * r * s / (1 + s ** 2 + b ** 2), ccc(pred, truth), atol=1e-12)
    # an offset alone costs CCC and leaves r: shifting by one truth std
    shifted = ccc_parts(truth + truth.std(0), truth)
    np.testing.assert_allclose(shifted["r"], 1.0)
    np.testing.assert_allclose(shifted["bias"], 1.0)
    np.testing.assert_allclose(ccc(truth + truth.std(0), truth), 2 / 3)
    with pytest.raises(ValueError, match=r"equal shapes .* prediction \(3,\) and truth \(2,\)"):
        ccc_parts(np.zeros(3), np.zeros(2))


def test_parts_report_names_the_targets_and_leaves_out_undefined_parts():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(50, 3))
    pred = 0.5 * truth + rng.normal(size=(50, 3)) - 0.3
    pred[:, 2] = 1.0                                       # constant valence: r undefined, scale 0, bias defined
    report, parts = parts_report(pred, truth), ccc_parts(pred, truth)
    for k, part in enumerate(("r", "bias", "scale")):
        for d, name in enumerate(TARGETS[:2]):
            assert report[part][name] == pytest.approx(float(parts[part][d]))
    assert report["r"]["arousal"] == pytest.approx(np.corrcoef(pred[:, 0], truth[:, 0])[0, 1])
    assert "valence" not in report["r"] and report["scale"]["valence"] == 0.0
    assert report["bias"]["valence"] == pytest.approx((1.0 - truth[:, 2].mean()) / truth[:, 2].std())
    json.dumps(report, allow_nan=False)                    # storable as it is
