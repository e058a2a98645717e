"""Defaults chosen by their worst case: every candidate default's regret on every tier and variant.

    .venv/bin/python -m benchmarks.quality.regret      # -> benchmarks/results/quality-defaults.md

A user who cannot evaluate runs the defaults, so a default should lose little on *any* kind of experts,
not win most on one. For each question (``curvature_scale``, ``saliency_mass`` of ``density: auto`` in
merges, ``lambda``) and each candidate value ``c``:

* ``V(t, s, f, c)``: the validation gain kept ``G`` (``paired.py``) of method family ``f`` under ``c`` on
  tier or variant ``t``, training seed ``s``; **tuned** = at the grid point best on validation (what a user who
  tunes the other knobs gets), **at defaults** = at the grid point of the other knobs' defaults (``ota``:
  ``power 0.5, lambda 1``; ``density: auto``: ota's default ``saliency_mass``, ``lambda 1``);
* **regret** ``R(t, f, c) = mean_s [max_c' V(t, s, f, c') - V(t, s, f, c)]``: what choosing ``c`` costs against
  the best candidate in hindsight, in ``G`` (1 = every expert's own gain);
* the default is the candidate with the smallest **worst-case regret** ``max_{t, f} R(t, f, c)`` over the tiers
  where every candidate was measured.

Inputs: the quick tier and its variants (``tiers.QUICK_VARIANTS``; ``run.py --tier quick [--variant V] --seed S
--study defaults --stop-after merges``) from their cached ``results.json``; the ``sft`` and ``full`` tiers from the
validation G of every grid point that their committed reports print (``quality-sft.md``: 3 seeds;
``quality-full.md``: 1 seed), since their runs take hours each. Rules that need each expert's curvature
(``mean`` only where the experts' bias-corrected scales differ by more than a factor K) are evaluated where the
stores are cached: the quick tier and its variants.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from benchmarks.quality import merges
from benchmarks.quality.compare import fmt
from benchmarks.quality.run import REPO
from mergekit_ota.catalog import DEFAULT_OTA_SALIENCY_MASS

Grid = Dict[Tuple[str, str], float]  # (method, setting label) -> validation G

CACHED_RUNS: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("quick", "quick", None),
    ("quick-constant", "quick", "constant"),
    ("quick-lr", "quick", "lr"),
    ("sft-constant", "sft", "constant"),
)  # (name, tier, variant) of the runs read from their cache
SEEDS = (0, 1, 2)
REPORTS = (("sft", "quality-sft.md"), ("full", "quality-full.md"))
AUTO = merges.AUTO_MASS_METHOD.name
FAMILIES: Dict[str, str] = {"ota": "ota", "ota+FFG": "ota+ffg (model-wide)", "auto": AUTO}
SCALES: Dict[str, Optional[str]] = {
    "none": None,  # bias-corrected v as it is
    "raw": "no bias correction",
    "mean": "scale: mean",
    "median": "scale: median",
}
RULE_FACTORS = (10.0, 100.0)  # "mean where the corrected scales differ by more than K, else none"
DEFAULT_POINTS = {"ota": "p=0.5, λ=1", "auto": f"q={DEFAULT_OTA_SALIENCY_MASS:g}, λ=1"}  # the package's defaults


@dataclass
class Tier:
    """One tier or variant: per seed, every grid point's validation G and (quick family) each expert's scale."""

    name: str
    source: str
    grids: Dict[int, Grid] = field(default_factory=dict)
    scale_ratio: Dict[int, float] = field(default_factory=dict)  # seed -> max / min bias-corrected mean of v


def method_name(family: str, scale: str) -> str:
    """The benchmark's method name of ``family`` under ``curvature_scale`` candidate ``scale``."""
    label = SCALES[scale]
    base = FAMILIES[family]
    return base if label is None else merges.variant_name(base, label)


# --- inputs -----------------------------------------------------------------------------------------


def cached_tier(name: str, tier_name: str, variant: Optional[str], cache: str) -> Tier:
    """A tier (``variant``) from its cached seeds' ``results.json`` and curvature stores."""
    from benchmarks.quality import paired
    from benchmarks.quality.run import Pipeline, locate, make_parser
    from mergekit_ota.compare import stats

    command = f"run.py --tier {tier_name}{f' --variant {variant}' if variant else ''} --study defaults"
    tier = Tier(name, f"`{command}`")
    for seed in SEEDS:
        argv = ["--tier", tier_name, "--cache", cache, "--seed", str(seed)] + (
            ["--variant", variant] if variant else []
        )
        suite, _, work, base_dir = locate(make_parser().parse_args(argv))
        path = os.path.join(work, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
        if not data.get("settings"):
            continue  # still running
        skills = paired.gain_skills(suite, data)
        val = paired.seed_items(suite, data, "val")
        tier.grids[seed] = {(s["method"], s["label"]): stats.gain(val, s["key"], skills) for s in data["settings"]}
        pipeline = Pipeline(suite, work, base_dir)  # reads results.json; writes nothing unless a stage runs
        tier.scale_ratio[seed] = _scale_ratio([pipeline.store_path(cap, "full") for cap in suite.capabilities])
    return tier


def _scale_ratio(stores: Sequence[str]) -> float:
    """Max over min of the experts' bias-corrected mean ``v`` (``mean / (1 - beta2**step)``)."""
    from mergekit_ota.curvature.contents import inspect_store
    from mergekit_ota.curvature.store import CurvatureStore

    means = []
    for path in stores:
        scale = inspect_store(CurvatureStore(path), scale=True).scale
        means.append(scale.mean / (scale.bias_factor or 1.0))
    return max(means) / min(means)


_CELL = re.compile(r"^\s*([-+]?\d*\.\d+|n/a|-)\s*(?:/\s*([-+]?\d*\.\d+|n/a|-))?\s*$")


def report_tier(name: str, path: str) -> Tier:
    """A committed report's "Every grid point" table: validation G per seed (the sft report's ``val / test`` cells,
    one column per seed; the full report's ``val G`` column, seed 0)."""
    tier = Tier(name, f"`{os.path.relpath(path, REPO)}` (every grid point's validation G)")
    with open(path, encoding="utf-8") as fp:
        lines = fp.read().splitlines()
    start = next(i for i, line in enumerate(lines) if "Every grid point" in line)
    header = next(line for line in lines[start:] if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    seeds = [int(m.group(1)) for c in columns if (m := re.match(r"seed (\d+)", c))] or [0]
    first = 2  # method, setting
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for offset, seed in enumerate(seeds):
            match = _CELL.match(cells[first + offset])
            if match and match.group(1) not in ("n/a", "-"):
                tier.grids.setdefault(seed, {})[(cells[0], cells[1])] = float(match.group(1))
    return tier


def sft_mass_table(path: str) -> Dict[float, Dict[int, float]]:
    """The sft report's "Saliency mass in merges" table: ``{q: {seed: validation G at the best lambda}}``."""
    with open(path, encoding="utf-8") as fp:
        lines = fp.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Saliency mass in merges")), None)
    out: Dict[float, Dict[int, float]] = {}
    if start is None:
        return out
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[float(cells[0])] = {seed: float(v) for seed, v in enumerate(cells[1:4])}
    return out


# --- values and regrets -------------------------------------------------------------------------------


def value(grid: Grid, method: str, point: Optional[str] = None, where: Callable[[str], bool] = lambda _: True) -> float:
    """``V``: the method's best validation G over the grid points ``where`` accepts (``point``: that one point);
    NaN where the grid does not hold it."""
    if point is not None:
        return grid.get((method, point), float("nan"))
    values = [g for (m, label), g in grid.items() if m == method and where(label) and np.isfinite(g)]
    return max(values) if values else float("nan")


Values = Dict[int, Dict[str, float]]  # seed -> candidate -> V


def regrets(values: Values) -> Dict[str, float]:
    """``R(c)`` = mean over seeds of (best candidate's V - c's V); NaN where a seed lacks a candidate's V."""
    out: Dict[str, List[float]] = {}
    for per_candidate in values.values():
        best = max(per_candidate.values())
        for candidate, v in per_candidate.items():
            out.setdefault(candidate, []).append(best - v)
    return {c: float(np.mean(r)) for c, r in out.items()}


def scale_values(tier: Tier, family: str, point: Optional[str]) -> Values:
    """``V`` of every ``curvature_scale`` candidate (and, where the scales are known, the K rules) per seed."""
    out: Values = {}
    for seed, grid in tier.grids.items():
        per = {scale: value(grid, method_name(family, scale), point) for scale in SCALES}
        if any(np.isnan(v) for v in per.values()):
            continue
        if seed in tier.scale_ratio:
            for k in RULE_FACTORS:
                per[rule_name(k)] = per["mean"] if tier.scale_ratio[seed] > k else per["none"]
        out[seed] = per
    return out


def rule_name(k: float) -> str:
    return f"mean if scales differ > {k:g}x"


def mass_values(tier: Tier, scale: str) -> Values:
    """``V`` of each ``saliency_mass`` q of ``density: auto`` in merges (lambda tuned), under ``scale``."""
    method = method_name("auto", scale)
    out: Values = {}
    for seed, grid in tier.grids.items():
        per = {
            f"{q:g}": value(grid, method, where=lambda label, q=q: label.startswith(f"q={q:g},"))
            for q in merges.AUTO_MASSES
        }
        if not any(np.isnan(v) for v in per.values()):
            out[seed] = per
    return out


def lambda_values(tier: Tier, family: str, scale: str) -> Values:
    """``V`` of each lambda of the family's grid (the other knobs tuned; ``auto``: q at the default)."""
    method = method_name(family, scale)
    lambdas = merges.MEAN_LAMBDAS
    out: Values = {}
    for seed, grid in tier.grids.items():
        per = {}
        for lam in lambdas:
            suffix = f"λ={lam:g}"

            def where(label: str, suffix: str = suffix) -> bool:
                return label.endswith(suffix) and (
                    family != "auto" or label == f"q={DEFAULT_OTA_SALIENCY_MASS:g}, {suffix}"
                )

            per[f"{lam:g}"] = value(grid, method, where=where)
        if not any(np.isnan(v) for v in per.values()):
            out[seed] = per
    return out


# --- report -------------------------------------------------------------------------------------------


@dataclass
class Table:
    """Regrets of candidates (rows) over columns (tier x family), with each candidate's worst case."""

    title: str
    columns: List[str] = field(default_factory=list)
    cells: Dict[str, Dict[str, float]] = field(default_factory=dict)  # candidate -> column -> R
    seeds: Dict[str, int] = field(default_factory=dict)

    def add(self, column: str, values: Values) -> None:
        if not values:
            return
        self.columns.append(column)
        self.seeds[column] = len(values)
        for candidate, r in regrets(values).items():
            self.cells.setdefault(candidate, {})[column] = r

    def complete(self) -> List[str]:
        """Candidates measured in every column."""
        return [c for c, row in self.cells.items() if all(col in row for col in self.columns)]

    def worst(self, candidate: str) -> Tuple[float, str]:
        row = self.cells[candidate]
        column = max(row, key=lambda col: row[col])
        return row[column], column

    def choice(self) -> Optional[str]:
        complete = self.complete()
        return min(complete, key=lambda c: self.worst(c)[0]) if complete else None

    def by_tier(self, tiers: Sequence[str]) -> "Table":
        """The same regrets with each tier's columns (``"<tier> <family>"``) folded into their largest."""
        folded = Table(f"{self.title}, worst over families per tier")
        for tier in tiers:
            columns = [c for c in self.columns if c.rsplit(" ", 1)[0] == tier]
            if not columns:
                continue
            folded.columns.append(tier)
            folded.seeds[tier] = min(self.seeds[c] for c in columns)
            for candidate, row in self.cells.items():
                present = [row[c] for c in columns if c in row]
                if present:
                    folded.cells.setdefault(candidate, {})[tier] = max(present)
        return folded

    def lines(self) -> List[str]:
        if not self.columns:
            return []
        out = [f"### {self.title}", "", "| candidate | " + " | ".join(self.columns) + " | worst case |"]
        out.append("|---|" + "---|" * (len(self.columns) + 1))
        out.append("| seeds | " + " | ".join(str(self.seeds[c]) for c in self.columns) + " | |")
        for candidate, row in self.cells.items():
            cells = [fmt(row[c]) if c in row else "n/a" for c in self.columns]
            worst, where = self.worst(candidate)
            partial = "" if candidate in self.complete() else " (measured columns only)"
            out.append(f"| {candidate} | " + " | ".join(cells) + f" | {fmt(worst)} ({where}){partial} |")
        choice = self.choice()
        if choice is not None:
            worst, where = self.worst(choice)
            out += ["", f"Smallest worst-case regret over every column: **{choice}** ({fmt(worst)}, on {where})."]
        return out + [""]


def build(cache: str, results: str) -> Tuple[List[Tier], Dict[str, Table], Dict[float, Dict[int, float]]]:
    tiers = [cached_tier(name, tier, variant, cache) for name, tier, variant in CACHED_RUNS]
    tiers = [t for t in tiers if t.grids] + [report_tier(name, os.path.join(results, f)) for name, f in REPORTS]
    tables: Dict[str, Table] = {}
    for view, points in (("tuned", {}), ("at defaults", DEFAULT_POINTS)):
        table = Table(f"`curvature_scale`, {view}")
        for family in FAMILIES:
            if view == "at defaults" and family not in points:
                continue
            for tier in tiers:
                table.add(f"{tier.name} {family}", scale_values(tier, family, points.get(family)))
        tables[f"scale {view}"] = table
    scale_choice = tables["scale tuned"].choice() or "none"
    chosen = scale_choice if scale_choice in SCALES else "mean"
    for scale in SCALES:
        table = Table(f"`saliency_mass` of `density: auto` in merges (λ tuned), `curvature_scale: {scale}`")
        for tier in tiers:
            table.add(tier.name, mass_values(tier, scale))
        tables[f"mass {scale}"] = table
    table = Table(f"`lambda` (other knobs tuned; auto at the default q), `curvature_scale: {chosen}`")
    for family in FAMILIES:
        for tier in tiers:
            table.add(f"{tier.name} {family}", lambda_values(tier, family, chosen))
    tables["lambda"] = table
    return tiers, tables, sft_mass_table(os.path.join(results, "quality-sft.md"))


def write(
    tiers: Sequence[Tier], tables: Mapping[str, Table], sft_mass: Mapping[float, Mapping[int, float]], path: str
) -> None:
    lines = [
        "# Defaults by their worst case",
        "",
        "Generated by `python -m benchmarks.quality.regret` (see its docstring for the definitions). Regret = the best "
        "candidate's validation gain kept G minus this candidate's, mean over seeds, per tier/variant and method "
        "family; the worst case is the largest regret over the columns; lower is better, 0 = never beaten.",
        "",
        "Tiers and variants:",
        "",
    ]
    for tier in tiers:
        ratios = ", ".join(f"seed {s}: {r:.3g}x" for s, r in sorted(tier.scale_ratio.items()))
        spread = f"; experts' bias-corrected mean v, max/min: {ratios}" if ratios else ""
        lines.append(f"- **{tier.name}**: seeds {sorted(tier.grids)} from {tier.source}{spread}")
    lines += ["", "Families: `ota` (p x λ grid), `ota+FFG` (model-wide density x λ), `auto` (`density: auto`, q x λ)."]
    lines += ["", "## Summary: `curvature_scale` per tier (tuned; the largest regret over the families)", ""]
    lines += tables["scale tuned"].by_tier([t.name for t in tiers]).lines()
    lines += ["## Regret tables", ""]
    for table in tables.values():
        lines += table.lines()
    if sft_mass:
        per_seed = {seed: {f"{q:g}": g[seed] for q, g in sft_mass.items()} for seed in next(iter(sft_mass.values()))}
        text = ", ".join(f"q={q}: {fmt(r)}" for q, r in regrets(per_seed).items())
        lines += [
            "The sft tier's saliency masses in merges (its report's table, `curvature_scale: none`, best λ per mass), "
            f"regret: {text}.",
            "",
        ]
    with open(path, "w", encoding="utf-8") as fp:
        fp.write("\n".join(lines))


def main(argv: Optional[List[str]] = None) -> Dict[str, Table]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "quality"))
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    tiers, tables, sft_mass = build(args.cache, args.results)
    path = os.path.join(args.results, "quality-defaults.md")
    write(tiers, tables, sft_mass, path)
    print(path)
    for key, table in tables.items():
        print(f"{key}: {table.choice()}")
    return dict(tables)


if __name__ == "__main__":
    main()
