"""A run's per-item results, each method's grid point chosen on validation, and the best baseline (every tier).

The **headline score** of a capability is ``suite.headline[c]`` when the tier sets one (the full
tier: held-out loss, since its token accuracy saturates), else ``suite.metric[c]``. Per-item
results come from ``score_items``: exact match as 0/1 per item; token accuracy as (correct,
tokens) and loss as (nats, tokens) per row (:func:`stats.ratio_items`).

* **G** (gain kept) = mean over the *gain skills* of ``(score - base) / (expert - base)``: the
  capabilities whose expert beats the base by at least ``grafting.MIN_GAIN`` on validation (lower
  is better for a loss), since elsewhere the ratio divides by noise; pooled over seeds, the skills
  that are gain skills in every seed;
* each method's grid point is the one with the best validation ``G`` (first in grid order on ties);
* the **best baseline** is the baseline method whose chosen points have the highest validation
  ``G`` averaged over seeds.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from benchmarks.quality import grafting
from benchmarks.quality.tiers import Suite
from mergekit_ota.compare import stats

BASELINES: Tuple[str, ...] = ("ties", "dare_ties", "task_arithmetic", "linear", "breadcrumbs_ties")
LOWER_IS_BETTER = frozenset({"loss"})


def headline(suite: Suite, cap: str) -> str:
    """The score of ``cap`` that G is computed from (see the module docstring)."""
    return suite.headline.get(cap, suite.metric[cap])


def item_values(scores: Mapping[str, Any], metric: str, where: str = "") -> np.ndarray:
    """One model's per-item results on one capability (a ``score_items`` result) for ``metric``."""
    try:
        if metric == "exact_match":
            return stats.as_items(scores["items"])
        if metric == "token_accuracy":
            return stats.ratio_items(scores["row_correct"], scores["row_tokens"])
        if metric == "loss":
            return stats.ratio_items(scores["row_nats"], scores["row_tokens"])
    except KeyError as err:
        raise KeyError(
            f"{where}: no per-item {err.args[0]!r} in results.json (scored before per-row results were "
            "stored): delete that run's results.json entry or its work directory and rerun"
        ) from err
    raise ValueError(f"{where}: no per-item form of metric {metric!r}")


def seed_items(suite: Suite, data: Dict[str, Any], split: str) -> stats.Seed:
    """``{model key: {capability: items}}`` of every model scored on ``split`` for all capabilities (headline score)."""
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for key, record in data["models"].items():
        if split in record and all(cap in record[split] for cap in suite.capabilities):
            out[key] = {
                cap: item_values(record[split][cap], headline(suite, cap), f"{key} {split} {cap}")
                for cap in suite.capabilities
            }
    return out


def gain_skills(suite: Suite, data: Dict[str, Any], split: str = "val") -> List[str]:
    """The capabilities whose own expert beats the base by at least ``grafting.MIN_GAIN`` on ``split``."""
    items = seed_items(
        suite, {"models": {k: data["models"][k] for k in ("base", *map(stats.expert_key, suite.capabilities))}}, split
    )
    out = []
    for cap in suite.capabilities:
        better = stats.accuracy(items, stats.expert_key(cap), cap) - stats.accuracy(items, "base", cap)
        if (-better if headline(suite, cap) in LOWER_IS_BETTER else better) >= grafting.MIN_GAIN:
            out.append(cap)
    return out


def common_skills(runs: Sequence[Tuple[Suite, Dict[str, Any]]]) -> List[str]:
    """The gain skills of every run (in capability order): what a pooled G averages over."""
    each = [set(gain_skills(suite, data)) for suite, data in runs]
    return [cap for cap in runs[0][0].capabilities if all(cap in s for s in each)]


def finite(value: Optional[float]) -> float:
    """``value``, with None and NaN as minus infinity (for ordering)."""
    return -math.inf if value is None or math.isnan(value) else value


def choose(suite: Suite, data: Dict[str, Any], skills: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
    """Per method, its grid point with the best validation ``G`` over ``skills`` (default: this run's gain skills);
    each entry is the setting's dict plus ``val`` (its validation G)."""
    val = seed_items(suite, data, "val")
    skills = list(skills) if skills is not None else gain_skills(suite, data)
    best: Dict[str, Dict[str, Any]] = {}
    for setting in data.get("settings", []):
        g = stats.gain(val, setting["key"], skills) if skills else float("nan")
        current = best.get(setting["method"])
        if current is None or finite(g) > finite(current["val"]):
            best[setting["method"]] = {**setting, "val": g}
    return best


def best_baseline(choices: List[Dict[str, Dict[str, Any]]]) -> Optional[str]:
    """The baseline method with the highest mean validation ``G`` over seeds (its chosen points)."""
    present = [m for m in BASELINES if all(m in c for c in choices)]
    if not present:
        return None
    return max(present, key=lambda m: finite(float(np.mean([c[m]["val"] for c in choices]))))
