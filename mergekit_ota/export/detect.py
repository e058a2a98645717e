"""Which kind of source a path is, and opening it with the right reader.

Auto-detection, first match wins:

* a ``.safetensors`` / ``.safetensors.index.json`` file: ``store``; one rank file of a DeepSpeed ZeRO
  checkpoint (``*_optim_states.pt``, ``*_model_states.pt``): refused, naming its directory; a DCP ``.metadata``
  file: ``dcp``; any other file: ``torch`` (a ``torch.save`` of an optimizer state dict);
* a directory with ``.metadata``: ``dcp``; with ``zero/<param>/exp_avg_sq.pt``: ``deepspeed-universal``;
  with ``optimizer.pt`` / ``optimizer.bin``: ``trainer`` (read as a LoRA run, :mod:`mergekit_ota.export.lora`,
  where ``adapter_config.json`` is beside it, also when that ``optimizer.pt`` is given itself); with an
  ``optimizer*/.metadata`` subdirectory: ``dcp``; with ``exp_avg_sq.safetensors[.index.json]``: ``store``;
  with ``global_step*/`` tag directories (the one ``latest`` names, or the only one), or being one:
  ``deepspeed``, the native ZeRO checkpoint, read as it is with all its ranks (:mod:`mergekit_ota.export.zero`;
  nothing to convert first);
* a training run's output directory with ``checkpoint-N/`` subdirectories: refused, naming the newest with the
  command to run; a Trainer checkpoint saved without its optimizer: refused, saying so.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Optional

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.dcp import METADATA_FILE, find_dcp_dir, open_dcp
from mergekit_ota.export.from_store import open_store
from mergekit_ota.export.lora import is_lora_checkpoint, open_lora_checkpoint, open_lora_zero
from mergekit_ota.export.moments import SourceState
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.torch_optim import ADAPTER_FILES, OPTIMIZER_FILES, open_torch_state, open_trainer_checkpoint
from mergekit_ota.export.universal import find_zero_dir, open_universal
from mergekit_ota.export.zero import find_step_dir, open_zero
from mergekit_ota.io.paths import regular_file
from mergekit_ota.store_format import DEFAULT_STORE_NAME, INDEX_SUFFIX

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def detect_kind(path: str) -> str:
    """The source kind of ``path`` (see the module docstring); raises naming what was found."""
    if not os.path.exists(path):
        raise CurvatureError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        regular_file(path, "checkpoint file or directory")  # a FIFO or device would block its reader
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith(".safetensors") or name.endswith(".safetensors" + INDEX_SUFFIX):
            return "store"
        if name.endswith("_optim_states.pt") or name.endswith("_model_states.pt"):
            raise CurvatureError(
                f"{path}: one file of a DeepSpeed ZeRO checkpoint; export reads all ranks together: "
                f"pass its directory ({os.path.dirname(path)}) or the checkpoint directory above it"
            )
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
    if find_step_dir(path):
        return "deepspeed"
    newest = newest_checkpoint(path)
    if newest is not None:
        raise CurvatureError(
            f"{path}: no optimizer state here (a training run's output directory: the final save keeps only the "
            f"model); its newest checkpoint is {newest}: mergekit-ota export {newest} "
            f"{os.path.join(newest, DEFAULT_STORE_NAME)}"
        )
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CurvatureError(
            f"{path}: a Trainer checkpoint without optimizer state (no optimizer.pt/.bin, no DeepSpeed global_step*/, "
            f"no optimizer*/ DCP directory): it was saved with save_only_model=True, or its optimizer files were "
            f"removed. Export needs a checkpoint saved with its optimizer"
        )
    entries = sorted(os.listdir(path))
    listing = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "") if entries else "nothing"
    raise CurvatureError(
        f"{path}: no optimizer state found (it holds {listing}). Expected optimizer.pt/optimizer.bin (Trainer, "
        "accelerate), "
        f"a torch.distributed.checkpoint directory (.metadata), a DeepSpeed ZeRO checkpoint (latest + global_step*/), "
        f"a DeepSpeed universal checkpoint (zero/), or a curvature store; --source-kind forces a kind"
    )


def newest_checkpoint(path: str) -> Optional[str]:
    """The ``checkpoint-N`` subdirectory of ``path`` with the largest ``N``, if any."""
    found = [
        (int(m.group(1)), d)
        for d in os.listdir(path)
        if (m := _CHECKPOINT.match(d)) and os.path.isdir(os.path.join(path, d))
    ]
    return os.path.join(path, max(found)[1]) if found else None


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
    if kind == "deepspeed":
        if is_lora_checkpoint(path) or is_lora_checkpoint(os.path.dirname(path)):
            return open_lora_zero(path, model, frozen)  # a PEFT run under ZeRO: the adapter's files beside
        if model is None and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
            model = path  # a Trainer checkpoint-N/ holds the model's config beside global_stepN/
        return open_zero(path, model, frozen)
    if kind == "trainer" and os.path.isdir(path):
        if is_lora_checkpoint(path):
            return open_lora_checkpoint(path, model, frozen)
        return open_trainer_checkpoint(path, model, frozen)
    if os.path.isdir(path):
        raise CurvatureError(f"{path}: --source-kind torch needs a file (a torch.save of an optimizer state dict)")
    beside = os.path.dirname(path)
    if os.path.basename(path) in OPTIMIZER_FILES and is_lora_checkpoint(beside):
        return open_lora_checkpoint(beside, model, frozen)  # a PEFT checkpoint's optimizer.pt: read with its adapter
    if kind == "trainer" and model is None and os.path.isfile(os.path.join(beside, "config.json")):
        model = beside  # checkpoint-N/optimizer.pt given directly
    adapters = [f for f in ADAPTER_FILES if os.path.isfile(os.path.join(beside, f))]
    reason = f"{adapters[0]} beside {os.path.basename(path)}" if adapters else None
    return open_torch_state(path, kind=kind, model_path=model, frozen=frozen, adapter_reason=reason)


_KIND_NAMES = {
    "trainer": "Trainer/accelerate",
    "torch": "a torch.save of optimizer state",
    "dcp": "torch.distributed.checkpoint",
    "deepspeed": "DeepSpeed ZeRO",
    "deepspeed-universal": "DeepSpeed universal",
}


def export_hint(path: str, base: Optional[str] = None) -> Optional[str]:
    """What to run when ``path`` was given as a curvature store but is a checkpoint export reads.

    ``None`` when ``path`` is a store or not a checkpoint at all; else a sentence with the command
    filled in (``mergekit-ota export SOURCE SOURCE/exp_avg_sq.safetensors``), or, for a training run's
    output directory, the advice naming its newest checkpoint. ``base``: the base model of a ``BASE+ADAPTER``
    expert, added as ``--model BASE`` where ``path`` is a PEFT LoRA checkpoint (export lays the adapter over it).
    """
    if os.path.isfile(path) and not os.path.basename(path).endswith((".pt", ".bin", ".pth", ".metadata")):
        return None
    try:
        kind = detect_kind(path)
    except CurvatureError as error:
        return str(error) if "newest checkpoint" in str(error) else None
    if kind == "store":
        return None
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.basename(os.path.normpath(directory)).startswith("global_step"):
        directory = os.path.dirname(os.path.normpath(directory))  # the store goes beside the model, not in the tag
    out = os.path.join(directory, DEFAULT_STORE_NAME)
    model = f" --model {shlex.quote(base)}" if base and is_lora_checkpoint(directory) else ""
    return (
        f"{path} is an optimizer checkpoint ({_KIND_NAMES.get(kind, kind)}), not a curvature store: run "
        f"`mergekit-ota export {shlex.quote(path)} {shlex.quote(out)}{model}` first"
    )
