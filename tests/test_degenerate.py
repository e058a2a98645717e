"""Degenerate curvature and task vectors never crash a merge: every method and option gives a finite result equal
to the float64 formula (:mod:`mergekit_ota.math.reference`) within a stated tolerance, or one of our errors.

Degenerate means (:mod:`strategies`): curvature that is all zero (a frozen layer), zero in whole rows or columns,
denormal, or near float32's maximum, for full tensors and for rank-1 stores whose row or column factor (or both)
may be all zero; single-element and 1-D tensors; task vectors that are exactly zero (an expert equal to the base),
denormal or large. Checked through the in-memory API (``merge_tensors``, ``merge_state_dicts``: the kernels plus
``curvature_scale``'s statistic, masks and sign consensus) and through planned merges of rank-1 stores.

Tolerances: ``1e-5`` of the result's scale (``|b| + lambda * max_i |tau_i|``) for ``curvature_scale`` ``none`` and
``mean``; ``median`` is the lower edge of a log-bin (within ``2**-9`` of the exact lower median), so each ``w_i`` may
differ by ``p * 2**-9`` relative and the tolerance is ``4e-3`` of the scale, and where the exact median is not a
normal float32 (the bins there are coarse, and a median in bin 0 is refused as zero) only finiteness and the
convex-combination bounds are checked. Every tolerance adds ``1e-24`` absolute: a weight near ``eps = 1e-12``
(``2**-40``) times a value below ``2**-86`` underflows in float32 (denormal expert values merge to about 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mergekit.merge_methods import merge_state_dicts, merge_tensors
from strategies import (
    F32_TINY,
    degenerate_shapes,
    full_curvatures,
    lams,
    rank1_shapes,
    rank1_sums,
    seeds,
    task_vectors,
    weight_values,
)

from mergekit_ota.errors import ConfigError, MergeError
from mergekit_ota.math.ffg import saliency
from mergekit_ota.math.ota import EPS_FLOOR_LOG2, HEADROOM_LOG2
from mergekit_ota.math.rank1 import Rank1Curvature
from mergekit_ota.math.reference import (
    reference_ffg,
    reference_mask,
    reference_ota,
    reference_rank1,
    reference_statistic,
)

# float32 resolution near 0: a weight near eps = 1e-12 (2**-40) times a value below 2**-86 underflows
UNDERFLOW = 1e-24
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def registered():
    from mergekit_ota.methods import register_methods

    register_methods()


@dataclass
class Problem:
    """One tensor's base, experts and curvature (as the merge takes it, and as float64 ``v`` for the reference)."""

    base: torch.Tensor
    experts: List[torch.Tensor]
    curvatures: List[Union[torch.Tensor, Rank1Curvature]]
    dense: List[torch.Tensor]  # float64: v, or v_hat = outer(row, col) of the rank-1 factors

    @property
    def taus(self) -> List[torch.Tensor]:
        """``tau_i = t_i - b`` as the kernels form it (float32)."""
        return [e - self.base for e in self.experts]


@st.composite
def problems(draw, max_experts: int = 3) -> Problem:
    """Base (zero, so denormal task vectors survive ``b + tau``, or random), experts ``b + tau_i`` with degenerate
    ``tau_i``, and per expert full or (for a matrix) rank-1 curvature with degenerate values."""
    shape = draw(degenerate_shapes)
    n = draw(st.integers(1, max_experts))
    base = torch.zeros(shape)
    if draw(st.booleans()):
        base = torch.randn(shape, generator=torch.Generator().manual_seed(draw(seeds)))
    experts, curvatures, dense = [], [], []
    for _ in range(n):
        experts.append(base + draw(task_vectors(shape)))
        if len(shape) == 2 and draw(st.booleans()):
            v = Rank1Curvature.from_sums(*draw(rank1_sums(shape)))
            curvatures.append(v)
            dense.append(torch.outer(v.row.double(), v.col.double()))  # its factors: test_rank1_factors_... below
        else:
            v = draw(full_curvatures(shape))
            curvatures.append(v)
            dense.append(v.double())
    return Problem(base, experts, curvatures, dense)


def reference_masks(problem: Problem, rule: str, values: List[float]) -> Optional[List[torch.Tensor]]:
    """FFG masks by their definition from the float32 saliency ``s = v * tau**2`` the merge ranks."""
    if rule == "none":
        return None
    scores = [saliency(tau, v) for tau, v in zip(problem.taus, problem.curvatures)]
    if rule == "density":
        return [reference_mask(s, d) for s, d in zip(scores, values)]
    return [s >= t for s, t in zip(scores, values)]


def result_scale(problem: Problem, lambda_: float, weights: Optional[List[float]] = None) -> float:
    """``max |b| + lambda * sum_i |weight_i| max |tau_i|`` (the size of the numbers a merge adds)."""
    weights = weights or [1.0] * len(problem.experts)
    spread = sum(abs(w) * float(t.double().abs().max()) for w, t in zip(weights, problem.taus))
    return float(problem.base.abs().max()) + lambda_ * spread + float(torch.stack(problem.experts).abs().max())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert torch.isfinite(actual).all(), "non-finite merge"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=atol + UNDERFLOW)


def assert_between_experts(out: torch.Tensor, problem: Problem, lambda_: float, masked: bool, atol: float) -> None:
    """theta lies in ``b + lambda * [min_i tau_i, max_i tau_i]`` (with 0 when some expert may be masked)."""
    taus = torch.stack([t.double() for t in problem.taus])
    low, high = taus.min(0).values, taus.max(0).values
    if masked:
        low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    b = problem.base.double()
    assert torch.isfinite(out).all(), "non-finite merge"
    atol += UNDERFLOW
    assert (out.double() >= b + lambda_ * low - atol).all() and (out.double() <= b + lambda_ * high + atol).all()


def weight_span(dense: List[torch.Tensor], weights: List[float], statistics: List[float], power: float) -> float:
    """``log2(max_i weight_i (max v_i / m_i)**p / eps)``: how many octaves one tensor's OTA weights span (eps 1e-12);
    beyond ``H - L = 164`` the merge may refuse the tensor (:mod:`mergekit_ota.math.ota`, *Scaling*)."""
    terms = [
        math.log2(w) + power * (math.log2(float(v.max()) / m) if m > 0.0 else math.inf)  # m = 0: a zero median
        for v, w, m in zip(dense, weights, statistics)
        if v.numel() and float(v.max()) > 0.0
    ]
    return max(terms, default=-math.inf) - math.log2(1e-12)


RULE_VALUES = {
    "density": st.sampled_from([1e-3, 0.3, 0.5, 1.0]),
    "threshold": st.sampled_from([0.0, 1e-40, 1e-12, 1.0, 1e30]),
}


# ----------------------------------------------------------------------------- ota, one tensor (merge_tensors)


@PROPERTY
@given(
    data=st.data(),
    problem=problems(),
    power=st.sampled_from([0.5, 1.0]),
    mode=st.sampled_from(["none", "mean", "median"]),
    rule=st.sampled_from(["none", "density", "threshold"]),
    consensus=st.sampled_from([None, "sum"]),
    with_base=st.booleans(),
    lambda_=lams,
)
def test_ota_on_degenerate_inputs_equals_the_float64_formula(
    data, problem, power, mode, rule, consensus, with_base, lambda_
):
    """ota (power 0.5/1, curvature_scale none/mean/median, per-tensor density or threshold, sign consensus, with
    and without a base) on degenerate curvature and task vectors: finite and equal to reference_ota of ``v_i / m_i``
    (``m_i`` the float64 statistic) within the module's tolerance; the only error allowed is a zero median."""
    n = len(problem.experts)
    weights = data.draw(st.lists(weight_values, min_size=n, max_size=n))
    values = [data.draw(RULE_VALUES[rule]) for _ in range(n)] if rule != "none" and with_base else []
    parameters = {"curvature": problem.curvatures, "weight": weights, "power": power, "curvature_scale": mode}
    if with_base:
        parameters["lambda"] = lambda_
        if values:
            parameters[rule] = values
        if consensus:
            parameters["sign_consensus"] = consensus
    statistics = [reference_statistic([v], mode) if mode != "none" else 1.0 for v in problem.dense]
    coarse = mode == "median" and min(statistics) < F32_TINY  # the median's bins are coarse among denormals
    extreme = weight_span(problem.dense, weights, statistics, power) > HEADROOM_LOG2 - EPS_FLOOR_LOG2
    inputs = [problem.base, *problem.experts] if with_base else problem.experts
    try:
        out = merge_tensors(inputs, "ota", base_index=0 if with_base else None, parameters=parameters)
    except ConfigError as err:
        assert coarse, err  # a median in (or near) bin 0 is refused
        return
    except MergeError as err:
        assert extreme or coarse, err  # weights spanning more than float32 holds: documented, ota.py's Scaling
        return
    masks = reference_masks(problem, rule, values) if values else None
    lam = lambda_ if with_base else 1.0
    scale = result_scale(problem, lam)
    if coarse or extreme:  # the weights (m_i, or w_i next to eps) are only as exact as float32 holds them
        assert_between_experts(out, problem, lam, masked=bool(values), atol=1e-5 * scale)
        return
    expected = reference_ota(
        problem.base if with_base else None,
        problem.experts,
        [v / m for v, m in zip(problem.dense, statistics)],
        weights,
        masks=masks,
        power=power,
        lambda_=lam,
        consensus=consensus if with_base else None,
    )
    assert_within(out, expected, (4e-3 if mode == "median" else 1e-5) * scale)


# ----------------------------------------------------------------------------- ffg, one tensor (merge_tensors)


@PROPERTY
@given(
    data=st.data(),
    problem=problems(),
    rule=st.sampled_from(["density", "threshold"]),
    normalize=st.booleans(),
    consensus=st.sampled_from([None, "sum"]),
    lambda_=lams,
)
def test_ffg_on_degenerate_inputs_equals_the_float64_formula(data, problem, rule, normalize, consensus, lambda_):
    """ffg (density or threshold, with and without normalize, sign consensus) on degenerate curvature and task
    vectors: finite and equal to reference_ffg with the masks FFG's definition selects, within 1e-5 of the scale."""
    n = len(problem.experts)
    weights = data.draw(st.lists(weight_values, min_size=n, max_size=n))
    values = [data.draw(RULE_VALUES[rule]) for _ in range(n)]
    parameters = {"curvature": problem.curvatures, "weight": weights, "lambda": lambda_, rule: values}
    parameters["normalize"] = normalize
    if consensus:
        parameters["sign_consensus"] = consensus
    out = merge_tensors([problem.base, *problem.experts], "ffg", base_index=0, parameters=parameters)
    expected = reference_ffg(
        problem.base,
        problem.experts,
        weights,
        masks=reference_masks(problem, rule, values),
        lambda_=lambda_,
        normalize=normalize,
        consensus=consensus,
    )
    assert_within(out, expected, 1e-5 * result_scale(problem, lambda_, weights))


# ----------------------------------------------------------------------------- several tensors (merge_state_dicts)


@PROPERTY
@given(
    data=st.data(),
    tensors=st.lists(problems(max_experts=2), min_size=2, max_size=3),
    method=st.sampled_from(["ota", "ffg"]),
    density=st.sampled_from([0.3, 1.0, "auto"]),
    mode=st.sampled_from(["none", "mean", "median"]),
    power=st.sampled_from([0.5, 1.0]),
)
def test_model_wide_density_and_statistics_survive_degenerate_inputs(data, tensors, method, density, mode, power):
    """merge_state_dicts with density_scope: model (a density, or density: auto) and ota's model-wide
    curvature_scale over several tensors of degenerate curvature: every merged tensor is finite and, coordinate by
    coordinate, a masked convex combination of the experts (ota, ffg normalised); the only errors allowed are a
    zero median and (ota) a tensor whose weights span more than float32 holds."""
    n = min(len(t.experts) for t in tensors)
    names = [f"t{i}.weight" for i in range(len(tensors))]
    states = {"base": {k: t.base for k, t in zip(names, tensors)}}
    curvature = {}
    for e in range(n):
        states[f"e{e}"] = {k: t.experts[e] for k, t in zip(names, tensors)}
        curvature[f"e{e}"] = {k: t.curvatures[e] for k, t in zip(names, tensors)}
    parameters = {"curvature": curvature, "density": density, "density_scope": "model"}
    if method == "ota":
        parameters.update(curvature_scale=mode, power=power)
    else:
        parameters["normalize"] = True
    scaled = method == "ota" and mode != "none"
    statistics = [reference_statistic([t.dense[e] for t in tensors], mode) if scaled else 1.0 for e in range(n)]
    try:
        merged = merge_state_dicts(states, method, base="base", parameters=parameters)
    except ConfigError as err:
        assert scaled and mode == "median" and min(statistics) < F32_TINY, err
        return
    except MergeError as err:  # one tensor's weights span more than float32 holds (ota.py's Scaling)
        spans = [weight_span(t.dense[:n], [1.0] * n, statistics, power) for t in tensors]
        assert method == "ota" and max(spans) > HEADROOM_LOG2 - EPS_FLOOR_LOG2, err
        return
    for name, problem in zip(names, tensors):
        trimmed = Problem(problem.base, problem.experts[:n], problem.curvatures[:n], problem.dense[:n])
        assert_between_experts(merged[name], trimmed, 1.0, masked=True, atol=1e-5 * result_scale(trimmed, 1.0))


# ----------------------------------------------------------------------------- rank-1 factors


@PROPERTY
@given(sums=rank1_shapes.flatmap(rank1_sums))
def test_rank1_factors_hold_the_float64_reconstruction_of_any_store(sums):
    """Rank1Curvature.from_sums(r, c) of any factors a store may hold (either all zero, denormal, near float32's
    maximum, a total beyond float32's range) keeps v_hat = outer(r, c) / sum(r) (reference_rank1) as
    outer(row, col): every entry within float32 rounding, 2**-22 relative plus the resolution of a denormal
    row (2**-149 * col_j, row = r / sum(r) <= 1 is what a float32 factor can hold)."""
    r, c = sums
    v = Rank1Curvature.from_sums(r, c)
    assert torch.isfinite(v.row).all() and torch.isfinite(v.col).all()
    expected = reference_rank1(r, c)
    actual = torch.outer(v.row.double(), v.col.double())
    bound = 2.0**-22 * expected + 2.0**-149 * c.double().unsqueeze(0)
    assert ((actual - expected).abs() <= bound).all()


# ----------------------------------------------------------------------------- task vectors near float32's maximum


def test_ffg_grafts_task_vectors_near_float32s_maximum_and_zero_curvature_beside_them():
    """ffg of one expert whose task vector is near float32's maximum (3e38), with zero curvature on some of those
    entries: the saliency v * tau**2 is inf where it overflows and 0 (not NaN) where v = 0, so the density mask is
    the definition's and the graft is exactly b + m * tau."""
    base = torch.zeros(6)
    expert = torch.tensor([3e38, -3e38, 1.0, 3e38, -2.0, 0.0])
    v = torch.tensor([1.0, 0.0, 1.0, 0.0, 1e-45, 1.0])
    scores = saliency(expert - base, v)
    assert not torch.isnan(scores).any() and scores[1] == 0 and scores[3] == 0 and torch.isinf(scores[0])
    out = merge_tensors([base, expert], "ffg", base_index=0, parameters={"curvature": [v], "density": 0.5})
    expected = reference_ffg(base, [expert], [1.0], masks=[reference_mask(scores, 0.5)])
    assert torch.equal(out.double(), expected)


def test_ota_with_task_vectors_near_float32s_maximum_is_exact_or_our_error_naming_the_tensor():
    """ota where the experts' task vectors are near float32's maximum: sum_i w_i tau_i can overflow float32 (the
    weights are scaled up to 2**64), so the merge either matches the float64 formula or raises MergeError naming
    the tensor and the cause; it never returns a non-finite tensor."""
    base = {"big.weight": torch.zeros(4)}
    experts = {
        "a": {"big.weight": torch.tensor([3e38, 1.0, -3e38, 0.0])},
        "b": {"big.weight": torch.tensor([3e38, 2.0, 1.0, 0.0])},
    }
    v = torch.tensor([1.0, 0.0, 3e38, 1e-45])
    curvature = {"a": {"big.weight": v}, "b": {"big.weight": v.flip(0)}}
    try:
        out = merge_state_dicts({"base": base, **experts}, "ota", base="base", parameters={"curvature": curvature})
    except MergeError as err:
        assert "big.weight" in str(err) and "tau" in str(err)
        return
    assert torch.isfinite(out["big.weight"]).all()
    statistics = [reference_statistic([c["big.weight"]], "mean") for c in curvature.values()]
    expected = reference_ota(
        base["big.weight"],
        [e["big.weight"] for e in experts.values()],
        [c["big.weight"].double() / m for c, m in zip(curvature.values(), statistics)],
        [1.0, 1.0],
    )
    torch.testing.assert_close(out["big.weight"].double(), expected, rtol=1e-5, atol=0.0)


# ----------------------------------------------------------------------------- planned merges of rank-1 stores

ZEROED = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def rank1_family(tmp_path_factory):
    """A base and 2 experts with rank-1 stores (the training callback's default compression)."""
    from mergekit_ota.testing import make_family

    return make_family(str(tmp_path_factory.mktemp("rank1")), n_experts=2, compress=True)


def degenerate_store(store: str, out: str, zero: str) -> str:
    """A copy of the rank-1 ``store`` at ``out`` in which ``ZEROED``'s row factor, column factor or both are 0:
    a frozen layer (both), or a store ``mergekit-ota check`` accepts with only one factor zero."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(store, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(store)
    for factor in {"both": ("row", "col"), "row": ("row",), "col": ("col",)}[zero]:
        key = f"{ZEROED}:rank1_{factor}"
        tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, out, metadata=metadata)
    return out


PLANNED = [
    ("ota", "both", {}),  # the default curvature_scale: mean (math domain error before)
    ("ota", "row", {}),
    ("ota", "col", {}),
    ("ota", "row", {"curvature_scale": "median"}),
    ("ota", "col", {"curvature_scale": "none", "power": 1.0}),
    ("ota", "both", {"density": 0.3, "sign_consensus": "sum"}),
    ("ota", "row", {"density": 0.3, "density_scope": "model"}),
    ("ota", "col", {"density": "auto", "density_scope": "model"}),
    ("ota", "both", {"threshold": 1e-20}),
    ("ffg", "both", {"density": 0.3}),
    ("ffg", "row", {"density": "auto", "density_scope": "model", "normalize": True}),
]


@pytest.mark.parametrize("method,zero,options", PLANNED)
def test_planned_merge_of_a_rank1_store_with_a_zero_factor_equals_the_in_memory_merge(
    rank1_family, tmp_path, method, zero, options
):
    """mergekit's planned merge of rank-1 stores where one expert's tensor has a zero row factor, column factor or
    both (v_hat = 0 there) finishes with finite tensors equal to merge_state_dicts on the same weights and
    curvature; under ota without masks and with curvature_scale the zero-curvature expert gets only eps there next to
    the other's w_1 = (v_1 / m_1)**p of order 1, so that tensor is the other expert's."""
    from merging import merge
    from safetensors.torch import load_file

    from mergekit_ota.curvature.store import CurvatureStore

    fam = rank1_family
    stores = [degenerate_store(fam.stores[0], str(tmp_path / "e0.safetensors"), zero), fam.stores[1]]
    per_expert = {k: v for k, v in options.items() if k in ("density", "threshold")}
    shared = {k: v for k, v in options.items() if k not in per_expert}
    models = [{"model": e, "parameters": {"curvature": s, **per_expert}} for e, s in zip(fam.experts, stores)]
    cfg = {"merge_method": method, "base_model": fam.base, "models": models, "dtype": "float32", "parameters": shared}
    planned = merge(cfg, tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in planned.values())

    def weights(path):
        return load_file(f"{path}/model.safetensors")

    def curvature(store):
        opened = CurvatureStore.open(store)
        return {name: opened.load(name, factored=True) for name in opened.names()}

    states = {"base": weights(fam.base), "e0": weights(fam.experts[0]), "e1": weights(fam.experts[1])}
    parameters = {"curvature": {"e0": curvature(stores[0]), "e1": curvature(stores[1])}, **options}
    memory = merge_state_dicts(states, method, base="base", parameters=parameters)
    for name, tensor in planned.items():
        torch.testing.assert_close(tensor, memory[name], rtol=1e-5, atol=1e-7)
    if method == "ota" and not per_expert and options.get("curvature_scale", "mean") != "none":  # w_1 = O(1)
        torch.testing.assert_close(planned[ZEROED], states["e1"][ZEROED], rtol=1e-6, atol=1e-7)


def test_all_zero_curvature_with_a_weight_beyond_float32_gives_eps_weights_not_nan():
    """Every entry of every expert's curvature 0 and a weight beyond float32 (curvature_scale's weight / m**p with a
    tiny statistic m: hypothesis found m = 7e-46) gave 0 * inf = NaN weights and a NaN merge; the weights are
    eps / s (every w_i v_i**p is 0) and OTA gives the plain average of the task vectors at equal weights."""
    from mergekit_ota.math.ota import curvature_weights, ota_merge, weight_divisor

    zeros = torch.zeros(3)
    for power in (0.5, 1.0, 2.0):
        divisor = weight_divisor([zeros], [1.4e45], power, 1e-12)
        weights = curvature_weights(zeros, 1.4e45, power, 1e-12, scale=divisor)
        assert torch.isfinite(weights).all() and torch.equal(weights, torch.full((3,), 1e-12 / divisor.divisor))
        base, taus = torch.zeros(3), [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, -0.5])]
        merged = ota_merge(base, [base + t for t in taus], [zeros, zeros], weights=[1.4e45, 1.4e45], power=power)
        assert torch.allclose(merged, (taus[0] + taus[1]) / 2)
