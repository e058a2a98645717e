"""Parameter and numeric safety (issue 10, cases 6, 8 and 9): every rule has one home and every caller uses it.

* case 6: non-finite parameters are refused; OTA's weights are scaled so that finite inputs give finite
  results; weights that underflow and merged tensors that are not finite (also after the cast to the
  saved dtype) fail naming the tensor.
* case 8: misspelled parameter names are refused (ota/ffg) or warned about (other methods), with a
  did-you-mean.
* case 9: negative weights are refused by ota (a weighted average) and allowed by ffg (task negation),
  except where ``normalize`` would divide by a zero sum.

End-to-end cases run a YAML config through ``mergekit.merge.run_merge`` (what ``mergekit-yaml`` runs) or
``mergekit-ota check`` and assert that nothing was written.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from merging import merge as _merge
from merging import merged_tensors as _merged
from safetensors.torch import load_file, save_file

from mergekit_ota.errors import ConfigError, MergeError, OTAError, PreflightError

NAME = "model.layers.1.self_attn.k_proj.weight"
FEW = settings(max_examples=30, deadline=None)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def registered():
    from mergekit_ota.methods import register_methods

    register_methods()


def _config(family, method="ota", expert_parameters=(None, None), base=True, **shared) -> dict:
    cfg = {
        "merge_method": method,
        "models": [{"model": e, **({"parameters": p} if p else {})} for e, p in zip(family.experts, expert_parameters)],
        "dtype": "float32",
    }
    if base:
        cfg["base_model"] = family.base
    if shared:
        cfg["parameters"] = shared
    return cfg


def _refused(cfg: dict, tmp_path, pattern: str, error=PreflightError) -> OTAError:
    """run_merge raises ``error`` matching ``pattern`` and leaves no output directory."""
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern) as caught:
        _merge(cfg, out)
    assert not out.exists()
    return caught.value


def _check(tmp_path, cfg: dict, name: str = "merge.yml"):
    """``mergekit-ota check --json``: (exit code, parsed report or None, raw output)."""
    from mergekit_ota.cli.main import main

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["check", str(path), "--json"])
    report = json.loads(result.stdout[: result.stdout.rindex("}") + 1]) if "{" in result.stdout else None
    return result.exit_code, report, result.output


def _store_with(family, tmp_path, change, expert: int = 0, name: str = "changed.safetensors") -> str:
    tensors = load_file(family.stores[expert])
    change(tensors)
    path = tmp_path / name
    save_file(tensors, str(path))
    return str(path)


def _scaled_store(family, tmp_path, factor: float, expert: int = 0) -> str:
    """Expert ``expert``'s store with every value multiplied by ``factor`` (computed in float64)."""

    def scale(tensors):
        for key, value in tensors.items():
            tensors[key] = (value.double() * factor).float()

    return _store_with(family, tmp_path, scale, expert, name=f"scaled{expert}.safetensors")


def _tensors(shape=(6, 5), n_experts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.5 * torch.randn(shape, generator=g) for _ in range(n_experts)]
    curvatures = [torch.rand(shape, generator=g) * 10.0 ** (i - 1) for i in range(n_experts)]
    return base, experts, curvatures


# ============================================================================= case 6: non-finite values


@pytest.mark.parametrize(
    "expert_parameters, shared, pattern",
    [
        (({"weight": float("nan")}, None), {}, r"weight must be a finite number; got nan"),
        ((None, None), {"lambda": float("inf")}, r"lambda must be a finite number; got inf"),
        ((None, None), {"eps": float("inf")}, r"eps must be a finite number > 0; got inf"),
        ((None, None), {"power": float("nan")}, r"power must be a finite number >= 0; got nan"),
        (({"threshold": float("inf")}, None), {}, r"threshold must be a finite number >= 0; got inf"),
    ],
    ids=["weight-nan", "lambda-inf", "eps-inf", "power-nan", "threshold-inf"],
)
def test_non_finite_parameter_is_refused_by_merge_and_check(family, tmp_path, expert_parameters, shared, pattern):
    """A NaN/Inf parameter (YAML .nan/.inf) fails the merge before anything is written, and check exits 1,
    both with the same message naming the parameter (it used to pass check and write an all-NaN model)."""
    cfg = _config(family, expert_parameters=expert_parameters, **shared)
    error = _refused(cfg, tmp_path, pattern)
    code, report, _ = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == error.problems


def test_in_memory_non_finite_parameter_is_refused():
    """merge_tensors refuses a NaN weight and an infinite lambda with the same rule as the planner."""
    from mergekit.merge_methods import merge_tensors

    base, experts, curvatures = _tensors()
    with pytest.raises(ConfigError, match=r"weight must be a finite number; got nan"):
        merge_tensors(
            [base, *experts], "ota", base_index=0, parameters={"curvature": curvatures, "weight": [float("nan"), 1.0]}
        )
    with pytest.raises(ConfigError, match=r"lambda must be a finite number; got inf"):
        merge_tensors(
            [base, *experts],
            "ffg",
            base_index=0,
            parameters={"curvature": curvatures, "density": 0.5, "lambda": float("inf")},
        )


def test_huge_finite_curvature_with_power_2_merges_to_the_same_finite_model(family, tmp_path):
    """Curvature scaled up to ~1e38 with power 2 (v**2 overflows float32), raw scale: the merge is finite and equals
    the merge of the unscaled stores with eps scaled by c**2 (OTA depends on v only through ratios)."""
    peak = max(float(v.max()) for s in family.stores for v in load_file(s).values())
    c = 3e38 / peak
    scaled = [_scaled_store(family, tmp_path, c, expert=i) for i in range(2)]
    raw = {"power": 2.0, "curvature_scale": "none"}
    _merge(_config(family, expert_parameters=tuple({"curvature": s} for s in scaled), **raw), tmp_path / "big")
    big = _merged(tmp_path / "big")
    assert big and all(torch.isfinite(t).all() for t in big.values())
    _merge(_config(family, eps=1e-12 / c**2, **raw), tmp_path / "small")
    small = _merged(tmp_path / "small")
    for key, value in small.items():
        torch.testing.assert_close(big[key], value, rtol=1e-5, atol=1e-6)


def test_huge_finite_curvature_under_the_default_mean_scale_merges_like_the_unscaled_stores(family, tmp_path):
    """Under ``curvature_scale: mean`` (the default) scaling every store by c ~ 3e38 / max cancels: the mean of
    entries near float32's max is finite (its sum is not taken in float32), and the model equals the unscaled one."""
    peak = max(float(v.max()) for s in family.stores for v in load_file(s).values())
    c = 3e38 / peak
    scaled = [_scaled_store(family, tmp_path, c, expert=i) for i in range(2)]
    _merge(_config(family, expert_parameters=tuple({"curvature": s} for s in scaled), power=2.0), tmp_path / "big")
    big = _merged(tmp_path / "big")
    _merge(_config(family, power=2.0), tmp_path / "small")
    small = _merged(tmp_path / "small")
    assert big.keys() == small.keys() and big
    for key, value in small.items():
        torch.testing.assert_close(big[key], value, rtol=1e-4, atol=1e-5)


def test_weights_that_underflow_raise_naming_the_tensor():
    """Where every expert's weight w_i underflows to 0 although no expert is masked, OTA raises naming the
    tensor (it used to return the base there, or NaN, silently)."""
    from mergekit.merge_methods import merge_state_dicts

    shape = (4, 4)
    base = {"w": torch.zeros(shape)}
    experts = {"a": {"w": torch.ones(shape)}, "b": {"w": -torch.ones(shape)}}
    big = torch.full(shape, 1e-10)
    big[0, 0] = 3e38  # w = v**4 spans ~480 decades: at v = 1e-10 it cannot be represented next to 3e38**4
    curvature = {"a": {"w": big}, "b": {"w": torch.full(shape, 1e-10)}}
    with pytest.raises(MergeError, match=r"tensor w: .*15 of 16 coordinates.*underflow"):
        merge_state_dicts(
            {"base": base, **experts},
            "ota",
            base="base",
            parameters={"curvature": curvature, "power": 4.0, "curvature_scale": "none"},
        )


def test_float16_overflow_of_the_saved_tensor_fails_naming_the_tensor(family, tmp_path):
    """out_dtype float16 with a result beyond 65504: the merge fails naming the tensor and the dtype instead of
    writing inf (a float32 result is finite; its float16 cast is not)."""
    cfg = {**_config(family, **{"lambda": 1e7}), "out_dtype": "float16"}
    error = _refused(cfg, tmp_path, r"merged tensor [\w.]+ has \d+ non-finite value.* in float16", error=MergeError)
    assert "lambda" in str(error)


def test_ffg_overflow_fails_naming_the_tensor(family, tmp_path):
    """ffg's b + lambda * sum_i weight_i m_i tau_i overflowing float32 fails naming the tensor (no inf written)."""
    cfg = _config(
        family,
        "ffg",
        expert_parameters=({"density": 0.5, "weight": 100.0}, {"density": 0.5, "weight": 100.0}),
        **{"lambda": 3e38},
    )
    _refused(cfg, tmp_path, r"ffg: merged tensor [\w.]+ has \d+ non-finite value", error=MergeError)


def test_in_memory_non_finite_result_is_refused():
    """merge_tensors with out_dtype float16 whose result overflows float16 raises MergeError naming the tensor."""
    from mergekit.merge_methods import merge_tensors

    base, experts, curvatures = _tensors()
    with pytest.raises(MergeError, match=r"tensor up\.weight .*non-finite.*float16"):
        merge_tensors(
            [base, *experts],
            "ota",
            base_index=0,
            name="up.weight",
            out_dtype=torch.float16,
            parameters={"curvature": curvatures, "lambda": 1e6},
        )


def test_coordinates_masked_in_every_expert_keep_the_base_even_when_weights_are_rescaled():
    """FFG's rule survives the scaling: huge curvature (weights rescaled), every expert masked at a coordinate
    -> theta = b there exactly; unmasked coordinates stay finite."""
    from mergekit_ota.math import KeepRule, ota_merge

    base, experts, _ = _tensors(shape=(8, 8))
    v = torch.full((8, 8), 3e38)
    v[0, :] = 0.0  # saliency 0 in every expert: dropped by any density < 7/8
    out = ota_merge(base, experts, [v, v], [1.0, 1.0], rules=[KeepRule(density=0.5)] * 2, power=3.0)
    assert torch.equal(out[0], base[0]) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- case 6: properties of the scaling

positive = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    log_c=st.floats(min_value=-30.0, max_value=36.0),
    power=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    weights=st.lists(st.floats(min_value=0.1, max_value=3.0), min_size=2, max_size=2),
    rank1=st.booleans(),
    with_base=st.booleans(),
)
def test_ota_invariant_to_scaling_curvature_by_c_and_eps_by_c_pow_p(seed, log_c, power, weights, rank1, with_base):
    """theta(c * v, eps * c**p) == theta(v, eps) for every c > 0 (w_i scales by the common c**p), also where
    c * v or (c * v)**p leaves float32's range and for rank-1 curvature."""
    from mergekit_ota.math import Rank1Curvature, ota_merge

    g = torch.Generator().manual_seed(seed)
    shape = (5, 7)
    base = torch.randn(shape, generator=g)
    experts = [base + torch.randn(shape, generator=g) for _ in range(2)]
    vs = [torch.pow(10.0, torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 4) for _ in range(2)]  # 1e-4..1
    c = 10.0**log_c
    eps = 1e-6

    def curv(v, factor):
        scaled = v * factor  # float64: c * v is computed exactly enough, then rounded once to float32
        if rank1:
            return Rank1Curvature.from_sums(scaled.sum(1).float(), scaled.sum(0).float())
        return scaled.float()

    b = base if with_base else None
    reference = ota_merge(b, experts, [curv(v, 1.0) for v in vs], weights, power=power, eps=eps)
    scaled = ota_merge(b, experts, [curv(v, c) for v in vs], weights, power=power, eps=eps * c**power)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, reference, rtol=2e-4, atol=2e-4)


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    log_top=st.floats(min_value=-40.0, max_value=38.4),
    power=st.floats(min_value=0.0, max_value=4.0),
    eps=positive,
    weights=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=3, max_size=3).filter(lambda w: max(w) > 0),
    masked=st.booleans(),
)
def test_ota_finite_inputs_give_finite_output_or_a_merge_error(seed, log_top, power, eps, weights, masked):
    """v up to 3e38, power up to 4, weights >= 0 with one > 0, any eps > 0: the merge is finite, or raises
    MergeError saying which coordinates underflowed; never NaN/Inf."""
    from mergekit_ota.math import KeepRule, ota_merge

    g = torch.Generator().manual_seed(seed)
    shape = (6, 6)
    base = torch.randn(shape, generator=g)
    experts = [base + torch.randn(shape, generator=g) for _ in range(3)]
    top = min(10.0**log_top, 3e38)
    vs = [(top * torch.rand(shape, generator=g, dtype=torch.float64) ** 8).float() for _ in range(3)]
    rules = [KeepRule(density=0.5)] * 3 if masked else None
    try:
        out = ota_merge(base, experts, vs, weights, rules=rules, power=power, eps=eps)
    except MergeError as error:
        assert "underflow" in str(error)
        return
    assert torch.isfinite(out).all()


@FEW
@given(
    seed=st.integers(0, 2**31 - 1),
    log_top=st.floats(min_value=-40.0, max_value=38.0),
    power=st.sampled_from([0.0, 0.5, 1.0, 1.7, 4.0]),
    eps=positive,
    weight=st.floats(min_value=0.0, max_value=1e4),
)
def test_rank1_and_full_curvature_get_the_same_weight_scale(seed, log_top, power, eps, weight):
    """A Rank1Curvature and its dense v_hat give the same common scale s (c = max(row) * max(col) is exactly
    max(v_hat) in float32) and the same scaled weights w / s up to float32 rounding."""
    from mergekit_ota.math import Rank1Curvature, curvature_weights
    from mergekit_ota.math.ota import weight_divisor

    g = torch.Generator().manual_seed(seed)
    top = min(10.0**log_top, 3e38)
    r = torch.rand(7, generator=g, dtype=torch.float64) + 0.01
    col = (torch.rand(5, generator=g, dtype=torch.float64) * top).float()
    factored = Rank1Curvature(row=(r / r.sum()).float(), col=col)
    full = factored.dense()
    scale_r = weight_divisor([factored], [weight], power, eps)
    scale_f = weight_divisor([full], [weight], power, eps)
    assert scale_r == scale_f
    w_r = curvature_weights(factored, weight, power, eps, scale=scale_r)
    w_f = curvature_weights(full, weight, power, eps, scale=scale_f)
    assert torch.isfinite(w_r).all() and torch.isfinite(w_f).all()
    torch.testing.assert_close(w_r, w_f, rtol=1e-4, atol=1e-30)


def test_weight_scale_is_one_for_ordinary_inputs():
    """Adam-sized curvature, default power and eps: no rescaling (s = 1), so the usual merge is unchanged
    bit for bit and pays no extra pass."""
    from mergekit_ota.math.ota import weight_divisor

    v = torch.rand(10, 10) * 1e-4
    assert weight_divisor([v, v * 3], [1.0, 2.0], 0.5, 1e-12).exponent == 0
    assert weight_divisor([v], [1.0], 2.0, 1e-12).exponent == 0


# ============================================================================= case 8: unknown keys


def test_misspelled_expert_parameter_is_refused_with_a_suggestion(family, tmp_path):
    """`densty: 0.2` under a model: the merge fails (it used to run without FFG) naming the model, the key and
    'did you mean density'; check reports the same problem."""
    cfg = _config(family, expert_parameters=({"densty": 0.2}, None))
    error = _refused(
        cfg, tmp_path, rf"model {family.experts[0]}: unknown parameter 'densty' for ota; did you mean 'density'\?"
    )
    code, report, _ = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == error.problems


def test_misspelled_shared_parameter_is_refused_with_a_suggestion(family, tmp_path):
    """A top-level `pwer: 0.5` is refused with 'did you mean power'."""
    cfg = _config(family, pwer=0.5)
    _refused(cfg, tmp_path, r"parameters: unknown parameter 'pwer' for ota; did you mean 'power'\?")


def test_shared_parameter_under_a_model_and_a_parameter_of_the_other_method_are_refused(family, tmp_path):
    """`power` under a model (mergekit reads shared parameters only from the top level / slices) and
    `normalize` (an ffg parameter) under ota are refused, in one error, with what to do."""
    cfg = _config(family, expert_parameters=({"power": 1.0}, None), normalize=True)
    error = _refused(cfg, tmp_path, r"'power' is a shared parameter of ota")
    assert "unknown parameter 'normalize' for ota" in str(error)


def test_unknown_parameters_are_found_at_every_level_of_a_config(family):
    """The one finder walks top-level, slice-level and per-source parameters and returns structured results."""
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration

    from mergekit_ota.methods.settings import unknown_parameters

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "ota",
            "base_model": family.base,
            "parameters": {"lamda": 1.0, "power": 0.5},
            "slices": [
                {
                    "sources": [
                        {"model": family.base, "layer_range": [0, 2]},
                        {
                            "model": family.experts[0],
                            "layer_range": [0, 2],
                            "parameters": {"wieght": 1.0, "weight": 1.0},
                        },
                    ],
                    "parameters": {"eps": 1e-12, "xyz": 1},
                }
            ],
        }
    )
    found = unknown_parameters(config, merge_methods.get("ota").spec)
    assert [(u.where, u.key, u.suggestion) for u in found] == [
        ("parameters", "lamda", "lambda"),
        ("slices[0]", "xyz", None),
        (f"model {family.experts[0]}", "wieght", "weight"),  # one slice: the model names the place
    ]


def test_check_warns_about_unknown_keys_for_mergekit_methods(family, tmp_path):
    """check on a ties config with `densty`: not a curvature merge (exit 2, as before), but the misspelling is
    shown as a warning with a did-you-mean, in text and JSON."""
    cfg = _config(family, "ties", expert_parameters=({"densty": 0.2, "weight": 1.0}, None))
    code, report, output = _check(tmp_path, cfg)
    assert code == 2 and "does not use curvature" in output
    assert report["warnings"] == [
        f"model {family.experts[0]}: unknown parameter 'densty' for ties; did you mean 'density'?"
    ]
    from mergekit_ota.cli.main import main

    text = CliRunner().invoke(main, ["check", str(tmp_path / "merge.yml")])
    assert text.exit_code == 2 and "warning: model" in text.output and "did you mean 'density'?" in text.output


def test_in_memory_unknown_parameter_suggests_the_known_name():
    """merge_tensors with 'densty' raises ConfigError with a did-you-mean (mergekit's own TypeError had none)."""
    from mergekit.merge_methods import merge_tensors

    base, experts, curvatures = _tensors()
    with pytest.raises(ConfigError, match=r"unknown parameter 'densty' for ffg; did you mean 'density'\?"):
        merge_tensors([base, *experts], "ffg", base_index=0, parameters={"curvature": curvatures, "densty": 0.5})


# ============================================================================= case 9: negative weights


def test_ota_refuses_a_negative_weight_that_ffg_accepts_as_task_negation(family, tmp_path):
    """weight -1: ota refuses it naming the expert (a weighted average would extrapolate); ffg with density 1
    subtracts the task vector: theta = b + tau_0 - tau_1 exactly."""
    cfg = _config(family, expert_parameters=({"weight": 1.0}, {"weight": -1.0}))
    _refused(cfg, tmp_path, rf"expert {family.experts[1]} .*ota needs weight >= 0 .*got -1\.0")
    ffg = _config(family, "ffg", expert_parameters=({"density": 1.0}, {"density": 1.0, "weight": -1.0}))
    _merge(ffg, tmp_path / "ffg")
    merged = _merged(tmp_path / "ffg")
    b = load_file(os.path.join(family.base, "model.safetensors"))
    t0, t1 = (load_file(os.path.join(e, "model.safetensors")) for e in family.experts)
    torch.testing.assert_close(merged[NAME], b[NAME] + (t0[NAME] - b[NAME]) - (t1[NAME] - b[NAME]))


def test_ota_needs_a_positive_weight(family, tmp_path):
    """All weights 0 under ota: refused (the merge would silently be the plain mean of the experts)."""
    cfg = _config(family, expert_parameters=({"weight": 0.0}, {"weight": 0.0}))
    _refused(cfg, tmp_path, r"ota needs at least one expert with weight > 0")


def test_ffg_normalize_with_zero_weight_sum_is_refused(family, tmp_path):
    """ffg, normalize: true, weights 1 and -1: sum_i weight_i = 0 would divide by zero: refused (it used to skip
    the division silently)."""
    cfg = _config(family, "ffg", expert_parameters=({"density": 0.5}, {"density": 0.5, "weight": -1.0}), normalize=True)
    _refused(cfg, tmp_path, r"normalize: true divides by sum_i weight_i, which is 0")


def test_in_memory_negative_weight_rules_match_the_planner():
    """merge_tensors applies the same rules: ota refuses weight -1 and all-zero weights, ffg normalize refuses a
    zero sum, ffg accepts weight -1."""
    from mergekit.merge_methods import merge_tensors

    base, experts, curvatures = _tensors()
    ota = dict(curvature=curvatures)
    with pytest.raises(ConfigError, match=r"ota needs weight >= 0"):
        merge_tensors([base, *experts], "ota", base_index=0, parameters={**ota, "weight": [1.0, -1.0]})
    with pytest.raises(ConfigError, match=r"ota needs at least one expert with weight > 0"):
        merge_tensors([base, *experts], "ota", base_index=0, parameters={**ota, "weight": [0.0, 0.0]})
    ffg = dict(curvature=curvatures, density=1.0, weight=[1.0, -1.0])
    with pytest.raises(ConfigError, match=r"which is 0"):
        merge_tensors([base, *experts], "ffg", base_index=0, parameters={**ffg, "normalize": True})
    out = merge_tensors([base, *experts], "ffg", base_index=0, parameters=ffg)
    torch.testing.assert_close(out, base + (experts[0] - base) - (experts[1] - base))


# ============================================================================= grouping and order of problems


def test_merge_error_groups_a_problem_repeated_per_tensor(family, tmp_path):
    """A per-expert rule broken on every tensor (ota's weight >= 0): the merge's error shows one line with the
    count and the first tensors, as check does, not one line per tensor."""
    cfg = _config(family, expert_parameters=({"weight": -1.0}, None))
    error = _refused(cfg, tmp_path, r"ota needs weight >= 0")
    n = len(error.problems)
    assert n > 5
    lines = [line for line in str(error).splitlines() if line.startswith("  - ")]
    assert len(lines) == 1 and f"({n} tensors: " in lines[0] and f"and {n - 3} more)" in lines[0]


def test_config_level_problems_come_first_and_hide_nothing(family, tmp_path):
    """A bad shared parameter, an unknown key and a missing store in one config: all reported together, the
    config-level ones first (a bad shared parameter used to skip every tensor's curvature lookup)."""
    cfg = _config(
        family,
        expert_parameters=(None, {"curvature": str(tmp_path / "absent.safetensors"), "wieght": 1.0}),
        power=-1.0,
    )
    error = _refused(cfg, tmp_path, r"power must be a finite number >= 0")
    problems = error.problems
    assert "parameters: power must be a finite number >= 0; got -1.0" in problems[:2]
    assert any("unknown parameter 'wieght'" in p for p in problems[:2])
    assert any("absent.safetensors" in p for p in problems[2:])
    code, report, _ = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == problems


def test_planner_and_in_memory_report_one_rule_with_one_message(family, tmp_path):
    """Each rule has one home: the planner's problem and merge_tensors' ConfigError carry the same text for
    ffg without density, an FFG mask without a base, and lambda without a base."""
    from mergekit.merge_methods import merge_tensors

    base, experts, curvatures = _tensors()
    cases = [
        (
            _config(family, "ffg", expert_parameters=({"density": 0.5}, None)),
            lambda: merge_tensors(
                [base, *experts],
                "ffg",
                base_index=0,
                ids=["b", "x", "y"],
                parameters={"curvature": curvatures, "density": [0.5, None]},
            ),
            "ffg needs a density or a threshold for every expert",
        ),
        (
            _config(family, expert_parameters=({"density": 0.5}, None), base=False),
            lambda: merge_tensors(experts, "ota", parameters={"curvature": curvatures, "density": [0.5, None]}),
            "sets density/threshold (FFG), which needs a base_model",
        ),
        (
            _config(family, base=False, **{"lambda": 0.5}),
            lambda: merge_tensors(experts, "ota", parameters={"curvature": curvatures, "lambda": 0.5}),
            "ota: lambda scales the merged task vector and needs a base_model",
        ),
    ]
    for cfg, in_memory, message in cases:
        _refused(cfg, tmp_path, message.replace("(", r"\(").replace(")", r"\)"))
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            in_memory()
