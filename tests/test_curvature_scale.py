"""`curvature_scale: none | mean | median`: OTA divides each expert's v by one model-wide statistic of it.

Properties: the statistic is positively homogeneous, so OTA does not change when one expert's curvature is
scaled by any c (mean; median for powers of two, and within one histogram bin otherwise); a rank-1 tensor has
the mean of the v it compresses and the median of its reconstruction; the statistic is of raw v, so it
replaces bias correction; FFG thresholds stay on raw saliency. In a planned merge the statistic is computed in
the pass model-wide density makes (no extra read), or in one extra pass over the curvature only, and equals
the in-memory computation over the same tensors. `inspect` and `analyze` show each expert's scale side by side.
"""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_state_dicts, merge_tensors
from merging import merge as _merge
from safetensors.torch import load_file

from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.curvature.writer import save_store
from mergekit_ota.errors import ConfigError, PreflightError
from mergekit_ota.math import KeepRule, Rank1Curvature, ota_merge, rank1_factors
from mergekit_ota.math import scale as scale_module
from mergekit_ota.math.scale import CurvatureScale

FAST = settings(max_examples=40, deadline=None)
FEW = settings(max_examples=20, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
BIN = 2.0**-9  # relative width of a histogram bin (math/histogram.py)


@pytest.fixture(scope="module", autouse=True)
def registered():
    from mergekit_ota.methods import register_methods

    register_methods()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_uniform(shape, g, lo: float, hi: float) -> torch.Tensor:
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return torch.pow(10.0, lo + (hi - lo) * u).to(torch.float32)


def lower_median(values: torch.Tensor) -> float:
    flat = values.reshape(-1).double().sort().values
    return float(flat[(flat.numel() - 1) // 2])


def statistic(tensors, mode: str) -> float:
    scale = CurvatureScale(median=mode == "median")
    for v in tensors:
        scale.add(v)
    return scale.value(mode)


# ----------------------------------------------------------------------------- the statistic (math/scale.py)


@FAST
@given(seed=seeds, m=st.integers(1, 9), n=st.integers(1, 9))
def test_mean_of_a_rank1_tensor_equals_the_mean_of_the_full_tensor_it_compresses(seed, m, n):
    """Rank-1 compression keeps every row and column sum, so sum(v_hat) = sum(v): under mean, a rank-1 store
    and the full store of the same v give the same statistic (computed from the m + n factors)."""
    v = log_uniform((m, n), gen(seed), -12, -4)
    compressed = Rank1Curvature.from_sums(*rank1_factors(v))
    assert statistic([compressed], "mean") == pytest.approx(statistic([v], "mean"), rel=1e-6)
    assert statistic([compressed], "mean") == pytest.approx(float(v.double().mean()), rel=1e-6)


@FEW
@given(seed=seeds, m=st.integers(1, 12), n=st.integers(1, 12), block=st.integers(1, 40))
def test_rank1_median_is_the_median_of_its_reconstruction_binned_blockwise(seed, m, n, block):
    """The documented rank-1 median: the entries of v_hat = outer(row, col), binned a few rows at a time,
    give exactly the histogram (so the median) of the materialised reconstruction, whatever the block size."""
    v = log_uniform((m, n), gen(seed), -12, -4)
    compressed = Rank1Curvature.from_sums(*rank1_factors(v))
    blockwise = CurvatureScale(median=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scale_module, "BLOCK", block)
        blockwise.add(compressed)
    whole = CurvatureScale(median=True)
    whole.add(compressed.dense())
    assert torch.equal(blockwise.histogram.counts, whole.histogram.counts)
    assert blockwise.lower_median() == whole.lower_median()
    exact = lower_median(compressed.dense())
    assert blockwise.lower_median() <= exact < blockwise.lower_median() * (1 + BIN)


@FAST
@given(seed=seeds, sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4), span=st.floats(0.0, 20.0))
def test_median_is_the_bin_holding_the_lower_median_over_all_tensors(seed, sizes, span):
    """Over several tensors, m <= x < m (1 + 2**-9) for x the exact lower median of all their entries."""
    g = gen(seed)
    tensors = [log_uniform((size,), g, -10 - span / 2, -10 + span / 2) for size in sizes]
    m = statistic(tensors, "median")
    x = lower_median(torch.cat(tensors))
    assert m <= x < m * (1 + BIN)


@FEW
@given(seed=seeds, size=st.integers(1, 200), log_c=st.floats(-8.0, 8.0), k=st.integers(-30, 30))
def test_statistics_scale_with_the_curvature(seed, size, log_c, k):
    """mean(c v) = c mean(v) for any c > 0; median(2**k v) = 2**k median(v) exactly (bins are float32 bit
    patterns), and for any c within one bin."""
    v = log_uniform((size,), gen(seed), -9, -5)
    c = 10.0**log_c
    assert statistic([v * c], "mean") == pytest.approx(c * statistic([v], "mean"), rel=1e-6)
    assert statistic([v * 2.0**k], "median") == 2.0**k * statistic([v], "median")
    ratio = statistic([v * c], "median") / (c * statistic([v], "median"))
    assert 1 / (1 + BIN) - 1e-6 < ratio < 1 + BIN + 1e-6


# ----------------------------------------------------------------------------- OTA in memory


def problem(seed, shape, n_experts):
    g = gen(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + torch.randn(shape, generator=g) for _ in range(n_experts)]
    curvatures = [log_uniform(shape, g, -10 + 3 * i, -6 + 3 * i) for i in range(n_experts)]
    return base, experts, curvatures


@FAST
@given(
    seed=seeds,
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple),
    n_experts=st.integers(2, 3),
    log_c=st.floats(-8.0, 8.0),
    power=st.sampled_from([0.5, 1.0]),
    with_base=st.booleans(),
)
def test_ota_is_invariant_to_scaling_one_experts_curvature_under_mean(seed, shape, n_experts, log_c, power, with_base):
    """Under curvature_scale: mean, w_i = weight_i (v_i / m_i)**p + eps is unchanged when v_1 -> c v_1
    (m_1 -> c m_1; eps then acts on the normalised scale, so it is not even an exception)."""
    base, experts, curvatures = problem(seed, shape, n_experts)
    scaled = [curvatures[0] * 10.0**log_c, *curvatures[1:]]
    tensors, index = ([base, *experts], 0) if with_base else (experts, None)
    parameters = {"curvature_scale": "mean", "power": power}
    out = merge_tensors(tensors, "ota", base_index=index, parameters={**parameters, "curvature": curvatures})
    again = merge_tensors(tensors, "ota", base_index=index, parameters={**parameters, "curvature": scaled})
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)


@FEW
@given(
    seed=seeds,
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=2).map(tuple),
    log_c=st.floats(-8.0, 8.0),
    k=st.integers(-40, 40),
    power=st.sampled_from([0.5, 1.0]),
)
def test_ota_is_invariant_to_scaling_one_experts_curvature_under_median(seed, shape, log_c, k, power):
    """Under curvature_scale: median: scaling v_1 by 2**k leaves OTA unchanged (up to rounding); by any c it
    moves m_1 by less than one bin, so w_1 by a factor within (1 + 2**-9)**p, and theta by at most that
    relative change times the spread of the experts."""
    base, experts, curvatures = problem(seed, shape, 2)
    tensors = [base, *experts]
    parameters = {"curvature_scale": "median", "power": power}
    out = merge_tensors(tensors, "ota", base_index=0, parameters={**parameters, "curvature": curvatures})
    by_two = [curvatures[0] * 2.0**k, curvatures[1]]
    again = merge_tensors(tensors, "ota", base_index=0, parameters={**parameters, "curvature": by_two})
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)
    by_c = [curvatures[0] * 10.0**log_c, curvatures[1]]
    moved = merge_tensors(tensors, "ota", base_index=0, parameters={**parameters, "curvature": by_c})
    spread = (experts[0] - experts[1]).abs()
    assert bool(((moved - out).abs() <= 2 * power * BIN * spread + 1e-5).all())


def model(seed=0, steps=(20, 200)):
    """Three tensors per model; expert i's curvature is on its own scale (10**(3 i))."""
    g = gen(seed)
    shapes = {"a.weight": (12, 8), "b.bias": (30,), "c.weight": (5, 7)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    experts = [{n: b + torch.randn(b.shape, generator=g) for n, b in base.items()} for _ in steps]
    curvatures = [{n: log_uniform(s, g, -10 + 3 * i, -6 + 3 * i) for n, s in shapes.items()} for i in range(len(steps))]
    return base, experts, curvatures


def in_memory(base, experts, curvatures, **parameters):
    models = {"base": base, **{f"e{i}": e for i, e in enumerate(experts)}}
    curvature = {f"e{i}": c for i, c in enumerate(curvatures)}
    return merge_state_dicts(models, "ota", base="base", parameters={"curvature": curvature, **parameters})


@pytest.mark.parametrize("mode", ["mean", "median"])
def test_merge_state_dicts_divides_by_the_statistic_over_every_tensor_given(mode):
    """merge_state_dicts: m_i is the statistic of all of expert i's tensors in the call: the merge equals
    curvature_scale: none on v_i / m_i; merge_tensors on one tensor uses that tensor's statistic."""
    base, experts, curvatures = model()
    out = in_memory(base, experts, curvatures, curvature_scale=mode)
    m = [statistic(list(c.values()), mode) for c in curvatures]
    divided = [{n: v / mi for n, v in c.items()} for c, mi in zip(curvatures, m)]
    by_hand = in_memory(base, experts, divided, bias_correction=False, curvature_scale="none")
    for name in base:
        torch.testing.assert_close(out[name], by_hand[name], rtol=1e-5, atol=1e-6)
    name = "a.weight"
    one = merge_tensors(
        [base[name], *(e[name] for e in experts)],
        "ota",
        base_index=0,
        parameters={"curvature": [c[name] for c in curvatures], "curvature_scale": mode},
    )
    own = [c[name] / statistic([c[name]], mode) for c in curvatures]
    expected = merge_tensors(
        [base[name], *(e[name] for e in experts)],
        "ota",
        base_index=0,
        parameters={"curvature": own, "curvature_scale": "none"},
    )
    torch.testing.assert_close(one, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[name], one, atol=1e-4), "the model-wide statistic is not the tensor's"


def test_normalising_replaces_bias_correction():
    """The statistic is of raw v and normalising drops the bias correction: s_i v_i / m(s_i v_i) = v_i / m(v_i).
    So with curvature_scale the merge is the same with bias correction on or off, and differs from none."""
    base, experts, curvatures = model()
    known = {"optimizer_step": {"e0": 20, "e1": 200}, "beta2": 0.999}
    corrected = in_memory(base, experts, curvatures, curvature_scale="mean", bias_correction=True, **known)
    raw = in_memory(base, experts, curvatures, curvature_scale="mean", bias_correction=False, **known)
    for name in base:
        torch.testing.assert_close(corrected[name], raw[name], rtol=0, atol=0)
    plain = in_memory(base, experts, curvatures, bias_correction=True, curvature_scale="none", **known)
    assert any(not torch.allclose(plain[n], raw[n], atol=1e-4) for n in base)


def test_an_absolute_threshold_applies_to_the_raw_saliency_under_curvature_scale():
    """ota with an FFG threshold and curvature_scale: the mask is s_i = v_i tau_i**2 >= threshold on the raw
    v_i, the weights weight_i / m_i**p: exactly ota_merge with those rules and weights."""
    base, experts, curvatures = problem(3, (9, 7), 2)
    threshold = [float(torch.quantile((c * (t - base) ** 2).reshape(-1), 0.6)) for c, t in zip(curvatures, experts)]
    out = merge_tensors(
        [base, *experts],
        "ota",
        base_index=0,
        parameters={"curvature": curvatures, "curvature_scale": "mean", "threshold": threshold},
    )
    m = [statistic([c], "mean") for c in curvatures]
    expected = ota_merge(
        base, experts, curvatures, [mi**-0.5 for mi in m], rules=[KeepRule(threshold=t) for t in threshold]
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_a_zero_median_is_refused_and_all_zero_curvature_keeps_scale_one():
    """A median of 0 with a positive mean (most entries exactly 0) cannot divide: refused, naming the expert and
    pointing to mean. An all-zero curvature gives w_i = eps whatever m_i is: accepted (m_i = 1)."""
    base, experts, curvatures = problem(4, (6, 6), 2)
    sparse = curvatures[0].clone()
    sparse.reshape(-1)[:20] = 0.0
    with pytest.raises(ConfigError, match=r"median of expert 1's curvature is 0 .*use curvature_scale: mean"):
        merge_tensors(
            [base, *experts],
            "ota",
            base_index=0,
            parameters={"curvature": [sparse, curvatures[1]], "curvature_scale": "median"},
        )
    zero = [torch.zeros_like(curvatures[0]), curvatures[1]]
    out = merge_tensors(
        [base, *experts], "ota", base_index=0, parameters={"curvature": zero, "curvature_scale": "mean"}
    )
    m = statistic([curvatures[1]], "mean")
    expected = ota_merge(base, experts, zero, [1.0, m**-0.5])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_curvature_scale_takes_none_mean_or_median_defaults_to_mean_and_only_ota_takes_it():
    base, experts, curvatures = problem(5, (4, 4), 2)
    with pytest.raises(ConfigError, match=r"curvature_scale.*'none', 'mean' or 'median'"):
        merge_tensors(
            [base, *experts], "ota", base_index=0, parameters={"curvature": curvatures, "curvature_scale": "average"}
        )
    with pytest.raises(ConfigError, match="unknown parameter 'curvature_scale' for ffg"):
        merge_tensors(
            [base, *experts],
            "ffg",
            base_index=0,
            parameters={"curvature": curvatures, "density": 0.5, "curvature_scale": "mean"},
        )
    default = merge_tensors([base, *experts], "ota", base_index=0, parameters={"curvature": curvatures})
    given = {
        mode: merge_tensors(
            [base, *experts], "ota", base_index=0, parameters={"curvature": curvatures, "curvature_scale": mode}
        )
        for mode in ("none", "mean")
    }
    assert torch.equal(default, given["mean"])
    assert not torch.allclose(default, given["none"], atol=1e-6)


# ----------------------------------------------------------------------------- planned merges


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from mergekit_ota.testing import make_family

    root = tmp_path_factory.mktemp("scale")
    full = make_family(str(root / "full"), n_experts=2)
    rank1 = make_family(str(root / "rank1"), n_experts=2, compress=True)
    # expert 1's curvature 1000x larger, as with another learning rate or loss scale, and with a known step
    stores = {}
    for kind, fam in (("full", full), ("rank1", rank1)):
        scaled = os.path.join(str(root), f"{kind}_expert_1.safetensors")
        save_store(
            {k: v * 1000.0 for k, v in load_file(fam.stores[1]).items()},
            scaled,
            metadata={"step": "200", "beta2": "0.999"},
        )
        stores[kind] = [fam.stores[0], scaled]
    return {"full": full, "rank1": rank1, "stores": stores}


def _config(fam, stores, expert=None, **shared):
    models = [{"model": e, "parameters": {"curvature": s, **(expert or {})}} for e, s in zip(fam.experts, stores)]
    return {"merge_method": "ota", "base_model": fam.base, "models": models, "dtype": "float32", "parameters": shared}


def _check(cfg):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.preflight import check_config

    return check_config(MergeConfiguration.model_validate(cfg), MergeOptions(quiet=True))


def _state(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _curvature(store):
    opened = CurvatureStore.open(store)
    return {name: opened.load(name, factored=True) for name in opened.names()}


@pytest.mark.parametrize(
    "mode,kind,density",
    [
        ("mean", "full", None),
        ("median", "full", None),
        ("mean", "rank1", None),
        ("median", "rank1", None),
        ("median", "full", "model"),
    ],
)
def test_planned_merge_equals_the_in_memory_merge_of_the_same_tensors(family, tmp_path, mode, kind, density):
    """run_merge with curvature_scale (full or rank-1 stores, with or without model-wide density) equals
    merge_state_dicts on the same weights and curvature: the graph's statistic is over every tensor it reads."""
    fam, stores = family[kind], family["stores"][kind]
    extra = {"density": 0.3} if density else None
    shared = {"curvature_scale": mode, **({"density_scope": density} if density else {})}
    graph = _merge(_config(fam, stores, extra, **shared), tmp_path / "out")
    models = {"base": _state(fam.base), "e0": _state(fam.experts[0]), "e1": _state(fam.experts[1])}
    curvature = {"e0": _curvature(stores[0]), "e1": _curvature(stores[1])}
    memory = merge_state_dicts(
        models, "ota", base="base", parameters={"curvature": curvature, **shared, **(extra or {})}
    )
    assert graph.keys() == memory.keys()
    for name in graph:
        torch.testing.assert_close(graph[name], memory[name], rtol=1e-5, atol=1e-7)
    unscaled = {"curvature_scale": "none", **({"density_scope": density} if density else {})}
    plain = _merge(_config(fam, stores, extra, **unscaled), tmp_path / "plain")
    assert any(not torch.allclose(plain[n], graph[n], atol=1e-6) for n in graph), "curvature_scale had no effect"


@pytest.fixture
def reads(monkeypatch):
    """Counts of curvature tensors (CurvatureStore.load) and weights (mergekit's LoadTensor) read."""
    from mergekit.io.tasks import LoadTensor

    counts = {"curvature": 0, "weights": 0}
    load, execute = CurvatureStore.load, LoadTensor.execute

    def counted_load(self, *args, **kwargs):
        counts["curvature"] += 1
        return load(self, *args, **kwargs)

    def counted_execute(self, *args, **kwargs):
        counts["weights"] += 1
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(CurvatureStore, "load", counted_load)
    monkeypatch.setattr(LoadTensor, "execute", counted_execute)
    return counts


def test_the_statistic_costs_no_read_with_model_wide_density_and_one_curvature_pass_without(family, tmp_path, reads):
    """With density_scope: model the statistic comes from the pass model-wide density makes anyway: exactly the
    reads of the same merge without curvature_scale. Without that pass it costs one extra read of every
    curvature tensor and no extra read of any weight."""
    fam, stores = family["full"], family["stores"]["full"]
    counted = {}
    for scope in ("tensor", "model"):
        for mode in ("none", "mean"):
            before = dict(reads)
            _merge(
                _config(fam, stores, {"density": 0.3}, density_scope=scope, curvature_scale=mode),
                tmp_path / f"{scope}-{mode}",
            )
            counted[scope, mode] = {k: reads[k] - before[k] for k in reads}
    tensors = 21 * 2  # every tensor of both experts
    assert counted["tensor", "none"]["curvature"] == tensors
    assert counted["tensor", "mean"] == {"curvature": 2 * tensors, "weights": counted["tensor", "none"]["weights"]}
    assert counted["model", "none"]["curvature"] == 2 * tensors
    assert counted["model", "mean"] == counted["model", "none"]


def test_check_and_the_merge_log_say_what_scale_each_expert_gets(family, tmp_path, caplog):
    """check notes, per expert, that curvature_scale replaces bias correction and where the statistic will be
    computed (it is not known before the merge reads the curvature); the merge log gives each expert's value,
    the one merge_state_dicts computes; the bias mismatch warning is gone (the scales are evened out)."""
    fam, stores = family["full"], family["stores"]["full"]
    warned = _check(_config(fam, stores, curvature_scale="none"))
    assert any("curvature scales may differ" in w for w in warned.warnings)
    default = _check(_config(fam, stores))
    assert not any("curvature scales may differ" in w for w in default.warnings), default.warnings
    assert f"bias correction, expert {fam.experts[1]}: replaced by curvature_scale: mean" in "\n".join(default.notes)
    report = _check(_config(fam, stores, curvature_scale="mean"))
    assert report.ok and not any("curvature scales may differ" in w for w in report.warnings), report.warnings
    notes = "\n".join(report.notes)
    assert f"bias correction, expert {fam.experts[1]}: replaced by curvature_scale: mean" in notes
    assert f"bias correction, expert {fam.experts[0]}: not corrected: no optimizer_step and beta2 known" in notes
    assert notes.count("computed during the merge in one extra pass over the curvature (no weights read)") == 2
    model_wide = _check(_config(fam, stores, {"density": 0.3}, curvature_scale="median", density_scope="model"))
    assert "computed during the merge in the model-wide density pass (no read beyond it)" in "\n".join(model_wide.notes)
    with caplog.at_level(logging.INFO, logger="mergekit_ota"):
        _merge(_config(fam, stores, curvature_scale="mean"), tmp_path / "out")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("curvature scale, expert")]
    for expert, store in zip(fam.experts, stores):
        m = statistic(list(_curvature(store).values()), "mean")
        assert any(
            line.startswith(f"curvature scale, expert {expert}: mean of v = {m:.4g} over 90,432 entries")
            for line in logged
        ), logged


def test_one_curvature_scale_for_the_whole_merge(family, tmp_path):
    """curvature_scale divides by one model-wide statistic: a config that sets it per tensor is refused."""
    fam, stores = family["full"], family["stores"]["full"]
    cfg = _config(fam, stores, curvature_scale=[{"filter": "mlp", "value": "mean"}, {"value": "none"}])
    with pytest.raises(PreflightError, match="curvature_scale must be one value for the whole merge"):
        _merge(cfg, tmp_path / "out")


# ----------------------------------------------------------------------------- inspect and analyze


def _invoke(*args):
    from mergekit_ota.cli.main import main

    return CliRunner().invoke(main, list(args))


def test_inspect_several_stores_shows_their_scales_side_by_side_from_one_read_each(family, monkeypatch):
    """`inspect A B`: each store's own report, then per store the mean and median of v over all its tensors,
    step, beta2, 1 - beta2**step, bias-corrected and mean / smallest (JSON too), each store read once (as
    many reads as inspecting it alone). One store: the output has no comparison."""
    stores = [family["full"].stores[0], family["stores"]["rank1"][1]]  # full, and rank-1 x1000 with step 200
    reads = {"n": 0}
    read_entry = CurvatureStore.read_entry

    def counted(self, *args, **kwargs):
        reads["n"] += 1
        return read_entry(self, *args, **kwargs)

    monkeypatch.setattr(CurvatureStore, "read_entry", counted)
    alone = []
    for store in stores:
        assert "scale" not in json.loads(_invoke("inspect", store, "--json").stdout)
        before = reads["n"]
        single = _invoke("inspect", store)
        assert single.exit_code == 0 and "side by side" not in single.output
        alone.append(reads["n"] - before)
    before = reads["n"]
    result = _invoke("inspect", *stores, "--json")
    assert result.exit_code == 0, result.output
    assert reads["n"] - before == sum(alone)
    data = json.loads(result.stdout)
    assert [s["path"] for s in data["stores"]] == [CurvatureStore.open(s).path for s in stores]
    rows = data["scale_comparison"]
    values = [
        torch.cat(
            [v.dense().reshape(-1) if isinstance(v, Rank1Curvature) else v.reshape(-1) for v in _curvature(s).values()]
        )
        for s in stores
    ]
    for row, store, v in zip(rows, stores, values):
        assert row["label"] == store and row["tensors"] == 21 and row["entries"] == v.numel()
        assert row["mean"] == pytest.approx(float(v.double().mean()), rel=1e-6)
        assert row["median"] <= lower_median(v) < row["median"] * (1 + BIN)
    assert (rows[0]["step"], rows[0]["beta2"], rows[0]["bias_factor"]) == (None, None, None)
    assert (rows[1]["step"], rows[1]["beta2"]) == (200, 0.999)
    assert rows[1]["bias_factor"] == pytest.approx(1 - 0.999**200)
    assert rows[0]["mean_over_smallest"] == 1.0
    assert rows[1]["mean_over_smallest"] == pytest.approx(rows[1]["mean"] / rows[0]["mean"])
    text = _invoke("inspect", *stores).output
    assert "curvature scale, side by side" in text
    line = next(line for line in text.splitlines() if line.startswith(stores[1]))
    assert f"{rows[1]['mean']:.3e}" in line and "0.1814" in line and f"{rows[1]['mean_over_smallest']:.3g}x" in line


def test_analyze_report_shows_the_same_scale_table_as_inspect(family, tmp_path):
    """analyze's report.md has the side-by-side scale table of its experts, built by the same function as
    inspect's (same cells for the same stores), from its metrics pass; metrics.json has the numbers."""
    from mergekit_ota.curvature.contents import inspect_store, scale_table

    fam = family["full"]
    out = tmp_path / "report"
    result = _invoke(
        "analyze",
        "--base",
        fam.base,
        *(f"{e}:{s}" for e, s in zip(fam.experts, family["stores"]["full"])),
        "--out",
        str(out),
        "--quiet",
        "--rank-top",
        "0",
    )
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    reports = [inspect_store(CurvatureStore.open(s), scale=True) for s in family["stores"]["full"]]
    _, rows = scale_table([r.scale for r in reports])
    metrics = json.loads((out / "metrics.json").read_text())["curvature_scale"]
    for row, numbers in zip(rows, metrics):
        assert " | ".join(row[1:]) in report, (row, report)
        assert numbers["mean"] == pytest.approx(float(row[2]), rel=1e-3) and numbers["step"] == (
            None if row[4] == "-" else int(row[4])
        )
    assert math.isclose(metrics[1]["mean_over_smallest"], metrics[1]["mean"] / metrics[0]["mean"])


def test_ffg_takes_no_curvature_statistics_whatever_otas_default(monkeypatch):
    """curvature_scale is ota's: an in-memory ffg merge makes no pass over the curvature for a statistic
    (ota's default mean would), and its result does not depend on the curvature's scale."""
    from mergekit_ota.methods import base as method_base
    from mergekit_ota.methods.scale import add_curvatures

    calls = []
    monkeypatch.setattr(method_base, "add_curvatures", lambda *a: calls.append(a) or add_curvatures(*a))
    base, experts, curvatures = problem(5, (6, 4), 2)
    parameters = {"density": 0.5, "normalize": True}
    out = merge_tensors([base, *experts], "ffg", base_index=0, parameters={**parameters, "curvature": curvatures})
    assert calls == []
    scaled = merge_tensors(
        [base, *experts], "ffg", base_index=0, parameters={**parameters, "curvature": [v * 1e3 for v in curvatures]}
    )
    assert torch.equal(out, scaled)
    merge_tensors([base, *experts], "ota", base_index=0, parameters={"curvature": curvatures})
    assert calls, "ota under the default curvature_scale: mean computes its statistic"
