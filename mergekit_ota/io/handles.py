"""The process-wide cache of open ``safetensors.safe_open`` handles (memory-mapped, read-only).

Every reader of tensor data in the package (curvature stores, model weights read by
``analyze``) goes through :func:`read_tensor`, so a file is mapped once however many
tensors are read from it, and a file replaced on disk (new mtime or size) is opened
afresh. At most :data:`MAX_OPEN` files stay open; the least recently used is dropped.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Optional, Tuple

import torch

from mergekit_ota.errors import CurvatureError
from mergekit_ota.io.safetensors import HeaderEntry

MAX_OPEN = 256

_handles: "OrderedDict[Tuple[str, int, int], Any]" = OrderedDict()
_lock = threading.Lock()


def file_identity(file: str) -> Tuple[str, int, int]:
    """``(absolute path, mtime in ns, size)``: what a cache of a file's contents is keyed and checked by (a file
    replaced on disk gets a new identity). Raises :class:`CurvatureError` when ``file`` cannot be stat'ed."""
    try:
        stat = os.stat(file)
    except OSError as error:
        raise CurvatureError(f"{file}: cannot open ({error})") from error
    return (os.path.abspath(file), stat.st_mtime_ns, stat.st_size)


def handle(file: str) -> Any:
    """The open ``safe_open(file, framework="pt", device="cpu")`` handle of ``file``."""
    from safetensors import safe_open

    key = file_identity(file)
    with _lock:
        found = _handles.get(key)
        if found is not None:
            _handles.move_to_end(key)
            return found
    try:
        opened = safe_open(file, framework="pt", device="cpu")
    except Exception as error:  # safetensors raises its own error types
        raise CurvatureError(f"{file}: cannot open as safetensors ({error})") from error
    with _lock:
        _handles[key] = opened
        while len(_handles) > MAX_OPEN:
            _handles.popitem(last=False)
    return opened


def read_tensor(entry: HeaderEntry, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
    """Stored tensor ``entry`` in its stored dtype; rows ``start:stop`` of dim 0 if given (only those bytes read)."""
    opened = handle(entry.file)
    try:
        if (start is None and stop is None) or not entry.shape:
            return opened.get_tensor(entry.key)
        return opened.get_slice(entry.key)[start:stop]
    except Exception as error:  # safetensors raises its own error types
        raise CurvatureError(f"{entry.file}: cannot read tensor '{entry.key}' ({error})") from error
