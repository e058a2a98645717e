"""Exceptions raised for bad user input (each message names the file/tensor at fault), and :class:`Problem`."""

from __future__ import annotations

from typing import Any, Dict, Hashable, List, Literal, Optional, Sequence

Level = Literal["config", "tensor"]


class OTAError(ValueError):
    """Base class for mergekit-ota input errors."""


class CurvatureError(OTAError):
    """A curvature store is missing, unreadable, or does not match the model."""


class ConfigError(OTAError):
    """A merge configuration or parameter is invalid for ``ota``/``ffg``."""


class Problem(str):
    """One problem found before merging: a ``str`` (its message, rendered once when it is made: compared, hashed and
    written as JSON as its message) that also carries the fields it is grouped by.

    * ``tensor``: the tensor it was found on (``None``: not tied to one);
    * ``expert``, ``parameter``: the expert and parameter it is about, where it is about one;
    * ``level``: ``"config"`` for a problem of the configuration as a whole (listed first), else ``"tensor"``;
    * ``kind``: the line standing for every problem of its kind (one file's or expert's, one fault), naming no
      tensor, split where the grouped line lists the tensors (``kind_end`` follows the list); ``""``: it never
      groups with others but its exact repeats;
    * ``example``: what this one adds to its kind's line (its tensor, and values).

    :func:`group_problems` prints the problems of one kind as ``KIND (N tensors: EXAMPLE, EXAMPLE, EXAMPLE and M
    more)KIND_END``; a lone one as its message. Make one with ``Problem(message, kind=..., example=...)`` where the
    lone message says more than its kind, or with :meth:`on_tensor` where it is the kind with its tensor put in.
    """

    tensor: Optional[str]
    expert: Optional[str]
    parameter: Optional[str]
    level: Level
    kind: str
    kind_end: str
    example: str

    def __new__(
        cls,
        message: str,
        kind: str = "",
        example: str = "",
        *,
        tensor: Optional[str] = None,
        expert: Any = None,
        parameter: Optional[str] = None,
        level: Level = "tensor",
        kind_end: str = "",
    ) -> "Problem":
        problem = super().__new__(cls, message)
        problem.tensor = tensor
        problem.expert = None if expert is None else str(expert)
        problem.parameter = parameter
        problem.level = level
        problem.kind = kind
        problem.kind_end = kind_end
        problem.example = example or ((tensor or "") if kind else "")
        return problem

    @classmethod
    def on_tensor(
        cls,
        before: str,
        tensor: Optional[str],
        after: str = "",
        *,
        expert: Any = None,
        parameter: Optional[str] = None,
        level: Level = "tensor",
    ) -> "Problem":
        """``BEFORE (tensor T)AFTER`` (``BEFOREAFTER`` without a tensor); repeated over tensors it groups as
        ``BEFORE (N tensors: T1, T2, T3 and M more)AFTER``."""
        at = f" (tensor {tensor})" if tensor else ""
        return cls(
            f"{before}{at}{after}",
            before if tensor else "",
            tensor=tensor,
            expert=expert,
            parameter=parameter,
            level=level,
            kind_end=after,
        )

    def fields(self) -> Dict[str, Any]:
        """Every field but the message (what a copy or pickle keeps)."""
        return {
            "kind": self.kind,
            "example": self.example,
            "tensor": self.tensor,
            "expert": self.expert,
            "parameter": self.parameter,
            "level": self.level,
            "kind_end": self.kind_end,
        }

    def group(self) -> Hashable:
        """What problems must share to be printed as one line: their kind, level, expert and parameter (a problem
        without a kind groups only with its exact repeats)."""
        if not self.kind:
            return ("message", str(self))
        return ("kind", self.kind, self.kind_end, self.level, self.expert, self.parameter)

    def __reduce__(self):  # type: ignore[no-untyped-def]  # copies and pickles keep the fields
        return (_rebuild, (str(self), self.fields()))


def _rebuild(message: str, fields: Dict[str, Any]) -> Problem:
    return Problem(message, **fields)


def as_problem(message: str) -> Problem:
    """``message`` as a :class:`Problem` (one that is one already, with its fields; a plain message without)."""
    return message if isinstance(message, Problem) else Problem(message)


def problem_of(error: BaseException) -> str:
    """``error``'s message: the :class:`Problem` it was raised with, where it was, so its fields are kept."""
    first = error.args[0] if len(error.args) == 1 else None
    return first if isinstance(first, Problem) else str(error)


def _grouped_line(items: List[Problem], shown: int) -> str:
    first = items[0]
    if len(items) == 1 or not first.kind:
        return str(first)
    examples = [item.example or str(item) for item in items]
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{first.kind} ({len(items)} tensors: {', '.join(examples[:shown])}{more}){first.kind_end}"


def group_problems(problems: Sequence[str], shown: int = 3) -> List[str]:
    """The problems as lines to print, each problem repeated per tensor as one line, in order of first appearance.

    Problems of one :meth:`Problem.group` (one file's or expert's, one kind of fault) are one line:
    ``KIND (21 tensors: EXAMPLE, EXAMPLE, EXAMPLE and 18 more)``; a lone one, or a plain message, is printed as
    it is (exact repeats once). This is the one place problems are grouped: :class:`PreflightError` and
    ``mergekit-ota check`` print through it.
    """
    groups: Dict[Hashable, List[Problem]] = {}
    for problem in problems:
        problem = as_problem(problem)
        groups.setdefault(problem.group(), []).append(problem)
    return [_grouped_line(items, shown) for items in groups.values()]


class PreflightError(OTAError):
    """Problems found while planning a merge, reported together before anything is written.

    ``problems`` holds every problem (:class:`Problem` or message); the error's text groups those repeated per
    tensor (:func:`group_problems`).
    """

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        grouped = group_problems(self.problems)
        counted = f"; {len(self.problems)} counting each tensor" if len(self.problems) > len(grouped) else ""
        listing = "\n".join(f"  - {p}" for p in grouped)
        super().__init__(
            f"mergekit-ota found {len(grouped)} problem(s) before merging (nothing was written{counted}):\n{listing}"
        )


class MergeError(OTAError):
    """A merge computed values it cannot write: non-finite results, or OTA weights that underflowed."""


class OutputError(ConfigError):
    """An output cannot be written where asked: it exists, another run holds it, or the disk is full."""
