"""What ``compare`` writes into OUT from its results: ``results.json``, ``report.md``, ``best.yml``, the figure."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, List, Mapping

import numpy as np

from mergekit_ota.compare import stats
from mergekit_ota.compare.select import MIN_GAIN
from mergekit_ota.compare.summary import MIN_VERDICT_ROWS, Summary, summarize

RESULTS_JSON, REPORT_MD, BEST_YML, FIGURE_PNG = "results.json", "report.md", "best.yml", "compare.png"


def _estimate(estimate: stats.Estimate, signed: bool = False) -> str:
    if np.isnan(estimate.value):
        return "n/a"
    return estimate.text(3, signed)


def mergekit_yaml_line(results: Mapping[str, Any]) -> str:
    """The ``mergekit-yaml`` command that reproduces ``best.yml``'s merge as compare merged it."""
    options = results["merge_options"]
    extra = []
    if options.get("random_seed") is not None:
        extra.append(f"--random-seed {options['random_seed']}")
    if options.get("device") not in (None, "cpu"):
        extra.append(f"--device {options['device']}")
    return " ".join(["mergekit-yaml best.yml MERGED_DIR", *extra])


def render(results: Mapping[str, Any], summary: Summary) -> str:
    """``report.md``: the verdict table, every model's loss, the costs, and how to read them."""
    gain = summary.statistic == stats.GAIN
    name = "G" if gain else "loss"
    caps = list(results["capabilities"])
    reference = summary.reference or "(none)"
    baseline = any(r.baseline for r in summary.methods)
    lines = [
        "# mergekit-ota compare",
        "",
        f"CONFIG `{results['config']}`, DATA `{results['data']}` "
        f"({len(results['rows'])} rows; per capability, selection / report rows: "
        + ", ".join(f"{c} {n['selection']}/{n['report']}" for c, n in summary.rows.items())
        + ").",
        "",
        (
            f"Statistic: **G**, the gain kept, `(loss_base - loss_merged) / (loss_base - loss_expert)` per capability "
            f"against its own expert, averaged over {', '.join(summary.capabilities)}; higher is better."
            if gain
            else f"Statistic: **mean held-out loss** (nats per labelled token, averaged over capabilities "
            f"{', '.join(summary.capabilities)}); lower is better."
        ),
    ]
    if summary.skipped:
        lines.append(
            f"G is n/a on {', '.join(summary.skipped)}: the expert does not beat the base there by "
            f"{MIN_GAIN:g} nats per token on the selection half (the loss is shown instead"
            + (", left out of the mean)." if gain else ").")
        )
    lines += [
        "Each method's setting was chosen on the selection half; the reference, "
        + (
            "the best baseline (mergekit's own methods) there too"
            if baseline
            else "with no baseline compared, the best method there"
        )
        + f": **{reference}**. On the report half, `vs {reference}` is the paired difference (positive: better than "
        f"the reference) with its 95% paired bootstrap interval over rows ({results['options']['replicates']} "
        "replicates); the verdict says **win** or **loss** only when the interval excludes 0.",
        "",
    ]
    if summary.thin:
        lines += [
            f"**No verdicts (n/a):** {_thin(summary)}; a verdict needs at least {MIN_VERDICT_ROWS} report-half rows "
            "per capability (a bootstrap over fewer rows gives intervals that are too narrow). Give DATA more rows.",
            "",
        ]
    exact = any(r.exact is not None for r in summary.methods)
    per_cap = [f"G {c}" if gain and c in summary.capabilities else f"loss {c}" for c in caps]
    header = ["method", "chosen setting", *per_cap, f"{name} mean", f"vs {reference} (95%)"]
    header += ["verdict"] + (["exact match (answer rows)"] if exact else []) + ["merge s", "score s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in summary.methods:
        model = result.model
        cells = [
            result.method + (" (baseline)" if result.baseline else ""),
            model["setting"],
            *[_estimate(result.per_capability[c]) for c in caps],
            _estimate(result.value),
            "reference" if result.versus is None else _estimate(result.versus, signed=True),
            summary.verdict(result),
        ]
        if exact:
            cells.append("" if result.exact is None else f"{result.exact:.3f}")
        cells += [f"{model.get('merge_seconds', 0.0):.1f}", f"{model.get('score_seconds', 0.0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Winner on the report half: **{summary.winner}**; its config is `best.yml`:", ""]
    lines += [f"    {mergekit_yaml_line(results)}", ""]
    lines += ["## Held-out loss of every model (report half, nats per labelled token)", ""]
    lines += ["| model | " + " | ".join(caps) + " |", "|" + "---|" * (len(caps) + 1)]
    for model_name, losses in summary.losses.items():
        lines.append(f"| {model_name} | " + " | ".join(f"{losses[c]:.4f}" for c in caps) + " |")
    points = [m for m in results["models"] if m["kind"] == "point"]
    merged = [m for m in points if not m.get("cached")]
    lines += [
        "",
        "## Costs",
        "",
        f"{len(points)} grid points: {len(merged)} merged in this run, {len(points) - len(merged)} from the cache; "
        f"merge {sum(m['merge_seconds'] for m in merged):.1f} s, scoring "
        f"{sum(m['score_seconds'] for m in merged):.1f} s in this run (each point's own times are in results.json).",
        "",
    ]
    return "\n".join(lines)


def write_best(path: str, results: Mapping[str, Any], summary: Summary) -> None:
    """``best.yml``: the winner's chosen config, as ``mergekit-yaml`` reads it."""
    import yaml

    from mergekit_ota.io.atomic import write_text

    winner = next(r for r in summary.methods if r.method == summary.winner)
    header = (
        f"# mergekit-ota compare: {winner.method}, best on the report half of {results['data']}, at its setting "
        f"chosen on the selection half ({winner.model['setting']})\n# merge it with: {mergekit_yaml_line(results)}\n"
    )
    write_text(path, header + yaml.safe_dump(winner.model["config"], sort_keys=False))


def write_figure(path: str, results: Mapping[str, Any], summary: Summary) -> bool:
    """Per-capability G (or loss) of each method at its chosen point, 95% intervals as error bars; False when
    matplotlib is not installed (nothing written)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    caps = list(results["capabilities"])
    methods = summary.methods
    figure = Figure(figsize=(1.6 + 1.1 * len(caps) * max(1, len(methods)) / 2, 3.6), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(methods))
    for number, result in enumerate(methods):
        xs, ys, low, high = [], [], [], []
        for position, capability in enumerate(caps):
            estimate = result.per_capability[capability]
            xs.append(position + (number - (len(methods) - 1) / 2) * width)
            ys.append(estimate.value)
            low.append(max(0.0, estimate.value - estimate.low))
            high.append(max(0.0, estimate.high - estimate.value))
        axes.bar(xs, ys, width, yerr=[low, high], capsize=2, label=result.method)
    axes.set_xticks(range(len(caps)), caps)
    axes.set_ylabel("G (gain kept)" if summary.statistic == stats.GAIN else "held-out loss")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.legend(fontsize="small", frameon=False)
    axes.set_title("report half, 95% row-bootstrap intervals", fontsize="small")
    figure.savefig(path)
    return True


def write_outputs(root: str, results: Mapping[str, Any], log: Callable[[str], None]) -> Summary:
    """Write ``results.json``, then from it ``report.md``, ``best.yml`` and the figure into ``root``."""
    from mergekit_ota.io.atomic import write_text

    write_text(os.path.join(root, RESULTS_JSON), json.dumps(results, indent=1))
    summary = summarize(results)
    text = render(results, summary)
    notes: List[str] = []
    if not write_figure(os.path.join(root, FIGURE_PNG), results, summary):
        from mergekit_ota.analysis.report import ANALYZE_EXTRA

        notes.append(f"no figure: matplotlib is not installed ({ANALYZE_EXTRA}); the report and results are written")
        log(notes[-1])
    else:
        text += f"\n![per-capability {summary.statistic} by method]({FIGURE_PNG})\n"
    write_text(os.path.join(root, REPORT_MD), text)
    if summary.thin:
        log(f"no verdicts: {_thin(summary)} (a verdict needs at least {MIN_VERDICT_ROWS} per capability)")
    if summary.winner is not None:
        write_best(os.path.join(root, BEST_YML), results, summary)
    return summary


def _thin(summary: Summary) -> str:
    """Which capabilities have too few report-half rows, e.g. ``"report-half rows: up 4, down 3"``."""
    return "report-half rows: " + ", ".join(f"{c} {n}" for c, n in summary.thin.items())
