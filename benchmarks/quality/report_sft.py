"""``quality-sft.md`` (and its grafting plot) from the seeds' ``results.json``: no hand-typed numbers.

Everything is computed from per-item correctness (``score_items``' ``items``) with
``stats.py``:

* **gain kept** ``G`` = mean over skills of ``(acc - base) / (expert - base)``;
* each method's grid point is chosen per seed on validation ``G``; the **best baseline** is the
  baseline method (TIES, DARE-TIES, task arithmetic, linear, breadcrumbs) whose chosen points have
  the highest validation ``G`` averaged over seeds;
* every interval is a 95% paired bootstrap on test items: per seed over items, pooled over
  seeds then items (two-level); win / loss only where the interval excludes 0, else tie;
* **interference**: ``G`` of task arithmetic and linear at their best validation setting; the
  tier counts only where the better of the two keeps at most :data:`INTERFERENCE_LIMIT`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks.quality import compare, grafting, merges, report
from benchmarks.quality.compare import est as _est
from benchmarks.quality.compare import fmt as _fmt
from benchmarks.quality.paired import choose, gain_skills, seed_items
from benchmarks.quality.paired import finite as _finite
from benchmarks.quality.tiers import Suite
from mergekit_ota.catalog import DEFAULT_SALIENCY_MASS
from mergekit_ota.compare import stats

INTERFERENCE_LIMIT = 0.85
BASE_MAX, EXPERT_MIN = 0.2, 0.7  # the tier's criteria on held-out test items

Run = Tuple[int, Suite, Dict[str, Any]]  # (seed, suite, results.json data)


def _criteria(runs: List[Run]) -> List[str]:
    out = [
        "| seed | skill | base | expert | multitask | base < %g | expert >= %g |" % (BASE_MAX, EXPERT_MIN),
        "|---|---|---|---|---|---|---|",
    ]
    for seed, suite, data in runs:
        test = seed_items(suite, data, "test")
        for cap in suite.capabilities:
            base = stats.accuracy(test, "base", cap)
            expert = stats.accuracy(test, stats.expert_key(cap), cap)
            multi = _fmt(stats.accuracy(test, "multitask", cap)) if "multitask" in test else ""
            out.append(
                f"| {seed} | {cap} | {base:.3f} | {expert:.3f} | {multi} | {'yes' if base < BASE_MAX else '**no**'} | "
                f"{'yes' if expert >= EXPERT_MIN else '**no**'} |"
            )
    return out


def _training(runs: List[Run]) -> List[str]:
    out = ["| seed | run | steps | s/step (median) | seconds | train loss first -> last |", "|---|---|---|---|---|---|"]
    for seed, _, data in runs:
        for key, info in data.get("training", {}).items():
            if key == "base":
                continue
            out.append(
                f"| {seed} | {key} | {info['steps']} | {_fmt(info.get('step_seconds'), 2)} | {info['seconds']:.0f} | "
                f"{_fmt(info.get('first_loss'))} -> {_fmt(info.get('last_loss'))} |"
            )
    return out


def _greedy(runs: List[Run]) -> List[str]:
    out = ["| seed | model | items decoded | greedy exact | agree with teacher-forced |", "|---|---|---|---|---|"]
    any_check = False
    for seed, _, data in runs:
        for key, record in data["models"].items():
            check = record.get("greedy_check")
            if not check:
                continue
            any_check = True
            items = sum(c["items"] for c in check.values())
            exact = sum(c["greedy_exact"] for c in check.values())
            agree = sum(c["agree"] for c in check.values())
            out.append(f"| {seed} | {key} | {items} | {exact} | {agree}/{items} |")
    return out if any_check else []


def graft_means(runs: List[Run]) -> Dict[str, Dict[str, List[float]]]:
    """``{selector: {skill: [mean over seeds of graft score / expert score, per density]}}``."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for selector in grafting.SELECTORS:
        for cap in runs[0][1].capabilities:
            per_seed = []
            for _, suite, data in runs:
                curves = report.graft_curves(suite, data)
                per_seed.append([point["ratio"] for point in curves[selector][cap]])
            out.setdefault(selector, {})[cap] = [report.mean_defined(list(col)) for col in zip(*per_seed)]
    return out


def plot(runs: List[Run], means: Dict[str, Dict[str, List[float]]], path: str) -> None:
    """One panel per expert: score / expert score kept against density, one line per selector."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    densities = runs[0][2]["densities"]
    caps = runs[0][1].capabilities
    fig, axes = plt.subplots(1, len(caps), figsize=(3.2 * len(caps), 3.4), squeeze=False)
    for col, cap in enumerate(caps):
        ax = axes[0][col]
        for selector, per_cap in means.items():
            ax.plot(densities, per_cap[cap], "o-", label=selector, markersize=4)
        ax.set_xscale("log")
        ax.set_xticks(densities, [f"{d:g}" for d in densities], fontsize=7)
        ax.axhline(1.0, color="k", lw=0.6, ls=":")
        ax.set_title(f"expert {cap}")
        ax.set_xlabel("density kept")
        if col == 0:
            ax.set_ylabel("score / expert score")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    fig.savefig(path, dpi=110)
    plt.close(fig)


HOLD = 0.95  # a graft "holds" an expert when it keeps this share of the expert's validation score


def _auto_graft(data: Dict[str, Any], cap: str, q: Any) -> Optional[Tuple[float, float, float]]:
    """``(density kept, val kept, test kept)`` of grafting ``cap``'s expert with density: auto at mass ``q`` in one
    seed (kept: score / expert score on its own skill), or ``None`` where that seed has no such graft. ``q`` =
    :data:`KNEE` reads the knee rule's graft instead (the density its threshold kept)."""
    models = data["models"]
    key = f"graft/{cap}/{grafting.KNEE}/mean" if q == KNEE else f"graft/{cap}/{grafting.AUTO}/{q:g}"
    record = models.get(key)
    if record is None:
        return None
    kept = [
        grafting.kept(
            record[split][cap]["exact_match"],
            models[stats.expert_key(cap)][split][cap]["exact_match"],
            models["base"][split][cap]["exact_match"],
        )["ratio"]
        for split in ("val", "test")
    ]
    if q == KNEE:
        return record["knee"]["density"], kept[0], kept[1]
    return next(iter(record.get("density_auto", {}).values()), float("nan")), kept[0], kept[1]


KNEE = "knee"  # the knee rule (benchmarks/quality/saliency.py) as a column of the density: auto tables


def _held(runs: List[Run], cap: str, q: Any) -> bool:
    """Whether grafting ``cap``'s expert with density: auto at mass ``q`` (or the knee rule) keeps >= HOLD of its
    validation score in every seed (False where a seed lacks that graft)."""
    grafts = [_auto_graft(data, cap, q) for _, _, data in runs]
    return all(g is not None and g[1] >= HOLD for g in grafts)


def merge_masses(runs: List[Run]) -> List[str]:
    """Validation G of the auto merge at every saliency mass the results hold (best lambda per mass), per seed and
    on average, and the mass validation picks: how a merge-specific default would be chosen."""
    auto = merges.AUTO_METHOD
    by_seed: Dict[float, List[float]] = {}
    for _, suite, data in runs:
        val, skills = seed_items(suite, data, "val"), gain_skills(suite, data)
        if not skills:  # no expert beats the base on validation: G is undefined
            continue
        best: Dict[float, float] = {}
        for key in data["models"]:
            if key.startswith(f"merge/{auto}/q=") and key in val:
                q = float(key.split("/")[-1].split(",")[0][2:])
                best[q] = max(best.get(q, -math.inf), _finite(stats.gain(val, key, skills)))
        for q, g in best.items():
            by_seed.setdefault(q, []).append(g)
    masses = sorted(q for q, gs in by_seed.items() if len(gs) == len(runs))
    if len(masses) < 2:
        return []
    means = {q: float(np.mean(by_seed[q])) for q in masses}
    pick = max(masses, key=lambda q: means[q])
    out = [
        "",
        f"Saliency mass in merges: validation G of **{auto}** at each mass its results hold (best λ per mass; "
        "the masses outside the default were an earlier grid of this method):",
        "",
        "| q | " + " | ".join(f"seed {seed}" for seed, _, _ in runs) + " | mean |",
        "|---|" + "---|" * (len(runs) + 1),
    ]
    for q in masses:
        out.append(f"| {q:g} | " + " | ".join(_fmt(g) for g in by_seed[q]) + f" | {_fmt(means[q])} |")
    runner_up = max((q for q in masses if q != pick), key=lambda q: means[q])
    out += [
        "",
        f"Validation's pick for merges: q = {pick:g} (mean G {_fmt(means[pick])}; next q = {runner_up:g}, "
        f"{_fmt(means[runner_up])}).",
    ]
    return out


def _rule(q: Any) -> str:
    return KNEE if q == KNEE else f"q={q:g}"


def auto_section(runs: List[Run], table: compare.Comparisons) -> List[str]:
    """``density: auto``: grafting one expert at each saliency mass (the density auto chose, the score kept on
    validation and test), and in merges auto against the density tuned on validation, with paired intervals."""
    masses: List[Any] = list(runs[0][2].get("auto_masses") or [])
    caps = runs[0][1].capabilities
    if masses and all(_auto_graft(data, cap, KNEE) is not None for _, _, data in runs for cap in caps):
        masses.append(KNEE)
    out: List[str] = []
    if masses:
        out += [
            "## density: auto",
            "",
            "Grafting one expert with `density: auto` at saliency mass q (`ffg`, model-wide: the fewest entries "
            "holding q of the expert's saliency `v * tau**2`): the density auto chose (from the merge's "
            "provenance) and score / expert score kept on its own skill, validation / test, mean over seeds. "
            f"Column `{KNEE}`: the other candidate rule, {grafting.KNEE} (the knee of the mass-vs-density curve, "
            "`benchmarks/quality/saliency.py`), grafted with that absolute threshold.",
            "",
            "| expert | " + " | ".join(_rule(q) + ": density, val / test kept" for q in masses) + " |",
            "|---|" + "---|" * len(masses),
        ]
        per_mass: Dict[float, List[Tuple[float, float, float]]] = {q: [] for q in masses}
        for cap in runs[0][1].capabilities:
            cells = []
            for q in masses:
                rows = [g for g in (_auto_graft(data, cap, q) for _, _, data in runs) if g is not None]
                mean = tuple(float(np.mean([r[i] for r in rows])) if rows else float("nan") for i in range(3))
                per_mass[q].append(mean)  # type: ignore[arg-type]
                cells.append(f"{_fmt(100 * mean[0], 2)}%, {_fmt(mean[1])} / {_fmt(mean[2])}")
            out.append(f"| {cap} | " + " | ".join(cells) + " |")
        out += [
            "",
            "| q | density (mean over experts) | val kept: mean [min, max] over experts | test kept: mean [min, max] |",
            "|---|---|---|---|",
        ]
        held = [q for q in masses if all(_held(runs, cap, q) for cap in runs[0][1].capabilities)]
        for q in masses:
            values = np.array(per_mass[q])
            out.append(
                f"| {_rule(q)} | {_fmt(100 * float(np.mean(values[:, 0])), 2)}% | {_fmt(float(np.mean(values[:, 1])))} "
                f"[{_fmt(float(values[:, 1].min()))}, {_fmt(float(values[:, 1].max()))}] | "
                f"{_fmt(float(np.mean(values[:, 2])))} [{_fmt(float(values[:, 2].min()))}, "
                f"{_fmt(float(values[:, 2].max()))}] |"
            )
        holding_masses = [q for q in held if q != KNEE]
        out += [
            "",
            f"Validation's pick (the paper's rule for a density, applied to the mass): the smallest q at which "
            f"every expert keeps at least {HOLD:g} of its validation score in every seed: "
            + (f"**q = {holding_masses[0]:g}**" if holding_masses else "none of these")
            + f" (the default "
            f"`saliency_mass` is {DEFAULT_SALIENCY_MASS:g}).",
        ]
        if KNEE in masses:
            density = {q: float(np.mean(np.array(per_mass[q])[:, 0])) for q in masses}
            verdict = (
                "holds every expert in every seed"
                if KNEE in held
                else "does not hold every expert in every seed (validation kept min "
                f"{_fmt(float(np.array(per_mass[KNEE])[:, 1].min()))})"
            )
            if holding_masses and KNEE in held:
                better = "the knee" if density[KNEE] < density[holding_masses[0]] else f"q = {holding_masses[0]:g}"
                verdict += f"; of the two rules that hold, the sparser is {better}"
            out.append(
                f"The knee rule {verdict}: it keeps {_fmt(100 * density[KNEE], 2)}% of the entries on average"
                + (
                    f", against {_fmt(100 * density[holding_masses[0]], 2)}% at q = {holding_masses[0]:g}."
                    if holding_masses
                    else "."
                )
            )
    auto, tuned = merges.AUTO_METHOD, "ota+ffg (model-wide)"
    if auto in table.methods and tuned in table.methods:
        out += [
            "",
            f"In merges: **{auto}** (no density tuned: each expert's from its saliency at the default saliency_mass; λ "
            "chosen on "
            "validation) against "
            f"**{tuned}** (density and λ chosen on validation) and the best baseline, test G:",
            "",
            "| seed | auto: chosen point | density auto chose per expert | tuned: chosen point |",
            "|---|---|---|---|",
        ]
        for (seed, _, data), choice in zip(runs, table.choices):
            record = data["models"][choice[auto]["key"]]
            densities = ", ".join(f"{_fmt(100 * d, 2)}%" for d in record.get("density_auto", {}).values())
            out.append(f"| {seed} | {choice[auto]['label']} | {densities or 'n/a'} | {choice[tuned]['label']} |")
        rows = [(f"{auto} - {tuned}", table.diff(table.keys_of(auto), table.keys_of(tuned)))]
        if table.reference:
            rows.append(
                (f"{auto} - {table.reference}", table.diff(table.keys_of(auto), table.keys_of(table.reference)))
            )
        out += [""] + table.columns("comparison") + [table.row(label, d) for label, d in rows]
        out += merge_masses(runs)
    return out + ([""] if out else [])


def unit_costs(runs: List[Run]) -> List[str]:
    """Measured unit costs of each seed's run: Trainer step, scored item, merge by method, graft."""
    out = [
        "## Unit costs (measured in these runs)",
        "",
        "| seed | s / Trainer step (median of runs) | training steps | s / scored item | merges: median s (method) | "
        "grafts: median s |",
        "|---|---|---|---|---|---|",
    ]
    for seed, _, data in runs:
        infos = [i for k, i in data.get("training", {}).items() if k != "base" and i.get("step_seconds")]
        step = float(np.median([i["step_seconds"] for i in infos])) if infos else float("nan")
        steps = sum(i["steps"] for k, i in data.get("training", {}).items() if k != "base")
        seconds = items = 0.0
        for record in data["models"].values():
            for split, value in record.get("score_seconds", {}).items():
                seconds += value
                items += sum(r["rows"] for r in record[split].values())
        by_method: Dict[str, List[float]] = {}
        for setting in data.get("settings", []):
            record = data["models"].get(setting["key"], {})
            if "merge_seconds" in record:
                by_method.setdefault(setting["method"], []).append(record["merge_seconds"])
        grafts = [
            r["merge_seconds"] for k, r in data["models"].items() if k.startswith("graft/") and "merge_seconds" in r
        ]
        merges_text = ", ".join(f"{m} {np.median(v):.0f}" for m, v in by_method.items()) or "-"
        out.append(
            f"| {seed} | {_fmt(step, 2)} | {steps} | {_fmt(seconds / items if items else float('nan'), 4)} | "
            f"{merges_text} | {_fmt(float(np.median(grafts)) if grafts else float('nan'), 1)} |"
        )
    return out + [""]


@dataclass
class _Context:
    """What every section of the sft report reads, computed once by :func:`write` (``table`` and what follows it
    are ``None`` in a partial run)."""

    runs: Any = None
    name: Any = None
    directory: Any = None
    seeds: Any = None
    suite: Any = None
    caps: Any = None
    invocation: Any = None
    tests: Any = None
    choices: Any = None
    table: Any = None


def _header(c: _Context) -> List[str]:
    """Title, claim, command, setup, the tier's criteria, training runs and the greedy check."""
    runs = c.runs
    name = c.name
    seeds = c.seeds
    suite = c.suite
    invocation = c.invocation
    out: List[str] = [
        f"# Merge quality: `sft` tier{' (smoke settings)' if 'smoke' in name else ''}, seeds "
        f"{', '.join(map(str, seeds))}",
        "",
        "Claim under test (arXiv 2509.11167): merging instruction-tuned capability experts with OTA (+FFG) keeps "
        "more of each capability than linear, task arithmetic, TIES, DARE and Breadcrumbs; FFG grafts an "
        "expert's essential edits at lower density than magnitude pruning; rank-1 curvature keeps OTA's gains.",
        "",
    ]
    out += report.setup_lines(suite, invocation)
    out += (
        [
            "## Base and experts on held-out test items",
            "",
            f"The tier needs the base weak (< {BASE_MAX:g}) and each expert strong (>= {EXPERT_MIN:g}) on its own "
            "skill (greedy exact match):",
            "",
        ]
        + _criteria(runs)
        + [""]
    )
    out += (
        [
            "Training runs (`s/step` is the median wall time between optimizer steps, without start-up and the "
            "checkpoint write):",
            "",
        ]
        + _training(runs)
        + [""]
    )
    greedy = _greedy(runs)
    if greedy:
        out += (
            [
                "Real greedy decoding (`model.generate`, stopping at end of turn) of the first test items of each "
                "skill against the stored teacher-forced exact match (they can differ only where greedy decoding "
                "writes the answer's text in another tokenization):",
                "",
            ]
            + greedy
            + [""]
        )
    return out


def _interference(c: _Context) -> List[str]:
    """Whether the tier shows interference: what task arithmetic and linear keep."""
    seeds = c.seeds
    methods, keys_of, gain_of = c.table.methods, c.table.keys_of, c.table.gain
    out: List[str] = []
    out += [
        "## Interference",
        "",
        "Share of the experts' gain that task arithmetic and linear keep at their best validation setting "
        f"(test `G`, 95% interval): the tier shows interference only if the better of the two keeps <= "
        f"{INTERFERENCE_LIMIT:g}.",
        "",
        "| method | pooled G [95%] | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    kept = {}
    for method in ("task_arithmetic", "linear"):
        if method in methods:
            g = gain_of(keys_of(method))
            kept[method] = g.pooled.value
            out.append(f"| {method} | {_est(g.pooled)} | " + " | ".join(_est(e) for e in g.per_seed) + " |")
    if kept:
        better = max(kept, key=lambda m: _finite(kept[m]))
        counts = not math.isnan(kept[better]) and kept[better] <= INTERFERENCE_LIMIT
        out += [
            "",
            f"Better of the two: {better} keeps {_fmt(kept[better])}: the tier "
            f"{'**counts**' if counts else '**does not count**'} (limit {INTERFERENCE_LIMIT:g}).",
            "",
        ]

    return out


def _main_table(c: _Context) -> List[str]:
    """The results table (each method at its validation-chosen point per seed) and the comparisons."""
    runs = c.runs
    seeds = c.seeds
    caps = c.caps
    tests = c.tests
    choices = c.choices
    table = c.table
    keys_of, gain_of = c.table.keys_of, c.table.gain
    out: List[str] = []
    out += [
        "## Results (test split)",
        "",
        "Per skill: exact match, mean over seeds. **G** = gain kept (pooled over seeds, 95% two-level bootstrap "
        "interval); each method at its grid point chosen on validation in each seed (the setting column names "
        "each seed's choice).",
        "",
        "| model | " + " | ".join(caps) + " | G [95%] | " + " | ".join(f"G seed {s}" for s in seeds) + " | setting |",
        "|---|" + "---|" * (len(caps) + len(seeds) + 2),
    ]

    def acc_cells(keys: Sequence[str]) -> str:
        return " | ".join(
            _fmt(float(np.mean([stats.accuracy(t, k, cap) for t, k in zip(tests, keys)]))) for cap in caps
        )

    rows = [("base", ["base"] * len(runs), "(reference)")]
    rows += [(f"expert {cap}", [stats.expert_key(cap)] * len(runs), "(reference)") for cap in caps]
    if all("multitask" in t for t in tests):
        rows.append(("**multitask** (union, same total steps)", ["multitask"] * len(runs), "(reference)"))
    ranked = table.ranked()
    rows += [(m, keys_of(m), "; ".join(c[m]["label"] for c in choices)) for m in ranked]
    for label, keys, setting in rows:
        g = gain_of(keys)
        out.append(
            f"| {label} | {acc_cells(keys)} | {_est(g.pooled)} | "
            + " | ".join(_fmt(e.value) for e in g.per_seed)
            + f" | {setting} |"
        )

    out.append("")
    out += table.sections([("multitask (reference)", "multitask")] if all("multitask" in t for t in tests) else [])

    return out


def _grids(c: _Context) -> List[str]:
    """The tuning grids and every grid point's scores."""
    runs = c.runs
    seeds = c.seeds
    caps = c.caps
    tests = c.tests
    out: List[str] = []
    notes = {m.name: m.note for m in merges.methods()}
    out += [
        "",
        "## Tuning grids (same budget: at most 4 settings per method)",
        "",
        merges.__doc__.split("Grid rule", 1)[1].split("\n", 1)[1].strip(),
        "",
        "| method | grid | note |",
        "|---|---|---|",
    ]
    for method, grid in runs[0][2]["grids"].items():
        out.append(f"| {method} | {grid} | {notes.get(method, '')} |")
    out += [
        "",
        "<details><summary>Every grid point: validation / test G per seed (test: `-` where only the point "
        "chosen on validation was scored on test)</summary>",
        "",
        "| method | setting | " + " | ".join(f"seed {s} val / test" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    vals = [seed_items(s, d, "val") for _, s, d in runs]
    for setting in runs[0][2]["settings"]:
        cells = [
            f"{_fmt(stats.gain(v, setting['key'], caps)) if setting['key'] in v else '-'} / "
            f"{_fmt(stats.gain(t, setting['key'], caps)) if setting['key'] in t else '-'}"
            for v, t in zip(vals, tests)
        ]
        out.append(f"| {setting['method']} | {setting['label']} | " + " | ".join(cells) + " |")
    out += ["", "</details>", ""]

    return out


def _grafting(c: _Context) -> List[str]:
    """The grafting curves (mean over seeds)."""
    runs = c.runs
    name = c.name
    caps = c.caps
    directory = c.directory
    out: List[str] = []
    densities = runs[0][2].get("densities", [])
    if densities:
        png = f"quality-{name}-grafting.png"
        means = graft_means(runs)
        plot(runs, means, os.path.join(directory, png))
        out += [
            "## Grafting one expert (test split, its own skill)",
            "",
            grafting.__doc__.split("\n\n", 1)[1].strip(),
            "",
            f"![grafting curves]({png})",
            "",
            "Score / expert score, mean over seeds:",
            "",
            "| expert | selector | " + " | ".join(f"d={d:g}" for d in densities) + " |",
            "|---|---|" + "---|" * len(densities),
        ]
        for cap in caps:
            for selector, per_cap in means.items():
                out.append(f"| {cap} | {selector} | " + " | ".join(_fmt(v) for v in per_cap[cap]) + " |")
        out.append("")

    return out


def _run_time(c: _Context) -> List[str]:
    """Stage times per seed and the load the run saw."""
    runs = c.runs
    invocation = c.invocation
    out: List[str] = []
    out += ["## Run time", "", "| seed | stage | wall s | CPU s (this process) |", "|---|---|---|---|"]
    for seed, _, data in runs:
        stages = data.get("stages", {})
        for stage, t in stages.items():
            out.append(f"| {seed} | {stage} | {t['wall']:.1f} | {t['cpu']:.1f} |")
        out.append(
            f"| {seed} | **total** | **{sum(t['wall'] for t in stages.values()):.0f}** | "
            f"**{sum(t['cpu'] for t in stages.values()):.0f}** |"
        )
    load = invocation.get("load_before")
    out += [
        "",
        f"Load average when the last seed's invocation started: {', '.join(f'{x:.1f}' for x in load) if load else '?'} "
        f"on {os.cpu_count()} CPUs. {report._cost_note(invocation.get('threads'))}",
        "",
    ]
    return out


def write(runs: List[Run], directory: str, name: str, partial: bool = False) -> str:
    """Write ``quality-<name>.md`` (and the grafting plot when grafts ran); return the md path."""
    os.makedirs(directory, exist_ok=True)
    md_path = os.path.join(directory, f"quality-{name}.md")
    seeds = [seed for seed, _, _ in runs]
    suite = runs[0][1]
    caps = suite.capabilities
    invocation = runs[-1][2].get("invocation", {})
    tests = [seed_items(s, d, "test") for _, s, d in runs]
    c = _Context(
        runs=runs,
        name=name,
        directory=directory,
        seeds=seeds,
        suite=suite,
        caps=caps,
        invocation=invocation,
        tests=tests,
    )
    out = _header(c)
    if partial or not all("settings" in d for _, _, d in runs):
        out += [
            "*Partial run* (`--stop-after references`): merges, intervals and grafting follow when the full tier runs.",
            "",
        ] + unit_costs(runs)
        with open(md_path, "w", encoding="utf-8") as fp:
            fp.write("\n".join(out))
        return md_path

    c.choices = [choose(s, d) for _, s, d in runs]
    c.table = compare.Comparisons(tests, c.choices, seeds, caps)
    for section in (_interference, _main_table, _grids, _grafting):
        out += section(c)
    out += auto_section(runs, c.table)
    out += unit_costs(runs)
    out += _run_time(c)
    with open(md_path, "w", encoding="utf-8") as fp:
        fp.write("\n".join(out))
    return md_path
