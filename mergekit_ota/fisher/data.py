"""Calibration data for ``mergekit-ota fisher``: JSONL of texts or chats, or a directory of text files, as rows.

A row is ``(ids, labels)``: the token ids of one sample (at most ``max_length``) and, per position,
the id the loss is taken on or :data:`IGNORE`:

* ``{"text": ...}`` (JSONL) or one text file: every token after the first is labelled (causal LM loss);
* ``{"prompt": ..., "completion": ...}`` (JSONL, TRL's prompt-completion form with strings): the prompt
  tokenized as a text (with the tokenizer's special tokens, as ``text``) followed by the completion tokenized on
  its own (no special tokens); only the completion's tokens are labelled. Append the EOS token to the completion
  text yourself where the model was trained to emit it;
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` (JSONL): the conversation rendered with the
  model's own chat template (``tokenizer.apply_chat_template``); only the assistant turns' tokens are
  labelled. Each assistant turn's span is found by rendering the conversation up to it (with the
  generation prompt) and up to its end: the template must render a prefix of a conversation as a
  prefix of its tokens, which is checked.

A JSONL row may also name what it tests, for ``mergekit-ota compare`` (fisher ignores them): ``"task"``, the
capability (a string), ``"expert"``, the expert model it belongs to (a string: the model's path as the merge
config writes it, or its directory name), and ``"half"``, the half of compare's split it belongs to
(``"selection"`` or ``"report"``: a user's own validation/test split).

The first ``samples`` samples are used, in file order (a directory's files in name order), so a
store is reproducible; :func:`data_hash` is the SHA-256 of the samples used, recorded in the store.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Sequence, Tuple

from mergekit_ota.errors import ConfigError
from mergekit_ota.io.safetensors import JsonError, parse_json

IGNORE = -100
Row = Tuple[List[int], List[int]]
TEXT_SUFFIXES = (".txt", ".md", ".text")


@dataclass(frozen=True)
class Sample:
    """One calibration sample as read: a text, a prompt and its completion, or a chat's messages; ``origin`` names
    file and line; ``task``, ``expert`` and ``half`` as the row names them (``""`` where it does not)."""

    origin: str
    text: str = ""
    messages: Tuple[Tuple[str, str], ...] = ()
    task: str = ""
    expert: str = ""
    half: str = ""
    prompt: str = ""
    completion: str = ""

    @property
    def has_answer(self) -> bool:
        """Whether the labelled tokens are an answer to the tokens before them (a chat's assistant turns, a
        completion), so that greedy exact match of them is meaningful."""
        return bool(self.messages) or bool(self.completion)

    def canonical(self) -> str:
        """A stable JSON form (what :func:`data_hash` hashes)."""
        if self.messages:
            return json.dumps({"messages": [list(m) for m in self.messages]}, sort_keys=True, ensure_ascii=False)
        if self.completion:
            return json.dumps({"completion": self.completion, "prompt": self.prompt}, ensure_ascii=False)
        return json.dumps({"text": self.text}, ensure_ascii=False)


def _jsonl(path: str) -> Iterator[Sample]:
    with open(path, encoding="utf-8") as fp:
        for number, line in enumerate(fp, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = parse_json(line.encode("utf-8"), where, "JSON line")
            except JsonError as err:  # the one strict JSON parser: syntax, duplicate keys, depth, surrogates
                raise ConfigError(f"{where}: not valid JSON ({err.reason}); expected {FORMS}") from err
            yield _sample(item, where)


ROW_FIELDS = ("task", "expert", "half")  # optional string fields of a JSONL row (see the module docstring)


def _labels(item: Any, where: str) -> Dict[str, str]:
    found = {name: item[name] for name in ROW_FIELDS if isinstance(item, dict) and name in item}
    for name, value in found.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {name!r} must be a non-empty string; got {value!r}")
    return {name: value.strip() for name, value in found.items()}


FORMS = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}'


def _sample(item: Any, where: str) -> Sample:
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return Sample(where, text=item["text"], **_labels(item, where))
    if isinstance(item, dict) and ("prompt" in item or "completion" in item):
        prompt, completion = item.get("prompt"), item.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ConfigError(
                f"{where}: a prompt-completion sample needs a string 'prompt' and a non-empty string 'completion' "
                f"(a conversational prompt or completion, a list of messages, goes in 'messages' instead); got "
                f"prompt {str(prompt)[:40]!r}, completion {str(completion)[:40]!r}"
            )
        return Sample(where, prompt=prompt, completion=completion, **_labels(item, where))
    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        messages = []
        for message in item["messages"]:
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise ConfigError(f"{where}: every message needs a string 'role' and 'content'; got {message!r}")
            messages.append((message["role"], message["content"]))
        if not any(role == "assistant" for role, _ in messages):
            raise ConfigError(
                f"{where}: a chat sample needs an assistant turn (the loss is taken on assistant tokens only)"
            )
        return Sample(where, messages=tuple(messages), **_labels(item, where))
    raise ConfigError(f"{where}: expected {FORMS}; got {str(item)[:80]!r}")


def read_samples(path: str, samples: int) -> List[Sample]:
    """The first ``samples`` samples of ``path`` (a ``.jsonl`` file, a text file, or a directory of text files)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(TEXT_SUFFIXES))
        if not names:
            raise ConfigError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)}) in this directory")
        found: List[Sample] = []
        for name in names[:samples]:
            with open(os.path.join(path, name), encoding="utf-8") as fp:
                found.append(Sample(os.path.join(path, name), text=fp.read()))
    elif not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file or directory (calibration data: .jsonl, a text file, or a directory)")
    elif path.lower().endswith((".jsonl", ".json")):
        found = []
        for sample in _jsonl(path):
            found.append(sample)
            if len(found) == samples:
                break
    else:
        with open(path, encoding="utf-8") as fp:
            found = [Sample(path, text=fp.read())]
    if not found:
        raise ConfigError(f"{path}: holds no calibration sample")
    return found


def data_hash(samples: Sequence[Sample]) -> str:
    """SHA-256 of the samples used, each in :meth:`Sample.canonical` form, one per line."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.canonical().encode("utf-8") + b"\n")
    return digest.hexdigest()


def _chat_ids(tokenizer: Any, messages: Sequence[Dict[str, str]], **kwargs: Any) -> List[int]:
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


def to_row(tokenizer: Any, sample: Sample, max_length: int, as_generated: bool = False) -> Row:
    """``(ids, labels)`` of one sample, truncated to ``max_length`` tokens (see the module docstring).

    ``as_generated`` (``mergekit-ota compare``'s scoring): each assistant turn is labelled only up to and including
    the first end-of-turn token in it (the tokenizer's EOS token, e.g. ``<|im_end|>``), which is where generation
    stops: what a template writes after it (ChatML's newline) is never generated, and a model fine-tuned with the
    loss on answers only need not predict it. A turn without the EOS token is labelled whole, as without it.
    """
    if sample.completion:
        prompt = list(tokenizer(sample.prompt, add_special_tokens=True)["input_ids"])
        answer = list(tokenizer(sample.completion, add_special_tokens=False)["input_ids"])
        return (prompt + answer)[:max_length], ([IGNORE] * len(prompt) + answer)[:max_length]
    if not sample.messages:
        ids = list(tokenizer(sample.text, add_special_tokens=True)["input_ids"])[:max_length]
        return ids, [IGNORE] + ids[1:]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError(f"{sample.origin}: a chat sample, but the model's tokenizer has no chat template")
    messages = [{"role": role, "content": content} for role, content in sample.messages]
    ids = _chat_ids(tokenizer, messages)
    labels = [IGNORE] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _chat_ids(tokenizer, messages[:index], add_generation_prompt=True)
        end = _chat_ids(tokenizer, messages[: index + 1])
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise ConfigError(
                f"{sample.origin}: the chat template does not render turn {index} as a prefix of the "
                "conversation, so its assistant tokens cannot be found"
            )
        stop = len(end)
        if as_generated and tokenizer.eos_token_id in ids[len(start) : len(end)]:
            stop = ids.index(tokenizer.eos_token_id, len(start), len(end)) + 1
        labels[len(start) : stop] = ids[len(start) : stop]
    return ids[:max_length], labels[:max_length]


def rows(tokenizer: Any, samples: Sequence[Sample], max_length: int, as_generated: bool = False) -> List[Row]:
    """Every sample as a row (``as_generated``: see :func:`to_row`); a sample left with no labelled token
    (truncated away) is an error naming it."""
    out = []
    for sample in samples:
        ids, labels = to_row(tokenizer, sample, max_length, as_generated)
        if all(label == IGNORE for label in labels[1:]):
            raise ConfigError(
                f"{sample.origin}: no token to take the loss on within --max-length {max_length} "
                "(empty, or its labelled part, an assistant turn or a completion, starts after the cut)"
            )
        out.append((ids, labels))
    return out
