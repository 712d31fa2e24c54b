"""The 2026 record recipe in the training stages and presets (issue 14): config checks, upstream's sizing table,
schedules, presets (gpt2, d12-2026, tiny-2026) and the pipeline without midtraining, exact resume after SIGKILL, and
a distributed run equal to a single-process one, with every feature, the 2026 optimizer and the best-fit loader.

The distributed check runs this file as a torchrun script (as tests/test_optim_2026.py does):

    torchrun --standalone --nproc_per_node=2 tests/test_recipe_2026.py SHARDS TOKENIZER OUT_DIR
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import (
    base_command,
    env,
    interrupt_after_first_checkpoint,
    rewind_to_first_checkpoint,
    run_ok,
    same_weights,
    shards_dir,  # noqa: F401 - a fixture: two train shards and the validation shard
)

from nanochat_core.checkpoint import latest_checkpoint, load_model
from nanochat_core.config import ConfigError, config_from_dict
from nanochat_core.gpt import GPT
from nanochat_core.pipeline import plan, preflight, stages
from nanochat_core.pipeline.presets import PRESETS, build_configs, preset_values, stage_configs
from nanochat_core.train import base, sft
from nanochat_core.train.common import (
    lr_multiplier_2026,
    muon_momentum_2026,
    sft_lr_multiplier_2026,
    weight_decay_2026,
)

REPO = Path(__file__).resolve().parents[1]

# depth 2 of the 2026 model: C 128, layers [S, L] (a 128-key window at 256 tokens: the sliding window is exercised),
# value embeddings on layer 1, residual scalars, smear, backout; upstream's 2026 hyperparameters
RECIPE_2026 = {"recipe": "2026", "max_seq_len": 256, "device_batch_size": 2, "total_batch_size": 1024,
               "target_param_data_ratio": 8, "embedding_lr": 0.3, "unembedding_lr": 0.008, "weight_decay": 0.28,
               "warmup_steps": 3, "warmdown_ratio": 0.65, "final_lr_frac": 0.05, "eval_tokens": 2048}


# ---------------------------------------------------------------------------------------------
# config checks


@pytest.mark.parametrize("values, message", [
    ({"recipe": "2025"}, "recipe must be one of"),
    ({"recipe": "2026", "disable": "smear,sliding_windows"}, r"unknown feature\(s\) \['sliding_windows'\]"),
    ({"disable": "smear"}, "turns off features of the 2026 recipe, but recipe is 'nov2025'"),
    ({"precision": "fp16"}, "precision must be one of"),
    ({"precision": "fp8", "device_type": "cpu"}, "precision='fp8' needs a GPU with fp8 tensor cores"),
    ({"total_batch_size": -1}, "a batch derived from the depth needs recipe 2026"),
    ({"warmup_steps": 40}, "warmup_steps is the 2026 recipe's"),
    ({"recipe": "2026", "warmup_ratio": 0.1}, "warmup_ratio is the nov2025 recipe's"),
    ({"recipe": "2026", "target_param_data_ratio": 0, "num_iterations": 10}, "must be > 0 with recipe 2026"),
])
def test_bad_base_configs_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(base.BaseTrainConfig, values)


def test_fp8_on_a_cpu_is_refused_when_the_run_starts():
    """With device autodetection the config cannot tell; the stage refuses before it builds anything."""
    config = base.BaseTrainConfig(recipe="2026", precision="fp8")
    with pytest.raises(ConfigError, match=r"BaseTrainConfig.precision='fp8' needs a GPU with fp8 tensor cores"):
        base.training_precision(config, torch.device("cpu"))
    assert base.training_precision(base.BaseTrainConfig(recipe="2026"), torch.device("cpu")) == "fp32"


def test_disable_names_every_feature_and_sft_checks_its_recipe():
    config = base.BaseTrainConfig(recipe="2026", disable=" smear , sliding_window,normuon")
    assert config.disabled() == {"smear", "sliding_window", "normuon"}
    model_config = base.model_config_for(config, 512)
    assert not model_config.smear and model_config.window_pattern == "L" and model_config.backout
    assert base.model_config_for(base.BaseTrainConfig(), 512).recipe == "nov2025"
    with pytest.raises(ConfigError, match="SFTConfig.recipe"):
        config_from_dict(sft.SFTConfig, {"recipe": "gpt2"})


# ---------------------------------------------------------------------------------------------
# sizing and schedules


@pytest.mark.parametrize("depth, ratio, batch, steps", [
    (12, 12, 524_288, 2_520), (20, 12, 1_048_576, 4_980), (24, 8, 1_048_576, 5_568), (26, 8.25, 1_048_576, 7_225)])
def test_derived_batch_and_horizon_match_upstreams_table(depth, ratio, batch, steps):
    """nanochat-reference.md 2.3 (upstream HEAD, vocab 32768, 2048 tokens), from the real models' parameter counts."""
    config = base.BaseTrainConfig(recipe="2026", depth=depth, target_param_data_ratio=ratio, total_batch_size=-1,
                                  weight_decay=0.28)
    sizing = base.sizing_for(config, 32768)
    assert (sizing.total_batch_size, sizing.num_iterations) == (batch, steps)
    assert sizing.lr_scale == math.sqrt(batch / 2**19)
    with torch.device("meta"):
        model = GPT(base.model_config_for(config, 32768))
    assert sizing.scaling_params == model.num_scaling_params() < model.num_params()
    if depth == 24:  # the record: 1,384M parameters of which 730M scale; weight decay 0.28 -> 0.060
        assert round(model.num_params() / 1e6, 1) == 1384.1 and round(sizing.scaling_params / 1e6, 1) == 729.8
        assert round(sizing.weight_decay, 3) == 0.060


def test_schedules_2026():
    n = 200  # warmup 40 steps, flat until step 70, warmdown over the last 130 to 0.05
    assert [lr_multiplier_2026(i, n) for i in (0, 35, 39, 40, 70)] == [1 / 40, 36 / 40, 1.0, 1.0, 1.0]
    assert lr_multiplier_2026(71, n) < 1.0 and lr_multiplier_2026(135, n) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier_2026(n, n) == pytest.approx(0.05)
    assert muon_momentum_2026(0, 2000) == 0.85 and muon_momentum_2026(200, 2000) == pytest.approx(0.91)
    assert muon_momentum_2026(400, 2000) == muon_momentum_2026(700, 2000) == 0.97  # the warmdown starts at 700
    assert muon_momentum_2026(1350, 2000) == pytest.approx(0.935) and muon_momentum_2026(2000, 2000) == 0.90
    assert muon_momentum_2026(10, 12) < 0.86  # inside the 400-step ramp the ramp wins, as upstream
    assert weight_decay_2026(0, n, 0.2) == 0.2 and weight_decay_2026(100, n, 0.2) == pytest.approx(0.1)
    assert weight_decay_2026(n, n, 0.2) == pytest.approx(0.0, abs=1e-12)
    assert [sft_lr_multiplier_2026(i, 10) for i in (0, 5, 6, 9)] == pytest.approx([1.0, 1.0, 0.8, 0.2])


# ---------------------------------------------------------------------------------------------
# presets and the pipeline without midtraining


def test_presets_build_and_the_2026_ones_have_no_midtraining():
    for preset in PRESETS:
        configs = build_configs(preset)
        assert ("mid" in configs) == (preset in ("tiny", "d20", "d26", "d32")), preset
    gpt2 = build_configs("gpt2")
    assert (gpt2["base"].depth, gpt2["base"].target_param_data_ratio, gpt2["base"].precision) == (24, 8, "fp8")
    assert (gpt2["base"].recipe, gpt2["base"].max_seq_len, gpt2["tokenizer"].vocab_size) == ("2026", 2048, 32768)
    assert gpt2["base"].total_batch_size == -1 and gpt2["sft"].recipe == "2026"
    assert base.sizing_for(gpt2["base"], 32768).total_batch_size == 16 * 2048 * 8 * 4  # 8 GPUs, 4 micro-batches
    tiny = build_configs("tiny-2026")
    assert (tiny["base"].depth, tiny["base"].precision, tiny["base"].device_type) == (4, "fp32", "cpu")
    with pytest.raises(ConfigError, match="override for unknown stage 'pipeline'"):  # a preset's property
        build_configs("gpt2", {"pipeline": {"midtrain": True}})
    assert "pipeline" not in preset_values("tiny") and PRESETS["tiny"]["base"]["depth"] == 4


def test_preflight_checks_the_derived_batch_and_fp8_before_anything_starts():
    data = os.environ["NANOCHAT_DATA"]
    preflight.check_batch_division(stage_configs("gpt2", {}, data), 8, 1)  # 2^20 = 16 rows x 2048 x 8 ranks x 4
    configs = stage_configs("gpt2", {"base": {"device_batch_size": 24}}, data)
    with pytest.raises(ConfigError, match=r"base: total_batch_size=1048576 must be .* 24 \* 2048 \* 8 = 393216"):
        preflight.check_batch_division(configs, 8, 1)
    if not torch.cuda.is_available():  # base runs on this machine's CPU
        with pytest.raises(ConfigError, match="base.precision='fp8' needs a GPU with fp8 tensor cores"):
            preflight.check_precision(configs)


def test_without_midtraining_sft_starts_from_base():
    nodes = {n.name: n for n in stages.pipeline(rl=True, midtrain=False)}
    assert list(nodes) == ["shards", "tokenizer", "base", "base_eval", "sft", "sft_eval", "rl", "rl_eval"]
    assert nodes["sft"].inputs == (("mid", "base"), ("tokenizer", "tokenizer"))
    with_mid = {n.name: n for n in stages.pipeline()}
    assert with_mid["sft"].inputs == (("mid", "mid"), ("tokenizer", "tokenizer")) and "mid_eval" in with_mid


def test_the_dry_run_of_tiny_2026_shows_no_mid_stage(tmp_path):
    configs = stage_configs("tiny-2026", {}, os.environ["NANOCHAT_DATA"])
    decisions = plan.dry_run(configs, str(tmp_path / "store"))
    assert list(decisions) == ["shards", "tokenizer", "base", "base_eval", "sft", "sft_eval"]
    assert decisions["sft"].reasons[:1] == ["upstream base runs first"]


# ---------------------------------------------------------------------------------------------
# training: exact resume, SFT on the base model, distributed == single process


def test_sigkill_then_rerun_of_a_2026_run_ends_bitwise_equal(shards_dir, tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """Every feature, the 2026 optimizer and schedules, the best-fit loader: a run SIGKILLed after its first
    checkpoint and rerun ends with the weights of an uninterrupted one."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    overrides = {**RECIPE_2026, "num_iterations": 12, "save_every": 4, "eval_every": 6}
    reference = subprocess.Popen(base_command(shards_dir, tiny_tokenizer_dir, ref, nproc=None, **overrides),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    try:  # meanwhile (2 cores): torchrun, SIGKILLed after its first checkpoint, then plain python resuming
        code, log = interrupt_after_first_checkpoint(base_command(shards_dir, tiny_tokenizer_dir, out, **overrides),
                                                     signal.SIGKILL)
        assert code != 0 and latest_checkpoint(out) is not None and not (out / "metrics.json").exists(), log[-2000:]
        run_ok(base_command(shards_dir, tiny_tokenizer_dir, out, nproc=None, **overrides))
        ref_log, _ = reference.communicate(timeout=300)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, ref_log[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] > 0 and metrics["precision"] == "fp32"
    assert same_weights(out, ref)
    model, meta = load_model(ref, "cpu")
    assert model.config.recipe == "2026" and model.config.smear and model.config.windows() == [128, None]
    assert meta["total_batch_size"] == 1024 and meta["precision"] == "fp32"
    assert metrics["val_bpb"] < metrics["unigram_bpb"] + 1.0  # finite and on the scale of the data


def test_sft_2026_fine_tunes_a_2026_base_model_and_resumes_bitwise(shards_dir, tiny_tokenizer_dir,  # noqa: F811
                                                                     tmp_path):
    base_dir = tmp_path / "base"
    config = config_from_dict(base.BaseTrainConfig, {**RECIPE_2026, "depth": 2, "num_iterations": 4,
                                                     "eval_every": -1, "device_type": "cpu"})
    base.train(config, shards_dir, tiny_tokenizer_dir, base_dir)
    sft_config = sft.SFTConfig(recipe="2026", num_iterations=4, max_seq_len=128, device_batch_size=4,
                               examples_per_step=8, eval_every=2, eval_steps=2, save_every=2, max_examples=60,
                               device_type="cpu")
    mixture = sft.training_mixture(sft_config, limit=60)
    assert {"letters" in c for c in mixture} == {True, False}  # MMLU items among the conversations
    out, again = tmp_path / "sft", tmp_path / "again"
    metrics = sft.train(sft_config, base_dir, tiny_tokenizer_dir, out)
    assert metrics["steps"] == 4 and math.isfinite(metrics["val_loss"]) and not same_weights(out, base_dir)
    model, meta = load_model(out, "cpu")
    assert model.config.recipe == "2026" and meta["stage"] == "sft"
    rewind_to_first_checkpoint(out, again)
    assert sft.train(sft_config, base_dir, tiny_tokenizer_dir, again)["resumed_from_step"] == 2
    assert same_weights(again, out)


def global_stream_run(shards: str, tokenizer: str, out: str) -> None:
    """base.train with recipe 2026 where the ranks share one best-fit stream: the k-th micro-batch of the stream goes
    to rank k % world_size. With 2 micro-batches per step (2 ranks x 1, or 1 rank x 2), every world size trains on
    the same global batches, so the weights can be compared; the ranks' own streams (disjoint row groups) differ."""

    class GlobalStream:
        def __init__(self, shards, tokenizer, B, T, split, rank, world_size, device, state=None):
            self.inner = best_fit_loader(shards, tokenizer, B, T, split, 0, 1, device, state=state)
            self.rank, self.world_size = rank, world_size

        def __iter__(self):
            return self

        def __next__(self):
            return [next(self.inner) for _ in range(self.world_size)][self.rank]

        def state_dict(self) -> dict:
            return self.inner.state_dict()

        def close(self) -> None:
            self.inner.close()

    best_fit_loader, base.BestFitLoader = base.BestFitLoader, GlobalStream
    config = config_from_dict(base.BaseTrainConfig, {**RECIPE_2026, "depth": 2, "total_batch_size": 1024,
                                                     "device_batch_size": 2, "num_iterations": 6, "eval_every": -1,
                                                     "device_type": "cpu"})
    base.train(config, shards, tokenizer, out)


def test_two_ranks_equal_one_process_bitwise(shards_dir, tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """2 gloo ranks (DistMuon, DistAdamW: reduce-scatter, owner update, all-gather) and 1 process (Muon, AdamW,
    2 micro-batches accumulated) on the same global batches: the same weights, bit for bit."""
    script = [str(Path(__file__)), str(shards_dir), str(tiny_tokenizer_dir)]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *script, str(tmp_path / "two")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, env=env(), cwd=REPO)
    try:
        run_ok([sys.executable, *script, str(tmp_path / "one")])
        log, _ = two.communicate(timeout=300)
    finally:
        if two.poll() is None:
            two.kill()
            two.wait()
    assert two.returncode == 0, log[-4000:]
    assert json.loads((tmp_path / "two" / "checkpoints" / "step_000006" / "meta.json").read_text())["world_size"] == 2
    model, _ = load_model(tmp_path / "one", "cpu")
    assert model.config.value_embeds and model.config.residual_scalars and model.config.backout
    assert same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_two_ranks_sigterm_then_resume_of_a_2026_run_is_bitwise(shards_dir, tiny_tokenizer_dir, tmp_path):  # noqa: F811
    """As test_train's November one: each rank its own best-fit stream, SIGTERM, resume, bitwise."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    overrides = {**RECIPE_2026, "num_iterations": 12, "save_every": 4, "eval_every": 6}
    run_ok(base_command(shards_dir, tiny_tokenizer_dir, ref, nproc=2, **overrides))
    cmd = base_command(shards_dir, tiny_tokenizer_dir, out, nproc=2, **overrides)
    code, log = interrupt_after_first_checkpoint(cmd, signal.SIGTERM)
    assert code != 0 and latest_checkpoint(out) is not None, log[-2000:]
    run_ok(cmd)
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] > 0
    assert same_weights(out, ref)


if __name__ == "__main__":
    global_stream_run(*sys.argv[1:4])
