"""``mergekit-ota export`` of a PEFT LoRA Trainer checkpoint: rank-1 curvature under the base model's names.

Fixtures (``tests/fixtures/peft/generate.py``, real): a tiny Llama saved as ``base/`` and PEFT 0.21 LoRA runs of it
(3 steps of ``transformers.Trainer``), each kept as the Trainer wrote ``checkpoint-3/``: with AdamW, plain LoRA,
rsLoRA, ``modules_to_save=["lm_head"]`` and DoRA (refused); with bitsandbytes, 8-bit AdamW (r=128: states kept
blockwise in 8 bits, and two in 32 bits) and QLoRA's paged 8-bit AdamW (r=4: states kept in 32 bits); under
DeepSpeed ZeRO-2 and ZeRO-3 (the adapter's files beside ``global_step3/``). Each ``truth.json`` holds the
optimizer's parameters in index order, read from the live optimizer by object identity, and PEFT's own
``scaling`` per module; ``truth.safetensors`` holds each second moment as bitsandbytes itself reads it (its runs)
or as DeepSpeed's ``safe_get_full_optimizer_state`` gives it (the ZeRO runs). The tests compute every expected
record from the raw files with them (``torch.load`` of ``optimizer.pt`` or ``truth.safetensors``,
``adapter_model.safetensors``) and the float64 reference, never through the exporter's mapping. No peft,
bitsandbytes or DeepSpeed is needed here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_ota.cli.export import export_command
from mergekit_ota.curvature.fingerprint import FINGERPRINT_KEY, tensors_fingerprint
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.math.reference import reference_lora
from mergekit_ota.store_format import (
    ADAPTER,
    ADAPTER_AGREEMENT,
    ADAPTER_CONFIG,
    ADAPTER_FINGERPRINT,
    ADAPTER_UNTOUCHED,
    COL_SUFFIX,
    ROW_SUFFIX,
    WITHOUT_STATE,
    metadata_names,
)

FIXTURES = Path(__file__).parent / "fixtures" / "peft"
BASE = FIXTURES / "base"
VARIANTS = ("lora", "rslora", "modules_to_save", "adamw8bit", "paged_adamw_8bit", "zero2", "zero3")
_LIVE_LORA = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.default\.weight$")
_LIVE_SAVED = re.compile(r"^base_model\.model\.(?P<module>.+)\.modules_to_save\.default\.(?P<leaf>.+)$")


def _export(*args, ok: bool = True):
    result = CliRunner().invoke(export_command, [str(a) for a in args] + ["--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
    return result


def _checkpoint(variant: str) -> Path:
    return FIXTURES / variant / "checkpoint-3"


def _truth(variant: str) -> dict:
    return json.loads((FIXTURES / variant / "truth.json").read_text())


def _expected(variant: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The store a correct export writes, from the raw files: ``{key: tensor}`` and ``{weight: agreement}``."""
    truth = _truth(variant)
    checkpoint = _checkpoint(variant)
    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    order = [name for group in truth["optimizer_order"] for name in group]
    if (FIXTURES / variant / "truth.safetensors").exists():  # bitsandbytes' or DeepSpeed's own reading of the states
        v = load_file(str(FIXTURES / variant / "truth.safetensors"))
    else:
        states = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
        v = {name: states[index]["exp_avg_sq"] for index, name in enumerate(order)}
    expected: Dict[str, torch.Tensor] = {}
    agreement: Dict[str, float] = {}
    for name in order:
        if match := _LIVE_SAVED.match(name):
            expected[f"{match.group('module')}.{match.group('leaf')}"] = v[name]
            continue
        match = _LIVE_LORA.match(name)
        assert match, name
        if match.group("side") == "B":
            continue
        module = match.group("module")
        a_live, b_live = name, name.replace(".lora_A.", ".lora_B.")
        a = weights[f"base_model.model.{module}.lora_A.weight"]
        b = weights[f"base_model.model.{module}.lora_B.weight"]
        v_hat, agreement[f"{module}.weight"] = reference_lora(
            v[a_live], v[b_live], a, b, truth["scaling"][f"base_model.model.{module}"]
        )
        expected[f"{module}.weight{ROW_SUFFIX}"] = v_hat.sum(1)
        expected[f"{module}.weight{COL_SUFFIX}"] = v_hat.sum(0)
    return expected, agreement


def _assert_store(stored: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert sorted(stored) == sorted(expected)
    for key, value in expected.items():
        if key.endswith((ROW_SUFFIX, COL_SUFFIX)):
            torch.testing.assert_close(stored[key].double(), value, rtol=1e-5, atol=0.0, msg=key)
        else:
            assert torch.equal(stored[key], value), key  # modules_to_save: Adam's v as it is


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_is_the_math_under_the_base_models_names(variant, tmp_path):
    """Every adapted weight's record is the float64 reference applied to its raw lora_A/lora_B states and weights
    (PEFT's own s), stored as rank-1 under the base model's weight name; modules_to_save weights are Adam's v
    whole; the metadata says it came from a LoRA adapter, which base weights it leaves alone, and each weight's
    scale agreement."""
    out = tmp_path / "store.safetensors"
    _export(_checkpoint(variant), out, "--model", BASE)
    stored = load_file(str(out))
    expected, agreement = _expected(variant)
    _assert_store(stored, expected)
    base_names = list(load_file(str(BASE / "model.safetensors")))
    exported = {key.split(":")[0] for key in stored}
    assert exported <= set(base_names)
    assert {"lm_head.weight" in stored, variant == "modules_to_save"} == {variant == "modules_to_save"}

    metadata = CurvatureStore(str(out)).metadata
    assert metadata[ADAPTER] == "lora"
    untouched = metadata_names(metadata, ADAPTER_UNTOUCHED, str(out))
    assert sorted(untouched) == sorted(set(base_names) - exported)
    assert metadata_names(metadata, WITHOUT_STATE, str(out)) == untouched
    config = json.loads(metadata[ADAPTER_CONFIG])
    lora = _truth(variant)["lora_config"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (
        lora["r"],
        lora["lora_alpha"],
        bool(lora.get("use_rslora")),
    )
    recorded = json.loads(metadata[ADAPTER_AGREEMENT])
    assert recorded.keys() == agreement.keys()
    for name, value in agreement.items():
        assert recorded[name] == pytest.approx(value, abs=1e-6) and 0.0 < value <= 1.0
    assert metadata["step"] == "3" and float(metadata["beta2"]) == _truth(variant)["adam_beta2"]
    # which adapter: the fingerprint of every tensor of its file (from the loaded tensors), no weights fingerprint
    adapter = load_file(str(_checkpoint(variant) / "adapter_model.safetensors"))
    assert metadata[ADAPTER_FINGERPRINT] == tensors_fingerprint(adapter)
    assert FINGERPRINT_KEY not in metadata


def test_a_zero_run_exports_alike_from_its_checkpoint_or_its_global_step_directory(tmp_path):
    """Under DeepSpeed the Trainer's checkpoint-N/ holds the adapter beside global_stepN/: given either, export
    writes the same store; without the adapter's files beside it, the run is refused naming what export reads."""
    for variant in ("zero2", "zero3"):
        whole, step = tmp_path / f"{variant}.safetensors", tmp_path / f"{variant}-step.safetensors"
        _export(_checkpoint(variant), whole, "--model", BASE)
        _export(_checkpoint(variant) / "global_step3", step, "--model", BASE)
        a, b = load_file(str(whole)), load_file(str(step))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bare = tmp_path / "bare"
    shutil.copytree(_checkpoint("zero2") / "global_step3", bare / "global_step3")
    (bare / "latest").write_text("global_step3")
    result = _export(bare, tmp_path / "bare.safetensors", "--model", BASE, ok=False)
    assert "a LoRA/adapter run" in result.output and "global_stepN/" in result.output


@pytest.mark.parametrize("variant", ["zero2", "zero3"])
def test_the_callback_under_deepspeed_left_the_store_export_writes(variant, tmp_path):
    """CurvatureCallback ran in the ZeRO fixtures' training (a PEFT model under DeepSpeed, on one CPU rank): the store
    it left in checkpoint-3/ is export's of that checkpoint, tensor for tensor, with the same adapter metadata."""
    out = tmp_path / "store.safetensors"
    _export(_checkpoint(variant), out, "--model", BASE, "--compress", "rank1")
    captured = _checkpoint(variant) / "exp_avg_sq.safetensors"
    ours, theirs = load_file(str(captured)), load_file(str(out))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    mine, export = CurvatureStore(str(captured)).metadata, CurvatureStore(str(out)).metadata
    for key in (ADAPTER, ADAPTER_AGREEMENT, ADAPTER_FINGERPRINT, ADAPTER_UNTOUCHED, "step", "beta2"):
        assert mine[key] == export[key], key


def test_rslora_scaling_is_peft_own():
    """The fixtures' s: lora_alpha / r (8 / 4) plain, lora_alpha / sqrt(r) (6 / 2) under rsLoRA, as PEFT set it;
    the exporter's s (read from adapter_config.json) is the same."""
    from mergekit_ota.export.peft_config import read_adapter_config

    for variant, s in (("lora", 2.0), ("rslora", 3.0), ("modules_to_save", 2.0)):
        assert set(_truth(variant)["scaling"].values()) == {s}
        config = read_adapter_config(str(_checkpoint(variant) / "adapter_config.json"))
        assert config.scaling("model.layers.0.self_attn.q_proj", 4) == s


def test_bias_correction_scales_every_record(tmp_path):
    """--bias-correct divides by 1 - beta2**step (beta2 0.99, step 3) as for any Adam state."""
    _export(_checkpoint("lora"), tmp_path / "plain.safetensors", "--model", BASE)
    _export(_checkpoint("lora"), tmp_path / "corrected.safetensors", "--model", BASE, "--bias-correct")
    plain, corrected = (
        load_file(str(tmp_path / "plain.safetensors")),
        load_file(str(tmp_path / "corrected.safetensors")),
    )
    for key, value in plain.items():
        torch.testing.assert_close(corrected[key], value / (1 - 0.99**3), rtol=1e-6, atol=0.0)


def test_optimizer_file_and_recorded_names_give_the_same_store(tmp_path):
    """The checkpoint's optimizer.pt given itself reads it with its adapter; an optimizer that recorded its
    param_names (PEFT's live names, ``...lora_A.default.weight``) is named by them, exactly, to the same store."""
    _export(_checkpoint("modules_to_save"), tmp_path / "dir.safetensors", "--model", BASE)
    reference = load_file(str(tmp_path / "dir.safetensors"))
    _export(_checkpoint("modules_to_save") / "optimizer.pt", tmp_path / "file.safetensors", "--model", BASE)
    _assert_store(load_file(str(tmp_path / "file.safetensors")), {k: v.double() for k, v in reference.items()})

    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(_checkpoint("modules_to_save"), checkpoint)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    order = _truth("modules_to_save")["optimizer_order"]
    for group, names in zip(saved["param_groups"], order):
        group["param_names"] = list(names)
    torch.save(saved, checkpoint / "optimizer.pt")
    _export(checkpoint, tmp_path / "named.safetensors", "--model", BASE)
    _assert_store(load_file(str(tmp_path / "named.safetensors")), {k: v.double() for k, v in reference.items()})
    assert CurvatureStore(str(tmp_path / "named.safetensors")).metadata["mapping_basis"] == "param_names"


def test_base_model_from_adapter_config(tmp_path, monkeypatch):
    """Without --model the base is adapter_config.json's base_model_name_or_path where that is a local directory
    ("base", relative to the fixtures' directory); elsewhere the error names the file and asks for --model."""
    monkeypatch.chdir(FIXTURES)
    _export(_checkpoint("lora"), tmp_path / "store.safetensors")
    _assert_store(load_file(str(tmp_path / "store.safetensors")), _expected("lora")[0])
    monkeypatch.chdir(tmp_path)
    failed = _export(_checkpoint("lora"), tmp_path / "other.safetensors", ok=False)
    assert "adapter_config.json" in failed.output and "--model" in failed.output and "'base'" in failed.output


def test_dora_is_refused_naming_the_file_and_the_fix(tmp_path):
    """DoRA's magnitude vector changes W0 + s B A: refused, naming adapter_config.json, with the fallback."""
    failed = _export(_checkpoint("dora"), tmp_path / "store.safetensors", "--model", BASE, ok=False)
    assert "dora/checkpoint-3/adapter_config.json" in failed.output and "DoRA" in failed.output
    assert "merge_and_unload" in failed.output and "mergekit-ota fisher" in failed.output
    assert not (tmp_path / "store.safetensors").exists()


def _copy(tmp_path: Path, variant: str = "lora") -> Path:
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(_checkpoint(variant), checkpoint)
    return checkpoint


def _edit_config(checkpoint: Path, **changes) -> None:
    path = checkpoint / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"peft_type": "ADALORA"}, "AdaLoRA adapter"),
        ({"peft_type": "LOHA"}, "LoHa adapter"),
        ({"peft_type": "LOKR"}, "LoKr adapter"),
        ({"peft_type": "IA3"}, "IA3 adapter"),
        ({"lora_bias": True}, "lora_bias"),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters"),
    ],
)
def test_other_adapter_types_are_refused_by_name(tmp_path, changes, named):
    checkpoint = _copy(tmp_path)
    _edit_config(checkpoint, **changes)
    failed = _export(checkpoint, tmp_path / "store.safetensors", "--model", BASE, ok=False)
    assert named in failed.output and "adapter_config.json" in failed.output
    assert "mergekit-ota fisher" in failed.output


def test_errors_name_the_file_and_what_was_expected(tmp_path):
    """A wrong base model, a missing or pickled adapter file, a config without peft_type, and a DoRA tensor in a
    config that does not say DoRA: each error names the file and what it expected."""
    from transformers import LlamaConfig

    checkpoint = _copy(tmp_path)
    other = tmp_path / "other-base"
    config = LlamaConfig.from_pretrained(str(BASE))
    config.intermediate_size = 40
    config.save_pretrained(str(other))
    failed = _export(checkpoint, tmp_path / "a.safetensors", "--model", other, ok=False)
    assert "adapter_model.safetensors" in failed.output and "is --model the adapter's base model?" in failed.output
    assert "mlp." in failed.output and ", 40]" in failed.output

    weights = checkpoint / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    weights.rename(checkpoint / "adapter_model.bin")
    failed = _export(checkpoint, tmp_path / "b.safetensors", "--model", BASE, ok=False)
    assert "adapter_model.bin" in failed.output and "safetensors" in failed.output
    (checkpoint / "adapter_model.bin").unlink()
    failed = _export(checkpoint, tmp_path / "c.safetensors", "--model", BASE, ok=False)
    assert "no adapter_model.safetensors" in failed.output

    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.ones(48)
    save_file(tensors, str(weights))
    failed = _export(checkpoint, tmp_path / "d.safetensors", "--model", BASE, ok=False)
    assert str(weights) in failed.output and "lora_magnitude_vector" in failed.output and "DoRA" in failed.output

    del tensors["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"]
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(weights))
    failed = _export(checkpoint, tmp_path / "e.safetensors", "--model", BASE, ok=False)
    assert "layers.1.mlp.up_proj' has lora_A but no lora_B" in failed.output

    (checkpoint / "adapter_config.json").write_text("{}")
    failed = _export(checkpoint, tmp_path / "f.safetensors", "--model", BASE, ok=False)
    assert "adapter_config.json: no 'peft_type'" in failed.output and "LoRA" in failed.output


def test_an_optimizer_that_is_not_this_adapters_is_refused(tmp_path):
    """An optimizer.pt whose states do not fit the adapter's weights (one state reshaped to 5 x 5): no order of the
    adapter's weights fits, and the error names the file and the shapes it compared."""
    checkpoint = _copy(tmp_path)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    first = saved["param_groups"][0]["params"][0]
    saved["state"][first]["exp_avg_sq"] = torch.zeros(5, 5)
    torch.save(saved, checkpoint / "optimizer.pt")
    failed = _export(checkpoint, tmp_path / "store.safetensors", "--model", BASE, ok=False)
    assert "optimizer.pt" in failed.output and "cannot map the optimizer's parameter indices" in failed.output
    assert "[5, 5]" in failed.output


def test_peft_names_and_the_optimizer_order():
    """PEFT's live names map to the file's; each adapted weight's lora_A then lora_B take its place in the base
    order and a modules_to_save weight keeps its own; with fan_in_fan_out (GPT-2's Conv1D) the base weight is
    stored transposed, n x m."""
    from mergekit_ota.errors import CurvatureError
    from mergekit_ota.export.peft_names import adapter_layout, file_key

    prefix = "base_model.model."
    assert file_key(f"{prefix}h.0.attn.c_attn.lora_A.default.weight") == f"{prefix}h.0.attn.c_attn.lora_A.weight"
    assert file_key(f"module.{prefix}lm_head.modules_to_save.other.weight") == f"module.{prefix}lm_head.weight"
    base = [("wte.weight", (10, 4)), ("h.0.attn.c_attn.weight", (4, 12)), ("h.0.ln.weight", (4,)), ("head", (3, 4))]
    shapes = {
        f"{prefix}h.0.attn.c_attn.lora_B.weight": (12, 2),
        f"{prefix}h.0.attn.c_attn.lora_A.weight": (2, 4),
        f"{prefix}head": (3, 4),
    }
    layout = adapter_layout(shapes, base, True, "adapter_model.safetensors", "do X")
    assert [w.base for w in layout.adapted] == ["h.0.attn.c_attn.weight"] and layout.adapted[0].shape == (12, 4)
    assert [k for k, _ in layout.order] == [
        f"{prefix}h.0.attn.c_attn.lora_A.weight",
        f"{prefix}h.0.attn.c_attn.lora_B.weight",
        f"{prefix}head",
    ]
    assert layout.saved == {"head": f"{prefix}head"} and layout.untouched == ("wte.weight", "h.0.ln.weight")
    with pytest.raises(CurvatureError, match=r"is 12 x 4, but 'h.0.attn.c_attn.weight' has shape \[4, 12\]"):
        adapter_layout(shapes, base, False, "adapter_model.safetensors", "do X")
    with pytest.raises(CurvatureError, match="does not start with 'base_model.model.'"):
        adapter_layout({"h.0.attn.c_attn.lora_A.weight": (2, 4)}, base, True, "adapter_model.safetensors", "do X")


def test_alpha_pattern_matches_as_peft_does(tmp_path):
    """alpha_pattern keys match a module name's tail as PEFT's get_pattern_key does; others keep lora_alpha."""
    from mergekit_ota.export.peft_config import read_adapter_config

    checkpoint = _copy(tmp_path)
    _edit_config(checkpoint, alpha_pattern={"mlp\\.down_proj": 16})
    config = read_adapter_config(str(checkpoint / "adapter_config.json"))
    assert config.scaling("model.layers.1.mlp.down_proj", 4) == 4.0
    assert config.scaling("model.layers.1.mlp.up_proj", 4) == 2.0
    assert config.scaling("model.layers.1.mlp.xdown_proj", 4) == 2.0
