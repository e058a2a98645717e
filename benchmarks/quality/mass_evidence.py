"""Does one saliency mass predict how much of an expert a graft keeps, across experts, seeds and tiers?

``python -m benchmarks.quality.mass_evidence`` reads every finished quality run in the cache (quick and sft at
seeds 0-2, full at seed 0: whatever ``python -m benchmarks.quality.run`` left), and for each FFG graft of each
run's grafting curves (one expert, ``FFG (per tensor)`` and ``FFG (model-wide)`` at each density) puts two
numbers side by side:

* the **gain kept** on test, ``(graft - base) / (expert - base)`` on the expert's own skill
  (:func:`benchmarks.quality.grafting.kept`; undefined where the expert does not beat the base);
* the **saliency mass kept**, the share of the expert's ``sum(v * tau**2)`` that graft's mask keeps
  (:func:`benchmarks.quality.saliency.graft_masses`: one read of base, expert and store per expert).

It writes ``benchmarks/results/quality-saliency-mass.md`` (a table of gain kept by band of mass kept, per tier)
and ``quality-saliency-mass.png`` (the scatter). Nothing is trained, merged or scored: it describes results
that exist, and chooses nothing (``density: auto``'s default was chosen on validation, in the sft report).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.quality import report, run, saliency
from benchmarks.quality.train import checkpoint_of

RUNS: Tuple[Tuple[str, int], ...] = (
    ("quick", 0),
    ("quick", 1),
    ("quick", 2),
    ("full", 0),
    ("sft", 0),
    ("sft", 1),
    ("sft", 2),
)
SELECTORS = ("FFG (per tensor)", "FFG (model-wide)")
BANDS: Tuple[Tuple[float, float], ...] = ((0.0, 0.5), (0.5, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 0.99), (0.99, 1.0001))
OUT = os.path.join(run.REPO, "benchmarks", "results")


def _stores(pipeline: run.Pipeline, cap: str) -> str:
    """The full curvature store :meth:`run.Pipeline.curvature` exported for ``cap`` (same rule, no export)."""
    if pipeline.suite.run_key is not None:
        return os.path.join(pipeline.run_dir(cap), "curvature-full.safetensors")
    return os.path.join(pipeline.work, "curvature", f"{cap}-full.safetensors")


def points(tier: str, seed: int, cache: str) -> List[Dict[str, Any]]:
    """One row per FFG graft of the run ``(tier, seed)``: expert, selector, density, mass kept, gain kept (test)."""
    argv = ["--tier", tier, "--cache", cache] + (["--seed", str(seed)] if seed else [])
    suite, _, work, base_dir = run.locate(run.make_parser().parse_args(argv))
    path = os.path.join(work, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fp:
        data = json.load(fp)
    if not data.get("densities"):
        return []
    pipeline = run.Pipeline(suite, work, base_dir)  # reads results.json; writes nothing unless a stage runs
    base, _ = suite.build_base(base_dir, "cpu")
    curves = report.graft_curves(suite, data)
    out = []
    for cap in suite.capabilities:
        expert = checkpoint_of(pipeline.run_dir(cap), suite.settings_of(cap).steps)
        found = saliency.model_saliency(base, expert, _stores(pipeline, cap), data["densities"])
        for d, kept in zip(data["densities"], zip(*(curves[s][cap] for s in SELECTORS))):
            masses = saliency.graft_masses(found, d)
            for selector, point in zip(SELECTORS, kept):
                out.append(
                    {
                        "tier": tier,
                        "seed": seed,
                        "expert": cap,
                        "selector": selector,
                        "density": d,
                        "mass": masses[selector],
                        "gain": point["gain"],
                        "ratio": point["ratio"],
                    }
                )
    return out


def band_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Gain kept (mean [min, max], count) per tier and band of saliency mass kept."""
    tiers = list(dict.fromkeys(r["tier"] for r in rows))
    lines = [
        "| saliency mass kept | " + " | ".join(f"{t}: gain kept mean [min, max] (n)" for t in tiers) + " |",
        "|---|" + "---|" * len(tiers),
    ]
    for low, high in BANDS:
        cells = []
        for tier in tiers:
            gains = [
                r["gain"] for r in rows if r["tier"] == tier and low <= r["mass"] < high and not math.isnan(r["gain"])
            ]
            cells.append(f"{np.mean(gains):.3f} [{min(gains):.3f}, {max(gains):.3f}] ({len(gains)})" if gains else "-")
        label = f"[{low:g}, {min(high, 1.0):g}]" if high > 1.0 else f"[{low:g}, {high:g})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    """Gain kept against saliency mass kept, one colour per tier, one marker per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"quick": "C0", "full": "C2", "sft": "C3"}
    markers = {"FFG (per tensor)": "o", "FFG (model-wide)": "s"}
    for tier in dict.fromkeys(r["tier"] for r in rows):
        for selector, marker in markers.items():
            chosen = [r for r in rows if r["tier"] == tier and r["selector"] == selector and not math.isnan(r["gain"])]
            ax.scatter(
                [r["mass"] for r in chosen],
                [r["gain"] for r in chosen],
                s=14,
                marker=marker,
                color=colours.get(tier, "C7"),
                alpha=0.7,
                label=f"{tier}, {selector}",
            )
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("share of the expert's saliency mass the graft keeps")
    ax.set_ylabel("gain kept (test)")
    ax.set_ylim(-0.2, 1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(rows: List[Dict[str, Any]], mass: float) -> str:
    """The lowest gain kept, per tier, by the grafts that keep at least ``mass`` of their saliency."""
    parts = []
    for tier in dict.fromkeys(r["tier"] for r in rows):
        above = [r for r in rows if r["tier"] == tier and r["mass"] >= mass and not math.isnan(r["gain"])]
        if not above:
            parts.append(f"{tier}: none")
            continue
        worst = min(above, key=lambda r: r["gain"])
        parts.append(
            f"{tier}: {len(above)} grafts, lowest gain kept {worst['gain']:.3f} (seed {worst['seed']}, "
            f"{worst['expert']}, {worst['selector']} at d = {worst['density']:g}, mass {worst['mass']:.3f})"
        )
    return f"Grafts keeping >= {mass:g} of their saliency mass: " + "; ".join(parts) + "."


def expert_table(rows: List[Dict[str, Any]], mass: float) -> List[str]:
    """Per tier and expert: the lowest gain kept by its grafts keeping at least ``mass`` of the saliency mass."""
    lines = [
        f"| tier | expert | grafts keeping >= {mass:g} of the mass | lowest gain kept | mean gain kept |",
        "|---|---|---|---|---|",
    ]
    for tier in dict.fromkeys(r["tier"] for r in rows):
        for expert in dict.fromkeys(r["expert"] for r in rows if r["tier"] == tier):
            gains = [
                r["gain"]
                for r in rows
                if r["tier"] == tier and r["expert"] == expert and r["mass"] >= mass and not math.isnan(r["gain"])
            ]
            if gains:
                lines.append(f"| {tier} | {expert} | {len(gains)} | {min(gains):.3f} | {np.mean(gains):.3f} |")
    return lines


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=os.path.join(run.REPO, "benchmarks", ".cache", "quality"))
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = [row for tier, seed in RUNS for row in points(tier, seed, args.cache)]
    if not rows:
        raise SystemExit(f"no finished quality run with grafting curves under {args.cache}")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "quality-saliency-mass.png")
    plot(rows, png)
    runs = sorted({(r["tier"], r["seed"]) for r in rows}, key=lambda x: (["quick", "full", "sft"].index(x[0]), x[1]))
    lines = [
        "# Saliency mass kept against gain kept, every FFG graft of every tier",
        "",
        f"Generated by `python -m benchmarks.quality.mass_evidence` on {time.strftime('%Y-%m-%d %H:%M')} UTC "
        f"({time.perf_counter() - started:.0f} s). Do not edit by hand: rerun the command.",
        "",
        __doc__.split("\n\n", 1)[1].split("It writes")[0].strip(),
        "",
        "Runs: " + ", ".join(f"{t} seed {s}" for t, s in runs) + f"; {len(rows)} grafts.",
        "",
        f"![gain kept against saliency mass kept]({os.path.basename(png)})",
        "",
    ]
    lines += band_table(rows) + [""]
    lines += [f"- {verdict(rows, mass)}" for mass in (0.9, 0.95, 0.99)] + [""]
    lines += ["Per expert, the grafts keeping at least 0.95 of the expert's saliency mass:", ""]
    lines += expert_table(rows, 0.95) + [""]
    path = os.path.join(args.out, "quality-saliency-mass.md")
    with open(path, "w", encoding="utf-8") as fp:
        fp.write("\n".join(lines))
    with open(os.path.join(args.cache, "saliency-mass-points.json"), "w", encoding="utf-8") as fp:
        json.dump(rows, fp, indent=1)
    print(path)
    return path


if __name__ == "__main__":
    main()
