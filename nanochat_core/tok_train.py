"""The tokenizer stage: train a BPE tokenizer (rustbpe) on the train shards (every shard but the last), save it,
evaluate its compression on the validation shard against GPT-2 and GPT-4 per domain (tok_eval.md, see
nanochat_core.tok_eval), write metrics.json. The Tokenizer class itself lives in nanochat_core.tokenizer.

metrics.json holds only what the tokenizer is (sizes, compression), never how long training took: the artifact's
digest must not change when the same tokenizer is trained again.

    python -m nanochat_core.tok_train --shards DIR --out DIR [--vocab-size 65536] [--max-chars N] [--doc-cap N]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import rustbpe
from nanochat_core import tok_eval
from nanochat_core.config import ConfigError, add_config_arguments, config_from_args
from nanochat_core.data.sources import find_shards, iter_documents
from nanochat_core.fileio import atomic_write_bytes
from nanochat_core.stage_cli import run_cli
from nanochat_core.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

ROUNDTRIP_TEXT = "Hello world! 123 4567 ünïcödé 你好 🙂 <|bos|> \t\n  x"
VAL_EVAL_CHARS = 10_000_000  # compression is measured on (about) this many chars of the val shard


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 65536  # 256 bytes + merges + 9 special tokens
    max_chars: int = 2_000_000_000  # train on (at most) this many characters
    doc_cap: int = 10_000  # characters kept per document

    def validate(self) -> None:
        if not 256 + len(SPECIAL_TOKENS) <= self.vocab_size <= 2**31 - 1:
            raise ConfigError(f"TokenizerConfig.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} "
                              f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}")
        if self.max_chars < 1:
            raise ConfigError(f"TokenizerConfig.max_chars must be >= 1, got {self.max_chars}")
        if self.doc_cap < 1:
            raise ConfigError(f"TokenizerConfig.doc_cap must be >= 1, got {self.doc_cap}")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer trained on texts with rustbpe and nanochat's split pattern; vocab_size counts the 256 bytes,
    the merges and the 9 special tokens. (Here, not in nanochat_core.tokenizer: only this stage trains, so rustbpe's
    Rust sources are part of the tokenizer stage's identity and of no other.)"""
    num_ranks = vocab_size - len(SPECIAL_TOKENS)
    if num_ranks < 256:
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + 9 specials), "
                         f"got {vocab_size}")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), num_ranks, pattern=SPLIT_PATTERN)
    return Tokenizer(dict(bpe.get_mergeable_ranks()), bpe.get_pattern())


def training_texts(paths: list[Path], max_chars: int, doc_cap: int, stats: dict) -> Iterator[str]:
    """Documents cropped to doc_cap, stopping at max_chars in total (the last one cropped to fit)."""
    stats["chars"] = 0
    for path in paths:
        for doc in iter_documents(path):
            if not doc:
                continue
            doc = doc[: min(doc_cap, max_chars - stats["chars"])]
            stats["chars"] += len(doc)
            yield doc
            if stats["chars"] >= max_chars:
                return


def train_tokenizer(config: TokenizerConfig, shards_dir: str | Path, out_dir: str | Path) -> dict:
    """Train on the train shards, save the tokenizer into out_dir, evaluate it on the val shard (tok_eval.md),
    write metrics.json; returns the metrics."""
    config.validate()
    paths = find_shards(shards_dir)
    train_paths, val_path = paths[:-1], paths[-1]
    stats: dict = {}
    t0 = time.time()
    tokenizer = train_bpe(
        training_texts(train_paths, config.max_chars, config.doc_cap, stats), config.vocab_size)
    print(f"trained on {stats['chars']:,} chars in {time.time() - t0:.1f}s", flush=True)
    if tokenizer.decode(tokenizer.encode(ROUNDTRIP_TEXT)) != ROUNDTRIP_TEXT:
        raise RuntimeError("trained tokenizer fails the encode/decode round trip")
    out = Path(out_dir)
    tokenizer.save(out)
    metrics = {
        "vocab_size": tokenizer.get_vocab_size(),
        "train_chars": stats["chars"],
        **tok_eval.evaluate(tokenizer, val_path, out, VAL_EVAL_CHARS),  # bytes_per_token, gpt2_/gpt4_...
    }
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="directory of shard_*.parquet (the last is validation)")
    parser.add_argument("--out", required=True, help="output directory for the tokenizer")
    add_config_arguments(parser, TokenizerConfig)
    run_cli(parser, argv, lambda a: train_tokenizer(config_from_args(TokenizerConfig, a), a.shards, a.out))


if __name__ == "__main__":
    main()
