"""How mergekit-ota hooks into mergekit: what is patched when each mergekit module loads.

=====================================  =============================================
``mergekit.merge_methods``             register ``ota`` and ``ffg``
``mergekit.plan``                      attach curvature tasks (:mod:`.graph.planner`)
``mergekit.merge``                     ``run_merge``: claim the output directory and
                                       apply the overwrite policy
                                       (:mod:`mergekit_ota.io.output`); keep a merge
                                       whose weights were all written; add which
                                       curvature each expert used
                                       (:mod:`mergekit_ota.graph.provenance`)
``mergekit.scripts.merge_raw_pytorch`` refuse ``ota``/``ffg`` (no planner, no curvature)
``mergekit.scripts.run_yaml``          ``mergekit-yaml``: one of our errors
                                       (:class:`~mergekit_ota.errors.OTAError`) ends
                                       the run as its message and exit status 1, not
                                       a traceback (``MERGEKIT_OTA_TRACEBACK=1``
                                       keeps the traceback); any other exception is
                                       left to mergekit
``mergekit_ota.methods``               (ours) register ``ota`` and ``ffg`` if
                                       ``mergekit.merge_methods`` has loaded
=====================================  =============================================

Every patch acts only when the configured method is ours (``mergekit-yaml``'s: only on our
errors, which only our methods and refusals raise), is idempotent, and is
applied by :func:`on_module` either from the start-up hook (``mergekit_ota_autoload``)
right after the module finished executing, or by :func:`install` for modules already loaded.

Registration needs two modules that have both finished executing: mergekit's
``mergekit.merge_methods`` (the registry) and our ``mergekit_ota.methods`` (the method
objects, whose classes import mergekit's). Whichever finishes second registers
(:func:`_register_when_loaded`), so importing either first works, and nothing reads
the import system's private state: :data:`_LOADED` is what this module has seen finish.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import os
import sys
import warnings
from types import ModuleType
from typing import Callable, Dict, Optional, Set, Tuple

from mergekit_ota.compat import PATCH_MARK, mark_patched, replace_run_merge_step, run_merge_step
from mergekit_ota.errors import ConfigError, OTAError, OutputError, PreflightError
from mergekit_ota.io.output import OutputDirectory, ReplacePolicy
from mergekit_ota_autoload import env_flag

OVERWRITE_ENV = "MERGEKIT_OTA_ALLOW_OVERWRITE"
TRACEBACK_ENV = "MERGEKIT_OTA_TRACEBACK"  # set: mergekit-yaml shows our errors with their traceback
METHODS_MODULE = "mergekit_ota.methods"
REGISTRY_MODULE = "mergekit.merge_methods"
_LOADED: Set[str] = set()  # the watched modules on_module has seen finish executing (or install() found loaded)


def _method_names() -> frozenset:
    from mergekit_ota.methods import METHOD_NAMES

    return METHOD_NAMES


def _is_earlier_merge(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MERGE_MARKER))


MERGE_MARKER = "mergekit_config.yml"  # what mergekit writes into every merge it makes
MERGE_OUTPUT = ReplacePolicy(
    what=f"an earlier mergekit merge (a directory holding {MERGE_MARKER})",
    recognises=_is_earlier_merge,
    flag=None,  # re-running into an earlier merge replaces it, as mergekit's own re-run loop does
    in_place_hint=f"set {OVERWRITE_ENV}=1 to write into it as mergekit does",
)


def merge_output(out_path: str) -> OutputDirectory:
    """The output directory of an ota/ffg merge into ``out_path``: :data:`MERGE_OUTPUT`'s policy, written in
    place when ``MERGEKIT_OTA_ALLOW_OVERWRITE=1`` (``check OUT`` asks the same object, without claiming it)."""
    return OutputDirectory(out_path, MERGE_OUTPUT, in_place=env_flag(OVERWRITE_ENV))


PROVENANCE_STEP = "writing the curvature provenance (mergekit_ota_curvature.json, the card's Curvature section)"
LATER_STEP = "a step after the weights were written"
# The step of an ota/ffg run_merge after the weights that is running now (None: no ota/ffg merge is running): each
# step says so when it starts (the wrappers of :func:`_announcing_step` around mergekit's step functions, and
# _guard_run_merge around ours).
_STEP: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mergekit_ota_late_step", default=None)
RUN_MERGE_STEPS: Dict[str, str] = {  # compat.RUN_MERGE_STEPS' roles -> what the error says failed
    "card": "writing the model card (README.md)",
    "tokenizer": "saving the tokenizer",
    "tagalong": LATER_STEP,
}


def _announcing_step(role: str) -> Callable[[Callable], Callable]:
    """A wrapper for ``run_merge``'s step function ``role``: within an ota/ffg merge it says, when it starts, which
    step is running (the step lasts until the next one starts: mergekit writes README.md after ``generate_card``
    returns, and saves the tokenizer after ``_set_chat_template``). Otherwise it only calls the step."""

    def wrap(step: Callable) -> Callable:
        @functools.wraps(step)
        def announcing(*args, **kwargs):
            if _STEP.get() is not None:
                _STEP.set(RUN_MERGE_STEPS[role])
            return step(*args, **kwargs)

        return mark_patched(announcing, step)

    return wrap


def _late_step(merge_config: object) -> Tuple[str, str]:
    """Which step of ``run_merge`` after the weights was running when it failed (as the step said), with a way
    out."""
    step = _STEP.get() or LATER_STEP
    if step == RUN_MERGE_STEPS["card"]:
        from mergekit_ota.graph.preflight import HUB_HINT, asked_of_the_hub

        paths = [str(r.model.path) for r in merge_config.referenced_models()]  # type: ignore[attr-defined]
        asked = [p for p in paths if asked_of_the_hub(p)]
        hint = f". Model path(s) {', '.join(asked)}: " + HUB_HINT.format(path=asked[0]) if asked else ""
        return step, hint
    return step, ""


def _mark_as_merge(build: str, merge_config: object, args: tuple, kwargs: dict) -> None:
    """Write ``mergekit_config.yml`` where a late failure prevented it, so a re-run recognises the merge."""
    marker = os.path.join(build, MERGE_MARKER)
    if os.path.exists(marker):
        return
    source = kwargs.get("config_source", args[1] if len(args) > 1 else None)
    try:
        with open(marker, "w", encoding="utf-8") as fp:
            fp.write(source if isinstance(source, str) else merge_config.to_yaml())  # type: ignore[attr-defined]
    except OSError:
        pass  # the weights are what matters; the error raised next says what failed


def _require_devices(options: object) -> None:
    """Refuse, before anything is claimed or loaded, options naming a device that is not here (``--cuda``
    without CUDA: :func:`~mergekit_ota.devices.merge_option_problems`, which ``check`` reports too)."""
    from mergekit_ota.devices import merge_option_problems

    problems = merge_option_problems(options) if options is not None else []
    if problems:
        raise PreflightError(problems)


def _guard_run_merge(run_merge: Callable) -> Callable:
    """``run_merge`` for ota/ffg: claim the output (:class:`~mergekit_ota.io.output.OutputDirectory`), merge into
    its build directory, add the curvature provenance (:func:`~mergekit_ota.graph.provenance.write_provenance`:
    the JSON file and the card's section) before the build is swapped in, and keep a merge whose every tensor
    was written even when a later step fails."""

    @functools.wraps(run_merge)
    def guarded(merge_config, out_path, *args, **kwargs):
        if merge_config.merge_method not in _method_names():
            return run_merge(merge_config, out_path, *args, **kwargs)
        from mergekit_ota.compat import require_supported_mergekit

        require_supported_mergekit()  # before the output is claimed or mergekit runs any of its steps
        _require_devices(kwargs.get("options", args[0] if args else None))
        from mergekit_ota.graph.provenance import Recording, card_state, summary_lines, write_provenance

        with merge_output(out_path) as out:
            card_before = card_state(out.build)  # a card already there (in place) is not this run's
            record = None
            steps = _STEP.set(LATER_STEP)  # this merge's steps after the weights say when they start
            try:
                recording = Recording(out.build)  # this merge's record, handed over by the planner (plan_to_disk)
                try:
                    with recording:
                        result = run_merge(merge_config, out.build, *args, **kwargs)
                finally:
                    record = recording.record()
                _STEP.set(LATER_STEP)
                for line in summary_lines(record):  # once per merge, shown without -v
                    print(line, file=sys.stderr)
                _STEP.set(PROVENANCE_STEP)
                write_provenance(out.build, record, card_before)  # before the output is swapped in
            except BaseException as error:
                if not out.complete:
                    raise  # the OutputDirectory removes what this run created
                _mark_as_merge(out.build, merge_config, args, kwargs)
                step, hint = _late_step(merge_config)
                if step != PROVENANCE_STEP:
                    try:
                        write_provenance(out.build, record, card_before)
                    except Exception:  # noqa: BLE001 - the error raised next says which step failed
                        pass
                out.commit()
                raise OutputError(
                    f"{out.path}: the merge is complete and kept (every tensor and the weight index were written), "
                    f"but {step} failed: {type(error).__name__}: {error}{hint}"
                ) from error
            finally:
                _STEP.reset(steps)
            out.commit()
            return result

    setattr(guarded, PATCH_MARK, True)
    return guarded


def _refuse_raw_pytorch(plan_flat_merge: Callable) -> Callable:
    @functools.wraps(plan_flat_merge)
    def refusing(config, *args, **kwargs):
        if config.merge_method in _method_names():
            raise ConfigError(
                f"merge_method {config.merge_method!r} is not available in mergekit-pytorch: it "
                f"bypasses mergekit's planner, which loads each expert's curvature. Use "
                f"mergekit-yaml with a models:/slices: config, or merge_tensors/merge_state_dicts "
                f"with curvature tensors"
            )
        return plan_flat_merge(config, *args, **kwargs)

    setattr(refusing, PATCH_MARK, True)
    return refusing


def _errors_as_messages(callback: Callable) -> Callable:
    """A click command's callback that ends on one of our errors as its message (click prints ``Error: ...``
    on stderr and exits 1) instead of a traceback; with ``MERGEKIT_OTA_TRACEBACK=1`` the error propagates as
    raised. Any other exception propagates unchanged."""
    import click

    @functools.wraps(callback)
    def reporting(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except OTAError as error:
            if env_flag(TRACEBACK_ENV):
                raise
            raise click.ClickException(str(error)) from error

    setattr(reporting, PATCH_MARK, True)
    return reporting


def _patch_attribute(owner: object, name: str, wrap: Callable[[Callable], Callable]) -> None:
    current = getattr(owner, name)
    if not getattr(current, PATCH_MARK, False):
        setattr(owner, name, wrap(current))


def _register_when_loaded(module: ModuleType) -> None:
    """Register ``ota``/``ffg`` once both :data:`REGISTRY_MODULE` and :data:`METHODS_MODULE` have finished executing.

    Called as each of them finishes. Our methods package imports mergekit's, so when mergekit's finishes first our
    package may be executing (the user imported ours first): it is in ``sys.modules`` but not yet in
    :data:`_LOADED`, and registers when it finishes. When it is not imported at all, it is imported here; its own
    finish (through the finder) or this call then registers.
    """
    if REGISTRY_MODULE not in _LOADED:
        return
    if METHODS_MODULE in sys.modules and METHODS_MODULE not in _LOADED:
        return  # still executing: registers when it finishes
    methods = importlib.import_module(METHODS_MODULE)
    methods.register_methods()


def _on_plan(module: ModuleType) -> None:
    from mergekit_ota.compat import planner_incompatibility

    problem = planner_incompatibility()  # mergekit.merge may still be executing: the rest is checked at merge time
    if problem:
        warnings.warn(f"mergekit-ota: {problem}; ota and ffg will refuse to run", stacklevel=2)
        return
    from mergekit_ota.graph.planner import patch_planner

    patch_planner(module.MergePlanner)


def _on_merge(module: ModuleType) -> None:
    _patch_attribute(module, "run_merge", _guard_run_merge)
    for role in RUN_MERGE_STEPS:
        step = run_merge_step(module, role)
        if step is not None and not getattr(step, PATCH_MARK, False):
            replace_run_merge_step(module, role, _announcing_step(role)(step))


def _on_raw_pytorch(module: ModuleType) -> None:
    _patch_attribute(module, "plan_flat_merge", _refuse_raw_pytorch)


def _on_run_yaml(module: ModuleType) -> None:
    from mergekit_ota.compat import mergekit_yaml_command

    command = mergekit_yaml_command(module)
    if command is not None:  # a mergekit whose mergekit-yaml is no click command keeps its own error output
        _patch_attribute(command, "callback", _errors_as_messages)


HANDLERS: Dict[str, Callable[[ModuleType], None]] = {
    REGISTRY_MODULE: _register_when_loaded,
    METHODS_MODULE: _register_when_loaded,
    "mergekit.plan": _on_plan,
    "mergekit.merge": _on_merge,
    "mergekit.scripts.merge_raw_pytorch": _on_raw_pytorch,
    "mergekit.scripts.run_yaml": _on_run_yaml,
}


def on_module(name: str, module: ModuleType) -> None:
    """Apply the patch for watched module ``name``, which has just finished executing."""
    handler = HANDLERS.get(name)
    if handler is not None:
        _LOADED.add(name)
        handler(module)


def install() -> None:
    """Register the methods and patch mergekit (idempotent): now for modules already loaded, on import for the rest.

    mergekit itself is not imported here (it takes seconds): the start-up hook's finder, installed here if
    the hook is off, applies each patch the moment its module finishes loading. Called outside any import of
    this package (``mergekit_ota.install()``), so every watched module in ``sys.modules`` has finished executing.
    """
    import mergekit_ota_autoload

    mergekit_ota_autoload.install_finder()
    loaded = {name: sys.modules[name] for name in HANDLERS if name in sys.modules}
    _LOADED.update(loaded)
    for name, module in loaded.items():
        on_module(name, module)
