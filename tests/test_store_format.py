"""The store's vocabulary (:mod:`mergekit_ota.store_format`): one parser of the JSON-list metadata fields, the
exporter's advice added by the caller of ``locate_store``, and a module both curvature/ and export/ import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_ota.curvature.locate import locate_store
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.curvature.writer import save_store
from mergekit_ota.errors import CurvatureError
from mergekit_ota.store_format import ADAPTER_UNTOUCHED, MAPPING_BY_ORDER, WITHOUT_STATE, metadata_names

# parameter names as a store may record them: any text UTF-8 encodes (no lone surrogates)
_names = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=6)


@settings(max_examples=40, deadline=None)
@given(names=_names)
def test_a_json_list_of_names_round_trips(names):
    """What export writes (``json.dumps`` of the list) is what the one parser reads back, for either field."""
    for key in (WITHOUT_STATE, MAPPING_BY_ORDER, ADAPTER_UNTOUCHED):
        assert metadata_names({key: json.dumps(names)}, key, "s.safetensors") == names


def test_a_json_list_round_trips_through_a_store_file_and_the_planner_reads_it_alike(tmp_path):
    """Written into a store's header and read back through CurvatureStore: the same list, by the exporter's
    parser and by the planner's hint (both go through metadata_names)."""
    from mergekit_ota.graph.planner import _without_state

    names = ["model.embed_tokens.weight", "lm_head.weight", "ünïcode.weight"]
    path = tmp_path / "s.safetensors"
    save_store({"w": torch.rand(3, 2)}, str(path), metadata={WITHOUT_STATE: json.dumps(names)})
    store = CurvatureStore(str(path))
    assert metadata_names(store.metadata, WITHOUT_STATE, str(path)) == names
    assert _without_state(store) == names


@pytest.mark.parametrize("text", [json.dumps("model.embed_tokens.weight"), "5", "[1, 2]", "not json", '{"a": 1}'])
def test_anything_but_a_json_list_of_names_is_refused_never_split_into_characters(tmp_path, text):
    """A JSON string is refused naming the file and key (it is never read as a list of its characters); the
    planner, which only adds a hint from it, reads it as no names."""
    from mergekit_ota.graph.planner import _without_state

    with pytest.raises(CurvatureError, match=f"s.safetensors.*metadata '{WITHOUT_STATE}'"):
        metadata_names({WITHOUT_STATE: text}, WITHOUT_STATE, "s.safetensors")
    path = tmp_path / "s.safetensors"
    save_store({"w": torch.rand(3, 2)}, str(path), metadata={WITHOUT_STATE: text})
    assert _without_state(CurvatureStore(str(path))) == []


def test_absent_or_empty_field_is_no_names():
    assert (
        metadata_names({}, WITHOUT_STATE, "s") == [] and metadata_names({WITHOUT_STATE: ""}, WITHOUT_STATE, "s") == []
    )


def test_locate_store_adds_only_the_callers_advice_and_a_failing_advice_hides_nothing(tmp_path):
    """locate_store knows no exporter: without advice its error has no hint; the caller's advice is added after a
    '; '; advice that raises leaves the error as it was."""
    (tmp_path / "notes.txt").write_text("x")
    given = str(tmp_path / "notes.txt")
    errors = {}
    for name, advice in [("none", None), ("some", lambda path: f"ADVICE for {path}"), ("raises", lambda path: 1 / 0)]:
        with pytest.raises(CurvatureError) as raised:
            locate_store(given, str(tmp_path), "e", advice=advice)
        errors[name] = str(raised.value)
    assert errors["none"] == errors["raises"] and "ADVICE" not in errors["none"]
    assert errors["some"] == errors["none"] + f"; ADVICE for {given}"


def test_the_shared_module_imports_neither_side_nor_torch():
    """store_format is the one home both curvature/ and export/ import: it must import neither (no cycle)."""
    code = (
        "import sys, mergekit_ota.store_format\n"
        "bad = [m for m in sys.modules if m.startswith(('mergekit_ota.curvature', 'mergekit_ota.export', 'torch'))]\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
