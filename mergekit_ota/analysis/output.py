"""A report directory written under a temporary name and renamed into place at the end.

An existing non-empty ``--out`` is refused; with ``force`` it is replaced only if an
earlier ``analyze`` made it (it holds :data:`MARKER`), so no directory of the user's is
ever deleted.  A failed run leaves ``--out`` as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from types import TracebackType
from typing import Optional, Type

from mergekit_ota.errors import ConfigError

MARKER = ".mergekit-ota-analyze"


def check_out_dir(out_dir: str, force: bool) -> None:
    """Raise :class:`ConfigError` unless ``out_dir`` may be written (see the module docstring)."""
    if os.path.isfile(out_dir):
        raise ConfigError(f"--out {out_dir} is an existing file; choose a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not force:
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose another directory or pass --force")
    if not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise ConfigError(
            f"--out {out_dir} was not made by mergekit-ota analyze (no {MARKER} in it); "
            f"not replacing it even with --force"
        )


class StagedDirectory:
    """``with StagedDirectory(out, force) as tmp:`` write into ``tmp``; on success it becomes ``out``."""

    def __init__(self, out_dir: str, force: bool = False):
        self.out_dir = os.path.abspath(out_dir)
        self.force = force
        self.path = ""

    def __enter__(self) -> str:
        check_out_dir(self.out_dir, self.force)
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it 0700; the report is an ordinary directory
        open(os.path.join(self.path, MARKER), "w").close()
        return self.path

    def __exit__(
        self, kind: Optional[Type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]
    ) -> None:
        if kind is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            check_out_dir(self.out_dir, self.force)  # may have changed while we worked
            old = None
            if os.path.isdir(self.out_dir):
                old = f"{self.path}.old"
                os.rename(self.out_dir, old)
            os.rename(self.path, self.out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
