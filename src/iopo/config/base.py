"""The ground of every config: the one-line error, the strict base part, shorthands and the output_dir rule."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

MAX_STEPS = (
    1_000_000  # optimizer steps of one run: far beyond any real run, far below what a schedule list can hold
)


class ConfigError(ValueError):
    """A bad setting; its message names the key."""


def expand_shorthands(values: Any, **fields: str) -> Any:
    """Shorthands: a string given for a section (e.g. `data=pairs.jsonl`) sets that section's main field."""
    if not isinstance(values, dict):
        return values
    values = dict(values)
    for section, field in fields.items():
        if isinstance(values.get(section), str):
            values[section] = {field: values[section]}
    return values


class Part(BaseModel):
    # inf and nan are refused everywhere: no setting can train with them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def check_output_dir(output_dir: str, method: str) -> None:
    if not output_dir.strip():
        raise ValueError("output_dir must name a folder (an empty one would make the current folder the run)")
    try:
        output_dir.format(method=method)
    except (KeyError, IndexError, ValueError):
        raise ValueError(
            "output_dir may use {method} and no other braces (write {{ and }} for literal ones)"
        ) from None
