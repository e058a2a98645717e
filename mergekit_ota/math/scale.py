"""The scale of one expert's curvature: the mean or the median of all its entries, streamed.

Symbols: expert ``i``'s curvature entries ``v_i[j]``, ``j = 1..N_i``, over every tensor
that is added (for a merge: every tensor it reads for that expert).

* ``mean``:   ``m_i = (1 / N_i) * sum_j v_i[j]`` (each block's float32 sum, about 1e-7 relative,
  accumulated in float64; a block whose float32 sum overflows is summed in float64);
* ``median``: ``m_i`` = the lower edge of the :class:`~mergekit_ota.math.histogram.SaliencyHistogram`
  bin that holds the lower median ``x = v_i(ceil(N_i / 2))`` (the ``ceil(N_i/2)``-th smallest
  entry): ``m_i <= x < m_i * (1 + 2**-9)``, the same log-bins model-wide density uses.

Both are positively homogeneous, ``m(c v) = c m(v)``: exactly for the mean (up to float
rounding) and for the median when ``c = 2**k`` (bins are float32 bit patterns); for other
``c`` the median moves by less than one bin, a relative ``2**-9``.

A rank-1 record ``v_hat = outer(row, col)`` (:class:`~mergekit_ota.math.rank1.Rank1Curvature`)
is never materialised whole:

* its sum is exact from the factors, ``sum(v_hat) = sum(row) * sum(col)``, and equals the
  sum of the ``v`` it compresses (rank-1 compression keeps every row and column sum), so
  the mean is the same whether a tensor is stored full or rank-1;
* its median counts the entries of ``v_hat`` itself: blocks of rows of ``outer(row, col)``
  (about :data:`BLOCK` values at a time) are binned, the same numbers as
  ``Rank1Curvature.dense()``, so a rank-1 tensor adds exactly the histogram of its
  reconstruction (``O(m n)`` arithmetic, no ``m x n`` tensor held). It is the median of
  ``v_hat``, not of the uncompressed ``v`` (which the store no longer has).

Adam's bias factor ``1 - beta2**t`` (:func:`bias_factor`), the scale that training length
puts on an uncorrected ``v``, lives here too (:mod:`mergekit_ota.methods.bias` decides when
to divide by it).

Nothing here checks values: callers pass validated curvature (finite, ``>= 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature

Statistic = Literal["mean", "median"]
BLOCK = 1 << 22  # values of outer(row, col) binned at a time for a rank-1 median


def bias_factor(step: int, beta2: float) -> float:
    """Adam's ``1 - beta2**step``: ``E[v_t] = (1 - beta2**t) E[g**2]`` for a stationary ``g**2``."""
    return 1.0 - beta2**step


@dataclass
class CurvatureScale:
    """Streaming mean and (with ``median``) median of curvature entries, tensor by tensor.

    ``median=False`` keeps only ``total`` and ``count`` (O(1) memory, O(m + n) per rank-1
    tensor); ``median=True`` also bins every entry into one :class:`SaliencyHistogram`.
    """

    median: bool = False
    total: float = 0.0
    count: int = 0
    histogram: SaliencyHistogram = field(default_factory=SaliencyHistogram)

    def add(self, v: Curvature) -> None:
        """Add every entry of one curvature tensor (full or rank-1, see the module docstring)."""
        if isinstance(v, Rank1Curvature):
            self.count += v.row.numel() * v.col.numel()
            self.total += float(v.row.double().sum()) * float(v.col.double().sum())
            if self.median and v.row.numel() and v.col.numel():
                step = max(1, BLOCK // v.col.numel())
                for start in range(0, v.row.numel(), step):
                    block = torch.outer(v.row[start : start + step], v.col)
                    self.histogram.add(block, overwrite=True)
            return
        self.add_values(v)

    def add_values(self, values: torch.Tensor) -> None:
        """Add a block of entries (any shape), e.g. rows of a tensor streamed from disk."""
        if not values.numel():
            return
        self.count += values.numel()
        total = float(values.sum(dtype=torch.float32))  # float32 cascade sum: 3x faster than float64
        if not math.isfinite(total):  # finite entries near float32's max overflow a float32 sum
            total = float(values.sum(dtype=torch.float64))
        self.total += total
        if self.median:
            self.histogram.add(values)

    def merge(self, other: "CurvatureScale") -> None:
        """Accumulate another scale's entries into this one."""
        self.total += other.total
        self.count += other.count
        if self.median:
            self.histogram.merge(other.histogram)

    @property
    def mean(self) -> Optional[float]:
        """``sum / N``; ``None`` before any entry."""
        return self.total / self.count if self.count else None

    def lower_median(self) -> Optional[float]:
        """The histogram's lower median (module docstring); ``None`` before any entry."""
        if not self.median:
            raise ValueError("this CurvatureScale was made with median=False")
        return self.histogram.lower_median()

    def value(self, statistic: Statistic) -> Optional[float]:
        """``m_i`` for ``statistic`` (``mean`` or ``median``)."""
        return self.mean if statistic == "mean" else self.lower_median()
