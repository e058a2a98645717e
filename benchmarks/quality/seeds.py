"""Seed-to-seed view of finished quality runs: ``quality-<tier>-seeds.md`` from each seed's results.

    python -m benchmarks.quality.seeds --tier quick --seeds 0 1 2

Reads, never computes: each seed's ``results.json`` as ``python -m benchmarks.quality.run
--tier T --seed N`` left it (run those first).  Per method, the test **G** of the grid point
chosen on validation in every seed (``paired.choose`` over the capabilities that are gain skills
in every seed), its mean and sample standard deviation over seeds and its rank in each seed;
then the paired differences from the best baseline, like for like and the curvature-scale
variants, pooled over seeds with the two-level bootstrap (``compare.Comparisons``); and per seed
the grafting gap FFG minus magnitude (mean over capabilities of score / expert score).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.quality import compare, paired, report, run, stats

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def load_seed(tier: str, seed: int, cache: str, smoke: bool = False) -> Dict[str, Any]:
    """``{"suite", "data", "chosen", "work"}`` of one seed's finished run (FileNotFoundError names the command)."""
    args = run.make_parser().parse_args(["--tier", tier, "--seed", str(seed), "--cache", cache] + ["--smoke"] * smoke)
    suite, name, work, _ = run.locate(args)
    path = os.path.join(work, "results.json")
    data: Dict[str, Any] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fp:
            data = json.load(fp)
    if "settings" not in data:  # written at the end of a run: absent in an unfinished one
        raise FileNotFoundError(
            f"{path}: no finished run of seed {seed}; run `python -m benchmarks.quality.run "
            f"--tier {tier}{' --smoke' if smoke else ''} --seed {seed}` first"
        )
    return {"suite": suite, "data": data, "work": work}


def markdown(tier: str, seeds: Sequence[int], runs: List[Dict[str, Any]]) -> str:
    """The seed-to-seed report (see the module docstring)."""
    skills = paired.common_skills([(r["suite"], r["data"]) for r in runs])
    choices = [paired.choose(r["suite"], r["data"], skills) for r in runs]
    tests = [paired.seed_items(r["suite"], r["data"], "test") for r in runs]
    table = compare.Comparisons(tests, choices, seeds, skills)
    out = [
        f"# Merge quality across training seeds: `{tier}` tier",
        "",
        f"Command: `python -m benchmarks.quality.seeds --tier {tier} --seeds {' '.join(map(str, seeds))}` after "
        f"`python -m benchmarks.quality.run --tier {tier} --seed N` for each seed (seed 0 is "
        f"[quality-{tier}.md](quality-{tier}.md), seed N is `quality-{tier}-seedN.md`). A seed changes the "
        "training data, initialisation and order, the held-out sample and mergekit's `random_seed`; settings "
        "and grids are the same.",
        "",
        report.headline_text(runs[0]["suite"], skills) + " in every seed. Test G of each method's grid point "
        "chosen on validation, per seed; mean and sample standard deviation over seeds; rank among the merge "
        "methods in each seed (1 = best).",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | ranks |",
        "|---|" + "---|" * (len(seeds) + 3),
    ]
    values = {m: [stats.gain(t, k, skills) for t, k in zip(tests, table.keys_of(m))] for m in table.methods}
    ranks: Dict[str, List[int]] = {m: [] for m in table.methods}
    for index in range(len(runs)):
        for position, method in enumerate(sorted(table.methods, key=lambda m: -paired.finite(values[m][index])), 1):
            ranks[method].append(position)
    for method in table.ranked():
        sd = statistics.stdev(values[method]) if len(runs) > 1 else float("nan")
        out.append(
            f"| {method} | "
            + " | ".join(compare.fmt(v) for v in values[method])
            + f" | **{compare.fmt(statistics.fmean(values[method]))}** | {compare.fmt(sd)} | "
            f"{', '.join(map(str, ranks[method]))} |"
        )
    out += [""] + table.sections(datas=[r["data"] for r in runs])
    out += [
        "",
        "## Grafting: FFG minus magnitude, seed by seed",
        "",
        "Mean over capabilities of score / expert score kept by grafting a fraction d of one expert's task "
        "vector, FFG (per tensor) minus magnitude (per tensor).",
        "",
    ]
    densities = runs[0]["data"]["densities"]
    out += ["| seed | " + " | ".join(f"d={d:g}" for d in densities) + " |", "|---|" + "---|" * len(densities)]
    for seed, r in zip(seeds, runs):
        curves = report.graft_curves(r["suite"], r["data"])
        ffg, magnitude = (
            report.mean_curve(curves, "FFG (per tensor)"),
            report.mean_curve(curves, "magnitude (per tensor)"),
        )
        out.append(f"| {seed} | " + " | ".join(f"{f - m:+.3f}" for f, m in zip(ffg, magnitude)) + " |")
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=("quick", "full"), default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="the seeds to compare (at least 2)")
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "quality"))
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--smoke", action="store_true", help="compare --smoke runs")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) < 2:
        parser.error("--seeds: give at least two different seeds")
    runs = [load_seed(args.tier, seed, args.cache, args.smoke) for seed in args.seeds]
    path = os.path.join(args.results, f"quality-{args.tier}{'-smoke' if args.smoke else ''}-seeds.md")
    os.makedirs(args.results, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(markdown(args.tier, args.seeds, runs))
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
