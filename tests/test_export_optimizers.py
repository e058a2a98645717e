"""`mergekit-ota export` of momentum-only optimizers: real ``torch.optim`` state dicts (tests/fixtures/optimizers,
written by its ``generate.py`` with torch 2.13). Muon with its AdamW companion exports a partial store (the
companion's exp_avg_sq, the Muon matrices listed as missing; tests/test_partial_store.py completes and merges one);
a state without any second moment is refused naming the family, the keys relied on, the counts and ``mergekit-ota
fisher``; a state where every parameter has ``exp_avg_sq`` exports as before."""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_ota.cli.export import export_command
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.optimizer_states import FISHER_COMMAND, check_second_moments, momentum_family
from mergekit_ota.store_format import MISSING

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "optimizers")
MUON_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def _refused(name: str, tmp_path) -> str:
    """Export fixture ``name``: exit 1, no traceback, nothing written; the message on one line."""
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(export_command, [_fixture(name), str(out), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not out.exists() and os.listdir(tmp_path) == []
    return " ".join(result.output.split())


def test_muon_with_adamw_companion_exports_a_partial_store_listing_the_muon_matrices(tmp_path):
    """torch.optim.Muon (hidden matrices) + its AdamW companion (embeddings, norms, head) in one state dict: the 5
    companion parameters are written, value for value; the 7 Muon matrices are listed in 'missing_curvature' with
    the family and the keys relied on; the summary names the --only-missing command with the store's path."""
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(export_command, [_fixture("muon_adamw.pt"), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "PARTIAL STORE: 7 parameter(s) have no curvature" in text
    assert f"--only-missing {out}" in text and "Muon (momentum only, 7 tensor(s)) with AdamW" in text
    saved = torch.load(_fixture("adamw_companion.pt"), weights_only=True)
    (group,) = saved["param_groups"]
    expected = {name: saved["state"][k]["exp_avg_sq"] for k, name in zip(group["params"], group["param_names"])}
    stored = load_file(str(out))
    assert set(stored) == set(expected) and all(torch.equal(stored[n], v) for n, v in expected.items())
    with safe_open(str(out), "pt") as fp:
        missing = json.loads(fp.metadata()[MISSING])
    assert sorted(missing) == sorted(n for n in missing if any(m in n for m in MUON_MATRICES)) and len(missing) == 7
    assert set(missing.values()) == {
        "torch.optim.Muon keeps momentum only (state 'momentum_buffer', param group 'ns_coefficients'/'ns_steps')"
    }


def test_a_reader_that_writes_complete_stores_only_refuses_muon_naming_counts_and_fisher():
    """check_second_moments (ZeRO, DCP and universal readers) still refuses a Muon state, naming the family, the
    counts, the companion and the fisher command for the whole model."""
    muon = torch.load(_fixture("muon_adamw.pt"), weights_only=True)
    names = {k: n for g in muon["param_groups"] for k, n in zip(g["params"], g["param_names"])}
    group_of = {k: g for g in muon["param_groups"] for k in g["params"]}
    with pytest.raises(CurvatureError) as info:
        check_second_moments(
            {names[k]: list(v) for k, v in muon["state"].items()}, "src", {names[k]: group_of[k] for k in names}
        )
    message = " ".join(str(info.value).split())
    assert "no second moment for 7 of 12 parameter(s)" in message
    assert "7 look like Muon (torch.optim.Muon; read from state 'momentum_buffer', param group" in message
    assert "5 parameter(s) do have a second moment (e.g. 'model.embed_tokens.weight'" in message
    assert (
        "Muon's AdamW companion" in message and f"`{FISHER_COMMAND}`" in message and "not exported in part" in message
    )


def test_sgd_momentum_is_refused_naming_sgd_and_fisher(tmp_path):
    """torch.optim.SGD(momentum=0.9), index-keyed: all 12 parameters momentum only, none with a second moment."""
    message = _refused("sgd_momentum.pt", tmp_path)
    assert "no second moment for 12 of 12 parameter(s)" in message
    assert "12 look like SGD with momentum (torch.optim.SGD; read from state 'momentum_buffer', param group" in message
    assert "'dampening'" in message and "'state[0]'" in message and "and 9 more" in message
    assert "No parameter has a second moment" in message and "Muon" not in message
    assert f"`{FISHER_COMMAND}`" in message


def test_adamw_companion_alone_exports_its_exp_avg_sq(tmp_path):
    """The companion's own state dict (every parameter has exp_avg_sq) exports as before, value for value."""
    saved = torch.load(_fixture("adamw_companion.pt"), weights_only=True)
    (group,) = saved["param_groups"]
    expected = {name: saved["state"][k]["exp_avg_sq"] for k, name in zip(group["params"], group["param_names"])}
    out = tmp_path / "store.safetensors"
    result = CliRunner().invoke(export_command, [_fixture("adamw_companion.pt"), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    stored = load_file(str(out))
    assert set(stored) == set(expected) and len(expected) == 5
    for name, v in expected.items():
        assert torch.equal(stored[name], v), name


def test_fixture_states_have_the_keys_the_rules_rely_on():
    """The fixtures hold what torch 2.13 saves: Muon ``momentum_buffer`` alone (no ``step``) on the 2-D hidden
    matrices in groups with ``ns_coefficients``/``ns_steps``; SGD ``momentum_buffer`` in groups with ``dampening``."""
    muon = torch.load(_fixture("muon_adamw.pt"), weights_only=True)
    muon_group = muon["param_groups"][0]
    assert {"ns_coefficients", "ns_steps"} <= set(muon_group)
    for k, name in zip(muon_group["params"], muon_group["param_names"]):
        assert set(muon["state"][k]) == {"momentum_buffer"} and any(m in name for m in MUON_MATRICES)
    sgd = torch.load(_fixture("sgd_momentum.pt"), weights_only=True)
    assert "dampening" in sgd["param_groups"][0]
    assert all(set(entry) == {"momentum_buffer"} for entry in sgd["state"].values())


@pytest.mark.parametrize(
    "keys, group, family",
    [
        (["momentum_buffer"], {"ns_steps": 5}, "Muon"),
        (["momentum_buffer"], {"dampening": 0}, "SGD with momentum"),
        (["momentum_buffer"], None, "SGD with momentum or Muon"),
        (["exp_avg"], {"betas": (0.9, 0.99)}, "Lion"),
        (["exp_avg", "exp_avg_sq", "step"], {}, None),
    ],
)
def test_momentum_family_from_keys_and_group(keys, group, family):
    """One rule names the family: group keys tell Muon from SGD; without a group both are named."""
    found = momentum_family(keys, group)
    assert (found.family if found else None) == family


def test_refusal_without_groups_names_both_candidates():
    """Sources that save no param groups (ZeRO, DCP and universal checkpoints) still get
    the family and the fisher command."""
    with pytest.raises(CurvatureError, match=re.escape("SGD with momentum or Muon")) as info:
        check_second_moments({"w": ["momentum_buffer"], "b": ["exp_avg", "exp_avg_sq"]}, "src")
    assert "1 parameter(s) do have a second moment (e.g. 'b')" in str(info.value) and FISHER_COMMAND in str(info.value)


# ----------------------------------------------------------------------------- Adam-like and block optimizers
# Fixtures written by each library in its own environment (tests/fixtures/optimizers/<name>/generate.py, the
# versions in its truth.json); truth.safetensors holds each parameter's second moment as the live optimizer held
# it (Adam-mini: its block value broadcast as its own step() broadcasts it).


def _export_fixture(relative: str, tmp_path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], str]:
    """Export fixture ``relative``; every tensor read back as dense float32, the header metadata, the summary."""
    from mergekit_ota.curvature.store import CurvatureStore

    out = tmp_path / "store.safetensors"
    result = CliRunner().invoke(export_command, [_fixture(relative), str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    store = CurvatureStore.open(str(out))
    tensors = {name: store.load(name) for name in store.names()}
    return tensors, dict(store.metadata), " ".join(result.output.split())


@pytest.mark.parametrize(
    "relative, optimizer",
    [
        ("schedulefree/optimizer.pt", "AdamW schedule-free (schedulefree)"),
        ("schedulefree/optimizer_eval.pt", "AdamW schedule-free (schedulefree)"),
        ("ademamix/optimizer.pt", "AdEMAMix"),
    ],
)
def test_adam_like_optimizers_export_exp_avg_sq_with_the_step_their_groups_keep(relative, optimizer, tmp_path):
    """schedulefree's AdamWScheduleFree (train or eval mode) and pytorch_optimizer's AdEMAMix keep Adam's raw
    exp_avg_sq (decayed with betas[1], bias-corrected by 1 - beta2**t in their step()) and the step count in the
    param group ('k', 'step'): the store holds exp_avg_sq as saved, step 3, beta2 0.95, bias_corrected false."""
    tensors, metadata, _ = _export_fixture(relative, tmp_path)
    truth = load_file(_fixture(os.path.join(os.path.dirname(relative), "truth.safetensors")))
    assert set(tensors) == set(truth) and len(truth) == 12
    for name, v in truth.items():
        assert torch.equal(tensors[name], v), name
    assert (metadata["optimizer"], metadata["step"], metadata["beta2"]) == (optimizer, "3", "0.95")
    assert metadata["bias_corrected"] == "false"


def test_adam_mini_exports_each_block_value_over_its_block_with_row_blocks_as_exact_rank1(tmp_path):
    """adam-mini 1.1.1: per-row (embeddings, head, v/o, MLP) and per-head (q/k) matrices are constant per row and
    stored as exact rank-1 pairs; norms (one value) and biases (per coordinate v) as full tensors; every tensor
    read back equals what Adam-mini's own update divides by (truth.safetensors), names from its param groups."""
    tensors, metadata, summary = _export_fixture("adam_mini/optimizer.pt", tmp_path)
    truth = load_file(_fixture("adam_mini/truth.safetensors"))
    assert set(tensors) == set(truth)
    for name, v in truth.items():
        torch.testing.assert_close(tensors[name], v, rtol=1e-6, atol=0, msg=name)
    assert metadata["optimizer"] == "Adam-mini (adam_mini.Adam_mini)" and metadata["step"] == "3"
    assert metadata["beta2"] == "0.95" and metadata["bias_corrected"] == "false"
    matrices = sum(v.dim() == 2 for v in truth.values())
    assert f"exported {len(truth)} tensors ({matrices} rank-1, {len(truth) - matrices} full)" in summary
    assert "Adam-mini's param group names" in summary


def test_adam_mini_q_k_shape_is_checked_against_the_model_when_given(tmp_path):
    """The q/k parameters' shape is inferred from the hidden size the per-row matrices share; a --model whose
    shapes differ is refused naming the tensor (the inference never stands unverified when a model is given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tmp_path / "model"
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(model)
    out = tmp_path / "ok.safetensors"
    args = [_fixture("adam_mini/optimizer.pt"), str(out), "--model", str(model), "--quiet"]
    result = CliRunner().invoke(export_command, args)
    assert result.exit_code == 0 and "verified against" in result.output, result.output
    LlamaForCausalLM(config.__class__(**{**config.to_dict(), "num_key_value_heads": 4})).save_pretrained(
        tmp_path / "other"
    )
    args = [_fixture("adam_mini/optimizer.pt"), str(tmp_path / "no.safetensors"), "--model", str(tmp_path / "other")]
    result = CliRunner().invoke(export_command, [*args, "--quiet"])
    assert result.exit_code == 1 and "k_proj" in result.output and "Traceback" not in result.output


def test_lion_pytorch_is_refused_as_lion_from_its_real_state(tmp_path):
    """lion-pytorch 0.2.5 keeps exp_avg only (no step, groups without eps): refused naming Lion and fisher."""
    message = _refused("lion/optimizer.pt", tmp_path)
    assert "no second moment for 12 of 12 parameter(s): 12 look like Lion (lion_pytorch.Lion" in message
    assert "read from state 'exp_avg' without exp_avg_sq" in message and f"`{FISHER_COMMAND}`" in message


@pytest.mark.parametrize(
    "variant, optimizer, estimator",
    [
        ("sophiag", "SophiaG (sophia_opt)", "Gauss-Newton-Bartlett"),
        ("sophiah", "SophiaH (pytorch_optimizer)", "Hutchinson"),
    ],
)
def test_sophia_exports_its_hessian_estimate_as_its_update_uses_it_without_step_or_beta2(
    variant, optimizer, estimator, tmp_path
):
    """sophia_opt 0.2.2's SophiaG keeps 'hessian' (EMA of squared sampled-label gradients, >= 0): exported as is.
    pytorch_optimizer 4.1.0's SophiaH keeps 'hessian_moment' (EMA of signed Hutchinson estimates; its update divides
    by max(h, eps)): exported with negative entries as 0. Both record curvature_estimator and no step or beta2
    (Sophia updates its estimate every k steps, k not saved), so the merge leaves their scale to curvature_scale."""
    tensors, metadata, summary = _export_fixture(f"sophia/{variant}/optimizer.pt", tmp_path)
    truth = load_file(_fixture(f"sophia/{variant}/truth.safetensors"))
    assert set(tensors) == set(truth) and len(truth) == 12
    negative = 0
    for name, h in truth.items():
        negative += int((h < 0).sum())
        assert torch.equal(tensors[name], h.clamp(min=0.0)), name
    assert (negative > 0) == (variant == "sophiah")  # the fixture exercises the clamp
    assert metadata["optimizer"] == optimizer and estimator in metadata["curvature_estimator"]
    assert "step" not in metadata and "beta2" not in metadata and metadata["bias_corrected"] == "false"
    assert "curvature_scale mean or median" in summary


@pytest.mark.parametrize("variant, optimizer", [("adamw8bit", "8-bit"), ("adamw4bit", "4-bit"), ("adamwfp8", "FP8")])
def test_torchao_low_bit_adamw_dequantises_bit_for_bit_as_torchao_without_importing_it(variant, optimizer, tmp_path):
    """torchao 0.18.0's AdamW8bit/4bit/Fp8 save exp_avg_sq as tensor subclasses (states of >= 4096 entries) beside
    plain float32 ones: loaded through inert stand-ins (torchao is not installed here), every tensor equals
    torchao's own dequantize() bit for bit (truth.safetensors, written by torchao in its own environment)."""
    import sys

    tensors, metadata, _ = _export_fixture(f"torchao/{variant}/optimizer.pt", tmp_path)
    assert "torchao" not in sys.modules  # read through the stand-ins, never by importing torchao
    truth = load_file(_fixture(f"torchao/{variant}/truth.safetensors"))
    assert set(tensors) == set(truth) and len(truth) == 12
    for name, v in truth.items():
        assert torch.equal(tensors[name].view(torch.int32), v.view(torch.int32)), name
    assert metadata["optimizer"] == f"AdamW {optimizer} (torchao)" and metadata["step"] == "3"
    assert metadata["beta2"] == "0.95" and metadata["bias_corrected"] == "false"
