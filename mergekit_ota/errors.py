"""Exceptions raised for bad user input (each message names the file/tensor at fault)."""


class OTAError(ValueError):
    """Base class for mergekit-ota input errors."""


class CurvatureError(OTAError):
    """A curvature store is missing, unreadable, or does not match the model."""


class ConfigError(OTAError):
    """A merge configuration or parameter is invalid for ``ota``/``ffg``."""


class PreflightError(OTAError):
    """Problems found while planning a merge, reported together before anything is written."""

    def __init__(self, problems: "list[str]"):
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"mergekit-ota found {len(self.problems)} problem(s) before merging "
            f"(nothing was written):\n{listing}"
        )


class OutputError(ConfigError):
    """An output cannot be written where asked: it exists, another run holds it, or the disk is full."""
