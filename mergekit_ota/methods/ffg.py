"""The ``ffg`` merge method: Fast Fisher Grafting, then task arithmetic (see :mod:`mergekit_ota.math.ffg`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec

from mergekit_ota import catalog
from mergekit_ota.math.ffg import ffg_merge
from mergekit_ota.methods.base import CurvatureMergeMethod, ExpertInput
from mergekit_ota.methods.settings import FFG_PARAMETERS, SharedSettings


class FFGMerge(CurvatureMergeMethod):
    """``theta = b + lambda * sum_i weight_i m_i tau_i`` (``/ sum_i weight_i`` if ``normalize``).

    With one expert this grafts its most salient edits onto the base. A negative
    ``weight_i`` subtracts expert i's grafted edit (task negation).
    """

    spec = MergeMethodSpec(
        name=catalog.FFG.name,
        pretty_name=catalog.FFG.pretty_name,
        reference_url=catalog.FFG.reference_url,
        parameters=FFG_PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def combine(
        self,
        base: Optional[torch.Tensor],
        experts: Sequence[ExpertInput],
        shared: SharedSettings,
        *,
        name: Optional[str] = None,
    ) -> torch.Tensor:
        """:func:`~mergekit_ota.math.ffg.ffg_merge` of experts whose settings passed every rule
        (:mod:`mergekit_ota.methods.settings`: a density or threshold each; ``sum_i weight_i != 0``
        with ``normalize``). Weights may be negative (task negation)."""
        assert base is not None  # the contract requires a base
        return ffg_merge(
            base,
            [e.tensor for e in experts],
            [e.curvature for e in experts],
            [e.rule for e in experts],
            [e.settings.weight for e in experts],
            lambda_=shared.lambda_,
            normalize=shared.normalize,
            consensus=shared.consensus,
        )
