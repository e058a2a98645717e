"""Streaming histogram of FFG saliency (one density threshold over many tensors) or of curvature (its median).

Model-wide density (the paper's setting) keeps, for each expert, the
``k = max(1, int(density * N))`` most salient of its ``N`` entries across *all* its
tensors.  Tensors arrive one at a time, so we accumulate a histogram of saliency
``s`` and read the threshold from it.  The bins are the float32 bit patterns of ``s``
with their lowest ``SHIFT`` bits dropped: the 8 exponent bits plus the top 9 mantissa
bits, i.e. bins of relative width at most ``2**-9`` (~0.2 %), uniform in ``log2(s)``
within each octave.  Binning is one integer shift per entry (no logarithm), and
every bin edge is an exact float32, so ``s >= T`` for an edge ``T`` selects exactly
the entries counted above it.  The kept fraction then exceeds the target by at most
the mass of one bin.  The same bins give a streaming median
(:meth:`SaliencyHistogram.kth_smallest_edge`), as ``curvature_scale: median`` uses
(:mod:`mergekit_ota.math.scale`): the lower edge of the bin holding the k-th smallest
entry, within a relative ``2**-9`` below it, and exactly ``2**j`` times it for entries
scaled by ``2**j`` (the bins are float32 bit patterns: an exponent shift moves whole bins).

With ``mass`` on, each bin also sums its saliencies (float64), for ``density: auto``
(:meth:`SaliencyHistogram.threshold_for_mass`): the largest bin edge ``T`` whose entries
``s >= T`` carry at least a fraction ``q`` of the total saliency ``sum(s)``. The kept mass then
reaches ``q``, and exceeds it by at most the mass of the one bin at ``T``; since a factor ``c``
on every ``s`` multiplies each bin's share of the mass by nothing (and moves whole bins for
``c = 2**j``), the kept fraction of entries is independent of the saliencies' scale within one
bin's resolution (exactly, for powers of two).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

import torch

from mergekit_ota.math.ffg import kept_count

SHIFT = 14  # float32 bits dropped: 23 - 14 = 9 mantissa bits kept
BINS = (0x7F800000 >> SHIFT) + 1  # bit patterns up to +inf; bin 0 is below 2**-135, i.e. zero
_OVERFLOW = BINS  # NaN lands here and, like negative values, counts as zero (never kept)
SPARSE_BELOW = BINS // 8  # a tensor with fewer entries updates only the bins it touches (SaliencyHistogram._add_sparse)


F32_MAX = struct.unpack("<f", struct.pack("<I", 0x7F7FFFFF))[0]


def bin_edge(index: int) -> float:
    """Smallest float32 value in bin ``index`` (exactly representable)."""
    return struct.unpack("<f", struct.pack("<I", index << SHIFT))[0]


def threshold_edge(index: int) -> float:
    """:func:`bin_edge`, but float32's largest finite value for the last bin (which holds ``+inf`` only, a saliency
    ``v * tau**2`` that overflowed float32): a finite threshold that still keeps it (``inf >= max``)."""
    return min(bin_edge(index), F32_MAX)


@dataclass
class SaliencyHistogram:
    """Counts of saliencies by bin: ``counts[0]`` zeros, ``counts[1:BINS]`` positive bins, ``counts[BINS]`` NaN.

    ``counts`` stays ``None`` until the first :meth:`add` (an empty histogram allocates nothing).
    """

    counts: Optional[torch.Tensor] = None
    mass: Optional[torch.Tensor] = None  # float64 sum of s per bin (only when added with_mass)

    @property
    def zeros(self) -> int:
        """Entries that are never kept by ``s >= T`` for ``T > 0``: zeros (also -0.0) and NaN."""
        return 0 if self.counts is None else int(self.counts[0]) + int(self.counts[_OVERFLOW])

    @property
    def total(self) -> int:
        """Number of entries added so far (``N``)."""
        return 0 if self.counts is None else int(self.counts.sum().item())

    def add(self, scores: torch.Tensor, overwrite: bool = False, with_mass: bool = False) -> None:
        """Add the (non-negative) saliencies of one tensor (``overwrite``: its float32 buffer may be reused;
        ``with_mass``: also sum them per bin, for :meth:`threshold_for_mass`)."""
        s = scores.detach().reshape(-1).to(torch.float32).contiguous()
        bits = s.view(torch.int32)
        in_place = overwrite and not with_mass  # the mass needs s itself after binning
        bins = bits.bitwise_right_shift_(SHIFT) if in_place else torch.bitwise_right_shift(bits, SHIFT)
        bins.clamp_(0, _OVERFLOW)  # sign bit set (-0.0) -> 0; NaN -> overflow
        if bins.numel() < SPARSE_BELOW:
            self._add_sparse(bins, s if with_mass else None)
            return
        if with_mass:
            mass = torch.bincount(bins, weights=s.to(torch.float64), minlength=BINS + 1).to(device="cpu")
            mass[_OVERFLOW] = 0.0  # NaN carries no mass (it is never kept)
            self.mass = mass if self.mass is None else self.mass.add_(mass)
        self._accumulate(torch.bincount(bins, minlength=BINS + 1).to(device="cpu"), owned=True)

    def _add_sparse(self, bins: torch.Tensor, s: Optional[torch.Tensor]) -> None:
        """:meth:`add` for a tensor with far fewer entries than bins: only the bins it touches are updated
        (the same counts and sums; a full-size ``bincount`` would cost ``O(BINS)`` per tensor)."""
        used, inverse, counts = torch.unique(bins.to("cpu"), return_inverse=True, return_counts=True)
        if self.counts is None:
            self.counts = torch.zeros(BINS + 1, dtype=torch.int64)
        self.counts.index_add_(0, used, counts)
        if s is not None:
            sums = torch.zeros(used.numel(), dtype=torch.float64).index_add_(0, inverse, s.to("cpu", torch.float64))
            sums[used == _OVERFLOW] = 0.0  # NaN carries no mass (it is never kept)
            if self.mass is None:
                self.mass = torch.zeros(BINS + 1, dtype=torch.float64)
            self.mass.index_add_(0, used, sums)

    def merge(self, other: "SaliencyHistogram") -> None:
        """Accumulate another histogram into this one (its mass too, when it has one)."""
        if other.counts is not None:
            self._accumulate(other.counts, owned=False)
        if other.mass is not None:
            self.mass = other.mass.clone() if self.mass is None else self.mass.add_(other.mass)

    def _accumulate(self, counts: torch.Tensor, owned: bool) -> None:
        if self.counts is None:
            self.counts = counts if owned else counts.clone()
        else:
            self.counts += counts

    def kth_smallest_edge(self, k: int) -> float:
        """Lower edge ``e`` of the bin holding the ``k``-th smallest entry (1-based; NaN never counts).

        With ``x_(k)`` that entry, ``e <= x_(k) < e * (1 + 2**-9)`` for a positive bin, ``e = 0``
        for bin 0 (zeros, and anything below ``2**-135``). Raises ``ValueError`` unless
        ``1 <= k <= N`` (``N`` the non-NaN entries).
        """
        counted = 0 if self.counts is None else self.total - int(self.counts[_OVERFLOW])
        if not 1 <= k <= counted:
            raise ValueError(f"k must be in [1, {counted}]; got {k}")
        assert self.counts is not None
        reached = torch.nonzero(self.counts[:BINS].cumsum(0) >= k, as_tuple=True)[0]
        return bin_edge(int(reached[0]))

    def lower_median(self) -> Optional[float]:
        """:meth:`kth_smallest_edge` of the lower median (``k = ceil(N / 2)``); ``None`` when empty."""
        counted = 0 if self.counts is None else self.total - int(self.counts[_OVERFLOW])
        return self.kth_smallest_edge((counted + 1) // 2) if counted else None

    def threshold_for_density(self, density: float) -> float:
        """Smallest bin edge ``T`` such that ``#(s >= T) >= k``; 0.0 keeps everything."""
        total = self.total
        if self.counts is None or total == 0:
            return 0.0
        k = kept_count(total, density)
        from_top = torch.flip(self.counts[1:BINS], dims=[0]).cumsum(0)  # position p: bin BINS - 1 - p
        reached = torch.nonzero(from_top >= k, as_tuple=True)[0]
        if reached.numel() == 0:
            return 0.0  # k exceeds the positive entries: keep everything
        return threshold_edge(BINS - 1 - int(reached[0]))

    def threshold_for_mass(self, fraction: float) -> float:
        """Largest bin edge ``T`` with ``sum(s >= T) >= fraction * sum(s)``; 0.0 keeps everything.

        Needs the histogram built ``with_mass``. With no saliency at all (every ``s`` zero) every
        threshold keeps the same (nothing moved), and 0.0 is returned.
        """
        if self.mass is None:
            raise ValueError("threshold_for_mass needs a histogram built with_mass")
        positive = self.mass[1:BINS]
        total = float(positive.sum())
        if not total > 0.0:
            return 0.0
        from_top = torch.flip(positive, dims=[0]).cumsum(0)  # position p: bin BINS - 1 - p
        reached = torch.nonzero(from_top >= fraction * total, as_tuple=True)[0]
        if reached.numel() == 0:
            return 0.0
        return threshold_edge(BINS - 1 - int(reached[0]))

    def mass_curve(self) -> "tuple[list[float], list[float]]":
        """The mass-vs-density curve: ``(entries, masses)``, one point per non-empty positive bin from the top, where
        ``entries[j]`` and ``masses[j]`` are the fractions of all entries and of the saliency mass that ``s >= T_j``
        keeps (``T_j`` that bin's lower edge, so each point is :meth:`kept_at` of ``T_j``). Both rise to the
        fractions of positive entries and 1.0; empty lists without mass or without positive saliency."""
        if self.mass is None or self.counts is None or self.total == 0:
            return [], []
        counts = torch.flip(self.counts[1:BINS], dims=[0])
        mass = torch.flip(self.mass[1:BINS], dims=[0])
        total_mass = float(mass.sum())
        if not total_mass > 0.0:
            return [], []
        present = counts > 0
        entries = (counts.cumsum(0).double() / self.total)[present]
        masses = (mass.cumsum(0) / total_mass)[present]
        return entries.tolist(), masses.tolist()

    def kept_at(self, threshold: float) -> "tuple[float, float]":
        """``(fraction of entries, fraction of saliency mass)`` with ``s >= threshold`` (mass: 1.0 without one)."""
        if self.counts is None or self.total == 0:
            return 1.0, 1.0
        if threshold <= 0.0:
            return 1.0, 1.0
        index = int(torch.tensor([threshold], dtype=torch.float32).view(torch.int32).item()) >> SHIFT
        entries = float(self.counts[index:BINS].sum()) / self.total
        if self.mass is None:
            return entries, 1.0
        total = float(self.mass[1:BINS].sum())
        return entries, (float(self.mass[index:BINS].sum()) / total if total > 0 else 1.0)
