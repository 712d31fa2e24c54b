"""Pretraining loader: the token stream it cuts, rank striding, exact resume (2 ranks), epochs, bad input."""

import itertools
import json

import pyarrow.parquet as pq
import pytest
import torch

from nanochat_core.data.sources import DataError
from nanochat_core.dataloader import PretrainLoader, split_files


@pytest.fixture(scope="module")
def shards_dir(shared_data, tmp_path_factory):
    """Two train shards and the real validation shard (3 row groups), as symlinks."""
    out = tmp_path_factory.mktemp("shards")
    src = shared_data / "pretrain"
    for i, name in enumerate(["shard_00000.parquet", "shard_00001.parquet", "shard_00011.parquet"]):
        (out / f"shard_{i:05d}.parquet").symlink_to(src / name)
    return out


def reference_stream(paths, tokenizer, rank, world):
    """What a rank must read: row groups rank, rank+W, ... of the split, each doc as [BOS] + tokens."""
    groups = [(p, g) for p in paths for g in range(pq.ParquetFile(p).num_row_groups)][rank::world]
    out = []
    for path, g in groups:
        for text in pq.ParquetFile(path).read_row_group(g, columns=["text"]).column("text").to_pylist():
            out += tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
    return out


def flat(batches):
    """The token stream behind (x, y) batches of B*T+1 tokens each (x plus the last target)."""
    out = []
    for x, y in batches:
        out += torch.cat([x.reshape(-1), y.reshape(-1)[-1:]]).tolist()
    return out


def test_splits(shards_dir):
    assert [p.name for p in split_files(shards_dir, "train")] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.name for p in split_files(shards_dir, "val")] == ["shard_00002.parquet"]


@pytest.mark.parametrize("rank", [0, 1])
def test_batches_follow_the_ranks_row_groups(shards_dir, tokenizer, rank):
    B, T = 4, 64
    loader = PretrainLoader(shards_dir, tokenizer, B, T, "train", rank=rank, world_size=2)
    batches = list(itertools.islice(loader, 12))
    x, y = batches[0]
    assert x.shape == y.shape == (B, T) and x.dtype == torch.long
    assert torch.equal(x.reshape(-1)[1:], y.reshape(-1)[:-1])  # targets are inputs shifted by one
    expected = reference_stream(split_files(shards_dir, "train"), tokenizer, rank, 2)
    assert flat(batches) == expected[: 12 * (B * T + 1)]
    assert x[0, 0].item() == tokenizer.get_bos_token_id()


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_gives_the_identical_stream_on_each_of_two_ranks(shards_dir, tokenizer, rank):
    B, T, total = 32, 256, 80
    loader = PretrainLoader(shards_dir, tokenizer, B, T, "train", rank, 2)
    uninterrupted = list(itertools.islice(loader, total))
    assert loader.state_dict()["shard"] == "shard_00001.parquet"  # crossed row groups and the file boundary
    for cut in (1, 29, 63):
        first = PretrainLoader(shards_dir, tokenizer, B, T, "train", rank, 2)
        head = list(itertools.islice(first, cut))
        state = json.loads(json.dumps(first.state_dict()))  # survives the trip through a JSON file
        tail = list(itertools.islice(PretrainLoader(shards_dir, tokenizer, B, T, "train", rank, 2, state=state),
                                     total - cut))
        assert flat(head + tail) == flat(uninterrupted), f"rank {rank}, cut after {cut} batches"


def test_loops_over_epochs_and_resumes_across_the_wrap(shards_dir, tokenizer):
    B, T = 8, 256
    loader = PretrainLoader(shards_dir, tokenizer, B, T, "val")  # one shard, 3 row groups
    one_epoch = len(reference_stream(split_files(shards_dir, "val"), tokenizer, 0, 1))
    n = 2 * one_epoch // (B * T + 1) + 3  # more than two epochs: upstream's loader hung here
    batches, states = [], []
    for _ in range(n):
        batches.append(next(loader))
        states.append(loader.state_dict())
    assert states[-1]["epoch"] == 2
    stream = flat(batches)
    assert stream[one_epoch:2 * one_epoch] == stream[:one_epoch]  # each epoch reads the same tokens
    wrap = next(i for i, s in enumerate(states) if s["epoch"] == 1)
    resumed = PretrainLoader(shards_dir, tokenizer, B, T, "val", state=states[wrap - 1])
    assert flat(itertools.islice(resumed, n - wrap)) == flat(batches[wrap:])


def test_bad_input_is_a_clear_error(shards_dir, tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PretrainLoader(tmp_path / "nope", tokenizer, 2, 8)
    (tmp_path / "shard_00000.parquet").symlink_to(shards_dir / "shard_00000.parquet")
    with pytest.raises(DataError, match="need at least 2"):
        PretrainLoader(tmp_path, tokenizer, 2, 8)
    with pytest.raises(DataError, match="fewer than the 4 ranks"):
        PretrainLoader(shards_dir, tokenizer, 2, 8, "val", rank=3, world_size=4)
    state = PretrainLoader(shards_dir, tokenizer, 2, 8, "train", rank=0, world_size=2).state_dict()
    with pytest.raises(DataError, match="world_size"):
        PretrainLoader(shards_dir, tokenizer, 2, 8, "train", rank=0, world_size=1, state=state)
    with pytest.raises(ValueError, match="split"):
        PretrainLoader(shards_dir, tokenizer, 2, 8, "test")
