"""Midtraining: continue training the base model on conversations (chat format, tool use, multiple choice).

    torchrun --standalone --nproc_per_node=8 -m nanochat_core.train.mid --base DIR --tokenizer DIR --out DIR
    python -m nanochat_core.train.mid --base DIR --tokenizer DIR --out DIR --num-iterations 80 --max-seq-len 256 \\
        --device-batch-size 16 --total-batch-size 4096 --max-examples 4000

Data: nanochat_core.tasks.mixture("mid"), rendered with the chat template. As upstream, midtraining trains
on every token (the mask is ignored): rank r takes conversations r, r+W, ..., concatenates them into one
token stream and cuts it into blocks of B*T+1 tokens, so conversations straddle rows. The horizon is one
pass over the data (num_iterations <= 0) or num_iterations steps (the stream wraps around). LR: flat, then
linear to 0 over the last 20%. Checkpoints and resume as in base training. Writes model.pt + meta.json and,
last, metrics.json {"val_loss", "val_bpb", "steps", "tokens", "train_seconds", "tok_per_s", "resumed_from_step"}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat_core import tasks
from nanochat_core.common import DistInfo, init_distributed
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.dataloader import to_device_batch
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
    grad_accum_steps,
    load_upstream_model,
    loop_state,
    maybe_compile,
    mid_lr_multiplier,
    muon_momentum,
    optimizer_step,
    report_step,
    seed_everything,
)
from nanochat_core.wandb_log import WandbLog

RENDER_MAX_TOKENS = 2048  # a conversation is cut at this many tokens (upstream's render default)


@dataclass(frozen=True)
class MidTrainConfig:
    num_iterations: int = -1  # <= 0: one pass over the mixture
    max_seq_len: int = 2048
    device_batch_size: int = 32
    total_batch_size: int = 524288
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    init_lr_frac: float = 1.0  # LRs start at this fraction of the values above
    weight_decay: float = 0.0
    eval_every: int = 150  # <= 0: only at the end
    eval_steps: int = 20  # validation batches per rank (20 x 32 x 2048 x 8 ranks = upstream's 20 * 524288 tokens)
    save_every: int = -1  # <= 0: only at the end
    max_examples: int = -1  # > 0: use only this many conversations of the mixture (quick runs)
    identity_conversations: str = ""  # conversations file (path or URL) saying who the model is; "" = none
    seed: int = 42
    device_type: str = ""
    keep_checkpoints: int = 2
    compile: bool = True  # torch.compile the model (CUDA only)

    def validate(self) -> None:
        for name in ("max_seq_len", "device_batch_size", "total_batch_size", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"MidTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.init_lr_frac <= 1.0:
            raise ConfigError(f"MidTrainConfig.init_lr_frac must be in (0, 1], got {self.init_lr_frac}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"MidTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_device_type("MidTrainConfig", self.device_type)


class PackedStream:
    """(x, y) batches of B*T+1 consecutive tokens from a token array, wrapping around at its end.
    State = how many tokens were consumed, so a resumed stream is the same stream."""

    def __init__(self, tokens: np.ndarray, B: int, T: int, device: torch.device, state: dict | None = None):
        if len(tokens) == 0:
            raise ValueError("PackedStream needs at least one token")
        self.tokens, self.B, self.T, self.device = tokens, B, T, device
        self.pos = state["pos"] if state else 0

    def state_dict(self) -> dict:
        return {"pos": self.pos, "epoch": self.pos // len(self.tokens)}

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        idx = (self.pos + np.arange(need)) % len(self.tokens)
        self.pos += need
        return to_device_batch(self.tokens[idx], self.B, self.T, self.device)


def render_stream(tokenizer: Tokenizer, conversations: list[dict], max_tokens: int | None = None) -> np.ndarray:
    """Concatenated token ids of the conversations (mask ignored), stopping once max_tokens are collected."""
    chunks, total = [], 0
    for conv in conversations:
        ids, _ = tokenizer.render_conversation(conv, max_tokens=RENDER_MAX_TOKENS)
        chunks.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)


def one_pass_steps(n_tokens: int, tokens_per_step: int, d: DistInfo) -> int:
    """Steps in one pass over the data: the rank with the fewest tokens decides."""
    steps = torch.tensor([n_tokens // tokens_per_step], device=d.device)
    if d.is_distributed:
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    return max(1, int(steps.item()))


def train(config: MidTrainConfig, base_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Midtrain the model in base_dir (or resume) into out_dir; returns the metrics written to metrics.json."""
    config.validate()
    out_dir = Path(out_dir)
    d = init_distributed(config.device_type)
    seed_everything(config.seed)
    tokenizer = Tokenizer.load(tokenizer_dir)
    token_bytes = tokenizer.token_bytes().to(d.device)
    model, base_meta = load_upstream_model(base_dir, tokenizer.get_vocab_size(), d.device, config.max_seq_len,
                                           "MidTrainConfig")
    B, T = config.device_batch_size, config.max_seq_len
    grad_accum = grad_accum_steps(config.total_batch_size, B, T, d.world_size)
    limit = config.max_examples if config.max_examples > 0 else None
    conversations = tasks.mixture("mid", seed=config.seed, limit=limit, identity=config.identity_conversations)
    train_tokens = render_stream(tokenizer, conversations[d.rank::d.world_size])
    if len(train_tokens) == 0:
        raise ConfigError(f"rank {d.rank} got no midtraining conversations ({len(conversations)} in the mixture)")
    num_iterations = (config.num_iterations if config.num_iterations > 0
                      else one_pass_steps(len(train_tokens), (B * T + 1) * grad_accum, d))
    val_conversations = tasks.mixture("mid", seed=config.seed, split="val")[d.rank::d.world_size]
    val_tokens = render_stream(tokenizer, val_conversations, max_tokens=config.eval_steps * (B * T + 1))
    optimizers = config_optimizers(model, config)
    print0(f"mid: {len(conversations):,} conversations, {len(train_tokens):,} tokens on rank {d.rank}, "
           f"{num_iterations} steps, grad_accum {grad_accum}, world {d.world_size}")

    session = Session(out_dir, "mid", d, model, optimizers, keep=config.keep_checkpoints)
    cfg = config_to_dict(config)
    resumed = session.resume(cfg)
    start = resumed.step if resumed else 0
    loop = loop_state(resumed, val_loss=None, val_bpb=None)
    loader = PackedStream(train_tokens, B, T, d.device, resumed.loader_state if resumed else None)
    fwd = maybe_compile(model, d.device, config.compile)
    autocast = autocast_context(d.device)

    def meta() -> dict:
        return {"stage": "mid", "model_config": base_meta["model_config"], "config": cfg, "loop_state": loop,
                "num_iterations": num_iterations}

    def save(step: int) -> Path:
        return session.save(step, meta(), loader_state)

    with Preemption() as preempt, WandbLog.start("nanochat-mid", cfg, d) as wandb:
        loader_state = loader.state_dict()
        x, y = next(loader)
        for step in range(start, num_iterations + 1):
            session.stop_if_diverged_or_preempted(preempt, step, start, lambda: save(step))  # noqa: B023 - runs now
            last = step == num_iterations
            if last or (config.eval_every > 0 and step % config.eval_every == 0):
                fwd.eval()
                with autocast:
                    result = evaluate(fwd, PackedStream(val_tokens, B, T, d.device), config.eval_steps, token_bytes)
                fwd.train()
                loop["val_loss"], loop["val_bpb"] = result["loss"], result["bpb"]
                wandb.log(step, val_loss=loop["val_loss"], val_bpb=loop["val_bpb"])
                print0(f"step {step}/{num_iterations}: val loss {result['loss']:.4f}, val bpb {result['bpb']:.4f}")
            if step > start and (last or (config.save_every > 0 and step % config.save_every == 0)):
                save(step)
            if last:
                break
            t0 = time.time()
            train_loss = torch.zeros((), device=d.device)
            for _ in range(grad_accum):
                with autocast:
                    loss = fwd(x, y)
                train_loss += loss.detach()
                (loss / grad_accum).backward()
                loader_state = loader.state_dict()
                x, y = next(loader)
            lrm = mid_lr_multiplier(step, num_iterations)
            optimizer_step(model, optimizers, lrm, muon_momentum(step))
            loss_value = (train_loss / grad_accum).item()
            session.record_loss(step + 1, loss_value)  # already on the host: no extra sync
            dt = time.time() - t0
            loop["train_seconds"] += dt
            report_step(step, num_iterations, wandb, loss_value, lrm, config.total_batch_size, dt,
                        curve=loop["loss_curve"])

    metrics = {
        "val_loss": loop["val_loss"],
        "val_bpb": loop["val_bpb"],
        "steps": num_iterations,
        "tokens": num_iterations * config.total_batch_size,
        "train_seconds": round(loop["train_seconds"], 3),
        "tok_per_s": round(num_iterations * config.total_batch_size / max(loop["train_seconds"], 1e-9)),
        "resumed_from_step": start,
    }
    return session.finish({**meta(), "step": num_iterations, "val_loss": loop["val_loss"]}, metrics)


def main(argv: list[str] | None = None) -> None:
    training_main(argv, __doc__, MidTrainConfig, (("base", "the base stage's output directory (model.pt + meta.json)"),
                  ("tokenizer", "tokenizer directory")), train)


if __name__ == "__main__":
    main()
