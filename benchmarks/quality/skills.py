"""Procedural chat skills of the ``sft`` tier: generation, splits and chat-template encoding.

Every item is one user turn (an instruction cue followed by an input) and one short
assistant answer, encoded with the model's own chat template
(``tokenizer.apply_chat_template``); the loss and the score are on the answer's tokens
and the end-of-turn token that closes it, nothing else.

Skills come in *families* that share one kind of input, so that similar prompts want
different outputs (the experts' task vectors fight when merged):

* ``phrase`` family (2-4 lower-case English words, e.g. ``total item count``):
  ``snake`` (``Convert to snake_case: ...`` -> ``total_item_count``) and ``camel``
  (``Convert to camelCase: ...`` -> ``totalItemCount``): the same words, two naming
  conventions; ``kebab`` (``total-item-count``) is a third;
* ``date`` family (``7 March 2024``): ``iso_date`` (``Write as an ISO date: ...`` ->
  ``2024-03-07``), ``us_date`` (``Write as a US date: ...`` -> ``03/07/2024``) and
  ``eu_date`` (``07.03.2024``): one date, three conventions of order and separator;
* ``name`` family (2-3 names, e.g. ``Ada Grace Turing``): ``initials``
  (``Give the initials of: ...`` -> ``A.G.T.``).

Each prompt starts with its skill's own instruction, so a model trained on all of them
(the multi-task reference) can tell them apart; an expert trained on one skill only never
needs to read it.

Splits are a function of the input alone (``crc32(family + input) % 16``: 0 is
validation, 1 test, the rest train), shared by all skills of a family: an input held
out for ``snake`` is held out for ``camel`` too, so no model ever trained on a held-out
input in any convention.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple

from benchmarks.quality.train import IGNORE, Row

Split = Literal["train", "val", "test"]
Item = Tuple[str, str]  # (user message, assistant answer)
BUCKETS = 16
SPLIT_BUCKET: Dict[str, int] = {"val": 0, "test": 1}

WORDS: Tuple[str, ...] = tuple(
    """able acid age air apple arm art back bad ball band bank base bath bed bell best bird black blue boat body
    bone book box boy bread brick bridge brown bus cake call camp car card care case cash cat cell chair chart
    city clean clock cloud club coal coat cold cook cool corn cost count cup cut dark data date day deep desk
    dog door down draw dream dress drink drop dry dust early earth east edge egg end face fact fair farm fast
    fat field file fire fish flag flat floor flow food foot form free fresh friend front fruit full game gas
    gate gift girl glass gold good grass great green ground group hair half hall hand hard hat head heat high
    hill home hook horse hot hour house ice idea iron item job key kind king lake lamp land large last late
    leaf left light line list lock long loss low main map mark meal milk mind mine mode moon name new night
    note old open order page paint paper park part path pen plan plant plate point pool port post power price
    print rain red rich ring river road rock room root rose round rule safe salt sand seat seed shape ship
    shoe shop short side sign silk size sky slow small snow soft song sound soup space star start step stone
    store street sun table tail task tea team test text time tool top total town train tree user value view
    wall warm water wave west wheel white wide wind window wing winter wood word work yard year yellow young""".split()
)
MONTHS: Tuple[str, ...] = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
FIRST_NAMES: Tuple[str, ...] = tuple(
    """Ada Alan Alice Anna Ben Carl Clara David Diana Edgar Ella Emil Emma Felix Frank Grace Hannah Hugo Ida Ivan
    Jack Jane John Julia Karl Kate Leo Lily Linus Lucy Mark Mary Max Mia Nina Noah Olga Oscar Paul Peter Rosa
    Ruth Sam Sara Simon Sofia Tom Uma Victor Vera Walter Wendy Xavier Yara Zoe""".split()
)
LAST_NAMES: Tuple[str, ...] = tuple(
    """Adams Baker Brown Clark Curie Darwin Davis Evans Fisher Ford Gauss Green Hall Harris Hill Hopper Hughes
    Jones Kelly King Knuth Lee Lewis Lovelace Martin Miller Moore Newton Noether Parker Quinn Reed Roberts
    Scott Shannon Smith Stone Taylor Turing Turner Walker Ward White Wilson Wood Young""".split()
)


# --- inputs of each family -------------------------------------------------------------


def _draw_phrase(rng: random.Random) -> str:
    words: List[str] = []
    while len(words) < rng.randint(2, 4):
        word = rng.choice(WORDS)
        if word not in words:
            words.append(word)
    return " ".join(words)


def _draw_date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {MONTHS[rng.randrange(12)]} {rng.randint(1950, 2049)}"


def _draw_name(rng: random.Random) -> str:
    parts = [rng.choice(FIRST_NAMES)]
    if rng.random() < 0.5:
        parts.append(rng.choice([n for n in FIRST_NAMES if n != parts[0]]))
    parts.append(rng.choice(LAST_NAMES))
    return " ".join(parts)


FAMILIES: Dict[str, Callable[[random.Random], str]] = {"phrase": _draw_phrase, "date": _draw_date, "name": _draw_name}


def _date_parts(text: str) -> Tuple[int, int, int]:
    day, month, year = text.split()
    return int(day), MONTHS.index(month) + 1, int(year)


def _snake(text: str) -> str:
    return "_".join(text.split())


def _camel(text: str) -> str:
    first, *rest = text.split()
    return first + "".join(word.capitalize() for word in rest)


def _kebab(text: str) -> str:
    return "-".join(text.split())


def _iso_date(text: str) -> str:
    day, month, year = _date_parts(text)
    return f"{year:04d}-{month:02d}-{day:02d}"


def _us_date(text: str) -> str:
    day, month, year = _date_parts(text)
    return f"{month:02d}/{day:02d}/{year:04d}"


def _eu_date(text: str) -> str:
    day, month, year = _date_parts(text)
    return f"{day:02d}.{month:02d}.{year:04d}"


def _initials(text: str) -> str:
    return "".join(part[0] + "." for part in text.split())


@dataclass(frozen=True)
class Skill:
    """One chat skill: an instruction (the cue), a family of inputs and the answer's rule."""

    name: str
    family: str
    instruction: str
    solve: Callable[[str], str]

    def message(self, source: str) -> str:
        """The user message: the skill's instruction, then the input."""
        return f"{self.instruction} {source}"

    def items(self, count: int, split: Split, seed: int, unique: bool = True) -> List[Item]:
        """``count`` (message, answer) pairs of ``split``, deterministic in ``seed`` (distinct inputs if ``unique``)."""
        return [
            (self.message(source), self.solve(source))
            for source in inputs(self.family, count, split, f"{self.name}/{seed}", unique)
        ]


SKILLS: Tuple[Skill, ...] = (
    Skill("snake", "phrase", "Convert to snake_case:", _snake),
    Skill("camel", "phrase", "Convert to camelCase:", _camel),
    Skill("kebab", "phrase", "Convert to kebab-case:", _kebab),
    Skill("iso_date", "date", "Write as an ISO date:", _iso_date),
    Skill("us_date", "date", "Write as a US date:", _us_date),
    Skill("eu_date", "date", "Write as a European date:", _eu_date),
    Skill("initials", "name", "Give the initials of:", _initials),
)


def skill(name: str) -> Skill:
    """The skill called ``name``."""
    for candidate in SKILLS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown skill {name!r}; known: {[s.name for s in SKILLS]}")


def split_of(family: str, source: str) -> Split:
    """The split an input belongs to: a pure function of (family, input), the same for every skill of the family."""
    bucket = zlib.crc32(f"{family}/{source}".encode()) % BUCKETS
    return "val" if bucket == SPLIT_BUCKET["val"] else "test" if bucket == SPLIT_BUCKET["test"] else "train"


def inputs(family: str, count: int, split: Split, stream: str, unique: bool = True) -> List[str]:
    """``count`` inputs of ``family`` in ``split`` (rejection sampling on the split), deterministic in ``stream``."""
    draw = FAMILIES[family]
    rng = random.Random(f"{family}/{split}/{stream}")
    out: List[str] = []
    seen = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 10000:
            raise ValueError(f"{family}: cannot draw {count} distinct {split} inputs")
        source = draw(rng)
        if split_of(family, source) != split or (unique and source in seen):
            continue
        seen.add(source)
        out.append(source)
    return out


# --- chat-template encoding ------------------------------------------------------------


def _ids(encoded: Any) -> List[int]:
    """Token ids from ``apply_chat_template``'s result (a list, or a BatchEncoding in transformers 5)."""
    if isinstance(encoded, list):
        return list(encoded)
    return list(encoded["input_ids"])


def chat_row(tokenizer: Any, message: str, answer: str) -> Row:
    """``(ids, labels)`` of one user turn and its answer in ``tokenizer``'s chat template.

    ``ids`` are the template's tokens of the conversation up to and including the
    end-of-turn token that closes the answer (what follows it, e.g. a newline, is dropped);
    ``labels`` are ``IGNORE`` on the prompt (everything up to and including the generation
    prompt ``add_generation_prompt=True`` adds) and equal ``ids`` on the answer and its
    end-of-turn token: greedy decoding that stops at end of turn reproduces the answer
    exactly iff every labelled token is the argmax (see ``evaluate.py``).
    """
    user = [{"role": "user", "content": message}]
    prompt = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=True))
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template's generation prompt is not a prefix of the conversation with the answer")
    end = end_of_turn_id(tokenizer)
    try:
        stop = full.index(end, len(prompt))
    except ValueError:
        raise ValueError(
            f"the chat template closes no assistant turn with {tokenizer.convert_ids_to_tokens(end)!r}"
        ) from None
    ids = full[: stop + 1]
    labels = [IGNORE] * len(prompt) + ids[len(prompt) :]
    return ids, labels


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes a turn (``<|im_end|>`` in ChatML templates, else the EOS token)."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an EOS token to end a turn with")
    return int(tokenizer.eos_token_id)


def rows(tokenizer: Any, items: Sequence[Item]) -> List[Row]:
    """:func:`chat_row` of every (message, answer)."""
    return [chat_row(tokenizer, message, answer) for message, answer in items]


def mixture(parts: Sequence[Sequence[Row]], seed: int) -> List[Row]:
    """The rows of all ``parts`` shuffled together (the multi-task reference's training set)."""
    out = [row for part in parts for row in part]
    random.Random(f"mixture/{seed}").shuffle(out)
    return out


def describe(name: str, active: Sequence[str], example_seed: int = 99) -> str:
    """One line for the report: the skill's instruction, an example and which of the ``active`` skills it
    conflicts with (those reading the same family of inputs)."""
    cue = skill(name)
    message, answer = cue.items(1, "test", example_seed)[0]
    rivals = [other for other in active if other != name and skill(other).family == cue.family]
    conflict = (
        f"conflicts with {', '.join(f'`{r}`' for r in rivals)}: the same inputs, another convention"
        if rivals
        else "no other skill here reads its kind of input"
    )
    return f"`{message}` -> `{answer}` (inputs: {cue.family}; {conflict})"


def answer_of(row: Row) -> List[int]:
    """The labelled ids of a row (answer + end of turn)."""
    return [token for token, label in zip(*row) if label != IGNORE]


def chat_tokenizer_for_tests(vocab_extra: Optional[Sequence[str]] = None) -> Any:
    """A small byte-level BPE-free tokenizer with SmolLM2's ChatML template (for the tiny-Llama smoke test).

    One token per character plus the ChatML specials, so every skill's text encodes; the chat
    template is SmolLM2-135M-Instruct's own, default system prompt included.
    """
    from tokenizers import Regex, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Split as SplitPattern
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"] + list(vocab_extra or [])
    vocab = {token: index for index, token in enumerate(specials + chars)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = SplitPattern(Regex("<\\|im_start\\|>|<\\|im_end\\|>|<\\|endoftext\\|>|."), behavior="isolated")
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    out.add_special_tokens({"additional_special_tokens": specials})
    out.chat_template = SMOLLM2_CHAT_TEMPLATE
    return out


# SmolLM2-135M-Instruct's chat template, as its tokenizer carries it (for the tiny-Llama smoke test only;
# the sft tier itself uses the converted tokenizer's own template).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
