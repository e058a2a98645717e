"""What a curvature store holds: per tensor its storage and value statistics, and totals.

The store is walked one logical tensor at a time (:func:`iter_tensor_reports`):
a full tensor is streamed by blocks of rows (:func:`~mergekit_ota.curvature.scan.entry_stats`);
a rank-1 record ``v_hat = outer(r, c) / sum(r)`` is described exactly from its two
factors (:func:`~mergekit_ota.math.stats.rank1_stats`), never reconstructed.
Values a merge would refuse (NaN, Inf, negative) are reported, not raised: for a
rank-1 record with such factors the statistics are those of the stored factors.

Asked for (``inspect_store(..., scale=True)``: ``inspect`` with several stores, and
``analyze``), the same walk also gives the store's curvature scale (:class:`StoreScale`):
the mean and the median of every entry of every tensor, exactly the statistics
``curvature_scale`` divides by (:class:`~mergekit_ota.math.scale.CurvatureScale`; a rank-1
tensor counts the entries of its reconstruction, binned from the factors), next to the
step, ``beta2`` and bias factor ``1 - beta2**step`` its metadata records.
:func:`scale_table` is the one table of them that ``inspect`` and ``analyze`` print.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.curvature.scan import entry_stats
from mergekit_ota.curvature.store import CurvatureRecord, CurvatureStore, value_problems
from mergekit_ota.errors import CurvatureError
from mergekit_ota.math.rank1 import Rank1Curvature
from mergekit_ota.math.scale import CurvatureScale, bias_factor
from mergekit_ota.math.stats import EXACT_MEDIAN_LIMIT, SAMPLE_SIZE, TensorStats, rank1_stats, tensor_stats
from mergekit_ota.store_format import (
    CALIBRATION,
    ESTIMATORS,
    MISSING,
    complete_command,
    metadata_inputs,
    metadata_object,
    missing_tensors,
)

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

    ``stats_of`` is ``"none"`` (a dtype that is not floating point: nothing read), ``"values"`` (a full tensor),
    ``"rank1"`` (the reconstruction
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
class StoreScale:
    """One store's (one expert's) curvature scale: mean and median of all its entries, and its metadata.

    ``tensors`` counted, ``left_out`` tensors holding values a merge refuses (not counted);
    ``step``, ``beta2``, ``bias_corrected`` from the metadata (``None``: not recorded).
    """

    label: str
    mean: Optional[float]
    median: Optional[float]
    entries: int
    tensors: int
    left_out: int
    step: Optional[int]
    beta2: Optional[float]
    bias_corrected: bool

    @property
    def bias_factor(self) -> Optional[float]:
        """Adam's ``1 - beta2**step`` where both are recorded (``None`` for a store already corrected)."""
        if self.step is None or self.beta2 is None or self.bias_corrected:
            return None
        return bias_factor(self.step, self.beta2)


def store_scale(
    label: str, metadata: Mapping[str, str], scale: CurvatureScale, tensors: int, left_out: int = 0
) -> StoreScale:
    """A :class:`StoreScale` from a filled :class:`CurvatureScale` (``median=True``) and the store's metadata."""
    found, _ = metadata_inputs(metadata)
    return StoreScale(
        label=label,
        mean=scale.mean,
        median=scale.lower_median(),
        entries=scale.count,
        tensors=tensors,
        left_out=left_out,
        step=found.get("optimizer_step"),
        beta2=found.get("beta2"),
        bias_corrected=bool(found.get("bias_corrected", False)),
    )


def mean_ratios(scales: Sequence[StoreScale]) -> List[Optional[float]]:
    """Each mean over the smallest positive mean (``None`` where a mean is missing or none is positive)."""
    positive = [s.mean for s in scales if s.mean is not None and s.mean > 0]
    smallest = min(positive) if positive else None
    return [s.mean / smallest if smallest and s.mean is not None else None for s in scales]


SCALE_COLUMNS = (
    "store",
    "tensors",
    "mean",
    "median",
    "step",
    "beta2",
    "1 - beta2**step",
    "bias-corrected",
    "mean / smallest",
)
SCALE_NOTE = (
    "mean and median of v over every entry of every tensor (a rank-1 tensor: of its reconstruction "
    "outer(r, c) / sum(r)), the statistics curvature_scale divides by; the median is the lower edge of its "
    "log-histogram bin (within 0.2%). `1 - beta2**step`: Adam's bias factor from the metadata (- where the step or "
    "beta2 is not recorded, or the store is already corrected). mean / smallest: how much larger each expert's "
    "curvature is; OTA weighs it `(ratio)**power` more, unless bias correction or curvature_scale evens it out."
)


def _sci(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3e}"


def scale_table(scales: Sequence[StoreScale]) -> Tuple[Tuple[str, ...], List[List[str]]]:
    """The side-by-side table of curvature scales (:data:`SCALE_COLUMNS`), one row per store."""
    rows = []
    for scale, ratio in zip(scales, mean_ratios(scales)):
        counted = f"{scale.tensors}" + (f" ({scale.left_out} left out)" if scale.left_out else "")
        rows.append(
            [
                scale.label,
                counted,
                _sci(scale.mean),
                _sci(scale.median),
                "-" if scale.step is None else str(scale.step),
                "-" if scale.beta2 is None else f"{scale.beta2:g}",
                "-" if scale.bias_factor is None else f"{scale.bias_factor:.4g}",
                "yes" if scale.bias_corrected else "no",
                "-" if ratio is None else f"{ratio:.3g}x",
            ]
        )
    return SCALE_COLUMNS, rows


def scale_json(scales: Sequence[StoreScale]) -> List[Dict[str, Any]]:
    """:func:`scale_table`'s numbers, unformatted."""
    return [
        {**asdict(scale), "bias_factor": scale.bias_factor, "mean_over_smallest": ratio}
        for scale, ratio in zip(scales, mean_ratios(scales))
    ]


@dataclass(frozen=True)
class StoreReport:
    """A whole store: its files, header metadata, every tensor, and how the median was taken;
    ``scale`` where asked for (:class:`StoreScale`)."""

    path: str
    files: Tuple[str, ...]
    metadata: Dict[str, str]
    tensors: Tuple[TensorReport, ...]
    bytes_on_disk: int
    exact_median_limit: int
    sample_size: int
    scale: Optional[StoreScale] = None

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

    def estimator_of(self) -> Dict[str, str]:
        """``{tensor: estimator}`` of a store whose tensors came from more than one (metadata
        ``curvature_estimators``, written by ``fisher --only-missing``); ``{}`` otherwise or where it is malformed."""
        try:
            found = metadata_object(self.metadata, ESTIMATORS, self.path)
        except CurvatureError:
            return {}
        return {
            str(name): str(estimator) for estimator, names in found.items() if isinstance(names, list) for name in names
        }

    def provenance_lines(self) -> List[str]:
        """What a user must know about where the tensors came from: the tensors a partial store lacks (and the
        command that completes it), and the estimators of a completed store with their calibration."""
        lines = []
        try:
            missing = missing_tensors(self.metadata, self.path)
        except CurvatureError as error:
            missing, lines = {}, [f"partial  metadata '{MISSING}' is malformed: {error}"]
        if missing:
            reasons, examples = "; ".join(sorted(set(missing.values()))), ", ".join(list(missing)[:3])
            lines.append(
                f"partial  {len(missing)} tensor(s) have no curvature ({reasons}), e.g. {examples}; "
                f"a merge refuses this store until `{complete_command(self.path)}` completes it"
            )
        counts: Dict[str, int] = {}
        for estimator in self.estimator_of().values():
            counts[estimator] = counts.get(estimator, 0) + 1
        if counts:
            try:
                calibration = metadata_object(self.metadata, CALIBRATION, self.path)
            except CurvatureError:
                calibration = {}
            factor = calibration.get("factor")
            scaled = (
                f"; {calibration.get('estimator')} x {factor:.4g} (median of mean(v)/mean(F) over "
                f"{calibration.get('tensors')} tensors, ratios {calibration.get('ratio_min'):.3g} to "
                f"{calibration.get('ratio_max'):.3g})"
                if isinstance(factor, (int, float)) and isinstance(calibration.get("ratio_min"), (int, float))
                else ""
            )
            lines.append("sources  " + ", ".join(f"{e}: {n} tensor(s)" for e, n in counts.items()) + scaled)
        return lines

    def to_json(self) -> Dict[str, Any]:
        scale = {"scale": scale_json([self.scale])[0]} if self.scale is not None else {}
        return {**self._json(), **scale}

    def _json(self) -> Dict[str, Any]:
        estimators = self.estimator_of()
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
                {
                    **{k: v for k, v in asdict(t).items() if k != "stats"},
                    **asdict(t.stats),
                    **({"estimator": estimators.get(t.name)} if estimators else {}),
                }
                for t in self.tensors
            ],
            "problems": self.problems,
        }


def _dtype(record: CurvatureRecord) -> str:
    return "/".join(sorted({e.dtype for e in record.entries}))


def tensor_report(
    store: CurvatureStore, record: CurvatureRecord, scale: Optional[CurvatureScale] = None, **limits: int
) -> TensorReport:
    """Storage and statistics of one logical tensor (reads it, never raises on its values).

    With ``scale``, the tensor's entries are added to it from the same reads, unless the
    tensor holds values or a dtype a merge refuses.
    """
    problems: List[str] = []
    try:
        store.check_dtype(record.name)
    except CurvatureError as error:  # its values are not read: a complex or integer entry has no curvature
        problems.append(str(error))
    mine = CurvatureScale(median=True) if scale is not None else None
    if problems:
        stats, stats_of, parts = (
            TensorStats(math.prod(record.shape), None, None, None, 0, 0, 0, 0, False, 0),
            "none",
            [],
        )
    elif record.full is not None:
        stats = entry_stats(store, record.full, sink=mine.add_values if mine is not None else None, **limits)
        stats_of = "values"
        parts = [(record.full, stats)]
    else:
        r, c = (store.read_entry(e).to(torch.float64) for e in (record.row, record.col))
        parts = [(record.row, tensor_stats(r, sample_size=0)), (record.col, tensor_stats(c, sample_size=0))]
        exact = rank1_stats(r, c)
        if exact is not None:
            stats, stats_of = exact, "rank1"
            if mine is not None:
                mine.add(Rank1Curvature.from_sums(r, c))  # as the merge reads it (float32 factors)
        else:
            stats, stats_of = tensor_stats(torch.cat([r, c]), **limits), "factors"
    for entry, part in parts:
        problems += value_problems(entry, part.nan, part.inf, part.negative, part.min)
    if scale is not None and mine is not None and not problems:
        scale.merge(mine)
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


def iter_tensor_reports(
    store: CurvatureStore, scale: Optional[CurvatureScale] = None, **limits: int
) -> Iterator[TensorReport]:
    """:func:`tensor_report` for each logical tensor, in the store's order, one at a time."""
    for record in store.records.values():
        yield tensor_report(store, record, scale, **limits)


def inspect_store(
    store: CurvatureStore,
    *,
    exact_median_limit: int = EXACT_MEDIAN_LIMIT,
    sample_size: int = SAMPLE_SIZE,
    progress: Optional[Any] = None,
    scale: bool = False,
    label: Optional[str] = None,
) -> StoreReport:
    """Walk every tensor of ``store``; ``progress`` wraps the record iterator (e.g. ``tqdm``).

    ``scale`` also gives the store's :class:`StoreScale` (named ``label``, default its path),
    from the same reads (a histogram of every value: some arithmetic, no extra I/O).
    """
    limits = {"exact_median_limit": exact_median_limit, "sample_size": sample_size}
    total = CurvatureScale(median=True) if scale else None
    reports = iter_tensor_reports(store, total, **limits)
    tensors = tuple(progress(reports, total=len(store.records)) if progress else reports)
    found = None
    if total is not None:
        left_out = sum(bool(t.problems) for t in tensors)
        found = store_scale(label or store.path, store.metadata, total, len(tensors) - left_out, left_out)
    return StoreReport(
        path=store.path,
        files=tuple(store.files),
        metadata=dict(store.metadata),
        tensors=tensors,
        bytes_on_disk=sum(os.path.getsize(f) for f in store.files),
        scale=found,
        **limits,
    )
