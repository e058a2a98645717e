"""Curvature captured while training a PEFT LoRA adapter: CurvatureCallback and save_curvature write what
``mergekit-ota export`` writes from the same run's checkpoint, and a merge of ``BASE+ADAPTER`` finds it.

Real runs: a tiny Llama with a PEFT LoRA (peft comes with mergekit) trained by ``transformers.Trainer`` for 4 steps
on CPU; the reference is ``mergekit-ota export`` of the checkpoint that run saved (its ``optimizer.pt``,
``adapter_model.safetensors`` and ``adapter_config.json``, with ``--model`` the base).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import train_with_callback

from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import export_curvature
from mergekit_ota.store_format import ADAPTER, ADAPTER_AGREEMENT, ADAPTER_FINGERPRINT, ADAPTER_UNTOUCHED

VOCAB, HIDDEN = 64, 32


def _base(directory: Path) -> Path:
    from transformers import LlamaForCausalLM

    from mergekit_ota.testing import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, hidden_size=HIDDEN)).save_pretrained(str(directory))
    return directory


def _peft(base: Path, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    return get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), LoraConfig(**settings))


def _train(model, out: Path):
    from mergekit_ota.training import CurvatureCallback

    callback = CurvatureCallback()
    trainer = train_with_callback(model, out, VOCAB, callback, data_seed=10, seed=0, learning_rate=1e-2)
    return callback, trainer


@pytest.mark.parametrize("lora", [{}, {"modules_to_save": ["lm_head"], "use_rslora": True}], ids=["lora", "saved"])
def test_the_callback_on_a_peft_model_writes_what_export_writes_from_its_checkpoint(lora, tmp_path):
    """Every checkpoint of a LoRA run gets the store `mergekit-ota export CHECKPOINT --model BASE --compress rank1`
    (the callback's default compression) writes from it,
    tensor for tensor, with the same adapter metadata (settings, untouched weights, scale agreement, the adapter
    file's fingerprint); the store is named by the base model's weights."""
    base = _base(tmp_path / "base")
    callback, _ = _train(_peft(base, **lora), tmp_path / "run")
    names = [Path(p).relative_to(tmp_path / "run").as_posix() for p in callback.written]
    assert names == [
        "checkpoint-2/exp_avg_sq.safetensors",
        "checkpoint-4/exp_avg_sq.safetensors",
        "exp_avg_sq.safetensors",
    ]
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        exported = tmp_path / f"export-{step}.safetensors"
        export_curvature(str(checkpoint), str(exported), ExportOptions.parse(model=str(base), compress="rank1"))
        ours, theirs = load_file(str(checkpoint / "exp_avg_sq.safetensors")), load_file(str(exported))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
        mine, export = (
            CurvatureStore(str(checkpoint / "exp_avg_sq.safetensors")).metadata,
            CurvatureStore(str(exported)).metadata,
        )
        for key in (ADAPTER, ADAPTER_AGREEMENT, ADAPTER_FINGERPRINT, ADAPTER_UNTOUCHED, "step", "beta2"):
            assert mine[key] == export[key], key
        assert mine["source_kind"] == "training" and mine["step"] == str(step)
        base_names = set(load_file(str(base / "model.safetensors")))
        stored = {k.split(":")[0] for k in ours}
        assert stored <= base_names and ("lm_head.weight" in stored) == bool(lora)
    final, last = (
        load_file(str(tmp_path / "run" / "exp_avg_sq.safetensors")),
        load_file(str(tmp_path / "run" / "checkpoint-4" / "exp_avg_sq.safetensors")),
    )
    assert all(torch.equal(final[k], last[k]) for k in last)


def test_save_curvature_refuses_what_export_refuses_on_a_live_peft_model(tmp_path):
    """save_curvature on a live PEFT model: DoRA is refused by name (as export refuses its checkpoint), and so is a
    trained weight PEFT does not save with the adapter; nothing is written either time."""
    from mergekit_ota.training import save_curvature

    base = _base(tmp_path / "base")
    dora = _peft(base, use_dora=True)
    optimizer = torch.optim.AdamW([p for p in dora.parameters() if p.requires_grad])
    ids = torch.randint(0, VOCAB, (2, 8))
    dora(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    out = tmp_path / "dora.safetensors"
    with pytest.raises(CurvatureError, match="DoRA") as error:
        save_curvature(dora, optimizer, str(out))
    assert "mergekit-ota fisher BASE+ADAPTER" in str(error.value) and not out.exists()

    model = _peft(base)
    norm = model.base_model.model.model.norm.weight
    norm.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    out = tmp_path / "norm.safetensors"
    with pytest.raises(CurvatureError, match=r"model\.norm\.weight' is trained but is neither"):
        save_curvature(model, optimizer, str(out))
    assert not out.exists()


def test_save_curvature_before_the_first_step_names_the_missing_state(tmp_path):
    from mergekit_ota.training import save_curvature

    model = _peft(_base(tmp_path / "base"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(CurvatureError, match="no optimizer state for the adapter's .* save after the first"):
        save_curvature(model, optimizer, str(tmp_path / "early.safetensors"))
