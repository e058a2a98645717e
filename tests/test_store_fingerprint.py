"""Stores know their expert: the weights fingerprint a store records, and what check and the merge do with it.

The fingerprint (:mod:`mergekit_ota.curvature.fingerprint`) is computed from live tensors by the training
callback and from safetensors files by export, check and the merge: the two must agree bit for bit.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mergekit_ota.cli.main import main
from mergekit_ota.curvature.fingerprint import (
    FINGERPRINT_KEY,
    VALUES_PER_ROW,
    entries_fingerprint,
    fingerprint_rows,
    tensors_fingerprint,
)
from mergekit_ota.io.safetensors import read_header

shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3).map(tuple)
values = st.sampled_from([0.0, -0.0, 1e-30, 1.0, -2.5, 3.0e38, 7e-3])


def _save(tensors, path):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    entries, _ = read_header(str(path))
    return entries


@settings(max_examples=40, deadline=None)
@given(
    named=st.dictionaries(st.sampled_from(["a", "b.weight", "z", "é"]), shapes, min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    fill=values,
    seed=st.integers(0, 2**16),
)
def test_live_and_saved_fingerprints_are_identical(tmp_path_factory, named, dtype, fill, seed):
    """For any shapes (0-d, empty, one element, wider rows than are hashed) and dtypes, the fingerprint of the
    tensors in memory equals the one read back from the safetensors file holding them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=g) * fill).to(dtype) for n, s in named.items()}
    entries = _save(tensors, tmp_path_factory.mktemp("fp") / "w.safetensors")
    assert entries_fingerprint(entries, list(tensors)) == tensors_fingerprint(tensors)


def test_fingerprint_sees_names_shapes_and_each_hashed_value_but_nothing_else():
    """Renaming, reshaping or changing a value in a hashed row changes the fingerprint; a value outside the hashed
    rows (or past the first VALUES_PER_ROW of a row) does not."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(9, 100, generator=g), "b": torch.randn(3, generator=g)}
    reference = tensors_fingerprint(base)
    assert fingerprint_rows((9, 100)) == [0, 4, 8] and fingerprint_rows(()) == [0] and fingerprint_rows((0,)) == []

    def changed(name, index, value=1.0):
        tensors = {k: v.clone() for k, v in base.items()}
        tensors[name][index] += value
        return tensors_fingerprint(tensors)

    for index in [(0, 0), (4, VALUES_PER_ROW - 1), (8, 3)]:
        assert changed("w", index) != reference
    assert changed("b", 1) != reference
    assert changed("w", (1, 0)) == reference and changed("w", (0, VALUES_PER_ROW)) == reference
    assert tensors_fingerprint({"v": base["w"], "b": base["b"]}) != reference
    assert tensors_fingerprint({"w": base["w"].reshape(100, 9), "b": base["b"]}) != reference


# ----------------------------------------------------------------------------- check and merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """Base + 2 experts whose stores record their expert's fingerprint (as make_family writes them)."""
    from mergekit_ota.testing import make_family

    return make_family(str(tmp_path_factory.mktemp("fam")), n_experts=2)


def _config(family, tmp_path, stores=(None, None)) -> str:
    cfg = {
        "merge_method": "ota",
        "base_model": family.base,
        "models": [
            {"model": e, **({"parameters": {"curvature": s}} if s else {})} for e, s in zip(family.experts, stores)
        ],
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _check(config: str):
    result = CliRunner().invoke(main, ["check", config, "--json"])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _merge(config: str, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_ota

    mergekit_ota.install()  # register ota/ffg and patch mergekit (whether or not the start-up hook is on)

    with open(config) as fp:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(fp))
    run_merge(cfg, str(out), MergeOptions(quiet=True, copy_tokenizer=False))


def test_stores_of_their_own_experts_pass_silently(family, tmp_path, caplog):
    """Each expert's own store (fingerprint recorded): check exits 0 with no warning and no fingerprint note; the
    merge logs no warning about it."""
    for store in family.stores:
        assert FINGERPRINT_KEY in read_header(store)[1]
    config = _config(family, tmp_path)
    code, report = _check(config)
    assert code == 0 and report["warnings"] == []
    assert not any(FINGERPRINT_KEY in note for note in report["notes"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergekit_ota"):
        _merge(config, tmp_path / "out")
    assert not any(FINGERPRINT_KEY in r.getMessage() or "swapped" in r.getMessage() for r in caplog.records)


def test_swapped_stores_warn_naming_store_and_both_experts(family, tmp_path, caplog):
    """Expert 0 given expert 1's store and expert 1 expert 0's: check (exit 0) and the merge warn once per store,
    naming the store, the expert it is given to and the expert whose weights it belongs to."""
    config = _config(family, tmp_path, stores=(family.stores[1], family.stores[0]))
    code, report = _check(config)
    assert code == 0 and len(report["warnings"]) == 2
    for given_to, store, owner in ((0, 1, 1), (1, 0, 0)):
        warning = next(w for w in report["warnings"] if w.startswith(f"store {family.stores[store]}"))
        assert f"given to expert {family.experts[given_to]}" in warning
        assert f"expert {family.experts[owner]}'s weights" in warning and "swapped" in warning
    caplog.clear()  # check ran in this process and logged too
    with caplog.at_level(logging.WARNING, logger="mergekit_ota"):
        _merge(config, tmp_path / "out")
    assert sum("swapped" in r.getMessage() for r in caplog.records) == 2


def test_a_store_of_other_weights_warns_naming_both(family, tmp_path):
    """A store recording a fingerprint that is no expert's: a warning naming the store and the expert."""
    other = tmp_path / "other.safetensors"
    tensors = load_file(family.stores[0])
    metadata = dict(read_header(family.stores[0])[1])
    metadata[FINGERPRINT_KEY] = "sha256:" + "0" * 64
    save_file(tensors, str(other), metadata=metadata)
    code, report = _check(_config(family, tmp_path, stores=(str(other), None)))
    assert code == 0 and len(report["warnings"]) == 1
    assert str(other) in report["warnings"][0] and f"expert {family.experts[0]}'s" in report["warnings"][0]


def test_one_store_given_to_two_experts_is_refused(family, tmp_path):
    """The same store file for both experts: a problem in check (exit 1) and a PreflightError from the merge,
    naming the store and both experts; nothing is written."""
    from mergekit_ota.errors import PreflightError

    config = _config(family, tmp_path, stores=(family.stores[0], family.stores[0]))
    code, report = _check(config)
    assert code == 1 and len(report["problems"]) == 1
    problem = report["problems"][0]
    assert problem.startswith(family.stores[0]) and all(e in problem for e in family.experts)
    with pytest.raises(PreflightError, match="one curvature store is given to 2 experts"):
        _merge(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_store_without_fingerprint_is_accepted_with_a_note(family, tmp_path, caplog):
    """A hand-made store (no metadata): check exits 0 with a note naming the store and the expert, no warning;
    the merge logs the note and merges."""
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(family.stores[0]), str(bare))
    config = _config(family, tmp_path, stores=(str(bare), None))
    code, report = _check(config)
    assert code == 0 and report["warnings"] == []
    note = next(n for n in report["notes"] if FINGERPRINT_KEY in n)
    assert str(bare) in note and family.experts[0] in note
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergekit_ota"):
        _merge(config, tmp_path / "out")
    assert any(str(bare) in r.getMessage() and FINGERPRINT_KEY in r.getMessage() for r in caplog.records)
