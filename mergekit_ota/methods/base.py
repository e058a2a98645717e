"""Shared machinery of the ``ota`` and ``ffg`` mergekit methods (parameter binding only).

The numerical work lives in :mod:`mergekit_ota.math`; this module turns mergekit's
bound parameters into validated settings, curvature tensors and FFG keep rules,
and implements model-wide density for in-memory calls (``merge_state_dicts``).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    BatchOptions,
    GroupMergeMethod,
    MergeMethodSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_ota.compat import require_supported_mergekit
from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.math.ffg import KeepRule, f32_operand
from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature, dense
from mergekit_ota.methods.settings import (
    ExpertSettings,
    SharedSettings,
    expert_settings,
    shared_settings,
)


@dataclass
class ExpertInput:
    """One expert's tensor, curvature and settings for one output tensor."""

    id: Hashable
    tensor: torch.Tensor
    curvature: Curvature  # a tensor, or rank-1 factors read from a compressed store
    settings: ExpertSettings

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
            f"Curvature for expert {expert}{where} has shape {tuple(value.shape)}; "
            f"the weight has shape {tuple(shape)}"
        )
    return value


class CurvatureMergeMethod(GroupMergeMethod):
    """A mergekit method whose experts carry Adam second moments (``curvature``)."""

    spec: MergeMethodSpec

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        require_supported_mergekit()
        if self.spec.contract.base == BasePolicy.REQUIRED and (base_id is None or base_id not in input_ids):
            raise ConfigError(
                f"{self.spec.name} needs a base_model: FFG keeps the most salient entries of each task "
                f"vector tau = expert - base (set base_model:, or use ota for base-free averaging)"
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)

    def shared(self, parameters: Dict[str, Any]) -> SharedSettings:
        names = {p.name for p in self.spec.shared_parameters}
        return shared_settings({k: v for k, v in parameters.items() if k in names}, method=self.spec.name)

    def experts(self, group: TensorGroup, parameters: Dict[str, Any], shared: SharedSettings) -> List[ExpertInput]:
        """Validated experts of ``group``, curvature bias-corrected when asked."""
        names = [p.name for p in self.spec.input_parameters if p.name != "curvature"]
        result = []
        for entry in group.non_base:
            settings = expert_settings(
                {name: parameters[name][entry.id] for name in names},
                expert=entry.id,
                tensor=group.metadata.name,
            )
            v = _curvature_tensor(parameters["curvature"][entry.id], entry.id, group.metadata.name, entry.tensor.shape)
            v = v.to(device=entry.tensor.device, dtype=torch.float32)
            if shared.bias_correction:
                try:
                    v = v * settings.bias_correction_scale()
                except ValueError as error:
                    raise ConfigError(f"Expert {entry.id}: {error}") from None
            result.append(ExpertInput(entry.id, entry.tensor, v, settings))
            if group.base is None and result[-1].rule is not None:
                raise ConfigError(
                    f"Expert {entry.id} sets density/threshold (FFG), which needs a base_model: "
                    f"FFG keeps entries of the task vector tau = expert - base"
                )
        return result

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        shared = self.shared(parameters)
        base = group.base.tensor if group.base is not None else None
        if not group.non_base:
            if base is None:
                raise ConfigError(f"{self.spec.name}: no inputs for {group.metadata.name}")
            return base
        return self.combine(base, self.experts(group, parameters, shared), shared)

    @abstractmethod
    def combine(self, base: Optional[torch.Tensor], experts: Sequence[ExpertInput], shared: SharedSettings) -> torch.Tensor:
        """Merge validated experts (pure tensor math)."""

    # -- model-wide density for in-memory calls -------------------------------------

    def _execute(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        options: BatchOptions,
        *,
        input_dtypes: Sequence[Optional[torch.dtype]],
        out_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, ...]:
        parameters = self._model_wide_thresholds(groups, parameters, input_dtypes)
        return super()._execute(groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype)

    def _model_wide_thresholds(
        self,
        groups: Sequence[TensorGroup],
        parameters: List[Dict[str, Any]],
        input_dtypes: Sequence[Optional[torch.dtype]],
    ) -> List[Dict[str, Any]]:
        """Replace per-expert ``density`` by one model-wide saliency ``threshold`` per expert.

        Saliency is computed on each group cast to its execution dtype, as the masks will be.
        """
        from mergekit.merge_methods.dtype import align_dtype

        if not groups or self.shared(parameters[0]).density_scope != "model":
            return parameters
        totals: Dict[Hashable, Tuple[SaliencyHistogram, float]] = {}
        for group, params, dtype in zip(groups, parameters, input_dtypes):
            cast = align_dtype(group, dtype)
            merge_histograms(totals, self.saliency_histograms(cast, params), group.metadata.name)
        thresholds = thresholds_for_density(totals)
        return [with_thresholds(params, thresholds) for params in parameters]

    def saliency_histograms(self, group: TensorGroup, parameters: Dict[str, Any]) -> Dict[Hashable, Tuple[SaliencyHistogram, float]]:
        """Per expert with a ``density``: histogram of its saliencies ``v * tau**2`` in this group, and the density."""
        result: Dict[Hashable, Tuple[SaliencyHistogram, float]] = {}
        if group.base is None or not group.non_base:
            return result
        base = group.base.tensor.to(torch.float32)
        scores: Optional[torch.Tensor] = None  # one buffer for every expert's tau, then saliency
        for expert in self.experts(group, parameters, self.shared(parameters)):
            if expert.settings.density is None:
                continue
            histogram = SaliencyHistogram()
            scores = torch.sub(f32_operand(expert.tensor), base, out=scores)
            histogram.add(scores.square_().mul_(dense(expert.curvature)), overwrite=True)
            result[expert.id] = (histogram, expert.settings.density)
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


def thresholds_for_density(totals: Dict[Hashable, Tuple[SaliencyHistogram, float]]) -> Dict[Hashable, float]:
    """One absolute saliency threshold per expert that keeps its density over all its tensors."""
    return {key: hist.threshold_for_density(density) for key, (hist, density) in totals.items()}


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
