"""The ``ffg`` merge method: Fast Fisher Grafting, then task arithmetic (see :mod:`mergekit_ota.math.ffg`)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, MergeMethodSpec

from mergekit_ota.errors import ConfigError
from mergekit_ota.math.ffg import ffg_merge
from mergekit_ota.methods.base import CurvatureMergeMethod, ExpertInput
from mergekit_ota.methods.settings import FFG_PARAMETERS, SharedSettings


class FFGMerge(CurvatureMergeMethod):
    """``theta = b + lambda * sum_i weight_i m_i tau_i`` (``/ sum_i weight_i`` if ``normalize``).

    With one expert this grafts its most salient edits onto the base.
    """

    spec = MergeMethodSpec(
        name="ffg",
        pretty_name="FFG (Fast Fisher Grafting)",
        reference_url="https://arxiv.org/abs/2509.11167",
        parameters=FFG_PARAMETERS,
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
    )

    def combine(self, base: Optional[torch.Tensor], experts: Sequence[ExpertInput], shared: SharedSettings) -> torch.Tensor:
        assert base is not None  # the contract requires a base
        missing = [str(e.id) for e in experts if e.rule is None]
        if missing:
            raise ConfigError(f"ffg needs a density or a threshold for every expert; missing for {missing}")
        return ffg_merge(
            base,
            [e.tensor for e in experts],
            [e.curvature for e in experts],
            [e.rule for e in experts],
            [e.settings.weight for e in experts],
            lam=shared.lam,
            normalize=shared.normalize,
        )
