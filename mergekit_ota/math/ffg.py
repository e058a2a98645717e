"""Fast Fisher Grafting (FFG): saliency, masks, and the grafted task-arithmetic merge.

Symbols: base ``b``, expert ``t_i``, task vector ``tau_i = t_i - b``, Adam second
moment ``v_i`` (>= 0).  Saliency ``s_i = v_i * tau_i**2`` is the diagonal-Fisher
(Optimal-Brain-Damage) estimate of the loss increase when ``tau_i`` is reverted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def saliency(tau: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Return ``s = v * tau**2`` in float32 (new tensor, inputs untouched)."""
    s = tau.to(torch.float32).square()
    return s.mul_(v.to(torch.float32))


def kept_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: ``k = max(1, int(density * numel))`` (mergekit's rule)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    return min(numel, max(1, int(density * numel)))


def density_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping exactly ``k = kept_count(numel, density)`` highest scores.

    Uses one ``kthvalue`` (no sort).  Ties at the k-th value are broken by flat
    index (lowest first), so the count is exact and deterministic.
    """
    numel = scores.numel()
    if numel == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = kept_count(numel, density)
    if k == numel:
        return torch.ones_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    kth = torch.kthvalue(flat, numel - k + 1).values
    mask = flat > kth
    missing = k - int(mask.sum())
    if missing > 0:
        ties = torch.nonzero(flat == kth, as_tuple=True)[0][:missing]
        mask[ties] = True
    return mask.reshape(scores.shape)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask ``scores >= threshold`` (absolute FFG threshold)."""
    return scores >= threshold


@dataclass(frozen=True)
class KeepRule:
    """Which entries of a task vector FFG keeps: a ``density`` or an absolute ``threshold``."""

    density: Optional[float] = None
    threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.density is None) == (self.threshold is None):
            raise ValueError("KeepRule needs exactly one of density or threshold")

    def mask(self, tau: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries of ``tau`` kept by saliency ``v * tau**2``."""
        scores = saliency(tau, v)
        if self.threshold is not None:
            return threshold_mask(scores, self.threshold)
        return density_mask(scores, self.density)


def ffg_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[Optional[torch.Tensor]],
    rules: Sequence[Optional[KeepRule]],
    weights: Sequence[float],
    lam: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Task arithmetic over grafted task vectors.

    ``theta = b + lam * sum_i weight_i * m_i * tau_i``, divided by ``sum_i weight_i``
    when ``normalize`` (a sum below 1e-8 in magnitude divides by 1), with
    ``m_i = rules[i].mask(tau_i, v_i)`` (all ones where the rule is ``None``).
    Computed in float32; returned in ``base.dtype``.
    """
    if not (len(experts) == len(curvatures) == len(rules) == len(weights)):
        raise ValueError("experts, curvatures, rules and weights must have the same length")
    b = base.to(torch.float32)
    total = torch.zeros_like(b)
    for expert, v, rule, weight in zip(experts, curvatures, rules, weights):
        tau = expert.to(torch.float32) - b
        if rule is not None:
            tau.mul_(rule.mask(tau, v))
        total.add_(tau, alpha=float(weight))
        del tau
    if normalize:
        divisor = float(sum(weights))
        if abs(divisor) >= 1e-8:
            total.div_(divisor)
    return total.mul_(float(lam)).add_(b).to(base.dtype)
