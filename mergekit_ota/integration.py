"""How mergekit-ota hooks into mergekit: what is patched when each mergekit module loads.

=====================================  =============================================
``mergekit.merge_methods``             register ``ota`` and ``ffg``
``mergekit.plan``                      attach curvature tasks (:mod:`.graph.planner`)
``mergekit.merge``                     ``run_merge``: refuse to write into a non-empty
                                       output directory; remove a directory this run
                                       created if the merge fails
``mergekit.scripts.merge_raw_pytorch`` refuse ``ota``/``ffg`` (no planner, no curvature)
=====================================  =============================================

Every patch acts only when the configured method is ours, is idempotent, and is
applied by :func:`on_module` either from the start-up hook (``mergekit_ota_autoload``)
right after the module executes, or by :func:`install` for modules already loaded.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from types import ModuleType
from typing import Callable, Dict

from mergekit_ota.errors import ConfigError

OVERWRITE_ENV = "MERGEKIT_OTA_ALLOW_OVERWRITE"
PATCH_MARK = "_mergekit_ota_patched"


def _method_names() -> frozenset:
    from mergekit_ota.methods import METHOD_NAMES

    return METHOD_NAMES


def check_output_dir(out_path: str) -> None:
    """Refuse an existing non-empty ``out_path`` unless ``MERGEKIT_OTA_ALLOW_OVERWRITE=1``."""
    if os.environ.get(OVERWRITE_ENV, "") in ("1", "true", "yes"):
        return
    if os.path.isfile(out_path):
        raise ConfigError(f"Output path {out_path} is an existing file; choose a new directory")
    if os.path.isdir(out_path) and os.listdir(out_path):
        raise ConfigError(
            f"Output directory {out_path} already exists and is not empty; mergekit-ota will not "
            f"overwrite it. Choose a new directory, empty it, or set {OVERWRITE_ENV}=1"
        )


def _guard_run_merge(run_merge: Callable) -> Callable:
    @functools.wraps(run_merge)
    def guarded(merge_config, out_path, *args, **kwargs):
        if merge_config.merge_method not in _method_names():
            return run_merge(merge_config, out_path, *args, **kwargs)
        check_output_dir(out_path)
        created = not os.path.exists(out_path)
        try:
            return run_merge(merge_config, out_path, *args, **kwargs)
        except BaseException:
            if created and os.path.isdir(out_path):
                shutil.rmtree(out_path, ignore_errors=True)
            raise

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


def _patch_attribute(module: ModuleType, name: str, wrap: Callable[[Callable], Callable]) -> None:
    current = getattr(module, name)
    if not getattr(current, PATCH_MARK, False):
        setattr(module, name, wrap(current))


def _initializing(name: str) -> bool:
    """True while module ``name`` is being executed (imported but not finished)."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _on_merge_methods(module: ModuleType) -> None:
    if _initializing("mergekit_ota.methods"):
        return  # mergekit was imported by our own methods package, which registers when it finishes
    from mergekit_ota.methods import register_methods

    register_methods()


def _on_plan(module: ModuleType) -> None:
    from mergekit_ota.compat import incompatibility

    problem = incompatibility()
    if problem:
        warnings.warn(f"mergekit-ota: {problem}; ota and ffg will refuse to run", stacklevel=2)
        return
    from mergekit_ota.graph.planner import patch_planner

    patch_planner(module.MergePlanner)


def _on_merge(module: ModuleType) -> None:
    _patch_attribute(module, "run_merge", _guard_run_merge)


def _on_raw_pytorch(module: ModuleType) -> None:
    _patch_attribute(module, "plan_flat_merge", _refuse_raw_pytorch)


HANDLERS: Dict[str, Callable[[ModuleType], None]] = {
    "mergekit.merge_methods": _on_merge_methods,
    "mergekit.plan": _on_plan,
    "mergekit.merge": _on_merge,
    "mergekit.scripts.merge_raw_pytorch": _on_raw_pytorch,
}


def on_module(name: str, module: ModuleType) -> None:
    """Apply the patch for mergekit module ``name`` (just executed)."""
    handler = HANDLERS.get(name)
    if handler is not None:
        handler(module)


def install() -> None:
    """Register the methods and patch mergekit: now for modules already loaded, on import for the rest.

    mergekit itself is not imported here (it takes seconds): the finder applies each patch the
    moment its module loads, so ``import mergekit_ota`` stays cheap and the effect is the same.
    """
    import mergekit_ota_autoload

    mergekit_ota_autoload.install_finder()
    for name in HANDLERS:
        module = sys.modules.get(name)
        if module is not None and not _initializing(name):
            on_module(name, module)
