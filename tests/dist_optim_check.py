"""Distributed optimizer check, run under torchrun by tests/test_optim.py (gloo on CPU).

    torchrun --standalone --nproc_per_node=N tests/dist_optim_check.py OUT_DIR

A global batch of GLOBAL_ROWS sequences is split evenly over the N ranks and, within a rank, over
GLOBAL_ROWS / N / MICRO_ROWS micro-batches (loss divided by their count, as the training loops do), so
every run sees the same micro-batches whatever N is. Each rank writes OUT_DIR/rank{r}.pt (loads with
weights_only=True):
    loss0, grads0   step-0 loss and gradients from one forward over the rank's whole share, averaged over
                    ranks with all_reduce (equal to a one-rank full-batch run up to float rounding)
    init            the parameters before training
    params          the parameters after STEPS optimizer steps (Dist* optimizers when N > 1)
    resumed         the same, but rebuilt at step RESUME_AT from saved model + optimizer state
    adamw_max_diff  (N > 1) DistAdamW vs torch.optim.AdamW on a sharded parameter and on one whose rows do
                    not divide by N
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat_core.common import cleanup_distributed, init_distributed
from nanochat_core.gpt import GPT, GPTConfig

# 3 layers: the Muon shape groups of 3 matrices leave a padded block on 2 ranks; 2 heads over 1 kv head (GQA)
CONFIG = GPTConfig(sequence_len=32, vocab_size=256, n_layer=3, n_head=2, n_kv_head=1, n_embd=128)
GLOBAL_ROWS, MICRO_ROWS, STEPS, RESUME_AT = 4, 2, 5, 3


def build_model(seed: int) -> GPT:
    """SEED init, plus small random lm_head / output projections so every gradient is non-zero at step 0."""
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                p.normal_(0.0, 0.02)
    return model


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CONFIG.vocab_size, (GLOBAL_ROWS, CONFIG.sequence_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def rank_share(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step)
    rows = GLOBAL_ROWS // world
    return x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]


def train_step(model: GPT, optimizers: list, step: int, rank: int, world: int) -> None:
    x, y = rank_share(step, rank, world)
    micro = x.size(0) // MICRO_ROWS
    for i in range(micro):
        rows = slice(i * MICRO_ROWS, (i + 1) * MICRO_ROWS)
        (model(x[rows], y[rows]) / micro).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def roundtrip(obj):
    """Through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def averaged_step0(model: GPT, rank: int, world: int) -> tuple[torch.Tensor, dict]:
    x, y = rank_share(0, rank, world)
    loss = model(x, y)
    loss.backward()
    loss = loss.detach().clone()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if world > 1:
        for t in [loss, *grads.values()]:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return loss, grads


def adamw_vs_torch_diff(rank: int, world: int) -> float:
    """DistAdamW against torch.optim.AdamW given the ranks' mean gradient, on a sharded parameter (rows % world
    == 0) and on one that takes the all-reduce path. eps is as large as the gradients, so that a gradient
    summed instead of averaged would show (Adam is otherwise blind to the gradient's scale)."""
    from nanochat_core.adamw import DistAdamW

    gen = torch.Generator().manual_seed(7)
    inits = [torch.randn(2 * world, 6, generator=gen), torch.randn(world + 1, 6, generator=gen)]
    params = [torch.nn.Parameter(t.clone()) for t in inits]
    refs = [torch.nn.Parameter(t.clone()) for t in inits]
    kwargs = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.1}
    opt, ref_opt = DistAdamW([{"params": params}], **kwargs), torch.optim.AdamW(refs, fused=False, **kwargs)
    for step in range(3):
        for i, (p, ref) in enumerate(zip(params, refs, strict=True)):
            grads = [1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * i + r))
                     for r in range(world)]
            p.grad, ref.grad = grads[rank].clone(), torch.stack(grads).mean(0)
        opt.step()
        ref_opt.step()
    return max((p - ref).abs().max().item() for p, ref in zip(params, refs, strict=True))


def run(rank: int, world: int) -> dict:
    """Everything the test compares, for this rank. With world == 1 (no process group) the single-process
    optimizers run; the test also calls this in-process for its reference."""
    if GLOBAL_ROWS % (world * MICRO_ROWS):
        raise ValueError(f"{GLOBAL_ROWS} rows do not split over {world} ranks of {MICRO_ROWS}-row micro-batches")
    model = build_model(seed=42)
    init = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss0, grads0 = averaged_step0(model, rank, world)
    optimizers = model.setup_optimizers()
    for step in range(STEPS):
        if step == RESUME_AT:
            snapshot = roundtrip({"model": model.state_dict(), "optim": [o.state_dict() for o in optimizers]})
        train_step(model, optimizers, step, rank, world)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}

    resumed_model = build_model(seed=1)  # different weights: the snapshot must overwrite all of them
    resumed_model.load_state_dict(snapshot["model"])
    resumed_optimizers = resumed_model.setup_optimizers()
    for opt, state in zip(resumed_optimizers, snapshot["optim"], strict=True):
        opt.load_state_dict(state)
    for step in range(RESUME_AT, STEPS):
        train_step(resumed_model, resumed_optimizers, step, rank, world)
    resumed = {name: p.detach().clone() for name, p in resumed_model.named_parameters()}

    result = {"world": world, "optimizers": [type(o).__name__ for o in optimizers], "init": init,
              "loss0": loss0, "grads0": grads0, "params": params, "resumed": resumed}
    if world > 1:
        result["adamw_max_diff"] = adamw_vs_torch_diff(rank, world)
    return result


def main(out_dir: str) -> None:
    info = init_distributed("cpu")
    result = run(info.rank, info.world_size)
    torch.save(result, Path(out_dir) / f"rank{info.rank}.pt")
    cleanup_distributed()  # gc.collect first: gloo can abort in destroy while tensors are still referenced


if __name__ == "__main__":
    main(sys.argv[1])
