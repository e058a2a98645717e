"""Where an expert's curvature store lives.

A store is named by the per-expert parameter ``curvature`` as one of:

* a ``.safetensors`` file;
* a sharded store's ``.safetensors.index.json``;
* a directory ``D``: the first existing of ``D/exp_avg_sq.safetensors.index.json``,
  ``D/exp_avg_sq.safetensors``, ``D/export/exp_avg_sq.safetensors.index.json``,
  ``D/export/exp_avg_sq.safetensors`` (:data:`SEARCHED`, in that order).

Without the parameter the store is looked up in the expert's model ``M`` (for a ``BASE+ADAPTER`` expert,
mergekit's LoRA syntax, ``M`` is the adapter: its optimizer trained the adapter, and ``export`` of a PEFT
checkpoint writes the store there; the caller passes it, see
:func:`mergekit_ota.graph.planner.store_home`):

* ``M`` an existing local directory: the same four names under ``M``, in the same order
  (``export/`` is the layout the paper's released experts use);
* otherwise, ``M`` a Hub repo id ``org/name`` (with the expert's revision, ``main`` if
  none): the same four repo files, looked up by :mod:`mergekit_ota.curvature.hub`,
  first in the local Hugging Face cache, then (unless ``HF_HUB_OFFLINE`` is set) by
  download. The cache is mergekit's ``--transformers-cache`` where the planner passes
  it, else huggingface_hub's default (``HF_HUB_CACHE``).

When nothing is found the :class:`~mergekit_ota.errors.CurvatureError` lists every
place tried, in order, with why each did not serve.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

from mergekit_ota.errors import CurvatureError
from mergekit_ota.store_format import DEFAULT_STORE_NAME, EXPORT_SUBDIR, INDEX_SUFFIX, SEARCHED

__all__ = ["DEFAULT_STORE_NAME", "INDEX_SUFFIX", "SEARCHED", "Advice", "locate_store"]

#: the caller's advice for a path given or searched as a store that holds none: a sentence to add to the error
#: (``mergekit_ota.export.detect.export_hint``: the ``mergekit-ota export`` command to run for a checkpoint), or None
Advice = Callable[[str], Optional[str]]

MERGEKIT_OFFLINE_NOTE = (
    "HF_HUB_OFFLINE is set, and mergekit 0.1.5 cannot load a model given as a Hub id offline even when it is "
    "fully cached (mergekit.common.ModelReference.local_path calls huggingface_hub.list_repo_files, which needs "
    "the network); give the model as its local snapshot directory instead"
)


def _candidates(directory: str) -> List[str]:
    """The paths of :data:`SEARCHED` under ``directory``, in search order."""
    return [os.path.join(directory, *name.split("/")) for name in SEARCHED]


def _in_directory(directory: str) -> Optional[str]:
    """The first of :func:`_candidates` that is a file, or ``None``."""
    return next((candidate for candidate in _candidates(directory) if os.path.isfile(candidate)), None)


def _hint(advice: Optional[Advice], path: str) -> str:
    """``; ADVICE`` when the caller's ``advice`` has a sentence for ``path``, else ``""``."""
    if advice is None:
        return ""
    try:
        hint = advice(path)
    except Exception:  # noqa: BLE001 - a hint must never hide the error it decorates
        return ""
    return f"; {hint}" if hint else ""


def _listing(tried: Sequence[Tuple[str, str]], where: str = "") -> str:
    """The places tried as indented lines ``- PLACE: OUTCOME``, headed ``looked in[ WHERE], in this order:``."""
    head = f"\n  looked in{' ' + where if where else ''}, in this order:"
    return head + "".join(f"\n    - {place}: {outcome}" for place, outcome in tried)


def _local_tried(directory: str) -> str:
    """The listing for a local ``directory``: each of :data:`SEARCHED` (relative to it) and "no such file"."""
    return _listing([(os.path.join(*name.split("/")), "no such file") for name in SEARCHED], directory)


def _split_revision(model_path: str, revision: Optional[str]) -> Tuple[str, Optional[str]]:
    """``org/name@rev`` -> ``("org/name", "rev")`` (as mergekit's ``ModelPath`` parses it) unless ``revision`` is
    given."""
    if revision is None and model_path.count("@") == 1:
        path, rev = model_path.split("@")
        return path, rev or None
    return model_path, revision


def _default_store(
    model_path: str,
    label: str,
    revision: Optional[str],
    cache_dir: Optional[str],
    advice: Optional[Advice],
    what: str = "model",
) -> str:
    """The store in expert ``label``'s model (or, ``what="adapter"``, adapter) directory or Hub repo ``model_path``
    (see the module docstring)."""
    missing_store = (
        f"No curvature for expert {label}: set 'parameters: {{curvature: PATH}}' for it, or put "
        f"{DEFAULT_STORE_NAME} (or {DEFAULT_STORE_NAME}{INDEX_SUFFIX}) in its {what} directory"
    )
    if os.path.isdir(model_path):
        found = _in_directory(model_path)
        if found is not None:
            return os.path.abspath(found)
        raise CurvatureError(
            f"{missing_store} {model_path} or its {EXPORT_SUBDIR}/ subdirectory{_hint(advice, model_path)}"
            + _local_tried(model_path)
        )
    import mergekit_ota.curvature.hub as hub

    repo_id, revision = _split_revision(model_path, revision)
    missing = hub.no_such_directory(model_path)
    if not (repo_id and hub.looks_like_repo_id(repo_id)):
        raise CurvatureError(
            f"{missing_store} {model_path} or its {EXPORT_SUBDIR}/ subdirectory; {model_path}: {missing} "
            f"(a local path by its form, so not looked up on the Hub as a repo id org/name)" + _local_tried(model_path)
        )
    search = hub.find_in_repo(repo_id, SEARCHED, revision=revision, cache_dir=cache_dir)
    if search.path is not None:
        return search.path
    tried = [(model_path, missing)] + [(a.place, a.outcome) for a in search.attempts]
    message = (
        f"{missing_store} or its {EXPORT_SUBDIR}/ subdirectory; {repo_id}: {missing}, so its Hub repo "
        f"was searched ({hub.cache_root(cache_dir)} first)" + _listing(tried)
    )
    from huggingface_hub import constants

    if search.offline or constants.HF_HUB_OFFLINE:
        snapshot = hub.cached_snapshot(repo_id, revision, cache_dir)
        message += f"\n  {MERGEKIT_OFFLINE_NOTE}" + (f" ({snapshot})" if snapshot else "")
    raise CurvatureError(message)


def locate_store(
    curvature: Optional[str],
    model_path: str,
    model_label: Optional[str],
    *,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    advice: Optional[Advice] = None,
    what: str = "model",
) -> str:
    """Return the absolute path of the store file (or index) for one expert.

    ``curvature`` is the user's parameter (``None`` or ``""`` for the default location);
    ``model_path`` the expert's model directory or Hub repo id (``org/name``, optionally
    ``org/name@revision``); ``model_label`` names the expert in error messages (``None``
    where a store is named on its own, as by ``inspect``). ``revision`` and ``cache_dir``
    (a Hugging Face hub cache, as mergekit's ``--transformers-cache``) apply only when the
    model is looked up on the Hub. The search order is the module docstring's. ``advice`` adds the caller's
    sentence about a path that holds no store to the error (the planner, ``inspect`` and ``analyze`` pass
    :func:`mergekit_ota.export.detect.export_hint`: this module does not import the exporter). ``what`` names
    ``model_path`` in the error where nothing is found there: ``"model"``, or ``"adapter"`` for the adapter of a
    ``BASE+ADAPTER`` expert.
    """
    whose = f" for expert {model_label}" if model_label else ""
    if curvature is None or curvature == "":
        return _default_store(model_path, model_label or model_path, revision, cache_dir, advice, what)

    path = os.path.abspath(os.path.expanduser(str(curvature)))
    if os.path.isdir(path):
        found = _in_directory(path)
        if found is None:
            raise CurvatureError(
                f"Curvature directory {path}{whose} holds neither {DEFAULT_STORE_NAME} nor "
                f"{DEFAULT_STORE_NAME}{INDEX_SUFFIX}, and nor does its {EXPORT_SUBDIR}/ subdirectory"
                + _hint(advice, path)
                + _local_tried(path)
            )
        return found
    if not os.path.isfile(path):
        raise CurvatureError(f"Curvature store {path}{whose} does not exist")
    if not (path.endswith(".safetensors") or path.endswith(INDEX_SUFFIX)):
        raise CurvatureError(
            f"Curvature store {path}{whose} must be a .safetensors "
            f"file, a .safetensors.index.json, or a directory; got another file type" + _hint(advice, path)
        )
    return path
