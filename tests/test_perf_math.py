"""Properties of the speed-ups in :mod:`mergekit_ota.math`: sampled selection, tie breaking,
bit-pattern saliency histogram, buffer reuse.

The fast paths only run on large tensors; the tests shrink their size constants
(``monkeypatch``) so that small hypothesis-drawn tensors take them, and compare
against plain references (``torch.kthvalue``, a stable sort, direct counting).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_ota.math import KeepRule, SaliencyHistogram, density_mask, ffg_merge, kept_count, ota_merge
from mergekit_ota.math import ffg as ffg_module
from mergekit_ota.math import histogram as histogram_module
from mergekit_ota.math.ffg import kth_largest
from mergekit_ota.math.floats import f32_operand
from mergekit_ota.math.reference import reference_mask

FEW = settings(max_examples=30, deadline=None)
# The fixture below only sets constants, identical for every example: sharing it is safe.
PATCHED = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@pytest.fixture
def small_fast_paths(monkeypatch):
    """Make the sampled selection (256-entry sample) and chunked tie search apply to tensors of a few hundred
    entries."""
    monkeypatch.setattr(ffg_module, "_SELECTION_MIN", 32)
    monkeypatch.setattr(ffg_module, "SELECTION_SAMPLE", 256)
    monkeypatch.setattr(ffg_module, "_TIE_CHUNK", 64)


def scores_with_ties(seed: int, n: int, zero_fraction: float, distinct: int) -> torch.Tensor:
    """Non-negative scores with many zeros and heavy ties (``distinct`` values besides 0, or continuous if 0)."""
    g = torch.Generator().manual_seed(seed)
    if distinct:
        s = torch.randint(1, distinct + 1, (n,), generator=g).to(torch.float32) / distinct
    else:
        s = torch.rand(n, generator=g) ** 3
    return torch.where(torch.rand(n, generator=g) < zero_fraction, 0.0, s)


@PATCHED
@given(
    seed=seeds,
    n=st.integers(min_value=33, max_value=4000),
    zero_fraction=st.sampled_from([0.0, 0.3, 0.95]),
    distinct=st.sampled_from([0, 1, 3, 50]),
    density=st.floats(min_value=1e-4, max_value=1.0),
)
def test_sampled_selection_equals_kthvalue(small_fast_paths, seed, n, zero_fraction, distinct, density):
    """kth_largest(values, k) is exactly torch.kthvalue(values, n - k + 1), whatever the bracket did."""
    values = scores_with_ties(seed, n, zero_fraction, distinct)
    k = kept_count(n, density)
    assert kth_largest(values, k) == torch.kthvalue(values, n - k + 1).values


def test_sampled_selection_with_nan_falls_back_to_kthvalue(small_fast_paths):
    """NaN entries (ranked above everything by kthvalue) never make the bracketed answer differ."""
    values = torch.rand(500, generator=torch.Generator().manual_seed(3))
    values[::7] = float("nan")
    for k in (1, 50, 200, 430, 499):
        expected = torch.kthvalue(values, 500 - k + 1).values
        got = kth_largest(values, k)
        assert (torch.isnan(got) and torch.isnan(expected)) or got == expected


@PATCHED
@given(
    seed=seeds,
    rows=st.integers(min_value=1, max_value=40),
    cols=st.integers(min_value=1, max_value=30),
    zero_fraction=st.sampled_from([0.0, 0.5, 0.97]),
    distinct=st.sampled_from([0, 1, 4]),
    density=st.floats(min_value=1e-3, max_value=1.0),
)
def test_density_mask_keeps_k_largest_ties_lowest_index_first(
    small_fast_paths, seed, rows, cols, zero_fraction, distinct, density
):
    """density_mask keeps exactly k entries: the k largest, ties at the k-th value by lowest flat index."""
    scores = scores_with_ties(seed, rows * cols, zero_fraction, distinct).reshape(rows, cols)
    assert torch.equal(density_mask(scores, density), reference_mask(scores, density))


@PATCHED
@given(seed=seeds, n=st.integers(min_value=1, max_value=5000), fraction=st.floats(min_value=0.0, max_value=1.0))
def test_end_of_nth_true_matches_nonzero(small_fast_paths, seed, n, fraction):
    """The chunked search returns the index just past the n-th True, as torch.nonzero would."""
    flags = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < fraction
    positions = torch.nonzero(flags, as_tuple=True)[0]
    for nth in {1, max(1, positions.numel() // 2), positions.numel()}:
        if 1 <= nth <= positions.numel():
            assert ffg_module._end_of_nth_true(flags, nth) == int(positions[nth - 1]) + 1


# ----------------------------------------------------------------------------- histogram


@FEW
@given(
    seed=seeds,
    n=st.integers(min_value=1, max_value=3000),
    lo=st.integers(min_value=-40, max_value=0),
    span=st.integers(min_value=0, max_value=40),
    density=st.floats(min_value=1e-4, max_value=1.0),
)
def test_histogram_threshold_keeps_exactly_the_counted_entries(seed, n, lo, span, density):
    """#(s >= T) equals the count the histogram holds at and above T's bin, and overshoots k by less than one bin."""
    g = torch.Generator().manual_seed(seed)
    s = torch.pow(10.0, lo + span * torch.rand(n, generator=g, dtype=torch.float64)).to(torch.float32)
    s = torch.where(torch.rand(n, generator=g) < 0.2, 0.0, s)
    histogram = SaliencyHistogram()
    histogram.add(s)
    threshold = histogram.threshold_for_density(density)
    kept = int((s >= threshold).sum())
    k = kept_count(n, density)
    if threshold == 0.0:
        assert kept == n or k > int((s > 0).sum())
        return
    index = int(torch.tensor([threshold], dtype=torch.float32).view(torch.int32)) >> histogram_module.SHIFT
    assert threshold == histogram_module.bin_edge(index)
    assert kept == int(histogram.counts[index : histogram_module.BINS].sum())
    assert k <= kept < k + int(histogram.counts[index])


def test_histogram_bins_are_relative_width_at_most_2_pow_minus_9():
    """Consecutive bin edges differ by at most 2**-9 relative: the threshold resolution the docs promise."""
    edges = torch.tensor([histogram_module.bin_edge(i) for i in range(1 << 12, 1 << 16, 97)], dtype=torch.float64)
    following = torch.tensor(
        [histogram_module.bin_edge(i + 1) for i in range(1 << 12, 1 << 16, 97)], dtype=torch.float64
    )
    assert float(((following - edges) / edges).max()) <= 2.0**-9


def test_histogram_counts_negative_zero_and_nan_as_zeros():
    """-0.0 and NaN saliency land with the zeros: they are never kept by s >= T for T > 0."""
    h = SaliencyHistogram()
    h.add(torch.tensor([-0.0, float("nan"), 0.0, 1.0, 2.0]))
    assert h.zeros == 3 and h.total == 5
    assert h.threshold_for_density(0.4) == 1.0


def test_histogram_overwrite_gives_the_same_counts():
    """add(scores, overwrite=True) counts like add(scores) (it only reuses the buffer)."""
    s = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) ** 5
    a, b = SaliencyHistogram(), SaliencyHistogram()
    a.add(s)
    b.add(s.clone(), overwrite=True)
    assert torch.equal(a.counts, b.counts) and a.zeros == b.zeros


# ----------------------------------------------------------------------------- merges


@FEW
@given(
    seed=seeds,
    n_experts=st.integers(min_value=1, max_value=4),
    with_base=st.booleans(),
    rule=st.sampled_from([None, "density", "threshold"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_merges_never_write_their_inputs(seed, n_experts, with_base, rule, dtype):
    """ota_merge and ffg_merge reuse their own buffers only: base, experts and curvature are unchanged."""
    g = torch.Generator().manual_seed(seed)
    shape = (13, 11)
    base = torch.randn(shape, generator=g).to(dtype)
    experts = [(base.float() + torch.randn(shape, generator=g)).to(dtype) for _ in range(n_experts)]
    curvatures = [torch.rand(shape, generator=g) for _ in range(n_experts)]
    copies = [t.clone() for t in [base, *experts, *curvatures]]
    keep = None if rule is None else KeepRule(density=0.3) if rule == "density" else KeepRule(threshold=0.05)
    rules = [keep] * n_experts if with_base else None
    ota_merge(base if with_base else None, experts, curvatures, [1.0] * n_experts, rules=rules)
    if with_base and keep is not None:
        ffg_merge(base, experts, curvatures, [keep] * n_experts, [0.5] * n_experts)
    assert all(torch.equal(a, b) for a, b in zip([base, *experts, *curvatures], copies))


@FEW
@given(seed=seeds, dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]))
def test_f32_operand_subtracts_exactly_like_converting_first(seed, dtype):
    """torch.sub(f32_operand(t), b) equals t.float() - b for half, single and double inputs."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(64, generator=g).to(dtype)
    b = torch.randn(64, generator=g)
    result = torch.sub(f32_operand(t), b)
    assert result.dtype == torch.float32
    assert torch.equal(result, t.to(torch.float32) - b)


# ----------------------------------------------------------------------------- rank-1 factored curvature


@FEW
@given(
    seed=seeds,
    m=st.integers(min_value=1, max_value=30),
    n=st.integers(min_value=1, max_value=30),
    power=st.sampled_from([0.5, 1.0, 0.3, 0.0]),
    weight=st.floats(min_value=0.0, max_value=3.0),
)
def test_rank1_weights_from_factors_equal_weights_of_the_reconstruction(seed, m, n, power, weight):
    """outer(weight * row**p, col**p) + eps equals weight * v_hat**p + eps (v_hat materialised) to float32 rounding."""
    from mergekit_ota.math import curvature_weights, rank1_reconstruct
    from mergekit_ota.math.rank1 import Rank1Curvature

    g = torch.Generator().manual_seed(seed)
    r, c = torch.rand(m, generator=g) * 1e-6, torch.rand(n, generator=g) * 1e-6
    factored = curvature_weights(Rank1Curvature.from_sums(r, c), weight, power, 1e-12)
    expected = curvature_weights(rank1_reconstruct(r, c), weight, power, 1e-12)
    torch.testing.assert_close(factored, expected, rtol=1e-5, atol=0.0)


def test_rank1_factors_narrow_scale_and_densify_like_the_matrix():
    """Rank1Curvature: dense() is rank1_reconstruct; narrow and * act on v_hat's rows/columns and values."""
    from mergekit_ota.math import rank1_reconstruct
    from mergekit_ota.math.rank1 import Rank1Curvature, dense

    g = torch.Generator().manual_seed(0)
    r, c = torch.rand(7, generator=g), torch.rand(5, generator=g)
    v = Rank1Curvature.from_sums(r, c)
    full = rank1_reconstruct(r, c)
    assert torch.equal(dense(v), full) and v.shape == full.shape
    assert torch.equal(dense(v.narrow(0, 1, 4)), full.narrow(0, 1, 4))
    assert torch.equal(dense(v.narrow(1, 2, 3)), full.narrow(1, 2, 3))
    torch.testing.assert_close(dense(v * 3.0), full * 3.0, rtol=1e-6, atol=0.0)
    assert torch.equal(dense(Rank1Curvature.from_sums(torch.zeros(3), c)), torch.zeros(3, 5))


@pytest.mark.parametrize("axis", [0, 1])
def test_permuted_rank1_curvature_equals_permuted_matrix(axis):
    """Vocabulary permutation of factored curvature (the factor along the axis) equals permuting v_hat's rows."""
    from types import SimpleNamespace

    from mergekit_ota.graph.tasks import PermutedCurvature
    from mergekit_ota.math.rank1 import Rank1Curvature, dense

    g = torch.Generator().manual_seed(1)
    v = Rank1Curvature.from_sums(torch.rand(6, generator=g), torch.rand(4, generator=g))
    vocab = {f"t{i}": i for i in range(8)}  # 8 merged tokens; the expert had 6 (one id missing, one added)
    info = SimpleNamespace(
        tokenizer=SimpleNamespace(get_vocab=lambda: vocab),
        permutations={"e": {0: 5, 1: 0, 2: 3, 3: -1, 4: 1, 5: 2, 6: 4}},
    )
    task = PermutedCurvature.model_construct(vocabulary_axis=axis, tokens=None, pad_to_multiple_of=None)
    matrix = dense(v) if axis == 0 else dense(v).T.contiguous()
    factors = v if axis == 0 else Rank1Curvature(v.col, v.row)
    got = task.execute(info, {"e": factors})["e"]
    expected = task.execute(info, {"e": matrix})["e"]
    assert isinstance(got, Rank1Curvature)
    assert torch.equal(dense(got), expected)


@pytest.fixture(scope="module")
def rank1_family(tmp_path_factory):
    """A family whose stores are rank-1, plus per expert a full store holding exactly the reconstructed v_hat."""
    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.testing import make_family, tiny_llama_config

    root = tmp_path_factory.mktemp("rank1")
    family = make_family(str(root), n_experts=2, config=tiny_llama_config(num_layers=2), compress=True)
    dense_stores = []
    for store in family.stores:
        opened = CurvatureStore.open(store)
        path = store.replace(".safetensors", "_dense.safetensors")
        save_store({name: opened.load(name) for name in opened.names()}, path)
        dense_stores.append(path)
    return family, dense_stores


@pytest.mark.parametrize(
    "parameters,shared",
    [
        ({}, {}),
        ({"density": 0.3}, {}),
        ({"density": 0.3}, {"density_scope": "model"}),
        ({"optimizer_step": 10, "beta2": 0.99}, {"bias_correction": True}),
    ],
    ids=["ota", "ota+ffg", "ota+ffg model-wide", "bias-corrected"],
)
def test_graph_merge_with_rank1_store_equals_merge_with_its_reconstruction(rank1_family, tmp_path, parameters, shared):
    """Merging with factored rank-1 curvature gives what the same merge gives with v_hat stored in full."""
    import os

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    family, dense_stores = rank1_family
    outputs = []
    for label, stores in (("factored", family.stores), ("dense", dense_stores)):
        cfg = {
            "merge_method": "ota",
            "base_model": family.base,
            "dtype": "float32",
            "parameters": shared,
            "models": [
                {"model": e, "parameters": {**parameters, "curvature": s}} for e, s in zip(family.experts, stores)
            ],
        }
        out = tmp_path / label
        run_merge(MergeConfiguration.model_validate(cfg), str(out), MergeOptions(quiet=True, copy_tokenizer=False))
        outputs.append(load_file(os.path.join(out, "model.safetensors")))
    factored, expected = outputs
    assert factored.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(factored[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
