"""A PEFT LoRA Trainer checkpoint (``adapter_config.json``, ``adapter_model.safetensors``, ``optimizer.pt``) as a
source: per adapted base weight, the rank-1 curvature :mod:`mergekit_ota.math.lora` derives from the adapter's
Adam states; per ``modules_to_save`` weight, its own Adam ``v``; all under the **base model's** names.

Steps: the adapter config is read and anything but plain LoRA refused (:mod:`~mergekit_ota.export.peft_config`);
the adapter's tensors are laid over the base model's parameter list (``--model``, else the config's
``base_model_name_or_path`` where that is a local directory; :mod:`~mergekit_ota.export.peft_names`); the
optimizer's states are named either by the ``param_names`` torch recorded or, index-keyed as the Trainer saves
them, by :func:`~mergekit_ota.export.mapping.map_indices` over the PEFT model's trainable parameters in their
order (one group, or the Trainer's decay / no-decay split under each of its rules), every state's shape checked
against the adapter file's; then every ``lora_A``/``lora_B`` pair gives its base weight's curvature
(``s`` per module as PEFT computes it), computed here, while opening (the adapter is small: ``m + n`` numbers per
weight), so that the store's metadata can carry each weight's scale agreement. The metadata also records the
adapter file's fingerprint (:data:`~mergekit_ota.store_format.ADAPTER_FINGERPRINT`), which a merge of
``BASE+ADAPTER`` checks the store against (:mod:`mergekit_ota.curvature.fingerprint`).

The adapter's second moments may be AdamW's ``exp_avg_sq`` as torch keeps it, or as bitsandbytes keeps it (8-bit
blockwise or 32-bit, e.g. QLoRA's ``paged_adamw_8bit``/``adamw_bnb_8bit``) or torchao's low-bit AdamW
(:data:`~mergekit_ota.export.optimizer_states.ELEMENTWISE_ADAM_KINDS`), dequantised by the readers every export
uses. A run saved by DeepSpeed ZeRO (the adapter's files beside ``global_stepN/``) is read by the ZeRO reader
(:func:`open_lora_zero`). Adafactor's factored states and other optimizers' states are refused saying so.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.curvature.fingerprint import entries_fingerprint
from mergekit_ota.errors import ConfigError, CurvatureError
from mergekit_ota.export.mapping import BASIS_PARAM_NAMES, Candidate, NameEvidence, map_indices, order_evidence
from mergekit_ota.export.model_params import ModelParameters, clean_name, decay_rules, load_model_parameters
from mergekit_ota.export.moments import Full, Rank1, SourceState, StateItem
from mergekit_ota.export.optimizer_states import (
    ELEMENTWISE_ADAM_KINDS,
    FULL,
    OptimizerFacts,
    check_second_moments,
    group_beta2,
    load_moment,
    moment_shape,
    optimizer_facts,
    scalar,
)
from mergekit_ota.export.peft_config import (
    CONFIG_FILE,
    INSTEAD,
    PICKLED_WEIGHTS_FILE,
    WEIGHTS_FILE,
    AdapterConfig,
    base_model_dir,
    read_adapter_config,
)
from mergekit_ota.export.peft_names import AdaptedWeight, AdapterLayout, adapter_layout, file_key
from mergekit_ota.export.torch_optim import find_optimizer_dict, load_torch_file, read_optimizer, trainer_files
from mergekit_ota.io.handles import read_tensor
from mergekit_ota.io.safetensors import HeaderEntry, read_header
from mergekit_ota.math.lora import lora_curvature
from mergekit_ota.store_format import (
    ADAPTER,
    ADAPTER_AGREEMENT,
    ADAPTER_CONFIG,
    ADAPTER_FINGERPRINT,
    ADAPTER_UNTOUCHED,
)


def is_lora_checkpoint(directory: str) -> bool:
    """Whether ``directory`` holds PEFT's adapter_config.json (export then reads it as an adapter run)."""
    return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def _weights_file(directory: str) -> str:
    path = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(path):
        return path
    if os.path.isfile(os.path.join(directory, PICKLED_WEIGHTS_FILE)):
        raise CurvatureError(
            f"{directory}: the adapter's weights are in {PICKLED_WEIGHTS_FILE} (a pickle), which export does not "
            f"unpickle; save the adapter with safetensors ({WEIGHTS_FILE}, PEFT's default)"
        )
    raise CurvatureError(f"{directory}: {CONFIG_FILE} but no {WEIGHTS_FILE}; export needs the adapter's weights")


def _candidates(layout: AdapterLayout, params: ModelParameters, groups: int) -> List[Candidate]:
    """The orders the Trainer may have built its optimizer in: one group of the PEFT model's trainable
    parameters, or (two groups) its decay / no-decay split, LoRA weights decayed (they are ``nn.Linear`` weights
    with no norm or bias in their names) and ``modules_to_save`` weights as their base weight is, under each rule."""
    order = layout.order
    candidates = [Candidate("one group in the PEFT model's named_parameters() order", (order,))]
    if groups != 2:
        return candidates
    saved = {key: base for base, key in layout.saved.items()}
    for description, decay in decay_rules(params.model).items():
        decayed = tuple(p for p in order if p[0] not in saved or saved[p[0]] in decay)
        rest = tuple(p for p in order if p[0] in saved and saved[p[0]] not in decay)
        candidates.append(Candidate(f"{description} over the PEFT model", (decayed, rest)))
    return candidates


def _evidence(found: NameEvidence, layout: AdapterLayout) -> NameEvidence:
    """``found`` (over the adapter's file keys) for the exported base names: a base weight rests on the order rule
    when either of its ``lora_A``/``lora_B`` does."""
    by_order = {layout.base_of(k) for k in found.by_order}
    names = [w.base for w in layout.adapted] + list(layout.saved)
    return NameEvidence(
        basis=found.basis,
        by_shape=tuple(n for n in names if n not in by_order),
        by_order=tuple(n for n in names if n in by_order),
        same_shape=found.same_shape,
    )


def _name_states(
    groups: Sequence[Mapping[str, Any]],
    shapes: Dict[Any, Tuple[int, ...]],
    layout: AdapterLayout,
    params: ModelParameters,
    path: str,
) -> Tuple[Dict[Any, str], str, NameEvidence]:
    """``({state key: adapter file key}, mapping in words, evidence)``."""
    recorded = bool(groups) and all("param_names" in g for g in groups)
    wanted = dict(layout.order)
    if recorded:
        names = {k: file_key(clean_name(str(n))) for g in groups for k, n in zip(g["params"], g["param_names"])}
        if len(set(names.values())) != len(names):
            raise CurvatureError(f"{path}: param_names name a parameter twice; each must be named once")
        unknown = sorted(n for n in names.values() if n not in wanted)
        if unknown:
            raise CurvatureError(
                f"{path}: param_names '{unknown[0]}' ({len(unknown)} in all) is no trainable weight of the adapter "
                f"(expected lora_A/lora_B or modules_to_save weights, as in {WEIGHTS_FILE})"
            )
        for key, shape in shapes.items():
            if tuple(shape) != tuple(wanted[names[key]]):
                raise CurvatureError(
                    f"{path}: state of '{names[key]}' has shape {list(shape)}, the adapter's weight "
                    f"{list(wanted[names[key]])}"
                )
        evidence = NameEvidence(BASIS_PARAM_NAMES)
        return names, "param_names saved in the optimizer", _evidence(evidence, layout)
    group_of = [list(g["params"]) for g in groups]
    found = map_indices(
        group_of, {k: shapes.get(k) for g in group_of for k in g}, _candidates(layout, params, len(groups)), path
    )
    also = f" (the same under: {'; '.join(found.rules[1:])})" if len(found.rules) > 1 else ""
    mapping = (
        f"index order of {found.rules[0]}{also}; its {len(shapes)} state shapes fit the adapter's "
        f"{WEIGHTS_FILE} laid over {params.path}"
    )
    evidence = order_evidence([found.names[k] for k in shapes], list(layout.order))
    return found.names, mapping, _evidence(evidence, layout)


def _curvature(
    adapted: AdaptedWeight,
    states: Mapping[str, AdapterState],
    weight: Callable[[str], torch.Tensor],
    config: AdapterConfig,
    where: str,
) -> Tuple[Rank1, float, Optional[str]]:
    """``(r, c)`` of ``adapted`` (swapped under ``fan_in_fan_out``: PEFT stores such a weight transposed), its
    agreement and why it is degenerate, if it is."""
    v_a, v_b = states[adapted.a_key].second_moment(), states[adapted.b_key].second_moment()
    a, b = weight(adapted.a_key), weight(adapted.b_key)
    try:
        found = lora_curvature(v_a, v_b, a, b, config.scaling(adapted.module, adapted.rank))
    except ValueError as error:
        raise CurvatureError(f"{where}: '{adapted.module}': {error}") from error
    rank1 = Rank1(found.c, found.r) if config.fan_in_fan_out else Rank1(found.r, found.c)
    return rank1, found.agreement, found.degenerate


def open_lora_checkpoint(directory: str, model_path: Optional[str], frozen: Sequence[str] = ()) -> SourceState:
    """A PEFT LoRA Trainer checkpoint ``directory`` (module docstring); ``model_path``: the base model's directory."""
    if frozen:
        raise ConfigError(
            f"{directory}: --frozen does not apply to a LoRA checkpoint (its optimizer holds only the adapter's "
            "weights, named by the adapter file)"
        )
    adapter = _adapter(directory, model_path)
    layout = adapter.layout
    optimizer_path, _ = trainer_files(directory)
    loaded, _ = load_torch_file(optimizer_path)
    groups, state = read_optimizer(find_optimizer_dict(loaded, optimizer_path), optimizer_path)
    group_of = {key: g for g, group in enumerate(groups) for key in group["params"]}
    stray = [k for k in state if k not in group_of]
    if stray:
        raise CurvatureError(f"{optimizer_path}: state for parameter(s) {stray[:5]} that no param group lists")
    kinds = check_second_moments({f"state[{k!r}]": list(v.keys()) for k, v in state.items()}, optimizer_path)
    refuse_other_moments(kinds, optimizer_path)
    kind_of = {k: kinds[f"state[{k!r}]"] for k in state if f"state[{k!r}]" in kinds}
    # a state without a second moment (empty, or only 'step': the parameter never stepped) has no shape to map
    shapes = {k: state_shape(kind_of[k], v) for k, v in state.items() if k in kind_of}
    names, mapping, evidence = _name_states(groups, shapes, layout, adapter.params, optimizer_path)
    by_name = {names[k]: k for k in shapes}
    require_states(layout, by_name, optimizer_path, f"weight(s) of {WEIGHTS_FILE} in all); did the optimizer step?")

    states = {
        key: AdapterState(
            kind=kind_of[by_name[key]],
            entry=state[by_name[key]],
            origin=f"{optimizer_path} state[{by_name[key]!r}]",
            beta2=group_beta2(
                groups[group_of[by_name[key]]], f"{optimizer_path} param_groups[{group_of[by_name[key]]}]"
            ),
        )
        for key, _ in layout.order
    }
    facts = optimizer_facts({f"state[{k!r}]": kind for k, kind in kind_of.items()}, groups)
    return _from_files(adapter, states, facts, "trainer", optimizer_path, mapping, evidence)


@dataclass(frozen=True)
class _Adapter:
    """A checkpoint's adapter as read from its files, with the base model's parameters it is laid over."""

    config: AdapterConfig
    weights_path: str
    params: ModelParameters
    tensors: Mapping[str, HeaderEntry]
    layout: AdapterLayout


def _adapter(directory: str, model_path: Optional[str], params: Optional[ModelParameters] = None) -> _Adapter:
    """The adapter of the PEFT checkpoint ``directory``: its config (plain LoRA, else refused), its weights file's
    tensors laid over the base model's parameter list (``params``, else read from ``model_path``, else from the
    config's local base)."""
    config = read_adapter_config(os.path.join(directory, CONFIG_FILE))
    weights_path = _weights_file(directory)
    params = params or load_model_parameters(base_model_dir(config, model_path))
    tensors, _ = read_header(weights_path)
    layout = adapter_layout(
        {k: e.shape for k, e in tensors.items()}, params.parameters, config.fan_in_fan_out, weights_path, INSTEAD
    )
    if not layout.order:
        raise CurvatureError(f"{weights_path}: no lora_A/lora_B or modules_to_save weights in it")
    return _Adapter(config, weights_path, params, tensors, layout)


def _from_files(
    adapter: _Adapter,
    states: Mapping[str, "AdapterState"],
    facts: OptimizerFacts,
    kind: str,
    path: str,
    mapping: str,
    evidence: Optional[NameEvidence],
) -> SourceState:
    """:func:`lora_source` of a saved checkpoint's adapter (weights read from its file)."""
    return lora_source(
        config=adapter.config,
        layout=adapter.layout,
        parameters=adapter.params.parameters,
        states=states,
        weight=lambda key: read_tensor(adapter.tensors[key]),
        adapter_fingerprint=entries_fingerprint(adapter.tensors, list(adapter.tensors)),
        facts=facts,
        kind=kind,
        path=path,
        weights_origin=adapter.weights_path,
        mapping=mapping,
        evidence=evidence,
    )


def _zero_entry(item: StateItem) -> Dict[str, Any]:
    """A ZeRO item's second moment as a state entry (``exp_avg_sq``, assembled from the ranks, and ``step``), as
    an ``optimizer.pt`` holds one: the adapter's states are read whole, as from that file."""
    loaded = item.load()
    if not isinstance(loaded, Full):
        raise CurvatureError(f"{item.origin}: expected an element-wise second moment")
    return {FULL: loaded.v, "step": item.step}


def open_lora_zero(
    path: str, model_path: Optional[str], frozen: Sequence[str] = (), params: Optional[ModelParameters] = None
) -> SourceState:
    """A PEFT LoRA run saved by DeepSpeed ZeRO (the Trainer's ``checkpoint-N/`` with the adapter's files beside
    ``global_stepN/``, or that ``global_stepN/``): the ZeRO reader's states (:func:`~.zero.open_zero`, every rank,
    named as the live PEFT model named them) laid over the adapter's file keys, shape-checked, then
    :func:`lora_source` as for an ``optimizer.pt``. ``params``: the base model's parameters where the caller
    has them (the training callback, from the live model), else read from ``model_path``."""
    from mergekit_ota.export.zero import open_zero

    directory = path if is_lora_checkpoint(path) else os.path.dirname(os.path.normpath(path))
    if frozen:
        raise ConfigError(
            f"{directory}: --frozen does not apply to a LoRA checkpoint (its optimizer holds the adapter)"
        )
    adapter = _adapter(directory, model_path, params)
    zero = open_zero(path, None, adapter=True)
    wanted = dict(adapter.layout.order)
    states: Dict[str, AdapterState] = {}
    for item in zero.items:
        key = file_key(item.name)
        if key not in wanted:
            raise CurvatureError(
                f"{zero.path}: '{item.name}' has optimizer state but is no trainable weight of the adapter "
                f"(expected lora_A/lora_B or modules_to_save weights, as in {WEIGHTS_FILE})"
            )
        if tuple(item.shape) != tuple(wanted[key]):
            raise CurvatureError(
                f"{zero.path}: state of '{item.name}' has shape {list(item.shape)}, the adapter's weight "
                f"{list(wanted[key])}"
            )
        states[key] = AdapterState(kind="full", entry=_zero_entry(item), origin=item.origin, beta2=item.beta2)
    require_states(adapter.layout, states, zero.path, f"weight(s) of {WEIGHTS_FILE} in all)")
    facts = OptimizerFacts(zero.optimizer, bias_corrected=False, metadata={}, notes=list(zero.notes))
    return _from_files(adapter, states, facts, "deepspeed", zero.path, zero.mapping, zero.evidence)


def require_states(layout: AdapterLayout, found: Collection[str], source: str, rest: str) -> None:
    """Refuse an adapter whose trainable weights (``layout``'s file keys) lack a state in ``found`` (file keys),
    naming the first and how many: ``'<first>' (<n> <rest>``."""
    missing = [key for key, _ in layout.order if key not in found]
    if missing:
        raise CurvatureError(f"{source}: no optimizer state for the adapter's '{missing[0]}' ({len(missing)} {rest}")


def refuse_other_moments(kinds: Mapping[str, str], source: str) -> None:
    """Refuse states (``{label: kind}``) that are not Adam's ``v`` element by element: the estimate needs
    ``v_A`` and ``v_B`` entry by entry."""
    other = {label: kind for label, kind in kinds.items() if kind not in ELEMENTWISE_ADAM_KINDS}
    if other:
        label, kind = next(iter(other.items()))
        raise CurvatureError(
            f"{source}: {label} holds a '{kind}' second moment; a LoRA run's curvature is derived from AdamW's "
            f"exp_avg_sq element by element (torch's, bitsandbytes' 8- or 32-bit, torchao's low-bit), not from "
            f"Adafactor's factors or another optimizer's state. Instead: {INSTEAD}"
        )


def state_shape(kind: str, entry: Mapping[str, Any]) -> Tuple[int, ...]:
    """The parameter's shape from one state of ``kind`` (its tensors' shapes)."""
    return moment_shape(kind, {key: tuple(t.shape) for key, t in entry.items() if isinstance(t, torch.Tensor)})


@dataclass(frozen=True)
class AdapterState:
    """The optimizer state of one adapter weight: its kind (one of
    :data:`~mergekit_ota.export.optimizer_states.ELEMENTWISE_ADAM_KINDS`), the state itself (``get(key)`` gives a
    state tensor whole, on CPU), where it came from, and its param group's beta2."""

    kind: str
    entry: Mapping[str, Any]
    origin: str
    beta2: Optional[float]

    def second_moment(self) -> torch.Tensor:
        """Adam's ``v`` of the weight (dequantised where the optimizer kept it in fewer bits)."""
        found = load_moment(self.kind, self.entry.__getitem__, self.origin)
        if not isinstance(found, Full):  # every element-wise kind loads whole; a guard, should one change
            raise CurvatureError(f"{self.origin}: expected an element-wise second moment, found rank-1 factors")
        return found.v

    def step(self) -> Optional[float]:
        return scalar(self.entry.get("step"), f"{self.origin}['step']")


def lora_source(
    *,
    config: AdapterConfig,
    layout: AdapterLayout,
    parameters: Sequence[Tuple[str, Tuple[int, ...]]],
    states: Mapping[str, AdapterState],
    weight: Callable[[str], torch.Tensor],
    adapter_fingerprint: str,
    facts: OptimizerFacts,
    kind: str,
    path: str,
    weights_origin: str,
    mapping: str,
    evidence: NameEvidence,
) -> SourceState:
    """The export source of a LoRA adapter, from a saved checkpoint or a live PEFT model alike: per adapted base
    weight its rank-1 curvature (:func:`~mergekit_ota.math.lora.lora_curvature` of its ``lora_A``/``lora_B``
    states and weights, ``s`` per module as PEFT computes it), per ``modules_to_save`` weight its Adam ``v``, in
    the base model's ``parameters`` order and under its names. ``states`` and ``weight(key)`` are keyed by the
    adapter file's keys (``layout``); ``adapter_fingerprint`` identifies the adapter's weights (metadata
    :data:`~mergekit_ota.store_format.ADAPTER_FINGERPRINT`, which a merge of ``BASE+ADAPTER`` checks)."""
    items: List[StateItem] = []
    agreement: Dict[str, float] = {}
    degenerate: List[str] = []
    adapted_of = {w.base: w for w in layout.adapted}
    for base, _ in parameters:
        if base in adapted_of:
            adapted = adapted_of[base]
            a_state, b_state = states[adapted.a_key], states[adapted.b_key]
            where = f"{a_state.origin}, {b_state.origin} and {weights_origin}"
            rank1, agreement[base], why = _curvature(adapted, states, weight, config, where)
            if why is not None:
                degenerate.append(base)
            steps = [a_state.step(), b_state.step()]
            items.append(
                StateItem(
                    name=base,
                    shape=adapted.shape if not config.fan_in_fan_out else adapted.shape[::-1],
                    load=lambda value=rank1: value,
                    origin=where,
                    rank1=True,
                    step=max((s for s in steps if s is not None), default=None),
                    beta2=a_state.beta2,
                )
            )
        elif base in layout.saved:
            saved = states[layout.saved[base]]
            items.append(
                StateItem(
                    name=base,
                    shape=state_shape(saved.kind, saved.entry),
                    load=lambda state=saved: Full(state.second_moment()),
                    origin=saved.origin,
                    step=saved.step(),
                    beta2=saved.beta2,
                )
            )
    metadata = {
        ADAPTER: "lora",
        ADAPTER_CONFIG: json.dumps(config.summary(), sort_keys=True),
        ADAPTER_UNTOUCHED: json.dumps(list(layout.untouched)),
        ADAPTER_AGREEMENT: json.dumps({k: round(v, 6) for k, v in agreement.items()}),
        ADAPTER_FINGERPRINT: adapter_fingerprint,
    }
    return SourceState.from_facts(
        facts,
        kind=kind,
        path=path,
        items=items,
        mapping=mapping,
        without_state=layout.untouched,
        metadata=metadata,
        notes=_notes(layout, agreement, degenerate),
        evidence=evidence,
    )


def _notes(layout: AdapterLayout, agreement: Mapping[str, float], degenerate: Sequence[str]) -> List[str]:
    """What the summary tells a user about an adapter export."""
    notes = []
    if agreement:
        values = sorted(agreement.values())
        notes.append(
            f"LoRA adapter: {len(layout.adapted)} adapted weight(s) stored as rank-1 curvature derived from their "
            f"lora_A/lora_B Adam states (docs/lora.md); agreement of the two scale estimates min(P, Q)/max(P, Q): "
            f"min {values[0]:.3g}, median {statistics.median(values):.3g} (1 = they agree; per weight in the "
            f"store's metadata '{ADAPTER_AGREEMENT}')"
        )
    if layout.saved:
        notes.append(f"modules_to_save: {len(layout.saved)} weight(s) trained fully, their Adam v stored whole")
    if degenerate:
        notes.append(
            f"{len(degenerate)} adapted weight(s) got zero curvature (lora_A or lora_B zero, or no second moment), "
            f"e.g. {degenerate[0]}"
        )
    notes.append(
        f"{len(layout.untouched)} base weight(s) the adapter does not change (task vector 0) are listed in the "
        f"store's metadata '{ADAPTER_UNTOUCHED}'"
    )
    return notes
