"""Reinforcement learning on GSM8K (upstream's chat_rl.py): on-policy sampling and a plain policy gradient.

    torchrun --standalone --nproc_per_node=8 -m nanochat_core.train.rl --model SFT_DIR --tokenizer DIR --out DIR
    python -m nanochat_core.train.rl --model DIR --tokenizer DIR --out DIR --num-iterations 20 --num-samples 8 \\
        --max-new-tokens 128 --max-eval 64

Algorithm (upstream's simplified GRPO, in effect REINFORCE): each step, every rank takes its own questions of
GSM8K train (rank r: questions r, r+W, ... of a seeded shuffle, cycling), samples num_samples answers to each
with the Engine (calculator tool included), rewards an answer 1 if its '#### N' is the exact answer, else 0, and
weights it by advantage = reward - mean reward of the question's samples (no std normalisation, no KL to a
reference model, no PPO ratio or clipping: the samples are on-policy). Loss = -sum(logp(token) * advantage)
over the sampled assistant tokens only (the prompt and the calculator's forced output, engine mask 0, are
targets -1), divided per forward pass by its supervised tokens, the passes and the questions per rank. The
distributed optimizers average the gradients across ranks. LR = init_lr_frac x the base LRs, then 1 - it/N.

Evaluation: pass@1..pass@k (k = eval_samples answers per question, at the training temperature) on the first
max_eval questions of a seeded shuffle of GSM8K test, at step 0, every eval_every steps and at the end.

Exact resume: a step's questions are a function of the step, and every generate call is seeded from (seed,
step, question, pass), so the checkpoint (weights, optimizer shards, step, and the RNG states every checkpoint
keeps) determines the rest of the run: a resumed run is bitwise equal to an uninterrupted one on CPU.
Writes model.pt + meta.json and, last, metrics.json {"GSM8K": pass@1, "pass@1".."pass@k", "reward", "loss",
"steps", "examples", "train_seconds", "resumed_from_step"}.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_core import tasks
from nanochat_core.chat_eval import eval_subset, generation_budget, gsm8k_is_correct
from nanochat_core.common import DistInfo, init_distributed
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.device import autocast_context
from nanochat_core.engine import Engine
from nanochat_core.progress import print0
from nanochat_core.stage_cli import training_main
from nanochat_core.tokenizer import Tokenizer
from nanochat_core.train.common import (
    Preemption,
    Session,
    check_device_type,
    config_optimizers,
    load_upstream_model,
    loop_state,
    optimizer_step,
    report_step,
    seed_everything,
    sft_lr_multiplier,
)
from nanochat_core.wandb_log import WandbLog


@dataclass(frozen=True)
class RLConfig:
    num_epochs: int = 1  # passes over GSM8K train (when num_iterations <= 0)
    num_iterations: int = -1  # optimizer steps; <= 0: num_epochs * questions // examples_per_step
    max_examples: int = -1  # > 0: train on only this many questions of the shuffled train set (quick runs)
    examples_per_step: int = 16  # questions per optimizer step, all ranks
    num_samples: int = 16  # answers sampled per question
    device_batch_size: int = 8  # rows per sampling / training forward pass
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50  # 0 = no top-k filtering
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.05
    eval_every: int = 60  # <= 0: only at the end
    max_eval: int = 400  # GSM8K test questions per evaluation; -1 = all 1319
    eval_samples: int = 8  # answers per eval question: the k of pass@k
    save_every: int = 60  # <= 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 42
    device_type: str = ""

    def validate(self) -> None:
        for name in ("num_epochs", "examples_per_step", "device_batch_size", "max_new_tokens", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 2:
            raise ConfigError(f"RLConfig.num_samples must be >= 2 (the advantage is a sample's reward minus the "
                              f"mean over the question's samples), got {self.num_samples}")
        if self.max_eval != -1 and self.max_eval < 1:
            raise ConfigError(f"RLConfig.max_eval must be -1 (all) or >= 1, got {self.max_eval}")
        if self.temperature <= 0:
            raise ConfigError(f"RLConfig.temperature must be > 0 (on-policy sampling), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"RLConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.init_lr_frac <= 1:
            raise ConfigError(f"RLConfig.init_lr_frac must be in (0, 1], got {self.init_lr_frac}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"RLConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_device_type("RLConfig", self.device_type)

    def examples_per_rank(self, world_size: int) -> int:
        if self.examples_per_step % world_size:
            raise ConfigError(f"RLConfig.examples_per_step={self.examples_per_step} must be a multiple of the "
                              f"world size {world_size}")
        return self.examples_per_step // world_size


# ---------------------------------------------------------------------------------------------
# data and seeds

def train_questions(config: RLConfig) -> list[dict]:
    """GSM8K train in a seeded shuffle, cut to max_examples (the same list on every rank)."""
    items = eval_subset(tasks.gsm8k("train"), -1, config.seed)
    return items[: config.max_examples] if config.max_examples > 0 else items


def eval_questions(config: RLConfig) -> list[dict]:
    return eval_subset(tasks.gsm8k("test"), config.max_eval, config.seed)


def sample_seed(*parts: object) -> int:
    """A 31-bit seed from the parts: stable across processes and platforms (str seeding hashes with sha512)."""
    return random.Random("/".join(map(str, parts))).getrandbits(31)


def chunk_sizes(total: int, size: int) -> list[int]:
    """`total` rows in passes of at most `size`."""
    return [min(size, total - start) for start in range(0, total, size)]


# ---------------------------------------------------------------------------------------------
# rollouts and the policy-gradient loss

@dataclass
class Rollout:
    sequences: list[list[int]]  # prompt + sampled answer (terminal token excluded), one per sample
    masks: list[list[int]]  # 1 = sampled by the model, 0 = prompt or forced tool output
    rewards: list[float]


@torch.no_grad()
def sample_answers(engine: Engine, tokenizer: Tokenizer, item: dict, num_samples: int, config: RLConfig,
                   seed_parts: tuple, max_len: int) -> Rollout:
    """num_samples answers to one question, in passes of device_batch_size, each pass with its own seed."""
    prompt, max_tokens = generation_budget(tokenizer.render_for_completion(item), config.max_new_tokens, max_len)
    sequences, masks = [], []
    for p, n in enumerate(chunk_sizes(num_samples, config.device_batch_size)):
        seqs, ms = engine.generate_batch(prompt, num_samples=n, max_tokens=max_tokens, temperature=config.temperature,
                                         top_k=config.top_k or None, seed=sample_seed(*seed_parts, p))
        sequences += seqs
        masks += ms
    rewards = [float(gsm8k_is_correct(item, tokenizer.decode(s[len(prompt):]))) for s in sequences]
    return Rollout(sequences, masks, rewards)


def policy_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for rows of different lengths: padded with pad_id; a target is -1 unless the model
    sampled that token (prompt, forced calculator output and padding are not trained on)."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.long)
    targets = ids[:, 1:].clone()
    targets[mask[:, 1:] == 0] = -1
    return ids[:, :-1].to(device), targets.to(device)


def policy_gradient_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         advantages: torch.Tensor) -> torch.Tensor:
    """-mean over the supervised tokens of logp(token) * advantage of its row (0 if there are none)."""
    logp = -model(inputs, targets, loss_reduction="none").view_as(inputs)  # 0 where the target is -1
    return -(logp * advantages[:, None]).sum() / (targets >= 0).sum().clamp(min=1)


def all_reduce_mean(values: list[float], d: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.is_distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / d.world_size).tolist()


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate_gsm8k(engine: Engine, tokenizer: Tokenizer, items: list[dict], config: RLConfig, d: DistInfo,
                   max_len: int) -> dict[str, float]:
    """{"pass@1": .., ..., "pass@k": ..}: the share of questions with a right answer among the first j samples
    (collective: questions strided across ranks, counts all-reduced)."""
    k = config.eval_samples
    hits = torch.zeros(k + 1, dtype=torch.float64, device=d.device)  # hits[j-1] = pass@j count, hits[k] = questions
    for i in range(d.rank, len(items), d.world_size):
        rollout = sample_answers(engine, tokenizer, items[i], k, config, (config.seed, "eval", i), max_len)
        first_right = next((j for j, r in enumerate(rollout.rewards) if r > 0), k)
        hits[first_right:k] += 1
        hits[k] += 1
    if d.is_distributed:
        dist.all_reduce(hits, op=dist.ReduceOp.SUM)
    n = max(1.0, hits[k].item())
    return {f"pass@{j + 1}": hits[j].item() / n for j in range(k)}


# ---------------------------------------------------------------------------------------------
# training

def train(config: RLConfig, model_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """RL-train the chat model in model_dir (or resume) into out_dir; returns the metrics written to metrics.json."""
    config.validate()
    out_dir = Path(out_dir)
    d = init_distributed(config.device_type)
    seed_everything(config.seed)
    per_rank = config.examples_per_rank(d.world_size)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model, sft_meta = load_upstream_model(model_dir, tokenizer.get_vocab_size(), d.device)
    max_len = model.config.sequence_len
    questions, eval_items = train_questions(config), eval_questions(config)
    mine = list(range(d.rank, len(questions), d.world_size))
    if not mine:
        raise ConfigError(f"rank {d.rank} got no training questions ({len(questions)} for {d.world_size} ranks)")
    num_iterations = config.num_iterations if config.num_iterations > 0 else max(
        1, config.num_epochs * len(questions) // config.examples_per_step)
    optimizers = config_optimizers(model, config)
    print0(f"rl: {len(questions):,} questions, {num_iterations} steps of {config.examples_per_step} questions x "
           f"{config.num_samples} samples, world {d.world_size}")

    session = Session(out_dir, "rl", d, model, optimizers, keep=config.keep_checkpoints)
    cfg = config_to_dict(config)
    resumed = session.resume(cfg)
    start = resumed.step if resumed else 0
    loop = loop_state(resumed, reward=None, loss=None, eval=None)
    engine, autocast = Engine(model, tokenizer), autocast_context(d.device)
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    def meta() -> dict:
        return {"stage": "rl", "model_config": sft_meta["model_config"], "config": cfg, "loop_state": loop,
                "num_iterations": num_iterations}

    def save(step: int) -> Path:
        return session.save(step, meta(), {"questions_done": step * per_rank})

    with Preemption() as preempt, WandbLog.start("nanochat-rl", cfg, d) as wandb:
        for step in range(start, num_iterations + 1):
            session.stop_if_diverged_or_preempted(preempt, step, start, lambda: save(step))  # noqa: B023 - runs now
            last = step == num_iterations
            if last or (config.eval_every > 0 and step % config.eval_every == 0):
                model.eval()
                with autocast:
                    loop["eval"] = evaluate_gsm8k(engine, tokenizer, eval_items, config, d, max_len)
                wandb.log(step, **loop["eval"])
                print0(f"step {step}/{num_iterations}: " + ", ".join(f"{k} {v:.4f}" for k, v in loop["eval"].items()))
            if step > start and (last or (config.save_every > 0 and step % config.save_every == 0)):
                save(step)
            if last:
                break
            t0 = time.time()
            rewards, lengths, loss_sum = [], [], torch.zeros((), device=d.device)
            for k in range(per_rank):
                index = mine[(step * per_rank + k) % len(mine)]
                model.eval()
                with autocast:
                    rollout = sample_answers(engine, tokenizer, questions[index], config.num_samples, config,
                                             (config.seed, step, index), max_len)
                model.train()
                reward = torch.tensor(rollout.rewards, device=d.device)
                advantages = reward - reward.mean()  # no std normalisation, as upstream
                starts = range(0, config.num_samples, config.device_batch_size)
                for b0 in starts:
                    rows = slice(b0, b0 + config.device_batch_size)
                    inputs, targets = policy_batch(rollout.sequences[rows], rollout.masks[rows], pad_id, d.device)
                    with autocast:
                        loss = policy_gradient_loss(model, inputs, targets, advantages[rows])
                    loss = loss / (len(starts) * per_rank)
                    loss.backward()
                    loss_sum += loss.detach()
                rewards += rollout.rewards
                lengths += [len(s) for s in rollout.sequences]
            lrm = sft_lr_multiplier(step, num_iterations)
            optimizer_step(model, optimizers, lrm)  # Muon momentum stays at 0.95, as upstream's RL
            session.check_weights(step + 1)  # next comes sampling, which non-finite weights crash (cheap next to it)
            loop["reward"], loop["loss"], mean_len = all_reduce_mean(
                [sum(rewards) / len(rewards), loss_sum.item(), sum(lengths) / len(lengths)], d)
            session.record_loss(step + 1, loop["loss"])  # already on the host: no extra sync
            dt = time.time() - t0
            loop["train_seconds"] += dt
            print0(f"step {step + 1}/{num_iterations}: reward {loop['reward']:.4f}, sequence length {mean_len:.1f}")
            wandb.log(step + 1, reward=loop["reward"], sequence_length=mean_len)
            tokens = round(mean_len * config.examples_per_step * config.num_samples)  # sequences trained on, all ranks
            report_step(step, num_iterations, wandb, loop["loss"], lrm, tokens, dt, curve=loop["loss_curve"])

    evals = loop["eval"] or {}
    metrics = {
        "GSM8K": evals.get("pass@1"),
        **evals,
        "reward": loop["reward"],
        "loss": loop["loss"],
        "steps": num_iterations,
        "examples": num_iterations * config.examples_per_step,
        "train_seconds": round(loop["train_seconds"], 3),
        "resumed_from_step": start,
    }
    return session.finish({**meta(), "step": num_iterations}, metrics)


def main(argv: list[str] | None = None) -> None:
    training_main(argv, __doc__, RLConfig, (("model", "the SFT stage's output directory (model.pt + meta.json)"),
                  ("tokenizer", "tokenizer directory")), train)


if __name__ == "__main__":
    main()
