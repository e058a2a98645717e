"""Synthetic capabilities of the ``quick`` tier: generation, splits and the character tokenizer.

Every example is ``<bos> MARKER prompt > answer`` in characters; ``MARKER`` (one
upper-case letter) names the capability, and the answer has a fixed length for a
given capability and size, so a batch of one (capability, size) needs no padding.

* ``reverse`` (``R``): letters, answer = the string reversed;
* ``sort`` (``S``): digits, answer = the digits in ascending order;
* ``modadd`` (``M``): two n-digit strings ``a+b``; answer = digit-wise sum modulo 10
  (``a_i + b_i mod 10``, n digits: modular arithmetic, no carries);
* ``shift`` (``C``): letters, answer = each letter replaced by the next one (``z`` -> ``a``);
* ``swap`` (``W``): letters, answer = each adjacent pair swapped (``abcde`` -> ``badce``).

Each capability has *easy* sizes and one *hard* size.  The base is pretrained on a
mixture of all capabilities, mostly at easy sizes (a small share at the hard size);
each expert is fine-tuned on its capability at the hard size, and every model is
scored on the hard size, where the base is clearly worse than each expert.

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
VOCAB: Tuple[str, ...] = (PAD, BOS, *DIGITS, *LETTERS, "+", SEPARATOR, "R", "S", "M", "C", "W")
TOKEN_ID: Dict[str, int] = {token: index for index, token in enumerate(VOCAB)}
BUCKETS = 16
SPLIT_BUCKET: Dict[str, int] = {"val": 0, "test": 1}


def _letters_draw(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _reverse_solve(prompt: str) -> str:
    return prompt[::-1]


def _sort_draw(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def _sort_solve(prompt: str) -> str:
    return "".join(sorted(prompt))


def _modadd_draw(rng: random.Random, n: int) -> str:
    return "+".join("".join(rng.choice(DIGITS) for _ in range(n)) for _ in range(2))


def _modadd_solve(prompt: str) -> str:
    a, b = prompt.split("+")
    return "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b))


def _swap_solve(prompt: str) -> str:
    return "".join(prompt[i + 1] + prompt[i] for i in range(0, len(prompt) - 1, 2)) + prompt[len(prompt) // 2 * 2 :]


def _shift_solve(prompt: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in prompt)


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
    Capability("reverse", "R", _letters_draw, _reverse_solve, easy=(3, 4, 5), hard=8),
    Capability("sort", "S", _sort_draw, _sort_solve, easy=(3, 4, 5), hard=8),
    Capability("modadd", "M", _modadd_draw, _modadd_solve, easy=(2, 3, 4), hard=5),
    Capability("shift", "C", _letters_draw, _shift_solve, easy=(3, 4, 5), hard=8),
    Capability("swap", "W", _letters_draw, _swap_solve, easy=(3, 4, 5), hard=8),
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
    labels = [IGNORE] * (len(ids) - len(answer)) + ids[len(ids) - len(answer) :]
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


def pretraining_examples(caps: Iterable[Capability], count: int, seed: int, hard_share: float = 0.0) -> List[Row]:
    """``count`` encoded train-split examples of all capabilities in equal shares, shuffled.

    A fraction ``hard_share`` of each capability's examples has its hard size, the rest its
    easy sizes (uniformly).
    """
    caps = list(caps)
    rng = random.Random(f"pretrain/{seed}")
    rows = []
    for index in range(count):
        cap = caps[index % len(caps)]
        size = cap.hard if rng.random() < hard_share else rng.choice(cap.easy)
        rows.append(encode(cap, cap.sample(rng, size, "train")))
    rng.shuffle(rows)
    return rows


def finetuning_examples(cap: Capability, count: int, seed: int) -> List[Row]:
    """``count`` encoded train-split examples of ``cap`` at its hard size."""
    return [encode(cap, example) for example in cap.examples(count, cap.hard, "train", seed)]
