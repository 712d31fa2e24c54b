"""What a stage process tells whoever launched it: rank-0 printing and structured progress lines.

A training or evaluation process prints `NANOCHAT_PROGRESS {json}` lines (and `NANOCHAT_CHECKPOINT {json}` when
it commits a checkpoint) on rank 0. Whoever launched it (a terminal, a Prefect task) can parse them; nothing
here knows who is listening. Reporting never changes what a stage computes, so this module is not part of any
stage's identity (nanochat_core/pipeline/identity.py).
"""

from __future__ import annotations

import json
import os
import sys

PROGRESS_PREFIX = "NANOCHAT_PROGRESS "
CHECKPOINT_PREFIX = "NANOCHAT_CHECKPOINT "


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def emit_progress(step: int, total: int, **metrics) -> None:
    """One machine-readable progress line (rank 0 only)."""
    if int(os.environ.get("RANK", 0)) == 0:
        payload = {"step": step, "total": total, **metrics}
        sys.stdout.write(PROGRESS_PREFIX + json.dumps(payload) + "\n")
        sys.stdout.flush()


def checkpoint_line(path: str, step: int, stage: str) -> str:
    """The line that announces a committed checkpoint (without its newline)."""
    return CHECKPOINT_PREFIX + json.dumps({"path": path, "step": step, "stage": stage})


def emit_checkpoint(path: str, step: int, stage: str) -> None:
    """Announce a committed checkpoint (rank 0 only); flows turn this into a Prefect event."""
    if int(os.environ.get("RANK", 0)) == 0:
        sys.stdout.write(checkpoint_line(path, step, stage) + "\n")
        sys.stdout.flush()


def parse_structured_line(line: str) -> tuple[str, dict] | None:
    """Inverse of emit_progress/emit_checkpoint: ("progress"|"checkpoint", payload) or None."""
    for kind, prefix in (("progress", PROGRESS_PREFIX), ("checkpoint", CHECKPOINT_PREFIX)):
        if line.startswith(prefix):
            try:
                return kind, json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                return None
    return None
