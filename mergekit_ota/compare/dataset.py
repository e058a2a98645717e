"""``compare``'s held-out DATA: fisher's samples as token rows, grouped by capability and split in two halves.

DATA is read by :mod:`mergekit_ota.fisher.data` (JSONL texts, JSONL chats with the loss on the assistant turns,
a text file, a directory of text files). A JSONL row may name its capability (``"task"``) and the expert it
belongs to (``"expert"``: the model's path as CONFIG writes it, or its directory name). A row naming an expert
but no task is of the capability named after that expert; a row naming neither is of capability :data:`ALL`.
Every row of one capability must name the same expert (or none).

**Split**: within each capability, the rows are shuffled with a generator seeded by ``(seed, capability)`` and
the first ``round(share * n)`` go to the *selection* half, the rest to the *report* half; so the split is the
same on every run, and does not change when rows of another capability are added. A capability whose rows name
their half (``"half": "selection"`` or ``"report"``, a user's own validation/test split) keeps it instead; its
rows must then all name one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from mergekit_ota.errors import ConfigError
from mergekit_ota.fisher import data as fisher_data

ALL = "all"
SELECTION, REPORT = "selection", "report"


@dataclass(frozen=True)
class Dataset:
    """Rows of DATA with, per row, its capability, and its half.

    ``experts``: ``{capability: expert path as CONFIG writes it}`` for the capabilities whose rows name one.
    """

    samples: Tuple[fisher_data.Sample, ...]
    rows: Tuple[fisher_data.Row, ...]
    capability: Tuple[str, ...]
    halves: Tuple[str, ...]
    capabilities: Tuple[str, ...]
    experts: Dict[str, str]

    def indices(self, capability: str, half: str) -> List[int]:
        """The rows of ``capability`` in ``half``, in file order."""
        return [i for i, (c, h) in enumerate(zip(self.capability, self.halves)) if c == capability and h == half]

    def fingerprint(self) -> str:
        """SHA-256 of the token rows (ids and labels, in order): what a model's cached scores were computed on."""
        digest = hashlib.sha256()
        for ids, labels in self.rows:
            digest.update(json.dumps([ids, labels]).encode("ascii") + b"\n")
        return digest.hexdigest()


def match_expert(name: str, experts: Sequence[str], where: str) -> str:
    """The expert of ``experts`` (paths as CONFIG writes them) that ``name`` names: the same path, the same
    directory, or its directory name. :class:`ConfigError` when none or several match."""

    def same(a: str, b: str) -> bool:
        return os.path.normpath(os.path.abspath(os.path.expanduser(a))) == os.path.normpath(
            os.path.abspath(os.path.expanduser(b))
        )

    found = [e for e in experts if name == e or same(name, e)]
    if not found:
        found = [e for e in experts if name == os.path.basename(os.path.normpath(e))]
    if len(found) == 1:
        return found[0]
    if found:
        raise ConfigError(f"{where}: expert {name!r} is ambiguous: it names {', '.join(found)}; give the path")
    raise ConfigError(
        f"{where}: expert {name!r} is not an expert of the merge config (its experts: {', '.join(experts)})"
    )


def _capabilities(samples: Sequence[fisher_data.Sample], experts: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    capability, owner, first = [], {}, {}
    for sample in samples:
        expert = match_expert(sample.expert, experts, sample.origin) if sample.expert else ""
        name = sample.task or (os.path.basename(os.path.normpath(expert)) if expert else ALL)
        capability.append(name)
        if name not in first:
            first[name] = (sample.origin, expert)
        elif first[name][1] != expert:
            raise ConfigError(
                f"{sample.origin}: capability {name!r} names expert {expert or '(none)'!r}, but "
                f"{first[name][0]} names {first[name][1] or '(none)'!r}: one capability, one expert"
            )
        if expert:
            owner[name] = expert
    return capability, owner


HALVES = (SELECTION, REPORT)


def _pinned(samples: Sequence[fisher_data.Sample], capability: Sequence[str], name: str) -> List[str]:
    """The halves the rows of capability ``name`` name (all ``""`` when none does); :class:`ConfigError` naming
    the row for a value other than :data:`HALVES`, or for a capability where some rows name one and some not."""
    members = [s for s, c in zip(samples, capability) if c == name]
    for sample in members:
        if sample.half and sample.half not in HALVES:
            raise ConfigError(f"{sample.origin}: 'half' must be {SELECTION!r} or {REPORT!r}; got {sample.half!r}")
    named = [s for s in members if s.half]
    if named and len(named) != len(members):
        missing = next(s for s in members if not s.half)
        raise ConfigError(
            f"{missing.origin}: names no 'half', but {named[0].origin} of the same capability {name!r} does: "
            "name the half of every row of a capability, or of none (compare then splits it with --split)"
        )
    return [s.half for s in members]


def split(capability: Sequence[str], share: float, seed: int, samples: Sequence[fisher_data.Sample] = ()) -> List[str]:
    """Each row's half (see the module docstring; ``samples``, one per row, carry the halves rows name);
    :class:`ConfigError` if a capability leaves a half empty."""
    halves = [""] * len(capability)
    for name in dict.fromkeys(capability):
        members = [i for i, c in enumerate(capability) if c == name]
        pinned = _pinned(samples, capability, name) if samples else [""] * len(members)
        if pinned[0]:
            chosen = dict(zip(members, pinned))
            how = "as its rows name them"
        else:
            random.Random(f"{seed}/{name}").shuffle(members)
            cut = round(share * len(members))
            chosen = {index: SELECTION if position < cut else REPORT for position, index in enumerate(members)}
            how = f"at --split {share:g}"
        for half in HALVES:
            if half not in chosen.values():
                raise ConfigError(
                    f"capability {name!r} has {len(members)} row(s): its {half} half would have none {how}"
                    " (each capability needs rows in both halves)"
                )
        for index, half in chosen.items():
            halves[index] = half
    return halves


def read_dataset(
    path: str, tokenizer: Any, max_length: int, experts: Sequence[str], share: float = 0.5, seed: int = 0
) -> Dataset:
    """DATA as a :class:`Dataset` tokenized by ``tokenizer`` (see the module docstring). Raises
    :class:`ConfigError` naming the row for a row with no labelled token, an expert CONFIG does not name, or a
    capability without rows in one half."""
    if not 0 < share < 1:
        raise ConfigError(f"--split must be in (0, 1): the selection half's share of each capability; got {share}")
    samples = fisher_data.read_samples(path, sys.maxsize)
    capability, owner = _capabilities(samples, experts)
    # chat turns labelled as generated: through the end-of-turn token, not the template's text after it
    rows = fisher_data.rows(tokenizer, samples, max_length, as_generated=True)
    halves = split(capability, share, seed, samples)
    return Dataset(
        tuple(samples), tuple(rows), tuple(capability), tuple(halves), tuple(dict.fromkeys(capability)), owner
    )
