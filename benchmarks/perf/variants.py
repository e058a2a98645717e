"""The merge configurations the benchmark compares (one mergekit config per variant)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from benchmarks.perf.models import CachedFamily

DENSITY = 0.2  # ties, dare_ties and FFG keep 20 % of each task vector


@dataclass(frozen=True)
class Variant:
    """One method with its parameters; ``curvature`` says which store ``ota``/``ffg`` read."""

    id: str
    label: str
    method: str
    per_expert: Dict[str, Any] = field(default_factory=dict)
    shared: Dict[str, Any] = field(default_factory=dict)
    curvature: str = "none"  # "none" | "full" | "rank1"
    with_base: bool = True

    def config(self, family: CachedFamily, n_experts: int) -> Dict[str, Any]:
        """The mergekit configuration (a dict for ``MergeConfiguration``) merging the first ``n_experts``."""
        models = []
        for index in range(n_experts):
            parameters = dict(self.per_expert)
            if self.curvature == "rank1":
                parameters["curvature"] = family.store(index, rank1=True)
            models.append({"model": family.expert(index), "parameters": parameters})
        config: Dict[str, Any] = {"merge_method": self.method, "dtype": "float32", "models": models}
        if self.with_base:
            config["base_model"] = family.base
        if self.shared:
            config["parameters"] = dict(self.shared)
        return config


VARIANTS: Dict[str, Variant] = {
    v.id: v
    for v in (
        Variant("task_arithmetic", "task_arithmetic", "task_arithmetic", {"weight": 1.0}),
        Variant("ota", "ota (full curvature; default curvature_scale: mean)", "ota", curvature="full"),
        Variant(
            "ota_scale_none", "ota, curvature_scale: none", "ota", shared={"curvature_scale": "none"}, curvature="full"
        ),
        Variant("ota_rank1", "ota (rank-1 curvature)", "ota", curvature="rank1"),
        Variant(
            "ota_scale_median",
            "ota, curvature_scale: median",
            "ota",
            shared={"curvature_scale": "median"},
            curvature="full",
        ),
        Variant("ota_ffg_tensor", "ota + FFG, per-tensor density", "ota", {"density": DENSITY}, curvature="full"),
        Variant(
            "ota_ffg_model",
            "ota + FFG, model-wide density",
            "ota",
            {"density": DENSITY},
            {"density_scope": "model"},
            curvature="full",
        ),
        Variant(
            "ota_ffg_model_consensus",
            "ota + FFG, model-wide density, sign consensus",
            "ota",
            {"density": DENSITY},
            {"density_scope": "model", "sign_consensus": "sum"},
            curvature="full",
        ),
        Variant("ffg", "ffg", "ffg", {"density": DENSITY}, curvature="full"),
        Variant("dare_ties", "dare_ties", "dare_ties", {"weight": 1.0, "density": DENSITY}),
        Variant("ties", "ties", "ties", {"weight": 1.0, "density": DENSITY}),
        Variant("linear", "linear (experts only)", "linear", {"weight": 1.0}, with_base=False),
    )
}
REFERENCE = "task_arithmetic"
# At the largest size with more experts, only these run by default (expert-count scaling).
SCALING_VARIANTS = ("task_arithmetic", "ota", "ffg")
SMOKE_VARIANTS = ("task_arithmetic", "ota", "ffg")


def parse_variants(text: Optional[str]) -> tuple:
    """Variant ids from a comma-separated ``--methods`` value (all when empty)."""
    if not text:
        return tuple(VARIANTS)
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [i for i in ids if i not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return ids
