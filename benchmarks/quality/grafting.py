"""Single-expert grafting: keep a fraction ``d`` of one expert's task vector, revert the rest to the base.

``theta = b + m * tau`` with ``tau = t - b`` and a mask ``m`` keeping a fraction ``d``
of ``tau``'s entries, chosen by

* ``FFG (per tensor)``: saliency ``v * tau**2`` (Adam's ``exp_avg_sq`` ``v``), top
  ``k = max(1, int(d * numel))`` of every tensor: ``merge_method: ffg``, one expert;
* ``FFG (model-wide)``: the same saliency, one threshold over all of the expert's
  tensors (``density_scope: model``);
* ``magnitude (per tensor)``: ``|tau|``, top ``k`` of every tensor: mergekit's ``ties``
  with one expert (sign election is a no-op with one expert, and ``normalize`` divides
  by its weight 1), i.e. exactly magnitude pruning of the task vector;
* ``random``: each entry kept with probability ``d`` (seeded): mergekit's ``dare_linear``
  with ``rescale: false`` (no 1/d rescaling: a pure random mask).

All run through mergekit, on the YAML that :func:`graft_config` builds.

``FFG (auto)`` (:func:`auto_graft_config`) grafts with ``density: auto`` at a target saliency
mass ``q`` instead of a density: it keeps the fewest entries whose saliency ``v * tau**2`` sums to
``q`` of the expert's total, model-wide, and the merge's provenance records the density it chose.
``FFG (knee: s >= mean s)`` (:func:`knee_graft_config`) keeps the entries whose saliency reaches the expert's
mean saliency, the knee of its mass-vs-density curve (:mod:`benchmarks.quality.saliency`).
``FFG (data Fisher, per tensor)`` (tiers that measure a data Fisher) is ``FFG (per tensor)`` with the saliency
``F * tau**2`` of the expert's data Fisher ``F`` (the largest N measured) in place of Adam's ``v``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from mergekit_ota.compare.select import MIN_GAIN  # below this expert - base gap the gain ratio is noise: n/a

DENSITIES: Tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
AUTO_MASSES: Tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)  # density: auto's saliency masses grafted (sft tier)
AUTO = "FFG (auto)"
KNEE = "FFG (knee: s >= mean s)"  # density: auto's other candidate rule (benchmarks/quality/saliency.py), sft tier
SELECTORS: Tuple[str, ...] = ("FFG (per tensor)", "FFG (model-wide)", "magnitude (per tensor)", "random")
FISHER = "FFG (data Fisher, per tensor)"  # FFG's saliency from the expert's data Fisher (tiers that measure one)


def selectors_in(data: Dict[str, Any]) -> Tuple[str, ...]:
    """:data:`SELECTORS`, and :data:`FISHER` where the run grafted with it."""
    grafted = any(key.startswith("graft/") and f"/{FISHER}/" in key for key in data.get("models", {}))
    return SELECTORS + ((FISHER,) if grafted else ())


def graft_config(
    selector: str, base: str, expert: str, store: str, density: float, dtype: str = "float32"
) -> Dict[str, Any]:
    """The mergekit YAML dict grafting ``density`` of ``expert`` onto ``base`` with ``selector``."""
    parameters: Dict[str, Any] = {"weight": 1.0, "density": density}
    shared: Dict[str, Any] = {}
    if selector.startswith("FFG"):
        method = "ffg"
        parameters["curvature"] = store
        if selector == "FFG (model-wide)":
            shared["density_scope"] = "model"
    elif selector == "magnitude (per tensor)":
        method = "ties"
    elif selector == "random":
        method = "dare_linear"
        shared["rescale"] = False
    else:
        raise ValueError(f"unknown grafting selector {selector!r}; known: {SELECTORS + (FISHER,)}")
    config: Dict[str, Any] = {
        "merge_method": method,
        "base_model": base,
        "models": [{"model": expert, "parameters": parameters}],
    }
    if shared:
        config["parameters"] = shared
    config["dtype"] = dtype
    return config


def kept(score: float, expert: float, base: float) -> Dict[str, float]:
    """Fraction of the expert kept: ``score / expert`` and ``(score - base) / (expert - base)``.

    The second is NaN (n/a) unless the expert beats the base by at least ``MIN_GAIN``.
    """
    return {
        "ratio": score / expert if expert > 0 else float("nan"),
        "gain": (score - base) / (expert - base) if expert - base >= MIN_GAIN else float("nan"),
    }


def auto_graft_config(base: str, expert: str, store: str, mass: float, dtype: str = "float32") -> Dict[str, Any]:
    """The mergekit YAML dict grafting ``expert`` onto ``base`` with ``density: auto`` at saliency mass ``mass``."""
    return {
        "merge_method": "ffg",
        "base_model": base,
        "models": [{"model": expert, "parameters": {"weight": 1.0, "density": "auto", "curvature": store}}],
        "parameters": {"density_scope": "model", "saliency_mass": mass},
        "dtype": dtype,
    }


def knee_graft_config(base: str, expert: str, store: str, threshold: float, dtype: str = "float32") -> Dict[str, Any]:
    """The mergekit YAML dict grafting ``expert`` onto ``base`` keeping the entries with saliency ``>= threshold``."""
    return {
        "merge_method": "ffg",
        "base_model": base,
        "models": [{"model": expert, "parameters": {"weight": 1.0, "threshold": threshold, "curvature": store}}],
        "dtype": dtype,
    }


def plan(capabilities: List[str], densities: Tuple[float, ...] = DENSITIES) -> List[Tuple[str, str, float]]:
    """Every (capability, selector, density) graft to run."""
    return [(cap, selector, d) for cap in capabilities for selector in SELECTORS for d in densities]
