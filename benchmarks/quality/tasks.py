"""Synthetic capabilities of the ``quick`` tier: generation, splits and the character tokenizer.

Every example is ``<bos> MARKER prompt > answer`` in characters; ``MARKER`` (one
upper-case letter) names the capability, and the answer has a fixed length for a
given capability and size, so a batch of one (capability, size) needs no padding.

* ``reverse`` (``R``): letters, answer = the string reversed;
* ``sort`` (``S``): digits, answer = the digits in ascending order;
* ``add`` (``A``): two n-digit numbers written least-significant digit first,
  ``a+b``; answer = ``a + b`` with n+1 digits, least-significant first;
* ``recall`` (``K``): n key/value pairs (distinct letters, digits), ``?`` and one key;
  answer = that key's value.

Each capability has *easy* sizes (the mixture the base is pretrained on) and one
*hard* size (what its expert is fine-tuned on and every model is scored on), so the
base is clearly worse than each expert on its own capability.

Held-out examples never occur in training: an example's split is a function of its
prompt alone (``crc32(marker + prompt) % 16``: 0 is validation, 1 is test, the rest
train), and training generators reject prompts outside the train buckets.

Scoring (:func:`benchmarks.quality.evaluate.score_rows` on :func:`encode` rows, whose
labels are the answer): with a fixed-length answer, greedy decoding reproduces it
exactly iff the teacher-forced argmax at every answer position is the target token,
so one forward pass per batch gives the greedy exact-match accuracy.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Literal, Tuple

from benchmarks.quality.train import IGNORE, Row

Split = Literal["train", "val", "test"]
Example = Tuple[str, str]  # (prompt, answer)

PAD, BOS = "<pad>", "<bos>"
SEPARATOR = ">"
DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB: Tuple[str, ...] = (PAD, BOS, *DIGITS, *LETTERS, "+", "?", SEPARATOR, "R", "S", "A", "K")
TOKEN_ID: Dict[str, int] = {token: index for index, token in enumerate(VOCAB)}
BUCKETS = 16
SPLIT_BUCKET: Dict[str, int] = {"val": 0, "test": 1}


def _reverse_draw(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _reverse_solve(prompt: str) -> str:
    return prompt[::-1]


def _sort_draw(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def _sort_solve(prompt: str) -> str:
    return "".join(sorted(prompt))


def _add_draw(rng: random.Random, n: int) -> str:
    return "+".join("".join(rng.choice(DIGITS) for _ in range(n)) for _ in range(2))


def _add_solve(prompt: str) -> str:
    a, b = prompt.split("+")
    total = int(a[::-1]) + int(b[::-1])
    return str(total).zfill(len(a) + 1)[::-1]


def _recall_draw(rng: random.Random, n: int) -> str:
    keys = rng.sample(LETTERS, n)
    pairs = "".join(k + rng.choice(DIGITS) for k in keys)
    return f"{pairs}?{rng.choice(keys)}"


def _recall_solve(prompt: str) -> str:
    pairs, key = prompt.split("?")
    return dict(zip(pairs[0::2], pairs[1::2]))[key]


@dataclass(frozen=True)
class Capability:
    """One synthetic skill: ``draw(rng, size) -> prompt``, ``solve(prompt) -> answer``, easy and hard sizes."""

    name: str
    marker: str
    draw: Callable[[random.Random, int], str]
    solve: Callable[[str], str]
    easy: Tuple[int, ...]
    hard: int

    def split_of(self, prompt: str) -> Split:
        """The split a prompt belongs to (a pure function of the prompt)."""
        bucket = zlib.crc32((self.marker + prompt).encode()) % BUCKETS
        return "val" if bucket == SPLIT_BUCKET["val"] else "test" if bucket == SPLIT_BUCKET["test"] else "train"

    def sample(self, rng: random.Random, size: int, split: Split) -> Example:
        """One example of ``size`` from ``split`` (rejection sampling on the prompt's bucket)."""
        while True:
            prompt = self.draw(rng, size)
            if self.split_of(prompt) == split:
                return prompt, self.solve(prompt)

    def examples(self, count: int, size: int, split: Split, seed: int, unique: bool = False) -> List[Example]:
        """``count`` examples of ``size`` from ``split``, deterministic in ``seed`` (distinct if ``unique``)."""
        rng = random.Random(f"{self.name}/{size}/{split}/{seed}")
        out: List[Example] = []
        seen = set()
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 200 * count + 1000:
                raise ValueError(f"{self.name}: cannot draw {count} distinct {split} examples of size {size}")
            example = self.sample(rng, size, split)
            if unique and example[0] in seen:
                continue
            seen.add(example[0])
            out.append(example)
        return out


CAPABILITIES: Tuple[Capability, ...] = (
    Capability("reverse", "R", _reverse_draw, _reverse_solve, easy=(3, 4, 5), hard=8),
    Capability("sort", "S", _sort_draw, _sort_solve, easy=(3, 4, 5), hard=8),
    Capability("add", "A", _add_draw, _add_solve, easy=(1, 2, 3), hard=5),
    Capability("recall", "K", _recall_draw, _recall_solve, easy=(2, 3, 4), hard=8),
)


def capability(name: str) -> Capability:
    """The capability called ``name``."""
    for cap in CAPABILITIES:
        if cap.name == name:
            return cap
    raise KeyError(f"unknown capability {name!r}; known: {[c.name for c in CAPABILITIES]}")


# --- tokenizer -------------------------------------------------------------------------


def encode(cap: Capability, example: Example) -> Tuple[List[int], List[int]]:
    """Token ids of ``<bos> MARKER prompt > answer`` and labels (``IGNORE`` except on the answer)."""
    prompt, answer = example
    tokens = [BOS, cap.marker, *prompt, SEPARATOR, *answer]
    ids = [TOKEN_ID[t] for t in tokens]
    labels = [IGNORE] * (len(ids) - len(answer)) + ids[len(ids) - len(answer):]
    return ids, labels


def hf_tokenizer():
    """A ``PreTrainedTokenizerFast`` equal to :func:`encode` (one token per character, ``<bos>`` first).

    Saved with every model, so ``tokenizer("Rabc>")`` gives the ids the models were trained on.
    """
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split as SplitPattern
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(dict(TOKEN_ID), unk_token=PAD))
    tok.pre_tokenizer = SplitPattern(Regex("."), behavior="isolated")
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, TOKEN_ID[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, unk_token=PAD)


# --- training mixtures -----------------------------------------------------------------


def pretraining_examples(caps: Iterable[Capability], count: int, seed: int) -> List[Row]:
    """``count`` encoded train-split examples, capabilities and easy sizes mixed uniformly, shuffled."""
    caps = list(caps)
    rng = random.Random(f"pretrain/{seed}")
    rows = []
    for index in range(count):
        cap = caps[index % len(caps)]
        rows.append(encode(cap, cap.sample(rng, rng.choice(cap.easy), "train")))
    rng.shuffle(rows)
    return rows


def finetuning_examples(cap: Capability, count: int, seed: int) -> List[Row]:
    """``count`` encoded train-split examples of ``cap`` at its hard size."""
    return [encode(cap, example) for example in cap.examples(count, cap.hard, "train", seed)]
