"""Fast Fisher Grafting (FFG): saliency, masks, and the grafted task-arithmetic merge.

Symbols: base ``b``, expert ``t_i``, task vector ``tau_i = t_i - b``, Adam second
moment ``v_i`` (>= 0).  Saliency ``s_i = v_i * tau_i**2`` is the diagonal-Fisher
(Optimal-Brain-Damage) estimate of the loss increase when ``tau_i`` is reverted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mergekit_ota.math.floats import f32_operand
from mergekit_ota.math.rank1 import Curvature, dense
from mergekit_ota.math.reduce import add_to_base, buffer_like, ratio, reducer


def saliency(tau: torch.Tensor, v: Curvature, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return ``s = v * tau**2`` in float32 (a new tensor, or written into ``out``, which may be ``tau`` itself).

    Formed as ``(v * tau) * tau``: where ``tau**2`` alone would overflow (``|tau| > 1.8e19``) and ``v = 0``, ``s``
    is 0, not ``0 * inf = NaN`` (a saliency beyond float32's range is ``inf``, which ranks highest). The same two
    passes as ``tau**2 * v``."""
    t = tau.to(torch.float32)
    if out is not None and out.data_ptr() == t.data_ptr():  # tau is needed twice: not overwritten in between
        return out.copy_(saliency(t, v))
    return torch.mul(t, dense(v).to(torch.float32), out=out).mul_(t)


def kept_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: ``k = max(1, int(density * numel))`` (mergekit's rule)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]; got {density}")
    return min(numel, max(1, int(density * numel)))


SELECTION_SAMPLE = 1 << 14  # sample size for bracketing the k-th largest value (small: cheap to gather and select)
_SELECTION_MIN = 1 << 20  # below this many entries one kthvalue is as fast
_TIE_CHUNK = 1 << 20  # smallest chunk whose Trues are counted at once when breaking ties


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the 1-D tensor ``values`` (exactly ``kthvalue(values, n - k + 1)``).

    For large tensors a fixed-seed random sample brackets the answer between two
    sample quantiles ``lo <= hi`` (+-4 standard deviations of the sample rank); a
    comparison pass counts the entries below ``lo`` and those in ``[lo, hi]``, and
    ``kthvalue`` runs on that small candidate set only.  If the bracket misses (rare,
    or NaN present) it falls back to ``kthvalue`` on everything: exact either way.
    """
    n = values.numel()
    rank = n - k + 1  # 1-based rank from the bottom
    if n < _SELECTION_MIN:
        return torch.kthvalue(values, rank).values
    generator = torch.Generator(device=values.device).manual_seed(n)
    picks = torch.randint(n, (SELECTION_SAMPLE,), generator=generator, device=values.device)
    sample = values[picks]
    center = rank / n * SELECTION_SAMPLE
    margin = 4.0 * math.sqrt(center * (1.0 - rank / n)) + 8.0
    low, high = int(center - margin), int(center + margin) + 1  # 0-based ranks in the sample
    lo = torch.kthvalue(sample, low + 1).values if low >= 0 else values.new_tensor(-math.inf)
    hi = torch.kthvalue(sample, high + 1).values if high < SELECTION_SAMPLE else values.new_tensor(math.inf)
    below_lo = values < lo
    below = int(torch.count_nonzero(below_lo))
    inside = (values <= hi).logical_xor_(below_lo)  # lo <= value <= hi, as lo <= hi (NaN in neither)
    del below_lo
    count = int(torch.count_nonzero(inside))
    if below < rank <= below + count:
        if bool(lo == hi):
            return lo
        return torch.kthvalue(values[inside], rank - below).values
    return torch.kthvalue(values, rank).values


def _end_of_nth_true(flags: torch.Tensor, n: int) -> int:
    """Index just past the ``n``-th True of the 1-D bool tensor ``flags`` (which has >= n Trues).

    Up to ``_TIE_CHUNK`` entries, one index tensor; beyond, counts Trues in at most 16
    chunks, then a running count (``cumsum``) inside the chunk that holds the ``n``-th
    one: few operations, no index tensor of all Trues.
    """
    if flags.numel() <= _TIE_CHUNK:  # small: one index tensor is cheaper than counting
        return int(torch.nonzero(flags, as_tuple=True)[0][n - 1]) + 1
    chunk = max(_TIE_CHUNK, -(-flags.numel() // 16))
    seen = 0
    for start in range(0, flags.numel(), chunk):
        part = flags[start : start + chunk]
        count = int(torch.count_nonzero(part))
        if seen + count >= n:
            running = torch.cumsum(part, 0, dtype=torch.int32 if part.numel() < 2**31 else torch.int64)
            target = torch.tensor([n - seen], dtype=running.dtype, device=running.device)
            return start + int(torch.searchsorted(running, target)) + 1
        seen += count
    raise ValueError(f"fewer than {n} True values")


def density_mask(scores: torch.Tensor, density: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask keeping exactly ``k = kept_count(numel, density)`` highest scores: boolean, or 1.0/0.0 in ``out``.

    Finds the k-th largest score ``s_k`` by selection (:func:`kth_largest`, no sort),
    keeps ``scores >= s_k``; ties at ``s_k`` are broken by flat index (lowest first),
    so the count is exact and deterministic. ``out`` (a contiguous float tensor of ``scores``'
    shape, not ``scores`` itself) receives the mask as numbers, see :func:`threshold_mask`.
    """
    if out is not None and not out.is_contiguous():  # e.g. a buffer shaped like a transposed input
        return out.copy_(density_mask(scores, density))
    numel = scores.numel()
    if numel == 0:
        return torch.zeros_like(scores, dtype=torch.bool) if out is None else out
    k = kept_count(numel, density)
    if k == numel:
        return torch.ones_like(scores, dtype=torch.bool) if out is None else out.fill_(1.0)
    flat = scores.reshape(-1)
    kth = kth_largest(flat, k)
    mask = flat >= kth if out is None else torch.ge(flat, kth, out=out.view(-1))
    count = int(torch.count_nonzero(mask))
    if count > k:  # several entries equal the k-th value: keep only the lowest-index ones
        ties = flat == kth
        keep = k - (count - int(torch.count_nonzero(ties)))
        cut = _end_of_nth_true(ties, keep)
        del ties
        torch.gt(flat[cut:], kth, out=mask[cut:])
    return mask.reshape(scores.shape)


def threshold_mask(scores: torch.Tensor, threshold: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mask ``scores >= threshold`` (absolute FFG threshold): boolean, or 1.0/0.0 written into ``out``.

    A merge passes a float ``out`` it reuses: torch's CPU kernels multiply by a float 0/1 tensor about
    8x faster than by a boolean one (which takes a type-promoting path), and no mask is allocated.
    """
    return scores >= threshold if out is None else torch.ge(scores, threshold, out=out)


@dataclass(frozen=True)
class KeepRule:
    """Which entries of a task vector FFG keeps: a ``density`` or an absolute ``threshold``."""

    density: Optional[float] = None
    threshold: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.density is None) == (self.threshold is None):
            raise ValueError("KeepRule needs exactly one of density or threshold")

    def mask(
        self,
        tau: torch.Tensor,
        v: Curvature,
        scratch: Optional[torch.Tensor] = None,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mask of the entries of ``tau`` kept by saliency ``v * tau**2``: boolean, or 1.0/0.0 in ``out``.

        ``scratch`` (float32, ``tau``'s shape) receives the saliencies instead of a new tensor; ``out``
        (float32, ``tau``'s shape, another buffer) the mask as numbers (:func:`threshold_mask`).
        """
        scores = saliency(tau, v, out=scratch)
        if self.threshold is not None:
            return threshold_mask(scores, self.threshold, out=out)
        return density_mask(scores, self.density, out=out)


def ffg_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    curvatures: Sequence[Optional[Curvature]],
    rules: Sequence[Optional[KeepRule]],
    weights: Sequence[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus: Optional[str] = None,
) -> torch.Tensor:
    """Task arithmetic over grafted task vectors.

    ``theta = b + lambda * sum_i weight_i * m_i * tau_i``, divided by ``sum_i weight_i``
    when ``normalize`` (which must not be 0: the ``ffg`` method refuses it,
    :func:`mergekit_ota.methods.settings.tensor_problems`), with
    ``m_i = rules[i].mask(tau_i, v_i)`` (all ones where the rule is ``None``).
    Weights may be negative (task negation). Computed in float32; returned in ``base.dtype``.

    ``consensus`` (``"sum"`` or ``"count"``): TIES with FFG's selection. Per coordinate a sign is elected
    from ``c_i = weight_i m_i tau_i`` and only the agreeing ``c_i`` are summed, ``N = sum_i g_i c_i``;
    ``normalize`` then divides by ``D = sum_i g_i weight_i``, the agreeing experts' weights (TIES's
    disjoint mean; every weight > 0, :func:`~mergekit_ota.methods.settings.tensor_problems`), and a
    coordinate no expert agrees at keeps ``b`` (:mod:`mergekit_ota.math.consensus`).
    """
    if not (len(experts) == len(curvatures) == len(rules) == len(weights)):
        raise ValueError("experts, curvatures, rules and weights must have the same length")
    if not experts:
        return base
    b = base.to(torch.float32)
    sums = reducer(consensus)  # a_i = weight_i: N = sum_i (g_i) weight_i m_i tau_i, D = sum_i (g_i) weight_i
    scores: Optional[torch.Tensor] = None  # saliency buffer shared by all masks
    spare: Optional[torch.Tensor] = None  # tau_i: one buffer reused from expert to expert
    for expert, v, rule, weight in zip(experts, curvatures, rules, weights):
        tau = torch.sub(f32_operand(expert), b, out=spare)
        mask = None
        if rule is not None:
            scores = buffer_like(scores, tau)
            mask = rule.mask(tau, v, scratch=scores, out=sums.scratch(tau))
        sums.add(tau, float(weight), mask)
        spare = sums.spare(tau)
    numerator, denominator = sums.result()
    merged = ratio(numerator, denominator, sums) if normalize else numerator
    return add_to_base(b, merged, lambda_).to(base.dtype)
