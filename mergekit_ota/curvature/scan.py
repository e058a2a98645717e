"""Reading a stored tensor's values for statistics or validation, one block of rows at a time.

Memory stays at one block (about 4M values) plus, for an exact median, the values
themselves (at most :data:`~mergekit_ota.math.stats.EXACT_MEDIAN_LIMIT`).
A sampled scan reads only :data:`WINDOWS` evenly spaced windows of whole rows
(``safe_open(...).get_slice``), about ``sample`` values in all, so checking a
store costs kilobytes per tensor instead of the whole file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch

from mergekit_ota.curvature.store import CurvatureStore, HeaderEntry, value_problems
from mergekit_ota.math.stats import StatsAccumulator, TensorStats

WINDOWS = 8
DEFAULT_SAMPLE = 1 << 16


def _row_length(entry: HeaderEntry) -> int:
    return max(1, math.prod(entry.shape[1:])) if entry.shape else 1


def entry_stats(
    store: CurvatureStore, entry: HeaderEntry, sink: Optional[Callable[[torch.Tensor], None]] = None, **limits: int
) -> TensorStats:
    """:class:`TensorStats` of every value of stored tensor ``entry``, streamed by blocks of rows;
    each block is also handed to ``sink`` (e.g. a store-wide scale), so nothing is read twice."""
    accumulator = StatsAccumulator(entry.numel, row=entry.shape[-1] if entry.shape else 1, **limits)
    for block in store.iter_rows(entry):
        accumulator.add(block)
        if sink is not None:
            sink(block)
    return accumulator.result()


def sample_windows(entry: HeaderEntry, sample: int) -> Optional[List[Tuple[int, int]]]:
    """Row ranges ``[start, stop)`` of dim 0 to read for about ``sample`` values.

    ``None`` (read everything) when that is about as much; else :data:`WINDOWS`
    windows of whole rows spread evenly from the first row to the last.
    """
    if entry.numel <= sample or not entry.shape:
        return None
    rows = entry.shape[0]
    size = max(1, sample // (WINDOWS * _row_length(entry)))
    if size * WINDOWS >= rows:
        return None
    starts = sorted({round(k * (rows - size) / (WINDOWS - 1)) for k in range(WINDOWS)})
    return [(start, start + size) for start in starts]


def _blocks(store: CurvatureStore, entry: HeaderEntry, sample: Optional[int]) -> Iterator[torch.Tensor]:
    windows = None if sample is None else sample_windows(entry, sample)
    if windows is None:
        yield from store.iter_rows(entry)
        return
    for start, stop in windows:
        yield store.read_entry(entry, start, stop)


@dataclass(frozen=True)
class ScanResult:
    """Problems found in one stored tensor, and how many of its values were read."""

    problems: Tuple[str, ...]
    scanned: int
    total: int


def scan_entry(store: CurvatureStore, entry: HeaderEntry, sample: Optional[int]) -> ScanResult:
    """Look for NaN, Inf and negative values in ``entry``: all of them (``sample=None``) or a sample.

    Messages are the ones a merge raises on reading the tensor, with the sample's
    extent added when not every value was read.
    """
    accumulator = StatsAccumulator(entry.numel, sample_size=0)
    scanned = 0
    for block in _blocks(store, entry, sample):
        accumulator.add(block)
        scanned += block.numel()
    scope = "" if scanned >= entry.numel else f" (in {scanned} sampled of {entry.numel} values)"
    problems = value_problems(entry, accumulator.nan, accumulator.inf, accumulator.negative, accumulator.min, scope)
    return ScanResult(problems=tuple(problems), scanned=scanned, total=entry.numel)
