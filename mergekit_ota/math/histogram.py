"""Streaming log-histogram of FFG saliency, for one density threshold over many tensors.

Model-wide density (the paper's setting) keeps, for each expert, the
``k = max(1, int(density * N))`` most salient of its ``N`` entries across *all* its
tensors.  Tensors arrive one at a time, so we accumulate a histogram of
``log2(s)`` with fine bins (width ``(MAX_LOG2 - MIN_LOG2) / BINS`` ~ 0.0043, i.e.
~0.3 % relative) and read the threshold from it.  The kept fraction then differs
from the target by at most the mass of one bin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergekit_ota.math.ffg import kept_count

MIN_LOG2 = -150.0  # below the smallest float32 subnormal (2**-149)
MAX_LOG2 = 130.0  # above the largest float32 (~2**128)
BINS = 65536


@dataclass
class SaliencyHistogram:
    """Counts of ``log2(s)`` for positive saliencies plus a count of zeros."""

    counts: torch.Tensor = field(
        default_factory=lambda: torch.zeros(BINS, dtype=torch.float64)
    )
    zeros: int = 0

    @property
    def total(self) -> int:
        """Number of entries added so far (``N``)."""
        return int(self.counts.sum().item()) + self.zeros

    def add(self, scores: torch.Tensor) -> None:
        """Add the (non-negative) saliencies of one tensor."""
        s = scores.detach().reshape(-1).to(torch.float32)
        logs = torch.log2(s)  # 0 -> -inf, ignored by histc below
        hist = torch.histc(logs, bins=BINS, min=MIN_LOG2, max=MAX_LOG2)
        added = int(hist.sum().item())
        self.counts += hist.to(device="cpu", dtype=torch.float64)
        self.zeros += s.numel() - added

    def merge(self, other: "SaliencyHistogram") -> None:
        """Accumulate another histogram into this one."""
        self.counts += other.counts
        self.zeros += other.zeros

    def threshold_for_density(self, density: float) -> float:
        """Smallest bin edge ``T`` such that ``#(s >= T) >= k``; 0.0 keeps everything."""

        total = self.total
        if total == 0:
            return 0.0
        k = kept_count(total, density)
        from_top = torch.flip(self.counts, dims=[0]).cumsum(0)
        reached = torch.nonzero(from_top >= k, as_tuple=True)[0]
        if reached.numel() == 0:
            return 0.0  # k exceeds the positive entries: keep everything
        bin_index = BINS - 1 - int(reached[0])
        width = (MAX_LOG2 - MIN_LOG2) / BINS
        return float(2.0 ** (MIN_LOG2 + bin_index * width))
