"""What a curvature store holds: per tensor its storage and value statistics, and totals.

The store is walked one logical tensor at a time (:func:`iter_tensor_reports`):
a full tensor is streamed by blocks of rows (:func:`~mergekit_ota.curvature.scan.entry_stats`);
a rank-1 record ``v_hat = outer(r, c) / sum(r)`` is described exactly from its two
factors (:func:`~mergekit_ota.curvature.stats.rank1_stats`), never reconstructed.
Values a merge would refuse (NaN, Inf, negative) are reported, not raised: for a
rank-1 record with such factors the statistics are those of the stored factors.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from mergekit_ota.curvature.scan import entry_stats
from mergekit_ota.curvature.stats import EXACT_MEDIAN_LIMIT, SAMPLE_SIZE, TensorStats, rank1_stats, tensor_stats
from mergekit_ota.curvature.store import CurvatureRecord, CurvatureStore, value_problems
from mergekit_ota.errors import CurvatureError

FP32_BYTES = 4

# header fields every report shows (label: metadata keys that may hold it, first found wins)
HEADER_FIELDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("format version", ("format_version",)),
    ("source", ("source_kind", "source")),
    ("optimizer", ("optimizer",)),
    ("beta2", ("beta2",)),
    ("step", ("step", "optimizer_step")),
    ("bias-corrected", ("bias_corrected",)),
    ("compression", ("compression",)),
    ("dtype", ("dtype",)),
)


@dataclass(frozen=True)
class TensorReport:
    """One logical curvature tensor: how it is stored and what its values look like.

    ``stats_of`` is ``"values"`` (a full tensor), ``"rank1"`` (the reconstruction
    ``outer(r, c) / sum(r)``, exact from the factors) or ``"factors"`` (invalid
    rank-1 factors, described as stored).
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    compression: str
    keys: Tuple[str, ...]
    files: Tuple[str, ...]
    stored_bytes: int
    stats: TensorStats
    stats_of: str
    problems: Tuple[str, ...]


@dataclass(frozen=True)
class StoreReport:
    """A whole store: its files, header metadata, every tensor, and how the median was taken."""

    path: str
    files: Tuple[str, ...]
    metadata: Dict[str, str]
    tensors: Tuple[TensorReport, ...]
    bytes_on_disk: int
    exact_median_limit: int
    sample_size: int

    @property
    def parameters(self) -> int:
        """Parameters covered: values of every logical tensor (rank-1 ones counted as ``m*n``)."""
        return sum(t.stats.numel for t in self.tensors)

    @property
    def full_fp32_bytes(self) -> int:
        return FP32_BYTES * self.parameters

    @property
    def compression_ratio(self) -> Optional[float]:
        """Bytes the store would take as full float32 tensors, over its bytes on disk."""
        return self.full_fp32_bytes / self.bytes_on_disk if self.bytes_on_disk else None

    @property
    def problems(self) -> List[str]:
        return [p for t in self.tensors for p in t.problems]

    def sorted(self, key: str) -> "StoreReport":
        """The report with its tensors in order ``key``: ``store`` (as stored), ``name``,
        ``size`` (largest first), ``max`` (largest max first) or ``problems`` (most first)."""
        orders: Dict[str, Callable[[TensorReport], Any]] = {
            "name": lambda t: t.name,
            "size": lambda t: -t.stats.numel,
            "max": lambda t: -(t.stats.max if t.stats.max is not None else -math.inf),
            "problems": lambda t: (-len(t.problems), -t.stats.bad),
        }
        if key == "store":
            return self
        if key not in orders:
            raise ValueError(f"unknown order {key!r}; use store, {', '.join(orders)}")
        return replace(self, tensors=tuple(sorted(self.tensors, key=orders[key])))

    def count(self, compression: str) -> int:
        return sum(t.compression == compression for t in self.tensors)

    def _header_keys(self) -> Dict[str, Optional[str]]:
        return {label: next((k for k in keys if k in self.metadata), None) for label, keys in HEADER_FIELDS}

    def header(self) -> Dict[str, Optional[str]]:
        """The :data:`HEADER_FIELDS` (``None`` where the store does not record one)."""
        return {label: self.metadata[k] if k else None for label, k in self._header_keys().items()}

    def other_metadata(self) -> Dict[str, str]:
        """Metadata keys not shown by :meth:`header`."""
        shown = set(self._header_keys().values())
        return {k: v for k, v in sorted(self.metadata.items()) if k not in shown}

    def to_json(self) -> Dict[str, Any]:
        return {
            "path": self.path,
            "files": list(self.files),
            "header": self.header(),
            "metadata": dict(self.metadata),
            "totals": {
                "tensors": len(self.tensors),
                "full": self.count("full"),
                "rank1": self.count("rank1"),
                "parameters": self.parameters,
                "bytes_on_disk": self.bytes_on_disk,
                "bytes_full_fp32": self.full_fp32_bytes,
                "compression_ratio": self.compression_ratio,
                "tensors_with_problems": sum(bool(t.problems) for t in self.tensors),
            },
            "median": {
                "definition": "lower median (ceil(N/2)-th smallest) of the finite values",
                "exact_up_to_values": self.exact_median_limit,
                "sample_size_above": self.sample_size,
                "rank1": "exact from the factors",
            },
            "tensors": [
                {**{k: v for k, v in asdict(t).items() if k != "stats"}, **asdict(t.stats)} for t in self.tensors
            ],
            "problems": self.problems,
        }


def _dtype(record: CurvatureRecord) -> str:
    return "/".join(sorted({e.dtype for e in record.entries}))


def tensor_report(store: CurvatureStore, record: CurvatureRecord, **limits: int) -> TensorReport:
    """Storage and statistics of one logical tensor (reads it, never raises on its values)."""
    problems: List[str] = []
    try:
        store.check_dtype(record.name)
    except CurvatureError as error:
        problems.append(str(error))
    if record.full is not None:
        stats = entry_stats(store, record.full, **limits)
        stats_of = "values"
        parts = [(record.full, stats)]
    else:
        r, c = (store.read_entry(e).to(torch.float64) for e in (record.row, record.col))
        parts = [(record.row, tensor_stats(r, sample_size=0)), (record.col, tensor_stats(c, sample_size=0))]
        exact = rank1_stats(r, c)
        if exact is not None:
            stats, stats_of = exact, "rank1"
        else:
            stats, stats_of = tensor_stats(torch.cat([r, c]), **limits), "factors"
    for entry, part in parts:
        problems += value_problems(entry, part.nan, part.inf, part.negative, part.min)
    return TensorReport(
        name=record.name,
        shape=tuple(record.shape),
        dtype=_dtype(record),
        compression="full" if record.full is not None else "rank1",
        keys=tuple(e.key for e in record.entries),
        files=record.files,
        stored_bytes=sum(e.nbytes for e in record.entries),
        stats=stats,
        stats_of=stats_of,
        problems=tuple(problems),
    )


def iter_tensor_reports(store: CurvatureStore, **limits: int) -> Iterator[TensorReport]:
    """:func:`tensor_report` for each logical tensor, in the store's order, one at a time."""
    for record in store.records.values():
        yield tensor_report(store, record, **limits)


def inspect_store(
    store: CurvatureStore,
    *,
    exact_median_limit: int = EXACT_MEDIAN_LIMIT,
    sample_size: int = SAMPLE_SIZE,
    progress: Optional[Any] = None,
) -> StoreReport:
    """Walk every tensor of ``store``; ``progress`` wraps the record iterator (e.g. ``tqdm``)."""
    limits = {"exact_median_limit": exact_median_limit, "sample_size": sample_size}
    reports = iter_tensor_reports(store, **limits)
    tensors = tuple(progress(reports, total=len(store.records)) if progress else reports)
    return StoreReport(
        path=store.path,
        files=tuple(store.files),
        metadata=dict(store.metadata),
        tensors=tensors,
        bytes_on_disk=sum(os.path.getsize(f) for f in store.files),
        **limits,
    )
