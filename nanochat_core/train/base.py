"""Base pretraining: a GPT of a given depth on the pretraining shards, resumable, under torchrun.

    torchrun --standalone --nproc_per_node=8 -m nanochat_core.train.base --shards DIR --tokenizer DIR --out DIR
    python -m nanochat_core.train.base --shards DIR --tokenizer DIR --out DIR --depth 4 --max-seq-len 256 \\
        --device-batch-size 8 --total-batch-size 4096 --num-iterations 100      # one process, e.g. on a CPU

Writes into --out: checkpoints/step_*/ (every save_every steps and at the end), model.pt + meta.json (the
final model) and, last, metrics.json: {"val_bpb", "unigram_bpb", "steps", "tokens", "params",
"train_seconds", "tok_per_s", "resumed_from_step"}. unigram_bpb is an add-one smoothed unigram model of
the training tokens scored on the same validation tokens: the baseline a model that learns must beat.
With --out holding checkpoints of an interrupted run, training resumes from the newest one.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_core.common import DistInfo, init_distributed
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.dataloader import PretrainLoader
from nanochat_core.device import autocast_context, mfu_percent, peak_flops
from nanochat_core.gpt import config_for_depth
from nanochat_core.loss_eval import evaluate_bpb, unigram_bpb
from nanochat_core.progress import print0
from nanochat_core.stage_cli import training_main
from nanochat_core.tokenizer import Tokenizer
from nanochat_core.train.common import (
    Preemption,
    Session,
    check_device_type,
    config_optimizers,
    grad_accum_steps,
    loop_state,
    lr_multiplier,
    maybe_compile,
    muon_momentum,
    new_model,
    optimizer_step,
    report_step,
    seed_everything,
)
from nanochat_core.wandb_log import WandbLog


@dataclass(frozen=True)
class BaseTrainConfig:
    depth: int = 20  # the model's one dial: width = 64 * depth
    max_seq_len: int = 2048
    device_batch_size: int = 32  # sequences per forward pass per rank
    total_batch_size: int = 524288  # tokens per optimizer step (all ranks, all micro-batches)
    num_iterations: int = -1  # > 0: exactly this many steps; else from target_param_data_ratio
    target_param_data_ratio: float = 20.0  # Chinchilla: tokens = ratio * params
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = 250  # val bpb every N steps (and at the end); <= 0: only at the end
    eval_tokens: int = 20 * 524288
    save_every: int = -1  # checkpoint every N steps; <= 0: only at the end
    seed: int = 42
    device_type: str = ""  # "" = autodetect (cuda > mps > cpu)
    keep_checkpoints: int = 2  # newest complete checkpoints kept; <= 0 keeps all
    compile: bool = True  # torch.compile the model (CUDA only)

    def validate(self) -> None:
        positive = ("depth", "max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"BaseTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_iterations <= 0 and self.target_param_data_ratio <= 0:
            raise ConfigError("BaseTrainConfig: set num_iterations > 0 or target_param_data_ratio > 0")
        for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"BaseTrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ConfigError(f"BaseTrainConfig: warmup_ratio + warmdown_ratio = "
                              f"{self.warmup_ratio + self.warmdown_ratio} > 1")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"BaseTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        check_device_type("BaseTrainConfig", self.device_type)


def num_iterations_for(config: BaseTrainConfig, num_params: int) -> int:
    """The training horizon: num_iterations if set, else Chinchilla tokens = ratio * params."""
    if config.num_iterations > 0:
        return config.num_iterations
    return max(1, round(config.target_param_data_ratio * num_params) // config.total_batch_size)


def validation(model, shards_dir, tokenizer, config: BaseTrainConfig, d: DistInfo, token_bytes, autocast):
    """(val bpb, the val targets it was measured on) over eval_tokens tokens of the val shard."""
    loader = PretrainLoader(shards_dir, tokenizer, config.device_batch_size, config.max_seq_len, "val",
                            d.rank, d.world_size, d.device)
    steps = max(1, config.eval_tokens // (config.device_batch_size * config.max_seq_len * d.world_size))
    batches = [next(loader) for _ in range(steps)]
    loader.close()  # stop its read-ahead now rather than whenever it is garbage collected
    model.eval()
    with autocast:
        bpb = evaluate_bpb(model, batches, steps, token_bytes)
    model.train()
    return bpb, torch.cat([y.view(-1) for _, y in batches])


def train(config: BaseTrainConfig, shards_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    """Pretrain (or resume) into out_dir; returns the metrics also written to out_dir/metrics.json."""
    config.validate()
    out_dir = Path(out_dir)
    d = init_distributed(config.device_type)
    seed_everything(config.seed)
    tokenizer = Tokenizer.load(tokenizer_dir)
    vocab_size = tokenizer.get_vocab_size()
    token_bytes = tokenizer.token_bytes().to(d.device)
    grad_accum = grad_accum_steps(config.total_batch_size, config.device_batch_size, config.max_seq_len,
                                  d.world_size)
    model_config = config_for_depth(config.depth, vocab_size, config.max_seq_len)
    model = new_model(model_config, d.device)
    optimizers = config_optimizers(model, config)
    num_params = model.num_params()
    num_iterations = num_iterations_for(config, num_params)
    flops_per_token, peak = model.estimate_flops(), peak_flops(d.device)
    print0(f"base: {num_params:,} params, {num_iterations} steps of {config.total_batch_size:,} tokens, "
           f"grad_accum {grad_accum}, world {d.world_size}, device {d.device}"
           + ("" if peak else " (no peak FLOP/s known for it: MFU not reported)"))

    session = Session(out_dir, "base", d, model, optimizers, keep=config.keep_checkpoints)
    cfg = config_to_dict(config)
    resumed = session.resume(cfg)
    start = resumed.step if resumed else 0
    loop = loop_state(resumed, val_bpb=None)
    counts = (resumed.rank_state["token_counts"].to(d.device) if resumed
              else torch.zeros(vocab_size, dtype=torch.long, device=d.device))  # training targets seen, this rank
    loader = PretrainLoader(shards_dir, tokenizer, config.device_batch_size, config.max_seq_len, "train",
                            d.rank, d.world_size, d.device, state=resumed.loader_state if resumed else None)
    fwd = maybe_compile(model, d.device, config.compile)
    autocast = autocast_context(d.device)

    def meta() -> dict:
        return {"stage": "base", "model_config": asdict(model_config), "config": cfg, "loop_state": loop,
                "num_iterations": num_iterations}

    def save(step: int) -> Path:
        return session.save(step, meta(), loader_state, {"token_counts": counts.cpu()})

    val_targets = None
    run_info = {**cfg, "num_params": num_params, "num_iterations": num_iterations, "world_size": d.world_size}
    # closing(): the loader's thread stops even when preemption or an error ends the loop
    with Preemption() as preempt, WandbLog.start("nanochat", run_info, d) as wandb, closing(loader):
        loader_state = loader.state_dict()  # position of the batch we are about to fetch
        x, y = next(loader)
        for step in range(start, num_iterations + 1):
            session.stop_if_diverged_or_preempted(preempt, step, start, lambda: save(step))  # noqa: B023 - runs now
            last = step == num_iterations
            if last or (config.eval_every > 0 and step % config.eval_every == 0):
                loop["val_bpb"], val_targets = validation(fwd, shards_dir, tokenizer, config, d, token_bytes, autocast)
                print0(f"step {step}/{num_iterations}: val bpb {loop['val_bpb']:.4f}")
                wandb.log(step, val_bpb=loop["val_bpb"])
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
                counts += torch.bincount(y.view(-1), minlength=vocab_size)
                loader_state = loader.state_dict()
                x, y = next(loader)  # fetch the next batch while the device works
            lrm = lr_multiplier(step, num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac)
            optimizer_step(model, optimizers, lrm, muon_momentum(step))
            loss_value = (train_loss / grad_accum).item()
            session.record_loss(step + 1, loss_value)  # already on the host: no extra sync
            dt = time.time() - t0
            loop["train_seconds"] += dt
            mfu = mfu_percent(flops_per_token, config.total_batch_size, dt, peak, d.world_size)
            report_step(step, num_iterations, wandb, loss_value, lrm, config.total_batch_size, dt, mfu,
                        loop["loss_curve"])

    if d.is_distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    metrics = {
        "val_bpb": loop["val_bpb"],
        "unigram_bpb": unigram_bpb(counts, val_targets, token_bytes),
        "steps": num_iterations,
        "tokens": num_iterations * config.total_batch_size,
        "params": num_params,
        "train_seconds": round(loop["train_seconds"], 3),
        "tok_per_s": round(num_iterations * config.total_batch_size / max(loop["train_seconds"], 1e-9)),
        "resumed_from_step": start,
    }
    return session.finish({**meta(), "step": num_iterations, "val_bpb": loop["val_bpb"]}, metrics)


def main(argv: list[str] | None = None) -> None:
    training_main(argv, __doc__, BaseTrainConfig, (("shards", "directory of shard_*.parquet (the last is validation)"),
                  ("tokenizer", "tokenizer directory (Tokenizer.save)")), train)


if __name__ == "__main__":
    main()
