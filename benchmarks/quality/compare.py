"""Paired comparisons of merge methods over one or more training seeds, and the report tables they fill.

Shared by every tier's report (``report.py`` for one seed of quick/full, ``seeds.py`` pooled over
quick/full seeds, ``report_sft.py``). The numbers come from ``stats.py`` on test items:
``G`` of each method at its grid point chosen on validation (``paired.choose``), differences
from the best baseline (``paired.best_baseline``), like-for-like pairs and the curvature-scale
variants; every interval a 95% paired bootstrap, pooled over seeds with the two-level bootstrap
(seeds, then items within seed) and per seed over items only. **win**/**loss** only where the
pooled interval excludes 0, else **tie**.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks.quality import merges
from benchmarks.quality.paired import best_baseline, finite
from mergekit_ota.compare import stats

REPLICATES = 4000
# (ours, theirs): the same way of combining, with FFG/curvature instead of magnitude/uniform
LIKE_FOR_LIKE: Tuple[Tuple[str, str], ...] = (
    ("ota+ffg (per tensor)", "ties"),
    ("ffg", "task_arithmetic"),
    ("ota", "linear"),
    ("ffg (sign consensus)", "ties"),
    ("ota+ffg (model-wide, sign consensus)", "ota+ffg (model-wide)"),
    ("ota (no base)", "linear"),
    (merges.AUTO_METHOD, "ota+ffg (model-wide)"),
)


def is_ours(method: str) -> bool:
    """Whether a compared method is one of this package's (ota/ffg variants)."""
    return method.startswith(("ota", "ffg"))


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def est(estimate: stats.Estimate, signed: bool = False) -> str:
    """``value [low, high]``, or n/a where any is undefined."""
    if any(math.isnan(v) for v in (estimate.value, estimate.low, estimate.high)):
        return "n/a"
    return estimate.text(signed=signed)


class Comparisons:
    """The test items of each seed, each seed's choices, and the skills ``G`` averages over.

    ``tests[s]`` is seed ``s``'s :data:`stats.Seed` on test; ``choices[s]`` its ``paired.choose``.
    Each call draws its bootstrap from its own fixed random seed (the call's position), so a
    report is reproducible.
    """

    def __init__(
        self,
        tests: Sequence[stats.Seed],
        choices: Sequence[Dict[str, Dict]],
        seeds: Sequence[int],
        skills: Sequence[str],
    ):
        self.tests, self.choices, self.seeds, self.skills = list(tests), list(choices), list(seeds), list(skills)
        self.methods = [m for m in self.choices[0] if all(m in c for c in self.choices)]
        self.reference = best_baseline(self.choices)
        self._calls = 0

    def keys_of(self, method: str) -> List[str]:
        return [c[method]["key"] for c in self.choices]

    def gain(self, keys: Sequence[str]) -> stats.Comparison:
        self._calls += 1
        return stats.gain_estimate(self.tests, keys, self.skills, REPLICATES, random_seed=self._calls)

    def diff(self, a: Sequence[str], b: Sequence[str]) -> stats.Comparison:
        self._calls += 1
        return stats.compare(self.tests, "", "", self.skills, REPLICATES, random_seed=self._calls, keys=list(zip(a, b)))

    def ranked(self) -> List[str]:
        """The methods by mean test G over seeds, best first."""

        def mean(m: str) -> float:
            return finite(float(np.mean([stats.gain(t, k, self.skills) for t, k in zip(self.tests, self.keys_of(m))])))

        return sorted(self.methods, key=lambda m: -mean(m))

    def mean_val(self, method: str) -> float:
        return float(np.mean([c[method]["val"] for c in self.choices]))

    def columns(self, what: str) -> List[str]:
        if len(self.seeds) == 1:
            return [f"| {what} | diff [95%] | verdict |", "|---|---|---|"]
        return [
            f"| {what} | pooled diff [95%] | verdict | " + " | ".join(f"seed {s} [95%]" for s in self.seeds) + " |",
            "|---|---|---|" + "---|" * len(self.seeds),
        ]

    def row(self, label: str, d: stats.Comparison) -> str:
        per_seed = (
            "" if len(self.seeds) == 1 else " " + " | ".join(f"{est(e, True)} ({e.verdict})" for e in d.per_seed) + " |"
        )
        return f"| {label} | {est(d.pooled, True)} | {d.pooled.verdict} |{per_seed}"

    def sections(self, extra: Sequence[Tuple[str, str]] = (), datas: Sequence[Dict] = ()) -> List[str]:
        """Markdown: differences from the best baseline, like-for-like pairs, rank-1 vs full, curvature scale,
        data Fisher.

        ``extra``: (label, model key present in every seed) rows compared with the best baseline too
        (the multi-task reference). ``datas``: each seed's results, for the data Fisher measurements.
        """
        out: List[str] = []
        pooled = "pooled over seeds (two-level bootstrap: seeds, then items within seed) and per seed (items only)"
        scope = pooled if len(self.seeds) > 1 else f"over the test items of seed {self.seeds[0]} (item bootstrap)"
        verdicts: Dict[str, List[str]] = {"win": [], "tie": [], "loss": []}
        ranked = self.ranked()
        if self.reference:
            out += [
                "## Paired differences",
                "",
                f"Best baseline on validation: **{self.reference}** (mean validation G "
                f"{fmt(self.mean_val(self.reference))}). "
                f"Difference in test G of each method minus it, {scope}; **win**/**loss** only where the "
                f"{'pooled ' if len(self.seeds) > 1 else ''}interval excludes 0, else tie.",
                "",
            ]
            out += self.columns("method")
            for method in ranked:
                if method == self.reference:
                    continue
                d = self.diff(self.keys_of(method), self.keys_of(self.reference))
                if is_ours(method):
                    verdicts[d.pooled.verdict].append(method)
                out.append(self.row(method, d))
            for label, key in extra:
                out.append(self.row(label, self.diff([key] * len(self.seeds), self.keys_of(self.reference))))
            out += [
                "",
                f"OTA/FFG against {self.reference}"
                + (", pooled over seeds" if len(self.seeds) > 1 else "")
                + ": "
                + "; ".join(f"{v}: {', '.join(ms) if ms else 'none'}" for v, ms in verdicts.items())
                + ".",
            ]
        pairs = [(a, b) for a, b in LIKE_FOR_LIKE if a in self.methods and b in self.methods]
        if "ota" in self.methods and "ota (rank-1 curvature)" in self.methods:
            pairs.append(("ota (rank-1 curvature)", "ota"))
        if pairs:
            out += [
                "",
                "Like for like (FFG/curvature instead of magnitude/uniform) and rank-1 against full curvature:",
                "",
            ]
            out += self.columns("comparison")
            out += [self.row(f"{a} - {b}", self.diff(self.keys_of(a), self.keys_of(b))) for a, b in pairs]
        return out + self.scale_section() + self.fisher_section(datas)

    def fisher_section(self, datas: Sequence[Dict]) -> List[str]:
        """Data Fisher: ``ota (data Fisher, N=n)`` against ``ota`` (Adam's v), and what the measurement found
        (Spearman with Adam's v per tensor, scale, seconds per expert against the export's)."""
        methods = [m for m in self.methods if m.startswith("ota (data Fisher") and "ota" in self.methods]
        if not methods:
            return []
        out = [
            "",
            "## Data Fisher instead of Adam's exp_avg_sq",
            "",
            "`ota (data Fisher, N=n)`: ota (same grid) on each expert's diagonal Fisher, the mean over mini-batches "
            "of the squared gradient of the mean answer loss, measured on the first n of the expert's own "
            "training rows (batch 8; `benchmarks/quality/fisher.py`, the estimator of `mergekit-ota fisher`), "
            "instead of the `exp_avg_sq` its optimizer left. Test G minus ota's on Adam's `v` with the same "
            "`curvature_scale` (`none`, or the default `mean`), each at its own validation-chosen grid point:",
            "",
        ]
        out += self.columns("comparison")
        for m in methods:
            adam = "ota (scale: mean)" if m.endswith("scale: mean)") else "ota"
            if adam in self.methods:
                out.append(self.row(f"{m} - {adam}", self.diff(self.keys_of(m), self.keys_of(adam))))
        measured = [d.get("fisher", {}) for d in datas]
        keys = list(dict.fromkeys(k for m in measured for k in m))
        if keys:
            out += [
                "",
                "The measurement, per expert (mean over seeds): Spearman's rank correlation of the Fisher with the "
                "expert's bias-corrected Adam `v`, per tensor (median [min, max]); scale, sum(F) / sum(v "
                "corrected); seconds for the Fisher (model load included) against the export of the Adam store.",
                "",
                "| expert / n | Spearman per tensor: median [min, max] | scale | Fisher s | export s |",
                "|---|---|---|---|---|",
            ]
            for key in keys:
                rows = [m[key] for m in measured if key in m]
                cap = key.split("/")[0]
                export = [d.get("export", {}).get(f"{cap}/full", {}).get("seconds") for d in datas]
                export = [e for e in export if e]

                def mean(field: str, rows: List[Dict] = rows) -> float:
                    values = [r[field] for r in rows if r.get(field) is not None]
                    return float(np.mean(values)) if values else math.nan

                out.append(
                    f"| {key} | {fmt(mean('median'))} [{fmt(mean('min'))}, {fmt(mean('max'))}] | "
                    f"{mean('scale'):.3g} | {fmt(mean('seconds'), 1)} | "
                    f"{fmt(float(np.mean(export)) if export else math.nan, 2)} |"
                )
        return out

    def scale_section(self) -> List[str]:
        """Curvature on one scale: each variant against its default (bias-corrected, no normalisation), and the
        ``curvature_scale`` that validation picks for each of ``ota`` and ``ota+ffg (model-wide)``."""
        variants = [m for m in self.methods if merges.variant_of(m) in self.methods]
        if not variants:
            return []
        out = [
            "",
            "## Curvature on one scale",
            "",
            "Each variant minus its default (`bias_correction: auto`, which corrects every expert here since every "
            "store records its step and beta2, and `curvature_scale: none`), test G, each method at its own "
            "validation-chosen grid point.",
            "",
        ]
        out += self.columns("comparison")
        for variant in variants:
            d = self.diff(self.keys_of(variant), self.keys_of(merges.variant_of(variant)))
            out.append(self.row(f"{variant} - {merges.variant_of(variant)}", d))
        for default in dict.fromkeys(merges.variant_of(v) for v in variants):
            options = {
                "none": default,
                **{
                    v.split("scale: ")[1].rstrip(")"): v
                    for v in variants
                    if merges.variant_of(v) == default and "scale: " in v
                },
            }
            val = {k: self.mean_val(m) for k, m in options.items()}
            pick = max(val, key=lambda k: finite(val[k]))
            out += [
                "",
                f"`curvature_scale` for {default}, by {'mean ' if len(self.seeds) > 1 else ''}validation G"
                f"{' over seeds' if len(self.seeds) > 1 else ''}: "
                + ", ".join(f"{k} {fmt(v)}" for k, v in val.items())
                + f": validation picks **{pick}**.",
            ]
        return out
