"""DeepSpeed universal checkpoints (the output of ``ds_to_universal``), read one parameter at a time.

Layout (DeepSpeed ``checkpoint/ds_to_universal.py``): ``<dir>/zero/<param name>/`` holds
``fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt`` (each ``torch.save`` of
``{"param": tensor, "cat_dim": int, ...}``; a bare tensor is accepted too) and
``step.pt``; ``<dir>/zero/optimizer_state.pt`` holds the base optimizer's
``param_groups`` (``betas``).  Raw ZeRO checkpoints (``global_step*/`` with flat
partitions) are refused: convert them with ``ds_to_universal`` first
(``zero_to_fp32`` drops the optimizer moments).
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.mapping import BASIS_DIRECTORY_NAMES, NameEvidence
from mergekit_ota.export.model_params import check_against_model, clean_name, model_order
from mergekit_ota.export.source import Full, SourceState, StateItem
from mergekit_ota.export.states import check_second_moments, group_beta2, refuse_adapters, scalar
from mergekit_ota.export.torch_state import load_torch_file

ZERO_DIR = "zero"
MOMENT_FILE = "exp_avg_sq.pt"
_STATE_FILES = ("exp_avg_sq.pt", "exp_avg.pt", "fp32.pt", "step.pt")


def _has_param_dirs(directory: str) -> bool:
    return any(
        os.path.isfile(os.path.join(directory, d, f)) for d in os.listdir(directory) for f in _STATE_FILES
    )  # fmt: skip


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


def raw_zero_dirs(path: str) -> List[str]:
    """``global_step*`` subdirectories of a raw (not universal) DeepSpeed checkpoint."""
    if not os.path.isdir(path):
        return []
    return sorted(d for d in os.listdir(path) if d.startswith("global_step") and os.path.isdir(os.path.join(path, d)))


def _tensor(value: Any, path: str) -> Any:
    import torch

    if isinstance(value, dict) and isinstance(value.get("param"), torch.Tensor):
        return value["param"]
    if isinstance(value, torch.Tensor):
        return value
    raise CurvatureError(f"{path}: expected a tensor or a dict with a 'param' tensor (ds_to_universal's layout)")


def _beta2(zero: str, notes: List[str]) -> Optional[float]:
    path = os.path.join(zero, "optimizer_state.pt")
    if not os.path.isfile(path):
        notes.append(f"no {path}: beta2 is not recorded")
        return None
    try:
        groups = load_torch_file(path)[0].get("param_groups") or []
    except (CurvatureError, AttributeError) as error:
        notes.append(f"beta2 not recorded: {error}")
        return None
    values = {group_beta2(g) for g in groups} - {None}
    if len(values) != 1:
        notes.append(f"{path}: param groups have betas {sorted(values)}; beta2 is not recorded")
        return None
    return values.pop()


def open_universal(path: str, model_path: Optional[str], frozen: Sequence[str] = ()) -> SourceState:
    """Check a universal checkpoint; names are its parameter directories (verified against ``model_path`` if given)."""
    zero = find_zero_dir(path)
    if zero is None:
        raise CurvatureError(f"{path}: not a DeepSpeed universal checkpoint (no zero/<param>/exp_avg_sq.pt)")
    dirs = sorted(d for d in os.listdir(zero) if os.path.isdir(os.path.join(zero, d)))
    states = {
        d: [f[: -len(".pt")] for f in os.listdir(os.path.join(zero, d)) if f.endswith(".pt") and f != "fp32.pt"]
        for d in dirs
    }  # fmt: skip
    states = {d: keys for d, keys in states.items() if keys or os.path.isfile(os.path.join(zero, d, "fp32.pt"))}
    names = {d: clean_name(d) for d in states}
    refuse_adapters(list(names.values()), zero)
    kinds = check_second_moments({names[d]: keys for d, keys in states.items()}, zero)
    if any(kind != "full" for kind in kinds.values()):
        raise CurvatureError(f"{zero}: only exp_avg_sq.pt states are supported in universal checkpoints")
    dir_of = {names[d]: d for d in states}
    shapes, steps = {}, {}
    for name in kinds:
        file = os.path.join(zero, dir_of[name], MOMENT_FILE)
        shapes[name] = tuple(_tensor(load_torch_file(file)[0], file).shape)
        step_file = os.path.join(zero, dir_of[name], "step.pt")
        steps[name] = scalar(load_torch_file(step_file)[0]) if os.path.isfile(step_file) else None
    notes: List[str] = []
    beta2 = _beta2(zero, notes)

    params, without, mapping = check_against_model(
        shapes, model_path, frozen, zero, "parameter directories of the universal checkpoint"
    )

    def load(name: str) -> Full:
        file = os.path.join(zero, dir_of[name], MOMENT_FILE)
        return Full(_tensor(load_torch_file(file)[0], file))

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


def refuse_raw_zero(path: str, steps: List[str]) -> None:
    """A raw ZeRO checkpoint: its moments are flat partitions; say how to convert it."""
    raise CurvatureError(
        f"{path}: a raw DeepSpeed ZeRO checkpoint ({', '.join(steps[:3])}): its optimizer moments are flat "
        f"partitions per rank. Convert it with DeepSpeed's ds_to_universal "
        f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {os.path.join(path, steps[-1])} "
        f"--output_folder OUT) and export OUT; zero_to_fp32 drops the moments"
    )

