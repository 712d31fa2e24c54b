"""Presets: one dict of stage-config values per tier. `depth` is the dial for the training stages.

- tiny: the whole pipeline end to end on a 2-core CPU in minutes (a model that learns, not a useful one).
- d20 / d26 / d32: nanochat's speedrun ($100), $300 and run1000 tiers on one 8xH100 node.

`build_configs(preset, overrides)` applies per-stage overrides ({"sft": {"num_iterations": 30}}) and
returns validated config objects, with errors that name the preset, stage or field that is wrong.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.data.sources import DATA_ENV, IDENTITY_URL, data_root

_TINY: dict[str, dict[str, Any]] = {
    "shards": {"num_shards": -1},
    "tokenizer": {"vocab_size": 4096, "max_chars": 50_000_000, "doc_cap": 10_000},
    "base": {
        "depth": 4, "max_seq_len": 256, "device_batch_size": 16, "total_batch_size": 4096,
        "num_iterations": 300, "eval_every": 100, "eval_tokens": 32768, "save_every": 50,
        "warmdown_ratio": 0.3, "device_type": "cpu",
    },
    "mid": {"num_iterations": 80, "max_seq_len": 256, "device_batch_size": 16, "total_batch_size": 4096,
            "eval_every": 40, "eval_steps": 8, "save_every": 40, "max_examples": 4000, "device_type": "cpu"},
    "sft": {"num_iterations": 60, "device_batch_size": 8, "examples_per_step": 16, "max_seq_len": 256,
            "eval_every": 30, "eval_steps": 4, "save_every": 30, "max_examples": 2000, "device_type": "cpu"},
    "rl": {"num_iterations": 6, "examples_per_step": 2, "num_samples": 4, "device_batch_size": 4,
           "max_new_tokens": 64, "max_eval": 16, "eval_samples": 2, "eval_every": -1, "save_every": 3,
           "device_type": "cpu"},
    "eval": {"tasks": "auto", "max_per_task": 16, "max_new_tokens": 96, "device_type": "cpu"},
}


def _tier(depth: int, shards: int, device_batch_size: int, tok_chars: int) -> dict[str, dict[str, Any]]:
    return {
        "shards": {"num_shards": shards},
        "tokenizer": {"vocab_size": 65536, "max_chars": tok_chars, "doc_cap": 10_000},
        "base": {"depth": depth, "max_seq_len": 2048, "device_batch_size": device_batch_size,
                 "total_batch_size": 524288, "target_param_data_ratio": 20, "save_every": 1000},
        "mid": {"device_batch_size": device_batch_size, "max_seq_len": 2048, "total_batch_size": 524288,
                "save_every": 500, "identity_conversations": IDENTITY_URL},
        "sft": {"device_batch_size": 4, "save_every": 200, "identity_conversations": IDENTITY_URL},
        "rl": {"device_batch_size": 8, "save_every": 60},
        "eval": {"tasks": "auto"},
    }


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": _TINY,
    "d20": _tier(depth=20, shards=240, device_batch_size=32, tok_chars=2_000_000_000),
    "d26": _tier(depth=26, shards=450, device_batch_size=16, tok_chars=2_000_000_000),
    "d32": _tier(depth=32, shards=800, device_batch_size=8, tok_chars=4_000_000_000),
}


def preset_values(preset: str, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The preset's stage values with overrides applied (no validation of field names yet)."""
    from nanochat_core.pipeline.stages import STAGES

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = copy.deepcopy(PRESETS[preset])
    for stage, fields in (overrides or {}).items():
        if stage not in STAGES:
            raise ConfigError(f"override for unknown stage {stage!r}; stages are {list(STAGES)}")
        if not isinstance(fields, dict):
            raise ConfigError(f"override for stage {stage!r} must be an object of field values, got {fields!r}")
        values.setdefault(stage, {}).update(fields)
    return values


def build_configs(preset: str, overrides: dict[str, dict[str, Any]] | None = None, rl: bool = False) -> dict[str, Any]:
    """Validated config objects for the stages of the pipeline (its eval nodes share the "eval" one)."""
    from nanochat_core.pipeline.stages import make_config, pipeline

    values = preset_values(preset, overrides)
    stages = dict.fromkeys(node.stage for node in pipeline(rl))
    return {stage: make_config(stage, values.get(stage, {})) for stage in stages}


def parse_override(text: str) -> tuple[str, str, Any]:
    """'sft.num_iterations=30' -> ("sft", "num_iterations", 30). Values are JSON when they parse as JSON."""
    import json

    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like stage.field=value (e.g. sft.num_iterations=30)")
    target, raw = text.split("=", 1)
    stage, field = target.split(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return stage, field, value


def resolve_data(data: str | None) -> str:
    """The data mirror for this run (explicit, else $NANOCHAT_DATA, else "" = Hugging Face), checked."""
    if data:
        os.environ[DATA_ENV] = data
    return data_root() or ""  # raises DataError with the path when the directory is missing


def stage_configs(preset: str, overrides: dict[str, dict[str, Any]] | None, data: str,
                  rl: bool = False) -> dict[str, dict[str, Any]]:
    """Every stage's validated config, as a dict, for a run of `preset` with `overrides` on the data `data`."""
    values = preset_values(preset, overrides)
    values.setdefault("shards", {}).setdefault("source", data)  # the shards are read from there (keyed by content)
    return {stage: config_to_dict(cfg) for stage, cfg in build_configs(preset, values, rl=rl).items()}
