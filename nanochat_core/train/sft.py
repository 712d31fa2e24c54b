"""Supervised fine-tuning on conversations: the loss covers the assistant's tokens only.

    torchrun --standalone --nproc_per_node=8 -m nanochat_core.train.sft --mid DIR --tokenizer DIR --out DIR
    python -m nanochat_core.train.sft --mid DIR --tokenizer DIR --out DIR --num-iterations 60 \\
        --device-batch-size 8 --max-seq-len 256 --max-examples 2000

Data: nanochat_core.tasks.mixture("sft") (ARC-Easy/Challenge train, GSM8K train, conversations); rank r takes
conversations r, r+W, ... One conversation per row (cropped to T+1 tokens), padded to the longest row of
the micro-batch; targets are -1 where the mask is 0 (prompt, tool output) and on padding. A step sees
`examples_per_step` conversations over all ranks; its loss is the mean over the step's supervised tokens,
so a micro-batch without any (all masked) adds nothing instead of NaN (upstream #590). LR = 1 - it/N with N
counting optimizer steps, not micro-batches (upstream PR #775). Checkpoints and resume as in base training.
Writes model.pt + meta.json and, last, metrics.json {"val_loss", "val_bpb", "steps", "examples", ...}.

recipe "2026" is upstream's SFT since 2026, which starts from the base model (a pipeline without midtraining
passes base's directory as --mid): the mixture SmolTalk + MMLU auxiliary_train x3 + GSM8K train x4 (+ identity
conversations x2, SimpleSpelling, SpellingBee, as upstream), validated on held-out SmolTalk + MMLU and GSM8K test;
LR flat for the first half, then linear to 0; Muon momentum 0.85 -> 0.95 over 300 steps. Upstream's LRs for it
(init_lr_frac 0.8 of base's) are in the presets. The optimizer groups are the model's own (a 2026 model gets its
own, see GPT.setup_optimizers), whatever the recipe here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat_core import tasks
from nanochat_core.common import init_distributed
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.device import autocast_context
from nanochat_core.loss_eval import evaluate
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
    muon_momentum,
    optimizer_step,
    report_step,
    seed_everything,
    sft_lr_multiplier,
    sft_lr_multiplier_2026,
)
from nanochat_core.wandb_log import WandbLog

RECIPES = ("nov2025", "2026")
MMLU_EPOCHS_2026, GSM8K_EPOCHS_2026, IDENTITY_EPOCHS_2026 = 3, 4, 2


@dataclass(frozen=True)
class SFTConfig:
    num_iterations: int = -1  # optimizer steps; <= 0: one pass over the mixture
    max_seq_len: int = 2048  # conversations are cropped to this (and to the model's sequence length)
    device_batch_size: int = 4  # conversations per forward pass per rank
    examples_per_step: int = 32  # conversations per optimizer step, all ranks
    max_examples: int = -1  # > 0: use only this many conversations of the mixture (quick runs)
    identity_conversations: str = ""  # conversations file (path or URL) saying who the model is; "" = none
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.02
    eval_every: int = 100  # <= 0: only at the end
    eval_steps: int = 100  # validation micro-batches per rank
    save_every: int = -1  # <= 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 42
    device_type: str = ""
    recipe: str = "nov2025"  # "2026": upstream's 2026 SFT mixture and schedules (module docstring)

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"SFTConfig.recipe must be one of {RECIPES}, got {self.recipe!r}")
        for name in ("max_seq_len", "device_batch_size", "examples_per_step", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.init_lr_frac <= 1:
            raise ConfigError(f"SFTConfig.init_lr_frac must be in (0, 1], got {self.init_lr_frac}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_device_type("SFTConfig", self.device_type)

    def grad_accum(self, world_size: int) -> int:
        per_pass = self.device_batch_size * world_size
        if self.examples_per_step % per_pass:
            raise ConfigError(f"SFTConfig.examples_per_step={self.examples_per_step} must be a multiple of "
                              f"device_batch_size * world_size = {self.device_batch_size} * {world_size}")
        return self.examples_per_step // per_pass


class ConversationBatches:
    """Endless (x, y) micro-batches, one rendered conversation per row; state = (epoch, cursor)."""

    def __init__(self, rendered: list[tuple[list[int], list[int]]], B: int, pad_id: int, device: torch.device,
                 state: dict | None = None):
        if not rendered:
            raise ConfigError("no conversations for this rank: use more data (max_examples) or fewer ranks")
        self.rendered, self.B, self.pad_id, self.device = rendered, B, pad_id, device
        self.epoch, self.cursor = (state["epoch"], state["cursor"]) if state else (0, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def _take(self) -> tuple[list[int], list[int]]:
        item = self.rendered[self.cursor]
        self.cursor += 1
        if self.cursor == len(self.rendered):
            self.epoch, self.cursor = self.epoch + 1, 0
        return item

    def __iter__(self) -> ConversationBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._take() for _ in range(self.B)]
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((self.B, width), self.pad_id, dtype=torch.long)
        y = torch.full((self.B, width), -1, dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[i, :n] = torch.tensor(ids[:-1])
            y[i, :n] = torch.where(torch.tensor(mask[1:]) == 1, torch.tensor(ids[1:]), -1)
        return x.to(self.device), y.to(self.device)


def mixture_sources_2026(split: str = "train", identity: str = "") -> list[list[dict]]:
    """The 2026 SFT mixture's task lists (upstream's chat_sft since 2026). Val: held-out conversations + MMLU and
    GSM8K test, as upstream's (and our midtraining's) validation mixture."""
    if split == "val":
        return tasks.mixture_sources("mid", "val")
    conversations = tasks.smoltalk("train")
    n_simple, n_bee = tasks.spelling_sizes("mid", len(conversations))  # upstream's 200K + 80K beside 460K
    identities = [tasks.load_conversations(identity)[0]] * IDENTITY_EPOCHS_2026 if identity else []
    return [conversations, *[tasks.mmlu_auxiliary_train()] * MMLU_EPOCHS_2026,
            *[tasks.gsm8k("train")] * GSM8K_EPOCHS_2026, *identities,
            tasks.simple_spelling(n_simple), tasks.spelling_bee(n_bee)]


def training_mixture(config: SFTConfig, split: str = "train", limit: int | None = None) -> list[dict]:
    """The recipe's conversations, shuffled deterministically (seed), `limit` taken from each source in proportion."""
    if config.recipe == "nov2025":
        identity = config.identity_conversations if split == "train" else ""
        return tasks.mixture("sft", seed=config.seed, limit=limit, split=split, identity=identity)
    sources = mixture_sources_2026(split, config.identity_conversations if split == "train" else "")
    return tasks.interleave(sources, seed=config.seed, limit=limit)


def render(tokenizer: Tokenizer, conversations: list[dict], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per conversation; conversations of a single token (nothing to predict) are dropped."""
    rendered = [tokenizer.render_conversation(c, max_tokens=max_tokens) for c in conversations]
    return [r for r in rendered if len(r[0]) >= 2]


def train(config: SFTConfig, mid_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Fine-tune the model in mid_dir (or resume) into out_dir; returns the metrics written to metrics.json."""
    config.validate()
    out_dir = Path(out_dir)
    d = init_distributed(config.device_type)
    seed_everything(config.seed)
    tokenizer = Tokenizer.load(tokenizer_dir)
    token_bytes = tokenizer.token_bytes().to(d.device)
    model, mid_meta = load_upstream_model(mid_dir, tokenizer.get_vocab_size(), d.device)
    T = min(config.max_seq_len, model.config.sequence_len)
    B, grad_accum = config.device_batch_size, config.grad_accum(d.world_size)
    limit = config.max_examples if config.max_examples > 0 else None
    conversations = training_mixture(config, limit=limit)
    train_rows = render(tokenizer, conversations[d.rank::d.world_size], T + 1)
    val_conversations = training_mixture(config, split="val")[d.rank::d.world_size]
    val_rows = render(tokenizer, val_conversations[: config.eval_steps * B], T + 1)
    num_iterations = config.num_iterations if config.num_iterations > 0 else max(
        1, len(conversations) // config.examples_per_step)
    optimizers = config_optimizers(model, config)
    print0(f"sft: {len(conversations):,} conversations, {num_iterations} steps of {config.examples_per_step}, "
           f"grad_accum {grad_accum}, seq len {T}, world {d.world_size}")

    session = Session(out_dir, "sft", d, model, optimizers, keep=config.keep_checkpoints)
    cfg = config_to_dict(config)
    resumed = session.resume(cfg)
    start = resumed.step if resumed else 0
    loop = loop_state(resumed, val_loss=None, val_bpb=None)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    batches = ConversationBatches(train_rows, B, pad_id, d.device, resumed.loader_state if resumed else None)
    autocast = autocast_context(d.device)

    def meta() -> dict:
        return {"stage": "sft", "model_config": mid_meta["model_config"], "config": cfg, "loop_state": loop,
                "num_iterations": num_iterations}

    def save(step: int) -> Path:
        return session.save(step, meta(), batches.state_dict())

    with Preemption() as preempt, WandbLog.start("nanochat-sft", cfg, d) as wandb:
        for step in range(start, num_iterations + 1):
            session.stop_if_diverged_or_preempted(preempt, step, start, lambda: save(step))  # noqa: B023 - runs now
            last = step == num_iterations
            if last or (config.eval_every > 0 and step % config.eval_every == 0):
                model.eval()
                with autocast:
                    result = evaluate(model, ConversationBatches(val_rows, B, pad_id, d.device), config.eval_steps,
                                      token_bytes)
                model.train()
                loop["val_loss"], loop["val_bpb"] = result["loss"], result["bpb"]
                wandb.log(step, val_loss=loop["val_loss"], val_bpb=loop["val_bpb"])
                print0(f"step {step}/{num_iterations}: val loss {result['loss']:.4f}")
            if step > start and (last or (config.save_every > 0 and step % config.save_every == 0)):
                save(step)
            if last:
                break
            t0 = time.time()
            micro = [next(batches) for _ in range(grad_accum)]
            n_targets = sum(int((y >= 0).sum()) for _, y in micro)
            loss_sum = torch.zeros((), device=d.device)
            for x, y in micro:
                with autocast:
                    loss = model(x, y, loss_reduction="none").sum()
                (loss / max(1, n_targets)).backward()  # mean over the step's supervised tokens; never NaN
                loss_sum += loss.detach()
            if config.recipe == "2026":
                lrm = sft_lr_multiplier_2026(step, num_iterations)
                optimizer_step(model, optimizers, lrm, muon_momentum(step))
            else:
                lrm = sft_lr_multiplier(step, num_iterations)
                optimizer_step(model, optimizers, lrm)
            loss_value = loss_sum.item() / max(1, n_targets)
            session.record_loss(step + 1, loss_value)  # already on the host: no extra sync
            dt = time.time() - t0
            loop["train_seconds"] += dt
            tokens = sum(x.numel() for x, _ in micro) * d.world_size
            report_step(step, num_iterations, wandb, loss_value, lrm, tokens, dt, curve=loop["loss_curve"])

    metrics = {
        "val_loss": loop["val_loss"],
        "val_bpb": loop["val_bpb"],
        "steps": num_iterations,
        "examples": num_iterations * config.examples_per_step,
        "train_seconds": round(loop["train_seconds"], 3),
        "resumed_from_step": start,
    }
    return session.finish({**meta(), "step": num_iterations, "val_loss": loop["val_loss"]}, metrics)


def main(argv: list[str] | None = None) -> None:
    training_main(argv, __doc__, SFTConfig, (("mid", "the model to fine-tune: the mid stage's output directory, or "
                                                     "base's in a pipeline without midtraining"),
                  ("tokenizer", "tokenizer directory")), train)


if __name__ == "__main__":
    main()
