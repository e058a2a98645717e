"""Bad input to a planned merge (run_merge, as mergekit-yaml runs it) fails with a message naming the
file/tensor and what was expected, before any output is written; a user's directory is never replaced."""

from __future__ import annotations

import os

import pytest
import torch
from merging import merge as _merge
from safetensors.torch import load_file, save_file

from mergekit_ota.errors import ConfigError, CurvatureError, PreflightError

NAME = "model.layers.1.self_attn.k_proj.weight"


def _config(family, method="ota", expert_parameters=(None, None), base=True, **shared):
    cfg = {
        "merge_method": method,
        "models": [{"model": e, **({"parameters": p} if p else {})} for e, p in zip(family.experts, expert_parameters)],
        "dtype": "float32",
    }
    if base:
        cfg["base_model"] = family.base
    if shared:
        cfg["parameters"] = shared
    return cfg


def _store_with(family, tmp_path, change):
    """A copy of expert 0's store with ``change(dict)`` applied, saved as tmp_path/bad.safetensors."""
    tensors = load_file(family.stores[0])
    change(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    return str(path)


def _fails_before_writing(family, tmp_path, cfg, error, pattern):
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        _merge(cfg, out)
    assert not out.exists()


def test_expert_without_any_curvature_is_named(family, tmp_path):
    """An expert whose model directory has no store and no `curvature:` parameter: expert and default location named."""
    from mergekit_ota.testing import save_model, tiny_llama_config

    bare = tmp_path / "bare_expert"
    save_model(str(bare), tiny_llama_config(), load_file(os.path.join(family.experts[0], "model.safetensors")))
    cfg = _config(family)
    cfg["models"][0]["model"] = str(bare)
    _fails_before_writing(
        family, tmp_path, cfg, PreflightError, r"No curvature for expert .*bare_expert.*exp_avg_sq\.safetensors"
    )


def test_curvature_path_that_does_not_exist_is_named(family, tmp_path):
    cfg = _config(family, expert_parameters=({"curvature": str(tmp_path / "nope.safetensors")}, None))
    _fails_before_writing(family, tmp_path, cfg, PreflightError, r"nope\.safetensors.* does not exist")


def test_curvature_of_wrong_shape_names_file_tensor_and_both_shapes(family, tmp_path):
    path = _store_with(family, tmp_path, lambda t: t.update({NAME: t[NAME][:, :-1].contiguous()}))
    cfg = _config(family, expert_parameters=({"curvature": path}, None))
    _fails_before_writing(
        family,
        tmp_path,
        cfg,
        PreflightError,
        rf"bad\.safetensors: curvature tensor '{NAME}' has shape \(32, 63\).*\(32, 64\)",
    )


def test_integer_curvature_is_refused(family, tmp_path):
    path = _store_with(family, tmp_path, lambda t: t.update({NAME: t[NAME].to(torch.int32)}))
    cfg = _config(family, expert_parameters=({"curvature": path}, None))
    _fails_before_writing(
        family, tmp_path, cfg, PreflightError, rf"'{NAME}' has dtype I32; curvature must be floating point"
    )


def test_several_problems_are_reported_together(family, tmp_path):
    """Every header problem of every expert in one error: a wrong shape in expert 0 and a missing store for expert 1."""
    path = _store_with(family, tmp_path, lambda t: t.update({NAME: t[NAME][:1].contiguous()}))
    cfg = _config(family, expert_parameters=({"curvature": path}, {"curvature": str(tmp_path / "absent.safetensors")}))
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as caught:
        _merge(cfg, out)
    assert len(caught.value.problems) == 2
    assert "has shape (1, 64)" in str(caught.value) and "absent.safetensors" in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "value, pattern",
    [(float("inf"), r"0 NaN and 1 Inf values"), (-1e-9, r"1 negative values")],
    ids=["inf", "negative"],
)
def test_non_finite_or_negative_curvature_names_file_and_tensor(family, tmp_path, value, pattern):
    def poison(tensors):
        tensors[NAME][3, 5] = value

    path = _store_with(family, tmp_path, poison)
    cfg = _config(family, expert_parameters=({"curvature": path}, None))
    _fails_before_writing(family, tmp_path, cfg, CurvatureError, rf"bad\.safetensors: tensor '{NAME}' has {pattern}")


def test_truncated_store_is_reported_before_merging(family, tmp_path):
    data = open(family.stores[0], "rb").read()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    cfg = _config(family, expert_parameters=({"curvature": str(path)}, None))
    _fails_before_writing(family, tmp_path, cfg, PreflightError, r"truncated\.safetensors: .*truncated or corrupted")


@pytest.mark.parametrize("density", [0.0, 1.5, -0.2])
def test_density_outside_unit_interval_from_yaml(family, tmp_path, density):
    cfg = _config(family, expert_parameters=({"density": density}, {"density": 0.5}))
    _fails_before_writing(
        family, tmp_path, cfg, PreflightError, rf"density must be a number in \(0, 1\] or 'auto'; got {density}"
    )


def test_ffg_without_base_model_is_refused(family, tmp_path):
    """mergekit's own planning refuses it (our validate_inputs); reported with every other problem found."""
    cfg = _config(family, method="ffg", expert_parameters=({"density": 0.5}, {"densty": 0.5}), base=False)
    with pytest.raises(
        PreflightError,
        match=r"(?s)unknown parameter 'densty'.*ffg needs a base_model: FFG keeps the most salient entries",
    ):
        _merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ffg_without_density_or_threshold_is_refused(family, tmp_path):
    cfg = _config(family, method="ffg", expert_parameters=({"density": 0.5}, None))
    _fails_before_writing(family, tmp_path, cfg, PreflightError, r"ffg needs a density or a threshold for every expert")


def test_ota_ffg_without_base_model_is_refused(family, tmp_path):
    cfg = _config(family, expert_parameters=({"density": 0.5}, None), base=False)
    _fails_before_writing(family, tmp_path, cfg, PreflightError, r"density/threshold \(FFG\), which needs a base_model")


def test_existing_output_directory_is_not_overwritten(family, tmp_path):
    """A non-empty output directory the user owns is refused and left exactly as it was."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"mine already exists and is not empty"):
        _merge(_config(family), out)
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_failed_merge_keeps_a_users_existing_empty_directory(family, tmp_path):
    """If the user made the (empty) output directory, a failing merge does not delete it."""
    out = tmp_path / "empty"
    out.mkdir()
    path = _store_with(family, tmp_path, lambda t: t[NAME].__setitem__((0, 0), float("nan")))
    with pytest.raises(CurvatureError):
        _merge(_config(family, expert_parameters=({"curvature": path}, None)), out)
    assert out.is_dir()


def test_unsupported_mergekit_version_names_the_supported_one(family, tmp_path, monkeypatch):
    from mergekit_ota import compat

    compat.reset_check()
    monkeypatch.setattr(compat, "mergekit_version", lambda: "0.1.4")
    try:
        with pytest.raises(
            RuntimeError, match=r"supports mergekit 0\.1\.5; found mergekit 0\.1\.4.*pip install 'mergekit==0\.1\.5'"
        ):
            _merge(_config(family), tmp_path / "out")
    finally:
        compat.reset_check()
    assert not (tmp_path / "out").exists()


def test_mergekit_pytorch_refuses_ota(family, tmp_path):
    """mergekit-pytorch bypasses the planner (no curvature tasks): it refuses ota with a message saying so."""
    from mergekit.options import MergeOptions
    from mergekit.scripts import merge_raw_pytorch as raw

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    config = raw.RawPyTorchMergeConfig.model_validate(
        {"merge_method": "ota", "base_model": family.base, "models": [{"model": e} for e in family.experts]}
    )
    with pytest.raises(ConfigError, match=r"not available in mergekit-pytorch.*mergekit-yaml"):
        raw.plan_flat_merge(config, str(tmp_path / "out"), False, False, MergeOptions())


@pytest.mark.parametrize("internal", ["_model_out_config", "run_merge"])
def test_a_changed_mergekit_internal_is_named_by_the_version_guard(family, tmp_path, monkeypatch, internal):
    """Every private mergekit internal the plugin uses is checked by compat's guard: one that is missing (as after
    a mergekit release that renamed it) makes ota refuse with a message naming it, before anything is written."""
    import mergekit.merge

    from mergekit_ota import compat

    run_merge = mergekit.merge.run_merge
    compat.reset_check()
    monkeypatch.delattr(mergekit.merge, internal)
    try:
        problem = compat.incompatibility()
        assert problem is not None and f"mergekit.merge.{internal} is missing" in problem
        if internal != "run_merge":
            from mergekit.config import MergeConfiguration
            from mergekit.options import MergeOptions

            with pytest.raises(RuntimeError, match=rf"{internal} is missing.*pip install 'mergekit==0\.1\.5'"):
                run_merge(
                    MergeConfiguration.model_validate(_config(family)), str(tmp_path / "out"), MergeOptions(quiet=True)
                )
            assert not (tmp_path / "out").exists()
    finally:
        monkeypatch.undo()
        compat.reset_check()
    assert compat.incompatibility() is None
