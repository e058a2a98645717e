"""DeepSpeed universal checkpoints (the output of ``ds_to_universal``), read one parameter at a time.

Layout (DeepSpeed ``checkpoint/ds_to_universal.py``): ``<dir>/zero/<param name>/`` holds
``fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` (each ``torch.save`` of
``{"param": tensor, "cat_dim": int, ...}``; a bare tensor is accepted too) and
``step.pt``; ``<dir>/zero/optimizer_state.pt`` holds the base optimizer's
``param_groups`` (``betas``).  Conversions of ZeRO-3 checkpoints keep each state flat (a bare
1-D tensor); its shape comes from the ``param_shapes`` of the ``*_model_states.pt`` that
``ds_to_universal`` writes beside ``zero/``, else from ``--model``.  Native ZeRO checkpoints (``global_step*/`` with
flat
partitions) are read by :mod:`mergekit_ota.export.zero`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export import fields
from mergekit_ota.export.mapping import BASIS_DIRECTORY_NAMES, NameEvidence
from mergekit_ota.export.model_params import check_against_model, clean_name, load_model_parameters, model_order
from mergekit_ota.export.moments import Full, SourceState, StateItem
from mergekit_ota.export.optimizer_states import check_second_moments, group_beta2, refuse_adapters, scalar
from mergekit_ota.export.torch_optim import load_torch_file

ZERO_DIR = "zero"
MOMENT_FILE = "exp_avg_sq.pt"
_STATE_FILES = ("exp_avg_sq.pt", "exp_avg.pt", "fp32.pt", "step.pt")


def _has_param_dirs(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, d, f)) for d in os.listdir(directory) for f in _STATE_FILES)


def find_zero_dir(path: str) -> Optional[str]:
    """The ``zero/`` directory of a universal checkpoint at ``path`` (or ``path`` itself), else ``None``."""
    if not os.path.isdir(path):
        return None
    zero = os.path.join(path, ZERO_DIR)
    if os.path.isdir(zero) and _has_param_dirs(zero):
        return zero
    if os.path.basename(os.path.normpath(path)) == ZERO_DIR and _has_param_dirs(path):
        return path
    return None


def _tensor(value: Any, path: str) -> Any:
    """The saved tensor: a bare tensor, or the ``param`` of ds_to_universal's dict (:func:`fields.tensor`)."""
    if isinstance(value, Mapping):
        if "param" not in value:
            raise CurvatureError(
                f"{path}: expected a tensor or a dict with a 'param' tensor (ds_to_universal's layout)"
            )
        return fields.tensor(value["param"], f"{path} 'param'")
    return fields.tensor(value, path)


def _optimizer_state(zero: str, notes: List[str]) -> Tuple[Optional[float], Optional[float]]:
    """``(beta2, step)`` from ``zero/optimizer_state.pt``: the param groups' betas, and the one step its
    embedded optimizer state records (ZeRO-3 conversions write no ``step.pt``); ``None`` where unknown."""
    path = os.path.join(zero, "optimizer_state.pt")
    if not os.path.isfile(path):
        notes.append(f"no {path}: beta2 is not recorded")
        return None, None
    try:
        saved = load_torch_file(path, deepspeed=True)[0]
    except CurvatureError as error:
        notes.append(f"beta2 not recorded: {error}")
        return None, None
    saved = fields.mapping(saved, path)
    groups = fields.sequence(saved.get("param_groups") or [], f"{path} 'param_groups'")
    inner = saved.get("optimizer_state_dict")
    state = inner.get("state") if isinstance(inner, Mapping) else None
    steps = (
        {scalar(s.get("step"), f"{path} state[{k!r}]['step']") for k, s in state.items() if isinstance(s, Mapping)}
        if isinstance(state, Mapping)
        else set()
    )
    step = steps.pop() if len(steps) == 1 else None
    values = {group_beta2(g, f"{path} param_groups[{i}]") for i, g in enumerate(groups)} - {None}
    if len(values) != 1:
        notes.append(f"{path}: param groups have betas {sorted(values)}; beta2 is not recorded")
        return None, step
    return values.pop(), step


def _known_shapes(zero: str, model_path: Optional[str], frozen: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """Parameter shapes from the universal checkpoint's own model states (``param_shapes``), else the model."""
    top = os.path.dirname(zero)
    for file in sorted(f for f in os.listdir(top) if f.endswith("_model_states.pt")) if os.path.isdir(top) else []:
        try:
            value = load_torch_file(os.path.join(top, file), deepspeed=True)[0]
            groups = value.get("param_shapes") if isinstance(value, dict) else None
        except CurvatureError:
            groups = None
        if isinstance(groups, (list, tuple)):
            where = f"{os.path.join(top, file)} param_shapes"
            return {
                clean_name(str(n)): fields.shape(s, f"{where}[{i}][{n!r}]")
                for i, g in enumerate(groups)
                for n, s in fields.mapping(g, f"{where}[{i}]").items()
            }
    if model_path is not None:
        return dict(load_model_parameters(model_path, frozen).parameters)
    return {}


def open_universal(path: str, model_path: Optional[str], frozen: Sequence[str] = ()) -> SourceState:
    """Check a universal checkpoint; names are its parameter directories (verified against ``model_path`` if given)."""
    zero = find_zero_dir(path)
    if zero is None:
        raise CurvatureError(f"{path}: not a DeepSpeed universal checkpoint (no zero/<param>/exp_avg_sq.pt)")
    dirs = sorted(d for d in os.listdir(zero) if os.path.isdir(os.path.join(zero, d)))
    states = {
        d: [f[: -len(".pt")] for f in os.listdir(os.path.join(zero, d)) if f.endswith(".pt") and f != "fp32.pt"]
        for d in dirs
    }
    states = {d: keys for d, keys in states.items() if keys or os.path.isfile(os.path.join(zero, d, "fp32.pt"))}
    names = {d: clean_name(d) for d in states}
    refuse_adapters(list(names.values()), zero)
    kinds = check_second_moments({names[d]: keys for d, keys in states.items()}, zero)
    if any(kind != "full" for kind in kinds.values()):
        raise CurvatureError(f"{zero}: only exp_avg_sq.pt states are supported in universal checkpoints")
    dir_of = {names[d]: d for d in states}
    shapes, steps = {}, {}
    known = _known_shapes(zero, model_path, frozen)
    for name in kinds:
        file = os.path.join(zero, dir_of[name], MOMENT_FILE)
        saved = tuple(_tensor(load_torch_file(file, deepspeed=True)[0], file).shape)
        shape = known.get(name)
        # ZeRO-3 conversions keep each state flat; the saved param_shapes (or the model) give its shape
        shapes[name] = shape if shape is not None and len(saved) == 1 and math.prod(shape) == saved[0] else saved
        step_file = os.path.join(zero, dir_of[name], "step.pt")
        steps[name] = (
            scalar(load_torch_file(step_file, deepspeed=True)[0], step_file) if os.path.isfile(step_file) else None
        )
    notes: List[str] = []
    beta2, common_step = _optimizer_state(zero, notes)
    steps = {name: common_step if step is None else step for name, step in steps.items()}

    params, without, mapping = check_against_model(
        shapes, model_path, frozen, zero, "parameter directories of the universal checkpoint"
    )

    def load(name: str) -> Full:
        file = os.path.join(zero, dir_of[name], MOMENT_FILE)
        return Full(_tensor(load_torch_file(file, deepspeed=True)[0], file).reshape(shapes[name]))

    items = [
        StateItem(
            name=name,
            shape=shapes[name],
            load=(lambda n=name: load(n)),
            origin=os.path.join(zero, dir_of[name], MOMENT_FILE),
            step=steps[name],
            beta2=beta2,
        )
        for name in model_order(list(kinds), params)
    ]
    return SourceState(
        kind="deepspeed-universal",
        path=os.path.dirname(zero) if os.path.basename(zero) == ZERO_DIR else zero,
        optimizer="Adam (DeepSpeed)",
        items=items,
        mapping=mapping,
        without_state=without,
        notes=notes,
        evidence=NameEvidence(BASIS_DIRECTORY_NAMES),
    )
