"""A live PEFT LoRA model's curvature, for :func:`~mergekit_ota.training.save.save_curvature` and the callback.

The store is the one ``mergekit-ota export`` writes from the same run's checkpoint: the same builder
(:func:`mergekit_ota.export.lora.lora_source`) over the same inputs, taken live instead of from files:

* the adapter's settings: ``model.peft_config[name].to_dict()``, read by the parser of ``adapter_config.json``
  (:func:`~mergekit_ota.export.peft_config.adapter_config`: DoRA and other adapter types refused alike);
* the base model's parameter list: its ``config`` instantiated on ``meta``
  (:func:`~mergekit_ota.export.model_params.model_parameters`, as ``--model`` is read);
* the adapter's weights: ``peft.get_peft_model_state_dict`` (what PEFT saves as ``adapter_model.safetensors``,
  under the same keys, so the adapter fingerprint is the saved file's);
* each adapter weight's optimizer state: ``optimizer.state[p]`` by parameter identity.

Single process and DDP only (every rank holds the whole adapter and its state; rank 0 computes): an adapter
under FSDP or DeepSpeed ZeRO is refused, naming ``mergekit-ota export`` of the saved checkpoint (FSDP's) or the
data Fisher route instead.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from mergekit_ota.curvature.fingerprint import tensors_fingerprint
from mergekit_ota.errors import CurvatureError
from mergekit_ota.export.lora import AdapterState, lora_source, refuse_other_moments, require_states
from mergekit_ota.export.mapping import BASIS_PARAM_OBJECTS, NameEvidence
from mergekit_ota.export.model_params import clean_name, model_parameters
from mergekit_ota.export.moments import SourceState
from mergekit_ota.export.optimizer_states import check_second_moments, flatten_bnb, group_beta2, optimizer_facts
from mergekit_ota.export.peft_config import INSTEAD, adapter_config
from mergekit_ota.export.peft_names import adapter_layout, file_key


def peft_model(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The PEFT model ``model`` is (under DDP's/accelerate's ``.module`` wrappers), or ``None``."""
    from mergekit_ota.training.gather import unwrap_model

    module = unwrap_model(model)
    return module if hasattr(module, "peft_config") and hasattr(module, "get_base_model") else None


def _on_cpu(entry: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}


def live_lora_source(model: torch.nn.Module, optimizer: Any, origin: str) -> SourceState:
    """The export source of the live PEFT LoRA ``model`` trained by ``optimizer`` (module docstring)."""
    from peft import get_peft_model_state_dict

    from mergekit_ota.training.gather import group_of, is_deepspeed, unwrap_optimizer

    module = peft_model(model)
    if module is None:
        raise CurvatureError(f"{origin}: not a PEFT model")
    if is_deepspeed(module) or any(type(p).__name__ == "DTensor" for p in module.parameters()):
        raise CurvatureError(
            f"{origin}: a LoRA adapter sharded by FSDP or DeepSpeed ZeRO is not read live: under DeepSpeed, "
            "CurvatureCallback reads the checkpoint DeepSpeed saves (in a custom loop, save one and run "
            f"`mergekit-ota export CHECKPOINT OUT --model BASE`); under FSDP, {INSTEAD}"
        )
    if len(module.peft_config) != 1:
        raise CurvatureError(
            f"{origin}: the PEFT model holds {len(module.peft_config)} adapters ({', '.join(module.peft_config)}); "
            "one adapter per expert: save each adapter's run on its own"
        )
    name = next(iter(module.peft_config))
    where = f"{origin}: peft_config[{name!r}]"
    config = adapter_config(module.peft_config[name].to_dict(), where)
    params = model_parameters(module.get_base_model().config, f"{origin}: the base model's config")
    weights = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(module, adapter_name=name).items()}
    layout = adapter_layout(
        {k: tuple(v.shape) for k, v in weights.items()}, params.parameters, config.fan_in_fan_out, where, INSTEAD
    )
    torch_optimizer = unwrap_optimizer(optimizer)
    if not isinstance(torch_optimizer, torch.optim.Optimizer):
        raise CurvatureError(f"{origin}: not a torch optimizer: {type(optimizer).__name__}")
    groups = group_of(torch_optimizer)
    wanted = dict(layout.order)
    entries: Dict[str, Dict[str, Any]] = {}
    live_of: Dict[str, Tuple[str, torch.nn.Parameter]] = {}
    for live, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = file_key(clean_name(live))
        if key not in wanted:
            raise CurvatureError(
                f"{origin}: '{live}' is trained but is neither a lora_A/lora_B weight nor in modules_to_save, so "
                "PEFT does not save it with the adapter and a merge of BASE+ADAPTER would not see its change; "
                "freeze it, or list its module in modules_to_save"
            )
        live_of[key] = (live, p)
        state = torch_optimizer.state.get(p)
        if state:
            entries[key] = _on_cpu(flatten_bnb(state))
    require_states(layout, entries, origin, "weight(s) in all); save after the first optimizer step")
    kinds = check_second_moments({key: list(entry) for key, entry in entries.items()}, origin)
    refuse_other_moments(kinds, origin)
    states = {
        key: AdapterState(
            kind=kinds[key],
            entry=entries[key],
            origin=f"{origin} state of '{live_of[key][0]}'",
            beta2=group_beta2(groups.get(id(live_of[key][1]), {})),
        )
        for key in wanted
    }
    return lora_source(
        config=config,
        layout=layout,
        parameters=params.parameters,
        states=states,
        weight=weights.__getitem__,
        adapter_fingerprint=tensors_fingerprint(weights),
        facts=optimizer_facts(dict(kinds), torch_optimizer.param_groups),
        kind="training",
        path=origin,
        weights_origin="the live adapter's weights",
        mapping="names from the live PEFT model's named_parameters(), states read by parameter identity",
        evidence=NameEvidence(BASIS_PARAM_OBJECTS),
    )
