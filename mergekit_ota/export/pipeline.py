"""Export: stream a checked source into a curvature store, one tensor at a time.

Per parameter: read its second moment (``v``, or Adafactor-form ``r, c``), check it
(finite, >= 0), optionally bias-correct it (``v / (1 - beta2**step)`` with the
parameter's own ``step`` and its group's ``beta2``), optionally compress it
(``r = v.sum(1)``, ``c = v.sum(0)`` for 2-D tensors), convert to the stored dtype,
and append it to the store being written.  Everything a header can tell is checked
before the first byte is written; the store appears under its name only when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from mergekit_ota.curvature.fingerprint import FINGERPRINT_KEY, fingerprint_beside
from mergekit_ota.curvature.store import HeaderEntry, check_values
from mergekit_ota.curvature.writer import (
    StoreWriter,
    TensorSpec,
    check_output,
    compression_label,
    store_layout,
    store_metadata,
    store_specs,
    stored_tensors,
)
from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.export.detect import open_source
from mergekit_ota.export.moments import Full, Rank1, SourceState, StateItem
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.store_format import COL_SUFFIX, MAPPING_BY_ORDER, MISSING, ROW_SUFFIX, WITHOUT_STATE

BF16_WARNING = (
    "warning: storing exp_avg_sq as bfloat16 keeps float32's range (values near 1e-19 survive) but only 8 bits "
    "of mantissa: each value is rounded by up to 0.4%, and rank-1 sums likewise. Use the default float32 "
    "unless halving the size matters more"
)

Progress = Callable[[Iterable[StateItem], int], Iterable[StateItem]]


@dataclass
class ExportResult:
    """What was written: files, counts, sizes (``full_fp32_bytes``: the same tensors whole in float32)."""

    source: SourceState
    files: List[str]
    store: str
    tensors: int
    rank1: int
    bytes_on_disk: int
    full_fp32_bytes: int
    metadata: Dict[str, str]
    notes: List[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Bytes on disk over full float32 bytes."""
        return self.bytes_on_disk / self.full_fp32_bytes if self.full_fp32_bytes else 1.0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit-ota")
    except PackageNotFoundError:
        return "unknown"


def check_given_values(source: SourceState, options: ExportOptions) -> None:
    """``--step``/``--beta2`` only fill in what the source does not record: contradicting it is an error, with or
    without ``--bias-correct`` (the store's metadata feeds the merge's bias correction, so a silently wrong
    value would corrupt it later)."""
    for item in source.items:
        if item.step is not None and options.step is not None and int(item.step) != options.step:
            raise ConfigError(f"--step {options.step} contradicts the source's step {int(item.step)} for '{item.name}'")
        if item.beta2 is not None and options.beta2 is not None and abs(item.beta2 - options.beta2) > 1e-12:
            raise ConfigError(f"--beta2 {options.beta2} contradicts the source's beta2 {item.beta2} for '{item.name}'")


def bias_multipliers(source: SourceState, options: ExportOptions) -> Dict[str, float]:
    """``{name: 1 / (1 - beta2**step)}`` per parameter; raises before writing if any value is unknown."""
    if source.bias_corrected:
        raise ConfigError(
            f"{source.path}: the values are already bias-corrected ({source.optimizer}); drop --bias-correct"
        )
    scales = {}
    for item in source.items:
        step = item.step if item.step is not None else options.step
        beta2 = item.beta2 if item.beta2 is not None else options.beta2
        if step is None or beta2 is None:
            what = " and ".join(w for w, v in (("step", step), ("beta2", beta2)) if v is None)
            raise ConfigError(
                f"--bias-correct: {source.path} records no {what} for '{item.name}'; give it with --{what.split()[0]}"
            )
        if step < 1:
            raise ConfigError(f"--bias-correct: '{item.name}' has step {step}; the optimizer never updated it")
        scales[item.name] = 1.0 / (1.0 - float(beta2) ** float(step))
    return scales


def _specs(source: SourceState, options: ExportOptions) -> List[TensorSpec]:
    dtype = options.torch_dtype
    specs: List[TensorSpec] = []
    for item in source.items:
        specs += store_specs([(item.name, item.shape)], dtype, item.rank1 or options.compress == "rank1")
    return specs


def export_metadata(source: SourceState, options: ExportOptions, specs: List[TensorSpec]) -> Dict[str, str]:
    """Header fields: format, compression, dtype, source, optimizer, beta2, step, bias correction, coverage.

    How names were found: ``mapping`` says it in words; ``mapping_basis`` is ``param_names``,
    ``state_keys``, ``dcp_fqns`` or ``directory_names`` (each state saved with its name: exact)
    or ``shapes+order`` (an index-keyed state aligned with the model's parameters in an order
    rule's order, every shape checked); ``mapping_by_order`` is the JSON list of exported names
    that rest on that order rule because another model parameter has the same shape (``[]`` for
    an exact basis), and ``mapping_verified_by_shape`` (``shapes+order`` only) counts the names
    whose shape no other model parameter has (see :mod:`mergekit_ota.export.mapping`).  A store
    re-exported as a source keeps its original fields.
    """
    pairs = {s.key[: -len(ROW_SUFFIX)] for s in specs if s.key.endswith(ROW_SUFFIX)}
    matrices = [i.name for i in source.items if len(i.shape) == 2]
    compression = compression_label(len(pairs), len(matrices))
    fields: Dict[str, Any] = {"source_kind": source.kind, "optimizer": source.optimizer}
    steps = [i.step if i.step is not None else options.step for i in source.items]
    steps = [s for s in steps if s is not None]
    if steps:
        fields["step"] = int(max(steps))
        if min(steps) != max(steps):
            fields["step_min"] = int(min(steps))
    betas = {i.beta2 if i.beta2 is not None else options.beta2 for i in source.items}
    if len(betas) == 1 and None not in betas:
        fields["beta2"] = repr(float(betas.pop()))
    fields.update(source.metadata)
    if source.fingerprint is not None:
        fields[FINGERPRINT_KEY] = source.fingerprint
    fields.pop(MISSING, None)
    if source.missing:  # read back by store_format.missing_tensors
        fields[MISSING] = json.dumps(source.missing, sort_keys=True)
    fields.update(
        source_path=source.path,
        mapping=source.mapping,
        parameters=len(source.items),
        **{WITHOUT_STATE: json.dumps(source.without_state)},  # read back by store_format.metadata_names
        bias_corrected="true" if (options.bias_correct or source.bias_corrected) else "false",
        exporter=f"mergekit-ota {_version()}",
    )
    evidence = source.evidence
    if evidence is not None:
        fields["mapping_basis"] = evidence.basis
        fields[MAPPING_BY_ORDER] = json.dumps(list(evidence.by_order))
        if not evidence.exact:
            fields["mapping_verified_by_shape"] = len(evidence.by_shape)
    return store_metadata(compression, options.torch_dtype, fields)


def _check(tensor: torch.Tensor, item: StateItem, what: str) -> None:
    entry = HeaderEntry(file=item.origin, key=f"{item.name}{what}", dtype=str(tensor.dtype), shape=tuple(tensor.shape))
    check_values(tensor, entry)


def _write_item(writer: StoreWriter, item: StateItem, scale: Optional[float], compress: bool) -> None:
    value = item.load()
    if isinstance(value, Rank1) != item.rank1:
        raise CurvatureError(f"{item.origin}: '{item.name}' changed form while being read")
    if isinstance(value, Full):
        v = value.v
        if tuple(v.shape) != item.shape:
            raise CurvatureError(f"{item.origin}: '{item.name}' has shape {list(v.shape)}, expected {list(item.shape)}")
        _check(v, item, "")
        if scale is not None:
            v = v.to(torch.float32) * scale
        for key, tensor in stored_tensors(item.name, v, compress):
            writer.write(key, tensor)
        return
    r, c = value.r, value.c
    if (r.numel(), c.numel()) != item.shape:
        raise CurvatureError(f"{item.origin}: rank-1 factors of '{item.name}' do not match shape {list(item.shape)}")
    _check(r, item, ROW_SUFFIX)
    _check(c, item, COL_SUFFIX)
    if scale is not None:
        r, c = r.to(torch.float32) * scale, c.to(torch.float32) * scale
    writer.write(item.name + ROW_SUFFIX, r.reshape(-1))
    writer.write(item.name + COL_SUFFIX, c.reshape(-1))


def write_store(
    source: SourceState,
    out: str,
    options: ExportOptions,
    progress: Optional[Progress] = None,
) -> ExportResult:
    """Write ``source`` to ``out`` (a ``.safetensors`` file, a ``.safetensors.index.json``, or a new directory)."""
    layout = store_layout(out)
    check_given_values(source, options)
    if source.fingerprint is None and source.kind not in ("training", "store"):  # a live one is taken live
        names = [item.name for item in source.items]
        in_parent = source.kind in ("dcp", "deepspeed", "deepspeed-universal")  # a state folder in the checkpoint
        source = replace(source, fingerprint=fingerprint_beside(source.path, names, in_parent))
    scales = bias_multipliers(source, options) if options.bias_correct else {}
    specs = _specs(source, options)
    metadata = export_metadata(source, options, specs)
    compress = options.compress == "rank1"
    items: Iterable[StateItem] = progress(source.items, len(source.items)) if progress else source.items
    with StoreWriter(layout, specs, metadata, options.shard_size, force=options.force) as writer:
        for item in items:
            _write_item(writer, item, scales.get(item.name), compress)
            if item.done is not None:
                item.done()
        files = writer.commit()
    return ExportResult(
        source=source,
        files=files,
        store=layout.path,
        tensors=len(source.items),
        rank1=sum(s.key.endswith(ROW_SUFFIX) for s in specs),
        bytes_on_disk=sum(os.path.getsize(f) for f in files),
        full_fp32_bytes=sum(4 * int(torch.Size(i.shape).numel()) for i in source.items),
        metadata=metadata,
        notes=list(source.notes),
    )


def export_curvature(
    source: str, out: str, options: ExportOptions, progress: Optional[Progress] = None
) -> ExportResult:
    """Open ``source`` (any supported kind), check it, and write its curvature store to ``out``."""
    check_output(store_layout(out), options.force)  # refuse a bad or existing OUT before reading anything
    return write_store(open_source(source, options), out, options, progress)
