"""Per-cell summaries of the per-tensor records: layer x module grids, module and model totals.

A *metric* maps a list of :class:`TensorRecord` (the tensors of one cell, of one module
type, or of the whole model) to one number.  Ratios are ratios of sums (so a cell of
several tensors is measured as their concatenation), except Spearman's correlation,
which is the entry-weighted mean of the per-tensor values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mergekit_ota.analysis.collect import TensorRecord
from mergekit_ota.analysis.metrics import CosineTerms, OverlapCounts, cosine_from_terms, jaccard_from_counts
from mergekit_ota.analysis.names import MODULE_TYPES

Metric = Callable[[Sequence[TensorRecord]], float]
NAN = float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else NAN


# ----------------------------------------------------------------------------- metrics


def entries(records: Sequence[TensorRecord]) -> float:
    """Number of entries (parameters)."""
    return float(sum(r.numel for r in records))


def kept_entries(i: int, magnitude: bool = False) -> Metric:
    """Entries expert ``i``'s FFG (or magnitude) mask keeps: ``sum |F|``."""
    return lambda records: float(sum(r.experts[i].magnitude_kept if magnitude else r.experts[i].kept for r in records))


def kept_fraction(i: int, magnitude: bool = False) -> Metric:
    """Fraction of expert ``i``'s entries its FFG (or magnitude) mask keeps: ``sum |F| / sum numel``."""
    count = kept_entries(i, magnitude)
    return lambda records: _ratio(count(records), entries(records))


def saliency_sum(i: int) -> Metric:
    """Sum of expert ``i``'s saliency ``v * tau**2`` (the OBD estimate of the loss its edit is worth)."""
    return lambda records: sum(r.experts[i].saliency_sum for r in records)


def occupancy_fraction(i: int, axis: str, magnitude: bool = False) -> Metric:
    """Rows (``axis='rows'``) or columns used by expert ``i``'s masks over all rows/columns of the
    2-D tensors: ``sum used / sum total``; NaN where there is no 2-D tensor."""

    def metric(records: Sequence[TensorRecord]) -> float:
        used = total = 0
        for r in records:
            occ = r.experts[i].magnitude_occupancy if magnitude else r.experts[i].occupancy
            if occ is not None:
                used += occ.rows_used if axis == "rows" else occ.cols_used
                total += occ.rows if axis == "rows" else occ.cols
        return _ratio(used, total)

    return metric


def ffg_magnitude_jaccard(i: int) -> Metric:
    """Jaccard of expert ``i``'s FFG and magnitude masks."""

    def metric(records: Sequence[TensorRecord]) -> float:
        return jaccard_from_counts(_sum_counts(r.experts[i].ffg_vs_magnitude for r in records))

    return metric


def curvature_cosine(p: int) -> Metric:
    """Cosine of ``sqrt(v_a)`` and ``sqrt(v_b)`` over the records' concatenation (pair ``p``)."""

    def metric(records: Sequence[TensorRecord]) -> float:
        terms = [r.pairs[p].cosine for r in records]
        return cosine_from_terms(CosineTerms(*(sum(t[k] for t in terms) for k in range(3))))

    return metric


def curvature_spearman(p: int) -> Metric:
    """Entry-weighted mean over tensors of Spearman's correlation of ``v_a``, ``v_b`` (pair ``p``)."""

    def metric(records: Sequence[TensorRecord]) -> float:
        pairs = [(r.pairs[p].spearman, r.numel) for r in records if not math.isnan(r.pairs[p].spearman)]
        return _ratio(sum(rho * n for rho, n in pairs), sum(n for _, n in pairs))

    return metric


def top_curvature_jaccard(p: int) -> Metric:
    """Jaccard of the experts' top-``d`` curvature entries (pair ``p``)."""
    return lambda records: jaccard_from_counts(_sum_counts(r.pairs[p].top_overlap for r in records))


def mask_jaccard(p: int) -> Metric:
    """Jaccard of the experts' FFG masks (pair ``p``): where their grafted edits collide."""
    return lambda records: jaccard_from_counts(_sum_counts(r.pairs[p].mask_overlap for r in records))


def sign_conflict_rate(p: int) -> Metric:
    """Among entries both FFG masks keep, the fraction whose task vectors have opposite signs."""

    def metric(records: Sequence[TensorRecord]) -> float:
        both = sum(r.pairs[p].mask_overlap.intersection for r in records)
        return _ratio(sum(r.pairs[p].sign_conflicts for r in records), both)

    return metric


def _sum_counts(counts) -> OverlapCounts:
    intersection = union = 0
    for c in counts:
        intersection += c.intersection
        union += c.union
    return OverlapCounts(intersection, union)


# ----------------------------------------------------------------------------- groupings

CellKey = Tuple[Optional[int], str]


@dataclass
class Grid:
    """A layer x module table: ``values[row][col]``, NaN where no tensor falls in the cell.

    Row ``None`` (first, if present) holds the tensors outside the decoder layers
    (embeddings, lm_head, final norm, unrecognised names).
    """

    rows: List[Optional[int]]
    cols: List[str]
    values: List[List[float]]

    @property
    def row_labels(self) -> List[str]:
        return ["no layer" if r is None else str(r) for r in self.rows]

    def cells(self) -> List[Tuple[Optional[int], str, float]]:
        """``(layer, module, value)`` of every non-empty cell."""
        return [
            (row, col, self.values[a][b])
            for a, row in enumerate(self.rows)
            for b, col in enumerate(self.cols)
            if not math.isnan(self.values[a][b])
        ]


def cells(records: Sequence[TensorRecord]) -> Dict[CellKey, List[TensorRecord]]:
    """Records grouped by ``(layer, module)``."""
    grouped: Dict[CellKey, List[TensorRecord]] = {}
    for r in records:
        grouped.setdefault((r.layer, r.module), []).append(r)
    return grouped


def grid(records: Sequence[TensorRecord], metric: Metric) -> Grid:
    """``metric`` of every layer x module cell."""
    grouped = cells(records)
    layers = sorted({layer for layer, _ in grouped if layer is not None})
    rows: List[Optional[int]] = ([None] if any(layer is None for layer, _ in grouped) else []) + layers
    cols = [m for m in MODULE_TYPES if any(module == m for _, module in grouped)]
    values = [[metric(grouped[(row, col)]) if (row, col) in grouped else NAN for col in cols] for row in rows]
    return Grid(rows, cols, values)


def by_module(records: Sequence[TensorRecord], metric: Metric) -> Dict[str, float]:
    """``metric`` of each module type (all layers together), in :data:`MODULE_TYPES` order."""
    grouped: Dict[str, List[TensorRecord]] = {}
    for r in records:
        grouped.setdefault(r.module, []).append(r)
    return {m: metric(grouped[m]) for m in MODULE_TYPES if m in grouped}


def per_tensor(records: Sequence[TensorRecord], metric: Metric) -> List[float]:
    """``metric`` of each tensor alone (NaN values dropped)."""
    values = [metric([r]) for r in records]
    return [v for v in values if not math.isnan(v)]
