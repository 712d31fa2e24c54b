"""The command line of a stage process (`python -m` / `torchrun -m nanochat_core....`): parse the flags, run,
and turn the two ways a run ends early into exit codes: bad input exits 2 with one line naming the problem, and
preemption (SIGTERM, checkpoint saved) exits 143.

We do not exit 0 on preemption: the process did not finish its stage, and a launcher that treats exit 0 as "done"
(the stage runner writes MANIFEST.json after exit 0) must not commit a half-trained artifact.

Parsing flags and mapping errors to exit codes computes nothing, so this module is not part of a stage's
identity (nanochat_core/pipeline/identity.py); the config it parses is.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from nanochat_core.config import add_config_arguments, config_from_args
from nanochat_core.errors import UserError
from nanochat_core.progress import print0

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: "stopped by a signal, checkpoint saved, not finished"


class Preempted(Exception):  # noqa: N818 - a signal, not an error
    """Training stopped at a step boundary after SIGTERM; a checkpoint of that step was saved (if any)."""

    def __init__(self, step: int, path: Path | None):
        super().__init__(f"preempted at step {step}; checkpoint: {path or 'none (nothing trained yet)'}")
        self.step, self.path = step, path


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None, run: Callable[[argparse.Namespace], dict]) -> None:
    """Parse argv, call run(args); bad input exits 2 with a one-line error, preemption exits 143."""
    args = parser.parse_args(argv)
    try:
        metrics = run(args)
    except Preempted as e:
        print0(f"{e}; rerun with the same --out to resume")
        sys.exit(PREEMPTED_EXIT_CODE)
    except UserError as e:
        parser.exit(2, f"error: {e}\n")
    print0(json.dumps(metrics))


def training_main(argv: list[str] | None, doc: str, config_cls: type, inputs: tuple[tuple[str, str], ...],
                  train: Callable[..., dict]) -> None:
    """The CLI of a training stage: one required --<input> DIR per upstream, --out, and the config flags."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, help_text in inputs:
        parser.add_argument(f"--{flag}", required=True, help=help_text)
    parser.add_argument("--out", required=True, help="output directory (resumes from its checkpoints)")
    add_config_arguments(parser, config_cls)
    run_cli(parser, argv, lambda a: train(config_from_args(config_cls, a), *(getattr(a, f) for f, _ in inputs), a.out))
