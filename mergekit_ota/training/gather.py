"""Each parameter's second moment from a live model and optimizer, gathered one parameter at a time.

Strategies (detected from the parameters and the optimizer, never configured):

* **single process, DDP** (``torch.nn.parallel.DistributedDataParallel``, accelerate): every rank holds
  the whole state; ``optimizer.state[p]`` for ``p`` in ``model.named_parameters()`` (wrappers such as
  DDP's ``.module``, accelerate's ``AcceleratedOptimizer`` are unwrapped).
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and their states are ``DTensor`` shards;
  ``.full_tensor()`` gathers one state tensor (a collective: every rank takes part, in the same order).
* **DeepSpeed ZeRO-1/2/3 and ``BF16_Optimizer``**: ``deepspeed.utils.safe_get_full_optimizer_state(p,
  "exp_avg_sq")`` (a collective).  Before each call the ranks agree, by an all-reduce, that every one
  of them can answer; ZeRO-1/2 keeps no fragment for the second param group on some ranks (DeepSpeed
  0.19), and there the gathering stops with :class:`LiveGatherError` on every rank alike, never a hang.
  :class:`~mergekit_ota.training.callback.CurvatureCallback` therefore reads DeepSpeed's saved
  checkpoint instead (:mod:`mergekit_ota.export.zero`).
* FSDP1 (``FullyShardedDataParallel`` flat parameters) is refused: its optimizer state is keyed by flat
  parameters; export its saved checkpoint (``mergekit-ota export``), or use FSDP2.

The state forms are those :mod:`mergekit_ota.export.optimizer_states` reads (Adam's ``exp_avg_sq``, Adafactor's
factors, bitsandbytes 8-bit), through the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from mergekit_ota.curvature.fingerprint import tensors_fingerprint
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.model_params import clean_name
from mergekit_ota.export.moments import Curvature, Full
from mergekit_ota.export.optimizer_states import (
    FACTORED_KINDS,
    OptimizerFacts,
    check_second_moments,
    flatten_bnb,
    group_beta2,
    load_moment,
    moment_shape,
    optimizer_facts,
    scalar,
)


class LiveGatherError(CurvatureError):
    """A parameter's state cannot be gathered from the live optimizer (raised on every rank alike)."""


@dataclass
class LiveParameter:
    """One trainable parameter: its name, full shape, and how to gather its second moment (maybe a collective)."""

    name: str
    shape: Tuple[int, ...]
    load: Callable[[], Curvature]
    step: Optional[float]
    beta2: Optional[float]
    rank1: bool = False


@dataclass
class LiveState:
    """What :func:`live_state` found: the parameters with state, in ``named_parameters()`` order, and what the
    store records about the optimizer (``facts``: the definition export uses for the same states)."""

    strategy: str
    facts: OptimizerFacts
    parameters: List[LiveParameter]
    without_state: List[str]
    fingerprint: Optional[str] = None  # of the weights, where every rank holds them whole (single process, DDP)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP's / DeepSpeed's / accelerate's wrappers (their ``.module``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (and similar ``.optimizer`` wrappers)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def is_deepspeed(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are managed by DeepSpeed ZeRO (ZeRO-3 ``ds_id``, ZeRO-1/2/bf16
    ``_hp_mapping``)."""
    return _deepspeed_parameters(list(unwrap_model(model).parameters()))


def _deepspeed_parameters(parameters: Sequence[torch.nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in parameters)


def _refuse_fsdp1(model: torch.nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise CurvatureError(
            "FSDP1 (FullyShardedDataParallel) keeps optimizer state per flat parameter: live capture is not "
            "supported; use FSDP2 (fully_shard, accelerate fsdp_version: 2), or export the saved checkpoint "
            "with `mergekit-ota export`"
        )


def is_distributed() -> bool:
    """Whether this process is one rank of an initialised ``torch.distributed`` group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def _full(tensor: Any) -> torch.Tensor:
    """A state tensor whole on CPU: a DTensor is gathered (collective), anything else copied off its device."""
    if type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def group_of(optimizer: Any) -> Dict[int, Mapping[str, Any]]:
    """``{id(parameter): its param group}`` of a torch optimizer."""
    return {id(p): group for group in getattr(optimizer, "param_groups", []) for p in group["params"]}


def _deepspeed_parameter(
    name: str, p: torch.nn.Parameter, step: Optional[float], beta2: Optional[float]
) -> LiveParameter:
    shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)

    def load() -> Curvature:
        from deepspeed.utils import safe_get_full_optimizer_state

        if hasattr(p, "ds_id"):
            can = True
        else:
            mapping = getattr(p, "_hp_mapping", None)
            can = mapping is None or "exp_avg_sq" in (getattr(mapping, "optim_fragment", None) or {})
        flag = torch.tensor([1 if can else 0])
        if is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        if not flag.item():
            raise LiveGatherError(
                f"'{name}': DeepSpeed keeps no exp_avg_sq fragment for it on some rank (ZeRO-1/2, second param "
                f"group), so it cannot be gathered live; read the saved checkpoint instead (`mergekit-ota export`)"
            )
        value = safe_get_full_optimizer_state(p, "exp_avg_sq")
        if value is None:
            raise LiveGatherError(f"'{name}': DeepSpeed returned no exp_avg_sq (is the optimizer Adam?)")
        return Full(value.detach().to("cpu", torch.float32).reshape(shape))

    return LiveParameter(name=name, shape=shape, load=load, step=step, beta2=beta2)


def _deepspeed_step_beta2(optimizer: Any) -> Tuple[Optional[float], Optional[float]]:
    """The one step and beta2 the DeepSpeed optimizer's base optimizer records (``None`` if they differ)."""
    base = optimizer
    for _ in range(4):
        if isinstance(base, torch.optim.Optimizer) and base.state:
            break
        base = getattr(base, "optimizer", None)
        if base is None:
            return None, None
    steps = {scalar(s.get("step")) for s in base.state.values()}
    betas = {group_beta2(g) for g in base.param_groups}
    return (steps.pop() if len(steps) == 1 else None), (betas.pop() if len(betas) == 1 else None)


def live_state(model: torch.nn.Module, optimizer: Any) -> LiveState:
    """The trainable parameters' second moments, gathered lazily (see the module docstring).

    Every rank must call this and then ``load()`` every parameter in order: loads may be collectives.
    """
    module = unwrap_model(model)
    _refuse_fsdp1(module)
    named = [(clean_name(n), p) for n, p in module.named_parameters()]
    trainable = [(n, p) for n, p in named if p.requires_grad]
    frozen = [n for n, p in named if not p.requires_grad]
    if _deepspeed_parameters([p for _, p in trainable]):
        step, beta2 = _deepspeed_step_beta2(optimizer)
        params = [_deepspeed_parameter(n, p, step, beta2) for n, p in trainable]
        facts = optimizer_facts({"": "full"}, getattr(unwrap_optimizer(optimizer), "param_groups", []))
        return LiveState("deepspeed", replace(facts, name=f"{facts.name} (DeepSpeed, live)"), params, frozen)

    torch_optimizer = unwrap_optimizer(optimizer)
    if not isinstance(torch_optimizer, torch.optim.Optimizer):
        raise CurvatureError(f"not a torch optimizer: {type(optimizer).__name__}")
    groups = group_of(torch_optimizer)
    states = {n: flatten_bnb(torch_optimizer.state[p]) for n, p in trainable if torch_optimizer.state.get(p)}
    kinds = check_second_moments(
        {n: list(s) for n, s in states.items()},
        type(torch_optimizer).__name__,
        {n: groups[id(p)] for n, p in trainable if n in states and id(p) in groups},
    )
    fsdp2 = any(type(p).__name__ == "DTensor" for _, p in trainable)
    strategy = "fsdp2" if fsdp2 else "ddp" if is_distributed() else "single"
    params = []
    for name, p in trainable:
        if name not in kinds:
            continue
        state, kind = states[name], kinds[name]
        shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
        shape = moment_shape(kind, shapes) if kind in FACTORED_KINDS else tuple(p.shape)
        params.append(
            LiveParameter(
                name=name,
                shape=shape,
                load=(lambda k=kind, s=state, n=name: load_moment(k, lambda key: _full(s[key]), n)),
                step=scalar(state.get("step")),
                beta2=group_beta2(groups.get(id(p), {})),
                rank1=kind in FACTORED_KINDS and len(shape) == 2,
            )
        )
    without = frozen + [n for n, _ in trainable if n not in kinds]
    facts = optimizer_facts(kinds, torch_optimizer.param_groups)
    # FSDP2 shards the weights (a fingerprint would gather them): its store records none, as DeepSpeed's live one
    fingerprint = None if fsdp2 else tensors_fingerprint({n: p for n, p in trainable if n in kinds})
    return LiveState(strategy, facts, params, without, fingerprint)


def drain(parameters: Iterator[LiveParameter]) -> None:
    """Take part in the remaining gathers (non-writing ranks, or rank 0 after a failed write)."""
    for parameter in parameters:
        parameter.load()
