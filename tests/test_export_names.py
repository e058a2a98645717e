"""How export found each weight name, reported exactly: recorded names, shapes, or the order rule.

An index-keyed optimizer state (a Trainer ``optimizer.pt``) is named by aligning its states, in index
order, with the model's parameters in the order the Trainer builds the optimizer, checking every shape.
That check cannot tell apart parameters of equal shape, so the store's metadata and the summary must say
which names the shapes confirm and which rest on the order alone. References are real runs: a
``transformers.Trainer`` checkpoint, ``torch.save`` of a torch optimizer, ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Dict, List, Tuple

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mergekit_ota.cli.export import export_command
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.testing import tiny_llama_config

# vocab 48 differs from every other dimension (hidden 32, intermediate 64, kv 16), so with tied embeddings
# model.embed_tokens.weight [48, 32] is the one parameter whose shape no other parameter has
VOCAB, HIDDEN = 48, 32
GATE, UP = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"


def _model() -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=HIDDEN, tie_word_embeddings=True))


def _batches() -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 8), generator=g) for _ in range(2)]


def _export(*args: Any, ok: bool = True) -> Any:
    result = CliRunner().invoke(export_command, [str(a) for a in args] + ["--quiet"])
    assert (result.exit_code == 0) == ok, result.output
    return result


def _shared_shapes(model: torch.nn.Module) -> List[str]:
    """Parameters with the shape of another parameter, from the live model, in named_parameters() order."""
    counts = Counter(tuple(p.shape) for _, p in model.named_parameters())
    return [n for n, p in model.named_parameters() if counts[tuple(p.shape)] > 1]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> Tuple[str, List[str], List[str]]:
    """A real Trainer checkpoint (AdamW, weight-decay split, index-keyed optimizer.pt); its parameter names and
    the names whose shape another parameter shares."""
    from transformers import Trainer, TrainingArguments

    root = str(tmp_path_factory.mktemp("trainer"))
    model = _model()
    data = [{"input_ids": ids, "labels": ids} for batch in _batches() for ids in batch]
    args = TrainingArguments(
        output_dir=root,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        weight_decay=0.1,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    return os.path.join(root, "checkpoint-2"), [n for n, _ in model.named_parameters()], _shared_shapes(model)


def test_trainer_checkpoint_reports_which_names_rest_on_the_parameter_order(trainer_run, tmp_path):
    """A Trainer checkpoint is mapped by shapes + order: the metadata lists as order-dependent exactly the
    parameters whose shape another parameter shares (gate_proj/up_proj of a layer, one weight in two layers,
    the norms), counts the rest as verified by shape (the tied embedding, [48, 32]), and the summary says so."""
    checkpoint, names, shared = trainer_run
    out = tmp_path / "store.safetensors"
    result = _export(checkpoint, out)
    metadata = CurvatureStore(str(out)).metadata
    by_order = json.loads(metadata["mapping_by_order"])
    assert metadata["mapping_basis"] == "shapes+order"
    assert by_order == shared and GATE in by_order and UP in by_order
    assert "model.layers.0.mlp.down_proj.weight" in by_order  # same shape as layer 1's down_proj
    assert EMBED not in by_order and int(metadata["mapping_verified_by_shape"]) == 1 == len(names) - len(shared)
    assert f"shapes confirm 1 of {len(names)} uniquely" in result.output
    assert f"{len(shared)} rely on the parameter order" in result.output
    assert "model.layers.*.mlp.{gate_proj,up_proj}.weight" in result.output, result.output
    assert "verified:" not in result.output


def _train_in_order(root: str, order: List[str], named: bool = False) -> Tuple[str, str, Dict[str, torch.Tensor]]:
    """AdamW over the model's parameters in ``order``; saves the model and ``optimizer.state_dict()``.

    Returns the optimizer file, the model directory, and each parameter's live exp_avg_sq by name."""
    model = _model()
    params = dict(model.named_parameters())
    chosen = [(n, params[n]) for n in order]
    optimizer = torch.optim.AdamW(chosen if named else [p for _, p in chosen], lr=1e-2)
    for ids in _batches():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(os.path.join(root, "model"))
    path = os.path.join(root, "optimizer.pt")
    torch.save(optimizer.state_dict(), path)
    return path, os.path.join(root, "model"), {n: optimizer.state[p]["exp_avg_sq"].clone() for n, p in chosen}


def _stored(path: str) -> Dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def test_what_an_order_error_can_swap_unnoticed_is_exactly_what_is_reported(tmp_path):
    """Why 'verified by shape' means 'no other parameter has this shape': an optimizer built with gate_proj and
    up_proj exchanged exports without any error, each name holding the other's state, and both names are
    reported order-dependent; exchanging the unique-shape embedding with any parameter fails the shape check."""
    names = [n for n, _ in _model().named_parameters()]
    swapped = [UP if n == GATE else GATE if n == UP else n for n in names]
    path, model_dir, live = _train_in_order(str(tmp_path), swapped)
    out = tmp_path / "store.safetensors"
    _export(path, out, "--model", model_dir)
    stored = _stored(str(out))
    assert torch.equal(stored[GATE], live[UP]) and torch.equal(stored[UP], live[GATE])  # silently exchanged
    by_order = json.loads(CurvatureStore(str(out)).metadata["mapping_by_order"])
    assert GATE in by_order and UP in by_order and EMBED not in by_order

    moved = [names[1], EMBED] + [n for n in names[2:]]  # the embedding exchanged with its neighbour
    (tmp_path / "moved").mkdir()
    path, model_dir, _ = _train_in_order(str(tmp_path / "moved"), moved)
    failed = _export(path, tmp_path / "x.safetensors", "--model", model_dir, ok=False)
    assert "cannot map" in failed.output and not (tmp_path / "x.safetensors").exists()


def test_param_names_saved_by_the_optimizer_are_reported_exact(tmp_path):
    """torch.optim.AdamW(model.named_parameters()) records param_names: every name is exact, none rests on an
    order, and the summary says so."""
    names = [n for n, _ in _model().named_parameters()]
    path, _, live = _train_in_order(str(tmp_path), names, named=True)
    out = tmp_path / "store.safetensors"
    result = _export(path, out)
    metadata = CurvatureStore(str(out)).metadata
    assert metadata["mapping_basis"] == "param_names" and json.loads(metadata["mapping_by_order"]) == []
    assert "mapping_verified_by_shape" not in metadata
    assert f"exact for all {len(live)} parameters" in result.output and "rely on" not in result.output


def test_dcp_fqns_are_reported_exact(tmp_path):
    """A torch.distributed.checkpoint directory keys each state by the parameter's FQN: exact names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for ids in _batches():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = tmp_path / "store.safetensors"
    result = _export(tmp_path / "dcp", out)
    metadata = CurvatureStore(str(out)).metadata
    assert metadata["mapping_basis"] == "dcp_fqns" and json.loads(metadata["mapping_by_order"]) == []
    assert "exact for all" in result.output and "rely on" not in result.output


def test_a_reexported_store_keeps_how_its_names_were_found(trainer_run, tmp_path):
    """Re-exporting a store (re-shard, compress) carries the original mapping basis and order-dependent names."""
    checkpoint, _, shared = trainer_run
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _export(checkpoint, first)
    _export(first, second, "--compress", "rank1")
    metadata = CurvatureStore(str(second)).metadata
    assert metadata["mapping_basis"] == "shapes+order" and json.loads(metadata["mapping_by_order"]) == shared
