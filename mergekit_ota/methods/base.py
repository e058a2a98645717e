"""Shared machinery of the ``ota`` and ``ffg`` mergekit methods (parameter binding and result checks).

The numerical work lives in :mod:`mergekit_ota.math`; this module turns mergekit's
bound parameters into validated settings (the rules of
:mod:`mergekit_ota.methods.settings`, the same the planner applies), curvature tensors
and FFG keep rules, implements model-wide density and ``curvature_scale``'s model-wide
statistic for in-memory calls (``merge_state_dicts``; :mod:`mergekit_ota.methods.scale`),
and holds the one finite check of merged tensors (:func:`require_finite`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    GroupMergeMethod,
    MergeMethodSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_ota.compat import MethodHooks, align_dtype, require_supported_mergekit
from mergekit_ota.errors import ConfigError, CurvatureError, MergeError
from mergekit_ota.math.ffg import KeepRule, f32_operand, saliency
from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.ota import scaled_scalar
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature
from mergekit_ota.math.scale import CurvatureScale
from mergekit_ota.methods.scale import STATISTICS_KEY, add_curvatures, statistics
from mergekit_ota.methods.settings import (
    ExpertSettings,
    SharedSettings,
    expert_settings,
    model_wide_density,
    require_known,
    require_tensor_rules,
    shared_settings,
)

LOG = logging.getLogger("mergekit_ota")

# What can make each method's result non-finite (named by require_finite's error).
NON_FINITE_CAUSES = {
    "ota": "NaN/Inf in an input weight (or, in memory, where it is not scanned, in the curvature), task vectors "
    "so large (|tau_i| beyond about 1e19) that sum_i w_i tau_i overflows float32, a large lambda, or a result "
    "beyond the output dtype's range",
    "ffg": "b + lambda * sum_i weight_i m_i tau_i overflowing (lambda, weight, normalize with a near-zero "
    "sum_i weight_i), NaN/Inf in an input weight (or, in memory, in the curvature), or a result beyond the "
    "output dtype's range",
}
_DEFERRED = contextvars.ContextVar("mergekit_ota_finite_check_deferred", default=False)


@contextlib.contextmanager
def finite_check_deferred() -> Iterator[None]:
    """Within this block :meth:`CurvatureMergeMethod.check_results` leaves the finite check to the caller
    (the graph task checks the result once, cast to the dtype it will be saved in)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def require_finite(
    tensor: Optional[torch.Tensor], *, name: Optional[str], method: str, uncast: Optional[torch.Tensor] = None
) -> None:
    """Raise :class:`MergeError` if the floating-point ``tensor`` has a NaN or Inf, naming the tensor.

    One read pass (``aminmax`` propagates NaN and keeps Inf), counting only on failure.
    ``uncast`` is the value before the cast to ``tensor``'s dtype: when it was finite the
    error says the cast overflowed. The one finite check of every merged tensor: the
    in-memory API (:meth:`CurvatureMergeMethod.check_results`) and the graph task (before ``SaveTensor`` writes it).
    """
    if tensor is None or not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.element_size() > 1:
        low, high = torch.aminmax(tensor)
        if math.isfinite(float(low)) and math.isfinite(float(high)):
            return
    elif bool(torch.isfinite(tensor).all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    dtype = str(tensor.dtype).removeprefix("torch.")
    if uncast is not None and uncast.dtype != tensor.dtype and bool(torch.isfinite(uncast).all()):
        biggest = float(uncast.abs().max())
        cause = (
            f"the {str(uncast.dtype).removeprefix('torch.')} result is finite, but its largest magnitude {biggest:.4g} "
            f"exceeds {dtype}'s range (max {torch.finfo(tensor.dtype).max:.4g}): set dtype/out_dtype to float32 or "
            f"bfloat16, or lower lambda"
        )
    else:
        cause = f"possible causes: {NON_FINITE_CAUSES.get(method, 'the inputs or parameters')}"
    raise MergeError(
        f"{method}: merged tensor {name or '<unnamed>'} has {nan + inf} non-finite value(s) ({nan} NaN, {inf} Inf) "
        f"in {dtype}; the merge stopped, it is neither written nor returned. {cause[0].upper()}{cause[1:]}"
    )


@dataclass
class ExpertInput:
    """One expert's tensor, curvature and settings for one output tensor.

    ``bias_multiplier`` is ``s_i = 1 / (1 - beta2**step)`` where bias correction applies (else 1);
    ``statistic`` is ``m_i`` under ``curvature_scale`` (else ``None``), which replaces
    ``s_i`` (:mod:`mergekit_ota.methods.scale`). OTA uses ``s_i v_i`` or ``v_i / m_i``
    through its weight (:meth:`ota_weight`); FFG saliency stays raw.
    """

    id: Hashable
    tensor: torch.Tensor
    curvature: Curvature  # a tensor, or rank-1 factors read from a compressed store
    settings: ExpertSettings
    bias_multiplier: float = 1.0
    statistic: Optional[float] = None

    def ota_weight(self, power: float) -> float:
        """``weight_i * s_i**p`` (``weight_i (s_i v_i)**p + eps = (weight_i s_i**p) v_i**p + eps``), or
        ``weight_i / m_i**p`` under ``curvature_scale`` (``weight_i (v_i / m_i)**p + eps``)."""
        if self.statistic is not None:  # weight * m**-p in float64 log space: inf, not an OverflowError
            weight = self.settings.weight
            if power:
                weight = scaled_scalar(weight, -power * math.log2(self.statistic))
            what, check = f"curvature_scale's 1 / {self.statistic:.4g}", "the expert's curvature"
        else:
            weight = self.settings.weight * self.bias_multiplier**power
            what, check = f"bias correction {self.bias_multiplier:.4g}", "optimizer_step/beta2"
        if not math.isfinite(weight):
            raise ConfigError(
                f"expert {self.id}: weight {self.settings.weight} x {what}**{power} "
                f"is not a finite number; lower power or check {check}"
            )
        return weight

    @property
    def rule(self) -> Optional[KeepRule]:
        if self.settings.density is None and self.settings.threshold is None:
            return None
        return KeepRule(density=self.settings.density, threshold=self.settings.threshold)


def _curvature_tensor(value: Any, expert: Hashable, tensor_name: Optional[str], shape: torch.Size) -> Curvature:
    where = f" for tensor {tensor_name}" if tensor_name else ""
    if isinstance(value, Mapping):  # a curvature state dict: {tensor name: exp_avg_sq}
        if tensor_name not in value:
            raise CurvatureError(f"Curvature state dict of expert {expert} has no tensor {tensor_name!r}")
        value = value[tensor_name]
    if value is None or isinstance(value, str):
        raise CurvatureError(
            f"No curvature tensor for expert {expert}{where}. In memory "
            f"pass parameters={{'curvature': ...}}: per expert a tensor (merge_tensors) or a "
            f"{{tensor name: tensor}} dict (merge_state_dicts); "
            f"store paths are read only when the merge is planned by mergekit-yaml / run_merge"
        )
    if not isinstance(value, (torch.Tensor, Rank1Curvature)):
        raise CurvatureError(f"Curvature for expert {expert}{where} must be a tensor; got {type(value).__name__}")
    if value.shape != shape:
        raise CurvatureError(
            f"Curvature for expert {expert}{where} has shape {tuple(value.shape)}; the weight has shape {tuple(shape)}"
        )
    return value


class CurvatureMergeMethod(MethodHooks, GroupMergeMethod):
    """A mergekit method whose experts carry Adam second moments (``curvature``).

    mergekit's private hooks reach it through :class:`~mergekit_ota.compat.MethodHooks`
    (:meth:`check_parameters`, :meth:`prepare_groups`, :meth:`check_results`).
    """

    spec: MergeMethodSpec

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        require_supported_mergekit()
        if self.spec.contract.base == BasePolicy.REQUIRED and (base_id is None or base_id not in input_ids):
            raise ConfigError(
                f"{self.spec.name} needs a base_model: FFG keeps the most salient entries of each task "
                f"vector tau = expert - base (set base_model:, or use ota for base-free averaging)"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def check_parameters(self, parameters: Mapping[str, Any]) -> None:
        """Before mergekit binds them: refuse names the method does not take (with a did-you-mean)."""
        require_known(parameters, self.spec)

    def shared(self, parameters: Dict[str, Any], has_base: Optional[bool] = None) -> SharedSettings:
        """Validated shared settings (:func:`~mergekit_ota.methods.settings.shared_check`'s rules)."""
        names = {p.name for p in self.spec.shared_parameters}
        return shared_settings(
            {k: v for k, v in parameters.items() if k in names}, method=self.spec.name, has_base=has_base
        )

    def experts(self, group: TensorGroup, parameters: Dict[str, Any], shared: SharedSettings) -> List[ExpertInput]:
        """Validated experts of ``group``, with their bias-correction scale (:mod:`.bias`).

        Each expert's settings pass :func:`~mergekit_ota.methods.settings.expert_check`, all
        of them together :func:`~mergekit_ota.methods.settings.tensor_problems` (the rules the
        planner applies too); a broken rule raises :class:`ConfigError`.
        """
        names = [p.name for p in self.spec.input_parameters if p.name != "curvature"]
        tensor = group.metadata.name
        settings = [
            (
                entry,
                expert_settings(
                    {name: parameters[name][entry.id] for name in names},
                    expert=entry.id,
                    tensor=tensor,
                    method=self.spec.name,
                    has_base=group.base is not None,
                    bias_correction=shared.bias_correction,
                    density_scope=shared.density_scope,
                ),
            )
            for entry in group.non_base
        ]
        require_tensor_rules(
            [(entry.id, values) for entry, values in settings], method=self.spec.name, shared=shared, tensor=tensor
        )
        found = parameters.get(STATISTICS_KEY) if shared.curvature_scale != "none" else None
        result = []
        for entry, values in settings:
            v = _curvature_tensor(parameters["curvature"][entry.id], entry.id, tensor, entry.tensor.shape)
            v = v.to(device=entry.tensor.device, dtype=torch.float32)
            multiplier = values.bias(
                shared.bias_correction, entry.id
            ).multiplier  # expert_settings checked it is decidable
            statistic = None
            if found is not None:
                if entry.id not in found:
                    raise ConfigError(f"curvature_scale: no {shared.curvature_scale} of expert {entry.id}'s curvature")
                statistic = float(found[entry.id])
            result.append(
                ExpertInput(entry.id, entry.tensor, v, values, bias_multiplier=multiplier, statistic=statistic)
            )
        return result

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        shared = self.shared(parameters, has_base=group.base is not None)
        base = group.base.tensor if group.base is not None else None
        if not group.non_base:
            if base is None:
                raise ConfigError(f"{self.spec.name}: no inputs for {group.metadata.name}")
            return base
        return self.combine(base, self.experts(group, parameters, shared), shared, name=group.metadata.name)

    @abstractmethod
    def combine(
        self,
        base: Optional[torch.Tensor],
        experts: Sequence[ExpertInput],
        shared: SharedSettings,
        *,
        name: Optional[str] = None,
    ) -> torch.Tensor:
        """Merge validated experts (pure tensor math); ``name`` is the tensor's, for error messages."""

    # -- model-wide density for in-memory calls -------------------------------------

    def prepare_groups(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        input_dtypes: Sequence[Optional[torch.dtype]],
    ) -> List[Dict[str, Any]]:
        """The bound parameters with what needs every tensor of the call (:meth:`_model_wide`)."""
        return self._model_wide(groups, parameters, input_dtypes)

    def check_results(self, groups: Sequence[TensorGroup], results: Tuple[torch.Tensor, ...]) -> None:
        """The finite check of each result (already cast to ``out_dtype``), unless the caller does it
        (:func:`finite_check_deferred`)."""
        if not _DEFERRED.get():
            for group, result in zip(groups, results):
                require_finite(result, name=group.metadata.name, method=self.spec.name)

    def _model_wide(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        input_dtypes: Sequence[Optional[torch.dtype]],
    ) -> List[Dict[str, Any]]:
        """What needs every tensor of the call: ``density_scope: model`` thresholds
        (:meth:`_model_wide_thresholds`) and ``curvature_scale``'s statistics (:meth:`_model_wide_statistics`).

        Shared settings are read once, from the first group (as ``density_scope`` always was). With
        ``density_scope: tensor`` and ``curvature_scale: none`` (``ffg`` always has ``none``) nothing else happens;
        under ota's default ``mean`` the statistics take one pass over the curvature.
        """
        if not groups:
            return parameters
        shared = self.shared(parameters[0], has_base=groups[0].base is not None)
        densities = [d for params in parameters for _, d in params.get("density", {}).items()]
        if any(model_wide_density(shared.density_scope, d) for d in densities):  # density_scope: model, or auto
            parameters = self._model_wide_thresholds(groups, parameters, input_dtypes)
        if shared.curvature_scale != "none" and STATISTICS_KEY not in parameters[0]:  # the graph gives it
            parameters = self._model_wide_statistics(groups, parameters, shared)
        return parameters

    def _model_wide_thresholds(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        input_dtypes: Sequence[Optional[torch.dtype]],
    ) -> List[Dict[str, Any]]:
        """Replace per-expert ``density`` by one model-wide saliency ``threshold`` per expert.

        Saliency is computed on each group cast to its execution dtype, as the masks will be.
        """
        totals: Dict[Hashable, Tuple[SaliencyHistogram, float]] = {}
        for group, params, dtype in zip(groups, parameters, input_dtypes):
            cast = align_dtype(group, dtype)
            merge_histograms(totals, self.saliency_histograms(cast, params), group.metadata.name)
        thresholds = thresholds_for_density(totals)
        return [with_thresholds(params, thresholds) for params in parameters]

    def _model_wide_statistics(
        self, groups: Sequence[TensorGroup], parameters: List[Dict[str, Any]], shared: SharedSettings
    ) -> List[Dict[str, Any]]:
        """Give every group each expert's ``m_i``: its ``curvature_scale`` statistic over all the groups'
        curvature (``merge_state_dicts``: the whole model; ``merge_tensors``: that one tensor)."""
        mode = shared.curvature_scale
        for params in parameters[1:]:
            other = self.shared(params).curvature_scale
            if other != mode:
                raise ConfigError(f"curvature_scale must be one value for the whole merge; got {mode} and {other}")
        totals: Dict[Hashable, CurvatureScale] = {}
        for group, params in zip(groups, parameters):
            add_curvatures(totals, self.curvatures(group, params), mode)
        found = statistics(totals, mode)
        return [{**params, STATISTICS_KEY: found} for params in parameters]

    def curvatures(self, group: TensorGroup, parameters: Mapping[str, Any]) -> Dict[Hashable, Curvature]:
        """Each expert's curvature for ``group`` as the merge reads it (float32; shapes checked)."""
        name = group.metadata.name
        return {
            entry.id: _curvature_tensor(parameters["curvature"][entry.id], entry.id, name, entry.tensor.shape).to(
                dtype=torch.float32
            )
            for entry in group.non_base
        }

    def saliency_histograms(
        self, group: TensorGroup, parameters: Dict[str, Any]
    ) -> Dict[Hashable, Tuple[SaliencyHistogram, float]]:
        """Per expert with a ``density``: histogram of its saliencies ``v * tau**2`` in this group, and the density."""
        result: Dict[Hashable, Tuple[SaliencyHistogram, float]] = {}
        if group.base is None or not group.non_base:
            return result
        base = group.base.tensor.to(torch.float32)
        taus: Optional[torch.Tensor] = None  # one buffer for every expert's tau, one for its saliency
        scores: Optional[torch.Tensor] = None
        shared = self.shared(parameters, has_base=True)
        for expert in self.experts(group, parameters, shared):
            if not shared.model_wide(expert.settings):  # no density, or one per tensor
                continue
            auto = expert.settings.auto_density
            histogram = SaliencyHistogram()
            taus = torch.sub(f32_operand(expert.tensor), base, out=taus)
            scores = saliency(taus, expert.curvature, out=scores)
            histogram.add(scores, overwrite=True, with_mass=auto)
            result[expert.id] = (histogram, AutoDensity(shared.saliency_mass) if auto else expert.settings.density)
        return result


def merge_histograms(
    totals: Dict[Hashable, Tuple[SaliencyHistogram, float]],
    part: Dict[Hashable, Tuple[SaliencyHistogram, float]],
    tensor: Optional[str],
) -> None:
    """Add one tensor's per-expert histograms into ``totals`` (one density per expert)."""
    for key, (histogram, density) in part.items():
        if key not in totals:
            totals[key] = (histogram, density)
            continue
        total, expected = totals[key]
        if density != expected:
            raise ConfigError(
                f"density_scope: model needs one density per expert; expert {key} "
                f"has {expected} and {density} (tensor {tensor})"
            )
        total.merge(histogram)


@dataclass(frozen=True)
class AutoDensity:
    """``density: auto``: keep the fewest entries whose saliency sums to ``mass`` of the expert's total."""

    mass: float

    def __str__(self) -> str:
        return f"auto (saliency_mass {self.mass:g})"


MASS_CURVE = (0.5, 0.8, 0.9, 0.95, 0.99)  # the saliency masses check reports the density of


@dataclass(frozen=True)
class AutoChoice:
    """What ``density: auto`` chose for one expert: the fraction of entries and of saliency mass kept at the
    saliency ``threshold``, and the mass-vs-density curve (``curve[q]``: the fraction kept at mass ``q``)."""

    threshold: float
    entries: int
    kept: float
    mass: float
    target: float
    curve: Tuple[Tuple[float, float], ...]

    def describe(self, expert: Hashable) -> str:
        """One line, as check and the merge log print it."""
        points = ", ".join(f"{100 * q:g}% -> {100 * d:.2f}%" for q, d in self.curve)
        return (
            f"density: auto, expert {expert}: keeps {100 * self.kept:.2f}% of its {self.entries:,} entries, "
            f"{100 * self.mass:.2f}% of its saliency mass (target {self.target:g}; saliency threshold "
            f"{self.threshold:.4g}); density kept at saliency mass {points}"
        )


def auto_choices(totals: Dict[Hashable, Tuple[SaliencyHistogram, Any]]) -> Dict[Hashable, AutoChoice]:
    """Per ``density: auto`` expert of ``totals``: its :class:`AutoChoice` (from the mass histogram)."""
    found = {}
    for key, (hist, density) in totals.items():
        if isinstance(density, AutoDensity):
            threshold = hist.threshold_for_mass(density.mass)
            kept, mass = hist.kept_at(threshold)
            curve = tuple((q, hist.kept_at(hist.threshold_for_mass(q))[0]) for q in MASS_CURVE)
            found[key] = AutoChoice(threshold, hist.total, kept, mass, density.mass, curve)
    return found


def thresholds_for_density(
    totals: Dict[Hashable, Tuple[SaliencyHistogram, Any]], auto: Optional[Dict[Hashable, AutoChoice]] = None
) -> Dict[Hashable, float]:
    """One absolute saliency threshold per expert that keeps its density over all its tensors; for
    ``density: auto``, the one keeping its ``saliency_mass`` (:meth:`SaliencyHistogram.threshold_for_mass`),
    logged with the fraction of entries it keeps (``auto``: :func:`auto_choices` of ``totals``, when the caller
    has it already)."""
    thresholds = {}
    auto = auto_choices(totals) if auto is None else auto
    for key, (hist, density) in totals.items():
        if key in auto:
            LOG.info(auto[key].describe(key))
            thresholds[key] = auto[key].threshold
        else:
            thresholds[key] = hist.threshold_for_density(density)
    return thresholds


def with_thresholds(parameters: Dict[str, Any], thresholds: Dict[Hashable, float]) -> Dict[str, Any]:
    """Copy of bound ``parameters`` where each expert in ``thresholds`` uses that absolute threshold."""
    if not thresholds:
        return parameters
    result = dict(parameters)
    result["density"] = PerInputValues(
        [(key, None if key in thresholds else value) for key, value in parameters["density"].items()]
    )
    result["threshold"] = PerInputValues(
        [(key, thresholds.get(key, value)) for key, value in parameters["threshold"].items()]
    )
    return result
