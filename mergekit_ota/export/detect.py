"""Which kind of source a path is, and opening it with the right reader.

Auto-detection, first match wins:

* a ``.safetensors`` / ``.safetensors.index.json`` file: ``store``; a DCP ``.metadata`` file: ``dcp``;
  any other file: ``torch`` (a ``torch.save`` of an optimizer state dict);
* a directory with ``.metadata``: ``dcp``; with ``zero/<param>/exp_avg_sq.pt``: ``deepspeed-universal``;
  with ``optimizer.pt`` / ``optimizer.bin``: ``trainer``; with an ``optimizer*/.metadata``
  subdirectory: ``dcp``; with ``exp_avg_sq.safetensors[.index.json]``: ``store``;
  with ``global_step*/``: refused (raw DeepSpeed ZeRO, convert it first).
"""

from __future__ import annotations

import os

from mergekit_ota.curvature.locate import DEFAULT_STORE_NAME, INDEX_SUFFIX
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.dcp import METADATA_FILE, find_dcp_dir, open_dcp
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.source import SourceState
from mergekit_ota.export.store_source import open_store
from mergekit_ota.export.torch_state import OPTIMIZER_FILES, open_torch_state, open_trainer_checkpoint
from mergekit_ota.export.universal import find_zero_dir, open_universal, raw_zero_dirs, refuse_raw_zero


def detect_kind(path: str) -> str:
    """The source kind of ``path`` (see the module docstring); raises naming what was found."""
    if not os.path.exists(path):
        raise CurvatureError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith(".safetensors") or name.endswith(".safetensors" + INDEX_SUFFIX):
            return "store"
        return "dcp" if name == METADATA_FILE else "torch"
    if os.path.isfile(os.path.join(path, METADATA_FILE)):
        return "dcp"
    if find_zero_dir(path):
        return "deepspeed-universal"
    if any(os.path.isfile(os.path.join(path, f)) for f in OPTIMIZER_FILES):
        return "trainer"
    if find_dcp_dir(path):
        return "dcp"
    if any(os.path.isfile(os.path.join(path, f)) for f in (DEFAULT_STORE_NAME, DEFAULT_STORE_NAME + INDEX_SUFFIX)):
        return "store"
    steps = raw_zero_dirs(path)
    if steps:
        refuse_raw_zero(path, steps)
    entries = sorted(os.listdir(path))
    listing = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "") if entries else "nothing"
    raise CurvatureError(
        f"{path}: no optimizer state found (it holds {listing}). Expected optimizer.pt/optimizer.bin (Trainer, accelerate), "
        f"a torch.distributed.checkpoint directory (.metadata), a DeepSpeed universal checkpoint (zero/), "
        f"or a curvature store; --source-kind forces a kind"
    )


def open_source(path: str, options: ExportOptions) -> SourceState:
    """Open and check ``path`` as ``options.source_kind`` (auto-detected if unset)."""
    path = os.path.abspath(os.path.expanduser(path))
    kind = options.source_kind or detect_kind(path)
    model, frozen = options.model, options.frozen
    if kind == "store":
        return open_store(path, model, frozen)
    if kind == "dcp":
        return open_dcp(os.path.dirname(path) if os.path.isfile(path) else path, model, frozen)
    if kind == "deepspeed-universal":
        return open_universal(path, model, frozen)
    if kind == "trainer" and os.path.isdir(path):
        return open_trainer_checkpoint(path, model, frozen)
    if os.path.isdir(path):
        raise CurvatureError(f"{path}: --source-kind torch needs a file (a torch.save of an optimizer state dict)")
    beside = os.path.dirname(path)
    if kind == "trainer" and model is None and os.path.isfile(os.path.join(beside, "config.json")):
        model = beside  # checkpoint-N/optimizer.pt given directly
    return open_torch_state(path, kind=kind, model_path=model, frozen=frozen)
