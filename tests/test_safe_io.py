"""Issue 10's I/O cases: nothing a user owns is lost, nothing outside the output is touched, every
ambiguous or malformed file is refused naming it (cases 2, 3, 4, 5, 7, 10 and the "also" items).

Each test failed on the code before the io layer (mergekit_ota/io/) and passes with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import uuid

import pytest
import torch
from click.testing import CliRunner
from merging import merge as _merge
from safetensors.torch import load_file, save_file

from mergekit_ota.errors import CurvatureError, OutputError, PreflightError

NAME = "model.layers.1.self_attn.k_proj.weight"


def _config(family, **overrides):
    cfg = {
        "merge_method": "ota",
        "base_model": family.base,
        "models": [{"model": e} for e in family.experts],
        "dtype": "float32",
    }
    cfg.update(overrides)
    return cfg


def _export(*args, ok=True):
    from mergekit_ota.cli.export import export_command

    result = CliRunner().invoke(export_command, [str(a) for a in args] + ["--quiet"])
    assert (result.exit_code == 0) == ok, result.output
    if not ok:  # a clear message, not a traceback
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    return result


def _snapshot(directory):
    """{relative path: bytes} of every file below ``directory``."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fp:
                found[os.path.relpath(path, directory)] = fp.read()
    return found


# -- case 2: two runs into one new directory ---------------------------------------------------------------


def test_a_run_never_deletes_the_output_of_another_run_into_the_same_directory(family, tmp_path, monkeypatch):
    """Run B passes the output check, then (while B runs) run A merges into the same new directory; B then
    fails. Before: both passed the emptiness check and B's clean-up deleted A's finished merge. Now B holds a
    claim on the directory, so A is refused at once (naming B), and B removes only what B created."""
    import mergekit.merge as merge_module

    out = tmp_path / "out"
    original = merge_module.get_architecture_info
    outcome = {}

    def architecture_then_fail(*args, **kwargs):
        monkeypatch.setattr(merge_module, "get_architecture_info", original)
        try:
            _merge(_config(family), out)  # run A, started while B is past its output check
            outcome["a"] = "finished"
        except OutputError as error:
            outcome["a"] = str(error)
        raise RuntimeError("run B fails")

    monkeypatch.setattr(merge_module, "get_architecture_info", architecture_then_fail)
    with pytest.raises(RuntimeError, match="run B fails"):
        _merge(_config(family), out)
    if outcome["a"] == "finished":
        assert (out / "model.safetensors").is_file(), "run B deleted run A's finished merge"
    else:
        assert "another mergekit-ota run" in outcome["a"] and f"pid {os.getpid()}" in outcome["a"]
        assert not out.exists()  # B created it, B removed it


def test_a_claim_left_by_a_dead_run_is_named_and_not_overwritten(family, tmp_path):
    """A directory holding the claim of a run that died (SIGKILL) is refused with the way out named."""
    from mergekit_ota.io.output import CLAIM_FILE

    probe = subprocess.Popen(["true"])
    probe.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    import socket

    (out / CLAIM_FILE).write_text(json.dumps({"pid": probe.pid, "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(OutputError, match=r"no longer running .*delete .*mergekit-ota-claim"):
        _merge(_config(family), out)
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"partial"


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    probe = subprocess.Popen(["true"])
    probe.wait()
    return probe.pid


def _claimed_dir(tmp_path, pid, host=None, extra=None):
    import socket

    from mergekit_ota.io.output import CLAIM_FILE

    out = tmp_path / "out"
    out.mkdir()
    claim = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}
    (out / CLAIM_FILE).write_text(json.dumps(claim))
    if extra:
        (out / extra).write_bytes(b"partial")
    return out


@pytest.mark.parametrize(
    "case",
    ["dead pid, alone: taken over", "other host", "another file present", "live pid"],
)
def test_a_dead_runs_claim_alone_in_its_directory_is_taken_over_and_any_other_claim_refused(tmp_path, capfd, case):
    """A claim whose run is dead on this host, in a directory holding nothing else, is taken over with one line on
    stderr, and the directory is then written and released as an empty one. The same claim naming another host,
    beside another file, or naming a live pid is refused (the claim and the file untouched)."""
    import socket

    from mergekit_ota.io.output import CLAIM_FILE, OutputDirectory, ReplacePolicy

    policy = ReplacePolicy(what="nothing", recognises=lambda path: False)
    if case == "dead pid, alone: taken over":
        out = _claimed_dir(tmp_path, _dead_pid())
        OutputDirectory(str(out), policy).check()  # check OUT says it may be written
        with OutputDirectory(str(out), policy) as target:
            owner = json.loads((out / CLAIM_FILE).read_text())
            assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
            (out / "new.txt").write_text("written")
            target.commit()
        assert sorted(os.listdir(out)) == ["new.txt"]
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "taking over the claim of a run that is no longer running" in lines[0], lines
        return
    if case == "other host":
        out = _claimed_dir(tmp_path, _dead_pid(), host="another-host.invalid")
        expected = r"another mergekit-ota run \(pid \d+ on another-host\.invalid"
    elif case == "another file present":
        out = _claimed_dir(tmp_path, _dead_pid(), extra="model-00001-of-00002.safetensors")
        expected = r"no longer running .*delete .*mergekit-ota-claim"
    else:
        out = _claimed_dir(tmp_path, os.getpid())
        expected = rf"another mergekit-ota run \(pid {os.getpid()} on "
    before = _snapshot(out)
    with pytest.raises(OutputError, match=expected):
        OutputDirectory(str(out), policy).check()
    with pytest.raises(OutputError, match=expected):
        with OutputDirectory(str(out), policy):
            pass
    assert _snapshot(out) == before
    assert "taking over" not in capfd.readouterr().err


# -- case 3 and the overwrite policy: finished work is never deleted -----------------------------------------


def test_a_failure_after_every_tensor_is_written_keeps_the_merge_and_says_what_failed(family, tmp_path, monkeypatch):
    """mergekit's model-card step looks a two-component relative model path ('ck/base') up on the hub; offline it
    raises after the weights are written. Before: the plugin deleted the whole finished output. Now the weights,
    the index and config.json stay, the error names the step, and mergekit_config.yml marks it as a merge."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    root = tmp_path / "work"
    shutil.copytree(os.path.dirname(family.base), root / "ck")
    monkeypatch.chdir(root)
    cfg = _config(family, base_model="ck/base", models=[{"model": "ck/expert_0"}, {"model": "ck/expert_1"}])
    with pytest.raises(OutputError, match=r"merge is complete and kept .*model card"):
        _merge(cfg, "out")
    kept = root / "out"
    assert (kept / "config.json").is_file() and (kept / "mergekit_config.yml").is_file()
    weights = load_file(str(kept / "model.safetensors"))
    assert NAME in weights and all(torch.isfinite(t).all() for t in weights.values())


def test_rerunning_into_an_earlier_merge_replaces_it_and_a_failed_rerun_keeps_it(family, tmp_path):
    """Re-running into a directory an earlier merge wrote (mergekit_config.yml) replaces it, like mergekit's
    re-run loop; a re-run that fails part-way leaves the earlier merge byte for byte (built beside, swapped at the
    end). Before: every re-run was refused."""
    out = tmp_path / "out"
    _merge(_config(family), out)
    first = _snapshot(out)
    _merge(_config(family, parameters={"power": 1.0}), out)
    second = _snapshot(out)
    assert set(second) == set(first) and second["model.safetensors"] != first["model.safetensors"]

    bad = tmp_path / "nan.safetensors"
    tensors = load_file(family.stores[0])
    tensors[NAME][0, 0] = float("nan")  # found only when the tensor is read, mid-merge
    save_file(tensors, str(bad))
    cfg = _config(
        family,
        models=[{"model": family.experts[0], "parameters": {"curvature": str(bad)}}, {"model": family.experts[1]}],
    )
    with pytest.raises(CurvatureError, match="NaN"):
        _merge(cfg, out)
    assert _snapshot(out) == second
    assert sorted(os.listdir(tmp_path)) == ["nan.safetensors", "out"]  # no build directory left behind


def test_a_directory_that_is_not_a_merge_is_refused_and_in_place_writing_removes_only_its_own_files(
    family, tmp_path, monkeypatch
):
    """A non-empty directory that no merge wrote is refused, naming what it holds and the variable that allows
    writing into it; with MERGEKIT_OTA_ALLOW_OVERWRITE=1 a failed merge removes only the files it created."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt.*MERGEKIT_OTA_ALLOW_OVERWRITE=1"):
        _merge(_config(family), out)
    monkeypatch.setenv("MERGEKIT_OTA_ALLOW_OVERWRITE", "1")
    bad = tmp_path / "nan.safetensors"
    tensors = load_file(family.stores[0])
    tensors[NAME][0, 0] = float("inf")
    save_file(tensors, str(bad))
    cfg = _config(
        family,
        models=[{"model": family.experts[0], "parameters": {"curvature": str(bad)}}, {"model": family.experts[1]}],
    )
    with pytest.raises(CurvatureError):
        _merge(cfg, out)
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


# -- case 4: index entries that leave their directory -------------------------------------------------------


def test_export_force_never_deletes_a_file_outside_out_named_by_an_old_index(family, tmp_path):
    """An existing index whose weight_map names '../other/exp_avg_sq.safetensors': `export --force` to it used to
    delete that file (as a stale shard). Now the index is refused, naming it, and nothing is touched."""
    other = tmp_path / "other"
    other.mkdir()
    outside = other / "exp_avg_sq.safetensors"
    shutil.copy(family.stores[1], outside)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    index = out_dir / "exp_avg_sq.safetensors.index.json"
    names = list(load_file(family.stores[1]))
    index.write_text(json.dumps({"metadata": {}, "weight_map": {n: "../other/exp_avg_sq.safetensors" for n in names}}))
    before = outside.read_bytes()
    result = _export(family.stores[0], index, "--force", ok=False)
    assert "leaves the directory" in result.output and str(index) in result.output
    assert outside.read_bytes() == before
    assert sorted(os.listdir(out_dir)) == ["exp_avg_sq.safetensors.index.json"]


@pytest.mark.parametrize("entry", ["../other/exp_avg_sq.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_reading_a_store_whose_index_leaves_its_directory_is_refused(family, tmp_path, entry):
    """A store index may only name shards in its own directory: absolute paths and '..' are refused on reading."""
    from mergekit_ota.curvature.store import CurvatureStore

    index = tmp_path / "exp_avg_sq.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {NAME: entry}}))
    with pytest.raises(CurvatureError, match="leaves the directory"):
        CurvatureStore(str(index))


def test_an_index_entry_that_escapes_through_a_link_is_refused(family, tmp_path):
    """A shard name inside the directory that is a symlink to a file elsewhere is refused too."""
    from mergekit_ota.curvature.store import CurvatureStore

    os.symlink(family.stores[0], tmp_path / "shard.safetensors")
    index = tmp_path / "exp_avg_sq.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {n: "shard.safetensors" for n in load_file(family.stores[0])}}))
    with pytest.raises(CurvatureError, match="through a link"):
        CurvatureStore(str(index))


# -- case 5: a store under a name model loaders read ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["model.safetensors.index.json", "model.safetensors", "pytorch_model.safetensors", "adapter_model.safetensors"],
)
def test_export_refuses_an_out_that_a_model_loader_would_read_as_weights(family, tmp_path, name):
    """`export SRC MODEL_DIR/model.safetensors.index.json` wrote curvature shards and an index beside the weights,
    and mergekit then merged the curvature as that expert's weights (rc 0). Such names are now refused before
    anything is written."""
    model_dir = tmp_path / "expert"
    shutil.copytree(family.experts[0], model_dir)
    before = _snapshot(model_dir)
    result = _export(family.stores[0], model_dir / name, "--force", ok=False)
    assert "model loaders read files named" in result.output and "exp_avg_sq.safetensors" in result.output
    assert _snapshot(model_dir) == before


def test_save_store_refuses_a_weights_file_name(tmp_path):
    """The in-memory writer follows the same rule as export."""
    from mergekit_ota.curvature.writer import save_store

    with pytest.raises(OutputError, match="model loaders read"):
        save_store({"w": torch.rand(2, 2)}, str(tmp_path / "model.safetensors"))
    assert not os.listdir(tmp_path)


# -- case 7: one tensor in two shards -------------------------------------------------------------------------


def _sharded_store(family, tmp_path):
    out = tmp_path / "sharded"
    _export(family.stores[0], out, "--shard-size", "40KB")
    index = out / "exp_avg_sq.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    return out, index, weight_map


def test_a_tensor_held_by_two_shards_is_refused_naming_both(family, tmp_path):
    """The index maps X to shard a while shard b also holds X. Before: check said OK and the merge silently read
    one copy. Now opening the store refuses, naming both files; check reports it."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.graph.preflight import check_config

    out, index, weight_map = _sharded_store(family, tmp_path)
    shard_a = weight_map[NAME]
    shard_b = next(s for s in sorted(set(weight_map.values())) if s != shard_a)
    tensors = load_file(str(out / shard_b))
    tensors[NAME] = load_file(str(out / shard_a))[NAME] * 1000
    save_file(tensors, str(out / shard_b), metadata={"format_version": "1"})
    with pytest.raises(
        CurvatureError, match=rf"'{NAME}' is held by two shards, .*({shard_a}|{shard_b}) and .*({shard_a}|{shard_b})"
    ):
        CurvatureStore(str(index))
    cfg = _config(
        family,
        models=[{"model": family.experts[0], "parameters": {"curvature": str(index)}}, {"model": family.experts[1]}],
    )
    report = check_config(MergeConfiguration.model_validate(cfg), MergeOptions(quiet=True))
    assert not report.ok and any("held by two shards" in p for p in report.problems)


def test_an_index_that_maps_a_tensor_to_the_wrong_shard_is_refused(family, tmp_path):
    """The index says X is in shard a but only shard b holds it: refused, naming both."""
    from mergekit_ota.curvature.store import CurvatureStore

    out, index, weight_map = _sharded_store(family, tmp_path)
    other = next(s for s in sorted(set(weight_map.values())) if s != weight_map[NAME])
    data = json.loads(index.read_text())
    data["weight_map"][NAME] = other
    index.write_text(json.dumps(data))
    with pytest.raises(CurvatureError, match=rf"maps tensor '{NAME}' to .*{other}.* but shard .* holds it"):
        CurvatureStore(str(index))


# -- also: malformed headers and indexes name the file -------------------------------------------------------


def _raw_safetensors(path, header):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data_size = max([info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"] or [0])
    with open(path, "wb") as fp:
        fp.write(struct.pack("<Q", len(raw)) + raw + b"\0" * data_size)


@pytest.mark.parametrize(
    "metadata", [["a", "b"], {"step": 20}, "bias_corrected"], ids=["list", "non-string value", "string"]
)
def test_a_malformed_metadata_header_names_the_file(tmp_path, metadata):
    """`__metadata__` must be an object of strings; anything else was an AttributeError naming no file."""
    from mergekit_ota.curvature.store import CurvatureStore

    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, {"__metadata__": metadata, NAME: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    with pytest.raises(CurvatureError, match=rf"{path}: __metadata__ must be a JSON object of strings"):
        CurvatureStore(str(path))


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {NAME: 3}, None], ids=["list", "number", "null"])
def test_a_malformed_weight_map_names_the_index(tmp_path, weight_map):
    from mergekit_ota.curvature.store import CurvatureStore

    index = tmp_path / "exp_avg_sq.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CurvatureError, match=rf"{index}: "):
        CurvatureStore(str(index))


def test_overlapping_or_duplicate_header_entries_are_refused(tmp_path):
    """Two tensors sharing bytes, or one name given twice in the JSON header, are ambiguous: refused."""
    from mergekit_ota.io.safetensors import read_header

    overlap = tmp_path / "overlap.safetensors"
    _raw_safetensors(
        overlap,
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
    )
    with pytest.raises(CurvatureError, match="overlaps 'a'"):
        read_header(str(overlap))
    twice = tmp_path / "twice.safetensors"
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    twice.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CurvatureError, match="names 'a' twice"):
        read_header(str(twice))


# -- also: an F64 store beyond float32's range is one rule for check, inspect and merge ----------------------


def test_f64_curvature_beyond_float32_range_is_refused_by_check_inspect_and_merge_alike(family, tmp_path):
    """Curvature is computed in float32. An F64 value of 1e300 is Inf there: check and inspect used to approve the
    store that the merge then refused. Now all three report the same Inf, naming file and tensor."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ota.curvature.contents import inspect_store
    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.graph.preflight import check_config

    tensors = {k: v.double() for k, v in load_file(family.stores[0]).items()}
    tensors[NAME][0, 0] = 1e300
    path = tmp_path / "f64.safetensors"
    save_file(tensors, str(path))
    cfg = _config(
        family,
        models=[{"model": family.experts[0], "parameters": {"curvature": str(path)}}, {"model": family.experts[1]}],
    )
    report = check_config(MergeConfiguration.model_validate(cfg), MergeOptions(quiet=True), full_scan=True)
    expected = rf"{path}: tensor '{NAME}' has 0 NaN and 1 Inf values"
    assert any(re.search(expected, p) for p in report.problems), report.problems
    inspected = inspect_store(CurvatureStore(str(path)))
    assert any(re.search(expected, p) for t in inspected.tensors for p in t.problems)
    with pytest.raises(CurvatureError, match=expected):
        _merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- case 10: a full disk during export ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs (root only); skipped where it cannot be mounted."""
    mount = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_export_to_a_full_disk_says_so_in_one_line_and_leaves_nothing(family, tmp_path, small_disk):
    """Exporting a 1 MiB store onto a 256 KiB file system: before, a raw OSError traceback and an OUT.tmp-PID file
    that kept the disk full. Now one line naming OUT, the bytes needed and the bytes free, and nothing left."""
    from mergekit_ota.curvature.writer import save_store

    source = tmp_path / "big.safetensors"
    save_store({"model.embed_tokens.weight": torch.rand(256, 1024)}, str(source))
    out = small_disk / "exp_avg_sq.safetensors"
    result = _export(source, out, ok=False)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(out) in lines[0], result.output
    assert re.search(r"needs 1,04\d,\d{3} bytes \(1\.0 MiB\), 2\d\d,\d{3} bytes \(\d+\.\d KiB\) are free", lines[0]), (
        lines[0]
    )
    assert os.listdir(small_disk) == []


def test_a_disk_that_fills_up_while_exporting_is_cleaned_up(family, tmp_path, small_disk):
    """The disk fills up after the up-front check passed (another writer): ENOSPC mid-write, and on close, gives
    one clear error and removes every temporary file."""
    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.export.options import ExportOptions
    from mergekit_ota.export.pipeline import export_curvature

    source = tmp_path / "medium.safetensors"
    save_store({f"layer.{i}.weight": torch.rand(64, 128) for i in range(4)}, str(source))  # 4 x 32 KiB
    out = small_disk / "store"

    def filling(items, total):
        for number, item in enumerate(items):
            if number == 1:  # someone else fills the disk
                fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
                try:
                    while os.write(fd, b"\0" * 4096):
                        pass
                except OSError:
                    pass
                os.close(fd)
            yield item

    options = ExportOptions.parse(
        source_kind=None,
        model=None,
        compress="none",
        dtype="float32",
        bias_correct=False,
        shard_size=None,
        frozen=(),
        beta2=None,
        step=None,
        force=False,
    )
    with pytest.raises(OutputError, match=r"no space left on device while writing: the output needs [\d,]+ bytes"):
        export_curvature(str(source), str(out), options, filling)
    assert sorted(os.listdir(small_disk)) == ["filler"]


def test_close_raising_still_removes_the_temporary_file(tmp_path, monkeypatch):
    """A full disk often shows only when close() flushes: the temporary file is removed even then."""
    import errno

    from mergekit_ota.io import atomic

    class FullOnClose:
        def __init__(self, fp):
            self.fp = fp

        def write(self, data):
            return self.fp.write(data)

        def close(self):
            self.fp.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    real = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullOnClose(real(fd, mode)))
    with pytest.raises(OutputError, match="no space left"):
        with atomic.StagedFiles(needed=10) as files:
            files.open(str(tmp_path / "a.bin"))
            files.write(b"0123456789")
            files.commit()
    assert os.listdir(tmp_path) == []


def test_a_failed_run_into_new_nested_directories_removes_the_parents_it_made(family, tmp_path):
    """`out` given as a/b/out under a missing a/: a run that fails removes a/b/out, then a/b and a."""
    cfg = _config(family, models=[{"model": family.experts[0], "parameters": {"curvature": str(tmp_path / "none")}}])
    with pytest.raises(PreflightError, match="does not exist"):
        _merge(cfg, tmp_path / "a" / "b" / "out")
    assert sorted(os.listdir(tmp_path)) == []


def test_check_warns_before_merging_about_paths_the_model_card_asks_the_hub_about(family, tmp_path, monkeypatch):
    """The failure above can be seen coming: check names the two-part relative paths and the ways around it."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_ota.graph.preflight import check_config

    shutil.copytree(os.path.dirname(family.base), tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    cfg = _config(
        family, base_model="ck/base", models=[{"model": "./ck/expert_0"}, {"model": str(tmp_path / "ck" / "expert_1")}]
    )
    report = check_config(MergeConfiguration.model_validate(cfg), MergeOptions(quiet=True))
    assert report.ok
    (warning,) = [w for w in report.warnings if "Hugging Face Hub" in w]
    assert (
        warning.startswith("model path(s) ck/base:") and "./ck/base" in warning and "--no-write-model-card" in warning
    )


def test_an_index_in_a_hub_cache_snapshot_may_name_its_repos_blobs_but_nothing_else(tmp_path):
    """huggingface_hub's cache keeps snapshot files as links into the repo's blobs/: an index there may name
    them; a link into another repo's blobs/, or out of the cache, is still refused."""
    from mergekit_ota.errors import CurvatureError
    from mergekit_ota.io.paths import contained

    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "0123").write_bytes(b"x")
    (snapshot / "shard.safetensors").symlink_to(repo / "blobs" / "0123")
    assert contained(str(snapshot), "shard.safetensors", "index") == str(snapshot / "shard.safetensors")
    other = tmp_path / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    (other / "9999").write_bytes(b"y")
    (snapshot / "foreign.safetensors").symlink_to(other / "9999")
    (snapshot / "outside.safetensors").symlink_to(tmp_path / "elsewhere")
    for name in ("foreign.safetensors", "outside.safetensors"):
        with pytest.raises(CurvatureError, match="outside the directory"):
            contained(str(snapshot), name, "index")


def test_a_store_rewritten_between_two_opens_in_one_process_is_read_again(tmp_path):
    """The process's store cache never hands back a store whose files changed: a shard rewritten with other tensors
    (its index and the index's modification time untouched) is read afresh, not through the first open's headers."""
    from mergekit_ota.curvature.store import CurvatureStore

    directory = tmp_path / "store"
    directory.mkdir()
    shard = directory / "exp_avg_sq-00001-of-00001.safetensors"
    save_file({"w": torch.ones(2, 3)}, str(shard), metadata={"format": "pt"})
    index = directory / "exp_avg_sq.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard.name}}))
    first = CurvatureStore.open(str(index))
    assert first.shape("w") == (2, 3)
    stat = index.stat()
    save_file({"w": torch.ones(4, 5)}, str(shard), metadata={"format": "pt"})
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = CurvatureStore.open(str(index))
    assert again is not first and again.shape("w") == (4, 5)
    assert CurvatureStore.open(str(index)) is again  # unchanged files: the cached store
