"""Writing a curvature store (the format :class:`~mergekit_ota.curvature.store.CurvatureStore` reads).

A store is safetensors: one file, or shards ``exp_avg_sq-00001-of-0000N.safetensors``
with an ``exp_avg_sq.safetensors.index.json`` (``{"metadata": ..., "weight_map": {key: file}}``).
Every shard carries the same ``__metadata__`` header (``format_version``, ``compression``,
``dtype`` and whatever the caller adds: ``source_kind``, ``optimizer``, ``beta2``, ``step``,
``bias_corrected``, ...).

The writer streams: every tensor's name, shape and dtype are known before any data
is read, so each shard's header (with its byte offsets) is written first and each
tensor's bytes are appended as they come.  Memory is one tensor, never a shard.
Output is written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.curvature.locate import DEFAULT_STORE_NAME, INDEX_SUFFIX
from mergekit_ota.curvature.store import COL_SUFFIX, ROW_SUFFIX, read_header
from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.math.rank1 import rank1_factors

FORMAT_VERSION = "1"
DEFAULT_SHARD_BYTES = 5_000_000_000  # a directory or index output's default shard size ("5GB")

SAFETENSORS_DTYPES: Dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_STORE_STEM = DEFAULT_STORE_NAME.removesuffix(".safetensors")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: str) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"4096"`` (K/M/G/T decimal, KiB/MiB/GiB/TiB binary)."""
    match = _SIZE.match(str(value))
    if not match:
        raise ConfigError(
            f"cannot read size {value!r}: write a number of bytes with a unit, e.g. 2GB, 500MB, 1.5GiB"
        )
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    scale = _UNITS[unit[:1]] if "i" not in unit else 1024 ** " kmgt".index(unit[0])
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"size {value!r} must be positive")
    return size


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
            specs += [TensorSpec(name + ROW_SUFFIX, (shape[0],), dtype), TensorSpec(name + COL_SUFFIX, (shape[1],), dtype)]
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


def safetensors_header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``specs`` in this order.

    Data offsets are consecutive from 0; the JSON is padded with spaces to a multiple
    of 8 bytes (as safetensors does) so the data starts aligned.
    """
    header: Dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for spec in specs:
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


def _foreign_entries(directory: str) -> List[str]:
    """Entries of ``directory`` that are not ``exp_avg_sq*.safetensors[.index.json]`` files."""
    foreign = []
    for entry in sorted(os.listdir(directory)):
        is_store = os.path.isfile(os.path.join(directory, entry)) and entry.startswith(_STORE_STEM) and (
            entry.endswith(".safetensors") or entry.endswith(".safetensors" + INDEX_SUFFIX)
        )
        if not is_store:
            foreign.append(entry)
    return foreign


def _index_shards(index_path: str) -> List[str]:
    try:
        with open(index_path, "r", encoding="utf-8") as fp:
            weight_map = json.load(fp).get("weight_map", {})
        return sorted({os.path.join(os.path.dirname(index_path), f) for f in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return []


def is_store_file(path: str) -> bool:
    """Whether ``path`` is a curvature store this writer made (its header records ``format_version``),
    or an index whose shards all are."""
    files = _index_shards(path) if path.endswith(INDEX_SUFFIX) else [path]
    try:
        return bool(files) and all("format_version" in read_header(f)[1] for f in files)
    except CurvatureError:
        return False


def check_output(layout: OutputLayout, force: bool, replace_any: bool = False) -> None:
    """Refuse an existing output unless ``force``; with it, replace only a curvature store.

    A ``directory`` output is replaced only if it holds nothing but
    ``exp_avg_sq*.safetensors[.index.json]`` files; a file or index only if
    :func:`is_store_file` (so model weights are never overwritten), unless ``replace_any``.
    """
    path = layout.path
    if not os.path.lexists(path):
        return
    if not force:
        raise ConfigError(f"{path} already exists; pass --force to replace it")
    if layout.kind == "directory":
        if not os.path.isdir(path):
            raise ConfigError(f"{path} exists and is not a directory; refusing to replace it")
        other = _foreign_entries(path)
        if other:
            raise ConfigError(
                f"{path} holds files that are not a curvature store ({', '.join(other[:5])}"
                f"{', ...' if len(other) > 5 else ''}); refusing to replace it even with --force. "
                f"Write the store as {os.path.join(path, DEFAULT_STORE_NAME)} or into a new directory"
            )
    elif not os.path.isfile(path):
        raise ConfigError(f"{path} exists and is not a file; refusing to replace it")
    elif not (replace_any or is_store_file(path)):
        raise ConfigError(
            f"{path} exists and is not a curvature store written by mergekit-ota (no format_version in its "
            f"header); refusing to replace it even with --force"
        )


class StoreWriter:
    """Stream tensors into a store laid out as ``layout``, in the order of ``specs``.

    ``write(key, tensor)`` must be called once per spec, in order, with a tensor of
    the spec's shape (it is converted to the spec's dtype); ``commit()`` renames the
    finished files into place.  Leaving the ``with`` block without ``commit()`` (or on
    an exception) removes everything written.
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
        self.metadata = dict(metadata)
        self.shards = plan_shards(specs, shard_bytes if shard_bytes is not None else layout.default_shard_bytes)
        if layout.kind == "file" and len(self.shards) > 1:
            total = sum(s.nbytes for s in specs)
            raise ConfigError(
                f"{layout.path}: the store takes {total:,} bytes, more than --shard-size allows in one file; "
                f"give a directory or a .safetensors.index.json as OUT for a sharded store"
            )
        self._tmp = f".tmp-{os.getpid()}"
        self._final_files = self._plan_files()
        if layout.kind == "index":  # shards of the new index may exist without it
            for taken in (f for f in self._final_files if os.path.lexists(f)):
                check_output(OutputLayout("file", taken), force, replace_any)
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._fp: Optional[Any] = None
        self._shard = -1
        self._committed = False
        self._started = False
        self.bytes_written = 0

    # -- layout --------------------------------------------------------------
    def _plan_files(self) -> List[str]:
        count = len(self.shards)
        if self.layout.kind == "file":
            return [self.layout.path]
        if self.layout.kind == "index":
            directory = os.path.dirname(self.layout.path)
            stem = os.path.basename(self.layout.path)[: -len(".safetensors" + INDEX_SUFFIX)]
            return [os.path.join(directory, _shard_name(stem, i, count)) for i in range(count)]
        if count == 1:
            return [os.path.join(self.layout.path, DEFAULT_STORE_NAME)]
        return [os.path.join(self.layout.path, _shard_name(_STORE_STEM, i, count)) for i in range(count)]

    @property
    def _build_dir(self) -> str:
        return self.layout.path + self._tmp

    def _temp_file(self, index: int) -> str:
        final = self._final_files[index]
        if self.layout.kind == "directory":
            return os.path.join(self._build_dir, os.path.basename(final))
        return final + self._tmp

    @property
    def _index_final(self) -> Optional[str]:
        if self.layout.kind == "index":
            return self.layout.path
        if self.layout.kind == "directory" and len(self.shards) > 1:
            return os.path.join(self.layout.path, DEFAULT_STORE_NAME + INDEX_SUFFIX)
        return None

    @property
    def files(self) -> List[str]:
        """The store's files once committed (shards, then the index if any)."""
        return self._final_files + ([self._index_final] if self._index_final else [])

    # -- writing -------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    def _open_shard(self, index: int) -> None:
        if self._fp is not None:
            self._fp.close()
        if not self._started:
            self._started = True
            parent = self._build_dir if self.layout.kind == "directory" else os.path.dirname(self._final_files[0])
            os.makedirs(parent, exist_ok=self.layout.kind != "directory")
        self._shard = index
        self._fp = open(self._temp_file(index), "wb")
        self._fp.write(safetensors_header(self.shards[index], self.metadata))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (converted to its spec's dtype) as the next planned tensor ``key``."""
        if self._position >= len(self._queue):
            raise ValueError(f"tensor '{key}' is not in the planned store (all planned tensors are written)")
        shard, spec = self._queue[self._position]
        if key != spec.key or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"expected tensor '{spec.key}' of shape {list(spec.shape)} next; got '{key}' of shape {list(tensor.shape)}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        data = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1)
        if data.numel():
            self._fp.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += spec.nbytes
        self._position += 1

    def commit(self) -> List[str]:
        """Finish: check every planned tensor was written, rename into place; return :attr:`files`."""
        if self._position != len(self._queue):
            missing = [spec.key for _, spec in self._queue[self._position:]]
            raise ValueError(f"store incomplete: {len(missing)} planned tensor(s) not written, first {missing[0]!r}")
        for index in range(len(self.shards)):  # empty shards (no tensors) still get their header
            if index > self._shard:
                self._open_shard(index)
        self._fp.close()
        self._fp = None
        index_final = self._index_final
        if index_final is not None:
            self._write_index(index_final + self._tmp if self.layout.kind == "index" else
                              os.path.join(self._build_dir, os.path.basename(index_final)))  # fmt: skip
        if self.layout.kind == "directory":
            self._replace_directory()
        else:
            stale = _index_shards(index_final) if index_final and os.path.isfile(index_final) else []
            for index, final in enumerate(self._final_files):
                os.replace(self._temp_file(index), final)
            if index_final is not None:
                os.replace(index_final + self._tmp, index_final)
            for old in stale:
                if old not in self._final_files and os.path.isfile(old) and is_store_file(old):
                    os.remove(old)
        self._committed = True
        return self.files

    def _write_index(self, path: str) -> None:
        weight_map = {spec.key: os.path.basename(self._final_files[i]) for i, shard in enumerate(self.shards) for spec in shard}
        total = sum(spec.nbytes for shard in self.shards for spec in shard)
        with open(path, "w", encoding="utf-8") as fp:
            json.dump({"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}, fp, indent=1)

    def _replace_directory(self) -> None:
        path = self.layout.path
        old = None
        if os.path.lexists(path):
            old = path + f".old-{os.getpid()}"
            os.replace(path, old)
        os.replace(self._build_dir, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove whatever was written (nothing that existed before is touched)."""
        if self._fp is not None:
            self._fp.close()
            self._fp = None
        if self.layout.kind == "directory":
            shutil.rmtree(self._build_dir, ignore_errors=True)
            return
        for index in range(len(self.shards)):
            if os.path.exists(self._temp_file(index)):
                os.remove(self._temp_file(index))
        index_final = self._index_final
        if index_final is not None and os.path.exists(index_final + self._tmp):
            os.remove(index_final + self._tmp)


def store_metadata(compression: str, dtype: torch.dtype, metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
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
    with StoreWriter(OutputLayout("file", os.path.abspath(path)), specs, header, force=True, replace_any=True) as writer:
        for name, value in tensors.items():
            for key, tensor in stored_tensors(name, value, compress):
                writer.write(key, tensor)
        writer.commit()
