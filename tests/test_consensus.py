"""Sign consensus (``sign_consensus``): TIES's sign election over FFG-masked task vectors, in ota and ffg.

Properties of the pure math (hypothesis), against the float64 formula of :mod:`mergekit_ota.math.reference`
(the kernel is :mod:`mergekit_ota.math.consensus`), and the parameter's rules through the methods (YAML and in memory).
"""

from __future__ import annotations

from typing import List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_ota.math.ffg import KeepRule, ffg_merge
from mergekit_ota.math.ota import ota_merge
from mergekit_ota.math.rank1 import Rank1Curvature
from mergekit_ota.math.rank1 import dense as dense_of
from mergekit_ota.math.reference import reference_ffg, reference_ota

SHAPES = st.sampled_from([(7,), (3, 5), (4, 6)])


def _family(seed: int, shape, n: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    curvatures = [torch.rand(shape, generator=g) + 1e-3 for _ in range(n)]
    return base, experts, curvatures


def _reference(
    base, experts, curvatures, weights, rules, rule, *, ota: bool, power=0.5, eps=1e-12, normalize=True, lambda_=1.0
):
    """theta = b + lambda * N / D (ota; ffg normalised) or b + lambda * N (ffg) by the float64 formula of
    :mod:`mergekit_ota.math.reference`, with the masks the kernel computes (float32 task vectors)."""
    masks = [
        r.mask(e - base, v) if r is not None else torch.ones_like(base) for r, e, v in zip(rules, experts, curvatures)
    ]
    if ota:
        want = reference_ota(base, experts, curvatures, weights, masks, power, eps, lambda_, consensus=rule)
    else:
        want = reference_ffg(base, experts, weights, masks, lambda_, normalize, consensus=rule)
    return want.float()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=SHAPES,
    n=st.integers(1, 4),
    rule=st.sampled_from(["sum", "count"]),
    density=st.sampled_from([None, 0.3, 0.7, 1.0]),
    lambda_=st.sampled_from([1.0, 0.5, 1.5]),
)
def test_ota_and_ffg_consensus_equal_the_formula(seed, shape, n, rule, density, lambda_):
    """For any experts, masks, rule and lambda: ota and ffg (normalised or not) with sign consensus equal the direct
    computation of b + lambda * N / D (resp. b + lambda * N) over stacked contributions."""
    base, experts, curvatures = _family(seed, shape, n)
    weights = [1.0 + 0.5 * i for i in range(n)]
    rules: List[Optional[KeepRule]] = [KeepRule(density=density) if density else None for _ in experts]
    got = ota_merge(base, experts, curvatures, weights, rules=rules, lambda_=lambda_, consensus=rule)
    want = _reference(base, experts, curvatures, weights, rules, rule, ota=True, lambda_=lambda_)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    ffg_rules = [r or KeepRule(density=1.0) for r in rules]
    for normalize in (True, False):
        got = ffg_merge(
            base, experts, curvatures, ffg_rules, weights, lambda_=lambda_, normalize=normalize, consensus=rule
        )
        want = _reference(
            base, experts, curvatures, weights, ffg_rules, rule, ota=False, normalize=normalize, lambda_=lambda_
        )
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=SHAPES,
    rule=st.sampled_from(["sum", "count"]),
    density=st.sampled_from([None, 0.5]),
)
def test_one_expert_is_unchanged_by_consensus(seed, shape, rule, density):
    """With one expert nothing can disagree: the merge equals the one without consensus."""
    base, experts, curvatures = _family(seed, shape, 1)
    rules = [KeepRule(density=density) if density else None]
    off = ota_merge(base, experts, curvatures, [1.0], rules=rules)
    on = ota_merge(base, experts, curvatures, [1.0], rules=rules, consensus=rule)
    assert torch.allclose(on, off, rtol=1e-6, atol=1e-7)
    ffg_rules = [KeepRule(density=density or 1.0)]
    for normalize in (True, False):
        off = ffg_merge(base, experts, curvatures, ffg_rules, [2.0], normalize=normalize)
        on = ffg_merge(base, experts, curvatures, ffg_rules, [2.0], normalize=normalize, consensus=rule)
        assert torch.allclose(on, off, rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), shape=SHAPES, n=st.integers(2, 4), rule=st.sampled_from(["sum", "count"]))
def test_when_every_expert_agrees_consensus_changes_nothing(seed, shape, n, rule):
    """Every task vector nonzero with one sign pattern (each expert's tau_i = k_i |d| s, s a fixed sign tensor):
    ota and normalised ffg equal their merges without consensus."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    experts = [base + sign * (0.05 + torch.rand(shape, generator=g)) for _ in range(n)]
    curvatures = [torch.rand(shape, generator=g) + 1e-3 for _ in range(n)]
    weights = [1.0] * n
    off = ota_merge(base, experts, curvatures, weights)
    on = ota_merge(base, experts, curvatures, weights, consensus=rule)
    assert torch.allclose(on, off, rtol=1e-5, atol=1e-6)
    keep = [KeepRule(density=1.0)] * n
    off = ffg_merge(base, experts, curvatures, keep, weights, normalize=True)
    on = ffg_merge(base, experts, curvatures, keep, weights, normalize=True, consensus=rule)
    # ffg's plain normalisation divides by sum_i weight_i; with all agreeing the disjoint mean divides by the same
    assert torch.allclose(on, off, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    shape=SHAPES,
    n=st.integers(2, 4),
    c=st.sampled_from([1e-3, 0.5, 7.0, 1e3]),
    rule=st.sampled_from(["sum", "count"]),
)
def test_scaling_every_weight_changes_nothing(seed, shape, n, c, rule):
    """ota (eps negligible) and normalised ffg are invariant to multiplying every weight_i by one c > 0."""
    base, experts, curvatures = _family(seed, shape, n)
    weights = [1.0 + i for i in range(n)]
    rules = [KeepRule(density=0.6)] * n
    a = ota_merge(base, experts, curvatures, weights, rules=rules, eps=1e-30, consensus=rule)
    b = ota_merge(base, experts, curvatures, [c * w for w in weights], rules=rules, eps=1e-30, consensus=rule)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    a = ffg_merge(base, experts, curvatures, rules, weights, normalize=True, consensus=rule)
    b = ffg_merge(base, experts, curvatures, rules, [c * w for w in weights], normalize=True, consensus=rule)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_disagreeing_entry_is_dropped_and_a_coordinate_nobody_keeps_stays_base():
    """Two experts pull a coordinate apart: the heavier (sum rule) wins alone; the lighter's entry is dropped
    from numerator and denominator; a coordinate both leave at 0 keeps the base."""
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([-0.2, 0.5, 0.0])
    v = [torch.ones(3), torch.ones(3)]
    merged = ota_merge(base, [a, b], v, [1.0, 1.0], consensus="sum")
    assert torch.allclose(merged, torch.tensor([1.0, 0.5, 0.0]))
    merged = ffg_merge(base, [a, b], v, [KeepRule(density=1.0)] * 2, [1.0, 1.0], normalize=True, consensus="sum")
    assert torch.allclose(merged, torch.tensor([1.0, 0.5, 0.0]))


def test_rank1_curvature_works_with_consensus():
    """A rank-1 curvature gives the same merge as its dense form (math.rank1.dense)."""
    base, experts, _ = _family(3, (4, 6), 3)
    g = torch.Generator().manual_seed(5)
    factors = [(torch.rand(4, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1) for _ in experts]
    rank1 = [Rank1Curvature(r, c) for r, c in factors]
    dense = [dense_of(v) for v in rank1]
    rules = [KeepRule(density=0.5)] * 3
    a = ota_merge(base, experts, rank1, [1.0] * 3, rules=rules, consensus="sum")
    b = ota_merge(base, experts, dense, [1.0] * 3, rules=rules, consensus="sum")
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the parameter, through the methods


def test_sign_consensus_rules_through_the_methods():
    """In memory (mergekit's merge_tensors): an unknown value is refused naming the parameter; ota without a base
    is refused; ffg normalised with a negative weight is refused; a valid call equals the math function."""
    from mergekit.merge_methods import merge_tensors

    from mergekit_ota.errors import ConfigError
    from mergekit_ota.methods import register_methods

    register_methods()
    base, experts, curvatures = _family(1, (4, 6), 2)
    masked = {"curvature": curvatures, "density": [0.5, 0.5]}
    with pytest.raises(ConfigError, match="sign_consensus"):
        merge_tensors([base, *experts], "ota", base_index=0, parameters={**masked, "sign_consensus": "majority"})
    with pytest.raises(ConfigError, match="needs a base_model"):
        merge_tensors(experts, "ota", parameters={"curvature": curvatures, "sign_consensus": "sum"})
    with pytest.raises(ConfigError, match="every weight must be > 0"):
        merge_tensors(
            [base, *experts],
            "ffg",
            base_index=0,
            parameters={**masked, "weight": [2.0, -1.0], "normalize": True, "sign_consensus": "sum"},
        )
    got = merge_tensors(
        [base, *experts], "ffg", base_index=0, parameters={**masked, "normalize": True, "sign_consensus": "count"}
    )
    want = ffg_merge(
        base, experts, curvatures, [KeepRule(density=0.5)] * 2, [1.0, 1.0], normalize=True, consensus="count"
    )
    assert torch.allclose(got, want)
    got = merge_tensors(
        [base, *experts], "ota", base_index=0, parameters={**masked, "sign_consensus": "sum", "curvature_scale": "none"}
    )
    want = ota_merge(base, experts, curvatures, [1.0, 1.0], rules=[KeepRule(density=0.5)] * 2, consensus="sum")
    assert torch.allclose(got, want)


# ----------------------------------------------------------------------------- edge cases the fast path must keep


def test_sides_near_float32s_limit_are_selected_exactly_not_through_their_difference():
    """The elected side is chosen without forming P - Q: with P = 2e38 and Q = -2e38 (finite; P - Q overflows
    float32) the elected sum is P itself, and with one vote each way the count rule elects P too."""
    from mergekit_ota.math.consensus import SignConsensus

    for rule in ("sum", "count"):
        votes = SignConsensus(rule)
        votes.add(torch.tensor([2e38, 1.0]), 1.0)
        votes.add(torch.tensor([-2e38, 2.0]), 1.0)
        numerator, denominator = votes.result()
        assert numerator.tolist() == pytest.approx([2e38, 3.0], rel=1e-6), rule
        assert denominator.tolist() == [1.0, 2.0]


def test_negative_weights_in_memory_are_refused_or_keep_the_base_never_a_lifted_divisor():
    """The in-memory math takes negative weights: ota's consensus raises where they cancel the agreeing weights to
    0 (as plain ota does), and normalised ffg keeps the base where the agreeing weights sum to 0."""
    from mergekit_ota.errors import MergeError

    base, ones = torch.zeros(3), torch.ones(3)
    with pytest.raises(MergeError, match="underflowed|cancel"):
        ota_merge(base, [ones, -ones], [ones, ones], [1.0, -1.0], power=0.0, eps=1e-12, consensus="sum")
    out = ffg_merge(base, [ones, -ones], [ones, ones], [None, None], [1.0, -1.0], normalize=True, consensus="count")
    assert torch.equal(out, base)


@pytest.mark.parametrize("method", ["ota", "ffg"])
@pytest.mark.parametrize("consensus", ["none", "sum"])
def test_transposed_inputs_merge_like_contiguous_ones(method, consensus):
    """Non-contiguous tensors (a transposed view, as a state dict can hold) give the merge of their contiguous
    copies: the masks' float buffers follow the inputs' strides, and FFG's selection writes into them."""
    from mergekit.merge_methods import merge_tensors

    from mergekit_ota.methods import register_methods

    register_methods()
    base, experts, curvatures = _family(3, (7, 5), 2)
    parameters = {
        "density": [0.3, 0.5],
        "sign_consensus": consensus,
        **({"normalize": True} if method == "ffg" else {}),
    }
    transposed = merge_tensors(
        [base.t(), *(e.t() for e in experts)],
        method,
        base_index=0,
        parameters={**parameters, "curvature": [v.t() for v in curvatures]},
    )
    contiguous = merge_tensors(
        [base.t().contiguous(), *(e.t().contiguous() for e in experts)],
        method,
        base_index=0,
        parameters={**parameters, "curvature": [v.t().contiguous() for v in curvatures]},
    )
    torch.testing.assert_close(transposed, contiguous, rtol=0, atol=0)
