"""The crash classes an external mutation fuzzer found, each refused at its root: a bad input ends in one of our
errors naming the file (and key), never a traceback, a hang, or a store holding NaN/Inf.

Sources are the fuzz target's own seeds (:mod:`fuzz.seeds`: the project's writers, and the real DeepSpeed
fixtures), each changed the way the fuzzer changed it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

REPO = str(Path(__file__).resolve().parents[1])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fuzz import seeds  # noqa: E402
from fuzz.mutate import load_pickle_tree, save_pickle_tree  # noqa: E402
from mergekit_ota.cli.main import main  # noqa: E402

ZERO = Path(seeds.FIXTURES) / "deepspeed"


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""

    def expired(*_: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _cli(*args: Any) -> Any:
    with deadline(120):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def _refused(result: Any, *named: str) -> str:
    """The command failed with one of our errors (exit 1, ``Error: ...``) whose text holds every string of ``named``."""
    error = result.exception
    assert error is None or isinstance(error, SystemExit), f"{type(error).__name__}: {error}\n{result.output}"
    assert result.exit_code == 1 and "Error:" in result.output and "Traceback" not in result.output, result.output
    for text in named:
        assert text in result.output, (text, result.output)
    return result.output


def _edit(path: Path, change: Callable[[Any], None]) -> None:
    """Load the pickle at ``path`` (DeepSpeed stand-ins included), apply ``change`` to it, save it back."""
    tree = load_pickle_tree(str(path))
    change(tree)
    save_pickle_tree(tree, str(path))


def _named(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    path = tmp_path / "optimizer_state.pt"
    seeds._named_state(str(path))
    _edit(path, change)
    return path


def _zero(tmp_path: Path, name: str = "z2-fp32-w2") -> Path:
    checkpoint = tmp_path / name
    shutil.copytree(ZERO / name / "checkpoint", checkpoint)
    return checkpoint


def _first(checkpoint: Path, pattern: str) -> Path:
    return sorted(checkpoint.glob(f"global_step*/{pattern}"))[0]


def _set_path(keys: tuple, value: Any) -> Callable[[Any], None]:
    def change(tree: Any) -> None:
        node = tree
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


# ----------------------------------------------------------------------------- A: contents of the wrong type


@pytest.mark.parametrize(
    "keys, value, named",
    [
        (("state",), "x", "'state'"),
        (("state", 0), "x", "state[0]"),
        (("param_groups",), "x", "'param_groups'"),
        (("param_groups", 0), None, "param_groups[0]"),
        (("param_groups", 0, "params"), None, "['params']"),
        (("param_groups", 0, "betas"), {}, "'betas'"),
        (("param_groups", 0, "param_names"), 5, "['param_names']"),
        (("state", 0, "exp_avg_sq"), [1.0, 2.0], "['exp_avg_sq']"),
        (("state", 0, "step"), "x", "['step']"),
    ],
    ids=lambda v: str(v)[:24],
)
def test_torch_state_of_the_wrong_type_is_refused_naming_file_and_key(tmp_path, keys, value, named):
    """A string where a state dict belongs, betas={}, params=None, ...: refused naming the file and the key."""
    path = _named(tmp_path, _set_path(keys, value))
    _refused(_cli("export", path, tmp_path / "out.safetensors"), str(path), named)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    "pattern, keys, value, named",
    [
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", ("optimizer_state_dict", "zero_stage"), "x", "'zero_stage'"),
        (
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            ("optimizer_state_dict", "param_slice_mappings", 0),
            None,
            "param_slice_mappings",
        ),
        (
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            ("optimizer_state_dict", "param_alignment_paddings"),
            [["x"]],
            "param_alignment_paddings",
        ),
        ("mp_rank_00_model_states.pt", ("param_shapes", 0, "fc1.weight"), [None, 6], "param_shapes"),
        ("mp_rank_00_model_states.pt", ("buffer_names",), 5, "'buffer_names'"),
    ],
    ids=["zero_stage", "slice_mappings", "paddings", "shape-None", "buffer_names"],
)
def test_deepspeed_contents_of_the_wrong_type_are_refused_naming_file_and_key(tmp_path, pattern, keys, value, named):
    """zero_stage='x', param_slice_mappings[0]=None, a None dimension, ...: refused naming the file and the key."""
    checkpoint = _zero(tmp_path)
    file = _first(checkpoint, pattern)
    _edit(file, _set_path(keys, value))
    if keys == ("buffer_names",):  # read only when neither frozen_param_shapes nor a model names the frozen ones
        _edit(file, lambda tree: tree.pop("frozen_param_shapes", None))
    _refused(_cli("export", checkpoint, tmp_path / "out.safetensors"), file.name, named)


def test_universal_checkpoint_with_a_none_dimension_is_refused_naming_the_file(tmp_path):
    """A None dimension in the param_shapes beside a universal checkpoint's zero/ is refused naming that file."""
    seeds._universal(str(tmp_path / "u"))
    states = tmp_path / "u" / "mp_rank_00_model_states.pt"
    torch.save({"param_shapes": [{"model.a.weight": [4, None], "model.b.bias": [3]}]}, states)
    _refused(_cli("export", tmp_path / "u", tmp_path / "out.safetensors"), str(states), "param_shapes")


def test_dcp_planner_data_or_storage_meta_of_the_wrong_type_is_refused_naming_the_file(tmp_path):
    """DCP metadata whose planner_data maps a key to a number instead of its path, or whose storage_meta is a list,
    is refused naming .metadata."""
    import pickle

    from fuzz.mutate import load_dcp_metadata

    directory = tmp_path / "dcp"
    seeds._dcp(str(directory))
    path = directory / ".metadata"
    original = load_dcp_metadata(str(path))
    path.write_bytes(pickle.dumps(original))
    assert _cli("export", directory, tmp_path / "unchanged.safetensors").exit_code == 0  # re-pickled: accepted
    metadata = load_dcp_metadata(str(path))
    key = next(iter(metadata.planner_data))
    metadata.planner_data[key] = 7
    path.write_bytes(pickle.dumps(metadata))
    _refused(_cli("export", directory, tmp_path / "out.safetensors"), str(path), "planner_data")
    original.storage_meta = []  # found by the fuzz target (seed 3, case 922): AttributeError before
    path.write_bytes(pickle.dumps(original))
    _refused(_cli("export", directory, tmp_path / "out.safetensors"), str(path), "storage_meta")


# ----------------------------------------------------------------------------- B: torch's CheckpointException


def test_dcp_with_a_deleted_data_file_is_refused_not_a_checkpoint_exception(tmp_path):
    """torch's CheckpointException is a BaseException: a deleted .distcp shard still ends in our error, one line."""
    directory = tmp_path / "dcp"
    seeds._dcp(str(directory))
    for shard in directory.glob("*.distcp"):
        shard.unlink()
    output = _refused(_cli("export", directory, tmp_path / "out.safetensors"), str(directory))
    assert "CheckpointException ranks" not in output and not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- C: step and beta2


@pytest.mark.parametrize(
    "keys, value, named",
    [
        (("state", 0, "step"), torch.tensor(float("inf")), "['step']"),
        (("state", 0, "step"), torch.tensor(float("nan")), "['step']"),
        (("state", 0, "step"), -1.0, "['step']"),
        (("param_groups", 0, "betas"), (0.9, float("nan")), "'betas'"),
        (("param_groups", 0, "betas"), (0.9, 1.0), "'betas'"),
        (("param_groups", 0, "betas"), (0.9, 10**400), "'betas'"),
    ],
    ids=["step-inf", "step-nan", "step-negative", "beta2-nan", "beta2-1", "beta2-huge-int"],
)
def test_non_finite_step_or_beta2_outside_0_1_is_refused_naming_the_file(tmp_path, keys, value, named):
    """Bias correction 1 / (1 - beta2**step) needs a finite step >= 0 and 0 <= beta2 < 1: anything else is refused
    naming the file and key, with or without --bias-correct."""
    path = _named(tmp_path, _set_path(keys, value))
    for extra in ([], ["--bias-correct"]):
        _refused(_cli("export", path, tmp_path / "out.safetensors", *extra), str(path), named)


def test_store_with_a_nan_beta2_in_its_metadata_is_refused_as_a_source(tmp_path):
    """A store's metadata beta2 'nan' (re-export with --bias-correct) is refused naming the store."""
    from mergekit_ota.curvature.writer import save_store

    store = tmp_path / "s.safetensors"
    save_store({"w": torch.rand(3, 2)}, str(store), metadata={"beta2": "nan", "step": "3"})
    _refused(_cli("export", store, tmp_path / "out.safetensors", "--bias-correct"), str(store), "beta2")


# ----------------------------------------------------------------------------- D: unusual tensor types


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(4, 3, dtype=torch.complex64),
        lambda: torch.empty(4, 3, device="meta"),
        lambda: torch.ones(4, 3).to_sparse(),
        lambda: torch.ones(4, 3, dtype=torch.int64),
    ],
    ids=["complex", "meta", "sparse", "int64"],
)
def test_complex_meta_sparse_or_integer_second_moments_are_refused(tmp_path, make):
    """exp_avg_sq must be a dense CPU tensor of a real floating dtype; others are refused naming file and key."""
    path = _named(tmp_path, _set_path(("state", 0, "exp_avg_sq"), make()))
    _refused(_cli("export", path, tmp_path / "out.safetensors"), str(path), "['exp_avg_sq']")


def test_inspect_never_reads_a_complex_store_tensor_as_real(tmp_path):
    """A C64 tensor in a store is reported as a dtype problem; its values are not cast (which drops the imaginary
    part) into statistics, and the store reader refuses it."""
    from mergekit_ota.curvature.contents import tensor_report
    from mergekit_ota.curvature.store import CurvatureStore
    from mergekit_ota.errors import CurvatureError

    path = tmp_path / "c.safetensors"
    save_file({"w": torch.full((3, 2), 1 + 5j, dtype=torch.complex64)}, str(path))
    store = CurvatureStore(str(path))
    report = tensor_report(store, store.records["w"])
    assert report.stats.max is None and any("C64" in p for p in report.problems)
    with pytest.raises(CurvatureError, match="C64"):
        store.read_entry(store.records["w"].full)


# ----------------------------------------------------------------------------- E: names read from files


def test_zero_latest_holding_a_nul_is_refused_naming_it(tmp_path):
    """A ZeRO 'latest' naming 'global_step3\\0' is refused naming the file (os.path raised ValueError)."""
    checkpoint = _zero(tmp_path)
    (checkpoint / "latest").write_text("global_step3\x00x")
    _refused(_cli("export", checkpoint, tmp_path / "out.safetensors"), str(checkpoint / "latest"), "NUL")


def test_index_entry_no_file_name_can_hold_is_refused_naming_the_index(tmp_path):
    """An index entry with a lone high surrogate (no file system encoding holds it) is refused naming the index."""
    index = tmp_path / "exp_avg_sq.safetensors.index.json"
    save_file({"w": torch.rand(2)}, str(tmp_path / "a.safetensors"))
    index.write_text(json.dumps({"weight_map": {"w": "a\ud800.safetensors"}}))
    _refused(_cli("inspect", index), str(index), "surrogate")


@pytest.mark.parametrize("where", ["dtype", "key", "metadata"])
def test_header_string_escaping_a_lone_surrogate_is_refused_naming_the_file(tmp_path, where):
    """A header string holding the JSON escape of an unpaired surrogate (no Unicode text; it cannot be printed or
    written back) is refused naming the file by every reader: inspect printed it and crashed with UnicodeEncodeError
    (fuzz seed 6, case 3851), export and check read the same header."""
    store = tmp_path / "exp_avg_sq.safetensors"
    save_file({"w": torch.rand(2)}, str(store), metadata={"format": "pt"})
    data = store.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].decode("utf-8")
    old, new = {"dtype": ('"F32"', '"F\\udc80"'), "key": ('"w"', '"w\\udc80"'), "metadata": ('"pt"', '"p\\udc80"')}[
        where
    ]
    assert old in header
    raw = header.replace(old, new, 1).encode("utf-8")
    store.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    _refused(_cli("inspect", store), str(store), "surrogate")
    _refused(_cli("inspect", store, "--json"), str(store), "surrogate")
    _refused(_cli("export", store, tmp_path / "out.safetensors"), str(store), "surrogate")
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- F: deeply nested JSON


def test_deeply_nested_header_or_index_is_refused_in_every_command(tmp_path):
    """JSON nested 100000 deep as a safetensors header or index is refused naming the file (not RecursionError)."""
    deep = b"[" * 100000 + b"]" * 100000
    header = tmp_path / "deep.safetensors"
    raw = b'{"a":' + deep + b"}"
    header.write_bytes(struct.pack("<Q", len(raw)) + raw)
    index = tmp_path / "deep.safetensors.index.json"
    index.write_bytes(b'{"weight_map":' + deep + b"}")
    for path in (header, index):
        _refused(_cli("inspect", path), str(path), "nested")
        _refused(_cli("export", path, tmp_path / "out.safetensors"), str(path), "nested")
    moderate = tmp_path / "moderate.safetensors"  # parses, but too deep to print or compare
    raw = b'{"__metadata__":' + b"[" * 500 + b"]" * 500 + b"}"
    moderate.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused(_cli("inspect", moderate), str(moderate), "nested")


# ----------------------------------------------------------------------------- H: no non-finite store


@pytest.mark.parametrize(
    "value, extra",
    [
        (torch.full((4, 3), 3.4e38), ["--dtype", "bfloat16"]),
        (torch.full((4, 3), 3e38), ["--compress", "rank1"]),
        (torch.full((4, 3), 1e300, dtype=torch.float64), []),
        (torch.full((4, 3), 1e38), ["--bias-correct"]),
    ],
    ids=["bf16-cast", "rank1-sums", "f64-beyond-f32", "bias-correct-overflow"],
)
def test_export_never_writes_nan_or_inf(tmp_path, value, extra):
    """Finite values that become Inf as stored (bfloat16 cast, rank-1 sums, float64 beyond float32, a bias correction
    1 / (1 - beta2**step) that overflows) are refused naming the tensor; no store is written."""

    def change(tree: dict) -> None:
        tree["state"][0]["exp_avg_sq"] = value
        tree["state"][0]["step"] = torch.tensor(1.0)
        tree["param_groups"][0]["betas"] = (0.9, 0.9999)

    path = _named(tmp_path, change)
    _refused(_cli("export", path, tmp_path / "out.safetensors", *extra), "model.a.weight", "NaN/Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer_state.pt"]


def test_store_writer_refuses_a_non_finite_value_before_committing(tmp_path):
    """StoreWriter.write raises naming the tensor for NaN/Inf (given, or made by the dtype cast); nothing remains."""
    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.errors import CurvatureError

    for value, dtype in ((torch.tensor([1.0, float("nan")]), torch.float32), (torch.tensor([3.4e38]), torch.bfloat16)):
        with pytest.raises(CurvatureError, match="tensor 'w'"):
            save_store({"ok": torch.ones(2), "w": value}, str(tmp_path / "s.safetensors"), dtype=dtype)
        assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- I: hangs


def test_config_with_an_absurd_layer_count_is_refused_at_once(tmp_path):
    """A Trainer checkpoint whose config.json asks for 10**9 layers is refused (building it would never end)."""
    checkpoint = tmp_path / "checkpoint-2"
    seeds._trainer_checkpoint(str(checkpoint))
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    (checkpoint / "config.json").write_text(json.dumps(config))
    with deadline(60):
        _refused(_cli("export", checkpoint, tmp_path / "out.safetensors"), "config.json", "num_hidden_layers")


def test_fifo_as_source_is_refused_not_read(tmp_path):
    """A FIFO given as SOURCE (--source-kind torch, or detected) or named by a store's index is refused as not a
    regular file; reading it would block forever."""
    fifo = tmp_path / "optimizer.pt"
    os.mkfifo(fifo)
    with deadline(60):
        for extra in (["--source-kind", "torch"], []):
            _refused(_cli("export", fifo, tmp_path / "out.safetensors", *extra), str(fifo), "FIFO")
        os.mkfifo(tmp_path / "a.safetensors")
        index = tmp_path / "s.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
        _refused(_cli("inspect", index), "a.safetensors", "FIFO")


# ----------------------------------------------------------------------------- J: a failure after the commit


@pytest.mark.parametrize("field", ["mapping_by_order", "parameters_without_state"])
def test_store_metadata_of_the_wrong_type_is_refused_before_the_new_store_is_written(tmp_path, field):
    """Re-exporting a store whose JSON-list metadata field holds something else is refused naming the store and the
    field, before anything is written (the summary printed after the commit used to crash on it)."""
    from mergekit_ota.curvature.writer import save_store

    store = tmp_path / "s.safetensors"
    save_store({"w": torch.rand(3, 2)}, str(store), metadata={field: "5", "mapping_basis": "param_names"})
    _refused(_cli("export", store, tmp_path / "out.safetensors"), str(store), field)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("kind", ["fifo", "binary", "deep"])
def test_check_refuses_a_merge_config_it_cannot_read(tmp_path, kind):
    """`check` given a FIFO (would block), non-UTF-8 bytes or YAML nested 50000 deep as its config: our error
    naming the file."""
    config = tmp_path / "merge.yml"
    if kind == "fifo":
        os.mkfifo(config)
    else:
        config.write_bytes(b"models: \x80\xff" if kind == "binary" else b"models: " + b"[" * 50000 + b"]" * 50000)
    with deadline(60):
        result = _cli("check", config)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1 and str(config) in result.output and "Traceback" not in result.output, result.output


def test_config_architectures_of_the_wrong_type_do_not_crash_export(tmp_path):
    """config.json 'architectures': [0] (found by the fuzz target, seed 3 case 3746: TypeError in getattr) builds the
    model by its model_type instead; the export ends accepted or refused, never a traceback."""
    checkpoint = tmp_path / "checkpoint-2"
    seeds._trainer_checkpoint(str(checkpoint))
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = [0]
    (checkpoint / "config.json").write_text(json.dumps(config))
    result = _cli("export", checkpoint, tmp_path / "out.safetensors")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


def test_a_name_utf8_cannot_encode_is_refused_before_a_store_is_written(tmp_path):
    """A lone surrogate in a tensor name or metadata value (the fuzz run's 'hangs', cases 2476/4459/6883/8540 of
    seed 3: export wrote a header safetensors could not parse back) is our error, and no file is written."""
    import torch

    from mergekit_ota.curvature.writer import save_store
    from mergekit_ota.errors import CurvatureError

    out = tmp_path / "store.safetensors"
    with pytest.raises(CurvatureError, match="lone surrogate") as error:
        save_store({"model.layers.0\ud800.weight": torch.ones(2, 2)}, str(out))
    assert str(out) in str(error.value)  # names the store it would have written
    assert not out.exists() and list(tmp_path.iterdir()) == []
    save_store({"model.layers.0\u00e9.weight": torch.ones(2, 2)}, str(out))  # valid Unicode beyond ASCII is fine
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert list(f.keys()) == ["model.layers.0\u00e9.weight"]


# ----------------------------------------------------------------------------- found by the 10,000-case run, seed 5


def test_check_refuses_a_model_file_that_is_a_fifo_instead_of_hanging_in_mergekits_loader(tmp_path, monkeypatch):
    """An expert's model.safetensors replaced by a FIFO (seed 5, cases 3215/5943): mergekit's tensor loader would
    block opening it; check names the file instead."""
    seeds._merge_config(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    weights = next(tmp_path.glob("expert*/model.safetensors"))
    weights.unlink()
    os.mkfifo(weights)
    with deadline(60):
        result = _cli("check", "merge.yml")
    assert result.exit_code != 0 and "a FIFO" in result.output and "model.safetensors" in result.output


def test_check_refuses_a_config_that_mergekit_refuses_with_a_runtime_error(tmp_path, monkeypatch):
    """A config with no 'models' (seed 5, case 1322): mergekit's validator raises RuntimeError, now our error."""
    import yaml

    seeds._merge_config(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((tmp_path / "merge.yml").read_text())
    del config["models"]
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    result = _cli("check", "merge.yml")
    assert result.exit_code == 1 and "merge.yml: not a valid mergekit config" in result.output, result.output
    assert "'models'" in result.output and "Traceback" not in result.output


def test_dcp_data_file_that_is_a_fifo_or_metadata_without_its_fields_is_refused(tmp_path):
    """A .distcp shard replaced by a FIFO (seed 5, case 4402) would block the read; metadata missing
    state_dict_metadata (case 5441) was an AttributeError. Both are refused naming the file."""
    from fuzz.mutate import load_dcp_metadata

    directory = tmp_path / "dcp"
    seeds._dcp(str(directory))
    shard = next(directory.glob("*.distcp"))
    data = shard.read_bytes()
    shard.unlink()
    os.mkfifo(shard)
    with deadline(60):
        _refused(_cli("export", directory, tmp_path / "out.safetensors"), str(shard), "FIFO")
    shard.unlink()
    shard.write_bytes(data)
    path = directory / ".metadata"
    metadata = load_dcp_metadata(str(path))
    del metadata.state_dict_metadata
    import pickle

    path.write_bytes(pickle.dumps(metadata))
    _refused(_cli("export", directory, tmp_path / "out.safetensors"), str(path))


def test_dcp_metadata_with_a_key_that_is_no_string_is_refused_naming_the_file(tmp_path):
    """A state_dict_metadata key that is a number (fuzz seed 6, cases 5564 and 8828) was an AttributeError while
    splitting it into its path; it is refused naming .metadata and the key."""
    import pickle

    from fuzz.mutate import load_dcp_metadata

    directory = tmp_path / "dcp"
    seeds._dcp(str(directory))
    path = directory / ".metadata"
    metadata = load_dcp_metadata(str(path))
    first = next(iter(metadata.state_dict_metadata))
    metadata.state_dict_metadata[7] = metadata.state_dict_metadata[first]
    path.write_bytes(pickle.dumps(metadata))
    _refused(_cli("export", directory, tmp_path / "out.safetensors"), str(path), "state_dict_metadata key 7")
    assert not (tmp_path / "out.safetensors").exists()


# ----------------------------------------------------------------------------- J: every JSON a command reads


def test_json_nested_too_deeply_is_refused_or_ignored_wherever_it_is_read(tmp_path):
    """JSON nested 100000 deep (fuzz seed 9: ten RecursionErrors in adapter_config.json) is read by the one strict
    parser everywhere: a PEFT adapter config and a calibration data line are refused naming the file (and line); a
    compare cache entry and an output claim that are not ours are ignored, as any unreadable one is."""
    deep = "[" * 100000 + "]" * 100000
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(Path(seeds.FIXTURES) / "peft" / "lora" / "checkpoint-3", checkpoint)
    (checkpoint / "adapter_config.json").write_text('{"a": ' + deep + "}")
    base = Path(seeds.FIXTURES) / "peft" / "base"
    _refused(_cli("export", checkpoint, tmp_path / "out.safetensors", "--model", base), "adapter_config.json", "nested")

    from mergekit_ota.errors import ConfigError
    from mergekit_ota.fisher.data import read_samples

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "t1 t2"}\n{"text": ' + deep + "}\n")
    with pytest.raises(ConfigError, match=r"data\.jsonl:2: not valid JSON \(.*nested"):
        read_samples(str(data), 10)

    from mergekit_ota.compare.cache import Cache
    from mergekit_ota.io.output import ClaimOwner

    cache = Cache(str(tmp_path / "cache"))
    cache.put("k", {"scores": 1})
    assert cache.get("k") == {"scores": 1, "key": "k"}
    Path(cache.path("k")).write_text(deep)
    assert cache.get("k") is None
    assert ClaimOwner.parse('{"pid": ' + deep + "}") is None


def test_every_json_the_package_reads_goes_through_the_one_strict_parser():
    """No module but io/safetensors.py calls json.load/json.loads: a new reader of JSON cannot skip the limits
    (depth, duplicate keys, unpaired surrogates) that parse_json enforces."""
    import ast

    package = Path(REPO) / "mergekit_ota"
    found = []
    for path in package.rglob("*.py"):
        if path == package / "io" / "safetensors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads"):
                if isinstance(node.value, ast.Name) and node.value.id == "json":
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"use mergekit_ota.io.safetensors.parse_json instead of json.load(s): {found}"


def test_lora_checkpoint_with_a_parameter_state_that_is_empty_is_refused_naming_the_weight(tmp_path):
    """An adapter weight whose optimizer state is empty (fuzz seed 10, case 335: KeyError 'exp_avg_sq') is a weight
    that never stepped: refused naming the optimizer file and the weight, not a KeyError."""
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(Path(seeds.FIXTURES) / "peft" / "lora" / "checkpoint-3", checkpoint)
    optimizer = load_pickle_tree(str(checkpoint / "optimizer.pt"))
    key = next(iter(optimizer["state"]))
    optimizer["state"][key] = {}
    save_pickle_tree(optimizer, str(checkpoint / "optimizer.pt"))
    base = Path(seeds.FIXTURES) / "peft" / "base"
    out = tmp_path / "out.safetensors"
    _refused(_cli("export", checkpoint, out, "--model", base), "optimizer.pt", "no optimizer state for the adapter's")
    assert not out.exists()


def test_zero_checkpoint_whose_optimizer_files_are_no_regular_files_is_refused_naming_them(tmp_path):
    """A ZeRO step directory whose only *_optim_states.pt entry is a directory (fuzz seed 13, case 351: the other
    rank's file deleted) was an IndexError; it is refused naming the entry."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ZERO / "z2-fp32-w2" / "checkpoint", ckpt)
    step = next(p for p in ckpt.iterdir() if p.name.startswith("global_step"))
    files = sorted(step.glob("*_optim_states.pt"))
    files[1].unlink()
    files[0].unlink()
    files[0].mkdir()
    out = tmp_path / "out.safetensors"
    _refused(_cli("export", ckpt, out), files[0].name, "not a regular file")
    assert not out.exists()


def test_an_adam_mini_state_tensor_the_reader_relies_on_that_is_no_tensor_is_refused_naming_it(tmp_path):
    """Adam-mini's 'm' (which gives its q/k and row blocks' shape) replaced by a float (fuzz seed 16, cases 314,
    1564, 1679, 7850: KeyError 'm'): refused naming the file, the state and the key, with nothing written."""
    source = tmp_path / "optimizer.pt"
    optimizer = load_pickle_tree(str(Path(seeds.FIXTURES) / "optimizers" / "adam_mini" / "optimizer.pt"))
    key = next(iter(optimizer["state"]))
    optimizer["state"][key]["m"] = float("nan")
    save_pickle_tree(optimizer, str(source))
    out = tmp_path / "out.safetensors"
    _refused(_cli("export", source, out), "optimizer.pt", f"state[{key!r}]['m']", "expected a tensor")
    assert not out.exists()


def test_adam_mini_block_values_whose_sums_pass_float32_are_refused_naming_the_tensor(tmp_path):
    """Adam-mini row blocks at float32's largest value (fuzz seed 17, case 6539: RuntimeError 'value cannot be
    converted to type float without overflow'): their rank-1 column sums are infinite in float32, and the writer's
    value check refuses them naming the tensor, with nothing written."""
    source = tmp_path / "optimizer.pt"
    optimizer = load_pickle_tree(str(Path(seeds.FIXTURES) / "optimizers" / "adam_mini" / "optimizer.pt"))
    key = next(k for k, entry in optimizer["state"].items() if "neuron_per_gpu" in entry)
    vmean = optimizer["state"][key]["vmean"]
    optimizer["state"][key]["vmean"] = torch.full_like(vmean, torch.finfo(torch.float32).max)
    save_pickle_tree(optimizer, str(source))
    out = tmp_path / "out.safetensors"
    _refused(_cli("export", source, out), "Inf")
    assert not out.exists()


@pytest.mark.parametrize("relative", ["muon_adamw.pt", "adam_mini/optimizer.pt"])
def test_a_parameter_name_that_is_not_unicode_text_is_refused_before_anything_is_written(tmp_path, relative):
    """A param name holding a lone surrogate (fuzz seed 18, case 7986: the Muon seed's param_names[2] became
    '\\udc80', and the partial store's summary died in UnicodeEncodeError after writing): refused where the names
    are read (param_names, or Adam-mini's group 'name'), naming the place, with nothing written."""
    source = tmp_path / "optimizer.pt"
    optimizer = load_pickle_tree(str(Path(seeds.FIXTURES) / "optimizers" / relative))
    group = optimizer["param_groups"][0]
    if "param_names" in group:
        group["param_names"][0] = "\udc80"
        where = "['param_names'][0]"
    else:
        group["name"] = "\udc80"
        where = "param_groups[0]['name']"
    save_pickle_tree(optimizer, str(source))
    out = tmp_path / "out"
    _refused(_cli("export", source, out), where, "not Unicode text")
    assert not out.exists()
