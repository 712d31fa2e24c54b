"""Supervised fine-tuning on conversations: loss on assistant tokens only.

    torchrun --standalone --nproc_per_node=8 -m nanochat_core.train.sft --mid DIR --tokenizer DIR --out DIR

The "sft" mixture (ARC-Easy/Challenge train, GSM8K train, conversations), one conversation per row, padded;
`examples_per_step` conversations per optimizer step over all ranks; LR decays linearly to 0 over
`num_iterations` optimizer steps (not micro-batches, upstream PR #775). Resumes from --out's newest checkpoint.
Writes model.pt + meta.json and, last, metrics.json {"val_loss", "steps", ...}.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from nanochat_core.common import DistInfo
from nanochat_core.config import ConfigError, add_config_arguments, config_from_args
from nanochat_core.train.chat import train_chat
from nanochat_core.train.common import check_device_type, run_cli, sft_lr_multiplier


@dataclass(frozen=True)
class SFTConfig:
    num_iterations: int = 700
    max_seq_len: int = 2048
    device_batch_size: int = 4  # conversations per forward pass per rank
    examples_per_step: int = 32  # conversations per optimizer step, all ranks
    max_examples: int = -1
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.02
    eval_every: int = 100
    eval_steps: int = 8
    save_every: int = -1
    keep_checkpoints: int = 2
    seed: int = 42
    device_type: str = ""

    def validate(self) -> None:
        for name in ("num_iterations", "max_seq_len", "device_batch_size", "examples_per_step", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.init_lr_frac <= 1:
            raise ConfigError(f"SFTConfig.init_lr_frac must be in (0, 1], got {self.init_lr_frac}")
        check_device_type("SFTConfig", self.device_type)


def train(config: SFTConfig, mid_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path) -> dict:
    def accum(d: DistInfo) -> int:
        per_pass = config.device_batch_size * d.world_size
        if config.examples_per_step % per_pass:
            raise ConfigError(f"SFTConfig.examples_per_step={config.examples_per_step} must be a multiple of "
                              f"device_batch_size * world_size = {per_pass}")
        return config.examples_per_step // per_pass

    return train_chat("sft", config, "sft", mid_dir, tokenizer_dir, out_dir, packed=False,
                      grad_accum_fn=accum, lr_fn=sft_lr_multiplier)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mid", required=True, help="midtrained model directory")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
    parser.add_argument("--out", required=True, help="output directory (resumes from its checkpoints)")
    add_config_arguments(parser, SFTConfig)
    run_cli(parser, argv, lambda a: train(config_from_args(SFTConfig, a), a.mid, a.tokenizer, a.out))


if __name__ == "__main__":
    main()
