"""`mergekit-ota export`: every source kind exports the optimizer's own second moments, or refuses clearly.

References are the live optimizer states of real training runs, looked up by parameter
object (``optimizer.state[param]`` for ``param`` in ``model.named_parameters()``), which
is independent of the exporter's index -> name mapping.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mergekit_ota.cli.export import export_command
from mergekit_ota.curvature.store import COL_SUFFIX, ROW_SUFFIX, CurvatureStore
from mergekit_ota.testing import tiny_llama_config

VOCAB, HIDDEN = 64, 32


@dataclass
class Run:
    """A finished training run: its checkpoint (or saved state), model dir, and live optimizer states by name."""

    checkpoint: str
    model_dir: str
    live: Dict[str, Dict[str, torch.Tensor]]
    beta2: Optional[float]
    names: List[str]


def _live_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{name: state}`` by parameter identity: ``optimizer.state[p]`` for each named parameter ``p``."""
    return {
        name: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in optimizer.state[p].items()}
        for name, p in model.named_parameters()
        if p in optimizer.state and optimizer.state[p]
    }


def _model(tied: bool = False, hidden: int = HIDDEN, dtype: torch.dtype = torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=hidden, tie_word_embeddings=tied)).to(dtype)


def _batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 8), generator=g) for _ in range(n)]


def _train_with_trainer(
    root: str, *, tied: bool, dtype=torch.float32, freeze: Sequence[str] = (), optim="adamw_torch"
) -> Run:
    from transformers import Trainer, TrainingArguments

    model = _model(tied, dtype=dtype)
    for name, p in model.named_parameters():
        if name in freeze:
            p.requires_grad_(False)
    data = [{"input_ids": ids, "labels": ids} for batch in _batches(2) for ids in batch]
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
        optim=optim,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # the torch optimizer inside accelerate's wrapper
    betas = optimizer.param_groups[0].get("betas")
    checkpoint = os.path.join(root, "checkpoint-2")
    return Run(
        checkpoint,
        checkpoint,
        _live_states(model, optimizer),
        betas[1] if betas else None,
        [n for n, _ in model.named_parameters()],
    )


def _train_plain(
    root: str, optimizer_factory, *, skip: Sequence[str] = (), named: bool = False, hidden: int = HIDDEN
) -> Run:
    """A few manual steps of ``optimizer_factory(params)``; saves the model and ``optimizer.state_dict()``."""
    model = _model(hidden=hidden)
    chosen = [(n, p) for n, p in model.named_parameters() if n not in skip]
    optimizer = optimizer_factory(chosen if named else [p for _, p in chosen])
    for ids in _batches(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model_dir = os.path.join(root, "model")
    model.save_pretrained(model_dir)
    path = os.path.join(root, "optimizer.pt")
    torch.save(optimizer.state_dict(), path)
    betas = optimizer.param_groups[0].get("betas")
    return Run(
        path,
        model_dir,
        _live_states(model, optimizer),
        betas[1] if betas else None,
        [n for n, _ in model.named_parameters()],
    )


def _export(*args: str, ok: bool = True):
    result = CliRunner().invoke(export_command, [str(a) for a in args] + ["--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
    return result


def _read(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a store, via safetensors' own reader (all shards of an index)."""
    files = [path]
    if path.endswith(".index.json"):
        with open(path) as fp:
            files = sorted({os.path.join(os.path.dirname(path), f) for f in json.load(fp)["weight_map"].values()})
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


@pytest.fixture(scope="module")
def untied_frozen(tmp_path_factory) -> Run:
    """Trainer, untied Llama, embeddings frozen, weight decay split."""
    return _train_with_trainer(
        str(tmp_path_factory.mktemp("untied")), tied=False, freeze=("model.embed_tokens.weight",)
    )


@pytest.fixture(scope="module")
def tied_bf16(tmp_path_factory) -> Run:
    """Trainer, tied Llama loaded in bfloat16 (its exp_avg_sq is bfloat16)."""
    return _train_with_trainer(str(tmp_path_factory.mktemp("tied")), tied=True, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Run:
    return _train_plain(str(tmp_path_factory.mktemp("plain")), lambda ps: torch.optim.AdamW(ps, lr=1e-2))


# ----------------------------------------------------------------------------- Trainer checkpoints


def test_trainer_untied_frozen_store_equals_live_exp_avg_sq(untied_frozen, tmp_path):
    """Every exported tensor equals the Trainer optimizer's exp_avg_sq for that named parameter; the frozen
    embedding has no state and is listed as such; step and beta2 are the optimizer's."""
    out = tmp_path / "store.safetensors"
    result = _export(untied_frozen.checkpoint, out)
    stored = _read(str(out))
    assert set(stored) == set(untied_frozen.live)
    for name, state in untied_frozen.live.items():
        assert torch.equal(stored[name], state["exp_avg_sq"]), name
        assert torch.equal(CurvatureStore(str(out)).load(name), state["exp_avg_sq"])
    metadata = CurvatureStore(str(out)).metadata
    assert json.loads(metadata["parameters_without_state"]) == ["model.embed_tokens.weight"]
    assert metadata["source_kind"] == "trainer" and metadata["optimizer"] == "AdamW"
    assert int(metadata["step"]) == 2 and float(metadata["beta2"]) == untied_frozen.beta2
    assert metadata["bias_corrected"] == "false" and metadata["compression"] == "none"
    assert "Trainer decay split" in metadata["mapping"]
    assert "model.embed_tokens.weight" in result.output


def test_trainer_rank1_store_holds_exact_row_and_column_sums(untied_frozen, tmp_path):
    """--compress rank1: r and c are the row and column sums of the live exp_avg_sq; 1-D tensors stay whole;
    the summary reports full and compressed bytes."""
    out = tmp_path / "rank1"
    result = _export(untied_frozen.checkpoint, out, "--compress", "rank1")
    stored = _read(str(out / "exp_avg_sq.safetensors"))
    for name, state in untied_frozen.live.items():
        v = state["exp_avg_sq"].double()
        if v.dim() == 2:
            torch.testing.assert_close(stored[name + ROW_SUFFIX].double(), v.sum(1), rtol=1e-6, atol=0)
            torch.testing.assert_close(stored[name + COL_SUFFIX].double(), v.sum(0), rtol=1e-6, atol=0)
            assert name not in stored
        else:
            assert torch.equal(stored[name], state["exp_avg_sq"])
    full = 4 * sum(s["exp_avg_sq"].numel() for s in untied_frozen.live.values())
    on_disk = os.path.getsize(out / "exp_avg_sq.safetensors")
    assert f"{on_disk:,} bytes" in result.output and f"{full:,} bytes" in result.output
    assert CurvatureStore(str(out / "exp_avg_sq.safetensors")).metadata["compression"] == "rank1"


def test_trainer_tied_bf16_exports_float32_bfloat16_and_bias_corrected(tied_bf16, tmp_path):
    """A bf16 run: the fp32 store holds the bf16 states exactly; --dtype bfloat16 is bit-identical and warns;
    the tied lm_head has no entry of its own; --bias-correct divides by 1 - beta2**step from the live state."""
    assert all(s["exp_avg_sq"].dtype == torch.bfloat16 for s in tied_bf16.live.values())
    assert "lm_head.weight" not in tied_bf16.live and "model.embed_tokens.weight" in tied_bf16.live
    fp32, bf16, corrected = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    _export(tied_bf16.checkpoint, fp32)
    warned = _export(tied_bf16.checkpoint, bf16, "--dtype", "bfloat16")
    assert "bfloat16" in warned.stderr and "mantissa" in warned.stderr
    _export(tied_bf16.checkpoint, corrected, "--bias-correct")
    a, b, c = _read(str(fp32)), _read(str(bf16)), _read(str(corrected))
    assert set(a) == set(tied_bf16.live)
    for name, state in tied_bf16.live.items():
        v = state["exp_avg_sq"]
        assert a[name].dtype == torch.float32 and torch.equal(a[name], v.float())
        assert b[name].dtype == torch.bfloat16 and torch.equal(b[name], v)
        scale = 1.0 - tied_bf16.beta2 ** float(state["step"])
        torch.testing.assert_close(c[name], v.float() / scale, rtol=1e-6, atol=0)
    assert CurvatureStore(str(corrected)).metadata["bias_corrected"] == "true"


def test_trainer_adafactor_rank1_reconstruction_is_adafactors_own_estimate(tmp_path):
    """An Adafactor run exports its factored states as rank-1 pairs whose reconstruction equals Adafactor's
    own second-moment estimate (1 / _approx_sq_grad(row, col)**2); unfactored states are exp_avg_sq."""
    from transformers.optimization import Adafactor

    run = _train_with_trainer(str(tmp_path / "run"), tied=False, optim="adafactor")
    out = tmp_path / "store.safetensors"
    _export(run.checkpoint, out)
    store = CurvatureStore(str(out))
    assert store.metadata["optimizer"] == "Adafactor" and store.metadata["bias_corrected"] == "true"
    factored = 0
    for name, state in run.live.items():
        if "exp_avg_sq_row" in state:
            factored += 1
            assert store.records[name].compressed
            estimate = Adafactor._approx_sq_grad(state["exp_avg_sq_row"], state["exp_avg_sq_col"]).pow(-2)
            torch.testing.assert_close(store.load(name), estimate, rtol=2e-5, atol=0)
        else:
            assert torch.equal(store.load(name), state["exp_avg_sq"])
    assert factored > 0


# ----------------------------------------------------------------------------- plain torch.optim files


@pytest.mark.parametrize("named", [False, True], ids=["indices", "param_names"])
def test_plain_adamw_state_dict_equals_live_exp_avg_sq(tmp_path, named):
    """A torch.save'd AdamW state dict (index-keyed with --model, or with param_names and no model) exports
    exactly the live exp_avg_sq of each named parameter."""
    run = _train_plain(str(tmp_path), lambda ps: torch.optim.AdamW(ps, lr=1e-2), named=named)
    out = tmp_path / "store.safetensors"
    _export(run.checkpoint, out, *([] if named else ["--model", run.model_dir]))
    stored = _read(str(out))
    assert set(stored) == set(run.live) == set(run.names)
    for name, state in run.live.items():
        assert torch.equal(stored[name], state["exp_avg_sq"]), name
    mapping = CurvatureStore(str(out)).metadata["mapping"]
    assert ("param_names" in mapping) if named else ("named_parameters() order" in mapping)


def test_same_shape_frozen_parameter_is_ambiguous_until_named(tmp_path):
    """With one of two adjacent same-shape weights left out of the optimizer, the index mapping is ambiguous:
    an error naming both candidates; --frozen names it and the export equals the live state."""
    frozen = "model.layers.0.mlp.gate_proj.weight"
    run = _train_plain(str(tmp_path), lambda ps: torch.optim.AdamW(ps, lr=1e-2), skip=(frozen,))
    failed = _export(run.checkpoint, tmp_path / "x.safetensors", "--model", run.model_dir, ok=False)
    assert "ambiguous" in failed.output and frozen in failed.output and "up_proj" in failed.output
    assert "--frozen" in failed.output
    assert not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "store.safetensors"
    _export(run.checkpoint, out, "--model", run.model_dir, "--frozen", frozen)
    stored = _read(str(out))
    assert set(stored) == set(run.live) and frozen not in stored
    for name, state in run.live.items():
        assert torch.equal(stored[name], state["exp_avg_sq"]), name


def test_wrong_model_for_the_optimizer_is_an_error(plain, tmp_path):
    """An optimizer state mapped against a model of another width fails, naming the mismatching shapes."""
    other = _model(hidden=2 * HIDDEN)
    other.save_pretrained(str(tmp_path / "other"))
    failed = _export(plain.checkpoint, tmp_path / "x.safetensors", "--model", tmp_path / "other", ok=False)
    assert "cannot map" in failed.output and f"[{VOCAB}, {2 * HIDDEN}]" in failed.output


def test_index_keyed_state_without_model_says_what_is_needed(plain, tmp_path):
    """An index-keyed state without --model (and no config.json next to it) asks for the model."""
    failed = _export(plain.checkpoint, tmp_path / "x.safetensors", ok=False)
    assert "--model" in failed.output and "index" in failed.output


# ----------------------------------------------------------------------------- DCP, DeepSpeed universal


def test_dcp_checkpoint_equals_live_exp_avg_sq(plain, tmp_path):
    """A torch.distributed.checkpoint directory (optimizer.state.<fqn>.exp_avg_sq, written single-process)
    exports each parameter's exp_avg_sq, its step and beta2, verified against the model."""
    import torch.distributed.checkpoint as dcp

    groups = [{"lr": 0.01, "betas": (0.9, plain.beta2), "params": list(plain.live)}]
    state = {"optimizer": {"state": plain.live, "param_groups": groups}}
    dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = tmp_path / "store.safetensors"
    _export(tmp_path / "dcp", out, "--model", plain.model_dir)
    stored = _read(str(out))
    assert set(stored) == set(plain.live)
    for name, s in plain.live.items():
        assert torch.equal(stored[name], s["exp_avg_sq"]), name
    metadata = CurvatureStore(str(out)).metadata
    assert metadata["source_kind"] == "dcp" and float(metadata["beta2"]) == plain.beta2 and int(metadata["step"]) == 2

    # accelerate's FSDP SHARDED_STATE_DICT layout: the DCP directory is checkpoint-N/optimizer_0
    accelerate = tmp_path / "checkpoint-7"
    accelerate.mkdir()
    (tmp_path / "dcp").rename(accelerate / "optimizer_0")
    _export(accelerate, tmp_path / "again.safetensors")
    assert _read(str(tmp_path / "again.safetensors")).keys() == stored.keys()


def test_dcp_keys_without_planner_data_keep_dotted_names():
    """Without planner_data, '<prefix>.state.<fqn>.<key>' still splits into the whole dotted FQN and the key."""
    from mergekit_ota.export.dcp import _path_of

    assert _path_of("optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg_sq") == (
        "optimizer",
        "state",
        "model.layers.0.mlp.up_proj.weight",
        "exp_avg_sq",
    )
    assert _path_of("optimizer.param_groups.1.betas") == ("optimizer", "param_groups", 1, "betas")


def test_deepspeed_universal_checkpoint_equals_live_exp_avg_sq(plain, tmp_path):
    """A ds_to_universal layout (zero/<name>/exp_avg_sq.pt = {'param': tensor, 'cat_dim': 0}, step.pt,
    zero/optimizer_state.pt with param_groups) exports each parameter's exp_avg_sq."""
    zero = tmp_path / "universal" / "zero"
    for name, s in plain.live.items():
        (zero / name).mkdir(parents=True)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.save({"param": s[key], "cat_dim": 0}, zero / name / f"{key}.pt")
        torch.save({"param": torch.zeros_like(s["exp_avg"]), "cat_dim": 0}, zero / name / "fp32.pt")
        torch.save(int(s["step"]), zero / name / "step.pt")
    torch.save(
        {"param_groups": [{"lr": 0.01, "betas": (0.9, plain.beta2), "params": [0]}]}, zero / "optimizer_state.pt"
    )
    out = tmp_path / "store.safetensors"
    _export(tmp_path / "universal", out, "--model", plain.model_dir)
    stored = _read(str(out))
    assert set(stored) == set(plain.live)
    for name, s in plain.live.items():
        assert torch.equal(stored[name], s["exp_avg_sq"]), name
    metadata = CurvatureStore(str(out)).metadata
    assert metadata["source_kind"] == "deepspeed-universal" and float(metadata["beta2"]) == plain.beta2


# ----------------------------------------------------------------------------- existing stores, output


def test_store_reshards_converts_and_compresses(plain, tmp_path):
    """An existing store re-exported into shards (index + several files) holds the same tensors, readable by
    safetensors and CurvatureStore; compressing it gives the row and column sums; metadata carries over."""
    first = tmp_path / "first.safetensors"
    _export(plain.checkpoint, first, "--model", plain.model_dir)
    sharded = tmp_path / "sharded"
    _export(first, sharded, "--shard-size", "20KB")
    index = sharded / "exp_avg_sq.safetensors.index.json"
    shards = sorted(p.name for p in sharded.iterdir() if p.name != index.name)
    assert index.exists() and len(shards) > 2 and all("-of-" in s for s in shards)
    for shard in shards:  # every shard within the limit unless it holds one larger tensor
        with safe_open(str(sharded / shard), framework="pt") as handle:
            assert len(list(handle.keys())) == 1 or os.path.getsize(sharded / shard) <= 20_000 + 4096
    stored, store = _read(str(index)), CurvatureStore(str(index))
    assert set(stored) == set(plain.live)
    for name, s in plain.live.items():
        assert torch.equal(stored[name], s["exp_avg_sq"]) and torch.equal(store.load(name), s["exp_avg_sq"])
    assert store.metadata["source_kind"] == "torch" and store.metadata["optimizer"] == "AdamW"

    packed = tmp_path / "packed.safetensors"
    _export(index, packed, "--compress", "rank1", "--dtype", "bfloat16")
    small = _read(str(packed))
    for name, s in plain.live.items():
        v = s["exp_avg_sq"]
        if v.dim() == 2:
            assert small[name + ROW_SUFFIX].dtype == torch.bfloat16
            assert torch.equal(small[name + ROW_SUFFIX], v.sum(1).to(torch.bfloat16))
    assert os.path.getsize(packed) < os.path.getsize(first) / 10


def test_store_into_index_path_next_to_a_model(plain, tmp_path):
    """OUT ending in .safetensors.index.json writes shards and the index next to it (a model directory's
    default store location), which the merge's store locator finds."""
    from mergekit_ota.curvature.locate import locate_store

    model_dir = tmp_path / "expert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    _export(
        plain.checkpoint,
        model_dir / "exp_avg_sq.safetensors.index.json",
        "--model",
        plain.model_dir,
        "--shard-size",
        "30KB",
    )
    found = locate_store(None, str(model_dir), "expert")
    assert found.endswith("exp_avg_sq.safetensors.index.json")
    assert set(CurvatureStore(found).names()) == set(plain.live)
    assert (model_dir / "config.json").read_text() == "{}"


def test_existing_output_needs_force_and_only_stores_are_ever_replaced(plain, tmp_path):
    """An existing OUT is refused without --force; with it a store is replaced, but a file that is not a
    store (model weights) or a directory holding anything but a store is refused and left as it was;
    nothing is left half-written."""
    args = [plain.checkpoint, "--model", plain.model_dir]
    weights = os.path.join(plain.model_dir, "model.safetensors")
    before = open(weights, "rb").read()
    failed = _export(args[0], weights, *args[1:], "--force", ok=False)
    assert "model loaders read files named model*.safetensors*" in failed.output
    assert open(weights, "rb").read() == before
    other = tmp_path / "weights_copy.safetensors"  # safetensors, but not a store: refused even with --force
    other.write_bytes(before)
    failed = _export(args[0], other, *args[1:], "--force", ok=False)
    assert "not a curvature store" in failed.output and other.read_bytes() == before

    out = tmp_path / "store.safetensors"
    _export(args[0], out, *args[1:], "--compress", "rank1")
    failed = _export(args[0], out, *args[1:], ok=False)
    assert "already exists" in failed.output
    _export(args[0], out, *args[1:], "--force")
    assert set(_read(str(out))) == set(plain.live)

    store_dir = tmp_path / "store_dir"
    _export(args[0], store_dir, *args[1:])
    _export(args[0], store_dir, *args[1:], "--force", "--compress", "rank1")
    assert any(k.endswith(ROW_SUFFIX) for k in _read(str(store_dir / "exp_avg_sq.safetensors")))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    failed = _export(args[0], foreign, *args[1:], "--force", ok=False)
    assert "precious.txt" in failed.output and (foreign / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "foreign",
        "store.safetensors",
        "store_dir",
        "weights_copy.safetensors",
    ]


# ----------------------------------------------------------------------------- refusals


def _save_state(path, state: dict, groups: list) -> str:
    torch.save({"state": state, "param_groups": groups}, path)
    return str(path)


def _run_optimizer(factory, steps: int = 2) -> dict:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4, 8))]
    optimizer = factory(weights)
    for _ in range(steps):
        sum((w**2).sum() for w in weights).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer.state_dict()


def test_refuses_sgd_momentum(tmp_path):
    """SGD with momentum has no second moment: refused, naming momentum_buffer and SGD."""
    path = tmp_path / "sgd.pt"
    torch.save(_run_optimizer(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)), path)
    failed = _export(path, tmp_path / "x.safetensors", ok=False)
    assert "no second moment" in failed.output and "momentum_buffer" in failed.output and "SGD" in failed.output


def test_refuses_muon(tmp_path):
    """torch.optim.Muon keeps only a momentum buffer for its matrices: refused, naming Muon."""
    path = tmp_path / "muon.pt"
    torch.save(_run_optimizer(lambda ps: torch.optim.Muon(ps, lr=0.01)), path)
    failed = _export(path, tmp_path / "x.safetensors", ok=False)
    assert "no second moment" in failed.output and "Muon" in failed.output


def test_refuses_lion(tmp_path):
    """A Lion state (exp_avg only, as lion-pytorch saves it) is refused, naming exp_avg and Lion."""
    path = _save_state(
        tmp_path / "lion.pt",
        {0: {"exp_avg": torch.rand(4, 4)}},
        [{"params": [0], "lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0}],
    )
    failed = _export(path, tmp_path / "x.safetensors", ok=False)
    assert "exp_avg" in failed.output and "Lion" in failed.output


def test_refuses_non_blockwise_8bit_states(tmp_path):
    """Non-blockwise 8-bit states (max1/max2/new_max*, bitsandbytes' block_wise=False) are refused, not misread."""
    codes = torch.randint(0, 255, (4, 4), dtype=torch.uint8)
    state = {
        0: {
            "step": 3,
            "state1": codes,
            "state2": codes,
            "qmap1": torch.rand(256),
            "qmap2": torch.rand(256),
            "max1": torch.rand(1),
            "max2": torch.rand(1),
            "new_max1": torch.rand(1),
            "new_max2": torch.rand(1),
        }
    }
    path = _save_state(tmp_path / "adam8bit.pt", state, [{"params": [0], "lr": 1e-3, "betas": (0.9, 0.999)}])
    failed = _export(path, tmp_path / "x.safetensors", ok=False)
    assert "non-blockwise 8-bit" in failed.output and "max2" in failed.output


def test_refuses_lora_states_by_name_and_by_adapter_config(plain, tmp_path):
    """A bare LoRA optimizer state is refused by its lora_A/lora_B parameter names (pointing to the PEFT checkpoint
    directory, which export reads: tests/test_export_lora.py); a Trainer checkpoint holding adapter_config.json is
    read as a PEFT run, so an adapter_config.json that is not PEFT's LoRA config is refused naming it, also when
    the optimizer.pt beside it is given itself."""
    named = [
        ("base_model.model.layers.0.q_proj.lora_A.default.weight", torch.nn.Parameter(torch.randn(4, 32))),
        ("base_model.model.layers.0.q_proj.lora_B.default.weight", torch.nn.Parameter(torch.zeros(32, 4))),
    ]
    optimizer = torch.optim.AdamW(named, lr=1e-3)
    sum((p**2).sum() for _, p in named).backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "lora.pt")
    failed = _export(tmp_path / "lora.pt", tmp_path / "x.safetensors", ok=False)
    assert "LoRA" in failed.output and "lora_A" in failed.output and "adapter_config.json" in failed.output

    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    torch.save(torch.load(plain.checkpoint, weights_only=True), checkpoint / "optimizer.pt")
    (checkpoint / "adapter_config.json").write_text("{}")
    failed = _export(checkpoint, tmp_path / "y.safetensors", "--model", plain.model_dir, ok=False)
    assert "LoRA" in failed.output and "adapter_config.json: no 'peft_type'" in failed.output
    # the optimizer.pt file itself, given as SOURCE: the adapter_config.json beside it still decides
    failed = _export(checkpoint / "optimizer.pt", tmp_path / "z.safetensors", "--model", plain.model_dir, ok=False)
    assert "LoRA" in failed.output and "adapter_config.json: no 'peft_type'" in failed.output


def test_refuses_broken_deepspeed_and_unknown_directories(tmp_path):
    """A ZeRO checkpoint whose rank file is not a torch file is refused naming that file; an unrelated
    directory is refused listing what it holds.  (Real ZeRO checkpoints: tests/test_export_zero.py.)"""
    raw = tmp_path / "ds"
    (raw / "global_step10").mkdir(parents=True)
    (raw / "global_step10" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (raw / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"")
    failed = _export(raw, tmp_path / "x.safetensors", ok=False)
    assert "mp_rank_00_model_states.pt" in failed.output and "cannot read it as a torch.save file" in failed.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    failed = _export(other, tmp_path / "y.safetensors", ok=False)
    assert "no optimizer state found" in failed.output and "notes.txt" in failed.output


def test_refuses_pickled_code(tmp_path):
    """A checkpoint holding arbitrary Python objects is not unpickled (weights_only): a clear refusal."""
    import argparse

    path = tmp_path / "ckpt.pt"
    torch.save({"optimizer": {"state": {}, "param_groups": []}, "args": argparse.Namespace(lr=1)}, path)
    failed = _export(path, tmp_path / "x.safetensors", ok=False)
    assert "refusing to unpickle" in failed.output and str(path) in failed.output


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_store_is_a_clear_error(plain, tmp_path, damage):
    """A truncated or header-corrupted store given to export is an error naming the file, not a library crash."""
    good = tmp_path / "good.safetensors"
    _export(plain.checkpoint, good, "--model", plain.model_dir)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) - 100] if damage == "truncated" else data[:8] + b"{garbage" + data[16:])
    failed = _export(bad, tmp_path / "x.safetensors", ok=False)
    assert str(bad) in failed.output
    assert ("truncated" in failed.output) if damage == "truncated" else ("corrupted" in failed.output)


def test_nan_in_state_fails_without_leaving_output(tmp_path):
    """A NaN in exp_avg_sq is an error naming the parameter; neither OUT nor a temporary file remains."""
    from safetensors.torch import save_file

    v = torch.rand(6, 5)
    v[2, 3] = float("nan")
    save_file({"a.weight": torch.rand(3), "b.weight": v}, str(tmp_path / "src.safetensors"))  # our writer refuses NaN
    failed = _export(tmp_path / "src.safetensors", tmp_path / "out", ok=False)
    assert "NaN" in failed.output and "b.weight" in failed.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_bias_correct_without_step_is_refused_before_writing(tmp_path):
    """--bias-correct on a source that records no step asks for --step, and writes nothing."""
    from mergekit_ota.curvature.writer import save_store

    save_store({"w": torch.rand(3, 3)}, str(tmp_path / "src.safetensors"), metadata={"beta2": "0.999"})
    failed = _export(tmp_path / "src.safetensors", tmp_path / "out.safetensors", "--bias-correct", ok=False)
    assert "--step" in failed.output and not (tmp_path / "out.safetensors").exists()
    _export(tmp_path / "src.safetensors", tmp_path / "out.safetensors", "--bias-correct", "--step", "10")
    source, out = _read(str(tmp_path / "src.safetensors")), _read(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(out["w"], source["w"] / (1 - 0.999**10), rtol=1e-6, atol=0)


def test_export_is_registered_in_the_cli():
    """`mergekit-ota --help` lists export."""
    from mergekit_ota.cli.main import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "export" in result.output


def test_merge_with_store_lacking_a_frozen_parameter_says_it_was_frozen(untied_frozen, tmp_path):
    """A merge that needs curvature for a parameter the export recorded as stateless (frozen) fails at
    planning, naming the store, the tensor, and that the optimizer had no state for it."""
    import shutil

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota
    from mergekit_ota.errors import PreflightError

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    store = tmp_path / "store.safetensors"
    _export(untied_frozen.checkpoint, store)
    base = tmp_path / "base"
    shutil.copytree(untied_frozen.model_dir, base)
    config = {
        "merge_method": "ota",
        "base_model": str(base),
        "models": [{"model": untied_frozen.model_dir, "parameters": {"curvature": str(store)}}],
    }
    with pytest.raises(
        PreflightError,
        match=r"store\.safetensors: no curvature tensor 'model\.embed_tokens\.weight'.*frozen in training",
    ):
        run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()
