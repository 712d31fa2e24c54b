"""Peak dense bf16 FLOP/s of the accelerator, for MFU (model FLOPs utilisation), and the precision training runs in.

MFU = achieved model FLOP/s (flops_per_token * tokens / seconds) / (peak FLOP/s per device * devices).
The peaks are the vendors' dense (no 2:4 sparsity) bf16 tensor-core figures with fp32 accumulation.
Unknown GPUs, CPUs and MPS have no entry: there MFU is omitted (None), not computed against a guess;
a CPU's peak depends on its vector units, clock and core count in ways a name table cannot capture.

MFU is "bf16-equivalent" whatever the precision the matmuls run in: with precision "fp8" the denominator is
still the bf16 peak (upstream's "bf16_mfu"), so fp8 runs can pass what bf16 could reach (the fp8 tensor-core
peak is twice the bf16 one) and runs at different precisions compare directly; with "fp32" on a GPU the
figure understates how busy the chip is.

Precision (resolve_precision, precision_autocast): "auto" keeps what training always did (bf16 autocast on
CUDA, plain fp32 on CPU/MPS); "bf16" is bf16 autocast on any device (on a CPU slower than fp32 on most chips,
but the GPU's numerics); "fp8" is bf16 autocast plus fp8 matmuls (nanochat_core.fp8), only on GPUs with fp8
tensor cores.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nanochat_core.config import ConfigError

# (substring of torch.cuda.get_device_name(), peak dense bf16 FLOP/s). First match wins, so the more
# specific names come first ("H100 PCIe" before "H100", "L40S" before "L40" before "L4").
GPU_PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),  # also GH200: the same Hopper compute as H100 SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H800", 989e12),
    ("A100", 312e12),  # SXM and PCIe
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("RTX A6000", 155e12),
)


def gpu_peak_flops(name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a GPU name as CUDA reports it; None if it is not in the table."""
    for key, peak in GPU_PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """Peak dense bf16 FLOP/s of one `device`; None for CPU, MPS and GPUs missing from the table."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return gpu_peak_flops(torch.cuda.get_device_name(device))


def mfu_percent(flops_per_token: float, tokens: int, seconds: float, peak: float | None,
                world_size: int = 1) -> float | None:
    """Model FLOPs utilisation in percent over `world_size` devices of peak `peak` each; None without a peak.
    With peak_flops' bf16 peak this is bf16-equivalent MFU, also for fp8 runs (see the module docstring)."""
    if peak is None or seconds <= 0:
        return None
    return 100 * flops_per_token * tokens / seconds / (peak * world_size)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; nothing (fp32) on CPU/MPS."""
    if device.type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


PRECISIONS = ("auto", "fp32", "bf16", "fp8")
FP8_MIN_CAPABILITY = (8, 9)  # Ada (L4, L40, RTX 4090) and Hopper (H100, H200): the first with fp8 tensor cores


def has_fp8_tensor_cores(device: torch.device | str) -> bool:
    """True for a CUDA device of compute capability >= 8.9 (Ada, Hopper and later)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def describe_device(device: torch.device | str) -> str:
    """'cpu', 'mps' or e.g. 'cuda:0 (NVIDIA A100-SXM4-80GB, compute capability 8.0)', for error messages."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability {major}.{minor})"


def resolve_precision(requested: str, device: torch.device | str, allow_cpu_fp8: bool = False,
                      field: str = "precision") -> str:
    """The precision training runs in: "fp32", "bf16" or "fp8" (see the module docstring).

    "auto" -> "bf16" on CUDA, "fp32" elsewhere (exactly what autocast_context does). "fp8" needs fp8 tensor
    cores; elsewhere it is a ConfigError naming the device, except on the CPU with allow_cpu_fp8 (tests: the
    CPU's emulated fp8 matmuls are correct but slow). `field` names the setting in error messages.
    """
    device = torch.device(device)
    if requested not in PRECISIONS:
        raise ConfigError(f"{field} must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp8" and not (has_fp8_tensor_cores(device) or (allow_cpu_fp8 and device.type == "cpu")):
        raise ConfigError(f"{field}='fp8' needs a GPU with fp8 tensor cores (an H100-class GPU: CUDA compute "
                          f"capability >= 8.9, e.g. H100, H200, L40S, RTX 4090), but this run's device is "
                          f"{describe_device(device)}; use precision 'bf16' or 'auto'")
    return requested


def precision_autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision: none for "fp32", bf16 autocast for "bf16" and "fp8"
    (fp8 replaces only the Float8Linear matmuls; everything else runs as under bf16). For "bf16" on CUDA this
    is the same context autocast_context gives."""
    if precision == "fp32":
        return nullcontext()
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision_autocast takes a resolved precision (fp32, bf16, fp8), got {precision!r}")
    return torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16)
