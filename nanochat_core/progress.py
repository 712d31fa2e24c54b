"""What a stage process tells whoever launched it: rank-0 printing and structured progress lines.

A training or evaluation process prints `NANOCHAT_PROGRESS {json}` lines (and `NANOCHAT_CHECKPOINT {json}` when
it commits a checkpoint) on rank 0. Whoever launched it (a terminal, a Prefect task) can parse them; nothing
here knows who is listening. Reporting never changes what a stage computes, so this module is not part of any
stage's identity (nanochat_core/pipeline/identity.py).

Reporting never stops a stage: when a stream's reader is gone (the launcher was SIGKILLed and the kernel sent us
SIGTERM: EPIPE on the next write) that stream is pointed at /dev/null and the stage goes on to save its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TextIO

PROGRESS_PREFIX = "NANOCHAT_PROGRESS "
CHECKPOINT_PREFIX = "NANOCHAT_CHECKPOINT "


def discard_output(stream: TextIO) -> None:
    """From now on, send what is written to `stream` (and what is still buffered for it) to /dev/null.

    Redirecting the file descriptor, not replacing sys.stdout, also covers the interpreter's own flush at exit
    (which would otherwise fail again and turn a clean exit code into 120)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # closed, or not backed by a file descriptor: nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    with contextlib.suppress(OSError, ValueError):
        stream.flush()


def write_line(text: str, stream: TextIO | None = None) -> None:
    """Write one line to `stream` (default stdout) and flush it; a stream that cannot take it is discarded."""
    stream = stream or sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):  # EPIPE: nobody reads us any more; ValueError: the stream was closed
        discard_output(stream)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def print0(*args, file: TextIO | None = None, **kwargs) -> None:
    """print() on rank 0 only, flushed, never raising on a closed stream."""
    if is_rank0():
        stream = file or sys.stdout
        try:
            print(*args, **kwargs, file=stream, flush=True)
        except (OSError, ValueError):
            discard_output(stream)


def emit_progress(step: int, total: int, **metrics) -> None:
    """One machine-readable progress line (rank 0 only)."""
    if is_rank0():
        write_line(PROGRESS_PREFIX + json.dumps({"step": step, "total": total, **metrics}))


def checkpoint_line(path: str, step: int, stage: str) -> str:
    """The line that announces a committed checkpoint (without its newline)."""
    return CHECKPOINT_PREFIX + json.dumps({"path": path, "step": step, "stage": stage})


def emit_checkpoint(path: str, step: int, stage: str) -> None:
    """Announce a committed checkpoint (rank 0 only); flows turn this into a Prefect event."""
    if is_rank0():
        write_line(checkpoint_line(path, step, stage))


def parse_structured_line(line: str) -> tuple[str, dict] | None:
    """Inverse of emit_progress/emit_checkpoint: ("progress"|"checkpoint", payload) or None."""
    for kind, prefix in (("progress", PROGRESS_PREFIX), ("checkpoint", CHECKPOINT_PREFIX)):
        if line.startswith(prefix):
            try:
                return kind, json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                return None
    return None
