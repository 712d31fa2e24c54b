"""What the base, mid and SFT training loops share: schedules, gradient accumulation, preemption and
checkpoint/resume. (Autocast is in nanochat_core.device, W&B logging in nanochat_core.wandb_log, the command
line in nanochat_core.stage_cli.)

Preemption: SIGTERM (Prefect cancellation, a spot instance going away, torchrun passing on a signal) only sets
a flag. At each step boundary the ranks agree on it (all_reduce MAX, so they all stop at the same step), save
a checkpoint and leave `train()` with `Preempted`; the CLI then exits with code 143 (128 + SIGTERM). We do
not exit 0: the process did not finish its stage, and a launcher that treats exit 0 as "done" (the stage
runner writes MANIFEST.json after exit 0) must not commit a half-trained artifact. Rerunning with the same
--out resumes from that checkpoint.

Divergence: a loss that is no longer finite (a learning rate far too large) ends the stage with TrainingDiverged,
a user error (exit 2) naming the step, and nothing is saved: the loss is checked where it is read on the host
anyway (no extra device sync), every rank learns of it at the next step boundary (the same all_reduce as
preemption), and the weights are checked before every checkpoint and the final model, because an update can
poison them before any loss shows it.

Exact resume: a checkpoint holds the weights, every rank's optimizer shard, data loader position and RNG
states, and the loop state; LR and momentum are functions of the step, so a resumed run replays the same
updates on the same data as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat_core.checkpoint import (
    CheckpointError,
    checkpoint_meta,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    load_rank_state,
    rank_files,
    restore_rng_state,
    save_checkpoint,
    save_final_model,
    verify_checkpoint_files,
)
from nanochat_core.common import DistInfo, cleanup_distributed
from nanochat_core.config import ConfigError
from nanochat_core.errors import UserError
from nanochat_core.fileio import atomic_write_bytes
from nanochat_core.gpt import GPT, GPTConfig
from nanochat_core.progress import emit_checkpoint, emit_progress, print0, write_line
from nanochat_core.stage_cli import Preempted
from nanochat_core.wandb_log import WandbLog

DEVICE_TYPES = ("", "cpu", "cuda", "mps")




# ---------------------------------------------------------------------------------------------
# schedules

def lr_multiplier(it: int, num_iterations: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Base training: linear warmup, flat, then linear warmdown to final_lr_frac (upstream SEED)."""
    warmup, warmdown = round(warmup_ratio * num_iterations), round(warmdown_ratio * num_iterations)
    if it < warmup:
        return (it + 1) / warmup
    if it <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - it) / warmdown
    return progress + (1 - progress) * final_lr_frac


def mid_lr_multiplier(it: int, num_iterations: int) -> float:
    """Midtraining: flat until 80% of the run, then linear to 0."""
    progress = it / num_iterations
    return 1.0 if progress < 0.8 else 1.0 - (progress - 0.8) / 0.2


def sft_lr_multiplier(it: int, num_iterations: int) -> float:
    """SFT: linear decay 1 -> 0 over the optimizer steps (never negative: it < num_iterations)."""
    return 1.0 - it / num_iterations


def muon_momentum(it: int) -> float:
    """Muon momentum ramps 0.85 -> 0.95 over the first 300 steps."""
    frac = min(it / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# The 2026 recipe's schedules (upstream nanochat's base_train.py and chat_sft.py as of its 2026 record). Like the
# ones above they are functions of the step alone, so a resumed run replays them exactly.

MOMENTUM_RAMP_2026 = 400  # steps over which Muon momentum rises 0.85 -> 0.97


def lr_multiplier_2026(it: int, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                       final_lr_frac: float = 0.05) -> float:
    """Base training, 2026: linear warmup over warmup_steps (steps, not a ratio), flat, then a linear warmdown over
    the last warmdown_ratio of the run to final_lr_frac."""
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    return lr_multiplier(it, num_iterations, 0.0, warmdown_ratio, final_lr_frac)


def muon_momentum_2026(it: int, num_iterations: int, warmdown_ratio: float = 0.65) -> float:
    """Muon momentum, 2026: 0.85 -> 0.97 over the first 400 steps, 0.97 until the LR warmdown starts, then down to
    0.90 across the warmdown (less momentum while the LR falls)."""
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if it < MOMENTUM_RAMP_2026:
        frac = it / MOMENTUM_RAMP_2026
        return (1 - frac) * 0.85 + frac * 0.97
    if it >= warmdown_start:
        progress = (it - warmdown_start) / warmdown
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def weight_decay_2026(it: int, num_iterations: int, weight_decay: float) -> float:
    """Muon's (cautious) weight decay, 2026: `weight_decay` at step 0, cosine-decayed to 0 at the end."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / num_iterations))


SFT_WARMDOWN_2026 = 0.5  # upstream's SFT since 2026: flat for half the run, then linear to 0


def sft_lr_multiplier_2026(it: int, num_iterations: int, warmdown_ratio: float = SFT_WARMDOWN_2026) -> float:
    """SFT, 2026: 1 until progress 1 - warmdown_ratio, then linear to 0 (progress = it / num_iterations)."""
    progress = it / num_iterations
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    return 1.0 - (progress - (1.0 - warmdown_ratio)) / warmdown_ratio


def remember_initial_lrs(optimizers: list[torch.optim.Optimizer], init_lr_frac: float = 1.0) -> None:
    """Scale every group's LR by init_lr_frac and keep it as the group's `initial_lr` (what lrm multiplies)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * init_lr_frac
            group["initial_lr"] = group["lr"]


def config_optimizers(model, config) -> list[torch.optim.Optimizer]:
    """model.setup_optimizers with the stage config's learning rates and weight decay, each group's LR scaled by
    the config's init_lr_frac (1 for a stage without one) and remembered as its `initial_lr`. The model decides
    the parameter groups: a 2026-recipe model (model.config.recipe) gets its own (see GPT.setup_optimizers)."""
    optimizers = model.setup_optimizers(unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                        matrix_lr=config.matrix_lr, weight_decay=config.weight_decay)
    remember_initial_lrs(optimizers, getattr(config, "init_lr_frac", 1.0))
    return optimizers


def setup_lrs(optimizers: list[torch.optim.Optimizer], lrm: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm


def set_muon_momentum(optimizers: list[torch.optim.Optimizer], momentum: float) -> None:
    """Muon's groups are the ones with a "momentum" entry (AdamW groups have "betas")."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "momentum" in group:
                group["momentum"] = momentum


def set_muon_weight_decay(optimizers: list[torch.optim.Optimizer], weight_decay: float) -> None:
    """This step's weight decay for every Muon group (the 2026 recipe schedules it; AdamW groups keep theirs)."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "momentum" in group:
                group["weight_decay"] = weight_decay


def optimizer_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], lrm: float,
                   momentum: float | None = None, muon_weight_decay: float | None = None) -> None:
    """This step's LRs (and Muon momentum and weight decay, when scheduled), every optimizer's step, then drop
    the grads."""
    setup_lrs(optimizers, lrm)
    if momentum is not None:
        set_muon_momentum(optimizers, momentum)
    if muon_weight_decay is not None:
        set_muon_weight_decay(optimizers, muon_weight_decay)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


LOSS_CURVE_POINTS = 500  # at most this many (step, loss) points kept for the report's loss curve


def report_step(step: int, num_iterations: int, wandb: WandbLog, loss: float, lrm: float, tokens: int, dt: float,
                mfu: float | None = None, curve: list | None = None) -> None:
    """One finished optimizer step as structured progress (console/flow) and to W&B; every k-th step's loss
    also goes into `curve` (kept in the loop state, so it survives a resume and ends up in meta.json)."""
    progress = {"loss": round(loss, 5), "lr": round(lrm, 5), "tok_per_s": round(tokens / dt), "dt": round(dt, 4)}
    if mfu is not None:
        progress["mfu"] = round(mfu, 2)
    emit_progress(step + 1, num_iterations, **progress)
    wandb.log(step + 1, **progress)
    every = max(1, num_iterations // LOSS_CURVE_POINTS)
    if curve is not None and ((step + 1) % every == 0 or step + 1 == num_iterations):
        curve.append([step + 1, round(loss, 5)])


# ---------------------------------------------------------------------------------------------
# batch math, devices, seeds

def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that one step sees exactly total_batch_size tokens."""
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size < per_pass or total_batch_size % per_pass:
        raise ConfigError(
            f"total_batch_size={total_batch_size} must be a positive multiple of device_batch_size * max_seq_len * "
            f"world_size = {device_batch_size} * {seq_len} * {world_size} = {per_pass}")
    return total_batch_size // per_pass




def seed_everything(seed: int) -> None:
    """The same seed on every rank: ranks must initialise identical weights (there is no DDP broadcast)."""
    random.seed(seed)
    torch.manual_seed(seed)


def new_model(model_config: GPTConfig, device: torch.device) -> GPT:
    """A freshly initialised GPT on `device` (built on the meta device, so weights are initialised once)."""
    with torch.device("meta"):
        model = GPT(model_config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def load_upstream_model(model_dir: str | Path, vocab_size: int, device: torch.device, max_seq_len: int | None = None,
                        cls_name: str = "") -> tuple[GPT, dict]:
    """The previous stage's model, checked against this stage's tokenizer (and sequence length, if given)."""
    model, meta = load_model(model_dir, device, phase="train")
    mc = model.config
    if mc.vocab_size != vocab_size:
        raise ConfigError(f"the model in {model_dir} has a vocabulary of {mc.vocab_size} tokens but the tokenizer "
                          f"has {vocab_size}: use the tokenizer the model was trained with")
    if max_seq_len is not None and max_seq_len > mc.sequence_len:
        raise ConfigError(f"{cls_name}.max_seq_len={max_seq_len} exceeds the sequence length the model in "
                          f"{model_dir} was trained with ({mc.sequence_len})")
    return model, meta


def maybe_compile(model: torch.nn.Module, device: torch.device, enabled: bool) -> torch.nn.Module:
    """torch.compile on CUDA (fixed shapes); eager elsewhere. Checkpoints always use the uncompiled model."""
    return torch.compile(model, dynamic=False) if enabled and device.type == "cuda" else model


def check_device_type(cls_name: str, device_type: str) -> None:
    if device_type not in DEVICE_TYPES:
        raise ConfigError(f"{cls_name}.device_type must be one of {DEVICE_TYPES}, got {device_type!r}")


# ---------------------------------------------------------------------------------------------
# preemption and divergence

class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite: nothing of this run past its last good checkpoint is saved."""


def diverged(what: str, step: int) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what} at step {step}; nothing was saved for it. Lower the learning "
                            f"rates (embedding_lr, unembedding_lr, matrix_lr) or weight_decay and run again")


def first_non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity (one device sync for all of them), or None."""
    named = list(model.named_parameters())
    finite = torch.stack([p.detach().isfinite().all() for _, p in named]).cpu()
    return None if bool(finite.all()) else named[int((~finite).nonzero()[0])][0]


class Preemption:
    """Context manager: while active, SIGTERM sets a flag instead of killing the process.

    The handler does nothing but set the flag: no I/O, because the launcher may be gone (a write to its pipe
    would raise BrokenPipeError right here and kill the process before it saves)."""

    def __init__(self) -> None:
        self.flag = False
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. called from a worker thread): keep the default
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def any_rank(flags: tuple[bool, ...], dist_info: DistInfo) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (collective, one all_reduce: every rank calls it at the same step)."""
    if not dist_info.is_distributed:
        return flags
    t = torch.tensor([int(f) for f in flags], device=dist_info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


# ---------------------------------------------------------------------------------------------
# checkpoint / resume

@dataclass
class Resumed:
    step: int
    path: Path
    meta: dict
    loader_state: dict | None
    rank_state: dict = field(default_factory=dict)


def loop_state(resumed: Resumed | None, **initial) -> dict:
    """The training loop's own state: the resumed checkpoint's, or a fresh one (no training time yet, an empty
    loss curve, and the stage's `initial` values)."""
    return dict(resumed.meta["loop_state"]) if resumed else {"train_seconds": 0.0, **initial, "loss_curve": []}


@dataclass
class Session:
    """One training run's output dir, model, optimizers and distributed info: saves and resumes checkpoints."""

    out_dir: Path
    stage: str
    dist_info: DistInfo
    model: torch.nn.Module  # uncompiled
    optimizers: list[torch.optim.Optimizer]
    keep: int = 2
    non_finite_loss: tuple[int, float] | None = None  # (step, loss) of the first one this rank saw

    def resume(self, config: dict) -> Resumed | None:
        """Load the newest intact checkpoint in out_dir (weights, optimizer shard, RNG), if there is one."""
        ckpt = self.newest_intact_checkpoint()
        if ckpt is None:
            return None
        d = self.dist_info
        meta = checkpoint_meta(ckpt)
        if meta.get("world_size") != d.world_size:
            raise CheckpointError(f"{ckpt} was written by {meta.get('world_size')} rank(s) but this run has "
                                  f"{d.world_size}: resume with the same number of processes, or use a new --out")
        model_state, optim_states, meta, loader_state = load_checkpoint(ckpt, d.device, rank=d.rank)
        try:
            self.model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt / 'model.pt'} does not fit this run's model: {e}") from e
        if len(optim_states) != len(self.optimizers):
            raise CheckpointError(f"{ckpt} holds {len(optim_states)} optimizer states, expected {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, optim_states, strict=True):
            opt.load_state_dict(state)
        rank_state = load_rank_state(ckpt, d.rank)
        restore_rng_state(rank_state.pop("rng"), d.device)
        changed = sorted(k for k in config if meta.get("config", {}).get(k) != config[k])
        if changed:
            print0(f"warning: resuming {ckpt} with a changed config ({', '.join(changed)}): not an exact resume")
        print0(f"resuming from {ckpt} (step {meta['step']})")
        return Resumed(meta["step"], ckpt, meta, loader_state, rank_state)

    def newest_intact_checkpoint(self) -> Path | None:
        """The newest complete checkpoint whose files every rank finds intact (sha256 as saved). A damaged one
        is reported and passed over for an older one; with none left, training starts over."""
        d = self.dist_info
        for ckpt in reversed(complete_checkpoints(self.out_dir)):
            try:
                verify_checkpoint_files(ckpt, rank_files(ckpt, d.rank))
                ok = 1
            except CheckpointError as e:
                write_line(f"warning: rank {d.rank}: {e}; not resuming from it", sys.stderr)
                ok = 0
            if d.is_distributed:  # every rank must resume from the same checkpoint
                flag = torch.tensor([ok], device=d.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
                ok = int(flag.item())
            if ok:
                return ckpt
        return None

    def save(self, step: int, meta: dict, loader_state: dict | None, rank_state: dict | None = None) -> Path:
        """Commit a checkpoint (collective) and announce it on stdout; refused if the weights are not finite."""
        self.check_weights(step)
        path = save_checkpoint(self.out_dir, step, self.model, self.optimizers, meta, self.dist_info,
                               loader_state, rank_state, keep=self.keep)
        emit_checkpoint(str(path), step, self.stage)
        return path

    def record_loss(self, step: int, loss: float) -> None:
        """After optimizer step `step` (1-based), its loss as read on the host: remember the first non-finite one
        (acted on at the next step boundary, on every rank at once)."""
        if self.non_finite_loss is None and not math.isfinite(loss):
            self.non_finite_loss = (step, loss)

    def check_weights(self, step: int) -> None:
        """Raise TrainingDiverged if a parameter is NaN or infinite (the ranks hold the same weights, so they agree)."""
        name = first_non_finite_parameter(self.model)
        if name is not None:
            cleanup_distributed()
            raise diverged(f"the weights ({name}) became non-finite by the update", step)

    def stop_if_diverged_or_preempted(self, preempt: Preemption, step: int, start: int,
                                      save: Callable[[], Path]) -> None:
        """At a step boundary, every rank together: if any saw a non-finite loss, raise TrainingDiverged (saving
        nothing); if any got SIGTERM, save (unless this state is already on disk) and raise Preempted."""
        bad_loss, preempted = any_rank((self.non_finite_loss is not None, preempt.flag), self.dist_info)
        if bad_loss:
            cleanup_distributed()
            where, loss = self.non_finite_loss or (step, math.nan)  # another rank's loss: it was this step's
            raise diverged(f"the training loss became non-finite ({loss})", where)
        if not preempted:
            return
        print0(f"SIGTERM: stopping at step {step}" + (", saving a checkpoint" if step > start else ""))
        path = save() if step > start else latest_checkpoint(self.out_dir)
        cleanup_distributed()
        raise Preempted(step, path)

    def finish(self, final_meta: dict, metrics: dict) -> dict:
        """The end of every training stage: final model (rank 0), then metrics.json last, then leave the group."""
        self.check_weights(final_meta["step"])
        if self.dist_info.is_master:
            save_final_model(self.out_dir, self.model, final_meta)
        self.write_metrics(metrics)
        cleanup_distributed()
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json, rank 0, written atomically (the last file a stage writes); inf/nan become null."""
        if self.dist_info.is_master:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            atomic_write_bytes(self.out_dir / "metrics.json", (json.dumps(clean, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# W&B (optional: wandb is not a dependency)





# ---------------------------------------------------------------------------------------------
# CLI



