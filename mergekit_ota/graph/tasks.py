"""mergekit graph tasks that carry curvature next to the weights.

For each output tensor the planner builds, per expert, a :class:`LoadCurvature` for
the name under which that expert's *input* weight was found, gathers them
(:class:`GatherCurvature`), permutes their vocabulary rows with the weights'
tokenizer task (:class:`PermutedCurvature`), and hands them to
:class:`CurvatureMergeTask`, an ``ExecuteMergeMethodTask`` with a second argument.
mergekit's executor loads, moves and frees these like weights.

What needs every tensor before the first merge (model-wide density's thresholds,
``curvature_scale``'s statistics) is one task, :class:`ModelWidePass`, that streams every
tensor once through a :class:`ModelWidePart` in a sub-executor and returns, per expert,
one absolute saliency threshold and one curvature statistic ``m_i``. A part reads the
weights only where it needs saliency (or a vocabulary truncation's size); for the
statistic alone it reads only the curvature.

A weight that an expert's LoRA adapter leaves as the base's (its store lists it in ``adapter_untouched``, and its
task vector is 0) has no curvature record: the planner names such experts in
:attr:`CurvatureMergeTask.untouched` and the task gives them curvature 0 (:func:`untouched_curvature`).

The end of a merge's weights: ``MergePlanner.plan_to_disk`` ends its task list with mergekit's
``FinalizeModel`` (it writes the weight index once every ``SaveTensor`` has run). For ``ota``/``ffg``
the planner patch swaps in :class:`RecordedFinalize`, which then marks the output's build directory
complete (:func:`mergekit_ota.io.output.mark_complete`): a failure in a later step of ``run_merge``
(model card, tokenizer, tag-along files) keeps the finished weights.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Tuple, Union

import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Task
from mergekit.io.tasks import FinalizeModel
from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.tokenizer.build import BuildTokenizer, TokenizerInfo
from mergekit.tokenizer.config import TokenEmbeddingConfig
from pydantic import ConfigDict, Field

from mergekit_ota.compat import run_tasks
from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.errors import MergeError
from mergekit_ota.graph.provenance import MergeRecord
from mergekit_ota.io.output import mark_complete
from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature
from mergekit_ota.math.scale import CurvatureScale
from mergekit_ota.methods.scale import STATISTICS_KEY, ScaleMode

LOG = logging.getLogger("mergekit_ota")


class LoadCurvature(Task[Curvature]):
    """Load one expert's curvature (float32, validated) from its store; rank-1 records stay factored."""

    store: str
    tensor: str
    label: Optional[str] = None

    def arguments(self) -> Dict[str, Task]:
        return {}

    def execute(self) -> Curvature:
        return CurvatureStore.open(self.store).load(self.tensor, factored=True)

    def priority(self) -> int:
        return -1000

    def group_label(self) -> Optional[str]:
        return self.label


class GatherCurvature(Task[Dict[ModelReference, Curvature]]):
    """The curvature of every expert that has this weight."""

    loads: ImmutableMap[ModelReference, LoadCurvature]

    def arguments(self) -> Dict[str, Task]:
        return {str(model): load for model, load in self.loads.items()}

    def group_label(self) -> Optional[str]:
        return max((load.group_label() or "" for load in self.loads.values()), default=None)

    def priority(self) -> int:
        return -10

    def execute(self, **kwargs: Curvature) -> Dict[ModelReference, Curvature]:
        return {model: kwargs[str(model)] for model in self.loads}


class PermutedCurvature(Task[Dict[ModelReference, Curvature]]):
    """Curvature rows in the merged tokenizer's order, as ``PermutedVocabulary`` does for weights.

    Row ``new_id`` of expert e takes row ``permutations[e][new_id]`` of its curvature;
    rows the expert never had, rows forced from another source (``tokens: force``),
    and padding rows get curvature 0 (no information).
    """

    curvature: GatherCurvature
    tokenizer_task: BuildTokenizer
    tokens: Optional[ImmutableMap[str, TokenEmbeddingConfig]] = None
    pad_to_multiple_of: Optional[int] = None
    vocabulary_axis: int

    def arguments(self) -> Dict[str, Task]:
        return {"tokenizer_info": self.tokenizer_task, "curvature": self.curvature}

    def group_label(self) -> Optional[str]:
        return self.curvature.group_label()

    def execute(
        self, tokenizer_info: TokenizerInfo, curvature: Dict[ModelReference, Curvature]
    ) -> Dict[ModelReference, Curvature]:
        vocab = tokenizer_info.tokenizer.get_vocab()
        size = len(vocab)
        if self.pad_to_multiple_of and size % self.pad_to_multiple_of:
            size = (size // self.pad_to_multiple_of + 1) * self.pad_to_multiple_of
        forced = {token for token, cfg in (self.tokens or {}).items() if cfg.force}
        result = {}
        for model, v in curvature.items():
            factored = isinstance(v, Rank1Curvature)  # permute the factor along the vocabulary axis
            rows = (v.row if self.vocabulary_axis == 0 else v.col) if factored else v.movedim(self.vocabulary_axis, 0)
            permutation = tokenizer_info.permutations[model]
            pairs = [
                (new_id, old_id)
                for token, new_id in vocab.items()
                if token not in forced and 0 <= (old_id := permutation.get(new_id, -1)) < rows.shape[0]
            ]
            out = rows.new_zeros((size, *rows.shape[1:]))
            if pairs:
                new_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=rows.device)
                old_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=rows.device)
                out[new_ids] = rows[old_ids]
            if factored:
                result[model] = Rank1Curvature(out, v.col) if self.vocabulary_axis == 0 else Rank1Curvature(v.row, out)
            else:
                result[model] = out.movedim(0, self.vocabulary_axis)
        return result


CurvatureInput = Union[GatherCurvature, PermutedCurvature]


def untouched_curvature(weight: torch.Tensor) -> Curvature:
    """Curvature 0 of ``weight``'s shape, on its device: a 2-D weight's as rank-1 factors (no m x n tensor).

    What an expert gets for a weight its LoRA adapter does not change (store metadata ``adapter_untouched``; see
    :class:`CurvatureMergeTask`). Its task vector there is 0, and curvature 0 is what the rest of the package
    already gives where an expert has no information (:class:`PermutedCurvature`'s rows an expert never had) and
    what Adam's ``v`` is for a parameter that gets no gradient.
    """
    if weight.dim() == 2:
        rows, cols = (torch.zeros(n, dtype=torch.float32, device=weight.device) for n in weight.shape)
        return Rank1Curvature(rows, cols)
    return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)


Histograms = Dict[ModelReference, Tuple[SaliencyHistogram, float]]


@dataclass
class PartResult:
    """One tensor's contribution to the model-wide pass: saliency histograms (per expert with a
    model-wide density) and curvature scales (per expert, under ``curvature_scale``)."""

    histograms: Histograms
    scales: Dict[ModelReference, CurvatureScale]


@dataclass(frozen=True)
class ModelWideResult:
    """Per expert: its model-wide saliency threshold, and its ``curvature_scale`` statistic ``m_i``."""

    thresholds: Dict[ModelReference, float]
    statistics: Optional[Dict[ModelReference, float]] = None
    auto: Optional[Dict[ModelReference, Any]] = None  # density: auto: each expert's AutoChoice (methods.base)


class ModelWidePart(Task[PartResult]):
    """One output tensor in the model-wide pass: FFG saliency histograms (``saliency``) and
    curvature statistics (``scale``: ``mean``/``median``, ``none`` for none)."""

    merge_task: "CurvatureMergeTask"
    saliency: bool = True
    scale: ScaleMode = "none"

    def needs_weights(self) -> bool:
        """Saliency needs ``tau``; a truncated vocabulary needs the weight's size. Otherwise curvature only."""
        return self.saliency or self.merge_task.truncate_vocabulary

    def arguments(self) -> Dict[str, Task]:
        arguments: Dict[str, Task] = {"curvature": self.merge_task.curvature}
        if self.needs_weights():
            arguments["tensors"] = self.merge_task.gather_tensors
        return arguments

    def group_label(self) -> Optional[str]:
        return self.merge_task.group_label()

    def uses_accelerator(self) -> bool:
        return self.saliency

    def execute(
        self, curvature: Dict[ModelReference, Curvature], tensors: Optional[Dict[ModelReference, torch.Tensor]] = None
    ) -> PartResult:
        histograms: Histograms = {}
        if self.saliency and tensors is not None:
            histograms = self.merge_task.saliency_histograms(tensors, curvature)
        scales: Dict[ModelReference, CurvatureScale] = {}
        if self.scale != "none":
            from mergekit_ota.methods.scale import add_curvatures

            add_curvatures(scales, self.merge_task.curvatures_used(tensors, curvature), self.scale)
        return PartResult(histograms, scales)


class ModelWidePass(Task[ModelWideResult]):
    """Per expert, the saliency threshold that keeps its ``density`` over all its tensors, and its
    ``curvature_scale`` statistic over every curvature entry the merge reads.

    Runs its own executor over :class:`ModelWidePart` s (one extra read of what they need,
    one tensor at a time), so it has no graph arguments and the main graph never holds more
    than one tensor's inputs for it. ``scale`` is ``curvature_scale`` (``none``: thresholds only).
    ``record``: its merge's provenance, which notes what the pass decided (``None``: noted nowhere).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    parts: Tuple[ModelWidePart, ...]
    scale: ScaleMode = "none"
    device: Optional[str] = None
    quiet: bool = False
    key: str = Field(default_factory=lambda: uuid.uuid4().hex)
    record: Optional[MergeRecord] = Field(default=None, exclude=True, repr=False)

    def __hash__(self) -> int:  # the parts are many: identify the task by its key
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelWidePass) and other.key == self.key

    def arguments(self) -> Dict[str, Task]:
        return {}

    def priority(self) -> int:
        return 100

    def description(self) -> str:
        """The progress bar's title: what this pass computes."""
        what = []
        if any(part.saliency for part in self.parts):
            what.append("FFG density (saliency pass)")
        if self.scale != "none":
            what.append(f"curvature_scale: {self.scale}")
        return "Model-wide " + " and ".join(what)

    def execute(self) -> ModelWideResult:
        from mergekit_ota.methods.base import merge_histograms, thresholds_for_density
        from mergekit_ota.methods.scale import describe, statistics

        totals: Dict[Hashable, Tuple[SaliencyHistogram, float]] = {}
        scales: Dict[ModelReference, CurvatureScale] = {}
        parts = run_tasks(
            self.parts,
            math_device=torch.device(self.device or "cpu"),
            storage_device=torch.device("cpu"),
            quiet=self.quiet,
            desc=self.description(),
        )
        for task, part in parts:
            merge_histograms(totals, part.histograms, task.merge_task.output_weight.name)
            for model, scale in part.scales.items():
                if model in scales:
                    scales[model].merge(scale)
                else:
                    scales[model] = scale
        found = None
        if self.scale != "none":
            found = statistics(scales, self.scale)
            for model, value in found.items():
                LOG.info(describe(self.scale, model, value, scales[model].count))
        from mergekit_ota.methods.base import auto_choices

        auto = auto_choices(totals)  # once: thresholds_for_density reads the auto thresholds from it
        if self.record is not None:
            self.record.note_model_wide(auto, found)  # this merge's provenance records what was chosen
        return ModelWideResult(thresholds_for_density(totals, auto), found, auto or None)


class CurvatureMergeTask(ExecuteMergeMethodTask):
    """``ExecuteMergeMethodTask`` whose experts get their curvature from a graph argument.

    ``save_dtype`` is the dtype mergekit's ``SaveTensor`` will write the result in
    (``weight.force_dtype or config.out_dtype``; ``None``: as computed): the result is
    cast to it here and checked finite (:func:`~mergekit_ota.methods.base.require_finite`)
    before it is handed on, so a float32 result that overflows float16 is never written.

    ``untouched``: the experts whose LoRA adapter leaves this weight as the base's (the planner read it from their
    store's ``adapter_untouched``). Their task vector is 0 and they get **curvature 0**
    (:func:`untouched_curvature`), which

    * in ``ota`` makes their weight ``w_i = eps``: the expert abstains (to within ``eps`` against the others'
      ``weight_j (v_j / m_j)**p``), so the weight is the curvature-weighted merge of the experts that did train it,
      and the base where none did (all ``w_i = eps``: the plain mean of task vectors 0). A finite non-zero
      curvature would instead pull the merge towards the base by an amount that curvature, which nobody measured,
      would decide: ``ota`` divides by ``sum_i w_i``, so an expert with ``tau_i = 0`` is *not* neutral whatever its
      curvature;
    * in ``ffg`` changes nothing any curvature would not: ``weight_i m_i tau_i = 0`` whatever the mask, and
      ``normalize: true`` divides by ``sum_i weight_i``, which no curvature enters (as for the weights folded by
      hand with any curvature).

    They are left out of what is taken over an expert's whole model, since those zeros are no measurement: the
    ``curvature_scale`` statistic ``m_i`` (:meth:`curvatures_used`: an adapter that changes 10% of the weights
    would otherwise get a mean ten times smaller, and a median of 0) and ``density_scope: model``'s saliency
    histograms (:meth:`saliency_histograms`: ``density`` is then a fraction of the entries the adapter changed).
    Their task vector is checked to be 0 (:meth:`check_untouched`): a base other than the adapter's, or an
    adapter folded in another dtype than the base's (``--lora-merge-dtype``), is refused rather than merged with
    curvature 0.
    """

    curvature: CurvatureInput
    model_wide: Optional[ModelWidePass] = None
    truncate_vocabulary: bool = False
    save_dtype: Optional[str] = None
    untouched: Tuple[ModelReference, ...] = ()

    def arguments(self) -> Dict[str, Task]:
        arguments = super().arguments()
        arguments["curvature"] = self.curvature
        if self.model_wide is not None:
            arguments["model_wide"] = self.model_wide
        return arguments

    def _with_curvature(
        self,
        tensors: Dict[ModelReference, torch.Tensor],
        curvature: Dict[ModelReference, Curvature],
        thresholds: Optional[Dict[ModelReference, float]] = None,
    ) -> Dict[ModelReference, Dict[str, Any]]:
        axis = self.output_weight.vocabulary_axis
        parameters = {}
        for model, values in self.input_parameters.items():
            values = dict(values.items())
            v = curvature.get(model)
            weight = tensors.get(model)
            if v is None and model in self.untouched and weight is not None:
                values["curvature"] = untouched_curvature(weight)  # the weight as loaded: its vocabulary aligned
            elif v is not None:
                if self.truncate_vocabulary and weight is not None and axis is not None:
                    v = v.narrow(axis, 0, min(v.shape[axis], weight.shape[axis]))
                values["curvature"] = v
            if thresholds and model in thresholds:
                values["density"] = None
                values["threshold"] = thresholds[model]
            parameters[model] = values
        return parameters

    def execute(
        self,
        tensors: Dict[ModelReference, torch.Tensor],
        curvature: Dict[ModelReference, Curvature],
        model_wide: Optional[ModelWideResult] = None,
        **_kwargs: Any,
    ) -> Optional[torch.Tensor]:
        from mergekit.common import dtype_from_name

        from mergekit_ota.methods.base import finite_check_deferred, require_finite

        self.check_untouched(tensors)
        parameters = self._with_curvature(tensors, curvature, model_wide.thresholds if model_wide else None)
        update: Dict[str, Any] = {
            "input_parameters": ImmutableMap(
                data={model: ImmutableMap(data=values) for model, values in parameters.items()}
            )
        }
        if model_wide is not None and model_wide.statistics is not None:  # m_i per expert, for merge_group
            # an expert untouched on every tensor the pass read has no m_i: any does (its w_i is eps here)
            found = {**{model: 1.0 for model in self.untouched}, **dict(model_wide.statistics)}
            shared = {**dict(self.parameters.items()), STATISTICS_KEY: found}
            update["parameters"] = ImmutableMap(data=shared)
        bound = self.model_copy(update=update)
        with finite_check_deferred():  # checked once below, in the dtype it is saved in
            result = ExecuteMergeMethodTask.execute(bound, tensors=tensors)
        if result is None or not result.is_floating_point():
            return result
        uncast = result
        if self.save_dtype:
            result = result.to(dtype=dtype_from_name(self.save_dtype))  # SaveTensor's own cast then does nothing
        require_finite(result, name=self.output_weight.name, method=self.method_name, uncast=uncast)
        return result

    def check_untouched(self, tensors: Dict[ModelReference, torch.Tensor]) -> None:
        """Each :attr:`untouched` expert's weight must equal the base's (task vector 0, which its curvature 0 assumes);
        :class:`MergeError` naming the expert, the weight and what to check otherwise. Without a base, nothing to
        compare."""
        base = tensors.get(self.base_model) if self.base_model is not None else None
        if base is None:
            return
        for model in self.untouched:
            weight = tensors.get(model)
            if weight is None or torch.equal(weight, base):
                continue
            differ = "a shape" if weight.shape != base.shape else f"{int((weight != base).sum())} value(s)"
            raise MergeError(
                f"{self.method_name}: expert {model}'s curvature store says its LoRA adapter leaves "
                f"{self.output_weight.name} as the base's (metadata 'adapter_untouched': curvature 0, task vector 0), "
                f"but it differs from base_model {self.base_model}'s in {differ}; is base_model the model the "
                f"adapter was trained on, and was the adapter folded in the base's dtype (--lora-merge-dtype)?"
            )

    def curvatures_used(
        self, tensors: Optional[Dict[ModelReference, torch.Tensor]], curvature: Dict[ModelReference, Curvature]
    ) -> Dict[ModelReference, Curvature]:
        """Each expert's curvature as :meth:`execute` hands it to the method (vocabulary truncated);
        the experts whose weight was loaded (``tensors``), or all that have curvature without ``tensors``.
        :attr:`untouched` experts are not in ``curvature``, so their zeros count in no statistic."""
        parameters = self._with_curvature(tensors or {}, curvature)
        return {
            model: parameters[model]["curvature"]
            for model in self.model_order
            if model != self.base_model and model in curvature and (tensors is None or tensors.get(model) is not None)
        }

    def saliency_histograms(
        self, tensors: Dict[ModelReference, torch.Tensor], curvature: Dict[ModelReference, Curvature]
    ) -> Histograms:
        """This tensor's contribution to the model-wide density thresholds."""
        from mergekit import merge_methods

        method = merge_methods.get(self.method_name)
        parameters = self._with_curvature(tensors, curvature)
        entries = tuple(  # untouched experts left out: their saliency 0 is no entry of what they changed
            TensorEntry(id=model, tensor=tensors[model], is_base=model == self.base_model)
            for model in self.model_order
            if tensors.get(model) is not None and model not in self.untouched
        )
        group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(self.output_weight))
        if not group.entries or not group.tensors[0].is_floating_point():
            return {}
        bound: Dict[str, Any] = dict(self.parameters.items())
        for spec in method.spec.input_parameters:
            bound[spec.name] = PerInputValues([(entry.id, parameters[entry.id][spec.name]) for entry in group.non_base])
        return method.saliency_histograms(group, bound)


ModelWidePart.model_rebuild()


class RecordedFinalize(FinalizeModel):
    """``FinalizeModel`` that marks ``out_path`` complete after the index is written."""

    out_path: str

    def execute(self, writer: Any, **kwargs: Any) -> None:
        super().execute(writer, **kwargs)
        mark_complete(self.out_path)


def record_finalize(tasks: List[Task], out_path: str) -> List[Task]:
    """``tasks`` (from ``plan_to_disk``) with each ``FinalizeModel`` replaced by a :class:`RecordedFinalize`."""
    return [
        RecordedFinalize(tensor_save_tasks=t.tensor_save_tasks, writer_task=t.writer_task, out_path=out_path)
        if type(t) is FinalizeModel
        else t
        for t in tasks
    ]
