"""Where an expert's curvature store is found: local model directories (and their export/), and Hub repos.

Hub repos are built on disk exactly as huggingface_hub caches them
(``models--ORG--NAME/{blobs, snapshots/SHA, refs/BRANCH}``, snapshot files linked to blobs),
with ``HF_HUB_OFFLINE=1`` and any download attempt failing the test, except in the tests of
the online pass, where ``hf_hub_download`` is replaced by a fake that records each call.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants, errors
from mergekit.common import ModelReference
from safetensors.torch import save_file

from mergekit_ota.curvature.locate import SEARCHED, locate_store
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.curvature.writer import store_metadata
from mergekit_ota.errors import CurvatureError

INDEX = "exp_avg_sq.safetensors.index.json"
SINGLE = "exp_avg_sq.safetensors"
REPO = "paper-org/expert-math"


# ----------------------------------------------------------------------------- helpers


def _store_bytes(tmp_path: Path, tensors: Dict[str, torch.Tensor]) -> bytes:
    """A real curvature store file (safetensors with the store header) holding ``tensors``, as bytes."""
    path = tmp_path / f"scratch-{len(list(tmp_path.glob('scratch-*')))}.safetensors"
    save_file(tensors, str(path), metadata=store_metadata("none", torch.float32))
    return path.read_bytes()


def _single(tmp_path: Path, value: float = 1.0) -> bytes:
    return _store_bytes(tmp_path, {"w": torch.full((2, 3), value)})


def _sharded(tmp_path: Path, folder: str = "") -> Dict[str, bytes]:
    """Repo files of a two-shard store: the index and both shards, under ``folder``."""
    prefix = f"{folder}/" if folder else ""
    shards = {
        "exp_avg_sq-00001-of-00002.safetensors": {"a": torch.ones(4)},
        "exp_avg_sq-00002-of-00002.safetensors": {"b": torch.full((2,), 2.0)},
    }
    files = {prefix + name: _store_bytes(tmp_path, tensors) for name, tensors in shards.items()}
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    files[prefix + INDEX] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def _write_local(directory: Path, files: Dict[str, bytes]) -> None:
    for name, data in files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _cache_repo(
    cache: Path, repo_id: str, files: Dict[str, bytes], branch: str = "main", sha: Optional[str] = None
) -> Path:
    """Lay ``files`` out as huggingface_hub caches revision ``branch`` of ``repo_id``; the snapshot directory.

    ``models--ORG--NAME/blobs/HASH`` holds each file's content, ``snapshots/SHA/NAME`` links to it
    (relative link, as huggingface_hub makes it), and ``refs/BRANCH`` holds SHA (no newline).
    """
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    sha = sha or hashlib.sha1(f"{repo_id}@{branch}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / sha
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs" / branch).write_text(sha)
    return snapshot


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 (env and huggingface_hub.constants), the default cache an empty folder, no downloads.

    Returns a fresh cache directory for the test to fill and pass as ``cache_dir``.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"hf_hub_download called while offline: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    return cache


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode with ``hf_hub_download`` replaced: ``calls`` records each filename asked for, and
    ``answers[filename]`` (an exception to raise, or bytes to "download" into the cache) decides
    the outcome; a name without an answer raises AssertionError (an unexpected request)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    state = SimpleNamespace(calls=[], answers={}, cache=cache)

    def fake_download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        state.calls.append(filename)
        answer = state.answers.get(filename)
        if answer is None:
            raise AssertionError(f"unexpected download of {filename}")
        if isinstance(answer, BaseException):
            raise answer
        snapshot = _cache_repo(Path(cache_dir), repo_id, {filename: answer}, branch=revision or "main")
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    return state


def _error(curvature, model_path, **kwargs) -> str:
    with pytest.raises(CurvatureError) as raised:
        locate_store(curvature, model_path, "the-expert", **kwargs)
    return str(raised.value)


def _tried(message: str) -> List[str]:
    """The ``- PLACE: OUTCOME`` lines of an error's listing, in order (local places relative to the directory named)."""
    return [line.strip()[2:] for line in message.splitlines() if line.startswith("    - ")]


# ----------------------------------------------------------------------------- local directories


def test_local_model_without_a_store_of_its_own_uses_its_export_subdirectory(tmp_path, offline):
    """No `curvature:` and no store in the model directory: <model>/export/exp_avg_sq.safetensors is found
    (the released experts' layout), and in export/ the index comes before the single file."""
    model = tmp_path / "expert"
    _write_local(model, {"config.json": b"{}", f"export/{SINGLE}": _single(tmp_path)})
    assert locate_store(None, str(model), "expert") == str(model / "export" / SINGLE)
    _write_local(model, _sharded(tmp_path, "export"))
    found = locate_store(None, str(model), "expert")
    assert found == str(model / "export" / INDEX)
    assert set(CurvatureStore(found).names()) == {"a", "b"}


def test_a_store_in_the_model_directory_wins_over_export(tmp_path, offline):
    """<model>/exp_avg_sq.safetensors[.index.json] is taken before anything in <model>/export/, and within
    one level the index before the single file: the order is SEARCHED."""
    model = tmp_path / "expert"
    _write_local(model, {**_sharded(tmp_path, "export"), f"export/{SINGLE}": _single(tmp_path)})
    _write_local(model, {SINGLE: _single(tmp_path, 3.0)})
    assert locate_store(None, str(model), "expert") == str(model / SINGLE)
    _write_local(model, _sharded(tmp_path))
    assert locate_store(None, str(model), "expert") == str(model / INDEX)
    assert SEARCHED == (INDEX, SINGLE, f"export/{INDEX}", f"export/{SINGLE}")


def test_a_curvature_directory_gets_the_same_two_level_lookup(tmp_path, offline):
    """`curvature: DIR` finds DIR/export/exp_avg_sq.safetensors when DIR holds no store itself, DIR's own store
    when it does; a DIR with neither is refused listing all four paths."""
    stores = tmp_path / "stores"
    _write_local(stores, {f"export/{SINGLE}": _single(tmp_path)})
    assert locate_store(str(stores), str(tmp_path), "e") == str(stores / "export" / SINGLE)
    _write_local(stores, {SINGLE: _single(tmp_path)})
    assert locate_store(str(stores), str(tmp_path), "e") == str(stores / SINGLE)
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _error(str(empty), str(tmp_path))
    assert "holds neither exp_avg_sq.safetensors" in message
    assert f"looked in {empty}, in this order:" in message
    assert _tried(message) == [f"{name}: no such file" for name in SEARCHED]


def test_a_local_model_without_any_store_lists_all_four_paths(tmp_path, offline):
    """The error for a local model directory without a store keeps the advice (curvature: PATH, or a store in
    the model directory) and lists <model>/..., <model>/export/... in search order."""
    model = tmp_path / "bare"
    model.mkdir()
    message = _error(None, str(model))
    assert message.startswith(
        "No curvature for expert the-expert: set 'parameters: {curvature: PATH}' for it, or put exp_avg_sq.safetensors"
    )
    assert f"looked in {model}, in this order:" in message
    assert _tried(message) == [f"{name}: no such file" for name in SEARCHED]


@pytest.mark.parametrize("path", ["./missing/expert", "missing", "/abs/missing/expert", "{local}/missing"])
def test_a_local_looking_path_that_does_not_exist_is_never_sent_to_the_hub(tmp_path, monkeypatch, online, path):
    """Even online, a model path that cannot be a repo id org/name (relative with ./, a bare name, absolute,
    or org/ an existing local folder) is reported as a missing directory without any Hub request."""
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    path = path.format(local="local")
    message = _error(None, path)
    relative = "" if os.path.isabs(path) else f" (relative to {tmp_path})"
    assert f"{path}: no such directory{relative} (a local path by its form" in message and online.calls == []
    assert len(_tried(message)) == len(SEARCHED)


def test_a_possible_repo_id_with_no_such_local_directory_fails_fast_offline(tmp_path, monkeypatch, offline):
    """A relative model path org/name whose org is no local folder may be a Hub repo id: it reaches the Hub
    lookup, which offline reads only the cache and fails at once (well under a second, no download), saying it is
    no directory relative to the working directory."""
    import time

    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    message = _error(None, "experts/math")
    assert time.perf_counter() - started < 2.0
    assert f"experts/math: no such directory (relative to {tmp_path}), so its Hub repo was searched" in message
    assert _tried(message)[0] == f"experts/math: no such directory (relative to {tmp_path})"


# ----------------------------------------------------------------------------- Hub repos, offline


def test_hub_single_file_is_found_in_the_default_cache(tmp_path, offline):
    """A repo id whose cached main snapshot holds exp_avg_sq.safetensors: found offline in huggingface_hub's
    default cache (HF_HUB_CACHE, no cache_dir), a readable store, no download."""
    default = Path(constants.HF_HUB_CACHE)
    snapshot = _cache_repo(default, REPO, {"config.json": b"{}", SINGLE: _single(tmp_path, 5.0)})
    found = locate_store(None, REPO, REPO)
    assert found == str(snapshot / SINGLE)
    store = CurvatureStore(found)
    assert store.names() == ["w"] and torch.equal(store.read_entry(store.records["w"].full), torch.full((2, 3), 5.0))


def test_hub_index_with_all_shards_cached_is_found(tmp_path, offline):
    """A cached index whose shards are all cached too: the index (in the snapshot) is returned, before the
    single file also present in the repo."""
    snapshot = _cache_repo(offline, REPO, {**_sharded(tmp_path), SINGLE: _single(tmp_path)})
    found = locate_store(None, REPO, REPO, cache_dir=str(offline))
    assert found == str(snapshot / INDEX)
    assert all(
        (snapshot / name).is_file() for name in json.loads((snapshot / INDEX).read_text())["weight_map"].values()
    )


def test_hub_index_found_in_the_cache_opens_as_a_store(tmp_path, offline):
    """The sharded store located in the HF cache opens as a CurvatureStore with both shards' tensors: the
    cache's snapshots/SHA -> blobs/HASH links stay inside the repo's own cache directory."""
    _cache_repo(offline, REPO, _sharded(tmp_path))
    found = locate_store(None, REPO, REPO, cache_dir=str(offline))
    assert set(CurvatureStore(found).names()) == {"a", "b"}


def test_hub_export_layout_is_found(tmp_path, offline):
    """A repo holding only export/exp_avg_sq.safetensors (the released experts' layout) is found offline."""
    snapshot = _cache_repo(offline, REPO, {"config.json": b"{}", f"export/{SINGLE}": _single(tmp_path)})
    assert locate_store(None, REPO, REPO, cache_dir=str(offline)) == str(snapshot / "export" / SINGLE)


def test_hub_revision_other_than_main(tmp_path, offline):
    """The store is looked up in the expert's revision: branch v2 (refs/v2) has it, main does not. Given as
    ModelReference 'org/name@v2' through the planner (revision and --transformers-cache threaded), as
    model_path 'org/name@v2', and as revision=; main alone is not found."""
    from mergekit_ota.graph.planner import CurvaturePlan

    _cache_repo(offline, REPO, {"config.json": b"{}"}, branch="main")
    v2 = _cache_repo(offline, REPO, {"config.json": b"{}", SINGLE: _single(tmp_path)}, branch="v2")
    assert locate_store(None, REPO, "e", revision="v2", cache_dir=str(offline)) == str(v2 / SINGLE)
    assert locate_store(None, f"{REPO}@v2", "e", cache_dir=str(offline)) == str(v2 / SINGLE)
    plan = CurvaturePlan(SimpleNamespace(options=SimpleNamespace(transformers_cache=str(offline))))
    assert plan.store_path(ModelReference.parse(f"{REPO}@v2"), None) == str(v2 / SINGLE)
    message = _error(None, REPO, cache_dir=str(offline))
    assert f"{REPO}@main:{SINGLE}: not in the local cache" in message


def test_hub_index_whose_shard_is_not_cached_is_not_found_and_says_which(tmp_path, offline):
    """An index cached without one of its shards does not count: nothing found (the repo has no other store),
    and the error names the missing shard."""
    files = _sharded(tmp_path, "export")
    del files["export/exp_avg_sq-00002-of-00002.safetensors"]
    _cache_repo(offline, REPO, files)
    message = _error(None, REPO, cache_dir=str(offline))
    assert (
        f"{REPO}@main:export/{INDEX}: the index is cached, but its shard export/exp_avg_sq-00002-of-00002.safetensors "
        f"is not in the local cache ({offline})"
    ) in _tried(message)[3]


def test_nothing_found_on_the_hub_lists_every_place_and_the_offline_limitation(tmp_path, offline):
    """Nothing anywhere: the error keeps the advice, lists the local path and every repo@revision:file in
    search order with why (not in the local cache; offline), and says mergekit itself cannot load a hub id
    under HF_HUB_OFFLINE (list_repo_files), naming the cached snapshot to use instead."""
    snapshot = _cache_repo(offline, REPO, {"config.json": b"{}"})
    message = _error(None, REPO, cache_dir=str(offline))
    assert "set 'parameters: {curvature: PATH}' for it, or put exp_avg_sq.safetensors" in message
    assert _tried(message) == [f"{REPO}: no such directory (relative to {os.getcwd()})"] + [
        f"{REPO}@main:{name}: not in the local cache ({offline}); not downloaded: offline (HF_HUB_OFFLINE=1)"
        for name in SEARCHED
    ]
    assert "list_repo_files" in message and "HF_HUB_OFFLINE" in message and str(snapshot) in message


def test_a_file_the_cache_records_as_absent_is_reported_so(tmp_path, offline):
    """huggingface_hub's .no_exist marker (an earlier download found no such file) is reported as "not in the
    repo", not as a cache miss."""
    snapshot = _cache_repo(offline, REPO, {"config.json": b"{}"})
    marker = offline / f"models--{REPO.replace('/', '--')}" / ".no_exist" / snapshot.name / SINGLE
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    assert f"{REPO}@main:{SINGLE}: not in the repo (recorded as absent" in _error(None, REPO, cache_dir=str(offline))


# ----------------------------------------------------------------------------- Hub repos, online


def test_online_downloads_follow_the_search_order_after_the_cache(tmp_path, online):
    """Nothing cached, online: hf_hub_download is asked for the four names in order, a file not in the repo
    moves on, and the first downloaded one (export/ here) is returned; the cache given is the one used."""
    not_there = errors.EntryNotFoundError("404")
    online.answers = {
        INDEX: not_there,
        SINGLE: not_there,
        f"export/{INDEX}": not_there,
        f"export/{SINGLE}": _single(tmp_path),
    }
    found = locate_store(None, REPO, REPO, cache_dir=str(online.cache))
    assert online.calls == list(SEARCHED)
    assert found.startswith(str(online.cache)) and found.endswith(f"export/{SINGLE}")


def test_online_index_download_fetches_its_shards(tmp_path, online):
    """A downloaded index brings its shards; a shard that fails to download makes the index not count."""
    files = _sharded(tmp_path)
    online.answers = dict(files)
    found = locate_store(None, REPO, REPO, cache_dir=str(online.cache))
    assert found.endswith(INDEX) and sorted(online.calls) == sorted(files)
    online.calls.clear()
    online.answers["exp_avg_sq-00002-of-00002.safetensors"] = errors.EntryNotFoundError("404")
    online.answers.update({name: errors.EntryNotFoundError("404") for name in SEARCHED[1:]})
    other = "paper-org/expert-code"
    message = _error(None, other, cache_dir=str(online.cache))
    assert _tried(message)[1] == (
        f"{other}@main:{INDEX}: not in the local cache ({online.cache}); the index downloaded, "
        f"but its shard exp_avg_sq-00002-of-00002.safetensors did not: not in the repo"
    )


def test_a_network_error_is_reported_in_a_few_words_and_stops_the_downloads(tmp_path, online):
    """The Hub unreachable (huggingface_hub's LocalEntryNotFoundError from a connection error): no traceback
    escapes, the attempt says "could not reach the Hub (ConnectError)", the remaining names are not asked for;
    without HF_HUB_OFFLINE the mergekit offline note is not added."""
    import httpx2

    try:
        raise errors.LocalEntryNotFoundError("cannot find the requested files") from httpx2.ConnectError("no route")
    except errors.LocalEntryNotFoundError as unreachable:
        online.answers = {INDEX: errors.EntryNotFoundError("404"), SINGLE: unreachable}
    message = _error(None, REPO, cache_dir=str(online.cache))
    assert online.calls == [INDEX, SINGLE]
    tried = _tried(message)
    assert tried[1].endswith("not in the repo") and tried[2].endswith(
        "download: could not reach the Hub (ConnectError)"
    )
    assert (
        all(line.endswith("download not tried (stopped by the error above)") for line in tried[3:]) and len(tried) == 5
    )
    assert "list_repo_files" not in message
