"""``quality-<tier>.md`` (one seed of quick/full) and its grafting plot, from ``results.json`` (no hand-typed numbers).

The headline is **G** (gain kept, ``paired.py``): mean over capabilities of ``(score_c - base_c) /
(expert_c - base_c)`` (0 = no better than the base, 1 = as good as the expert), on the tier's
headline score (the full tier's held-out loss, the quick tier's exact match), with each method at
its grid point chosen on validation G and item-bootstrap intervals (``compare.py``). Beside it,
**norm.** = mean of ``score_c / expert_c`` on the tier's accuracy score.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from benchmarks.quality import grafting, merges, paired
from benchmarks.quality.compare import Comparisons, est
from benchmarks.quality.compare import fmt as _fmt
from benchmarks.quality.tiers import Suite
from mergekit_ota.compare import stats


def _score(record: Dict[str, Any], split: str, cap: str, metric: str) -> float:
    return float(record[split][cap][metric])


def mean_defined(values: List[float]) -> float:
    """Mean of the values that are not NaN (NaN when none is)."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else float("nan")


def unlearned_capabilities(suite: Suite, models: Dict[str, Any], split: str = "test") -> List[str]:
    """The capabilities whose own expert scores 0 on them (it never learned them): left out of norm."""
    return [c for c in suite.capabilities if _score(models[f"expert/{c}"], split, c, suite.metric[c]) <= 0]


def norm(suite: Suite, models: Dict[str, Any], record: Dict[str, Any], split: str) -> float:
    """Mean over capabilities of score / (that capability's expert score), where the expert scores above 0
    (elsewhere it never learned the capability and the ratio is undefined)."""
    ratios = []
    for cap in suite.capabilities:
        metric = suite.metric[cap]
        value = grafting.kept(
            _score(record, split, cap, metric),
            _score(models[f"expert/{cap}"], split, cap, metric),
            _score(models["base"], split, cap, metric),
        )
        ratios.append(value["ratio"])
    return mean_defined(ratios)


def select(
    suite: Suite, data: Dict[str, Any], skills: Optional[List[str]] = None, tests: Optional[stats.Seed] = None
) -> List[Dict[str, Any]]:
    """Per method, its grid point chosen on validation ``G`` (``paired.choose``), with ``val`` (that G), ``gain``
    (test G over the same skills), ``test`` (test norm.: mean of score / expert score) and its ``record``.

    ``skills`` (default: ``paired.gain_skills``) and ``tests`` (default: the test items) when the caller has them."""
    models = data["models"]
    skills = paired.gain_skills(suite, data) if skills is None else skills
    tests = paired.seed_items(suite, data, "test") if tests is None else tests
    out = []
    for choice in paired.choose(suite, data, skills).values():
        record = models[choice["key"]]
        gain = stats.gain(tests, choice["key"], skills) if skills else float("nan")
        out.append({**choice, "test": norm(suite, models, record, "test"), "gain": gain, "record": record})
    return out


def graft_curves(suite: Suite, data: Dict[str, Any]) -> Dict[str, Dict[str, List[Dict[str, float]]]]:
    """``{selector: {capability: [kept(...) per density]}}`` on the test split."""
    models = data["models"]
    curves: Dict[str, Dict[str, List[Dict[str, float]]]] = {}
    for selector in grafting.selectors_in(data):
        for cap in suite.capabilities:
            metric = suite.metric[cap]
            expert = _score(models[f"expert/{cap}"], "test", cap, metric)
            base = _score(models["base"], "test", cap, metric)
            curves.setdefault(selector, {})[cap] = [
                grafting.kept(_score(models[f"graft/{cap}/{selector}/{d:g}"], "test", cap, metric), expert, base)
                for d in data["densities"]
            ]
    return curves


def plot(suite: Suite, data: Dict[str, Any], path: str) -> None:
    """Grafting curves: one column per capability plus their mean; rows = the two normalisations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves = graft_curves(suite, data)
    densities = data["densities"]
    columns = suite.capabilities + ["mean"]
    fig, axes = plt.subplots(2, len(columns), figsize=(3.2 * len(columns), 6.4), sharex=True, squeeze=False)
    styles = {
        "FFG (per tensor)": ("C0", "o-"),
        "FFG (model-wide)": ("C2", "s-"),
        "magnitude (per tensor)": ("C3", "^-"),
        "random": ("C7", "x--"),
        grafting.FISHER: ("C1", "d-."),
    }
    for row, (key, ylabel) in enumerate(
        (("ratio", "score / expert score"), ("gain", "(score - base) / (expert - base)"))
    ):
        for col, cap in enumerate(columns):
            ax = axes[row][col]
            for selector, per_cap in curves.items():
                if cap == "mean":
                    ys = mean_curve(curves, selector, key)
                else:
                    ys = [point[key] for point in per_cap[cap]]
                color, style = styles[selector]
                ax.plot(densities, ys, style, color=color, label=selector, markersize=4)
            ax.axhline(1.0, color="k", lw=0.6, ls=":")
            ax.axhline(0.0, color="k", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_xlim(min(densities) / 1.3, max(densities) * 1.3)  # explicit: all-NaN curves set no limits
            ax.set_xticks(densities, [f"{d:g}" for d in densities], fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_title(cap if row == 0 else "")
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 1:
                ax.set_xlabel("density kept")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="upper center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.955), frameon=False
    )
    fig.suptitle(f"Grafting one expert onto the base ({suite.tier} tier, test split)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shown(path: str) -> str:
    """``path`` relative to the repository root when inside it (reports are read from the repository)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    relative = os.path.relpath(path, repo)
    return path if relative.startswith("..") else relative


def _cost_note(threads: Optional[int]) -> str:
    """How to read CPU seconds as the run's cost on an idle machine."""
    if threads == 1:
        return (
            "With 1 torch thread the work is serial: on an otherwise idle machine its wall time is about its CPU "
            "seconds; wall seconds above them were spent waiting for a shared CPU."
        )
    return (
        f"With {threads} torch threads, an otherwise idle machine's wall time lies between CPU seconds / {threads} "
        "and CPU seconds; wall seconds above that were spent waiting for a shared CPU or the disk."
    )


def _versions() -> str:
    from importlib.metadata import version

    parts = [f"python {platform.python_version()}"]
    for package in ("torch", "transformers", "mergekit", "mergekit-ota"):
        try:
            parts.append(f"{package} {version(package)}")
        except Exception:  # noqa: BLE001  (a missing distribution is reported, not fatal)
            parts.append(f"{package} ?")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=os.path.dirname(__file__), check=True
        ).stdout.strip()
        parts.append(f"git {commit}{' (uncommitted changes)' if dirty else ''}")
    except Exception:  # noqa: BLE001
        pass
    return ", ".join(parts)


def _machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fp:
            names = [line.split(":", 1)[1].strip() for line in fp if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs"


def mean_curve(curves: Dict[str, Dict[str, List[Dict[str, float]]]], selector: str, key: str = "ratio") -> List[float]:
    """Per density, the mean over capabilities of ``key`` of ``selector``'s grafting curve (NaNs left out)."""
    per_cap = curves[selector]
    count = len(next(iter(per_cap.values())))
    return [mean_defined([points[i][key] for points in per_cap.values()]) for i in range(count)]


def _smallest_lambda(choice: Dict[str, Any], settings: List[Dict[str, Any]]) -> bool:
    """Whether ``choice`` has the smallest of several ``λ`` values in its method's grid."""

    def lambda_(label: str) -> Optional[float]:
        parts = dict(part.split("=", 1) for part in label.split(", ") if "=" in part)
        return float(parts["λ"]) if "λ" in parts else None

    values = {lambda_(s["label"]) for s in settings if s["method"] == choice["method"]} - {None}
    return len(values) > 1 and lambda_(choice["label"]) == min(values)


def _findings(
    chosen: List[Dict[str, Any]], curves: Dict[str, Any], densities: List[float], settings: List[Dict[str, Any]]
) -> List[str]:
    """Plain statements derived from the numbers (the verdicts are in the paired differences above)."""
    ranked = sorted(chosen, key=lambda c: -paired.finite(c["gain"]))
    lines = ["Ranking by test G: " + ", ".join(f"{c['method']} {_fmt(c['gain'])}" for c in ranked) + "."]
    smallest = [c["method"] for c in chosen if _smallest_lambda(c, settings)]
    if smallest:
        lines.append(
            "Chosen at the smallest λ of its grid (the merge wants a still smaller task vector; λ -> 0 "
            "is the base): " + ", ".join(smallest) + "."
        )
    mean = {sel: mean_curve(curves, sel) for sel in curves}
    if "FFG (per tensor)" in mean and "magnitude (per tensor)" in mean:
        diffs = ", ".join(
            f"d={d:g}: {f - m:+.3f}"
            for d, f, m in zip(densities, mean["FFG (per tensor)"], mean["magnitude (per tensor)"])
        )
        lines.append(f"Grafting, FFG minus magnitude (per tensor, mean score/expert over capabilities): {diffs}.")
    return lines


def headline_text(suite: Suite, skills: List[str]) -> str:
    """What G is computed from in this tier, in words."""
    names = sorted({paired.headline(suite, c) for c in suite.capabilities})
    what = " and ".join("held-out loss" if n == "loss" else n.replace("_", " ") for n in names)
    return (
        f"**G** (gain kept) = mean over {', '.join(skills) if skills else 'no capability'} of (score - base) / "
        f"(expert - base), score = {what}"
        + (" (for a loss: (loss_base - loss) / (loss_base - loss_expert))" if "loss" in names else "")
        + f"; over the capabilities whose expert beats the base by at least {grafting.MIN_GAIN:g} on validation"
    )


@dataclass
class _Context:
    """What every section of one quick/full report reads, computed once by :func:`write`."""

    suite: Any
    data: Any
    name: Any
    png_name: Any
    models: Any
    caps: Any
    skills: Any
    tests: Any
    chosen: Any
    curves: Any
    invocation: Any
    metric_names: Any
    test_rows: Any
    unlearned: Any
    seed: Any
    table: Any


def setup_lines(suite: Suite, invocation: Dict[str, Any]) -> List[str]:
    """The lines every quality report opens its body with: the command that made it, the machine and versions,
    and the tier's setup (its description and one line per capability)."""
    out = [
        f"Command: `{' '.join(invocation.get('argv', []))}` (from the repository root, with the project's venv python)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} on {_machine()}; {_versions()}; torch threads "
        f"{invocation.get('threads', '?')}, training and scoring on {invocation.get('device', 'cpu')}.",
        "",
        "## Setup",
        "",
        suite.description,
        "",
    ]
    return out + [f"- `{cap}`: {suite.details.get(cap, '')}" for cap in suite.capabilities] + [""]


def _header(c: _Context) -> List[str]:
    """Title, claim, command, setup, training runs and store sizes."""
    invocation = c.invocation
    seed = c.seed
    suite = c.suite
    data = c.data
    name = c.name
    out: List[str] = [
        f"# Merge quality: `{suite.tier}` tier{' (smoke settings)' if 'smoke' in name else ''}"
        f"{f', training seed {seed}' if seed else ''}",
        "",
    ]
    out += [
        "Claim under test (arXiv 2509.11167): merging capability experts with OTA (+FFG) keeps more of each "
        "capability than linear, task arithmetic, TIES, DARE and Breadcrumbs; FFG keeps an expert's performance "
        "at lower density than magnitude pruning; rank-1 compressed curvature keeps OTA's gains.",
        "",
    ]
    out += setup_lines(suite, invocation)
    training = data.get("training", {})
    out += ["| run | steps | seconds | train loss first -> last |", "|---|---|---|---|"]
    for key, info in training.items():
        out.append(
            f"| {key} | {info['steps']} | {info['seconds']:.0f} | {_fmt(info['first_loss'])} -> "
            f"{_fmt(info['last_loss'])} |"
        )
    out += [
        "",
        "Curvature: each expert's Trainer checkpoint exported with `mergekit-ota export CHECKPOINT OUT` (full) and "
        "`mergekit-ota export CHECKPOINT OUT --compress rank1`.",
        "",
    ]
    sizes = data.get("export", {})
    if sizes:
        full = sum(v["bytes"] for k, v in sizes.items() if k.endswith("/full"))
        rank1 = sum(v["bytes"] for k, v in sizes.items() if k.endswith("/rank1"))
        if full and rank1:
            out += [
                f"Store sizes: full {full / 1e6:.2f} MB, rank-1 {rank1 / 1e6:.3f} MB in total ({rank1 / full:.1%}).",
                "",
            ]

    return out


def _results(c: _Context) -> List[str]:
    """The results table (each method at its validation-chosen point), findings and comparisons."""
    models = c.models
    caps = c.caps
    skills = c.skills
    chosen = c.chosen
    curves = c.curves
    metric_names = c.metric_names
    test_rows = c.test_rows
    unlearned = c.unlearned
    seed = c.seed
    table = c.table
    suite = c.suite
    data = c.data
    out: List[str] = []
    out += [
        "## Results (test split)",
        "",
        headline_text(suite, skills) + ". Each method's row is its grid point with the best validation G "
        "(shown as *val G*); the test numbers were not used to choose. **G [95%]**: item bootstrap over this "
        f"seed's ({seed}) {min(test_rows)}-{max(test_rows)} test items (rows) per capability; seed-to-seed "
        "variation is not in it (other seeds: `--seed N`, pooled: `python -m benchmarks.quality.seeds`). "
        f"Per capability: {', '.join(metric_names)}; **norm.** = mean over capabilities of score / (that "
        "capability's expert score)"
        + (
            f" (left out: {', '.join(unlearned)}, whose expert scores 0 on it: it never learned it)"
            if unlearned
            else ""
        )
        + ".",
        "",
        "| model | " + " | ".join(caps) + " | G [95%] | norm. | chosen setting | val G | merge s |",
        "|---|" + "---|" * (len(caps) + 5),
    ]
    references = [("base", "base")] + [(f"expert {cap}", f"expert/{cap}") for cap in caps]
    for label, key in references:
        record = models[key]
        cells = " | ".join(_fmt(_score(record, "test", c, suite.metric[c])) for c in caps)
        g = table.gain([key]).pooled if skills else None
        out.append(
            f"| {label} | {cells} | {est(g) if g else 'n/a'} | {_fmt(norm(suite, models, record, 'test'))} | "
            "(reference) | | |"
        )
    for choice in sorted(chosen, key=lambda c: -paired.finite(c["gain"])):
        record = choice["record"]
        cells = " | ".join(_fmt(_score(record, "test", c, suite.metric[c])) for c in caps)
        g = table.gain([choice["key"]]).pooled if skills else None
        out.append(
            f"| **{choice['method']}** | {cells} | **{est(g) if g else 'n/a'}** | {_fmt(choice['test'])} | "
            f"{choice['label']} | {_fmt(choice['val'])} | {record['merge_seconds']:.2f} |"
        )
    for extra, shown in suite.also_report:
        shown = [c for c in caps if c in shown] if shown else caps
        out += [
            "",
            f"Held-out {extra} (test) of the same rows:",
            "",
            "| model | " + " | ".join(shown) + " |",
            "|---|" + "---|" * len(shown),
        ]
        for label, record in [(lab, models[key]) for lab, key in references] + [
            (c["method"], c["record"]) for c in chosen
        ]:
            out.append(f"| {label} | " + " | ".join(_fmt(_score(record, "test", c, extra)) for c in shown) + " |")
    out += ["", "### Findings", ""] + [
        f"- {line}" for line in _findings(chosen, curves, data["densities"], data["settings"])
    ]
    out += [""] + [
        line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in table.sections(datas=[data])
    ]

    return out


def _grids(c: _Context) -> List[str]:
    """The tuning grids and every grid point's scores."""
    models = c.models
    skills = c.skills
    tests = c.tests
    invocation = c.invocation
    suite = c.suite
    data = c.data
    out: List[str] = []
    out += [
        "",
        "### Tuning grids (same budget: at most 4 settings per method)",
        "",
        merges.__doc__.split("Grid rule", 1)[1].split("\n", 1)[1].strip(),
        "",
        "| method | grid | note |",
        "|---|---|---|",
    ]
    notes = {m.name: m.note for m in merges.methods()}
    for method, grid in data["grids"].items():
        out.append(f"| {method} | {grid} | {notes.get(method, '')} |")
    out += [
        "",
        "All mergekit runs: `dtype: float32`, `random_seed` 0 (dare is random). The YAML of every grid point "
        f"is in `{_shown(os.path.join(invocation.get('work', ''), 'configs'))}/` and runs as is with "
        "`mergekit-yaml CONFIG OUT`.",
        "",
        "<details><summary>Every grid point (val / test G, test norm.)</summary>",
        "",
        "| method | setting | val G | test G | test norm. |",
        "|---|---|---|---|---|",
    ]
    vals = paired.seed_items(suite, data, "val")
    for setting in data["settings"]:
        key = setting["key"]
        val, test = (stats.gain(v, key, skills) if skills and key in v else float("nan") for v in (vals, tests))
        ratio = norm(suite, models, models[key], "test") if "test" in models[key] else float("nan")
        out.append(f"| {setting['method']} | {setting['label']} | {_fmt(val)} | {_fmt(test)} | {_fmt(ratio)} |")
    out += ["", "</details>", ""]

    return out


def _grafting(c: _Context) -> List[str]:
    """The grafting curves, mean over capabilities and per capability."""
    png_name = c.png_name
    caps = c.caps
    curves = c.curves
    data = c.data
    out: List[str] = []
    out += [
        "## Grafting one expert (test split)",
        "",
        grafting.__doc__.split("\n\n", 1)[1].strip(),
        "",
        f"![grafting curves]({png_name})",
        "",
        "Mean over capabilities of score / expert score (gain-normalised in parentheses; each mean over the "
        "capabilities where it is defined, as for norm. and gain):",
        "",
        "| selector | " + " | ".join(f"d={d:g}" for d in data["densities"]) + " |",
        "|---|" + "---|" * len(data["densities"]),
    ]
    for selector in curves:
        cells = [
            f"{_fmt(ratio)} ({_fmt(gain, 2)})"
            for ratio, gain in zip(mean_curve(curves, selector), mean_curve(curves, selector, "gain"))
        ]
        out.append(f"| {selector} | " + " | ".join(cells) + " |")
    out += [
        "",
        "<details><summary>Per capability (score / expert score)</summary>",
        "",
        "| capability | selector | " + " | ".join(f"d={d:g}" for d in data["densities"]) + " |",
        "|---|---|" + "---|" * len(data["densities"]),
    ]
    for cap in caps:
        for selector, per_cap in curves.items():
            out.append(f"| {cap} | {selector} | " + " | ".join(_fmt(p["ratio"]) for p in per_cap[cap]) + " |")
    out += ["", "</details>", ""]

    return out


def _run_time(c: _Context) -> List[str]:
    """Stage times and the load the run saw."""
    invocation = c.invocation
    data = c.data
    out: List[str] = []
    out += ["## Run time", "", "| stage | wall s | CPU s (this process) |", "|---|---|---|"]
    stages = data.get("stages", {})
    for stage, t in stages.items():
        out.append(f"| {stage} | {t['wall']:.1f} | {t['cpu']:.1f} |")
    total_wall = sum(t["wall"] for t in stages.values())
    total_cpu = sum(t["cpu"] for t in stages.values())
    out.append(f"| **total** | **{total_wall:.0f}** | **{total_cpu:.0f}** |")
    load = invocation.get("load_before")
    out += [
        "",
        f"Stage times add up the work of every invocation that computed something (a rerun skips cached "
        f"steps); this invocation took {invocation.get('wall', 0):.0f} s. Load average when it started: "
        f"{', '.join(f'{x:.1f}' for x in load) if load else '?'} on {os.cpu_count()} CPUs. "
        f"{_cost_note(invocation.get('threads'))}",
        "",
    ]
    return out


def write(suite: Suite, data: Dict[str, Any], directory: str, name: str) -> str:
    """Write ``quality-<name>.md`` and ``quality-<name>-grafting.png`` into ``directory``; return the md path."""
    os.makedirs(directory, exist_ok=True)
    md_path = os.path.join(directory, f"quality-{name}.md")
    png_name = f"quality-{name}-grafting.png"
    plot(suite, data, os.path.join(directory, png_name))
    models = data["models"]
    caps = suite.capabilities
    skills = paired.gain_skills(suite, data)
    tests = paired.seed_items(suite, data, "test")
    chosen = select(suite, data, skills, tests)
    curves = graft_curves(suite, data)
    invocation = data.get("invocation", {})
    metric_names = sorted(set(suite.metric.values()))
    test_rows = [models["base"]["test"][cap]["rows"] for cap in caps]
    unlearned = unlearned_capabilities(suite, models)
    seed = getattr(suite.settings, "seed", 0)
    table = Comparisons([tests], [{c["method"]: c for c in chosen}], [seed], skills)
    c = _Context(
        suite=suite,
        data=data,
        name=name,
        png_name=png_name,
        models=models,
        caps=caps,
        skills=skills,
        tests=tests,
        chosen=chosen,
        curves=curves,
        invocation=invocation,
        metric_names=metric_names,
        test_rows=test_rows,
        unlearned=unlearned,
        seed=seed,
        table=table,
    )
    out: List[str] = []
    for section in (_header, _results, _grids, _grafting, _run_time):
        out += section(c)
    with open(md_path, "w", encoding="utf-8") as fp:
        fp.write("\n".join(out))
    return md_path
