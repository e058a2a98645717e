"""Exceptions raised for bad user input (each message names the file/tensor at fault)."""

import re
from typing import Dict, List, Sequence, Tuple


class OTAError(ValueError):
    """Base class for mergekit-ota input errors."""


class CurvatureError(OTAError):
    """A curvature store is missing, unreadable, or does not match the model."""


class ConfigError(OTAError):
    """A merge configuration or parameter is invalid for ``ota``/``ffg``."""


_TENSOR_CONTEXT = re.compile(r" \(tensor ([^()]+)\)")


class Problem(str):
    """A problem message of a kind that repeats per tensor of one file (or expert), as a ``str`` that knows its kind.

    ``kind``: the line standing for every problem of its kind (file or expert, and what is wrong, naming no
    tensor); ``example``: what this one adds to it (its tensor and values). :func:`group_problems` prints the
    problems of one kind as ``KIND (N tensors: EXAMPLE, EXAMPLE, EXAMPLE and M more)``; a lone one as its message.
    Anywhere else it is its message (compared, hashed, written as JSON like any ``str``).
    """

    kind: str
    example: str

    def __new__(cls, message: str, kind: str = "", example: str = "") -> "Problem":
        problem = super().__new__(cls, message)
        problem.kind = kind
        problem.example = example
        return problem

    def __reduce__(self):  # type: ignore[no-untyped-def]  # copies and pickles keep the kind
        return (Problem, (str(self), self.kind, self.example))


def problem_of(error: BaseException) -> str:
    """``error``'s message: the :class:`Problem` it was raised with, where it was, so its kind is kept."""
    first = error.args[0] if len(error.args) == 1 else None
    return first if isinstance(first, Problem) else str(error)


def group_problems(problems: Sequence[str], shown: int = 3) -> List[str]:
    """The problems as lines to print, each problem repeated per tensor as one line, in order of first appearance.

    A :class:`Problem` with a ``kind`` groups with the others of that kind (one file's or expert's, one kind of
    fault: ``KIND (21 tensors: EXAMPLE, EXAMPLE, EXAMPLE and 18 more)``). Other messages that differ only in their
    ``(tensor NAME)`` part (a bad per-expert parameter, which the planner reports once per tensor) become one
    line naming the tensors: ``... (21 tensors: a, b, c and 18 more) ...``. This is the one place problems are
    grouped: :class:`PreflightError` and ``mergekit-ota check`` print through it.
    """
    groups: Dict[Tuple[str, str], List[str]] = {}
    for problem in problems:
        kind = getattr(problem, "kind", "")
        if kind:
            groups.setdefault(("kind", kind), []).append(problem)
            continue
        match = _TENSOR_CONTEXT.search(problem)
        key = _TENSOR_CONTEXT.sub(" (tensor {})", problem, count=1) if match else problem
        groups.setdefault(("tensor", key), []).append(match.group(1) if match else "")
    lines = []
    for (how, key), items in groups.items():
        if how == "kind":
            if len(items) == 1:
                lines.append(str(items[0]))
                continue
            examples = [getattr(item, "example", "") or str(item) for item in items]
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            lines.append(f"{key} ({len(items)} tensors: {', '.join(examples[:shown])}{more})")
        elif len(items) == 1:
            lines.append(key.replace("{}", items[0]) if items[0] else key)
        else:
            listed = ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
            lines.append(key.replace(" (tensor {})", f" ({len(items)} tensors: {listed})"))
    return lines


class PreflightError(OTAError):
    """Problems found while planning a merge, reported together before anything is written.

    ``problems`` holds every message; the error's text groups those repeated per tensor
    (:func:`group_problems`).
    """

    def __init__(self, problems: "list[str]"):
        self.problems = list(problems)
        grouped = group_problems(self.problems)
        listing = "\n".join(f"  - {p}" for p in grouped)
        counted = f"; {len(self.problems)} counting each tensor" if len(self.problems) > len(grouped) else ""
        super().__init__(
            f"mergekit-ota found {len(grouped)} problem(s) before merging (nothing was written{counted}):\n{listing}"
        )


class MergeError(OTAError):
    """A merge computed values it cannot write: non-finite results, or OTA weights that underflowed."""


class OutputError(ConfigError):
    """An output cannot be written where asked: it exists, another run holds it, or the disk is full."""
