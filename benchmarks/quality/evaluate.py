"""Scoring a causal LM on labelled rows: greedy exact match, token accuracy and loss in one pass.

A row is ``(ids, labels)`` with ``labels[t] = ids[t]`` on the positions to score (the
answer, or every token of a text) and ``-100`` elsewhere.  Position ``t`` is predicted
by the logits at ``t - 1`` with the true prefix (teacher forcing).

* exact match of a row: every scored token is the argmax.  When the scored tokens are
  one contiguous answer at the end of the row, this *is* greedy decoding's exact match:
  if every earlier prediction was right, greedy decoding's prefix equals the
  teacher-forced prefix, so its next prediction is the same argmax (induction over the
  answer); at the first wrong argmax both are wrong.  So one forward pass suffices.
* token accuracy: the fraction of scored tokens that are the argmax;
* loss: mean cross-entropy (nats per scored token).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import torch

from benchmarks.quality.train import IGNORE, Row, collate


@torch.no_grad()
def score_rows(model: Any, rows: Sequence[Row], pad_id: int, batch_size: int = 64, device: str = "cpu") -> Dict[str, float]:
    """``{"exact_match", "token_accuracy", "loss", "rows", "tokens"}`` of ``model`` on ``rows`` (see module doc)."""
    if not rows:
        raise ValueError("no rows to score")
    exact = correct = tokens = 0
    loss = 0.0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits[:, :-1].float()
        target = batch["labels"][:, 1:].to(device)
        scored = target != IGNORE
        if not bool(scored.any(dim=-1).all()):
            raise ValueError("every row needs at least one scored (labelled) token")
        hit = (logits.argmax(-1) == target) & scored
        exact += int((hit | ~scored).all(dim=-1).sum())
        correct += int(hit.sum())
        tokens += int(scored.sum())
        loss += float(torch.nn.functional.cross_entropy(logits[scored], target[scored], reduction="sum"))
    return {"exact_match": exact / len(rows), "token_accuracy": correct / tokens, "loss": loss / tokens,
            "rows": len(rows), "tokens": tokens}  # fmt: skip


def load_model(path: str, device: str = "cpu") -> Any:
    """A saved causal LM in float32, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
