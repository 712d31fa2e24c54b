"""Run a stage's process (python -m or torchrun) in its own process group and stream its output.

The child gets a new session so that cancellation, a timeout or any exception in the caller kills the
whole group (torchrun's workers included): SIGTERM first, so training saves a checkpoint, then SIGKILL
after a grace period. Plain subprocess.run would leave torchrun workers orphaned. If the caller itself
is killed outright, the kernel sends the child SIGTERM (PR_SET_PDEATHSIG), which torchrun passes on.
When the caller is interrupted (Ctrl-C, SIGTERM) the grace is at most INTERRUPT_GRACE, so that the whole
command is gone within 30 s of the signal even if a checkpoint save hangs (the previous one stays intact).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nanochat_core.config import ConfigError


class StageFailed(RuntimeError):
    """A stage process exited with a non-zero code; the message holds the tail of its output."""


def python_command(module: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True)
class Nodes:
    """Where this torchrun sits in a multi-node job: node_rank of nnodes, all meeting at node 0's
    master_addr:master_port (static rendezvous, so global ranks follow node order and a resumed run
    gives every rank the same data and optimizer shard as before)."""
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def validate(self) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, nnodes), got node_rank={self.node_rank} nnodes={self.nnodes}")
        if not 0 < self.master_port < 65536 or not self.master_addr:
            raise ConfigError(f"bad rendezvous address {self.master_addr}:{self.master_port}")

    def launcher_flags(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone"]
        return [f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}", f"--master_addr={self.master_addr}",
                f"--master_port={self.master_port}"]


def torchrun_command(module: str, args: Sequence[str], nproc: int, nodes: Nodes | None = None) -> list[str]:
    launcher = (nodes or Nodes()).launcher_flags()
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", "-m", module, *args]


INTERRUPT_GRACE = 20.0  # seconds a stage gets to save and exit when its caller is interrupted


def new_group_dying_with_parent() -> None:
    """In the child (a Popen preexec_fn): own session and process group, so that a signal to the caller's group
    (Ctrl-C) does not reach it, and SIGTERM when the launching thread dies (even by SIGKILL)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited after `grace` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_streaming(
    cmd: Sequence[str],
    on_line: Callable[[str], None] = lambda line: print(line, flush=True),
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    grace: float = 30.0,
) -> None:
    """Run cmd, passing each output line (stdout+stderr) to on_line. Raises StageFailed on a non-zero exit."""
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={**os.environ, **(env or {})}, preexec_fn=new_group_dying_with_parent,
    )
    tail: list[str] = []
    deadline = time.time() + timeout if timeout else None
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail = (tail + [line])[-40:]
            on_line(line)
            if deadline and time.time() > deadline:
                raise TimeoutError(f"stage exceeded its {timeout:.0f}s timeout: {' '.join(cmd[:6])} ...")
        code = proc.wait()
    except BaseException as e:
        # interrupted (KeyboardInterrupt, Prefect's TerminationSignal: not Exceptions): a shorter grace
        stop_group(proc, grace if isinstance(e, Exception) else min(grace, INTERRUPT_GRACE))
        raise
    if code != 0:
        raise StageFailed(f"command failed with exit code {code}: {' '.join(cmd)}\n" + "\n".join(tail))
