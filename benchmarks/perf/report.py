"""Summaries of benchmark results and the markdown report (every number comes from the results).

Results (``Run``) are plain JSON-able dicts: per block (size tier x number of experts),
per variant, one measurement dict per repeat (see :mod:`benchmarks.perf.child`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.perf.variants import REFERENCE, VARIANTS

GIB = 2**30
MIB = 2**20

# (variant, reference, limit): median wall time of variant / reference <= limit
TIME_TARGETS: Tuple[Tuple[str, str, float], ...] = (
    ("ota", "task_arithmetic", 1.5),
    ("ota_rank1", "task_arithmetic", 1.15),
    ("ffg", "dare_ties", 1.0),
    ("ffg", "ties", 0.4),
    ("ota_ffg_tensor", "dare_ties", 1.0),
    ("ota_ffg_tensor", "ties", 0.4),
    ("ota_ffg_model", "ota_ffg_tensor", 2.0),
    ("ota_ffg_model_consensus", "ota_ffg_model", 1.2),  # sign consensus: at most one extra pass over kept entries
    ("ota_ffg_model_consensus", "ties", 0.5),
    ("ota", "ota_scale_none", 1.5),  # the default curvature_scale (mean): one more read of the curvature, no weights
    ("ota_scale_median", "task_arithmetic", 1.5),  # as ota's own target
)
CURVATURE_VARIANTS = (
    "ota",
    "ota_scale_none",
    "ota_scale_median",
    "ota_rank1",
    "ota_ffg_tensor",
    "ota_ffg_model",
    "ota_ffg_model_consensus",
    "ffg",
)
TARGET_SIZE = "500M"
TARGET_EXPERTS = 2


def median(block: Dict[str, Any], variant: str, key: str = "merge_s") -> Optional[float]:
    runs = block["runs"].get(variant)
    return statistics.median(r[key] for r in runs) if runs else None


def best(block: Dict[str, Any], variant: str, key: str = "merge_s") -> Optional[float]:
    """The smallest value over the repeats: the least disturbed run on a shared machine."""
    runs = block["runs"].get(variant)
    return min(r[key] for r in runs) if runs else None


def anon_allowance(block: Dict[str, Any]) -> int:
    """``2 x experts x largest tensor in fp32 bytes``: the memory target's allowance over task_arithmetic."""
    return 2 * block["n_experts"] * 4 * block["largest_tensor"]


def time_targets(block: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each wall-time target that this block can evaluate, with the measured ratio."""
    rows = []
    for variant, reference, limit in TIME_TARGETS:
        a, b = median(block, variant), median(block, reference)
        if a is not None and b is not None:
            cpu = median(block, variant, "cpu_s") / median(block, reference, "cpu_s")
            fastest = best(block, variant) / best(block, reference)
            rows.append(
                {
                    "what": f"{variant} / {reference} wall time",
                    "limit": f"<= {limit:g}x",
                    "measured": f"{a / b:.2f}x",
                    "cpu": f"{cpu:.2f}x",
                    "best": f"{fastest:.2f}x",
                    "ok": a / b <= limit,
                }
            )
    return rows


def memory_targets(block: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Peak anonymous RSS of each ota/ffg variant against task_arithmetic's plus the allowance."""
    reference = median(block, REFERENCE, "peak_anon")
    if reference is None:
        return []
    limit = reference + anon_allowance(block)
    rows = []
    for variant in CURVATURE_VARIANTS:
        peak = median(block, variant, "peak_anon")
        if peak is not None:
            rows.append(
                {
                    "what": f"{variant} peak anon RSS",
                    "limit": f"<= {limit / MIB:.0f} MiB",
                    "measured": f"{peak / MIB:.0f} MiB",
                    "cpu": "",
                    "best": "",
                    "ok": peak <= limit,
                }
            )
    return rows


def size_fit(points: Sequence[Tuple[int, float]]) -> Optional[Dict[str, float]]:
    """Least-squares ``t = a + b * N`` over (parameters N, seconds t), the log-log slope, worst residual."""
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    lmx, lmy = statistics.fmean(lx), statistics.fmean(ly)
    slope = sum((x - lmx) * (y - lmy) for x, y in zip(lx, ly)) / sum((x - lmx) ** 2 for x in lx)
    residual = max(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    return {"a": a, "b": b, "slope": slope, "residual": residual}


def _fmt_bytes(value: Optional[float], unit: int = GIB) -> str:
    return "" if value is None else f"{value / unit:.2f}"


def _block_title(block: Dict[str, Any]) -> str:
    return f"{block['size']} ({block['parameters'] / 1e6:.1f}M parameters), base + {block['n_experts']} experts"


def block_table(block: Dict[str, Any]) -> List[str]:
    reference = median(block, REFERENCE)
    lines = [
        f"### {_block_title(block)}",
        "",
        "| method | merge s (median) | min - max | x task_arithmetic | fastest x task_arithmetic | CPU s "
        "| CPU x task_arithmetic | import s "
        "| peak RSS GiB | peak anon GiB | input GiB | rchar GiB | read_bytes GiB | minor faults (M) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference_cpu = median(block, REFERENCE, "cpu_s")
    for variant, runs in block["runs"].items():
        times = [r["merge_s"] for r in runs]
        t = statistics.median(times)
        ratio = f"{t / reference:.2f}" if reference else ""
        fastest = f"{min(times) / best(block, REFERENCE):.2f}" if reference else ""
        cpu = median(block, variant, "cpu_s")
        cpu_ratio = f"{cpu / reference_cpu:.2f}" if reference_cpu else ""
        cold = "" if all(r.get("warmed", True) for r in runs) else " *"
        lines.append(
            f"| {VARIANTS[variant].label} | {t:.2f}{cold} | {min(times):.2f} - {max(times):.2f} | {ratio} | {fastest} "
            f"| {cpu:.2f} | {cpu_ratio} "
            f"| {median(block, variant, 'import_s'):.1f} | {_fmt_bytes(median(block, variant, 'peak_rss'))} "
            f"| {_fmt_bytes(median(block, variant, 'peak_anon'))} | {_fmt_bytes(block['input_bytes'][variant])} "
            f"| {_fmt_bytes(median(block, variant, 'rchar'))} | {_fmt_bytes(median(block, variant, 'read_bytes'))} "
            f"| {median(block, variant, 'minor_faults') / 1e6:.2f} |"
        )
    return lines + [""]


def _targets_section(blocks: Sequence[Dict[str, Any]]) -> List[str]:
    candidates = [b for b in blocks if b["n_experts"] == TARGET_EXPERTS]
    target = next((b for b in candidates if b["size"] == TARGET_SIZE), None)
    if target is None and candidates:
        target = max(candidates, key=lambda b: b["parameters"])
    if target is None:
        return []
    rows = time_targets(target) + memory_targets(target)
    if not rows:
        return []
    lines = [
        f"## Targets ({_block_title(target)})",
        "",
        f"Memory allowance over task_arithmetic: 2 x {target['n_experts']} experts x largest tensor "
        f"({target['largest_tensor'] / 1e6:.1f}M elements, fp32) = {anon_allowance(target) / MIB:.0f} MiB.",
        "",
        "Measured: ratio of medians (what the target is judged on); beside it the ratio of median CPU times "
        "and of the fastest runs (least disturbed by other load).",
        "",
        "| target | limit | measured | CPU-time ratio | fastest-run ratio | met |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['what']} | {r['limit']} | {r['measured']} | {r['cpu']} | {r['best']} | {'yes' if r['ok'] else '**no**'} "
        "|"
        for r in rows
    ]
    return lines + [""]


def _scaling_section(blocks: Sequence[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    by_experts: Dict[int, List[Dict[str, Any]]] = {}
    for block in blocks:
        by_experts.setdefault(block["n_experts"], []).append(block)
    size_rows = []
    for n_experts, group in sorted(by_experts.items()):
        group = sorted(group, key=lambda b: b["parameters"])
        if len(group) < 2:
            continue
        for variant in VARIANTS:
            points = [(b["parameters"], best(b, variant)) for b in group if best(b, variant) is not None]
            fit = size_fit(points)
            if fit is None:
                continue
            per_param = " / ".join(f"{t / n * 1e9:.1f}" for n, t in points)
            size_rows.append(
                f"| {VARIANTS[variant].label} | {n_experts} | {per_param} | {fit['a']:.2f} | {fit['b'] * 1e9:.1f} "
                f"| {fit['slope']:.2f} | {fit['residual'] * 100:.0f}% |"
            )
    if size_rows:
        sizes = " / ".join(dict.fromkeys(b["size"] for b in sorted(blocks, key=lambda b: b["parameters"])))
        lines += [
            "## Time against model size",
            "",
            "Fastest run of each method (the least disturbed by other load; medians mix in how busy the shared "
            "machine was), per size: time per parameter, the least-squares fit `t = a + b * N` (N parameters "
            "per model; `a` is the fixed cost: planning, opening files, writing the config), the log-log slope "
            "(1 = linear) and the largest relative residual of the linear fit.",
            "",
            f"| method | experts | fastest run, ns per parameter ({sizes}) | a (s) | b (ns/param) | log-log slope | "
            "max residual |",
            "|---|---|---|---|---|---|---|",
            *size_rows,
            "",
        ]
    expert_rows = []
    by_size: Dict[str, List[Dict[str, Any]]] = {}
    for block in blocks:
        by_size.setdefault(block["size"], []).append(block)
    for size, group in by_size.items():
        group = sorted(group, key=lambda b: b["n_experts"])
        for low, high in zip(group, group[1:]):
            for variant in VARIANTS:
                t_low, t_high = best(low, variant), best(high, variant)
                if t_low is None or t_high is None:
                    continue
                inputs = (high["n_experts"] + 1) / (low["n_experts"] + 1)
                per_expert = (t_high - t_low) / (high["n_experts"] - low["n_experts"])
                expert_rows.append(
                    f"| {VARIANTS[variant].label} | {size} | {low['n_experts']} -> {high['n_experts']} "
                    f"| {t_low:.2f} -> {t_high:.2f} | {t_high / t_low:.2f} | {inputs:.2f} | {per_expert:.2f} |"
                )
    if expert_rows:
        lines += [
            "## Time against number of experts",
            "",
            "Fastest runs again. Time linear in the number of experts, `t = c_0 + n * c_expert` (`c_0`: fixed "
            "costs and the base), gives a time ratio between 1 and the experts ratio (2 for 2 -> 4): near the "
            "inputs ratio (base + experts) when the base costs as much as an expert, nearer 2 when per-expert "
            "work (masks, curvature) dominates; above 2 would be worse than linear. The last column is the "
            "added time per added expert.",
            "",
            "| method | size | experts | fastest merge s | time ratio | inputs ratio | s per added expert |",
            "|---|---|---|---|---|---|---|",
            *expert_rows,
            "",
        ]
    return lines


def method_text(run: Dict[str, Any]) -> str:
    """How the numbers were taken (one paragraph)."""
    warm = (
        "Before each merge whose input files fit in half the RAM, the parent reads them once, so the merge "
        "starts with its inputs in the page cache (read_bytes shows what still came from disk; larger "
        "inputs, marked * after their time, are read from disk as they would be in practice). "
        if run.get("warm")
        else "The page cache was not warmed before each merge (--no-warm). "
    )
    return (
        "Each merge runs in its own fresh process (`benchmarks/perf/child.py`) that imports torch, "
        "mergekit and mergekit_ota first (import s, reported apart), then calls "
        "`mergekit.merge.run_merge` in process with `MergeOptions(quiet=True, copy_tokenizer=False, "
        f"out_shard_size={run['out_shard_size']})`, fp32 throughout. Methods alternate within each "
        f"repeat (order rotated per repeat); {run['repeats']} repeat(s), medians shown. {warm}"
        "Peak RSS is `VmHWM` reset after the imports (file-backed mmap pages of the inputs count "
        "there); peak anon is the highest `RssAnon` sampled every 5 ms. CPU s is user + system time of "
        "the merge (all threads), much less sensitive than wall time to other load on the machine; minor "
        "faults count pages first touched (fresh allocations and mmap'd inputs). input GiB is the size of the "
        "files the merge reads (weights, plus curvature stores for ota/ffg); rchar and read_bytes come "
        "from `/proc/self/io` (safetensors reads through mmap, so rchar misses most of it, and "
        "read_bytes is zero when the page cache holds the files). ties, dare_ties and FFG keep "
        "density 0.2; ota/ffg read each expert's full fp32 `exp_avg_sq` store unless marked rank-1."
    )


def markdown(run: Dict[str, Any], notes: Optional[str] = None) -> str:
    """The full report."""
    machine = run["machine"]
    lines = [
        "# Merge speed and memory: ota / ffg against mergekit's methods",
        "",
        f"Generated by `{run['command']}` on {machine['date']} "
        + (f"({run['wall_s'] / 60:.1f} min in all). " if "wall_s" in run else "(interrupted: partial results). ")
        + "Do not edit by hand: rerun the command.",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in machine.items() if key != "date"],
        f"| 1-min load average | {run['load_start']:.2f} at start, "
        + (f"{run['load_end']:.2f} at end |" if "load_end" in run else "(no end) |"),
        "",
        method_text(run),
        "",
    ]
    lines += _targets_section(run["blocks"])
    lines += ["## Results", ""]
    for block in sorted(run["blocks"], key=lambda b: (b["n_experts"], b["parameters"])):
        lines += block_table(block)
    lines += _scaling_section(run["blocks"])
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)
