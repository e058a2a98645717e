"""mergekit-ota: curvature-aware merge methods ``ota`` and ``ffg`` for mergekit.

``import mergekit_ota`` registers both methods with mergekit and patches its
planner (idempotent); after ``pip install`` this also happens automatically in
every interpreter through the ``mergekit_ota.pth`` start-up hook.

Layout: :mod:`mergekit_ota.math` (pure tensor math), :mod:`mergekit_ota.methods`
(the mergekit methods), :mod:`mergekit_ota.curvature` (curvature stores),
:mod:`mergekit_ota.graph` (mergekit graph tasks and the planner patch),
:mod:`mergekit_ota.integration` (what is patched), :mod:`mergekit_ota.cli`.
"""

__version__ = "0.1.0"


def _install() -> None:
    import mergekit_ota_autoload as hook

    # Imported from inside the start-up hook (a mergekit module is mid-import):
    # the hook itself applies the patches as each module finishes loading.
    if any(hook.initializing(name) for name in hook.WATCHED):
        return
    from mergekit_ota.integration import install

    install()


_install()
