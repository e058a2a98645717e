"""Sign consensus over FFG-masked task vectors: TIES's sign election, with the mask always applied.

Symbols: base ``b``, task vectors ``tau_i``, FFG masks ``m_i``, per-expert coefficients ``a_i``
(a tensor or a scalar: OTA's curvature weights ``w_i = weight_i * v_i**p + eps``, or ``ffg``'s
``weight_i``), and each expert's kept contribution ``c_i = a_i m_i tau_i``.

Elected sign per coordinate (``rule``):

* ``sum``:   ``e = +1 where sum_i c_i >= 0, else -1`` (mergekit's TIES rule, weighted as the method weighs);
* ``count``: ``e = +1 where sum_i sign(c_i) >= 0, else -1`` (one vote per kept expert).

An expert *agrees* at a coordinate when ``sign(c_i) == e``: ``g_i = [sign(c_i) == e]`` (so masked
entries, and kept entries with ``tau_i == 0``, never agree, as in TIES). The sums over agreeing experts,

* ``N = sum_i g_i c_i`` and ``D = sum_i g_i a_i``,

give the merges: OTA ``theta = b + lambda * N / D`` (TIES's disjoint mean under curvature weights),
``ffg`` ``theta = b + lambda * N`` or, normalised, ``b + lambda * N / D``. Where no expert agrees (``D = 0``:
every expert masked or zero there) ``theta = b``.

Streaming, one expert at a time (:class:`SignConsensus`, a reducer with the interface of
:class:`~mergekit_ota.math.reduce.WeightedSum`): ``c_i`` goes to a positive or a negative
numerator and ``a_i`` to the matching denominator, so after the last expert ``e`` is known and
``N, D`` are the sums on its side: four running buffers (five with ``count``'s vote tally) and one
scratch, two comparisons and four fused multiply-adds per expert, no second pass over the experts,
and no boolean tensor (torch's CPU kernels multiply by a float 0/1 tensor about 8x faster).

Properties (tests/test_consensus.py): one expert is unchanged by it; when every kept entry is nonzero and
all experts agree in sign it equals the plain masked merge; ``N / D`` is invariant to scaling every
``a_i`` by one ``c > 0``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from mergekit_ota.math.floats import lift_zeros

RULES = ("sum", "count")


class SignConsensus:
    """Running sums by sign of the kept contributions ``c_i = a_i m_i tau_i``; :meth:`result` gives ``(N, D)``.

    ``add(tau, a, mask)``: ``tau`` float32, overwritten with ``c_i = a_i m_i tau_i`` (never kept); ``a`` the
    coefficient, a float32 tensor of ``tau``'s shape (OTA's masked weights ``w_i m_i``, no ``mask`` then) or a float
    (``ffg``'s ``weight_i`` with its ``mask``; masked entries have ``c = 0`` and so add to neither side).

    Per expert, with ``[.]`` a 1.0/0.0 indicator in one reused float buffer: ``P += c [c > 0]``,
    ``D+ += a [c > 0]``, then ``Q += c [c < 0]``, ``D- += a [c < 0]`` (``count``: ``V += [c > 0] - [c < 0]``).
    The first expert's products initialise the sums (no zero fill). Every sum adds terms of one sign, so no
    sum cancels (``N`` and ``D`` are as exact as a plain sum of their terms).
    """

    def __init__(self, rule: str = "sum"):
        if rule not in RULES:
            raise ValueError(f"sign consensus rule must be one of {RULES}, not {rule!r}")
        self.rule = rule
        self.pos: Optional[torch.Tensor] = None  # sum of c_i where c_i > 0
        self.neg: Optional[torch.Tensor] = None  # sum of c_i where c_i < 0
        self.pos_weight: Optional[torch.Tensor] = None  # sum of a_i where c_i > 0
        self.neg_weight: Optional[torch.Tensor] = None  # sum of a_i where c_i < 0
        self.votes: Optional[torch.Tensor] = None  # count: sum_i sign(c_i)
        self.side: Optional[torch.Tensor] = None  # scratch: [c > 0], then [c < 0]; free between calls

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """The float32 buffer :meth:`add` uses as scratch (allocated once); a caller may use it until it calls add."""
        if self.side is None:
            self.side = torch.empty_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)
        return self.side

    def add(self, tau: torch.Tensor, a: Union[torch.Tensor, float], mask: Optional[torch.Tensor] = None) -> None:
        """Add one expert: ``c_i = a_i m_i tau_i`` formed in ``tau`` (``mask`` may be :meth:`scratch`), then by sign."""
        c = _contribution(tau, a, mask)
        side = self.scratch(c)
        for sign in (1, -1):
            (torch.gt if sign > 0 else torch.lt)(c, 0.0, out=side)  # [c > 0], then [c < 0]
            self._add_side(sign, c, side, a)
            if self.rule == "count":
                self._vote(sign, side)

    def _add_side(self, sign: int, c: torch.Tensor, side: torch.Tensor, a: Union[torch.Tensor, float]) -> None:
        """``P += c [c > 0]``, ``D+ += a [c > 0]`` (``sign`` 1) or ``Q``, ``D-`` with ``[c < 0]`` (``sign`` -1)."""
        total, weight = (self.pos, self.pos_weight) if sign > 0 else (self.neg, self.neg_weight)
        if total is None or weight is None:  # the first expert's products start the sums
            total, weight = torch.mul(c, side), torch.mul(side, a)
            if sign > 0:
                self.pos, self.pos_weight = total, weight
            else:
                self.neg, self.neg_weight = total, weight
            return
        total.addcmul_(c, side)
        if isinstance(a, torch.Tensor):
            weight.addcmul_(a, side)
        else:
            weight.add_(side, alpha=float(a))

    def _vote(self, sign: int, side: torch.Tensor) -> None:
        """``V += sign * side``: the ``count`` rule's tally of ``sign(c_i)``."""
        if self.votes is None:
            self.votes = side.clone()
        else:
            self.votes.add_(side, alpha=float(sign))

    def spare(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """``t``: this reducer keeps no tensor it was given, so the caller may write every one again."""
        return t

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)``: the agreeing experts' summed contributions and coefficients (``D = 0`` where none agrees).

        The elected side as 1.0/0.0, ``u = [P + Q >= 0]`` (``count``: ``[V >= 0]``), selects as
        ``Q - Q u + P u``: exact at ``u`` = 0 and 1, and no term exceeds ``max(|P|, |Q|)`` (``lerp``'s
        ``P - Q`` can overflow for finite sides). ``N`` and ``D`` are written over ``Q`` and ``D-``: call once.
        """
        if self.pos is None:
            raise ValueError("no expert was added")
        assert self.neg is not None and self.pos_weight is not None and self.neg_weight is not None
        up = self.scratch(self.pos)
        if self.rule == "sum":
            torch.ge(torch.add(self.pos, self.neg, out=up), 0.0, out=up)
        else:
            assert self.votes is not None
            torch.ge(self.votes, 0.0, out=up)
        numerator = self.neg.addcmul_(self.neg, up, value=-1.0).addcmul_(self.pos, up)
        denominator = self.neg_weight.addcmul_(self.neg_weight, up, value=-1.0).addcmul_(self.pos_weight, up)
        return numerator, denominator


def _contribution(tau: torch.Tensor, a: Union[torch.Tensor, float], mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``c = a m tau`` written over ``tau``: ``m tau`` first, as ``ffg`` grafts before it weighs."""
    if mask is not None:
        tau.mul_(mask)
    return tau.mul_(a if isinstance(a, torch.Tensor) else float(a))


def disjoint_mean(
    numerator: torch.Tensor, denominator: torch.Tensor, scratch: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``N / D`` where ``D != 0``, else 0 (so ``b + lambda * result`` keeps the base there), written over ``N``.

    ``N`` is set to 0 where ``D`` is (with weights of one sign it already is: no expert agrees there), then
    divided by ``D`` with every zero lifted to 1 (:func:`~mergekit_ota.math.floats.lift_zeros`); both through
    ``scratch`` (float32, ``N``'s shape), and ``D`` is changed too.
    """
    scratch = torch.empty_like(denominator) if scratch is None else scratch
    numerator.mul_(torch.ne(denominator, 0.0, out=scratch))
    return numerator.div_(lift_zeros(denominator, scratch=scratch))
