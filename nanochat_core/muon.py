"""Muon: momentum SGD whose update is orthogonalized by a quintic Newton-Schulz iteration.

`Muon` runs in one process. `DistMuon` shards the work across ranks (no DDP wrapper needed): for each
block of world_size same-shape parameters, a reduce-scatter averages the gradients so that every rank
owns one parameter, the owner applies the update, and an all-gather brings the result to every rank.
The last block of a shape is padded with a zero buffer. Momentum buffers live on the owner rank only,
so optimizer state is saved per rank. The list-form collectives used here work on gloo (CPU) and nccl.

Both group parameters by shape in sorted order, so every rank walks them identically. The update is
blind to the gradient's scale (Newton-Schulz normalizes it first), which is why a single-process step and
a distributed one agree exactly when their averaged gradients do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanochat_core.common import CommClock

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalize G (push its singular values towards 1), in bfloat16."""
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def muon_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lr: float,
                momentum: float, nesterov: bool, ns_steps: int, orthogonalize=zeropower_via_newtonschulz5) -> None:
    """One Muon step, in place, on same-shape matrices at once (grads are left untouched): the momentum
    updates are foreach ops and the Newton-Schulz iteration runs batched over the stacked matrices, so a
    shape group costs a handful of kernel launches instead of a handful per matrix."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    g = torch.stack(torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs)
    g = orthogonalize(g, ns_steps).to(params[0].dtype)
    scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5  # taller matrices take a larger step
    torch._foreach_add_(params, list(g.unbind(0)), alpha=-lr * scale)


def orthogonalizer(params: list[torch.Tensor]):
    """The Newton-Schulz function to use: compiled on CUDA (fused elementwise work between the matmuls),
    eager elsewhere (compiling on CPU needs a C++ toolchain and gains little there)."""
    if params and params[0].device.type == "cuda":
        return torch.compile(zeropower_via_newtonschulz5)
    return zeropower_via_newtonschulz5


def _shape_groups(params: list[torch.Tensor], lr: float, momentum: float, nesterov: bool, ns_steps: int) -> list[dict]:
    """One param group per shape, in a deterministic order (every rank must agree)."""
    shapes = sorted({tuple(p.shape) for p in params})
    return [{"params": [p for p in params if tuple(p.shape) == shape], "lr": lr, "momentum": momentum,
             "nesterov": nesterov, "ns_steps": ns_steps} for shape in shapes]


def momentum_buffer(state: dict, like: torch.Tensor) -> torch.Tensor:
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(like)
    return state["momentum_buffer"]


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon optimizes 2-D matrices only; use AdamW for other parameters")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        super().__init__(_shape_groups(params, lr, momentum, nesterov, ns_steps), defaults)
        self.orthogonalize = orthogonalizer(params)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = [momentum_buffer(self.state[p], p.grad) for p in params]
            muon_update(params, [p.grad for p in params], bufs, group["lr"], group["momentum"],
                        group["nesterov"], group["ns_steps"], self.orthogonalize)


class DistMuon(torch.optim.Optimizer):
    """Muon with the orthogonalization sharded across ranks (reduce-scatter grads, all-gather params)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("DistMuon optimizes 2-D matrices only; use AdamW for other parameters")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps}
        groups = _shape_groups(params, lr, momentum, nesterov, ns_steps)
        for group in groups:
            group["zero_buffer"] = torch.zeros_like(group["params"][0])
        super().__init__(groups, defaults)
        self.comm = CommClock()
        self.orthogonalize = orthogonalizer(params)

    @torch.no_grad()
    def step(self) -> None:
        rank, world = dist.get_rank(), dist.get_world_size()
        pending = []  # (future, group, owned param or None, its averaged grad)
        for group in self.param_groups:
            params, zero = group["params"], group["zero_buffer"]
            for base in range(0, len(params), world):
                block = params[base:base + world]
                inputs = [p.grad if p.grad is not None else torch.zeros_like(p) for p in block]
                inputs += [zero] * (world - len(block))
                owned = block[rank] if rank < len(block) else None
                out = torch.empty_like(zero)
                work = dist.reduce_scatter(out, inputs, op=dist.ReduceOp.AVG, async_op=True)
                pending.append((work, group, base, owned, out))
        gathers = []
        for work, group, base, owned, grad in pending:
            self.comm.wait(work, grad.device)
            if owned is not None:
                muon_update([owned], [grad], [momentum_buffer(self.state[owned], grad)], group["lr"],
                            group["momentum"], group["nesterov"], group["ns_steps"], self.orthogonalize)
            params, zero = group["params"], group["zero_buffer"]
            block = params[base:base + world]
            outputs = block + [torch.empty_like(zero) for _ in range(world - len(block))]
            source = owned if owned is not None else zero
            gathers.append(dist.all_gather(outputs, source.contiguous(), async_op=True))
        for work in gathers:
            self.comm.wait(work, zero.device)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group.pop("zero_buffer", None)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        zeros = [g["zero_buffer"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, zero in zip(self.param_groups, zeros, strict=True):
            group["zero_buffer"] = zero
