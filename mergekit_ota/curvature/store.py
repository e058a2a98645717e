"""Reading a curvature store: safetensors files of Adam ``exp_avg_sq`` tensors.

A store holds one tensor per model weight, named exactly like the weight.  A
2-D tensor may instead be stored rank-1 compressed as two vectors
``NAME:rank1_row`` (row sums, m numbers) and ``NAME:rank1_col`` (column sums,
n numbers); :meth:`CurvatureStore.load` reconstructs ``outer(r, c) / sum(r)``.
Full and compressed tensors may be mixed, within a store and across experts.

Headers are parsed here (not by a library) so that a truncated or corrupted file
gives an error naming the file, before any tensor data is read.  Tensor data is
read lazily through ``safetensors.safe_open`` (memory-mapped), one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.math.rank1 import rank1_reconstruct

ROW_SUFFIX = ":rank1_row"
COL_SUFFIX = ":rank1_col"

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as described by a safetensors header."""

    file: str
    key: str
    dtype: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class CurvatureRecord:
    """A logical curvature tensor: one full entry, or a (row, col) rank-1 pair."""

    name: str
    shape: Tuple[int, ...]
    full: Optional[HeaderEntry] = None
    row: Optional[HeaderEntry] = None
    col: Optional[HeaderEntry] = None

    @property
    def compressed(self) -> bool:
        return self.full is None

    @property
    def files(self) -> Tuple[str, ...]:
        entries = (self.full,) if self.full else (self.row, self.col)
        return tuple(sorted({e.file for e in entries if e is not None}))


def read_header(path: str) -> Tuple[Dict[str, HeaderEntry], Dict[str, str]]:
    """Parse a safetensors header; return its tensor entries and ``__metadata__``.

    Raises :class:`CurvatureError` naming ``path`` if the file is not a complete,
    well-formed safetensors file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fp:
            prefix = fp.read(8)
            if len(prefix) < 8:
                raise CurvatureError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CurvatureError(
                    f"{path}: truncated or not a safetensors file (header of "
                    f"{header_len} bytes announced, file has {size} bytes)"
                )
            raw = fp.read(header_len)
    except OSError as error:
        raise CurvatureError(f"{path}: cannot read file ({error})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CurvatureError(f"{path}: corrupted safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CurvatureError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    entries = {}
    for key, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CurvatureError(f"{path}: corrupted header entry for tensor '{key}'") from None
        numel = 1
        for dim in shape:
            numel *= dim
        expected = numel * _DTYPE_SIZES.get(dtype, 0)
        if end > data_size or start > end or (dtype in _DTYPE_SIZES and end - start != expected):
            raise CurvatureError(
                f"{path}: tensor '{key}' lies outside the file's data (bytes {start}..{end} "
                f"of {data_size}): the file is truncated or corrupted"
            )
        entries[key] = HeaderEntry(file=path, key=key, dtype=dtype, shape=shape)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _shard_files(path: str) -> List[str]:
    if not path.endswith(".index.json"):
        return [path]
    try:
        with open(path, "r", encoding="utf-8") as fp:
            weight_map = json.load(fp)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CurvatureError(f"{path}: not a valid safetensors index ({error})") from None
    directory = os.path.dirname(path)
    files = sorted({os.path.join(directory, name) for name in weight_map.values()})
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise CurvatureError(f"{path}: shard(s) listed in the index are missing: {missing}")
    return files


def _records(entries: Mapping[str, HeaderEntry], source: str) -> Dict[str, CurvatureRecord]:
    records: Dict[str, CurvatureRecord] = {}
    for key, entry in entries.items():
        if key.endswith(COL_SUFFIX):
            continue
        if key.endswith(ROW_SUFFIX):
            name = key[: -len(ROW_SUFFIX)]
            col = entries.get(name + COL_SUFFIX)
            if col is None or len(entry.shape) != 1 or len(col.shape) != 1:
                raise CurvatureError(
                    f"{source}: rank-1 tensor '{name}' needs 1-D '{name}{ROW_SUFFIX}' and "
                    f"'{name}{COL_SUFFIX}' entries"
                )
            records[name] = CurvatureRecord(
                name=name, shape=(entry.shape[0], col.shape[0]), row=entry, col=col
            )
        else:
            records[key] = CurvatureRecord(name=key, shape=entry.shape, full=entry)
    orphans = [
        k for k in entries
        if k.endswith(COL_SUFFIX) and k[: -len(COL_SUFFIX)] not in records
    ]  # fmt: skip
    if orphans:
        raise CurvatureError(f"{source}: column factors without row factors: {orphans}")
    return records


class CurvatureStore:
    """A read-only curvature store (single file or sharded), opened from headers."""

    _cache: Dict[str, "CurvatureStore"] = {}
    _cache_lock = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        self.files = _shard_files(path)
        entries: Dict[str, HeaderEntry] = {}
        self.metadata: Dict[str, str] = {}
        for file in self.files:
            file_entries, metadata = read_header(file)
            if not self.metadata:
                self.metadata = metadata
            entries.update(file_entries)
        self.records = _records(entries, path)
        self._handles: Dict[str, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str) -> "CurvatureStore":
        """Return the (process-wide cached) store for ``path`` (an absolute path)."""
        mtime = os.path.getmtime(path) if os.path.exists(path) else None
        key = f"{path}@{mtime}"
        with cls._cache_lock:
            store = cls._cache.get(key)
            if store is None:
                store = cls(path)
                cls._cache[key] = store
            return store

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def names(self) -> List[str]:
        return list(self.records)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.records[name].shape

    def check_dtype(self, name: str) -> None:
        """Raise unless the record for ``name`` holds floating-point data."""
        record = self.records[name]
        for entry in (record.full, record.row, record.col):
            if entry is not None and entry.dtype not in _FLOAT_DTYPES:
                raise CurvatureError(
                    f"{entry.file}: tensor '{entry.key}' has dtype {entry.dtype}; "
                    f"curvature must be floating point (F32, BF16, F16 or F64)"
                )

    def _read(self, entry: HeaderEntry) -> torch.Tensor:
        from safetensors import safe_open

        with self._lock:
            handle = self._handles.get(entry.file)
            if handle is None:
                try:
                    handle = safe_open(entry.file, framework="pt", device="cpu")
                except Exception as error:  # safetensors raises its own error types
                    raise CurvatureError(f"{entry.file}: cannot open ({error})") from None
                self._handles[entry.file] = handle
        try:
            return handle.get_tensor(entry.key)
        except Exception as error:
            raise CurvatureError(
                f"{entry.file}: cannot read tensor '{entry.key}' ({error})"
            ) from None

    def load(self, name: str) -> torch.Tensor:
        """Return curvature ``name`` as float32, reconstructed if rank-1, validated.

        Raises :class:`CurvatureError` if it is absent, not floating point, or holds
        NaN, Inf or negative values.
        """
        record = self.records.get(name)
        if record is None:
            raise CurvatureError(f"{self.path}: no curvature tensor '{name}'")
        self.check_dtype(name)
        if record.full is not None:
            parts = [(record.full, self._read(record.full).to(torch.float32))]
            value = parts[0][1]
        else:
            parts = [
                (record.row, self._read(record.row).to(torch.float32)),
                (record.col, self._read(record.col).to(torch.float32)),
            ]
            value = None
        for entry, tensor in parts:
            _check_values(tensor, entry)
        if value is None:
            value = rank1_reconstruct(parts[0][1], parts[1][1])
        return value


def _check_values(tensor: torch.Tensor, entry: HeaderEntry) -> None:
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(tensor.numel() - int(finite.sum()) - nan)
        raise CurvatureError(
            f"{entry.file}: tensor '{entry.key}' has {nan} NaN and {inf} Inf values; "
            f"exp_avg_sq must be finite"
        )
    if tensor.numel() and float(tensor.min()) < 0:
        negative = int((tensor < 0).sum())
        raise CurvatureError(
            f"{entry.file}: tensor '{entry.key}' has {negative} negative values "
            f"(min {float(tensor.min()):.3g}); exp_avg_sq must be >= 0"
        )
