"""Per-row scores of a causal LM on labelled rows, in one teacher-forced pass.

A row is ``(ids, labels)`` (:mod:`mergekit_ota.fisher.data`): token ``t`` is scored where ``labels[t]`` is not
``IGNORE``, predicted by the logits at ``t - 1`` from the true prefix. Per row:

* ``nats``: the summed cross-entropy of its labelled tokens; ``tokens``: how many there are (the loss of a set
  of rows is ``sum(nats) / sum(tokens)``);
* ``correct``: labelled tokens that are the argmax;
* ``exact``: every labelled token is the argmax. When the labelled tokens are one answer at the end of the row
  (a chat whose last turn is the assistant's, a prompt's completion), this is greedy decoding's exact match:
  while every earlier prediction is right, greedy decoding's prefix is the teacher-forced one, so its next token
  is the same argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

from mergekit_ota.fisher.data import IGNORE, Row


@dataclass(frozen=True)
class RowScores:
    """One model's per-row results, in the order the rows were given."""

    nats: List[float]
    tokens: List[int]
    correct: List[int]
    exact: List[bool]

    def to_json(self) -> dict:
        return {"nats": self.nats, "tokens": self.tokens, "correct": self.correct, "exact": self.exact}

    @classmethod
    def from_json(cls, data: dict) -> "RowScores":
        return cls(
            [float(x) for x in data["nats"]],
            [int(x) for x in data["tokens"]],
            [int(x) for x in data["correct"]],
            [bool(x) for x in data["exact"]],
        )


def score_rows(
    model: Any,
    rows: Sequence[Row],
    pad_id: int,
    batch_size: int = 8,
    device: str = "cpu",
    progress: Optional[Callable[[int], None]] = None,
) -> RowScores:
    """``model``'s :class:`RowScores` on ``rows`` (see the module docstring); batches of similar length."""
    import torch

    from mergekit_ota.fisher.estimator import collate

    count = len(rows)
    nats, tokens, correct, exact = [0.0] * count, [0] * count, [0] * count, [False] * count
    order = sorted(range(count), key=lambda i: len(rows[i][0]))
    model.eval()
    with torch.no_grad():
        for start in range(0, count, batch_size):
            chosen = order[start : start + batch_size]
            batch = collate([rows[i] for i in chosen], pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits[:, :-1]
            target = batch["labels"][:, 1:].to(device)
            scored = target != IGNORE
            flat = logits[scored].float()  # the scored positions only: (labelled tokens, vocabulary)
            token_nats = torch.nn.functional.cross_entropy(flat, target[scored], reduction="none").double()
            hit = (flat.argmax(-1) == target[scored]).long()
            owner = scored.nonzero()[:, 0]  # the batch row of each scored position, in the order of ``flat``
            row_nats = torch.zeros(len(chosen), dtype=torch.float64, device=flat.device).index_add_(
                0, owner, token_nats
            )
            row_correct = torch.zeros(len(chosen), dtype=torch.long, device=hit.device).index_add_(0, owner, hit)
            row_nats, row_correct, row_tokens = row_nats.tolist(), row_correct.tolist(), scored.sum(-1).tolist()
            for position, index in enumerate(chosen):
                nats[index] = float(row_nats[position])
                tokens[index] = int(row_tokens[position])
                correct[index] = int(row_correct[position])
                exact[index] = row_correct[position] == row_tokens[position]
            if progress is not None:
                progress(len(chosen))
    return RowScores(nats, tokens, correct, exact)
