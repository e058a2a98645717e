"""Parameters of ``ota`` and ``ffg``: their mergekit specs and the one home of every parameter rule.

Per expert (``parameters:`` of a model in the YAML):

=================  =========  ====================================================
``weight``         1.0        ``weight_i``: scales expert i's curvature (ota, >= 0) or task vector (ffg, any sign)
``density``        none       FFG: fraction of expert i's entries kept, in (0, 1], or ``auto``
                              (model-wide: the fewest entries holding ``saliency_mass`` of its saliency)
``threshold``      none       FFG: keep entries with saliency ``v*tau**2 >= threshold``
``curvature``      default    store path (file, index or directory); default:
                              ``<model dir>/exp_avg_sq.safetensors``. In memory: a tensor
``optimizer_step`` from store Adam step count, for ``bias_correction``
``beta2``          from store Adam beta2, for ``bias_correction``
``bias_corrected`` from store the curvature is already bias-corrected (never corrected twice)
=================  =========  ====================================================

Shared (top-level ``parameters:``): ``lambda`` (1.0), ``density_scope``
(``tensor`` | ``model``), ``bias_correction`` (``auto`` | true | false, see
:mod:`mergekit_ota.methods.bias`), ``sign_consensus`` (``none`` | ``sum`` | ``count``: TIES's sign
election over the FFG-masked task vectors, see :mod:`mergekit_ota.math.consensus`); ``ota`` adds ``power``
(0.5), ``eps`` (1e-12) and ``curvature_scale`` (``mean``, default | ``median`` | ``none``: ``v_i / m_i``
with ``m_i`` expert i's model-wide mean or median, see :mod:`mergekit_ota.methods.scale`);
``ffg`` adds ``normalize`` (false).

Every rule lives here once and both callers use it: the planner
(:class:`~mergekit_ota.graph.planner.CurvaturePlan`, which collects the problems of
all tensors; ``mergekit-ota check`` runs it) and the methods themselves
(:mod:`mergekit_ota.methods.base`, for the in-memory ``merge_tensors`` /
``merge_state_dicts``, which raise :class:`~mergekit_ota.errors.ConfigError`):

* values (:class:`ExpertSettings`, :class:`SharedSettings`): every float finite,
  ranges of ``density``, ``threshold``, ``beta2``, ``optimizer_step``, ``power``, ``eps``;
* one expert in context (:func:`expert_check`): ``ota`` needs ``weight_i >= 0``; an
  FFG ``density``/``threshold`` needs a base; ``ffg`` needs one of them;
  ``bias_correction`` needs ``optimizer_step`` and ``beta2``;
* all experts of one tensor (:func:`tensor_problems`): ``ota`` needs some
  ``weight_i > 0``; ``ffg`` with ``normalize`` needs ``sum_i weight_i != 0``, and with
  ``sign_consensus`` too every ``weight_i > 0``;
* shared values in context (:func:`shared_check`): ``ota``'s ``lambda`` and ``sign_consensus``
  need a base;
* names (:func:`unknown_parameters`, :func:`unknown_names`): keys a method does not
  take, with a did-you-mean; a shared parameter given per model (mergekit ignores it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, List, Literal, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from mergekit.merge_methods.base import MergeMethodSpec, ParameterScope, ParameterSpec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from mergekit_ota import catalog
from mergekit_ota.catalog import DEFAULT_CURVATURE_SCALE, DEFAULT_SALIENCY_MASS
from mergekit_ota.errors import ConfigError
from mergekit_ota.methods.bias import BiasDecision, BiasMode, decide
from mergekit_ota.methods.scale import ScaleMode

OTA = "ota"
FFG = "ffg"


class ExpertSettings(BaseModel):
    """Validated per-expert parameters for one tensor (every float finite)."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, allow_inf_nan=False)

    weight: float = 1.0
    density: Union[Literal["auto"], float, None] = None
    threshold: Optional[float] = None
    optimizer_step: Optional[int] = None
    beta2: Optional[float] = None
    bias_corrected: Optional[bool] = None

    @field_validator("density", mode="before")
    @classmethod
    def _density_range(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() != "auto":
                raise ValueError(f"density must be a number in (0, 1] or 'auto'; got {value!r}")
            return "auto"
        if (
            value is not None
            and not isinstance(value, bool)
            and isinstance(value, (int, float))
            and not 0.0 < value <= 1.0
        ):
            raise ValueError(f"density must be in (0, 1] or 'auto'; got {value}")
        return value

    @property
    def auto_density(self) -> bool:
        """``density: auto``: chosen model-wide from this expert's saliency mass."""
        return self.density == "auto"

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

    @property
    def masked(self) -> bool:
        """True when the expert sets an FFG rule (``density`` or ``threshold``)."""
        return self.density is not None or self.threshold is not None

    def bias(self, mode: BiasMode, expert: Any, source: str = "") -> BiasDecision:
        """What ``bias_correction: mode`` does to this expert (:func:`mergekit_ota.methods.bias.decide`)."""
        return decide(
            mode,
            expert=str(expert),
            step=self.optimizer_step,
            beta2=self.beta2,
            already_corrected=bool(self.bias_corrected),
            source=source,
        )


class SharedSettings(BaseModel):
    """Validated shared parameters (every float finite; ``lambda`` is read as ``lambda_``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)

    lambda_: float = Field(1.0, alias="lambda")
    density_scope: Literal["tensor", "model"] = "tensor"
    bias_correction: BiasMode = "auto"
    power: float = 0.5
    eps: float = 1e-12
    normalize: bool = False
    curvature_scale: ScaleMode = DEFAULT_CURVATURE_SCALE
    sign_consensus: Literal["none", "sum", "count"] = "none"
    saliency_mass: float = DEFAULT_SALIENCY_MASS

    @field_validator("saliency_mass")
    @classmethod
    def _mass_range(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"saliency_mass must be in (0, 1]; got {value}")
        return value

    @field_validator("curvature_scale", "sign_consensus", mode="before")
    @classmethod
    def _none_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:  # in memory, None reads as the default
            return cls.model_fields[info.field_name].default
        return value

    @property
    def consensus(self) -> Optional[str]:
        """The sign-election rule, or ``None`` when ``sign_consensus`` is ``none``."""
        return None if self.sign_consensus == "none" else self.sign_consensus

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
    for item in error.errors(include_url=False):
        where = ".".join(str(x) for x in item.get("loc", ()) if x != "__root__")
        if item.get("type") == "finite_number":
            message = f"must be a finite number; got {item.get('input')}"
            parts.append(f"{where} {message}" if where else message)
            continue
        message = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _at(tensor: Optional[str]) -> str:
    return f" (tensor {tensor})" if tensor else ""


# ----------------------------------------------------------------------------- one expert


class ExpertCheck(NamedTuple):
    """One expert's settings (``None`` if its values are invalid) and the rules it breaks.

    ``config_problems`` do not depend on the tensor (an FFG rule without a base);
    ``problems`` may (values, which filters can set per tensor).
    """

    settings: Optional[ExpertSettings]
    problems: List[str]
    config_problems: List[str]


def expert_check(
    values: Mapping[str, Any],
    *,
    expert: Any,
    tensor: Optional[str],
    method: Optional[str] = None,
    has_base: Optional[bool] = None,
    bias_correction: BiasMode = False,
    density_scope: Optional[str] = "model",
) -> ExpertCheck:
    """Every per-expert rule for one tensor; ``method``/``has_base`` ``None`` skip the rules needing them.

    * values: :class:`ExpertSettings` (finite floats and ranges);
    * ``ota``: ``weight_i >= 0`` (``theta`` is a weighted average of the experts; a
      negative ``w_i = weight_i * v_i**p + eps`` extrapolates, and can zero ``sum_i w_i``);
    * an FFG mask (``density``/``threshold``) needs ``tau_i = t_i - b``, so a base;
    * ``ffg`` needs a ``density`` or a ``threshold`` for every expert;
    * ``bias_correction: true`` needs ``optimizer_step`` and ``beta2`` (for ``1 - beta2**step``)
      unless the expert's curvature is ``bias_corrected`` already.
    """
    where = _at(tensor)
    try:
        settings = ExpertSettings.model_validate(dict(values))
    except ValidationError as error:
        return ExpertCheck(None, [f"Invalid parameters for expert {expert}{where}: {_describe(error)}"], [])
    problems: List[str] = []
    config_problems: List[str] = []
    if method == OTA and settings.weight < 0:
        problems.append(
            f"Invalid parameters for expert {expert}{where}: weight: ota needs weight >= 0 (OTA is a weighted "
            f"average, a negative weight extrapolates; ffg takes negative weights, for task negation); "
            f"got {settings.weight}"
        )
    if has_base is False and settings.masked:
        config_problems.append(
            f"expert {expert} sets density/threshold (FFG), which needs a base_model: FFG keeps entries of the "
            f"task vector tau = expert - base"
        )
    if method == FFG and not settings.masked:
        problems.append(f"ffg needs a density or a threshold for every expert; missing for expert {expert}{where}")
    if settings.auto_density and density_scope != "model":
        config_problems.append(
            f"expert {expert}: density: auto picks one keep fraction over the expert's whole model (the fewest entries "
            "holding saliency_mass of its saliency), so it needs density_scope: model; got density_scope: "
            f"{density_scope}"
        )
    try:
        settings.bias(bias_correction, expert)
    except ValueError as error:
        problems.append(f"expert {expert}{where}: {error}")
    return ExpertCheck(settings, problems, config_problems)


def expert_settings(
    values: Mapping[str, Any],
    *,
    expert: Any,
    tensor: Optional[str],
    method: Optional[str] = None,
    has_base: Optional[bool] = None,
    bias_correction: BiasMode = False,
    density_scope: Optional[str] = "model",
) -> ExpertSettings:
    """:func:`expert_check`, raising :class:`ConfigError` with every problem (for in-memory calls)."""
    check = expert_check(
        values,
        expert=expert,
        tensor=tensor,
        method=method,
        has_base=has_base,
        bias_correction=bias_correction,
        density_scope=density_scope,
    )
    problems = check.config_problems + check.problems
    if problems:
        raise ConfigError("; ".join(problems))
    assert check.settings is not None
    return check.settings


# ----------------------------------------------------------------------------- all experts of one tensor


def tensor_problems(
    experts: Sequence[Tuple[Hashable, ExpertSettings]], *, method: str, shared: SharedSettings, tensor: Optional[str]
) -> List[str]:
    """Rules over all experts of one tensor.

    * ``ota``: some ``weight_i > 0`` (with every ``weight_i = 0``, ``w_i = eps`` and theta
      silently becomes the plain mean);
    * ``ffg`` with ``normalize``: ``sum_i weight_i != 0`` (theta divides by it); with
      ``sign_consensus`` too, every ``weight_i > 0`` (each coordinate divides by the summed weights of
      the experts that agree there, which a negative weight could cancel).
    """
    if not experts:
        return []
    weights = [settings.weight for _, settings in experts]
    listed = ", ".join(f"{expert}: {weight}" for (expert, _), weight in zip(experts, weights))
    if method == OTA and not any(weight > 0 for weight in weights):
        return [f"ota needs at least one expert with weight > 0{_at(tensor)}; weights {listed}"]
    if method == FFG and shared.normalize and sum(weights) == 0:
        return [f"ffg: normalize: true divides by sum_i weight_i, which is 0{_at(tensor)}; weights {listed}"]
    if method == FFG and shared.normalize and shared.consensus and not all(weight > 0 for weight in weights):
        return [
            f"ffg: normalize: true with sign_consensus divides each coordinate by the summed weights of the experts "
            f"that agree there, so every weight must be > 0{_at(tensor)}; weights {listed}"
        ]
    return []


def require_tensor_rules(
    experts: Sequence[Tuple[Hashable, ExpertSettings]], *, method: str, shared: SharedSettings, tensor: Optional[str]
) -> None:
    """:func:`tensor_problems`, raising :class:`ConfigError` (for in-memory calls)."""
    problems = tensor_problems(experts, method=method, shared=shared, tensor=tensor)
    if problems:
        raise ConfigError("; ".join(problems))


# ----------------------------------------------------------------------------- shared


def shared_check(
    values: Mapping[str, Any], *, method: str, has_base: Optional[bool] = None
) -> Tuple[Optional[SharedSettings], List[str]]:
    """Shared parameters and the rules they break: values (:class:`SharedSettings`), and for ``ota``
    without a base ``lambda == 1`` (``lambda`` scales the task vector ``theta - b``, which needs ``b``)."""
    values = dict(values)
    if method != OTA:  # curvature_scale is ota's (ffg has no such parameter): none, whatever ota's default is
        values["curvature_scale"] = "none"
    try:
        shared = SharedSettings.model_validate(values)
    except ValidationError as error:
        return None, [f"Invalid parameters for merge method {method}: {_describe(error)}"]
    if method == OTA and has_base is False and shared.lambda_ != 1.0:
        return shared, [
            f"ota: lambda scales the merged task vector and needs a base_model; got lambda {shared.lambda_}"
        ]
    if has_base is False and shared.consensus:
        return shared, [
            f"{method}: sign_consensus elects a sign per coordinate of the task vectors tau_i = t_i - b and needs a "
            f"base_model; got sign_consensus {shared.sign_consensus}"
        ]
    return shared, []


def shared_settings(values: Mapping[str, Any], *, method: str, has_base: Optional[bool] = None) -> SharedSettings:
    """:func:`shared_check`, raising :class:`ConfigError` naming the method."""
    shared, problems = shared_check(values, method=method, has_base=has_base)
    if problems:
        raise ConfigError("; ".join(problems))
    assert shared is not None
    return shared


# ----------------------------------------------------------------------------- names


@dataclass(frozen=True)
class UnknownParameter:
    """A parameter key that a merge method does not take where it was given.

    ``where`` names the place (``parameters``, ``model X``, ``slices[j]``, ...);
    ``shared_only`` marks a shared parameter given per model, which mergekit never reads.
    """

    where: str
    key: str
    suggestion: Optional[str] = None
    shared_only: bool = False

    def message(self, method: str) -> str:
        if self.shared_only:
            return (
                f"{self.where}: '{self.key}' is a shared parameter of {method}; set it under the top-level "
                f"parameters: (mergekit ignores it here)"
            )
        hint = f"; did you mean '{self.suggestion}'?" if self.suggestion else ""
        return f"{self.where}: unknown parameter '{self.key}' for {method}{hint}"


def _suggest(key: str, names: Iterable[str]) -> Optional[str]:
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_names(
    keys: Iterable[str], spec: MergeMethodSpec, where: str, *, per_input: bool = False
) -> List[UnknownParameter]:
    """The keys of one parameter mapping that ``spec`` does not take there.

    Shared levels (top-level, module, slice ``parameters:``) take every parameter: mergekit
    falls back to them for per-input ones too. A per-input level (a model or a slice
    source) takes only per-input parameters.
    """
    every = [p.name for p in spec.parameters]
    per_model = [p.name for p in spec.parameters if p.scope != ParameterScope.SHARED]
    found = []
    for key in keys:
        if key in (per_model if per_input else every):
            continue
        if per_input and key in every:
            found.append(UnknownParameter(where, key, shared_only=True))
        else:
            found.append(UnknownParameter(where, key, _suggest(key, per_model if per_input else every)))
    return found


def unknown_parameters(config: Any, spec: MergeMethodSpec) -> List[UnknownParameter]:
    """Every parameter key of a ``MergeConfiguration`` that ``spec`` does not take where it is given.

    Walks ``parameters``, ``models[i].parameters``, ``slices[j].parameters``,
    ``slices[j].sources[k].parameters`` and the same under ``modules:`` (also after
    mergekit's planner has normalised ``models:`` into ``modules: ... slices:``). Only keys
    matter (values may be scalars, gradients or ``{filter, value}`` lists). mergekit itself
    reads no other key at these levels: its resolver asks only for the method's names.
    """
    found: List[UnknownParameter] = []

    def scan(parameters: Optional[Mapping[str, Any]], where: str, per_input: bool = False) -> None:
        found.extend(unknown_names(list(parameters or {}), spec, where, per_input=per_input))

    def scan_inputs(prefix: str, models: Optional[Sequence[Any]], slices: Optional[Sequence[Any]]) -> None:
        for model in models or ():
            scan(model.parameters, f"{prefix}model {model.model}", per_input=True)
        for j, output_slice in enumerate(slices or ()):
            scan(output_slice.parameters, f"{prefix}slices[{j}]")
            at = f"{prefix}slices[{j}] " if len(slices) > 1 else prefix  # one slice: the model names the place
            for source in output_slice.sources:
                scan(source.parameters, f"{at}model {source.model}", per_input=True)

    scan(config.parameters, "parameters")
    scan_inputs("", config.models, config.slices)
    modules = config.modules or {}
    for name, module in modules.items():
        scan(module.parameters, f"modules.{name}")
        scan_inputs(f"modules.{name} " if len(modules) > 1 else "", module.models, module.slices)
    return found


def require_known(keys: Iterable[str], spec: MergeMethodSpec) -> None:
    """Raise :class:`ConfigError` for keys ``spec`` does not take (in-memory calls: one flat mapping)."""
    unknown = unknown_names(keys, spec, "parameters")
    if unknown:
        raise ConfigError("; ".join(u.message(spec.name) for u in unknown))


# ----------------------------------------------------------------------------- mergekit specs


def _specs(parameters: Tuple[catalog.Parameter, ...]) -> Tuple[ParameterSpec, ...]:
    """mergekit's ``ParameterSpec`` of each :mod:`~mergekit_ota.catalog` entry."""
    return tuple(
        ParameterSpec(
            p.name,
            p.value_type,
            ParameterScope.NON_BASE if p.per_expert else ParameterScope.SHARED,
            default=p.default,
            description=p.description,
        )
        for p in parameters
    )


OTA_PARAMETERS = _specs(catalog.OTA.parameters)
FFG_PARAMETERS = _specs(catalog.FFG.parameters)
