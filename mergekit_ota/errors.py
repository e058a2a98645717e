"""Exceptions raised for bad user input (each message names the file/tensor at fault)."""

import re
from typing import Dict, List, Sequence


class OTAError(ValueError):
    """Base class for mergekit-ota input errors."""


class CurvatureError(OTAError):
    """A curvature store is missing, unreadable, or does not match the model."""


class ConfigError(OTAError):
    """A merge configuration or parameter is invalid for ``ota``/``ffg``."""


_TENSOR_CONTEXT = re.compile(r" \(tensor ([^()]+)\)")


def group_problems(problems: Sequence[str], shown: int = 3) -> List[str]:
    """Merge messages that differ only in their ``(tensor NAME)`` part into one line naming the tensors.

    A bad per-expert parameter is reported by the planner once per tensor; for reading
    they become ``... (21 tensors: a, b, c and 18 more) ...``. Used by
    :class:`PreflightError` and by ``mergekit-ota check``.
    """
    groups: Dict[str, List[str]] = {}
    for problem in problems:
        match = _TENSOR_CONTEXT.search(problem)
        key = _TENSOR_CONTEXT.sub(" (tensor {})", problem, count=1) if match else problem
        groups.setdefault(key, []).append(match.group(1) if match else "")
    lines = []
    for key, tensors in groups.items():
        if len(tensors) == 1:
            lines.append(key.replace("{}", tensors[0]) if tensors[0] else key)
            continue
        listed = ", ".join(tensors[:shown]) + (f" and {len(tensors) - shown} more" if len(tensors) > shown else "")
        lines.append(key.replace(" (tensor {})", f" ({len(tensors)} tensors: {listed})"))
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
