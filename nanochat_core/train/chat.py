"""What midtraining and SFT share: conversations -> exactly resumable batches, and the training loop.

Batches come from a fixed, deterministic list of rendered conversations; rank r takes conversations
r, r+W, r+2W, ... A stream's state is (epoch, cursor, leftover tokens), so a resumed run sees exactly the
batches an uninterrupted one would have seen.

- packed (midtraining, as upstream SEED): every token of every conversation, concatenated and cut into
  B x (T+1) blocks; conversations straddle rows.
- padded (SFT): one conversation per row (cropped to T+1 tokens), padded; targets are -1 where the mask
  is 0 (prompts, tool outputs) and on padding, so only assistant tokens are trained on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nanochat_core.checkpoint import load_model, save_final_model
from nanochat_core.common import DistInfo, cleanup_distributed, emit_progress, init_distributed, print0
from nanochat_core.config import config_to_dict
from nanochat_core.tasks import mixture
from nanochat_core.tokenizer import Tokenizer
from nanochat_core.train.common import (
    Preemption,
    Session,
    autocast_context,
    muon_momentum,
    remember_initial_lrs,
    seed_everything,
    set_muon_momentum,
    setup_lrs,
)


class ConversationStream:
    """Infinite, exactly resumable batches (x, y) of shape (B, T) from rendered conversations."""

    def __init__(self, rendered: list[tuple[list[int], list[int]]], B: int, T: int, packed: bool, pad_id: int,
                 device: torch.device, state: dict | None = None):
        if not rendered:
            raise ValueError("no conversations for this rank: use more data (max_examples) or fewer ranks")
        self.rendered, self.B, self.T, self.packed, self.pad_id, self.device = rendered, B, T, packed, pad_id, device
        state = state or {}
        self.epoch, self.cursor = state.get("epoch", 0), state.get("cursor", 0)
        self.buffer: list[int] = list(state.get("buffer", []))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer)}

    def _take(self) -> tuple[list[int], list[int]]:
        ids, mask = self.rendered[self.cursor]
        self.cursor += 1
        if self.cursor == len(self.rendered):
            self.epoch, self.cursor = self.epoch + 1, 0
        return ids, mask

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        if self.packed:
            while len(self.buffer) < B * (T + 1):
                self.buffer.extend(self._take()[0])
            block = torch.tensor(self.buffer[: B * (T + 1)], dtype=torch.long).view(B, T + 1)
            del self.buffer[: B * (T + 1)]
            x, y = block[:, :-1], block[:, 1:].clone()
        else:
            x = torch.full((B, T), self.pad_id, dtype=torch.long)
            y = torch.full((B, T), -1, dtype=torch.long)
            for row in range(B):
                ids, mask = self._take()
                ids, mask = ids[: T + 1], mask[: T + 1]
                n = len(ids) - 1
                x[row, :n] = torch.tensor(ids[:-1])
                targets = torch.tensor(ids[1:])
                y[row, :n] = torch.where(torch.tensor(mask[1:]) == 1, targets, -1)
        return x.to(self.device), y.to(self.device)


def render_share(conversations: list[dict], tokenizer: Tokenizer, max_tokens: int, d: DistInfo):
    """This rank's conversations (r, r+W, ...), rendered to (ids, mask)."""
    return [tokenizer.render_conversation(c, max_tokens=max_tokens) for c in conversations[d.rank::d.world_size]]


@torch.no_grad()
def validation_loss(model, stream: ConversationStream, steps: int, d: DistInfo, autocast) -> float:
    """Mean loss per target token over `steps` batches, averaged over ranks (masked tokens excluded)."""
    model.eval()
    total = torch.zeros(2, device=d.device, dtype=torch.float64)
    for _ in range(steps):
        x, y = next(stream)
        with autocast:
            losses = model(x, y, loss_reduction="none")
        valid = y.view(-1) >= 0
        total += torch.stack([losses[valid].double().sum(), valid.sum().double()])
    if d.is_distributed:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def train_chat(stage: str, config: Any, mixture_name: str, upstream_dir: str | Path, tokenizer_dir: str | Path,
               out_dir: str | Path, packed: bool, grad_accum_fn: Callable[[DistInfo], int],
               lr_fn: Callable[[int, int], float]) -> dict:
    """Fine-tune the model in upstream_dir on a conversation mixture; resumable; returns the metrics."""
    config.validate()
    out_dir = Path(out_dir)
    d = init_distributed(config.device_type)
    seed_everything(config.seed)
    tokenizer = Tokenizer.load(tokenizer_dir)
    model, upstream_meta = load_model(upstream_dir, d.device, phase="train")
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise ValueError(f"model vocab {model.config.vocab_size} != tokenizer vocab {tokenizer.get_vocab_size()}")
    T = min(config.max_seq_len, model.config.sequence_len)
    grad_accum = grad_accum_fn(d)
    optimizers = model.setup_optimizers(unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                        matrix_lr=config.matrix_lr, weight_decay=config.weight_decay)
    remember_initial_lrs(optimizers, config.init_lr_frac)
    limit = config.max_examples if config.max_examples > 0 else None
    train_rendered = render_share(mixture(mixture_name, seed=config.seed, limit=limit), tokenizer, T + 1, d)
    val_limit = max(8 * d.world_size, (limit or 10**9) // 10)
    val_rendered = render_share(mixture(mixture_name, seed=config.seed, limit=val_limit, split="val"),
                                tokenizer, T + 1, d)
    num_iterations = config.num_iterations
    print0(f"{stage}: {len(train_rendered)} conversations per rank, {num_iterations} steps, grad_accum {grad_accum}")

    session = Session(out_dir, stage, d, model, optimizers, keep=config.keep_checkpoints)
    cfg = config_to_dict(config)
    resumed = session.resume(cfg)
    start = resumed.step if resumed else 0
    loop = dict(resumed.meta["loop_state"]) if resumed else {"train_seconds": 0.0, "val_loss": None}
    pad = tokenizer.encode_special("<|assistant_end|>")
    stream = ConversationStream(train_rendered, config.device_batch_size, T, packed, pad, d.device,
                                state=resumed.loader_state if resumed else None)
    autocast = autocast_context(d.device)
    model_config = asdict(model.config)

    def meta() -> dict:
        return {"stage": stage, "model_config": model_config, "config": cfg, "loop_state": loop,
                "num_iterations": num_iterations, "upstream": upstream_meta.get("stage")}

    def evaluate_now() -> float:
        val = ConversationStream(val_rendered, config.device_batch_size, T, packed, pad, d.device)
        return validation_loss(model, val, config.eval_steps, d, autocast)

    with Preemption() as preempt:
        for step in range(start, num_iterations + 1):
            session.stop_if_preempted(preempt, step, start, lambda: session.save(step, meta(), stream.state_dict()))  # noqa: B023
            last = step == num_iterations
            if last or (config.eval_every > 0 and step % config.eval_every == 0):
                loop["val_loss"] = evaluate_now()
                print0(f"step {step}/{num_iterations}: val loss {loop['val_loss']:.4f}")
            if step > start and (last or (config.save_every > 0 and step % config.save_every == 0)):
                session.save(step, meta(), stream.state_dict())
            if last:
                break
            t0 = time.time()
            loss_sum = torch.zeros((), device=d.device)
            tokens = torch.zeros((), device=d.device)
            for _ in range(grad_accum):
                x, y = next(stream)
                with autocast:
                    losses = model(x, y, loss_reduction="none")
                n = (y >= 0).sum()
                # sum over valid tokens / their count; an all-masked micro-batch adds 0 (no NaN, upstream #590)
                (losses.sum() / n.clamp(min=1) / grad_accum).backward()
                loss_sum += losses.detach().sum()
                tokens += n
            lrm = lr_fn(step, num_iterations)
            setup_lrs(optimizers, lrm)
            set_muon_momentum(optimizers, muon_momentum(step))
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            dt = time.time() - t0
            loop["train_seconds"] += dt
            emit_progress(step + 1, num_iterations, loss=round((loss_sum / tokens.clamp(min=1)).item(), 5),
                          lr=round(lrm, 5), dt=round(dt, 4))

    metrics = {"val_loss": loop["val_loss"], "steps": num_iterations, "train_seconds": round(loop["train_seconds"], 3),
               "conversations": len(train_rendered) * d.world_size, "resumed_from_step": start}
    if d.is_master:
        save_final_model(out_dir, model, {**meta(), "step": num_iterations, "val_loss": loop["val_loss"]})
    session.write_metrics(metrics)
    cleanup_distributed()
    return metrics
