"""The end of a merge's weights: mergekit's ``FinalizeModel``, recording that every tensor was written.

``MergePlanner.plan_to_disk`` ends its task list with ``FinalizeModel`` (it writes the
weight index once every ``SaveTensor`` has run). For ``ota``/``ffg`` the planner patch
swaps in :class:`RecordedFinalize`, which then marks the output's build directory
complete (:func:`mergekit_ota.io.output.mark_complete`): a failure in a later step of
``run_merge`` (model card, tokenizer, tag-along files) keeps the finished weights.
"""

from __future__ import annotations

from typing import Any, List

from mergekit.graph import Task
from mergekit.io.tasks import FinalizeModel

from mergekit_ota.io.output import mark_complete


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
