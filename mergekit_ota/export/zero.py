"""Native DeepSpeed ZeRO checkpoints (stages 1, 2, 3 and DeepSpeed's ``BF16_Optimizer``), read without DeepSpeed.

Where they are
--------------
``engine.save_checkpoint(dir)`` (and the HF Trainer, into ``checkpoint-N/``) writes ``dir/latest``
(the tag, e.g. ``global_step300``) and ``dir/<tag>/``, which holds per data-parallel rank ``r``
``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` and the model states:
``mp_rank_00_model_states.pt`` (stages 1/2) or ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``
(stage 3).  The model states' ``param_shapes`` list, per flat group, the trainable parameters'
names and shapes in flattening order; ``frozen_param_shapes`` the frozen ones (no optimizer state).

How a parameter's ``exp_avg_sq`` is laid out (``w`` ranks)
----------------------------------------------------------
* **Stages 1 and 2, and ``BF16_Optimizer``** (bf16 + ``grad_accum_dtype: fp32`` on stage 1; its files
  have no ``zero_stage``): each param group's parameters are flattened in order, parameter ``k``
  followed by ``param_alignment_paddings[g][k]`` zeros, and the group padded to a multiple of
  ``2 * w``; rank ``r`` keeps the ``r``-th of ``w`` equal slices.  Its Adam state is either a torch
  optimizer state dict (``base_optimizer_state["state"][g]["exp_avg_sq"]``: the rank's slice, rigid)
  or a list of per-group dicts with the tail padding cut off (``elastic_checkpoint``).
  ``param_slice_mappings[g][name]`` (a ``fragment_address(numel, start)``) places the parameter's
  piece in the rank's slice; its pieces in rank order are its elements.  The same places follow
  from ``param_shapes`` and the paddings (``zero_to_fp32``'s walk); both are computed and must agree
  (the walk alone serves checkpoints without ``param_slice_mappings``).
* **Stage 3**: every parameter is partitioned on its own: each rank holds ``ceil(n / w)`` of its
  ``n`` elements (the last rank's piece padded), and a rank's flat sub-group is its pieces of the
  sub-group's parameters in order (``optimizer_state_dict["state"][i]["exp_avg_sq"]`` for sub-group
  ``i``; ``sub_group_size`` sets how many parameters a sub-group has, one each with ``0``).
  ``param_shapes`` has one entry per sub-group; parameter ``p`` of sub-group ``i`` starts at the same
  offset on every rank (the sum of ``ceil(n_q / w)`` over the parameters before it).

Reading
-------
Files are loaded with ``torch.load(mmap=True, weights_only=True)`` and the exact stand-ins of
:data:`mergekit_ota.io.unpickle.DEEPSPEED_STAND_INS` (``ZeroStageEnum``, ``fragment_address``, the
loss scalers); nothing of DeepSpeed is imported.  Headers and shapes are checked first; then each
parameter is assembled on its own from its ``exp_avg_sq`` pieces (``torch.cat`` of views of the
mapped files), so memory stays near the largest parameter; the fp32 master weights and
``exp_avg`` are never read.  Refused, naming what was found: tensor or pipeline parallelism
(``mp_rank_01``, ``layer_*`` files), MoE expert files, a rank count that disagrees with
``partition_count``, ranks that disagree with each other.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export import fields
from mergekit_ota.export.mapping import BASIS_PARAM_SHAPES, NameEvidence
from mergekit_ota.export.model_params import check_against_model, clean_name, model_order
from mergekit_ota.export.moments import Full, SourceState, StateItem
from mergekit_ota.export.optimizer_states import (
    FULL,
    check_second_moments,
    group_beta2,
    optimizer_name,
    refuse_adapters,
    scalar,
)
from mergekit_ota.export.torch_optim import load_torch_file, release_mapped
from mergekit_ota.io.paths import contained

LATEST_FILE = "latest"
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_PIPELINE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$|^layer_\d+")
_MOE = re.compile(r"expp_rank_|_expert_\d+_")

Piece = Tuple[int, int, int]  # (rank, start in that rank's flat tensor, numel)


def _tensor_files(directory: str) -> List[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".pt") and os.path.isfile(os.path.join(directory, f)))


def is_zero_step_dir(path: str) -> bool:
    """Whether ``path`` is a ``global_stepN``-style directory holding ZeRO optimizer files."""
    return os.path.isdir(path) and any(_OPTIM.match(f) for f in os.listdir(path))


def step_dirs(path: str) -> List[str]:
    """Subdirectories of ``path`` that hold ZeRO optimizer files, by name."""
    if not os.path.isdir(path):
        return []
    return sorted(d for d in os.listdir(path) if is_zero_step_dir(os.path.join(path, d)))


def find_step_dir(path: str) -> Optional[str]:
    """The ZeRO tag directory for ``path``: ``path`` itself, the one its ``latest`` names, or its only one.

    ``None`` when ``path`` holds no ZeRO checkpoint.  Raises when ``latest`` names something that is
    not a ZeRO tag directory inside ``path``, or when several tags exist and no ``latest`` chooses.
    """
    if is_zero_step_dir(path):
        return path
    if not os.path.isdir(path):
        return None
    latest = os.path.join(path, LATEST_FILE)
    tags = step_dirs(path)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8", errors="replace") as fp:
            tag = fp.read(4096).strip()
        chosen = contained(path, tag, latest)
        if not is_zero_step_dir(chosen):
            found = f"; it holds {', '.join(tags)}" if tags else ""
            raise CurvatureError(
                f"{latest}: names '{tag}', which is not a directory of ZeRO optimizer files here{found}"
            )
        return chosen
    if len(tags) == 1:
        return os.path.join(path, tags[0])
    if len(tags) > 1:
        raise CurvatureError(
            f"{path}: holds several DeepSpeed checkpoints ({', '.join(tags)}) and no 'latest' file; "
            f"pass the one to export, e.g. {os.path.join(path, tags[-1])}"
        )
    return None


@dataclass
class _Rank:
    """One rank's optimizer file: its per-flat-group ``exp_avg_sq`` (and step), and its fragment map."""

    file: str
    moments: List[torch.Tensor]
    steps: List[Optional[float]]
    mappings: Optional[List[Mapping[str, Any]]] = None


def _refuse_parallelism(directory: str, files: Sequence[str]) -> None:
    pipeline = [f for f in files if _PIPELINE.match(f)]
    if pipeline:
        raise CurvatureError(
            f"{directory}: a pipeline-parallel DeepSpeed checkpoint ({', '.join(pipeline[:3])}): only data-parallel "
            f"ZeRO checkpoints are read; convert it with DeepSpeed's ds_to_universal and export that"
        )
    moe = [f for f in files if _MOE.search(f)]
    if moe:
        raise CurvatureError(
            f"{directory}: MoE expert files ({', '.join(moe[:3])}): expert-parallel checkpoints are not supported; "
            f"convert it with DeepSpeed's ds_to_universal and export that"
        )
    mp = sorted(
        {m.group(3) for m in map(_OPTIM.match, files) if m} | {m.group(2) for m in map(_MODEL.match, files) if m}
    )
    if mp != ["00"]:
        raise CurvatureError(
            f"{directory}: model-parallel ranks {', '.join('mp_rank_' + r for r in mp)}: tensor-parallel checkpoints "
            f"split each weight across those ranks and are not supported; convert it with DeepSpeed's ds_to_universal"
        )


def _optim_files(directory: str, files: Sequence[str]) -> List[str]:
    found = {int(m.group(2)): (m.group(1) or "", f) for f in files if (m := _OPTIM.match(f))}
    prefixes = {p for p, _ in found.values()}
    if len(prefixes) > 1:
        raise CurvatureError(f"{directory}: holds both bf16_zero_pp_rank_* and zero_pp_rank_* files; two saves mixed")
    ranks = sorted(found)
    if not ranks:  # the directory was taken for ZeRO by a name: every *_optim_states.pt entry is no regular file
        odd = sorted(f for f in os.listdir(directory) if _OPTIM.match(f))
        raise CurvatureError(
            f"{directory}: no optimizer state file to read: {', '.join(odd[:3]) or 'none'} "
            f"{'is' if len(odd) == 1 else 'are'} not a regular file (expected *_optim_states.pt files, one per rank)"
        )
    if ranks != list(range(len(ranks))):
        raise CurvatureError(
            f"{directory}: optimizer files of ranks {ranks}: expected ranks 0..{len(ranks) - 1}, none missing"
        )
    return [os.path.join(directory, found[r][1]) for r in ranks]


def _model_file(directory: str, files: Sequence[str]) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if name in files:
            return os.path.join(directory, name)
    raise CurvatureError(
        f"{directory}: no mp_rank_00_model_states.pt or zero_pp_rank_0_mp_rank_00_model_states.pt: the model states, "
        f"which name the parameters (param_shapes), are missing"
    )


def _dict(value: Any, file: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CurvatureError(f"{file}: expected {what} to be a dict, found {type(value).__name__}")
    return value


def _shapes(model: Mapping[str, Any], file: str) -> List[Dict[str, Tuple[int, ...]]]:
    groups = model.get("param_shapes")
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise CurvatureError(f"{file}: no 'param_shapes' list of {{name: shape}} dicts; not DeepSpeed model states")
    out = []
    for g, group in enumerate(groups):
        out.append(
            {str(name): fields.shape(shape, f"{file} param_shapes[{g}][{name!r}]") for name, shape in group.items()}
        )
    return out


def _stage(osd: Mapping[str, Any], file: str) -> Tuple[int, bool]:
    """(stage, BF16_Optimizer?) of one rank's ``optimizer_state_dict``."""
    if "zero_stage" in osd:
        stage = fields.integer(osd["zero_stage"], f"{file} 'zero_stage'")
        if stage not in (1, 2, 3):
            raise CurvatureError(f"{file}: zero_stage {stage}; expected 1, 2 or 3")
        return stage, False
    if "base_optimizer_state" in osd and "single_partition_of_fp32_groups" in osd:
        return 1, True  # DeepSpeed's BF16_Optimizer: ZeRO-1 partitioning, no zero_stage key
    raise CurvatureError(
        f"{file}: not a DeepSpeed ZeRO optimizer file (optimizer_state_dict keys {sorted(map(str, osd))[:8]})"
    )


def _world(osd: Mapping[str, Any], file: str) -> int:
    count = osd.get("partition_count")
    counts = list(count) if isinstance(count, (list, tuple)) else [count]
    if not counts or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in counts):
        raise CurvatureError(f"{file}: partition_count {count!r}; expected a positive int or a list of them")
    return max(counts)


def _moment(state: Mapping[str, Any], file: str, where: str) -> Tuple[torch.Tensor, Optional[float]]:
    kinds = check_second_moments({where: [str(k) for k in state]}, file)
    if kinds.get(where) != "full":
        raise CurvatureError(f"{file}: {where} holds {sorted(map(str, state))}; expected Adam's exp_avg_sq")
    value = fields.tensor(state[FULL], f"{file} {where} 'exp_avg_sq'")
    if value.dim() != 1:
        raise CurvatureError(f"{file}: {where} exp_avg_sq is not a flat tensor")
    return value, scalar(state.get("step"), f"{file} {where} 'step'")


def _slice_mappings(osd: Mapping[str, Any], file: str) -> Optional[List[Mapping[Any, Any]]]:
    """``param_slice_mappings``: per flat group a dict ``{name: fragment_address}`` (``None`` when not saved)."""
    mappings = osd.get("param_slice_mappings")
    if mappings is None:
        return None
    where = f"{file} 'param_slice_mappings'"
    return [fields.mapping(m, f"{where}[{g}]") for g, m in enumerate(fields.sequence(mappings, where))]


def _paddings(osd: Mapping[str, Any], file: str) -> Optional[List[Sequence[Any]]]:
    """``param_alignment_paddings``: per flat group a list of ints (``None`` when not saved)."""
    paddings = osd.get("param_alignment_paddings")
    if paddings is None:
        return None
    where = f"{file} 'param_alignment_paddings'"
    return [fields.sequence(p, f"{where}[{g}]") for g, p in enumerate(fields.sequence(paddings, where))]


def _flat_groups(osd: Mapping[str, Any], file: str) -> Tuple[List[Mapping[str, Any]], List[Mapping[str, Any]]]:
    """Stage 1/2 and bf16: ``(per-group Adam states, param groups)`` from ``base_optimizer_state``."""
    base = osd.get("base_optimizer_state")
    if isinstance(base, Mapping) and "state" in base and "param_groups" in base:  # rigid: a torch state dict
        groups = [
            fields.mapping(group, f"{file} param_groups[{g}]")
            for g, group in enumerate(fields.sequence(base["param_groups"], f"{file} 'param_groups'"))
        ]
        state = fields.mapping(base["state"], f"{file} base_optimizer_state['state']")
        states = []
        for g, group in enumerate(groups):
            keys = list(fields.sequence(group.get("params", []), f"{file} param_groups[{g}]['params']"))
            if len(keys) != 1 or not isinstance(keys[0], (int, str)) or keys[0] not in state:
                raise CurvatureError(
                    f"{file}: param group {g} lists {keys}; a ZeRO group has one flat tensor with state"
                )
            states.append(_dict(state[keys[0]], file, f"the state of group {g}"))
        return states, groups
    if isinstance(base, (list, tuple)):  # elastic_checkpoint: one dict per group, tail padding removed
        step = osd.get("base_optimizer_state_step")
        states = [_dict(s, file, f"base_optimizer_state[{g}]") for g, s in enumerate(base)]
        if step is not None:
            states = [dict(s, step=s.get("step", step)) for s in states]
        return states, []
    raise CurvatureError(f"{file}: no base_optimizer_state (a torch optimizer state dict, or a list per group)")


def _stage3_groups(
    osd: Mapping[str, Any], file: str
) -> Tuple[List[Mapping[str, Any]], List[Mapping[str, Any]], List[int]]:
    """Stage 3: ``(per-sub-group Adam states, param groups, param group of each sub-group)``."""
    inner = _dict(osd.get("optimizer_state_dict"), file, "optimizer_state_dict['optimizer_state_dict']")
    state = inner.get("state")
    groups = [
        fields.mapping(group, f"{file} param_groups[{g}]")
        for g, group in enumerate(fields.sequence(inner.get("param_groups") or [], f"{file} 'param_groups'"))
    ]
    if not isinstance(state, Mapping):
        raise CurvatureError(f"{file}: the stage-3 optimizer state has no 'state' dict")
    group_of: Dict[Any, int] = {
        k: g
        for g, group in enumerate(groups)
        for k in fields.sequence(group.get("params", []), f"{file} param_groups[{g}]['params']")
        if isinstance(k, (int, str))
    }
    keys = sorted(state, key=lambda k: (not isinstance(k, int), str(k)))
    if keys != list(range(len(keys))) or set(group_of) != set(keys):
        raise CurvatureError(f"{file}: stage-3 sub-group states {keys[:8]} do not match the param groups' params")
    return [_dict(state[k], file, f"sub-group {k}") for k in keys], groups, [group_of[k] for k in keys]


def _walk_flat(
    shapes: Mapping[str, Tuple[int, ...]], paddings: Optional[Sequence[int]], sizes: Sequence[int], file: str, g: int
) -> Dict[str, List[Piece]]:
    """Stages 1/2: each parameter's pieces from ``param_shapes`` and the per-parameter paddings.

    ``sizes[r]``: the length of rank ``r``'s flat tensor; all but an elastic last rank hold
    ``sizes[0]`` elements, and rank ``r`` starts at ``r * sizes[0]`` of the group's flat buffer.
    """
    if paddings is not None and len(paddings) != len(shapes):
        raise CurvatureError(f"{file}: group {g} has {len(shapes)} parameters but {len(paddings)} alignment paddings")
    width = sizes[0]
    pieces: Dict[str, List[Piece]] = {}
    offset = 0
    for k, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        parts, at, end = [], offset, offset + n
        while at < end:
            rank = at // width if width else len(sizes)
            if rank >= len(sizes) or at - rank * width >= sizes[rank]:
                raise CurvatureError(
                    f"{file}: group {g}: '{name}' runs past the ranks' partitions ({sum(sizes)} elements)"
                )
            take = min(end, (rank + 1) * width) - at
            parts.append((rank, at - rank * width, take))
            at += take
        pieces[name] = parts
        offset = end + (
            fields.integer(paddings[k], f"{file} param_alignment_paddings[{g}][{k}]") if paddings is not None else 0
        )
    # what is left is the group's tail padding: under 2 * w, plus up to 16 bytes of parameter alignment
    if not 0 <= sum(sizes) - offset < 2 * len(sizes) + 16:
        raise CurvatureError(
            f"{file}: group {g}: param_shapes cover {offset} elements of the {sum(sizes)} the ranks hold"
        )
    return pieces


def _mapped_flat(ranks: Sequence[_Rank], g: int, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, List[Piece]]:
    """Stages 1/2: each parameter's pieces from ``param_slice_mappings``."""
    pieces: Dict[str, List[Piece]] = {name: [] for name in shapes}
    for r, rank in enumerate(ranks):
        assert rank.mappings is not None
        for name, address in rank.mappings[g].items():
            if str(name) not in pieces:
                raise CurvatureError(
                    f"{rank.file}: param_slice_mappings[{g}] names '{name}', which param_shapes[{g}] does not list"
                )
            where = f"{rank.file} param_slice_mappings[{g}][{name!r}]"
            start = fields.integer(getattr(address, "start", None), f"{where}.start")
            numel = fields.integer(getattr(address, "numel", None), f"{where}.numel")
            if start < 0 or numel < 0 or start + numel > rank.moments[g].numel():
                raise CurvatureError(
                    f"{rank.file}: '{name}' at [{start}, {start + numel}) lies outside the rank's "
                    f"{rank.moments[g].numel()} elements"
                )
            if numel:
                pieces[str(name)].append((r, start, numel))
    return pieces


def _walk_stage3(
    shapes: Mapping[str, Tuple[int, ...]], world: int, sizes: Sequence[int], file: str, i: int
) -> Dict[str, List[Piece]]:
    """Stage 3: each parameter of sub-group ``i`` as ``ceil(n / w)`` elements at one offset on every rank."""
    pieces: Dict[str, List[Piece]] = {}
    offset = 0
    for name, shape in shapes.items():
        part = -(-math.prod(shape) // world)
        pieces[name] = [(r, offset, part) for r in range(world)]
        offset += part
    if any(size != offset for size in sizes):
        raise CurvatureError(
            f"{file}: sub-group {i}: its parameters' partitions need {offset} elements per rank, the ranks hold "
            f"{list(sizes)}"
        )
    return pieces


def _assemble(ranks: Sequence[_Rank], g: int, parts: Sequence[Piece], shape: Tuple[int, ...]) -> torch.Tensor:
    chunks = [ranks[r].moments[g].narrow(0, start, numel) for r, start, numel in parts]
    flat = torch.cat(chunks) if len(chunks) != 1 else chunks[0].clone()
    return flat[: math.prod(shape)].reshape(shape)


def _load(path: str, what: str) -> Mapping[str, Any]:
    value, _ = load_torch_file(path, deepspeed=True)
    return _dict(value, path, what)


def _same_across_ranks(ranks: Sequence[_Rank], what: str, get: Callable[[_Rank], Any]) -> None:
    first = get(ranks[0])
    for rank in ranks[1:]:
        if get(rank) != first:
            raise CurvatureError(
                f"{rank.file}: {what} differs from {ranks[0].file} ({get(rank)} vs {first}): the files come from "
                "different saves"
            )


def _config_beta2(model: Mapping[str, Any], file: str) -> Optional[float]:
    config = model.get("ds_config")
    try:
        betas = config["optimizer"]["params"]["betas"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        return None
    return fields.beta2(betas, f"{file} ds_config optimizer.params.betas")


def _frozen(model: Mapping[str, Any], trainable: Mapping[str, Any], file: str) -> List[str]:
    """Parameters without optimizer state: ``frozen_param_shapes`` when saved, else the saved module's
    entries that are neither trainable, buffers nor aliases of tied weights (``shared_params``)."""
    if model.get("frozen_param_shapes"):
        return [
            clean_name(str(n)) for n in fields.mapping(model["frozen_param_shapes"], f"{file} 'frozen_param_shapes'")
        ]
    module = model.get("module")
    buffers = fields.sequence(model.get("buffer_names") or (), f"{file} 'buffer_names'")
    shared = fields.mapping(model.get("shared_params") or {}, f"{file} 'shared_params'")
    skip = set(map(str, buffers)) | set(map(str, shared))
    names = [str(n) for n in module] if isinstance(module, Mapping) else []
    return [clean_name(n) for n in names if n not in skip and clean_name(n) not in trainable]


def open_zero(path: str, model_path: Optional[str], frozen: Sequence[str] = (), adapter: bool = False) -> SourceState:
    """Check a native ZeRO checkpoint (see the module docstring) and return its parameters' second moments.

    ``adapter``: the checkpoint of a PEFT adapter's run, read for :func:`~mergekit_ota.export.lora.open_lora_zero`
    (its items named as the live PEFT model named them; without it such names are refused)."""
    directory = find_step_dir(path)
    if directory is None:
        raise CurvatureError(
            f"{path}: not a DeepSpeed ZeRO checkpoint (no *_optim_states.pt here, nor a 'latest' naming them)"
        )
    files = _tensor_files(directory)
    _refuse_parallelism(directory, files)
    optim_files = _optim_files(directory, files)
    model_file = _model_file(directory, files)
    model = _load(model_file, "DeepSpeed model states")
    shapes = _shapes(model, model_file)
    notes: List[str] = []

    loaded = [
        _dict(_load(f, "DeepSpeed optimizer states").get("optimizer_state_dict"), f, "'optimizer_state_dict'")
        for f in optim_files
    ]
    stage, bf16_optimizer = _stage(loaded[0], optim_files[0])
    world = _world(loaded[0], optim_files[0])
    if world != len(optim_files):
        raise CurvatureError(
            f"{directory}: {len(optim_files)} optimizer file(s) but partition_count says {world} ranks: files are "
            f"missing or left over from another save"
        )
    ranks: List[_Rank] = []
    groups: List[Mapping[str, Any]] = []
    group_of_flat: List[int] = []
    for file, osd in zip(optim_files, loaded):
        if _stage(osd, file) != (stage, bf16_optimizer) or _world(osd, file) != world:
            raise CurvatureError(f"{file}: its stage or partition_count differs from {optim_files[0]}'s")
        if stage == 3:
            states, groups, group_of_flat = _stage3_groups(osd, file)
        else:
            states, groups = _flat_groups(osd, file)
            group_of_flat = list(range(len(states)))
        moments, steps = (
            zip(*(_moment(s, file, f"flat group {i}") for i, s in enumerate(states))) if states else ((), ())
        )
        mappings = _slice_mappings(osd, file) if stage != 3 else None
        ranks.append(
            _Rank(
                file=file,
                moments=list(moments),
                steps=list(steps),
                mappings=mappings,
            )
        )
    flats = len(ranks[0].moments)
    _same_across_ranks(ranks, "the number of flat groups", lambda r: len(r.moments))
    _same_across_ranks(ranks, "the steps", lambda r: r.steps)
    _same_across_ranks(ranks, "whether param_slice_mappings are saved", lambda r: r.mappings is None)
    if len(shapes) != flats:
        raise CurvatureError(f"{model_file}: param_shapes has {len(shapes)} groups, the optimizer files {flats}")
    paddings = _paddings(loaded[0], optim_files[0]) if stage != 3 else None
    per_group = [(optim_files[0], "param_alignment_paddings", paddings)]
    per_group += [(rank.file, "param_slice_mappings", rank.mappings) for rank in ranks]
    for file, what, listed in per_group:
        if listed is not None and len(listed) != flats:
            raise CurvatureError(f"{file}: '{what}' lists {len(listed)} groups, the optimizer state {flats}")

    pieces: Dict[str, Tuple[int, List[Piece]]] = {}
    for g, group_shapes in enumerate(shapes):
        sizes = [rank.moments[g].numel() for rank in ranks]
        if stage == 3:
            found = _walk_stage3(group_shapes, world, sizes, optim_files[0], g)
        else:
            walked = _walk_flat(group_shapes, paddings[g] if paddings is not None else None, sizes, optim_files[0], g)
            if ranks[0].mappings is not None:
                found = _mapped_flat(ranks, g, group_shapes)
                if found != walked:
                    bad = next(n for n in found if found[n] != walked[n])
                    raise CurvatureError(
                        f"{optim_files[0]}: group {g}: param_slice_mappings place '{bad}' at {found[bad]}, "
                        "param_shapes and "
                        f"the paddings at {walked[bad]}: the checkpoint contradicts itself"
                    )
            else:
                found = walked
                if g == 0:
                    notes.append(
                        "no param_slice_mappings (an older DeepSpeed): pieces placed from param_shapes and the paddings"
                    )
        for name, parts in found.items():
            if sum(n for _, _, n in parts) < math.prod(group_shapes[name]):
                raise CurvatureError(
                    f"{optim_files[0]}: '{name}' has {sum(n for _, _, n in parts)} of its "
                    f"{math.prod(group_shapes[name])} elements"
                )
            if clean_name(name) in pieces:
                raise CurvatureError(f"{model_file}: param_shapes lists '{name}' twice")
            pieces[clean_name(name)] = (g, parts)

    raw = {clean_name(n): s for group_shapes in shapes for n, s in group_shapes.items()}
    if not adapter:
        refuse_adapters(list(raw), directory)
    params, without, mapping = check_against_model(
        raw, model_path, frozen, directory, "param_shapes saved in the model states"
    )
    if params is None:
        without = _frozen(model, raw, model_file)

    beta_of_group = [group_beta2(group, f"{optim_files[0]} param_groups[{g}]") for g, group in enumerate(groups)]
    config_beta2 = _config_beta2(model, model_file)
    if not beta_of_group:
        beta_of_group = [config_beta2] * (max(group_of_flat) + 1 if group_of_flat else 0)
        notes.append(
            "elastic checkpoint: no param groups saved; beta2 from ds_config"
            if config_beta2 is not None
            else "elastic checkpoint: no param groups saved and ds_config has no betas; beta2 is not recorded"
        )

    def load(name: str) -> Full:
        g, parts = pieces[name]
        return Full(_assemble(ranks, g, parts, raw[name]))

    def release(name: str) -> None:
        g, parts = pieces[name]
        release_mapped(ranks[r].moments[g].narrow(0, start, numel) for r, start, numel in parts)

    items = [
        StateItem(
            name=name,
            shape=raw[name],
            load=(lambda n=name: load(n)),
            origin=f"{directory} ({'stage 3 sub-group' if stage == 3 else 'group'} {pieces[name][0]})",
            step=ranks[0].steps[pieces[name][0]],
            beta2=beta_of_group[group_of_flat[pieces[name][0]]] if group_of_flat else None,
            done=(lambda n=name: release(n)),
        )
        for name in model_order(list(raw), params)
    ]
    label = "BF16_Optimizer (ZeRO-1)" if bf16_optimizer else f"ZeRO-{stage}"
    return SourceState(
        kind="deepspeed",
        path=directory,
        optimizer=f"{optimizer_name({'full'}, groups)} (DeepSpeed {label}, {world} rank{'s' if world > 1 else ''})",
        items=items,
        mapping=mapping,
        without_state=without,
        notes=notes,
        evidence=NameEvidence(BASIS_PARAM_SHAPES),
    )
