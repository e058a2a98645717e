"""Writing a curvature store (the format :class:`~mergekit_ota.curvature.store.CurvatureStore` reads).

A store is safetensors: one file, or shards ``exp_avg_sq-00001-of-0000N.safetensors``
with an ``exp_avg_sq.safetensors.index.json`` (``{"metadata": ..., "weight_map": {key: file}}``).
Every shard carries the same ``__metadata__`` header (``format_version``, ``compression``,
``dtype`` and whatever the caller adds: ``source_kind``, ``optimizer``, ``beta2``, ``step``,
``bias_corrected``, ...).

The writer streams: every tensor's name, shape and dtype are known before any data
is read, so each shard's header (with its byte offsets) is written first and each
tensor's bytes are appended as they come.  Memory is one tensor, never a shard.
Output is written under temporary names and renamed only when complete
(:mod:`mergekit_ota.io.atomic`, :mod:`mergekit_ota.io.output`); a full disk is
refused up front where the free space is known to be too small, and otherwise
reported in one line with nothing left behind.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import ConfigError, CurvatureError, OutputError
from mergekit_ota.io.atomic import StagedFiles, ensure_space
from mergekit_ota.io.output import CLAIM_FILE, OutputDirectory, ReplacePolicy
from mergekit_ota.io.paths import loader_reads
from mergekit_ota.io.safetensors import read_header, read_index, read_sharded
from mergekit_ota.math.rank1 import rank1_factors
from mergekit_ota.store_format import (
    COL_SUFFIX,
    DEFAULT_SHARD_BYTES,
    DEFAULT_STORE_NAME,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    ROW_SUFFIX,
    STORE_STEM,
)

SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its safetensors key, shape and dtype (known before its data)."""

    key: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def store_specs(shapes: Iterable[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype, compress: bool) -> List[TensorSpec]:
    """The stored tensors for ``(weight name, shape)`` pairs: ``NAME`` whole, or with
    ``compress`` every 2-D tensor as ``NAME:rank1_row`` (m) and ``NAME:rank1_col`` (n)."""
    specs: List[TensorSpec] = []
    for name, shape in shapes:
        if compress and len(shape) == 2:
            specs += [
                TensorSpec(name + ROW_SUFFIX, (shape[0],), dtype),
                TensorSpec(name + COL_SUFFIX, (shape[1],), dtype),
            ]
        else:
            specs.append(TensorSpec(name, tuple(shape), dtype))
    return specs


def stored_tensors(name: str, value: torch.Tensor, compress: bool) -> List[Tuple[str, torch.Tensor]]:
    """``[(key, tensor)]`` as :func:`store_specs` lays them out (``r = v.sum(1)``, ``c = v.sum(0)``)."""
    if compress and value.dim() == 2:
        row, col = rank1_factors(value)
        return [(name + ROW_SUFFIX, row), (name + COL_SUFFIX, col)]
    return [(name, value)]


def plan_shards(specs: Sequence[TensorSpec], max_bytes: Optional[int]) -> List[List[TensorSpec]]:
    """Consecutive specs grouped into shards of at most ``max_bytes`` of data (a larger tensor alone)."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if max_bytes is not None and shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _utf8(text: str) -> str:
    """``text``, refused when UTF-8 cannot encode it (a lone surrogate, e.g. from a name in a mutated pickle): the
    header would carry its ``\\udXXX`` escape, which safetensors' own parser refuses, so the store could not be read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise CurvatureError(
            f"name {text!r} is not valid Unicode (a lone surrogate at position {error.start}); a safetensors header "
            "is UTF-8 JSON, so no store can hold it: nothing was written"
        ) from error
    return text


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``specs`` in this order.

    Data offsets are consecutive from 0; the JSON is padded with spaces to a multiple
    of 8 bytes (as safetensors does) so the data starts aligned.
    """
    header: Dict[str, Any] = {"__metadata__": {_utf8(str(k)): _utf8(str(v)) for k, v in metadata.items()}}
    offset = 0
    for spec in specs:
        _utf8(spec.key)
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"cannot store dtype {spec.dtype} (tensor '{spec.key}')")
        header[spec.key] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _shard_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"


@dataclass(frozen=True)
class OutputLayout:
    """Where a store goes.

    ``kind`` is ``file`` (``OUT`` ends with ``.safetensors``: one file), ``index``
    (``OUT`` ends with ``.safetensors.index.json``: shards and the index next to it) or
    ``directory`` (anything else: a new directory holding ``exp_avg_sq.safetensors`` or
    shards with ``exp_avg_sq.safetensors.index.json``).
    """

    kind: str
    path: str

    @classmethod
    def for_path(cls, out: str) -> "OutputLayout":
        path = os.path.abspath(os.path.expanduser(out))
        if path.endswith(".safetensors" + INDEX_SUFFIX):
            return cls("index", path)
        if path.endswith(".safetensors"):
            return cls("file", path)
        return cls("directory", path)

    @property
    def default_shard_bytes(self) -> Optional[int]:
        return None if self.kind == "file" else DEFAULT_SHARD_BYTES


def store_layout(out: str) -> OutputLayout:
    """The layout of a curvature store at ``out``; refused if a model loader would read it as weights.

    A ``file`` or ``index`` named like model weights (:func:`~mergekit_ota.io.paths.loader_reads`:
    ``model*.safetensors*``, ``pytorch_model*``, ``adapter_model*``) beside a model's files would be
    loaded by mergekit *as that model*. Every command that writes a store takes its layout from here.
    """
    layout = OutputLayout.for_path(out)
    pattern = loader_reads(layout.path) if layout.kind != "directory" else None
    if pattern is not None:
        raise OutputError(
            f"{layout.path}: model loaders read files named {pattern} as a model's weights, so mergekit "
            f"would load this curvature as the model itself; name the store {DEFAULT_STORE_NAME} "
            f"(the name a merge looks for in a model directory) or give a directory"
        )
    return layout


def _foreign_entries(directory: str) -> List[str]:
    """Entries of ``directory`` that are not ``exp_avg_sq*.safetensors[.index.json]`` files."""
    foreign = []
    for entry in sorted(os.listdir(directory)):
        is_store = (
            os.path.isfile(os.path.join(directory, entry))
            and entry.startswith(STORE_STEM)
            and (entry.endswith(".safetensors") or entry.endswith(".safetensors" + INDEX_SUFFIX))
        )
        if not is_store and entry != CLAIM_FILE:
            foreign.append(entry)
    return foreign


#: a directory OUT: replaced (with --force) only if it holds nothing but a store's files
STORE_DIRECTORY = ReplacePolicy(
    what="a curvature store directory (only exp_avg_sq*.safetensors[.index.json] files)",
    recognises=lambda path: not _foreign_entries(path),
    flag="--force",
)


def is_store_file(path: str) -> bool:
    """Whether ``path`` is a curvature store this writer made (every file's header records ``format_version``)."""
    try:
        files = read_sharded(path)[0]
        return all("format_version" in read_header(f)[1] for f in files)
    except CurvatureError:
        return False


def _stale_shards(index_path: str, new_files: Sequence[str]) -> List[str]:
    """Shards of the index at ``index_path`` that a new store there leaves behind (to be removed).

    Read with :func:`~mergekit_ota.io.safetensors.read_index`, so an entry naming a file
    outside the index's directory is refused before anything is written or removed.
    """
    if not os.path.isfile(index_path):
        return []
    old = read_index(index_path).shards
    return [f for f in old if f not in new_files and os.path.isfile(f) and is_store_file(f)]


def check_output(layout: OutputLayout, force: bool, replace_any: bool = False) -> None:
    """Refuse an existing output unless ``force``; with it, replace only a curvature store.

    A ``directory`` output follows :data:`STORE_DIRECTORY` (through
    :class:`~mergekit_ota.io.output.OutputDirectory`); a file or index is replaced only
    if :func:`is_store_file` (so model weights are never overwritten), unless ``replace_any``.
    """
    path = layout.path
    if not os.path.lexists(path):
        return
    if layout.kind == "directory":
        OutputDirectory(path, STORE_DIRECTORY, force=force).check()
        return
    if not force:
        raise OutputError(f"{path} already exists; pass --force to replace it")
    if not os.path.isfile(path):
        raise OutputError(f"{path} exists and is not a file; refusing to replace it")
    if layout.kind == "index":
        read_index(path)  # an index naming files outside its directory is refused here, naming it
    if not (replace_any or is_store_file(path)):
        raise OutputError(
            f"{path} exists and is not a curvature store written by mergekit-ota (no format_version in its "
            f"header); refusing to replace it even with --force"
        )


class StoreWriter:
    """Stream tensors into a store laid out as ``layout``, in the order of ``specs``.

    ``write(key, tensor)`` must be called once per spec, in order, with a tensor of
    the spec's shape (it is converted to the spec's dtype and must be finite there: a NaN or
    Inf, given or made by the conversion, is refused naming the tensor); ``commit()`` renames the
    finished files into place. Leaving the ``with`` block without ``commit()`` (or on
    an exception, including a full disk) removes everything written: files go through
    :class:`~mergekit_ota.io.atomic.StagedFiles`, a directory through
    :class:`~mergekit_ota.io.output.OutputDirectory`.
    """

    def __init__(
        self,
        layout: OutputLayout,
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str],
        shard_bytes: Optional[int] = None,
        *,
        force: bool = False,
        replace_any: bool = False,
    ):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; writing them on this machine is not supported")
        check_output(layout, force, replace_any)
        self.layout = layout
        self.force = force
        self.metadata = dict(metadata)
        self.shards = plan_shards(specs, shard_bytes if shard_bytes is not None else layout.default_shard_bytes)
        total = sum(s.nbytes for s in specs)
        if layout.kind == "file" and len(self.shards) > 1:
            raise ConfigError(
                f"{layout.path}: the store takes {total:,} bytes, more than --shard-size allows in one file; "
                f"give a directory or a .safetensors.index.json as OUT for a sharded store"
            )
        self._names = self._plan_names()
        if layout.kind == "index":  # shards of the new index may exist without it
            for taken in (f for f in self._names if os.path.lexists(f)):
                check_output(OutputLayout("file", taken), force, replace_any)
        self._stale = _stale_shards(layout.path, self._names) if layout.kind == "index" else []
        try:  # every header is built (and its names checked) before anything is written
            self.needed = total + sum(len(safetensors_header(shard, self.metadata)) for shard in self.shards)
        except CurvatureError as error:
            raise CurvatureError(f"{layout.path}: {error}") from error
        ensure_space(layout.path, self.needed)
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._shard = -1
        self._files = StagedFiles(needed=self.needed)
        self._directory: Optional[OutputDirectory] = None
        self._committed = False

    # -- layout --------------------------------------------------------------
    def _plan_names(self) -> List[str]:
        """Final paths of the shards; for a directory, relative to it."""
        count = len(self.shards)
        if self.layout.kind == "file":
            return [self.layout.path]
        if self.layout.kind == "index":
            directory = os.path.dirname(self.layout.path)
            stem = os.path.basename(self.layout.path)[: -len(".safetensors" + INDEX_SUFFIX)]
            return [os.path.join(directory, _shard_name(stem, i, count)) for i in range(count)]
        if count == 1:
            return [DEFAULT_STORE_NAME]
        return [_shard_name(STORE_STEM, i, count) for i in range(count)]

    def _root(self) -> str:
        """Where files are written now: the directory's build for a directory, else their own place."""
        return self._directory.build if self._directory is not None else ""

    def _shard_path(self, index: int) -> str:
        return os.path.join(self._root(), self._names[index]) if self.layout.kind == "directory" else self._names[index]

    @property
    def _index_name(self) -> Optional[str]:
        if self.layout.kind == "index":
            return self.layout.path
        if self.layout.kind == "directory" and len(self.shards) > 1:
            return DEFAULT_STORE_NAME + INDEX_SUFFIX
        return None

    @property
    def files(self) -> List[str]:
        """The store's files once committed (shards, then the index if any)."""
        if self.layout.kind == "directory":
            names = self._names + ([self._index_name] if self._index_name else [])
            return [os.path.join(self.layout.path, n) for n in names]
        return self._names + ([self.layout.path] if self._index_name else [])

    # -- writing -------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    def _open_shard(self, index: int) -> None:
        if self.layout.kind == "directory" and self._directory is None:
            self._directory = OutputDirectory(self.layout.path, STORE_DIRECTORY, force=self.force).__enter__()
        elif self._shard < 0:
            os.makedirs(os.path.dirname(self._names[0]), exist_ok=True)
        self._shard = index
        self._files.open(self._shard_path(index))
        self._files.write(safetensors_header(self.shards[index], self.metadata))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (converted to its spec's dtype) as the next planned tensor ``key``."""
        if self._position >= len(self._queue):
            raise ValueError(f"tensor '{key}' is not in the planned store (all planned tensors are written)")
        shard, spec = self._queue[self._position]
        if key != spec.key or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"expected tensor '{spec.key}' of shape {list(spec.shape)} next; got '{key}' of shape "
                f"{list(tensor.shape)}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1)
        finite = torch.isfinite(data)
        if not bool(finite.all()):  # NaN/Inf given, or made by the cast (float32 near its max -> bfloat16 Inf)
            bad = int(data.numel() - finite.sum())
            given = torch.isfinite(tensor.detach()).all()
            why = (
                f"finite {tensor.dtype} values beyond {spec.dtype}'s range"
                if given
                else "NaN/Inf computed from the source, e.g. rank-1 sums or a bias correction overflowing"
            )
            raise CurvatureError(
                f"{self.layout.path}: tensor '{key}' would hold {bad} NaN/Inf value(s) as {spec.dtype} ({why}); "
                f"a store must be finite, so nothing was written"
            )
        if data.numel():
            self._files.write(memoryview(data.view(torch.uint8).numpy()))
        self._position += 1

    def commit(self) -> List[str]:
        """Finish: check every planned tensor was written, rename into place; return :attr:`files`."""
        if self._position != len(self._queue):
            missing = [spec.key for _, spec in self._queue[self._position :]]
            raise ValueError(f"store incomplete: {len(missing)} planned tensor(s) not written, first {missing[0]!r}")
        for index in range(len(self.shards)):  # empty shards (no tensors) still get their header
            if index > self._shard:
                self._open_shard(index)
        if self._index_name is not None:
            index_path = (
                os.path.join(self._root(), self._index_name) if self.layout.kind == "directory" else self._index_name
            )
            self._files.open(index_path)
            self._files.write(self._index_json().encode("utf-8"))
        self._files.commit()
        if self._directory is not None:
            self._directory.commit()
        for old in self._stale:
            os.remove(old)
        self._committed = True
        return self.files

    def _index_json(self) -> str:
        weight_map = {
            spec.key: os.path.basename(self._names[i]) for i, shard in enumerate(self.shards) for spec in shard
        }
        total = sum(spec.nbytes for shard in self.shards for spec in shard)
        return json.dumps({"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}, indent=1)

    def abort(self) -> None:
        """Remove whatever was written (nothing that existed before is touched); never raises."""
        self._files.abort()
        if self._directory is not None:
            self._directory.__exit__(None, None, None)
            self._directory = None


def compression_label(pairs: int, matrices: int) -> str:
    """A store's ``compression`` field: ``none`` (no rank-1 pair), ``rank1`` (every 2-D tensor a pair), else
    ``partial-rank1``, from the number of rank-1 pairs and of 2-D tensors."""
    return "none" if not pairs else "rank1" if pairs == matrices else "partial-rank1"


def store_metadata(
    compression: str, dtype: torch.dtype, metadata: Optional[Mapping[str, Any]] = None
) -> Dict[str, str]:
    """The header every shard carries: ``format_version``, ``compression``, ``dtype``, then ``metadata``."""
    return {
        "format_version": FORMAT_VERSION,
        "compression": compression,
        "dtype": str(dtype).removeprefix("torch."),
        **{str(k): str(v) for k, v in (metadata or {}).items()},
    }


def save_store(
    tensors: Mapping[str, torch.Tensor],
    path: str,
    *,
    compress: bool = False,
    dtype: torch.dtype = torch.float32,
    metadata: Optional[Mapping[str, str]] = None,
) -> None:
    """Write ``{weight name: exp_avg_sq}`` to the single file ``path`` (safetensors), replacing it.

    With ``compress`` every 2-D tensor is stored as its row and column sums
    (``NAME:rank1_row``, ``NAME:rank1_col``); other tensors are stored whole.
    The header records ``format_version``, ``compression`` and ``dtype`` plus ``metadata``.
    The file is written under a temporary name and renamed, so a failure leaves no
    partial store.
    """
    specs = store_specs(((n, tuple(v.shape)) for n, v in tensors.items()), dtype, compress)
    header = store_metadata("rank1" if compress else "none", dtype, metadata)
    layout = store_layout(path)
    if layout.kind != "file":
        raise ConfigError(f"save_store writes one .safetensors file; got {path}")
    with StoreWriter(layout, specs, header, force=True, replace_any=True) as writer:
        for name, value in tensors.items():
            for key, tensor in stored_tensors(name, value, compress):
                writer.write(key, tensor)
        writer.commit()
