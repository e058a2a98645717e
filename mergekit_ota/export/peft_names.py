"""PEFT's names for a LoRA adapter's weights, and the base model's weight each one changes.

Three spellings of one parameter (PEFT 0.x, ``PeftModelForCausalLM`` around a transformers model):

* the base model's weight: ``model.layers.0.self_attn.q_proj.weight`` (``named_parameters()`` of the base);
* in ``adapter_model.safetensors``: ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` and
  ``....lora_B.weight`` (:data:`PREFIX` + the base module + ``.lora_A.weight``, the adapter name left out), and a
  ``modules_to_save`` weight under its base name: ``base_model.model.lm_head.weight``;
* live, as the optimizer saw them (``named_parameters()`` of the PEFT model; ``param_names`` where torch recorded
  them): ``....q_proj.lora_A.default.weight`` and ``base_model.model.lm_head.modules_to_save.default.weight``
  (``default``: the adapter's name). :func:`file_key` maps these to the file's spelling.

The optimizer's order (:func:`trainable_order`): PEFT replaces each adapted module in place, and the frozen base
weights hold no optimizer state, so the trainable parameters come in the base model's ``named_parameters()``
order with each adapted weight replaced by its ``lora_A`` then ``lora_B`` (``lora_A`` is registered first), and
each ``modules_to_save`` weight in its own place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.mapping import Shape

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
_LIVE_LORA = re.compile(r"^(?P<head>.+\.lora_[AB])\.[^.]+\.weight$")
_LIVE_SAVED = re.compile(r"^(?P<head>.+)\.modules_to_save\.[^.]+\.(?P<leaf>.+)$")
#: adapter weights of LoRA variants export does not read (each refused by name)
_OTHER = re.compile(r"(^|\.)(lora_embedding_[AB]|lora_magnitude_vector|lora_B\.bias|trainable_tokens_delta)(\.|$)")


@dataclass(frozen=True)
class AdaptedWeight:
    """One base weight ``W`` (``base``, shape ``m x n``) changed by ``s B A``: its module, file keys and rank."""

    base: str
    module: str
    a_key: str
    b_key: str
    shape: Tuple[int, int]
    rank: int


@dataclass(frozen=True)
class AdapterLayout:
    """The adapter laid over its base: adapted weights, ``modules_to_save`` weights (``{base name: file key}``),
    base weights left as they are, and the trainable parameters in the optimizer's order as ``(file key, shape)``."""

    adapted: Tuple[AdaptedWeight, ...]
    saved: Dict[str, str]
    untouched: Tuple[str, ...]
    order: Tuple[Tuple[str, Shape], ...]

    def base_of(self, key: str) -> str:
        """The base weight a file key changes."""
        for weight in self.adapted:
            if key in (weight.a_key, weight.b_key):
                return weight.base
        return next(base for base, k in self.saved.items() if k == key)


def file_key(live: str) -> str:
    """A live PEFT parameter name in ``adapter_model.safetensors``' spelling (the adapter's name dropped)."""
    if match := _LIVE_LORA.match(live):
        return f"{match.group('head')}.weight"
    if match := _LIVE_SAVED.match(live):
        return f"{match.group('head')}.{match.group('leaf')}"
    return live


def _base_name(key: str, where: str) -> str:
    if not key.startswith(PREFIX):
        raise CurvatureError(
            f"{where}: tensor '{key}' does not start with '{PREFIX}', as PEFT names the weights of a PeftModel"
        )
    return key[len(PREFIX) :]


def adapter_layout(
    shapes: Mapping[str, Shape],
    base: Sequence[Tuple[str, Shape]],
    fan_in_fan_out: bool,
    where: str,
    instead: str,
) -> AdapterLayout:
    """Lay the adapter's tensors (``{file key: shape}``) over the base model's ``(name, shape)`` list.

    Every ``lora_A`` needs its ``lora_B`` and a base weight ``W`` of shape ``(B rows, A columns)`` (transposed with
    ``fan_in_fan_out``); every other tensor must be a base weight of the same shape (``modules_to_save``).
    Tensors of other LoRA variants (embedding LoRA, DoRA's magnitude, ``lora_bias``) are refused naming ``where``
    and what to do ``instead``.
    """
    base_shapes = dict(base)
    other = sorted(k for k in shapes if _OTHER.search(k))
    if other:
        raise CurvatureError(
            f"{where}: holds '{other[0]}' ({len(other)} such tensor(s)): LoRA on embeddings, DoRA, lora_bias or "
            f"trainable tokens, which export does not read (it derives curvature for W0 + s B A of linear layers "
            f"only). Instead: {instead}"
        )
    sides: Dict[str, Dict[str, str]] = {}
    saved: Dict[str, str] = {}
    for key in shapes:
        name = _base_name(key, where)
        match = _LORA.match(name)
        if match:
            sides.setdefault(match.group("module"), {})[match.group("side")] = key
        elif name in base_shapes:
            if tuple(shapes[key]) != tuple(base_shapes[name]):
                raise CurvatureError(
                    f"{where}: '{key}' has shape {list(shapes[key])}, the base model's '{name}' "
                    f"{list(base_shapes[name])}; is --model the adapter's base model?"
                )
            saved[name] = key
        else:
            raise CurvatureError(
                f"{where}: '{key}' is neither a lora_A/lora_B weight nor a weight of the base model "
                f"(no '{name}'); is --model the adapter's base model?"
            )
    adapted: Dict[str, AdaptedWeight] = {}
    for module, pair in sides.items():
        missing = [s for s in "AB" if s not in pair]
        if missing:
            raise CurvatureError(f"{where}: '{module}' has lora_{'AB'[missing[0] == 'A']} but no lora_{missing[0]}")
        a_shape, b_shape = tuple(shapes[pair["A"]]), tuple(shapes[pair["B"]])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise CurvatureError(
                f"{where}: '{module}': lora_A {list(a_shape)} and lora_B {list(b_shape)} are not k x n and m x k"
            )
        weight = f"{module}.weight"
        m, n = b_shape[0], a_shape[1]
        expected = (n, m) if fan_in_fan_out else (m, n)
        found: Optional[Shape] = base_shapes.get(weight)
        if found is None or tuple(found) != expected:
            what = f"has shape {list(found)}" if found is not None else "is not a weight of the base model"
            raise CurvatureError(
                f"{where}: lora_B @ lora_A of '{module}' is {m} x {n}"
                f"{' (stored transposed: fan_in_fan_out)' if fan_in_fan_out else ''}, but '{weight}' {what}; "
                f"is --model the adapter's base model?"
            )
        adapted[weight] = AdaptedWeight(weight, module, pair["A"], pair["B"], (int(m), int(n)), int(a_shape[0]))
    order: List[Tuple[str, Shape]] = []
    for name, _ in base:
        if name in adapted:
            weight = adapted[name]
            order += [(weight.a_key, tuple(shapes[weight.a_key])), (weight.b_key, tuple(shapes[weight.b_key]))]
        elif name in saved:
            order.append((saved[name], tuple(shapes[saved[name]])))
    changed = set(adapted) | set(saved)
    return AdapterLayout(
        adapted=tuple(adapted[n] for n, _ in base if n in adapted),
        saved={n: saved[n] for n, _ in base if n in saved},
        untouched=tuple(n for n, _ in base if n not in changed),
        order=tuple(order),
    )
