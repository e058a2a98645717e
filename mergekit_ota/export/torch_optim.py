"""``torch.optim`` state dicts saved with ``torch.save``: Trainer/accelerate checkpoints and plain files.

Layout: ``{"state": {key: {"step", "exp_avg", "exp_avg_sq", ...}}, "param_groups": [{"params": [key, ...],
"betas": (beta1, beta2), ...}]}``, possibly nested under ``"optimizer"`` (or
``"optimizer_state_dict"``, ``"optim"``) of a larger checkpoint dict.  Keys are
parameter indices (Trainer ``optimizer.pt``, accelerate ``optimizer.bin``, plain
``optimizer.state_dict()``) or names (FSDP full optimizer state dicts).  Names come,
in this order of preference, from ``param_names`` in the param groups (torch >= 2.6
optimizers built from ``named_parameters()``), from name keys, or from the model via
:func:`~mergekit_ota.export.mapping.map_indices`.  Recorded names and name keys are exact; names
from the model rest on the order rule wherever parameters share a shape, and the source's
:class:`~mergekit_ota.export.mapping.NameEvidence` says which (:func:`~mergekit_ota.export.mapping.order_evidence`).

Files are opened with ``torch.load(path, map_location="cpu", mmap=True, weights_only=True)``:
no code is unpickled and tensor data stays on disk until a tensor is read.
"""

from __future__ import annotations

import ctypes
import math
import os
import pickle
import re
import sys
from collections import Counter
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export import fields
from mergekit_ota.export.adam_mini import head_shapes
from mergekit_ota.export.mapping import (
    BASIS_PARAM_NAMES,
    BASIS_STATE_KEYS,
    NameEvidence,
    Shape,
    map_indices,
    order_evidence,
)
from mergekit_ota.export.model_params import (
    ModelParameters,
    check_against_model,
    clean_name,
    index_candidates,
    load_model_parameters,
    model_order,
)
from mergekit_ota.export.moments import SourceState, StateItem
from mergekit_ota.export.optimizer_states import (
    KIND_KEYS,
    checked_entry,
    classify_second_moments,
    load_moment,
    moment_shape,
    optimizer_facts,
    rank1_state,
    refuse_adapters,
    step_and_beta2,
)
from mergekit_ota.io.paths import regular_file
from mergekit_ota.io.safetensors import is_unicode

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
_NESTED_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def load_torch_file(path: str, deepspeed: bool = False) -> Tuple[Any, bool]:
    """``torch.load`` with ``mmap=True, weights_only=True`` (no mmap for pre-1.6 non-zip files).

    ``deepspeed``: also accept the stand-ins of DeepSpeed's classes
    (:func:`mergekit_ota.io.unpickle.deepspeed_globals`); torchao's low-bit optimizer states are always accepted as
    inert stand-ins (:func:`mergekit_ota.export.torchao.torchao_globals`).  Returns the object and whether its
    tensors are views of the file mapping.
    """
    import contextlib

    from mergekit_ota.export.torchao import torchao_globals
    from mergekit_ota.io.unpickle import deepspeed_globals

    with deepspeed_globals() if deepspeed else contextlib.nullcontext(), torchao_globals():
        return _load(path, deepspeed)


def _load(path: str, deepspeed: bool) -> Tuple[Any, bool]:
    regular_file(path, "torch.save file")  # a FIFO given as SOURCE would block torch.load forever
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True), True
        except RuntimeError as error:
            if "mmap" not in str(error) and "zip" not in str(error).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as error:
        text = str(error).strip()
        named = re.search(r"GLOBAL ([\w.]+)", text)
        first = f"it names {named.group(1)}" if named else (text.splitlines()[0] if text else type(error).__name__)
        raise CurvatureError(
            f"{path}: holds Python objects other than tensors and plain containers ({first}); "
            "refusing to unpickle it (torch.load "
            f"weights_only=True{' with the DeepSpeed stand-ins' if deepspeed else ''})"
            f"{'' if deepspeed else '. Save optimizer.state_dict() on its own'}"
        ) from error
    except Exception as error:  # truncated zip, not a torch file, ...
        raise CurvatureError(
            f"{path}: cannot read it as a torch.save file ({type(error).__name__}: {error})"
        ) from error


def find_optimizer_dict(obj: Any, path: str) -> Mapping[str, Any]:
    """The ``{"state", "param_groups"}`` dict at the top of ``obj`` or one level down."""

    def is_state_dict(value: Any) -> bool:
        return isinstance(value, Mapping) and "state" in value and "param_groups" in value

    if is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        nested = [k for k in _NESTED_KEYS if is_state_dict(obj.get(k))]
        if nested:
            return obj[nested[0]]
        found = [k for k, v in obj.items() if is_state_dict(v)]
        if len(found) == 1:
            return obj[found[0]]
        if len(found) > 1:
            raise CurvatureError(f"{path}: holds several optimizer state dicts ({found}); save the one to export alone")
        what = f"a dict with keys {sorted(map(str, obj))[:8]}"
    else:
        what = type(obj).__name__
    raise CurvatureError(f"{path}: not an optimizer state dict (expected 'state' and 'param_groups'; found {what})")


def _shapes_of(state: Mapping[str, Any]) -> Dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _key(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CurvatureError(f"{where}: a parameter key must be an int index or a str name, found {value!r}")
    if isinstance(value, str):
        _text_name(value, where)
    return value


def _text_name(name: str, where: str) -> None:
    """A parameter name must be Unicode text (no lone surrogate): it becomes a store key or a metadata entry."""
    if not is_unicode(name):
        raise CurvatureError(f"{where}: the parameter name {name!r} is not Unicode text (a lone surrogate)")


def _names_from_groups(groups: Sequence[Mapping[str, Any]], path: str) -> Optional[Dict[Any, str]]:
    """``{key: name}`` from ``param_names`` (all groups must have them), or from Adam-mini's one-parameter groups
    that each keep the parameter's (lower-cased) name under ``name``; else ``None``."""
    if groups and all(isinstance(g.get("name"), str) and len(g["params"]) == 1 for g in groups):
        for g, group in enumerate(groups):
            _text_name(group["name"], f"{path} param_groups[{g}]['name']")
        groups = [{**g, "param_names": [g["name"]]} for g in groups]  # adam-mini 1.1's param groups
    if not groups or not all("param_names" in g for g in groups):
        return None
    names: Dict[Any, str] = {}
    for g, group in enumerate(groups):
        if len(group["param_names"]) != len(group["params"]):
            raise CurvatureError(
                f"{path}: param_groups[{g}] lists {len(group['params'])} params but {len(group['param_names'])} "
                "param_names"
            )
        names.update({key: clean_name(str(name)) for key, name in zip(group["params"], group["param_names"])})
    repeated = sorted(n for n, count in Counter(names.values()).items() if count > 1)
    if repeated:
        raise CurvatureError(f"{path}: param_names repeat {repeated[:3]}; each parameter must be named once")
    return names


def read_optimizer(
    optimizer: Mapping[str, Any], path: str
) -> Tuple[List[Mapping[str, Any]], Dict[Any, Dict[str, Any]]]:
    """``(param_groups, state)`` of a torch optimizer state dict, every type checked where it is read.

    ``param_groups``: a list of dicts, each with ``params`` (a list of int or str keys) and, if
    saved, ``param_names`` (a list of str); ``state``: ``{int or str key: one parameter's state}``
    (:func:`~mergekit_ota.export.optimizer_states.checked_entry`).  Anything else is refused naming the file and key.
    """
    groups: List[Mapping[str, Any]] = []
    for g, group in enumerate(fields.sequence(optimizer["param_groups"], f"{path} 'param_groups'")):
        where = f"{path} param_groups[{g}]"
        group = fields.mapping(group, where)
        for i, key in enumerate(fields.sequence(group.get("params"), f"{where}['params']")):
            _key(key, f"{where}['params'][{i}]")
        if "param_names" in group:
            for i, name in enumerate(fields.sequence(group["param_names"], f"{where}['param_names']")):
                if not isinstance(name, str):
                    raise CurvatureError(f"{where}['param_names'][{i}]: expected a str name, found {name!r}")
                _text_name(name, f"{where}['param_names'][{i}]")
        groups.append(group)
    state = {
        _key(key, f"{path} 'state'"): checked_entry(entry, f"{path} state[{key!r}]")
        for key, entry in fields.mapping(optimizer["state"], f"{path} 'state'").items()
    }
    return groups, state


def open_torch_state(
    path: str,
    *,
    kind: str,
    model_path: Optional[str],
    frozen: Sequence[str] = (),
    adapter_reason: Optional[str] = None,
) -> SourceState:
    """Check and map the optimizer state in ``path``; ``model_path``: a directory with the model's config.json."""
    loaded, mapped = load_torch_file(path)
    optimizer = find_optimizer_dict(loaded, path)
    groups, state = read_optimizer(optimizer, path)
    group_of = {key: g for g, group in enumerate(groups) for key in group["params"]}
    stray = [k for k in state if k not in group_of]
    if stray:
        raise CurvatureError(f"{path}: state for parameter(s) {stray[:5]} that no param group lists")

    names = _names_from_groups(groups, path)
    if names is None and state and all(isinstance(k, str) for k in state):
        names = {key: clean_name(key) for key in group_of}
    label = (lambda key: names[key]) if names is not None else (lambda key: f"state[{key}]")
    moments = classify_second_moments(
        {label(k): list(v.keys()) for k, v in state.items()}, path, {label(k): groups[group_of[k]] for k in state}
    )
    kinds = moments.kinds
    if names is not None:
        refuse_adapters(list(names.values()), path, adapter_reason)
    elif adapter_reason:
        refuse_adapters([], path, adapter_reason)
    shapes = {key: moment_shape(kinds[label(key)], _shapes_of(state[key])) for key in state if label(key) in kinds}
    head_shapes({key: kinds[label(key)] for key in shapes}, shapes, path)  # Adam-mini's q/k: rows from the others
    missing_shapes = {  # momentum only: named like the others (their shapes take part in an index mapping)
        key: moment_shape("missing", _shapes_of(state[key])) for key in state if label(key) in moments.families
    }

    params: Optional[ModelParameters] = None
    if names is None:
        if model_path is None:
            raise CurvatureError(
                f"{path}: the optimizer state is keyed by parameter index and records no names; "
                f"give the model it trained with --model DIR (a directory with config.json)"
            )
        params = load_model_parameters(model_path, frozen)
        found = map_indices(
            [list(g["params"]) for g in groups],
            {k: shapes.get(k, missing_shapes.get(k)) for k in group_of},
            index_candidates(params, len(groups)),
            path,
        )
        names = found.names
        elements = sum(math.prod(s) for s in shapes.values())
        also = f" (the same under: {'; '.join(found.rules[1:])})" if len(found.rules) > 1 else ""
        mapping = (
            f"index order of {found.rules[0]}{also}; its {len(shapes)} state shapes ({elements:,} elements) "
            f"and group sizes {[len(g['params']) for g in groups]} fit {params.path}"
        )
        evidence = order_evidence([names[k] for k in shapes], params.parameters)
    else:
        recorded = "param_names" in groups[0] or "name" in groups[0]
        mapping = (
            ("param_names saved in the optimizer" if "param_names" in groups[0] else "Adam-mini's param group names")
            if recorded
            else "parameter names in the state dict"
        )
        evidence = NameEvidence(BASIS_PARAM_NAMES if recorded else BASIS_STATE_KEYS)
        named = {names[k]: s for k, s in {**shapes, **missing_shapes}.items()}
        params, _, mapping = check_against_model(named, model_path, frozen, path, mapping)

    reasons = moments.missing
    missing = {names[k]: reasons[label(k)] for k in missing_shapes}
    with_state = {names[k] for k in shapes} | set(missing)
    if params is not None:
        without = [n for n, _ in params.parameters if n not in with_state]
    else:
        without = [names[k] for k in group_of if k not in shapes and k not in missing_shapes]
    key_of = {names[k]: k for k in shapes}
    items = []
    for name in model_order(list(key_of), params):
        key = key_of[name]
        kind_ = kinds[label(key)]
        entry = state[key]
        where, group_where = f"{path} state[{key!r}]", f"{path} param_groups[{group_of[key]}]"
        step, beta2 = step_and_beta2(kind_, entry, groups[group_of[key]], where, group_where)
        items.append(
            StateItem(
                name=name,
                shape=shapes[key],
                load=(
                    lambda k=kind_, e=entry, w=f"{path} state[{key!r}]", s=shapes[key]: load_moment(
                        k, e.__getitem__, w, s
                    )
                ),
                origin=f"{path} state[{key!r}]",
                rank1=rank1_state(kind_, shapes[key], _shapes_of(entry)),
                step=step,
                beta2=beta2,
                done=(lambda e=entry, k=kind_: release_mapped(e[n] for n in KIND_KEYS[k] if n in e))
                if mapped
                else None,
            )
        )
    facts = optimizer_facts(kinds, groups, moments.families)
    return SourceState.from_facts(
        facts,
        kind=kind,
        path=path,
        items=items,
        mapping=mapping,
        without_state=without,
        evidence=evidence,
        missing=missing,
    )


def trainer_files(directory: str) -> Tuple[str, Optional[str]]:
    """The optimizer file of a Trainer/accelerate checkpoint directory, and an adapter reason if it is a LoRA run."""
    present = [f for f in OPTIMIZER_FILES if os.path.isfile(os.path.join(directory, f))]
    if not present:
        raise CurvatureError(f"{directory}: no optimizer.pt or optimizer.bin in this checkpoint directory")
    if len(present) > 1:
        raise CurvatureError(f"{directory}: holds both {present}; pass the one to export as SOURCE")
    adapters = [f for f in ADAPTER_FILES if os.path.isfile(os.path.join(directory, f))]
    reason = f"{adapters[0]} in {directory}" if adapters else None
    return os.path.join(directory, present[0]), reason


def open_trainer_checkpoint(directory: str, model_path: Optional[str], frozen: Sequence[str] = ()) -> SourceState:
    """A Trainer ``checkpoint-N`` (or accelerate ``save_state``) directory; the model defaults to it."""
    optimizer_file, adapter_reason = trainer_files(directory)
    if model_path is None and os.path.isfile(os.path.join(directory, "config.json")):
        model_path = directory
    return open_torch_state(
        optimizer_file, kind="trainer", model_path=model_path, frozen=frozen, adapter_reason=adapter_reason
    )


_MADV_DONTNEED = 4
_libc: Optional[ctypes.CDLL] = None


def release_mapped(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the resident pages of ``tensors``, which must be views of a read-only file mapping.

    ``torch.load(..., mmap=True)`` maps a whole checkpoint file; every page a tensor's
    data touched stays resident (counted in the process's RSS, though the kernel may
    reclaim it) for as long as any tensor of the file is alive, which for an optimizer
    state dict is the whole export.  After a tensor is written, ``madvise(MADV_DONTNEED)``
    on its pages drops them: they are clean copies of the file (never written to), so a
    later read would simply fault them in again.  Linux only; elsewhere a no-op.
    """
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    for tensor in tensors:
        if tensor.is_meta:  # no data (torchao's flattened shape): nothing mapped
            continue
        start = tensor.data_ptr()
        size = tensor.numel() * tensor.element_size()
        if not size:
            continue
        aligned = start - start % page
        _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + size - aligned), _MADV_DONTNEED)
