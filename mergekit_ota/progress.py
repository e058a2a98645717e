"""Progress bars of the commands: shown on a terminal only (never into a log file), hidden by ``-q/--quiet``."""

from __future__ import annotations

from typing import Any, Iterable, Optional


def bar(
    items: Optional[Iterable[Any]] = None,
    *,
    total: Optional[int] = None,
    desc: str,
    quiet: bool = False,
    unit: str = "tensor",
) -> Any:
    """A ``tqdm`` bar over ``items`` (or a manual one when ``items`` is None): off under ``quiet``, and off when
    standard error is not a terminal (tqdm's ``disable=None``)."""
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, disable=True if quiet else None, leave=False)
