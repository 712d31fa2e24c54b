"""Distributed, resumable pretraining data loader: parquet shards -> tokens -> (x, y) batches of shape (B, T).

Split: "train" = every shard but the last, "val" = the last one. The row groups of the split are numbered
in order (shard by shard) and rank r reads row groups r, r+W, r+2W, ... of that list, looping over epochs.
Each document is encoded with BOS prepended; the tokens of consecutive row groups form one stream that is
cut into blocks of B*T+1 tokens (inputs = block[:-1], targets = block[1:]; the +1 token is not reused).

Exact resume: we only read a row group while fewer than B*T+1 tokens are buffered, so whatever is left
after a batch lies inside the row group read last. The state is therefore (that row group, how many of
its tokens were consumed): a new loader re-reads and re-encodes it, skips the consumed tokens, and
produces the identical token stream (tokenization is deterministic).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat_core.data.sources import DataError
from nanochat_core.tokenizer import Tokenizer

SPLITS = ("train", "val")


def split_files(shards_dir: str | Path, split: str) -> list[Path]:
    """The shard files of a split: train = all but the last shard_*.parquet, val = the last."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise DataError(f"shards directory {shards_dir} does not exist")
    paths = sorted(shards_dir.glob("shard_*.parquet"))
    if len(paths) < 2:
        raise DataError(f"{shards_dir} holds {len(paths)} shard_*.parquet file(s); need at least 2 (train + val)")
    return paths[:-1] if split == "train" else paths[-1:]


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet shard {path}: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
    return pf


class PretrainLoader:
    """Iterator of (x, y) int64 batches of shape (B, T) on `device`; `state_dict()` resumes right after the
    last batch it yielded: PretrainLoader(..., state=old.state_dict()) continues the same token stream."""

    def __init__(
        self,
        shards_dir: str | Path,
        tokenizer: Tokenizer,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        state: dict | None = None,
        num_threads: int = 4,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.files = split_files(shards_dir, split)
        self.tokenizer, self.bos = tokenizer, tokenizer.get_bos_token_id()
        self.B, self.T, self.split = batch_size, seq_len, split
        self.rank, self.world_size = rank, world_size
        self.device, self.num_threads = torch.device(device), num_threads
        all_groups = [(f, g) for f, path in enumerate(self.files) for g in range(_open_parquet(path).num_row_groups)]
        self.groups = all_groups[rank::world_size]  # this rank's row groups, as (file index, row group index)
        if not self.groups:
            raise DataError(f"split {split!r} of {shards_dir} has {len(all_groups)} row group(s), fewer than the "
                            f"{world_size} ranks: rank {rank} would get no data")
        self._pf: tuple[int, pq.ParquetFile] | None = None
        self.epoch, self.cursor = 0, 0  # the next row group to read: self.groups[cursor] in epoch `epoch`
        self.buf, self.pos = np.empty(0, dtype=np.int64), 0  # buffered tokens; buf[pos:] not yet used
        self.last = (0, 0, 0)  # (epoch, cursor, n_tokens) of the row group read last
        if state is not None:
            self._resume(state)

    # ---- reading

    def _parquet(self, file_idx: int) -> pq.ParquetFile:
        if self._pf is None or self._pf[0] != file_idx:
            self._pf = (file_idx, _open_parquet(self.files[file_idx]))
        return self._pf[1]

    def _encode_group(self, cursor: int) -> np.ndarray:
        file_idx, group = self.groups[cursor]
        try:
            texts = self._parquet(file_idx).read_row_group(group, columns=["text"]).column("text").to_pylist()
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read row group {group} of {self.files[file_idx]}: {e}") from e
        docs = self.tokenizer.encode([t or "" for t in texts], prepend=self.bos, num_threads=self.num_threads)
        return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64)

    def _read_next_group(self) -> None:
        tokens = self._encode_group(self.cursor)
        self.last = (self.epoch, self.cursor, len(tokens))
        self.buf, self.pos = np.concatenate([self.buf[self.pos:], tokens]), 0
        self.cursor += 1
        if self.cursor == len(self.groups):  # next epoch (upstream's generator hung here: SEED bug #361)
            self.cursor, self.epoch = 0, self.epoch + 1

    # ---- state

    def state_dict(self) -> dict:
        """Position after the last yielded batch (JSON-serializable)."""
        epoch, cursor, n_tokens = self.last
        left = len(self.buf) - self.pos  # < n_tokens, so all of it comes from the row group read last
        file_idx, group = self.groups[cursor]
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size, "epoch": epoch,
                "cursor": cursor, "shard": self.files[file_idx].name, "row_group": group,
                "offset": n_tokens - left}

    def _resume(self, state: dict) -> None:
        for key in ("split", "rank", "world_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state is for {key}={state.get(key)!r}, this loader has "
                                f"{getattr(self, key)!r}: resume with the same split and number of ranks")
        cursor = state["cursor"]
        file_idx, group = self.groups[cursor] if 0 <= cursor < len(self.groups) else (None, None)
        if file_idx is None or (self.files[file_idx].name, group) != (state["shard"], state["row_group"]):
            raise DataError(f"loader state points at {state['shard']} row group {state['row_group']}, which is not "
                            f"this rank's row group #{cursor} any more: did the shards change?")
        self.epoch, self.cursor = state["epoch"], cursor
        self._read_next_group()
        self.pos = state["offset"]

    # ---- iteration

    def __iter__(self) -> PretrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        need = self.B * self.T + 1
        while len(self.buf) - self.pos < need:
            self._read_next_group()
        block = self.buf[self.pos:self.pos + need]
        self.pos += need
        return to_device_batch(block, self.B, self.T, self.device)


def to_device_batch(block: np.ndarray, B: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """B*T+1 tokens -> (inputs, targets) of shape (B, T); pinned memory + async copy on CUDA."""
    cuda = device.type == "cuda"
    scratch = torch.tensor(block, dtype=torch.long)
    if cuda:
        scratch = scratch.pin_memory()
    x = scratch[:-1].view(B, T).to(device, non_blocking=cuda)
    y = scratch[1:].view(B, T).to(device, non_blocking=cuda)
    return x, y
