"""Where ``analyze`` writes its report: an :class:`~mergekit_ota.io.output.OutputDirectory` with this policy.

An existing non-empty ``--out`` is refused; with ``force`` it is replaced only if an
earlier ``analyze`` made it (it holds :data:`MARKER`), so no directory of the user's is
ever deleted. The new report is built beside the old one and swapped in when
complete, so a failed run leaves ``--out`` as it was.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Optional, Type

from mergekit_ota.io.output import OutputDirectory, ReplacePolicy

MARKER = ".mergekit-ota-analyze"
REPORT_OUTPUT = ReplacePolicy(
    what=f"a report of an earlier mergekit-ota analyze (a directory holding {MARKER})",
    recognises=lambda path: os.path.isfile(os.path.join(path, MARKER)),
    flag="--force",
)


def check_out_dir(out_dir: str, force: bool) -> None:
    """Raise :class:`~mergekit_ota.errors.OutputError` now unless ``out_dir`` may be written."""
    OutputDirectory(out_dir, REPORT_OUTPUT, force=force).check()


class StagedDirectory:
    """``with StagedDirectory(out, force) as tmp:`` write into ``tmp``; on success it becomes ``out``."""

    def __init__(self, out_dir: str, force: bool = False):
        self.output = OutputDirectory(out_dir, REPORT_OUTPUT, force=force)

    def __enter__(self) -> str:
        self.output.__enter__()
        open(os.path.join(self.output.build, MARKER), "w").close()
        return self.output.build

    def __exit__(
        self, kind: Optional[Type[BaseException]], error: Optional[BaseException], trace: Optional[TracebackType]
    ) -> None:
        if kind is None:
            self.output.commit()
        self.output.__exit__(kind, error, trace)
