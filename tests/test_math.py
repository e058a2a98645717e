"""Property tests of the pure tensor math in :mod:`mergekit_ota.math`.

Tensors are built from hypothesis-drawn shapes and seeds through ``torch.Generator``
so each example stays small and fast.  References are computed in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import lams, seeds, shapes, weight_values

from mergekit_ota.math import (
    KeepRule,
    Rank1Curvature,
    SaliencyHistogram,
    curvature_weights,
    density_mask,
    ffg_merge,
    kept_count,
    ota_merge,
    rank1_factors,
    rank1_reconstruct,
    saliency,
    threshold_mask,
)
from mergekit_ota.math.reference import reference_mask, reference_ota

FAST = settings(max_examples=40, deadline=None)
FEW = settings(max_examples=25, deadline=None)

mask_shapes = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)
mask_densities = st.floats(min_value=1e-4, max_value=1.0)
score_kinds = st.sampled_from(["continuous", "integers", "zeros", "constant"])  # see scores_for


# ----------------------------------------------------------------------------- helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, g, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * scale


def log_uniform(shape, g, lo: float, hi: float) -> torch.Tensor:
    """Positive float32 values with log10 uniform in [lo, hi]."""
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.pow(10.0, lo + (hi - lo) * u).to(torch.float32)


def scale_of(*tensors) -> float:
    return max(float(t.abs().max()) for t in tensors)


def assert_close(actual, expected, scale: float, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=rtol * max(scale, 1e-30)
    )


def problem(seed, shape, n_experts):
    """A base, ``n_experts`` experts and their task vectors (all float32)."""
    g = gen(seed)
    base = randn(shape, g)
    experts = [base + randn(shape, g, 0.5) for _ in range(n_experts)]
    return g, base, experts


# ----------------------------------------------------------------------------- OTA


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    power=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    lambda_=lams,
    with_base=st.booleans(),
)
def test_ota_with_equal_curvature_equals_weight_normalised_task_arithmetic(
    seed, shape, n_experts, weights, power, lambda_, with_base
):
    """Equal curvature in every expert: OTA = b + lambda * sum w_i tau_i / sum w_i (or the weighted mean of experts)."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    v = log_uniform(shape, g, -2, 2)
    curvatures = [v.clone() for _ in experts]
    total = sum(weights)
    if with_base:
        b = base.double()
        expected = b + lambda_ * sum(w * (t.double() - b) for w, t in zip(weights, experts)) / total
        out = ota_merge(base, experts, curvatures, weights, power=power, lambda_=lambda_)
    else:
        expected = sum(w * t.double() for w, t in zip(weights, experts)) / total
        out = ota_merge(None, experts, curvatures, weights, power=power)
    assert_close(out, expected, scale_of(base, *experts))


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    log_c=st.floats(min_value=-3.0, max_value=3.0),
    power=st.sampled_from([0.5, 1.0]),
    with_base=st.booleans(),
)
def test_ota_invariant_to_common_curvature_scale(seed, shape, n_experts, weights, log_c, power, with_base):
    """Multiplying every expert's curvature by the same c > 0 leaves OTA unchanged (eps negligible)."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    curvatures = [log_uniform(shape, g, -2, 2) for _ in experts]
    c = 10.0**log_c
    scaled = [v * c for v in curvatures]
    b = base if with_base else None
    out = ota_merge(b, experts, curvatures, weights, power=power, eps=1e-30)
    out_scaled = ota_merge(b, experts, scaled, weights, power=power, eps=1e-30)
    assert_close(out_scaled, out, scale_of(base, *experts))


@FAST
@given(
    seed=seeds,
    shape=shapes,
    weight=weight_values,
    power=st.sampled_from([0.5, 1.0]),
    rule=st.sampled_from([None, KeepRule(density=1.0), KeepRule(threshold=0.0)]),
    with_base=st.booleans(),
)
def test_ota_single_unmasked_expert_returns_that_expert(seed, shape, weight, power, rule, with_base):
    """One expert that keeps every entry (no rule, density 1 or threshold 0): OTA returns that expert."""
    g, base, (expert,) = problem(seed, shape, 1)
    v = log_uniform(shape, g, -30, 3)  # extreme curvature must not matter with one expert
    if with_base:
        out = ota_merge(base, [expert], [v], [weight], rules=[rule], power=power)
    else:
        out = ota_merge(None, [expert], [v], [weight], power=power)
    assert_close(out, expert, scale_of(base, expert), rtol=1e-6)


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    power=st.sampled_from([0.5, 1.0]),
    lambda_=lams,
    with_base=st.booleans(),
)
def test_ota_zero_curvature_everywhere_is_plain_mean(seed, shape, n_experts, weights, power, lambda_, with_base):
    """All curvature zero: every w_i = eps, so OTA is the unweighted mean (b + lambda * mean tau with a base)."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    zeros = [torch.zeros(shape) for _ in experts]
    mean_t = sum(t.double() for t in experts) / n_experts
    if with_base:
        b = base.double()
        expected = b + lambda_ * (mean_t - b)
        out = ota_merge(base, experts, zeros, weights, power=power, lambda_=lambda_)
    else:
        expected = mean_t
        out = ota_merge(None, experts, zeros, weights, power=power)
    assert_close(out, expected, scale_of(base, *experts))


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    lambda_=lams,
    use_density=st.booleans(),
)
def test_ota_coordinates_masked_in_every_expert_keep_base(seed, shape, n_experts, weights, lambda_, use_density):
    """Where every expert's FFG mask drops a coordinate, OTA (and FFG) return b there exactly."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    numel = base.numel()
    if use_density:
        # Zero curvature on a common subset S makes its saliency 0 in every expert; a density
        # keeping at most numel - |S| entries keeps only positive saliencies, so S is dropped.
        dropped = torch.zeros(numel, dtype=torch.bool)
        dropped[torch.randperm(numel, generator=g)[: numel // 2]] = True
        dropped = dropped.reshape(shape)
        curvatures = [torch.where(dropped, 0.0, log_uniform(shape, g, -3, 3)) for _ in experts]
        kept_max = numel - int(dropped.sum())
        density = max(1, kept_max) / numel * 0.999 if kept_max else 1.0 / numel
        rules = [KeepRule(density=density) for _ in experts]
        if kept_max == 0:  # numel == 1 and nothing positive: nothing meaningful to check
            return
    else:
        curvatures = [log_uniform(shape, g, -3, 3) for _ in experts]
        biggest = max(float(saliency(t - base, v).max()) for t, v in zip(experts, curvatures))
        rules = [KeepRule(threshold=2.0 * biggest + 1.0) for _ in experts]
        dropped = torch.ones(shape, dtype=torch.bool)

    out = ota_merge(base, experts, curvatures, weights, rules=rules, lambda_=lambda_)
    assert torch.equal(out[dropped], base[dropped])
    out_ffg = ffg_merge(base, experts, curvatures, rules, weights, lambda_=lambda_)
    assert torch.equal(out_ffg[dropped], base[dropped])


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    power=st.sampled_from([0.5, 1.0]),
    with_base=st.booleans(),
    masked=st.booleans(),
    with_zeros=st.booleans(),
)
def test_ota_finite_and_within_expert_range_for_extreme_curvature(
    seed, shape, n_experts, weights, power, with_base, masked, with_zeros
):
    """Curvature mixed over 1e-30..1e3 across experts and entries gives a finite convex combination."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    curvatures = []
    for _ in experts:
        v = log_uniform(shape, g, -30, 3)
        extremes = torch.rand(shape, generator=g)
        v = torch.where(extremes < 0.2, 1e-30, v)
        v = torch.where(extremes > 0.8, 1e3, v)
        if with_zeros:
            v = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, v)
        curvatures.append(v)
    if with_base:
        rules = [KeepRule(density=0.5) if masked else None for _ in experts]
        out = ota_merge(base, experts, curvatures, weights, rules=rules, power=power)
        xs = torch.stack([t - base for t in experts])
        lo = torch.minimum(xs.min(0).values, torch.zeros(shape)) + base
        hi = torch.maximum(xs.max(0).values, torch.zeros(shape)) + base
    else:
        out = ota_merge(None, experts, curvatures, weights, power=power)
        xs = torch.stack(experts)
        lo, hi = xs.min(0).values, xs.max(0).values
    assert torch.isfinite(out).all()
    tol = 1e-5 * scale_of(base, *experts)
    assert (out >= lo - tol).all() and (out <= hi + tol).all()
    out_ffg = ffg_merge(base, experts, curvatures, [KeepRule(density=0.5)] * n_experts, weights)
    assert torch.isfinite(out_ffg).all()


@FEW
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 3),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    v_dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    with_base=st.booleans(),
)
def test_result_dtype_is_base_dtype_and_inputs_unmodified(seed, shape, n_experts, dtype, v_dtype, with_base):
    """Outputs have the base dtype (first expert's without a base); no input is modified in place."""
    g, base, experts = problem(seed, shape, n_experts)
    base = base.to(dtype)
    experts = [t.to(dtype) for t in experts]
    curvatures = [log_uniform(shape, g, -3, 3).to(v_dtype) for _ in experts]
    rules = [KeepRule(density=0.5), KeepRule(threshold=0.1), None][:n_experts]
    snapshot = [x.clone() for x in [base, *experts, *curvatures]]

    if with_base:
        out = ota_merge(base, experts, curvatures, [1.0] * n_experts, rules=rules)
    else:
        out = ota_merge(None, experts, curvatures, [1.0] * n_experts)
    assert out.dtype == dtype and out.shape == base.shape
    out_ffg = ffg_merge(base, experts, curvatures, [r or KeepRule(density=1.0) for r in rules], [1.0] * n_experts)
    assert out_ffg.dtype == dtype and out_ffg.shape == base.shape
    s = saliency(experts[0] - base, curvatures[0])
    assert s.dtype == torch.float32
    w = curvature_weights(curvatures[0], 2.0)
    assert w.dtype == torch.float32

    for before, after in zip(snapshot, [base, *experts, *curvatures]):
        assert torch.equal(before, after)


def test_ota_without_base_rejects_masks():
    """ota_merge without a base and with FFG rules raises ValueError (masks need tau = t - b)."""
    t = torch.randn(4, 3)
    v = torch.rand(4, 3)
    with pytest.raises(ValueError, match="base"):
        ota_merge(None, [t, t + 1], [v, v], [1.0, 1.0], rules=[KeepRule(density=0.5), None])


def test_ota_rejects_mismatched_lengths():
    """ota_merge and ffg_merge reject per-expert sequences of different lengths."""
    t = torch.randn(4)
    v = torch.rand(4)
    with pytest.raises(ValueError, match="same length"):
        ota_merge(t, [t, t], [v], [1.0, 1.0])
    with pytest.raises(ValueError, match="one entry per expert"):
        ota_merge(t, [t, t], [v, v], [1.0, 1.0], rules=[None])
    with pytest.raises(ValueError, match="same length"):
        ffg_merge(t, [t, t], [v, v], [None], [1.0, 1.0])


@FAST
@given(v=st.floats(min_value=0.0, max_value=1e3), weight=weight_values, power=st.sampled_from([0.0, 0.5, 1.0, 1.5]))
def test_curvature_weights_formula(v, weight, power):
    """curvature_weights returns weight * v**power + eps in float32."""
    w = curvature_weights(torch.tensor([v], dtype=torch.float32), weight, power=power, eps=1e-12)
    v32 = float(torch.tensor(v, dtype=torch.float32))
    expected = weight * v32**power + 1e-12
    assert math.isclose(float(w), expected, rel_tol=1e-5, abs_tol=1e-12)


# ----------------------------------------------------------------------------- FFG


@FAST
@given(
    seed=seeds,
    shape=shapes,
    weight=weight_values,
    normalize=st.booleans(),
)
def test_ffg_single_expert_density_one_lam_one_returns_expert(seed, shape, weight, normalize):
    """FFG of one expert at density 1 and lambda 1 (normalised, or with weight 1) returns the expert."""
    g, base, (expert,) = problem(seed, shape, 1)
    v = log_uniform(shape, g, -30, 3)
    w = weight if normalize else 1.0
    out = ffg_merge(base, [expert], [v], [KeepRule(density=1.0)], [w], lambda_=1.0, normalize=normalize)
    assert_close(out, expert, scale_of(base, expert), rtol=1e-6)


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    lambda_=lams,
    normalize=st.booleans(),
)
def test_ffg_density_one_equals_task_arithmetic(seed, shape, n_experts, weights, lambda_, normalize):
    """Density 1: FFG = b + lambda * sum weight_i tau_i (divided by sum weight_i when normalize)."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    curvatures = [log_uniform(shape, g, -6, 3) for _ in experts]
    rules = [KeepRule(density=1.0) for _ in experts]
    b = base.double()
    delta = sum(w * (t.double() - b) for w, t in zip(weights, experts))
    if normalize:
        delta = delta / sum(weights)
    expected = b + lambda_ * delta
    out = ffg_merge(base, experts, curvatures, rules, weights, lambda_=lambda_, normalize=normalize)
    assert_close(out, expected, scale_of(base, *experts) * (1 + sum(weights)))


@FAST
@given(seed=seeds, shape=shapes, density=st.floats(min_value=0.05, max_value=1.0), lambda_=lams)
def test_ffg_single_expert_grafts_exactly_the_density_mask(seed, shape, density, lambda_):
    """FFG of one expert = b + lambda * tau on the density mask of v * tau**2, and b elsewhere."""
    g, base, (expert,) = problem(seed, shape, 1)
    v = log_uniform(shape, g, -6, 3)
    tau = expert - base
    mask = density_mask(v * tau.square(), density)
    out = ffg_merge(base, [expert], [v], [KeepRule(density=density)], [1.0], lambda_=lambda_)
    assert torch.equal(out[~mask], base[~mask])
    expected = base.double() + lambda_ * tau.double()
    assert_close(out[mask], expected[mask], scale_of(base, expert))


@FAST
@given(seed=seeds, shape=shapes)
def test_saliency_is_v_times_tau_squared(seed, shape):
    """saliency(tau, v) = v * tau**2 in float32."""
    g = gen(seed)
    tau = randn(shape, g)
    v = log_uniform(shape, g, -5, 3)
    expected = v.double() * tau.double() ** 2
    torch.testing.assert_close(saliency(tau, v).double(), expected, rtol=1e-6, atol=0.0)


def scores_for(kind: str, shape, g) -> torch.Tensor:
    if kind == "continuous":
        return randn(shape, g).abs()
    if kind == "integers":
        return torch.randint(0, 3, shape, generator=g).to(torch.float32)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "constant":
        return torch.full(shape, 2.5)
    raise AssertionError(kind)


@FAST
@given(
    seed=seeds,
    shape=mask_shapes,
    density=mask_densities,
    kind=score_kinds,
)
def test_density_mask_keeps_exactly_k_highest_even_with_ties(seed, shape, density, kind):
    """density_mask keeps exactly k = max(1, int(d * numel)) entries, each >= every dropped one."""
    scores = scores_for(kind, shape, gen(seed))
    mask = density_mask(scores, density)
    numel = scores.numel()
    k = min(numel, max(1, int(density * numel)))
    assert kept_count(numel, density) == k
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == k
    if k < numel:
        assert float(scores[mask].min()) >= float(scores[~mask].max())
    # Deterministic: the same input gives the same mask.
    assert torch.equal(mask, density_mask(scores.clone(), density))


@FAST
@given(
    seed=seeds,
    shape=mask_shapes,
    density=mask_densities,
    kind=score_kinds,
    out=st.booleans(),
)
def test_density_mask_equals_the_plain_definition(seed, shape, density, kind, out):
    """The fast density_mask (sampled selection, chunked tie search; into a float buffer or not) keeps exactly the
    entries reference_mask keeps: the k largest, ties by the lowest flat index."""
    scores = scores_for(kind, shape, gen(seed))
    expected = reference_mask(scores, density)
    got = density_mask(scores, density, out=torch.empty_like(scores) if out else None)
    assert torch.equal(got.bool(), expected)


@FAST
@given(
    seed=seeds,
    shape=shapes,
    n_experts=st.integers(1, 4),
    weights=st.lists(weight_values, min_size=4, max_size=4),
    power=st.sampled_from([0.5, 1.0, 2.0]),
    lambda_=lams,
    densities=st.one_of(st.none(), st.lists(st.floats(0.05, 1.0), min_size=4, max_size=4)),
    with_base=st.booleans(),
)
def test_ota_merge_equals_the_plain_formula(seed, shape, n_experts, weights, power, lambda_, densities, with_base):
    """ota_merge (buffers reused, weights pre-scaled, masks as numbers) equals reference_ota, the formula evaluated
    in float64 on stacked experts, with or without a base and FFG density masks."""
    g, base, experts = problem(seed, shape, n_experts)
    weights = weights[:n_experts]
    curvatures = [log_uniform(shape, g, -8, -2) for _ in experts]
    if not with_base:
        densities = None
    rules = masks = None
    if densities is not None:
        rules = [KeepRule(density=d) for d in densities[:n_experts]]
        masks = [reference_mask(saliency(t - base, v), r.density) for t, v, r in zip(experts, curvatures, rules)]
    out = ota_merge(
        base if with_base else None,
        experts,
        curvatures,
        weights,
        rules=rules,
        power=power,
        lambda_=lambda_ if with_base else 1.0,
    )
    expected = reference_ota(
        base if with_base else None,
        experts,
        curvatures,
        weights,
        masks=masks,
        power=power,
        lambda_=lambda_ if with_base else 1.0,
    )
    assert_close(out, expected, scale_of(base, *experts), rtol=1e-5)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(density):
    """kept_count (and density_mask) reject densities outside (0, 1]."""
    with pytest.raises(ValueError, match="density"):
        kept_count(10, density)
    with pytest.raises(ValueError, match="density"):
        density_mask(torch.rand(10), density)


@FAST
@given(
    seed=seeds,
    shape=shapes,
    kind=st.sampled_from(["continuous", "integers", "zeros"]),
    pick=st.integers(min_value=0, max_value=10_000),
    offset=st.sampled_from([0.0, 0.5, -0.5]),
)
def test_threshold_mask_keeps_exactly_scores_at_or_above_threshold(seed, shape, kind, pick, offset):
    """threshold_mask(s, T) and KeepRule(threshold=T) keep exactly the entries with s >= T."""
    g = gen(seed)
    scores = scores_for(kind, shape, g)
    flat = scores.reshape(-1).tolist()
    threshold = flat[pick % len(flat)] + offset  # exactly representable in float32
    expected = torch.tensor([x >= threshold for x in flat]).reshape(shape)
    assert torch.equal(threshold_mask(scores, threshold), expected)

    tau = randn(shape, g)
    v = log_uniform(shape, g, -3, 3)
    s = saliency(tau, v)
    t_value = float(s.reshape(-1)[pick % s.numel()])
    rule_mask = KeepRule(threshold=t_value).mask(tau, v)
    assert torch.equal(rule_mask, s >= t_value)
    assert int(rule_mask.sum()) == sum(x >= t_value for x in s.reshape(-1).tolist())


def test_keep_rule_needs_exactly_one_of_density_and_threshold():
    """KeepRule rejects both or neither of density/threshold."""
    with pytest.raises(ValueError, match="exactly one"):
        KeepRule()
    with pytest.raises(ValueError, match="exactly one"):
        KeepRule(density=0.5, threshold=1.0)


# ----------------------------------------------------------------------------- histogram


@FEW
@given(
    seed=seeds,
    sizes=st.lists(st.integers(min_value=50, max_value=3000), min_size=2, max_size=5),
    density=st.floats(min_value=0.01, max_value=0.9),
    zero_fraction=st.floats(min_value=0.0, max_value=0.05),
)
def test_histogram_model_wide_threshold_keeps_requested_density(seed, sizes, density, zero_fraction):
    """One threshold from the streamed histogram keeps at least the k = kept_count(N, density) entries asked
    for, and at most 0.5 % of N more (the mass of one ~0.2 %-wide bin); k itself rounds density * N down."""
    g = gen(seed)
    tensors = []
    for size in sizes:
        scale = 10.0 ** float(torch.empty(1).uniform_(-10, 10, generator=g))
        s = log_uniform((size,), g, -12, 12) * scale
        s = torch.where(torch.rand(size, generator=g) < zero_fraction, 0.0, s)
        tensors.append(s)
    histogram = SaliencyHistogram()
    for s in tensors:
        histogram.add(s)
    total = sum(sizes)
    assert histogram.total == total
    threshold = histogram.threshold_for_density(density)
    kept = sum(int((s >= threshold).sum()) for s in tensors)
    k = kept_count(total, density)
    assert kept >= k
    assert (kept - k) / total <= 0.005


@FEW
@given(
    seed=seeds,
    sizes=st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=4),
    density=st.floats(min_value=0.01, max_value=1.0),
)
def test_histogram_merge_equals_single_histogram(seed, sizes, density):
    """Merging per-tensor histograms gives the same counts and threshold as one histogram of all entries."""
    g = gen(seed)
    tensors = [torch.where(torch.rand(n, generator=g) < 0.1, 0.0, log_uniform((n,), g, -30, 30)) for n in sizes]
    merged = SaliencyHistogram()
    for s in tensors:
        part = SaliencyHistogram()
        part.add(s)
        merged.merge(part)
    whole = SaliencyHistogram()
    whole.add(torch.cat(tensors))
    assert merged.total == whole.total == sum(sizes)
    assert merged.zeros == whole.zeros
    assert torch.equal(merged.counts, whole.counts)
    assert merged.threshold_for_density(density) == whole.threshold_for_density(density)


@FEW
@given(
    seed=seeds,
    sizes=st.lists(st.integers(min_value=1, max_value=4000), min_size=1, max_size=4),
    specials=st.lists(st.sampled_from([0.0, -0.0, float("nan"), -1.0, float("inf")]), max_size=6),
)
def test_histogram_of_small_tensors_updates_only_their_bins_with_the_same_counts_and_mass(seed, sizes, specials):
    """The sparse update used for tensors far smaller than the bin count gives exactly the counts, and the same
    per-bin saliency sums (float64, to rounding), as the full-size bincount, zeros, -0.0, NaN and negatives
    included; the thresholds read from the two are equal."""
    import mergekit_ota.math.histogram as histogram

    g = gen(seed)
    tensors = [log_uniform((n,), g, -30, 30) for n in sizes]
    tensors[0] = torch.cat([tensors[0], torch.tensor(specials, dtype=torch.float32)])
    built, default = {}, histogram.SPARSE_BELOW
    try:
        for name, below in (("sparse", histogram.BINS), ("dense", 0)):
            histogram.SPARSE_BELOW = below
            h = SaliencyHistogram()
            for s in tensors:
                h.add(s, with_mass=True)
            built[name] = h
    finally:
        histogram.SPARSE_BELOW = default
    sparse, dense = built["sparse"], built["dense"]
    assert torch.equal(sparse.counts, dense.counts) and sparse.zeros == dense.zeros
    assert torch.allclose(sparse.mass, dense.mass, rtol=1e-12, atol=0.0)
    for q in (0.5, 0.9, 0.99):
        assert sparse.threshold_for_mass(q) == dense.threshold_for_mass(q)
    assert sparse.threshold_for_density(0.3) == dense.threshold_for_density(0.3)


def test_histogram_edge_cases():
    """Empty histogram -> threshold 0; all-zero saliency -> threshold 0 (keep everything)."""
    assert SaliencyHistogram().threshold_for_density(0.5) == 0.0
    h = SaliencyHistogram()
    h.add(torch.zeros(100))
    assert h.total == 100 and h.zeros == 100
    assert h.threshold_for_density(0.5) == 0.0


# ----------------------------------------------------------------------------- rank-1


matrix_shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@FAST
@given(seed=seeds, shape=matrix_shapes, log_lo=st.floats(min_value=-20, max_value=0))
def test_rank1_factors_are_row_and_column_sums_and_reconstruction_keeps_them(seed, shape, log_lo):
    """r = v.sum(1), c = v.sum(0); v_hat = outer(r, c) / sum(v) has the same row and column sums."""
    g = gen(seed)
    v = log_uniform(shape, g, log_lo, log_lo + 6)
    v = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, v)
    r, c = rank1_factors(v)
    assert r.shape == (shape[0],) and c.shape == (shape[1],)
    assert r.dtype == c.dtype == torch.float32
    torch.testing.assert_close(r.double(), v.double().sum(1), rtol=1e-5, atol=0.0)
    torch.testing.assert_close(c.double(), v.double().sum(0), rtol=1e-5, atol=0.0)
    v_hat = rank1_reconstruct(r, c)
    assert v_hat.shape == shape and v_hat.dtype == torch.float32
    assert (v_hat >= 0).all()
    tol = 1e-5 * float(v.double().sum())
    torch.testing.assert_close(v_hat.double().sum(1), r.double(), rtol=1e-5, atol=tol)
    torch.testing.assert_close(v_hat.double().sum(0), c.double(), rtol=1e-5, atol=tol)


@FAST
@given(seed=seeds, shape=matrix_shapes, zero_rows=st.booleans())
def test_rank1_reconstruct_of_rank1_matrix_is_exact(seed, shape, zero_rows):
    """An exactly rank-1 non-negative matrix (possibly with zero rows) is reconstructed from its factors."""
    g = gen(seed)
    a = log_uniform((shape[0],), g, -4, 4)
    b = log_uniform((shape[1],), g, -4, 4)
    if zero_rows:
        a = torch.where(torch.rand(shape[0], generator=g) < 0.3, 0.0, a)
    v = torch.outer(a, b)
    v_hat = rank1_reconstruct(*rank1_factors(v))
    torch.testing.assert_close(v_hat.double(), v.double(), rtol=1e-5, atol=1e-6 * float(v.max()) + 1e-30)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2)])
def test_rank1_all_zero_matrix_gives_zeros(shape):
    """rank-1 factors of an all-zero matrix reconstruct to zeros (no division by zero)."""
    r, c = rank1_factors(torch.zeros(shape))
    v_hat = rank1_reconstruct(r, c)
    assert v_hat.shape == shape and v_hat.dtype == torch.float32
    assert torch.equal(v_hat, torch.zeros(shape))


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_rank1_factors_reject_non_matrices(shape):
    """rank1_factors needs a 2-D tensor."""
    with pytest.raises(ValueError, match="2-D"):
        rank1_factors(torch.rand(shape))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_rank1_curvature_to_honours_dtype_as_tensor_to_does(dtype):
    """Rank1Curvature.to(dtype=...) and .to(dtype) convert both factors (it used to ignore dtype), and .to() without
    a dtype keeps float32, so dense() equals the dense tensor's own .to(dtype) up to that dtype's rounding."""
    v = Rank1Curvature.from_sums(torch.rand(3) + 0.1, torch.rand(4) + 0.1)
    for moved in (v.to(dtype=dtype), v.to(dtype), v.to("cpu", dtype)):
        assert moved.row.dtype == moved.col.dtype == dtype
        assert moved.shape == v.shape
        torch.testing.assert_close(moved.dense().double(), v.dense().double(), rtol=2e-3, atol=0.0)
    kept = v.to(device="cpu")
    assert kept.row.dtype == kept.col.dtype == torch.float32
    assert torch.equal(kept.dense(), v.dense())
