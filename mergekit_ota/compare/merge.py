"""One grid point merged as ``mergekit-yaml`` merges it, then scored, then deleted.

The point's config is written as YAML, read back through ``MergeConfiguration.model_validate`` and merged by
``mergekit.merge.run_merge`` (the function ``mergekit-yaml`` calls, looked up when called, so mergekit-ota's
patches of it apply) with the run's ``MergeOptions``, into ``OUT/merges/.partial`` (or, kept,
``OUT/merges/<method>_<key>``): one merged model on disk at a time.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, Tuple

from mergekit_ota.compare.configs import Point
from mergekit_ota.compare.score import RowScores

MERGES_DIR, PARTIAL = "merges", ".partial"


def merge_dir(root: str, point: Point, keep: bool) -> str:
    """Where a point is merged: ``OUT/merges/<method>_<key>`` when kept, else ``OUT/merges/.partial``."""
    name = "".join(c if c.isalnum() else "_" for c in point.method) + "_" + point.key[:12] if keep else PARTIAL
    return os.path.join(root, MERGES_DIR, name)


def merge_and_score(
    point: Point, root: str, merge_options: Any, keep: bool, score: Callable[[str], Tuple[RowScores, float]]
) -> Dict[str, Any]:
    """Merge ``point`` as ``mergekit-yaml`` would (its config through ``MergeConfiguration.model_validate``, then
    ``mergekit.merge.run_merge`` with ``merge_options``), score it, delete the merge unless ``keep``."""
    import yaml
    from mergekit import merge as mergekit_merge
    from mergekit.config import MergeConfiguration

    target = merge_dir(root, point, keep)
    shutil.rmtree(target, ignore_errors=True)  # a merge an interrupted run left
    source = yaml.safe_dump(point.config, sort_keys=False)
    started = time.perf_counter()
    notes = io.StringIO()
    try:
        with contextlib.redirect_stderr(notes):  # the merge's notes (curvature provenance), shown once by the caller
            mergekit_merge.run_merge(
                MergeConfiguration.model_validate(yaml.safe_load(source)), target, merge_options, source
            )
    except BaseException:
        sys.stderr.write(notes.getvalue())
        raise
    merge_seconds = time.perf_counter() - started
    try:
        scores, score_seconds = score(target)
    finally:
        if not keep:
            shutil.rmtree(target, ignore_errors=True)
    return {
        "name": point.name,
        "kind": "point",
        "method": point.method,
        "setting": point.label,
        "knobs": point.knobs,
        "config": point.config,
        "merge_seconds": merge_seconds,
        "score_seconds": score_seconds,
        "merged_to": os.path.relpath(target, root) if keep else None,
        "notes": [line for line in notes.getvalue().splitlines() if line.strip()],
        "scores": scores.to_json(),
    }
