"""Where an expert's curvature store lives.

A store is named by the per-expert parameter ``curvature`` as one of:

* a ``.safetensors`` file;
* a sharded store's ``.safetensors.index.json``;
* a directory holding ``exp_avg_sq.safetensors`` or ``exp_avg_sq.safetensors.index.json``.

Without the parameter, the store is looked up in the expert's own (local) model
directory under the same default name, ``exp_avg_sq.safetensors[.index.json]``.
"""

from __future__ import annotations

import os
from typing import Optional

from mergekit_ota.errors import CurvatureError

DEFAULT_STORE_NAME = "exp_avg_sq.safetensors"
INDEX_SUFFIX = ".index.json"


def _in_directory(directory: str) -> Optional[str]:
    for name in (DEFAULT_STORE_NAME + INDEX_SUFFIX, DEFAULT_STORE_NAME):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _hint(path: str) -> str:
    """`` (...: run mergekit-ota export ... first)`` when ``path`` is a checkpoint export reads, else ``""``."""
    from mergekit_ota.export.detect import export_hint  # lazily: export imports this module

    try:
        hint = export_hint(path)
    except Exception:  # noqa: BLE001 - a hint must never hide the error it decorates
        return ""
    return f"; {hint}" if hint else ""


def locate_store(curvature: Optional[str], model_path: str, model_label: Optional[str]) -> str:
    """Return the absolute path of the store file (or index) for one expert.

    ``curvature`` is the user's parameter (``None`` for the default location);
    ``model_path`` the expert's model directory; ``model_label`` names the expert
    in error messages (``None`` where a store is named on its own, as by ``inspect``).
    """
    whose = f" for expert {model_label}" if model_label else ""
    if curvature is None or curvature == "":
        found = _in_directory(model_path) if os.path.isdir(model_path) else None
        if found is None:
            raise CurvatureError(
                f"No curvature for expert {model_label}: set "
                f"'parameters: {{curvature: PATH}}' for it, or put "
                f"{DEFAULT_STORE_NAME} (or {DEFAULT_STORE_NAME}{INDEX_SUFFIX}) in "
                f"its model directory {model_path}" + (_hint(model_path) if os.path.isdir(model_path) else "")
            )
        return os.path.abspath(found)

    path = os.path.abspath(os.path.expanduser(str(curvature)))
    if os.path.isdir(path):
        found = _in_directory(path)
        if found is None:
            raise CurvatureError(
                f"Curvature directory {path}{whose} holds neither "
                f"{DEFAULT_STORE_NAME} nor {DEFAULT_STORE_NAME}{INDEX_SUFFIX}" + _hint(path)
            )
        return found
    if not os.path.isfile(path):
        raise CurvatureError(
            f"Curvature store {path}{whose} does not exist"
        )
    if not (path.endswith(".safetensors") or path.endswith(INDEX_SUFFIX)):
        raise CurvatureError(
            f"Curvature store {path}{whose} must be a .safetensors "
            f"file, a .safetensors.index.json, or a directory; got another file type" + _hint(path)
        )
    return path
