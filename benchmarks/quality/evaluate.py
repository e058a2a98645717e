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

from typing import Any, Dict, List, Sequence

import torch

from benchmarks.quality.train import IGNORE, Row, collate


@torch.no_grad()
def score_rows(
    model: Any, rows: Sequence[Row], pad_id: int, batch_size: int = 64, device: str = "cpu"
) -> Dict[str, float]:
    """``{"exact_match", "token_accuracy", "loss", "rows", "tokens"}`` of ``model`` on ``rows`` (see module doc)."""
    if not rows:
        raise ValueError("no rows to score")
    exact = correct = tokens = 0
    loss = 0.0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths share a batch
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in order[start : start + batch_size]], pad_id)
        logits = (
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            .logits[:, :-1]
            .float()
        )
        target = batch["labels"][:, 1:].to(device)
        scored = target != IGNORE
        if not bool(scored.any(dim=-1).all()):
            raise ValueError("every row needs at least one scored (labelled) token")
        hit = (logits.argmax(-1) == target) & scored
        exact += int((hit | ~scored).all(dim=-1).sum())
        correct += int(hit.sum())
        tokens += int(scored.sum())
        loss += float(torch.nn.functional.cross_entropy(logits[scored], target[scored], reduction="sum"))
    return {
        "exact_match": exact / len(rows),
        "token_accuracy": correct / tokens,
        "loss": loss / tokens,
        "rows": len(rows),
        "tokens": tokens,
    }


def load_model(path: str, device: str = "cpu") -> Any:
    """A saved causal LM in float32, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def common_prefix(rows: Sequence[Row]) -> int:
    """Length of the longest token prefix shared by every row, stopping before any row's first labelled
    position's predictor (so the logits predicting every labelled token come from after the prefix)."""
    first = rows[0][0]
    length = min(len(ids) for ids, _ in rows)
    for ids, _ in rows[1:]:
        for i in range(length):
            if ids[i] != first[i]:
                length = i
                break
    predictors = [next(t for t, label in enumerate(labels) if label != IGNORE) - 1 for _, labels in rows]
    return max(0, min([length] + predictors))


def _parts(model: Any) -> Any:
    """``(decoder, output head)`` of a transformers causal LM, or ``None`` when it has no such split."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None else None


def _cache_argument() -> str:
    """The decoder's keyword for a key/value cache: ``cache`` (transformers >= 5.2x), else ``past_key_values``."""
    import inspect

    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_argument()


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def score_items(
    model: Any,
    rows: Sequence[Row],
    pad_id: int,
    batch_size: int = 64,
    device: str = "cpu",
    bf16: bool = False,
    share_prefix: bool = True,
) -> Dict[str, Any]:
    """:func:`score_rows`'s numbers plus per-row results, each in the order the rows were given: ``items``,
    ``"1"`` where the row is an exact match, else ``"0"`` (a string of ``len(rows)`` characters);
    ``row_tokens``, ``row_correct`` (scored tokens that are the argmax) and ``row_nats`` (summed cross-entropy,
    rounded to 6 significant digits), from which a paired bootstrap recomputes token accuracy and loss.

    Faster on chat rows, with the same predictions: the prompt prefix every row of a batch shares (the
    chat template's system turn) is run once and its key/value cache repeated over the batch
    (``share_prefix``), and the output head (the vocabulary projection) is applied to the scored
    positions only. ``bf16``: matmuls under CPU/CUDA bfloat16 autocast (the weights stay float32).
    """
    if not rows:
        raise ValueError("no rows to score")
    parts = _parts(model)
    items = ["0"] * len(rows)
    row_tokens, row_correct, row_nats = [0] * len(rows), [0] * len(rows), [0.0] * len(rows)
    exact = correct = tokens = 0
    loss = 0.0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    for start in range(0, len(rows), batch_size):
        chosen = order[start : start + batch_size]
        batch_rows = [rows[i] for i in chosen]
        prefix = common_prefix(batch_rows) if share_prefix and parts is not None else 0
        rest = [(ids[prefix:], labels[prefix:]) for ids, labels in batch_rows]
        batch = collate(rest, pad_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        target = batch["labels"][:, 1:].to(device)
        scored = target != IGNORE
        if not bool(scored.any(dim=-1).all()):
            raise ValueError("every row needs at least one scored (labelled) token")
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            if parts is None:
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1][scored].float()
            else:
                decoder, head = parts
                cache = None
                if prefix:
                    head_ids = torch.tensor([batch_rows[0][0][:prefix]], device=device)
                    cache = _cache_of(decoder(input_ids=head_ids, use_cache=True))
                    cache.batch_repeat_interleave(len(batch_rows))
                    mask = torch.cat([torch.ones(len(batch_rows), prefix, dtype=mask.dtype, device=device), mask], 1)
                hidden = decoder(
                    input_ids=input_ids,
                    attention_mask=mask,
                    use_cache=cache is not None,
                    **{_CACHE_ARG: cache} if cache is not None else {},
                ).last_hidden_state
                logits = head(hidden[:, :-1][scored]).float()
        hits_flat = logits.argmax(-1) == target[scored]
        hit = torch.zeros_like(scored)
        hit[scored] = hits_flat
        row_exact = (hit | ~scored).all(dim=-1)
        nats = torch.nn.functional.cross_entropy(logits, target[scored], reduction="none")
        owner = scored.nonzero()[:, 0]  # the batch row of every scored position, in the order of logits
        per_row_nats = torch.zeros(len(chosen), dtype=torch.float64, device=nats.device).index_add_(
            0, owner, nats.double()
        )
        for position, (index, ok) in enumerate(zip(chosen, row_exact.tolist())):
            items[index] = "1" if ok else "0"
            row_tokens[index] = int(scored[position].sum())
            row_correct[index] = int(hit[position].sum())
            row_nats[index] = float(f"{float(per_row_nats[position]):.6g}")
        exact += int(row_exact.sum())
        correct += int(hits_flat.sum())
        tokens += int(scored.sum())
        loss += float(nats.sum())
    return {
        "exact_match": exact / len(rows),
        "token_accuracy": correct / tokens,
        "loss": loss / tokens,
        "rows": len(rows),
        "tokens": tokens,
        "items": "".join(items),
        "row_tokens": row_tokens,
        "row_correct": row_correct,
        "row_nats": row_nats,
    }


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Row],
    end_id: int,
    batch_size: int = 32,
    device: str = "cpu",
    bf16: bool = False,
) -> List[List[int]]:
    """Real greedy decoding (``model.generate``, left-padded prompts, KV cache) of every row's answer.

    The prompt is each row's unlabelled prefix; decoding stops at ``end_id`` (included) or after
    the labelled length + 4 tokens. Used to check that teacher-forced exact match equals what
    greedy decoding produces.
    """
    out: List[List[int]] = []
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [ids[: next(t for t, label in enumerate(labels) if label != IGNORE)] for ids, labels in chunk]
        width = max(len(p) for p in prompts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        longest = max(sum(1 for label in labels if label != IGNORE) for _, labels in chunk)
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=longest + 4,
                do_sample=False,
                eos_token_id=end_id,
                pad_token_id=pad,
            )
        for row in generated[:, width:].tolist():
            answer = []
            for token in row:
                answer.append(token)
                if token == end_id:
                    break
            out.append(answer)
    return out
