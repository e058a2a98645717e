"""Finding a curvature store file in a Hugging Face Hub model repo, offline first.

:func:`find_in_repo` takes a repo id, a revision and the store file names to try (in
order), and returns the local path of the first one found with every file it needs,
plus a record of every place tried. It searches in two passes:

1. **The local cache** (``cache_dir``, else huggingface_hub's default cache
   ``HF_HUB_CACHE``), with ``huggingface_hub.try_to_load_from_cache``: no network.
   An index counts only when every shard its ``weight_map`` names is cached too.
2. **Downloads**, only when the first pass found nothing and ``HF_HUB_OFFLINE`` is not
   set: ``huggingface_hub.hf_hub_download`` for the same names in the same order (an
   index's shards after it). A file that is not in the repo moves on to the next
   name; a missing repo or revision, or a Hub that cannot be reached, ends the pass
   (the remaining names would fail the same way). No network error escapes: each is
   recorded, in a few words, in the attempt it ended.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from mergekit_ota.store_format import INDEX_SUFFIX

OFFLINE = "offline (HF_HUB_OFFLINE=1)"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Attempt:
    """One place tried: ``place`` is ``repo@revision:filename``; ``outcome`` says why it did not serve."""

    place: str
    outcome: str


@dataclass
class RepoSearch:
    """What :func:`find_in_repo` found (``path``, ``None`` if nothing) and every attempt that failed."""

    path: Optional[str] = None
    attempts: List[Attempt] = field(default_factory=list)
    offline: bool = False


def looks_like_repo_id(path: str, bare: bool = False) -> bool:
    """Whether ``path`` can be a Hub model repo id ``org/name`` rather than a local path.

    The one rule for "looks local" (a missing local-looking path is reported as
    :func:`no_such_directory` before any Hub lookup, by ``check`` and the curvature lookup).
    Not a repo id: an absolute path, one starting with ``.`` or ``~``, one with other than
    exactly one ``/`` (so any ``\\``, ``./``, ``../`` or a trailing ``/``), one whose first part
    is an existing local directory (a local path with a typo), and one huggingface_hub's
    ``validate_repo_id`` refuses. A bare ``name`` (legacy canonical repos such as
    ``gpt2``) counts only with ``bare=True`` (as when deciding whether a missing model is a
    missing local path: the curvature lookup never sends a bare name to the Hub).
    """
    if os.path.isabs(path) or path.startswith((".", "~")):
        return False
    if not _REPO_ID.match(path) and not (bare and "/" not in path and path):
        return False
    if "/" in path and os.path.isdir(path.split("/", 1)[0]):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def no_such_directory(path: str) -> str:
    """How a model path that is no directory here is reported: ``no such directory (relative to CWD)`` (the
    parenthesis only for a relative ``path``; the caller names the path)."""
    relative = not os.path.isabs(os.path.expanduser(path))
    return "no such directory" + (f" (relative to {os.getcwd()})" if relative else "")


# huggingface_hub's cache layout: HUB_CACHE/models--ORG--NAME/snapshots/COMMIT/FILE
_HUB_CACHED = re.compile(r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/(?P<file>.+)$")


def hub_origin(path: str) -> Optional[Dict[str, str]]:
    """``{"repo", "commit", "file"}`` where ``path`` is a file in huggingface_hub's cache (a store fetched from a
    Hub repo), else ``None``."""
    match = _HUB_CACHED.search(path.replace(os.sep, "/"))
    if match is None:
        return None
    return {"repo": match["repo"].replace("--", "/"), "commit": match["commit"], "file": match["file"]}


def cache_root(cache_dir: Optional[str]) -> str:
    """The hub cache searched: ``cache_dir`` if given, else huggingface_hub's ``HF_HUB_CACHE`` (read now)."""
    from huggingface_hub import constants

    return os.path.expanduser(cache_dir) if cache_dir else constants.HF_HUB_CACHE


def cached_snapshot(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[str]:
    """The cached snapshot directory ``models--ORG--NAME/snapshots/SHA`` of ``repo_id@revision``, if present."""
    repo_dir = os.path.join(cache_root(cache_dir), "models--" + repo_id.replace("/", "--"))
    sha = revision or "main"
    ref = os.path.join(repo_dir, "refs", sha)
    if os.path.isfile(ref):
        try:
            with open(ref, "r", encoding="utf-8") as fp:
                sha = fp.read().strip()
        except OSError:
            return None
    snapshot = os.path.join(repo_dir, "snapshots", sha)
    return snapshot if os.path.isdir(snapshot) else None


def _place(repo_id: str, revision: Optional[str], filename: str) -> str:
    return f"{repo_id}@{revision or 'main'}:{filename}"


def _shards(index_path: str, filename: str) -> Optional[List[str]]:
    """Repo file names of the shards index ``index_path`` (repo file ``filename``) names; ``None`` if unreadable.

    An unreadable or malformed index is returned as found: the store reader then
    reports what is wrong with it, naming the file.
    """
    from mergekit_ota.errors import CurvatureError
    from mergekit_ota.io.safetensors import parse_json

    try:
        with open(index_path, "rb") as fp:
            weight_map = parse_json(fp.read(), index_path, "safetensors index").get("weight_map")
    except (OSError, CurvatureError, AttributeError):
        return None
    if not isinstance(weight_map, dict) or not all(isinstance(s, str) and s for s in weight_map.values()):
        return None
    folder = posixpath.dirname(filename)
    return [posixpath.join(folder, shard) if folder else shard for shard in sorted(set(weight_map.values()))]


def _from_cache(
    repo_id: str, revision: Optional[str], cache_dir: Optional[str], filename: str
) -> Tuple[Optional[str], str]:
    """``(path, "")`` if ``filename`` (and, for an index, every shard) is cached; else ``(None, why not)``."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError

    where = cache_root(cache_dir)

    def lookup(name: str) -> object:
        try:
            return huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        except (HFValidationError, ValueError, OSError):
            return None

    found = lookup(filename)
    if found is None:
        return None, f"not in the local cache ({where})"
    if not isinstance(found, str):  # huggingface_hub's _CACHED_NO_EXIST: an earlier download found no such file
        return None, f"not in the repo (recorded as absent in the local cache {where})"
    if filename.endswith(INDEX_SUFFIX):
        for shard in _shards(found, filename) or []:
            if not isinstance(lookup(shard), str):
                return None, f"the index is cached, but its shard {shard} is not in the local cache ({where})"
    return found, ""


def _describe(error: BaseException) -> Tuple[str, bool]:
    """A few words for a download error, and whether it ends the download pass (repo-, revision- or network-level)."""
    from huggingface_hub import errors

    first_line = (str(error).strip().splitlines() or [""])[0][:160]
    if isinstance(error, errors.OfflineModeIsEnabled):
        return OFFLINE, True
    if isinstance(error, errors.GatedRepoError):
        return "the repo is gated and access was not granted (log in with `hf auth login`)", True
    if isinstance(error, errors.RepositoryNotFoundError):
        return "no such repo on the Hub (or it is private and no valid token was given)", True
    if isinstance(error, errors.RevisionNotFoundError):
        return "no such revision in the repo", True
    if isinstance(error, errors.LocalEntryNotFoundError):  # the Hub could not be reached and the file is not cached
        cause = error.__cause__ or error.__context__
        return f"could not reach the Hub ({type(cause).__name__ if cause else 'connection error'})", True
    if isinstance(error, errors.EntryNotFoundError):
        return "not in the repo", False
    if isinstance(error, errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return f"HTTP error {status or ''} from the Hub: {first_line}".replace("  ", " "), False
    if isinstance(error, errors.HFValidationError):
        return f"not a valid repo id or file name ({first_line})", True
    return f"network error ({type(error).__name__}: {first_line})", True


def _download_errors() -> Tuple[type, ...]:
    """The exceptions a download may raise that mean "not found here" or "no network", never a bug."""
    from huggingface_hub import errors

    http_error = getattr(
        errors, "HTTPError", None
    )  # the HTTP client's base error (httpx), as huggingface_hub re-exports it
    extra = (http_error,) if isinstance(http_error, type) else ()
    return (
        errors.EntryNotFoundError,
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
        errors.HfHubHTTPError,
        errors.HFValidationError,
        errors.OfflineModeIsEnabled,
        OSError,  # ConnectionError, TimeoutError, a full or read-only cache
        *extra,
    )


def _download(
    repo_id: str, revision: Optional[str], cache_dir: Optional[str], filename: str
) -> Tuple[Optional[str], str, bool]:
    """``hf_hub_download`` ``filename`` and, for an index, every shard it names.

    Returns ``(local path, "", False)``, or ``(None, what failed, whether the pass ends)``.
    """
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except _download_errors() as error:
        words, final = _describe(error)
        return None, f"download: {words}", final
    if filename.endswith(INDEX_SUFFIX):
        for shard in _shards(path, filename) or []:
            try:
                huggingface_hub.hf_hub_download(repo_id, shard, revision=revision, cache_dir=cache_dir)
            except _download_errors() as error:
                words, final = _describe(error)
                return None, f"the index downloaded, but its shard {shard} did not: {words}", final
    return path, "", False


def find_in_repo(
    repo_id: str,
    filenames: Sequence[str],
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> RepoSearch:
    """The first of ``filenames`` (repo-relative, in order) found in ``repo_id@revision``, cache first.

    See the module docstring for the two passes. ``revision`` ``None`` means ``main``;
    ``cache_dir`` ``None`` means huggingface_hub's default cache. The result's
    ``attempts`` hold one entry per name not served (its cache outcome, and its
    download outcome where a download was tried or skipped); ``offline`` tells whether
    downloads were skipped because ``HF_HUB_OFFLINE`` is set.
    """
    from huggingface_hub import constants

    search = RepoSearch()
    cached: List[Tuple[str, str]] = []
    for filename in filenames:
        path, why = _from_cache(repo_id, revision, cache_dir, filename)
        if path is not None:
            search.path = path
            search.attempts = [Attempt(_place(repo_id, revision, f), w) for f, w in cached]
            return search
        cached.append((filename, why))
    if constants.HF_HUB_OFFLINE:
        search.offline = True
        search.attempts = [Attempt(_place(repo_id, revision, f), f"{w}; not downloaded: {OFFLINE}") for f, w in cached]
        return search
    stopped = False
    for filename, why in cached:
        place = _place(repo_id, revision, filename)
        if stopped:
            search.attempts.append(Attempt(place, f"{why}; download not tried (stopped by the error above)"))
            continue
        path, words, final = _download(repo_id, revision, cache_dir, filename)
        if path is not None:
            search.path = path
            return search
        search.attempts.append(Attempt(place, f"{why}; {words}"))
        stopped = final
    return search
