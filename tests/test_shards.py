"""Shards stage: mirror fetch, skip valid shards, replace damaged ones, clear errors."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_core.config import ConfigError
from nanochat_core.data.shards import ShardsConfig, check_shard, download_shards, main
from nanochat_core.data.sources import DataError, iter_documents


def small_mirror(tmp_path, shared_data, n=3):
    mirror = tmp_path / "mirror"
    (mirror / "pretrain").mkdir(parents=True)
    for i in range(n):
        name = f"shard_{i:05d}.parquet"
        shutil.copyfile(shared_data / "pretrain" / name, mirror / "pretrain" / name)
    return mirror


def test_fetch_all_then_skip(tmp_path, shared_data):
    mirror = small_mirror(tmp_path, shared_data)
    out = tmp_path / "out"
    m1 = download_shards(ShardsConfig(source=str(mirror)), out)
    assert m1["num_shards"] == 3 and m1["fetched"] == 3
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"shard_{i:05d}.parquet" for i in range(3)]
    m2 = download_shards(ShardsConfig(source=str(mirror)), out)
    assert m2["fetched"] == 0 and m2["skipped"] == 3


def test_damaged_local_shard_is_replaced(tmp_path, shared_data):
    mirror = small_mirror(tmp_path, shared_data)
    out = tmp_path / "out"
    download_shards(ShardsConfig(source=str(mirror)), out)
    (out / "shard_00001.parquet").write_bytes(b"garbage")
    m = download_shards(ShardsConfig(source=str(mirror)), out)
    assert m["fetched"] == 1
    check_shard(out / "shard_00001.parquet")


def test_corrupt_source_shard_names_the_file(tmp_path, shared_data):
    mirror = small_mirror(tmp_path, shared_data)
    (mirror / "pretrain" / "shard_00002.parquet").write_bytes(b"PAR1 not really")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="shard_00002.parquet"):
        download_shards(ShardsConfig(source=str(mirror)), out)
    assert (out / "shard_00000.parquet").is_file()  # what was fetched before stays valid
    assert not list(out.glob(".*tmp"))


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        download_shards(ShardsConfig(source=str(tmp_path / "nope")), tmp_path / "out")


def test_bad_config_values():
    with pytest.raises(ConfigError, match="num_shards"):
        ShardsConfig(num_shards=0).validate()
    for bad in (0.0, -1.0, float("nan")):  # NaN: a directly built config never met config_from_dict's check
        with pytest.raises(ConfigError, match="timeout_seconds"):
            ShardsConfig(timeout_seconds=bad).validate()


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "o"), "--source", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "not a directory" in capsys.readouterr().err


def test_corrupt_source_shard_error_names_the_source_not_the_temporary_copy(tmp_path, shared_data):
    mirror = small_mirror(tmp_path, shared_data)
    source = mirror / "pretrain" / "shard_00001.parquet"
    source.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError) as e:
        download_shards(ShardsConfig(source=str(mirror)), tmp_path / "out")
    assert str(source) in str(e.value) and ".tmp" not in str(e.value)


def write_binary_text_shard(path):
    pq.write_table(pa.table({"text": pa.array([b"hello world", b"more bytes"], type=pa.binary())}), path)


def test_binary_text_column_is_rejected_naming_the_file_and_type(tmp_path, shared_data):
    mirror = small_mirror(tmp_path, shared_data)
    source = mirror / "pretrain" / "shard_00002.parquet"
    write_binary_text_shard(source)
    with pytest.raises(DataError, match=r"'text' column.*binary.*string") as e:
        download_shards(ShardsConfig(source=str(mirror)), tmp_path / "out")
    assert str(source) in str(e.value)
    with pytest.raises(DataError, match=r"binary"):
        check_shard(source)


def test_binary_text_column_is_a_data_error_for_the_tokenizer_reader(tmp_path):
    """A shard that skipped the shards stage (a hand-made shards dir) fails naming the file, not deep in BPE."""
    path = tmp_path / "shard_00000.parquet"
    write_binary_text_shard(path)
    with pytest.raises(DataError, match=r"binary") as e:
        list(iter_documents(path))
    assert str(path) in str(e.value)
    large = tmp_path / "shard_00001.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b"], type=pa.large_string())}), large)
    assert list(iter_documents(large)) == ["a", "b"] and check_shard(large) == 2
