"""mergekit-ota: curvature-aware merge methods ``ota`` and ``ffg`` for mergekit.

Importing this package (or any module of it) changes nothing in mergekit. After
``pip install`` the ``mergekit_ota.pth`` start-up hook (:mod:`mergekit_ota_autoload`)
registers both methods and patches mergekit in every interpreter, as each mergekit
module finishes loading. Where the hook is off (``MERGEKIT_OTA_DISABLE=1``) or for an
explicit set-up, call :func:`install` (idempotent).

Layout: :mod:`mergekit_ota.math` (pure tensor math), :mod:`mergekit_ota.methods`
(the mergekit methods), :mod:`mergekit_ota.curvature` (curvature stores),
:mod:`mergekit_ota.graph` (mergekit graph tasks and the planner patch),
:mod:`mergekit_ota.integration` (what is patched), :mod:`mergekit_ota.cli`.
"""

__version__ = "0.1.0"


def install() -> None:
    """Register ``ota``/``ffg`` with mergekit and patch it (idempotent): now for the mergekit modules already
    loaded, and through the start-up hook's finder for those imported later (:func:`.integration.install`)."""
    from mergekit_ota.integration import install as install_integration

    install_integration()


__all__ = ["__version__", "install"]
