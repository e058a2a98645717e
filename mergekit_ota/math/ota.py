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

from mergekit_ota.math.ffg import KeepRule, f32_operand
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature


def curvature_weights(
    v: Curvature, weight: float, power: float = 0.5, eps: float = 1e-12, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Return ``w = weight * v**power + eps`` in float32: a new tensor, or ``out`` (``v`` untouched).

    A rank-1 ``v`` (:class:`~mergekit_ota.math.rank1.Rank1Curvature`) is never materialised.
    """
    if isinstance(v, Rank1Curvature):
        return v.weights(weight, power, eps, out=out)
    v32 = v.to(torch.float32)
    if power == 0.5:
        w = torch.sqrt(v32, out=out)
    elif power == 1.0:
        w = v.to(torch.float32, copy=True) if out is None else out.copy_(v32)
    else:
        w = torch.pow(v32, power, out=out)
    if weight != 1.0:
        w.mul_(float(weight))
    return w.add_(float(eps))


def ota_merge(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[Curvature],
    weights: Sequence[float],
    rules: Optional[Sequence[Optional[KeepRule]]] = None,
    power: float = 0.5,
    eps: float = 1e-12,
    lam: float = 1.0,
) -> torch.Tensor:
    """Merge experts by their curvature (see the module docstring for the formula).

    ``rules`` (with a base only) give each expert's FFG mask ``m_i``; ``None`` keeps all.
    Accumulates in float32, one expert at a time: the first expert's ``w_1 tau_1`` and
    ``w_1`` become the running sums (two buffers in all, no stacking, no zero fill);
    where ``sum_i w_i m_i <= 0`` (every expert masked) the divisor is 1, so theta = b.
    The result has the dtype of ``base`` (or of the first expert without a base).
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
    numerator: Optional[torch.Tensor] = None
    denominator: Optional[torch.Tensor] = None
    spare_w: Optional[torch.Tensor] = None  # w_i, tau_i of the 2nd expert on: buffers reused
    spare_x: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None  # saliency buffer shared by all masks
    for expert, v, weight, rule in zip(experts, curvatures, weights, rules):
        w = curvature_weights(v, weight, power, eps, out=spare_w)
        if b is not None:
            x = torch.sub(f32_operand(expert), b, out=spare_x)  # tau_i: ours to change
            if rule is not None:
                scores = torch.empty_like(x) if scores is None else scores
                w.mul_(rule.mask(x, v, scratch=scores))
        else:
            x = expert.to(torch.float32)  # may be the caller's tensor: never written
        if numerator is None:  # the first expert's terms become the running sums
            numerator = x.mul_(w) if b is not None else torch.mul(w, x)
            denominator = w
        else:
            numerator.addcmul_(w, x)
            denominator.add_(w)
            spare_w, spare_x = w, (x if b is not None else None)
        del w, x
    assert numerator is not None and denominator is not None

    if b is None:
        return numerator.div_(denominator).to(out_dtype)
    # With eps > 0 and weights >= 0, sum_i w_i m_i > 0 unless every expert is masked:
    # only then (or for other weights/eps) does the divisor need guarding.
    if eps <= 0 or any(r is not None for r in rules) or not all(float(w) >= 0 for w in weights):
        denominator.masked_fill_(~(denominator > 0), 1.0)
    if lam == 1.0:  # b + numerator / denominator in one pass
        return torch.addcdiv(b, numerator, denominator, out=numerator).to(out_dtype)
    return numerator.div_(denominator).mul_(float(lam)).add_(b).to(out_dtype)
