"""The mergekit versions this plugin supports, and a check of the internals it patches."""

from __future__ import annotations

import inspect
from functools import lru_cache
from importlib import metadata
from typing import Optional

SUPPORTED = "0.1.5"  # the mergekit release line whose internals the graph integration uses
EXPECTED_PLAN_TENSOR_ARGS = ["self", "weight", "weights_in", "models", "cfg_reader"]
EXPECTED_TASK_FIELDS = {
    "method_name", "gather_tensors", "model_order", "base_model", "output_weight",
    "parameters", "input_parameters", "dtype", "out_dtype",
}  # fmt: skip


def mergekit_version() -> Optional[str]:
    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def incompatibility() -> Optional[str]:
    """A sentence saying why this mergekit cannot be used, or ``None`` if it can."""
    version = mergekit_version()
    if version is None:
        return "mergekit is not installed"
    if version != SUPPORTED and not version.startswith(SUPPORTED + "."):
        return f"mergekit-ota supports mergekit {SUPPORTED}; found mergekit {version}"
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    args = list(inspect.signature(MergePlanner.plan_tensor).parameters)
    if args != EXPECTED_PLAN_TENSOR_ARGS:
        return f"mergekit {version}: MergePlanner.plan_tensor{tuple(args)} differs from mergekit {SUPPORTED}'s"
    missing = EXPECTED_TASK_FIELDS - set(ExecuteMergeMethodTask.model_fields)
    if missing:
        return f"mergekit {version}: ExecuteMergeMethodTask lacks fields {sorted(missing)} of mergekit {SUPPORTED}"
    return None


def require_supported_mergekit() -> None:
    """Raise ``RuntimeError`` naming the supported version if mergekit's internals differ."""
    problem = incompatibility()
    if problem:
        raise RuntimeError(f"{problem}. Install it with: pip install 'mergekit=={SUPPORTED}'")
