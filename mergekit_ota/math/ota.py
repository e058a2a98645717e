"""Optimization-Trajectory-Aware (OTA) merging: curvature-weighted task vectors.

Symbols: base ``b``, experts ``t_i``, ``tau_i = t_i - b``, second moments ``v_i``,
FFG masks ``m_i`` (all ones without FFG), per-expert ``weight_i``, exponent ``p``
(``power``), ``eps`` > 0 and scale ``lam``.

* with a base:    ``theta = b + lam * sum_i w_i m_i tau_i / sum_i w_i m_i``
* without a base: ``theta = sum_i w_i t_i / sum_i w_i``  (curvature-weighted averaging)

where ``w_i = weight_i * v_i**p + eps``.  Coordinates masked in every expert keep ``b``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mergekit_ota.math.ffg import KeepRule


def curvature_weights(
    v: torch.Tensor, weight: float, power: float = 0.5, eps: float = 1e-12
) -> torch.Tensor:
    """Return ``w = weight * v**power + eps`` as a new float32 tensor."""
    w = v.to(torch.float32, copy=True)
    if power == 0.5:
        w.sqrt_()
    elif power != 1.0:
        w.pow_(power)
    return w.mul_(float(weight)).add_(float(eps))


def ota_merge(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[torch.Tensor],
    weights: Sequence[float],
    rules: Optional[Sequence[Optional[KeepRule]]] = None,
    power: float = 0.5,
    eps: float = 1e-12,
    lam: float = 1.0,
) -> torch.Tensor:
    """Merge experts by their curvature (see the module docstring for the formula).

    ``rules`` (with a base only) give each expert's FFG mask ``m_i``; ``None`` keeps all.
    Accumulates in float32, one expert at a time (two extra buffers, no stacking);
    the result has the dtype of ``base`` (or of the first expert without a base).
    """
    if not experts:
        if base is None:
            raise ValueError("ota_merge needs at least one expert")
        return base
    if not (len(experts) == len(curvatures) == len(weights)):
        raise ValueError("experts, curvatures and weights must have the same length")
    if rules is None:
        rules = [None] * len(experts)
    elif len(rules) != len(experts):
        raise ValueError("rules must have one entry per expert")
    if base is None and any(r is not None for r in rules):
        raise ValueError("FFG masks need a base model (tau_i = t_i - b)")

    out_dtype = (base if base is not None else experts[0]).dtype
    b = base.to(torch.float32) if base is not None else None
    numerator = torch.zeros(experts[0].shape, dtype=torch.float32, device=experts[0].device)
    denominator = torch.zeros_like(numerator)
    for expert, v, weight, rule in zip(experts, curvatures, weights, rules):
        w = curvature_weights(v, weight, power, eps)
        x = expert.to(torch.float32)
        if b is not None:
            x = x - b
        if rule is not None:
            w.mul_(rule.mask(x, v))
        numerator.addcmul_(w, x)
        denominator.add_(w)
        del w, x

    if b is None:
        return numerator.div_(denominator).to(out_dtype)
    covered = denominator > 0
    delta = numerator.div_(torch.where(covered, denominator, torch.ones_like(denominator)))
    return delta.mul_(float(lam)).add_(b).to(out_dtype)
