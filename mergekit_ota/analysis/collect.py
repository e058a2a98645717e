"""The streaming walk: one tensor at a time, base + experts + curvature -> per-tensor statistics.

For each floating-point tensor of the base, for each expert ``i`` (weights ``t_i``,
curvature ``v_i``, ``tau_i = t_i - b``, saliency ``s_i = v_i * tau_i**2``):

* FFG mask ``F_i``: ``density_mask(s_i, d_i)`` per tensor; with ``density_scope: model``
  ``s_i >= T_i``, ``T_i`` read from a :class:`SaliencyHistogram` of all the expert's
  saliencies (a first pass); with an absolute ``threshold``, ``s_i >= threshold``;
* magnitude mask ``M_i`` (the baseline FFG is compared with): the same rule on ``tau_i**2``
  (for an absolute threshold: the ``|F_i|`` largest ``|tau_i|`` of the tensor);
* top-curvature set ``C_i``: ``density_mask(v_i, top_density)``;

and for each pair ``(i, j)``: the cosine terms of ``sqrt(v_i)``, ``sqrt(v_j)``, Spearman's
correlation of ``v_i``, ``v_j`` (on a deterministic sample of at most ``spearman_sample``
entries), and the overlap counts of ``C_i, C_j`` and ``F_i, F_j``.  Everything kept is a
count or a float64 sum, so cells of many tensors aggregate exactly.  Memory: the base, the
current expert's ``tau``, ``v`` and ``s``, and per expert ``sqrt(v)`` and three byte masks, for
one tensor.

The same reads give each expert's curvature scale (:class:`~mergekit_ota.curvature.contents.StoreScale`:
mean and median of ``v_i`` over all analysed tensors, with the step and bias factor its store's
metadata records), the table ``inspect`` prints for several stores.
"""

from __future__ import annotations

import itertools
import time
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch

from mergekit_ota.analysis.inputs import OpenedInputs
from mergekit_ota.analysis.metrics import (
    CosineTerms,
    MaskRank,
    Occupancy,
    OverlapCounts,
    average_ranks,
    cosine_terms,
    mask_rank,
    occupancy,
    overlap_counts,
    pearson,
    sample_indices,
    sign_conflicts,
)
from mergekit_ota.analysis.names import parse_name
from mergekit_ota.curvature.contents import StoreScale, store_scale
from mergekit_ota.math.ffg import density_mask, saliency, threshold_mask
from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.scale import CurvatureScale


@dataclass
class ExpertTensorStats:
    """One expert, one tensor: what its FFG mask ``F`` and magnitude mask ``M`` keep."""

    kept: int
    magnitude_kept: int
    kept_zero_saliency: int
    saliency_sum: float
    kept_saliency: float  # sum of s over the FFG-kept entries
    ffg_vs_magnitude: OverlapCounts
    occupancy: Optional[Occupancy] = None
    magnitude_occupancy: Optional[Occupancy] = None
    rank: Optional[MaskRank] = None
    magnitude_rank: Optional[MaskRank] = None


@dataclass
class PairTensorStats:
    """Two experts, one tensor: curvature similarity and FFG mask collisions."""

    cosine: CosineTerms
    spearman: float
    spearman_entries: int
    top_overlap: OverlapCounts
    mask_overlap: OverlapCounts
    sign_conflicts: int


@dataclass
class TensorRecord:
    """Everything measured on one tensor (``pairs`` in the order of :attr:`Analysis.pairs`)."""

    name: str
    layer: Optional[int]
    module: str
    shape: Tuple[int, ...]
    experts: List[ExpertTensorStats]
    pairs: List[PairTensorStats]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass
class Analysis:
    """The result of :func:`collect`: per-tensor records plus how they were obtained."""

    inputs: OpenedInputs
    records: List[TensorRecord]
    thresholds: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    scales: List[StoreScale] = field(default_factory=list)  # per expert, in order
    saliency: List[SaliencyHistogram] = field(default_factory=list)  # per expert: all its s, with mass (its curve)

    @property
    def labels(self) -> List[str]:
        return [e.label for e in self.inputs.request.experts]

    @property
    def pairs(self) -> List[Tuple[int, int]]:
        return pair_indices(len(self.labels))


def pair_indices(n: int) -> List[Tuple[int, int]]:
    """All pairs ``(i, j)``, ``i < j``, of ``n`` experts."""
    return list(itertools.combinations(range(n), 2))


def rank_targets(inputs: OpenedInputs, count: int) -> Set[str]:
    """Names of the ``count`` largest 2-D tensors (by entries, then name): their masks get an SVD."""
    analysed = set(inputs.tensors)
    matrices = [(e.shape, name) for name, e in inputs.base.entries.items() if name in analysed and len(e.shape) == 2]
    matrices.sort(key=lambda item: (-item[0][0] * item[0][1], item[1]))
    return {name for _, name in matrices[:count]}


def _progress(total: int, desc: str, quiet: bool):
    from mergekit_ota.progress import bar

    return bar(total=total, desc=desc, quiet=quiet)


class _Reader:
    """Reads one tensor of the base and of each expert (fp32), and each expert's curvature.

    ``safe_open`` returns tensors that alias the file's (private) memory map, and a float32
    tensor's ``.to(float32)`` is itself: modifying a loaded tensor in place would change what
    the next read of it returns.  So loaded tensors are never modified in place here.
    """

    def __init__(self, inputs: OpenedInputs):
        self.inputs = inputs

    def base(self, name: str) -> torch.Tensor:
        return self.inputs.base.load(name).to(torch.float32)

    def expert(self, i: int, name: str, base: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(tau_i, v_i)`` in float32."""
        tau = self.inputs.experts[i].load(name).to(torch.float32) - base
        return tau, self.inputs.stores[i].load(name)


def model_thresholds(
    inputs: OpenedInputs, quiet: bool = False
) -> Tuple[Dict[str, Tuple[float, float]], Dict[int, SaliencyHistogram]]:
    """Per expert with a density under ``density_scope: model``: the saliency threshold ``T_s``
    and the ``tau**2`` threshold ``T_m`` keeping its density over all its tensors (first pass), by label;
    and, by expert index, the histogram of its saliencies (with mass) that gave ``T_s``.

    ``density: auto`` takes ``T_s = threshold_for_mass(saliency_mass)``, as the merge does, and ``T_m``
    keeps the same fraction of entries by magnitude."""
    request = inputs.request
    model_wide = [i for i, e in enumerate(request.experts) if e.density is not None]
    if request.density_scope != "model" or not model_wide:
        return {}, {}
    reader = _Reader(inputs)
    histograms = {i: (SaliencyHistogram(), SaliencyHistogram()) for i in model_wide}
    with _progress(len(inputs.tensors), "analyze pass 1/2 (model-wide thresholds)", quiet) as bar:
        for name in inputs.tensors:
            base = reader.base(name)
            for i in model_wide:
                tau, v = reader.expert(i, name, base)
                histograms[i][0].add(saliency(tau, v), overwrite=True, with_mass=True)
                histograms[i][1].add(tau.square_(), overwrite=True)
                del tau, v
            bar.update(1)
    result = {}
    for i, (by_saliency, by_magnitude) in histograms.items():
        density = request.experts[i].density
        if density == "auto":
            threshold = by_saliency.threshold_for_mass(request.saliency_mass)
            density = by_saliency.kept_at(threshold)[0]
        else:
            threshold = by_saliency.threshold_for_density(density)
        result[request.experts[i].label] = (threshold, by_magnitude.threshold_for_density(density))
    return result, {i: by_saliency for i, (by_saliency, _) in histograms.items()}


def _top_count(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of ``scores`` (``density_mask`` with ``density = (k + 0.5) / numel``)."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return density_mask(scores, min(1.0, (k + 0.5) / scores.numel()))


class _ExpertMasks:
    """The FFG and magnitude keep rules of one expert (per tensor, model-wide, or absolute)."""

    def __init__(self, density: Optional[float], threshold: Optional[float], model_wide: Optional[Tuple[float, float]]):
        self.density = density
        self.threshold = threshold
        self.model_wide = model_wide

    def masks(self, tau: torch.Tensor, s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(F, M)``: FFG mask on saliency ``s``, magnitude mask on ``tau**2``."""
        if self.model_wide is not None:
            return threshold_mask(s, self.model_wide[0]), threshold_mask(tau.square(), self.model_wide[1])
        if self.threshold is not None:
            ffg = threshold_mask(s, self.threshold)
            return ffg, _top_count(tau.abs(), int(torch.count_nonzero(ffg)))
        return density_mask(s, self.density), density_mask(tau.abs(), self.density)


def collect(inputs: OpenedInputs, quiet: bool = False) -> Analysis:
    """Measure every tensor of ``inputs`` (see the module docstring); one or two passes."""
    request = inputs.request
    started = time.perf_counter()
    thresholds, curves = model_thresholds(inputs, quiet)
    first_pass = time.perf_counter() - started
    rules = [_ExpertMasks(e.density, e.threshold, thresholds.get(e.label)) for e in request.experts]
    svd = rank_targets(inputs, request.rank_top)
    pairs = pair_indices(len(request.experts))
    reader = _Reader(inputs)
    records = []
    totals = [CurvatureScale(median=True) for _ in request.experts]
    # each expert's saliency histogram: from pass 1, or filled here (arithmetic only, no extra read)
    saliencies = [curves.get(i) or SaliencyHistogram() for i in range(len(request.experts))]
    fill = [i not in curves for i in range(len(request.experts))]
    started = time.perf_counter()
    desc = "analyze pass 2/2 (metrics)" if thresholds else "analyze (metrics)"
    with _progress(len(inputs.tensors), desc, quiet) as bar:
        for name in inputs.tensors:
            records.append(
                _measure(
                    name,
                    reader,
                    rules,
                    pairs,
                    name in svd,
                    request.top_density,
                    request.spearman_sample,
                    totals,
                    [h if f else None for h, f in zip(saliencies, fill)],
                )
            )
            bar.update(1)
    seconds = {"metrics pass": time.perf_counter() - started}
    if thresholds:
        seconds = {"threshold pass": first_pass, **seconds}
    scales = [
        store_scale(e.label, store.metadata, total, len(inputs.tensors))
        for e, store, total in zip(request.experts, inputs.stores, totals)
    ]
    return Analysis(inputs, records, thresholds, seconds, scales, saliencies)


def _measure(
    name: str,
    reader: _Reader,
    rules: List[_ExpertMasks],
    pairs: List[Tuple[int, int]],
    with_rank: bool,
    top_density: float,
    max_samples: int,
    scales: List[CurvatureScale],
    saliencies: List[Optional[SaliencyHistogram]],
) -> TensorRecord:
    base = reader.base(name)
    parsed = parse_name(name)
    sample = sample_indices(base.numel(), max_samples, zlib.crc32(name.encode()))
    roots, tops, ffgs, signs, ranks, experts = [], [], [], [], [], []
    for i, rule in enumerate(rules):
        tau, v = reader.expert(i, name, base)
        scales[i].add(v)
        s = saliency(tau, v)
        if saliencies[i] is not None:
            saliencies[i].add(s, with_mass=True)
        ffg, magnitude = rule.masks(tau, s)
        stats = ExpertTensorStats(
            kept=int(torch.count_nonzero(ffg)),
            magnitude_kept=int(torch.count_nonzero(magnitude)),
            kept_zero_saliency=int(torch.count_nonzero(torch.logical_and(ffg, s == 0))),
            saliency_sum=float(s.sum(dtype=torch.float64)),
            kept_saliency=float(torch.sum(s * ffg, dtype=torch.float64)),
            ffg_vs_magnitude=overlap_counts(ffg, magnitude),
        )
        if base.dim() == 2:
            stats.occupancy = occupancy(ffg)
            stats.magnitude_occupancy = occupancy(magnitude)
            if with_rank:
                stats.rank = mask_rank(ffg)
                stats.magnitude_rank = mask_rank(magnitude)
        experts.append(stats)
        del s, magnitude
        if not pairs:
            continue
        root = v.sqrt()
        roots.append(root)
        tops.append(density_mask(root, top_density))
        ffgs.append(ffg)
        signs.append(torch.sign(tau).to(torch.int8))
        flat = root.reshape(-1)
        ranks.append(average_ranks(flat if sample is None else flat[sample]))
        del tau, v
    pair_stats = [
        PairTensorStats(
            cosine=cosine_terms(roots[a], roots[b]),
            spearman=pearson(ranks[a], ranks[b]),
            spearman_entries=int(ranks[a].numel()),
            top_overlap=overlap_counts(tops[a], tops[b]),
            mask_overlap=overlap_counts(ffgs[a], ffgs[b]),
            sign_conflicts=sign_conflicts(ffgs[a], ffgs[b], signs[a], signs[b]),
        )
        for a, b in pairs
    ]
    return TensorRecord(name, parsed.layer, parsed.module, tuple(base.shape), experts, pair_stats)
