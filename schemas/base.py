"""Shared base model for every contract."""

from pydantic import BaseModel, ConfigDict, Field


class Contract(BaseModel):
    """A strict, immutable record: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRecord(Contract):
    """What one file of a store held when kdmtl wrote it."""

    size: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
