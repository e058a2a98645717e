"""Rank-1 (Adafactor-form) compression of a non-negative matrix ``v`` (m x n).

``r = v.sum(1)`` (m numbers), ``c = v.sum(0)`` (n numbers) and
``v_hat = outer(r, c) / sum(v)``, which keeps every row and column sum of ``v``.
"""

from __future__ import annotations

from typing import Tuple

import torch


def rank1_factors(v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(r, c)``, the float32 row and column sums of the 2-D tensor ``v``."""
    if v.dim() != 2:
        raise ValueError(f"rank-1 factors need a 2-D tensor; got shape {tuple(v.shape)}")
    v32 = v.to(torch.float32)
    return v32.sum(dim=1), v32.sum(dim=0)


def rank1_reconstruct(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Return ``v_hat = outer(r, c) / sum(r)`` in float32 (zeros when ``sum(r) == 0``)."""
    r32 = r.to(torch.float32)
    c32 = c.to(torch.float32)
    total = float(r32.double().sum())
    if total <= 0.0:
        return torch.zeros((r32.numel(), c32.numel()), dtype=torch.float32, device=r.device)
    return torch.outer(r32 / total, c32)
