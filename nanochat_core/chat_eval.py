"""Chat evaluation: ARC-Easy, ARC-Challenge, MMLU (categorical), GSM8K, HumanEval and SpellingBee (generative),
plus ChatCORE.

Categorical tasks render the question with render_for_completion (ends with <|assistant_start|>), run the
batch right-padded, and pick the answer as the argmax of the logits at the last prompt position restricted
to the choice letters' tokens: the model is never asked to produce free text, so even a small model gets a
fair score. GSM8K samples a full answer with the Engine (calculator tool included) and compares the
'#### N' number exactly. HumanEval samples a function and runs it against the problem's tests in the
sandbox (nanochat_core.sandbox: separate process, time/memory limits, no network). SpellingBee (256 synthetic
"how many <letter> in <word>" test items, see tasks.spelling_bee) is scored like GSM8K. ChatCORE centers each
accuracy on its random baseline, (acc - b) / (1 - b), and averages over the CHATCORE_TASKS that ran (ARC-Easy,
ARC-Challenge, MMLU, GSM8K, HumanEval: upstream's published 5-task ChatCORE); SpellingBee is reported beside
it, never in the mean. The result names the tasks the mean is over, since a mean over fewer tasks is another
metric.

Items are strided across ranks when launched with torchrun, and the counts are all-reduced, so the numbers
do not depend on the world size. Run as a stage:
    python -m nanochat_core.chat_eval --model DIR --tokenizer DIR --out DIR [--tasks ARC-Easy,GSM8K] [--max-per-task N]
"""

from __future__ import annotations

import argparse
import json
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat_core import tasks
from nanochat_core.checkpoint import load_model
from nanochat_core.common import cleanup_distributed, init_distributed
from nanochat_core.config import ConfigError, add_config_arguments, config_from_args, config_to_dict
from nanochat_core.engine import Engine
from nanochat_core.fileio import atomic_write_bytes
from nanochat_core.progress import emit_progress, print0
from nanochat_core.sandbox import run_code
from nanochat_core.tokenizer import Tokenizer

# random-guess accuracy
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
             "SpellingBee": 0.0}
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")  # what ChatCORE averages (5-task)
VALID_TASKS = tuple(BASELINES)
SPELLING_BEE_SIZE = 256  # upstream's SpellingBee test set
DEVICE_TYPES = ("", "cpu", "cuda", "mps")
NUM_SAMPLES_KEPT = 3  # sample completions per task written to results.json
HUMANEVAL_TIMEOUT = 5.0  # seconds per program in the sandbox (the canonical solutions need well under 1 s)


@dataclass(frozen=True)
class ChatEvalConfig:
    tasks: str = "ARC-Easy,GSM8K"  # comma-separated, from VALID_TASKS
    max_per_task: int = -1  # -1 = every test item; else a seeded random subset of this size
    batch_size: int = 8  # prompts per forward pass for the categorical tasks
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 50  # 0 = no top-k filtering
    num_samples: int = 1  # generative: a problem passes if any sample is right
    device_type: str = ""  # "" = autodetect
    seed: int = 42

    def task_names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def validate(self) -> None:
        names = self.task_names()
        if not names:
            raise ConfigError(f"ChatEvalConfig.tasks: no task given; valid tasks are {', '.join(VALID_TASKS)}")
        unknown = [t for t in names if t not in BASELINES]
        if unknown:
            raise ConfigError(
                f"ChatEvalConfig.tasks: unknown task(s) {unknown}; valid tasks are {', '.join(VALID_TASKS)}"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"ChatEvalConfig.tasks: a task is listed twice in {self.tasks!r}")
        if self.max_per_task != -1 and self.max_per_task < 1:
            raise ConfigError(f"ChatEvalConfig.max_per_task must be -1 (all) or >= 1, got {self.max_per_task}")
        for name in ("batch_size", "max_new_tokens", "num_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ChatEvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ConfigError(f"ChatEvalConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"ChatEvalConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.device_type not in DEVICE_TYPES:
            raise ConfigError(f"ChatEvalConfig.device_type must be one of {DEVICE_TYPES}, got {self.device_type!r}")


# -----------------------------------------------------------------------------
# data

def load_task(name: str) -> list[dict]:
    """The test split of a chat eval task, as conversations."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return tasks.arc(name, "test")
    if name == "MMLU":
        return tasks.mmlu("test")
    if name == "GSM8K":
        return tasks.gsm8k("test")
    if name == "HumanEval":
        return tasks.humaneval()
    if name == "SpellingBee":
        return tasks.spelling_bee(SPELLING_BEE_SIZE, "test")
    raise ConfigError(f"unknown task {name!r}; valid tasks are {', '.join(VALID_TASKS)}")


def eval_subset(items: list[dict], max_per_task: int, seed: int) -> list[dict]:
    """A seeded shuffle cropped to max_per_task (MMLU is sorted by subject: a plain crop would be one subject)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return items if max_per_task == -1 else items[:max_per_task]


def context_length(model: torch.nn.Module) -> int:
    return int(model.config.sequence_len)


# -----------------------------------------------------------------------------
# categorical tasks

def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    """The single token of each choice letter (the prompt writes '=A', so 'A' is the token to score)."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"choice letter {letter!r} is not a single token in this tokenizer: {encoded}")
        ids.append(encoded[0])
    return ids


def categorical_prompt(tokenizer, conversation: dict, max_len: int) -> list[int]:
    """Prompt ids ending with <|assistant_start|>, left-cropped to the model's context if needed."""
    return tokenizer.render_for_completion(conversation)[-max_len:]


@torch.no_grad()
def predict_letters(model: torch.nn.Module, tokenizer, conversations: list[dict]) -> list[str]:
    """One batch: the choice letter whose token has the highest logit after each prompt."""
    device = next(model.parameters()).device
    prompts = [categorical_prompt(tokenizer, c, context_length(model)) for c in conversations]
    width = max(len(p) for p in prompts)
    pad = tokenizer.get_bos_token_id()  # padding sits after the answer position: causal attention ignores it
    batch = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    logits = model(batch)
    predictions = []
    for row, (prompt, conversation) in enumerate(zip(prompts, conversations, strict=True)):
        letter_ids = letter_token_ids(tokenizer, conversation["letters"])
        focus = logits[row, len(prompt) - 1, letter_ids]
        predictions.append(conversation["letters"][int(focus.argmax().item())])
    return predictions


def run_categorical(model, tokenizer, items: list[dict], batch_size: int, progress) -> tuple[int, int, list[dict]]:
    """Correct count, cropped-prompt count and a few samples over `items` (this rank's share)."""
    correct, cropped, samples = 0, 0, []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        cropped += sum(len(tokenizer.render_for_completion(c)) > context_length(model) for c in batch)
        for item, predicted in zip(batch, predict_letters(model, tokenizer, batch), strict=True):
            correct += int(predicted == item["answer"])
            if len(samples) < NUM_SAMPLES_KEPT:
                samples.append({"prompt": item["messages"][0]["content"], "completion": predicted,
                                "answer": item["answer"], "correct": predicted == item["answer"]})
        progress(start + len(batch), correct)
    return correct, cropped, samples


# -----------------------------------------------------------------------------
# generative tasks

def gsm8k_is_correct(item: dict, completion: str) -> bool:
    predicted = tasks.extract_gsm8k_answer(completion)
    return predicted is not None and predicted == item["answer"]


def humaneval_is_correct(item: dict, completion: str) -> bool:
    """Run the completion against the problem's tests in the sandbox; any failure (wrong answer, exception,
    timeout, memory, a blocked call, an exit before the tests ran to their end, even with status 0) counts as
    incorrect."""
    return run_code(tasks.humaneval_program(item, completion), timeout=HUMANEVAL_TIMEOUT).success


GENERATIVE_CHECKS = {"GSM8K": gsm8k_is_correct, "HumanEval": humaneval_is_correct,
                     "SpellingBee": gsm8k_is_correct}  # SpellingBee ends with '#### N' too


def generation_budget(prompt: list[int], max_new_tokens: int, max_len: int) -> tuple[list[int], int]:
    """Fit prompt + generation into the model's context: keep at least min(max_new_tokens, max_len // 2)
    tokens for the answer (left-cropping a long prompt), and never generate past the context."""
    reserve = min(max_new_tokens, max_len // 2)
    prompt = prompt[-(max_len - reserve):]
    return prompt, min(max_new_tokens, max_len - len(prompt))


def run_generative(model, tokenizer, items: list[dict], config: ChatEvalConfig, first_index: int, stride: int,
                   progress, is_correct=gsm8k_is_correct) -> tuple[int, int, list[dict]]:
    """Correct count, cropped-prompt count and a few samples over `items` (this rank's share)."""
    engine = Engine(model, tokenizer)
    correct, cropped, samples = 0, 0, []
    for k, item in enumerate(items):
        full_prompt = tokenizer.render_for_completion(item)
        prompt, max_tokens = generation_budget(full_prompt, config.max_new_tokens, context_length(model))
        cropped += int(len(prompt) < len(full_prompt))
        results, _ = engine.generate_batch(
            prompt, num_samples=config.num_samples, max_tokens=max_tokens, temperature=config.temperature,
            top_k=config.top_k or None, seed=config.seed + first_index + k * stride,
        )
        completions = [tokenizer.decode(r[len(prompt):]) for r in results]
        passed = any(is_correct(item, c) for c in completions)
        correct += int(passed)
        if len(samples) < NUM_SAMPLES_KEPT:
            samples.append({"prompt": item["messages"][0]["content"], "completion": completions[0],
                            "answer": item["answer"], "correct": passed})
        progress(k + 1, correct)
    return correct, cropped, samples


# -----------------------------------------------------------------------------
# the evaluation

def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_counts(counts: list[int], device: torch.device) -> list[int]:
    if rank_and_world()[1] == 1:
        return counts
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(x) for x in t.tolist()]


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_task(config: ChatEvalConfig, name: str, model, tokenizer) -> dict[str, Any]:
    """One task on every rank (items strided across ranks, counts all-reduced): {accuracy, n, correct,
    cropped, centered, baseline, samples}. A rank may get no items (max_per_task < world size)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown task {name!r}; valid tasks are {', '.join(VALID_TASKS)}")
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    items = eval_subset(load_task(name), config.max_per_task, config.seed)
    mine = items[rank::world]

    def progress(done: int, correct: int) -> None:
        emit_progress(done * world, len(items), task=name, accuracy=correct / max(1, done))

    if name in CATEGORICAL:
        correct, cropped, samples = run_categorical(model, tokenizer, mine, config.batch_size, progress)
    else:
        correct, cropped, samples = run_generative(model, tokenizer, mine, config, rank, world, progress,
                                                   GENERATIVE_CHECKS[name])
    correct, total, cropped = all_reduce_counts([correct, len(mine), cropped], device)
    accuracy = correct / total if total else 0.0
    note = f" ({cropped} prompts left-cropped to the {context_length(model)}-token context)" if cropped else ""
    print0(f"{name}: {correct}/{total} = {accuracy:.4f}{note}")
    return {"accuracy": accuracy, "n": total, "correct": correct, "cropped": cropped,
            "centered": centered(accuracy, BASELINES[name]), "baseline": BASELINES[name], "samples": samples}


def chatcore(task_results: dict[str, dict]) -> tuple[float | None, list[str]]:
    """Mean centered accuracy over the CHATCORE_TASKS among `task_results`, and those tasks (None if none ran)."""
    names = [name for name in task_results if name in CHATCORE_TASKS]
    if not names:
        return None, []
    return sum(task_results[n]["centered"] for n in names) / len(names), names


def evaluate_tasks(config: ChatEvalConfig, model: torch.nn.Module, tokenizer, names: list[str]) -> dict[str, Any]:
    """Run `names` (any of VALID_TASKS) with config's settings. Returns {"tasks": {name: {accuracy, n,
    correct, centered, ...}}, "ChatCORE": mean centered accuracy over the ChatCORE tasks that ran (None if
    none did), "ChatCORE_tasks": those tasks}. SpellingBee is in "tasks" but never in ChatCORE."""
    config.validate()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    with autocast:
        for name in names:
            results[name] = evaluate_task(config, name, model, tokenizer)
    model.train(was_training)
    score, over = chatcore(results)
    return {"tasks": results, "ChatCORE": score, "ChatCORE_tasks": over}


def evaluate(config: ChatEvalConfig, model: torch.nn.Module, tokenizer) -> dict[str, Any]:
    """Every task of config.tasks: see evaluate_tasks."""
    return evaluate_tasks(config, model, tokenizer, config.task_names())


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """metrics.json: {"ARC-Easy": acc, ..., "ChatCORE": x}; no ChatCORE when none of its tasks ran."""
    metrics = {name: r["accuracy"] for name, r in results["tasks"].items()}
    if results["ChatCORE"] is not None:
        metrics["ChatCORE"] = results["ChatCORE"]
    return metrics


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval and SpellingBee "
                                                 "(ChatCORE).")
    parser.add_argument("--model", required=True, help="model directory (load_model)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory for results.json and metrics.json")
    add_config_arguments(parser, ChatEvalConfig)
    args = parser.parse_args(argv)
    config = config_from_args(ChatEvalConfig, args)
    info = init_distributed(config.device_type)
    try:
        model, meta = load_model(args.model, info.device, phase="eval")
        tokenizer = Tokenizer.load(args.tokenizer)
        results = evaluate(config, model, tokenizer)
        if info.is_master:
            out = Path(args.out)
            write_json(out / "results.json", {**results, "config": config_to_dict(config), "model": str(args.model),
                                              "step": meta.get("step")})
            write_json(out / "metrics.json", flat_metrics(results))
            if results["ChatCORE"] is not None:
                print0(f"ChatCORE over {', '.join(results['ChatCORE_tasks'])}: {results['ChatCORE']:.4f}")
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
