"""Reading safetensors headers and indexes, strictly, with errors that name the file.

This is the one parser of safetensors headers and ``.safetensors.index.json`` files in
the package (stores, model weights, the writer's clean-up all use it). It reads only
the header (never tensor data) and refuses, naming file and tensor:

* a file shorter than its announced header, a header that is not a JSON object, a
  JSON object with a duplicate key;
* ``__metadata__`` that is not an object of strings (safetensors' own rule);
* an entry without ``dtype`` / ``shape`` / ``data_offsets``; byte ranges that do not match ``numel * itemsize``,
overlap, leave
  gaps, or run past the end of the file (the layout safetensors itself requires);
* an index whose ``weight_map`` is not an object of strings, names a shard outside
  its directory (:func:`mergekit_ota.io.paths.contained`) or a missing shard, maps a
  tensor to a shard that lacks it, or whose shards hold a tensor twice or hold one
  the index does not list (which copy would a reader take?).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.io.paths import contained, regular_file

INDEX_SUFFIX = ".index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

#: bytes per element of every safetensors dtype
DTYPE_SIZES: Dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "C64": 8,
}  # sub-byte dtypes such as F4 are accepted without a size check
#: the floating-point dtypes curvature may be stored in
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as described by a safetensors header."""

    file: str
    key: str
    dtype: str
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file (0 for a dtype without a whole-byte size)."""
        return self.numel * DTYPE_SIZES.get(self.dtype, 0)


class JsonError(CurvatureError):
    """JSON :func:`parse_json` refuses; ``reason`` says why, without the file (for a caller's own message)."""

    def __init__(self, path: str, what: str, reason: str):
        super().__init__(f"{path}: corrupted {what} ({reason})")
        self.reason = reason


def _no_duplicate_keys(path: str, what: str):  # type: ignore[no-untyped-def]
    def hook(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        result: Dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise JsonError(path, what, f"it names '{key}' twice; which one is meant is ambiguous")
            result[key] = value
        return result

    return hook


MAX_JSON_DEPTH = 32  # a header or an index is three levels deep


def parse_json(raw: bytes, path: str, what: str) -> Any:
    """JSON text ``raw`` of ``path`` (a ``what``: "safetensors header", "safetensors index", ...), strictly.

    Refused naming the file, with a :class:`JsonError`: text that is not UTF-8 JSON, a key given twice in one
    object, nesting deeper than :data:`MAX_JSON_DEPTH` (Python's parser, ``repr`` and ``==`` recurse per level:
    RecursionError), a string escaping an unpaired UTF-16 surrogate (``"\\udc80"``: not Unicode text, so it
    could be neither printed nor written back; safetensors' own parser refuses it too).
    """
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(path, what))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JsonError(path, what, f"not JSON: {error}") from error
    except RecursionError as error:
        raise JsonError(path, what, "JSON nested too deeply to parse") from error
    stack = [(value, 1)]
    while stack:  # what parsed may still be too deep to print or compare (repr and == recurse as well)
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise JsonError(path, what, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        strings = [*item.keys(), *children] if isinstance(item, dict) else children
        for text in strings:
            if isinstance(text, str) and not is_unicode(text):
                raise JsonError(
                    path, what, f"the string {text[:80]!r} holds an unpaired UTF-16 surrogate escape, not Unicode text"
                )
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    if isinstance(value, str) and not is_unicode(value):
        raise JsonError(path, what, "a string holding an unpaired UTF-16 surrogate escape")
    return value


def is_unicode(text: str) -> bool:
    """Whether ``text`` is Unicode text: UTF-8 can encode it (no unpaired surrogate that a JSON escape made)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata(raw: Any, path: str) -> Dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise CurvatureError(
            f"{path}: __metadata__ must be a JSON object of strings (safetensors' format); got {type(raw).__name__} "
            f"{json.dumps(raw)[:120]}"
        )
    return dict(raw)


def _entry(path: str, key: str, info: Any) -> Tuple[HeaderEntry, int, int]:
    try:
        dtype = info["dtype"]
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
    except (KeyError, TypeError, ValueError) as error:
        raise CurvatureError(
            f"{path}: corrupted header entry for tensor '{key}' (needs dtype, shape and two data_offsets)"
        ) from error
    if not isinstance(dtype, str) or not dtype:
        raise CurvatureError(f"{path}: tensor '{key}' has a malformed dtype {dtype!r}")
    if not all(type(d) is int and d >= 0 for d in shape) or not all(type(x) is int for x in (start, end)):
        raise CurvatureError(f"{path}: tensor '{key}' has a malformed shape {list(shape)} or data_offsets")
    entry = HeaderEntry(file=path, key=key, dtype=dtype, shape=shape)
    if start < 0 or end < start or (dtype in DTYPE_SIZES and end - start != entry.nbytes):
        raise CurvatureError(
            f"{path}: tensor '{key}' ({dtype}, shape {list(shape)}) needs {entry.nbytes} bytes but its data_offsets "
            f"{[start, end]} span {end - start}: the file is corrupted"
        )
    return entry, start, end


def read_header(path: str) -> Tuple[Dict[str, HeaderEntry], Dict[str, str]]:
    """Parse the safetensors header of ``path``; return its tensor entries and ``__metadata__``.

    Raises :class:`~mergekit_ota.errors.CurvatureError` naming ``path`` (and the
    tensor, where one is at fault) unless the file is complete and well formed.
    """
    regular_file(path, "safetensors file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            prefix = fp.read(8)
            if len(prefix) < 8:
                raise CurvatureError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                raise CurvatureError(
                    f"{path}: truncated or not a safetensors file (header of "
                    f"{header_len} bytes announced, file has {size} bytes)"
                )
            raw = fp.read(header_len)
    except OSError as error:
        raise CurvatureError(f"{path}: cannot read file ({error})") from error
    header = parse_json(raw, path, "safetensors header")
    if not isinstance(header, dict):
        raise CurvatureError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = _metadata(header.pop("__metadata__", None), path)
    entries: Dict[str, HeaderEntry] = {}
    spans: List[Tuple[int, int, str]] = []
    for key, info in header.items():
        entry, start, end = _entry(path, key, info)
        entries[key] = entry
        spans.append((start, end, key))
    data_size = size - 8 - header_len
    position, previous = 0, None
    for start, end, key in sorted(spans):
        if start != position:
            what = f"overlaps '{previous}'" if start < position else f"leaves a gap after byte {position}"
            raise CurvatureError(f"{path}: tensor '{key}' (bytes {start}..{end}) {what}: the file is corrupted")
        position, previous = end, key
    if position > data_size:
        raise CurvatureError(
            f"{path}: tensor '{previous}' lies outside the file's data (ends at byte {position} "
            f"of {data_size}): the file is truncated or corrupted"
        )
    return entries, metadata


@dataclass(frozen=True)
class SafetensorsIndex:
    """A ``.safetensors.index.json``: its ``weight_map`` (tensor -> absolute shard path) and ``metadata``."""

    path: str
    weight_map: Dict[str, str]
    metadata: Dict[str, Any]

    @property
    def shards(self) -> List[str]:
        return sorted(set(self.weight_map.values()))


def read_index(path: str) -> SafetensorsIndex:
    """Parse index ``path``; every shard it names must lie in its directory (existence is not checked here)."""
    regular_file(path, "safetensors index")
    try:
        with open(path, "rb") as fp:
            raw = fp.read()
    except OSError as error:
        raise CurvatureError(f"{path}: cannot read the index ({error})") from error
    data = parse_json(raw, path, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise CurvatureError(
            f"{path}: not a valid safetensors index (needs an object 'weight_map' of tensor name -> shard file name)"
        )
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CurvatureError(f"{path}: the index's 'metadata' must be a JSON object; got {type(metadata).__name__}")
    directory = os.path.dirname(os.path.abspath(path))
    resolved = {name: contained(directory, shard, path) for name, shard in weight_map.items()}
    return SafetensorsIndex(path=path, weight_map=resolved, metadata=metadata)


def read_sharded(path: str) -> Tuple[List[str], Dict[str, HeaderEntry], Dict[str, str]]:
    """Files, tensor entries and ``__metadata__`` (the first shard's) of a file or an index.

    For an index every listed shard must exist, hold exactly the tensors the index
    maps to it, and no tensor may be held by two shards.
    """
    if not path.endswith(INDEX_SUFFIX):
        entries, metadata = read_header(path)
        return [path], entries, metadata
    index = read_index(path)
    missing = [f for f in index.shards if not os.path.lexists(f)]  # a FIFO or directory: refused by read_header
    if missing:
        raise CurvatureError(f"{path}: shard(s) listed in the index are missing: {missing}")
    headers = [(shard, *read_header(shard)) for shard in index.shards]
    metadata = headers[0][2] if headers else {}
    holders: Dict[str, List[str]] = {}
    for shard, shard_entries, _ in headers:
        for key in shard_entries:
            holders.setdefault(key, []).append(shard)
    for key, files in holders.items():
        if len(files) > 1:
            raise CurvatureError(
                f"{path}: tensor '{key}' is held by two shards, {' and '.join(files)} (the index maps it to "
                f"{index.weight_map.get(key)}); which copy is meant is ambiguous"
            )
    entries: Dict[str, HeaderEntry] = {}
    for shard, shard_entries, _ in headers:
        for key, entry in shard_entries.items():
            listed = index.weight_map.get(key)
            if listed is None:
                raise CurvatureError(f"{path}: shard {shard} holds tensor '{key}', which the index does not list")
            if listed != shard:
                raise CurvatureError(f"{path}: the index maps tensor '{key}' to {listed}, but shard {shard} holds it")
            entries[key] = entry
    absent = sorted(set(index.weight_map) - set(entries))
    if absent:
        raise CurvatureError(
            f"{path}: {len(absent)} tensor(s) the index lists are in no shard, first '{absent[0]}' "
            f"(expected in {index.weight_map[absent[0]]})"
        )
    return index.shards, entries, metadata
