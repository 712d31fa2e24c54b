"""Muon / AdamW: Newton-Schulz orthogonalization, the Muon step, and the distributed optimizers on 2 gloo ranks
(tests/dist_optim_check.py under torchrun) against the single-process ones on the same global batch."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat_core.muon import Muon, zeropower_via_newtonschulz5

REPO = Path(__file__).resolve().parents[1]
CHECK_SCRIPT = REPO / "tests" / "dist_optim_check.py"


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float())


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_is_roughly_orthogonal(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = zeropower_via_newtonschulz5(g, steps=5)
    assert x.shape == g.shape and x.dtype == torch.bfloat16
    s = singular_values(x)
    # the quintic trades exactness for speed: singular values land in a band around 1, not on 1
    assert s.min() > 0.5 and s.max() < 1.3, s
    # it keeps the singular vectors: x ≈ U Vᵀ of g's SVD
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.allclose(x.float(), u @ vh, atol=0.15)


def test_newton_schulz_ignores_scale():
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(zeropower_via_newtonschulz5(g), zeropower_via_newtonschulz5(g * 64))


def test_muon_step_size_scales_with_aspect_ratio():
    """p -= lr·max(1, rows/cols)^0.5·NS(g): a 4:1 tall matrix moves twice as far (in spectral norm) as a square one."""
    lr = 0.01
    for shape, expected in [((32, 32), lr), ((128, 32), 2 * lr), ((32, 128), lr)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        Muon([p], lr=lr, momentum=0.95).step()
        s = singular_values(p.detach())
        assert expected * 0.5 < s.min() and s.max() < expected * 1.3, (shape, s)


def test_muon_nesterov_momentum():
    """Two steps with the same gradient: the momentum buffer holds (1-μ^2)·g; Nesterov looks ahead the same way."""
    p = torch.nn.Parameter(torch.zeros(16, 16))
    opt = Muon([p], lr=0.01, momentum=0.9)
    g = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(opt.state[p]["momentum_buffer"], (1 - 0.9**2) * g, atol=1e-6)
    assert torch.equal(p.grad, g)  # the update leaves the gradient alone


def test_batched_muon_step_equals_one_matrix_at_a_time():
    """Muon updates a shape group in one batched Newton-Schulz; each matrix must end where a step of its own
    (momentum, Nesterov look-ahead, orthogonalization, aspect-ratio scale) would take it, bit for bit."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(48, 16)] * 3 + [(16, 48)] * 2 + [(24, 24)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros(s) for s in shapes]
    opt = Muon(params, lr=0.02, momentum=0.95)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for w, buf, g in zip(expected, bufs, grads, strict=True):
            buf.lerp_(g, 1 - 0.95)
            update = zeropower_via_newtonschulz5(g.lerp(buf, 0.95)).float()
            w.add_(update, alpha=-0.02 * max(1.0, w.size(0) / w.size(1)) ** 0.5)
    for p, w in zip(params, expected, strict=True):
        assert torch.equal(p.detach(), w)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def load_check_module():
    spec = importlib.util.spec_from_file_location("dist_optim_check", CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory) -> dict[int, list[dict]]:
    """Rank outputs of dist_optim_check.py: 2 ranks under torchrun, and 1 rank in-process meanwhile."""
    out_dir = tmp_path_factory.mktemp("dist_optim")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(CHECK_SCRIPT), str(out_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = load_check_module().run(rank=0, world=1)
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun with 2 ranks timed out")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"torchrun with 2 ranks failed:\n{out[-4000:]}"
    return {1: [single], 2: [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_distributed_runs_use_the_sharded_optimizers(dist_runs):
    assert dist_runs[1][0]["optimizers"] == ["AdamW", "Muon"]
    assert dist_runs[2][0]["optimizers"] == ["DistAdamW", "DistMuon"]


def test_two_rank_loss_and_grads_match_one_rank(dist_runs):
    one, two = dist_runs[1][0], dist_runs[2][0]
    assert abs(one["loss0"].item() - two["loss0"].item()) <= 1e-5
    assert max_diff(one["grads0"], two["grads0"]) <= 1e-5
    assert all(g.abs().max() > 0 for g in one["grads0"].values())  # every parameter has a gradient to compare


def test_distributed_optimizers_match_single_process(dist_runs):
    one, (rank0, rank1) = dist_runs[1][0], dist_runs[2]
    assert min((one["params"][k] - one["init"][k]).abs().max().item() for k in one["params"]) > 1e-4  # all trained
    assert max_diff(rank0["params"], one["params"]) <= 1e-5
    assert max_diff(rank0["params"], rank1["params"]) == 0.0  # the all-gathers leave every rank with the same weights


def test_distributed_adamw_matches_torch_adamw(dist_runs):
    """Sharded and all-reduced (rows not divisible by the world size) parameters, gradients averaged not summed."""
    assert all(r["adamw_max_diff"] <= 1e-6 for r in dist_runs[2])


def test_optimizer_state_roundtrips(dist_runs):
    """Resuming from saved model + optimizer state (per rank) continues exactly as the uninterrupted run."""
    for rank_result in [*dist_runs[1], *dist_runs[2]]:
        assert max_diff(rank_result["resumed"], rank_result["params"]) == 0.0
