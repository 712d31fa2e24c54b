"""The speedrun's parameters as pydantic models, so the Prefect UI's Custom run form lists the presets and,
per stage, every config field with its type, its default and what leaving it empty means.

The models are generated from the stage config dataclasses (one source of truth): every field is optional,
and an empty field takes the preset's value. Unknown fields are refused (extra="forbid"), by the API before
the run starts.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from nanochat_core.pipeline import stages
from nanochat_core.pipeline.presets import PRESETS

Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the UI shows a select


def stage_overrides_model(stage: str) -> type[BaseModel]:
    """A model with one optional field per field of the stage's config dataclass."""
    cls = stages.STAGES[stage].config_cls()
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        f.name: (hints[f.name] | None,
                 Field(None, description=f"empty: the preset's value (the stage's own default is {f.default!r})"))
        for f in dataclasses.fields(cls)
    }
    return create_model(f"{stage.capitalize()}Overrides", __config__=ConfigDict(extra="forbid"), **fields)


StageOverrides = create_model(
    "StageOverrides",
    __config__=ConfigDict(extra="forbid"),
    **{stage: (stage_overrides_model(stage) | None, Field(None, title=stage, description=f"{stage} stage config"))
       for stage in stages.STAGES},
)


def overrides_dict(overrides: BaseModel | dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """{stage: {field: value}} of the fields actually set (a model from the UI, or a plain dict)."""
    if overrides is None:
        return {}
    if isinstance(overrides, BaseModel):
        return {stage: values for stage, values in overrides.model_dump(exclude_none=True).items() if values}
    return overrides
