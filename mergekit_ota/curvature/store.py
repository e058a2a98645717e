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
import math
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature

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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the file (0 for a dtype this reader does not size)."""
        return self.numel * _DTYPE_SIZES.get(self.dtype, 0)


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
    def entries(self) -> Tuple[HeaderEntry, ...]:
        """The stored tensors: ``(full,)`` or ``(row, col)``."""
        entries = (self.full,) if self.full else (self.row, self.col)
        return tuple(e for e in entries if e is not None)

    @property
    def files(self) -> Tuple[str, ...]:
        return tuple(sorted({e.file for e in self.entries}))


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

    def _handle(self, file: str) -> Any:
        from safetensors import safe_open

        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(file, framework="pt", device="cpu")
                except Exception as error:  # safetensors raises its own error types
                    raise CurvatureError(f"{file}: cannot open ({error})") from None
                self._handles[file] = handle
        return handle

    def read_entry(self, entry: HeaderEntry, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Return stored tensor ``entry`` as stored (dtype, no checks); rows ``start:stop`` of dim 0 if given.

        Row ranges are read through ``safe_open(...).get_slice``: only those bytes are touched.
        """
        handle = self._handle(entry.file)
        try:
            if (start is None and stop is None) or not entry.shape:
                return handle.get_tensor(entry.key)
            return handle.get_slice(entry.key)[start:stop]
        except Exception as error:
            raise CurvatureError(
                f"{entry.file}: cannot read tensor '{entry.key}' ({error})"
            ) from None

    def iter_rows(self, entry: HeaderEntry, max_elements: int = 1 << 22) -> Iterator[torch.Tensor]:
        """Yield stored tensor ``entry`` in blocks of whole rows (dim 0) of at most ~``max_elements`` values."""
        if len(entry.shape) == 0:
            yield self.read_entry(entry)
            return
        row = max(1, math.prod(entry.shape[1:]))
        step = max(1, max_elements // row)
        for start in range(0, entry.shape[0], step):
            yield self.read_entry(entry, start, min(start + step, entry.shape[0]))

    def load(self, name: str, factored: bool = False) -> Curvature:
        """Return curvature ``name`` as float32, reconstructed if rank-1, validated.

        With ``factored`` a rank-1 record comes back as a
        :class:`~mergekit_ota.math.rank1.Rank1Curvature` (its m + n factors, no m x n
        tensor); a full record is a tensor either way.  Raises :class:`CurvatureError`
        if it is absent, not floating point, or holds NaN, Inf or negative values.
        """
        record = self.records.get(name)
        if record is None:
            raise CurvatureError(f"{self.path}: no curvature tensor '{name}'")
        self.check_dtype(name)
        if record.full is not None:
            parts = [(record.full, self.read_entry(record.full).to(torch.float32))]
            value = parts[0][1]
        else:
            parts = [
                (record.row, self.read_entry(record.row).to(torch.float32)),
                (record.col, self.read_entry(record.col).to(torch.float32)),
            ]
            value = None
        for entry, tensor in parts:
            check_values(tensor, entry)
        if value is None:
            factors = Rank1Curvature.from_sums(parts[0][1], parts[1][1])
            return factors if factored else factors.dense()
        return value


def value_problems(entry: HeaderEntry, nan: int, inf: int, negative: int, minimum: Optional[float], scope: str = "") -> List[str]:
    """Messages for stored tensor ``entry`` holding ``nan``/``inf`` non-finite and ``negative`` finite < 0 values.

    ``scope`` (e.g. " (in 65536 sampled of 1048576 values)") says which values were counted.
    """
    problems = []
    if nan or inf:
        problems.append(
            f"{entry.file}: tensor '{entry.key}' has {nan} NaN and {inf} Inf values{scope}; "
            f"exp_avg_sq must be finite"
        )
    if negative:
        low = f" (min {minimum:.3g})" if minimum is not None else ""
        problems.append(
            f"{entry.file}: tensor '{entry.key}' has {negative} negative values{scope}{low}; "
            f"exp_avg_sq must be >= 0"
        )
    return problems


def check_values(tensor: torch.Tensor, entry: HeaderEntry) -> None:
    """Raise :class:`CurvatureError` naming ``entry`` if ``tensor`` holds NaN, Inf or negative values."""
    if tensor.numel() == 0:
        return
    # One fused pass: NaN propagates to both ends, +-Inf shows up as an end.
    low, high = (float(x) for x in torch.aminmax(tensor))
    if low >= 0.0 and high < math.inf:
        return
    finite = torch.isfinite(tensor)
    nan = int(torch.isnan(tensor).sum())
    values = tensor[finite]
    negative = values < 0
    problems = value_problems(
        entry,
        nan=nan,
        inf=int(tensor.numel() - values.numel() - nan),
        negative=int(negative.sum()),
        minimum=float(values.min()) if values.numel() else None,
    )
    raise CurvatureError("; ".join(problems))
