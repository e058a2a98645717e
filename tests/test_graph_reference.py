"""Merges planned by mergekit (run_merge) equal an independent plain-torch reference."""

from __future__ import annotations

import os

import pytest
import torch
from merging import merge as _merge
from safetensors.torch import load_file, save_file

from mergekit_ota.math.reference import reference_mask, reference_ota


def _reference(base, experts, curvatures, weights, densities=None, power=0.5, eps=1e-12):
    """OTA by its formula (mergekit_ota.math.reference, float64), FFG masks from float64 saliencies."""
    masks = None
    if densities is not None:
        masks = [
            reference_mask(v.double() * (t.double() - base.double()) ** 2, d)
            for t, v, d in zip(experts, curvatures, densities)
        ]
    return reference_ota(base, experts, curvatures, weights, masks=masks, power=power, eps=eps).float()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from mergekit_ota.testing import make_family, tiny_llama_config

    root = tmp_path_factory.mktemp("ref")
    return make_family(str(root), n_experts=2, config=tiny_llama_config(num_layers=4))


def _load(family):
    base = load_file(os.path.join(family.base, "model.safetensors"))
    experts = [load_file(os.path.join(e, "model.safetensors")) for e in family.experts]
    stores = [load_file(s) for s in family.stores]
    return base, experts, stores


@pytest.mark.parametrize("densities", [None, [0.3, 0.5]], ids=["ota", "ota+ffg"])
def test_models_config_matches_reference(family, tmp_path, densities):
    """A `models:` ota merge (weights 1.0 and 0.5, optional per-tensor FFG) equals the reference on every tensor."""
    weights = [1.0, 0.5]
    models = []
    for i, e in enumerate(family.experts):
        params = {"weight": weights[i]}
        if densities:
            params["density"] = densities[i]
        models.append({"model": e, "parameters": params})
    raw = {"curvature_scale": "none"}  # the reference is the formula on v as stored
    out = _merge(
        {"merge_method": "ota", "base_model": family.base, "models": models, "dtype": "float32", "parameters": raw},
        tmp_path / "o",
    )
    base, experts, stores = _load(family)
    for name, b in base.items():
        expected = _reference(b, [e[name] for e in experts], [s[name] for s in stores], weights, densities)
        torch.testing.assert_close(out[name], expected, atol=1e-6, rtol=1e-5, msg=name)


def test_slice_with_layer_offset_reads_input_layer_curvature(family, tmp_path):
    """Output layer 0 of a slices: [2, 4) merge uses the INPUT layer-2 weights and curvature, not layer 0's."""
    # make curvature differ strongly between layers: scale layer 0's store entries by 1e6 in expert 0
    store0 = load_file(family.stores[0])
    skewed = {k: (v * 1e6 if ".layers.0." in k else v) for k, v in store0.items()}
    skewed_path = tmp_path / "skewed.safetensors"
    save_file(skewed, str(skewed_path))
    sources = [{"model": family.base, "layer_range": [2, 4]}] + [
        {"model": e, "layer_range": [2, 4], "parameters": ({"curvature": str(skewed_path)} if i == 0 else {})}
        for i, e in enumerate(family.experts)
    ]
    cfg = {
        "merge_method": "ota",
        "base_model": family.base,
        "slices": [{"sources": sources}],
        "dtype": "float32",
        "parameters": {"curvature_scale": "none"},
    }
    out = _merge(cfg, tmp_path / "o")
    base, experts, stores = _load(family)
    stores[0] = skewed
    name_out = "model.layers.0.self_attn.q_proj.weight"
    name_in = "model.layers.2.self_attn.q_proj.weight"
    right = _reference(base[name_in], [e[name_in] for e in experts], [s[name_in] for s in stores], [1.0, 1.0])
    wrong = _reference(base[name_in], [e[name_in] for e in experts], [s[name_out] for s in stores], [1.0, 1.0])
    torch.testing.assert_close(out[name_out], right, atol=1e-6, rtol=1e-5)
    assert (out[name_out] - wrong).abs().max() > 1e-3


def test_missing_curvature_tensor_is_reported_before_writing(family, tmp_path):
    """A store lacking a needed tensor fails at planning with the file and tensor named; no output is created."""
    from mergekit_ota.errors import PreflightError

    store = load_file(family.stores[1])
    store.pop("model.layers.1.mlp.up_proj.weight")
    partial = tmp_path / "partial.safetensors"
    save_file(store, str(partial))
    models = [{"model": family.experts[0]}, {"model": family.experts[1], "parameters": {"curvature": str(partial)}}]
    out = tmp_path / "o"
    with pytest.raises(PreflightError, match=r"partial\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        _merge({"merge_method": "ota", "base_model": family.base, "models": models}, out)
    assert not out.exists()


def test_nan_curvature_fails_and_leaves_no_output(family, tmp_path):
    """NaN curvature is named (file, tensor) when read, and the output directory the run created is removed."""
    from mergekit_ota.errors import CurvatureError

    store = load_file(family.stores[0])
    store["model.norm.weight"][0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(store, str(bad))
    models = [{"model": family.experts[0], "parameters": {"curvature": str(bad)}}, {"model": family.experts[1]}]
    out = tmp_path / "o"
    with pytest.raises(CurvatureError, match=r"bad\.safetensors.*model\.norm\.weight.*NaN"):
        _merge({"merge_method": "ota", "base_model": family.base, "models": models}, out)
    assert not out.exists()
