"""Base class for every typed config: unknown keys are errors, never silently dropped."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
