"""Reading a curvature store: safetensors files of Adam ``exp_avg_sq`` tensors.

A store holds one tensor per model weight, named exactly like the weight.  A
2-D tensor may instead be stored rank-1 compressed as two vectors
``NAME:rank1_row`` (row sums, m numbers) and ``NAME:rank1_col`` (column sums,
n numbers); :meth:`CurvatureStore.load` reconstructs ``outer(r, c) / sum(r)``.
Full and compressed tensors may be mixed, within a store and across experts.

Headers and indexes are parsed by :mod:`mergekit_ota.io.safetensors` (a truncated,
corrupted or ambiguous file gives an error naming it before any tensor data is
read); tensor data is read lazily through the shared open-file cache
(:mod:`mergekit_ota.io.handles`), one tensor at a time.

Values are judged as the merge computes with them: every read returns float32
(:meth:`CurvatureStore.read_entry`), so an F64 value beyond float32's range is Inf
for ``check``, ``inspect`` and the merge alike.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from mergekit_ota.errors import CurvatureError, Problem
from mergekit_ota.io.handles import file_identity, read_tensor
from mergekit_ota.io.safetensors import FLOAT_DTYPES, HeaderEntry, read_header, read_sharded
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature
from mergekit_ota.store_format import COL_SUFFIX, METADATA_KEYS, ROW_SUFFIX, metadata_inputs

# COL_SUFFIX, ROW_SUFFIX, METADATA_KEYS and metadata_inputs live in mergekit_ota.store_format (what curvature/ and
# export/ share); they stay importable from here for the graph's modules.
__all__ = [
    "COL_SUFFIX",
    "METADATA_KEYS",
    "ROW_SUFFIX",
    "CurvatureRecord",
    "CurvatureStore",
    "HeaderEntry",
    "check_values",
    "metadata_inputs",
    "read_header",
]


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
                    f"{source}: rank-1 tensor '{name}' needs 1-D '{name}{ROW_SUFFIX}' and '{name}{COL_SUFFIX}' entries"
                )
            records[name] = CurvatureRecord(name=name, shape=(entry.shape[0], col.shape[0]), row=entry, col=col)
        else:
            records[key] = CurvatureRecord(name=key, shape=entry.shape, full=entry)
    orphans = [k for k in entries if k.endswith(COL_SUFFIX) and k[: -len(COL_SUFFIX)] not in records]
    if orphans:
        raise CurvatureError(f"{source}: column factors without row factors: {orphans}")
    return records


def _check_float(entry: HeaderEntry) -> None:
    if entry.dtype not in FLOAT_DTYPES:
        raise CurvatureError(
            Problem(
                f"{entry.file}: tensor '{entry.key}' has dtype {entry.dtype}; "
                f"curvature must be floating point (F32, BF16, F16 or F64)",
                kind=f"{entry.file}: curvature tensors not floating point (F32, BF16, F16 or F64)",
                example=f"'{entry.key}' {entry.dtype}",
            )
        )


def _signature(files: List[str]) -> Tuple[Tuple[str, int, int], ...]:
    """:func:`~mergekit_ota.io.handles.file_identity` of each file (``-1``s for one that cannot be stat'ed): what
    a cached store was read from."""
    found = []
    for file in files:
        try:
            found.append(file_identity(file))
        except CurvatureError:
            found.append((os.path.abspath(file), -1, -1))
    return tuple(found)


class CurvatureStore:
    """A read-only curvature store (single file or sharded), opened from headers.

    :meth:`open` keeps the last :data:`MAX_CACHED` stores opened in this process, each reused only while every
    file it was read from (the index and each shard) has the same modification time and size: a store rewritten
    between two merges in one process is read again, like the open file handles (:mod:`mergekit_ota.io.handles`).
    """

    MAX_CACHED = 64
    _cache: "OrderedDict[str, CurvatureStore]" = OrderedDict()
    _cache_lock = threading.Lock()

    def __init__(self, path: str):
        self.path = path
        before = _signature([path])
        self.files, entries, self.metadata = read_sharded(path)
        self.records = _records(entries, path)
        self.signature = before + _signature([f for f in self.files if f != path])

    @classmethod
    def open(cls, path: str) -> "CurvatureStore":
        """The store at ``path`` (an absolute path), reused from this process's cache while its files are unchanged."""
        with cls._cache_lock:
            store = cls._cache.get(path)
            if store is not None and _signature([path] + [f for f in store.files if f != path]) == store.signature:
                cls._cache.move_to_end(path)
                return store
        store = cls(path)
        with cls._cache_lock:
            cls._cache[path] = store
            cls._cache.move_to_end(path)
            while len(cls._cache) > cls.MAX_CACHED:
                cls._cache.popitem(last=False)
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
            if entry is not None:
                _check_float(entry)

    def read_entry(self, entry: HeaderEntry, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Stored tensor ``entry`` as float32 (the dtype every curvature computation uses); rows ``start:stop``
        of dim 0 if given (only those bytes are read). Only floating-point entries are read (a complex or
        integer one is refused, never cast); no value checks: see :func:`check_values`."""
        _check_float(entry)
        return read_tensor(entry, start, stop).to(torch.float32)

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
            parts = [(record.full, self.read_entry(record.full))]
            value = parts[0][1]
        else:
            parts = [(record.row, self.read_entry(record.row)), (record.col, self.read_entry(record.col))]
            value = None
        for entry, tensor in parts:
            check_values(tensor, entry)
        if value is None:
            factors = Rank1Curvature.from_sums(parts[0][1], parts[1][1])
            return factors if factored else factors.dense()
        return value


def value_problems(
    entry: HeaderEntry, nan: int, inf: int, negative: int, minimum: Optional[float], scope: str = ""
) -> List[str]:
    """Messages for stored tensor ``entry`` holding ``nan``/``inf`` non-finite and ``negative`` finite < 0 values.

    ``scope`` (e.g. " (in 65536 sampled of 1048576 values)") says which values were counted.
    """
    problems: List[str] = []
    if nan or inf:
        problems.append(
            Problem(
                f"{entry.file}: tensor '{entry.key}' has {nan} NaN and {inf} Inf values{scope}; "
                f"exp_avg_sq must be finite",
                kind=f"{entry.file}: tensors with NaN or Inf values; exp_avg_sq must be finite",
                example=f"'{entry.key}' {nan} NaN, {inf} Inf{scope}",
            )
        )
    if negative:
        low = f" (min {minimum:.3g})" if minimum is not None else ""
        problems.append(
            Problem(
                f"{entry.file}: tensor '{entry.key}' has {negative} negative values{scope}{low}; "
                f"exp_avg_sq must be >= 0",
                kind=f"{entry.file}: tensors with negative values; exp_avg_sq must be >= 0",
                example=f"'{entry.key}' {negative}{scope}{low}",
            )
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
