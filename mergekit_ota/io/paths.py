"""Path rules: a name read from a file never leaves its directory; a store never takes a weight file's name.

* :func:`contained` resolves a file name that an index (or any file) names relative to
  its own directory, and refuses one that is absolute, contains ``..``, or resolves
  (through links) outside that directory: such an entry could make a reader open, or
  a ``--force`` clean-up delete, a file anywhere on the machine.
* :func:`regular_file` refuses a FIFO, device or socket given where a file is read (a read would block).
* :func:`loader_reads` says whether a file name is one that model loaders (mergekit,
  transformers, PEFT) read as weights. A curvature store under such a name sitting
  in a model directory would be loaded *as that model's weights*.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from typing import Optional, Type

from mergekit_ota.errors import CurvatureError, OTAError

# File names model loaders read as weights (mergekit's ShardedTensorIndex.from_disk, transformers'
# from_pretrained, PEFT's adapters): a store must never be written under one of them.
LOADER_PATTERNS = ("model*.safetensors*", "pytorch_model*", "adapter_model*")


def loader_reads(name: str) -> Optional[str]:
    """The pattern of :data:`LOADER_PATTERNS` that file name ``name`` (its basename) matches, or ``None``."""
    base = os.path.basename(name)
    return next((pattern for pattern in LOADER_PATTERNS if fnmatch.fnmatchcase(base, pattern)), None)


HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def _hub_blob(root: str, real: str) -> bool:
    """Whether ``root`` lies in a huggingface_hub cache snapshot (``<cache>/models--ORG--NAME/snapshots/<commit>/...``)
    and ``real`` in that same repo's ``blobs/``: the cache keeps every snapshot file as a link into ``blobs/``."""
    parts = root.rstrip(os.sep).split(os.sep)
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(HUB_REPO_PREFIXES):
            blobs = os.sep.join(parts[:i] + ["blobs"])
            return real.startswith(blobs + os.sep)
    return False


def _encodable(name: str) -> bool:
    """Whether ``name`` can name a file here: no NUL, and encodable in the file system's encoding."""
    try:
        os.fsencode(name)
    except UnicodeError:
        return False
    return "\0" not in name


def regular_file(path: str, what: str, error: Type[OTAError] = CurvatureError) -> str:
    """``path`` if it is a regular file (links followed), else ``error`` naming it.

    Reading a FIFO, a device or a socket named as a ``what`` (e.g. "torch.save file") would block
    or never end; a directory is not a file either.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as cause:
        raise error(f"{path}: cannot read the {what} ({cause})") from cause
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise error(f"{path}: {kind}; expected a {what} (a regular file)")
    return path


def contained(directory: str, name: object, source: str) -> str:
    """``directory/name`` as an absolute path, provided ``name`` stays inside ``directory``.

    ``name`` comes from file ``source`` (named in the error). Refused: a non-string,
    an empty name, an absolute path, any ``..`` component, and a path whose real
    location (links resolved) is outside ``directory``'s real location, except that in a
    huggingface_hub cache snapshot a file may resolve into its own repo's ``blobs/`` (how the
    cache stores every file).
    """
    if not isinstance(name, str) or not name:
        raise CurvatureError(f"{source}: file name {name!r} is not a non-empty string")
    if not _encodable(name):
        raise CurvatureError(
            f"{source}: file name {name!r} holds a NUL byte or a character no file name can hold (a lone surrogate)"
        )
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise CurvatureError(
            f"{source}: file name {name!r} leaves the directory {directory}; "
            f"an index may only name files inside its own directory"
        )
    path = os.path.abspath(os.path.join(directory, name))
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep) and not _hub_blob(root, real):
        raise CurvatureError(
            f"{source}: file name {name!r} resolves to {real}, outside the directory {root} (through a link); "
            f"an index may only name files inside its own directory"
        )
    return path
