"""An existing curvature store as a source: re-shard it, change its dtype, compress it.

Read through :class:`~mergekit_ota.curvature.store.CurvatureStore` (headers parsed
and checked first, so a truncated or corrupted file is an error naming it before
anything is written).  Rank-1 pairs stay pairs (the full tensors cannot be
recovered); full tensors are copied or compressed.  The store's metadata
(source kind, optimizer, ``step``, ``beta2``, ``bias_corrected``, parameters
without state, the tensors a partial store lacks) is carried over.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mergekit_ota.curvature.locate import locate_store
from mergekit_ota.curvature.store import CurvatureRecord, CurvatureStore
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.model_params import check_against_model, model_order
from mergekit_ota.export.moments import Curvature, Full, Rank1, SourceState, StateItem
from mergekit_ota.store_format import (
    MAPPING_BY_ORDER,
    MISSING,
    WITHOUT_STATE,
    metadata_inputs,
    metadata_names,
    missing_tensors,
)

# header fields the new store sets itself
_OWN_FIELDS = {
    "format_version",
    "compression",
    "dtype",
    "bias_corrected",
    "parameters",
    "mapping",
    "source_path",
    "exporter",
}


def open_store(path: str, model_path: Optional[str], frozen: Sequence[str] = ()) -> SourceState:
    """Open the store at ``path`` (file, index, or directory holding one) as a source."""
    resolved = locate_store(path, path, None)
    store = CurvatureStore(resolved)
    for name in store.records:
        store.check_dtype(name)
    metadata = dict(store.metadata)
    found, _ = metadata_inputs(metadata)  # a value that is not a number counts as not recorded
    step, beta2 = found.get("optimizer_step"), found.get("beta2")
    without = metadata_names(metadata, WITHOUT_STATE, resolved)
    metadata_names(metadata, MAPPING_BY_ORDER, resolved)  # carried over into the new store and its summary
    shapes = {n: r.shape for n, r in store.records.items()}
    params, checked, mapping = check_against_model(
        shapes, model_path, frozen, resolved, f"names of the store {resolved}"
    )
    if params is not None:
        without = checked

    def load(record: CurvatureRecord) -> Curvature:
        if record.full is not None:
            return Full(store.read_entry(record.full))
        return Rank1(store.read_entry(record.row), store.read_entry(record.col))

    items = [
        StateItem(
            name=name,
            shape=tuple(store.records[name].shape),
            load=(lambda r=store.records[name]: load(r)),
            origin=f"{store.records[name].files[0]} '{store.records[name].entries[0].key}'",
            rank1=store.records[name].compressed,
            step=step,
            beta2=beta2,
        )
        for name in model_order(list(store.records), params)
    ]
    if not items:
        raise CurvatureError(f"{resolved}: the store holds no tensors")
    return SourceState(
        kind="store",
        path=resolved,
        optimizer=metadata.get("optimizer", "unknown"),
        items=items,
        mapping=mapping,
        without_state=without,
        bias_corrected=bool(found.get("bias_corrected", False)),
        metadata={k: v for k, v in metadata.items() if k not in _OWN_FIELDS and k not in (WITHOUT_STATE, MISSING)},
        missing=missing_tensors(metadata, resolved),  # a partial store stays one
    )
