"""Optional Weights & Biases logging of training steps (wandb is not a dependency).

Logging never changes what a stage computes, so this module is not part of any stage's identity
(nanochat_core/pipeline/identity.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from nanochat_core.common import DistInfo

WANDB_MODES = ("online", "offline")


@dataclass
class WandbLog:
    """Rank 0's W&B run when WANDB_MODE is online/offline and wandb is installed; otherwise every call is a no-op.

    wandb is imported here, never at module top: it is optional. WANDB_MODE unset or "disabled" logs nothing;
    asking for it without wandb installed (or with an unknown mode) prints one warning and training goes on."""

    run: Any = None

    @classmethod
    def start(cls, project: str, config: dict, dist_info: DistInfo) -> WandbLog:
        """Files go where wandb puts them (./wandb, or WANDB_DIR), never into the stage's artifact directory."""
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if not dist_info.is_master or mode in ("", "disabled"):
            return cls()
        if mode not in WANDB_MODES:
            print(f"warning: WANDB_MODE={mode!r} is not one of {WANDB_MODES} or 'disabled': not logging to W&B",
                  file=sys.stderr, flush=True)
            return cls()
        try:
            import wandb
        except ImportError:
            print(f"warning: WANDB_MODE={mode} but wandb is not installed (pip install wandb): not logging to W&B",
                  file=sys.stderr, flush=True)
            return cls()
        return cls(wandb.init(project=project, config=config, mode=mode))

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log(self, step: int, **metrics) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> WandbLog:
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
