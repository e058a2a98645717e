"""``save_curvature``: write a live optimizer's second moments as a curvature store, from any training loop.

::

    from mergekit_ota.training import save_curvature

    for step, batch in enumerate(loader):
        ...; optimizer.step()
        if step % 500 == 0:
            save_curvature(model, optimizer, f"ckpt-{step}/exp_avg_sq.safetensors")   # every rank calls it

Every rank calls it (gathering may be a collective, see :mod:`.gather`); only rank 0 writes, through the
export's streaming writer (temp files renamed into place when complete, so a crash leaves no half
store).  The store is what ``mergekit-ota export`` writes from the same state, with the same metadata
(``step``, ``beta2``, ``optimizer``, how names were found), and ``source_kind: training``.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional

import torch

from mergekit_ota.curvature.writer import check_output, store_layout
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.mapping import BASIS_PARAM_OBJECTS, NameEvidence
from mergekit_ota.export.moments import SourceState, StateItem
from mergekit_ota.export.options import ExportOptions
from mergekit_ota.export.pipeline import ExportResult, write_store
from mergekit_ota.training.gather import (
    LiveGatherError,
    LiveParameter,
    LiveState,
    drain,
    is_distributed,
    live_state,
    rank,
)
from mergekit_ota.training.peft_live import live_lora_source, peft_model


def agree(ok: bool) -> bool:
    """Whether every rank is ``ok`` (an all-reduce MIN; ``ok`` itself without torch.distributed)."""
    if not is_distributed():
        return ok
    flag = torch.tensor([1 if ok else 0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def source_of(state: LiveState, origin: str, parameters: Optional[List[LiveParameter]] = None) -> SourceState:
    """The live state as an export source (its items' ``load`` may be collectives); ``parameters`` replaces
    ``state.parameters`` (the same, with wrapped loads)."""
    items = [
        StateItem(
            name=p.name,
            shape=p.shape,
            load=p.load,
            origin=f"{origin} '{p.name}'",
            rank1=p.rank1,
            step=p.step,
            beta2=p.beta2,
        )
        for p in (state.parameters if parameters is None else parameters)
    ]
    return SourceState.from_facts(
        state.facts,  # as export decides for the same states
        kind="training",
        path=origin,
        items=items,
        mapping="names from the live model's named_parameters(), states read by parameter identity",
        without_state=state.without_state,
        evidence=NameEvidence(BASIS_PARAM_OBJECTS),
        fingerprint=state.fingerprint,  # of the live weights, equal to export's of the weights saved beside
    )


def save_curvature(
    model: torch.nn.Module,
    optimizer: Any,
    path: str,
    *,
    compress: str = "rank1",
    dtype: str = "float32",
    force: bool = True,
    accelerator: Any = None,
) -> Optional[ExportResult]:
    """Write ``model``'s second moments from ``optimizer`` to ``path`` (a ``.safetensors`` file, an index, or a
    directory, as ``mergekit-ota export`` takes); return the result on rank 0, ``None`` on other ranks.

    ``compress``: ``"rank1"`` (default: row and column sums of every matrix, ``m + n`` numbers) or ``"none"``;
    ``force``: replace an existing *store* at ``path`` (never anything else); ``accelerator``: an
    ``accelerate.Accelerator`` (its wrappers are unwrapped anyway; it is used to wait for every process at
    the end).  Raises :class:`~mergekit_ota.errors.CurvatureError` on every rank alike when any rank
    cannot go on (a bad ``path`` on rank 0, a state that cannot be gathered, a value rank 0 refuses to
    write, such as NaN), after every rank has finished its gathers; nothing is then written.
    """
    options = ExportOptions.parse(compress=compress, dtype=dtype, force=force)
    writer = rank() == 0
    refusal: Optional[BaseException] = None
    if writer:
        try:
            check_output(store_layout(path), options.force)
        except CurvatureError as error:
            refusal = error
    _settle(None, refusal, f"{path}: rank 0 refused to write the curvature store", None)
    if peft_model(model) is not None:  # a LoRA adapter: the store export writes from its checkpoint
        return _save_adapter(model, optimizer, path, options, accelerator)
    state = live_state(model, optimizer)
    if not state.parameters:
        raise CurvatureError("the optimizer holds no second moment yet (save after the first optimizer step)")
    result, failure = None, None
    if writer:
        remaining = _Tracked(state.parameters)
        source = source_of(state, f"live optimizer ({state.strategy})", list(remaining.wrapped()))
        try:
            result = write_store(source, path, options)
        except LiveGatherError:
            raise  # every rank raised it at the same parameter: nobody is left waiting
        except Exception as error:  # noqa: BLE001 - rank 0 alone failed: re-raised below, after the others finish
            failure = error
            drain(remaining.rest())  # the other ranks are waiting in these gathers
    else:
        drain(iter(state.parameters))
    return _settle(result, failure, f"{path}: rank 0 could not write the curvature store", accelerator)


def _settle(
    result: Optional[ExportResult], failure: Optional[BaseException], what: str, accelerator: Any
) -> Optional[ExportResult]:
    """Every rank raises (rank 0 its own ``failure``, the others ``what``), or none does and ``result`` is returned
    once every process is done (``accelerator``)."""
    if not agree(failure is None):
        if failure is not None:
            raise failure
        raise CurvatureError(f"{what} (see its error)")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


def _save_adapter(
    model: torch.nn.Module, optimizer: Any, path: str, options: ExportOptions, accelerator: Any
) -> Optional[ExportResult]:
    """A PEFT LoRA model (:mod:`.peft_live`): rank 0 builds the source and writes it; no collective but the
    agreement that it did, so every rank raises or none does."""
    result, failure = None, None
    if rank() == 0:
        try:
            result = write_store(live_lora_source(model, optimizer, "live PEFT model"), path, options)
        except Exception as error:  # noqa: BLE001 - re-raised below, on every rank alike
            failure = error
    return _settle(result, failure, f"{path}: rank 0 could not write the adapter's curvature store", accelerator)


class _Tracked:
    """The parameters with ``load`` wrapped to record which were gathered, so a failed write can drain the rest."""

    def __init__(self, parameters: List[LiveParameter]):
        self.parameters = parameters
        self.done = 0

    def wrapped(self) -> Iterator[LiveParameter]:
        for index, parameter in enumerate(self.parameters):

            def load(p: LiveParameter = parameter, i: int = index) -> Any:
                value = p.load()
                self.done = i + 1
                return value

            yield LiveParameter(parameter.name, parameter.shape, load, parameter.step, parameter.beta2, parameter.rank1)

    def rest(self) -> Iterator[LiveParameter]:
        return iter(self.parameters[self.done :])
