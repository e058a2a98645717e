"""What ``analyze`` reads: validated user inputs and the models' safetensors files.

Inputs come from the command line (``--base BASE EXPERT[:STORE] ...``) or from a
mergekit YAML merge config (``base_model``, the experts, and their ``curvature`` /
``density`` / ``threshold`` parameters, ``density: auto`` with its ``saliency_mass`` included, read as
``mergekit-yaml`` reads them).
:func:`open_inputs` then checks every header (missing tensors, shapes, dtypes) for all
tensors at once, before anything is computed or written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergekit_ota.catalog import DEFAULT_SALIENCY_MASS, saliency_mass_default
from mergekit_ota.curvature.locate import locate_store
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import ConfigError, CurvatureError, OTAError, PreflightError
from mergekit_ota.export.detect import export_hint
from mergekit_ota.io.handles import read_tensor
from mergekit_ota.io.safetensors import FLOAT_DTYPES, INDEX_SUFFIX, HeaderEntry, read_sharded

DEFAULT_DENSITY = 0.05
_MODEL_FILE = "model.safetensors"
_MAX_LISTED_PROBLEMS = 25


class ExpertSource(BaseModel):
    """One expert: its model directory, curvature store and FFG keep rule (exactly one of
    ``density``, ``threshold``; build it with :func:`expert_source`, which validates them)."""

    model_config = ConfigDict(frozen=True)

    label: str
    model: str
    store: str
    density: Union[float, Literal["auto"], None] = None  # auto: from the saliency mass (model-wide)
    threshold: Optional[float] = None

    @model_validator(mode="after")
    def _one_rule(self) -> "ExpertSource":
        if (self.density is None) == (self.threshold is None):
            raise ValueError(f"expert {self.label} needs exactly one of density or threshold")
        return self


def expert_source(
    label: str,
    model: str,
    store: str,
    density: Any,
    threshold: Any,
    where: str,
    density_scope: Optional[str] = None,
) -> ExpertSource:
    """An :class:`ExpertSource` whose ``density`` / ``threshold`` passed the merge's own checks
    (:func:`mergekit_ota.methods.settings.expert_settings`: range, not both, ``auto`` only model-wide)."""
    from mergekit_ota.methods.settings import expert_settings

    settings = expert_settings(
        {"density": density, "threshold": threshold}, expert=where, tensor=None, density_scope=density_scope
    )
    return ExpertSource(label=label, model=model, store=store, density=settings.density, threshold=settings.threshold)


class AnalysisRequest(BaseModel):
    """Everything one analysis needs, validated.

    ``top_density`` is the fraction ``d`` of largest-curvature entries whose overlap
    between experts is measured (per tensor); ``spearman_sample`` the most entries per
    tensor used for Spearman's correlation; ``rank_top`` how many of the largest
    matrices get an SVD of their masks.
    """

    model_config = ConfigDict(frozen=True)

    base: str
    experts: Tuple[ExpertSource, ...] = Field(min_length=1)
    density_scope: Literal["tensor", "model"] = "tensor"
    saliency_mass: float = Field(default=DEFAULT_SALIENCY_MASS, gt=0.0, le=1.0)  # density: auto's target
    top_density: float = Field(default=DEFAULT_DENSITY, gt=0.0, le=1.0)
    rank_top: int = Field(default=6, ge=0)
    spearman_sample: int = Field(default=1_000_000, ge=100)
    source: str = "command line"
    notes: Tuple[str, ...] = ()


def _request(data: Dict[str, Any], where: str) -> AnalysisRequest:
    try:
        return AnalysisRequest.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{where}: {problems}") from error


def _directory(path: str, role: str) -> str:
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(absolute):
        raise ConfigError(
            f"{role} {path!r} is not a local directory (analyze reads local safetensors "
            f"checkpoints; download hub models first)"
        )
    return absolute


def unique_labels(paths: Sequence[str]) -> List[str]:
    """Short names of the experts: directory names (the run's for a Trainer ``checkpoint-N``),
    made unique with ``#i`` where they clash."""
    names = []
    for path in paths:
        path = os.path.normpath(path)
        name = os.path.basename(path) or path
        if re.fullmatch(r"checkpoint-\d+", name) and os.path.basename(os.path.dirname(path)):
            name = os.path.basename(os.path.dirname(path))
        names.append(name)
    return [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]


def split_expert_argument(argument: str) -> Tuple[str, Optional[str]]:
    """``EXPERT`` or ``EXPERT:STORE`` -> ``(expert dir, store or None)``.

    An argument that is itself an existing path is an expert alone; otherwise it is
    split at the first ``:`` whose left part is an existing directory.
    """
    if os.path.exists(os.path.expanduser(argument)):
        return argument, None
    for i, char in enumerate(argument):
        if char == ":" and os.path.isdir(os.path.expanduser(argument[:i])):
            return argument[:i], argument[i + 1 :] or None
    raise ConfigError(
        f"Expert {argument!r}: no such directory (expected EXPERT_DIR or EXPERT_DIR:STORE, "
        f"STORE a .safetensors file, .safetensors.index.json or directory)"
    )


def request_from_arguments(
    base: str,
    experts: Sequence[str],
    *,
    density: Optional[float] = None,
    density_scope: Optional[str] = None,
    **options: Any,
) -> AnalysisRequest:
    """The request of ``analyze --base BASE EXPERT[:STORE] ...`` (every expert at ``density``)."""
    if not experts:
        raise ConfigError("analyze needs at least one expert: --base BASE EXPERT[:STORE] ...")
    d = DEFAULT_DENSITY if density is None else density
    split = [split_expert_argument(e) for e in experts]
    labels = unique_labels([model for model, _ in split])
    sources = []
    for label, (model, store) in zip(labels, split):
        model_dir = _directory(model, f"Expert {label}")
        sources.append(
            expert_source(label, model_dir, locate_store(store, model_dir, label, advice=export_hint), d, None, label)
        )
    data = {"base": _directory(base, "Base model"), "experts": sources, "top_density": d, **options}
    if density_scope is not None:
        data["density_scope"] = density_scope
    return _request(data, "analyze options")


def _scalar(value: Any, name: str, where: str, notes: List[str]) -> Optional[Any]:
    """A YAML parameter value if it is one scalar; a note (and ``None``) if it varies by tensor."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    notes.append(
        f"{where}: '{name}' varies by tensor or layer in the config (a gradient or filter); "
        f"analyze uses one value per expert, so this setting was replaced by the default"
    )
    return None


def request_from_config(
    path: str,
    *,
    density: Optional[float] = None,
    density_scope: Optional[str] = None,
    **options: Any,
) -> AnalysisRequest:
    """The request for a mergekit YAML config: its base, experts and their parameters.

    Paths are resolved as ``mergekit-yaml`` does (relative to the working directory).
    ``density`` / ``density_scope`` given explicitly override the config's; an expert
    without ``density`` or ``threshold`` is analysed at ``density`` (default 0.05).
    """
    import yaml
    from mergekit.config import MergeConfiguration

    try:
        with open(path, "r", encoding="utf-8") as fp:
            raw = yaml.safe_load(fp)
        config = MergeConfiguration.model_validate(raw)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read ({error})") from error
    except (yaml.YAMLError, ValidationError, RuntimeError, TypeError) as error:
        raise ConfigError(f"{path}: not a valid mergekit merge config ({error})") from error
    if config.base_model is None:
        raise ConfigError(f"{path}: analyze needs a base_model (FFG masks are taken of tau = expert - base)")
    shared = dict(config.parameters or {})
    notes: List[str] = []
    entries = _config_experts(config)
    base_key = _reference_key(config.base_model)
    entries = [(ref, params) for ref, params in entries if _reference_key(ref) != base_key]
    if not entries:
        raise ConfigError(f"{path}: no expert besides the base model {config.base_model}")
    for ref, _ in entries + [(config.base_model, {})]:
        if ref.lora is not None:
            raise ConfigError(f"{path}: model {ref} has a LoRA; analyze reads full checkpoints only")
    labels = unique_labels([ref.model.path for ref, _ in entries])
    written = density_scope or _scalar(shared.get("density_scope"), "density_scope", path, notes)  # None: unset
    mass = _scalar(shared.get("saliency_mass"), "saliency_mass", path, notes)
    if mass is None:  # the merge's own default for its method
        mass = saliency_mass_default(config.merge_method)
    sources, config_densities = [], set()
    for label, (ref, params) in zip(labels, entries):
        merged = {**shared, **params}
        where = f"{path}, expert {label}"
        own_density = _scalar(merged.get("density"), "density", where, notes)
        threshold = _scalar(merged.get("threshold"), "threshold", where, notes)
        curvature = _scalar(merged.get("curvature"), "curvature", where, notes)
        if density is not None:
            own_density, threshold = density, None
        elif own_density is None and threshold is None:
            own_density = DEFAULT_DENSITY
        model_dir = _directory(ref.model.path, f"Expert {label} ({path})")
        store = locate_store(None if curvature is None else str(curvature), model_dir, label, advice=export_hint)
        source = expert_source(label, model_dir, store, own_density, threshold, where, written)
        sources.append(source)
        if isinstance(source.density, float):
            config_densities.add(source.density)
    auto = any(source.density == "auto" for source in sources)
    scope = written or ("model" if auto else "tensor")  # density: auto implies model scope, as in the merge
    top = (
        density if density is not None else (config_densities.pop() if len(config_densities) == 1 else DEFAULT_DENSITY)
    )
    data = {
        "base": _directory(config.base_model.model.path, f"Base model ({path})"),
        "experts": sources,
        "density_scope": scope,
        "top_density": top,
        "source": os.path.abspath(path),
        **({"saliency_mass": mass} if mass is not None else {}),
        "notes": tuple(notes),
        **options,
    }
    return _request(data, path)


def _reference_key(ref: Any) -> str:
    return os.path.abspath(os.path.expanduser(ref.model.path))


def _config_experts(config: Any) -> List[Tuple[Any, Dict[str, Any]]]:
    """(model reference, its parameters) in order of first appearance, over models/slices/modules."""
    found: Dict[str, Tuple[Any, Dict[str, Any]]] = {}

    def visit(models: Any, slices: Any) -> None:
        for item in models or ():
            found.setdefault(_reference_key(item.model), (item.model, dict(item.parameters or {})))
        for out_slice in slices or ():
            for source in out_slice.sources:
                params = {**(out_slice.parameters or {}), **(source.parameters or {})}
                found.setdefault(_reference_key(source.model), (source.model, params))

    visit(config.models, config.slices)
    for module in (config.modules or {}).values():
        visit(module.models, module.slices)
    return list(found.values())


# ----------------------------------------------------------------------------- model files


class ModelFiles:
    """A model directory's safetensors weights: headers read up front, tensors one at a time.

    Files are found as mergekit finds them (``model.safetensors`` or its ``.index.json``;
    :func:`~mergekit_ota.io.safetensors.read_sharded` refuses an ambiguous index); PyTorch
    ``.bin`` checkpoints are refused, since reading them means unpickling.
    """

    def __init__(self, directory: str, label: str):
        self.directory = directory
        self.label = label
        if not any(os.path.isfile(os.path.join(directory, _MODEL_FILE + suffix)) for suffix in ("", INDEX_SUFFIX)):
            found = "PyTorch .bin weights" if any(n.endswith(".bin") for n in os.listdir(directory)) else "no weights"
            raise ConfigError(
                f"{label} ({directory}) has {found}; analyze reads {_MODEL_FILE} or "
                f"{_MODEL_FILE}{INDEX_SUFFIX} (re-save with save_pretrained(..., safe_serialization=True))"
            )
        index = os.path.join(directory, _MODEL_FILE + INDEX_SUFFIX)
        try:
            _, self.entries, _ = read_sharded(index if os.path.isfile(index) else os.path.join(directory, _MODEL_FILE))
        except CurvatureError as error:
            raise ConfigError(f"{label} ({directory}): {error}") from error

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (one read through the shared open-file cache)."""
        return read_tensor(self.entries[name])


@dataclass
class OpenedInputs:
    """The request with every file opened and checked; ``tensors`` are analysed, ``skipped`` not."""

    request: AnalysisRequest
    base: ModelFiles
    experts: List[ModelFiles]
    stores: List[CurvatureStore]
    tensors: List[str]
    skipped: List[str] = field(default_factory=list)


def open_inputs(request: AnalysisRequest) -> OpenedInputs:
    """Open base, experts and stores; check all headers; raise one :class:`PreflightError` listing
    every problem (expert or store lacking a tensor the base has, shape or dtype mismatch)."""
    problems: List[str] = []

    def attempt(action: Any) -> Any:
        try:
            return action()
        except OTAError as error:
            problems.append(str(error))
            return None

    base = attempt(lambda: ModelFiles(request.base, "Base model"))
    experts = [attempt(lambda e=e: ModelFiles(e.model, f"Expert {e.label}")) for e in request.experts]
    stores = [attempt(lambda e=e: CurvatureStore.open(e.store)) for e in request.experts]
    if base is None or None in experts or None in stores:
        raise PreflightError(problems)
    tensors, skipped = [], []
    for name, entry in base.entries.items():
        if entry.dtype not in FLOAT_DTYPES:
            skipped.append(name)
            continue
        tensors.append(name)
        for source, files, store in zip(request.experts, experts, stores):
            problems.extend(_tensor_problems(name, entry, source, files, store))
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise PreflightError(shown)
    if not tensors:
        raise ConfigError(f"Base model {request.base} has no floating-point tensors")
    return OpenedInputs(request, base, experts, stores, tensors, skipped)


def _tensor_problems(
    name: str, entry: HeaderEntry, source: ExpertSource, files: ModelFiles, store: CurvatureStore
) -> List[str]:
    problems = []
    weight = files.entries.get(name)
    if weight is None:
        problems.append(f"expert {source.label} ({files.directory}) lacks tensor {name} that the base has")
    elif weight.shape != entry.shape:
        problems.append(
            f"expert {source.label}: tensor {name} in {weight.file} has shape {list(weight.shape)}; "
            f"the base's ({entry.file}) has {list(entry.shape)}"
        )
    elif weight.dtype not in FLOAT_DTYPES:
        problems.append(f"expert {source.label}: tensor {name} in {weight.file} has dtype {weight.dtype}")
    if name not in store:
        problems.append(f"curvature store {store.path} (expert {source.label}) lacks tensor {name}")
        return problems
    if tuple(store.shape(name)) != tuple(entry.shape):
        problems.append(
            f"curvature store {store.path} (expert {source.label}): tensor {name} has shape "
            f"{list(store.shape(name))}; the weight has {list(entry.shape)}"
        )
    try:
        store.check_dtype(name)
    except OTAError as error:
        problems.append(str(error))
    return problems
