"""The eval stage (nanochat_core.eval): task choice by the model's phase, CORE and chat tasks in one run,
metrics.json's shape, and bad input through the CLI."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from nanochat_core import chat_eval
from nanochat_core.checkpoint import save_final_model
from nanochat_core.config import ConfigError, config_from_dict
from nanochat_core.eval import EvalConfig, evaluate, flat_metrics
from nanochat_core.gpt import GPT, config_for_depth


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(config_for_depth(1, tokenizer.get_vocab_size(), 256))
    gpt.init_weights()
    return gpt.eval()


def test_auto_tasks_follow_the_models_phase():
    config = EvalConfig()
    assert config.task_names_for("base") == ["CORE"]
    assert config.task_names_for("sft") == list(chat_eval.VALID_TASKS)
    assert config.task_names_for("rl") == ["GSM8K"]
    with pytest.raises(ConfigError, match="phase"):
        config.task_names_for(None)
    assert EvalConfig(tasks="CORE, MMLU").task_names_for(None) == ["CORE", "MMLU"]


def test_bad_configs_name_the_problem():
    with pytest.raises(ConfigError, match="unknown task.*HellaSwag"):
        config_from_dict(EvalConfig, {"tasks": "CORE,HellaSwag"}).validate()
    with pytest.raises(ConfigError, match="empty"):
        config_from_dict(EvalConfig, {"tasks": " , "}).validate()
    with pytest.raises(ConfigError, match="max_per_task"):
        config_from_dict(EvalConfig, {"max_per_task": 0}).validate()


def test_core_and_chat_tasks_in_one_run(model, tokenizer):
    config = EvalConfig(tasks="CORE,ARC-Easy,SpellingBee", max_per_task=1, max_new_tokens=8)
    results = evaluate(config, model, tokenizer, phase="sft")
    assert len(results["core_tasks"]) == 22 and -1.5 < results["CORE"] <= 1
    assert set(results["tasks"]) == {"ARC-Easy", "SpellingBee"}
    # ChatCORE is over the ChatCORE tasks that ran: SpellingBee is reported beside it, not in it
    assert results["ChatCORE_tasks"] == ["ARC-Easy"]
    assert results["ChatCORE"] == pytest.approx(results["tasks"]["ARC-Easy"]["centered"])
    metrics = flat_metrics(results, "sft", 12)
    assert set(metrics) == {"phase", "step", "CORE", "ARC-Easy", "SpellingBee", "ChatCORE"}
    assert metrics["phase"] == "sft" and metrics["step"] == 12


def test_cli_on_a_saved_base_model(model, tiny_tokenizer_dir, tmp_path):
    model_dir = tmp_path / "base"
    save_final_model(model_dir, model, {"model_config": asdict(model.config), "stage": "base", "step": 3})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nanochat_core.eval", "--model", str(model_dir), "--tokenizer",
           str(tiny_tokenizer_dir), "--out", str(out), "--max-per-task", "1", "--device-type", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["phase"] == "base" and metrics["step"] == 3 and "CORE" in metrics  # auto: CORE for a base model
    assert "ARC-Easy" not in metrics
    assert json.loads((out / "results.json").read_text())["model"] == str(model_dir)

    bad = subprocess.run([*cmd[:-4], "--tasks", "CORE,Nope"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "unknown task" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([*cmd[:4], str(tmp_path / "nowhere"), *cmd[5:]], capture_output=True, text=True,
                             timeout=120, env=env)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
