"""Peak dense bf16 FLOP/s of the accelerator, for MFU (model FLOPs utilisation).

MFU = achieved model FLOP/s (flops_per_token * tokens / seconds) / (peak FLOP/s per device * devices).
The peaks are the vendors' dense (no 2:4 sparsity) bf16 tensor-core figures with fp32 accumulation.
Unknown GPUs, CPUs and MPS have no entry: there MFU is omitted (None), not computed against a guess;
a CPU's peak depends on its vector units, clock and core count in ways a name table cannot capture.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

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
    """Model FLOPs utilisation in percent over `world_size` devices of peak `peak` each; None without a peak."""
    if peak is None or seconds <= 0:
        return None
    return 100 * flops_per_token * tokens / seconds / (peak * world_size)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; nothing (fp32) on CPU/MPS."""
    if device.type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()
