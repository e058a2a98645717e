"""``mergekit-ota demo``: the whole job end to end on a laptop-sized problem, no hub.

1. A tiny Llama base; two experts fine-tuned from it with ``transformers.Trainer`` (AdamW), one
   per skill (A: arithmetic progressions counting up in tokens 0-31; B: counting down in tokens
   32-63).
2. Each expert's curvature exported from its Trainer checkpoint with ``mergekit-ota export``
   (full, into the expert's directory, and rank-1 compressed), a merge config preflighted with
   ``mergekit-ota check``.
3. The experts merged with ``ota`` (full and rank-1 curvature, with and without FFG), ``ffg``, and
   mergekit's ``task_arithmetic``, ``ties``, ``dare_ties`` and ``linear``; the ``ota`` config also
   through the unmodified ``mergekit-yaml`` command.
4. Next-token accuracy of every model on held-out sequences of both skills, normalised by each
   expert on its own skill, and each merge's wall time.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import yaml

from mergekit_ota.errors import MergeError

VOCAB = 64
HALF = 32
SEQ = 10
STEPS = (1, 2, 3)


@dataclass(frozen=True)
class Skill:
    name: str
    offset: int
    sign: int

    def sequence(self, start: int, step: int) -> List[int]:
        return [self.offset + (start + self.sign * step * i) % HALF for i in range(SEQ)]


SKILLS = (Skill("A: count up (0-31)", 0, 1), Skill("B: count down (32-63)", HALF, -1))


def _split(seed: int) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    pairs = [(s, d) for s in range(HALF) for d in STEPS]
    random.Random(seed).shuffle(pairs)
    cut = int(0.75 * len(pairs))
    return pairs[:cut], pairs[cut:]


def _batch(skill: Skill, pairs: List[Tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([skill.sequence(s, d) for s, d in pairs], dtype=torch.long)


def accuracy(model, skill: Skill, pairs: List[Tuple[int, int]]) -> float:
    """Exact next-token accuracy from position 2 on (the step is known after two tokens)."""
    ids = _batch(skill, pairs)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    predicted = logits[:, 1:-1].argmax(-1)
    return float((predicted == ids[:, 2:]).float().mean())


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def train_expert(base_dir: str, out_dir: str, skill: Skill, pairs, steps: int, seed: int, quiet: bool = False) -> str:
    """Fine-tune the base on one skill with ``transformers.Trainer`` (AdamW); save the expert to
    ``out_dir`` and return the Trainer checkpoint directory (``optimizer.pt`` and the model)."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    data = [{"input_ids": ids, "labels": ids} for ids in _batch(skill, pairs)]
    run_dir = os.path.join(os.path.dirname(os.path.dirname(out_dir)), "runs", os.path.basename(out_dir))
    args = TrainingArguments(
        output_dir=run_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        adam_beta2=0.999,
        save_strategy="steps",
        save_steps=steps,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    if quiet:  # its end-of-training metrics line
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.save_model(out_dir)
    _tokenizer().save_pretrained(out_dir)
    return os.path.join(run_dir, f"checkpoint-{steps}")


def _mergekit_ota(*args: str, quiet: bool = False) -> None:
    """Run a ``mergekit-ota`` subcommand as a user would (same interpreter), echoing it unless ``quiet``."""
    if not quiet:
        print("$ mergekit-ota " + " ".join(args))
    subprocess.run(
        [sys.executable, "-m", "mergekit_ota.cli.main", *args], check=True, stdout=subprocess.DEVNULL if quiet else None
    )


def merge_configs(base: str, experts: List[str], rank1_stores: List[str]) -> Dict[str, dict]:
    """The configurations compared by the demo, as mergekit YAML dictionaries.

    Each expert's full curvature store sits in its model directory (found without a parameter);
    ``rank1_stores`` are the same curvature exported with ``--compress rank1``."""

    def config(method: str, per_expert: dict, shared: dict | None = None, stores: List[str] | None = None) -> dict:
        models = []
        for i, expert in enumerate(experts):
            parameters = dict(per_expert, **({"curvature": stores[i]} if stores else {}))
            models.append({"model": expert, "parameters": parameters})
        cfg = {
            "merge_method": method,
            "base_model": base,
            "models": models + [{"model": base}],
            "dtype": "float32",
        }
        if shared:
            cfg["parameters"] = shared
        return cfg

    return {
        "ota": config("ota", {"weight": 1.0}),
        "ota (rank-1 curvature)": config("ota", {"weight": 1.0}, stores=rank1_stores),
        "ota+ffg (tensor, d=0.2)": config("ota", {"density": 0.2}),
        "ota+ffg (model, d=0.2)": config("ota", {"density": 0.2}, {"density_scope": "model"}),
        "ffg (d=0.2)": config("ffg", {"density": 0.2, "weight": 1.0}),
        "task_arithmetic": config("task_arithmetic", {"weight": 1.0}),
        "ties (d=0.2)": config("ties", {"density": 0.2, "weight": 1.0}),
        "dare_ties (d=0.2)": config("dare_ties", {"density": 0.2, "weight": 1.0}),
        "linear": {
            "merge_method": "linear",
            "models": [{"model": e, "parameters": {"weight": 0.5}} for e in experts],
            "dtype": "float32",
        },
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


MARKER = ".mergekit-ota-demo"


def _demo_output():  # type: ignore[no-untyped-def]
    from mergekit_ota.io.output import ReplacePolicy

    return ReplacePolicy(
        what=f"the output of an earlier mergekit-ota demo (a directory holding {MARKER})",
        recognises=lambda path: os.path.isfile(os.path.join(path, MARKER)),
        flag="--force",
    )


DEMO_THREADS = 2  # the thread count README's demo table was made with


def run_demo(out_dir: str, steps: int = 150, seed: int = 0, force: bool = False, quiet: bool = False) -> List[dict]:
    """Run the demo in ``out_dir``; print (after its progress lines, unless ``quiet``) and return the table.

    ``out_dir`` is claimed through :class:`~mergekit_ota.io.output.OutputDirectory`: an
    existing non-empty one is replaced only with ``force`` and only if an earlier demo
    made it (it holds the marker file), so no user directory is lost; the old demo is
    moved aside while the new one runs and restored if it fails.
    """
    from mergekit_ota.io.output import OutputDirectory

    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)  # float sums depend on the thread count: pinned, the table repeats exactly
    try:
        with OutputDirectory(out_dir, _demo_output(), force=force, swap_first=True) as out:
            open(os.path.join(out_dir, MARKER), "w").close()
            rows = _run_demo(out_dir, steps, seed, quiet)
            out.commit()
    finally:
        torch.set_num_threads(threads)
    return rows


HELDOUT = "heldout.jsonl"  # the held-out sequences as `mergekit-ota compare` reads them (README, docs/compare.md)
CAPABILITIES = ("up", "down")  # each skill's `task` name in it


def write_heldout(path: str, pairs: List[Tuple[int, int]]) -> None:
    """The held-out sequences of every skill as JSONL text rows, ``{"task", "expert", "text"}``: the capability a
    row tests, the expert trained on it (its directory's name) and the sequence as the demo's tokenizer's words."""
    with open(path, "w", encoding="utf-8") as fp:
        for i, (skill, task) in enumerate(zip(SKILLS, CAPABILITIES)):
            for start, step in pairs:
                text = " ".join(f"t{t}" for t in skill.sequence(start, step))
                fp.write(json.dumps({"task": task, "expert": f"expert_{'ab'[i]}", "text": text}) + "\n")


def _run_demo(out_dir: str, steps: int, seed: int, quiet: bool = False) -> List[dict]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    import mergekit_ota
    from mergekit_ota.testing import random_state_dict, save_model, tiny_llama_config

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    train, test = _split(seed)
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=64, num_layers=2)
    base = os.path.join(out_dir, "models", "base")
    save_model(base, config, random_state_dict(config, seed))
    _tokenizer().save_pretrained(base)
    experts, rank1_stores = [], []
    for i, skill in enumerate(SKILLS):
        path = os.path.join(out_dir, "models", f"expert_{'ab'[i]}")
        started = time.perf_counter()
        checkpoint = train_expert(base, path, skill, train, steps, seed + i + 1, quiet)
        if not quiet:
            print(f"trained expert {skill.name} with transformers.Trainer in {time.perf_counter() - started:.1f}s")
        # The optimizer's second moments, from the Trainer checkpoint, as a user would export them:
        _mergekit_ota("export", checkpoint, os.path.join(path, "exp_avg_sq.safetensors"), "--quiet", quiet=quiet)
        rank1 = os.path.join(out_dir, "stores", f"expert_{'ab'[i]}_rank1")
        _mergekit_ota("export", checkpoint, rank1, "--compress", "rank1", "--quiet", quiet=quiet)
        experts.append(path)
        rank1_stores.append(rank1)

    rows = []

    def evaluate(name: str, path: str, seconds: float | None) -> None:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        rows.append({"model": name, "acc": [accuracy(model, s, test) for s in SKILLS], "seconds": seconds})

    evaluate("base", base, None)
    for i, path in enumerate(experts):
        evaluate(f"expert {'AB'[i]}", path, None)

    write_heldout(os.path.join(out_dir, HELDOUT), test)
    configs = merge_configs(base, experts, rank1_stores)
    config_dir = os.path.join(out_dir, "configs")
    os.makedirs(config_dir, exist_ok=True)
    for name, cfg in configs.items():
        with open(os.path.join(config_dir, _slug(name) + ".yml"), "w", encoding="utf-8") as fp:
            yaml.safe_dump(cfg, fp, sort_keys=False)
    _mergekit_ota("check", os.path.join(config_dir, "ota_ffg__model__d_0_2.yml"), quiet=quiet)
    for name, cfg in configs.items():
        out = os.path.join(out_dir, "merged", _slug(name))
        options = MergeOptions(quiet=True, random_seed=seed)
        started = time.perf_counter()
        run_merge(MergeConfiguration.model_validate(cfg), out, options)
        evaluate(name, out, time.perf_counter() - started)

    # The same ota config through the unmodified mergekit-yaml command (the .pth hook registers ota).
    cli_out = os.path.join(out_dir, "merged", "ota_via_mergekit_yaml")
    command = [
        os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"),
        os.path.join(config_dir, "ota.yml"),
        cli_out,
        "--quiet",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    cli_seconds = time.perf_counter() - started
    a = load_file(os.path.join(cli_out, "model.safetensors"))
    b = load_file(os.path.join(out_dir, "merged", "ota", "model.safetensors"))
    same = all(torch.equal(a[k], b[k]) for k in b)

    experts_acc = [rows[1]["acc"][0], rows[2]["acc"][1]]
    lines = [
        "| model | " + " | ".join(s.name for s in SKILLS) + " | normalised avg | merge time (s) |",
        "|---|" + "---|" * (len(SKILLS) + 2),
    ]
    for row in rows:
        normalised = sum(a / e for a, e in zip(row["acc"], experts_acc)) / len(SKILLS)
        row["normalised"] = normalised
        seconds = f"{row['seconds']:.2f}" if row["seconds"] is not None else ""
        lines.append(
            f"| {row['model']} | " + " | ".join(f"{a:.3f}" for a in row["acc"]) + f" | {normalised:.3f} | {seconds} |"
        )
    table = "\n".join(lines)
    footer = (
        f"\nAccuracy: exact next-token match on {len(test)} held-out sequences per skill. "
        f"Normalised avg: mean over skills of accuracy / the skill's expert accuracy.\n"
        f"mergekit-yaml {os.path.join(config_dir, 'ota.yml')} -> {cli_seconds:.1f}s including imports; "
        f"output identical to the in-process run: {same}\n"
        f"Which method suits these experts best, on their held-out data? "
        f"mergekit-ota compare {os.path.join(config_dir, 'ota.yml')} {os.path.join(out_dir, HELDOUT)} OUT\n"
    )
    print("\n" + table + footer)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fp:
        fp.write("# mergekit-ota demo\n\n" + table + "\n" + footer)
    if not same:  # the CLI turns it into one line and exit status 1
        raise MergeError(f"mergekit-yaml's output in {out_dir} differs from the in-process merge of the same config")
    return rows


__all__ = ["run_demo", "merge_configs", "SKILLS"]
