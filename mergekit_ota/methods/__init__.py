"""The ``ota`` and ``ffg`` mergekit methods and their registration.

Importing this package registers nothing: :func:`register_methods` is called by
:mod:`mergekit_ota.integration` (the start-up hook, or :func:`mergekit_ota.install`).
"""

from __future__ import annotations

import warnings

from mergekit_ota.methods.ffg import FFGMerge
from mergekit_ota.methods.ota import OTAMerge

OTA = OTAMerge()
FFG = FFGMerge()
METHODS = (OTA, FFG)
METHOD_NAMES = frozenset(method.spec.name for method in METHODS)


def is_ours(method: object) -> bool:
    """True for the method objects this package registers."""
    return any(method is ours for ours in METHODS)


def register_methods() -> None:
    """Register ``ota`` and ``ffg`` with mergekit (idempotent; never replaces a foreign method)."""
    from mergekit.merge_methods import registry

    registered = {m.spec.name: m for m in registry.registered_methods()}
    for method in METHODS:
        existing = registered.get(method.spec.name)
        if existing is None:
            registry.register(method)
        elif not is_ours(existing):
            warnings.warn(
                f"mergekit-ota: a merge method named {method.spec.name!r} is already registered "
                f"by {type(existing).__module__}; leaving it in place",
                stacklevel=2,
            )


__all__ = ["FFG", "METHODS", "METHOD_NAMES", "OTA", "is_ours", "register_methods"]
