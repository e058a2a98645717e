"""One parameter's optimizer state -> its second moment; the refusals for states without one.

Recognised per-parameter states (key names as the optimizers save them):

* Adam/AdamW (torch, fused or not; also NAdam/RAdam): ``exp_avg_sq`` = ``v``.
* Adafactor (transformers): a tensor with >= 2 dims keeps ``exp_avg_sq_row`` (mean of
  ``g**2`` over the last dim, shape ``(..., m)``) and ``exp_avg_sq_col`` (mean over the
  second-to-last, ``(..., n)``); its own estimate is
  ``v_hat = outer(row, col) / mean(row)``.  With ``r = n * row`` and ``c = m * col``
  (the row and column sums of that estimate) our ``outer(r, c) / sum(r)`` is the same
  matrix, so 2-D states become :class:`~mergekit_ota.export.source.Rank1` exactly;
  tensors with more dims are rebuilt whole.  1-D tensors keep ``exp_avg_sq``.

Refused, with the keys found: 8-bit states (bitsandbytes ``state1``/``state2``/``qmap*``/
``absmax*``: not dequantized here), and optimizers without a second moment (SGD and
Muon: ``momentum_buffer``; Lion: ``exp_avg`` only; RMSprop ``square_avg``; Adagrad ``sum``;
Adamax ``exp_inf``); adapter-only (LoRA) states.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.source import Curvature, Full, Rank1

FULL = "exp_avg_sq"
ROW, COL = "exp_avg_sq_row", "exp_avg_sq_col"
MOMENT_KEYS = (FULL, ROW, COL)
EIGHT_BIT_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "max1", "max2", "new_max1", "new_max2")
_WITHOUT_SECOND_MOMENT = {
    "momentum_buffer": "SGD with momentum, or Muon (its matrices keep only a momentum buffer)",
    "square_avg": "RMSprop (its square_avg uses another update rule than Adam's exp_avg_sq)",
    "sum": "Adagrad (a sum of squared gradients, not an average)",
    "exp_inf": "Adamax (an infinity norm, not a second moment)",
    "exp_avg": "Lion, or another optimizer with only a first moment",
}
ADAPTER_NAME = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|ia3_l|vera_lambda_[bd])(\.|$)")


def state_kind(keys: Collection[str]) -> str:
    """``full`` (``exp_avg_sq``), ``factored`` (Adafactor row/col), ``8bit``, ``empty`` or ``none``."""
    if ROW in keys and COL in keys:
        return "factored"
    if FULL in keys:
        return "full"
    if any(k in keys for k in EIGHT_BIT_KEYS):
        return "8bit"
    if not [k for k in keys if k != "step"]:
        return "empty"
    return "none"


def moment_shape(kind: str, shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[int, ...]:
    """The parameter's shape from the shapes of its state tensors."""
    if kind == "factored":
        return tuple(shapes[ROW]) + tuple(shapes[COL][-1:])
    return tuple(shapes[FULL])


def load_moment(kind: str, get: Callable[[str], torch.Tensor]) -> Curvature:
    """Read the second moment of a ``full`` or ``factored`` state; ``get(key)`` returns a state tensor."""
    if kind == "full":
        return Full(get(FULL))
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


def check_second_moments(states: Mapping[str, Collection[str]], source: str) -> Dict[str, str]:
    """Classify every parameter's state (``{label: state keys}``); refuse what cannot be exported.

    Returns ``{label: kind}`` for the parameters with a second moment (``full`` or
    ``factored``).  Raises :class:`CurvatureError` naming the keys found when any
    parameter's state is 8-bit or lacks a second moment, or when no state has one.
    """
    kinds = {label: state_kind(keys) for label, keys in states.items()}
    eight = [label for label, kind in kinds.items() if kind == "8bit"]
    if eight:
        keys = sorted(set(states[eight[0]]))
        raise CurvatureError(
            f"{source}: {len(eight)} parameter(s) hold 8-bit optimizer states (bitsandbytes keys {keys}, "
            f"e.g. {_examples(eight)}); mergekit-ota does not dequantize block-wise 8-bit states. "
            f"Train (or continue for a few hundred steps) with a 32-bit AdamW to get exp_avg_sq"
        )
    lacking = [label for label, kind in kinds.items() if kind == "none"]
    if lacking:
        keys = sorted(set(states[lacking[0]]) - {"step"})
        guess = next((why for key, why in _WITHOUT_SECOND_MOMENT.items() if key in keys), "an optimizer without a second moment")
        have = sum(kind in ("full", "factored") for kind in kinds.values())
        raise CurvatureError(
            f"{source}: no second moment for {len(lacking)} of {len(kinds)} parameter(s) (e.g. {_examples(lacking)}, "
            f"state keys {keys}): this looks like {guess}. OTA and FFG need Adam's exp_avg_sq "
            f"(or Adafactor's exp_avg_sq_row/exp_avg_sq_col) for every merged weight"
            + (f"; {have} other parameter(s) do have one" if have else "")
        )
    found = {label: kind for label, kind in kinds.items() if kind in ("full", "factored")}
    if not found:
        raise CurvatureError(f"{source}: the optimizer state is empty (did the optimizer ever step?)")
    return found


def refuse_adapters(names: Sequence[str], source: str, reason: Optional[str] = None) -> None:
    """Refuse a LoRA/adapter run: states named ``...lora_A...`` etc., or ``reason`` (e.g. an adapter_config.json)."""
    adapters = [n for n in names if ADAPTER_NAME.search(n)]
    if adapters or reason:
        what = f"adapter parameters such as {_examples(adapters)}" if adapters else reason
        raise CurvatureError(
            f"{source}: a LoRA/adapter run ({what}): its optimizer state covers only the adapter weights, "
            f"not the model's, so there is no curvature for the merged weights. Export from a full fine-tune, "
            f"or merge the adapter into the model and merge without curvature (e.g. task_arithmetic)"
        )


def scalar(value: Any) -> Optional[float]:
    """A state's ``step`` (a tensor, int or float) as a float, or ``None``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def group_beta2(group: Mapping[str, Any]) -> Optional[float]:
    """``beta2`` of an Adam param group (``betas[1]``), ``None`` elsewhere (Adafactor has a schedule)."""
    betas = group.get("betas")
    try:
        return float(betas[1]) if betas is not None else None
    except (TypeError, IndexError, ValueError):
        return None


def optimizer_name(kinds: Collection[str], groups: Sequence[Mapping[str, Any]]) -> str:
    """A name for the optimizer from its state kinds and param-group settings."""
    if "factored" in kinds or any("decay_rate" in g and "clip_threshold" in g for g in groups):
        return "Adafactor"
    keys = set().union(*(g.keys() for g in groups)) if groups else set()
    if "momentum_decay" in keys:
        return "NAdam"
    if any(g.get("decoupled_weight_decay") for g in groups):
        return "AdamW"
    if "amsgrad" in keys:
        return "Adam"
    return "Adam-like (exp_avg_sq)"


def adafactor_notes(kind_of: Mapping[str, str]) -> List[str]:
    """What a user should know about an Adafactor export."""
    factored = sum(k == "factored" for k in kind_of.values())
    return [
        f"Adafactor: {factored} factored state(s) stored as r = n*exp_avg_sq_row, c = m*exp_avg_sq_col, "
        f"so outer(r, c)/sum(r) = outer(row, col)/mean(row), Adafactor's own estimate; "
        f"its decay schedule (beta2_t = 1 - t**decay_rate, beta2_1 = 0) needs no bias correction"
    ]
