"""Base class for every typed config: unknown keys are errors, never silently dropped, and every number is
finite (an `lr: .inf` is refused before anything is written, not found as a NaN model after the run)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
