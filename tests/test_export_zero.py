"""Native DeepSpeed ZeRO checkpoints: export equals DeepSpeed's own exp_avg_sq, bit for bit, or refuses clearly.

The fixtures in ``tests/fixtures/deepspeed`` are real: ``generate.py`` trained them with DeepSpeed 0.19.8 on
CPU (stages 1/2/3 x fp32/fp16/bf16 x 1/2/3 ranks, ``BF16_Optimizer``, ZeRO-3 ``sub_group_size: 0``,
``elastic_checkpoint``; two param groups and a frozen layer each) and saved, beside each checkpoint,
DeepSpeed's ``safe_get_full_optimizer_state(p, "exp_avg_sq")`` per parameter (``ds_to_universal``'s value
where that API cannot answer: ZeRO-1/2's second param group).  No DeepSpeed is needed here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_ota.cli.export import export_command
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import export_curvature

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"
RUNS = sorted(p.name for p in FIXTURES.iterdir() if (p / "truth.safetensors").is_file())
TRAINER = FIXTURES / "trainer"
FROZEN = ["frozen.weight", "frozen.bias"]


def _export(*args: object, ok: bool = True):
    result = CliRunner().invoke(export_command, [str(a) for a in args] + ["--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0, result.output
        assert "Traceback" not in result.output
    return result


def _read(path: Path) -> Dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def _step_dir(checkpoint: Path) -> Path:
    return checkpoint / (checkpoint / "latest").read_text().strip()


def _copy(run: str, tmp_path: Path) -> Path:
    target = tmp_path / run
    shutil.copytree(FIXTURES / run / "checkpoint", target)
    return target


def test_the_fixtures_cover_every_configuration_the_issue_lists():
    """Stages 1-3 x fp32/fp16/bf16 x 1-3 ranks, BF16_Optimizer, sub_group_size 0, elastic, parameter
    alignment; the Trainer run."""
    recorded = [json.loads((FIXTURES / r / "run.json").read_text()) for r in RUNS]
    configs = {json.dumps(r["run"], sort_keys=True) for r in recorded}
    worlds = {(r["run"]["stage"], r["run"]["dtype"], r["world"]) for r in recorded}
    assert {(s, d, w) for s in (1, 2, 3) for d in ("fp32", "fp16", "bf16") for w in (1, 2, 3)} <= worlds
    assert any('"grad_accum_dtype": "fp32"' in c for c in configs)
    assert any('"sub_group_size": 0' in c for c in configs)
    assert any('"elastic": true' in c and '"stage": 1' in c for c in configs)
    assert any('"elastic": true' in c and '"stage": 2' in c for c in configs)
    assert any(r["run"].get("parameter_alignment") for r in recorded)  # nonzero per-parameter paddings
    assert (TRAINER / "expert-a" / "checkpoint-3" / "latest").is_file()


@pytest.mark.parametrize("run", RUNS)
def test_export_equals_deepspeeds_own_exp_avg_sq(run, tmp_path):
    """Every trainable parameter's exported exp_avg_sq equals DeepSpeed's value bit for bit; the frozen layer
    is listed without state; step and beta2 are recorded; the checkpoint is read without DeepSpeed."""
    out = tmp_path / "store.safetensors"
    _export(FIXTURES / run / "checkpoint", out)
    truth = load_file(str(FIXTURES / run / "truth.safetensors"))
    stored = _read(out)
    assert set(stored) == set(truth)
    for name, value in truth.items():
        assert stored[name].dtype == torch.float32 and torch.equal(stored[name], value), name
    metadata = CurvatureStore(str(out)).metadata
    recorded = json.loads((FIXTURES / run / "run.json").read_text())
    assert metadata["source_kind"] == "deepspeed"
    assert json.loads(metadata["parameters_without_state"]) == FROZEN
    assert int(metadata["step"]) == recorded["global_steps"] - recorded.get("skipped_steps", 0)
    assert float(metadata["beta2"]) == 0.95
    assert metadata["mapping_basis"] == "param_shapes" and json.loads(metadata["mapping_by_order"]) == []


def test_the_tag_directory_and_the_save_directory_give_the_same_store(tmp_path):
    """SOURCE may be the save directory (its 'latest' names the tag) or global_stepN/ itself."""
    checkpoint = FIXTURES / "z3-fp32-w3" / "checkpoint"
    _export(checkpoint, tmp_path / "a.safetensors")
    _export(_step_dir(checkpoint), tmp_path / "b.safetensors")
    a, b = _read(tmp_path / "a.safetensors"), _read(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the HF Trainer's layout


def test_trainer_checkpoint_under_zero3_exports_and_verifies_names_against_its_config(tmp_path):
    """A Trainer checkpoint-N/ (latest + global_stepN/ + config.json) exports; names are verified against
    the checkpoint's own config; values equal DeepSpeed's own."""
    checkpoint = TRAINER / "expert-a" / "checkpoint-3"
    out = tmp_path / "store.safetensors"
    _export(checkpoint, out)
    truth = load_file(str(TRAINER / "expert-a" / "truth.safetensors"))
    stored = _read(out)
    assert set(stored) == set(truth) and all(torch.equal(stored[k], truth[k]) for k in truth)
    metadata = CurvatureStore(str(out)).metadata
    assert "verified against" in metadata["mapping"] and float(metadata["beta2"]) == 0.98


def test_model_of_another_shape_is_refused(tmp_path):
    """--model naming a model whose parameters do not match param_shapes is refused before writing."""
    other = tmp_path / "other"
    shutil.copytree(TRAINER / "base", other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] = 32
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "store.safetensors"
    failed = _export(TRAINER / "expert-a" / "checkpoint-3", out, "--model", other, ok=False)
    assert "shape" in failed.output and not out.exists()


def test_zero3_export_equals_ds_to_universal_export_and_merges_the_same(tmp_path):
    """End to end: the OTA merge whose curvature came from the native ZeRO-3 checkpoints equals the merge
    whose curvature came from ds_to_universal's output of the same checkpoints."""
    stores = {}
    for how in ("native", "universal"):
        for expert in ("expert-a", "expert-b"):
            source = TRAINER / expert / ("checkpoint-3" if how == "native" else "universal")
            out = tmp_path / how / expert / "exp_avg_sq.safetensors"
            out.parent.mkdir(parents=True)
            args = [source, out] + (["--model", TRAINER / expert / "checkpoint-3"] if how == "universal" else [])
            _export(*args)
            stores[how, expert] = out
    for expert in ("expert-a", "expert-b"):
        a, b = _read(stores["native", expert]), _read(stores["universal", expert])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        native, universal = (CurvatureStore(str(stores[h, expert])).metadata for h in ("native", "universal"))
        assert native["step"] == universal["step"] == "3" and native["beta2"] == universal["beta2"]
    merged = {}
    for how in ("native", "universal"):
        config = {
            "merge_method": "ota",
            "base_model": str(TRAINER / "base"),
            "models": [
                {"model": str(TRAINER / e / "checkpoint-3"), "parameters": {"curvature": str(stores[how, e])}}
                for e in ("expert-a", "expert-b")
            ],
            "parameters": {"power": 0.5},
            "dtype": "float32",
        }
        merged[how] = _merge(config, tmp_path / f"merged-{how}")
    assert merged["native"].keys() == merged["universal"].keys()
    assert all(torch.equal(merged["native"][k], merged["universal"][k]) for k in merged["native"])
    base = load_file(str(TRAINER / "base" / "model.safetensors"))
    assert any(not torch.equal(merged["native"][k], base[k]) for k in base)


def _merge(config: dict, out: Path) -> Dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True, copy_tokenizer=False))
    tensors: Dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


# ----------------------------------------------------------------------------- refusals, before any output


def _refused(source: Path, tmp_path: Path, *expected: str) -> str:
    out = tmp_path / "store.safetensors"
    with pytest.raises(CurvatureError) as raised:
        export_curvature(str(source), str(out), ExportOptions.parse())
    message = str(raised.value)
    for text in expected:
        assert text in message, message
    assert not out.exists()
    return message


def test_a_missing_rank_file_is_refused_naming_partition_count(tmp_path):
    checkpoint = _copy("z2-fp32-w3", tmp_path)
    step = _step_dir(checkpoint)
    os.remove(step / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    _refused(checkpoint, tmp_path, "2 optimizer file(s)", "partition_count says 3")


def test_a_gap_in_the_ranks_is_refused(tmp_path):
    checkpoint = _copy("z2-fp32-w3", tmp_path)
    os.remove(_step_dir(checkpoint) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    _refused(checkpoint, tmp_path, "ranks [0, 2]")


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("zero_pp_rank_0_mp_rank_01_optim_states.pt", "tensor-parallel"),
        ("mp_rank_01_model_states.pt", "mp_rank_01"),
        ("layer_01-model_00-model_states.pt", "pipeline-parallel"),
        ("expp_rank_0_mp_rank_00_optim_states.pt", "MoE"),
    ],
)
def test_model_pipeline_and_expert_parallel_files_are_refused(extra, expected, tmp_path):
    """Tensor/pipeline/expert-parallel layouts are named and refused rather than half-read."""
    checkpoint = _copy("z1-fp32-w2", tmp_path)
    step = _step_dir(checkpoint)
    shutil.copy(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", step / extra)
    _refused(checkpoint, tmp_path, expected, str(step))


def test_ranks_from_different_saves_are_refused(tmp_path):
    """A rank file left over from another save (the same run's rank 1 after 5 steps, real) is caught by its step."""
    checkpoint = _copy("z2-fp32-w2", tmp_path)
    later = _step_dir(FIXTURES / "z2-fp32-w2-steps5" / "checkpoint") / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(later, _step_dir(checkpoint) / later.name)
    _refused(checkpoint, tmp_path, "differs from", "different saves")


def test_latest_naming_a_path_outside_is_refused(tmp_path):
    checkpoint = _copy("z1-fp32-w1", tmp_path)
    (checkpoint / "latest").write_text("../../etc")
    _refused(checkpoint, tmp_path, "latest")


def test_several_tags_without_latest_are_refused_naming_them(tmp_path):
    checkpoint = _copy("z1-fp32-w1", tmp_path)
    shutil.copytree(_step_dir(checkpoint), checkpoint / "global_step9")
    os.remove(checkpoint / "latest")
    _refused(checkpoint, tmp_path, "global_step3", "global_step9", "pass the one")


def test_one_rank_file_given_alone_is_refused_with_its_directory(tmp_path):
    file = _step_dir(FIXTURES / "z3-fp32-w2" / "checkpoint") / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _refused(file, tmp_path, "pass its directory")


def test_a_trainer_output_directory_names_its_newest_checkpoint(tmp_path):
    """The final output_dir of a run keeps only the model; the error names checkpoint-N with the command."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (3, 12):
        shutil.copytree(TRAINER / "expert-a" / "checkpoint-3", run / f"checkpoint-{step}")
    shutil.copy(TRAINER / "base" / "config.json", run / "config.json")
    message = _refused(run, tmp_path, "checkpoint-12", "mergekit-ota export")
    assert "checkpoint-3" not in message.replace("checkpoint-3/", "")


def test_a_pickle_naming_another_class_is_refused(tmp_path):
    """Only the exact stand-ins are accepted: a rank file naming any other class (here argparse.Namespace,
    harmless, but not allow-listed) is refused naming the file, and nothing of it is run."""
    import argparse

    checkpoint = _copy("z1-fp32-w1", tmp_path)
    file = _step_dir(checkpoint) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    from mergekit_ota.export.torch_optim import load_torch_file
    from mergekit_ota.io.unpickle import deepspeed_globals

    value, _ = load_torch_file(str(file), deepspeed=True)
    value["extra"] = argparse.Namespace(x=1)
    with deepspeed_globals():
        torch.save(value, str(file) + ".new")  # not over the mapped file itself
    os.replace(str(file) + ".new", file)
    _refused(checkpoint, tmp_path, str(file), "refusing to unpickle")


def test_the_stand_ins_import_nothing_of_deepspeed(tmp_path):
    """Reading checkpoints of every stage leaves deepspeed unimported: only the stand-ins are used."""
    import sys

    for run in ("z1-fp16-w2", "z2-bf16-w3", "z3-bf16-w2", "z1-bf16-w2-bf16optimizer"):
        export_curvature(
            str(FIXTURES / run / "checkpoint"), str(tmp_path / f"{run}.safetensors"), ExportOptions.parse()
        )
    assert "deepspeed" not in sys.modules


# ----------------------------------------------------------------------------- a checkpoint given where a store belongs


@pytest.mark.parametrize(
    "given",
    [
        TRAINER / "expert-a" / "checkpoint-3",
        TRAINER / "expert-a" / "checkpoint-3" / "global_step3",
        FIXTURES.parent / "bitsandbytes" / "adamw8bit" / "checkpoint-3" / "optimizer.pt",
    ],
    ids=["trainer-zero3-checkpoint", "global_step", "optimizer.pt"],
)
def test_curvature_naming_a_checkpoint_says_which_export_to_run(given):
    """`curvature:` pointing at a checkpoint, its global_stepN/ or an optimizer.pt: the error says to run
    `mergekit-ota export` first, with SOURCE and an OUT beside the model filled in."""
    from mergekit_ota.curvature.locate import locate_store
    from mergekit_ota.export.detect import export_hint

    with pytest.raises(CurvatureError) as raised:
        locate_store(str(given), str(TRAINER / "expert-a" / "checkpoint-3"), "expert-a", advice=export_hint)
    message = str(raised.value)
    assert f"`mergekit-ota export {given} " in message and "exp_avg_sq.safetensors` first" in message
    assert "global_step3/exp_avg_sq" not in message  # the store goes beside the model, not into the tag


def test_an_expert_without_a_store_whose_directory_is_a_checkpoint_gets_the_export_command():
    """No `curvature:` and the expert's model directory is a ZeRO Trainer checkpoint without a store."""
    from mergekit_ota.curvature.locate import locate_store
    from mergekit_ota.export.detect import export_hint

    checkpoint = TRAINER / "expert-a" / "checkpoint-3"
    with pytest.raises(CurvatureError, match="run `mergekit-ota export") as raised:
        locate_store(None, str(checkpoint), "expert-a", advice=export_hint)
    assert "DeepSpeed ZeRO" in str(raised.value)


def test_a_merge_whose_curvature_names_a_checkpoint_gets_the_export_command(tmp_path):
    """The planner passes the exporter's advice to locate_store (curvature/ does not import export/): a merge whose
    `curvature:` is a ZeRO Trainer checkpoint fails at planning with the export command, writing nothing."""
    from mergekit_ota.errors import PreflightError

    checkpoint = TRAINER / "expert-a" / "checkpoint-3"
    config = {
        "merge_method": "ota",
        "base_model": str(TRAINER / "base"),
        "models": [{"model": str(checkpoint), "parameters": {"curvature": str(checkpoint)}}],
        "dtype": "float32",
    }
    with pytest.raises(PreflightError, match=f"run `mergekit-ota export {checkpoint} "):
        _merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_param_slice_mappings_the_walk_of_param_shapes_places_the_same_pieces(tmp_path):
    """Checkpoints of DeepSpeed releases before param_slice_mappings: the pieces come from param_shapes and the
    paddings alone, and still equal DeepSpeed's values.  (Derived from a real checkpoint by deleting the
    mappings; its DeepSpeed objects are saved back as plain values, since the stand-ins pickle under their
    own names, which no allow-list accepts.)"""
    from mergekit_ota.export.torch_optim import load_torch_file

    run = "z2-fp32-w3"
    checkpoint = _copy(run, tmp_path)
    for file in sorted(_step_dir(checkpoint).glob("*_optim_states.pt")):
        value, _ = load_torch_file(str(file), deepspeed=True)
        osd = value["optimizer_state_dict"]
        del osd["param_slice_mappings"]
        osd["zero_stage"], osd["loss_scaler"] = int(osd["zero_stage"]), None
        torch.save(value, str(file) + ".new")
        os.replace(str(file) + ".new", file)
    out = tmp_path / "store.safetensors"
    source = export_curvature(str(checkpoint), str(out), ExportOptions.parse()).source
    assert any("no param_slice_mappings" in note for note in source.notes)
    truth = load_file(str(FIXTURES / run / "truth.safetensors"))
    stored = _read(out)
    assert stored.keys() == truth.keys() and all(torch.equal(stored[k], truth[k]) for k in truth)


def test_a_trainer_checkpoint_saved_without_its_optimizer_says_so(tmp_path):
    """save_only_model=True leaves checkpoint-N/ with the model and trainer_state.json only."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(TRAINER / "expert-a" / "checkpoint-3", checkpoint)
    shutil.rmtree(checkpoint / "global_step3")
    os.remove(checkpoint / "latest")
    _refused(checkpoint, tmp_path, "without optimizer state", "save_only_model=True")


def test_malformed_param_shapes_are_refused_naming_the_file(tmp_path):
    """A model-states file whose param_shapes hold something other than shapes is refused, not traced back."""
    from mergekit_ota.export.torch_optim import load_torch_file

    checkpoint = _copy("z3-fp32-w2", tmp_path)
    file = _step_dir(checkpoint) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    value, _ = load_torch_file(str(file), deepspeed=True)
    value["param_shapes"][0]["fc1.weight"] = "7x6"
    torch.save(value, str(file) + ".new")
    os.replace(str(file) + ".new", file)
    _refused(checkpoint, tmp_path, str(file), "fc1.weight", "non-negative ints")


def test_beta2_or_step_contradicting_the_source_is_refused_even_without_bias_correct(tmp_path):
    """--beta2/--step only fill in what a source does not record: a value contradicting it is an error whether or
    not --bias-correct is given (the merge bias-corrects from the store's metadata by default)."""
    checkpoint = FIXTURES / "z1-fp32-w1" / "checkpoint"
    out = tmp_path / "store.safetensors"
    for extra in (["--beta2", "0.999"], ["--step", "7"], ["--beta2", "0.999", "--bias-correct"]):
        failed = _export(checkpoint, out, *extra, ok=False)
        assert "contradicts the source's" in failed.output and not out.exists(), extra
    _export(checkpoint, out, "--beta2", "0.95", "--step", "3")  # agreeing values are fine
