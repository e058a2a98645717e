"""The user's export settings (``mergekit-ota export`` options), validated with pydantic."""

from __future__ import annotations

from typing import Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergekit_ota.errors import ConfigError
from mergekit_ota.export import SOURCE_KINDS
from mergekit_ota.store_format import parse_size

SourceKind = Literal[SOURCE_KINDS]  # type: ignore[valid-type]


class ExportOptions(BaseModel):
    """How to export.

    ``compress="rank1"`` stores every 2-D tensor as its row and column sums;
    ``dtype`` is the stored dtype; ``bias_correct`` divides ``v`` by
    ``1 - beta2**step``; ``shard_size`` (bytes, or a string like ``"2GB"``) caps a
    shard; ``frozen`` are globs of parameters frozen in training; ``beta2``/``step``
    fill in values a source does not record.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_kind: Optional[SourceKind] = None
    model: Optional[str] = None
    compress: Literal["none", "rank1"] = "none"
    dtype: Literal["float32", "bfloat16"] = "float32"
    bias_correct: bool = False
    shard_size: Optional[int] = Field(default=None, gt=0)
    frozen: Tuple[str, ...] = ()
    beta2: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    step: Optional[int] = Field(default=None, ge=1)
    force: bool = False

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @classmethod
    def parse(cls, **values: object) -> "ExportOptions":
        """Build from user input; a bad value is a :class:`ConfigError` naming the option."""
        try:
            return cls(**values)
        except ValidationError as error:
            problems = "; ".join(
                f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors()
            )
            raise ConfigError(f"invalid export options: {problems}") from error

    @property
    def torch_dtype(self):  # -> torch.dtype (torch imported lazily)
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]
