"""The 2026 optimizer options (issue 14): Polar Express, NorMuon, (cautious) weight decay in Muon/DistMuon, and
DistAdamW on the 2026 model's tiny parameters with per-group betas.

The distributed checks run this file as a torchrun script on 2 gloo ranks (as tests/test_optim.py does with
tests/dist_optim_check.py) and compare against single-process optimizers fed the ranks' mean gradient:

    torchrun --standalone --nproc_per_node=2 tests/test_optim_2026.py OUT_DIR
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_core.muon import (
    DistMuon,
    Muon,
    normuon_normalize,
    zeropower_via_newtonschulz5,
    zeropower_via_polar_express,
)

REPO = Path(__file__).resolve().parents[1]

# 3 matrices of one shape leave a padded block on 2 ranks; tall, wide and square shapes
MUON_SHAPES = [(48, 16)] * 3 + [(16, 48)] * 2 + [(24, 24)]
MUON_CONFIGS = {
    "default": {},
    "2026": {"orthogonalizer": "polar_express", "normuon_beta2": 0.9, "weight_decay": 0.2, "cautious_wd": True},
    "plain_wd": {"weight_decay": 0.2},
}
# the 2026 model's tiny params: smear/backout_lambda [1], resid/x0_lambdas [n_layer], smear_gate [1, 24],
# ve_gate [n_kv_head, 12]; on 2 ranks [3] and [1, 24] are all-reduced, [2, 12] and [4, 6] reduce-scattered
ADAMW_GROUPS = [
    {"shapes": [(3,)], "lr": 0.005, "betas": (0.96, 0.95), "eps": 1e-10, "weight_decay": 0.05},
    {"shapes": [(1,), (1, 24), ()], "lr": 0.2, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0},
    {"shapes": [(2, 12), (4, 6)], "lr": 0.01, "betas": (0.8, 0.995), "eps": 1e-3, "weight_decay": 0.01},
]
STEPS, RESUME_AT, WORLD = 4, 2, 2


# ---------------------------------------------------------------------------------------------------------------
# shared by the single-process tests, the torchrun workers and their references


def rank_grads(shapes: list[tuple], step: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def mean_grads(shapes: list[tuple], step: int, world: int) -> list[torch.Tensor]:
    per_rank = [rank_grads(shapes, step, r) for r in range(world)]
    return [torch.stack(gs).mean(0) for gs in zip(*per_rank, strict=True)]


def initial_values(shapes: list[tuple]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def schedule(opt: torch.optim.Optimizer, step: int, base_wd: float) -> None:
    """What the training loop does: rewrite lr, momentum and the Muon weight decay in every group each step."""
    for group in opt.param_groups:
        group["lr"] = 0.02 * (1 - step / 8)
        group["momentum"] = 0.85 + 0.03 * step
        group["weight_decay"] = base_wd * (1 - step / STEPS)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(make_opt, shapes: list[tuple], grads_for_step, scheduled_wd: float | None) -> dict[str, list]:
    """STEPS steps, plus a run rebuilt at RESUME_AT from saved params + optimizer state (a checkpoint resume)."""

    def run(values, opt_state, steps):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = make_opt(params)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        snapshot = None
        for step in steps:
            if step == RESUME_AT:
                snapshot = roundtrip({"params": [p.detach().clone() for p in params], "optim": opt.state_dict()})
            if scheduled_wd is not None:
                schedule(opt, step, scheduled_wd)
            for p, g in zip(params, grads_for_step(step), strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach().clone() for p in params], snapshot

    final, snapshot = run(initial_values(shapes), None, range(STEPS))
    resumed, _ = run(snapshot["params"], snapshot["optim"], range(RESUME_AT, STEPS))
    return {"final": final, "resumed": resumed}


def make_muon(cls, config: dict):
    return lambda params: cls(params, **config)


def make_adamw(cls, **kwargs):
    def make(params):
        groups, i = [], 0
        for spec in ADAMW_GROUPS:
            n = len(spec["shapes"])
            groups.append({**{k: v for k, v in spec.items() if k != "shapes"}, "params": params[i:i + n]})
            i += n
        return cls(groups, **kwargs)
    return make


ADAMW_SHAPES = [shape for spec in ADAMW_GROUPS for shape in spec["shapes"]]


def november_reference(grads_for_step) -> list[torch.Tensor]:
    """Today's (November 2025) Muon step, written out per matrix from the unchanged Newton-Schulz function."""
    params = initial_values(MUON_SHAPES)
    bufs = [torch.zeros(s) for s in MUON_SHAPES]
    for step in range(STEPS):
        lr, momentum = 0.02 * (1 - step / 8), 0.85 + 0.03 * step
        for w, buf, g in zip(params, bufs, grads_for_step(step), strict=True):
            buf.lerp_(g, 1 - momentum)
            update = zeropower_via_newtonschulz5(g.lerp(buf, momentum)).float()
            w.add_(update, alpha=-lr * max(1.0, w.size(0) / w.size(1)) ** 0.5)
    return params


# ---------------------------------------------------------------------------------------------------------------
# single process


def test_default_muon_is_the_november_step():
    """Default arguments (and the new options spelled out at their defaults) give bit for bit today's step."""
    expected = november_reference(lambda step: mean_grads(MUON_SHAPES, step, 1))
    spelled_out = {"orthogonalizer": "newton_schulz", "normuon_beta2": None, "weight_decay": 0.0, "cautious_wd": False}
    for config in [{}, spelled_out]:
        got = train(make_muon(Muon, config), MUON_SHAPES, lambda step: mean_grads(MUON_SHAPES, step, 1), 0.0)
        assert all(torch.equal(a, b) for a, b in zip(got["final"], expected, strict=True))


def test_muon_groups_carry_the_2026_keys():
    opt = Muon([torch.nn.Parameter(torch.zeros(4, 8))], weight_decay=0.1, cautious_wd=True)
    (group,) = opt.param_groups
    assert {k: group[k] for k in ["orthogonalizer", "normuon_beta2", "weight_decay", "cautious_wd"]} == {
        "orthogonalizer": "newton_schulz", "normuon_beta2": None, "weight_decay": 0.1, "cautious_wd": True}


def spectrum_matrix(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values log-spaced over [0.01, 1] (condition number 100), and its polar factor."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    return u @ torch.diag(torch.logspace(0, -2, k)) @ v.T, u @ v.T


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)])
def test_polar_express_is_close_to_orthogonal(shape):
    g, polar = spectrum_matrix(*shape, seed=0)
    x = zeropower_via_polar_express(g, steps=5)
    assert x.shape == g.shape and x.dtype == torch.bfloat16
    s = torch.linalg.svdvals(x.float())
    # Polar Express's safety margin and bf16 leave singular values in about [0.86, 1.14] (Newton-Schulz: [0.68, 1.2])
    assert s.min() > 0.8 and s.max() < 1.2, s
    assert s.min() > torch.linalg.svdvals(zeropower_via_newtonschulz5(g).float()).min()  # tighter than Newton-Schulz
    assert (x.float() - polar).abs().max() < 0.07  # the singular vectors are g's
    assert torch.equal(zeropower_via_polar_express(g * 64), x)  # blind to scale, as Newton-Schulz


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_normuon_keeps_the_norm_and_equalises_neuron_rms(shape):
    """NorMuon on an orthogonalized update: per-matrix Frobenius norm unchanged; at the first step (EMA = one
    sample) every row of a tall matrix, every column of a wide one, ends with the same RMS."""
    gen = torch.Generator().manual_seed(3)
    g = zeropower_via_newtonschulz5(torch.randn(2, *shape, generator=gen)).float()
    tall = shape[0] >= shape[1]
    seconds = [torch.zeros((shape[0], 1) if tall else (1, shape[1])) for _ in range(2)]
    out = normuon_normalize(g, seconds, beta2=0.9)
    assert torch.allclose(out.norm(dim=(-2, -1)), g.norm(dim=(-2, -1)), rtol=1e-5)
    dim = -1 if tall else -2
    before, after = g.square().mean(dim).sqrt(), out.square().mean(dim).sqrt()
    assert (before.amax(-1) / before.amin(-1)).min() > 1.2  # Muon's output has uneven neuron scales ...
    assert torch.allclose(after, after.mean(-1, keepdim=True), rtol=1e-4)  # ... NorMuon evens them out
    # the state is an EMA of the mean square (no bias correction: the norm is restored anyway)
    assert torch.allclose(torch.stack(seconds).squeeze(dim), 0.1 * g.square().mean(dim))
    g2 = zeropower_via_newtonschulz5(torch.randn(2, *shape, generator=gen)).float()
    expected = 0.9 * torch.stack(seconds) + 0.1 * g2.square().mean(dim, keepdim=True)
    normuon_normalize(g2, seconds, beta2=0.9)
    assert torch.allclose(torch.stack(seconds), expected)


def first_muon_update(g: torch.Tensor, momentum: float) -> torch.Tensor:
    """The orthogonalized Nesterov update of Muon's first step (buffer = (1-μ)·g)."""
    buf = torch.zeros_like(g).lerp_(g, 1 - momentum)
    return zeropower_via_newtonschulz5(g.lerp(buf, momentum)).float()


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_cautious_weight_decay_only_where_update_and_weight_agree(shape):
    """p -= lr_eff·(g + wd·p·[g·p >= 0]), lr_eff = lr·max(1, rows/cols)^0.5: weights the update pushes away from
    zero keep their decay-free step; plain decoupled decay shrinks every weight by (1 - lr_eff·wd)."""
    lr, wd, momentum = 0.05, 0.5, 0.95
    gen = torch.Generator().manual_seed(5)
    p0, g = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    u = first_muon_update(g, momentum)
    lr_eff = lr * max(1.0, shape[0] / shape[1]) ** 0.5
    agree = (u * p0) >= 0
    assert 0.3 < agree.float().mean() < 0.7  # both cases are exercised

    p = torch.nn.Parameter(p0.clone())
    p.grad = g.clone()
    Muon([p], lr=lr, momentum=momentum, weight_decay=wd, cautious_wd=True).step()
    step = p0 - p.detach()
    assert torch.allclose(step, lr_eff * (u + wd * p0 * agree), atol=1e-6)
    assert torch.allclose(step[~agree], lr_eff * u[~agree], atol=1e-6)  # no decay where they disagree

    p = torch.nn.Parameter(p0.clone())
    p.grad = g.clone()
    Muon([p], lr=lr, momentum=momentum, weight_decay=wd).step()
    assert torch.allclose(p.detach(), p0 * (1 - lr_eff * wd) - lr_eff * u, atol=1e-6)


def test_loads_optimizer_state_saved_before_the_2026_options():
    """An optimizer checkpoint from before this change (groups without the new keys) loads and steps as today."""
    grads = lambda step: mean_grads(MUON_SHAPES, step, 1)
    fresh = [torch.nn.Parameter(v.clone()) for v in initial_values(MUON_SHAPES)]
    opt = Muon(fresh)
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ["orthogonalizer", "normuon_beta2", "weight_decay", "cautious_wd"]:
            del group[key]
    params = [torch.nn.Parameter(v.clone()) for v in initial_values(MUON_SHAPES)]
    loaded = Muon(params)
    loaded.load_state_dict(old)
    assert all(g["orthogonalizer"] == "newton_schulz" and g["weight_decay"] == 0.0 for g in loaded.param_groups)
    for step in range(STEPS):
        schedule(loaded, step, 0.0)
        for p, g in zip(params, grads(step), strict=True):
            p.grad = g
        loaded.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, november_reference(grads), strict=True))


@pytest.mark.parametrize("cls", [Muon, DistMuon])
@pytest.mark.parametrize(("kwargs", "name"), [
    ({"orthogonalizer": "svd"}, "orthogonalizer"),
    ({"orthogonalizer": "polar_express", "ns_steps": 6}, "ns_steps"),
    ({"normuon_beta2": 0.0}, "normuon_beta2"),
    ({"normuon_beta2": 1.0}, "normuon_beta2"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": math.nan}, "weight_decay"),
    ({"weight_decay": math.inf}, "weight_decay"),
])
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(4, 8))], **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# 2 gloo ranks against one process


def worker(rank: int, world: int) -> dict:
    from nanochat_core.adamw import DistAdamW

    result = {}
    for name, config in MUON_CONFIGS.items():
        grads = lambda step: rank_grads(MUON_SHAPES, step, rank)
        result[f"muon_{name}"] = train(make_muon(DistMuon, config), MUON_SHAPES, grads, config.get("weight_decay", 0.0))
    grads = lambda step: rank_grads(ADAMW_SHAPES, step, rank)
    result["adamw"] = train(make_adamw(DistAdamW), ADAMW_SHAPES, grads, None)
    return result


def main(out_dir: str) -> None:
    from nanochat_core.common import cleanup_distributed, init_distributed

    info = init_distributed("cpu")
    torch.save(worker(info.rank, info.world_size), Path(out_dir) / f"rank{info.rank}.pt")
    cleanup_distributed()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("optim_2026")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", __file__,
           str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"torchrun with {WORLD} ranks failed:\n{proc.stdout[-4000:]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_same(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    diffs = [(a - b).abs().max().item() for a, b in zip(got, expected, strict=True)]
    assert max(diffs) == 0.0, diffs


@pytest.mark.parametrize("config", list(MUON_CONFIGS))
def test_dist_muon_equals_single_process_and_resumes_exactly(two_ranks, config):
    """Same rank gradients: DistMuon on 2 ranks ends bit for bit where Muon fed their mean does, on every rank,
    also when rebuilt mid-run from its saved state. The mean of 2 floats is exact whatever the order, so the
    averaged gradients agree bit for bit, and so does everything downstream (one matrix or a batch of them)."""
    mean = lambda step: mean_grads(MUON_SHAPES, step, WORLD)
    options = MUON_CONFIGS[config]
    single = train(make_muon(Muon, options), MUON_SHAPES, mean, options.get("weight_decay", 0.0))
    assert_same(single["resumed"], single["final"])
    november = november_reference(mean)
    if config == "default":
        assert_same(single["final"], november)
    else:  # the options do change the result
        assert max((a - b).abs().max().item() for a, b in zip(single["final"], november, strict=True)) > 1e-3
    for rank_result in two_ranks:
        assert_same(rank_result[f"muon_{config}"]["final"], single["final"])
        assert_same(rank_result[f"muon_{config}"]["resumed"], single["final"])


def test_dist_adamw_tiny_params_and_group_betas_equal_torch_adamw(two_ranks):
    """DistAdamW with per-group lr/betas/eps/weight_decay on [1], [3], [1, 24], [] (all-reduced) and [2, 12], [4, 6]
    (reduce-scattered) equals torch.optim.AdamW fed the mean gradient, bit for bit, also after a resume."""
    mean = lambda step: mean_grads(ADAMW_SHAPES, step, WORLD)
    single = train(make_adamw(torch.optim.AdamW, foreach=False, fused=False), ADAMW_SHAPES, mean, None)
    assert_same(single["resumed"], single["final"])
    for rank_result in two_ranks:
        assert_same(rank_result["adamw"]["final"], single["final"])
        assert_same(rank_result["adamw"]["resumed"], single["final"])


if __name__ == "__main__":
    main(sys.argv[1])
