"""What every source reader produces: per parameter, its second moment, loaded lazily.

A reader opens a source (reading headers, metadata and shapes only), checks it,
and returns a :class:`SourceState`: one :class:`StateItem` per parameter with a
second moment, in the order they will be written.  ``StateItem.load()`` reads that
one parameter's data (memory: one tensor) and returns :class:`Full` (``v``, Adam's
``exp_avg_sq``) or :class:`Rank1` (``r``, ``c``: the row and column sums of ``v``,
read back as ``v_hat = outer(r, c) / sum(r)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from mergekit_ota.export.mapping import NameEvidence

if TYPE_CHECKING:  # optimizer_states imports this module
    from mergekit_ota.export.optimizer_states import OptimizerFacts


@dataclass(frozen=True)
class Full:
    """A whole second-moment tensor ``v``."""

    v: torch.Tensor


@dataclass(frozen=True)
class Rank1:
    """A 2-D second moment given by its row sums ``r`` (m) and column sums ``c`` (n)."""

    r: torch.Tensor
    c: torch.Tensor


Curvature = Union[Full, Rank1]


@dataclass(frozen=True)
class StateItem:
    """One parameter's second moment: its weight name, shape, and how to read it.

    ``rank1`` says the source holds it as factors (Adafactor, a compressed store);
    ``step`` and ``beta2`` are what bias correction ``v / (1 - beta2**step)`` needs
    (``None`` where the source does not record them); ``origin`` names the data in
    error messages (file and key).
    """

    name: str
    shape: Tuple[int, ...]
    load: Callable[[], Curvature]
    origin: str
    rank1: bool = False
    step: Optional[float] = None
    beta2: Optional[float] = None
    done: Optional[Callable[[], None]] = None  # called once the item is written (e.g. to unmap its pages)

    def __post_init__(self) -> None:
        """Every reader's ``step`` and ``beta2`` pass the same checks (:mod:`mergekit_ota.export.fields`): a
        non-finite step or a beta2 outside ``[0, 1)`` is refused naming :attr:`origin`."""
        from mergekit_ota.export import fields

        fields.step(self.step, f"{self.origin} step")
        if self.beta2 is not None:
            fields.beta2_value(self.beta2, f"{self.origin} beta2")


@dataclass
class SourceState:
    """A checked source, ready to stream.

    ``kind``: how it was read (``trainer``, ``torch``, ``dcp``, ``deepspeed-universal``,
    ``store``); ``optimizer``: what kept the state; ``mapping``: how weight names were
    found, in words; ``without_state``: model parameters with no optimizer state (frozen, or
    never updated); ``bias_corrected``: the values are already unbiased estimates;
    ``metadata``: extra header fields carried over; ``notes``: what a user should know;
    ``evidence``: what establishes each name (names saved with the states, or which names the
    shapes verify and which rest on an order rule); ``None`` for a store, whose carried-over
    metadata keeps the original export's ``mapping_*`` fields; ``fingerprint``: the fingerprint of the
    weights these states belong to (:mod:`mergekit_ota.curvature.fingerprint`), where known; ``missing``:
    ``{parameter: reason}`` of the parameters the source has no curvature for because their optimizer kept
    momentum only (a partial store, :data:`~mergekit_ota.store_format.MISSING`).
    """

    kind: str
    path: str
    optimizer: str
    items: List[StateItem]
    mapping: str
    without_state: List[str] = field(default_factory=list)
    bias_corrected: bool = False
    metadata: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    evidence: Optional[NameEvidence] = None
    fingerprint: Optional[str] = None
    missing: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_facts(
        cls,
        facts: "OptimizerFacts",
        *,
        kind: str,
        path: str,
        items: Sequence[StateItem],
        mapping: str,
        without_state: Iterable[str] = (),
        evidence: Optional[NameEvidence] = None,
        metadata: Optional[Mapping[str, str]] = None,
        notes: Iterable[str] = (),
        fingerprint: Optional[str] = None,
        missing: Optional[Mapping[str, str]] = None,
    ) -> "SourceState":
        """A source whose optimizer name, bias correction, metadata and notes are what ``facts`` (the one
        definition export uses for those states) says, with ``metadata`` and ``notes`` added to them."""
        return cls(
            kind=kind,
            path=path,
            optimizer=facts.name,
            items=list(items),
            mapping=mapping,
            without_state=list(without_state),
            bias_corrected=facts.bias_corrected,
            metadata={**facts.metadata, **(metadata or {})},
            notes=list(facts.notes) + list(notes),
            evidence=evidence,
            fingerprint=fingerprint,
            missing=dict(missing or {}),
        )
