"""The ``ota`` and ``ffg`` methods through mergekit's public in-memory API.

``merge_tensors`` / ``merge_state_dicts`` take the curvature as a per-expert tensor
parameter; results must match :mod:`mergekit_ota.math` on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.merge_methods import PerGroupValues, merge_state_dicts, merge_tensors

from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.math import KeepRule, ffg_merge, ota_merge


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register ``ota`` and ``ffg`` with mergekit (idempotent)."""
    from mergekit_ota.methods import register_methods

    register_methods()
    register_methods()  # a second call must be harmless


def make(shape=(6, 5), n_experts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(n_experts)]
    curvatures = [torch.rand(shape, generator=g) * 10.0 ** (i - 1) for i in range(n_experts)]
    return base, experts, curvatures


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- equivalence with the math


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_merge_tensors_ota_with_base_matches_math(power):
    """merge_tensors(..., 'ota', base_index=0) equals ota_merge with per-expert weights and lambda."""
    base, experts, curvatures = make()
    weights = [0.7, 1.9]
    out = merge_tensors(
        [base, *experts],
        "ota",
        base_index=0,
        parameters={
            "curvature": curvatures,
            "weight": weights,
            "power": power,
            "lambda": 0.8,
            "curvature_scale": "none",
        },
    )
    expected = ota_merge(base, experts, curvatures, weights, power=power, lambda_=0.8)
    close(out, expected)
    # and curvature matters: differs from plain weight-normalised task arithmetic
    ta = base + 0.8 * sum(w * (t - base) for w, t in zip(weights, experts)) / sum(weights)
    assert not torch.allclose(out, ta, atol=1e-4)


def test_merge_tensors_ota_without_base_matches_math():
    """merge_tensors(..., 'ota') with no base equals curvature-weighted averaging of the experts."""
    _, experts, curvatures = make(n_experts=3)
    weights = [1.0, 2.0, 0.5]
    out = merge_tensors(
        experts, "ota", parameters={"curvature": curvatures, "weight": weights, "curvature_scale": "none"}
    )
    close(out, ota_merge(None, experts, curvatures, weights))


def test_merge_tensors_ota_with_density_matches_math():
    """ota with per-expert densities equals ota_merge with the matching FFG KeepRules."""
    base, experts, curvatures = make(shape=(8, 9))
    densities = [0.3, 0.6]
    out = merge_tensors(
        [base, *experts],
        "ota",
        base_index=0,
        parameters={"curvature": curvatures, "density": densities, "weight": [1.0, 3.0], "curvature_scale": "none"},
    )
    rules = [KeepRule(density=d) for d in densities]
    close(out, ota_merge(base, experts, curvatures, [1.0, 3.0], rules=rules))


@pytest.mark.parametrize("normalize", [False, True])
def test_merge_tensors_ffg_matches_math(normalize):
    """merge_tensors(..., 'ffg') with density, weights, lambda and normalize equals ffg_merge."""
    base, experts, curvatures = make(shape=(10, 7))
    weights = [0.4, 1.5]
    out = merge_tensors(
        [base, *experts],
        "ffg",
        base_index=0,
        parameters={
            "curvature": curvatures,
            "density": [0.2, 0.5],
            "weight": weights,
            "lambda": 1.3,
            "normalize": normalize,
        },
    )
    rules = [KeepRule(density=0.2), KeepRule(density=0.5)]
    close(out, ffg_merge(base, experts, curvatures, rules, weights, lambda_=1.3, normalize=normalize))


def test_merge_tensors_ffg_threshold_matches_math():
    """ffg with a per-expert absolute threshold equals ffg_merge with KeepRule(threshold)."""
    base, experts, curvatures = make()
    out = merge_tensors(
        [base, *experts],
        "ffg",
        base_index=0,
        parameters={"curvature": curvatures, "threshold": [1e-3, 1e-2]},
    )
    rules = [KeepRule(threshold=1e-3), KeepRule(threshold=1e-2)]
    close(out, ffg_merge(base, experts, curvatures, rules, [1.0, 1.0]))


def test_merge_tensors_keeps_bf16_dtype():
    """bf16 inputs give a bf16 merge (curvature in fp32)."""
    base, experts, curvatures = make()
    out = merge_tensors(
        [base.bfloat16(), *(t.bfloat16() for t in experts)],
        "ota",
        base_index=0,
        parameters={"curvature": curvatures},
    )
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- model-wide density

SHAPES = {"a.weight": (64, 48), "b.bias": (200,), "c.weight": (32, 96), "d.weight": (10, 10)}
SCALES = {"a.weight": 1e2, "b.bias": 1.0, "c.weight": 1e-2, "d.weight": 1e-4}


def model_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    base, expert, curvature = {}, {}, {}
    for name, shape in SHAPES.items():
        b = torch.randn(shape, generator=g)
        tau = torch.randn(shape, generator=g)
        tau = tau + torch.where(tau >= 0, 0.1, -0.1)  # every task-vector entry non-zero
        base[name] = b
        expert[name] = b + tau
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        curvature[name] = (SCALES[name] * 10.0 ** (4 * u - 2)).float()
    return base, expert, curvature


def kept_fractions(out, base):
    kept = {name: int((out[name] != base[name]).sum()) for name in base}
    numel = {name: base[name].numel() for name in base}
    overall = sum(kept.values()) / sum(numel.values())
    return overall, {name: kept[name] / numel[name] for name in base}


@pytest.mark.parametrize("method", ["ffg", "ota"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.7])
def test_model_scope_density_is_model_wide(method, density):
    """density_scope 'model' keeps ~d of the expert's entries over all tensors, unevenly per tensor."""
    base, expert, curvature = model_problem()
    out = merge_state_dicts(
        {"base": base, "expert": expert},
        method,
        base="base",
        parameters={
            "curvature": PerGroupValues([[curvature[name]] for name in SHAPES]),
            "density": density,
            "density_scope": "model",
        },
    )
    overall, per_tensor = kept_fractions(out, base)
    assert abs(overall - density) <= 0.005
    # curvature scales differ by tensor, so the kept fractions differ widely across tensors
    assert max(per_tensor.values()) - min(per_tensor.values()) >= min(density, 1 - density)
    # kept entries carry the full task vector (lambda 1, one expert)
    for name in SHAPES:
        kept = out[name] != base[name]
        torch.testing.assert_close(out[name][kept], expert[name][kept])


def test_tensor_scope_density_is_per_tensor():
    """density_scope 'tensor' (default) keeps k = max(1, int(d * numel)) entries in every tensor."""
    base, expert, curvature = model_problem()
    density = 0.3
    out = merge_state_dicts(
        {"base": base, "expert": expert},
        "ffg",
        base="base",
        parameters={"curvature": PerGroupValues([{"expert": curvature[n]} for n in SHAPES]), "density": density},
    )
    for name in SHAPES:
        numel = base[name].numel()
        assert int((out[name] != base[name]).sum()) == max(1, int(density * numel))


def test_model_scope_needs_one_density_per_expert():
    """density_scope 'model' with a different density per tensor for one expert raises ConfigError."""
    base, expert, curvature = model_problem()
    with pytest.raises(ConfigError, match="one density per expert"):
        merge_state_dicts(
            {"base": base, "expert": expert},
            "ffg",
            base="base",
            parameters={
                "curvature": PerGroupValues([[curvature[n]] for n in SHAPES]),
                "density": PerGroupValues([0.3, 0.5, 0.3, 0.3]),
                "density_scope": "model",
            },
        )


def test_model_scope_with_explicit_dtype_equals_merging_pre_cast_inputs():
    """merge_state_dicts(dtype=bf16) on fp32 inputs equals the same merge of inputs already cast to bf16."""
    base, expert, curvature = model_problem()
    parameters = {
        "curvature": PerGroupValues([[curvature[n]] for n in SHAPES]),
        "density": 0.3,
        "density_scope": "model",
    }
    out = merge_state_dicts(
        {"base": base, "expert": expert}, "ffg", base="base", dtype=torch.bfloat16, parameters=parameters
    )
    cast = {n: t.bfloat16() for n, t in base.items()}, {n: t.bfloat16() for n, t in expert.items()}
    reference = merge_state_dicts({"base": cast[0], "expert": cast[1]}, "ffg", base="base", parameters=parameters)
    for name in SHAPES:
        assert torch.equal(out[name], reference[name]), name


# ----------------------------------------------------------------------------- errors


def three():
    base, experts, curvatures = make()
    return [base, *experts], curvatures


def test_missing_curvature_raises_curvature_error():
    tensors, _ = three()
    with pytest.raises(CurvatureError, match="curvature"):
        merge_tensors(tensors, "ota", base_index=0)


def test_curvature_of_wrong_shape_raises_curvature_error():
    tensors, curvatures = three()
    with pytest.raises(CurvatureError, match="shape"):
        merge_tensors(tensors, "ota", base_index=0, parameters={"curvature": [curvatures[0], curvatures[1].T]})


def test_curvature_that_is_not_a_tensor_raises_curvature_error():
    tensors, curvatures = three()
    with pytest.raises(CurvatureError, match="tensor"):
        merge_tensors(tensors, "ota", base_index=0, parameters={"curvature": [curvatures[0], 3.0]})


@pytest.mark.parametrize("method", ["ota", "ffg"])
def test_density_above_one_raises_config_error(method):
    tensors, curvatures = three()
    with pytest.raises(ConfigError, match="density"):
        merge_tensors(tensors, method, base_index=0, parameters={"curvature": curvatures, "density": [0.5, 1.5]})


def test_density_and_threshold_together_raise_config_error():
    tensors, curvatures = three()
    with pytest.raises(ConfigError, match="density or threshold"):
        merge_tensors(
            tensors,
            "ffg",
            base_index=0,
            parameters={"curvature": curvatures, "density": 0.5, "threshold": 1e-3},
        )


def test_ffg_without_density_or_threshold_raises_config_error():
    tensors, curvatures = three()
    with pytest.raises(ConfigError, match="density or a threshold"):
        merge_tensors(tensors, "ffg", base_index=0, parameters={"curvature": curvatures})


def test_ota_with_density_but_no_base_raises_config_error():
    _, experts, curvatures = make()
    with pytest.raises(ConfigError, match="base"):
        merge_tensors(experts, "ota", parameters={"curvature": curvatures, "density": 0.5})


def test_ota_with_lambda_but_no_base_raises_config_error():
    _, experts, curvatures = make()
    with pytest.raises(ConfigError, match="base"):
        merge_tensors(experts, "ota", parameters={"curvature": curvatures, "lambda": 0.5})


def test_ffg_without_base_raises():
    """ffg without a base says it needs one and why (ConfigError is a ValueError, as mergekit's own is)."""
    _, experts, curvatures = make()
    with pytest.raises(ConfigError, match="ffg needs a base_model"):
        merge_tensors(experts, "ffg", parameters={"curvature": curvatures, "density": 0.5})


@pytest.mark.parametrize("eps", [0.0, -1e-12])
def test_non_positive_eps_raises_config_error(eps):
    tensors, curvatures = three()
    with pytest.raises(ConfigError, match="eps"):
        merge_tensors(tensors, "ota", base_index=0, parameters={"curvature": curvatures, "eps": eps})


def test_unknown_density_scope_raises_config_error():
    tensors, curvatures = three()
    with pytest.raises(ConfigError, match="density_scope"):
        merge_tensors(
            tensors,
            "ffg",
            base_index=0,
            parameters={"curvature": curvatures, "density": 0.5, "density_scope": "layer"},
        )


# ----------------------------------------------------------------------------- bias correction


def test_bias_correction_divides_ota_curvature_by_one_minus_beta2_to_the_step():
    """bias_correction uses v_i / (1 - beta2**step_i) in OTA's weights; with different steps it changes the merge."""
    tensors, curvatures = three()
    steps = [10, 2]
    parameters = {"curvature": curvatures, "optimizer_step": steps, "beta2": 0.9, "curvature_scale": "none"}
    corrected = merge_tensors(tensors, "ota", base_index=0, parameters={**parameters, "bias_correction": True})
    manual = [v / (1 - 0.9**s) for v, s in zip(curvatures, steps)]
    expected = merge_tensors(
        tensors,
        "ota",
        base_index=0,
        parameters={"curvature": manual, "bias_correction": False, "curvature_scale": "none"},
    )
    torch.testing.assert_close(corrected, expected, rtol=1e-6, atol=1e-6)
    auto = merge_tensors(tensors, "ota", base_index=0, parameters=parameters)  # the default, step and beta2 known
    torch.testing.assert_close(auto, corrected, rtol=0, atol=0)
    uncorrected = merge_tensors(tensors, "ota", base_index=0, parameters={**parameters, "bias_correction": False})
    assert not torch.allclose(corrected, uncorrected, atol=1e-5)


def test_bias_correction_leaves_ffg_thresholds_on_the_raw_saliency():
    """An absolute FFG threshold applies to the raw saliency v * tau**2 (as in the authors' configs): bias
    correction changes OTA's weights only, so ffg gives the same merge with it or without it."""
    tensors, curvatures = three()
    parameters = {"curvature": curvatures, "optimizer_step": [10, 2], "beta2": 0.9, "threshold": [5e-3, 5e-3]}
    corrected = merge_tensors(tensors, "ffg", base_index=0, parameters={**parameters, "bias_correction": True})
    raw = merge_tensors(tensors, "ffg", base_index=0, parameters={**parameters, "bias_correction": False})
    torch.testing.assert_close(corrected, raw, rtol=0, atol=0)
    manual = [v / (1 - 0.9**s) for v, s in zip(curvatures, [10, 2])]
    on_corrected = merge_tensors(tensors, "ffg", base_index=0, parameters={**parameters, "curvature": manual})
    assert not torch.allclose(corrected, on_corrected), "the threshold must not see the corrected curvature"


def test_bias_correction_without_step_raises_config_error():
    tensors, curvatures = three()
    with pytest.raises(ConfigError, match="optimizer_step"):
        merge_tensors(
            tensors,
            "ota",
            base_index=0,
            parameters={"curvature": curvatures, "bias_correction": True, "beta2": 0.999},
        )
