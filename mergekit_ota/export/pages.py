"""Giving back the resident pages of memory-mapped source tensors once they are written.

``torch.load(..., mmap=True)`` maps a whole checkpoint file; every page a tensor's
data touched stays resident (counted in the process's RSS, though the kernel may
reclaim it) for as long as any tensor of the file is alive, which for an optimizer
state dict is the whole export.  After a tensor is written, ``madvise(MADV_DONTNEED)``
on its pages drops them: they are clean copies of the file (never written to), so a
later read would simply fault them in again.  Linux only; elsewhere a no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Iterable, Optional

import torch

_MADV_DONTNEED = 4
_libc: Optional[ctypes.CDLL] = None


def release_mapped(tensors: Iterable[torch.Tensor]) -> None:
    """Drop the resident pages of ``tensors``, which must be views of a read-only file mapping."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    for tensor in tensors:
        start = tensor.data_ptr()
        size = tensor.numel() * tensor.element_size()
        if not size:
            continue
        aligned = start - start % page
        _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + size - aligned), _MADV_DONTNEED)
