"""fp8 training matmuls (nanochat_core.fp8) on the CPU, whose emulated torch._scaled_mm computes what the GPU's
fp8 tensor cores do, and the precision switch (nanochat_core.device.resolve_precision); bench/gpu.sh's issue-14
parts are checked for syntax here and run on the CPU in the slow tests."""

import json
import os
import re
import subprocess
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat_core.config import ConfigError
from nanochat_core.device import (
    PRECISIONS,
    autocast_context,
    has_fp8_tensor_cores,
    precision_autocast,
    resolve_precision,
)
from nanochat_core.fp8 import Float8Linear, count_fp8, disable_fp8, enable_fp8, fp8_eligible, fp8_supported
from nanochat_core.gpt import GPTConfig
from nanochat_core.train.common import new_model

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# fp8's expected error on Gaussian data (measured: out 3.7%, grads 5.9%): e4m3 keeps 3 mantissa bits, e5m2 two
FWD_TOL, BWD_TOL = 0.05, 0.08


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_twin(linear: nn.Linear) -> Float8Linear:
    """A Float8Linear sharing `linear`'s weight."""
    twin = Float8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    twin.weight = linear.weight
    twin.bias = linear.bias
    return twin


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, grad of x, grad of the weight) of one forward/backward."""
    x = x.detach().clone().requires_grad_()
    module.weight.grad = None
    y = module(x)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, module.weight.grad


@pytest.mark.parametrize("tokens, fan_in, fan_out", [(512, 768, 3072), (256, 3072, 768)])  # d12's MLP in and out
def test_float8_linear_is_fp32_linear_within_fp8_error(tokens, fan_in, fan_out):
    torch.manual_seed(tokens + fan_in)
    ref = nn.Linear(fan_in, fan_out, bias=False)
    x, grad = torch.randn(tokens, fan_in), torch.randn(tokens, fan_out)
    y, gx, gw = fwd_bwd(ref, x, grad)
    y8, gx8, gw8 = fwd_bwd(fp8_twin(ref), x, grad)
    assert y8.dtype == torch.float32 and gw8.dtype == torch.float32
    assert rel_err(y8, y) < FWD_TOL
    assert rel_err(gx8, gx) < BWD_TOL and rel_err(gw8, gw) < BWD_TOL
    assert not torch.equal(y8, y)  # it really ran in fp8


def test_under_bf16_autocast_the_output_is_bf16_and_the_weight_grad_fp32():
    torch.manual_seed(1)
    ref = nn.Linear(256, 512, bias=True)
    x, grad = torch.randn(2, 64, 256), torch.randn(2, 64, 512)
    exact = F.linear(x, ref.weight, ref.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y8, _, gw8 = fwd_bwd(fp8_twin(ref), x, grad)
    assert y8.dtype == torch.bfloat16 and y8.shape == (2, 64, 512)
    assert gw8.dtype == torch.float32 and torch.isfinite(gw8).all()
    assert rel_err(y8, exact) < FWD_TOL


def test_eval_mode_and_token_counts_fp8_cannot_take_run_the_plain_matmul():
    torch.manual_seed(2)
    ref = nn.Linear(128, 256, bias=False)
    twin = fp8_twin(ref)
    odd = torch.randn(3, 7, 128)  # 21 rows: not a multiple of 16, the inner dim of grad_W
    assert torch.equal(twin(odd), ref(odd))
    x = torch.randn(4, 16, 128)
    assert not torch.equal(twin(x), ref(x))
    twin.eval()  # evaluation runs in the plain precision, as upstream's evals do
    assert torch.equal(twin(x), ref(x))


def test_an_all_zero_input_gives_zeros_not_nans():
    layer = fp8_twin(nn.Linear(128, 128, bias=False))
    x = torch.zeros(16, 128, requires_grad=True)
    y = layer(x)
    y.backward(torch.zeros_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def tiny_gpt(seed: int = 0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    return new_model(config, CPU)


def test_only_eligible_linears_are_converted():
    model = nn.ModuleDict({
        "square": nn.Linear(128, 128),  # yes
        "wide": nn.Linear(256, 144, bias=False),  # yes: both multiples of 16, the smaller >= 128
        "small": nn.Linear(64, 256),  # no: 64 < 128
        "unaligned": nn.Linear(136, 256),  # no: 136 is not a multiple of 16
        "lm_head": nn.Linear(128, 256),  # no, unless asked for
        "norm": nn.LayerNorm(128),
    })
    assert [fp8_eligible(model[n]) for n in ("square", "wide", "small", "unaligned")] == [True, True, False, False]
    assert enable_fp8(model) == 2
    assert {n for n, m in model.items() if type(m) is Float8Linear} == {"square", "wide"}
    assert enable_fp8(model, include_lm_head=True) == 1  # converted ones are not converted twice
    assert count_fp8(model) == 3 and disable_fp8(model) == 3 and count_fp8(model) == 0

    gpt = tiny_gpt()
    assert enable_fp8(gpt) == 12  # 2 layers x (c_q, c_k, c_v, c_proj, c_fc, mlp c_proj); lm_head stays
    assert type(gpt.lm_head) is nn.Linear
    disable_fp8(gpt)
    assert enable_fp8(gpt, module_filter=lambda name, _m: ".mlp." in name) == 4
    assert enable_fp8(gpt, include_lm_head=True) == 9  # the other 8 plus lm_head
    assert count_fp8(gpt) == 13


def test_enable_and_disable_keep_the_parameters_and_the_state_dict():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    optimizers = model.setup_optimizers()  # built before the swap: it must still train the same tensors
    for swap in (enable_fp8, disable_fp8):
        swap(model)
        state = model.state_dict()
        assert list(state) == list(before)
        assert all(torch.equal(state[k], before[k]) for k in before)
        assert all(p is params[name] for name, p in model.named_parameters())
    assert all(type(m) is not Float8Linear for m in model.modules())
    enable_fp8(model)
    x = torch.randint(0, 256, (2, 64))
    for _ in range(2):  # zero-init lm_head: the blocks get their first gradient in the second step
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    name = "transformer.h.0.mlp.c_proj.weight"
    assert type(model.transformer.h[0].mlp.c_proj) is Float8Linear
    assert not torch.equal(model.state_dict()[name], before[name])


def train_tiny_gpt(fp8: bool, steps: int = 20) -> list[float]:
    """Losses of `steps` full-batch steps on one fixed batch (next-token = the following random token)."""
    model = tiny_gpt()
    if fp8:
        assert enable_fp8(model) == 12
    optimizers = model.setup_optimizers()
    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_a_tiny_gpt_learns_with_fp8_matmuls_about_as_it_does_in_fp32():
    fp8, fp32 = train_tiny_gpt(fp8=True), train_tiny_gpt(fp8=False)
    assert fp8[0] == pytest.approx(fp32[0], rel=1e-3)  # zero-init output layers: the first loss is ln(256) in both
    assert fp8[-1] < 0.1 * fp8[0]
    tail8, tail32 = sum(fp8[-5:]) / 5, sum(fp32[-5:]) / 5
    assert abs(tail8 - tail32) < 0.25 * tail32


def test_resolve_precision():
    assert PRECISIONS == ("auto", "fp32", "bf16", "fp8")
    # auto = what training always did: bf16 autocast on CUDA, plain fp32 on CPU and MPS
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # allowed: bf16 autocast on the CPU
    assert resolve_precision("fp8", "cpu", allow_cpu_fp8=True) == "fp8"  # tests only
    with pytest.raises(ConfigError, match=r"precision='fp8' needs a GPU with fp8 tensor cores \(an H100-class"
                                          r".*this run's device is cpu"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="this run's device is mps"):
        resolve_precision("fp8", torch.device("mps"))
    with pytest.raises(ConfigError, match=r"BaseTrainConfig.precision must be one of \('auto', 'fp32', 'bf16', "
                                          r"'fp8'\), got 'fp16'"):
        resolve_precision("fp16", "cpu", field="BaseTrainConfig.precision")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_precision_on_this_gpu():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == "bf16"
    if has_fp8_tensor_cores(cuda):
        assert resolve_precision("fp8", cuda) == "fp8"
    else:
        with pytest.raises(ConfigError, match="compute capability"):
            resolve_precision("fp8", cuda)


def test_fp8_is_supported_only_on_gpus_with_fp8_tensor_cores_unless_the_cpu_is_asked_for():
    assert not has_fp8_tensor_cores("cpu") and not has_fp8_tensor_cores(torch.device("mps"))
    assert not fp8_supported("cpu") and fp8_supported("cpu", allow_cpu=True)
    assert not fp8_supported(torch.device("mps"), allow_cpu=True)


def test_the_default_precision_keeps_the_autocast_training_always_used():
    assert isinstance(precision_autocast(resolve_precision("auto", CPU), CPU), nullcontext)
    assert isinstance(autocast_context(CPU), nullcontext)
    cuda = torch.device("cuda")
    with warnings.catch_warnings():  # without a GPU torch warns that it disables CUDA autocast
        warnings.simplefilter("ignore")
        new, old = precision_autocast(resolve_precision("auto", cuda), cuda), autocast_context(cuda)
    assert (new.device, new.fast_dtype) == (old.device, old.fast_dtype) == ("cuda", torch.bfloat16)
    with precision_autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="resolved precision"):
        precision_autocast("auto", CPU)


# ---------------------------------------------------------------------------------------------
# bench/gpu.sh (issue-14 parts)

GPU_SH = REPO / "bench" / "gpu.sh"


def python_heredocs(script: str) -> list[str]:
    return re.findall(r"<<'PY'\n(.*?)\nPY\n", script, flags=re.S)


def test_gpu_script_is_valid_bash_and_its_python_compiles():
    subprocess.run(["bash", "-n", str(GPU_SH)], check=True)
    parts = python_heredocs(GPU_SH.read_text())
    assert len(parts) == 2
    for i, source in enumerate(parts):
        compile(source, f"gpu.sh python part {i}", "exec")


def run_gpu_sh_function(name: str, call: str, env: dict, tmp_path: Path) -> str:
    """Define one function of bench/gpu.sh in a fresh bash and call it (the script itself needs CUDA)."""
    script = GPU_SH.read_text()
    body = re.search(rf"^{name}\(\) {{.*?^}}$", script, flags=re.S | re.M)[0]
    full_env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "RESULTS": str(tmp_path / "issue14.jsonl"),
                "WORK": str(tmp_path), **env}
    out = subprocess.run(["bash", "-c", f"{body}\n{call}"], env=full_env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_gpu_script_microbenchmark_runs_on_the_cpu(tmp_path):
    run_gpu_sh_function("fp8_microbench", "fp8_microbench", {"FP8MM_DEVICE": "cpu", "FP8MM_TOKENS": "64",
                                                             "FP8MM_COMPILE": "0"}, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "issue14.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["device", "fp8mm", "fp8mm", "fp8mm_speedup"]
    assert rows[2]["impl"] == "fp8" and rows[2]["rel_err"]["out"] < 0.1


@pytest.mark.slow
def test_gpu_script_training_run_and_summary_on_the_cpu(tmp_path, tiny_tokenizer_dir, shared_data):
    env = {"NANOCHAT_DATA": str(shared_data), "TOKENIZER": str(tiny_tokenizer_dir), "BUDGET_S": "20",
           "EVAL_EVERY": "5"}
    tiny = ("--depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 512 --num-iterations 100000 "
            "--eval-tokens 1024 --device-type cpu")  # later flags override train_d12's d12-on-CUDA ones
    log = run_gpu_sh_function("train_d12", f"train_d12 {tiny} 2>&1", env, tmp_path)
    (tmp_path / "train12nov.log").write_text(log)
    # the script's own summary step (its GPU info lines fail here, harmlessly)
    script = subprocess.run(["bash", str(GPU_SH), str(tmp_path), "summary"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **env, "PY": sys.executable})
    assert "--- summary: rc=0" in script.stdout, script.stdout + script.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "issue14.jsonl").read_text().splitlines()]
    assert row["run"] == "d12 November bf16" and row["exit"] == 124  # stopped by its budget
    assert row["steps"] > 5 and row["val_bpb"] is not None and row["tok_per_s"] > 0


@pytest.mark.slow
def test_compiled_fp8_model_matches_eager():
    """torch.compile keeps Float8Matmul as one opaque node (allow_in_graph): same loss and grads as eager."""
    model = tiny_gpt()
    enable_fp8(model)
    x = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3))
    eager = model(x, x)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, dynamic=False)(x, x)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), grads, strict=True))
