"""The eval stage: one model (a stage's final model or any training checkpoint) on a set of tasks.

Tasks are CORE (the 22 DCLM tasks, nanochat_core.core_eval: how a base model is judged) and the chat tasks
of nanochat_core.chat_eval (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee). `tasks="auto"`
picks by the model's phase, read from its meta.json ("stage"), as nanochat's report card does:
    base -> CORE        mid, sft -> every chat task        rl -> GSM8K
so the pipeline runs this one stage after each training stage, and the evaluate flow runs it on any
checkpoint. Writes results.json (everything, samples included) and metrics.json (one number per task,
plus CORE / ChatCORE when their tasks ran, and the model's phase and step).

    python -m nanochat_core.eval --model DIR --tokenizer DIR --out DIR [--tasks auto|CORE,GSM8K,...] [--max-per-task N]
    torchrun --nproc_per_node=8 -m nanochat_core.eval ...     (items strided across ranks; same numbers)
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from nanochat_core import chat_eval, core_eval
from nanochat_core.chat_eval import ChatEvalConfig, write_json
from nanochat_core.checkpoint import load_model
from nanochat_core.common import cleanup_distributed, init_distributed
from nanochat_core.config import ConfigError, add_config_arguments, config_from_args, config_to_dict
from nanochat_core.stage_cli import run_cli
from nanochat_core.tokenizer import Tokenizer

CORE = "CORE"
AUTO_TASKS = {"base": (CORE,), "mid": chat_eval.VALID_TASKS, "sft": chat_eval.VALID_TASKS, "rl": ("GSM8K",)}


@dataclass(frozen=True)
class EvalConfig(ChatEvalConfig):
    tasks: str = "auto"  # "auto" (by the model's phase, see the module doc) or a comma list of CORE and chat tasks

    def validate(self) -> None:
        names = self.requested()
        if not names and self.tasks.strip() != "auto":
            raise ConfigError("tasks is empty; give 'auto' or a comma-separated list")
        unknown = [n for n in names if n not in (CORE, *chat_eval.VALID_TASKS)]
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}; valid: auto, {CORE}, "
                              f"{', '.join(chat_eval.VALID_TASKS)}")
        self.chat_config(["ARC-Easy"]).validate()  # every other field, checked where it is defined

    def requested(self) -> list[str]:
        return [] if self.tasks.strip() == "auto" else [t.strip() for t in self.tasks.split(",") if t.strip()]

    def task_names_for(self, phase: str | None) -> list[str]:
        """The tasks to run on a model of this phase."""
        if self.tasks.strip() != "auto":
            return self.requested()
        if phase not in AUTO_TASKS:
            raise ConfigError(f"tasks=auto needs the model's phase (meta.json 'stage': one of "
                              f"{', '.join(AUTO_TASKS)}), got {phase!r}; name the tasks instead")
        return list(AUTO_TASKS[phase])

    def chat_config(self, names: list[str]) -> ChatEvalConfig:
        return ChatEvalConfig(**{**asdict(self), "tasks": ",".join(names)})


def evaluate(config: EvalConfig, model: torch.nn.Module, tokenizer, phase: str | None) -> dict[str, Any]:
    """{"tasks": {name: {...}}, "CORE"?: x, "core_tasks"?: {...}, "ChatCORE"?: x, "ChatCORE_tasks"?: [...]}."""
    config.validate()
    names = config.task_names_for(phase)
    model.eval()
    out: dict[str, Any] = {"tasks": {}}
    if CORE in names:
        # CORE keeps upstream's seed (its item order and few-shot draws); `seed` is for the chat tasks' subsets
        core = core_eval.evaluate_core(model, tokenizer, max_per_task=config.max_per_task)
        out["CORE"], out["core_tasks"] = core["CORE"], core["tasks"]
    chat_names = [n for n in names if n != CORE]
    if chat_names:
        chat = chat_eval.evaluate_tasks(config.chat_config(chat_names), model, tokenizer, chat_names)
        out["tasks"] = chat["tasks"]
        if chat["ChatCORE"] is not None:
            out["ChatCORE"], out["ChatCORE_tasks"] = chat["ChatCORE"], chat["ChatCORE_tasks"]
    return out


def flat_metrics(results: dict[str, Any], phase: str | None, step: int | None) -> dict[str, Any]:
    """metrics.json: one number per task (accuracy), CORE and ChatCORE when they ran, the model's phase/step."""
    metrics: dict[str, Any] = {"phase": phase, "step": step}
    if CORE in results:
        metrics[CORE] = results[CORE]
    metrics.update({name: r["accuracy"] for name, r in results["tasks"].items()})
    if "ChatCORE" in results:
        metrics["ChatCORE"] = results["ChatCORE"]
    return metrics


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = config_from_args(EvalConfig, args)
    config.validate()
    info = init_distributed(config.device_type)
    try:
        model, meta = load_model(args.model, info.device, phase="eval")
        tokenizer = Tokenizer.load(args.tokenizer)
        phase, step = meta.get("stage"), meta.get("step")
        results = evaluate(config, model, tokenizer, phase)
        metrics = flat_metrics(results, phase, step)
        if info.is_master:
            out = Path(args.out)
            write_json(out / "results.json", {**results, "config": config_to_dict(config), "model": str(args.model),
                                              "phase": phase, "step": step})
            write_json(out / "metrics.json", metrics)
        return metrics
    finally:
        cleanup_distributed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory: a stage's output or a checkpoint step dir")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory for results.json and metrics.json")
    add_config_arguments(parser, EvalConfig)
    run_cli(parser, argv, run)


if __name__ == "__main__":
    main()
