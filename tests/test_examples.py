"""Every config in example_configs/ is valid and merges the models `make demo` creates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "example_configs").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_like_models(tmp_path_factory):
    """base, expert_a, expert_b laid out as `make demo` lays them out (curvature inside each expert)."""
    import os

    from mergekit_ota.testing import make_family

    root = tmp_path_factory.mktemp("demo_out")
    family = make_family(str(root / "models"), n_experts=2)
    for i, letter in enumerate("ab"):
        os.rename(family.experts[i], root / "models" / f"expert_{letter}")
    return root


def test_examples_exist():
    """The example set covers ota, ota+ffg (tensor and model density), ffg and mergekit's baselines."""
    names = {p.stem for p in EXAMPLES}
    assert {"ota", "ota_ffg_tensor", "ota_ffg_model", "ffg", "ties", "dare_ties", "task_arithmetic"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_merges(path, demo_like_models, tmp_path):
    """The example parses as a mergekit config and merges without error."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    text = path.read_text().replace("demo_out", str(demo_like_models))
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(tmp_path / "out"), MergeOptions(quiet=True, copy_tokenizer=False, random_seed=0))
    assert (tmp_path / "out" / "model.safetensors").is_file()
