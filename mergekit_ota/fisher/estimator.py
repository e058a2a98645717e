"""Empirical diagonal Fisher of a causal LM on calibration rows: the curvature of an expert without optimizer state.

With the rows cut into ``B`` mini-batches ``b`` of ``batch_size`` rows, and ``L_b`` the mean token
loss of mini-batch ``b`` (cross-entropy summed over its labelled tokens, divided by their number
``N_b``),

    F = (1 / B) * sum_b (grad L_b)**2                      (elementwise, one value per parameter entry)

the mean over mini-batches of the squared mini-batch gradient. It is on the scale of Adam's
bias-corrected ``exp_avg_sq`` at that batch size, which is an exponential average of the same
squared mini-batch gradients (the authors' Fisher baseline *sums* over mini-batches: ``B`` times this).
With ``batch_size`` 1 it is the per-example estimator ``(1 / N) sum_n (grad L_n)**2``.

A mini-batch too large for memory is split into micro-batches of ``micro_batch_size`` rows whose
gradients of ``(summed token loss) / N_b`` accumulate before squaring, so micro-batching changes
nothing but memory (and float rounding). Memory: the model, its gradients and one float32
accumulator per parameter: about 3 x the float32 model (plus activations of one micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.fisher.data import IGNORE, Row


@dataclass(frozen=True)
class FisherResult:
    """``fisher``: ``{parameter name: F}`` (float32, on CPU); how many mini-batches, rows and labelled tokens."""

    fisher: Dict[str, torch.Tensor]
    batches: int
    rows: int
    tokens: int


def collate(rows: Sequence[Row], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (:data:`IGNORE` on padding)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def labelled_tokens(rows: Sequence[Row]) -> int:
    """Tokens the loss is taken on (position 0 never is: nothing predicts it)."""
    return sum(sum(1 for label in labels[1:] if label != IGNORE) for _, labels in rows)


def diagonal_fisher(
    model: Any,
    rows: Sequence[Row],
    batch_size: int,
    micro_batch_size: Optional[int] = None,
    pad_id: int = 0,
    device: str = "cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> FisherResult:
    """``F`` of every trainable parameter of ``model`` on ``rows`` (see the module docstring).

    ``progress(n)`` is called after each mini-batch with the rows it held. A mini-batch with no
    labelled token is skipped (counted out of ``B``); a non-finite gradient raises
    :class:`CurvatureError` naming the parameter and the rows.
    """
    if batch_size < 1 or (micro_batch_size is not None and micro_batch_size < 1):
        raise CurvatureError(
            f"batch sizes must be >= 1; got batch_size {batch_size}, micro_batch_size {micro_batch_size}"
        )
    micro = micro_batch_size or batch_size
    parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in parameters}
    batches = tokens = 0
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model as it is
    try:
        for start in range(0, len(rows), batch_size):
            batch = list(rows[start : start + batch_size])
            count = labelled_tokens(batch)
            if count:
                _accumulate(model, batch, micro, count, pad_id, device)
                _add_squares(parameters, sums, f"rows {start + 1}-{start + len(batch)}")
                batches += 1
                tokens += count
            if progress is not None:
                progress(len(batch))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not batches:
        raise CurvatureError("no mini-batch had a token to take the loss on")
    fisher = {n: (s / batches).to("cpu") for n, s in sums.items()}
    return FisherResult(fisher, batches, len(rows), tokens)


def _accumulate(model: Any, batch: List[Row], micro: int, count: int, pad_id: int, device: str) -> None:
    """Leave ``grad L_b`` in every parameter's ``.grad`` (micro-batches of ``micro`` rows accumulated)."""
    model.zero_grad(set_to_none=True)
    for start in range(0, len(batch), micro):
        inputs = collate(batch[start : start + micro], pad_id)
        logits = model(
            input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
        ).logits
        targets = inputs["labels"][:, 1:].to(device)
        summed = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        (summed / count).backward()


def _add_squares(parameters: Iterable[Any], sums: Dict[str, torch.Tensor], where: str) -> None:
    for name, parameter in parameters:
        grad = parameter.grad
        if grad is None:  # not reached by this mini-batch's loss: a zero gradient
            continue
        grad = grad.float()
        if not bool(torch.isfinite(grad).all()):
            raise CurvatureError(
                f"the gradient of {name} is not finite on {where} (NaN or Inf): nothing was written; "
                "check those samples, or load the model in float32 (--dtype float32)"
            )
        sums[name].addcmul_(grad, grad)
