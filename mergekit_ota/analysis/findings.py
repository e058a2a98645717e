"""The headline findings: plain sentences computed from the numbers of an :class:`Analysis`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from mergekit_ota.analysis import aggregate as agg
from mergekit_ota.analysis.collect import Analysis, TensorRecord
from mergekit_ota.analysis.metrics import random_jaccard
from mergekit_ota.analysis.names import cell_label

TOP_CELLS = 3
EVEN_SPREAD = 1.5  # below this enrichment in every cell, an expert's edits are "spread evenly"


def pct(value: float) -> str:
    """``0.314 -> '31%'``, small values with one decimal."""
    if value != value:  # NaN
        return "n/a"
    return f"{100 * value:.0f}%" if abs(value) >= 0.095 else f"{100 * value:.1f}%"


def num(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def _mean(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.fmean(clean) if clean else float("nan")


def rule_text(analysis: Analysis, i: int) -> str:
    """How expert ``i``'s FFG mask is chosen, in words."""
    expert = analysis.inputs.request.experts[i]
    if expert.threshold is not None:
        return f"saliency >= {expert.threshold:g} (absolute threshold)"
    scope = "model-wide" if analysis.inputs.request.density_scope == "model" else "per tensor"
    if expert.density == "auto":
        return f"density: auto (saliency_mass {analysis.inputs.request.saliency_mass:g}, {scope})"
    return f"d={expert.density:g} ({scope})"


@dataclass
class RankSummary:
    """Median effective rank / min(m, n) of FFG and magnitude masks over the SVD'd matrices."""

    ffg_effective: float
    ffg_energy: float
    magnitude_effective: float
    magnitude_energy: float
    matrices: int


def rank_summary(records: Sequence[TensorRecord]) -> Optional[RankSummary]:
    ffg_e, ffg_r, mag_e, mag_r = [], [], [], []
    for r in records:
        for e in r.experts:
            if e.rank is not None and e.magnitude_rank is not None:
                ffg_e.append(e.rank.effective_rank / e.rank.full_rank)
                ffg_r.append(e.rank.energy_rank_90 / e.rank.full_rank)
                mag_e.append(e.magnitude_rank.effective_rank / e.magnitude_rank.full_rank)
                mag_r.append(e.magnitude_rank.energy_rank_90 / e.magnitude_rank.full_rank)
    if not ffg_e:
        return None
    matrices = sum(1 for r in records if r.experts[0].rank is not None)
    return RankSummary(_median(ffg_e), _median(ffg_r), _median(mag_e), _median(mag_r), matrices)


def occupancy_medians(records: Sequence[TensorRecord], magnitude: bool) -> Tuple[float, float]:
    """Median over (expert, 2-D tensor) of row and column occupancy."""
    rows, cols = [], []
    for r in records:
        for e in r.experts:
            occ = e.magnitude_occupancy if magnitude else e.occupancy
            if occ is not None:
                rows.append(occ.row_fraction)
                cols.append(occ.col_fraction)
    return _median(rows), _median(cols)


MIN_CELL_SHARE = 0.01


def concentration(analysis: Analysis, i: int) -> List[Tuple[str, float, float]]:
    """Expert ``i``'s layer x module cells ranked by enrichment, the cell's share of the expert's
    mass over its share of entries: ``(label, value, enrichment)``.

    The mass is the FFG-kept entries when masks are chosen across tensors (model-wide density
    or threshold; value = the cell's kept fraction), else the saliency ``v * tau**2`` (value =
    the cell's share of it).  Cells holding less than :data:`MIN_CELL_SHARE` of the mass are
    ranked after the others (a tiny norm vector fully kept says little about where an expert learned).
    """
    records = analysis.records
    total_entries = agg.entries(records)
    by_kept = masks_vary(analysis, i)
    mass = agg.kept_entries(i) if by_kept else agg.saliency_sum(i)
    total = mass(records)
    if not total > 0:
        return []
    cells = []
    for (layer, module), group in agg.cells(records).items():
        share = mass(group) / total
        enrichment = share / (agg.entries(group) / total_entries)
        value = agg.kept_fraction(i)(group) if by_kept else share
        cells.append((share >= MIN_CELL_SHARE, cell_label(layer, module), value, enrichment))
    cells.sort(key=lambda c: (not c[0], -c[3]))
    return [(label, value, enrichment) for _, label, value, enrichment in cells]


def masks_vary(analysis: Analysis, i: int) -> bool:
    """Whether expert ``i``'s kept fraction varies by tensor (model-wide density or a threshold)."""
    request = analysis.inputs.request
    return request.experts[i].threshold is not None or request.density_scope == "model"


def _extreme_cell(analysis: Analysis, metric: Callable[[int], agg.Metric], lowest: bool) -> str:
    """``'layer 0 q (0.31, a vs b)'``: the layer x module cell (over all pairs) where
    ``metric(pair)`` is lowest (or highest); '' when the model has a single cell."""
    found = [
        (v, cell_label(layer, module), p)
        for p in range(len(analysis.pairs))
        for layer, module, v in agg.grid(analysis.records, metric(p)).cells()
    ]
    if len(found) <= len(analysis.pairs):
        return ""
    value, cell, p = (min if lowest else max)(found, key=lambda item: item[0])
    a, b = analysis.pairs[p]
    return f"{cell} ({num(value)}, {analysis.labels[a]} vs {analysis.labels[b]})"


def headline(analysis: Analysis) -> List[str]:
    """The findings, one sentence (or two) each, most important first."""
    records = analysis.records
    labels = analysis.labels
    request = analysis.inputs.request
    lines: List[str] = []

    pairs = analysis.pairs
    if pairs:
        per_tensor_cos = [_mean(agg.per_tensor(records, agg.curvature_cosine(p))) for p in range(len(pairs))]
        mean_cos = _mean(per_tensor_cos)
        spearman = _mean([agg.curvature_spearman(p)(records) for p in range(len(pairs))])
        top = _mean([agg.top_curvature_jaccard(p)(records) for p in range(len(pairs))])
        word = (
            "strikingly similar"
            if mean_cos >= 0.9
            else "similar"
            if mean_cos >= 0.75
            else "only loosely similar"
            if mean_cos >= 0.5
            else "dissimilar"
        )
        where = _extreme_cell(analysis, agg.curvature_cosine, lowest=True)
        where = f", lowest in {where}" if where else ""
        lines.append(
            f"**Curvature is {word} across experts**: mean cosine similarity of sqrt(v) over tensors and "
            f"expert pairs = **{num(mean_cos)}**{where}; Spearman rank correlation of v = {num(spearman)}; "
            f"their top-{pct(request.top_density)} curvature entries overlap with Jaccard {num(top)} "
            f"(unrelated random sets: {num(random_jaccard(request.top_density, request.top_density), 3)})."
        )
        if mean_cos >= 0.9:
            lines.append(
                "The experts are sensitive to the same coordinates: the regime in which the paper "
                "(arXiv 2509.11167) explains why even linear merging works; ota re-weights within a shared geometry."
            )
        elif mean_cos < 0.75:
            lines.append(
                "The experts' curvature differs: they are sensitive to different coordinates, where "
                "curvature-aware weighting (ota) has the most to gain over plain averaging."
            )

    for i, label in enumerate(labels):
        ranked = concentration(analysis, i)[:TOP_CELLS]
        if not ranked:
            continue
        if masks_vary(analysis, i):
            items = [f"{name} ({pct(v)} kept, {x:.1f}x average)" for name, v, x in ranked]
            subject, plural = f"FFG masks of **{label}** at {rule_text(analysis, i)}", True
        else:
            items = [f"{name} ({pct(v)} of it, {x:.1f}x its share of entries)" for name, v, x in ranked]
            subject, plural = f"**{label}**'s saliency v*tau^2", False
        if ranked[0][2] >= EVEN_SPREAD:
            sentence = f"{subject} concentrate{'' if plural else 's'} in: {', '.join(items)}."
        else:
            sentence = (
                f"{subject} {'are' if plural else 'is'} spread evenly: no layer x module cell holds more than "
                f"{EVEN_SPREAD}x its share of entries (highest: {items[0]})."
            )
        if not masks_vary(analysis, i):
            sentence += (
                f" (Per-tensor density keeps {pct(request.experts[i].density)} of every tensor by construction; "
                f"`--density-scope model` lets dense and sparse layers emerge.)"
            )
        lines.append(sentence)

    ranks = rank_summary(records)
    if ranks is not None:
        ratio = ranks.ffg_effective / ranks.magnitude_effective if ranks.magnitude_effective > 0 else float("nan")
        word = (
            "extremely low-rank"
            if ranks.ffg_effective < 0.1 and ratio < 0.5
            else "lower-rank than magnitude masks"
            if ratio < 0.8
            else "about as high-rank as magnitude masks"
        )
        lines.append(
            f"**FFG masks are {word}**: over the {ranks.matrices} largest matrices, median effective rank / "
            f"min(m,n) = {num(ranks.ffg_effective, 3)} (90%-energy rank / min(m,n) = {num(ranks.ffg_energy, 3)}) "
            f"vs {num(ranks.magnitude_effective, 3)} ({num(ranks.magnitude_energy, 3)}) for magnitude masks "
            f"keeping as many entries."
        )
    ffg_rows, ffg_cols = occupancy_medians(records, magnitude=False)
    mag_rows, mag_cols = occupancy_medians(records, magnitude=True)
    if ffg_rows == ffg_rows:
        lines.append(
            f"FFG masks keep something in a median {pct(ffg_rows)} of the rows and {pct(ffg_cols)} of the "
            f"columns of a matrix (magnitude masks: {pct(mag_rows)} / {pct(mag_cols)}); FFG and magnitude "
            "masks agree with Jaccard "
            f"{num(_mean([agg.ffg_magnitude_jaccard(i)(records) for i in range(len(labels))]))}."
        )

    if pairs:
        kept = [agg.kept_fraction(i)(records) for i in range(len(labels))]
        jac = [agg.mask_jaccard(p)(records) for p in range(len(pairs))]
        baseline = _mean([random_jaccard(kept[a], kept[b]) for a, b in pairs])
        conflicts = _mean([agg.sign_conflict_rate(p)(records) for p in range(len(pairs))])
        where = _extreme_cell(analysis, agg.mask_jaccard, lowest=False)
        where = f"; they collide most in {where}" if where else ""
        lines.append(
            f"**FFG masks of different experts overlap with Jaccard {num(_mean(jac), 3)}** (unrelated random "
            f"masks of the same sizes: {num(baseline, 3)}){where}; of the entries both keep, "
            f"{pct(conflicts)} have task vectors of opposite sign."
        )

    zero = sum(e.kept_zero_saliency for r in records for e in r.experts)
    if zero:
        kept_total = sum(e.kept for r in records for e in r.experts)
        lines.append(
            f"Note: {pct(zero / kept_total)} of the kept entries have saliency 0 (the expert did not change "
            f"them, or its curvature is 0 there): a density above the fraction of entries the experts "
            f"changed keeps ties, broken by index."
        )
    return lines
