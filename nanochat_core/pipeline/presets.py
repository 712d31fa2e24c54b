"""Presets: one dict of stage-config values per tier. `depth` is the dial for the training stages.

November 2025 recipe (nanochat's speedrun as of then; the reference of the seed's report card):
- tiny: the whole pipeline end to end on a 2-core CPU in minutes (a model that learns, not a useful one).
- d20 / d26 / d32: nanochat's speedrun ($100), $300 and run1000 tiers on one 8xH100 node.

2026 record recipe (upstream's "time to GPT-2" record, July 2026: base.recipe / sft.recipe "2026", see
nanochat_core.train.base), with no midtraining (SFT starts from the base model, as upstream's since 2026):
- gpt2: upstream's record configuration on one 8xH100 node: NVIDIA ClimbMix shards, depth 24, tokens:scaling-
  params ratio 8, fp8, vocab 32,768, sequence 2048, the batch derived from the depth (1,048,576 tokens, 5,568
  steps), SFT on SmolTalk + MMLU x3 + GSM8K x4.
- d12-2026: the same recipe at depth 12 (ratio 12: 524,288-token batches, 2,520 steps) on one GPU, for quick
  comparisons with a November d12: on FineWeb-Edu like November (so val bpb compares; ClimbMix is a
  shards.dataset override away), fp8 where the GPU has it (precision auto), else bf16.
- tiny-2026: the 2026 code paths end to end on a 2-core CPU in minutes, like tiny (fp32, an explicit small batch
  and step count: the derived batch of a depth-4 model would be 2^17 tokens).

A preset may also hold {"pipeline": {"midtrain": False}}: its runs have no mid stage (and no mid_eval), and sft's
`mid` input is the base model. It is a property of the preset, not of a stage config (overrides change stage
fields only), so it is part of no stage's key: the nodes of a preset with midtraining, and their keys, are the same
as ever. Downstream, a run's configs say it: they have no "mid" entry (stages.pipeline_of).

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


# Upstream's base_train defaults since 2026 (the values its record ran with), for base.recipe "2026". The LRs are
# d12's at B_REF = 2^19 tokens; training scales them (and the weight decay) with the batch and the depth.
RECIPE_2026_BASE: dict[str, Any] = {
    "recipe": "2026", "total_batch_size": -1, "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02,
    "weight_decay": 0.28, "warmup_steps": 40, "warmdown_ratio": 0.65, "final_lr_frac": 0.05,
}
# Upstream's chat_sft since 2026: 0.8 of the base LRs (not batch-scaled), flat then warmdown over the last half.
RECIPE_2026_SFT: dict[str, Any] = {
    "recipe": "2026", "embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02, "init_lr_frac": 0.8,
}
NO_MIDTRAINING: dict[str, Any] = {"midtrain": False}


def _tier_2026(depth: int, ratio: float, shards: int, dataset: str, device_batch_size: int, precision: str,
               sft_examples_per_step: int) -> dict[str, dict[str, Any]]:
    """A GPU tier of the 2026 recipe: 32K vocabulary, 2048-token context, batch derived from the depth."""
    return {
        "shards": {"num_shards": shards, "dataset": dataset},
        "tokenizer": {"vocab_size": 32768, "max_chars": 2_000_000_000, "doc_cap": 10_000},
        "base": {**RECIPE_2026_BASE, "depth": depth, "target_param_data_ratio": ratio, "max_seq_len": 2048,
                 "device_batch_size": device_batch_size, "precision": precision, "save_every": 1000},
        "sft": {**RECIPE_2026_SFT, "max_seq_len": 2048, "device_batch_size": 16,
                "examples_per_step": sft_examples_per_step, "save_every": 200, "identity_conversations": IDENTITY_URL},
        "rl": {"device_batch_size": 8, "save_every": 60},
        "eval": {"tasks": "auto"},
        "pipeline": dict(NO_MIDTRAINING),
    }


_TINY_2026: dict[str, dict[str, Any]] = {
    "shards": _TINY["shards"],
    "tokenizer": _TINY["tokenizer"],
    "base": {**RECIPE_2026_BASE, **_TINY["base"], "total_batch_size": 4096, "warmup_steps": 40,
             "warmdown_ratio": 0.65, "target_param_data_ratio": 8, "precision": "fp32"},
    "sft": {**_TINY["sft"], "recipe": "2026"},
    "rl": _TINY["rl"],
    "eval": _TINY["eval"],
    "pipeline": dict(NO_MIDTRAINING),
}


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": _TINY,
    "d20": _tier(depth=20, shards=240, device_batch_size=32, tok_chars=2_000_000_000),
    "d26": _tier(depth=26, shards=450, device_batch_size=16, tok_chars=2_000_000_000),
    "d32": _tier(depth=32, shards=800, device_batch_size=8, tok_chars=4_000_000_000),
    # 8 GPUs x 16 rows x 2048 tokens x 4 micro-batches = the derived 2^20-token batch; ~5.8B training tokens of
    # the ~10B in 170 ClimbMix shards (upstream's download)
    "gpt2": _tier_2026(depth=24, ratio=8, shards=170, dataset="climbmix", device_batch_size=16, precision="fp8",
                       sft_examples_per_step=512),
    # one GPU: 32 rows x 2048 tokens x 8 micro-batches = 2^19; ~1.3B training tokens
    "d12-2026": _tier_2026(depth=12, ratio=12, shards=60, dataset="fineweb-edu", device_batch_size=32,
                           precision="auto", sft_examples_per_step=128),
    "tiny-2026": _TINY_2026,
}
PIPELINE = "pipeline"  # the key of a preset's run-level settings (not a stage)
PIPELINE_DEFAULTS: dict[str, Any] = {"midtrain": True}


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


def pipeline_settings(values: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A preset's run-level settings (values["pipeline"]) over PIPELINE_DEFAULTS."""
    return {**PIPELINE_DEFAULTS, **values.get(PIPELINE, {})}


def build_configs(preset: str, overrides: dict[str, dict[str, Any]] | None = None, rl: bool = False) -> dict[str, Any]:
    """Validated config objects for the stages of the pipeline (its eval nodes share the "eval" one); a pipeline
    without midtraining has no "mid" entry (what stages.pipeline_of reads)."""
    from nanochat_core.pipeline.stages import make_config, pipeline

    values = preset_values(preset, overrides)
    stages = dict.fromkeys(node.stage for node in pipeline(rl, midtrain=pipeline_settings(values)["midtrain"]))
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
    stage_values = {stage: fields for stage, fields in values.items() if stage != PIPELINE}  # the preset's own
    return {stage: config_to_dict(cfg) for stage, cfg in build_configs(preset, stage_values, rl=rl).items()}
