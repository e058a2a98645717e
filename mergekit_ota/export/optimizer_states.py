"""One parameter's optimizer state -> its second moment; the refusals for states without one.

Recognised per-parameter states (key names as the optimizers save them):

* Adam/AdamW (torch, fused or not; also NAdam/RAdam): ``exp_avg_sq`` = ``v``.
* Adafactor (transformers): a tensor with >= 2 dims keeps ``exp_avg_sq_row`` (mean of
  ``g**2`` over the last dim, shape ``(..., m)``) and ``exp_avg_sq_col`` (mean over the
  second-to-last, ``(..., n)``); its own estimate is
  ``v_hat = outer(row, col) / mean(row)``.  With ``r = n * row`` and ``c = m * col``
  (the row and column sums of that estimate) our ``outer(r, c) / sum(r)`` is the same
  matrix, so 2-D states become :class:`~mergekit_ota.export.moments.Rank1` exactly;
  tensors with more dims are rebuilt whole.  1-D tensors keep ``exp_avg_sq``.
* Adafactor (``torch.optim.Adafactor``): the same factors as ``row_var`` (shape ``(..., m, 1)``) and
  ``col_var`` (``(..., 1, n)``), estimate ``row_var @ col_var / mean(row_var)``: read as above
  (kind ``factored_var``); 1-D tensors keep ``variance`` (kind ``variance``), Adafactor's ``v`` itself.
  Both Adafactors decay with ``beta2_t = 1 - t**decay``, so ``beta2_1 = 0`` and no bias correction is
  due (:func:`optimizer_facts`).

* bitsandbytes 8-bit Adam/AdamW (``adamw_bnb_8bit``, ``paged_adamw_8bit``; bitsandbytes >= 0.45
  wraps the quantisation tensors under ``__bnb_optimizer_quant_state__``, older releases keep them
  at the top): ``state2`` (uint8 codes), ``qmap2`` (the 256-value code book) and ``absmax2`` (one
  scale per block of ``B`` elements) give ``v[i] = qmap2[state2[i]] * absmax2[i // B]``
  (:func:`dequantize_blockwise`, equal bit for bit to bitsandbytes' own ``dequantize_blockwise``).
  ``B`` is the one power of two from 64 to 4096 with ``ceil(n / B) == len(absmax2)`` (256 in
  bitsandbytes 0.50, 2048 in early releases; with a single block every ``B >= n`` reads the same).
  Tensors bitsandbytes keeps in 32 bits (fewer than ``min_8bit_size`` elements, embeddings under the
  Trainer) hold ``state2`` as float32: that is ``exp_avg_sq`` itself.

Refused, with the keys found: non-blockwise 8-bit states (``max1``/``max2``/``new_max*``), and
optimizers without a second moment, by family (:func:`momentum_family`, keys as torch 2.13 saves them):
``torch.optim.Muon`` (``momentum_buffer``, groups with ``ns_coefficients``/``ns_steps``; its AdamW companion's
parameters do have ``exp_avg_sq`` and are counted), ``torch.optim.SGD`` with momentum (``momentum_buffer``, groups
with ``dampening``), Lion (``exp_avg`` only, as lion-pytorch saves it); also bitsandbytes' ``state1`` only,
RMSprop ``square_avg``, Adagrad ``sum``, Adamax ``exp_inf``.  The refusal names ``mergekit-ota fisher`` for them;
adapter-only (LoRA) states outside a PEFT checkpoint directory (which :mod:`mergekit_ota.export.lora` reads).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export import fields
from mergekit_ota.export.adam_mini import (
    MINI_KEYS,
    MINI_KINDS,
    MINI_TENSOR_KEYS,
    load_mini,
    mini_kind,
    mini_shape,
    per_row,
)
from mergekit_ota.export.moments import Curvature, Full, Rank1
from mergekit_ota.export.torchao import NAMES as TORCHAO_NAMES
from mergekit_ota.export.torchao import TORCHAO_DTYPES, TORCHAO_KEYS, TORCHAO_KINDS, dequantize, flatten_subclasses
from mergekit_ota.export.torchao import kind as torchao_kind
from mergekit_ota.store_format import ESTIMATOR

FULL = "exp_avg_sq"
ROW, COL = "exp_avg_sq_row", "exp_avg_sq_col"
ROW_VAR, COL_VAR, VARIANCE = "row_var", "col_var", "variance"  # torch.optim.Adafactor
MOMENT_KEYS = (FULL, ROW, COL, ROW_VAR, COL_VAR, VARIANCE)
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")  # a momentum-only state's buffer: the parameter's shape
SOPHIA_G = "hessian"  # sophia_opt.SophiaG (the paper's code): EMA of the Gauss-Newton-Bartlett estimate
SOPHIA_H = "hessian_moment"  # pytorch_optimizer.SophiaH: EMA of Hutchinson estimates (signed)
BNB_WRAPPER = "__bnb_optimizer_quant_state__"
BNB_CODES, BNB_CODEBOOK, BNB_SCALES = "state2", "qmap2", "absmax2"
BNB_MOMENT_KEYS = (BNB_CODES, BNB_SCALES)
#: per state kind, the keys holding its second moment (what a reader must load)
KIND_KEYS: Dict[str, Tuple[str, ...]] = {
    "full": (FULL,),
    "factored": (ROW, COL),
    "factored_var": (ROW_VAR, COL_VAR),
    "variance": (VARIANCE,),
    "blockwise8": (BNB_CODES, BNB_SCALES, BNB_CODEBOOK),
    "bnb32": (BNB_CODES,),
    **MINI_KEYS,
    **TORCHAO_KEYS,
    "sophia_g": (SOPHIA_G,),
    "sophia_h": (SOPHIA_H,),
}
SOPHIA_KINDS = ("sophia_g", "sophia_h")
FACTORED_KINDS = ("factored", "factored_var")
SECOND_MOMENT_KINDS = (
    "full", "factored", "factored_var", "variance", "blockwise8", "bnb32", *MINI_KINDS, "sophia_g", "sophia_h",
    *TORCHAO_KINDS,
)  # fmt: skip
ADAFACTOR_KINDS = ("factored", "factored_var", "variance")
#: Adam's ``exp_avg_sq`` element by element, as kept in 32 bits, by bitsandbytes in 8 bits (blockwise) or 32 bits,
#: or by torchao in 8, 4 or FP8 bits: what a LoRA adapter's curvature is derived from (:mod:`~.lora`)
ELEMENTWISE_ADAM_KINDS = ("full", "blockwise8", "bnb32", *TORCHAO_KINDS)
NON_BLOCKWISE_KEYS = ("max1", "max2", "new_max1", "new_max2")
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_WITHOUT_SECOND_MOMENT = {
    "square_avg": "RMSprop (its square_avg uses another update rule than Adam's exp_avg_sq)",
    "sum": "Adagrad (a sum of squared gradients, not an average)",
    "exp_inf": "Adamax (an infinity norm, not a second moment)",
    "state1": "a bitsandbytes optimizer with one state (Lion, SGD momentum or RMSprop, 8- or 32-bit)",
}
ADAPTER_NAME = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|ia3_l|vera_lambda_[bd])(\.|$)")


def flatten_bnb(entry: Mapping[str, Any]) -> Dict[str, Any]:
    """One parameter's state with bitsandbytes' ``__bnb_optimizer_quant_state__`` keys moved to the top."""
    wrapped = entry.get(BNB_WRAPPER)
    if not isinstance(wrapped, Mapping):
        return dict(entry)
    flat = {k: v for k, v in entry.items() if k != BNB_WRAPPER}
    flat.update(wrapped)
    return flat


#: the dtypes each state tensor may have (bitsandbytes keeps ``state2`` as uint8 codes, or float32 when small)
STATE_TENSOR_DTYPES: Dict[str, Tuple[torch.dtype, ...]] = {
    **{
        key: fields.FLOATING
        for key in (FULL, ROW, COL, BNB_CODEBOOK, BNB_SCALES, *MOMENTUM_KEYS, *MINI_TENSOR_KEYS, SOPHIA_G, SOPHIA_H)
    },
    BNB_CODES: fields.FLOATING + (torch.uint8,),
    **TORCHAO_DTYPES,
}


def checked_entry(entry: Any, where: str) -> Dict[str, Any]:
    """One parameter's state read from a file (``where`` names file and key): a dict with string keys
    whose second-moment tensors (:data:`STATE_TENSOR_DTYPES`) are dense CPU tensors of their dtypes,
    with bitsandbytes' wrapper flattened (:func:`flatten_bnb`)."""
    flat = flatten_subclasses(flatten_bnb(fields.mapping(entry, where)), where)
    for key, value in flat.items():
        if not isinstance(key, str):
            raise CurvatureError(f"{where}: state key {key!r} is not a string")
        if key in STATE_TENSOR_DTYPES:
            tensor = fields.tensor(value, f"{where}[{key!r}]", STATE_TENSOR_DTYPES[key])
            if key in (ROW, COL) and tensor.dim() == 0:
                raise CurvatureError(f"{where}[{key!r}]: Adafactor's factor is a 0-d tensor; expected >= 1 dims")
    return flat


def state_kind(keys: Collection[str]) -> str:
    """``full`` (``exp_avg_sq``), ``factored`` (Adafactor row/col), ``factored_var`` / ``variance``
    (``torch.optim.Adafactor``'s ``row_var``/``col_var`` and ``variance``), ``blockwise8`` (bitsandbytes 8-bit
    ``state2``/``qmap2``/``absmax2``), ``bnb32`` (bitsandbytes ``state1``/``state2`` kept in 32 bits),
    ``mini_*`` (Adam-mini's block values, :mod:`mergekit_ota.export.adam_mini`), ``8bit`` (non-blockwise 8-bit:
    refused), ``empty`` or ``none``."""
    if ROW in keys and COL in keys:
        return "factored"
    if ROW_VAR in keys and COL_VAR in keys:
        return "factored_var"
    low_bit = torchao_kind(keys)
    if low_bit is not None:
        return low_bit
    if FULL in keys:
        return "full"
    if VARIANCE in keys and set(keys) <= {VARIANCE, "step"}:  # torch.optim.Adafactor's 1-D state, nothing else
        return "variance"
    mini = mini_kind(keys)
    if mini is not None:
        return mini
    if SOPHIA_H in keys:
        return "sophia_h"
    if set(keys) - {"step"} == {"exp_avg", SOPHIA_G}:
        return "sophia_g"
    if any(k in keys for k in NON_BLOCKWISE_KEYS):
        return "8bit"
    if BNB_CODES in keys and BNB_CODEBOOK in keys and BNB_SCALES in keys:
        return "blockwise8"
    if BNB_CODES in keys and "state1" in keys and BNB_CODEBOOK not in keys:
        return "bnb32"
    if not [k for k in keys if k != "step"]:
        return "empty"
    return "none"


def block_size(numel: int, blocks: int, where: str) -> int:
    """The block size ``B`` of a blockwise-quantised tensor: ``ceil(numel / B) == blocks``."""
    fits = [b for b in BLOCK_SIZES if -(-numel // b) == blocks]
    if not fits:
        raise CurvatureError(
            f"{where}: {numel} 8-bit values with {blocks} absmax2 scales fit no block size of {list(BLOCK_SIZES)}"
        )
    return fits[0]


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, where: str) -> torch.Tensor:
    """``v[i] = codebook[codes[i]] * scales[i // B]`` as float32, in chunks (memory: the output plus one chunk).

    ``codes``: uint8, any shape; ``codebook``: 256 values; ``scales``: one per block.
    """
    if codes.dtype != torch.uint8 or codebook.numel() != 256 or scales.dim() != 1:
        raise CurvatureError(
            f"{where}: expected uint8 state2, a 256-value qmap2 and 1-D absmax2; found {codes.dtype} "
            f"{list(codes.shape)}, "
            f"qmap2 {list(codebook.shape)}, absmax2 {list(scales.shape)}"
        )
    n = codes.numel()
    block = block_size(n, scales.numel(), where)
    table, scale = codebook.to(torch.float32).reshape(-1), scales.to(torch.float32)
    flat, out = codes.reshape(-1), torch.empty(n, dtype=torch.float32)
    chunk = block * max(1, (1 << 20) // block)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        values = table[flat[start:end].long()]
        out[start:end] = values * scale[start // block : -(-end // block)].repeat_interleave(block)[: end - start]
    return out.reshape(codes.shape)


def moment_shape(kind: str, shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[int, ...]:
    """The parameter's shape from the shapes of its state tensors (``missing``: a momentum-only state's buffer)."""
    if kind == "missing":
        return tuple(next(shapes[key] for key in MOMENTUM_KEYS if key in shapes))
    if kind in MINI_KINDS:
        return mini_shape(kind, shapes)
    if kind in TORCHAO_KINDS:
        return tuple(shapes[FULL + ":shape"])
    if kind == "factored":
        return tuple(shapes[ROW]) + tuple(shapes[COL][-1:])
    if kind == "factored_var":
        return tuple(shapes[ROW_VAR][:-1]) + tuple(shapes[COL_VAR][-1:])
    if kind in ("blockwise8", "bnb32"):
        return tuple(shapes[BNB_CODES])
    return tuple(shapes[KIND_KEYS[kind][0]])  # full, variance, sophia_g, sophia_h: the parameter's shape


def rank1_state(kind: str, shape: Tuple[int, ...], state_shapes: Mapping[str, Tuple[int, ...]]) -> bool:
    """Whether :func:`load_moment` reads a ``kind`` state of a parameter of ``shape`` as a rank-1 pair: Adafactor's
    factored matrices, and Adam-mini matrices constant per row (:func:`~mergekit_ota.export.adam_mini.per_row`)."""
    if kind in FACTORED_KINDS:
        return len(shape) == 2
    if kind in MINI_KINDS and "vmean" in state_shapes:
        return per_row(kind, shape, int(torch.Size(state_shapes["vmean"]).numel()))
    return False


def load_moment(
    kind: str,
    get: Callable[[str], torch.Tensor],
    where: str = "optimizer state",
    shape: Optional[Tuple[int, ...]] = None,
) -> Curvature:
    """Read the second moment of a ``full``, ``factored``, ``factored_var``, ``variance``, ``blockwise8``, ``bnb32``
    or ``mini_*`` state (the last expanded to the parameter's ``shape``); ``get(key)`` returns a state tensor."""
    if kind in MINI_KINDS:
        if shape is None:
            raise CurvatureError(f"{where}: an Adam-mini state needs its parameter's shape to be expanded")
        return load_mini(kind, get, shape, where)
    if kind in ("full", "variance", "sophia_g"):
        return Full(get(KIND_KEYS[kind][0]))
    if kind == "sophia_h":  # its update divides by max(hessian_moment, eps): a negative entry is curvature 0
        return Full(get(SOPHIA_H).to(torch.float32).clamp(min=0.0))
    if kind in TORCHAO_KINDS:
        return dequantize(kind, get, where)
    if kind == "blockwise8":
        return Full(dequantize_blockwise(get(BNB_CODES), get(BNB_SCALES), get(BNB_CODEBOOK), where))
    if kind == "bnb32":
        return Full(get(BNB_CODES).to(torch.float32))
    if kind == "factored_var":  # torch.optim.Adafactor: (..., m, 1) and (..., 1, n)
        row, col = get(ROW_VAR).squeeze(-1), get(COL_VAR).squeeze(-2)
    else:
        row, col = get(ROW), get(COL)
    m, n = row.shape[-1], col.shape[-1]
    if row.dim() == 1:
        return Rank1(row.to(torch.float32) * n, col.to(torch.float32) * m)
    row32, col32 = row.to(torch.float32), col.to(torch.float32)
    scale = row32.mean(dim=-1, keepdim=True)
    return Full((row32 / torch.where(scale > 0, scale, torch.ones_like(scale))).unsqueeze(-1) * col32.unsqueeze(-2))


def _examples(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


#: what fills the gap where no parameter has a second moment (a partial store names store_format.complete_command)
FISHER_COMMAND = "mergekit-ota fisher MODEL DATA OUT"
MUON_GROUP_KEYS = ("ns_coefficients", "ns_steps")  # torch.optim.Muon's param groups (torch 2.13)
SGD_GROUP_KEYS = ("dampening",)  # torch.optim.SGD's param groups


@dataclass(frozen=True)
class MomentumFamily:
    """A momentum-only optimizer recognised from one parameter's state keys and its param group.

    ``family``: its name in messages; ``looks_like``: the class it looks like; ``relies_on``: the keys read.
    """

    family: str
    looks_like: str
    relies_on: str


def momentum_family(keys: Collection[str], group: Optional[Mapping[str, Any]] = None) -> Optional[MomentumFamily]:
    """The momentum-only family of a state without a second moment, or ``None``.

    Keys as saved by torch 2.13 and lion-pytorch: ``torch.optim.Muon`` keeps ``momentum_buffer`` (no ``step``)
    in groups with ``ns_coefficients``/``ns_steps``; ``torch.optim.SGD(momentum>0)`` keeps ``momentum_buffer`` in
    groups with ``dampening``; ``lion_pytorch.Lion`` keeps ``exp_avg`` alone.  Without the group (a source that
    saves no param groups) ``momentum_buffer`` names both candidates.
    """
    own = set(keys) - {"step"}
    group_keys = set(group) if group is not None else set()
    if "momentum_buffer" in own:
        state = "state 'momentum_buffer'"
        if group_keys & set(MUON_GROUP_KEYS):
            return MomentumFamily("Muon", "torch.optim.Muon", f"{state}, param group 'ns_coefficients'/'ns_steps'")
        if group_keys & set(SGD_GROUP_KEYS):
            return MomentumFamily("SGD with momentum", "torch.optim.SGD", f"{state}, param group 'dampening'")
        return MomentumFamily("SGD with momentum or Muon", "torch.optim.SGD or torch.optim.Muon", state)
    if own == {"exp_avg"}:
        return MomentumFamily(
            "Lion", "lion_pytorch.Lion (or another first-moment-only optimizer)", "state 'exp_avg' without exp_avg_sq"
        )
    return None


def _lacking_message(
    lacking: Sequence[str],
    kinds: Mapping[str, str],
    states: Mapping[str, Collection[str]],
    groups: Mapping[str, Any],
    remedy: str,
) -> str:
    """What a refusal says about the parameters without a second moment: their family, the keys relied on,
    counts, examples, and ``remedy`` (what to run instead)."""
    have = [label for label, kind in kinds.items() if kind in SECOND_MOMENT_KINDS]
    families: Dict[Optional[MomentumFamily], List[str]] = {}
    for label in lacking:
        families.setdefault(momentum_family(states[label], groups.get(label)), []).append(label)
    parts = []
    for family, labels in families.items():
        keys = sorted(set(states[labels[0]]) - {"step"})
        if family is None:
            guess = next(
                (why for key, why in _WITHOUT_SECOND_MOMENT.items() if key in keys),
                "an optimizer without a second moment",
            )
            parts.append(f"{len(labels)} look like {guess} (e.g. {_examples(labels)}, state keys {keys})")
        else:
            parts.append(
                f"{len(labels)} look like {family.family} ({family.looks_like}; read from {family.relies_on}): "
                f"momentum only, e.g. {_examples(labels)}"
            )
    muon = any(family is not None and family.family == "Muon" for family in families)
    companion = (
        f"{len(have)} parameter(s) do have a second moment (e.g. {_examples(have)}"
        + ("; Muon's AdamW companion, for embeddings, norms and the head)" if muon else ")")
        if have
        else "No parameter has a second moment"
    )
    return (
        f"no second moment for {len(lacking)} of {len(kinds)} parameter(s): " + "; ".join(parts) + f". {companion}. "
        f"OTA and FFG need Adam's exp_avg_sq (or Adafactor's exp_avg_sq_row/exp_avg_sq_col, torch.optim.Adafactor's "
        f"row_var/col_var/variance) for every merged weight. {remedy}"
    )


def missing_reason(family: MomentumFamily) -> str:
    """What a partial store records for a tensor its optimizer kept momentum only for (``missing_curvature``)."""
    return f"{family.looks_like} keeps momentum only ({family.relies_on})"


@dataclass(frozen=True)
class SecondMoments:
    """Every parameter's state, classified: ``kinds`` ``{label: kind}`` of those with a second moment (``full``,
    ``factored``, ...); ``families`` ``{label: family}`` of those a recognised momentum-only optimizer kept
    (:func:`momentum_family`), which a partial store lists as missing (:data:`~mergekit_ota.store_format.MISSING`)
    with the reason :attr:`missing` gives."""

    kinds: Dict[str, str]
    families: Dict[str, MomentumFamily]

    @property
    def missing(self) -> Dict[str, str]:
        """``{label: reason}`` of the momentum-only parameters (:func:`missing_reason`)."""
        return {label: missing_reason(family) for label, family in self.families.items()}


def classify_second_moments(
    states: Mapping[str, Collection[str]], source: str, groups: Optional[Mapping[str, Mapping[str, Any]]] = None
) -> SecondMoments:
    """Classify every parameter's state (``{label: state keys}``); refuse what cannot be exported, even in part.

    ``groups``: ``{label: its param group}`` where the source saves them (they tell Muon from SGD).  Raises
    :class:`CurvatureError` naming the keys found when any parameter's state is 8-bit, lacks a second moment and
    is of no recognised momentum-only family, or when no parameter has a second moment (naming the family, the
    keys relied on, the counts and the ``fisher`` command for the whole model).
    """
    kinds = {label: state_kind(keys) for label, keys in states.items()}
    eight = [label for label, kind in kinds.items() if kind == "8bit"]
    if eight:
        keys = sorted(set(states[eight[0]]))
        raise CurvatureError(
            f"{source}: {len(eight)} parameter(s) hold non-blockwise 8-bit optimizer states (bitsandbytes keys {keys}, "
            f"e.g. {_examples(eight)}); only blockwise 8-bit states (state2 + qmap2 + absmax2) are dequantised. "
            f"Train (or continue for a few hundred steps) with blockwise 8-bit or 32-bit AdamW to get exp_avg_sq"
        )
    lacking = [label for label, kind in kinds.items() if kind == "none"]
    found = {label: kind for label, kind in kinds.items() if kind in SECOND_MOMENT_KINDS}
    families = {label: momentum_family(states[label], (groups or {}).get(label)) for label in lacking}
    if any(family is None for family in families.values()) or (lacking and not found):
        remedy = f"What fills the gap: `{FISHER_COMMAND}` (the data Fisher of the expert, for all its tensors)"
        raise CurvatureError(f"{source}: " + _lacking_message(lacking, kinds, states, groups or {}, remedy))
    if not found:
        raise CurvatureError(f"{source}: the optimizer state is empty (did the optimizer ever step?)")
    return SecondMoments(found, {label: family for label, family in families.items() if family})


def check_second_moments(
    states: Mapping[str, Collection[str]], source: str, groups: Optional[Mapping[str, Mapping[str, Any]]] = None
) -> Dict[str, str]:
    """:func:`classify_second_moments` for a reader that writes complete stores only: ``{label: kind}``, and a
    :class:`CurvatureError` for any parameter without a second moment, naming ``fisher`` for the whole model
    (only a torch or Trainer checkpoint is exported in part, :mod:`mergekit_ota.export.torch_optim`)."""
    result = classify_second_moments(states, source, groups)
    if result.families:
        lacking = list(result.families)
        remedy = (
            f"This checkpoint format is not exported in part (a torch or Trainer optimizer.pt is); what fills the "
            f"gap: `{FISHER_COMMAND}` (the data Fisher of the expert, for all its tensors)"
        )
        kinds = {label: state_kind(keys) for label, keys in states.items()}
        raise CurvatureError(f"{source}: " + _lacking_message(lacking, kinds, states, groups or {}, remedy))
    return result.kinds


def refuse_adapters(names: Sequence[str], source: str, reason: Optional[str] = None) -> None:
    """Refuse a LoRA/adapter run: states named ``...lora_A...`` etc., or ``reason`` (e.g. an adapter_config.json)."""
    adapters = [n for n in names if ADAPTER_NAME.search(n)]
    if adapters or reason:
        what = f"adapter parameters such as {_examples(adapters)}" if adapters else reason
        raise CurvatureError(
            f"{source}: a LoRA/adapter run ({what}): its optimizer state covers only the adapter weights. Export "
            f"reads a PEFT LoRA run from its Trainer checkpoint directory, with adapter_config.json and "
            f"adapter_model.safetensors beside optimizer.pt or DeepSpeed's global_stepN/ (docs/lora.md); other "
            f"adapter states have no curvature for the merged weights"
        )


def scalar(value: Any, where: str = "optimizer state 'step'") -> Optional[float]:
    """A state's ``step`` (a tensor, int or float) as a float, or ``None``; a step that is not a finite number
    ``>= 0`` is refused naming ``where`` (:func:`mergekit_ota.export.fields.step`)."""
    return fields.step(value, where)


ADEMAMIX_GROUP_KEYS = ("t_alpha_beta3", "t_alpha")  # AdEMAMix's alpha/beta3 warm-up (pytorch_optimizer, bitsandbytes)
SCHEDULE_FREE_GROUP_KEYS = ("weight_sum", "train_mode")  # schedulefree.AdamWScheduleFree's param groups


def group_beta2(group: Mapping[str, Any], where: str = "param group") -> Optional[float]:
    """``beta2`` of an Adam param group (``betas[1]``), ``None`` where it has no ``betas`` (Adafactor has a
    schedule); ``betas`` that are not ``(beta1, beta2)`` with a finite ``0 <= beta2 < 1`` are refused naming
    ``where`` (:func:`mergekit_ota.export.fields.beta2`). AdEMAMix's ``(beta1, beta2, beta3)`` (groups with
    ``alpha`` and :data:`ADEMAMIX_GROUP_KEYS`: its ``exp_avg_sq`` decays with ``betas[1]``, pytorch_optimizer 4.1
    ``ademamix.py``) gives ``betas[1]``; other three-value ``betas`` (Adan's ``exp_avg_sq`` decays with the third)
    are refused. Adam-mini's groups keep ``beta2`` as a key of its own (adam-mini 1.1)."""
    group = fields.mapping(group, where)
    betas = group.get("betas")
    if betas is None and "beta2" in group:
        return fields.beta2_value(group["beta2"], f"{where} 'beta2'")
    if isinstance(betas, (list, tuple)) and len(betas) == 3 and "alpha" in group:
        if any(key in group for key in ADEMAMIX_GROUP_KEYS):
            return fields.beta2_value(betas[1], f"{where} 'betas'[1]")
    return fields.beta2(betas, f"{where} 'betas'")


def step_and_beta2(
    kind: str, entry: Mapping[str, Any], group: Mapping[str, Any], where: str, group_where: str
) -> Tuple[Optional[float], Optional[float]]:
    """``(step, beta2)`` of one parameter's state of ``kind`` in param ``group`` (``where``/``group_where`` name them):
    the state's ``step`` (else the group's, :func:`group_step`) and the group's ``beta2`` (:func:`group_beta2`);
    neither for Sophia, whose estimate's updates are not its steps (:func:`sophia_facts`)."""
    if kind in SOPHIA_KINDS:
        return None, None
    step = scalar(entry["step"], f"{where}['step']") if "step" in entry else group_step(group, group_where)
    return step, group_beta2(group, group_where)


def group_step(group: Mapping[str, Any], where: str = "param group") -> Optional[float]:
    """The step count of optimizers that keep it per param group rather than per parameter: ``step``
    (pytorch_optimizer's AdEMAMix, SophiaH), ``k`` of schedule-free AdamW (:data:`SCHEDULE_FREE_GROUP_KEYS`; ``k``
    counts the steps taken, and its bias correction is ``1 - beta2**k``, schedulefree 1.4
    ``adamw_schedulefree.py``); ``None`` otherwise."""
    if "step" in group:
        return fields.step(group["step"], f"{where} 'step'")
    if "k" in group and all(key in group for key in SCHEDULE_FREE_GROUP_KEYS):
        return fields.step(group["k"], f"{where} 'k'")
    return None


def optimizer_name(kinds: Collection[str], groups: Sequence[Mapping[str, Any]]) -> str:
    """A name for the optimizer from its state kinds and param-group settings."""
    if any(k in ADAFACTOR_KINDS for k in kinds) or any(
        ("decay_rate" in g and "clip_threshold" in g) or "beta2_decay" in g for g in groups
    ):
        return "Adafactor"
    if "blockwise8" in kinds or "bnb32" in kinds:
        return "AdamW 8-bit (bitsandbytes)"
    low_bit = [TORCHAO_NAMES[k] for k in TORCHAO_KINDS if k in kinds]
    if low_bit:
        return low_bit[0]
    if any(k in MINI_KINDS for k in kinds):
        return "Adam-mini (adam_mini.Adam_mini)"
    if "sophia_g" in kinds:
        return "SophiaG (sophia_opt)"
    if "sophia_h" in kinds:
        return "SophiaH (pytorch_optimizer)"
    keys = set().union(*(g.keys() for g in groups)) if groups else set()
    if "momentum_decay" in keys:
        return "NAdam"
    if set(SCHEDULE_FREE_GROUP_KEYS) <= keys:
        return "AdamW schedule-free (schedulefree)"
    if "alpha" in keys and keys & set(ADEMAMIX_GROUP_KEYS):
        return "AdEMAMix"
    if any(g.get("decoupled_weight_decay") for g in groups):
        return "AdamW"
    if "amsgrad" in keys:
        return "Adam"
    return "Adam-like (exp_avg_sq)"


def adafactor_notes(kind_of: Mapping[str, str]) -> List[str]:
    """What a user should know about an Adafactor export."""
    factored = sum(k in FACTORED_KINDS for k in kind_of.values())
    return [
        f"Adafactor: {factored} factored state(s) stored as r = n*row, c = m*col (exp_avg_sq_row/col, or "
        f"torch.optim.Adafactor's row_var/col_var), so outer(r, c)/sum(r) = outer(row, col)/mean(row), Adafactor's "
        f"own estimate; its decay schedule (beta2_t = 1 - t**decay, beta2_1 = 0) needs no bias correction"
    ]


@dataclass(frozen=True)
class OptimizerFacts:
    """What a store records about the optimizer that kept its states: one definition for every reader of saved
    states (``export``) and for the live optimizer (``save_curvature``, ``CurvatureCallback``), so the same run's
    curvature is described, and merged, alike whichever way it was written.

    ``name``: the store's ``optimizer`` field; ``bias_corrected``: its values are already unbiased estimates
    (Adafactor: ``beta2_1 = 0``, so ``v_t`` is a weighted mean of the ``g**2`` seen, with no ``1 - beta2**t``
    factor), written as ``bias_corrected: true`` so the merge never corrects them; ``metadata``: further header
    fields (bitsandbytes' dequantisation); ``notes``: what a user should know.
    """

    name: str
    bias_corrected: bool
    metadata: Dict[str, str]
    notes: List[str]


def optimizer_facts(
    kind_of: Mapping[str, str],
    groups: Sequence[Mapping[str, Any]],
    momentum_only: Mapping[str, MomentumFamily] = MappingProxyType({}),
) -> OptimizerFacts:
    """The :class:`OptimizerFacts` of states of kinds ``kind_of`` (``{label: kind}``) under param ``groups``;
    ``momentum_only``: ``{label: family}`` of momentum-only states beside them (:class:`SecondMoments`), named too."""
    name = optimizer_name(set(kind_of.values()), groups)
    if any(kind in SOPHIA_KINDS for kind in kind_of.values()):
        return sophia_facts(name, kind_of)
    if momentum_only:
        others = sorted({family.looks_like for family in momentum_only.values()})
        name = f"{' and '.join(others)} (momentum only, {len(momentum_only)} tensor(s)) with {name} for the rest"
    metadata, notes = bnb_metadata(kind_of)
    if name == "Adafactor":
        return OptimizerFacts(name, bias_corrected=True, metadata=metadata, notes=adafactor_notes(kind_of))
    return OptimizerFacts(name, bias_corrected=False, metadata=metadata, notes=notes)


def sophia_facts(name: str, kind_of: Mapping[str, str]) -> OptimizerFacts:
    """Sophia keeps a diagonal Hessian estimate, not Adam's ``v``: exported as it is, with ``curvature_estimator``
    saying which, and no ``step``/``beta2`` (its estimate is updated every k steps, k not saved, and never
    bias-corrected by Sophia itself), so the merge leaves its scale to ``curvature_scale`` (default ``mean``)."""
    if set(kind_of.values()) - set(SOPHIA_KINDS):
        raise CurvatureError(
            f"{name}: a state dict mixing Sophia's hessian with other optimizers' states "
            f"({sorted(set(kind_of.values()))}); export each optimizer's state on its own"
        )
    sophia_h = "sophia_h" in kind_of.values()
    estimator = (
        "sophia_hessian: EMA (beta2) of Hutchinson estimates z*(Hz), negative entries exported as 0"
        if sophia_h
        else "sophia_hessian: EMA (beta2) of the Gauss-Newton-Bartlett estimate (squared gradient of the mean "
        "sampled-label loss), without SophiaG's factor bs (tokens per step, not saved)"
    )
    notes = [
        f"{name}: curvature is Sophia's diagonal Hessian estimate ({estimator.split(': ', 1)[1]}), on another scale "
        f"than Adam's v; merge it with curvature_scale mean or median (mean is the default), which puts each "
        f"expert on its own model-wide scale"
    ]
    return OptimizerFacts(name, bias_corrected=False, metadata={ESTIMATOR: estimator}, notes=notes)


def bnb_metadata(kind_of: Mapping[str, str]) -> Tuple[Dict[str, str], List[str]]:
    """Store fields and notes for a bitsandbytes source: how many tensors were dequantised from 8 bits."""
    eight = sum(k == "blockwise8" for k in kind_of.values())
    kept = sum(k == "bnb32" for k in kind_of.values())
    if not eight and not kept:
        return {}, []
    text = (
        f"bitsandbytes blockwise 8-bit: {eight} tensor(s) dequantised as qmap2[state2] * absmax2[block]; "
        f"{kept} kept in 32 bits by bitsandbytes (state2 as saved)"
    )
    return {"dequantized": text}, [text + "; the 8-bit values carry bitsandbytes' quantisation error"]
