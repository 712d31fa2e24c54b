"""Configs and presets: strict parsing with errors that name the field."""

import pytest

from nanochat_core.config import ConfigError, config_from_dict
from nanochat_core.data.shards import ShardsConfig
from nanochat_core.pipeline.presets import parse_override, preset_values


def test_config_from_dict_strict():
    assert config_from_dict(ShardsConfig, {"num_shards": 4}).num_shards == 4
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict(ShardsConfig, {"num_shard": 4})
    with pytest.raises(ConfigError, match="num_shards: expected an integer"):
        config_from_dict(ShardsConfig, {"num_shards": "four"})
    with pytest.raises(ConfigError, match="num_shards"):
        config_from_dict(ShardsConfig, {"num_shards": 0})  # validate() runs


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'tinyy'.*tiny"):
        preset_values("tinyy")


def test_overrides():
    values = preset_values("tiny", {"sft": {"num_iterations": 7}})
    assert values["sft"]["num_iterations"] == 7
    with pytest.raises(ConfigError, match="unknown stage"):
        preset_values("tiny", {"sftt": {"num_iterations": 7}})
    assert parse_override("sft.num_iterations=30") == ("sft", "num_iterations", 30)
    assert parse_override("eval.tasks=ARC-Easy") == ("eval", "tasks", "ARC-Easy")
    with pytest.raises(ConfigError, match="stage.field=value"):
        parse_override("num_iterations=30")
