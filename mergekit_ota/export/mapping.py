"""Index -> name mapping of an index-keyed optimizer state (``optimizer.pt``), verified or refused.

A ``torch.optim`` state dict numbers parameters ``0, 1, ...`` over its param groups
in order; ``state`` is keyed by those numbers.  Which weight each number is depends
on how the optimizer was built.  A :class:`Candidate` is one way to build it: ordered
lists of ``(name, shape)``, one per group (e.g. the Trainer's decay / no-decay split
of ``named_parameters()``).  Parameters frozen during training are absent from the
optimizer, so a group's numbers match its candidate list as an ordered
*subsequence*: every state's shape must equal its parameter's shape (numbers without
state match any shape).  :func:`map_indices` counts those alignments over all
candidates and accepts the result only if exactly one name assignment exists.

What the shapes verify
----------------------
The check is of shapes, so it cannot see an order error that only exchanges parameters
of equal shape.  If the optimizer had been built from a permutation of the candidate's
order, the alignment would fail exactly when the permutation moves some state onto a
parameter of another shape; a permutation among equal shapes (``gate_proj``/``up_proj``
of a layer, ``q_proj``/``o_proj``, ``k_proj``/``v_proj``, one weight in two layers, all
norm weights) keeps every shape, group size and element count and is accepted, and so
is a wrong ``--frozen`` choice between two same-shape parameters.  Hence
:func:`order_evidence`: a name is *verified by shape* when no other parameter of the
model (any group, frozen ones included) has its shape, since then no other state fits it
and its state fits no other name; every other name rests on the order rule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_ota.errors import CurvatureError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Candidate:
    """One way the optimizer may have been built: ``groups[g]`` = ordered ``(name, shape)`` of group ``g``."""

    description: str
    groups: Tuple[Tuple[Tuple[str, Shape], ...], ...]


@dataclass(frozen=True)
class Mapping:
    """The accepted mapping: ``names[index]``, the rules that give it, and candidates with no state."""

    names: Dict[int, str]
    rules: Tuple[str, ...]
    skipped: Tuple[str, ...]


# how each source kind establishes names: recorded names (exact) or shapes + an order rule
BASIS_PARAM_NAMES = "param_names"  # torch >= 2.6 optimizers built from named_parameters() record them
BASIS_STATE_KEYS = "state_keys"  # a state dict keyed by parameter names (FSDP full optimizer state dicts)
BASIS_DCP_FQNS = "dcp_fqns"  # torch.distributed.checkpoint keys: optimizer.state.<fqn>.<key>
BASIS_DIRECTORY_NAMES = "directory_names"  # DeepSpeed universal checkpoints: zero/<name>/
BASIS_PARAM_SHAPES = "param_shapes"  # native DeepSpeed ZeRO checkpoints: the model states' param_shapes
BASIS_PARAM_OBJECTS = "param_objects"  # captured in training: optimizer.state[p] for p in model.named_parameters()
BASIS_SHAPES_ORDER = "shapes+order"  # index-keyed states mapped by map_indices


@dataclass(frozen=True)
class NameEvidence:
    """What establishes the exported names, for the store's metadata and the summary.

    ``basis``: one of the ``BASIS_*`` values; every basis but ``shapes+order`` names each
    state by a name saved with it (exact, no order involved).  For ``shapes+order``
    (see the module docstring): ``by_shape`` are the names whose shape no other model
    parameter has, ``by_order`` those that rest on the order rule, and ``same_shape``
    lists, per shape shared by an exported name, every model parameter of that shape.
    """

    basis: str
    by_shape: Tuple[str, ...] = ()
    by_order: Tuple[str, ...] = ()
    same_shape: Tuple[Tuple[Shape, Tuple[str, ...]], ...] = ()

    @property
    def exact(self) -> bool:
        return self.basis != BASIS_SHAPES_ORDER


def order_evidence(names: Sequence[str], parameters: Sequence[Tuple[str, Shape]]) -> NameEvidence:
    """Split ``names`` (mapped by shapes + order, each a parameter in ``parameters``) into verified by shape
    and resting on the order rule; ``parameters``: all of the model's ``(name, shape)`` in ``named_parameters()``
    order, frozen ones included.  Every tuple of the result is in that order."""
    shape_of = {n: tuple(s) for n, s in parameters}
    members: Dict[Shape, List[str]] = {}
    for n, shape in shape_of.items():
        members.setdefault(shape, []).append(n)
    counts = {shape: len(group) for shape, group in members.items()}
    wanted = set(names)
    names = [n for n, _ in parameters if n in wanted]
    by_order = tuple(n for n in names if counts[shape_of[n]] > 1)
    same_shape = tuple((shape, tuple(members[shape])) for shape in dict.fromkeys(shape_of[n] for n in by_order))
    return NameEvidence(
        basis=BASIS_SHAPES_ORDER,
        by_shape=tuple(n for n in names if counts[shape_of[n]] == 1),
        by_order=by_order,
        same_shape=same_shape,
    )


def describe_names(names: Sequence[str]) -> str:
    """Names with layer numbers as ``*`` and siblings braced: ``model.layers.*.mlp.{gate_proj,up_proj}.weight``."""
    patterns = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "*", n) for n in names))
    grouped: Dict[Tuple[bool, str, str], List[str]] = {}
    for pattern in patterns:
        parts = pattern.split(".")
        if len(parts) == 1:
            grouped[(False, "", pattern)] = []
            continue
        grouped.setdefault((True, ".".join(parts[:-2]), parts[-1]), []).append(parts[-2])
    shown = []
    for (dotted, parent, leaf), middles in grouped.items():
        if not dotted:
            shown.append(leaf)
            continue
        middle = middles[0] if len(middles) == 1 else "{" + ",".join(middles) + "}"
        shown.append(".".join(p for p in (parent, middle, leaf) if p))
    return ", ".join(shown)


class _Alignments:
    """Ways (capped at 2) to align ``indices[i:]`` into ``names[i + t:]``, ``t`` = names skipped so far.

    Only ``0 <= t <= d = len(names) - len(indices)`` can succeed, so the table has
    ``(k + 1) x (d + 1)`` cells: linear in the model's size when few parameters are frozen.
    """

    def __init__(self, indices: Sequence[int], shapes: Dict[int, Optional[Shape]], names: Sequence[Tuple[str, Shape]]):
        self.indices, self.shapes, self.names = indices, shapes, names
        k, d = len(indices), len(names) - len(indices)
        self.d = d
        self.ways = [[0] * (d + 2) for _ in range(k + 1)]
        if d < 0:
            return
        self.ways[k] = [1] * (d + 1) + [0]
        for i in range(k - 1, -1, -1):
            row, below = self.ways[i], self.ways[i + 1]
            for t in range(d, -1, -1):
                row[t] = min(2, (below[t] if self.fits(i, t) else 0) + row[t + 1])

    def fits(self, i: int, t: int) -> bool:
        """Can ``indices[i]`` be ``names[i + t]`` (same shape, or no state)?"""
        shape = self.shapes.get(self.indices[i])
        return shape is None or tuple(shape) == tuple(self.names[i + t][1])

    @property
    def count(self) -> int:
        return self.ways[0][0] if self.d >= 0 else 0

    def walk(self, prefer_match: bool) -> Dict[int, str]:
        """One alignment: matching as early as possible, or skipping as early as possible."""
        chosen: Dict[int, str] = {}
        t = 0
        for i, index in enumerate(self.indices):
            while not (self.fits(i, t) and self.ways[i + 1][t] and (prefer_match or not self.ways[i][t + 1])):
                t += 1
            chosen[index] = self.names[i + t][0]
        return chosen


def _alignments(
    indices: Sequence[int], shapes: Dict[int, Optional[Shape]], names: Sequence[Tuple[str, Shape]]
) -> List[Dict[int, str]]:
    """No, one, or two different alignments of one group, each as ``{index: name}``.

    With two or more alignments, the walk that matches as early as possible and the
    one that skips as early as possible part at the first branching point, so they
    assign some index differently.
    """
    table = _Alignments(indices, shapes, names)
    if table.count == 0:
        return []
    return [table.walk(True)] if table.count == 1 else [table.walk(True), table.walk(False)]


def _first_mismatch(
    indices: Sequence[int], shapes: Dict[int, Optional[Shape]], names: Sequence[Tuple[str, Shape]]
) -> str:
    """Why a group does not fit a candidate, for the error message."""
    if len(indices) > len(names):
        return f"the optimizer has {len(indices)} parameters in it, the model {len(names)}"
    for position, (index, (name, shape)) in enumerate(zip(indices, names)):
        state = shapes.get(index)
        if state is not None and tuple(state) != tuple(shape):
            return (
                f"its parameter #{position} (state index {index}) has state of shape {list(state)}, "
                f"the model's parameter #{position} '{name}' has shape {list(shape)}"
            )
    return "no subsequence of the model's parameters has the state's shapes"


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def map_indices(
    groups: Sequence[Sequence[int]],
    shapes: Dict[int, Optional[Shape]],
    candidates: Sequence[Candidate],
    source: str,
) -> Mapping:
    """Map state indices to weight names, verified by shapes, group sizes and element counts.

    ``groups``: the indices of each param group (``param_groups[g]["params"]``);
    ``shapes``: ``{index: shape of its second moment}`` (``None``: no state).
    Raises :class:`CurvatureError` if no candidate fits (naming, per candidate, what
    mismatched), or if different name assignments fit (naming an index and two names).
    """
    fits: Dict[Tuple[Tuple[int, str], ...], List[str]] = {}
    skipped_of: Dict[Tuple[Tuple[int, str], ...], Tuple[str, ...]] = {}
    problems: List[str] = []
    for candidate in candidates:
        if len(candidate.groups) != len(groups):
            problems.append(
                f"{candidate.description}: {len(candidate.groups)} group(s), the optimizer has {len(groups)}"
            )
            continue
        assignment: Dict[int, str] = {}
        reason = None
        for g, (indices, names) in enumerate(zip(groups, candidate.groups)):
            found = _alignments(indices, shapes, names)
            if not found:
                reason = f"group {g}: {_first_mismatch(indices, shapes, names)}"
                break
            if len(found) > 1:
                a, b = found
                index = next(i for i in indices if a[i] != b[i])
                missing = len(names) - len(indices)
                reason = (
                    f"group {g} is ambiguous: the optimizer has {len(indices)} of the {len(names)} parameters "
                    f"this rule puts there, and with {missing} of them frozen state index {index} "
                    f"(shape {list(shapes.get(index) or [])}) could be '{a[index]}' or '{b[index]}'"
                )
                break
            assignment.update(found[0])
        if reason is not None:
            problems.append(f"{candidate.description}: {reason}")
            continue
        key = tuple(sorted(assignment.items()))
        fits.setdefault(key, []).append(candidate.description)
        placed = set(assignment.values())
        skipped_of[key] = tuple(n for group in candidate.groups for n, _ in group if n not in placed)

    if not fits:
        ambiguous = any("ambiguous" in p for p in problems)
        hint = (
            "pass --frozen NAME (a glob, repeatable) for the parameters that were frozen in training, "
            if ambiguous
            else "check that --model is the model this optimizer trained; "
        )
        raise CurvatureError(
            f"{source}: cannot map the optimizer's parameter indices to the model's weight names:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\nTo fix: {hint}or save the optimizer with named parameters "
            f"(torch >= 2.6: torch.optim.AdamW(model.named_parameters()) stores param_names)"
        )
    if len(fits) > 1:
        (first, rules_a), (second, rules_b) = list(fits.items())[:2]
        a, b = dict(first), dict(second)
        index = next(i for i in sorted(a) if a[i] != b.get(i))
        raise CurvatureError(
            f"{source}: the optimizer's parameter indices fit the model in more than one way: "
            f"state index {index} is '{a[index]}' under {' / '.join(rules_a)} but '{b.get(index)}' under "
            f"{' / '.join(rules_b)}. Save the optimizer with named parameters (param_names) to export it"
        )
    key, rules = next(iter(fits.items()))
    names = dict(key)
    state_numel = sum(_numel(s) for i, s in shapes.items() if s is not None)
    mapped_numel = sum(_numel(s) for i, s in shapes.items() if s is not None and i in names)
    if state_numel != mapped_numel:  # a state index outside every group
        raise CurvatureError(f"{source}: {state_numel - mapped_numel} state elements belong to no param group")
    return Mapping(names=names, rules=tuple(rules), skipped=skipped_of[key])
