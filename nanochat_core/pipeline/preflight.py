"""What a run can be checked for before its first stage starts, so that a mistake costs seconds, not a trained
base model: `check_run` raises a ConfigError naming the problem.

- the stages' configs (already validated one by one by presets.stage_configs) against each other and the world
  size (nproc x nnodes): base/mid total_batch_size (for base.recipe 2026 with total_batch_size <= 0, the batch it
  derives from the depth and the tokenizer's vocabulary), sft examples_per_step, rl examples_per_step must divide
  as each training loop requires;
- base.precision against the device: fp8 needs GPUs with fp8 tensor cores (compute capability >= 8.9, asked of
  nvidia-smi, so this long-lived process makes no CUDA context);
- files a config names (mid/sft identity_conversations) exist;
- nproc against this machine: CPU cores this process may use, or GPUs;
- the model fits: weights, gradients and optimizer states of `base.depth` (the 2026 model's value embeddings
  included) against the memory available (RAM for CPU ranks, each GPU's free memory for CUDA ranks). Activations
  come on top, so passing is no promise;
- the chat server's address: a TCP port (0 = any free one) and a host this machine can bind.

`check_speedrun` adds the rest of a speedrun's arguments; the speedrun flow and `nanochat speedrun` (also with
--dry-run) call it before anything starts.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from typing import Any

from nanochat_core.config import ConfigError
from nanochat_core.pipeline import artifacts, plan, stages
from nanochat_core.pipeline.launch import Nodes

TRAINING_STAGES = ("base", "mid", "sft", "rl")


def check_speedrun(configs: dict[str, dict[str, Any]], store: str, nproc: int, nodes: Nodes, reuse: list[str],
                   rl: bool, serve: tuple[str, int] | None, serve_deployment: str | None = None) -> None:
    """A speedrun's checks: check_run, the rendezvous address, --reuse names, and last the store (the one check
    that writes: a probe it removes). A server started by a serve deployment listens on a worker's machine: only
    its port is checked."""
    nodes.validate()
    plan.check_reuse(reuse, stages.pipeline_of(configs, rl))
    if serve is not None and serve_deployment:
        check_port(serve[1])
        if serve[1] == 0:
            raise ConfigError("--port 0 (any free port) needs the server on this machine, not a serve deployment")
    check_run(configs, nproc, nodes.nnodes, serve=serve if not serve_deployment else None)
    artifacts.check_store(store)


def check_run(configs: dict[str, dict[str, Any]], nproc: int, nnodes: int = 1,
              serve: tuple[str, int] | None = None) -> None:
    """Raise ConfigError for the first thing in this run that cannot work. `configs`: every stage's config dict
    (presets.stage_configs); `serve`: (host, port) of a chat server this machine will start, if any."""
    if serve is not None:
        check_serve_address(*serve)
    devices = run_devices(configs)
    check_nproc(nproc, devices)
    check_precision(configs)
    check_batch_division(configs, nproc, nnodes)
    check_config_files(configs)
    check_model_fits(configs, nproc, nnodes)


def run_devices(configs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{stage: device type} of the distributed (torchrun) stages, autodetection ("") resolved as they will."""
    out = {}
    for stage, config in configs.items():
        if stages.STAGES[stage].distributed:
            out[stage] = config.get("device_type") or autodetected_device()
    return out


def autodetected_device() -> str:
    from nanochat_core.common import autodetect_device_type

    return autodetect_device_type()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_slots(device: str) -> tuple[int, str]:
    """(how many ranks this machine can hold on `device`, what limits them)."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count(), "GPUs"
    if device == "mps":
        return 1, "MPS devices"
    return usable_cpus(), "CPU cores this process may use"


def check_nproc(nproc: int, devices: dict[str, str]) -> None:
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"nproc must be an integer >= 1, got {nproc!r}")
    for device in sorted(set(devices.values())):
        slots, what = device_slots(device)
        if nproc > slots:
            users = ", ".join(s for s, d in devices.items() if d == device)
            raise ConfigError(f"--nproc {nproc} is more than this machine has: {slots} {what} "
                              f"(stages on {device}: {users}); use --nproc {max(slots, 1)} or fewer")


def base_batch_size(configs: dict[str, dict[str, Any]]) -> int:
    """The tokens per step base trains with: its total_batch_size, or (recipe 2026, <= 0) the batch it derives from
    the depth and the tokenizer stage's vocabulary (models built on the meta device: nothing is allocated)."""
    from nanochat_core.train.base import sizing_for

    base = stages.make_config("base", configs["base"])
    if base.total_batch_size > 0 or "tokenizer" not in configs:
        return base.total_batch_size
    return sizing_for(base, configs["tokenizer"]["vocab_size"]).total_batch_size


def check_batch_division(configs: dict[str, dict[str, Any]], nproc: int, nnodes: int) -> None:
    """The batch arithmetic each training loop does at its start, done now for the run's world size."""
    from nanochat_core.train.common import grad_accum_steps

    world = nproc * nnodes
    checks = {
        "base": lambda c: grad_accum_steps(base_batch_size(configs), c.device_batch_size, c.max_seq_len, world),
        "mid": lambda c: grad_accum_steps(c.total_batch_size, c.device_batch_size, c.max_seq_len, world),
        "sft": lambda c: c.grad_accum(world),
        "rl": lambda c: c.examples_per_rank(world),
    }
    for stage, check in checks.items():
        if stage in configs:
            try:
                check(stages.make_config(stage, configs[stage]))
            except ConfigError as e:
                raise ConfigError(f"{stage}: {e} (world_size = nproc {nproc} x nnodes {nnodes})") from None


FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper (H100, H200) onwards: fp8 tensor cores


def check_precision(configs: dict[str, dict[str, Any]]) -> None:
    """base.precision='fp8' on the device base will run on: CUDA GPUs with fp8 tensor cores (the config already
    refuses an explicit cpu/mps device_type). A capability nvidia-smi cannot report passes: the stage checks again
    when it starts (device.resolve_precision)."""
    base = configs.get("base")
    if not base or base.get("precision") != "fp8":
        return
    device = run_devices(configs)["base"]
    if device != "cuda":
        raise ConfigError(f"base.precision='fp8' needs a GPU with fp8 tensor cores (H100, H200, ...), but base runs "
                          f"on {device}: use precision fp32, bf16 or auto there")
    lacking = sorted({c for c in gpu_compute_capabilities() if c < FP8_MIN_COMPUTE_CAPABILITY})
    if lacking:
        shown = ", ".join(f"{major}.{minor}" for major, minor in lacking)
        raise ConfigError(f"base.precision='fp8' needs GPUs with fp8 tensor cores (compute capability >= 8.9: "
                          f"H100, H200, L40S, ...), but this machine has compute capability {shown}; use precision "
                          f"bf16 or auto")


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    """(major, minor) per GPU from nvidia-smi; [] when it is not there or cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [tuple(int(part) for part in line.strip().split(".")) for line in out.split()]  # type: ignore[misc]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def check_config_files(configs: dict[str, dict[str, Any]]) -> None:
    """Every local file or directory a config names exists (identity_config reads each, as the stage's key will)."""
    for stage, config in configs.items():
        stages.identity_config(stage, config)


# ---------------------------------------------------------------------------------------------
# memory


def model_params(depth: int, vocab_size: int) -> tuple[int, int]:
    """(matrix parameters, embedding + head parameters) of gpt.config_for_depth(depth, vocab_size): per layer
    attention q, k, v, proj (4 C^2: n_kv_head == n_head) and the MLP (8 C^2); wte and lm_head V x C each.
    Computed, not built: a model too big to build is what this is for."""
    width = 64 * depth
    return 12 * width * width * depth, 2 * vocab_size * width


def available_memory(device: str, nproc: int) -> tuple[int, str] | None:
    """(bytes one rank may use, where from), or None when it cannot be told."""
    if device == "cuda":
        free = gpu_free_memory()
        return (min(free[:nproc]), "free on the emptiest GPU used") if len(free) >= nproc else None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    shared = f" ({available / 2**30:.1f} GiB shared by {nproc} processes)" if nproc > 1 else ""
    return available // nproc, f"of available RAM{shared}"


def gpu_free_memory() -> list[int]:
    """Free bytes per GPU from nvidia-smi (which, unlike torch.cuda.mem_get_info, creates no CUDA context in this
    long-lived orchestrating process); [] when it is not there."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [int(line) * 2**20 for line in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def model_params_2026(base: dict[str, Any], vocab_size: int) -> tuple[int, int]:
    """(matrix parameters, embedding + head + scalar parameters) of the 2026 model base trains, counted on a model
    built on the meta device (value embeddings are large: 604M of d24's 1.38B)."""
    import torch

    from nanochat_core.train.base import GPT, model_config_for

    with torch.device("meta"):
        model = GPT(model_config_for(stages.make_config("base", base), vocab_size))
    matrices = sum(p.numel() for p in model.transformer.h.parameters())  # what Muon steps
    return matrices, model.num_params() - matrices


def training_bytes(matrices: int, embeddings: int, world: int) -> int:
    """fp32 weights and gradients on every rank, plus optimizer states sharded over the ranks: Muon's momentum
    (matrices), AdamW's two moments (the rest)."""
    return 8 * (matrices + embeddings) + (4 * matrices + 8 * embeddings) // world


def check_model_fits(configs: dict[str, dict[str, Any]], nproc: int, nnodes: int) -> None:
    base, tokenizer = configs.get("base"), configs.get("tokenizer")
    if not base or not tokenizer:
        return
    depth, vocab = base["depth"], tokenizer["vocab_size"]
    if base.get("recipe", "nov2025") == "2026":
        matrices, embeddings = model_params_2026(base, vocab)
    else:
        matrices, embeddings = model_params(depth, vocab)
    need = training_bytes(matrices, embeddings, nproc * nnodes)
    for device in sorted({run_devices(configs)[s] for s in TRAINING_STAGES if s in configs}):
        if device == "mps":
            continue
        have = available_memory(device, nproc)
        if have is not None and need > have[0]:
            params = matrices + embeddings
            raise ConfigError(
                f"base.depth={depth} does not fit: {params:,} parameters need ~{need / 2**30:,.1f} GiB per process "
                f"for weights, gradients and optimizer states alone, more than the {have[0] / 2**30:,.1f} GiB "
                f"{have[1]} on {device}; choose a smaller depth")


# ---------------------------------------------------------------------------------------------
# the chat server's address


def check_port(port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port {port!r} is not a TCP port (0-65535; 0 = any free port)")


def check_serve_address(host: str, port: int) -> None:
    """A TCP port (0: any free one) and a host name or address this machine can listen on. A port already in use
    passes: it may be this store's own server of an earlier run, which the serve step reuses or replaces."""
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r} does not resolve to an address: {e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot serve on --host {host} --port {port}: {e.strerror} "
                                  f"(is {host} an address of this machine?)") from None
