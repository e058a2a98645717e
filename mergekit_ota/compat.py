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
``MergePlanner.config`` / ``.options``            read: the merge's config and options
``MergePlanner.options.transformers_cache``       read: the hub cache the curvature lookup uses
``ExecuteMergeMethodTask`` fields                 copied into :class:`CurvatureMergeTask`
``mergekit.io.tasks.FinalizeModel`` fields        subclassed (:mod:`.graph.tasks`)
``MergeMethod._bind_parameters``                  overridden (:class:`MethodHooks`): refuse
                                                  unknown parameter names first
``GroupMergeMethod._execute``                     overridden (:class:`MethodHooks`): the
                                                  model-wide statistics of in-memory calls,
                                                  the finite check of results
``merge_methods.dtype.align_dtype(group, dtype)`` called: cast a group as ``_execute`` does
``mergekit.graph.Executor(targets, ...).run``     called: the model-wide pass's own executor
``mergekit.merge._model_out_config``              called by ``check`` to plan as run_merge
``mergekit.merge.run_merge(config, out, ...)``    wrapped: the output policy; the card it
                                                  writes (``out/README.md``) gets the
                                                  curvature section (:mod:`.graph.provenance`)
``mergekit.merge`` step functions                 wrapped: each says which step of
(``generate_card``, ``_set_chat_template``,       ``run_merge`` after the weights is
``_copy_tagalong_files``)                         running (:data:`RUN_MERGE_STEPS`)
``merge_raw_pytorch.plan_flat_merge``             wrapped: refuse ota/ffg
``mergekit.scripts.run_yaml.main.callback``       wrapped: our errors end ``mergekit-yaml``
                                                  as a message, not a traceback (a
                                                  ``main`` that is no click command is
                                                  left alone)
================================================  ======================================

The checks come in two parts: :func:`planner_incompatibility` (what the planner patch
needs; it imports nothing that imports ``mergekit.merge``, so the start-up hook can run
it when ``mergekit.plan`` has loaded, even while ``mergekit.merge`` is still executing),
and :func:`incompatibility` (everything; called when a merge runs).
"""

from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

SUPPORTED = "0.1.5"  # the mergekit release line whose internals the graph integration uses
PATCH_MARK = "_mergekit_ota_patched"  # set on every function mergekit-ota wraps (the one definition)
EXPECTED_PLAN_TENSOR_ARGS = ["self", "weight", "weights_in", "models", "cfg_reader"]
EXPECTED_PLAN_TO_DISK_ARGS = ["self", "out_path"]
EXPECTED_RUN_MERGE_ARGS = ["merge_config", "out_path", "options", "config_source"]
EXPECTED_OUT_CONFIG_ARGS = ["config", "arch_info", "trust_remote_code"]
EXPECTED_PLANNER_ATTRIBUTES = ("_tensors", "_method", "options", "config")  # set in MergePlanner.__init__
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
EXPECTED_BIND_ARGS = ["self", "groups", "parameters"]
EXPECTED_EXECUTE_ARGS = ["self", "groups", "parameters", "options", "input_dtypes", "out_dtype"]
EXPECTED_ALIGN_DTYPE_ARGS = ["group", "dtype"]
EXPECTED_EXECUTOR_ARGS = ["self", "targets", "math_device", "storage_device"]  # the leading ones
EXPECTED_EXECUTOR_RUN_ARGS = ["self", "quiet", "desc"]
# The steps of ``run_merge`` after the weights that say when they run (integration's late-step report):
# role -> the function's name in ``mergekit.merge``.
RUN_MERGE_STEPS: Dict[str, str] = {
    "card": "generate_card",
    "tokenizer": "_set_chat_template",
    "tagalong": "_copy_tagalong_files",
}


def mergekit_version() -> Optional[str]:
    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


def _signature(function: Any) -> List[str]:
    return list(inspect.signature(function).parameters)


Check = Tuple[str, Any, List[str]]  # what is checked, the function found (None: missing), its expected arguments


def _signature_problems(checks: Sequence[Check], prefix_only: Sequence[str] = ()) -> List[str]:
    """Each function of ``checks`` that is missing or whose (unwrapped) arguments differ from the expected ones;
    for the names in ``prefix_only`` the expected arguments need only lead."""
    problems = []
    for name, function, expected in checks:
        if function is None:
            problems.append(f"{name} is missing")
            continue
        args = _signature(inspect.unwrap(function))
        if (args[: len(expected)] if name in prefix_only else args) != expected:
            problems.append(f"{name}{tuple(args)} differs from mergekit {SUPPORTED}'s {tuple(expected)}")
    return problems


def _planner_problems() -> List[str]:
    """The internals the planner patch, the graph tasks and the methods use (``mergekit.plan`` and what it imports;
    never ``mergekit.merge``, which imports ``mergekit.plan`` and may still be executing when this runs)."""
    from mergekit.graph import Executor
    from mergekit.io.tasks import FinalizeModel
    from mergekit.merge_methods import base, dtype
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.plan import MergePlanner

    problems = _signature_problems(
        (
            ("MergePlanner.plan_tensor", getattr(MergePlanner, "plan_tensor", None), EXPECTED_PLAN_TENSOR_ARGS),
            ("MergePlanner.plan_to_disk", getattr(MergePlanner, "plan_to_disk", None), EXPECTED_PLAN_TO_DISK_ARGS),
            ("MergePlanner._plan", getattr(MergePlanner, "_plan", None), ["self"]),
            ("MergeMethod._bind_parameters", getattr(base.MergeMethod, "_bind_parameters", None), EXPECTED_BIND_ARGS),
            ("GroupMergeMethod._execute", getattr(base.GroupMergeMethod, "_execute", None), EXPECTED_EXECUTE_ARGS),
            ("merge_methods.dtype.align_dtype", getattr(dtype, "align_dtype", None), EXPECTED_ALIGN_DTYPE_ARGS),
            ("graph.Executor", getattr(Executor, "__init__", None), EXPECTED_EXECUTOR_ARGS),
            ("graph.Executor.run", getattr(Executor, "run", None), EXPECTED_EXECUTOR_RUN_ARGS),
        ),
        prefix_only=("graph.Executor",),
    )
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
    return problems


def _merge_problems() -> List[str]:
    """The internals of ``mergekit.merge`` (and that ``mergekit-pytorch``'s module still imports)."""
    merge = importlib.import_module("mergekit.merge")
    importlib.import_module("mergekit.scripts.merge_raw_pytorch")  # mergekit-pytorch runs through it
    problems = _signature_problems(
        (
            ("mergekit.merge.run_merge", getattr(merge, "run_merge", None), EXPECTED_RUN_MERGE_ARGS),
            ("mergekit.merge._model_out_config", getattr(merge, "_model_out_config", None), EXPECTED_OUT_CONFIG_ARGS),
        )
    )
    for name in RUN_MERGE_STEPS.values():
        if not callable(getattr(merge, name, None)):
            problems.append(f"mergekit.merge.{name} is missing")
    return problems


def _verdict(version: Optional[str], problems: List[str]) -> Optional[str]:
    return f"mergekit {version}: internals mergekit-ota relies on changed: " + "; ".join(problems) if problems else None


_checked: List[Optional[str]] = []  # the verdict of incompatibility(), once computed


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


def planner_incompatibility() -> Optional[str]:
    """Why the planner cannot be patched (the version, or one of :func:`_planner_problems`), or ``None``.

    What the start-up hook checks when ``mergekit.plan`` has loaded; the rest is checked by
    :func:`incompatibility` when a merge runs.
    """
    return version_problem() or _verdict(mergekit_version(), _planner_problems())


def incompatibility() -> Optional[str]:
    """A sentence saying why this mergekit cannot be used, or ``None`` if it can (every internal checked; imports
    ``mergekit.merge``, so call it when a merge runs, not from an import hook)."""
    if not _checked:
        problem = version_problem()
        if problem is None:
            problem = _verdict(mergekit_version(), _planner_problems() + _merge_problems())
        _checked.append(problem)
    return _checked[0]


def require_supported_mergekit() -> None:
    """Raise ``RuntimeError`` naming the supported version if mergekit's internals differ."""
    problem = incompatibility()
    if problem:
        raise RuntimeError(f"{problem}. Install it with: pip install 'mergekit=={SUPPORTED}'")


# -- the internals themselves (each checked above) -------------------------------------


def is_patched(function: Any) -> bool:
    """Whether ``function`` is one of mergekit-ota's wrappers (marked with :data:`PATCH_MARK`)."""
    return bool(getattr(function, PATCH_MARK, False))


def mark_patched(wrapper: Callable, original: Callable) -> Callable:
    """Mark ``wrapper`` of ``original`` as mergekit-ota's (``__wrapped__``, the docstring, :data:`PATCH_MARK`)."""
    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__doc__ = original.__doc__
    setattr(wrapper, PATCH_MARK, True)
    return wrapper


def planner_tensors(planner: Any) -> List[Tuple[Any, Any]]:
    """``planner._tensors``: the planned ``(output WeightInfo, task)`` pairs (a list the planner appends to)."""
    return planner._tensors


def planner_method(planner: Any) -> Any:
    """``planner._method``: the merge method object the planner resolved."""
    return planner._method


def planner_config(planner: Any) -> Any:
    """``planner.config``: the ``MergeConfiguration`` being planned."""
    return planner.config


def planner_options(planner: Any) -> Any:
    """``planner.options``: the ``MergeOptions`` of the merge."""
    return planner.options


def planner_cache_dir(planner: Any) -> Optional[str]:
    """``planner.options.transformers_cache``: mergekit's ``--transformers-cache`` (``None``: huggingface_hub's
    default)."""
    return getattr(planner.options, "transformers_cache", None)


def planner_plan_step(planner_class: type) -> Callable:
    """``MergePlanner._plan``: the method that plans every tensor (wrapped by the planner patch)."""
    return planner_class._plan  # type: ignore[attr-defined]


def replace_planner_plan_step(planner_class: type, plan: Callable) -> None:
    """Install ``plan`` as ``MergePlanner._plan``."""
    planner_class._plan = plan  # type: ignore[attr-defined]


def merge_task_fields(task: Any) -> Dict[str, Any]:
    """The fields of an ``ExecuteMergeMethodTask`` by name (to build a subclass' task with the same values)."""
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

    return {name: getattr(task, name) for name in ExecuteMergeMethodTask.model_fields}


def align_dtype(group: Any, dtype: Any) -> Any:
    """``mergekit.merge_methods.dtype.align_dtype``: ``group`` cast as ``GroupMergeMethod._execute`` casts it."""
    from mergekit.merge_methods.dtype import align_dtype as align

    return align(group, dtype)


def run_tasks(
    targets: Sequence[Any], *, math_device: Any, storage_device: Any, quiet: bool, desc: str
) -> Iterator[Tuple[Any, Any]]:
    """Run ``targets`` with a mergekit ``Executor`` of their own; yield ``(task, value)`` per target."""
    from mergekit.graph import Executor

    executor = Executor(targets=list(targets), math_device=math_device, storage_device=storage_device)
    yield from executor.run(quiet=quiet, desc=desc)


class MethodHooks:
    """Mixin, put before mergekit's ``GroupMergeMethod``: its private hooks, routed to public methods.

    ``MergeMethod.__call__`` binds parameters with ``_bind_parameters`` and runs ``_execute``;
    a subclass overrides :meth:`check_parameters` (before mergekit binds, e.g. refuse unknown
    names), :meth:`prepare_groups` (the bound parameters every group will use) and
    :meth:`check_results` (after the results were cast to ``out_dtype``).
    """

    def check_parameters(self, parameters: Mapping[str, Any]) -> None:
        """Called before mergekit binds ``parameters`` (the caller's, unbound)."""

    def prepare_groups(
        self, groups: Sequence[Any], parameters: List[Dict[str, Any]], input_dtypes: Sequence[Any]
    ) -> List[Dict[str, Any]]:
        """The bound parameters of each group, as the groups will be merged."""
        return parameters

    def check_results(self, groups: Sequence[Any], results: Tuple[Any, ...]) -> None:
        """Called with each group's result, already cast to ``out_dtype``."""

    def _bind_parameters(self, groups: Sequence[Any], parameters: Mapping[str, Any]) -> List[Dict[str, Any]]:
        self.check_parameters(parameters)
        return super()._bind_parameters(groups, parameters)  # type: ignore[misc]

    def _execute(
        self,
        groups: Sequence[Any],
        parameters: List[Dict[str, Any]],
        options: Any,
        *,
        input_dtypes: Sequence[Any],
        out_dtype: Any = None,
    ) -> Tuple[Any, ...]:
        parameters = self.prepare_groups(groups, parameters, input_dtypes)
        results = super()._execute(  # type: ignore[misc]
            groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype
        )
        self.check_results(groups, results)
        return results


def model_out_config(config: Any, arch_info: Any, trust_remote_code: bool) -> Any:
    """``mergekit.merge._model_out_config``: the output model's config, as ``run_merge`` builds it."""
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)


def run_merge_step(merge: Any, role: str) -> Optional[Callable]:
    """The function of ``mergekit.merge`` that runs step ``role`` of :data:`RUN_MERGE_STEPS` (``None`` if absent)."""
    function = getattr(merge, RUN_MERGE_STEPS[role], None)
    return function if callable(function) else None


def replace_run_merge_step(merge: Any, role: str, function: Callable) -> None:
    """Install ``function`` as step ``role`` of ``mergekit.merge`` (what ``run_merge`` calls)."""
    setattr(merge, RUN_MERGE_STEPS[role], function)


def mergekit_yaml_command(run_yaml: Any) -> Optional[Any]:
    """``mergekit.scripts.run_yaml.main``, the ``click.Command`` behind ``mergekit-yaml`` (its ``callback`` runs the
    merge), or ``None`` where it is not one."""
    import click

    command = getattr(run_yaml, "main", None)
    return command if isinstance(command, click.Command) and callable(command.callback) else None
