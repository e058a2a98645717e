"""Parameters of ``ota`` and ``ffg``: their mergekit specs and their validation.

Per expert (``parameters:`` of a model in the YAML):

=================  =========  ====================================================
``weight``         1.0        ``weight_i``: scales expert i's curvature (ota) or task vector (ffg)
``density``        none       FFG: fraction of expert i's entries kept, in (0, 1]
``threshold``      none       FFG: keep entries with saliency ``v*tau**2 >= threshold``
``curvature``      default    store path (file, index or directory); default:
                              ``<model dir>/exp_avg_sq.safetensors``. In memory: a tensor
``optimizer_step`` from store Adam step count, for ``bias_correction``
``beta2``          from store Adam beta2, for ``bias_correction``
=================  =========  ====================================================

Shared (top-level ``parameters:``): ``lambda`` (1.0), ``density_scope``
(``tensor`` | ``model``), ``bias_correction`` (false); ``ota`` adds ``power``
(0.5) and ``eps`` (1e-12); ``ffg`` adds ``normalize`` (false).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Tuple

from mergekit.merge_methods.base import ParameterScope, ParameterSpec
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from mergekit_ota.errors import ConfigError


class ExpertSettings(BaseModel):
    """Validated per-expert parameters for one tensor."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    weight: float = 1.0
    density: Optional[float] = None
    threshold: Optional[float] = None
    optimizer_step: Optional[int] = None
    beta2: Optional[float] = None

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {value}")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not value >= 0.0:
            raise ValueError(f"threshold must be >= 0; got {value}")
        return value

    @field_validator("optimizer_step")
    @classmethod
    def _step_range(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"optimizer_step must be >= 1; got {value}")
        return value

    @field_validator("beta2")
    @classmethod
    def _beta2_range(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"beta2 must be in (0, 1); got {value}")
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> "ExpertSettings":
        if self.density is not None and self.threshold is not None:
            raise ValueError("give density or threshold, not both")
        return self

    def bias_correction_scale(self) -> float:
        """``1 / (1 - beta2**step)``, Adam's bias correction of ``v``."""
        if self.optimizer_step is None or self.beta2 is None:
            raise ValueError(
                "bias_correction needs optimizer_step and beta2 (set them per expert, "
                "or use a store whose metadata records them)"
            )
        return 1.0 / (1.0 - self.beta2**self.optimizer_step)


class SharedSettings(BaseModel):
    """Validated shared parameters."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    lam: float = 1.0
    density_scope: Literal["tensor", "model"] = "tensor"
    bias_correction: bool = False
    power: float = 0.5
    eps: float = 1e-12
    normalize: bool = False

    @field_validator("power")
    @classmethod
    def _power_range(cls, value: float) -> float:
        if not value >= 0.0:
            raise ValueError(f"power must be >= 0; got {value}")
        return value

    @field_validator("eps")
    @classmethod
    def _eps_range(cls, value: float) -> float:
        if not value > 0.0:
            raise ValueError(f"eps must be > 0; got {value}")
        return value


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(x) for x in item.get("loc", ()) if x != "__root__")
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def expert_settings(values: dict, *, expert: Any, tensor: Optional[str]) -> ExpertSettings:
    """Validate one expert's parameters; raise :class:`ConfigError` naming expert and tensor."""
    try:
        return ExpertSettings.model_validate(values)
    except ValidationError as error:
        where = f" (tensor {tensor})" if tensor else ""
        raise ConfigError(f"Invalid parameters for expert {expert}{where}: {_describe(error)}") from None


def shared_settings(values: dict, *, method: str) -> SharedSettings:
    """Validate shared parameters; raise :class:`ConfigError` naming the method."""
    data = dict(values)
    if "lambda" in data:
        data["lam"] = data.pop("lambda")
    try:
        return SharedSettings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"Invalid parameters for merge method {method}: {_describe(error)}") from None


def _spec(name: str, value_type: Any, scope: ParameterScope, default: Any, description: str) -> ParameterSpec:
    return ParameterSpec(name, value_type, scope, default=default, description=description)


EXPERT_PARAMETERS: Tuple[ParameterSpec, ...] = (
    _spec("weight", float, ParameterScope.NON_BASE, 1.0, "relative weight of the expert"),
    _spec("density", Optional[float], ParameterScope.NON_BASE, None, "FFG: fraction of entries kept"),
    _spec("threshold", Optional[float], ParameterScope.NON_BASE, None, "FFG: absolute saliency threshold"),
    _spec("curvature", Any, ParameterScope.NON_BASE, None, "exp_avg_sq store path, or a tensor in memory"),
    _spec("optimizer_step", Optional[int], ParameterScope.NON_BASE, None, "Adam step count, for bias_correction"),
    _spec("beta2", Optional[float], ParameterScope.NON_BASE, None, "Adam beta2, for bias_correction"),
)
COMMON_SHARED_PARAMETERS: Tuple[ParameterSpec, ...] = (
    _spec("lambda", float, ParameterScope.SHARED, 1.0, "scale of the merged task vector"),
    _spec("density_scope", str, ParameterScope.SHARED, "tensor", "'tensor' or 'model': where density applies"),
    _spec("bias_correction", bool, ParameterScope.SHARED, False, "divide v by (1 - beta2**step)"),
)
OTA_PARAMETERS = EXPERT_PARAMETERS + COMMON_SHARED_PARAMETERS + (
    _spec("power", float, ParameterScope.SHARED, 0.5, "exponent p in w = weight * v**p + eps"),
    _spec("eps", float, ParameterScope.SHARED, 1e-12, "eps in w = weight * v**p + eps"),
)
FFG_PARAMETERS = EXPERT_PARAMETERS + COMMON_SHARED_PARAMETERS + (
    _spec("normalize", bool, ParameterScope.SHARED, False, "divide the sum by sum_i weight_i"),
)
