"""``density: auto``: each expert's model-wide keep fraction from its own saliency mass, with no data.

Properties of the mass histogram (hypothesis), and the merges through mergekit's in-memory API and YAML.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_ota.catalog import saliency_mass_default
from mergekit_ota.math.histogram import SaliencyHistogram

SHAPES = {"a": (40, 30), "b": (300,), "c": (25, 25)}


def _saliencies(seed: int, spread: float):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(shape, generator=g, dtype=torch.float64) * spread).exp().float() * 1e-6 for shape in SHAPES.values()
    ]


def _hist(parts, factor: float = 1.0) -> SaliencyHistogram:
    h = SaliencyHistogram()
    for s in parts:
        h.add(s * factor, with_mass=True)
    return h


def _kept_mass(parts, threshold: float) -> float:
    s = torch.cat([p.reshape(-1).double() for p in parts])
    return float(s[s >= threshold].sum() / s.sum())


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.sampled_from([1.0, 8.0, 20.0]), mass=st.floats(0.05, 0.999))
def test_the_threshold_reaches_the_target_mass_and_is_the_largest_bin_edge_that_does(seed, spread, mass):
    """Kept mass sum(s >= T) / sum(s) >= target; the next bin edge up (T * (1 + 2**-9)) keeps less than it."""
    parts = _saliencies(seed, spread)
    threshold = _hist(parts).threshold_for_mass(mass)
    assert _kept_mass(parts, threshold) >= mass - 1e-9
    next_edge = float(torch.tensor(threshold, dtype=torch.float32).view(torch.int32) + (1 << 14))
    above = float(torch.tensor(int(next_edge), dtype=torch.int32).view(torch.float32))
    assert _kept_mass(parts, above) < mass + 1e-9


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.sampled_from([1.0, 8.0, 20.0]), zeros=st.integers(0, 50))
def test_the_mass_curve_is_kept_at_each_bin_edge_rises_and_ends_at_every_positive_entry_and_all_mass(
    seed, spread, zeros
):
    """mass_curve (what analyze draws): each point is the (entries, mass) fraction that s >= T keeps, counted here
    from the saliencies for T a point's threshold; both coordinates rise; the last point keeps every positive
    entry and all of the mass (zeros are never kept)."""
    parts = _saliencies(seed, spread)
    parts[1][:zeros] = 0.0
    h = _hist(parts)
    entries, masses = h.mass_curve()
    assert entries == sorted(entries) and masses == sorted(masses) and len(entries) == len(masses) > 0
    s = torch.cat([p.reshape(-1).double() for p in parts])
    assert entries[-1] == pytest.approx(float((s > 0).double().mean())) and masses[-1] == pytest.approx(1.0)
    for q in (0.3, 0.7, 0.95):
        threshold = h.threshold_for_mass(q)
        point = h.kept_at(threshold)
        assert point[0] in entries and masses[entries.index(point[0])] == pytest.approx(point[1])
        assert point[0] == pytest.approx(float((s >= threshold).double().mean()))
        assert point[1] == pytest.approx(_kept_mass(parts, threshold))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), low=st.floats(0.1, 0.6), high=st.floats(0.61, 0.99))
def test_more_mass_never_keeps_fewer_entries(seed, low, high):
    """Monotonicity in saliency_mass: a larger target keeps at least as many entries."""
    h = _hist(_saliencies(seed, 10.0))
    assert h.kept_at(h.threshold_for_mass(high))[0] >= h.kept_at(h.threshold_for_mass(low))[0]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000), exponent=st.integers(-20, 20), factor=st.floats(1e-3, 1e3), mass=st.floats(0.1, 0.99)
)
def test_scaling_every_saliency_changes_nothing(seed, exponent, factor, mass):
    """Scale invariance: s * 2**j keeps exactly the same fraction of entries; s * c (any c > 0) the same to within
    the entries of one histogram bin (relative width 2**-9)."""
    parts = _saliencies(seed, 10.0)
    reference = _hist(parts)
    kept = reference.kept_at(reference.threshold_for_mass(mass))[0]
    scaled = _hist(parts, 2.0**exponent)
    assert scaled.kept_at(scaled.threshold_for_mass(mass))[0] == kept
    other = _hist(parts, factor)
    bin_share = float(reference.counts.max()) / reference.total
    assert abs(other.kept_at(other.threshold_for_mass(mass))[0] - kept) <= bin_share + 1e-12


# ----------------------------------------------------------------------------- merges


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    experts = [{n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in base.items()} for _ in range(2)]
    curvatures = [{n: torch.rand(b.shape, generator=g) * 10.0 ** (2 * i) for n, b in base.items()} for i in range(2)]
    return base, experts, curvatures


@pytest.mark.parametrize("method", ["ota", "ffg"])
def test_auto_density_equals_the_explicit_threshold_it_chose_and_logs_it(method, caplog):
    """merge_state_dicts with density: auto (density_scope: model) equals the same merge with each expert's threshold
    set to the one threshold_for_mass gives over all its tensors; the log names each expert's kept share."""
    from mergekit.merge_methods import PerGroupValues, merge_state_dicts

    from mergekit_ota.methods import register_methods

    register_methods()
    base, experts, curvatures = _problem()
    models = {"base": base, "e0": experts[0], "e1": experts[1]}
    curvature = PerGroupValues([{"e0": curvatures[0][n], "e1": curvatures[1][n]} for n in SHAPES])
    with caplog.at_level(logging.INFO, logger="mergekit_ota"):
        auto = merge_state_dicts(
            models,
            method,
            base="base",
            parameters={"curvature": curvature, "density": "auto", "density_scope": "model", "saliency_mass": 0.8},
        )
    logged = [r.getMessage() for r in caplog.records if "density: auto, expert" in r.getMessage()]
    assert len(logged) == 2 and all("of its saliency mass (target 0.8" in m for m in logged), logged
    thresholds = []
    for i in range(2):
        h = SaliencyHistogram()
        for n in SHAPES:
            h.add((experts[i][n] - base[n]).square() * curvatures[i][n], with_mass=True)
        thresholds.append(h.threshold_for_mass(0.8))
    explicit = merge_state_dicts(
        models,
        method,
        base="base",
        parameters={
            "curvature": curvature,
            "threshold": PerGroupValues([{"e0": thresholds[0], "e1": thresholds[1]}] * len(SHAPES)),
        },
    )
    for n in SHAPES:
        assert torch.equal(auto[n], explicit[n]), n


@pytest.mark.parametrize("method", ["ota", "ffg"])
def test_auto_density_implies_model_scope_where_density_scope_is_left_out(method):
    """density: auto is model-wide by definition, so it needs no density_scope: the merge without one equals the
    merge with density_scope: model (it used to be refused, naming a density_scope: tensor never written); and an
    expert with a numeric density next to it keeps its per-tensor density."""
    from mergekit.merge_methods import PerGroupValues, merge_state_dicts

    from mergekit_ota.methods import register_methods

    register_methods()
    base, experts, curvatures = _problem()
    models = {"base": base, "e0": experts[0], "e1": experts[1]}
    curvature = PerGroupValues([{"e0": curvatures[0][n], "e1": curvatures[1][n]} for n in SHAPES])
    density = {"e0": "auto", "e1": 0.3}

    def merged(**scope):
        return merge_state_dicts(
            models, method, base="base", parameters={"curvature": curvature, "density": density, **scope}
        )

    left_out = merged()
    per_expert = merge_state_dicts(  # auto model-wide for e0 and 0.3 per tensor for e1, spelled out
        models,
        method,
        base="base",
        parameters={
            "curvature": curvature,
            "density": {"e0": None, "e1": 0.3},
            "threshold": PerGroupValues(
                [{"e0": _auto_threshold(base, experts[0], curvatures[0], saliency_mass_default(method)), "e1": None}]
                * 3
            ),
        },
    )
    for n in SHAPES:
        assert torch.equal(left_out[n], per_expert[n]), n


def _auto_threshold(base, expert, curvature, mass: float = 0.95) -> float:
    h = SaliencyHistogram()
    for n in SHAPES:
        h.add((expert[n] - base[n]).square() * curvature[n], with_mass=True)
    return h.threshold_for_mass(mass)


def test_auto_density_with_an_explicit_tensor_scope_is_refused_with_the_reason():
    """density: auto with density_scope: tensor written out is an error naming the expert and the reason."""
    from mergekit.merge_methods import PerGroupValues, merge_state_dicts

    from mergekit_ota.errors import ConfigError
    from mergekit_ota.methods import register_methods

    register_methods()
    base, experts, curvatures = _problem()
    with pytest.raises(
        ConfigError, match="expert e0: density: auto .* cannot apply per tensor; got density_scope: tensor"
    ):
        merge_state_dicts(
            {"base": base, "e0": experts[0]},
            "ffg",
            base="base",
            parameters={
                "curvature": PerGroupValues([[curvatures[0][n]] for n in SHAPES]),
                "density": "auto",
                "density_scope": "tensor",
            },
        )
    with pytest.raises(ConfigError, match="'auto'"):
        merge_state_dicts(
            {"base": base, "e0": experts[0]},
            "ffg",
            base="base",
            parameters={
                "curvature": PerGroupValues([[curvatures[0][n]] for n in SHAPES]),
                "density": "automatic",
                "density_scope": "model",
            },
        )
    with pytest.raises(ConfigError, match="saliency_mass"):
        merge_state_dicts(
            {"base": base, "e0": experts[0]},
            "ffg",
            base="base",
            parameters={
                "curvature": PerGroupValues([[curvatures[0][n]] for n in SHAPES]),
                "density": "auto",
                "density_scope": "model",
                "saliency_mass": 1.5,
            },
        )


def test_auto_density_from_yaml_merges_and_check_passes(tmp_path):
    """A YAML ota merge with density: auto (model-wide) over a tiny Llama family: check has no problem, the merge
    writes finite weights that differ from the base."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    import mergekit_ota
    from mergekit_ota.graph.preflight import check_config
    from mergekit_ota.testing import make_family

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    family = make_family(str(tmp_path / "fam"), n_experts=2)
    config = {
        "merge_method": "ota",
        "base_model": family.base,
        "dtype": "float32",
        "parameters": {"density_scope": "model", "saliency_mass": 0.9},
        "models": [{"model": e, "parameters": {"density": "auto"}} for e in family.experts],
    }
    report = check_config(MergeConfiguration.model_validate(config), MergeOptions())
    assert report.problems == (), report.problems
    run_merge(
        MergeConfiguration.model_validate(config), str(tmp_path / "out"), MergeOptions(quiet=True, copy_tokenizer=False)
    )
    merged = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_check_reports_what_auto_keeps_and_the_mass_curve(tmp_path):
    """check on a density: auto config runs the model-wide pass and prints, per expert, the fraction auto keeps and
    the density at 50/80/90/95/99% of its saliency mass, equal to what the merge then logs."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    import mergekit_ota
    from mergekit_ota.graph.preflight import check_config
    from mergekit_ota.testing import make_family

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    family = make_family(str(tmp_path / "fam"), n_experts=2)
    config = {
        "merge_method": "ffg",
        "base_model": family.base,
        "dtype": "float32",
        "parameters": {"density_scope": "model", "saliency_mass": 0.8},
        "models": [{"model": e, "parameters": {"density": "auto"}} for e in family.experts],
    }
    report = check_config(MergeConfiguration.model_validate(config), MergeOptions(quiet=True))
    lines = [n for n in report.notes if n.startswith("density: auto, expert")]
    assert len(lines) == 2 and all(
        "(target 0.8;" in n and "density kept at saliency mass 50% ->" in n for n in lines
    ), report.notes
    assert any("check ran the model-wide saliency pass" in n for n in report.notes)


@pytest.mark.parametrize("method, mass", [("ota", 0.99), ("ffg", 0.95)])
def test_density_auto_defaults_to_the_methods_own_saliency_mass(method, mass):
    """ota merges default to the mass with the smallest worst-case regret (0.99), ffg grafts to 0.95; an
    unset saliency_mass in memory reads as the method's default, the same as mergekit's parameter spec."""
    from mergekit_ota.methods.settings import FFG_PARAMETERS, OTA_PARAMETERS, shared_settings

    assert saliency_mass_default(method) == mass
    assert shared_settings({}, method=method).saliency_mass == mass
    specs = OTA_PARAMETERS if method == "ota" else FFG_PARAMETERS
    assert [p.default for p in specs if p.name == "saliency_mass"] == [mass]
