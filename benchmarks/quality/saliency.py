"""An expert's saliency ``s = v * tau**2`` over its whole model: the mass grafts keep, and the knee rule.

:func:`model_saliency` streams ``(base, expert, store)`` once into a :class:`SaliencyHistogram` with mass (the
histogram ``density: auto`` builds in the merge's model-wide pass), and sums per tensor the saliency that FFG's
per-tensor masks keep at given densities; :func:`graft_masses` turns both into the share of the expert's saliency
mass each FFG graft keeps (what ``python -m benchmarks.quality.mass_evidence`` plots against the gain it keeps).

``density: auto``'s second candidate rule, the knee: keep an expert's entries whose saliency reaches its mean.
Sort one expert's ``N`` saliencies ``s = v * tau**2`` (model-wide: every tensor the merge reads) in decreasing
order and let ``M(d)`` be the share of ``sum(s)`` carried by the first ``d N`` of them. ``M`` is concave, from
``M(0) = 0`` to ``M(1) = 1``; its knee (the point farthest above the diagonal, ``max_d M(d) - d``, Kneedle's rule on
the unit square) is where the slope ``dM/dd = s N / sum(s)`` falls to 1, i.e. where the next entry's saliency
equals the mean ``s_bar = sum(s) / N``. So the knee keeps ``s >= s_bar``: one absolute threshold per expert, scale
free like the mass rule (a factor on every ``v`` moves ``s_bar`` with it), and no constant to choose.

:func:`knee` computes it from the same histogram (``mergekit_ota.math.histogram``, with mass) that ``density:
auto`` builds in the merge's model-wide pass; the threshold is the lower edge of the bin holding ``s_bar``, so the
histogram's counts give exactly the entries ``s >= threshold`` keeps. The benchmark grafts with that
threshold (:func:`benchmarks.quality.grafting.knee_graft_config`: ``ffg``'s absolute ``threshold``, which applies to
the raw saliency, as the histogram here does).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Sequence

import torch
from safetensors import safe_open

from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.math.ffg import density_mask, saliency
from mergekit_ota.math.histogram import BINS, SHIFT, SaliencyHistogram, bin_edge


def _weights(model_dir: str) -> Dict[str, str]:
    """``{tensor name: safetensors file}`` of a model directory (one file or an index)."""
    import json

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fp:
            return {name: os.path.join(model_dir, f) for name, f in json.load(fp)["weight_map"].items()}
    path = os.path.join(model_dir, "model.safetensors")
    with safe_open(path, "pt") as fp:
        return {name: path for name in fp.keys()}


@dataclass
class ModelSaliency:
    """One expert's saliencies: their histogram (with mass), their total, and per-tensor kept sums by density."""

    histogram: SaliencyHistogram
    total: float
    per_tensor_kept: Dict[float, float]  # density d -> sum over tensors of the saliency d's per-tensor mask keeps


def model_saliency(base: str, expert: str, store: str, densities: Sequence[float] = ()) -> ModelSaliency:
    """Stream every tensor ``store`` and both models hold once (see the module docstring)."""
    opened = CurvatureStore.open(store)
    base_files, expert_files = _weights(base), _weights(expert)
    histogram = SaliencyHistogram()
    kept = {d: 0.0 for d in densities}
    total = 0.0
    for name in opened.names():
        if name not in base_files or name not in expert_files:
            continue
        with safe_open(base_files[name], "pt") as fb, safe_open(expert_files[name], "pt") as fe:
            tau = fe.get_tensor(name).to(torch.float32) - fb.get_tensor(name).to(torch.float32)
        s = saliency(tau, opened.load(name, factored=True))
        total += float(s.sum(dtype=torch.float64))
        for d in densities:
            kept[d] += float(torch.sum(s * density_mask(s, d), dtype=torch.float64))
        histogram.add(s, with_mass=True)
    return ModelSaliency(histogram, total, kept)


def graft_masses(found: ModelSaliency, density: float) -> Dict[str, float]:
    """The share of the saliency mass FFG's graft at ``density`` keeps: ``FFG (model-wide)`` (one threshold, from
    the histogram: :meth:`SaliencyHistogram.kept_at`) and ``FFG (per tensor)`` (exact sums)."""
    model_wide = found.histogram.kept_at(found.histogram.threshold_for_density(density))[1]
    per_tensor = found.per_tensor_kept[density] / found.total if found.total > 0 else float("nan")
    return {"FFG (model-wide)": model_wide, "FFG (per tensor)": per_tensor}


def knee(base: str, expert: str, store: str) -> Dict[str, Any]:
    """The knee of ``expert``'s saliency: ``threshold`` (the bin edge at ``s_bar``), ``mean`` (``s_bar``), and the
    ``density`` and saliency ``mass`` that ``s >= threshold`` keeps, over every tensor ``store`` and both models
    hold."""
    histogram = model_saliency(base, expert, store).histogram
    assert histogram.mass is not None
    mean = float(histogram.mass[1:BINS].sum()) / histogram.total
    index = int(torch.tensor([mean], dtype=torch.float32).view(torch.int32).item()) >> SHIFT
    threshold = bin_edge(index)
    density, mass = histogram.kept_at(threshold)
    return {"threshold": threshold, "mean": mean, "density": density, "mass": mass}
