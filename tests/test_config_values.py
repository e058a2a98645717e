"""What a user writes as a parameter value (issue 26, items 5, 6, 11, 12 and 13).

* 5: a value of the wrong type is one line naming the parameter, where it is written (expert or top level),
  what it must be and what was given (with a did-you-mean where a word is close), and ``check`` still reports
  every other problem of the config; the merge refuses with the same lines before writing anything.
* 6: each value is read on its own: a bad one never changes how the values next to it are read.
* 11: ``density: auto`` implies model scope for its expert; only an explicit ``density_scope: tensor`` is an error.
* 12: ``sign_consensus: true`` / ``false`` (YAML booleans) mean ``sum`` / ``none``.
* 13: the merge prints one summary line per expert to stderr without ``-v``: bias correction, curvature scale,
  what ``density: auto`` kept.

Each runs through ``mergekit-ota check`` and, where it matters, a real merge (``run_merge``, what ``mergekit-yaml``
runs).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from click.testing import CliRunner
from merging import merge as _merge

from mergekit_ota.catalog import saliency_mass_default
from mergekit_ota.errors import ConfigError, PreflightError


@pytest.fixture(scope="module", autouse=True)
def registered():
    from mergekit_ota.methods import register_methods

    register_methods()


def _config(family, method="ota", expert_parameters=(None, None), **shared) -> dict:
    cfg = {
        "merge_method": method,
        "base_model": family.base,
        "models": [{"model": e, **({"parameters": p} if p else {})} for e, p in zip(family.experts, expert_parameters)],
        "dtype": "float32",
    }
    if shared:
        cfg["parameters"] = shared
    return cfg


def _check(tmp_path, cfg: dict, name: str = "merge.yml"):
    """``mergekit-ota check --json`` of ``cfg`` written as YAML: (exit code, report)."""
    from mergekit_ota.cli.main import main

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # as written: the merge reads the same order
    result = CliRunner().invoke(main, ["check", str(path), "--json"])
    assert "{" in result.stdout, result.output
    return result.exit_code, json.loads(result.stdout[: result.stdout.rindex("}") + 1])


def _refused(cfg: dict, tmp_path) -> PreflightError:
    out = tmp_path / "out"
    with pytest.raises(PreflightError) as caught:
        _merge(cfg, out)
    assert not out.exists()
    return caught.value


# ============================================================================= 5: wrong types


def test_a_wrong_type_names_parameter_place_expectation_and_value_and_hides_no_other_problem(family, tmp_path):
    """power: high, lambda: fast (top level) and weight: heavy (one expert) are one line each, naming where they are
    written, and the missing store of the other expert is still reported. This used to be one pydantic error
    ("1 validation error for float") that stopped check there."""
    missing = str(tmp_path / "absent.safetensors")
    cfg = _config(
        family, expert_parameters=({"weight": "heavy"}, {"curvature": missing}), power="high", **{"lambda": "fast"}
    )
    code, report = _check(tmp_path, cfg)
    expected = [
        "parameters: power must be a finite number >= 0; got 'high'",
        "parameters: lambda must be a finite number; got 'fast'",
        f"model {family.experts[0]}: weight must be a finite number; got 'heavy'",
    ]
    assert code == 1 and report["problems"][:3] == expected, report["problems"]
    assert len(report["problems"]) == 4 and "absent.safetensors" in report["problems"][3], report["problems"]
    assert _refused(cfg, tmp_path).problems == report["problems"]


@pytest.mark.parametrize(
    "shared, expert, line",
    [
        (
            {"density_scope": "models"},
            None,
            "parameters: density_scope must be 'tensor' or 'model'; got 'models'; did you mean 'model'?",
        ),
        (
            {"curvature_scale": "maen"},
            None,
            "parameters: curvature_scale must be 'none', 'mean' or 'median'; got 'maen'; did you mean 'mean'?",
        ),
        (
            {"bias_correction": "ture"},
            None,
            "parameters: bias_correction must be 'auto', true or false; got 'ture'; did you mean true?",
        ),
        ({}, {"density": "atuo"}, "density must be a number in (0, 1] or 'auto'; got 'atuo'; did you mean 'auto'?"),
        ({}, {"weight": True}, "weight must be a finite number; got true"),
        ({}, {"optimizer_step": 2.5}, "optimizer_step must be a whole number >= 1; got 2.5"),
        ({}, {"weight": [{"filter": "mlp", "value": "x"}, {"value": 1.0}]}, "weight must be a finite number; got 'x'"),
    ],
    ids=["scope-word", "scale-word", "bias-word", "density-word", "weight-bool", "step-fraction", "filter-value"],
)
def test_each_bad_value_is_one_line_with_a_did_you_mean_where_a_word_is_close(family, tmp_path, shared, expert, line):
    """Words, booleans given for numbers, fractions for whole numbers, and a filter's value: each bad value is one
    config-level line (the expert's named as `model X`), not a pydantic error or one line per tensor."""
    cfg = _config(family, expert_parameters=(expert, None), **shared)
    code, report = _check(tmp_path, cfg)
    where = "" if expert is None else f"model {family.experts[0]}: "
    assert code == 1 and report["problems"] == [where + line], report["problems"]


def test_in_memory_a_wrong_type_is_a_config_error_naming_the_parameter():
    """merge_tensors with lambda: 'fast' raises our ConfigError (it was pydantic's ValidationError for float)."""
    from mergekit.merge_methods import merge_tensors

    base, expert = torch.zeros(4, 3), torch.ones(4, 3)
    with pytest.raises(ConfigError, match=r"lambda must be a finite number; got 'fast'"):
        merge_tensors(
            [base, expert], "ota", base_index=0, parameters={"curvature": [torch.ones(4, 3)], "lambda": "fast"}
        )
    with pytest.raises(ConfigError, match=r"expert 1: weight must be a finite number; got 'heavy'"):
        merge_tensors(
            [base, expert], "ota", base_index=0, parameters={"curvature": [torch.ones(4, 3)], "weight": "heavy"}
        )


def test_numbers_yaml_reads_as_strings_still_work(family, tmp_path):
    """eps: 1e-12 is a string in YAML 1.1 (no dot): read as the number, as before, also in a gradient."""
    cfg = _config(family, eps="1e-12", power=["0.5", "1e0"])
    code, report = _check(tmp_path, cfg)
    assert code == 0, report["problems"]


# ============================================================================= 6: each value on its own


def test_a_bad_shared_value_leaves_the_others_as_written(family, tmp_path):
    """ffg with saliency_mass: 1.5 next to normalize: true and sign_consensus: sum, and a negative weight: the bad
    mass is reported and the other two still apply, so the rule they break together (every weight > 0) is too. It
    used to read every shared value as its default once one was bad, hiding that problem."""
    cfg = _config(
        family,
        method="ffg",
        expert_parameters=({"density": 0.5, "weight": 1.0}, {"density": 0.5, "weight": -0.5}),
        saliency_mass=1.5,
        normalize=True,
        sign_consensus="sum",
    )
    code, report = _check(tmp_path, cfg)
    assert code == 1 and report["problems"][0] == "parameters: saliency_mass must be a number in (0, 1]; got 1.5"
    rest = report["problems"][1:]  # the rule over both experts, once per tensor
    assert rest and all("every weight must be > 0" in p for p in rest), report["problems"]


def test_a_bad_shared_value_adds_no_false_problem(family, tmp_path):
    """saliency_mass: 1.5 next to density_scope: model and density: auto: one problem, not a second, false one
    ('needs density_scope: model; got density_scope: tensor')."""
    cfg = _config(family, expert_parameters=({"density": "auto"}, None), saliency_mass=1.5, density_scope="model")
    code, report = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == ["parameters: saliency_mass must be a number in (0, 1]; got 1.5"]


def test_a_bad_density_adds_no_missing_density_problem(family, tmp_path):
    """ffg with density: 2 for one expert: that value is the problem; 'ffg needs a density' is not added."""
    cfg = _config(family, method="ffg", expert_parameters=({"density": 2}, {"density": 0.5}))
    code, report = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == [
        f"model {family.experts[0]}: density must be a number in (0, 1] or 'auto'; got 2"
    ]


# ============================================================================= 11: density: auto implies model scope


def test_density_auto_needs_no_density_scope_and_merges_as_with_model_scope(family, tmp_path):
    """density: auto without density_scope: check passes (also next to an expert with a numeric density, which
    stays per tensor) and the merge equals the one with density_scope: model written (it used to be refused,
    naming a density_scope: tensor the user never wrote)."""
    mixed = _config(family, expert_parameters=({"density": "auto"}, {"density": 0.5}), saliency_mass=0.9)
    code, report = _check(tmp_path, mixed)
    assert code == 0, report["problems"]
    assert any(n.startswith(f"density: auto, expert {family.experts[0]}: keeps") for n in report["notes"])
    left_out = _config(family, expert_parameters=({"density": "auto"}, None), saliency_mass=0.9)
    written = {**left_out, "parameters": {"saliency_mass": 0.9, "density_scope": "model"}}
    got, want = _merge(left_out, tmp_path / "left_out"), _merge(written, tmp_path / "written")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_density_auto_with_density_scope_tensor_written_is_refused_naming_the_expert(family, tmp_path):
    cfg = _config(family, expert_parameters=({"density": "auto"}, None), density_scope="tensor")
    code, report = _check(tmp_path, cfg)
    assert code == 1 and len(report["problems"]) == 1, report["problems"]
    assert report["problems"][0].startswith(f"expert {family.experts[0]}: density: auto picks one keep fraction")
    assert "got density_scope: tensor" in report["problems"][0]
    assert _refused(cfg, tmp_path).problems == report["problems"]


# ============================================================================= 12: sign_consensus: true / false


@pytest.mark.parametrize("written, meant", [(True, "sum"), (False, "none")])
def test_sign_consensus_true_and_false_mean_sum_and_none(family, tmp_path, written, meant):
    """YAML's sign_consensus: true merges exactly as sum, false as none (true was a pydantic error)."""
    parameters = ({"density": 0.5}, {"density": 0.5})
    cfg = _config(family, expert_parameters=parameters, sign_consensus=written)
    code, report = _check(tmp_path, cfg)
    assert code == 0, report["problems"]
    got = _merge(cfg, tmp_path / "written")
    want = _merge(_config(family, expert_parameters=parameters, sign_consensus=meant), tmp_path / "meant")
    assert all(torch.equal(got[k], want[k]) for k in want)


# ============================================================================= 13: the summary without -v


def test_the_merge_prints_one_summary_line_per_expert_without_verbose(family, tmp_path, capfd, caplog):
    """With logging at WARNING (mergekit-yaml without -v) the merge prints to stderr, once, per expert: its bias
    correction (curvature_scale: none), or its curvature_scale mean and what density: auto kept."""
    caplog.set_level(logging.WARNING)
    steps = ({"optimizer_step": 20, "beta2": 0.999}, {"optimizer_step": 200, "beta2": 0.999})
    _merge(_config(family, expert_parameters=steps, curvature_scale="none"), tmp_path / "bias")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("mergekit-ota: expert")]
    assert lines == [
        f"mergekit-ota: expert {family.experts[0]}: bias-corrected x{1 / (1 - 0.999**20):.4g} (step 20, beta2 0.999)",
        f"mergekit-ota: expert {family.experts[1]}: bias-corrected x{1 / (1 - 0.999**200):.4g} (step 200, beta2 0.999)",
    ]
    _merge(_config(family, expert_parameters=({"density": "auto"}, None)), tmp_path / "auto")
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("mergekit-ota: expert")]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"mergekit-ota: expert {family.experts[0]}: curvature divided by its mean ")
    target = f"of its saliency mass, target {saliency_mass_default('ota'):g})"  # ota merges default to 0.99
    assert "; density: auto keeps " in lines[0] and target in lines[0]
    assert "curvature divided by its mean " in lines[1] and "density: auto" not in lines[1]
    record = json.loads((tmp_path / "auto" / "mergekit_ota_curvature.json").read_text())
    statistic = record["experts"][0]["curvature_scale_statistic"]
    assert f"its mean {statistic:.4g} " in lines[0]


def test_values_mergekits_parser_refuses_are_one_line_each_and_the_rest_is_checked(family, tmp_path):
    """null, a mapping and a list of lists (which mergekit's config parser refuses, stopping check with a pydantic
    error per branch of its union) are one line each, from the raw YAML; the unknown key and the missing store next to
    them are still reported, and no rule is broken by the unreadable values (ffg's density: null adds no 'ffg needs a
    density')."""
    missing = str(tmp_path / "absent.safetensors")
    cfg = _config(
        family,
        method="ffg",
        expert_parameters=(
            {"density": None, "weight": {"a": 1}},
            {"density": 0.5, "threshold": [[1, 2]], "curvature": missing, "wieght": {"x": 2}},
        ),
    )
    code, report = _check(tmp_path, cfg)
    e0, e1 = family.experts
    assert code == 1 and report["problems"][:5] == [
        f"model {e0}: density must be a number in (0, 1] or 'auto'; got null",
        f"model {e0}: weight must be a finite number; got {{'a': 1}}",
        f"model {e1}: threshold must be a finite number >= 0; got [[1, 2]]",
        f"model {e1}: unknown parameter 'wieght' for ffg; did you mean 'weight'?",
        f"Curvature store {missing} for expert {e1} does not exist",
    ], report["problems"]
    assert len(report["problems"]) == 5


def test_a_bad_value_from_store_metadata_is_reported_once_naming_the_store(family, tmp_path):
    """A value the config does not set but the store's metadata gives (beta2 = 1.5) is not the config's: it is
    reported once for the expert, saying where it came from (it was one line per tensor)."""
    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "meta.safetensors")
    save_file(load_file(family.stores[0]), path, metadata={"step": "20", "beta2": "1.5"})
    cfg = _config(family, expert_parameters=({"curvature": path}, None), curvature_scale="none")
    code, report = _check(tmp_path, cfg)
    assert code == 1 and report["problems"] == [
        f"expert {family.experts[0]}: beta2 must be a number in (0, 1); got 1.5 (from the metadata of {path})"
    ], report["problems"]
