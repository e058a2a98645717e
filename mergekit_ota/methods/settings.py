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
(``tensor`` | ``model``; unset: ``tensor``, and ``model`` for an expert with ``density: auto``),
``bias_correction`` (``auto`` | true | false, see
:mod:`mergekit_ota.methods.bias`), ``sign_consensus`` (``none`` | ``sum`` | ``count``: TIES's sign
election over the FFG-masked task vectors, see :mod:`mergekit_ota.math.consensus`; YAML true / false mean
``sum`` / ``none``); ``ota`` adds ``power``
(0.5), ``eps`` (1e-12) and ``curvature_scale`` (``mean``, default | ``median`` | ``none``: ``v_i / m_i``
with ``m_i`` expert i's model-wide mean or median, see :mod:`mergekit_ota.methods.scale`);
``ffg`` adds ``normalize`` (false).

Every rule lives here once and both callers use it: the planner
(:class:`~mergekit_ota.graph.planner.CurvaturePlan`, which collects the problems of
all tensors; ``mergekit-ota check`` runs it) and the methods themselves
(:mod:`mergekit_ota.methods.base`, for the in-memory ``merge_tensors`` /
``merge_state_dicts``, which raise :class:`~mergekit_ota.errors.ConfigError`):

* values, each on its own (:func:`check_value`, with :class:`ExpertSettings` / :class:`SharedSettings`; what
  each must be is :data:`mergekit_ota.catalog.Parameter.expects`): types (a boolean is no number), every float
  finite, ranges of ``density``, ``threshold``, ``beta2``, ``optimizer_step``, ``power``, ``eps``,
  ``saliency_mass``. A bad value reads as its default and the rules involving it are skipped, so it changes
  nothing else; mergekit's resolver reads values through :func:`check_value` too (:func:`_as_read`), and the
  planner reports each bad value of a config once, where it is written (:func:`value_problems`);
* one expert in context (:func:`expert_check`): ``ota`` needs ``weight_i >= 0``; an
  FFG ``density``/``threshold`` needs a base; ``ffg`` needs one of them (not both); ``density: auto``
  refuses an explicit ``density_scope: tensor``;
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
from typing import (
    Annotated,
    Any,
    Dict,
    Hashable,
    Iterable,
    Iterator,
    List,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from mergekit.merge_methods.base import MergeMethodSpec, ParameterScope, ParameterSpec
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from mergekit_ota import catalog
from mergekit_ota.catalog import DEFAULT_CURVATURE_SCALE, DEFAULT_SALIENCY_MASS
from mergekit_ota.errors import ConfigError, Problem
from mergekit_ota.methods.bias import BiasDecision, BiasMode, decide
from mergekit_ota.methods.scale import ScaleMode

OTA = "ota"
FFG = "ffg"


def _no_boolean(value: Any) -> Any:
    """A YAML ``true``/``false`` is no number (pydantic would read it as 1 / 0)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def model_wide_density(density_scope: Optional[str], density: Any) -> bool:
    """Whether an expert's ``density`` is one keep fraction over its whole model: under ``density_scope: model``,
    and always for ``density: auto`` (the fewest entries holding ``saliency_mass`` of the expert's saliency over all
    its tensors: it has no per-tensor meaning, so it implies model scope; an explicit ``tensor`` is an error)."""
    return density is not None and (density_scope == "model" or density == "auto")


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
        _no_boolean(value)
        if value is not None and isinstance(value, (int, float)) and not 0.0 < value <= 1.0:
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

    @field_validator("weight", "threshold", "optimizer_step", "beta2", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        return _no_boolean(value)

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
    density_scope: Optional[Literal["tensor", "model"]] = None  # unset: tensor, and model for density: auto
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
        if info.field_name == "sign_consensus" and isinstance(value, bool):  # YAML true / false
            return "sum" if value else "none"
        return value

    @field_validator("lambda_", "power", "eps", "saliency_mass", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        return _no_boolean(value)

    def model_wide(self, expert: "ExpertSettings") -> bool:
        """Whether ``expert``'s ``density`` applies over its whole model (:func:`model_wide_density`)."""
        return model_wide_density(self.density_scope, expert.density)

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


def _shown(value: Any) -> str:
    """A value as the user wrote it in YAML: ``true``, ``'fast'``, ``1.5``, ``nan``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class BadValue:
    """One parameter value that is not what the parameter takes: its name, the value given, what it must be
    (:data:`mergekit_ota.catalog.Parameter.expects`) and a close word it may have meant."""

    name: str
    given: Any
    expects: str
    suggestion: Optional[str] = None

    def message(self) -> str:
        hint = f"; did you mean {self.suggestion}?" if self.suggestion else ""
        return f"{self.name} must be {self.expects}; got {_shown(self.given)}{hint}"


def _close_word(parameter: catalog.Parameter, value: Any) -> Optional[str]:
    if not isinstance(value, str) or not parameter.choices:
        return None
    close = difflib.get_close_matches(value.strip().lower(), parameter.choices, n=1, cutoff=0.6)
    if not close:
        return None
    return close[0] if close[0] in ("true", "false") else repr(close[0])


def check_value(name: str, value: Any) -> Tuple[Any, Optional[BadValue]]:
    """One value of parameter ``name`` on its own: ``(the value as the methods read it, None)``, or
    ``(value, BadValue)``. Names without a rule (``curvature``, unknown keys) pass unchanged.

    The one reading of a value: mergekit's resolver (through the specs below), the config walk
    (:func:`value_problems`) and :func:`expert_check` / :func:`shared_check` all use it, so no bad value can
    change how the others are read.
    """
    parameter = catalog.BY_NAME.get(name)
    if parameter is None or not parameter.expects:
        return value, None
    model = ExpertSettings if parameter.per_expert else SharedSettings
    if value is UNREADABLE or value == UNREADABLE:  # reported where it was written (unreadable_values)
        return value, BadValue(name, value, parameter.expects)
    try:
        validated = model.model_validate({name: value})
    except ValidationError:
        return value, BadValue(name, value, parameter.expects, _close_word(parameter, value))
    return getattr(validated, "lambda_" if name == "lambda" else name), None


def _read(values: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[BadValue]]:
    """``values`` with each one read by :func:`check_value` on its own, the bad ones left out (so they read as
    their defaults and nothing else changes), and the bad ones."""
    good: Dict[str, Any] = {}
    bad: List[BadValue] = []
    for name, value in values.items():
        read, problem = check_value(name, value)
        if problem is None:
            good[name] = read
        else:
            bad.append(problem)
    return good, bad


# ----------------------------------------------------------------------------- one expert


class ExpertCheck(NamedTuple):
    """One expert's settings and the rules it breaks.

    ``bad_values``: values that are not what their parameter takes, each judged on its own (:func:`check_value`);
    ``settings`` reads them as their defaults and the rules that involve them are not applied (one bad value adds
    no second problem). ``problems``: the rules broken, each a :class:`~mergekit_ota.errors.Problem` naming the
    expert, parameter and tensor; those of ``level`` ``config`` do not depend on the tensor (an FFG rule without a
    base), the others may (filters can set values per tensor).
    """

    settings: ExpertSettings
    problems: List[Problem]
    bad_values: List[BadValue] = []

    @property
    def ok(self) -> bool:
        return not (self.problems or self.bad_values)


def expert_check(
    values: Mapping[str, Any],
    *,
    expert: Any,
    tensor: Optional[str],
    method: Optional[str] = None,
    has_base: Optional[bool] = None,
    bias_correction: BiasMode = False,
    density_scope: Optional[str] = None,
) -> ExpertCheck:
    """Every per-expert rule for one tensor; ``method``/``has_base`` ``None`` skip the rules needing them.

    * values, each on its own (:func:`check_value`: finite floats and ranges);
    * ``density`` or ``threshold``, not both;
    * ``ota``: ``weight_i >= 0`` (``theta`` is a weighted average of the experts; a
      negative ``w_i = weight_i * v_i**p + eps`` extrapolates, and can zero ``sum_i w_i``);
    * an FFG mask (``density``/``threshold``) needs ``tau_i = t_i - b``, so a base;
    * ``ffg`` needs a ``density`` or a ``threshold`` for every expert;
    * ``density: auto`` is model-wide: an explicit ``density_scope: tensor`` is an error (unset, it means model);
    * ``bias_correction: true`` needs ``optimizer_step`` and ``beta2`` (for ``1 - beta2**step``)
      unless the expert's curvature is ``bias_corrected`` already.
    """
    good, bad = _read(values)
    settings = ExpertSettings.model_validate(good)
    unread = {b.name for b in bad}
    problems: List[Problem] = []

    def broken(before: str, after: str = "", parameter: Optional[str] = None) -> None:
        problems.append(Problem.on_tensor(before, tensor, after, expert=expert, parameter=parameter))

    def broken_in_config(message: str, parameter: str) -> None:
        problems.append(Problem(message, expert=expert, parameter=parameter, level="config"))

    if settings.density is not None and settings.threshold is not None:
        broken(f"Invalid parameters for expert {expert}", ": give density or threshold, not both", "density")
    if method == OTA and settings.weight < 0:
        broken(
            f"Invalid parameters for expert {expert}",
            f": weight: ota needs weight >= 0 (OTA is a weighted average, a negative weight extrapolates; ffg takes "
            f"negative weights, for task negation); got {settings.weight}",
            "weight",
        )
    if has_base is False and settings.masked:
        broken_in_config(
            f"expert {expert} sets density/threshold (FFG), which needs a base_model: FFG keeps entries of the "
            f"task vector tau = expert - base",
            "density",
        )
    if method == FFG and not settings.masked and not unread & {"density", "threshold"}:
        broken(f"ffg needs a density or a threshold for every expert; missing for expert {expert}", "", "density")
    if settings.auto_density and density_scope == "tensor":
        broken_in_config(
            f"expert {expert}: density: auto picks one keep fraction over the expert's whole model (the fewest entries "
            "holding saliency_mass of its saliency), so it cannot apply per tensor; got density_scope: tensor "
            "(leave density_scope out, or set it to model)",
            "density_scope",
        )
    if not unread & {"optimizer_step", "beta2", "bias_corrected"}:
        try:
            settings.bias(bias_correction, expert)
        except ValueError as error:
            broken(f"expert {expert}", f": {error}", "bias_correction")
    return ExpertCheck(settings, problems, bad)


def expert_settings(
    values: Mapping[str, Any],
    *,
    expert: Any,
    tensor: Optional[str],
    method: Optional[str] = None,
    has_base: Optional[bool] = None,
    bias_correction: BiasMode = False,
    density_scope: Optional[str] = None,
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
    problems = [
        Problem.on_tensor(
            f"Invalid parameters for expert {expert}", tensor, f": {bad.message()}", expert=expert, parameter=bad.name
        )
        for bad in check.bad_values
    ]
    problems += sorted(check.problems, key=lambda problem: problem.level != "config")  # config-level first
    if problems:
        raise ConfigError("; ".join(problems))
    return check.settings


# ----------------------------------------------------------------------------- all experts of one tensor


def tensor_problems(
    experts: Sequence[Tuple[Hashable, ExpertSettings]], *, method: str, shared: SharedSettings, tensor: Optional[str]
) -> List[Problem]:
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
    weighted = f"; weights {listed}"
    if method == OTA and not any(weight > 0 for weight in weights):
        return [
            Problem.on_tensor("ota needs at least one expert with weight > 0", tensor, weighted, parameter="weight")
        ]
    if method == FFG and shared.normalize and sum(weights) == 0:
        before = "ffg: normalize: true divides by sum_i weight_i, which is 0"
        return [Problem.on_tensor(before, tensor, weighted, parameter="normalize")]
    if method == FFG and shared.normalize and shared.consensus and not all(weight > 0 for weight in weights):
        before = (
            "ffg: normalize: true with sign_consensus divides each coordinate by the summed weights of the experts "
            "that agree there, so every weight must be > 0"
        )
        return [Problem.on_tensor(before, tensor, weighted, parameter="sign_consensus")]
    return []


def require_tensor_rules(
    experts: Sequence[Tuple[Hashable, ExpertSettings]], *, method: str, shared: SharedSettings, tensor: Optional[str]
) -> None:
    """:func:`tensor_problems`, raising :class:`ConfigError` (for in-memory calls)."""
    problems = tensor_problems(experts, method=method, shared=shared, tensor=tensor)
    if problems:
        raise ConfigError("; ".join(problems))


# ----------------------------------------------------------------------------- shared


class SharedCheck(NamedTuple):
    """The shared settings (a bad value read as its default), the rules they break, and the bad values."""

    settings: SharedSettings
    problems: List[str]
    bad_values: List[BadValue]


def shared_check(values: Mapping[str, Any], *, method: str, has_base: Optional[bool] = None) -> SharedCheck:
    """Shared parameters, each value on its own (:func:`check_value`), and the rules they break: for ``ota``
    without a base ``lambda == 1`` (``lambda`` scales the task vector ``theta - b``, which needs ``b``), and
    ``sign_consensus`` needs a base."""
    values = dict(values)
    if method != OTA:  # curvature_scale is ota's (ffg has no such parameter): none, whatever ota's default is
        values["curvature_scale"] = "none"
    values.setdefault("saliency_mass", catalog.saliency_mass_default(method))  # in memory; mergekit passes it
    good, bad = _read(values)
    shared = SharedSettings.model_validate(good)
    problems = []
    if method == OTA and has_base is False and shared.lambda_ != 1.0:
        problems.append(
            f"ota: lambda scales the merged task vector and needs a base_model; got lambda {shared.lambda_}"
        )
    if has_base is False and shared.consensus:
        problems.append(
            f"{method}: sign_consensus elects a sign per coordinate of the task vectors tau_i = t_i - b and needs a "
            f"base_model; got sign_consensus {shared.sign_consensus}"
        )
    return SharedCheck(shared, problems, bad)


def shared_settings(values: Mapping[str, Any], *, method: str, has_base: Optional[bool] = None) -> SharedSettings:
    """:func:`shared_check`, raising :class:`ConfigError` naming the method."""
    check = shared_check(values, method=method, has_base=has_base)
    problems = [f"Invalid parameters for merge method {method}: {bad.message()}" for bad in check.bad_values]
    if problems or check.problems:
        raise ConfigError("; ".join(problems + check.problems))
    return check.settings


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


def parameter_levels(config: Any) -> Iterator[Tuple[str, bool, Mapping[str, Any]]]:
    """Every parameter mapping of a ``MergeConfiguration``: ``(where, per_input, parameters)``.

    ``parameters``, ``models[i].parameters``, ``slices[j].parameters``, ``slices[j].sources[k].parameters`` and
    the same under ``modules:`` (also after mergekit's planner has normalised ``models:`` into
    ``modules: ... slices:``); ``where`` names the place (``parameters``, ``model X``, ``slices[j]``, ...),
    ``per_input`` is true for a model's or a slice source's own parameters.

    The same walk reads the raw YAML (plain dicts and lists, :func:`unreadable_values`).
    """

    def get(item: Any, name: str) -> Any:
        return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)

    def listed(item: Any, name: str) -> List[Any]:
        value = get(item, name)
        return list(value) if isinstance(value, (list, tuple)) else []

    def parameters(item: Any) -> Mapping[str, Any]:
        value = get(item, "parameters")
        return value if isinstance(value, Mapping) else {}

    def inputs(prefix: str, item: Any) -> Iterator[Tuple[str, bool, Mapping[str, Any]]]:
        for model in listed(item, "models"):
            yield f"{prefix}model {get(model, 'model')}", True, parameters(model)
        slices = listed(item, "slices")
        for j, output_slice in enumerate(slices):
            yield f"{prefix}slices[{j}]", False, parameters(output_slice)
            at = f"{prefix}slices[{j}] " if len(slices) > 1 else prefix  # one slice: the model names the place
            for source in listed(output_slice, "sources"):
                yield f"{at}model {get(source, 'model')}", True, parameters(source)

    yield "parameters", False, parameters(config)
    yield from inputs("", config)
    modules = get(config, "modules")
    modules = modules if isinstance(modules, Mapping) else {}
    for name, module in modules.items():
        yield f"modules.{name}", False, parameters(module)
        yield from inputs(f"modules.{name} " if len(modules) > 1 else "", module)


def unknown_parameters(config: Any, spec: MergeMethodSpec) -> List[UnknownParameter]:
    """Every parameter key of a ``MergeConfiguration`` that ``spec`` does not take where it is given
    (:func:`parameter_levels`). Only keys matter (values may be scalars, gradients or ``{filter, value}`` lists).
    mergekit itself reads no other key at these levels: its resolver asks only for the method's names."""
    found: List[UnknownParameter] = []
    for where, per_input, parameters in parameter_levels(config):
        found.extend(unknown_names(list(parameters), spec, where, per_input=per_input))
    return found


def _leaves(setting: Any) -> Iterator[Any]:
    """The values of one setting: a scalar, each point of a gradient, each ``{filter, value}``'s value."""
    if isinstance(setting, Mapping):  # a {filter, value} not parsed by mergekit
        yield from _leaves(setting.get("value"))
    elif hasattr(setting, "filter") and hasattr(setting, "value"):  # mergekit's ConditionalParameter
        yield from _leaves(setting.value)
    elif isinstance(setting, (list, tuple)):
        for item in setting:
            yield from _leaves(item)
    else:
        yield setting


UNREADABLE = "<mergekit-ota: unreadable value, reported>"
"""What :func:`unreadable_values` puts in place of a value mergekit's config parser refuses: a string it takes, which
every reader here treats as a bad value already reported."""


def unreadable_values(data: Any) -> List[Problem]:
    """In a raw YAML config of ``ota``/``ffg`` (plain data, before mergekit's parser sees it): one line per parameter
    value mergekit's parser refuses (``null``, a mapping that is no ``{filter, value}``, a list of lists), in the form
    of :func:`value_problems`; each such value is replaced by :data:`UNREADABLE` in place (a ``curvature`` removed,
    so its default is looked up), so the config parses and every other problem is still found.

    mergekit's parser would otherwise refuse the whole config with a pydantic error per branch of its union type.
    """
    from mergekit.config import ParameterSetting
    from pydantic import TypeAdapter

    if not isinstance(data, dict) or data.get("merge_method") not in (OTA, FFG):
        return []
    readable = TypeAdapter(ParameterSetting)
    found: Dict[Problem, None] = {}
    for where, _, parameters in list(parameter_levels(data)):
        for key, value in list(parameters.items()):
            try:
                readable.validate_python(value)
                continue
            except ValidationError:
                pass
            parameter = catalog.BY_NAME.get(key)
            if parameter is not None:
                expects = parameter.expects or "a store path"
                message = f"{where}: {BadValue(key, value, expects).message()}"
                found.setdefault(Problem(message, parameter=key, level="config"), None)
            if isinstance(parameters, dict):
                if key == "curvature":
                    del parameters[key]
                else:
                    parameters[key] = UNREADABLE
    return list(found)


def value_problems(config: Any, spec: MergeMethodSpec) -> List[Problem]:
    """One line per value of the config that its parameter does not take, judged on its own
    (:func:`check_value`), where it is written: ``model X: weight must be a finite number; got 'abc'``.

    Every value the merge can read (each point of a gradient, each filter's value) at every level
    (:func:`parameter_levels`); keys the method does not take there are :func:`unknown_parameters`' to report.
    """
    names = {p.name: p for p in spec.parameters}
    found: Dict[Problem, None] = {}
    for where, per_input, parameters in parameter_levels(config):
        for key, setting in parameters.items():
            parameter = names.get(key)
            if parameter is None or (per_input and parameter.scope == ParameterScope.SHARED):
                continue
            for value in _leaves(setting):
                _, bad = check_value(key, value)
                if bad is not None and value != UNREADABLE:
                    found.setdefault(Problem(f"{where}: {bad.message()}", parameter=key, level="config"), None)
    return list(found)


def require_known(keys: Iterable[str], spec: MergeMethodSpec) -> None:
    """Raise :class:`ConfigError` for keys ``spec`` does not take (in-memory calls: one flat mapping)."""
    unknown = unknown_names(keys, spec, "parameters")
    if unknown:
        raise ConfigError("; ".join(u.message(spec.name) for u in unknown))


# ----------------------------------------------------------------------------- mergekit specs


def _as_read(parameter: catalog.Parameter) -> Any:
    """The type mergekit validates a value of ``parameter`` with: :func:`check_value`'s reading of a good value
    (``eps: 1e-12``, a string in YAML, becomes a number, so gradients interpolate; ``sign_consensus: true`` becomes
    ``sum``), a bad one passed on unchanged. pydantic's own error would name neither the parameter nor the expert
    and stop planning at the first tensor; :func:`value_problems` and :func:`expert_check` report it instead."""
    if not parameter.expects:
        return parameter.value_type

    def read(value: Any) -> Any:
        good, bad = check_value(parameter.name, value)
        return value if bad is not None else good

    return Annotated[Any, BeforeValidator(read)]


def _specs(parameters: Tuple[catalog.Parameter, ...]) -> Tuple[ParameterSpec, ...]:
    """mergekit's ``ParameterSpec`` of each :mod:`~mergekit_ota.catalog` entry (values read by :func:`_as_read`)."""
    return tuple(
        ParameterSpec(
            p.name,
            _as_read(p),
            ParameterScope.NON_BASE if p.per_expert else ParameterScope.SHARED,
            default=p.default,
            description=p.description,
        )
        for p in parameters
    )


OTA_PARAMETERS = _specs(catalog.OTA.parameters)
FFG_PARAMETERS = _specs(catalog.FFG.parameters)
