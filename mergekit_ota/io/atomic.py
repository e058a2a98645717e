"""Temp-then-rename writing of files, cleaned up on every error path.

:class:`StagedFiles` writes each file under a temporary name beside its final name
(``NAME.tmp-<pid>-<random>``, created exclusively, so two runs never share one) and
renames them all into place in :meth:`~StagedFiles.commit`. On any failure, including
a ``close()`` that raises (a full disk often shows only when buffers are flushed), every
temporary file is removed; nothing under a final name is touched before commit.

A full disk or quota (``ENOSPC``, ``EDQUOT``) becomes one line naming the path, the
bytes the output needs and the bytes free (:func:`disk_full_error`); :func:`ensure_space`
refuses up front when the free space is already too small.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from typing import BinaryIO, Dict, List, Optional

from mergekit_ota.errors import OutputError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(count: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str) -> Optional[int]:
    """Bytes free for an unprivileged writer on the file system of ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def disk_full_error(path: str, needed: Optional[int], error: OSError) -> OutputError:
    """One line for a full disk while writing ``path``: bytes needed and free."""
    free = free_bytes(path)
    need = (
        f"the output needs {needed:,} bytes ({human_bytes(needed)})" if needed is not None else "more space is needed"
    )
    have = f", {free:,} bytes ({human_bytes(free)}) are free there" if free is not None else ""
    what = "disk quota exceeded" if error.errno == errno.EDQUOT else "no space left on device"
    return OutputError(f"{path}: {what} while writing: {need}{have}; nothing was left behind")


def ensure_space(path: str, needed: int) -> None:
    """Raise :class:`OutputError` now if the file system of ``path`` has fewer than ``needed`` bytes free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise OutputError(
            f"{path}: not enough disk space: the output needs {needed:,} bytes ({human_bytes(needed)}), "
            f"{free:,} bytes ({human_bytes(free)}) are free there; nothing was written"
        )


def temp_name(final: str) -> str:
    """A fresh temporary name beside ``final``."""
    return f"{final}.tmp-{os.getpid()}-{secrets.token_hex(4)}"


class StagedFiles:
    """Files written under temporary names, renamed into place together by :meth:`commit`.

    ``open(final)`` returns a binary file to write ``final``'s bytes to (the previous
    one is closed first). ``needed`` (the bytes all files will take) is only for the
    message when the disk fills up. Use as a context manager: leaving the block
    without :meth:`commit` removes every temporary file.
    """

    def __init__(self, needed: Optional[int] = None):
        self.needed = needed
        self._temps: Dict[str, str] = {}  # final -> temporary, in the order opened
        self._fp: Optional[BinaryIO] = None
        self._fp_final: Optional[str] = None
        self._committed = False

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if not self._committed:
            self.abort()

    def _disk_full(self, error: OSError, final: str) -> OutputError:
        return disk_full_error(final, self.needed, error)

    def open(self, final: str) -> BinaryIO:
        """Start writing ``final`` (under a temporary name); the file opened before is closed."""
        self.close()
        if final in self._temps:
            raise ValueError(f"{final} is already being written")
        temp = temp_name(final)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as error:
            if error.errno in DISK_FULL:
                raise self._disk_full(error, final) from error
            raise OutputError(f"{final}: cannot create a file beside it ({error.strerror})") from error
        self._temps[final] = temp
        self._fp = os.fdopen(fd, "wb")
        self._fp_final = final
        return self._fp

    def write(self, data: object) -> None:
        """Write ``data`` (bytes-like) to the open file; a full disk becomes :func:`disk_full_error`."""
        assert self._fp is not None and self._fp_final is not None, "open() a file first"
        try:
            self._fp.write(data)  # type: ignore[arg-type]
        except OSError as error:
            if error.errno in DISK_FULL:
                raise self._disk_full(error, self._fp_final) from error
            raise

    def close(self) -> None:
        """Close the open file (flushing it); a full disk here is reported like one in :meth:`write`."""
        fp, final = self._fp, self._fp_final
        self._fp = self._fp_final = None
        if fp is None:
            return
        try:
            fp.close()
        except OSError as error:
            if error.errno in DISK_FULL and final is not None:
                raise self._disk_full(error, final) from error
            raise

    @property
    def finals(self) -> List[str]:
        return list(self._temps)

    def commit(self) -> List[str]:
        """Close, then rename every file into place in the order opened; return the final names."""
        self.close()
        for final, temp in self._temps.items():
            os.replace(temp, final)
        self._committed = True
        return self.finals

    def abort(self) -> None:
        """Remove every temporary file; never raises (it runs while another error is propagating)."""
        fp, self._fp = self._fp, None
        if fp is not None:
            try:
                fp.close()
            except OSError:
                pass
        for temp in self._temps.values():
            try:
                os.remove(temp)
            except FileNotFoundError:
                pass
            except OSError:
                pass
        self._temps.clear()


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :class:`StagedFiles`: the old file or the new one, never half."""
    data = text.encode("utf-8")
    with StagedFiles(needed=len(data)) as files:
        files.open(path)
        files.write(data)
        files.commit()
