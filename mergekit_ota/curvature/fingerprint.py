"""Which weights a curvature store belongs to: a fingerprint of those weights, recorded in the store's header.

A store holds one expert's second moments; given to another expert (or two experts' stores swapped) it merges
silently with the wrong curvature.  So every store written from an optimizer records ``weights_fingerprint``
(:data:`FINGERPRINT_KEY`), and ``check`` and the merge compare it with the expert's weights
(:func:`check_ownership`).

**What is hashed** (:func:`fingerprint`): SHA-256, written ``sha256:<64 hex digits>``, over

* the domain line ``mergekit-ota weights fingerprint 1\\n``, then for every name the store holds (the parameters
  with optimizer state, under their ``named_parameters()`` names), in sorted (Unicode code point) order:
* the name in UTF-8 and ``\\n``; the shape as decimal numbers joined by ``,`` (empty for a 0-d tensor) and ``\\n``;
* for each of the rows ``0``, ``n // 2`` and ``n - 1`` of dim 0 (``n = shape[0]``; each distinct row once, in
  increasing order; a 0-d tensor is one row, its value; an empty tensor has none), the first
  :data:`VALUES_PER_ROW` (64) values of that row in row-major order, each converted to float32 and written as
  4 little-endian bytes.

That is at most 3 * 64 values per tensor: kilobytes for any model, read by slicing (only those rows' bytes).
Converting to float32 is exact from float32, bfloat16 and float16, so the fingerprint is **identical whether
computed from the live parameters** (``save_curvature``, ``CurvatureCallback``: float32, or whatever dtype they
train in) **or from the saved safetensors** holding them (``model.safetensors`` beside the optimizer state, read by
``export``; an expert's weights, read by ``check`` and the merge), as long as the file holds them in the dtype they
had (the Trainer saves them so). Weights saved in another dtype than they trained in (float32 saved as bfloat16)
are other values and give another fingerprint.

**LoRA adapters.** A store exported from a PEFT LoRA run holds curvature of the *folded* weights ``W0 + s B A``,
which its optimizer never saw (it trained ``A`` and ``B``), so it records no ``weights_fingerprint``: export would
have to fold the adapter itself, and a fold is arithmetic whose last bits depend on the kernel and on
``--lora-merge-dtype``, so an honest store would sometimes be called another's. It records instead
:data:`ADAPTER_FINGERPRINT_KEY`, the same fingerprint over **every tensor of the adapter's**
``adapter_model.safetensors`` (``lora_A``/``lora_B`` and ``modules_to_save`` weights: exact values, no
arithmetic). A merge of ``BASE+ADAPTER`` compares it with its adapter's file (:func:`adapter_fingerprint`); an
expert given as a model directory (an adapter folded by hand) has no adapter file to compare: the store is
accepted with a note, as a store without any fingerprint is.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import OTAError
from mergekit_ota.io.handles import read_tensor
from mergekit_ota.io.safetensors import INDEX_SUFFIX, HeaderEntry, read_sharded
from mergekit_ota.store_format import ADAPTER_FINGERPRINT

FINGERPRINT_KEY = "weights_fingerprint"
ADAPTER_FINGERPRINT_KEY = ADAPTER_FINGERPRINT  # the LoRA store's key (store_format, with the other adapter keys)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's adapter weights (export.peft_config.WEIGHTS_FILE)
VALUES_PER_ROW = 64
WEIGHT_FILES = ("model.safetensors" + INDEX_SUFFIX, "model.safetensors")
_DOMAIN = b"mergekit-ota weights fingerprint 1\n"

RowReader = Callable[[str, int], torch.Tensor]  # (name, row of dim 0) -> that row, any float dtype


def fingerprint_rows(shape: Sequence[int]) -> List[int]:
    """The rows of dim 0 that :func:`fingerprint` reads: ``0``, ``n // 2``, ``n - 1`` (distinct, increasing)."""
    if not shape:
        return [0]
    n = int(shape[0])
    return sorted({0, n // 2, n - 1}) if n else []


def fingerprint(shapes: Mapping[str, Sequence[int]], row: RowReader) -> str:
    """The fingerprint (module docstring) of the tensors named in ``shapes``; ``row(name, i)`` gives row ``i``."""
    digest = hashlib.sha256(_DOMAIN)
    for name in sorted(shapes):
        shape = [int(d) for d in shapes[name]]
        digest.update(f"{name}\n{','.join(map(str, shape))}\n".encode("utf-8"))
        for index in fingerprint_rows(shape):
            values = row(name, index).detach().reshape(-1)[:VALUES_PER_ROW].to("cpu", torch.float32)
            digest.update(values.contiguous().numpy().astype("<f4").tobytes())
    return "sha256:" + digest.hexdigest()


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of in-memory tensors (a live model's parameters, by name)."""

    def row(name: str, index: int) -> torch.Tensor:
        tensor = tensors[name].detach()
        return tensor if tensor.dim() == 0 else tensor[index]

    with torch.no_grad():
        return fingerprint({name: tuple(t.shape) for name, t in tensors.items()}, row)


def entries_fingerprint(entries: Mapping[str, HeaderEntry], names: Iterable[str]) -> str:
    """The fingerprint of tensors ``names`` of safetensors files (their header ``entries``); reads only the rows
    hashed. Raises ``KeyError`` for a name the entries lack."""

    def row(name: str, index: int) -> torch.Tensor:
        entry = entries[name]
        return read_tensor(entry) if not entry.shape else read_tensor(entry, index, index + 1)

    return fingerprint({name: entries[name].shape for name in names}, row)


def weight_entries(directory: str) -> Dict[str, HeaderEntry]:
    """The tensors of the model weights in ``directory`` (``model.safetensors[.index.json]``); ``{}`` if none."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return read_sharded(path)[1]
    return {}


def adapter_fingerprint(path: str) -> Optional[str]:
    """The fingerprint of every tensor of a PEFT adapter's weights: ``path`` is ``adapter_model.safetensors`` or
    the directory holding it; ``None`` where there is no such file."""
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_WEIGHTS_FILE)
    if not os.path.isfile(path):
        return None
    entries = read_sharded(path)[1]
    return entries_fingerprint(entries, list(entries))


def weights_beside(source: str, in_parent: bool = False) -> Optional[str]:
    """The directory of the weights an optimizer state at ``source`` belongs to: the file's own directory (a
    Trainer ``checkpoint-N/optimizer.pt``) or the directory ``source`` itself (a model directory), and with
    ``in_parent`` (a state folder: DCP, DeepSpeed) also the checkpoint directory holding it; ``None`` where none
    holds ``model.safetensors[.index.json]``."""
    if os.path.isdir(source):
        candidates = [source] + ([os.path.dirname(os.path.abspath(source))] if in_parent else [])
    elif os.path.isfile(source):
        candidates = [os.path.dirname(os.path.abspath(source))]
    else:
        return None
    for directory in candidates:
        if any(os.path.isfile(os.path.join(directory, name)) for name in WEIGHT_FILES):
            return directory
    return None


def fingerprint_beside(source: str, names: Sequence[str], in_parent: bool = False) -> Optional[str]:
    """The fingerprint of the weights beside optimizer state ``source`` (:func:`weights_beside`) over ``names``;
    ``None`` where there are none, or they lack one of ``names`` (then they are not the weights of this state)."""
    directory = weights_beside(source, in_parent)
    if directory is None:
        return None
    entries = weight_entries(directory)
    if any(name not in entries for name in names):
        return None
    return entries_fingerprint(entries, names)


# ----------------------------------------------------------------------------- checking a merge's stores


@dataclass
class Ownership:
    """What :func:`check_ownership` found: ``problems`` (refused), ``warnings`` and ``notes``."""

    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


WeightsOf = Callable[[str], Mapping[str, HeaderEntry]]  # expert -> its weights' header entries by name
AdapterOf = Callable[[str], Optional[str]]  # expert -> its adapter's fingerprint (None: not BASE+ADAPTER, or no file)


def _no_adapter(expert: str) -> Optional[str]:
    return None


def check_ownership(
    uses: Sequence[Tuple[str, str, Mapping[str, str], Sequence[str]]],
    weights_of: WeightsOf,
    adapter_of: AdapterOf = _no_adapter,
) -> Ownership:
    """Whether each store belongs to the expert it is given to.

    ``uses``: per expert, ``(expert, store path, store metadata, store tensor names)``; ``weights_of(expert)``:
    that expert's weight entries; ``adapter_of(expert)``: the fingerprint of its adapter's file where the expert
    is ``BASE+ADAPTER`` with a local adapter (:func:`adapter_fingerprint`), else ``None``. One store file given to
    two experts is a problem (each expert's curvature is its own optimizer's); a recorded fingerprint that differs
    from the expert's weights' (a LoRA store's: from its adapter's) is a warning naming both (and, where it is
    another expert's, that one: swapped stores); a store recording none, or a LoRA store given to an expert
    without its adapter to compare, is accepted with a note.
    """
    found = Ownership()
    _check_shared(found, uses)
    cache: Dict[Tuple[str, Tuple[str, ...]], Optional[str]] = {}

    def actual(expert: str, names: Tuple[str, ...]) -> Optional[str]:
        if (expert, names) not in cache:
            entries = weights_of(expert)
            cache[(expert, names)] = (
                entries_fingerprint(entries, names) if entries and all(n in entries for n in names) else None
            )
        return cache[(expert, names)]

    adapters: Dict[str, Optional[str]] = {}

    def adapter(expert: str) -> Optional[str]:
        if expert not in adapters:
            adapters[expert] = adapter_of(expert)
        return adapters[expert]

    experts = list(dict.fromkeys(expert for expert, _, _, _ in uses))
    for expert, path, metadata, store_names in uses:
        origin = metadata.get("source_path")
        written = f" (written from {origin})" if origin else ""
        if metadata.get(ADAPTER_FINGERPRINT_KEY):
            _check_adapter(found, expert, path, written, metadata[ADAPTER_FINGERPRINT_KEY], experts, adapter)
        elif not metadata.get(FINGERPRINT_KEY):
            found.notes.append(
                f"store {path} (expert {expert}) records no {FINGERPRINT_KEY} (written by hand or by an older "
                f"mergekit-ota): that it holds {expert}'s curvature is not checked"
            )
        else:
            names = tuple(sorted(store_names))
            _check_weights(found, expert, path, written, metadata[FINGERPRINT_KEY], names, experts, actual)
    return found


def _check_shared(found: Ownership, uses: Sequence[Tuple[str, str, Mapping[str, str], Sequence[str]]]) -> None:
    """:func:`check_ownership`'s problem: one store file (by real path) given to two experts."""
    holders: Dict[str, List[Tuple[str, str]]] = {}
    for expert, path, _, _ in uses:
        holders.setdefault(os.path.realpath(path), []).append((expert, path))
    for owners in holders.values():
        experts = list(dict.fromkeys(expert for expert, _ in owners))
        if len(experts) > 1:
            found.problems.append(
                f"{owners[0][1]}: one curvature store is given to {len(experts)} experts ({', '.join(experts)}); "
                f"each expert needs its own (its own optimizer's second moments): give each its store"
            )


def _check_weights(
    found: Ownership,
    expert: str,
    path: str,
    written: str,
    recorded: str,
    names: Tuple[str, ...],
    experts: Sequence[str],
    actual: Callable[[str, Tuple[str, ...]], Optional[str]],
) -> None:
    """:func:`check_ownership` for a store recording :data:`FINGERPRINT_KEY`: ``actual(expert, names)`` is the
    fingerprint of that expert's weights ``names`` (``None``: it lacks some)."""
    try:
        own = actual(expert, names)
    except OTAError as error:
        found.warnings.append(f"store {path}: expert {expert}'s weights could not be fingerprinted ({error})")
        return
    if own == recorded:
        return
    if own is None:
        found.warnings.append(
            f"store {path}{written} was recorded for other weights than expert {expert}'s: {expert}'s "
            f"safetensors weights lack some of its {len(names)} tensors; is it this expert's store?"
        )
        return
    others = [other for other in experts if other != expert and actual(other, names) == recorded]
    if others:
        found.warnings.append(
            f"store {path}{written} is given to expert {expert} but holds the curvature of expert {others[0]}'s "
            f"weights (its {FINGERPRINT_KEY} is theirs): were the two experts' stores swapped?"
        )
    else:
        found.warnings.append(
            f"store {path}{written} was recorded for other weights than expert {expert}'s ({FINGERPRINT_KEY} "
            f"{recorded[:19]}..., {expert}'s weights {own[:19]}...): is it this expert's store, from the "
            f"checkpoint these weights were saved from?"
        )


def _check_adapter(
    found: Ownership,
    expert: str,
    path: str,
    written: str,
    recorded: str,
    experts: Sequence[str],
    adapter: AdapterOf,
) -> None:
    """:func:`check_ownership` for a LoRA store (it records :data:`ADAPTER_FINGERPRINT_KEY`)."""
    try:
        own = adapter(expert)
    except OTAError as error:
        found.warnings.append(f"store {path}: expert {expert}'s adapter could not be fingerprinted ({error})")
        return
    if own is None:
        found.notes.append(
            f"store {path} (expert {expert}) holds a LoRA adapter's curvature and expert {expert} is not given as "
            f"BASE+ADAPTER with a local adapter directory ({ADAPTER_WEIGHTS_FILE}): that it holds {expert}'s "
            f"curvature is not checked (give the expert as 'model: BASE+ADAPTER' to check it against the adapter)"
        )
        return
    if own == recorded:
        return
    others = [other for other in experts if other != expert and adapter(other) == recorded]
    if others:
        found.warnings.append(
            f"store {path}{written} is given to expert {expert} but holds the curvature of expert {others[0]}'s "
            f"adapter (its {ADAPTER_FINGERPRINT_KEY} is theirs): were the two experts' stores swapped?"
        )
    else:
        found.warnings.append(
            f"store {path}{written} was recorded for another adapter than expert {expert}'s "
            f"({ADAPTER_FINGERPRINT_KEY} {recorded[:19]}..., {expert}'s {ADAPTER_WEIGHTS_FILE} {own[:19]}...): is "
            f"it this adapter's store, from the checkpoint this adapter was saved from?"
        )
