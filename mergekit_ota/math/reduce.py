"""Reducers: what a merge feeds one expert at a time, and the steps that open and close its loop.

Symbols: base ``b``, task vectors ``tau_i = t_i - b``, FFG masks ``m_i`` (1 without a mask), per-expert
coefficients ``a_i`` (a tensor or a float) and contributions ``c_i = a_i m_i tau_i``. A reducer turns the
stream ``(tau_i, a_i, m_i)`` into a numerator and a denominator ``(N, D)``:

* :class:`WeightedSum` (plain accumulation): ``N = sum_i c_i``, ``D = sum_i a_i``;
* :class:`~mergekit_ota.math.consensus.SignConsensus`: the same sums over the experts whose ``c_i`` has the
  elected sign only.

Both read the inputs of one expert per :meth:`~Reducer.add` (no stacking), start their sums from the first
expert's terms (no zero fill) and lend a float32 :meth:`~Reducer.scratch` buffer (where a caller writes the
mask ``m_i``). Each method then reads: validate, scale, one loop feeding a reducer, finish
(:func:`~mergekit_ota.math.ota.ota_merge`: ``theta = b + lambda * N / D`` with ``a_i = w_i m_i``;
:func:`~mergekit_ota.math.ffg.ffg_merge`: ``theta = b + lambda * N``, or ``b + lambda * N / D`` with
``a_i = weight_i``).
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple, Union

import torch

from mergekit_ota.math.consensus import SignConsensus, disjoint_mean

Coefficient = Union[torch.Tensor, float]


class Reducer(Protocol):
    """Running sums over experts: :meth:`add` one expert, then :meth:`result` once."""

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A float32 buffer of ``like``'s shape, free for the caller until its next :meth:`add`."""
        ...

    def add(self, tau: torch.Tensor, a: Coefficient, mask: Optional[torch.Tensor] = None) -> None:
        """Add expert i's ``c_i = a_i m_i tau_i`` and ``a_i`` (``tau`` may be overwritten)."""
        ...

    def spare(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """``t`` if the caller may write it again after :meth:`add`, ``None`` if the reducer keeps it."""
        ...

    def result(self) -> Tuple[torch.Tensor, Coefficient]:
        """``(N, D)``."""
        ...


class WeightedSum:
    """Plain accumulation: ``N = sum_i a_i m_i tau_i`` and ``D = sum_i a_i`` (a float when every ``a_i`` is).

    The first expert's terms become the sums (no zero fill): ``N = a_1 m_1 tau_1`` formed in ``tau_1`` itself
    (``in_place``, the caller's scratch) or in a new tensor (``tau`` may be the caller's data: only read), and
    ``D = a_1`` itself; :meth:`spare` says which tensors it keeps. From the second expert on one fused pass each,
    ``N += a_i tau_i`` (``addcmul``) or ``N += a_i (tau_i m_i)``, and ``D += a_i``; ``tau`` and ``mask`` are read.
    """

    def __init__(self, in_place: bool = True) -> None:
        self.in_place = in_place  # the first tau becomes N
        self.total: Optional[torch.Tensor] = None  # N
        self.weight: Optional[Coefficient] = None  # D
        self.side: Optional[torch.Tensor] = None  # scratch lent to the caller

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """The float32 buffer lent to the caller (allocated once, ``like``'s shape, contiguous)."""
        if self.side is None:
            self.side = torch.empty_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)
        return self.side

    def add(self, tau: torch.Tensor, a: Coefficient, mask: Optional[torch.Tensor] = None) -> None:
        """Add ``a_i m_i tau_i`` to ``N`` and ``a_i`` to ``D``."""
        if self.total is None:
            self.total, self.weight = _first_term(tau, a, mask, self.in_place), a
        else:
            _add_term(self.total, tau, a, mask)
            self.weight = self.weight.add_(a) if isinstance(self.weight, torch.Tensor) else self.weight + a

    def spare(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """``t`` unless it is ``N`` or ``D`` (the first expert's ``tau`` or tensor ``a``)."""
        return None if t is self.total or t is self.weight else t

    def result(self) -> Tuple[torch.Tensor, Coefficient]:
        """``(N, D)``."""
        if self.total is None or self.weight is None:
            raise ValueError("no expert was added")
        return self.total, self.weight


def _first_term(tau: torch.Tensor, a: Coefficient, mask: Optional[torch.Tensor], in_place: bool) -> torch.Tensor:
    """``a m tau``, as ``(tau m) a``, in ``tau`` itself when ``in_place`` else in a new tensor; a product by
    no mask or by ``a = 1`` is skipped."""
    term = tau if in_place else None
    if mask is not None:
        term = torch.mul(tau, mask) if term is None else term.mul_(mask)
    if isinstance(a, torch.Tensor) or a != 1.0:
        term = torch.mul(tau, a) if term is None else term.mul_(a)
    return tau.clone() if term is None else term


def _add_term(total: torch.Tensor, tau: torch.Tensor, a: Coefficient, mask: Optional[torch.Tensor]) -> None:
    """``total += a m tau`` in one fused pass (``addcmul`` or ``add`` with ``alpha``)."""
    if isinstance(a, torch.Tensor):
        total.addcmul_(a, tau if mask is None else torch.mul(tau, mask))
    elif mask is None:
        total.add_(tau, alpha=a)
    else:
        total.addcmul_(tau, mask, value=a)


def reducer(consensus: Optional[str], in_place: bool = True) -> Reducer:
    """:class:`WeightedSum` without sign consensus (``in_place``: whether the first ``tau`` may become ``N``), else
    :class:`SignConsensus` with the rule ``consensus`` (which always writes ``c_i`` into ``tau``)."""
    return WeightedSum(in_place) if consensus is None else SignConsensus(consensus)


def buffer_like(buffer: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """``buffer``, or a new one of ``like``'s shape, dtype and layout the first time."""
    return torch.empty_like(like) if buffer is None else buffer


def ratio(numerator: torch.Tensor, denominator: Coefficient, sums: Reducer) -> torch.Tensor:
    """``N / D`` written over ``N``: by a float ``D`` directly, by a tensor ``D`` as the disjoint mean (0 where
    ``D = 0``, :func:`~mergekit_ota.math.consensus.disjoint_mean`, through the ``scratch`` of ``sums``)."""
    if isinstance(denominator, torch.Tensor):
        return disjoint_mean(numerator, denominator, scratch=sums.scratch(numerator))
    return numerator.div_(float(denominator))


def add_to_base(b: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``theta = b + lambda * delta``, written over ``delta`` (the product skipped at ``lambda = 1``)."""
    if lambda_ != 1.0:
        delta.mul_(float(lambda_))
    return delta.add_(b)
