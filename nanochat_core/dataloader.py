"""Distributed, resumable pretraining data loader: parquet shards -> tokens -> (x, y) batches of shape (B, T).

Split: "train" = every shard but the last, "val" = the last one. The row groups of the split are numbered
in order (shard by shard) and rank r reads row groups r, r+W, r+2W, ... of that list, looping over epochs.
Each document is encoded with BOS prepended; the tokens of consecutive row groups form one stream that is
cut into blocks of B*T+1 tokens (inputs = block[:-1], targets = block[1:]; the +1 token is not reused).

Exact resume: we only read a row group while fewer than B*T+1 tokens are buffered, so whatever is left
after a batch lies inside the row group read last. The state is therefore (that row group, how many of
its tokens were consumed): a new loader re-reads and re-encodes it, skips the consumed tokens, and
produces the identical token stream (tokenization is deterministic).

Background tokenization: a thread reads and encodes the row groups ahead of the consumer, in the same
order, into a bounded queue (`prefetch` groups waiting, one more being encoded). The consumer takes them
in order and only then updates its position, so the state still describes the batches handed out, never
the read-ahead. The thread holds no reference to the loader: dropping the loader (or close()) stops it.
"""

from __future__ import annotations

import itertools
import queue
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from nanochat_core.data.sources import DataError, find_shards
from nanochat_core.tokenizer import Tokenizer

SPLITS = ("train", "val")


def split_files(shards_dir: str | Path, split: str) -> list[Path]:
    """The shard files of a split: train = all but the last shard_*.parquet, val = the last."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    paths = find_shards(shards_dir)
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
        prefetch: int = 1,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 row group, got {prefetch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.files = split_files(shards_dir, split)
        self.tokenizer, self.bos = tokenizer, tokenizer.get_bos_token_id()
        self.B, self.T, self.split = batch_size, seq_len, split
        self.rank, self.world_size = rank, world_size
        self.device, self.num_threads, self.prefetch = torch.device(device), num_threads, prefetch
        all_groups = [(f, g) for f, path in enumerate(self.files) for g in range(_open_parquet(path).num_row_groups)]
        self.groups = all_groups[rank::world_size]  # this rank's row groups, as (file index, row group index)
        if not self.groups:
            raise DataError(f"split {split!r} of {shards_dir} has {len(all_groups)} row group(s), fewer than the "
                            f"{world_size} ranks: rank {rank} would get no data")
        self._prefetcher: _Prefetcher | None = None  # started by the first read, at the position then current
        self.epoch, self.cursor = 0, 0  # the next row group to read: self.groups[cursor] in epoch `epoch`
        self.buf, self.pos = np.empty(0, dtype=np.int64), 0  # buffered tokens; buf[pos:] not yet used
        self.last = (0, 0, 0)  # (epoch, cursor, n_tokens) of the row group read last
        if state is not None:
            self._resume(state)

    # ---- reading

    def _read_next_group(self) -> None:
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self.files, self.groups, self.tokenizer, self.bos, self.num_threads,
                                           self.epoch, self.cursor, self.prefetch)
        epoch, cursor, tokens = self._prefetcher.get()
        assert (epoch, cursor) == (self.epoch, self.cursor), "prefetch thread out of step with the loader"
        self.last = (self.epoch, self.cursor, len(tokens))
        self.buf, self.pos = np.concatenate([self.buf[self.pos:], tokens]), 0
        self.cursor += 1
        if self.cursor == len(self.groups):  # next epoch (upstream's generator hung here: SEED bug #361)
            self.cursor, self.epoch = 0, self.epoch + 1

    def close(self) -> None:
        """Stop the background tokenizer thread (also done when the loader is garbage collected)."""
        prefetcher = getattr(self, "_prefetcher", None)  # absent if __init__ raised
        if prefetcher is not None:
            prefetcher.close()
            self._prefetcher = None

    def __del__(self) -> None:
        self.close()

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


class _Prefetcher:
    """A daemon thread encoding this rank's row groups in order from (epoch, cursor) into a bounded queue.
    It references only what it reads (files, groups, tokenizer), not the loader, so the loader can be freed."""

    def __init__(self, files: list[Path], groups: list[tuple[int, int]], tokenizer: Tokenizer, bos: int,
                 num_threads: int, epoch: int, cursor: int, depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: Exception | None = None
        args = (files, groups, tokenizer, bos, num_threads, epoch, cursor, self.queue, self.stop)
        self.thread = threading.Thread(target=_prefetch_groups, args=args, name="PretrainLoader-prefetch",
                                       daemon=True)
        self.thread.start()

    def get(self) -> tuple[int, int, np.ndarray]:
        if self.error is not None:  # the thread has stopped: it would never put another item
            raise self.error
        item = self.queue.get()
        if isinstance(item, Exception):  # raised in the thread: surface it here, in the training loop
            self.error = item
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        try:  # free a slot so that a put() blocked on a full queue returns and the thread sees `stop`
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        # wait for the group in flight: a thread still inside pyarrow when the interpreter exits aborts it
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=30)


def _prefetch_groups(files, groups, tokenizer, bos, num_threads, epoch, cursor, out: queue.Queue,
                     stop: threading.Event) -> None:
    opened: tuple[int, pq.ParquetFile] | None = None
    while not stop.is_set():
        file_idx, group = groups[cursor]
        try:
            if opened is None or opened[0] != file_idx:
                opened = (file_idx, _open_parquet(files[file_idx]))
            item = (epoch, cursor, _encode_group(opened[1], files[file_idx], group, tokenizer, bos, num_threads))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            item = e
        out.put(item)
        if isinstance(item, Exception):
            return
        cursor += 1
        if cursor == len(groups):
            cursor, epoch = 0, epoch + 1


def _encode_group(pf: pq.ParquetFile, path: Path, group: int, tokenizer: Tokenizer, bos: int,
                  num_threads: int) -> np.ndarray:
    """One row group's documents as one token array, each document prefixed with BOS."""
    try:
        texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read row group {group} of {path}: {e}") from e
    docs = tokenizer.encode([t or "" for t in texts], prepend=bos, num_threads=num_threads)
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64)
