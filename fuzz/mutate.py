"""The mutation engine: structural mutations of the trees files hold, and byte-level ones.

A case picks one file of its seed and one mutation (sometimes two).  By file type:

* torch zip pickles (``*.pt``, ``*.bin``): loaded (DeepSpeed stand-ins included), one node of the
  tree mutated, saved again with ``torch.save`` (stand-ins under DeepSpeed's own names);
* safetensors files: the JSON header mutated as a tree and written back before the same data, or
  bytes of the data flipped (NaN/Inf patterns included);
* ``*.json`` (indexes, configs, ``trainer_state.json``): the JSON tree; DCP ``.metadata``: the
  ``Metadata`` object's tree (entries, sizes, dtypes, ``planner_data``, ``storage_data``), pickled again;
  ``*.yml``: the merge config's tree; ``latest``: its text (NUL, surrogates, ``..``, absolute paths).

Tree mutations (:data:`VALUE_MUTATIONS`, :data:`TENSOR_MUTATIONS`): type swaps, ``None``, NaN/Inf,
huge numbers, deep nesting, strings a path cannot hold, deleted and added keys; on tensors: NaN/Inf,
values near float32's maximum, float64 beyond float32's range, complex/integer/bool dtypes, ``meta``
and sparse tensors, wrong shapes, 0-d and empty tensors.  Any file: truncation, byte flips, deletion,
replacement by a FIFO, a directory, or a link leaving the case; and a code-execution canary (a
pickle or YAML payload that would create ``canary`` files if it were ever unpickled or loaded unsafely).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import struct
import sys
import types
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

CANARY = "CANARY_EXECUTED"


class Canary:
    """Unpickled, this calls ``open(path, "w")``: the file appearing means code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> Tuple[Any, Tuple[str, str]]:
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------- tree mutations


def _deep(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


VALUE_MUTATIONS: List[Tuple[str, Callable[[Any, random.Random], Any]]] = [
    ("none", lambda v, r: None),
    ("str", lambda v, r: "x"),
    ("empty-str", lambda v, r: ""),
    ("int", lambda v, r: r.choice([0, 1, -1, 7])),
    ("bool", lambda v, r: True),
    ("float", lambda v, r: 0.5),
    ("nan", lambda v, r: math.nan),
    ("inf", lambda v, r: r.choice([math.inf, -math.inf])),
    ("huge", lambda v, r: r.choice([10**30, 2**63, -(2**63), 1e308, 10**400])),
    ("list", lambda v, r: [v, v] if r.random() < 0.5 else []),
    ("dict", lambda v, r: {"x": v} if r.random() < 0.5 else {}),
    ("deep", lambda v, r: _deep(v, r.choice([50, 900]))),
    ("nul-str", lambda v, r: "a\x00b"),
    ("surrogate", lambda v, r: "s\udc80.safetensors"),
    ("dotdot", lambda v, r: r.choice(["../outside", "/etc/hostname", "C:\\x"])),
    ("bytes", lambda v, r: b"\x00\xff"),
    ("tuple", lambda v, r: (v,)),
]


def _tensor_mutations() -> List[Tuple[str, Callable[[torch.Tensor, random.Random], Any]]]:
    def fill(value: float) -> Callable[[torch.Tensor, random.Random], torch.Tensor]:
        def apply(t: torch.Tensor, r: random.Random) -> torch.Tensor:
            out = t.detach().clone().to(torch.float32 if not t.is_floating_point() else t.dtype)
            if out.numel():
                out.view(-1)[r.randrange(out.numel())] = value
            return out

        return apply

    return [
        ("t-nan", fill(math.nan)),
        ("t-inf", fill(math.inf)),
        ("t-negative", fill(-1.0)),
        ("t-f32max", lambda t, r: torch.full(t.shape, 3.39e38)),
        ("t-f64big", lambda t, r: torch.full(t.shape, 1e300, dtype=torch.float64)),
        ("t-complex", lambda t, r: t.detach().to(torch.complex64) if t.is_floating_point() else t.to(torch.float32)),
        ("t-int", lambda t, r: t.detach().to(torch.int64)),
        ("t-bool", lambda t, r: t.detach() > 0),
        ("t-half", lambda t, r: t.detach().to(r.choice([torch.float16, torch.bfloat16, torch.float64]))),
        ("t-uint8", lambda t, r: t.detach().to(torch.uint8)),
        ("t-meta", lambda t, r: torch.empty(t.shape, device="meta", dtype=t.dtype)),
        ("t-sparse", lambda t, r: t.detach().to(torch.float32).to_sparse()),
        ("t-shape", lambda t, r: t.detach().reshape(-1)[: max(0, t.numel() - 1)].clone()),
        ("t-grow", lambda t, r: torch.cat([t.detach().reshape(-1), t.detach().reshape(-1)])),
        ("t-0d", lambda t, r: torch.tensor(2.0)),
        ("t-empty", lambda t, r: torch.empty(0)),
        ("t-2d", lambda t, r: t.detach().reshape(1, -1).clone()),
    ]


TENSOR_MUTATIONS = _tensor_mutations()


def _children(node: Any) -> List[Tuple[Any, Any]]:
    """``(container, key)`` slots directly under ``node``: dict items, list items, object attributes."""
    if isinstance(node, dict):
        return [(node, k) for k in list(node)]
    if isinstance(node, list):
        return [(node, i) for i in range(len(node))]
    if hasattr(node, "__dict__") and not isinstance(node, (type, types.ModuleType, torch.Tensor)):
        return [(node, ("attr", k)) for k in list(vars(node))]
    return []


def _thaw(node: Any) -> Any:
    """Tuples as lists and frozen dataclasses made writable, so every slot can be mutated."""
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        return [_thaw(v) for v in node]
    if isinstance(node, dict):
        for k in list(node):
            node[k] = _thaw(node[k])
    elif isinstance(node, list):
        for i, v in enumerate(node):
            node[i] = _thaw(v)
    return node


def slots(tree: Any, limit: int = 20000) -> List[Tuple[Any, Any]]:
    """Every mutable slot of ``tree`` (breadth first, at most ``limit``)."""
    found: List[Tuple[Any, Any]] = []
    queue = [tree]
    seen = set()
    while queue and len(found) < limit:
        node = queue.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        for slot in _children(node):
            found.append(slot)
            queue.append(_get(slot))
    return found


def _get(slot: Tuple[Any, Any]) -> Any:
    container, key = slot
    if isinstance(key, tuple) and key and key[0] == "attr":
        return getattr(container, key[1])
    return container[key]


def _set(slot: Tuple[Any, Any], value: Any) -> None:
    container, key = slot
    if isinstance(key, tuple) and key and key[0] == "attr":
        object.__setattr__(container, key[1], value)
    else:
        container[key] = value


def mutate_tree(tree: Any, rng: random.Random, canary: Optional[str] = None) -> Tuple[Any, str]:
    """Apply one structural mutation to a random slot of ``tree`` (in place where possible); return the
    tree and a description."""
    tree = _thaw(tree)
    found = slots(tree)
    if not found:
        return rng.choice(VALUE_MUTATIONS)[1](tree, rng), "root replaced"
    tensors = [s for s in found if isinstance(_get(s), torch.Tensor)]
    slot = rng.choice(tensors) if tensors and rng.random() < 0.4 else rng.choice(found)
    value = _get(slot)
    where = _describe(slot)
    container, key = slot
    roll = rng.random()
    if canary is not None and roll < 0.03:
        _set(slot, Canary(canary))
        return tree, f"{where}: canary payload"
    if isinstance(container, dict) and roll < 0.12:
        if rng.random() < 0.5:
            del container[key]
            return tree, f"{where}: deleted"
        container[rng.choice(["extra", 99, "__metadata__", "zero_stage"])] = rng.choice([None, "x", 1])
        return tree, f"{where}: key added beside it"
    if isinstance(value, torch.Tensor) and rng.random() < 0.8:
        name, apply = rng.choice(TENSOR_MUTATIONS)
        _set(slot, apply(value, rng))
        return tree, f"{where}: {name}"
    name, apply = rng.choice(VALUE_MUTATIONS)
    _set(slot, apply(value, rng))
    return tree, f"{where}: {name}"


def _describe(slot: Tuple[Any, Any]) -> str:
    container, key = slot
    key = key[1] if isinstance(key, tuple) and key and key[0] == "attr" else key
    return f"{type(container).__name__}[{str(key)[:60]!r}]"


# ----------------------------------------------------------------------------- byte mutations


def mutate_bytes(data: bytes, rng: random.Random, start: int = 0) -> Tuple[bytes, str]:
    """Truncate, flip bytes, zero or fill a run (NaN/Inf patterns) of ``data`` at or after ``start``."""
    if not data:
        return b"\x00", "empty file given a byte"
    start = min(start, len(data) - 1)
    roll = rng.random()
    if roll < 0.25:
        cut = rng.randrange(0, len(data))
        return data[:cut], f"truncated to {cut} of {len(data)} bytes"
    buf = bytearray(data)
    if roll < 0.6:
        count = rng.choice([1, 2, 8])
        for _ in range(count):
            i = rng.randrange(start, len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        return bytes(buf), f"{count} bit flip(s) from byte {start}"
    at = rng.randrange(start, len(buf))
    pattern = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f", b"\xff" * 4, b"\x00" * 4])
    run = pattern * rng.choice([1, 4, 64])
    buf[at : at + len(run)] = run[: len(buf) - at]
    return bytes(buf), f"bytes at {at} set to {pattern.hex()} x{len(run) // 4}"


# ----------------------------------------------------------------------------- file formats


@contextlib.contextmanager
def deepspeed_names() -> Iterator[None]:
    """While saving, pickle the DeepSpeed stand-ins under DeepSpeed's own names (as real checkpoints do)."""
    from mergekit_ota.io.unpickle import DEEPSPEED_STAND_INS

    added, renamed = [], []
    try:
        for cls, full in DEEPSPEED_STAND_INS:
            module, _, name = full.rpartition(".")
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                mod_name = ".".join(parts[:i])
                if mod_name not in sys.modules:
                    sys.modules[mod_name] = types.ModuleType(mod_name)
                    added.append(mod_name)
            setattr(sys.modules[module], name, cls)
            renamed.append((cls, cls.__module__, cls.__qualname__))
        for cls, full in DEEPSPEED_STAND_INS[:3]:
            module, _, name = full.rpartition(".")
            cls.__module__, cls.__qualname__ = module, name
        yield
    finally:
        for cls, module, qualname in renamed:
            cls.__module__, cls.__qualname__ = module, qualname
        for mod_name in reversed(added):
            sys.modules.pop(mod_name, None)


def load_pickle_tree(path: str) -> Any:
    from mergekit_ota.io.unpickle import deepspeed_globals

    with deepspeed_globals():
        return torch.load(path, map_location="cpu", weights_only=True)


def save_pickle_tree(tree: Any, path: str) -> None:
    with deepspeed_names():
        torch.save(tree, path)


def mutate_torch_file(path: str, rng: random.Random, canary: str) -> str:
    tree = load_pickle_tree(path)
    tree, what = mutate_tree(tree, rng, canary)
    try:
        save_pickle_tree(tree, path)
    except (RecursionError, pickle.PicklingError, TypeError, RuntimeError, ValueError) as error:
        return f"(unsavable mutation {what}: {type(error).__name__}); file unchanged"
    return what


def _split_safetensors(data: bytes) -> Tuple[Any, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def mutate_safetensors(path: str, rng: random.Random) -> str:
    with open(path, "rb") as fp:
        data = fp.read()
    if rng.random() < 0.4:
        (n,) = struct.unpack("<Q", data[:8])
        new, what = mutate_bytes(data, rng, start=8 + n if rng.random() < 0.6 else 0)
    else:
        header, rest = _split_safetensors(data)
        if rng.random() < 0.08:
            raw = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
            what = "header: 100000-deep nesting"
        else:
            header, what = mutate_tree(header, rng)
            raw = _json_bytes(header)
            what = f"header {what}"
        new = struct.pack("<Q", len(raw)) + raw + rest
    with open(path, "wb") as fp:
        fp.write(new)
    return what


def _json_bytes(tree: Any) -> bytes:
    try:
        text = json.dumps(tree, default=lambda o: repr(o))
    except (RecursionError, ValueError, OverflowError):
        text = json.dumps({"unserialisable": True})
    return text.encode("utf-8", "surrogatepass")


def mutate_json(path: str, rng: random.Random) -> str:
    with open(path, "rb") as fp:
        data = fp.read()
    if rng.random() < 0.3:
        new, what = mutate_bytes(data, rng)
    elif rng.random() < 0.1:
        new, what = b'{"weight_map":' + b"[" * 100000 + b"]" * 100000 + b"}", "100000-deep nesting"
    else:
        tree, what = mutate_tree(json.loads(data), rng)
        new = _json_bytes(tree)
    with open(path, "wb") as fp:
        fp.write(new)
    return what


def load_dcp_metadata(path: str) -> Any:
    """A DCP ``.metadata`` read as export reads it (the allow-list), paths as strings so it pickles again."""
    from pathlib import PurePath

    from mergekit_ota.io.unpickle import DCP_METADATA_GLOBALS, DCP_METADATA_SUBSTITUTES, restricted_load

    with open(path, "rb") as fp:
        metadata = restricted_load(fp, DCP_METADATA_GLOBALS, path, "DCP metadata", DCP_METADATA_SUBSTITUTES)
    storage = getattr(metadata, "storage_meta", None)
    if isinstance(getattr(storage, "checkpoint_id", None), PurePath):
        storage.checkpoint_id = str(storage.checkpoint_id)
    return metadata


def mutate_bytes_in_place(path: str, rng: random.Random) -> str:
    """:func:`mutate_bytes` applied to file ``path``, rewritten in place; returns what was done."""
    with open(path, "rb") as fp:
        new, what = mutate_bytes(fp.read(), rng)
    with open(path, "wb") as fp:
        fp.write(new)
    return what


def mutate_dcp_metadata(path: str, rng: random.Random, canary: str) -> str:
    if rng.random() < 0.25:
        return mutate_bytes_in_place(path, rng)
    metadata, what = mutate_tree(load_dcp_metadata(path), rng, canary)
    try:
        payload = pickle.dumps(metadata)
    except (RecursionError, pickle.PicklingError, TypeError, AttributeError) as error:
        return f"(unsavable mutation {what}: {type(error).__name__}); file unchanged"
    with open(path, "wb") as fp:
        fp.write(payload)
    return what


def mutate_yaml(path: str, rng: random.Random, canary: str) -> str:
    import yaml

    with open(path, "rb") as fp:
        data = fp.read()
    roll = rng.random()
    if roll < 0.05:
        new = data + f"\nextra: !!python/object/apply:builtins.open [{canary!r}, w]\n".encode()
        what = "YAML python/object/apply canary"
    elif roll < 0.25:
        new, what = mutate_bytes(data, rng)
    elif roll < 0.3:
        new, what = b"models: " + b"[" * 50000 + b"]" * 50000, "50000-deep YAML nesting"
    else:
        try:
            parsed = yaml.safe_load(data)
        except yaml.YAMLError as error:  # an earlier mutation left bytes that are not YAML (or not UTF-8)
            return f"(seed file not parseable after an earlier mutation: {type(error).__name__})"
        tree, what = mutate_tree(parsed, rng)
        try:
            new = yaml.safe_dump(tree, allow_unicode=False).encode()
        except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
            new = json.dumps({"merge_method": "ota", "models": "x"}).encode()
    with open(path, "wb") as fp:
        fp.write(new)
    return what


def mutate_text(path: str, rng: random.Random) -> str:
    text = rng.choice(["global_step3\x00", "\udc80", "../..", "/etc", "", "global_step3/../../x", "a" * 5000])
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as fp:
        fp.write(text)
    return f"text set to {text[:20]!r}"


def mutate_file_itself(path: str, rng: random.Random) -> str:
    """Delete it, or put a FIFO, an empty directory, an empty file or a link leaving the case in its place."""
    roll = rng.random()
    os.remove(path)
    if roll < 0.35:
        return "deleted"
    if roll < 0.55 and hasattr(os, "mkfifo"):
        os.mkfifo(path)
        return "replaced by a FIFO"
    if roll < 0.7:
        os.mkdir(path)
        return "replaced by a directory"
    if roll < 0.85:
        open(path, "wb").close()
        return "emptied"
    os.symlink("/etc/hostname", path)
    return "replaced by a link to /etc/hostname"


def mutate_file(path: str, rng: random.Random, canary: str) -> str:
    """One mutation of file ``path``, chosen by its type; returns what was done."""
    name = os.path.basename(path)
    if rng.random() < 0.06:
        return mutate_file_itself(path, rng)
    try:
        if name.endswith((".pt", ".bin", ".pth")):
            if rng.random() < 0.2:
                return mutate_bytes_in_place(path, rng)
            return mutate_torch_file(path, rng, canary)
        if name.endswith(".safetensors"):
            return mutate_safetensors(path, rng)
        if name.endswith(".json"):
            return mutate_json(path, rng)
        if name == ".metadata":
            return mutate_dcp_metadata(path, rng, canary)
        if name.endswith((".yml", ".yaml")):
            return mutate_yaml(path, rng, canary)
        if name == "latest":
            return mutate_text(path, rng)
    except (
        ValueError,
        KeyError,
        EOFError,
        OSError,
        RuntimeError,
        TypeError,
        pickle.UnpicklingError,
        struct.error,
        IndexError,  # torch's weights-only unpickler on a pickle an earlier mutation broke (fuzz seed 17)
        AttributeError,  # the same, in its persistent_load (fuzz seed 18)
    ) as error:
        return f"(seed file not parseable after an earlier mutation: {type(error).__name__})"
    with open(path, "rb") as fp:
        new, what = mutate_bytes(fp.read(), rng)
    with open(path, "wb") as fp:
        fp.write(new)
    return what


def pick_file(root: str, rng: random.Random) -> Optional[str]:
    """A file under ``root``, favouring those the commands parse (pickles, headers, indexes, metadata, configs)."""
    files = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                interesting = name.endswith((".pt", ".bin", ".safetensors", ".json", ".yml")) or name in (
                    ".metadata",
                    "latest",
                )
                files += [path] * (4 if interesting else 1)
    return rng.choice(sorted(files)) if files else None
