"""DistAdamW: AdamW with ZeRO-2 style sharding across ranks (no DDP wrapper needed).

A single process uses torch.optim.AdamW (see GPT.setup_optimizers). DistAdamW does the same math as
torch's single-tensor AdamW, so a distributed run given the same averaged gradients produces the same
parameters as torch.optim.AdamW on CPU (bit for bit) and within rounding of the fused CUDA kernel.

Per parameter: reduce-scatter (average) the gradient along dim 0, update this rank's slice (decoupled
weight decay, bias-corrected Adam), all-gather the slices back into the parameter. Optimizer state covers
the slice only, so it is saved per rank. A parameter whose first dimension does not divide by the world
size is all-reduced instead and updated whole, identically, on every rank (its state is then full-size),
as are 0-d tensors; so the 2026 model's tiny scalars and gates ([1], [n_layer], [1, 24], [n_kv_head, 12])
work at any world size (sharded when their dim 0 happens to divide, all-reduced otherwise). A parameter
without a gradient counts as a zero gradient: every rank must take part in every collective. lr, betas,
eps and weight_decay are read from each param group at every step, so groups may differ (as
torch.optim.AdamW allows) and a loop may schedule them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanochat_core.common import CommClock

# torch >= 2.15 renamed the *_tensor collectives (the old names warn); same signatures
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    """One AdamW step on p in place, written like torch's single-tensor AdamW."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


class DistAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(param_groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.comm = CommClock()

    @torch.no_grad()
    def step(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        pending = []  # launch every reduction first so communication overlaps the updates below
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                sharded = p.ndim > 0 and p.shape[0] % world == 0
                if sharded:
                    out = torch.empty_like(grad[: p.shape[0] // world])
                    work = reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.AVG, async_op=True)
                else:
                    out = grad.clone()
                    work = dist.all_reduce(out, op=dist.ReduceOp.AVG, async_op=True)
                pending.append((work, group, p, out, sharded))
        gathers = []
        for work, group, p, grad, sharded in pending:
            self.comm.wait(work, p.device)
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if sharded:
                rows = p.shape[0] // world
                shard = p[rank * rows:(rank + 1) * rows]
                adamw_update(shard, grad, self.state[p], *hyper)
                gathers.append(all_gather_single(p, shard.clone(), async_op=True))
            else:
                adamw_update(p, grad, self.state[p], *hyper)
        for work in gathers:
            self.comm.wait(work, p.device)
