"""How good is the LoRA curvature estimate? Issue 29's measurement, on SmolLM2-135M-Instruct: evidence, not a test.

    python -m benchmarks.quality.lora_estimate --skills snake iso_date [--cache DIR] [--out DIR]

For each skill of the ``sft`` tier's ``constant`` variant (seed 0; its base, its full fine-tune and that
fine-tune's exported Adam store are read from the tier's cache: run the tier first), this

1. trains the same skill as a **LoRA expert** (PEFT ``r=16``, ``lora_alpha=32``, every linear layer but the head
   (``target_modules="all-linear"``), no dropout) with the tier's own Trainer set-up (``train.train``: same rows,
   steps, batch, constant schedule, bf16 autocast, answer-only loss), at ``--lr`` (LoRA takes a larger step than
   the full fine-tune's 3e-4);
2. exports its curvature with ``mergekit-ota export`` (the adapter-derived rank-1 estimate, ``math/lora.py``);
3. measures the data Fisher of the **folded** LoRA model on the first ``--fisher-rows`` of its own training items
   with ``mergekit-ota fisher BASE+ADAPTER`` (batch as in training);
4. per adapted matrix, compares the estimate ``v_hat`` with (a) that Fisher ``F`` and (b) the full fine-tune's
   Adam ``v`` by Spearman rank correlation over the matrix's entries (a seeded sample of 1,000,000 for larger
   ones: ``benchmarks.quality.fisher.spearman``), beside the same correlations of a rank-1 compression of ``F``
   (``outer(F.sum(1), F.sum(0)) / F.sum()``: the best any rank-1 curvature could be expected to do against
   ``F``). A uniform curvature has no ranking (its Spearman is undefined), so the comparison with it is made
   where a ranking is used, FFG's mask: the share of the top ``--density`` entries by saliency
   ``curvature * tau**2`` (``tau = s B A``, the LoRA's task vector) that are also top entries by ``F * tau**2``,
   for ``v_hat``, rank-1 ``F`` and uniform curvature (``tau**2`` alone: magnitude pruning).

Writes ``benchmarks/results/lora-estimate.md``. Every stage is cached in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from benchmarks.quality.fisher import spearman

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(base: str, rows: list, run_dir: str, settings: Any, tokenizer: Any, options: Dict[str, Any], rank: int):
    """The LoRA expert's checkpoint (trained once; ``train.train`` reuses a finished run)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from benchmarks.quality.train import checkpoint_of, train

    checkpoint = checkpoint_of(run_dir, settings.steps)
    model = None
    if not os.path.isfile(os.path.join(checkpoint, "optimizer.pt")):
        model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, config)
    return train(model, rows, run_dir, settings, tokenizer, "cpu", **options)


def top_share(score: torch.Tensor, reference: torch.Tensor, density: float) -> float:
    """The share of ``reference``'s top ``density`` entries that are also ``score``'s top entries."""
    k = max(1, int(round(density * reference.numel())))
    mine = torch.topk(score.flatten().double(), k).indices
    theirs = torch.topk(reference.flatten().double(), k).indices
    return float(torch.isin(mine, theirs).sum()) / k


def rank1_of(v: torch.Tensor) -> torch.Tensor:
    """``outer(v.sum(1), v.sum(0)) / v.sum()``: the rank-1 compression our stores keep."""
    v = v.double()
    total = v.sum()
    return torch.outer(v.sum(1), v.sum(0)) / total if total > 0 else torch.zeros_like(v)


def measure(skill: str, estimate: str, fisher: str, adam: str, adapter: str, density: float) -> List[Dict[str, Any]]:
    """Per adapted matrix: Spearman correlations and FFG mask overlaps (module docstring)."""
    from safetensors.torch import load_file

    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.export.peft_config import read_adapter_config
    from mergekit_ota.store_format import ADAPTER_UNTOUCHED, COL_SUFFIX, ROW_SUFFIX

    store = CurvatureStore(estimate)
    untouched = set(json.loads(store.metadata[ADAPTER_UNTOUCHED]))
    raw = load_file(estimate)
    f_all, v_all = load_file(fisher), load_file(adam)
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    config = read_adapter_config(os.path.join(adapter, "adapter_config.json"))
    out = []
    for key in sorted(k for k in raw if k.endswith(ROW_SUFFIX)):
        name = key[: -len(ROW_SUFFIX)]
        if name in untouched:
            continue
        r, c = raw[key].double(), raw[name + COL_SUFFIX].double()
        v_hat = torch.outer(r, c) / r.sum() if r.sum() > 0 else torch.zeros(len(r), len(c), dtype=torch.float64)
        module = name[: -len(".weight")]
        a = weights[f"base_model.model.{module}.lora_A.weight"].double()
        b = weights[f"base_model.model.{module}.lora_B.weight"].double()
        tau = config.scaling(module, a.shape[0]) * (b @ a)
        f, v = f_all[name].double(), v_all[name].double()
        f1 = rank1_of(f)
        out.append(
            {
                "skill": skill,
                "name": name,
                "kind": next((k for k in KINDS if f".{k}." in name), "other"),
                "est_vs_fisher": spearman(v_hat, f, name),
                "est_vs_adam": spearman(v_hat, v, name),
                "rank1F_vs_fisher": spearman(f1, f, name),
                "rank1F_vs_adam": spearman(f1, v, name),
                "fisher_vs_adam": spearman(f, v, name),
                "mask_est": top_share(v_hat * tau**2, f * tau**2, density),
                "mask_rank1F": top_share(f1 * tau**2, f * tau**2, density),
                "mask_uniform": top_share(tau**2, f * tau**2, density),
                "mask_est_adam": top_share(v_hat * tau**2, v * tau**2, density),
                "mask_uniform_adam": top_share(tau**2, v * tau**2, density),
            }
        )
    return out


COLUMNS = (
    ("est_vs_fisher", "v_hat vs F"),
    ("rank1F_vs_fisher", "rank-1 F vs F"),
    ("est_vs_adam", "v_hat vs full-FT v"),
    ("rank1F_vs_adam", "rank-1 F vs full-FT v"),
    ("fisher_vs_adam", "F vs full-FT v"),
)
MASKS = (
    ("mask_est", "v_hat"),
    ("mask_rank1F", "rank-1 F"),
    ("mask_uniform", "uniform (magnitude)"),
)


def _median(rows: List[Dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r[key] == r[key]]  # NaN (a constant matrix) left out
    return f"{statistics.median(values):.3f}" if values else "n/a"


def report(rows: List[Dict[str, Any]], runs: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> str:
    """The markdown report."""
    lines = [
        "# The LoRA curvature estimate against a data Fisher and a full fine-tune's Adam v",
        "",
        "Issue 29's measurement. Command: `python -m benchmarks.quality.lora_estimate --skills "
        f"{' '.join(args.skills)} --lr {args.lr:g} --rank {args.rank} --fisher-rows {args.fisher_rows} "
        f"--density {args.density:g}` (after `python -m benchmarks.quality.run --tier sft --variant constant`: "
        "the base, the full fine-tunes and their Adam stores come from its cache). How each number is made: the "
        "module docstring of `benchmarks/quality/lora_estimate.py`.",
        "",
        "## Runs",
        "",
        "| skill | LoRA steps | lr | loss first -> last | train s | export s | fisher s | full fine-tune steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for skill, run in runs.items():
        lines.append(
            f"| {skill} | {run['steps']} | {run['lr']:g} | {run['first_loss']:.3f} -> {run['last_loss']:.3f} | "
            f"{run['train_seconds']:.0f} | {run['export_seconds']:.1f} | {run['fisher_seconds']:.0f} | "
            f"{run['full_steps']} |"
        )
    lines += [
        "",
        "## Spearman rank correlation per adapted matrix (median over matrices)",
        "",
        "`v_hat`: the adapter-derived estimate (`mergekit-ota export` of the LoRA checkpoint); `F`: the data Fisher "
        "of the folded LoRA model on its training items; full-FT v: the same skill's full fine-tune's Adam "
        "`exp_avg_sq`; rank-1 F: F compressed to rank 1 (the ceiling of a rank-1 curvature against F).",
        "",
        "| skill | matrix | n | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for skill in runs:
        mine = [r for r in rows if r["skill"] == skill]
        groups = [("all", mine)] + [(k, [r for r in mine if r["kind"] == k]) for k in KINDS]
        for kind, group in groups:
            if group:
                cells = " | ".join(_median(group, key) for key, _ in COLUMNS)
                lines.append(f"| {skill} | {kind} | {len(group)} | {cells} |")
    lines += [
        "",
        f"## FFG's mask: share of the top {args.density:g} entries by F * tau**2 that each curvature also keeps",
        "",
        "Saliency `curvature * tau**2` with `tau = s B A`. Uniform curvature is magnitude pruning (`tau**2` alone); "
        "a curvature that ranks entries no better than uniform would not beat its column. The last two columns "
        "take the full fine-tune's v * tau**2 as the reference instead.",
        "",
        "| skill | matrix | "
        + " | ".join(label for _, label in MASKS)
        + " | v_hat (vs full-FT v) | uniform (vs full-FT v) |",
        "|---|---|" + "---|" * (len(MASKS) + 2),
    ]
    for skill in runs:
        mine = [r for r in rows if r["skill"] == skill]
        groups = [("all", mine)] + [(k, [r for r in mine if r["kind"] == k]) for k in KINDS]
        for kind, group in groups:
            if group:
                keys = [key for key, _ in MASKS] + ["mask_est_adam", "mask_uniform_adam"]
                lines.append(f"| {skill} | {kind} | " + " | ".join(_median(group, k) for k in keys) + " |")
    wins = sum(1 for r in rows if r["mask_est"] > r["mask_uniform"])
    lines += [
        "",
        f"v_hat's mask overlaps F's more than uniform curvature's does in {wins} of {len(rows)} matrices.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", nargs="+", default=["snake", "iso_date"])
    parser.add_argument("--lr", type=float, default=1e-3, help="the LoRA run's learning rate")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--fisher-rows", type=int, default=256)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--cache", default="/work/bench-cache/quality")
    parser.add_argument("--out", default="/work/bench-cache/lora-estimate")
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from benchmarks.quality import run, skills
    from mergekit_ota.fisher import FisherOptions, fisher_store

    tier = run.make_parser().parse_args(["--tier", "sft", "--variant", "constant", "--cache", args.cache])
    suite, _, work, base_dir = run.locate(tier)
    suite.build_base(base_dir, "cpu")
    pipeline = run.Pipeline(suite, work, base_dir, "cpu", keep_models=False, seed=0)
    os.makedirs(args.out, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    runs: Dict[str, Dict[str, Any]] = {}
    for skill in args.skills:
        full = suite.settings_of(skill)
        adam = pipeline.store_path(skill, "full")
        if not os.path.isfile(adam):
            raise SystemExit(f"the full fine-tune's store is not cached: {adam} (run the sft constant tier first)")
        settings = full.model_copy(update={"learning_rate": args.lr})
        run_dir = os.path.join(args.out, f"{skill}-r{args.rank}-lr{args.lr:g}")
        started = time.perf_counter()
        checkpoint, info = train_lora(
            base_dir, suite.expert_rows(skill), run_dir, settings, suite.tokenizer, suite.train_options, args.rank
        )
        train_seconds = info.get("seconds") or time.perf_counter() - started
        estimate = os.path.join(run_dir, "estimate.safetensors")
        if not os.path.exists(estimate):
            from mergekit_ota.cli.main import main as cli

            started = time.perf_counter()
            cli.main(
                args=["export", checkpoint, estimate, "--model", base_dir, "--quiet"],
                prog_name="mergekit-ota",
                standalone_mode=False,
            )
            info["export_seconds"] = time.perf_counter() - started
        data = os.path.join(run_dir, "fisher-data.jsonl")
        with open(data, "w", encoding="utf-8") as fp:
            for message, answer in skills.skill(skill).items(args.fisher_rows, "train", suite.settings.seed):
                chat = {"messages": [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]}
                fp.write(json.dumps(chat) + "\n")
        fisher = os.path.join(run_dir, f"fisher-{args.fisher_rows}.safetensors")
        fisher_seconds = 0.0
        if not os.path.exists(fisher):
            started = time.perf_counter()
            fisher_store(
                f"{base_dir}+{checkpoint}",
                data,
                fisher,
                FisherOptions(samples=args.fisher_rows, batch_size=settings.batch_size, max_length=256, force=True),
            )
            fisher_seconds = time.perf_counter() - started
        runs[skill] = {
            "steps": settings.steps,
            "lr": args.lr,
            "first_loss": info["first_loss"],
            "last_loss": info["last_loss"],
            "train_seconds": train_seconds,
            "export_seconds": info.get("export_seconds", 0.0),
            "fisher_seconds": fisher_seconds,
            "full_steps": full.steps,
        }
        rows += measure(skill, estimate, fisher, adam, checkpoint, args.density)
        print(f"{skill}: {len(rows)} matrices measured so far", flush=True)
    text = report(rows, runs, args)
    with open(os.path.join(args.out, "rows.json"), "w", encoding="utf-8") as fp:
        json.dump({"runs": runs, "rows": rows}, fp, indent=1)
    path = os.path.join(args.results, "lora-estimate.md")
    with open(path, "w", encoding="utf-8") as fp:
        fp.write(text)
    print(text)
    return path


if __name__ == "__main__":
    main()
