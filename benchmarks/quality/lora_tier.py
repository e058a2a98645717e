"""The ``sft`` tier with LoRA experts, through ``mergekit-ota compare`` (issue 29's second measurement).

    python -m benchmarks.quality.lora_tier --seed 0 [--stage train|compare] -- --device cpu --dtype bfloat16

The ``sft`` tier's ``constant`` variant (its base, skills, steps, training rows and held-out test items), with each
skill trained as a **LoRA** expert instead (:func:`benchmarks.quality.lora_estimate.train_lora`: PEFT ``r=16``,
``lora_alpha=32``, every linear layer, the tier's Trainer set-up at ``--lr``), then per expert

* its adapter-derived curvature (``mergekit-ota export CHECKPOINT --model BASE``: ``estimate.safetensors``), and
* the data Fisher of the folded expert on its first ``--fisher-rows`` training items (``mergekit-ota fisher
  BASE+ADAPTER``: ``fisher-N.safetensors``),

and two ``compare`` runs over the experts named ``BASE+ADAPTER`` on the tier's test items (200 a skill, compare's
own selection/report halves):

* ``OUT-estimate``: compare's default method set, ``ota``/``ota+ffg``/``ffg+consensus`` on the estimate;
* ``OUT-fisher``: ``linear``, ``task_arithmetic``, ``ota`` and ``ota+ffg`` on the data Fisher (the baselines again,
  so that each run draws its verdicts against its own best baseline from the same rows).

Every stage is cached (training runs in ``--out``, stores beside them, compare's own cache in each OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from benchmarks.quality import skills as chat
from benchmarks.quality.lora_estimate import train_lora
from benchmarks.quality.via_compare import sft_rows, write_inputs

FISHER_METHODS = "linear,task_arithmetic,ota,ota+ffg"


def experts(args: argparse.Namespace) -> Tuple[str, Dict[str, Tuple[str, str, str]], object]:
    """``(base dir, {skill: (checkpoint, estimate store, fisher store)}, suite)``, training what is not cached."""
    from benchmarks.quality import run
    from mergekit_ota.cli.main import main as cli
    from mergekit_ota.fisher import FisherOptions, fisher_store

    argv = ["--tier", "sft", "--variant", "constant", "--cache", args.cache, "--seed", str(args.seed)]
    suite, _, _, base_dir = run.locate(run.make_parser().parse_args(argv))
    suite.build_base(base_dir, "cpu")
    found: Dict[str, Tuple[str, str, str]] = {}
    for skill in suite.capabilities:
        settings = suite.settings_of(skill).model_copy(update={"learning_rate": args.lr})
        seed = f"-seed{args.seed}" if args.seed else ""
        run_dir = os.path.join(args.out, f"{skill}-r{args.rank}-lr{args.lr:g}{seed}")
        started = time.perf_counter()
        checkpoint, info = train_lora(
            base_dir, suite.expert_rows(skill), run_dir, settings, suite.tokenizer, suite.train_options, args.rank
        )
        print(f"{skill}: {checkpoint} loss {info['first_loss']:.3f} -> {info['last_loss']:.3f}", flush=True)
        estimate = os.path.join(run_dir, "estimate.safetensors")
        if not os.path.exists(estimate):
            cli.main(
                ["export", checkpoint, estimate, "--model", base_dir, "--quiet"], "mergekit-ota", standalone_mode=False
            )
        fisher = os.path.join(run_dir, f"fisher-{args.fisher_rows}.safetensors")
        if not os.path.exists(fisher):
            data = os.path.join(run_dir, "fisher-data.jsonl")
            with open(data, "w", encoding="utf-8") as fp:
                for message, answer in chat.skill(skill).items(args.fisher_rows, "train", suite.settings.seed):
                    turns = [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
                    fp.write(json.dumps({"messages": turns}) + "\n")
            fisher_store(
                f"{base_dir}+{checkpoint}",
                data,
                fisher,
                FisherOptions(samples=args.fisher_rows, batch_size=settings.batch_size, max_length=256, force=True),
            )
        print(f"{skill}: stores ready ({time.perf_counter() - started:.0f} s)", flush=True)
        found[skill] = (checkpoint, estimate, fisher)
    return base_dir, found, suite


def config(base: str, found: Dict[str, Tuple[str, str, str]], which: int) -> Dict[str, object]:
    """A mergekit config over the LoRA experts (``BASE+ADAPTER``), each with store ``which`` (1 estimate, 2 Fisher)."""
    return {
        "merge_method": "linear",
        "base_model": base,
        "models": [
            {"model": f"{base}+{entry[0]}", "parameters": {"weight": 1.0, "curvature": entry[which]}}
            for entry in found.values()
        ],
        "dtype": "float32",
    }


def combined(prefix: str) -> Dict[str, object]:
    """The two runs' results as one (the same rows and halves: checked), the Fisher run's ota points renamed
    ``<method> (data Fisher)`` beside the estimate run's, so that every method is compared on the same rows."""
    with open(f"{prefix}-estimate/results.json", encoding="utf-8") as fp:
        estimate = json.load(fp)
    with open(f"{prefix}-fisher/results.json", encoding="utf-8") as fp:
        fisher = json.load(fp)

    def rows(results: Dict[str, object]) -> List[Tuple[str, str]]:  # origin names each run's own copy of DATA
        return [(r["capability"], r["half"], r["origin"].rsplit(":", 1)[-1]) for r in results["rows"]]

    if rows(estimate) != rows(fisher):
        raise SystemExit("the two compare runs scored different rows or halves")
    out = dict(estimate)
    extra = []
    for model in fisher["models"]:
        if model["kind"] == "point" and model["method"] in ("ota", "ota+ffg"):
            method = f"{model['method']} (data Fisher)"
            extra.append({**model, "method": method, "name": f"{method}: {model['setting']}"})
    out["models"] = estimate["models"] + extra
    names = list(dict.fromkeys(m["method"] for m in extra))
    out["methods"] = estimate["methods"] + [{"name": n, "baseline": False} for n in names]
    return out


def summary(prefix: str) -> str:
    """Markdown: every method's chosen point, loss-based and exact-match G on the report half, and the paired
    differences with the best baseline (chosen on the selection half) and with ties."""
    from benchmarks.quality.via_compare import compare_verdicts

    results = combined(prefix)
    tables = {
        (statistic, reference): compare_verdicts(results, statistic, reference)
        for statistic in ("loss", "exact")
        for reference in (None, "ties")
    }
    first = next(iter(tables[("loss", None)].values()))
    lines = [
        f"Reference (best baseline on the selection half, by loss G): **{first['reference']}**; by exact-match G: "
        f"**{next(iter(tables[('exact', None)].values()))['reference']}**.",
        "",
        "| method | chosen (loss G) | loss G | minus reference [95%] | minus ties [95%] | exact-match G | "
        "minus reference (exact) | minus ties (exact) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(entry: Dict[str, object]) -> str:
        versus = entry.get("versus")
        return f"{versus.text()} **{versus.verdict}**" if versus else "(reference)"

    for method, entry in tables[("loss", None)].items():
        exact = tables[("exact", None)][method]
        lines.append(
            f"| {method} | {entry['label']} | {entry['G'].value:.3f} | {cell(entry)} | "
            f"{cell(tables[('loss', 'ties')][method])} | {exact['G'].value:.3f} | {cell(exact)} | "
            f"{cell(tables[('exact', 'ties')][method])} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--fisher-rows", type=int, default=256)
    parser.add_argument("--cache", default="/work/bench-cache/quality")
    parser.add_argument("--out", default="/work/bench-cache/lora-estimate", help="training runs and their stores")
    parser.add_argument("--compare-out", default="/work/bench-cache/compare-lora-sft", help="compare's OUT prefix")
    parser.add_argument("--stage", choices=("train", "compare"), default="compare", help="stop after this stage")
    parser.add_argument("--summary", action="store_true", help="print the verdicts of both runs (after they ran)")
    parser.add_argument("compare_args", nargs="*", help="after --: options for mergekit-ota compare")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(f"{args.compare_out}{f'-seed{args.seed}' if args.seed else ''}"))
        return 0
    torch.set_num_threads(1)
    base, found, suite = experts(args)
    if args.stage == "train":
        return 0
    rows = sft_rows(suite, {skill: (f"{base}+{entry[0]}", "") for skill, entry in found.items()}, None)
    status = 0
    seed = f"-seed{args.seed}" if args.seed else ""
    for which, name, methods in ((1, "estimate", None), (2, "fisher", FISHER_METHODS)):
        out = f"{args.compare_out}{seed}-{name}"
        config_path, data_path = write_inputs(out + "-inputs", config(base, found, which), rows)
        command = [sys.executable, "-m", "mergekit_ota.cli.main", "compare", config_path, data_path, out]
        command += (["--methods", methods] if methods else []) + args.compare_args
        print("$ " + shlex.join(command), flush=True)
        started = time.perf_counter()
        status = subprocess.call(command) or status
        print(f"compare ({name}) exited with {status} after {time.perf_counter() - started:.0f} s", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
