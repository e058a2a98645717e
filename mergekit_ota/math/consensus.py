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

give the merges: OTA ``theta = b + lam * N / D`` (TIES's disjoint mean under curvature weights),
``ffg`` ``theta = b + lam * N`` or, normalised, ``b + lam * N / D``. Where no expert agrees (``D = 0``:
every expert masked or zero there) ``theta = b``.

Streaming, one expert at a time (:class:`SignConsensus`): ``c_i`` goes to a positive or a negative
numerator and ``a_i`` to the matching denominator, so after the last expert ``e`` is known and
``N, D`` are the sums on its side: four running buffers (five with ``count``'s vote tally) and three
scratch buffers, about seven fused element passes per expert, and no second pass over the experts.

Properties (tests/test_consensus.py): one expert is unchanged by it; when every kept entry is nonzero and
all experts agree in sign it equals the plain masked merge; ``N / D`` is invariant to scaling every
``a_i`` by one ``c > 0``.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

RULES = ("sum", "count")


class SignConsensus:
    """Running sums by sign of ``c_i = a_i m_i tau_i``; :meth:`result` returns ``(N, D)`` on the elected side.

    ``add(tau, a, mask)``: ``tau`` float32 (overwritten: it is the caller's scratch), ``a`` a float32
    tensor of ``tau``'s shape or a float, ``mask`` a boolean/0-1 tensor or ``None`` (all kept).

    Per expert: ``u = max(sign(c), 0)`` and ``d = min(sign(c), 0)`` (exact 0/1 and -1/0), then
    ``P += c u``, ``Q -= c d``, ``D+ += a u``, ``D- -= a d``, written as fused multiply-adds into float buffers allocated once:
    every sum adds only terms of one sign, so no sum cancels (``N`` and ``D`` are as exact as a
    plain sum of their terms).
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
        self._sign: Optional[torch.Tensor] = None  # scratch: sign(c), then its positive and negative parts
        self._up: Optional[torch.Tensor] = None
        self._down: Optional[torch.Tensor] = None

    def add(self, tau: torch.Tensor, a: Union[torch.Tensor, float], mask: Optional[torch.Tensor] = None) -> None:
        """Add one expert's kept contribution ``c_i = a_i m_i tau_i``."""
        c = tau.mul_(a) if isinstance(a, torch.Tensor) else tau.mul_(float(a))
        if mask is not None:
            c.mul_(mask)
        if self.pos is None:
            self._sign, self._up, self._down = torch.sign(c), torch.empty_like(c), torch.empty_like(c)
            self.pos, self.neg = torch.zeros_like(c), torch.zeros_like(c)
            self.pos_weight, self.neg_weight = torch.zeros_like(c), torch.zeros_like(c)
            if self.rule == "count":
                self.votes = torch.zeros_like(c)
        else:
            torch.sign(c, out=self._sign)
        assert self._sign is not None and self._up is not None and self._down is not None
        assert self.neg is not None and self.pos_weight is not None and self.neg_weight is not None
        up = torch.clamp(self._sign, min=0.0, out=self._up)  # 1 where c > 0, else 0
        down = torch.clamp(self._sign, max=0.0, out=self._down)  # -1 where c < 0, else 0
        self.pos.addcmul_(c, up)
        self.neg.addcmul_(c, down, value=-1.0)
        if isinstance(a, torch.Tensor):
            self.pos_weight.addcmul_(a, up)
            self.neg_weight.addcmul_(a, down, value=-1.0)
        else:
            self.pos_weight.add_(up, alpha=float(a))
            self.neg_weight.add_(down, alpha=-float(a))
        if self.votes is not None:
            self.votes.add_(self._sign)

    def result(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, D)``: the agreeing experts' summed contributions and coefficients (``D = 0`` where none agrees)."""
        if self.pos is None:
            raise ValueError("no expert was added")
        assert self.neg is not None and self.pos_weight is not None and self.neg_weight is not None
        if self.rule == "sum":
            elected_up = (self.pos + self.neg) >= 0
        else:
            assert self.votes is not None
            elected_up = self.votes >= 0
        numerator = torch.where(elected_up, self.pos, self.neg)
        denominator = torch.where(elected_up, self.pos_weight, self.neg_weight)
        return numerator, denominator


def disjoint_mean(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``N / D`` where ``D != 0``, else 0 (so ``b + lam * result`` keeps the base there)."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)
