"""Allow-listed unpickling: a DCP ``.metadata`` can name only exact ``(module, qualname)`` pairs.

The checkpoints are real ``torch.distributed.checkpoint.save`` output (single process, ``no_dist=True``).
The attacks are hand-made pickle opcodes (an attack payload cannot be anything else), spliced in front of
the real metadata pickle so that, were the payload's global resolved, the rest of the file would still be
a valid checkpoint: each test checks that the command it carries never runs (its marker file never
appears) and that export stops with an error naming the file and the refused global.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from click.testing import CliRunner

from mergekit_ota.cli.export import export_command
from mergekit_ota.errors import CurvatureError

FILESYSTEM = "torch.distributed.checkpoint.filesystem"
METADATA = "torch.distributed.checkpoint.metadata"


# ----------------------------------------------------------------------------- real checkpoints


def _trained() -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model after two real AdamW steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _save_dcp(directory: Path, state: Dict[str, Any], **writer_options: Any) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    dcp.save(state, storage_writer=FileSystemWriter(str(directory), **writer_options), no_dist=True)
    return directory


@pytest.fixture(scope="module")
def real_dcp(tmp_path_factory) -> Path:
    """Model and optimizer state as FSDP writes them (``get_state_dict``: FQN keys), saved by ``dcp.save``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _trained()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return _save_dcp(tmp_path_factory.mktemp("real") / "dcp", {"model": model_state, "optimizer": optimizer_state})


def _export(source: Path, out: Path) -> Any:
    return CliRunner().invoke(export_command, [str(source), str(out), "--quiet"])


# ----------------------------------------------------------------------------- hand-made payloads


def _text(value: str) -> bytes:
    """SHORT_BINUNICODE / BINUNICODE of ``value``."""
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def _raw(value: bytes) -> bytes:
    """BINBYTES of ``value``."""
    return b"B" + struct.pack("<I", len(value)) + value


def _call(module: str, name: str, *args: bytes, opcode: str = "STACK_GLOBAL") -> bytes:
    """Opcodes that look up ``module``/``name`` and call it with ``args`` (each an opcode fragment)."""
    if opcode == "STACK_GLOBAL":
        head = _text(module) + _text(name) + b"\x93"
    else:  # GLOBAL, as protocols 0-3 write it; still dotted-resolved in a protocol-4 stream
        head = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return head + b"(" + b"".join(args) + b"tR"


def _tamper(real: Path, tmp_path: Path, payload: bytes) -> Path:
    """A copy of ``real`` whose ``.metadata`` runs ``payload`` (result discarded) and then builds the real metadata."""
    copy = tmp_path / "tampered"
    shutil.copytree(real, copy)
    original = (copy / ".metadata").read_bytes()
    assert original[:1] == b"\x80", "a protocol-2+ pickle starts with PROTO"
    (copy / ".metadata").write_bytes(original[:2] + payload + b"0" + original[2:])  # "0" = POP
    return copy


class _RunsCommand:
    """Pickles as ``os.system(command)`` (how torch.save writes such an object: global ``posix.system``)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> Tuple[Callable[[str], int], Tuple[str]]:
        return (os.system, (self.command,))


def _torch_saved_command(command: str) -> bytes:
    buffer = io.BytesIO()
    torch.save(_RunsCommand(command), buffer)
    return buffer.getvalue()


def _refused(result: Any, directory: Path, global_name: str, marker: Path) -> None:
    assert not marker.exists(), f"the payload ran: {marker} was created"
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"not a clean CLI error: {result.exception!r}"
    assert str(directory / ".metadata") in result.output, result.output
    assert f"'{global_name}'" in result.output, result.output


# ----------------------------------------------------------------------------- the attack of issue 10


def test_real_dcp_checkpoint_exports_before_tampering(real_dcp, tmp_path):
    """The untampered checkpoint exports: the refusals below come from the payloads alone."""
    result = _export(real_dcp, tmp_path / "store.safetensors")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "store.safetensors").is_file()


@pytest.mark.parametrize("opcode", ["STACK_GLOBAL", "GLOBAL"])
def test_os_system_named_under_an_allowed_module_never_runs(real_dcp, tmp_path, opcode):
    """Issue 10: a ``.metadata`` naming ``os.system`` under ``torch.distributed.checkpoint.filesystem``
    (which imports ``os``) is refused before the name is looked up; the command never runs and export
    fails naming the file and the global, writing nothing."""
    marker = tmp_path / "pwned"
    payload = _call(FILESYSTEM, "os.system", _text(f"touch '{marker}'"), opcode=opcode)
    directory = _tamper(real_dcp, tmp_path, payload)
    result = _export(directory, tmp_path / "store.safetensors")
    _refused(result, directory, f"{FILESYSTEM}.os.system", marker)
    assert "dot" in result.output
    assert not (tmp_path / "store.safetensors").exists()


def _dotted_cases(marker: Path) -> List[Tuple[str, str, bytes]]:
    """``(module, qualname, args)``: each reaches code that would create ``marker`` through an allowed module."""
    return [
        (FILESYSTEM, "io.open", _text(str(marker)) + _text("w")),
        (METADATA, "torch.builtins.eval", _text(f"open({str(marker)!r}, 'w')")),
        (FILESYSTEM, "torch.storage._load_from_bytes", _raw(_torch_saved_command(f"touch '{marker}'"))),
        (FILESYSTEM, "Path.touch", _call("pathlib", "PosixPath", _text(str(marker)))),
        (METADATA, "torch.load", _text(str(marker))),
    ]


@pytest.mark.parametrize(
    "case", range(5), ids=["io.open", "builtins.eval", "_load_from_bytes", "Path.touch", "torch.load"]
)
def test_dotted_qualnames_are_refused_whatever_they_reach(real_dcp, tmp_path, case):
    """Any qualname with a dot is refused, even under an allow-listed module or class: ``io.open``,
    ``torch.builtins.eval``, ``torch.storage._load_from_bytes`` (a full ``torch.load(weights_only=False)``),
    ``Path.touch`` (a method of an allowed class), ``torch.load``. Nothing they would run is run."""
    marker = tmp_path / "pwned"
    module, name, args = _dotted_cases(marker)[case]
    directory = _tamper(real_dcp, tmp_path, _call(module, name, args))
    _refused(_export(directory, tmp_path / "store.safetensors"), directory, f"{module}.{name}", marker)


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("os", "system"),
        ("torch", "load"),
        ("torch.storage", "_load_from_bytes"),
        (FILESYSTEM, "FileSystemReader"),  # a class of an allowed module, not one the metadata needs
        (FILESYSTEM, "Tensor"),  # torch.Tensor re-exported by an allowed module
        ("torch", "strided"),  # a torch object that is not a dtype
        ("torch", "set_default_dtype"),
    ],
)
def test_globals_outside_the_exact_pairs_are_refused(real_dcp, tmp_path, module, name):
    """A global is accepted only as one of the exact allow-listed pairs: another module, another name in an
    allowed module, or a torch attribute other than a dtype, ``Size`` or the layout helper is refused,
    naming the file and the global; its argument (code creating a marker file) never runs."""
    marker = tmp_path / "pwned"
    directory = _tamper(real_dcp, tmp_path, _call(module, name, _text(f"open({str(marker)!r}, 'w')")))
    _refused(_export(directory, tmp_path / "store.safetensors"), directory, f"{module}.{name}", marker)


def test_build_on_an_allowed_class_itself_is_refused(real_dcp, tmp_path):
    """``BUILD`` with slot state on an allow-listed *class* (not an instance) would ``setattr`` on the class
    for the whole process; it is refused, naming the file and the class, and the class is left unchanged."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    attribute = "mergekit_ota_test_poisoned"
    state = b"N}" + _text(attribute) + b"\x88s\x86"  # (None, {attribute: True}): slot state
    payload = _text(METADATA) + _text("StorageMeta") + b"\x93" + state + b"b"  # STACK_GLOBAL, BUILD
    directory = _tamper(real_dcp, tmp_path, payload)
    try:
        result = _export(directory, tmp_path / "store.safetensors")
        assert not hasattr(StorageMeta, attribute), "the class was modified"
    finally:
        if hasattr(StorageMeta, attribute):
            delattr(StorageMeta, attribute)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert str(directory / ".metadata") in result.output and f"'{METADATA}.StorageMeta'" in result.output
    assert "BUILD" in result.output


# ----------------------------------------------------------------------------- the allow-list fits real output


class _Recorder(pickle.Unpickler):
    """A plain unpickler that records every global it is asked for (only used on files this test wrote)."""

    def __init__(self, file: Any):
        super().__init__(file)
        self.names: List[Tuple[str, str]] = []

    def find_class(self, module: str, name: str) -> Any:
        self.names.append((module, name))
        return super().find_class(module, name)


def _real_checkpoints(root: Path) -> List[Path]:
    """DCP directories as real tools write them: FSDP-style ``get_state_dict`` of a model and an AdamW built
    with and without names, plain ``state_dict()``s, bytes items of every plain kind, every common dtype,
    channels-last and 0-d tensors, several writer options, a ``pathlib.Path`` checkpoint id."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _trained()
    named = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    named.step()
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ]
    states = {
        "fsdp": dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))),
        "fsdp_named": dict(zip(("model", "optimizer"), get_state_dict(model, named))),
        "plain": {"model": model.state_dict(), "optimizer": named.state_dict()},
        "bytes": {"f": 1.5, "t": (0.9, 0.99), "s": "x", "l": [1, 2], "n": None, "d": {"k": 1}, "i": 7, "b": b"\x00"},
        "dtypes": {f"t{i}": torch.ones(3, 2, dtype=dtype) for i, dtype in enumerate(dtypes)},
        "odd": {
            "cl": torch.ones(1, 2, 3, 3).to(memory_format=torch.channels_last),
            "s": torch.tensor(2.0),
            "e": torch.empty(0),
        },
    }
    directories = []
    for name, state in states.items():
        for i, options in enumerate(({}, {"single_file_per_rank": False}, {"thread_count": 2})):
            directories.append(_save_dcp(root / f"{name}_{i}", state, **options))
        dcp.save(state, checkpoint_id=root / f"{name}_path", no_dist=True)
        directories.append(root / f"{name}_path")
    return directories


def test_real_dcp_metadata_is_rebuilt_exactly_under_the_allow_list(tmp_path):
    """Every global that real DCP ``.metadata`` files name is one of the exact pairs, and the restricted
    loader rebuilds metadata equal to what plain ``pickle.load`` builds from the same file."""
    from mergekit_ota.io.unpickle import DCP_METADATA_GLOBALS, DCP_METADATA_SUBSTITUTES, restricted_load

    seen = set()
    for directory in _real_checkpoints(tmp_path):
        path = directory / ".metadata"
        with open(path, "rb") as fp:
            recorder = _Recorder(fp)
            expected = recorder.load()
        seen.update(recorder.names)
        with open(path, "rb") as fp:
            assert (
                restricted_load(fp, DCP_METADATA_GLOBALS, str(path), "DCP metadata", DCP_METADATA_SUBSTITUTES)
                == expected
            ), directory
    assert seen <= set(DCP_METADATA_GLOBALS), sorted(seen - set(DCP_METADATA_GLOBALS))


def test_an_allow_listed_pair_must_still_resolve_to_a_class_dtype_or_that_exact_function(tmp_path):
    """Even a pair in the allow-list is refused unless it names a class, a ``torch.dtype`` or a plain function
    defined under exactly that module and name: a builtin such as ``os.system`` (``posix.system``) is not."""
    from mergekit_ota.io.unpickle import restricted_load

    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(os.system, protocol=4))
    with open(path, "rb") as fp, pytest.raises(CurvatureError) as error:
        restricted_load(fp, frozenset({(os.system.__module__, "system")}), str(path), "test pickle")
    assert str(path) in str(error.value) and f"'{os.system.__module__}.system'" in str(error.value)


# ----------------------------------------------------------------------------- no other unpickler


_PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}


def _package_sources() -> List[Path]:
    import mergekit_ota

    return sorted(Path(mergekit_ota.__file__).parent.rglob("*.py"))


def test_the_package_unpickles_only_through_allow_lists():
    """Across ``mergekit_ota``: no ``pickle`` loader or ``Unpickler`` subclass outside ``io/unpickle.py``,
    every ``torch.load`` passes ``weights_only=True``, ``add_safe_globals`` is never called, and
    ``safe_globals`` (widening torch's allow-list for one load) appears only in ``io/unpickle.py``."""
    problems = []
    for path in _package_sources():
        tree = ast.parse(path.read_text(), str(path))
        own = path.parts[-2:] == ("io", "unpickle.py")
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and (
                node.attr == "add_safe_globals" or (node.attr == "safe_globals" and not own)
            ):
                problems.append(f"{where}: {node.attr}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("load", "loads", "Unpickler", "_Unpickler")
                and not own
            ):
                base = node.value
                if isinstance(base, ast.Name) and base.id in _PICKLERS:
                    problems.append(f"{where}: {base.id}.{node.attr}")
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not own:
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                imported = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom) and modules[0] in _PICKLERS and set(imported) - {"UnpicklingError"}:
                    problems.append(f"{where}: from {modules[0]} import {imported}")
                if isinstance(node, ast.Import) and any(m in _PICKLERS - {"pickle"} for m in modules):
                    problems.append(f"{where}: import {modules}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                base = node.func.value
                if isinstance(base, ast.Name) and base.id == "torch":
                    flags = {k.arg: k.value for k in node.keywords}
                    value = flags.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
    assert not problems, problems


# ----------------------------------------------------------------------------- data files stay inside the checkpoint


def test_metadata_pointing_at_data_outside_the_checkpoint_is_refused(real_dcp, tmp_path):
    """A ``.metadata`` whose entries name data files outside its directory (here ``../outside/__0_0.distcp``,
    a real DCP data file) is refused, naming the file and the path, instead of reading that file."""
    shutil.copytree(real_dcp, tmp_path / "outside")
    directory = tmp_path / "tampered"
    shutil.copytree(real_dcp, directory)
    with open(directory / ".metadata", "rb") as fp:
        metadata = pickle.load(fp)  # a file this test wrote with dcp.save
    for info in metadata.storage_data.values():
        info.relative_path = f"../outside/{info.relative_path}"
    with open(directory / ".metadata", "wb") as fp:
        pickle.dump(metadata, fp)
    result = _export(directory, tmp_path / "store.safetensors")
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert str(directory / ".metadata") in result.output and "../outside/" in result.output, result.output
    assert not (tmp_path / "store.safetensors").exists()


def pickle_globals(path: Path) -> List[str]:
    """Every global a torch zip file's pickle names (GLOBAL / STACK_GLOBAL), as 'module.name'."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    found = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            found.add(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(f"{ops[i - 2][1]}.{ops[i - 1][1]}")
    return sorted(found)


def test_deepspeed_checkpoints_name_only_torchs_globals_and_the_stand_ins():
    """Every global that the real DeepSpeed fixtures' pickles name (every stage, precision, world size, the
    Trainer's ZeRO-3 checkpoints and ds_to_universal's optimizer_state.pt) is either in torch's own
    weights_only allow-list or one of DEEPSPEED_STAND_INS; and each stand-in but DynamicLossScaler (fp16
    dynamic scaling, which the fixtures' static-free runs may not reach) is such a name."""
    from torch._weights_only_unpickler import _get_allowed_globals

    from mergekit_ota.io.unpickle import DEEPSPEED_STAND_INS

    fixtures = Path(__file__).parent / "fixtures" / "deepspeed"
    files = sorted(fixtures.glob("*/checkpoint/global_step*/*.pt")) + sorted(
        fixtures.glob("trainer/*/checkpoint-*/global_step*/*.pt")
    )
    files += sorted(fixtures.glob("trainer/*/universal/zero/optimizer_state.pt"))
    assert len(files) > 50
    torch_own = set(_get_allowed_globals())
    stand_ins = {name for _, name in DEEPSPEED_STAND_INS}
    named = set()
    for file in files:
        named |= set(pickle_globals(file))
    storages = {n for n in named if n.startswith("torch.") and n.endswith("Storage")}  # persistent-id types
    assert named - torch_own - stand_ins - storages == set()
    assert stand_ins - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"} <= named
