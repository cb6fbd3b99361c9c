"""Shared base model for every contract."""

from pydantic import BaseModel, ConfigDict


class Contract(BaseModel):
    """A strict, immutable record: unknown keys are errors, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)
