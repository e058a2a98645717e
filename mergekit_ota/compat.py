"""The mergekit versions this plugin supports, and the one home of every private mergekit internal it touches.

Everything of mergekit's that is not its documented API, and that the plugin reads,
calls or patches, is reached through this module and checked by
:func:`incompatibility` before any patch is applied, so a mergekit release that
changes one of them fails with one clear message naming it, not an
``AttributeError`` in the middle of a merge:

================================================  ======================================
``MergePlanner.plan_tensor(self, weight, ...)``   wrapped: attach curvature (its signature)
``MergePlanner._plan``                            wrapped: raise every problem at the end
``MergePlanner.plan_to_disk(self, out_path)``     wrapped: record when the weights are done,
                                                  and which curvature each expert used
``MergePlanner._tensors`` / ``._method``          read: the planned tasks, the method
``MergePlanner.options.transformers_cache``       read: the hub cache the curvature lookup uses
``ExecuteMergeMethodTask`` fields                 copied into :class:`CurvatureMergeTask`
``mergekit.io.tasks.FinalizeModel`` fields        subclassed (:mod:`.graph.finalize`)
``mergekit.merge._model_out_config``              called by ``check`` to plan as run_merge
``mergekit.merge.run_merge(config, out, ...)``    wrapped: the output policy; the card it
                                                  writes (``out/README.md``) gets the
                                                  curvature section (:mod:`.graph.provenance`)
``merge_raw_pytorch.plan_flat_merge``             wrapped: refuse ota/ffg
``mergekit.scripts.run_yaml.main.callback``       wrapped: our errors end ``mergekit-yaml``
                                                  as a message, not a traceback (a
                                                  ``main`` that is no click command is
                                                  left alone)
================================================  ======================================
"""

from __future__ import annotations

import inspect
from importlib import metadata
from typing import Any, List, Optional, Tuple

SUPPORTED = "0.1.5"  # the mergekit release line whose internals the graph integration uses
EXPECTED_PLAN_TENSOR_ARGS = ["self", "weight", "weights_in", "models", "cfg_reader"]
EXPECTED_PLAN_TO_DISK_ARGS = ["self", "out_path"]
EXPECTED_RUN_MERGE_ARGS = ["merge_config", "out_path", "options", "config_source"]
EXPECTED_OUT_CONFIG_ARGS = ["config", "arch_info", "trust_remote_code"]
EXPECTED_PLANNER_ATTRIBUTES = ("_tensors", "_method", "options")  # set in MergePlanner.__init__
EXPECTED_TASK_FIELDS = {
    "method_name",
    "gather_tensors",
    "model_order",
    "base_model",
    "output_weight",
    "parameters",
    "input_parameters",
    "dtype",
    "out_dtype",
}
EXPECTED_FINALIZE_FIELDS = {"tensor_save_tasks", "writer_task"}


def mergekit_version() -> Optional[str]:
    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


def _signature(function: Any) -> List[str]:
    return list(inspect.signature(function).parameters)


def _loading(name: str) -> bool:
    import mergekit_ota_autoload

    return mergekit_ota_autoload.initializing(name)


def _internal_problems(version: str) -> Tuple[List[str], bool]:
    """The internals that differ, and whether every one was checked (a module still loading is checked later)."""
    import importlib

    from mergekit.io.tasks import FinalizeModel
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    problems: List[str] = []
    # Their imports trigger ours (they import mergekit.plan): check a module still loading once it has loaded.
    loading = [name for name in ("mergekit.merge", "mergekit.scripts.merge_raw_pytorch") if _loading(name)]
    complete = not loading
    merge = importlib.import_module("mergekit.merge") if "mergekit.merge" not in loading else None
    if not loading:  # it must still import (mergekit-pytorch runs through it)
        importlib.import_module("mergekit.scripts.merge_raw_pytorch")
    checks: Tuple[Tuple[str, Any, List[str]], ...] = (
        ("MergePlanner.plan_tensor", getattr(MergePlanner, "plan_tensor", None), EXPECTED_PLAN_TENSOR_ARGS),
        ("MergePlanner.plan_to_disk", getattr(MergePlanner, "plan_to_disk", None), EXPECTED_PLAN_TO_DISK_ARGS),
        ("MergePlanner._plan", getattr(MergePlanner, "_plan", None), ["self"]),
    )
    if merge is not None:
        checks += (
            ("mergekit.merge.run_merge", getattr(merge, "run_merge", None), EXPECTED_RUN_MERGE_ARGS),
            ("mergekit.merge._model_out_config", getattr(merge, "_model_out_config", None), EXPECTED_OUT_CONFIG_ARGS),
        )
    for name, function, expected in checks:
        if function is None:
            problems.append(f"{name} is missing")
            continue
        original = inspect.unwrap(function)
        args = _signature(original)
        if args != expected:
            problems.append(f"{name}{tuple(args)} differs from mergekit {SUPPORTED}'s {tuple(expected)}")
    assigned = set(inspect.unwrap(MergePlanner.__init__).__code__.co_names)
    for attribute in EXPECTED_PLANNER_ATTRIBUTES:
        if attribute not in assigned:
            problems.append(f"MergePlanner no longer sets {attribute}")
    missing = EXPECTED_TASK_FIELDS - set(ExecuteMergeMethodTask.model_fields)
    if missing:
        problems.append(f"ExecuteMergeMethodTask lacks fields {sorted(missing)}")
    missing = EXPECTED_FINALIZE_FIELDS - set(FinalizeModel.model_fields)
    if missing:
        problems.append(f"FinalizeModel lacks fields {sorted(missing)}")
    return problems, complete


_checked: List[Optional[str]] = []  # the verdict, once every internal could be checked


def reset_check() -> None:
    """Forget the verdict of :func:`incompatibility` (tests that fake a mergekit version)."""
    _checked.clear()


def version_problem() -> Optional[str]:
    """The installed mergekit's version problem (not installed, or not :data:`SUPPORTED`), or ``None``.

    Reads package metadata only (no import of mergekit); :func:`incompatibility` also checks the internals.
    """
    version = mergekit_version()
    if version is None:
        return "mergekit is not installed"
    if version != SUPPORTED and not version.startswith(SUPPORTED + "."):
        return f"mergekit-ota supports mergekit {SUPPORTED}; found mergekit {version}"
    return None


def incompatibility() -> Optional[str]:
    """A sentence saying why this mergekit cannot be used, or ``None`` if it can."""
    if _checked:
        return _checked[0]
    version = mergekit_version()
    verdict: Optional[str] = version_problem()
    if verdict is not None:
        complete = True
    else:
        problems, complete = _internal_problems(version)
        verdict = (
            f"mergekit {version}: internals mergekit-ota relies on changed: " + "; ".join(problems)
            if problems
            else None
        )
    if complete:
        _checked.append(verdict)
    return verdict


def require_supported_mergekit() -> None:
    """Raise ``RuntimeError`` naming the supported version if mergekit's internals differ."""
    problem = incompatibility()
    if problem:
        raise RuntimeError(f"{problem}. Install it with: pip install 'mergekit=={SUPPORTED}'")


# -- the internals themselves (each checked above) -------------------------------------


def planner_tensors(planner: Any) -> List[Tuple[Any, Any]]:
    """``planner._tensors``: the planned ``(output WeightInfo, task)`` pairs (a list the planner appends to)."""
    return planner._tensors


def planner_method(planner: Any) -> Any:
    """``planner._method``: the merge method object the planner resolved."""
    return planner._method


def planner_cache_dir(planner: Any) -> Optional[str]:
    """``planner.options.transformers_cache``: mergekit's ``--transformers-cache`` (``None``: huggingface_hub's
    default)."""
    return getattr(planner.options, "transformers_cache", None)


def model_out_config(config: Any, arch_info: Any, trust_remote_code: bool) -> Any:
    """``mergekit.merge._model_out_config``: the output model's config, as ``run_merge`` builds it."""
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


def mergekit_yaml_command(run_yaml: Any) -> Optional[Any]:
    """``mergekit.scripts.run_yaml.main``, the ``click.Command`` behind ``mergekit-yaml`` (its ``callback`` runs the
    merge), or ``None`` where it is not one."""
    import click

    command = getattr(run_yaml, "main", None)
    return command if isinstance(command, click.Command) and callable(command.callback) else None
