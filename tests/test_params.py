"""The speedrun's parameter schema (what the Prefect UI's Custom run form is built from) and overrides."""

import dataclasses

import pytest
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from flows.params import StageOverrides, overrides_dict
from flows.speedrun import speedrun
from nanochat_core.pipeline import stages
from nanochat_core.pipeline.presets import PRESETS


def test_form_lists_presets_and_every_stage_field_with_its_default():
    schema = parameter_schema(speedrun).model_dump()
    assert schema["properties"]["preset"]["enum"] == list(PRESETS)
    assert schema["properties"]["preset"]["default"] == "tiny"
    for stage, spec in stages.STAGES.items():
        model = schema["definitions"][f"{stage.capitalize()}Overrides"]["properties"]
        for f in dataclasses.fields(spec.config_cls()):
            assert f.name in model, (stage, f.name)
            assert f"default is {f.default!r}" in model[f.name]["description"]


def test_overrides_keep_only_what_was_set_and_refuse_unknown_fields():
    model = StageOverrides.model_validate({"sft": {"num_iterations": 30}, "base": {}})
    assert overrides_dict(model) == {"sft": {"num_iterations": 30}}
    assert overrides_dict(None) == {} and overrides_dict({"mid": {"seed": 1}}) == {"mid": {"seed": 1}}
    with pytest.raises(ValidationError, match="num_iterationz"):
        StageOverrides.model_validate({"sft": {"num_iterationz": 30}})
    with pytest.raises(ValidationError, match="sftt"):
        StageOverrides.model_validate({"sftt": {}})
    with pytest.raises(ValidationError, match="depth"):
        StageOverrides.model_validate({"base": {"depth": "deep"}})
