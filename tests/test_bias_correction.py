"""`bias_correction: auto` (the default): each expert's curvature is put on Adam's unbiased scale where its step
and beta2 are known, stores already corrected are never corrected twice, and a mismatch is warned about exactly
when some expert cannot be corrected while the others are (or their known steps differ)."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from merging import merge as _merge
from safetensors.torch import load_file

from mergekit_ota.curvature.writer import save_store
from mergekit_ota.errors import PreflightError


def _store(family, i, directory, metadata=None, scale=1.0):
    """Expert i's curvature (times ``scale``) saved with ``metadata`` (step, beta2, bias_corrected)."""
    path = os.path.join(str(directory), f"store{i}-{abs(hash(str(metadata)))}-{scale}.safetensors")
    save_store({k: v * scale for k, v in load_file(family.stores[i]).items()}, path, metadata=metadata or {})
    return path


def _config(family, stores, expert_parameters=(None, None), **shared):
    models = []
    for expert, store, extra in zip(family.experts, stores, expert_parameters):
        models.append({"model": expert, "parameters": {"curvature": store, **(extra or {})}})
    cfg = {"merge_method": "ota", "base_model": family.base, "models": models, "dtype": "float32"}
    shared = {"curvature_scale": "none", **shared}  # bias correction is what these tests check (mean replaces it)
    if shared:
        cfg["parameters"] = shared
    return cfg


def _check(cfg):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.preflight import check_config

    return check_config(MergeConfiguration.model_validate(cfg), MergeOptions(quiet=True))


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


META_20 = {"step": "20", "beta2": "0.999"}
META_200 = {"step": "200", "beta2": "0.999"}


def test_auto_from_store_metadata_equals_the_manual_optimizer_step_beta2_path(family, tmp_path):
    """auto with step/beta2 in the stores' metadata gives exactly the merge of `bias_correction: true` with
    optimizer_step/beta2 written per expert in the YAML (stores without metadata), and differs from no correction."""
    with_metadata = [_store(family, 0, tmp_path, META_20), _store(family, 1, tmp_path, META_200)]
    bare = [_store(family, 0, tmp_path), _store(family, 1, tmp_path)]
    auto = _merge(_config(family, with_metadata), tmp_path / "auto")
    manual = _merge(
        _config(
            family,
            bare,
            ({"optimizer_step": 20, "beta2": 0.999}, {"optimizer_step": 200, "beta2": 0.999}),
            bias_correction=True,
        ),
        tmp_path / "manual",
    )
    _same(auto, manual)
    off = _merge(_config(family, with_metadata, bias_correction=False), tmp_path / "off")
    assert any(not torch.allclose(auto[k], off[k]) for k in auto)


def test_corrected_curvature_is_v_over_one_minus_beta2_to_the_step(family, tmp_path):
    """The correction is v_i / (1 - beta2**step_i): the same merge as stores divided by hand, uncorrected."""
    with_metadata = [_store(family, 0, tmp_path, META_20), _store(family, 1, tmp_path, META_200)]
    divided = [
        _store(family, 0, tmp_path, scale=1 / (1 - 0.999**20)),
        _store(family, 1, tmp_path, scale=1 / (1 - 0.999**200)),
    ]
    _same(
        _merge(_config(family, with_metadata), tmp_path / "auto"),
        _merge(_config(family, divided, bias_correction=False), tmp_path / "divided"),
    )


@pytest.mark.parametrize("mode", ["auto", True])
def test_an_already_corrected_store_is_never_corrected_twice(family, tmp_path, mode):
    """A store whose metadata says bias_corrected: true (Adafactor's, or export --bias-correct) is used as it is,
    under auto and under true; the other expert is still corrected."""
    stores = [_store(family, 0, tmp_path, {**META_20, "bias_corrected": "true"}), _store(family, 1, tmp_path, META_200)]
    merged = _merge(_config(family, stores, bias_correction=mode), tmp_path / "merged")
    by_hand = [_store(family, 0, tmp_path), _store(family, 1, tmp_path, scale=1 / (1 - 0.999**200))]
    _same(merged, _merge(_config(family, by_hand, bias_correction=False), tmp_path / "by_hand"))
    notes = _check(_config(family, stores, bias_correction=mode)).notes
    assert any("used as stored: its store is already bias-corrected" in n for n in notes), notes


CASES = {
    # name: (metadata of expert 0, of expert 1, warned)
    "both known": (META_20, META_200, False),
    "one unknown": (META_20, {}, True),
    "steps differ, beta2 unknown": ({"step": "20"}, {"step": "200"}, True),
    "same steps, beta2 unknown": ({"step": "20"}, {"step": "20"}, False),
    "nothing known": ({}, {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_scale_warning_appears_exactly_when_steps_differ_or_one_is_corrected_and_metadata_is_missing(
    family, tmp_path, case, caplog
):
    """check and the merge log warn when some expert cannot be corrected (no step or beta2) while another is on
    the unbiased scale or the known steps differ; the warning gives the steps and the size of the effect."""
    first, second, warned = CASES[case]
    cfg = _config(family, [_store(family, 0, tmp_path, first), _store(family, 1, tmp_path, second)])
    report = _check(cfg)
    assert report.ok, report.problems
    assert bool(report.warnings) == warned, report.warnings
    if case == "steps differ, beta2 unknown":
        (warning,) = report.warnings
        assert "trained 20 steps" in warning and " 200:" in warning and "3.0x more in OTA" in warning
        assert "assuming beta2 0.999" in warning
    if case == "one unknown":
        assert "cannot be corrected" in report.warnings[0] and "optimizer_step and beta2" in report.warnings[0]
    with caplog.at_level(logging.WARNING, logger="mergekit_ota"):
        _merge(cfg, tmp_path / "out")
    assert any("curvature scales may differ" in r.getMessage() for r in caplog.records) == warned


def test_check_says_which_experts_were_corrected_and_why(family, tmp_path):
    """One note per expert: corrected (with step, beta2, factor and source), or why not."""
    stores = [_store(family, 0, tmp_path, META_20), _store(family, 1, tmp_path)]
    notes = _check(_config(family, stores)).notes
    assert any(f"corrected: step 20, beta2 0.999 (from the metadata of {stores[0]})" in n for n in notes), notes
    assert any("not corrected: no optimizer_step and beta2 known" in n for n in notes), notes
    off = [n for n in _check(_config(family, stores, bias_correction=False)).notes if n.startswith("bias correction")]
    assert all("bias_correction: false" in n for n in off) and len(off) == 2


def test_true_with_an_unknown_step_is_refused_naming_the_expert(family, tmp_path):
    stores = [_store(family, 0, tmp_path, META_20), _store(family, 1, tmp_path)]
    with pytest.raises(
        PreflightError, match=r"expert .*expert_1.*bias_correction: true needs optimizer_step and beta2"
    ):
        _merge(_config(family, stores, bias_correction=True), tmp_path / "out")
    assert not (tmp_path / "out").exists()


SOPHIA = {"curvature_estimator": "sophia_hessian: EMA (beta2) of the Gauss-Newton-Bartlett estimate"}


@pytest.mark.parametrize(
    "first, second, scale, warned",
    [
        (SOPHIA, META_20, "none", True),  # Sophia's Hessian estimate beside Adam's v, compared as stored
        (SOPHIA, META_20, "mean", False),  # each on its own model-wide scale: nothing to warn about
        (SOPHIA, SOPHIA, "none", False),  # one estimator throughout
        (META_20, META_20, "none", False),
    ],
)
def test_another_estimator_beside_adam_v_is_warned_about_only_when_compared_as_stored(
    family, tmp_path, first, second, scale, warned
):
    """A store recording curvature_estimator (export of a Sophia run) beside an Adam store: check warns under
    curvature_scale none, naming the expert, the estimator and the fix; mean, or one estimator for all, is silent."""
    cfg = _config(family, [_store(family, 0, tmp_path, first), _store(family, 1, tmp_path, second)])
    cfg["parameters"]["curvature_scale"] = scale
    warnings = [w for w in _check(cfg).warnings if "another estimator" in w]
    assert bool(warnings) == warned, warnings
    if warned:
        assert "sophia_hessian" in warnings[0] and "use curvature_scale: mean" in warnings[0]
