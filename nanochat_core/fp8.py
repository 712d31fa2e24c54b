"""fp8 training matmuls with dynamic tensorwise scaling (upstream nanochat's `--fp8`, our own small version).

A Linear layer does three matmuls per training step:
    forward      out         = x @ W^T
    backward     grad_x      = grad_out @ W
                 grad_W      = grad_out^T @ x
Float8Linear runs all three through torch._scaled_mm (cuBLAS fp8 tensor cores, about twice the bf16 rate on
an H100). Each operand is quantized on the fly with ONE scale for the whole tensor: scale = fp8_max / amax,
q = clamp(t * scale).to(fp8), and _scaled_mm multiplies the inverse scales back in. Activations and weights
use float8_e4m3fn (3 mantissa bits, range ±448); gradients use float8_e5m2 (2 mantissa bits, range ±57344),
since their range matters more than their precision. Accumulation and the outputs stay in high precision:
the output has the input's dtype (bf16 under CUDA autocast), grad_W is float32 like the master weight.

What stays as it was:
- the parameters: a Float8Linear IS an nn.Linear (same `weight`/`bias` Parameter objects, same state_dict
  keys), so checkpoints, optimizers and the eval/serving code never see a difference;
- eval mode: a Float8Linear in eval() is a plain nn.Linear (upstream evaluates in bf16 too), so
  model.eval() around validation gives bf16 evals with no swapping; disable_fp8 turns the model back into
  plain nn.Linear modules for good;
- matmuls _scaled_mm cannot take: a layer is converted only if both dims are multiples of 16 and the smaller
  is >= 128 (upstream's rule: smaller ones gain nothing), and a call whose token count is not a multiple of
  16 (the inner dim of grad_W) falls back to the plain matmul.

Production rule: fp8 only where the GPU has fp8 tensor cores (CUDA compute capability >= 8.9: H100/H200,
Ada). PyTorch's CPU build also implements _scaled_mm (emulated, slower than fp32): the tests use it to check
the numerics, and fp8_supported(cpu, allow_cpu=True) says so explicitly; nothing turns it on by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from nanochat_core.device import has_fp8_tensor_cores

E4M3 = torch.float8_e4m3fn  # activations and weights
E5M2 = torch.float8_e5m2  # gradients
EPS = 1e-12  # amax floor: an all-zero tensor gets a finite scale (and stays zero)
MIN_DIM = 128  # upstream's rule: smaller matmuls are not worth quantizing
ALIGN = 16  # _scaled_mm needs every matmul dim (the inner one above all) to be a multiple of 16


def fp8_supported(device: torch.device | str, allow_cpu: bool = False) -> bool:
    """True where fp8 training matmuls should run: a CUDA GPU with fp8 tensor cores (compute capability >= 8.9).
    allow_cpu=True also accepts the CPU, whose emulated _scaled_mm is for tests, not for speed."""
    device = torch.device(device)
    return has_fp8_tensor_cores(device) or (allow_cpu and device.type == "cpu")


@torch.no_grad()
def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t quantized to `dtype` with one dynamic scale, the inverse scale _scaled_mm multiplies back in)."""
    fp8_max = torch.finfo(dtype).max
    amax = t.abs().amax().float()
    # the division in float64, as torchao does: eager and compiled code then round the scale the same way
    scale = (fp8_max / amax.double().clamp(min=EPS)).float()
    # clamp saturates: a plain cast of an out-of-range value to e4m3fn gives NaN, not fp8_max
    q = (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)
    return q, scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same 2-D matrix laid out column-major (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


# allow_in_graph: torch.compile keeps the three quantized matmuls as one opaque node (upstream's choice; the
# quantization glue is small next to the matmuls, and compiling through it gains nothing measurable)
@torch._dynamo.allow_in_graph
class Float8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K)^T with all three matmuls in fp8; saves the fp8 copies (half of bf16's memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x8, x_inv = to_float8(x, E4M3)
        w8, w_inv = to_float8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.weight_dtype = weight.dtype
        # w8 is (N, K) row-major, so w8.t() is (K, N) column-major already: no copy.
        # Fast (lower-precision) accumulation only here, as torchao and upstream do; the gradients get the full one.
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype, use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_float8(grad_out.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=grad_out.dtype)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K), straight into the master weight's dtype
            grad_w = torch._scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                      out_dtype=ctx.weight_dtype)
        return grad_x, grad_w


class Float8Linear(nn.Linear):
    """nn.Linear whose training-mode matmuls run in fp8 (see the module docstring). Same parameters, same
    state_dict; in eval mode, or for a token count that is not a multiple of 16, exactly nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not self.training or rows == 0 or rows % ALIGN:
            return super().forward(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # the dtype autocast would have run F.linear in
            x = x.to(torch.get_autocast_dtype(device_type))
        out = Float8Matmul.apply(x.reshape(rows, self.in_features).contiguous(), self.weight)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fp8=tensorwise"


def fp8_eligible(linear: nn.Linear) -> bool:
    """Upstream's rule: both dims multiples of 16 (a _scaled_mm requirement) and the smaller one >= 128."""
    dims = (linear.in_features, linear.out_features)
    return all(d % ALIGN == 0 for d in dims) and min(dims) >= MIN_DIM


def _swap_linear(linear: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    """A `cls` module holding `linear`'s own Parameter objects (so optimizers and state_dict are untouched)."""
    with torch.device("meta"):  # no allocation, no init: the parameters are replaced right away
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
    new.weight = linear.weight
    new.bias = linear.bias
    new.train(linear.training)
    return new


def _replace_linears(model: nn.Module, should_swap: Callable[[str, nn.Module], bool], cls: type[nn.Linear]) -> int:
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if should_swap(name, child):
                setattr(parent, child_name, _swap_linear(child, cls))
                count += 1
    return count


def enable_fp8(model: nn.Module, module_filter: Callable[[str, nn.Linear], bool] | None = None,
               include_lm_head: bool = False) -> int:
    """Turn the model's eligible nn.Linear modules into Float8Linear in place; returns how many.

    Eligible: fp8_eligible(module), not named `lm_head` unless include_lm_head (upstream leaves the output
    layer in bf16: fp8 there bought 1% tok/s for 2 GB), and module_filter(name, module) if given. Call it
    before torch.compile (compiled code keeps the modules it was traced with). Does not check the device:
    the caller decides that with fp8_supported / nanochat_core.device.resolve_precision.
    """
    def should_swap(name: str, module: nn.Module) -> bool:
        if type(module) is not nn.Linear or not fp8_eligible(module):
            return False
        if name.split(".")[-1] == "lm_head" and not include_lm_head:
            return False
        return module_filter is None or module_filter(name, module)

    return _replace_linears(model, should_swap, Float8Linear)


def disable_fp8(model: nn.Module) -> int:
    """Turn every Float8Linear back into a plain nn.Linear (same Parameter objects) in place; returns how many."""
    return _replace_linears(model, lambda _name, module: type(module) is Float8Linear, nn.Linear)


def count_fp8(model: nn.Module) -> int:
    """How many Float8Linear modules the model holds."""
    return sum(type(m) is Float8Linear for m in model.modules())
