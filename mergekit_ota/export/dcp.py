"""``torch.distributed.checkpoint`` (FSDP/FSDP2, DCP) directories, read one tensor at a time, no process group.

A DCP directory holds ``.metadata`` (the flattened state dict's keys, shapes and
file offsets) and ``__<rank>_<n>.distcp`` data files.  Optimizer state keys are
``<prefix>.state.<fqn>.<state key>``, e.g. ``optimizer.state.model.layers.0.mlp.up_proj.weight.exp_avg_sq``;
``planner_data`` in the metadata keeps each key's path as a tuple, so names with
dots are unambiguous.  Param-group values (``betas``) are pickled bytes items.

Nothing is unpickled beyond data: ``.metadata`` is read by
:func:`~mergekit_ota.io.unpickle.restricted_load`, which resolves only the exact
``(module, name)`` pairs of :data:`~mergekit_ota.io.unpickle.DCP_METADATA_GLOBALS` (the
checkpoint-metadata dataclasses, ``torch.Size``, dtypes, the layout helper, path classes);
bytes items are read with
``torch.load(weights_only=True)``; tensors with ``dcp.load`` of the one key into a
preallocated tensor (``no_dist=True``), which torch reads with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export import fields
from mergekit_ota.export.mapping import BASIS_DCP_FQNS, NameEvidence
from mergekit_ota.export.model_params import (
    check_against_model,
    clean_name,
    model_order,
)
from mergekit_ota.export.moments import SourceState, StateItem
from mergekit_ota.export.optimizer_states import (
    FACTORED_KINDS,
    KIND_KEYS,
    MOMENT_KEYS,
    check_second_moments,
    group_beta2,
    load_moment,
    moment_shape,
    optimizer_facts,
    refuse_adapters,
    scalar,
)
from mergekit_ota.io.paths import contained, regular_file
from mergekit_ota.io.unpickle import DCP_METADATA_GLOBALS, DCP_METADATA_SUBSTITUTES, restricted_load

METADATA_FILE = ".metadata"


def _check_data_files(metadata: Any, path: str) -> None:
    """The entry tables must be dicts, and every entry's data file must lie inside the directory.

    ``storage_data`` maps each key to ``_StorageInfo(relative_path, offset, length)``; torch's
    reader joins ``relative_path`` to the directory as given, so ``../x`` or ``/x`` would read a
    file elsewhere (:func:`~mergekit_ota.io.paths.contained` refuses them; ``dcp.save`` writes
    bare names such as ``__0_0.distcp``).
    """
    storage = getattr(metadata, "storage_data", None) or {}
    if not isinstance(getattr(metadata, "state_dict_metadata", None), dict) or not isinstance(storage, dict):
        raise CurvatureError(
            f"{path}: not a DCP metadata file (its state_dict_metadata and storage_data are not dicts)"
        )
    for key in metadata.state_dict_metadata:
        if not isinstance(key, str):
            raise CurvatureError(
                f"{path}: state_dict_metadata key {key!r} is a {type(key).__name__}; DCP's flattened keys are strings"
            )
    directory = os.path.dirname(os.path.abspath(path))
    for info in storage.values():
        regular_file(contained(directory, getattr(info, "relative_path", None), path), "DCP data file")


def _reader(directory: str) -> Any:
    """A ``FileSystemReader`` whose metadata is read once, with the DCP allow-list (never torch's own reader)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        _metadata: Any = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if self._metadata is None:
                path = os.path.join(directory, METADATA_FILE)
                regular_file(path, "DCP metadata file")
                try:
                    with open(path, "rb") as fp:
                        metadata = restricted_load(
                            fp, DCP_METADATA_GLOBALS, path, "DCP metadata", DCP_METADATA_SUBSTITUTES
                        )
                except OSError as error:
                    raise CurvatureError(f"{path}: cannot read the DCP metadata file ({error})") from error
                if not isinstance(metadata, Metadata):
                    raise CurvatureError(
                        f"{path}: not a DCP metadata file (it holds a {type(metadata).__name__}, "
                        f"expected torch.distributed.checkpoint's Metadata)"
                    )
                _check_data_files(metadata, path)
                storage_meta = getattr(metadata, "storage_meta", None)
                if storage_meta is None:
                    metadata.storage_meta = StorageMeta()
                elif not isinstance(storage_meta, StorageMeta):
                    raise CurvatureError(
                        f"{path}: storage_meta is a {type(storage_meta).__name__}; expected DCP's StorageMeta"
                    )
                metadata.storage_meta.load_id = self.load_id
                self._metadata = metadata
            return self._metadata

    return SafeReader(directory)


def find_dcp_dir(path: str) -> Optional[str]:
    """``path`` if it is a DCP directory, else its single ``optimizer*`` DCP subdirectory (accelerate/FSDP1)."""
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return path
    if not os.path.isdir(path):
        return None
    subdirs = sorted(
        d
        for d in os.listdir(path)
        if d.startswith("optimizer") and os.path.isfile(os.path.join(path, d, METADATA_FILE))
    )
    if len(subdirs) > 1:
        raise CurvatureError(f"{path}: several optimizer checkpoints ({subdirs}); pass the one to export as SOURCE")
    return os.path.join(path, subdirs[0]) if subdirs else None


def _path_of(key: str) -> Tuple[Any, ...]:
    """A flat key's path where the metadata has no ``planner_data``: ``<prefix>.state.<fqn>.<state key>``
    (state keys have no dots, FQNs may) or dot-separated components."""
    if ".state." in f".{key}":
        prefix, rest = f".{key}".split(".state.", 1)
        fqn, _, state_key = rest.rpartition(".")
        return (*[p for p in prefix.split(".") if p], "state", fqn, state_key)
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


class DcpCheckpoint:
    """One DCP directory: its flattened keys, and reads of single tensors and bytes items."""

    def __init__(self, directory: str):
        self.directory = directory
        self.reader = _reader(directory)
        self.metadata = self.reader.read_metadata()
        planner = fields.mapping(getattr(self.metadata, "planner_data", None) or {}, f"{self.source} planner_data")
        self.paths: Dict[str, Tuple[Any, ...]] = {
            key: _planned_path(planner[key], f"{self.source} planner_data[{key!r}]")
            if key in planner
            else _path_of(key)
            for key in self.metadata.state_dict_metadata
        }

    @property
    def source(self) -> str:
        return os.path.join(self.directory, METADATA_FILE)

    def tensor_shape(self, key: str) -> Optional[Tuple[int, ...]]:
        """The shape of tensor item ``key``; ``None`` for a bytes item."""
        entry = self.metadata.state_dict_metadata[key]
        size = getattr(entry, "size", None)
        return fields.shape(size, f"{self.source} '{key}' size") if size is not None else None

    def tensor_dtype(self, key: str) -> Any:
        """The dtype of tensor item ``key``: a real (floating or integer) ``torch.dtype``."""
        import torch

        dtype = getattr(getattr(self.metadata.state_dict_metadata[key], "properties", None), "dtype", None)
        if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype == torch.bool or dtype.itemsize == 0:
            raise CurvatureError(
                f"{self.source}: '{key}' has dtype {dtype!r}; expected a real floating or integer dtype"
            )
        return dtype

    def load_tensors(self, keys: Sequence[str]) -> Dict[str, Any]:
        """Read tensors ``keys`` (and nothing else) into new CPU tensors."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        state = {}
        for key in keys:
            shape = self.tensor_shape(key)
            if shape is None:
                raise CurvatureError(f"{self.source}: '{key}' is a bytes item, expected a tensor")
            state[key] = torch.empty(shape, dtype=self.tensor_dtype(key))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            try:
                dcp.load(state, storage_reader=self.reader, no_dist=True)
            except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
                raise CurvatureError(f"{self.directory}: cannot read {list(keys)} ({_reason(error)})") from error
        return state

    def load_object(self, key: str) -> Any:
        """A bytes item (e.g. ``betas``) unpickled with ``weights_only=True``, or ``None`` if unreadable."""
        import torch
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = (self.metadata.storage_data or {}).get(MetadataIndex(key))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        try:
            with open(os.path.join(self.directory, info.relative_path), "rb") as fp:
                fp.seek(info.offset)
                raw = fp.read(info.length)
            return torch.load(io.BytesIO(raw), weights_only=True)
        except Exception:  # noqa: BLE001 - a group setting we cannot read safely is reported as unknown
            return None


def _reason(error: BaseException) -> str:
    """One line for a failed read: a ``CheckpointException`` (whose text is its ranks' tracebacks) by the
    exception that failed the read, anything else as ``Type: message``."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        error = first[0] if isinstance(first, tuple) and first and isinstance(first[0], BaseException) else error
        if getattr(error, "failures", None) is not None:
            return "torch.distributed.checkpoint failed to read it"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def _planned_path(value: Any, where: str) -> Tuple[Any, ...]:
    """A key's path from ``planner_data``: a list or tuple of str and int components."""
    path = tuple(fields.sequence(value, where))
    if not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
        raise CurvatureError(f"{where}: expected a path of str and int components, found {path!r}")
    return path


def _split(
    paths: Mapping[str, Tuple[Any, ...]], source: str
) -> Tuple[Dict[str, Dict[str, str]], Dict[int, Dict[str, str]]]:
    """``({fqn: {state key: flat key}}, {group: {field: flat key}})`` of the one optimizer in the checkpoint."""
    prefixes = defaultdict(int)
    for path in paths.values():
        for i in range(len(path) - 2):
            if path[i] == "state" and len(path) == i + 3:
                prefixes[path[:i]] += 1
    if not prefixes:
        raise CurvatureError(f"{source}: no optimizer state in this checkpoint (no '<...>.state.<name>.<key>' entries)")
    if len(prefixes) > 1:
        found = [".".join(map(str, p)) or "(top level)" for p in prefixes]
        raise CurvatureError(f"{source}: state of several optimizers ({found}); export needs a checkpoint of one")
    (prefix,) = prefixes
    states: Dict[str, Dict[str, str]] = defaultdict(dict)
    groups: Dict[int, Dict[str, str]] = defaultdict(dict)
    n = len(prefix)
    for key, path in paths.items():
        if path[:n] != prefix or len(path) < n + 3:
            continue
        if path[n] == "state" and len(path) == n + 3:
            states[str(path[n + 1])][str(path[n + 2])] = key
        elif path[n] == "param_groups":
            if not str(path[n + 1]).isdigit():
                raise CurvatureError(f"{source}: '{key}' names param group {path[n + 1]!r}; expected an index")
            groups[int(path[n + 1])][str(path[n + 2])] = key
    return dict(states), dict(groups)


def open_dcp(path: str, model_path: Optional[str], frozen: Sequence[str] = ()) -> SourceState:
    """Check a DCP optimizer checkpoint; names are the saved FQNs (verified against ``model_path`` if given)."""
    directory = find_dcp_dir(path)
    if directory is None:
        raise CurvatureError(f"{path}: not a torch.distributed.checkpoint directory (no {METADATA_FILE})")
    checkpoint = DcpCheckpoint(directory)
    states, group_keys = _split(checkpoint.paths, directory)
    names = {fqn: clean_name(fqn) for fqn in states}
    refuse_adapters(list(names.values()), directory)
    kinds = check_second_moments({names[f]: list(keys) for f, keys in states.items()}, directory)
    fqn_of = {names[f]: f for f in states}
    shapes = {}
    for name in kinds:
        keys = states[fqn_of[name]]
        moments = {k: flat for k, flat in keys.items() if k in MOMENT_KEYS}
        for flat in moments.values():
            if checkpoint.tensor_shape(flat) is None or checkpoint.tensor_dtype(flat) not in fields.FLOATING:
                raise CurvatureError(
                    f"{checkpoint.source}: '{flat}' is not a floating-point tensor ({checkpoint.tensor_dtype(flat)})"
                    if checkpoint.tensor_shape(flat) is not None
                    else f"{checkpoint.source}: '{flat}' is a bytes item, expected a tensor"
                )
        shapes[name] = moment_shape(kinds[name], {k: checkpoint.tensor_shape(flat) for k, flat in moments.items()})

    groups: List[Dict[str, Any]] = []
    for g in sorted(group_keys):
        groups.append({field: checkpoint.load_object(flat) for field, flat in group_keys[g].items()})
    beta2_of: Dict[str, Optional[float]] = {}
    for g, group in enumerate(groups):
        for fqn in fields.sequence(group.get("params") or [], f"{directory} param_groups[{g}]['params']"):
            beta2_of[clean_name(str(fqn))] = group_beta2(group, f"{directory} param_groups[{g}]")
    step_keys = {name: states[fqn_of[name]]["step"] for name in kinds if "step" in states[fqn_of[name]]}
    tensor_steps = [k for k in step_keys.values() if checkpoint.tensor_shape(k) is not None]
    loaded = checkpoint.load_tensors(tensor_steps) if tensor_steps else {}
    steps = {
        name: scalar(loaded[k] if k in loaded else checkpoint.load_object(k), f"{directory} '{k}'")
        for name, k in step_keys.items()
    }

    params, without, mapping = check_against_model(
        shapes, model_path, frozen, directory, "FQNs saved in the checkpoint"
    )

    def load(name: str) -> Any:
        keys = states[fqn_of[name]]
        wanted = KIND_KEYS[kinds[name]]
        tensors = checkpoint.load_tensors([keys[k] for k in wanted])
        return load_moment(kinds[name], lambda k: tensors[keys[k]])

    items = [
        StateItem(
            name=name,
            shape=shapes[name],
            load=(lambda n=name: load(n)),
            origin=f"{directory} '{_state_key(states[fqn_of[name]])}'",
            rank1=kinds[name] in FACTORED_KINDS and len(shapes[name]) == 2,
            step=steps.get(name),
            beta2=beta2_of.get(name),
        )
        for name in model_order(list(kinds), params)
    ]
    facts = optimizer_facts(kinds, groups)
    notes = []
    if groups and not any(beta2_of.values()) and not facts.bias_corrected:
        notes.append("the param groups' betas could not be read; beta2 is not recorded")
    return SourceState.from_facts(
        facts,
        kind="dcp",
        path=directory,
        items=items,
        mapping=mapping,
        without_state=without,
        notes=notes,
        evidence=NameEvidence(BASIS_DCP_FQNS),
    )


def _state_key(state: Dict[str, Any]) -> Any:
    """The DCP key of a parameter's second moment: its first state key (``exp_avg_sq``, a row factor, ...)."""
    return next((state[k] for keys in KIND_KEYS.values() for k in keys if k in state), None)
