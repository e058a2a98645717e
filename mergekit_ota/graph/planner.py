"""The planner patch: attach curvature to every ``ota``/``ffg`` tensor task.

:func:`patch_planner` wraps three ``MergePlanner`` methods (``plan_tensor``, ``_plan``,
``plan_to_disk``), each acting only when the planner's method is ours; the private
ones are reached through :mod:`mergekit_ota.compat`. ``MergePlanner.plan_tensor``
appends ``(output weight, ExecuteMergeMethodTask)``; for our methods the patched version replaces that task by a
:class:`~mergekit_ota.graph.tasks.CurvatureMergeTask` whose curvature pipeline is
rebuilt from the weights' pipeline: per expert, its *input* weight (layer offsets,
aliases and tied names resolved as for the weight, under the name the weight was
actually found), and the same tokenizer task for vocabulary permutation.

Everything checkable from headers is checked here, for all tensors, and reported
together (:class:`~mergekit_ota.errors.PreflightError`) before anything is written.

**LoRA experts** (``model: BASE+ADAPTER``, which mergekit folds into the base before merging): the store is
looked up in the *adapter's* directory (:func:`store_home`; ``curvature:`` still wins), and a weight the adapter
leaves as the base's, which its store lists in ``adapter_untouched`` instead of holding a record for, gets
curvature 0 (:class:`~mergekit_ota.graph.tasks.CurvatureMergeTask`'s ``untouched``, where the choice is
explained). Both rules read the store, not the ``+``: an adapter folded by hand with its store beside it merges
the same.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mergekit.architecture import WeightInfo
from mergekit.common import ImmutableMap, ModelReference
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.tokenizer import PermutedVocabulary
from mergekit.tokenizer.truncate import TruncatedVocabulary

from mergekit_ota.compat import (
    is_patched,
    mark_patched,
    merge_task_fields,
    planner_cache_dir,
    planner_config,
    planner_method,
    planner_options,
    planner_plan_step,
    planner_tensors,
    replace_planner_plan_step,
)
from mergekit_ota.curvature.fingerprint import adapter_fingerprint, check_ownership
from mergekit_ota.curvature.locate import locate_store
from mergekit_ota.curvature.store import METADATA_KEYS, CurvatureStore, metadata_inputs, read_header
from mergekit_ota.errors import CurvatureError, OTAError, PreflightError, Problem, problem_of
from mergekit_ota.graph.provenance import MergeRecord
from mergekit_ota.graph.tasks import (
    CurvatureInput,
    CurvatureMergeTask,
    GatherCurvature,
    LoadCurvature,
    ModelWidePart,
    ModelWidePass,
    PermutedCurvature,
)
from mergekit_ota.io.safetensors import HeaderEntry
from mergekit_ota.methods import is_ours
from mergekit_ota.methods.bias import BiasDecision, mismatch_warning
from mergekit_ota.methods.settings import (
    ExpertSettings,
    SharedSettings,
    expert_check,
    model_wide_density,
    shared_check,
    tensor_problems,
    unknown_parameters,
    value_problems,
)
from mergekit_ota.store_format import (
    ADAPTER,
    ADAPTER_UNTOUCHED,
    ESTIMATOR,
    WITHOUT_STATE,
    complete_command,
    metadata_names,
    missing_tensors,
)

FROM_THE_BASE = "every model of a merge must be fine-tuned from the same base (same architecture and sizes)"
#: :meth:`CurvaturePlan.curvature_load`'s answer for a weight the expert's LoRA adapter leaves as the base's
UNTOUCHED = "untouched by the adapter"
LOG = logging.getLogger("mergekit_ota")


Headers = Dict[str, Dict[str, HeaderEntry]]  # weights file -> its header entries, read once per plan


def _header_entries(path: str, headers: Headers) -> Dict[str, HeaderEntry]:
    """The header entries of weights file ``path``, read once per plan (``headers``: the plan's own, so a file
    rewritten between two merges of one process is read again)."""
    if path not in headers:
        headers[path], _ = read_header(path)
    return headers[path]


def _weight_shape(model: ModelReference, name: str, headers: Headers) -> Optional[Tuple[int, ...]]:
    """Shape of weight ``name`` of ``model`` from its safetensors header (None if unknown)."""
    index = LoaderCache().get(model).index
    shard = index.tensor_paths.get(name)
    if shard is None or not shard.endswith(".safetensors"):
        return None
    found = _header_entries(os.path.join(index.base_path, shard), headers).get(name)
    return None if found is None else found.shape


def _weight_entries(model: ModelReference, headers: Headers) -> Dict[str, HeaderEntry]:
    """Header entries of ``model``'s safetensors weights by tensor name (those in other formats are left out)."""
    index = LoaderCache().get(model).index
    entries: Dict[str, HeaderEntry] = {}
    for name, shard in index.tensor_paths.items():
        if shard.endswith(".safetensors"):
            found = _header_entries(os.path.join(index.base_path, shard), headers).get(name)
            if found is not None:
                entries[name] = found
    return entries


def _without_state(store: CurvatureStore) -> List[str]:
    """Parameters an export recorded as having no optimizer state (metadata ``parameters_without_state``, read
    by the exporter's own parser); ``[]`` where it is malformed, since it only adds a hint to another problem."""
    try:
        return metadata_names(store.metadata, WITHOUT_STATE, store.path)
    except CurvatureError:
        return []


def _missing(store: CurvatureStore) -> Dict[str, str]:
    """``{tensor: reason}`` a partial store lists as having no curvature (metadata ``missing_curvature``); ``{}``
    where it is malformed (the tensor is then reported as missing from the store, with the store named)."""
    try:
        return missing_tensors(store.metadata, store.path)
    except CurvatureError:
        return {}


def _untouched(store: CurvatureStore) -> List[str]:
    """The base weights an adapter's store says the adapter leaves as they are (metadata ``adapter_untouched`` of a
    store that names its ``adapter``: ``export`` of a LoRA run, ``fisher BASE+ADAPTER``); ``[]`` for any other
    store, or where the list is malformed (then the weight is reported as missing, with the store named)."""
    if not store.metadata.get(ADAPTER):
        return []
    try:
        return metadata_names(store.metadata, ADAPTER_UNTOUCHED, store.path)
    except CurvatureError:
        return []


def store_home(model: ModelReference) -> Tuple[str, Optional[str], str]:
    """Where expert ``model``'s store is looked up without a ``curvature`` parameter: ``(path, revision, what)``.

    A ``BASE+ADAPTER`` expert's is its adapter (``what`` ``"adapter"``): the curvature is of the adapter's training
    (``mergekit-ota export`` of its PEFT checkpoint writes it there), and the base directory holds no store of the
    expert's. Any other expert's is its model (``"model"``). The search inside either is
    :mod:`~mergekit_ota.curvature.locate`'s.
    """
    if model.lora is not None:
        return str(model.lora.path), model.lora.revision, "adapter"
    return str(model.model.path), model.model.revision, "model"


def _adapter_fingerprint(model: ModelReference) -> Optional[str]:
    """The fingerprint of ``model``'s adapter file where it is ``BASE+ADAPTER`` with a local adapter directory."""
    if model.lora is None or not os.path.isdir(str(model.lora.path)):
        return None
    return adapter_fingerprint(str(model.lora.path))


def _found_name(model: ModelReference, weight: WeightInfo) -> Optional[str]:
    """The name under which mergekit's ``LoadTensor`` finds ``weight`` in ``model``."""
    tensor_paths = LoaderCache().get(model).index.tensor_paths
    for name in [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]:
        if name in tensor_paths:
            return name
    return None


def _curvature_names(weight: WeightInfo, found: str) -> List[str]:
    """Store keys to try: the found name first; its true aliases only if it is one of them.

    A weight found under a *tied* name (``lm_head`` read from ``embed_tokens``) has its
    optimizer state under that tied name; an untied weight never falls back to it.
    """
    same = [weight.name, *(weight.aliases or ())]
    if found not in same:
        return [found]
    return [found] + [name for name in same if name != found]


class CurvaturePlan:
    """Per-planner state: resolved stores, collected problems, our tasks."""

    def __init__(self, planner: Any):
        self.planner = planner
        self.config_problems: Dict[str, None] = {}  # not tied to a tensor (parameter names, shared values, base): first
        self.problems: Dict[str, None] = {}
        self.names_checked = False
        self.bias: Dict[ModelReference, BiasDecision] = {}  # ota: what bias correction does to each expert
        self.power = 0.5
        self.warnings: List[str] = []
        self.stores: Dict[Tuple[ModelReference, Optional[str]], Optional[str]] = {}
        # density_scope: model: per expert, each density seen -> first tensor it was seen on
        self.model_densities: Dict[ModelReference, Dict[float, str]] = {}
        # ota: each curvature_scale seen -> first tensor it was seen on; where its statistic is computed
        self.scale_modes: Dict[str, str] = {}
        self.scale_pass = ""
        self.store_notes: List[str] = []  # stores that record no weights fingerprint (:meth:`check_store_owners`)
        self.headers: Headers = {}  # the weights' safetensors headers this plan read
        self.provenance = MergeRecord()  # this merge's record (:mod:`.provenance`; its model-wide pass notes in it)
        # store -> the weights it gave curvature 0 because its adapter leaves them as the base's (check lists them)
        self.untouched: Dict[str, Dict[str, None]] = {}

    @classmethod
    def of(cls, planner: Any) -> "CurvaturePlan":
        plan = planner.__dict__.get("_mergekit_ota_plan")
        if plan is None:
            plan = cls(planner)
            planner.__dict__["_mergekit_ota_plan"] = plan
        return plan

    def problem(self, message: str, config_level: bool = False) -> None:
        """Collect a problem; one of the config as a whole (``config_level``, or a :class:`Problem` of that
        ``level``) is listed first."""
        config_level = config_level or getattr(message, "level", None) == "config"
        (self.config_problems if config_level else self.problems).setdefault(message, None)

    def listed(self) -> List[str]:
        """Every problem found, config-level ones first."""
        return list(self.config_problems) + [p for p in self.problems if p not in self.config_problems]

    def check_names(self) -> None:
        """Once per plan, before mergekit resolves any value: parameter keys the method does not take
        (:func:`unknown_parameters`) and every value its parameter does not take (:func:`value_problems`, each
        where it is written; the tensors' checks then read such a value as its default and do not repeat it)."""
        if self.names_checked:
            return
        self.names_checked = True
        spec = planner_method(self.planner).spec
        config = planner_config(self.planner)
        for unknown in unknown_parameters(config, spec):
            self.problem(unknown.message(spec.name), config_level=True)
        for problem in value_problems(config, spec):
            self.problem(problem, config_level=True)

    def store_path(self, model: ModelReference, curvature: Any) -> Optional[str]:
        from mergekit_ota.export.detect import export_hint  # the export command for a checkpoint given as a store

        key = (model, None if curvature is None else str(curvature))
        if key not in self.stores:
            home, revision, what = store_home(model)
            base = str(model.model.path) if model.lora is not None else None
            try:
                path = locate_store(
                    key[1],
                    home,
                    str(model),
                    revision=revision,
                    cache_dir=planner_cache_dir(self.planner),
                    advice=lambda where: export_hint(where, base),
                    what=what,
                )
                CurvatureStore.open(path)
                self.stores[key] = path
            except OTAError as error:
                self.problem(str(error))
                self.stores[key] = None
        return self.stores[key]

    def curvature_load(
        self, model: ModelReference, weight: WeightInfo, curvature: Any
    ) -> Union[LoadCurvature, str, None]:
        """Expert ``model``'s curvature of ``weight``: its load; :data:`UNTOUCHED` where its store is a LoRA
        adapter's that lists the weight as one the adapter leaves as the base's (curvature 0, see
        :class:`~mergekit_ota.graph.tasks.CurvatureMergeTask`); ``None`` with a problem collected."""
        found = _found_name(model, weight)
        if found is None:
            if not weight.optional:
                self.problem(
                    Problem(
                        f"expert {model}: weight {weight.name} not found, so its curvature cannot be matched",
                        kind=f"expert {model}: weights not found, so their curvature cannot be matched",
                        tensor=weight.name,
                        expert=model,
                    )
                )
            return None
        path = self.store_path(model, curvature)
        if path is None:
            return None
        store = CurvatureStore.open(path)
        names = _curvature_names(weight, found)
        key = next((name for name in names if name in store), None)
        if key is None and any(name in _untouched(store) for name in names):
            self.untouched.setdefault(path, {})[found] = None
            return UNTOUCHED
        if key is None and found in _missing(store):
            command = complete_command(path, model=str(model))
            self.problem(
                Problem(
                    f"{path}: a partial store: no curvature for '{found}' of expert {model}, weight {weight.name} "
                    f"({_missing(store)[found]}); complete it first: `{command}`",
                    kind=f"{path}: a partial store: no curvature for expert {model}'s tensors its optimizer kept "
                    f"momentum only for",
                    kind_end=f"; complete it first, `{command}`, and merge with the new store",
                    example=f"'{found}'",
                    tensor=weight.name,
                    expert=model,
                )
            )
            return None
        if key is None:
            read_as = f" (read as '{found}')" if found != weight.name else ""
            frozen = ""
            if found in _without_state(store):
                frozen = "; the export found no optimizer state for this parameter (frozen in training?)"
            self.problem(
                Problem(
                    f"{path}: no curvature tensor '{found}' for expert {model}, weight {weight.name}{read_as}{frozen}",
                    kind=f"{path}: no curvature tensors for expert {model}{frozen.replace('this parameter', 'these')}",
                    example=f"'{found}'{read_as}",
                    tensor=weight.name,
                    expert=model,
                )
            )
            return None
        expected = _weight_shape(model, found, self.headers)
        if expected is not None and tuple(store.shape(key)) != tuple(expected):
            self.problem(
                Problem(
                    f"{path}: curvature tensor '{key}' has shape {tuple(store.shape(key))}; "
                    f"expert {model}'s weight '{found}' has shape {tuple(expected)}",
                    kind=f"{path}: curvature shapes (store vs weight) differ from expert {model}'s weights",
                    example=f"'{key}' {tuple(store.shape(key))} vs {tuple(expected)}",
                    tensor=weight.name,
                    expert=model,
                )
            )
            return None
        try:
            store.check_dtype(key)
        except OTAError as error:
            self.problem(problem_of(error))
            return None
        return LoadCurvature(store=path, tensor=key, label=found)

    def check_input_shapes(self, task: ExecuteMergeMethodTask, inputs: Dict[ModelReference, WeightInfo]) -> None:
        """Every input weight of ``task`` must have the base's shape (from the safetensors headers; no weights read).

        Each model is compared with the base (without one, with the first model), dimension by dimension, so an
        expert fine-tuned from another base is named with the tensor, dimension and both sizes while planning.
        Only the vocabulary axis may differ, and only where mergekit aligns it (tokenizer merging, which permutes
        rows, or ``--unsafe-truncate-embeddings``).
        """
        reference = task.base_model if task.base_model in inputs else task.model_order[0]
        aligned = isinstance(task.gather_tensors, (PermutedVocabulary, TruncatedVocabulary))
        axis = task.output_weight.vocabulary_axis
        what = "base" if reference == task.base_model else "first model"

        def shape_of(model: ModelReference) -> Optional[Tuple[Optional[str], Tuple[int, ...]]]:
            found = _found_name(model, inputs[model])
            shape = _weight_shape(model, found, self.headers) if found is not None else None
            return None if shape is None else (found, tuple(shape))

        expected = shape_of(reference)
        if expected is None:
            return
        for model in task.model_order:
            got = shape_of(model) if model != reference else None
            if got is None or got[1] == expected[1]:
                continue
            (name, shape), want = got, expected[1]
            stem = f"expert {model}: weight '{name}' has shape {shape}, the {what} {reference}'s {want}"
            kind = f"expert {model}: weights' shapes differ from the {what} {reference}'s, and {FROM_THE_BASE}"
            example = f"'{name}' {shape} vs {want}"
            if len(shape) != len(want):
                message = f"{stem}: {len(shape)} dimensions, not {len(want)}; {FROM_THE_BASE}"
                self.problem(Problem(message, kind, example, tensor=task.output_weight.name, expert=model))
                continue
            differ = [d for d in range(len(want)) if shape[d] != want[d]]
            if differ == [axis] and aligned:
                continue
            d = differ[0]
            if differ == [axis]:
                fix = (
                    "align the vocabularies with a tokenizer configuration (tokenizer: {source: base} or "
                    "tokenizer_source: union) or pass --unsafe-truncate-embeddings if the shared token ids mean "
                    "the same"
                )
                message = f"{stem}: dimension {d} (the vocabulary axis) is {shape[d]}, not {want[d]}; {fix}"
                kind = f"expert {model}: vocabulary sizes differ from the {what} {reference}'s; {fix}"
            else:
                message = f"{stem}: dimension {d} is {shape[d]}, not {want[d]}; {FROM_THE_BASE}"
            example = f"{example} (dimension {d})"
            self.problem(Problem(message, kind, example, tensor=task.output_weight.name, expert=model))

    def expert_parameters(
        self, task: ExecuteMergeMethodTask, model: ModelReference, shared: SharedSettings
    ) -> Tuple[Dict[str, Any], Optional[ExpertSettings]]:
        """Expert ``model``'s parameters for ``task`` (bias-correction inputs filled from its store's
        metadata) and its settings, or ``None`` where a rule (:func:`expert_check`) is broken."""
        values = dict(task.input_parameters[model].items())
        from_config = {name for name, value in values.items() if value is not None}
        source = self.fill_bias_inputs(model, values) if shared.bias_correction is not False else ""
        check = expert_check(
            {k: v for k, v in values.items() if k != "curvature"},
            expert=model,
            tensor=task.output_weight.name,
            method=task.method_name,
            has_base=task.base_model is not None,
            bias_correction=shared.bias_correction,
            density_scope=shared.density_scope,
        )
        for problem in check.problems:  # each at its level
            self.problem(problem)
        for bad in check.bad_values:  # a value from the config was reported where it is written (check_names)
            if bad.name not in from_config:
                message = f"expert {model}: {bad.message()} ({source or 'from its store metadata'})"
                self.problem(Problem(message, expert=model, parameter=bad.name))
        settings = check.settings
        if shared.model_wide(settings):
            self.model_densities.setdefault(model, {}).setdefault(settings.density, task.output_weight.name)
        if check.ok and task.method_name == "ota" and model not in self.bias:
            self.bias[model] = settings.bias(shared.bias_correction, model, source)  # what the merge will do
            self.power = shared.power
        return values, settings if check.ok else None

    def fill_bias_inputs(self, model: ModelReference, values: Dict[str, Any]) -> str:
        """Fill ``optimizer_step``, ``beta2`` and ``bias_corrected`` the config leaves unset from the expert's
        store metadata (``step``, ``beta2``, ``bias_corrected``, as ``export`` writes them); say where from."""
        path = self.store_path(model, values.get("curvature"))
        metadata = CurvatureStore.open(path).metadata if path else {}
        given = [name for name in ("optimizer_step", "beta2") if values.get(name) is not None]
        found, bad = metadata_inputs(metadata)
        for key, name, _ in METADATA_KEYS:
            if key in bad and values.get(name) is None:  # only where the config does not set it
                message = f"{path}: metadata {key}={metadata[key]!r} is not a number"
                self.problem(Problem(message, expert=model, parameter=name, level="config"))
        filled = []
        for name in ("optimizer_step", "beta2"):
            if values.get(name) is None and name in found:
                values[name] = found[name]
                filled.append(name)
        if values.get("bias_corrected") is None and "bias_corrected" in found:
            values["bias_corrected"] = found["bias_corrected"]
        if filled and given:
            return f"{', '.join(given)} from the config, {', '.join(filled)} from {path}"
        return f"from the metadata of {path}" if filled else "from the config" if given else ""

    def attach(
        self, task: ExecuteMergeMethodTask, weights_in: Sequence[WeightInfo], models: Sequence[ModelReference]
    ) -> ExecuteMergeMethodTask:
        """Return ``task`` as a :class:`CurvatureMergeTask`, collecting every problem on the way.

        No problem hides another: each value is read on its own (a bad one as its default, without changing
        how the others are read), with a bad expert value its curvature is still looked up;
        the rules over all experts of the tensor run when every expert passed its own.
        """
        self.check_names()
        shared, problems, _ = shared_check(  # its bad values come from the config: check_names reported them
            dict(task.parameters.items()), method=task.method_name, has_base=task.base_model is not None
        )
        for problem in problems:
            self.problem(problem, config_level=True)
        if task.method_name == "ota":
            self.scale_modes.setdefault(shared.curvature_scale, task.output_weight.name)
        inputs = dict(zip(models, weights_in))
        loads: Dict[ModelReference, LoadCurvature] = {}
        untouched: List[ModelReference] = []
        parameters: Dict[ModelReference, Any] = {}
        experts: List[Tuple[ModelReference, Optional[ExpertSettings]]] = []
        for model in task.model_order:
            if model == task.base_model:
                parameters[model] = task.input_parameters[model]
                continue
            values, settings = self.expert_parameters(task, model, shared)
            experts.append((model, settings))
            parameters[model] = ImmutableMap(data=values)
            load = self.curvature_load(model, inputs[model], values.get("curvature"))
            if load is UNTOUCHED:
                untouched.append(model)
            elif isinstance(load, LoadCurvature):
                loads[model] = load
        self.check_input_shapes(task, inputs)
        if all(settings is not None for _, settings in experts):
            valid = [(model, settings) for model, settings in experts if settings is not None]
            for problem in tensor_problems(
                valid, method=task.method_name, shared=shared, tensor=task.output_weight.name
            ):
                self.problem(problem)
        curvature: CurvatureInput = GatherCurvature(loads=ImmutableMap(data=loads))
        source = task.gather_tensors
        if isinstance(source, PermutedVocabulary):
            curvature = PermutedCurvature(
                curvature=curvature,
                tokenizer_task=source.tokenizer_task,
                tokens=source.tokens,
                pad_to_multiple_of=source.pad_to_multiple_of,
                vocabulary_axis=source.vocabulary_axis,
            )
        fields = merge_task_fields(task)
        fields["input_parameters"] = ImmutableMap(data=parameters)
        return CurvatureMergeTask(
            **fields,
            curvature=curvature,
            truncate_vocabulary=isinstance(source, TruncatedVocabulary),
            untouched=tuple(untouched),
            save_dtype=task.output_weight.force_dtype or planner_config(self.planner).out_dtype,  # as SaveTensor casts
        )

    def check_model_densities(self) -> None:
        """``density_scope: model`` keeps one fraction per expert: flag an expert given several."""
        for model, densities in self.model_densities.items():
            if len(densities) > 1:
                (first, where), (other, there) = list(densities.items())[:2]
                self.problem(
                    Problem(
                        f"density_scope: model needs one density per expert; expert {model} has "
                        f"{first} (tensor {where}) and {other} (tensor {there})",
                        expert=model,
                        parameter="density",
                    )
                )

    @property
    def curvature_scale(self) -> str:
        """The merge's ``curvature_scale`` (ota; one value for every tensor, see :meth:`check_scale_modes`)."""
        return next(iter(self.scale_modes), "none") if len(self.scale_modes) == 1 else "none"

    def check_scale_modes(self) -> None:
        """``curvature_scale`` divides by one model-wide statistic: flag a merge that sets several."""
        if len(self.scale_modes) > 1:
            (first, where), (other, there) = list(self.scale_modes.items())[:2]
            self.problem(
                Problem(
                    f"curvature_scale must be one value for the whole merge; got {first} (tensor {where}) and "
                    f"{other} (tensor {there})",
                    parameter="curvature_scale",
                )
            )

    def bias_reason(self, d: BiasDecision) -> str:
        """Whether and why expert ``d.expert``'s curvature is bias-corrected in this merge (``curvature_scale``
        included)."""
        mode = self.curvature_scale
        if mode == "none":
            return d.reason
        if d.corrected:
            return (
                f"replaced by curvature_scale: {mode} (v / {mode}(v) keeps no per-expert factor: "
                f"its x{d.multiplier:.4g} from step {d.step}, beta2 {d.beta2} would cancel)"
            )
        return f"{d.reason}; curvature_scale: {mode} removes any per-expert factor anyway"

    def bias_notes(self) -> List[str]:
        """One line per expert (ota): whether and why its curvature is bias-corrected; under
        ``curvature_scale``, that normalising replaces it and where the statistic is computed."""
        mode = self.curvature_scale
        if mode == "none":
            return [f"bias correction, expert {d.expert}: {self.bias_reason(d)}" for d in self.bias.values()]
        notes = []
        for d in self.bias.values():
            notes.append(f"bias correction, expert {d.expert}: {self.bias_reason(d)}")
            notes.append(
                f"curvature scale, expert {d.expert}: OTA uses v / m, m the {mode} of all its curvature entries the "
                f"merge reads (of v as stored), computed during the merge {self.scale_pass}"
            )
        return notes

    def check_store_owners(self) -> None:
        """Each store must be its expert's (:func:`~mergekit_ota.curvature.fingerprint.check_ownership`): one store
        given to two experts is a problem; a weights fingerprint other than the expert's weights' a warning naming
        both; a store without one a note (logged by the merge, listed by check)."""
        uses = []
        for (model, _), path in self.stores.items():
            if path is not None:
                store = CurvatureStore.open(path)
                uses.append((str(model), path, store.metadata, list(store.records)))
        models = {str(model): model for model, _ in self.stores}
        found = check_ownership(
            uses,
            lambda expert: _weight_entries(models[expert], self.headers),
            lambda expert: _adapter_fingerprint(models[expert]),
        )
        for problem in found.problems:
            self.problem(problem, config_level=True)
        for warning in found.warnings:
            if warning not in self.warnings:
                self.warnings.append(warning)
                LOG.warning("mergekit-ota: %s", warning)
        self.store_notes = found.notes

    def finish(self) -> None:
        """Raise every problem found; add the model-wide pass if asked for (density_scope: model,
        curvature_scale); log the bias-correction and scale decisions and warn about mismatched scales."""
        self.check_model_densities()
        self.check_scale_modes()
        self.check_store_owners()
        if self.problems or self.config_problems:
            raise PreflightError(self.listed())
        self.add_model_wide_pass()
        for note in self.bias_notes() + self.store_notes:
            LOG.info(note)
        warnings = [
            mismatch_warning(list(self.bias.values()), self.power),
            self.estimator_warning(),
        ] if self.curvature_scale == "none" else []  # fmt: skip
        for warning in warnings:
            if warning is not None and warning not in self.warnings:
                self.warnings.append(warning)
                LOG.warning("mergekit-ota: %s", warning)

    def estimator_warning(self) -> Optional[str]:
        """Under ``curvature_scale: none``, a warning when some experts' stores hold another estimator than Adam's
        ``v`` (metadata ``curvature_estimator``: Sophia's Hessian estimate) beside experts whose stores do not:
        their scales are not comparable, and ``mean`` (the default) or ``median`` puts each on its own."""
        estimator: Dict[str, str] = {}
        for (model, _), path in self.stores.items():
            if path is not None:
                estimator[str(model)] = CurvatureStore.open(path).metadata.get(ESTIMATOR, "")
        other = sorted(m for m, e in estimator.items() if e)
        if not other or len(other) == len(estimator) and len({estimator[m] for m in other}) == 1:
            return None
        named = "; ".join(f"{m}: {estimator[m].split(':')[0]}" for m in other)
        return (
            f"curvature_scale: none compares the experts' curvature as stored, but {named} is another estimator than "
            f"the Adam second moment of {', '.join(sorted(set(estimator) - set(other))) or 'the others'}, on "
            f"another scale: use curvature_scale: mean (the default) or median"
        )

    def add_model_wide_pass(self) -> None:
        """One :class:`ModelWidePass` for every tensor that needs it: saliency where ``density_scope: model``
        meets a ``density``, the curvature alone for the others that ``curvature_scale`` covers."""
        tensors = planner_tensors(self.planner)
        ours = [(index, task) for index, (_, task) in enumerate(tensors) if isinstance(task, CurvatureMergeTask)]
        density = {
            index
            for index, task in ours
            if any(
                model_wide_density(task.parameters["density_scope"], dict(values.items()).get("density"))
                for values in task.input_parameters.values()
            )
        }
        mode = self.curvature_scale
        scaled = {index for index, task in ours if task.method_name == "ota"} if mode != "none" else set()
        if scaled:
            extra = len(scaled - density)
            if not density:
                self.scale_pass = "in one extra pass over the curvature (no weights read)"
            elif extra:
                self.scale_pass = (
                    f"in the model-wide density pass, which also reads the curvature of the {extra} tensor(s) "
                    f"it does not cover"
                )
            else:
                self.scale_pass = "in the model-wide density pass (no read beyond it)"
        if not density and not scaled:
            return
        options = planner_options(self.planner)
        model_wide = ModelWidePass(
            parts=tuple(
                ModelWidePart(merge_task=task, saliency=index in density, scale=mode if index in scaled else "none")
                for index, task in ours
                if index in density or index in scaled
            ),
            scale=mode,
            device=str(options.device) if options.device else None,
            quiet=bool(options.quiet),
            record=self.provenance,
        )
        for index in sorted(density | scaled):
            weight, task = tensors[index]
            tensors[index] = (weight, task.model_copy(update={"model_wide": model_wide}))


def patch_planner(planner_class: type) -> None:
    """Wrap ``MergePlanner.plan_tensor``, ``._plan`` and ``.plan_to_disk`` (idempotent; ours only).

    ``plan_tensor`` attaches curvature to each task, ``_plan`` raises every problem at
    the end, ``plan_to_disk`` records when the weights are complete
    (:class:`~mergekit_ota.graph.tasks.RecordedFinalize`) and which curvature each expert used
    (:mod:`.provenance`, for the model card).
    """
    from mergekit_ota.graph.provenance import remember as remember_provenance
    from mergekit_ota.graph.tasks import record_finalize

    if is_patched(planner_class.plan_tensor):
        return
    plan_tensor = planner_class.plan_tensor
    plan = planner_plan_step(planner_class)
    plan_to_disk = planner_class.plan_to_disk

    def patched_plan_tensor(self, weight, weights_in, models, cfg_reader):
        tensors = planner_tensors(self)
        before = len(tensors)
        plan_tensor(self, weight, weights_in, models, cfg_reader)
        if is_ours(planner_method(self)) and len(tensors) > before:
            out_weight, task = tensors[-1]
            tensors[-1] = (out_weight, CurvaturePlan.of(self).attach(task, weights_in, models))

    def patched_plan(self):
        if not is_ours(planner_method(self)):
            return plan(self)
        curvature_plan = CurvaturePlan.of(self)
        curvature_plan.check_names()  # unknown keys are reported even when mergekit refuses the config
        try:
            plan(self)
        except OTAError as error:  # a refusal of our methods' own validation while mergekit plans (e.g. no base)
            curvature_plan.problem(str(error), config_level=True)
            raise PreflightError(curvature_plan.listed()) from error
        curvature_plan.finish()

    def patched_plan_to_disk(self, out_path):
        tasks = plan_to_disk(self, out_path)
        if not is_ours(planner_method(self)):
            return tasks
        remember_provenance(out_path, CurvaturePlan.of(self))  # for the model card (:mod:`.provenance`)
        return record_finalize(tasks, out_path)

    wrappers = ((patched_plan_tensor, plan_tensor), (patched_plan, plan), (patched_plan_to_disk, plan_to_disk))
    for wrapper, original in wrappers:
        mark_patched(wrapper, original)
    planner_class.plan_tensor = patched_plan_tensor
    replace_planner_plan_step(planner_class, patched_plan)
    planner_class.plan_to_disk = patched_plan_to_disk
