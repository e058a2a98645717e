"""Rank-1 (Adafactor-form) compression of a non-negative matrix ``v`` (m x n).

``r = v.sum(1)`` (m numbers), ``c = v.sum(0)`` (n numbers) and
``v_hat = outer(r, c) / sum(v)``, which keeps every row and column sum of ``v``.

:class:`Rank1Curvature` keeps ``v_hat`` factored as ``outer(row, col)`` with
``row = r / sum(r)`` and ``col = c``, so OTA weights need no m x n ``v_hat``:
``weight * v_hat**p + eps = outer(weight * row**p, col**p) + eps`` (the same number
up to float32 rounding, a few ulp).  Where every entry of ``v_hat`` is needed (FFG
saliency) :func:`dense` materialises it exactly as :func:`rank1_reconstruct` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch

if TYPE_CHECKING:
    from mergekit_ota.math.ota import WeightScale


def rank1_factors(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(r, c)``, the float32 row and column sums of the 2-D tensor ``v``."""
    if v.dim() != 2:
        raise ValueError(f"rank-1 factors need a 2-D tensor; got shape {tuple(v.shape)}")
    v32 = v.to(torch.float32)
    return v32.sum(dim=1), v32.sum(dim=0)


def _power(x: torch.Tensor, power: float) -> torch.Tensor:
    if power == 1.0:
        return x
    return x.sqrt() if power == 0.5 else x.pow(power)


@dataclass(frozen=True)
class Rank1Curvature:
    """``v_hat = outer(row, col)`` (float32 factors, ``row = r / sum(r)``), never materialised unless asked."""

    row: torch.Tensor
    col: torch.Tensor

    @classmethod
    def from_sums(cls, r: torch.Tensor, c: torch.Tensor) -> "Rank1Curvature":
        """Factors of ``outer(r, c) / sum(r)`` (all zeros when ``sum(r) <= 0``)."""
        r64 = r.to(torch.float64)
        total = float(r64.sum())
        # in float64: a float32 division would round a total beyond float32's range (rows near its max) to inf
        row = (r64 / total).to(torch.float32) if total > 0.0 else torch.zeros(r.shape, dtype=torch.float32)
        return cls(row=row, col=c.to(torch.float32))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.row.numel(), self.col.numel()))

    @property
    def device(self) -> torch.device:
        return self.row.device

    def dense(self) -> torch.Tensor:
        """``v_hat`` as an m x n float32 tensor."""
        return torch.outer(self.row, self.col)

    def to(
        self, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None
    ) -> "Rank1Curvature":
        """The factors on ``device`` (curvature stays float32 whatever ``dtype`` says)."""
        return Rank1Curvature(self.row.to(device=device), self.col.to(device=device))

    def __mul__(self, factor: float) -> "Rank1Curvature":
        """``v_hat * factor`` (scales the row factor), e.g. Adam's bias correction."""
        return Rank1Curvature(self.row * float(factor), self.col)

    def narrow(self, dim: int, start: int, length: int) -> "Rank1Curvature":
        """Rows (``dim`` 0) or columns (``dim`` 1) ``start:start+length`` of ``v_hat``."""
        if dim == 0:
            return Rank1Curvature(self.row.narrow(0, start, length), self.col)
        return Rank1Curvature(self.row, self.col.narrow(0, start, length))

    def weights(
        self,
        weight: float,
        power: float,
        eps: float,
        out: Optional[torch.Tensor] = None,
        scale: Optional["WeightScale"] = None,
    ) -> torch.Tensor:
        """``(weight * v_hat**power + eps) / s`` from the factors: one m x n pass plus the ``eps`` add.

        ``s = scale.divisor`` (1 without ``scale``). When ``s != 1``, or a factor's power would
        leave float32, the factors are normalised first (O(m + n)):
        ``(row / R)**p * (weight * (R C)**p / s)`` outer ``(col / C)**p`` with ``R = max(row)``,
        ``C = max(col)``, in float64 (``col / C`` can fall below float32's range where its term still
        counts), rounded to float32 once; see :mod:`mergekit_ota.math.ota`. Where ``R`` or ``C`` is 0 (an all-zero
        factor: a frozen layer, or a store with only one of its factors zero) ``v_hat`` is 0 and, for
        ``power > 0``, every weight is ``eps / s`` (one fill: no factor is divided by its zero maximum).
        """
        from mergekit_ota.math.ota import SAFE_LOG2, scaled_scalar

        exponent = scale.exponent if scale is not None else 0
        shift = scaled_scalar(float(eps), -exponent)
        top_row, top_col = _tops(self.row, self.col) if power != 0.0 else (1.0, 1.0)
        if top_row == 0.0 or top_col == 0.0:  # v_hat == 0 (factors >= 0): weight * v_hat**p == 0
            if out is None:
                return torch.full(self.shape, shift, dtype=torch.float32, device=self.device)
            return out.fill_(shift)
        if scale is not None and power != 0.0 and scale.log2_c > -math.inf:
            log2_rc = power * (math.log2(top_row) + math.log2(top_col))
            log2_weight = math.log2(abs(weight)) if weight != 0.0 else 0.0
            safe = all(
                abs(x) <= SAFE_LOG2
                for x in (power * math.log2(top_row), power * math.log2(top_col), log2_weight - exponent)
            )
            if exponent != 0 or not safe:  # in float64: a ratio below 2**-149 would flush to 0 in float32
                factor = scaled_scalar(float(weight), log2_rc - exponent)
                row = _power(self.row.double() / top_row, power).mul_(factor)
                w = torch.outer(row, _power(self.col.double() / top_col, power)).add_(shift)
                return w.to(torch.float32) if out is None else out.copy_(w)
        row = _power(self.row, power)
        factor = scaled_scalar(float(weight), -exponent)
        if factor != 1.0:
            row = row * factor
        return torch.outer(row, _power(self.col, power), out=out).add_(shift)


def _tops(row: torch.Tensor, col: torch.Tensor) -> Tuple[float, float]:
    """``(max(row), max(col))``; 0 for an empty factor (``outer(row, col)`` is then empty)."""
    return tuple(float(x.max()) if x.numel() else 0.0 for x in (row, col))  # type: ignore[return-value]


Curvature = Union[torch.Tensor, Rank1Curvature]


def dense(v: Curvature) -> torch.Tensor:
    """``v`` as a tensor (a :class:`Rank1Curvature` is materialised)."""
    return v.dense() if isinstance(v, Rank1Curvature) else v


def rank1_reconstruct(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Return ``v_hat = outer(r, c) / sum(r)`` in float32 (zeros when ``sum(r) == 0``)."""
    return Rank1Curvature.from_sums(r, c).dense()
