"""Start-up hook of mergekit-ota, imported by ``mergekit_ota.pth`` in every interpreter.

It only installs a ``sys.meta_path`` finder (standard library only, no torch, no
mergekit).  When one of the watched modules is imported, the finder lets the normal
loader execute it and, once it has finished executing, calls
``mergekit_ota.integration.on_module``, which registers ``ota``/``ffg`` or patches
mergekit.  So unmodified ``mergekit-yaml`` and ``mergekit.merge.run_merge`` know the
methods.  This finder is the one place that decides when mergekit is patched:
importing ``mergekit_ota`` or any of its modules changes nothing by itself
(``mergekit_ota.install()`` does the same explicitly, for already-loaded modules too).

It never raises (problems become warnings) and is idempotent.  Set
``MERGEKIT_OTA_DISABLE=1`` to switch it off.
"""

import os
import sys

DISABLE_ENV = "MERGEKIT_OTA_DISABLE"
WATCHED = frozenset(
    {
        "mergekit.merge_methods",
        "mergekit.plan",
        "mergekit.merge",
        "mergekit.scripts.merge_raw_pytorch",
        "mergekit.scripts.run_yaml",
        "mergekit_ota.methods",  # ours: registration waits until both it and mergekit.merge_methods have executed
    }
)


def env_flag(name):
    """Whether environment variable ``name`` is switched on (``1``, ``true``, ``yes`` or ``on``, any case).

    The one reading of mergekit-ota's on/off environment variables."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(message):
    import warnings  # imported only when needed: start-up stays ~0.2 ms

    warnings.warn(message, stacklevel=3)


def _after_exec(name, module):
    try:
        from mergekit_ota.integration import on_module

        on_module(name, module)
    except Exception as error:  # never break the user's import
        _warn(f"mergekit-ota: could not hook into {name}: {error!r}")


class MergekitOTAFinder:
    """Finds nothing itself; wraps the real loader of the watched mergekit modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
            return None
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            loader = getattr(spec, "loader", None)
            exec_module = getattr(loader, "exec_module", None)
            if exec_module is None:
                return spec

            def exec_and_hook(module, _exec=exec_module, _name=fullname):
                _exec(module)
                _after_exec(_name, module)

            loader.exec_module = exec_and_hook
            return spec
        except Exception as error:
            _warn(f"mergekit-ota: import hook failed for {fullname}: {error!r}")
            return None


def install_finder():
    """Put the finder first on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, MergekitOTAFinder) or type(f).__name__ == "MergekitOTAFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, MergekitOTAFinder())


def _autoload():
    if env_flag(DISABLE_ENV):
        return
    try:
        install_finder()
    except Exception as error:
        _warn(f"mergekit-ota: start-up hook not installed: {error!r}")


_autoload()
