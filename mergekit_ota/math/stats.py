"""Summary statistics of a curvature tensor (pure tensor functions, no I/O).

For a tensor ``v`` with ``N`` values: ``nan`` and ``inf`` count the non-finite
values, ``negative`` the finite values ``< 0``, ``zeros`` the values ``== 0``;
``min``, ``median`` and ``max`` are taken over the finite values, the median
being the *lower* median (the ``ceil(N/2)``-th smallest, ``torch.median``'s
convention).

:class:`StatsAccumulator` takes a tensor in flat (row-major) chunks, so a caller
can stream a large tensor from disk: counts, min and max are exact; the median is
exact (``torch.kthvalue``) up to ``exact_median_limit`` values and otherwise the
lower median of a deterministic strided sample of about ``sample_size`` values
(every ``s``-th value, ``s`` coprime to the row length so that the sample covers
every column).

:func:`rank1_stats` gives the statistics of a rank-1 record
``v_hat = outer(r, c) / sum(r)`` exactly from its factors, in ``O((m + n) log)``
time, without building the ``m x n`` matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

EXACT_MEDIAN_LIMIT = 1 << 24
SAMPLE_SIZE = 1 << 20


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor; ``median_from`` is the number of values its median was taken from."""

    numel: int
    min: Optional[float]
    median: Optional[float]
    max: Optional[float]
    zeros: int
    nan: int
    inf: int
    negative: int
    median_exact: bool
    median_from: int

    @property
    def bad(self) -> int:
        """Values a merge refuses: NaN, Inf and negative."""
        return self.nan + self.inf + self.negative


def _coprime_stride(numel: int, sample_size: int, row: int) -> int:
    stride = max(1, math.ceil(numel / sample_size))
    while stride > 1 and math.gcd(stride, row) != 1:
        stride += 1
    return stride


class StatsAccumulator:
    """Statistics of a tensor of ``numel`` values fed in flat order by :meth:`add`.

    ``row`` is the length of the tensor's last dimension (it only steers the median
    sample so that every column is visited); ``sample_size=0`` skips the median.
    """

    def __init__(
        self,
        numel: int,
        *,
        row: int = 1,
        exact_median_limit: int = EXACT_MEDIAN_LIMIT,
        sample_size: int = SAMPLE_SIZE,
    ):
        self.numel = numel
        if sample_size <= 0:
            self.stride = 0  # no median wanted
        elif numel <= exact_median_limit:
            self.stride = 1
        else:
            self.stride = _coprime_stride(numel, sample_size, max(1, row))
        self.seen = 0
        self.zeros = self.nan = self.inf = self.negative = 0
        self.min: Optional[float] = None
        self.max: Optional[float] = None
        self._sample: List[torch.Tensor] = []

    def add(self, chunk: torch.Tensor) -> None:
        """Add the next values (any shape; taken in row-major order)."""
        values = chunk.reshape(-1)
        if values.dtype not in (torch.float32, torch.float64):
            values = values.to(torch.float32)
        if not values.numel():
            return
        low, high = (float(x) for x in torch.aminmax(values))  # NaN if any value is NaN
        all_finite = math.isfinite(low) and math.isfinite(high)
        kept = values
        if not all_finite:
            nan = int(torch.count_nonzero(torch.isnan(values)))
            kept = values[torch.isfinite(values)]
            self.nan += nan
            self.inf += values.numel() - kept.numel() - nan
            low, high = (float(x) for x in torch.aminmax(kept)) if kept.numel() else (math.inf, -math.inf)
        self.zeros += int(torch.count_nonzero(values == 0))
        if kept.numel():
            if low < 0:
                self.negative += int(torch.count_nonzero(kept < 0))
            self.min = low if self.min is None else min(self.min, low)
            self.max = high if self.max is None else max(self.max, high)
        if self.stride:
            picked = values[(-self.seen) % self.stride :: self.stride]
            # keep a copy of a strided pick (a view would pin the whole chunk); a stride-1 pick is all of it anyway
            picked = (
                picked[torch.isfinite(picked)] if not all_finite else picked if self.stride == 1 else picked.clone()
            )
            if picked.numel():
                self._sample.append(picked)
        self.seen += values.numel()

    def result(self) -> TensorStats:
        sample = torch.cat(self._sample) if self._sample else torch.empty(0)
        median = lower_median(sample)
        return TensorStats(
            numel=self.numel,
            min=self.min,
            median=median,
            max=self.max,
            zeros=self.zeros,
            nan=self.nan,
            inf=self.inf,
            negative=self.negative,
            median_exact=self.stride == 1,
            median_from=int(sample.numel()),
        )


def lower_median(values: torch.Tensor) -> Optional[float]:
    """The ``ceil(N/2)``-th smallest of ``values`` (one ``kthvalue``, no sort); ``None`` if empty."""
    if values.numel() == 0:
        return None
    return float(values.reshape(-1).kthvalue((values.numel() + 1) // 2).values)


def tensor_stats(tensor: torch.Tensor, **limits: int) -> TensorStats:
    """:class:`TensorStats` of a tensor held in memory."""
    accumulator = StatsAccumulator(tensor.numel(), row=tensor.shape[-1] if tensor.dim() else 1, **limits)
    accumulator.add(tensor)
    return accumulator.result()


def rank1_factors_valid(r: torch.Tensor, c: torch.Tensor) -> bool:
    """True if both factors are finite and non-negative (what a merge accepts)."""
    return all(bool(torch.isfinite(x).all()) and not bool((x < 0).any()) for x in (r, c))


def _count_at_most(queries: torch.Tensor, sorted_other: torch.Tensor, bound: float) -> int:
    """``#{(i, j): queries_i * sorted_other_j <= bound}`` for non-negative values, ``bound >= 0``."""
    zero = queries == 0
    count = int(zero.sum()) * sorted_other.numel()
    q = queries[~zero]
    if q.numel():
        count += int(torch.searchsorted(sorted_other, bound / q, right=True).sum())
    return count


def kth_smallest_product(r: torch.Tensor, c: torch.Tensor, k: int) -> float:
    """The ``k``-th smallest (1-based) of the ``m*n`` products ``r_i * c_j`` (non-negative, finite).

    Bisection on the float64 bit pattern (monotone for non-negative floats): at most
    64 steps, each counting products ``<= t`` with one ``searchsorted`` of the
    shorter factor into the sorted longer one.
    """
    r64, c64 = r.to(torch.float64).reshape(-1), c.to(torch.float64).reshape(-1)
    queries, other = (r64, c64) if r64.numel() <= c64.numel() else (c64, r64)
    other = other.sort().values
    if _count_at_most(queries, other, 0.0) >= k:
        return 0.0
    low, high = _bits(0.0), _bits(math.inf)  # invariant: count(low) < k <= count(high)
    while high - low > 1:
        middle = (low + high) // 2
        if _count_at_most(queries, other, _float(middle)) >= k:
            high = middle
        else:
            low = middle
    return _float(high)


def _bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float64).view(torch.int64))


def _float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))


def rank1_stats(r: torch.Tensor, c: torch.Tensor) -> Optional[TensorStats]:
    """Exact :class:`TensorStats` of ``outer(r, c) / sum(r)`` from the factors alone.

    With ``S = sum(r) > 0`` and every factor finite and ``>= 0``, each value
    ``r_i c_j / S`` is monotone in both factors, so ``min = min(r) min(c) / S``,
    ``max = max(r) max(c) / S``, ``zeros = z_r n + z_c m - z_r z_c`` (``z_r``, ``z_c``
    zero factors) and the median is :func:`kth_smallest_product` ``/ S``
    (float64 arithmetic, so agreeing with the float32 reconstruction to ~1e-7
    relative). ``S == 0`` gives all zeros (as ``rank1_reconstruct``). Returns
    ``None`` for invalid factors (NaN, Inf or negative), whose reconstruction a
    merge refuses: describe the factors themselves with :func:`tensor_stats`.
    """
    if not rank1_factors_valid(r, c):
        return None
    m, n = r.numel(), c.numel()
    numel = m * n
    r64, c64 = r.to(torch.float64).reshape(-1), c.to(torch.float64).reshape(-1)
    total = float(r64.sum())
    if numel == 0:
        return TensorStats(0, None, None, None, 0, 0, 0, 0, True, 0)
    if total <= 0.0:
        return TensorStats(numel, 0.0, 0.0, 0.0, numel, 0, 0, 0, True, numel)
    zr, zc = int((r64 == 0).sum()), int((c64 == 0).sum())
    median = kth_smallest_product(r64, c64, (numel + 1) // 2) / total
    return TensorStats(
        numel=numel,
        min=float(r64.min()) * float(c64.min()) / total,
        median=median,
        max=float(r64.max()) * float(c64.max()) / total,
        zeros=zr * n + zc * m - zr * zc,
        nan=0,
        inf=0,
        negative=0,
        median_exact=True,
        median_from=numel,
    )
