"""Optimization-Trajectory-Aware (OTA) merging: curvature-weighted task vectors.

Symbols: base ``b``, experts ``t_i``, ``tau_i = t_i - b``, second moments ``v_i``,
FFG masks ``m_i`` (all ones without FFG), per-expert ``weight_i``, exponent ``p``
(``power``), ``eps`` > 0 and scale ``lambda``.

* with a base:    ``theta = b + lambda * sum_i w_i m_i tau_i / sum_i w_i m_i``
* without a base: ``theta = sum_i w_i t_i / sum_i w_i``  (curvature-weighted averaging)
* with sign consensus (a base needed): the sums run only over the experts whose kept
  ``w_i m_i tau_i`` has the elected sign (:mod:`mergekit_ota.math.consensus`)

where ``w_i = weight_i * v_i**p + eps`` (``weight_i >= 0``, some ``weight_i > 0``).
Coordinates masked in every expert keep ``b``.

**Scaling.** theta is, coordinate by coordinate, a ratio of sums over the same ``w_i``,
so dividing every ``w_i`` of a tensor by one ``s > 0`` leaves it unchanged; in
particular scaling every ``v_i`` by ``c`` and ``eps`` by ``c**p`` multiplies every
``w_i`` by ``c**p``. The merge computes ``w_i / s`` instead of ``w_i``, with ``s``
chosen per tensor (:func:`weight_scale`) in float64 log space so that float32 holds
it: with ``c_i = max v_i`` (for rank-1 curvature ``max(row) * max(col)``, no
m x n pass) and ``c = max_i c_i``,

* ``hi = log2(max_i |weight_i| c_i**p + eps)`` with ``c_i = max v_i``, the largest ``w_i`` anywhere, and
  ``lo = log2(eps)``;
* ``s = 2**e`` (a power of two: scaling by it is exact), with ``e = 0`` when
  ``hi <= H`` and ``lo >= L`` (every ordinary merge: bit for bit the unscaled
  formula, no extra pass); otherwise the ``e`` closest to 0 with ``hi - e <= H``
  (no overflow: ``w_i / s <= 2**H``, so ``sum_i w_i m_i tau_i`` keeps ``2**(128-H)`` of
  headroom for ``K * max |tau_i|``) and, as far as that allows, ``lo - e >= L`` (``eps / s``
  and terms down to ``2**-24`` of it stay normal floats). ``H = 64``, ``L = -100``: the
  weights of one tensor may span ``2**164`` (about 49 decades) before anything underflows.

The scalars fold into the multiply that ``w_i`` needs anyway:
``w_i / s = v_i**p * (weight_i / s) + eps / s``. Only when ``v_i**p`` itself would leave
float32 (``|p * log2 c| > 120``, e.g. ``v ~ 1e38`` with ``p = 1``), or ``weight_i / s`` would, is ``w_i``
computed in float64 from ``v_i`` divided by ``2**k``, ``k = floor(log2 c)``:
``w_i / s = (v_i / 2**k)**p * (weight_i * 2**(k p) / s) + eps / s``. float32 would flush every ``v_i`` below
``2**(k - 149)`` to 0 there (with ``c ~ 3e38``, every ``v_i < 4``), although its term can still be far above
``eps / s``; float64 holds the whole range, and only the result, within float32's range by the choice of ``s``,
is rounded to float32 (one float64 copy of the tensor, only for such extreme curvature).
A rank-1 ``v_hat = outer(row, col)`` is scaled through its factors
(``(row / max row)**p * (weight_i (max row * max col)**p / s)`` outer ``(col / max col)**p``),
still one m x n pass (in float64 where ``s != 1`` or a factor would leave float32, for the same reason).

Where ``max_i |weight_i| c_i**p / eps`` exceeds float32's range (``hi - lo > H - L``), ``eps / s``
underflows to 0 and a coordinate whose ``v_i**p`` are all tiny next to ``c**p`` can get
``w_i / s = 0`` in every unmasked expert: ``sum_i w_i m_i = 0`` although some expert is
unmasked there. That raises :class:`~mergekit_ota.errors.MergeError`; only coordinates
masked in every expert keep ``b``. Where every ``v_i`` is 0 (``c = 0``), ``w_i = eps``:
the plain mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mergekit_ota.errors import MergeError
from mergekit_ota.math.ffg import KeepRule, f32_operand, lift_zeros
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature

HEADROOM_LOG2 = 64  # H: every w_i / s <= 2**H
EPS_FLOOR_LOG2 = -100  # L: eps / s >= 2**L where H allows it
SAFE_LOG2 = 120  # float32 factors (v**p, weight_i / s) kept within 2**-120 .. 2**120


@dataclass(frozen=True)
class WeightScale:
    """``s = 2**exponent``, the common divisor of every ``w_i`` of one tensor, and ``log2 c``
    (``c = max_i max v_i``; ``-inf`` when ``c == 0``) that it was chosen from."""

    exponent: int = 0
    log2_c: float = -math.inf

    @property
    def divisor(self) -> float:
        """``s`` as a float (0 or inf only for absurd exponents)."""
        return _exp2(float(self.exponent))


def _exp2(x: float) -> float:
    """``2**x`` in float64, 0 or inf instead of an OverflowError."""
    if x > 1023.0:
        return math.inf
    if x < -1074.0:
        return 0.0
    return 2.0**x


def _log2_add(a: float, b: float) -> float:
    """``log2(2**a + 2**b)`` without forming either power."""
    high, low = max(a, b), min(a, b)
    if high == -math.inf:
        return -math.inf
    return high + math.log2(1.0 + 2.0 ** (low - high))


def scaled_scalar(x: float, log2_factor: float) -> float:
    """``x * 2**log2_factor`` in float64 (exact for an integer power), inf or 0 instead of an OverflowError."""
    if x == 0.0:
        return 0.0
    if float(log2_factor).is_integer():
        try:
            return math.ldexp(x, int(log2_factor))
        except OverflowError:
            return math.copysign(math.inf, x)
    return math.copysign(_exp2(math.log2(abs(x)) + log2_factor), x)


def curvature_max(v: Curvature) -> float:
    """``max(v)`` as a float; for a :class:`Rank1Curvature` ``max(row) * max(col)`` in float32,
    which is exactly the largest entry of ``outer(row, col)`` (rounding is monotonic)."""
    if isinstance(v, Rank1Curvature):
        if v.row.numel() == 0 or v.col.numel() == 0:
            return 0.0
        return float(v.row.max() * v.col.max())
    if v.numel() == 0:
        return 0.0
    return float(v.max())


def weight_scale(curvatures: Sequence[Curvature], weights: Sequence[float], power: float, eps: float) -> WeightScale:
    """The divisor ``s = 2**e`` of one tensor's weights (module docstring, *Scaling*).

    One reduction per full curvature tensor (its max), O(m + n) for rank-1 ones.
    A non-finite ``c`` or weight gives ``s = 1``: the merge's finite check reports it.
    """
    tops = [curvature_max(v) for v in curvatures]
    c = max(tops, default=0.0)
    top_weight = max((abs(float(w)) for w in weights), default=0.0)
    if not (math.isfinite(c) and math.isfinite(top_weight) and math.isfinite(power) and math.isfinite(eps)):
        return WeightScale()
    log2_c = math.log2(c) if c > 0.0 else -math.inf
    # log2 of the largest curvature term, max_i |weight_i| c_i**p (c_i = max v_i: under curvature_scale a large
    # weight_i = weight / m_i**p goes with a small c_i, so W * c**p would overstate it by far); -inf where all are 0
    top = max((_log2_term(float(w), v, power) for w, v in zip(weights, tops)), default=-math.inf)
    low = math.log2(eps) if eps > 0.0 else -math.inf
    high = _log2_add(top, low)
    if high == -math.inf:
        return WeightScale(0, log2_c)
    up = math.ceil(high - HEADROOM_LOG2)  # smallest e with hi - e <= H
    down = math.floor(low - EPS_FLOOR_LOG2) if low > -math.inf else None  # largest e with lo - e >= L
    if up <= 0 and (down is None or down >= 0):
        exponent = 0
    elif up > 0:
        exponent = up
    else:  # eps too small: scale up as far as the headroom allows
        exponent = max(down, up)  # type: ignore[type-var]  (down is not None here)
    return WeightScale(int(exponent), log2_c)


def _log2_term(weight: float, top: float, power: float) -> float:
    """``log2(|weight| * top**power)`` (``top**0 == 1``); ``-inf`` where the term is 0."""
    if weight == 0.0 or (power != 0.0 and top == 0.0):
        return -math.inf
    return math.log2(abs(weight)) + (power * math.log2(top) if power != 0.0 else 0.0)


def _prescale(scale: Optional[WeightScale], weight: float, power: float) -> Optional[int]:
    """``k`` when ``v**p`` or ``weight / s`` would leave float32's safe range (else ``None``)."""
    if scale is None or power == 0.0 or scale.log2_c == -math.inf:
        return None
    intermediate = power * scale.log2_c
    factor = math.log2(abs(weight)) - scale.exponent if weight != 0.0 else 0.0
    if abs(intermediate) <= SAFE_LOG2 and abs(factor) <= SAFE_LOG2:
        return None
    return min(127, max(-126, math.floor(scale.log2_c)))


def curvature_weights(
    v: Curvature,
    weight: float,
    power: float = 0.5,
    eps: float = 1e-12,
    out: Optional[torch.Tensor] = None,
    *,
    scale: Optional[WeightScale] = None,
) -> torch.Tensor:
    """Return ``(weight * v**power + eps) / s`` in float32: a new tensor, or ``out`` (``v`` untouched).

    ``s`` is ``scale.divisor`` (1 without ``scale``). The scalars fold into the one
    multiply: ``v**p * (weight / s) + eps / s`` (``v`` pre-divided by ``2**k`` only where
    ``v**p`` would leave float32, see the module docstring). A rank-1 ``v``
    (:class:`~mergekit_ota.math.rank1.Rank1Curvature`) is never materialised.
    """
    if isinstance(v, Rank1Curvature):
        return v.weights(weight, power, eps, out=out, scale=scale)
    exponent = scale.exponent if scale is not None else 0
    factor = scaled_scalar(float(weight), -exponent)
    shift = scaled_scalar(float(eps), -exponent)
    v32 = v.to(torch.float32)
    k = _prescale(scale, float(weight), power)
    if k is not None:  # (v / 2**k)**p * (weight * 2**(k p) / s), in float64 (see the module docstring)
        u = v.to(torch.float64).mul_(math.ldexp(1.0, -k))
        u = u.sqrt_() if power == 0.5 else u if power == 1.0 else u.pow_(power)
        u.mul_(scaled_scalar(float(weight), k * power - exponent)).add_(shift)
        return u.to(torch.float32) if out is None else out.copy_(u)
    if power == 0.5:
        w = torch.sqrt(v32, out=out)
    elif power == 1.0:
        if factor != 1.0:
            return torch.mul(v32, factor, out=out).add_(shift)
        w = v.to(torch.float32, copy=True) if out is None else out.copy_(v32)
    else:
        w = torch.pow(v32, power, out=out)
    if factor != 1.0:
        w.mul_(factor)
    return w.add_(shift)


def ota_merge(
    base: Optional[torch.Tensor],
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[Curvature],
    weights: Sequence[float],
    rules: Optional[Sequence[Optional[KeepRule]]] = None,
    power: float = 0.5,
    eps: float = 1e-12,
    lambda_: float = 1.0,
    *,
    name: Optional[str] = None,
    consensus: Optional[str] = None,
) -> torch.Tensor:
    """Merge experts by their curvature (see the module docstring for the formula and the scaling).

    ``consensus`` (``"sum"`` or ``"count"``, a base needed): elect a sign per coordinate and sum
    only the agreeing experts' ``w_i m_i tau_i`` and ``w_i`` (:func:`_consensus_merge`).

    ``rules`` (with a base only) give each expert's FFG mask ``m_i``; ``None`` keeps all.
    Accumulates ``w_i / s`` in float32, one expert at a time: the first expert's
    ``w_1 tau_1`` and ``w_1`` become the running sums (two buffers in all, no stacking,
    no zero fill). Where ``sum_i w_i m_i == 0`` because every expert is masked, the
    divisor is 1, so theta = b; where it is 0 although some expert is unmasked (weights
    underflowed), :class:`~mergekit_ota.errors.MergeError` is raised naming ``name``.
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

    if consensus is not None:
        if base is None:
            raise ValueError("sign consensus needs a base model (tau_i = t_i - b)")
        return _consensus_merge(base, experts, curvatures, weights, rules, power, eps, lambda_, name, consensus)
    scale = weight_scale(curvatures, weights, power, eps)
    # w_i / s >= eps / s > 0 for every unmasked expert, unless eps / s underflows in float32
    # (or a negative weight cancels): only then can a zero sum hide an unmasked expert.
    shift = float(torch.tensor(scaled_scalar(float(eps), -scale.exponent), dtype=torch.float32))
    may_vanish = not shift > 0.0 or any(float(w) < 0.0 for w in weights)
    kept: Optional[torch.Tensor] = None  # where some expert is unmasked (tracked only if may_vanish)
    all_kept = False

    out_dtype = (base if base is not None else experts[0]).dtype
    b = base.to(torch.float32) if base is not None else None
    numerator: Optional[torch.Tensor] = None
    denominator: Optional[torch.Tensor] = None
    spare_w: Optional[torch.Tensor] = None  # w_i, tau_i of the 2nd expert on: buffers reused
    spare_x: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None  # saliency buffer shared by all masks
    ones: Optional[torch.Tensor] = None  # the mask as 1.0/0.0 (fast to multiply by), one buffer for all
    for expert, v, weight, rule in zip(experts, curvatures, weights, rules):
        w = curvature_weights(v, weight, power, eps, out=spare_w, scale=scale)
        if b is not None:
            x = torch.sub(f32_operand(expert), b, out=spare_x)  # tau_i: ours to change
            if rule is not None:
                scores = torch.empty_like(x) if scores is None else scores
                ones = torch.empty_like(x) if ones is None else ones
                mask = rule.mask(x, v, scratch=scores, out=ones)
                w.mul_(mask)
                if may_vanish and not all_kept:
                    kept = mask.clone() if kept is None else kept.logical_or_(mask)
                del mask
            else:
                all_kept = True
        else:
            x = expert.to(torch.float32)  # may be the caller's tensor: never written
            all_kept = True
        if numerator is None:  # the first expert's terms become the running sums
            numerator = x.mul_(w) if b is not None else torch.mul(w, x)
            denominator = w
        else:
            numerator.addcmul_(w, x)
            denominator.add_(w)
            spare_w, spare_x = w, (x if b is not None else None)
        del w, x
    assert numerator is not None and denominator is not None

    masked = any(r is not None for r in rules)
    if may_vanish:
        vanished = denominator == 0
        if not all_kept and kept is not None:
            vanished.logical_and_(kept)
        count = int(torch.count_nonzero(vanished))
        if count:
            where = f"tensor {name}: " if name else ""
            raise MergeError(
                f"ota: {where}at {count} of {denominator.numel()} coordinates every unmasked expert's weight "
                f"w_i = weight_i * v_i**power + eps underflowed to 0 (power {power}, eps {eps}, largest curvature "
                f"{_exp2(scale.log2_c):.3g}): the weights span more than float32's range; lower power, raise eps, "
                f"or leave out the expert with extreme curvature"
                + (
                    "; negative weights can also cancel (ota needs weight >= 0)"
                    if any(float(x) < 0 for x in weights)
                    else ""
                )
            )
    if b is None:
        return numerator.div_(denominator).to(out_dtype)
    if masked or may_vanish:  # coordinates masked in every expert: divisor 1, so theta = b
        lift_zeros(denominator, scratch=scores)
    if lambda_ == 1.0:  # b + numerator / denominator in one pass
        return torch.addcdiv(b, numerator, denominator, out=numerator).to(out_dtype)
    return numerator.div_(denominator).mul_(float(lambda_)).add_(b).to(out_dtype)


def _consensus_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[Curvature],
    weights: Sequence[float],
    rules: Sequence[Optional[KeepRule]],
    power: float,
    eps: float,
    lambda_: float,
    name: Optional[str],
    rule: str,
) -> torch.Tensor:
    """``theta = b + lambda * N / D`` with ``N = sum_i g_i w_i m_i tau_i``, ``D = sum_i g_i w_i``, ``g_i`` whether
    expert i's kept contribution has the elected sign (:class:`~mergekit_ota.math.consensus.SignConsensus`);
    ``D = 0`` (no expert agrees: all masked or zero there) keeps ``b``. The weights are scaled as in
    :func:`ota_merge`; a coordinate where some expert kept a nonzero ``tau_i`` but every weight underflowed
    raises :class:`~mergekit_ota.errors.MergeError`."""
    from mergekit_ota.math.consensus import SignConsensus

    scale = weight_scale(curvatures, weights, power, eps)
    shift = float(torch.tensor(scaled_scalar(float(eps), -scale.exponent), dtype=torch.float32))
    # else every kept w_i >= eps / s > 0; a negative weight (the in-memory API allows one) can cancel D to 0
    may_vanish = not shift > 0.0 or any(float(w) < 0.0 for w in weights)
    b = base.to(torch.float32)
    votes = SignConsensus(rule)
    kept: Optional[torch.Tensor] = None  # where some expert kept a nonzero tau_i (tracked only if may_vanish)
    scores: Optional[torch.Tensor] = None  # saliency buffer shared by all masks
    spare_w: Optional[torch.Tensor] = None  # w_i and tau_i: two buffers reused for every expert
    spare_x: Optional[torch.Tensor] = None
    for expert, v, weight, keep in zip(experts, curvatures, weights, rules):
        w = curvature_weights(v, weight, power, eps, out=spare_w, scale=scale)
        tau = torch.sub(f32_operand(expert), b, out=spare_x)
        if keep is not None:
            scores = torch.empty_like(tau) if scores is None else scores
            w.mul_(keep.mask(tau, v, scratch=scores, out=votes.scratch(tau)))  # w_i m_i
        if may_vanish:
            live = tau != 0 if keep is None else (tau != 0).logical_and_(votes.scratch(tau) != 0)
            kept = live if kept is None else kept.logical_or_(live)
        votes.add(tau.mul_(w), w)  # c_i = w_i m_i tau_i
        spare_w, spare_x = w, tau
    numerator, denominator = votes.result()
    if kept is not None:
        vanished = int(torch.count_nonzero((denominator == 0).logical_and_(kept)))
        if vanished:
            where = f"tensor {name}: " if name else ""
            raise MergeError(
                f"ota: {where}at {vanished} of {denominator.numel()} coordinates every kept expert's weight "
                f"w_i = weight_i * v_i**power + eps underflowed to 0 (power {power}, eps {eps}): lower power or raise "
                "eps"
            )
    lift_zeros(denominator, scratch=votes.scratch(denominator))  # D = 0: no expert agrees, N = 0 there: theta = b
    if lambda_ == 1.0:  # b + N / D in one pass
        return torch.addcdiv(b, numerator, denominator, out=numerator).to(base.dtype)
    return numerator.div_(denominator).mul_(float(lambda_)).add_(b).to(base.dtype)
