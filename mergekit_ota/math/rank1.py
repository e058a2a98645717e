"""Rank-1 (Adafactor-form) compression of a non-negative matrix ``v`` (m x n).

``r = v.sum(1)`` (m numbers), ``c = v.sum(0)`` (n numbers) and
``v_hat = outer(r, c) / sum(v)``, which keeps every row and column sum of ``v``.

:class:`Rank1Curvature` keeps ``v_hat`` factored as ``outer(row, col)`` with
``row = r / sum(r)`` and ``col = c``, so OTA weights need no m x n ``v_hat``:
``weight * v_hat**p + eps = outer(weight * row**p, col**p) + eps`` (the same number
up to float32 rounding, a few ulp; :func:`~mergekit_ota.math.ota.rank1_weights`).  Where every
entry of ``v_hat`` is needed (FFG saliency) :func:`dense` materialises it exactly as
:func:`rank1_reconstruct` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch


def rank1_factors(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(r, c)``, the float32 row and column sums of the 2-D tensor ``v``."""
    if v.dim() != 2:
        raise ValueError(f"rank-1 factors need a 2-D tensor; got shape {tuple(v.shape)}")
    v32 = v.to(torch.float32)
    return v32.sum(dim=1), v32.sum(dim=0)


@dataclass(frozen=True)
class Rank1Curvature:
    """``v_hat = outer(row, col)`` (float32 factors unless :meth:`to` converts them, ``row = r / sum(r)``), never
    materialised unless asked."""

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
        self,
        device: Optional[Union[str, torch.device, torch.dtype]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "Rank1Curvature":
        """The factors on ``device`` and in ``dtype``, as ``Tensor.to`` does (a dtype alone may come first)."""
        if isinstance(device, torch.dtype):  # v.to(torch.float32)
            device, dtype = None, device if dtype is None else dtype
        return Rank1Curvature(self.row.to(device=device, dtype=dtype), self.col.to(device=device, dtype=dtype))

    def __mul__(self, factor: float) -> "Rank1Curvature":
        """``v_hat * factor`` (scales the row factor), e.g. Adam's bias correction."""
        return Rank1Curvature(self.row * float(factor), self.col)

    def narrow(self, dim: int, start: int, length: int) -> "Rank1Curvature":
        """Rows (``dim`` 0) or columns (``dim`` 1) ``start:start+length`` of ``v_hat``."""
        if dim == 0:
            return Rank1Curvature(self.row.narrow(0, start, length), self.col)
        return Rank1Curvature(self.row, self.col.narrow(0, start, length))


Curvature = Union[torch.Tensor, Rank1Curvature]


def dense(v: Curvature) -> torch.Tensor:
    """``v`` as a tensor (a :class:`Rank1Curvature` is materialised)."""
    return v.dense() if isinstance(v, Rank1Curvature) else v


def rank1_reconstruct(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Return ``v_hat = outer(r, c) / sum(r)`` in float32 (zeros when ``sum(r) == 0``)."""
    return Rank1Curvature.from_sums(r, c).dense()
