"""The ``ota`` merge method: curvature-weighted merging of experts (see :mod:`mergekit_ota.math.ota`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec

from mergekit_ota import catalog
from mergekit_ota.math.ota import ota_merge
from mergekit_ota.methods.base import CurvatureMergeMethod, ExpertInput
from mergekit_ota.methods.settings import OTA_PARAMETERS, SharedSettings


class OTAMerge(CurvatureMergeMethod):
    """``theta = b + lambda * sum_i w_i m_i tau_i / sum_i w_i m_i``, ``w_i = weight_i v_i**power + eps``."""

    spec = MergeMethodSpec(
        name=catalog.OTA.name,
        pretty_name=catalog.OTA.pretty_name,
        reference_url=catalog.OTA.reference_url,
        parameters=OTA_PARAMETERS,
        contract=InputContract(base=BasePolicy.OPTIONAL, min_non_base=1),
    )

    def combine(
        self,
        base: Optional[torch.Tensor],
        experts: Sequence[ExpertInput],
        shared: SharedSettings,
        *,
        name: Optional[str] = None,
    ) -> torch.Tensor:
        """:func:`~mergekit_ota.math.ota.ota_merge` of experts whose settings passed every rule
        (:mod:`mergekit_ota.methods.settings`: ``weight_i >= 0``, some ``> 0``; ``lambda`` needs a base)."""
        return ota_merge(
            base,
            [e.tensor for e in experts],
            [e.curvature for e in experts],
            [e.ota_weight(shared.power) for e in experts],
            rules=[e.rule for e in experts] if base is not None else None,
            power=shared.power,
            eps=shared.eps,
            lambda_=shared.lambda_,
            name=name,
            consensus=shared.consensus,
        )
