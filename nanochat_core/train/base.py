"""Base pretraining: a GPT of a given depth on the pretraining shards, resumable, under torchrun.

    torchrun --standalone --nproc_per_node=8 -m nanochat_core.train.base --shards DIR --tokenizer DIR --out DIR
    python -m nanochat_core.train.base --shards DIR --tokenizer DIR --out DIR --depth 4 --max-seq-len 256 \\
        --device-batch-size 8 --total-batch-size 4096 --num-iterations 100      # one process, e.g. on a CPU
    torchrun ... -m nanochat_core.train.base ... --recipe 2026 --depth 12 --target-param-data-ratio 12 \\
        --total-batch-size -1 --embedding-lr 0.3 --unembedding-lr 0.008 --weight-decay 0.28 --warmup-steps 40 \\
        --warmdown-ratio 0.65 --final-lr-frac 0.05                               # the 2026 recipe, upstream's values

Writes into --out: checkpoints/step_*/ (every save_every steps and at the end), model.pt + meta.json (the
final model) and, last, metrics.json: {"val_bpb", "unigram_bpb", "steps", "tokens", "params",
"train_seconds", "tok_per_s", "resumed_from_step", "precision"}. unigram_bpb is an add-one smoothed unigram model
of the training tokens scored on the same validation tokens: the baseline a model that learns must beat.
precision is what the training matmuls ran in ("fp32", "bf16" or "fp8"; meta.json has it too, and the tokens per
step). With --out holding checkpoints of an interrupted run, training resumes from the newest one.

Two recipes (`recipe`):
- "nov2025" (default): nanochat as of November 2025, the reference of the seed's report card. Model
  gpt.config_for_depth, AdamW (embeddings, head) + Muon (matrices), PretrainLoader, horizon = ratio x all params,
  fixed total_batch_size, LR warmup_ratio / warmdown_ratio / final_lr_frac, Muon momentum 0.85 -> 0.95.
- "2026": upstream nanochat's 2026 record recipe. Model gpt.config_for_depth_2026 (value embeddings, residual
  scalars, smear, backout, SSSL sliding windows, ...) with its optimizer groups (Muon with Polar Express,
  NorMuon and cautious weight decay); the BOS-aligned best-fit loader for training; horizon = ratio x "scaling
  params" (transformer matrices + lm_head); total_batch_size <= 0 derives the batch from the depth
  (B = 2^round(log2(B_REF (D/D_REF)^0.383)), D = ratio x scaling params, D_REF the same at d12, B_REF = 2^19);
  every LR x sqrt(B/B_REF); Muon weight decay = weight_decay x sqrt(B/B_REF) x D_REF/D (smaller for wider
  models), cosine-decayed to 0; LR warmup of warmup_steps steps, warmdown 0.65, final 0.05; momentum 0.85 -> 0.97
  over 400 steps, down to 0.90 across the warmdown. `disable` turns features off one by one (ablations).
  Upstream's hyperparameter values for it are in the presets gpt2 / d12-2026 / tiny-2026
  (nanochat_core/pipeline/presets.py); the config defaults are November's.

Validation is always the sequential PretrainLoader over the last shard, whatever the recipe trains with, so val bpb
compares across recipes (upstream validates with the best-fit loader, whose cropping changes what is scored: its
numbers are not comparable with ours or with its own November ones).
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_core.common import DistInfo, init_distributed
from nanochat_core.config import ConfigError, config_to_dict
from nanochat_core.dataloader import BestFitLoader, PretrainLoader
from nanochat_core.device import PRECISIONS, mfu_percent, peak_flops, precision_autocast, resolve_precision
from nanochat_core.fp8 import disable_fp8, enable_fp8, fp8_supported
from nanochat_core.gpt import GPT, GPTConfig, config_for_depth, config_for_depth_2026
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
    lr_multiplier_2026,
    maybe_compile,
    muon_momentum,
    muon_momentum_2026,
    new_model,
    optimizer_step,
    remember_initial_lrs,
    report_step,
    seed_everything,
    weight_decay_2026,
)
from nanochat_core.wandb_log import WandbLog

RECIPES = ("nov2025", "2026")
MODEL_FEATURES = ("value_embeds", "residual_scalars", "smear", "backout")  # GPTConfig switches of the 2026 model
OPTIMIZER_FEATURES = ("polar_express", "normuon", "cautious_wd")  # GPT.setup_optimizers(disable=...)
DISABLE_NAMES = (*MODEL_FEATURES, "sliding_window", *OPTIMIZER_FEATURES, "bestfit")
B_REF = 2**19  # the 2026 recipe's reference: tokens per step at which d12's hyperparameters were tuned
DEPTH_REF = 12
BATCH_EXPONENT = 0.383  # the optimal batch grows as D^0.383 (Power Lines, arXiv 2505.13738)


@dataclass(frozen=True)
class BaseTrainConfig:
    depth: int = 20  # the model's one dial: width = 64 * depth
    max_seq_len: int = 2048
    device_batch_size: int = 32  # sequences per forward pass per rank
    total_batch_size: int = 524288  # tokens per optimizer step (all ranks, all micro-batches); <= 0: from depth (2026)
    num_iterations: int = -1  # > 0: exactly this many steps; else from target_param_data_ratio
    target_param_data_ratio: float = 20.0  # tokens = ratio * params (nov2025: all params; 2026: scaling params)
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0  # nov2025: AdamW's; 2026: Muon's at d12 and B_REF (scaled by depth, decayed to 0)
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
    recipe: str = "nov2025"  # "nov2025" or "2026" (module docstring)
    disable: str = ""  # recipe 2026: comma-separated features to turn off, of DISABLE_NAMES (ablations)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere; recipe 2026: fp8 where the GPU has it), fp32,
    #                          bf16 (autocast), fp8 (bf16 + fp8 matmuls; GPUs with fp8 tensor cores: H100, H200...)
    warmup_steps: int = 0  # recipe 2026: LR warmup in steps (upstream: 40); nov2025 uses warmup_ratio

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ConfigError(f"BaseTrainConfig.recipe must be one of {RECIPES}, got {self.recipe!r}")
        positive = ("depth", "max_seq_len", "device_batch_size", "eval_tokens")
        if self.recipe == "nov2025":  # only the 2026 recipe derives the batch from the depth
            positive += ("total_batch_size",)
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"BaseTrainConfig.{name} must be >= 1, got {getattr(self, name)}"
                                  + (" (a batch derived from the depth needs recipe 2026)"
                                     if name == "total_batch_size" else ""))
        self.disabled()  # checks the names
        if self.disable.strip() and self.recipe != "2026":
            raise ConfigError(f"BaseTrainConfig.disable={self.disable!r} turns off features of the 2026 recipe, but "
                              f"recipe is {self.recipe!r}: set recipe 2026 or leave disable empty")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"BaseTrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp8" and self.device_type in ("cpu", "mps"):
            raise ConfigError(f"BaseTrainConfig.precision='fp8' needs a GPU with fp8 tensor cores (H100, H200, ...), "
                              f"but device_type is {self.device_type!r}: use precision fp32, bf16 or auto there")
        if self.warmup_steps < 0:
            raise ConfigError(f"BaseTrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.recipe == "2026":
            if self.warmup_ratio:
                raise ConfigError("BaseTrainConfig.warmup_ratio is the nov2025 recipe's; recipe 2026 warms up over "
                                  "warmup_steps (set warmup_ratio 0)")
            if self.target_param_data_ratio <= 0:
                raise ConfigError("BaseTrainConfig.target_param_data_ratio must be > 0 with recipe 2026 (the batch, "
                                  "the horizon and the weight decay scale with the tokens it sets)")
        elif self.warmup_steps:
            raise ConfigError("BaseTrainConfig.warmup_steps is the 2026 recipe's; recipe nov2025 warms up over "
                              "warmup_ratio (set warmup_steps 0)")
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

    def disabled(self) -> frozenset[str]:
        """The features `disable` names (ConfigError for a name that is not one)."""
        names = frozenset(n.strip() for n in self.disable.split(",") if n.strip())
        unknown = sorted(names - set(DISABLE_NAMES))
        if unknown:
            raise ConfigError(f"BaseTrainConfig.disable: unknown feature(s) {unknown}; the features are "
                              f"{', '.join(DISABLE_NAMES)}")
        return names


def num_iterations_for(config: BaseTrainConfig, num_params: int) -> int:
    """The training horizon: num_iterations if set, else Chinchilla tokens = ratio * params."""
    if config.num_iterations > 0:
        return config.num_iterations
    return max(1, round(config.target_param_data_ratio * num_params) // config.total_batch_size)


# ---------------------------------------------------------------------------------------------
# the model and its sizing

def model_config_for(config: BaseTrainConfig, vocab_size: int, depth: int | None = None) -> GPTConfig:
    """The GPTConfig this run trains (at `depth`, default the config's): November's model, or the 2026 one less the
    features `disable` turns off."""
    depth = config.depth if depth is None else depth
    if config.recipe == "nov2025":
        return config_for_depth(depth, vocab_size, config.max_seq_len)
    off = config.disabled()
    changes: dict = {name: False for name in MODEL_FEATURES if name in off}
    if "sliding_window" in off:
        changes["window_pattern"] = "L"  # every layer attends to the full context
    return dataclasses.replace(config_for_depth_2026(depth, vocab_size, config.max_seq_len), **changes)


def scaling_params(model_config: GPTConfig) -> int:
    """Transformer matrices + lm_head of a model, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return GPT(model_config).num_scaling_params()


@dataclass(frozen=True)
class Sizing:
    """What the 2026 recipe derives from the model: batch, horizon, LR and weight-decay scales."""
    scaling_params: int  # transformer matrices + lm_head
    target_tokens: int  # D = target_param_data_ratio x scaling_params
    ref_tokens: float  # D_REF: the same at the reference depth d12
    total_batch_size: int  # B: the config's, or derived from D
    num_iterations: int
    lr_scale: float  # every LR x sqrt(B / B_REF)
    weight_decay: float  # Muon's at step 0: weight_decay x sqrt(B/B_REF) x D_REF/D


def derived_batch_size(target_tokens: float, ref_tokens: float) -> int:
    """B = B_REF (D/D_REF)^0.383, rounded to the nearest power of 2 (upstream's auto batch)."""
    return 2 ** round(math.log2(B_REF * (target_tokens / ref_tokens) ** BATCH_EXPONENT))


def sizing_2026(config: BaseTrainConfig, num_scaling_params: int, ref_scaling_params: int) -> Sizing:
    """The 2026 recipe's batch, horizon and scales for a model of num_scaling_params (d12's: ref_scaling_params).
    As upstream: D is the ratio's target even when num_iterations fixes the horizon."""
    target = int(config.target_param_data_ratio * num_scaling_params)
    ref = config.target_param_data_ratio * ref_scaling_params
    batch = config.total_batch_size if config.total_batch_size > 0 else derived_batch_size(target, ref)
    num_iterations = config.num_iterations if config.num_iterations > 0 else max(1, target // batch)
    lr_scale = (batch / B_REF) ** 0.5
    weight_decay = config.weight_decay * math.sqrt(batch / B_REF) * (ref / target)
    return Sizing(num_scaling_params, target, ref, batch, num_iterations, lr_scale, weight_decay)


def sizing_for(config: BaseTrainConfig, vocab_size: int) -> Sizing:
    """sizing_2026 from models built on the meta device: what the run will do, known before it starts (preflight)."""
    return sizing_2026(config, scaling_params(model_config_for(config, vocab_size)),
                       scaling_params(model_config_for(config, vocab_size, depth=DEPTH_REF)))


def optimizers_2026(model: GPT, config: BaseTrainConfig, sizing: Sizing) -> list[torch.optim.Optimizer]:
    """The 2026 model's optimizer groups with every LR x sizing.lr_scale (kept as `initial_lr`) and Muon's weight
    decay at its step-0 value (the loop schedules it)."""
    off = config.disabled() & set(OPTIMIZER_FEATURES)
    optimizers = model.setup_optimizers(unembedding_lr=config.unembedding_lr, embedding_lr=config.embedding_lr,
                                        matrix_lr=config.matrix_lr, weight_decay=sizing.weight_decay,
                                        disable=frozenset(off))
    remember_initial_lrs(optimizers, sizing.lr_scale)
    return optimizers


# ---------------------------------------------------------------------------------------------
# precision

def training_precision(config: BaseTrainConfig, device: torch.device) -> str:
    """"fp32", "bf16" or "fp8" for this run on `device` (ConfigError if the device cannot). auto is November's
    choice (bf16 on CUDA, fp32 elsewhere, as training always ran), except that the 2026 recipe takes fp8 where the
    GPU has fp8 tensor cores.

    fp8 is for the training matmuls only: a Float8Linear in eval mode is a plain Linear (nanochat_core.fp8), so
    validation (model.eval()) runs in bf16, and it keeps the Linear's parameters, so checkpoints are unchanged; the
    final model is turned back into plain Linears (disable_fp8) before it is saved."""
    if config.precision == "auto" and config.recipe == "2026" and device.type == "cuda" and fp8_supported(device):
        return "fp8"
    return resolve_precision(config.precision, device, field="BaseTrainConfig.precision")


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
    precision = training_precision(config, d.device)
    recipe_2026 = config.recipe == "2026"
    model_config = model_config_for(config, vocab_size)
    sizing = sizing_for(config, vocab_size) if recipe_2026 else None
    total_batch_size = sizing.total_batch_size if sizing else config.total_batch_size
    grad_accum = grad_accum_steps(total_batch_size, config.device_batch_size, config.max_seq_len, d.world_size)
    model = new_model(model_config, d.device)
    optimizers = optimizers_2026(model, config, sizing) if sizing else config_optimizers(model, config)
    num_params = model.num_params()
    num_iterations = sizing.num_iterations if sizing else num_iterations_for(config, num_params)
    flops_per_token, peak = model.estimate_flops(), peak_flops(d.device)
    print0(f"base ({config.recipe}, {precision}): {num_params:,} params, {num_iterations} steps of "
           f"{total_batch_size:,} tokens, grad_accum {grad_accum}, world {d.world_size}, device {d.device}"
           + ("" if peak else " (no peak FLOP/s known for it: MFU not reported)"))
    if sizing:
        print0(f"2026 sizing: {sizing.scaling_params:,} scaling params, target {sizing.target_tokens:,} tokens, "
               f"LRs x {sizing.lr_scale:.4f}, Muon weight decay {sizing.weight_decay:.6f} (cosine to 0)"
               + (f", off: {', '.join(sorted(config.disabled()))}" if config.disable.strip() else ""))
    fp8 = precision == "fp8"
    if fp8:  # before compiling, as the compiled graph must see the fp8 Linears
        print0(f"fp8: {enable_fp8(model)} Linear layers train with fp8 matmuls")

    session = Session(out_dir, "base", d, model, optimizers, keep=config.keep_checkpoints)
    cfg = config_to_dict(config)
    resumed = session.resume(cfg)
    start = resumed.step if resumed else 0
    loop = loop_state(resumed, val_bpb=None)
    counts = (resumed.rank_state["token_counts"].to(d.device) if resumed
              else torch.zeros(vocab_size, dtype=torch.long, device=d.device))  # training targets seen, this rank
    train_loader_cls = BestFitLoader if recipe_2026 and "bestfit" not in config.disabled() else PretrainLoader
    loader = train_loader_cls(shards_dir, tokenizer, config.device_batch_size, config.max_seq_len, "train",
                              d.rank, d.world_size, d.device, state=resumed.loader_state if resumed else None)
    fwd = maybe_compile(model, d.device, config.compile)
    autocast = precision_autocast(precision, d.device)

    def meta() -> dict:
        return {"stage": "base", "model_config": asdict(model_config), "config": cfg, "loop_state": loop,
                "num_iterations": num_iterations, "total_batch_size": total_batch_size, "precision": precision}

    def save(step: int) -> Path:
        return session.save(step, meta(), loader_state, {"token_counts": counts.cpu()})

    def lr_and_optimizer_step(step: int) -> float:
        """This step's schedules (functions of the step: a resumed run replays them) and the optimizer step."""
        if sizing is None:
            lrm = lr_multiplier(step, num_iterations, config.warmup_ratio, config.warmdown_ratio,
                                config.final_lr_frac)
            optimizer_step(model, optimizers, lrm, muon_momentum(step))
            return lrm
        lrm = lr_multiplier_2026(step, num_iterations, config.warmup_steps, config.warmdown_ratio,
                                 config.final_lr_frac)
        optimizer_step(model, optimizers, lrm, muon_momentum_2026(step, num_iterations, config.warmdown_ratio),
                       weight_decay_2026(step, num_iterations, sizing.weight_decay))
        return lrm

    val_targets = None
    run_info = {**cfg, "num_params": num_params, "num_iterations": num_iterations, "world_size": d.world_size,
                "total_batch_size": total_batch_size, "precision": precision}
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
            lrm = lr_and_optimizer_step(step)
            loss_value = (train_loss / grad_accum).item()
            session.record_loss(step + 1, loss_value)  # already on the host: no extra sync
            dt = time.time() - t0
            loop["train_seconds"] += dt
            mfu = mfu_percent(flops_per_token, total_batch_size, dt, peak, d.world_size)  # bf16-equivalent
            report_step(step, num_iterations, wandb, loss_value, lrm, total_batch_size, dt, mfu, loop["loss_curve"])

    if fp8:
        disable_fp8(model)  # the final model is saved (and used downstream) with plain Linears
    if d.is_distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    metrics = {
        "val_bpb": loop["val_bpb"],
        "unigram_bpb": unigram_bpb(counts, val_targets, token_bytes),
        "steps": num_iterations,
        "tokens": num_iterations * total_batch_size,
        "params": num_params,
        "train_seconds": round(loop["train_seconds"], 3),
        "tok_per_s": round(num_iterations * total_batch_size / max(loop["train_seconds"], 1e-9)),
        "resumed_from_step": start,
        "precision": precision,
    }
    return session.finish({**meta(), "step": num_iterations, "val_bpb": loop["val_bpb"]}, metrics)


def main(argv: list[str] | None = None) -> None:
    training_main(argv, __doc__, BaseTrainConfig, (("shards", "directory of shard_*.parquet (the last is validation)"),
                  ("tokenizer", "tokenizer directory (Tokenizer.save)")), train)


if __name__ == "__main__":
    main()
