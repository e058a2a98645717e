"""The seed corpus: real inputs of every kind the commands read, written once per run into a directory.

Real outputs are copied from ``tests/fixtures`` (DeepSpeed ZeRO stages 1-3 and ``BF16_Optimizer``
checkpoints, a bitsandbytes 8-bit AdamW Trainer checkpoint, PEFT LoRA Trainer checkpoints, the state dicts of
Muon, Adam-mini, schedule-free AdamW, AdEMAMix, SophiaG/H, Lion and torchao's low-bit AdamW); the rest is made
with the project's own writers and testing helpers: torch optimizer state dicts (named, index-keyed with a model config,
Adafactor-factored), a Trainer-style ``checkpoint-N/``, a ``torch.distributed.checkpoint`` directory, a
DeepSpeed universal checkpoint, curvature stores (one file, rank-1, sharded with an index) and a merge
config with its models and stores (for ``check``).

Each :class:`Seed` names its source (relative to the corpus) and the commands that read it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
ZERO_FIXTURES = ("z1-bf16-w2-bf16optimizer", "z2-fp32-w2", "z2-fp32-w2-elastic", "z3-fp32-w2")


@dataclass(frozen=True)
class Seed:
    """One seed: ``root`` (a directory of the corpus, copied whole into each case), ``source`` (the path a
    command is given, relative to the case), ``kind`` (for the outcome table), ``commands`` it is run through."""

    name: str
    root: str
    source: str
    commands: Tuple[str, ...]
    model: Optional[str] = None  # a model directory under ``root`` that export is given with --model


def _tiny_config():  # type: ignore[no-untyped-def]
    from mergekit_ota.testing import tiny_llama_config

    return tiny_llama_config(vocab_size=32, hidden_size=16, num_layers=1)


def _adam_state(shapes: List[Tuple[str, Tuple[int, ...]]], seed: int) -> Dict[int, Dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(s, generator=g), "exp_avg_sq": torch.rand(s, generator=g)}
        for i, (_, s) in enumerate(shapes)
    }


def _named_state(path: str) -> None:
    shapes = [("model.a.weight", (4, 3)), ("model.b.bias", (3,))]
    groups = [{"params": [0, 1], "param_names": [n for n, _ in shapes], "betas": (0.9, 0.999), "lr": 1e-3, "eps": 1e-8}]
    torch.save({"state": _adam_state(shapes, 1), "param_groups": groups}, path)


def _adafactor_state(path: str) -> None:
    g = torch.Generator().manual_seed(2)
    state = {
        0: {"step": torch.tensor(2.0), "exp_avg_sq_row": torch.rand(4, generator=g), "exp_avg_sq_col": torch.rand(3)},
        1: {"step": torch.tensor(2.0), "exp_avg_sq": torch.rand(3, generator=g)},
    }
    groups = [{"params": [0, 1], "param_names": ["w.weight", "w.bias"], "decay_rate": -0.8, "clip_threshold": 1.0}]
    torch.save({"state": state, "param_groups": groups}, path)


def _model_shapes(config) -> List[Tuple[str, Tuple[int, ...]]]:  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _trainer_checkpoint(directory: str) -> None:
    """``checkpoint-2/``: config.json and an index-keyed ``optimizer.pt`` (named through the model)."""
    config = _tiny_config()
    os.makedirs(directory)
    config.save_pretrained(directory)
    shapes = _model_shapes(config)
    groups = [{"params": list(range(len(shapes))), "betas": (0.9, 0.95), "lr": 1e-3, "weight_decay": 0.0}]
    torch.save({"state": _adam_state(shapes, 3), "param_groups": groups}, os.path.join(directory, "optimizer.pt"))
    with open(os.path.join(directory, "trainer_state.json"), "w") as fp:
        fp.write('{"global_step": 2}')


def _dcp(directory: str) -> None:
    import torch.distributed.checkpoint as dcp

    shapes = [("model.a.weight", (4, 3)), ("model.b.bias", (3,))]
    state = {name: s for (name, _), s in zip(shapes, _adam_state(shapes, 4).values())}
    groups = [{"lr": 0.01, "betas": (0.9, 0.99), "params": [n for n, _ in shapes]}]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"optimizer": {"state": state, "param_groups": groups}}, checkpoint_id=directory, no_dist=True)


def _universal(directory: str) -> None:
    zero = os.path.join(directory, "zero")
    g = torch.Generator().manual_seed(5)
    for name, shape in (("model.a.weight", (4, 3)), ("model.b.bias", (3,))):
        os.makedirs(os.path.join(zero, name))
        for key in ("exp_avg", "exp_avg_sq", "fp32"):
            torch.save({"param": torch.rand(shape, generator=g), "cat_dim": 0}, os.path.join(zero, name, f"{key}.pt"))
        torch.save(3, os.path.join(zero, name, "step.pt"))
    torch.save(
        {"param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0]}]}, os.path.join(zero, "optimizer_state.pt")
    )


def _stores(directory: str) -> None:
    from mergekit_ota.curvature.writer import StoreWriter, save_store, store_layout, store_metadata, store_specs

    g = torch.Generator().manual_seed(6)
    tensors = {"model.a.weight": torch.rand(6, 5, generator=g), "model.b.bias": torch.rand(5, generator=g)}
    meta = {"step": "3", "beta2": "0.999", "source_kind": "torch", "parameters_without_state": "[]"}
    os.makedirs(directory)
    save_store(tensors, os.path.join(directory, "full.safetensors"), metadata=meta)
    save_store(tensors, os.path.join(directory, "rank1.safetensors"), compress=True, metadata=meta)
    index = os.path.join(directory, "sharded", "exp_avg_sq.safetensors.index.json")
    os.makedirs(os.path.dirname(index))
    specs = store_specs([(n, tuple(v.shape)) for n, v in tensors.items()], torch.float32, False)
    with StoreWriter(store_layout(index), specs, store_metadata("none", torch.float32, meta), 64) as writer:
        for name, value in tensors.items():
            writer.write(name, value)
        writer.commit()


def _merge_config(directory: str) -> None:
    """A small family (base, two experts with stores) and an ``ota`` config naming them by relative path."""
    import yaml

    from mergekit_ota.testing import make_family

    family = make_family(directory, config=_tiny_config())
    rel = {p: os.path.relpath(p, directory) for p in [family.base, *family.experts, *family.stores]}
    config = {
        "merge_method": "ota",
        "base_model": rel[family.base],
        "models": [
            {"model": rel[e], "parameters": {"weight": 1.0, "curvature": rel[s]}}
            for e, s in zip(family.experts, family.stores)
        ],
        "parameters": {"power": 0.5, "eps": 1e-8},
        "dtype": "float32",
    }
    with open(os.path.join(directory, "merge.yml"), "w") as fp:
        yaml.safe_dump(config, fp)


#: (seed name, fixture) of the optimizers other than Adam's: a partial store (Muon), block values (Adam-mini), the
#: step in the group (schedule-free, AdEMAMix), Sophia's Hessian estimates, and one refused (Lion)
OPTIMIZER_FIXTURES = (
    ("muon", "muon_adamw.pt"),
    ("adam-mini", "adam_mini/optimizer.pt"),
    ("schedulefree", "schedulefree/optimizer.pt"),
    ("ademamix", "ademamix/optimizer.pt"),
    ("sophiag", "sophia/sophiag/optimizer.pt"),
    ("sophiah", "sophia/sophiah/optimizer.pt"),
    ("lion", "lion/optimizer.pt"),
    ("torchao-4bit", "torchao/adamw4bit/optimizer.pt"),
    ("torchao-fp8", "torchao/adamwfp8/optimizer.pt"),
)


def build(corpus: str) -> List[Seed]:
    """Write every seed under ``corpus`` (an empty or missing directory); return the seeds."""
    os.makedirs(corpus, exist_ok=True)
    seeds: List[Seed] = []
    ex, store_cmds = ("export", "export", "export", "inspect"), ("inspect", "export", "store")

    def add(name: str, source: str, commands: Tuple[str, ...]) -> None:
        seeds.append(Seed(name, name, source, commands))

    os.makedirs(os.path.join(corpus, "torch-named"))
    _named_state(os.path.join(corpus, "torch-named", "optimizer_state.pt"))
    add("torch-named", "optimizer_state.pt", ex)
    os.makedirs(os.path.join(corpus, "adafactor"))
    _adafactor_state(os.path.join(corpus, "adafactor", "optimizer_state.pt"))
    add("adafactor", "optimizer_state.pt", ex)
    _trainer_checkpoint(os.path.join(corpus, "trainer", "checkpoint-2"))
    add("trainer", "checkpoint-2", ex)
    _dcp(os.path.join(corpus, "dcp", "optimizer_0"))
    add("dcp", "optimizer_0", ex)
    _universal(os.path.join(corpus, "universal", "ckpt"))
    add("universal", "ckpt", ex)
    _stores(os.path.join(corpus, "stores"))
    for source in ("full.safetensors", "rank1.safetensors", "sharded/exp_avg_sq.safetensors.index.json"):
        seeds.append(Seed(f"store-{source.split('.')[0].split('/')[0]}", "stores", source, store_cmds))
    for name in ZERO_FIXTURES:
        shutil.copytree(os.path.join(FIXTURES, "deepspeed", name, "checkpoint"), os.path.join(corpus, name, "ckpt"))
        add(name, "ckpt", ex)
    bnb = os.path.join(FIXTURES, "bitsandbytes", "adamw8bit", "checkpoint-3")
    shutil.copytree(bnb, os.path.join(corpus, "bnb8bit", "checkpoint-3"))
    add("bnb8bit", "checkpoint-3", ex)
    # real PEFT Trainer checkpoints (tests/fixtures/peft)
    for variant in ("lora", "modules_to_save", "adamw8bit", "zero2"):
        shutil.copytree(
            os.path.join(FIXTURES, "peft", variant, "checkpoint-3"),
            os.path.join(corpus, f"peft-{variant}", "checkpoint-3"),
        )
        shutil.copytree(os.path.join(FIXTURES, "peft", "base"), os.path.join(corpus, f"peft-{variant}", "base"))
        seeds.append(Seed(f"peft-{variant}", f"peft-{variant}", "checkpoint-3", ex, model="base"))
    for name, relative in OPTIMIZER_FIXTURES:  # real state dicts of other optimizers (tests/fixtures/optimizers)
        os.makedirs(os.path.join(corpus, name))
        shutil.copy(os.path.join(FIXTURES, "optimizers", relative), os.path.join(corpus, name, "optimizer.pt"))
        add(name, "optimizer.pt", ex)
    _merge_config(os.path.join(corpus, "merge"))
    add("merge", "merge.yml", ("check",))
    return seeds
