"""Small shared helpers: distributed setup, device choice, rank-0 printing, structured progress lines.

Structured progress: a training/eval process prints lines `NANOCHAT_PROGRESS {json}` (and
`NANOCHAT_CHECKPOINT {json}` when it commits a checkpoint) on rank 0. Whoever launched the process
(a terminal, a Prefect task) can parse them; nothing here knows who is listening.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


class CommClock:
    """Seconds this rank spends blocked on collectives: the communication that overlap did not hide.

    Off by default: on CUDA, timing a wait needs a device sync before and after it, which costs
    throughput, so only benchmarks switch it on (bench/train.py)."""

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0

    def wait(self, work: dist.Work, device: torch.device) -> None:
        if not self.enabled:
            work.wait()
            return
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)  # queued compute is not communication
        t0 = time.perf_counter()
        work.wait()
        if cuda:
            torch.cuda.synchronize(device)  # on CUDA wait() only orders streams
        self.seconds += time.perf_counter() - t0


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def die_with_torchrun() -> None:
    """Under torchrun, let the kernel SIGKILL this worker when the torchrun agent dies.

    torchrun starts every worker in its own session, so a launcher that kills torchrun's process group
    (SIGKILL after a grace period, or `kill -9`) would otherwise leave the workers training on as orphans.
    SIGTERM is unaffected: torchrun passes it on and waits, and we checkpoint (see Preemption)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the agent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(device_type: str = "") -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (nccl on CUDA, gloo otherwise)."""
    device_type = device_type or autodetect_device_type()
    die_with_torchrun()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        # Growable segments instead of fixed blocks: d20 at 32 x 2048 tokens per rank sits within a few GiB
        # of 80 GB, and fragmentation alone pushed it over (H100, measured). Read at the first allocation.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Destroy the process group. gloo can abort in destroy unless garbage is collected first."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()










