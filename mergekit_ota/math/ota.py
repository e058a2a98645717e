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
chosen per tensor (:func:`weight_divisor`) in float64 log space so that float32 holds
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
from typing import Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import MergeError
from mergekit_ota.math.ffg import KeepRule
from mergekit_ota.math.floats import SAFE_LOG2, exp2, f32_operand, lift_zeros, scaled_scalar
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature
from mergekit_ota.math.reduce import Reducer, add_to_base, buffer_like, reducer

HEADROOM_LOG2 = 64  # H: every w_i / s <= 2**H
EPS_FLOOR_LOG2 = -100  # L: eps / s >= 2**L where H allows it


@dataclass(frozen=True)
class WeightDivisor:
    """``s = 2**exponent``, the common divisor of every ``w_i`` of one tensor, and ``log2 c``
    (``c = max_i max v_i``; ``-inf`` when ``c == 0``) that it was chosen from."""

    exponent: int = 0
    log2_c: float = -math.inf

    @property
    def divisor(self) -> float:
        """``s`` as a float (0 or inf only for absurd exponents)."""
        return exp2(float(self.exponent))


def _log2_add(a: float, b: float) -> float:
    """``log2(2**a + 2**b)`` without forming either power."""
    high, low = max(a, b), min(a, b)
    if high == -math.inf:
        return -math.inf
    return high + math.log2(1.0 + 2.0 ** (low - high))


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


def weight_divisor(
    curvatures: Sequence[Curvature], weights: Sequence[float], power: float, eps: float
) -> WeightDivisor:
    """The divisor ``s = 2**e`` of one tensor's weights (module docstring, *Scaling*).

    One reduction per full curvature tensor (its max), O(m + n) for rank-1 ones.
    A non-finite ``c`` or weight gives ``s = 1``: the merge's finite check reports it.
    """
    tops = [curvature_max(v) for v in curvatures]
    c = max(tops, default=0.0)
    top_weight = max((abs(float(w)) for w in weights), default=0.0)
    if not (math.isfinite(c) and math.isfinite(top_weight) and math.isfinite(power) and math.isfinite(eps)):
        return WeightDivisor()
    log2_c = math.log2(c) if c > 0.0 else -math.inf
    # log2 of the largest curvature term, max_i |weight_i| c_i**p (c_i = max v_i: under curvature_scale a large
    # weight_i = weight / m_i**p goes with a small c_i, so W * c**p would overstate it by far); -inf where all are 0
    top = max((_log2_term(float(w), v, power) for w, v in zip(weights, tops)), default=-math.inf)
    low = math.log2(eps) if eps > 0.0 else -math.inf
    high = _log2_add(top, low)
    if high == -math.inf:
        return WeightDivisor(0, log2_c)
    up = math.ceil(high - HEADROOM_LOG2)  # smallest e with hi - e <= H
    down = math.floor(low - EPS_FLOOR_LOG2) if low > -math.inf else None  # largest e with lo - e >= L
    if up <= 0 and (down is None or down >= 0):
        exponent = 0
    elif up > 0:
        exponent = up
    else:  # eps too small: scale up as far as the headroom allows
        exponent = max(down, up)  # type: ignore[type-var]  (down is not None here)
    return WeightDivisor(int(exponent), log2_c)


def _log2_term(weight: float, top: float, power: float) -> float:
    """``log2(|weight| * top**power)`` (``top**0 == 1``); ``-inf`` where the term is 0."""
    if weight == 0.0 or (power != 0.0 and top == 0.0):
        return -math.inf
    return math.log2(abs(weight)) + (power * math.log2(top) if power != 0.0 else 0.0)


def _prescale(scale: Optional[WeightDivisor], weight: float, power: float) -> Optional[int]:
    """``k`` when ``v**p`` or ``weight / s`` would leave float32's safe range (else ``None``)."""
    if scale is None or power == 0.0:
        return None
    factor = math.log2(abs(weight)) - scale.exponent if weight != 0.0 else 0.0
    if scale.log2_c == -math.inf:
        # every v is 0, so v**p * factor is 0; but a factor beyond float32 (curvature_scale's weight / m**p with a
        # tiny m) would make it 0 * inf = NaN in float32: k = 0 takes the float64 path, where it stays 0
        return 0 if abs(factor) > SAFE_LOG2 else None
    intermediate = power * scale.log2_c
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
    scale: Optional[WeightDivisor] = None,
) -> torch.Tensor:
    """Return ``(weight * v**power + eps) / s`` in float32: a new tensor, or ``out`` (``v`` untouched).

    ``s`` is ``scale.divisor`` (1 without ``scale``). The scalars fold into the one
    multiply: ``v**p * (weight / s) + eps / s`` (``v`` pre-divided by ``2**k`` only where
    ``v**p`` would leave float32, see the module docstring). A rank-1 ``v``
    (:class:`~mergekit_ota.math.rank1.Rank1Curvature`) is never materialised.
    """
    if isinstance(v, Rank1Curvature):
        return rank1_weights(v, weight, power, eps, out=out, scale=scale)
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


def rank1_weights(
    v: Rank1Curvature,
    weight: float,
    power: float,
    eps: float,
    out: Optional[torch.Tensor] = None,
    scale: Optional[WeightDivisor] = None,
) -> torch.Tensor:
    """``(weight * v_hat**power + eps) / s`` from the factors of ``v_hat = outer(row, col)``: one m x n pass plus
    the ``eps`` add.

    ``s = scale.divisor`` (1 without ``scale``). When ``s != 1``, or a factor's power would
    leave float32, the factors are normalised first (O(m + n)):
    ``(row / R)**p * (weight * (R C)**p / s)`` outer ``(col / C)**p`` with ``R = max(row)``,
    ``C = max(col)``, in float64 (``col / C`` can fall below float32's range where its term still
    counts), rounded to float32 once (module docstring, *Scaling*). Where ``R`` or ``C`` is 0 (an all-zero
    factor: a frozen layer, or a store with only one of its factors zero) ``v_hat`` is 0 and, for
    ``power > 0``, every weight is ``eps / s`` (one fill: no factor is divided by its zero maximum).
    """
    exponent = scale.exponent if scale is not None else 0
    shift = scaled_scalar(float(eps), -exponent)
    top_row, top_col = _tops(v) if power != 0.0 else (1.0, 1.0)
    if top_row == 0.0 or top_col == 0.0:  # v_hat == 0 (factors >= 0): weight * v_hat**p == 0
        if out is None:
            return torch.full(v.shape, shift, dtype=torch.float32, device=v.device)
        return out.fill_(shift)
    if _rank1_in_float64(scale, float(weight), power, top_row, top_col):
        # (row / R)**p * (weight (R C)**p / s) outer (col / C)**p: a ratio below 2**-149 would flush to 0 in float32
        factor = scaled_scalar(float(weight), power * (math.log2(top_row) + math.log2(top_col)) - exponent)
        row = _power(v.row.double() / top_row, power).mul_(factor)
        w = torch.outer(row, _power(v.col.double() / top_col, power)).add_(shift)
        return w.to(torch.float32) if out is None else out.copy_(w)
    row = _power(v.row, power)
    factor = scaled_scalar(float(weight), -exponent)
    if factor != 1.0:
        row = row * factor
    return torch.outer(row, _power(v.col, power), out=out).add_(shift)


def _rank1_in_float64(
    scale: Optional[WeightDivisor], weight: float, power: float, top_row: float, top_col: float
) -> bool:
    """Whether :func:`rank1_weights` normalises the factors in float64: ``s != 1``, or ``R**p``, ``C**p`` or
    ``weight / s`` outside ``2**-SAFE_LOG2 .. 2**SAFE_LOG2``."""
    if scale is None or power == 0.0 or scale.log2_c == -math.inf:
        return False
    log2_weight = math.log2(abs(weight)) if weight != 0.0 else 0.0
    logs = (power * math.log2(top_row), power * math.log2(top_col), log2_weight - scale.exponent)
    return scale.exponent != 0 or not all(abs(x) <= SAFE_LOG2 for x in logs)


def _power(x: torch.Tensor, power: float) -> torch.Tensor:
    """``x**power`` (``x`` itself for 1, ``sqrt`` for 0.5): a new tensor unless ``power == 1``."""
    if power == 1.0:
        return x
    return x.sqrt() if power == 0.5 else x.pow(power)


def _tops(v: Rank1Curvature) -> Tuple[float, float]:
    """``(max(row), max(col))``; 0 for an empty factor (``outer(row, col)`` is then empty)."""
    return tuple(float(x.max()) if x.numel() else 0.0 for x in (v.row, v.col))  # type: ignore[return-value]


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

    One loop feeds a reducer (:mod:`mergekit_ota.math.reduce`) each expert's ``tau_i`` with ``a_i = w_i m_i / s``:
    plain accumulation gives ``N = sum_i w_i m_i tau_i`` and ``D = sum_i w_i m_i``; ``consensus`` (``"sum"`` or
    ``"count"``, a base needed) sums only the experts whose ``w_i m_i tau_i`` has the elected sign
    (:class:`~mergekit_ota.math.consensus.SignConsensus`). Then ``theta = b + lambda * N / D``.

    ``rules`` (with a base only) give each expert's FFG mask ``m_i``; ``None`` keeps all.
    Accumulates ``w_i / s`` in float32, one expert at a time (no stacking, no zero fill). Where ``D == 0``
    because no expert counts there (all masked; with consensus also all zero), the divisor is 1, so theta = b;
    where it is 0 although some expert counts (weights underflowed), :class:`~mergekit_ota.errors.MergeError`
    is raised naming ``name``. The result has the dtype of ``base`` (or of the first expert without a base).
    """
    if not experts:
        if base is None:
            raise ValueError("ota_merge needs at least one expert")
        return base
    keep = _checked_rules(base, len(experts), curvatures, weights, rules, consensus)
    scale = weight_divisor(curvatures, weights, power, eps)
    sums = reducer(consensus, in_place=base is not None)  # without a base tau_i is the caller's t_i
    counted = _Counted(consensus is not None) if _may_vanish(scale, weights, eps) else None
    b = base.to(torch.float32) if base is not None else None
    scores: Optional[torch.Tensor] = None  # saliency buffer shared by all masks
    spare_w: Optional[torch.Tensor] = None  # w_i and tau_i: buffers reused once the reducer leaves them
    spare_tau: Optional[torch.Tensor] = None
    for expert, v, weight, rule in zip(experts, curvatures, weights, keep):
        w = curvature_weights(v, weight, power, eps, out=spare_w, scale=scale)
        tau = _task_vector(expert, b, out=spare_tau)
        mask = None
        if rule is not None:
            scores = buffer_like(scores, tau)
            mask = rule.mask(tau, v, scratch=scores, out=sums.scratch(tau))
            w.mul_(mask)  # a_i = w_i m_i
        if counted is not None:
            counted.add(tau, mask)
        sums.add(tau, w)
        spare_w, spare_tau = sums.spare(w), sums.spare(tau)
    numerator, denominator = sums.result()
    assert isinstance(denominator, torch.Tensor)
    if counted is not None:
        counted.check(denominator, name=name, power=power, eps=eps, scale=scale, weights=weights)
    # D can be 0 (no expert counts there: theta = b) only with masks, consensus, or weights that may vanish
    may_be_zero = consensus is not None or counted is not None or any(r is not None for r in keep)
    theta = _finish(b, numerator, denominator, lambda_, sums if may_be_zero else None)
    return theta.to((base if base is not None else experts[0]).dtype)


def _checked_rules(
    base: Optional[torch.Tensor],
    count: int,
    curvatures: Sequence[Curvature],
    weights: Sequence[float],
    rules: Optional[Sequence[Optional[KeepRule]]],
    consensus: Optional[str],
) -> Sequence[Optional[KeepRule]]:
    """``rules`` (``None`` for every expert when not given) after checking the inputs fit together."""
    if not (count == len(curvatures) == len(weights)):
        raise ValueError("experts, curvatures and weights must have the same length")
    if rules is None:
        rules = [None] * count
    elif len(rules) != count:
        raise ValueError("rules must have one entry per expert")
    if base is None and any(r is not None for r in rules):
        raise ValueError("FFG masks need a base model (tau_i = t_i - b)")
    if base is None and consensus is not None:
        raise ValueError("sign consensus needs a base model (tau_i = t_i - b)")
    return rules


def _may_vanish(scale: WeightDivisor, weights: Sequence[float], eps: float) -> bool:
    """Whether ``D`` can be 0 where some expert counts: every counted ``w_i / s >= eps / s > 0`` unless ``eps / s``
    underflows in float32, or a negative weight (the in-memory API allows one) cancels."""
    shift = float(torch.tensor(scaled_scalar(float(eps), -scale.exponent), dtype=torch.float32))
    return not shift > 0.0 or any(float(w) < 0.0 for w in weights)


def _task_vector(expert: torch.Tensor, b: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    """``tau = t - b`` in float32 (into ``out``); without a base ``t`` itself as float32, which may be the caller's
    tensor (the reducer is made not to write it)."""
    if b is None:
        return expert.to(torch.float32)
    return torch.sub(f32_operand(expert), b, out=out)


def _finish(
    b: Optional[torch.Tensor],
    numerator: torch.Tensor,
    denominator: torch.Tensor,
    lambda_: float,
    lift: Optional[Reducer],
) -> torch.Tensor:
    """``theta = b + lambda * N / D`` written over ``N`` (one ``addcdiv`` pass at ``lambda = 1``); without a base
    ``N / D``. With ``lift`` every ``D = 0`` becomes 1 first (through its scratch), so ``theta = b`` there."""
    if b is None:
        return numerator.div_(denominator)
    if lift is not None:
        lift_zeros(denominator, scratch=lift.scratch(denominator))
    if lambda_ == 1.0:
        return torch.addcdiv(b, numerator, denominator, out=numerator)
    return add_to_base(b, numerator.div_(denominator), lambda_)


class _Counted:
    """``K = OR_i k_i``, where some expert counts towards ``D`` unless its weight underflowed: ``k_i = [m_i != 0]``
    (everywhere without a mask), under sign consensus also ``[tau_i != 0]`` (a zero ``c_i`` agrees with no sign).

    Tracked only where :func:`_may_vanish`; :meth:`check` raises where ``D = 0`` inside ``K``.
    """

    def __init__(self, nonzero: bool) -> None:
        self.nonzero = nonzero  # k_i also needs tau_i != 0 (sign consensus)
        self.where: Optional[torch.Tensor] = None  # K so far (boolean); None with everywhere
        self.everywhere = False

    def add(self, tau: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Add expert i's ``k_i`` (before the reducer overwrites ``tau`` or ``mask``)."""
        if self.everywhere:
            return
        if mask is None and not self.nonzero:
            self.everywhere, self.where = True, None
            return
        live = tau != 0 if self.nonzero else mask != 0
        if self.nonzero and mask is not None:
            live.logical_and_(mask != 0)
        self.where = live if self.where is None else self.where.logical_or_(live)

    def check(
        self,
        denominator: torch.Tensor,
        *,
        name: Optional[str],
        power: float,
        eps: float,
        scale: WeightDivisor,
        weights: Sequence[float],
    ) -> None:
        """Raise :class:`~mergekit_ota.errors.MergeError` if ``D == 0`` anywhere in ``K``."""
        vanished = denominator == 0
        if self.where is not None:
            vanished.logical_and_(self.where)
        count = int(torch.count_nonzero(vanished))
        if not count:
            return
        where = f"tensor {name}: " if name else ""
        negative = any(float(x) < 0 for x in weights)
        raise MergeError(
            f"ota: {where}at {count} of {denominator.numel()} coordinates every weight "
            f"w_i = weight_i * v_i**power + eps of the experts kept there underflowed to 0 (power {power}, eps {eps}, "
            f"largest curvature {exp2(scale.log2_c):.3g}): the weights span more than float32's range; lower power, "
            f"raise eps, or leave out the expert with extreme curvature"
            + ("; negative weights can also cancel (ota needs weight >= 0)" if negative else "")
        )
