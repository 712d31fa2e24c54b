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

BestFitLoader (upstream HEAD's BOS-aligned best-fit packing): the same row groups in the same order, but each row
of T+1 tokens starts at a document start. From a buffer of `buffer_size` documents (topped up, a row group at a
time, before every pick), each row takes the largest document that fits the space left; when none fits, the
shortest document is cropped to fill the row exactly and its remainder dropped. No padding, every position is
trained on; ties go to the document that arrived first, as upstream's linear scan does. Rows are independent:
inputs = row[:-1], targets = row[1:].

Its exact resume: a batch always ends on a full row, so between batches the whole position is (the next row
group to read, the buffered documents in arrival order). The state names each buffered document by where it
came from (this rank's row group number, index in that group) instead of holding its tokens, so it stays small
JSON; a new loader re-reads and re-encodes just those documents (tokenization is deterministic and each text is
encoded on its own) and makes the same picks. It reuses the row-group prefetcher above unchanged: the tokens of a
group are split back into documents at BOS, which encode() never emits inside a text. A document longer than a
row leaves the buffer only once it is the shortest there, so over a long run the buffer fills with the longest
documents (kept as int32), the fraction cropped climbs to its steady state, and the state names their row groups,
which a resume re-reads.
"""

from __future__ import annotations

import bisect
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


def check_loader_args(batch_size: int, seq_len: int, prefetch: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1 row group, got {prefetch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


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
        check_loader_args(batch_size, seq_len, prefetch, rank, world_size)
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


# ---------------------------------------------------------------------------------------------
# BOS-aligned best-fit packing


class BestFitLoader:
    """Iterator of (x, y) int64 batches of shape (B, T) on `device`, every row starting at a document start (BOS),
    filled by best-fit packing (see the module docstring); BestFitLoader(..., state=old.state_dict()) continues the
    identical stream, buffer included. `cropped_tokens` and `used_tokens` count the tokens that cropping dropped and
    the tokens put into rows, so cropped / (cropped + used) is the fraction lost to cropping."""

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
        buffer_size: int = 1000,
    ):
        check_loader_args(batch_size, seq_len, prefetch, rank, world_size)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1 document, got {buffer_size}")
        self.files = split_files(shards_dir, split)
        self.tokenizer, self.bos = tokenizer, tokenizer.get_bos_token_id()
        self.B, self.T, self.split, self.buffer_size = batch_size, seq_len, split, buffer_size
        self.rank, self.world_size = rank, world_size
        self.device, self.num_threads, self.prefetch = torch.device(device), num_threads, prefetch
        all_groups = [(f, g) for f, path in enumerate(self.files) for g in range(_open_parquet(path).num_row_groups)]
        self.groups = all_groups[rank::world_size]  # this rank's row groups, as (file index, row group index)
        if not self.groups:
            raise DataError(f"split {split!r} of {shards_dir} has {len(all_groups)} row group(s), fewer than the "
                            f"{world_size} ranks: rank {rank} would get no data")
        self._prefetcher: _Prefetcher | None = None  # started by the first read, at the position then current
        self.epoch, self.cursor = 0, 0  # the next row group to read: self.groups[cursor] in epoch `epoch`
        self._docs: dict[int, tuple[int, int, np.ndarray]] = {}  # arrival number -> (cursor, index in group, tokens)
        self._by_length: list[tuple[int, int]] = []  # (length, arrival number) of the buffered docs, sorted
        self._arrivals = 0
        self.cropped_tokens = self.used_tokens = 0
        if state is not None:
            self._resume(state)

    # ---- the document buffer

    def _add_doc(self, cursor: int, index: int, tokens: np.ndarray) -> None:
        self._docs[self._arrivals] = (cursor, index, tokens)
        bisect.insort(self._by_length, (len(tokens), self._arrivals))
        self._arrivals += 1

    def _read_next_group(self) -> int:
        """Buffer the documents of the next row group; returns how many it had."""
        if self._prefetcher is None:
            self._prefetcher = _Prefetcher(self.files, self.groups, self.tokenizer, self.bos, self.num_threads,
                                           self.epoch, self.cursor, self.prefetch)
        epoch, cursor, tokens = self._prefetcher.get()
        assert (epoch, cursor) == (self.epoch, self.cursor), "prefetch thread out of step with the loader"
        docs = split_documents(tokens, self.bos)
        for index, doc in enumerate(docs):
            self._add_doc(cursor, index, doc)
        self.cursor += 1
        if self.cursor == len(self.groups):
            self.cursor, self.epoch = 0, self.epoch + 1
        return len(docs)

    def _fill_buffer(self) -> None:
        empty_in_a_row = 0
        while len(self._docs) < self.buffer_size:
            empty_in_a_row = 0 if self._read_next_group() else empty_in_a_row + 1
            if empty_in_a_row == len(self.groups):  # a whole epoch without a document: this would never end
                raise DataError(f"rank {self.rank}'s row groups of split {self.split!r} hold no documents")

    def _pop_best_fit(self, space: int) -> np.ndarray:
        """The largest buffered document of at most `space` tokens, else the shortest one (to be cropped); among equal
        lengths the first to arrive."""
        i = bisect.bisect_left(self._by_length, (space + 1, -1))  # the docs before i fit
        if i > 0:
            i = bisect.bisect_left(self._by_length, (self._by_length[i - 1][0], -1))
        _, arrival = self._by_length.pop(i)
        return self._docs.pop(arrival)[2]

    close = PretrainLoader.close  # the same prefetcher to stop
    __del__ = PretrainLoader.__del__

    # ---- state

    def state_dict(self) -> dict:
        """Position after the last yielded batch (JSON-serializable): the next row group and the buffered documents,
        by origin: `docs` = [[cursor, index in that row group], ...] in arrival order, `groups` = [[cursor, shard,
        row group], ...] for every cursor named (to check that the shards did not change)."""
        docs = [list(self._docs[arrival][:2]) for arrival in sorted(self._docs)]
        cursors = sorted({c for c, _ in docs} | {self.cursor})
        groups = [[c, self.files[self.groups[c][0]].name, self.groups[c][1]] for c in cursors]
        return {"loader": "bestfit", "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "buffer_size": self.buffer_size, "epoch": self.epoch, "cursor": self.cursor, "groups": groups,
                "docs": docs}

    def _resume(self, state: dict) -> None:
        docs = self._check_state(state)
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        wanted: dict[int, set[int]] = {}
        for cursor, index in docs:
            wanted.setdefault(cursor, set()).add(index)
        tokens: dict[tuple[int, int], np.ndarray] = {}
        for cursor, indices in sorted(wanted.items()):
            tokens.update(((cursor, i), t) for i, t in self._encode_documents(cursor, sorted(indices)).items())
        for cursor, index in docs:
            self._add_doc(cursor, index, tokens[cursor, index])

    def _check_state(self, state: dict) -> list[tuple[int, int]]:
        """The buffered documents of a valid state as (cursor, index) pairs; a DataError naming what is wrong else."""
        if not isinstance(state, dict) or state.get("loader") != "bestfit":
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise DataError(f"loader state is not a BestFitLoader state (got {keys}): a PretrainLoader state cannot "
                            "resume best-fit packing")
        missing = [k for k in ("split", "rank", "world_size", "buffer_size", "epoch", "cursor", "groups", "docs")
                   if k not in state]
        if missing:
            raise DataError(f"BestFitLoader state is missing {missing}")
        for key in ("split", "rank", "world_size", "buffer_size"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state is for {key}={state[key]!r}, this loader has {getattr(self, key)!r}: "
                                "resume with the same split, number of ranks and buffer size")
        n = len(self.groups)
        if not (_is_int(state["epoch"]) and state["epoch"] >= 0 and _is_int(state["cursor"])
                and 0 <= state["cursor"] < n):
            raise DataError(f"BestFitLoader state has epoch={state['epoch']!r}, cursor={state['cursor']!r}: expected "
                            f"ints, epoch >= 0 and cursor in [0, {n})")
        groups = state["groups"]
        if not isinstance(groups, list) or not all(
                isinstance(g, list) and len(g) == 3 and _is_int(g[0]) and isinstance(g[1], str) and _is_int(g[2])
                for g in groups):
            raise DataError("BestFitLoader state: 'groups' must be a list of [cursor, shard name, row group]")
        for cursor, shard, group in groups:
            file_idx, actual = self.groups[cursor] if 0 <= cursor < n else (None, None)
            if file_idx is None or (self.files[file_idx].name, actual) != (shard, group):
                raise DataError(f"loader state points at {shard} row group {group}, which is not this rank's row "
                                f"group #{cursor} any more: did the shards change?")
        docs = state["docs"]
        if not isinstance(docs, list) or not all(
                isinstance(d, list) and len(d) == 2 and _is_int(d[0]) and _is_int(d[1]) and d[1] >= 0 for d in docs):
            raise DataError("BestFitLoader state: 'docs' must be a list of [cursor, index in row group]")
        named = {g[0] for g in groups}
        unnamed = sorted(({c for c, _ in docs} | {state["cursor"]}) - named)
        if unnamed:
            raise DataError(f"BestFitLoader state names row group(s) #{unnamed} without their shard in 'groups'")
        return [(c, i) for c, i in docs]

    def _encode_documents(self, cursor: int, indices: list[int]) -> dict[int, np.ndarray]:
        """Documents `indices` of this rank's row group #cursor, encoded as the prefetcher encodes them."""
        file_idx, group = self.groups[cursor]
        path = self.files[file_idx]
        pf = _open_parquet(path)
        try:
            texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"cannot read row group {group} of {path}: {e}") from e
        if indices[-1] >= len(texts):
            raise DataError(f"loader state names document {indices[-1]} of {path.name} row group {group}, which has "
                            f"{len(texts)}: did the shards change?")
        encoded = self.tokenizer.encode([texts[i] or "" for i in indices], prepend=self.bos,
                                        num_threads=self.num_threads)
        return {i: np.array(t, dtype=np.int32) for i, t in zip(indices, encoded, strict=True)}

    # ---- iteration

    def __iter__(self) -> BestFitLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for row in rows:
            pos = 0
            while pos < len(row):
                self._fill_buffer()
                doc = self._pop_best_fit(len(row) - pos)
                n = min(len(doc), len(row) - pos)  # all of it, unless nothing fitted and it is cropped
                row[pos:pos + n] = doc[:n]
                self.cropped_tokens += len(doc) - n
                pos += n
        self.used_tokens += rows.size
        return rows_to_device(rows, self.device)


def split_documents(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    """A row group's token array back into its documents (each starts with BOS; encode() never emits BOS inside a
    text), as compact copies that do not hold the group's array alive."""
    if len(tokens) == 0:
        return []
    starts = np.flatnonzero(tokens == bos)
    assert len(starts) and starts[0] == 0, "every document starts with BOS"
    return [doc.astype(np.int32) for doc in np.split(tokens, starts[1:])]


def rows_to_device(rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) rows -> (inputs, targets) of shape (B, T), each row shifted on its own; one pinned copy on CUDA."""
    cuda = device.type == "cuda"
    B, T = rows.shape[0], rows.shape[1] - 1
    pair = torch.empty((2, B, T), dtype=torch.long, pin_memory=cuda)
    pair[0] = torch.from_numpy(rows[:, :-1])
    pair[1] = torch.from_numpy(rows[:, 1:])
    pair = pair.to(device, non_blocking=cuda)
    return pair[0], pair[1]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
