"""Measured cost of the ``sft`` tier's stages on this machine, before choosing its defaults.

    .venv/bin/python -m benchmarks.quality.cost              # ~6 min on 2 idle cores
    .venv/bin/python -m benchmarks.quality.cost --steps 4    # fewer Trainer steps per configuration

On SmolLM2-135M-Instruct (converted as the tier does; nothing downloaded) and the tier's own
chat rows:

* one ``transformers.Trainer`` AdamW step (batch ``--batch``) in float32 and in bfloat16 mixed
  precision with the answer-only loss (``train.answer_only_loss``): the median wall time between
  optimizer steps after the first (start-up and the checkpoint write excluded);
* scoring one held-out item (``evaluate.score_items``: teacher-forced exact match, prefix cache,
  output head on the answer only), float32 and bfloat16 autocast;
* real greedy decoding of one item (``evaluate.greedy_answers``: ``model.generate``);
* one mergekit merge of base + ``--experts`` models (``task_arithmetic`` and ``ota``) and saving it.

Prints a table and writes ``cost.json`` (with the load average before and after, since a shared
machine's numbers are upper bounds) to ``benchmarks/.cache/quality/cost/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

from benchmarks.quality import evaluate, merges, skills, smollm
from benchmarks.quality.train import TrainSettings, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def _timed(fn, repeats: int) -> List[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def measure(
    work: str, skill_names: List[str], steps: int, batch: int, items: int, experts: int, device: str = "cpu"
) -> Dict[str, Any]:
    """Every cost listed in the module docstring, as ``{name: {...}}``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = smollm.convert(os.path.join(os.path.dirname(work), smollm.SFT_BASE_DIR))
    tokenizer = AutoTokenizer.from_pretrained(base)
    out: Dict[str, Any] = {"load_before": os.getloadavg(), "threads": torch.get_num_threads()}
    train_rows = [
        r for name in skill_names for r in skills.rows(tokenizer, skills.skill(name).items(steps * batch, "train", 0))
    ]
    eval_rows = [r for name in skill_names for r in skills.rows(tokenizer, skills.skill(name).items(items, "test", 0))]
    out["tokens_per_row"] = statistics.fmean(len(ids) for ids, _ in train_rows)
    out["labelled_per_row"] = statistics.fmean(len(skills.answer_of(r)) for r in train_rows)
    settings = TrainSettings(steps=steps, batch_size=batch, learning_rate=1e-4, warmup_steps=0, seed=0)
    for label, bf16, answer_only in (("train fp32", False, False), ("train bf16 answer-only", True, True)):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        run_dir = os.path.join(work, label.replace(" ", "_"))
        shutil.rmtree(run_dir, ignore_errors=True)
        _, info = train(model, train_rows, run_dir, settings, tokenizer, device, bf16=bf16, answer_only=answer_only)
        out[label] = {
            "seconds_per_step": info["step_seconds"],
            "steps_per_second": 1 / info["step_seconds"],
            "batch": batch,
            "run_seconds": info["seconds"],
        }
        shutil.rmtree(run_dir, ignore_errors=True)
        del model
    scorer = evaluate.load_model(base, device)
    pad = tokenizer.pad_token_id
    for label, kwargs in (
        ("score fp32", {}),
        ("score bf16", {"bf16": True}),
        ("score bf16, no prefix cache", {"bf16": True, "share_prefix": False}),
    ):
        evaluate.score_items(scorer, eval_rows[:8], pad, 8, device, **kwargs)  # warm-up
        times = _timed(lambda kwargs=kwargs: evaluate.score_items(scorer, eval_rows, pad, 64, device, **kwargs), 2)
        out[label] = {"seconds_per_item": min(times) / len(eval_rows), "items": len(eval_rows)}
    end = skills.end_of_turn_id(tokenizer)
    sample = eval_rows[:: max(1, len(eval_rows) // 64)][:64]
    times = _timed(lambda: evaluate.greedy_answers(scorer, tokenizer, sample, end, 32, device, bf16=True), 2)
    out["greedy decoding bf16"] = {"seconds_per_item": min(times) / len(sample), "items": len(sample)}
    scorer = None  # free the model before the merges (a del would leave the lambdas above unbound, to linters)
    copies = []
    for index in range(experts):  # stand-in experts: the base with a little noise, and a curvature store each
        directory = os.path.join(work, f"expert{index}")
        if not os.path.isfile(os.path.join(directory, "exp_avg_sq.safetensors")):
            shutil.rmtree(directory, ignore_errors=True)
            state = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for p in state.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
            state.save_pretrained(directory)
            from mergekit_ota.curvature.writer import save_store

            save_store(
                {n: torch.rand(p.shape, generator=generator) * 1e-8 for n, p in state.named_parameters()},
                os.path.join(directory, "exp_avg_sq.safetensors"),
            )
        copies.append(directory)
    stores = {str(i): os.path.join(d, "exp_avg_sq.safetensors") for i, d in enumerate(copies)}
    experts_ = merges.Experts(base, {str(i): d for i, d in enumerate(copies)}, stores, stores)
    for method in merges.methods():
        if method.name not in ("task_arithmetic", "ota", "ties"):
            continue
        config = merges.config_for(method, method.grid[0], experts_)
        target = os.path.join(work, "merged")
        shutil.rmtree(target, ignore_errors=True)
        out[f"merge {method.name}"] = {"seconds": merges.run_config(config, target), "experts": experts}
    for directory in [os.path.join(work, "merged"), *copies]:  # 0.5 GB each: not kept
        shutil.rmtree(directory, ignore_errors=True)
    out["load_after"] = os.getloadavg()
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(REPO, "benchmarks", ".cache", "quality", "cost"))
    parser.add_argument("--skills", nargs="*", default=["snake", "camel", "iso_date", "us_date"])
    parser.add_argument("--steps", type=int, default=8, help="Trainer steps per configuration")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--items", type=int, default=64, help="held-out items per skill to score")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    os.makedirs(args.work, exist_ok=True)
    result = measure(args.work, args.skills, args.steps, args.batch, args.items, args.experts)
    result["argv"] = ["python", "-m", "benchmarks.quality.cost", *(argv if argv is not None else sys.argv[1:])]
    with open(os.path.join(args.work, "cost.json"), "w", encoding="utf-8") as fp:
        json.dump(result, fp, indent=1)
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
