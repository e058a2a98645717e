"""Data Fisher against Adam's ``exp_avg_sq`` on the sft tier's experts: evidence, not a test.

    .venv/bin/python -m benchmarks.quality.fisher_vs_adam [--samples 128] [--seed 0]

For each sft expert of one training seed (run ``python -m benchmarks.quality.run --tier sft`` first:
the experts and their exported Adam stores are read from its cache), ``mergekit-ota fisher`` on the
first N items of that expert's own training data (its chat rows, batch 8 as in training), then per
tensor the Spearman rank correlation of the Fisher with the expert's bias-corrected Adam ``v``
(ranks of a fixed sample of at most 1,000,000 entries for larger tensors), the ratio of their means
(Fisher / bias-corrected v: the scale), and what each measurement cost (Fisher seconds per expert
against the export's). Writes ``benchmarks/results/fisher-vs-adam-sft.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from benchmarks.quality.fisher import SAMPLE, spearman

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", ".cache", "quality"))
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from safetensors import safe_open
    from safetensors.torch import load_file

    from benchmarks.quality import run, skills
    from mergekit_ota.fisher import FisherOptions, fisher_store

    seed_args = run.make_parser().parse_args(["--tier", "sft", "--seed", str(args.seed), "--cache", args.cache])
    suite, _, work, base_dir = run.locate(seed_args)
    pipeline = run.Pipeline(suite, work, base_dir, seed=args.seed)
    rows: List[Dict[str, Any]] = []
    out_dir = os.path.join(args.cache, f"fisher-vs-adam-seed{args.seed}-n{args.samples}")
    os.makedirs(out_dir, exist_ok=True)
    for cap in suite.capabilities:
        directory = pipeline.run_dir(cap)
        with open(os.path.join(directory, "run.json"), encoding="utf-8") as fp:
            info = json.load(fp)
        checkpoint = os.path.join(directory, f"checkpoint-{suite.settings_of(cap).steps}")
        adam_path = os.path.join(directory, "curvature-full.safetensors")
        with safe_open(adam_path, "pt") as fp:
            meta = fp.metadata()
        factor = 1 - float(meta["beta2"]) ** int(meta["step"])
        data = os.path.join(out_dir, f"{cap}.jsonl")
        with open(data, "w", encoding="utf-8") as fp:
            for message, answer in skills.skill(cap).items(args.samples, "train", suite.settings.seed):
                fp.write(
                    json.dumps(
                        {"messages": [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]}
                    )
                    + "\n"
                )
        out = os.path.join(out_dir, f"{cap}.safetensors")
        started = time.perf_counter()
        fisher_store(
            checkpoint,
            data,
            out,
            FisherOptions(
                samples=args.samples, batch_size=suite.settings_of(cap).batch_size, max_length=256, force=True
            ),
        )
        seconds = time.perf_counter() - started
        fisher, adam = load_file(out), load_file(adam_path)
        per_tensor = {n: spearman(fisher[n], adam[n], n) for n in fisher if fisher[n].numel() > 1}
        scale = float(sum(float(f.double().sum()) for f in fisher.values())) / (
            sum(float(v.double().sum()) for v in adam.values()) / factor
        )
        rows.append(
            {
                "skill": cap,
                "steps": info.get("steps"),
                "seconds": seconds,
                "export_seconds": pipeline.results.data.get("export", {}).get(f"{cap}/full", {}).get("seconds"),
                "median": statistics.median(per_tensor.values()),
                "min": min(per_tensor.values()),
                "max": max(per_tensor.values()),
                "scale": scale,
                "tensors": len(per_tensor),
            }
        )
        print(
            f"{cap}: Spearman median {rows[-1]['median']:.3f} over {len(per_tensor)} tensors, {seconds:.0f} s",
            flush=True,
        )
    lines = [
        "# Data Fisher against Adam's exp_avg_sq: sft tier experts",
        "",
        f"Command: `python -m benchmarks.quality.fisher_vs_adam --samples {args.samples} --seed {args.seed}` "
        "(after the sft tier's run; reads its experts and exported stores).",
        "",
        f"Fisher: `mergekit-ota fisher` on the first {args.samples} items of each expert's own training data "
        "(its chat rows, loss on the answer, batch size as in training, mean over mini-batches). Adam: the "
        "expert's exported `exp_avg_sq`, bias-corrected (`/ (1 - beta2**step)`). Spearman: per tensor, over "
        f"all entries (a seeded sample of {SAMPLE:,} for larger tensors). Scale: sum of Fisher / sum of "
        "bias-corrected v over the model. Seconds: the Fisher measurement (model load included) on "
        f"{torch.get_num_threads()} CPU thread(s), beside the export of the same expert's store.",
        "",
        "| expert | steps trained | Spearman per tensor: median [min, max] | scale (Fisher / v) | fisher s | export s "
        "|",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        export = f"{r['export_seconds']:.1f}" if r["export_seconds"] else "n/a"
        lines.append(
            f"| {r['skill']} | {r['steps']} | {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] | "
            f"{r['scale']:.3g} | {r['seconds']:.0f} | {export} |"
        )
    path = os.path.join(args.results, "fisher-vs-adam-sft.md")
    with open(path, "w", encoding="utf-8") as fp:
        fp.write("\n".join(lines) + "\n")
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
