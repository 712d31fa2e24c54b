"""Muon: momentum SGD whose update is orthogonalized by a quintic Newton-Schulz iteration.

`Muon` runs in one process. `DistMuon` shards the work across ranks (no DDP wrapper needed): for each
block of world_size same-shape parameters, a reduce-scatter averages the gradients so that every rank
owns one parameter, the owner applies the update, and an all-gather brings the result to every rank.
The last block of a shape is padded with a zero buffer. Momentum buffers live on the owner rank only,
so optimizer state is saved per rank. The list-form collectives used here work on gloo (CPU) and nccl.

Both group parameters by shape in sorted order, so every rank walks them identically. The update is
blind to the gradient's scale (Newton-Schulz normalizes it first), which is why a single-process step and
a distributed one agree exactly when their averaged gradients do.

The 2026 recipe adds three options, all off by default (the defaults are the November-2025 step, op for op):
- orthogonalizer="polar_express": Newton-Schulz with per-iteration coefficients (Polar Express).
- normuon_beta2: NorMuon's per-neuron variance normalization of the orthogonalized update.
- weight_decay / cautious_wd: decoupled weight decay, optionally only where update and weight agree in sign.
Each param group carries these keys, so a training loop can schedule group["weight_decay"] per step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nanochat_core.common import CommClock

NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel et al. 2025, arXiv 2505.16932; num_iters=5, safety factor 2e-2, cushion 2), as in
# upstream nanochat's 2026 optimizer: one (a, b, c) per iteration, each the minimax-optimal quintic for the
# singular-value interval the previous ones leave, so 5 steps land closer to 1 than fixed coefficients do.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ORTHOGONALIZERS = ("newton_schulz", "polar_express")


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


def zeropower_via_polar_express(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Polar Express orthogonalization, in bfloat16: the Newton-Schulz quintic with per-step coefficients.
    The 1.01 margin keeps the largest singular value of the normalized input safely below 1, which the
    coefficients' convergence interval assumes (bf16 rounding can push it past ||X||_F otherwise)."""
    if steps > len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps={steps}: polar_express has coefficients for at most {len(POLAR_EXPRESS_COEFFS)}")
    X = G.bfloat16()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def normuon_reduce_dim(shape: torch.Size | tuple[int, ...]) -> int:
    """The dimension NorMuon averages over: the smaller one. An orthogonalized wide matrix already has equal
    row norms (and a tall one equal column norms), so the uneven scales sit along the larger dimension."""
    return -1 if shape[-2] >= shape[-1] else -2


def normuon_normalize(g: torch.Tensor, second_moments: list[torch.Tensor], beta2: float) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv 2510.05491): after orthogonalization, divide each neuron's update by the
    root of an EMA of its mean square (a factored second moment, one value per row of a tall-or-square matrix,
    per column of a wide one), then restore each matrix's Frobenius norm, so the step size stays Muon's and
    only its distribution over neurons changes. g is stacked (K, rows, cols); second_moments are updated in place."""
    reduce_dim = normuon_reduce_dim(g.shape)
    g32 = g.float()
    mean_square = g32.square().mean(dim=reduce_dim, keepdim=True)
    torch._foreach_lerp_(second_moments, list(mean_square.unbind(0)), 1 - beta2)
    normalized = g32 * torch.stack(second_moments).clamp_min(1e-10).rsqrt()
    norm_kept = g32.norm(dim=(-2, -1), keepdim=True) / normalized.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return (normalized * norm_kept).to(g.dtype)


def muon_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lr: float,
                momentum: float, nesterov: bool, ns_steps: int, orthogonalize=zeropower_via_newtonschulz5,
                second_moments: list[torch.Tensor] | None = None, normuon_beta2: float | None = None,
                weight_decay: float = 0.0, cautious_wd: bool = False) -> None:
    """One Muon step, in place, on same-shape matrices at once (grads are left untouched): the momentum
    updates are foreach ops and the Newton-Schulz iteration runs batched over the stacked matrices, so a
    shape group costs a handful of kernel launches instead of a handful per matrix.
    With normuon_beta2=None and weight_decay=0 this is exactly the November-2025 step."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    g = torch.stack(torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs)
    g = orthogonalize(g, ns_steps).to(params[0].dtype)
    scale = max(1.0, params[0].size(-2) / params[0].size(-1)) ** 0.5  # taller matrices take a larger step
    if normuon_beta2 is not None:
        g = normuon_normalize(g, second_moments, normuon_beta2)
    if weight_decay and cautious_wd:
        # cautious weight decay (Chen et al. 2025): decay only the weights the update already pushes towards
        # zero (g*p >= 0), so decay never fights the gradient; p -= lr_eff * (g + wd * p * mask)
        stacked = torch.stack(params)
        g = g + weight_decay * stacked * ((g * stacked) >= 0)
    elif weight_decay:
        torch._foreach_mul_(params, 1 - lr * scale * weight_decay)  # decoupled, at the same LR as the update
    torch._foreach_add_(params, list(g.unbind(0)), alpha=-lr * scale)


def pick_orthogonalizer(params: list[torch.Tensor], name: str = "newton_schulz"):
    """The orthogonalization function to use: compiled on CUDA (fused elementwise work between the matmuls),
    eager elsewhere (compiling on CPU needs a C++ toolchain and gains little there)."""
    fn = zeropower_via_polar_express if name == "polar_express" else zeropower_via_newtonschulz5
    if params and params[0].device.type == "cuda":
        return torch.compile(fn)
    return fn


def muon_defaults(lr: float, momentum: float, nesterov: bool, ns_steps: int, orthogonalizer: str,
                  normuon_beta2: float | None, weight_decay: float, cautious_wd: bool) -> dict:
    """The per-group hyperparameters, checked: a bad value fails here rather than as NaNs mid-run."""
    if orthogonalizer not in ORTHOGONALIZERS:
        raise ValueError(f"orthogonalizer={orthogonalizer!r}: expected one of {ORTHOGONALIZERS}")
    if orthogonalizer == "polar_express" and ns_steps > len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"ns_steps={ns_steps}: polar_express has coefficients for at most "
                         f"{len(POLAR_EXPRESS_COEFFS)} steps")
    if normuon_beta2 is not None and not 0.0 < normuon_beta2 < 1.0:
        raise ValueError(f"normuon_beta2={normuon_beta2}: expected None or a value in (0, 1)")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"weight_decay={weight_decay}: expected a finite value >= 0")
    return {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
            "orthogonalizer": orthogonalizer, "normuon_beta2": normuon_beta2, "weight_decay": weight_decay,
            "cautious_wd": cautious_wd}


def _shape_groups(params: list[torch.Tensor], defaults: dict) -> list[dict]:
    """One param group per shape, in a deterministic order (every rank must agree)."""
    shapes = sorted({tuple(p.shape) for p in params})
    return [{"params": [p for p in params if tuple(p.shape) == shape], **defaults} for shape in shapes]


def momentum_buffer(state: dict, like: torch.Tensor) -> torch.Tensor:
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(like)
    return state["momentum_buffer"]


def second_momentum_buffer(state: dict, like: torch.Tensor) -> torch.Tensor:
    """NorMuon's factored second moment, kept in float32 next to the momentum buffer (same owner, same file)."""
    if "second_momentum_buffer" not in state:
        rows, cols = like.shape
        shape = (rows, 1) if normuon_reduce_dim(like.shape) == -1 else (1, cols)
        state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=like.device)
    return state["second_momentum_buffer"]


class _MuonBase(torch.optim.Optimizer):
    """What Muon and DistMuon share: argument checks, the per-group step, and loading older checkpoints."""

    def __init__(self, params, lr: float, momentum: float, nesterov: bool, ns_steps: int, orthogonalizer: str,
                 normuon_beta2: float | None, weight_decay: float, cautious_wd: bool):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError(f"{type(self).__name__} optimizes 2-D matrices only; use AdamW for other parameters")
        defaults = muon_defaults(lr, momentum, nesterov, ns_steps, orthogonalizer, normuon_beta2, weight_decay,
                                 cautious_wd)
        super().__init__(self._groups(params, defaults), defaults)
        self.orthogonalizers = {name: pick_orthogonalizer(params, name) for name in ORTHOGONALIZERS}

    def _groups(self, params: list[torch.Tensor], defaults: dict) -> list[dict]:
        return _shape_groups(params, defaults)

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        bufs = [momentum_buffer(self.state[p], g) for p, g in zip(params, grads, strict=True)]
        seconds = None
        if group["normuon_beta2"] is not None:
            seconds = [second_momentum_buffer(self.state[p], p) for p in params]
        muon_update(params, grads, bufs, group["lr"], group["momentum"], group["nesterov"], group["ns_steps"],
                    self.orthogonalizers[group["orthogonalizer"]], seconds, group["normuon_beta2"],
                    group["weight_decay"], group["cautious_wd"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # checkpoints from before the 2026 options lack their keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)


class Muon(_MuonBase):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 orthogonalizer: str = "newton_schulz", normuon_beta2: float | None = None,
                 weight_decay: float = 0.0, cautious_wd: bool = False):
        super().__init__(params, lr, momentum, nesterov, ns_steps, orthogonalizer, normuon_beta2, weight_decay,
                         cautious_wd)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            self._update(group, params, [p.grad for p in params])


class DistMuon(_MuonBase):
    """Muon with the orthogonalization sharded across ranks (reduce-scatter grads, all-gather params)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 orthogonalizer: str = "newton_schulz", normuon_beta2: float | None = None,
                 weight_decay: float = 0.0, cautious_wd: bool = False):
        super().__init__(params, lr, momentum, nesterov, ns_steps, orthogonalizer, normuon_beta2, weight_decay,
                         cautious_wd)
        self.comm = CommClock()

    def _groups(self, params: list[torch.Tensor], defaults: dict) -> list[dict]:
        groups = _shape_groups(params, defaults)
        for group in groups:
            group["zero_buffer"] = torch.zeros_like(group["params"][0])
        return groups

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
                self._update(group, [owned], [grad])
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
