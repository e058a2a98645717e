"""Run ``mergekit-ota compare`` on a cached ``sft`` or ``full`` tier's experts (issue 28's evidence).

    python -m benchmarks.quality.via_compare --variant constant --cache /work/bench-cache/quality \\
        --out /work/bench-cache/compare-sft-constant -- --device cpu
    python -m benchmarks.quality.via_compare --tier full --variant "" --seed 1 \\
        --out /work/bench-cache/compare-full-seed1 -- --device cpu

From the tier's cached stages (nothing is trained: a missing expert checkpoint or curvature store is an error
naming it) this writes compare's two inputs into ``OUT-inputs/`` beside OUT:

* ``merge.yml``: a mergekit config naming the tier's base and its experts, each with the full curvature store
  the tier exported next to its training run, as the tier's own merges use them;
* ``heldout.jsonl``: the tier's held-out items of every capability.

  - ``sft``: its *test* items as chat rows (``{"task": skill, "expert": <the expert's directory name>,
    "messages": [user, assistant]}``), the same (message, answer) pairs the tier scores
    (``skills.Skill.items(test_items, "test", seed)``); compare splits them in two halves itself;
  - ``full``: its *validation* rows as compare's selection half and its *test* rows as the report half
    (``"half"``), so that both choose on the same rows and judge on the same rows: code and prose as
    ``{"text": ...}`` (the tier's 128-token rows decoded; every row is checked to tokenize back to the same ids),
    arithmetic as ``{"prompt": "a + b =", "completion": " c"}`` (the loss on the answer only, as in the tier);

then runs ``mergekit-ota compare merge.yml heldout.jsonl OUT`` with the options after ``--`` (the default method
set unless they say otherwise). OUT is compare's own: running this again resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import yaml

from benchmarks.quality import skills as chat
from benchmarks.quality.run import Pipeline, locate, make_parser
from benchmarks.quality.train import checkpoint_of


def tier_inputs(
    tier: str, variant: Optional[str], seed: int, cache: str
) -> Tuple[str, Dict[str, Tuple[str, str]], Any]:
    """``(base dir, {capability: (expert checkpoint dir, full curvature store)}, suite)`` of the cached tier.

    Raises :class:`SystemExit` naming what is missing when a stage is not cached (this never trains).
    """
    argv = ["--tier", tier, "--cache", cache, "--seed", str(seed)]
    if variant:
        argv += ["--variant", variant]
    suite, _, work, base_dir = locate(make_parser().parse_args(argv))
    if not os.path.isfile(os.path.join(base_dir, "model.safetensors")):
        raise SystemExit(f"the tier's base is not cached: {base_dir} (run benchmarks.quality.run first)")
    suite.build_base(base_dir, "cpu")  # cached: only records the base (the tokenizer is read from it)
    pipeline = Pipeline(suite, work, base_dir, "cpu", keep_models=False, seed=seed)
    experts: Dict[str, Tuple[str, str]] = {}
    missing: List[str] = []
    for skill in suite.capabilities:
        checkpoint = checkpoint_of(pipeline.run_dir(skill), suite.settings_of(skill).steps)
        store = pipeline.store_path(skill, "full")
        missing += [p for p in (os.path.join(checkpoint, "model.safetensors"), store) if not os.path.isfile(p)]
        experts[skill] = (checkpoint, store)
    if missing:
        raise SystemExit("stages not cached (this module does not train): " + ", ".join(missing))
    return base_dir, experts, suite


def merge_config(base: str, experts: Dict[str, Tuple[str, str]]) -> Dict[str, Any]:
    """A mergekit config naming ``base`` and every expert with its curvature store (compare sets the method)."""
    return {
        "merge_method": "linear",
        "base_model": base,
        "models": [
            {"model": checkpoint, "parameters": {"weight": 1.0, "curvature": store}}
            for checkpoint, store in experts.values()
        ],
        "dtype": "float32",
    }


def heldout_rows(suite: Any, experts: Dict[str, Tuple[str, str]], count: Optional[int]) -> List[Dict[str, Any]]:
    """The tier's held-out rows of every capability as compare's rows (see the module docstring)."""
    return sft_rows(suite, experts, count) if suite.tier == "sft" else full_rows(suite, experts)


def full_rows(suite: Any, experts: Dict[str, Tuple[str, str]]) -> List[Dict[str, Any]]:
    """The full tier's validation (selection half) and test (report half) rows, as text or prompt-completion
    rows; :class:`SystemExit` if a text row would not tokenize back to the tier's ids."""
    from benchmarks.quality.train import IGNORE

    tokenizer = suite.tokenizer
    rows: List[Dict[str, Any]] = []
    for domain in suite.capabilities:
        expert = experts[domain][0]  # the path: every expert's directory is checkpoint-<steps>
        for split, half in (("val", "selection"), ("test", "report")):
            for ids, labels in suite.eval_rows(domain, split):
                row: Dict[str, Any] = {"task": domain, "expert": expert, "half": half}
                if IGNORE in labels:  # arithmetic: the prompt unlabelled, the answer labelled
                    start = next(i for i, label in enumerate(labels) if label != IGNORE)
                    row["prompt"] = tokenizer.decode(ids[:start])
                    row["completion"] = tokenizer.decode(ids[start:])
                    again = list(tokenizer(row["prompt"], add_special_tokens=True)["input_ids"])
                    again += tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
                else:
                    row["text"] = tokenizer.decode(ids)
                    again = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
                if again != list(ids):
                    raise SystemExit(f"{domain} {split}: a row does not tokenize back to the tier's ids: {row}")
                rows.append(row)
    return rows


def sft_rows(suite: Any, experts: Dict[str, Tuple[str, str]], count: Optional[int]) -> List[Dict[str, Any]]:
    """The sft tier's test items of every skill (the first ``count``, default all it scores) as chat rows."""
    settings = suite.settings
    rows = []
    for skill in suite.capabilities:
        items = chat.skill(skill).items(count or settings.test_items, "test", settings.seed)
        expert = os.path.basename(os.path.normpath(experts[skill][0]))
        for message, answer in items:
            rows.append(
                {
                    "task": skill,
                    "expert": expert,
                    "messages": [{"role": "user", "content": message}, {"role": "assistant", "content": answer}],
                }
            )
    return rows


def write_inputs(directory: str, config: Dict[str, Any], rows: List[Dict[str, Any]]) -> Tuple[str, str]:
    """``merge.yml`` and ``heldout.jsonl`` in ``directory``; their paths."""
    os.makedirs(directory, exist_ok=True)
    config_path, data_path = os.path.join(directory, "merge.yml"), os.path.join(directory, "heldout.jsonl")
    with open(config_path, "w", encoding="utf-8") as fp:
        yaml.safe_dump(config, fp, sort_keys=False)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not os.path.isfile(data_path) or open(data_path, encoding="utf-8").read() != text:
        with open(data_path, "w", encoding="utf-8") as fp:  # rewritten only when it changes (compare's cache key)
            fp.write(text)
    return config_path, data_path


# per tier, the tier's method (its report's name) that each compare method is the same merge as, over the same
# grid (curvature_scale: mean is the package's default, which compare's ota/ota+ffg use; the tiers' plain "ota"
# rows are curvature_scale: none, and the full tier ran no "ota (scale: mean)")
SAME_AS_TIER = {
    "sft": {"ties": "ties", "ota": "ota (scale: mean)", "ota+ffg": "ota+ffg (model-wide, scale: mean)"},
    "full": {
        "linear": "linear",
        "task_arithmetic": "task_arithmetic",
        "ties": "ties",
        "dare_ties": "dare_ties",
        "ota+ffg": "ota+ffg (model-wide, scale: mean)",
        "ffg+consensus": "ffg (sign consensus)",
    },
}


def tier_verdicts(
    suite: Any, data: Dict[str, Any], metric: str, reference: Optional[str] = None
) -> Dict[str, Dict[str, Any]]:
    """The tier's own verdicts from its ``results.json`` (``data``): per method, its point chosen on validation by
    the tier's headline (its choice), its test G under ``metric`` (``exact_match`` or ``loss``) and the paired
    bootstrap difference from ``reference`` (default: the tier's best baseline; the tier's ``paired``/``compare``)."""
    import dataclasses

    from benchmarks.quality import paired
    from benchmarks.quality.compare import Comparisons

    choices = paired.choose(suite, data)  # on validation, by the tier's headline
    scored = (
        suite
        if all(suite.headline.get(c) == metric for c in suite.capabilities)
        else dataclasses.replace(suite, headline=dict.fromkeys(suite.capabilities, metric))
    )
    skills = paired.gain_skills(scored, data)
    table = Comparisons([paired.seed_items(scored, data, "test")], [choices], [0], skills)
    ref = reference or table.reference
    out: Dict[str, Dict[str, Any]] = {}
    for method in table.methods:
        entry: Dict[str, Any] = {"label": choices[method]["label"], "skills": skills, "reference": ref}
        entry["G"] = table.gain(table.keys_of(method)).pooled
        if method != ref:
            entry["versus"] = table.diff(table.keys_of(method), table.keys_of(ref)).pooled
        out[method] = entry
    return out


def compare_verdicts(results: Dict[str, Any], statistic: str, reference: Optional[str] = None) -> Dict[str, Any]:
    """compare's verdicts rebuilt from its ``results.json``: loss-based (``statistic="loss"``: compare's own
    headline, :func:`mergekit_ota.compare.summary.summarize`) or exact-match G (``"exact"``: the same halves,
    choices and bootstrap on each row's greedy exact match); against ``reference`` when given, else compare's
    reference (its best baseline on the selection half)."""
    import numpy as np

    from mergekit_ota.compare import select, stats
    from mergekit_ota.compare.dataset import REPORT, SELECTION

    rows = results["rows"]
    points = [m for m in results["models"] if m["kind"] == "point"]
    by_path = {m["path"]: m for m in results["models"] if m["kind"] in ("base", "expert")}

    def seed(half: str) -> Dict[str, Dict[str, np.ndarray]]:
        index = {c: [i for i, r in enumerate(rows) if r["capability"] == c and r["half"] == half] for c in caps}

        def items(model: Dict[str, Any]) -> Dict[str, np.ndarray]:
            s = model["scores"]
            if statistic == "exact":
                return {c: np.asarray([float(s["exact"][i]) for i in idx]) for c, idx in index.items()}
            return {
                c: stats.ratio_items([s["nats"][i] for i in idx], [s["tokens"][i] for i in idx])
                for c, idx in index.items()
            }

        out = {"base": items(by_path[results["base"]])}
        out.update({stats.expert_key(c): items(by_path[p]) for c, p in results["experts"].items()})
        out.update({m["name"]: items(m) for m in points})
        return out

    caps = list(results["capabilities"])
    selection, report = seed(SELECTION), seed(REPORT)
    lower = statistic != "exact"
    gains = select.gain_capabilities(selection, caps, lower_is_better=lower)
    chosen = select.choose(selection, [(m["method"], m["name"]) for m in points], gains)
    baselines = [m["name"] for m in results["methods"] if m["baseline"]]
    ref = reference or select.reference(chosen, baselines)
    replicates, random_seed = int(results["options"]["replicates"]), int(results["options"]["seed"])
    by_name = {m["name"]: m for m in points}
    out: Dict[str, Any] = {}
    for method, (key, value) in chosen.items():
        entry: Dict[str, Any] = {
            "label": by_name[key]["setting"],
            "skills": gains,
            "reference": ref,
            "selection": value,
        }
        entry["G"] = stats.gain_estimate([report], [key], gains, replicates, random_seed).pooled
        if method != ref and ref in chosen:
            entry["versus"] = stats.compare([report], key, chosen[ref][0], gains, replicates, random_seed).pooled
        entry["merge_seconds"], entry["score_seconds"] = by_name[key]["merge_seconds"], by_name[key]["score_seconds"]
        out[method] = entry
    return out


def timings(out: str) -> str:
    """Markdown: each model compare scored (its ``results.json``, else the points cached so far in ``OUT/cache``)
    with its merge and scoring seconds, and the totals."""
    path = os.path.join(out, "results.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fp:
            models = json.load(fp)["models"]
    else:  # a partial run: the cache, in the order it was written
        folder = os.path.join(out, "cache")
        names = sorted(os.listdir(folder), key=lambda n: os.path.getmtime(os.path.join(folder, n)))
        models = []
        for name in names:
            with open(os.path.join(folder, name), encoding="utf-8") as fp:
                models.append(json.load(fp))
    lines = ["| model | setting | merge s | score s | total s |", "|---|---|---|---|---|"]
    merge_total = score_total = 0.0
    for model in models:
        merge, score = model.get("merge_seconds") or 0.0, model.get("score_seconds") or 0.0
        merge_total, score_total = merge_total + merge, score_total + score
        name = model.get("method") or f"{model['kind']} {os.path.basename(os.path.dirname(model['path']))}"
        if model["kind"] == "base":
            name = "base"
        lines.append(f"| {name} | {model.get('setting', '')} | {merge:.1f} | {score:.1f} | {merge + score:.1f} |")
    points = [m for m in models if m["kind"] == "point"]
    lines.append(
        f"| **all {len(models)} models ({len(points)} grid points)** | | {merge_total:.0f} | {score_total:.0f} | "
        f"{merge_total + score_total:.0f} |"
    )
    return "\n".join(lines)


# per tier, the statistics compared: (compare's name, the tier's name); the full tier's headline is loss, and its
# exact match exists for arithmetic only
STATISTICS = {"sft": (("loss", "loss"), ("exact", "exact_match")), "full": (("loss", "loss"),)}


def agreement(tier: str, cache: str, variant: Optional[str], seed: int, out: str) -> str:
    """Markdown: per method both have, compare's verdicts (against its own reference and against ties) beside the
    tier's (against its own reference and against ties), for each statistic of :data:`STATISTICS`."""
    argv = ["--tier", tier, "--cache", cache, "--seed", str(seed)] + (["--variant", variant] if variant else [])
    suite, _, work, base_dir = locate(make_parser().parse_args(argv))
    suite.build_base(base_dir, "cpu")
    with open(os.path.join(work, "results.json"), encoding="utf-8") as fp:
        tier_results = json.load(fp)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as fp:
        results = json.load(fp)
    columns: List[Tuple[str, Dict[str, Any], bool]] = []  # (header, verdicts by method, is the tier's)
    for ours, theirs in STATISTICS[tier]:
        own = compare_verdicts(results, ours)
        tier_own = tier_verdicts(suite, tier_results, theirs)
        reference, tier_reference = next(iter(own.values()))["reference"], next(iter(tier_own.values()))["reference"]
        columns += [
            (f"compare, {ours} G vs its reference ({reference})", own, False),
            (f"compare, {ours} G vs ties", compare_verdicts(results, ours, "ties"), False),
            (f"tier, {ours} G vs its reference ({tier_reference})", tier_own, True),
            (f"tier, {ours} G vs ties", tier_verdicts(suite, tier_results, theirs, "ties"), True),
        ]

    def cell(entry: Optional[Dict[str, Any]]) -> str:
        if entry is None:
            return "not run"
        versus = entry.get("versus")
        text = f"{entry['label']}: G {entry['G'].value:.3f}"
        return text + (f"; {versus.text()} **{versus.verdict}**" if versus else " (reference)")

    lines = ["| method | " + " | ".join(h for h, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in columns[0][1]:
        same = SAME_AS_TIER[tier].get(method)
        cells = [
            cell(table.get(same) if same else None) if is_tier else cell(table.get(method))
            for _, table, is_tier in columns
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Gain capabilities: " + "; ".join(f"{h}: {next(iter(t.values()))['skills']}" for h, t, _ in columns)]
    ours, theirs = STATISTICS[tier][0]
    lines += [
        "",
        f"The tier's methods (its own verdicts, {theirs} G, test half, against its reference):",
        "",
        "| tier method | chosen on validation | test G [95%] | minus its reference [95%] | verdict |",
        "|---|---|---|---|---|",
    ]
    for method, entry in tier_verdicts(suite, tier_results, theirs).items():
        versus = entry.get("versus")
        lines.append(
            f"| {method} | {entry['label']} | {entry['G'].text(signed=False)} | "
            f"{versus.text() if versus else 'reference'} | {versus.verdict if versus else ''} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Write compare's inputs from the cached tier and run compare; its exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", default="sft", choices=("sft", "full"), help="the cached tier")
    parser.add_argument("--variant", default="constant", help="the sft tier's variant (tiers.SFT_VARIANTS; '' none)")
    parser.add_argument("--seed", type=int, default=0, help="the tier's training seed")
    parser.add_argument("--cache", default="/work/bench-cache/quality", help="the tier's cache root")
    parser.add_argument("--out", default="/work/bench-cache/compare-sft-constant", help="compare's OUT")
    parser.add_argument("--rows", type=int, default=None, help="test rows per skill (default: the tier's count)")
    parser.add_argument("--inputs-only", action="store_true", help="write the inputs, do not run compare")
    parser.add_argument(
        "--agreement", action="store_true", help="print compare's verdicts beside the tier's (after compare ran)"
    )
    parser.add_argument("compare_args", nargs="*", help="after --: options for mergekit-ota compare")
    args = parser.parse_args(argv)

    if args.agreement:
        print(timings(args.out) + "\n")
        print(agreement(args.tier, args.cache, args.variant or None, args.seed, args.out))
        return 0
    base, experts, suite = tier_inputs(args.tier, args.variant or None, args.seed, args.cache)
    config_path, data_path = write_inputs(
        os.path.normpath(args.out) + "-inputs", merge_config(base, experts), heldout_rows(suite, experts, args.rows)
    )
    print(f"inputs: {config_path}, {data_path}", flush=True)
    if args.inputs_only:
        return 0
    command = [sys.executable, "-m", "mergekit_ota.cli.main", "compare", config_path, data_path, args.out]
    command += args.compare_args
    print("$ " + shlex.join(command), flush=True)
    started = time.perf_counter()
    status = subprocess.call(command)
    print(f"compare exited {status} after {time.perf_counter() - started:.0f}s", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
