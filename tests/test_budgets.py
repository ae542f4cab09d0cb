"""Budget strings: exact values for every metric and suffix, and one-line refusals with an example."""

from __future__ import annotations

import pytest

from microser.budgets import Budget, describe_violations, parse_budget, parse_budgets, violations
from microser.errors import MicroserError


@pytest.mark.parametrize("text, metric, limit", [
    ("80k-params", "params", 80_000),
    ("80000-params", "params", 80_000),
    ("1.5M-params", "params", 1_500_000),
    ("64KB-onnx", "onnx_bytes", 64_000),
    ("64KiB-onnx", "onnx_bytes", 65_536),
    ("2MB-onnx", "onnx_bytes", 2_000_000),
    ("1MiB-ram", "ram_bytes", 1_048_576),
    ("256KiB-ram", "ram_bytes", 262_144),
    ("256KB-ram", "ram_bytes", 256_000),
    ("65536-ram", "ram_bytes", 65_536),
    ("20M-macs", "macs", 20_000_000),
    ("0.5G-macs", "macs", 500_000_000),
    ("30M-instr", "instr", 30_000_000),
    ("2.5G-instr", "instr", 2_500_000_000),
])
def test_good_budgets_have_exact_limits(text, metric, limit):
    b = parse_budget(text)
    assert (b.metric, b.limit) == (metric, limit)
    assert b.text == text


@pytest.mark.parametrize("text, match", [
    ("80x-params", "suffix 'x' does not fit params"),
    ("64KB-params", "suffix 'KB' does not fit params"),   # bytes suffix on a count
    ("80k-ram", "suffix 'k' does not fit ram"),           # count suffix on bytes
    ("80k-flops", "unknown metric 'flops'"),
    ("30MB-instr", "suffix 'MB' does not fit instr, which is a count .* e.g. '30M-instr'"),
    ("params-80k", "not understood"),
    ("80k", "not understood"),
    ("", "not understood"),
    ("0-params", "must be positive"),
])
def test_bad_budgets_are_refused_with_an_example(text, match):
    with pytest.raises(MicroserError, match=match) as e:
        parse_budget(text)
    message = str(e.value)
    assert "\n" not in message
    assert "e.g." in message


def test_two_budgets_on_one_metric_are_refused():
    with pytest.raises(MicroserError, match="both limit params"):
        parse_budgets(["80k-params", "90k-params"])


def test_constraint_values_are_cost_minus_limit():
    budgets = parse_budgets(["80k-params", "256KB-ram"])
    costs = {"params": 79_000, "ram_bytes": 412_000, "onnx_bytes": 1, "macs": 1}
    assert violations(budgets, costs) == {"params": -1000.0, "ram_bytes": 156_000.0}
    assert describe_violations(budgets, costs) == "ram_bytes 412000 > 256000"
    assert Budget.from_dict(budgets[1].to_dict()) == budgets[1]


def test_a_model_without_an_int8_c_library_breaks_an_instr_budget():
    """costs.instr is inf for a MobileNet or a LayerNorm body (no int8 C): the budget rejects it, and says why."""
    budgets = parse_budgets(["80k-params", "30M-instr"])
    costs = {"params": 50_000, "instr": float("inf")}
    assert violations(budgets, costs) == {"params": -30_000.0, "instr": float("inf")}
    assert describe_violations(budgets, costs) == "instr inf (no int8 C library) > 30000000"
    assert describe_violations(budgets, {"params": 50_000, "instr": 29_999_999.0}) == ""
