"""mergekit graph tasks that carry curvature next to the weights.

For each output tensor the planner builds, per expert, a :class:`LoadCurvature` for
the name under which that expert's *input* weight was found, gathers them
(:class:`GatherCurvature`), permutes their vocabulary rows with the weights'
tokenizer task (:class:`PermutedCurvature`), and hands them to
:class:`CurvatureMergeTask`, an ``ExecuteMergeMethodTask`` with a second argument.
mergekit's executor loads, moves and frees these like weights.

Model-wide density adds :class:`ModelWideThresholds`: one task, run before the first
merge, that streams every tensor once through :class:`SaliencyHistogramTask` in a
sub-executor and returns one absolute saliency threshold per expert.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, Hashable, Optional, Tuple, Union

import torch
from mergekit.common import ImmutableMap, ModelReference
from mergekit.graph import Executor, Task
from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup, TensorMetadata
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.tokenizer.build import BuildTokenizer, TokenizerInfo
from mergekit.tokenizer.config import TokenEmbeddingConfig
from pydantic import Field

from mergekit_ota.curvature.store import CurvatureStore
from mergekit_ota.math.histogram import SaliencyHistogram
from mergekit_ota.math.rank1 import Curvature, Rank1Curvature


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
                if token not in forced
                and 0 <= (old_id := permutation.get(new_id, -1)) < rows.shape[0]
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


class SaliencyHistogramTask(Task[Dict[ModelReference, Tuple[SaliencyHistogram, float]]]):
    """Per expert, the histogram of FFG saliency in one output tensor (model-wide density)."""

    merge_task: "CurvatureMergeTask"

    def arguments(self) -> Dict[str, Task]:
        return {"tensors": self.merge_task.gather_tensors, "curvature": self.merge_task.curvature}

    def group_label(self) -> Optional[str]:
        return self.merge_task.group_label()

    def uses_accelerator(self) -> bool:
        return True

    def execute(
        self, tensors: Dict[ModelReference, torch.Tensor], curvature: Dict[ModelReference, Curvature]
    ) -> Dict[ModelReference, Tuple[SaliencyHistogram, float]]:
        return self.merge_task.saliency_histograms(tensors, curvature)


class ModelWideThresholds(Task[Dict[ModelReference, float]]):
    """One saliency threshold per expert that keeps its ``density`` over all its tensors.

    Runs its own executor over :class:`SaliencyHistogramTask` s (one extra read of
    the inputs, one tensor at a time), so it has no graph arguments and the main
    graph never holds more than one tensor's inputs for it.
    """

    parts: Tuple[SaliencyHistogramTask, ...]
    device: Optional[str] = None
    quiet: bool = False
    key: str = Field(default_factory=lambda: uuid.uuid4().hex)

    def __hash__(self) -> int:  # the parts are many: identify the task by its key
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelWideThresholds) and other.key == self.key

    def arguments(self) -> Dict[str, Task]:
        return {}

    def priority(self) -> int:
        return 100

    def execute(self) -> Dict[ModelReference, float]:
        from mergekit_ota.methods.base import merge_histograms, thresholds_for_density

        totals: Dict[Hashable, Tuple[SaliencyHistogram, float]] = {}
        executor = Executor(
            targets=list(self.parts),
            math_device=torch.device(self.device or "cpu"),
            storage_device=torch.device("cpu"),
        )
        for task, part in executor.run(quiet=self.quiet, desc="Model-wide FFG density (saliency pass)"):
            merge_histograms(totals, part, task.merge_task.output_weight.name)
        return thresholds_for_density(totals)


class CurvatureMergeTask(ExecuteMergeMethodTask):
    """``ExecuteMergeMethodTask`` whose experts get their curvature from a graph argument.

    ``save_dtype`` is the dtype mergekit's ``SaveTensor`` will write the result in
    (``weight.force_dtype or config.out_dtype``; ``None``: as computed): the result is
    cast to it here and checked finite (:func:`~mergekit_ota.methods.base.require_finite`)
    before it is handed on, so a float32 result that overflows float16 is never written.
    """

    curvature: CurvatureInput
    thresholds: Optional[ModelWideThresholds] = None
    truncate_vocabulary: bool = False
    save_dtype: Optional[str] = None

    def arguments(self) -> Dict[str, Task]:
        arguments = super().arguments()
        arguments["curvature"] = self.curvature
        if self.thresholds is not None:
            arguments["thresholds"] = self.thresholds
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
            if v is not None:
                weight = tensors.get(model)
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
        thresholds: Optional[Dict[ModelReference, float]] = None,
        **_kwargs: Any,
    ) -> Optional[torch.Tensor]:
        from mergekit.common import dtype_from_name

        from mergekit_ota.methods.base import finite_check_deferred, require_finite

        parameters = self._with_curvature(tensors, curvature, thresholds)
        bound = self.model_copy(
            update={
                "input_parameters": ImmutableMap(
                    data={model: ImmutableMap(data=values) for model, values in parameters.items()}
                )
            }
        )
        with finite_check_deferred():  # checked once below, in the dtype it is saved in
            result = ExecuteMergeMethodTask.execute(bound, tensors=tensors)
        if result is None or not result.is_floating_point():
            return result
        uncast = result
        if self.save_dtype:
            result = result.to(dtype=dtype_from_name(self.save_dtype))  # SaveTensor's own cast then does nothing
        require_finite(result, name=self.output_weight.name, method=self.method_name, uncast=uncast)
        return result

    def saliency_histograms(
        self, tensors: Dict[ModelReference, torch.Tensor], curvature: Dict[ModelReference, Curvature]
    ) -> Dict[ModelReference, Tuple[SaliencyHistogram, float]]:
        """This tensor's contribution to the model-wide density thresholds."""
        from mergekit import merge_methods

        method = merge_methods.get(self.method_name)
        parameters = self._with_curvature(tensors, curvature)
        entries = tuple(
            TensorEntry(id=model, tensor=tensors[model], is_base=model == self.base_model)
            for model in self.model_order
            if tensors.get(model) is not None
        )
        group = TensorGroup(entries=entries, metadata=TensorMetadata.from_weight_info(self.output_weight))
        if not group.entries or not group.tensors[0].is_floating_point():
            return {}
        bound: Dict[str, Any] = dict(self.parameters.items())
        for spec in method.spec.input_parameters:
            bound[spec.name] = PerInputValues(
                [(entry.id, parameters[entry.id][spec.name]) for entry in group.non_base]
            )
        return method.saliency_histograms(group, bound)


SaliencyHistogramTask.model_rebuild()
