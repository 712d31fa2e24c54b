"""Configs and presets: strict parsing with errors that name the field."""

import argparse

import pytest

from nanochat_core.config import ConfigError, add_config_arguments, config_from_args, config_from_dict, load_config_file
from nanochat_core.data.shards import ShardsConfig
from nanochat_core.pipeline.presets import parse_override, preset_values
from nanochat_core.pipeline.stages import make_config
from nanochat_core.train.base import BaseTrainConfig


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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected_from_dicts(value):
    with pytest.raises(ConfigError, match=r"BaseTrainConfig\.matrix_lr: .*finite"):
        config_from_dict(BaseTrainConfig, {"matrix_lr": value})
    with pytest.raises(ConfigError, match=r"ShardsConfig\.timeout_seconds: .*finite"):
        config_from_dict(ShardsConfig, {"timeout_seconds": value})


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_floats_are_rejected_from_flags_and_json_files(tmp_path, text):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BaseTrainConfig)
    with pytest.raises(ConfigError, match=r"BaseTrainConfig\.embedding_lr: .*finite"):
        config_from_args(BaseTrainConfig, parser.parse_args([f"--embedding-lr={text}"]))
    path = tmp_path / "base.json"
    path.write_text(f'{{"warmdown_ratio": {text}}}')
    with pytest.raises(ConfigError, match=r"BaseTrainConfig\.warmdown_ratio: .*finite"):
        load_config_file(BaseTrainConfig, path)


def test_non_finite_floats_are_rejected_from_flow_parameters():
    """The pipeline builds every stage config from its parameters with stages.make_config."""
    with pytest.raises(ConfigError, match=r"\.temperature: .*finite"):
        make_config("rl", {"temperature": float("nan")})


def test_finite_floats_still_pass():
    assert config_from_dict(BaseTrainConfig, {"matrix_lr": 1e-3, "weight_decay": 0}).weight_decay == 0.0
