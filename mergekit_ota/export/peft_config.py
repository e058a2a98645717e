"""A PEFT adapter's ``adapter_config.json``: read, checked, and refused unless it is a plain LoRA.

Export derives curvature for ``W = W0 + s B A`` (:mod:`mergekit_ota.math.lora`), so only PEFT's ``peft_type``
``LORA`` without the options that change that form is read: DoRA (``use_dora``, a learned magnitude rescales
every column), ``lora_bias`` (a trained bias beside ``B``), QA-LoRA (``use_qalora``, pooled inputs), LoRA on bare
parameters (``target_parameters``), ``layer_replication`` (layers shared between positions) and trainable token
rows (``trainable_token_indices``) are refused by name, as is every other adapter type (AdaLoRA, LoHa, LoKr, IA3,
VeRA, OFT, BOFT, ...), each with :data:`INSTEAD`: fold the adapter into its base and estimate the folded model's
curvature from data.

``s`` per module (:meth:`AdapterConfig.scaling`) is PEFT's: ``alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), ``r`` the module's rank (its ``lora_A`` rows, which ``rank_pattern`` may have changed) and
``alpha`` from ``alpha_pattern`` where a pattern matches the module's name as PEFT's ``get_pattern_key`` matches
it (``re.match(rf"(.*\\.)?({pattern})$", module)``, the first pattern in the file's order), else ``lora_alpha``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.export import fields
from mergekit_ota.io.safetensors import parse_json
from mergekit_ota.math.lora import lora_scaling

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
INSTEAD = (
    "estimate curvature from data on the adapter folded into its base (peft's merge_and_unload, as mergekit folds "
    "it): mergekit-ota fisher BASE+ADAPTER DATA ADAPTER/exp_avg_sq.safetensors, then merge it as model: BASE+ADAPTER"
)
#: PEFT's peft_type values, as people write them
ADAPTER_TYPES = {
    "ADALORA": "AdaLoRA",
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "IA3": "IA3",
    "VERA": "VeRA",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "FOURIERFT": "FourierFT",
    "HRA": "HRA",
    "BONE": "Bone",
    "LN_TUNING": "LayerNorm tuning",
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "P-tuning",
    "PREFIX_TUNING": "prefix tuning",
}
#: LoRA options that change ``W0 + s B A`` (a true value is refused): option -> what it is
REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora: true; a learned magnitude vector rescales W0 + s B A column by column)",
    "lora_bias": "LoRA with lora_bias: true (a trained bias in lora_B)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "layer_replication": "LoRA with layer_replication (layers shared between positions)",
    "trainable_token_indices": "trainable token rows (trainable_token_indices)",
}


@dataclass(frozen=True)
class AdapterConfig:
    """The settings of a plain LoRA adapter that export uses (``path``: its adapter_config.json)."""

    path: str
    rank: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    modules_to_save: Tuple[str, ...]
    base_model: Optional[str]
    alpha_pattern: Dict[str, float] = field(default_factory=dict)

    def module_alpha(self, module: str) -> float:
        """``lora_alpha`` of base module ``module`` (``model.layers.0.self_attn.q_proj``), ``alpha_pattern`` first."""
        for pattern, alpha in self.alpha_pattern.items():
            try:
                if re.match(rf"(.*\.)?({pattern})$", module):
                    return alpha
            except re.error as error:
                raise CurvatureError(f"{self.path}: alpha_pattern key {pattern!r} is no regular expression") from error
        return self.alpha

    def scaling(self, module: str, rank: int) -> float:
        """PEFT's ``s`` of ``module`` with rank ``rank``."""
        return lora_scaling(self.module_alpha(module), rank, self.rslora)

    def summary(self) -> Dict[str, Any]:
        """What the store's metadata records (``adapter_config``)."""
        return {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.rslora,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": list(self.modules_to_save),
            "alpha_pattern": self.alpha_pattern,
            "base_model_name_or_path": self.base_model,
        }


def _read_json(path: str) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as fp:
            raw = fp.read()
    except OSError as error:
        raise CurvatureError(f"{path}: cannot read it ({error})") from error
    value = parse_json(raw, path, "adapter config")  # strictly: duplicate keys, depth, surrogates (one parser)
    if not isinstance(value, dict):
        raise CurvatureError(f"{path}: expected a JSON object (PEFT's adapter config); found {type(value).__name__}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise CurvatureError(f"{where}: expected a positive number; found {value!r}")
    return float(value)


def read_adapter_config(path: str) -> AdapterConfig:
    """Read ``path`` (an adapter_config.json); refuse what is not a plain LoRA (module docstring)."""
    return adapter_config(_read_json(path), path)


def adapter_config(config: Mapping[str, Any], path: str) -> AdapterConfig:
    """The :class:`AdapterConfig` of PEFT's config as a mapping (adapter_config.json's object, or a live
    ``LoraConfig.to_dict()``; ``path`` names where it came from); refuse what is not a plain LoRA."""
    kind = config.get("peft_type")
    if kind != "LORA":
        if kind is None:
            raise CurvatureError(f"{path}: no 'peft_type'; expected PEFT's adapter config of a LoRA run (LORA)")
        name = ADAPTER_TYPES.get(str(kind).upper(), str(kind))
        raise CurvatureError(
            f"{path}: a {name} adapter (peft_type {kind}); export derives curvature only from plain LoRA "
            f"(W0 + s B A, peft_type LORA). Instead: {INSTEAD}"
        )
    for option, what in REFUSED_OPTIONS.items():
        if config.get(option):
            raise CurvatureError(
                f"{path}: {what}; export derives curvature only from plain LoRA (W0 + s B A). Instead: {INSTEAD}"
            )
    rank = fields.integer(config.get("r"), f"{path} 'r'", minimum=1)
    alpha = _number(config.get("lora_alpha"), f"{path} 'lora_alpha'")
    patterns = fields.mapping(config.get("alpha_pattern") or {}, f"{path} 'alpha_pattern'")
    alpha_pattern = {str(k): _number(v, f"{path} alpha_pattern[{k!r}]") for k, v in patterns.items()}
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str) or not all(
        isinstance(m, str) for m in fields.sequence(saved, f"{path} 'modules_to_save'")
    ):
        raise CurvatureError(f"{path}: 'modules_to_save' must be a list of module names; found {saved!r}")
    base = config.get("base_model_name_or_path")
    return AdapterConfig(
        path=path,
        rank=rank,
        alpha=alpha,
        rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        modules_to_save=tuple(saved),
        base_model=base if isinstance(base, str) and base else None,
        alpha_pattern=alpha_pattern,
    )


def base_model_dir(config: AdapterConfig, given: Optional[str]) -> str:
    """The base model's directory (config.json): ``--model`` if given, else ``base_model_name_or_path`` where it is
    a local directory (absolute, or relative to the current directory) holding config.json."""
    if given is not None:
        return given
    named = config.base_model
    if named is not None and os.path.isfile(os.path.join(os.path.expanduser(named), "config.json")):
        return os.path.expanduser(named)
    recorded = (
        f"it records base_model_name_or_path {named!r}, not a local directory with config.json"
        if named
        else ("it records no base_model_name_or_path")
    )
    raise CurvatureError(
        f"{config.path}: the adapter's weights are named after its base model, whose parameter list (names, shapes, "
        f"order) export needs; {recorded}. Give the base model with --model DIR (the directory holding config.json)"
    )
