"""The defaults study's arithmetic (benchmarks/quality/regret.py): regrets, the min-max choice, report parsing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.quality import regret

values_strategy = st.dictionaries(
    st.integers(0, 4),
    st.fixed_dictionaries({c: st.floats(-2, 2, allow_nan=False) for c in ("a", "b", "c")}),
    min_size=1,
)


@given(values_strategy)
def test_regret_is_nonnegative_and_zero_for_a_candidate_best_in_every_seed(values):
    """R(c) >= 0; a candidate that is best in every seed has regret 0; R is the mean of per-seed shortfalls."""
    r = regret.regrets(values)
    assert all(v >= -1e-12 for v in r.values())
    for c in r:
        expected = sum(max(per.values()) - per[c] for per in values.values()) / len(values)
        assert math.isclose(r[c], expected, abs_tol=1e-12)
        if all(per[c] == max(per.values()) for per in values.values()):
            assert r[c] == 0.0


def test_table_chooses_the_smallest_worst_case_not_the_best_average():
    """Candidate b loses a little everywhere; a wins twice and loses big once: min-max picks b."""
    table = regret.Table("t")
    table.add("x", {0: {"a": 1.0, "b": 0.95}})
    table.add("y", {0: {"a": 1.0, "b": 0.95}})
    table.add("z", {0: {"a": 0.5, "b": 0.9}})
    assert table.choice() == "b"
    assert table.worst("a") == (0.4, "z")


def test_a_candidate_missing_from_a_column_is_never_chosen():
    table = regret.Table("t")
    table.add("x", {0: {"a": 1.0, "b": 0.0, "rule": 1.0}})
    table.add("y", {0: {"a": 1.0, "b": 0.0}})
    assert table.complete() == ["a", "b"]
    assert table.choice() == "a"
    assert any("measured columns only" in line for line in table.lines())


def test_report_tier_reads_every_seed_of_a_pooled_grid_and_the_val_column_of_a_single_seed(tmp_path):
    pooled = tmp_path / "pooled.md"
    pooled.write_text(
        "<details><summary>Every grid point: validation / test G per seed</summary>\n\n"
        "| method | setting | seed 0 val / test | seed 1 val / test |\n|---|---|---|---|\n"
        "| ota | p=0.5, λ=1 | 0.285 / 0.271 | 0.328 / - |\n| ties | d=0.1, λ=1 | -0.5 / - | n/a / - |\n\nafter\n",
        encoding="utf-8",
    )
    tier = regret.report_tier("sft", str(pooled))
    assert tier.grids == {
        0: {("ota", "p=0.5, λ=1"): 0.285, ("ties", "d=0.1, λ=1"): -0.5},
        1: {("ota", "p=0.5, λ=1"): 0.328},
    }
    single = tmp_path / "single.md"
    single.write_text(
        "<details><summary>Every grid point (val / test G, test norm.)</summary>\n\n"
        "| method | setting | val G | test G | test norm. |\n|---|---|---|---|---|\n"
        "| ota | p=1, λ=1 | 0.929 | 0.878 | 0.978 |\n",
        encoding="utf-8",
    )
    assert regret.report_tier("full", str(single)).grids == {0: {("ota", "p=1, λ=1"): 0.929}}


def test_scale_rule_takes_mean_only_where_the_experts_scales_differ_by_more_than_k():
    tier = regret.Tier("t", "x")
    grid = {}
    for scale, g in (("none", 0.5), ("raw", 0.4), ("mean", 0.7), ("median", 0.6)):
        grid[(regret.method_name("ota", scale), "p=0.5, λ=1")] = g
    tier.grids = {0: grid, 1: dict(grid)}
    tier.scale_ratio = {0: 5.0, 1: 500.0}
    values = regret.scale_values(tier, "ota", None)
    assert values[0][regret.rule_name(10)] == 0.5 and values[1][regret.rule_name(10)] == 0.7
    assert values[1][regret.rule_name(100)] == 0.7


def test_by_tier_folds_a_tiers_families_into_their_largest_regret():
    table = regret.Table("t")
    table.add("quick ota", {0: {"a": 1.0, "b": 0.9}})
    table.add("quick ota+FFG", {0: {"a": 0.7, "b": 0.9}})
    table.add("sft ota", {0: {"a": 1.0, "b": 0.95}, 1: {"a": 1.0, "b": 1.0}})
    folded = table.by_tier(["quick", "sft"])
    assert folded.columns == ["quick", "sft"]
    assert folded.cells["a"] == {"quick": pytest.approx(0.2), "sft": 0.0}
    assert folded.cells["b"] == {"quick": pytest.approx(0.1), "sft": pytest.approx(0.025)}
