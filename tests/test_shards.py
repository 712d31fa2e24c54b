"""Shards stage: mirror fetch, skip valid shards, replace damaged ones, clear errors."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_core.config import ConfigError, config_from_dict
from nanochat_core.data.shards import (
    ShardsConfig,
    check_shard,
    count_available,
    download_shards,
    main,
    shard_indices,
    shard_template,
)
from nanochat_core.data.sources import PRETRAIN_DATASETS, DataError, iter_documents
from nanochat_core.dataloader import split_files


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


# ---- NVIDIA ClimbMix as a second corpus (the shared mirror has none of it: nothing here downloads)

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"


def test_climbmix_is_addressed_like_upstream(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # only building URLs: nothing is fetched
    template = shard_template("", "climbmix")
    assert template.format(index=7) == f"{CLIMBMIX_URL}/shard_00007.parquet"
    assert count_available(template, "climbmix") == 6543  # shard_00000 .. shard_06542
    climbmix = PRETRAIN_DATASETS["climbmix"]
    assert shard_indices(climbmix, 4) == [0, 1, 2, 6542]  # the validation shard is pinned to the last one
    assert shard_indices(climbmix, 6543) == list(range(6543))
    with pytest.raises(DataError, match="6543 shards"):
        shard_indices(climbmix, 6544)
    fineweb = shard_template("")  # the default corpus is unchanged
    assert fineweb == "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/" + \
        "shard_{index:05d}.parquet"
    assert shard_indices(PRETRAIN_DATASETS["fineweb-edu"], 4) == [0, 1, 2, 3]
    assert shard_template("https://mirror.example/data/", "climbmix").format(index=1) == \
        "https://mirror.example/data/climbmix/shard_00001.parquet"


def test_the_config_selects_the_corpus(tmp_path, shared_data):
    assert ShardsConfig().dataset == "fineweb-edu"
    assert config_from_dict(ShardsConfig, {"dataset": "climbmix"}).dataset == "climbmix"
    with pytest.raises(ConfigError, match=r"dataset must be one of \['climbmix', 'fineweb-edu'\]"):
        config_from_dict(ShardsConfig, {"dataset": "fineweb"})
    # a mirror with a climbmix/ directory (real shards standing in, under ClimbMix's names)
    mirror = small_mirror(tmp_path, shared_data)
    (mirror / "climbmix").mkdir()
    for src, index in ((0, 0), (1, 1), (2, 2), (11, 6542)):
        shutil.copyfile(shared_data / "pretrain" / f"shard_{src:05d}.parquet",
                        mirror / "climbmix" / f"shard_{index:05d}.parquet")
    out = tmp_path / "climbmix_out"
    assert download_shards(ShardsConfig(source=str(mirror), dataset="climbmix"), out)["num_shards"] == 4
    assert [p.name for p in split_files(out, "val")] == ["shard_06542.parquet"]
    assert len(split_files(out, "train")) == 3
    two = download_shards(ShardsConfig(source=str(mirror), dataset="climbmix", num_shards=2), tmp_path / "two")
    assert two["num_shards"] == 2 and sorted(p.name for p in (tmp_path / "two").glob("*.parquet")) == \
        ["shard_00000.parquet", "shard_06542.parquet"]


@pytest.mark.timeout(30)
def test_offline_climbmix_without_a_mirror_is_a_clear_error(tmp_path, shared_data, monkeypatch, capsys):
    # the shared mirror has no climbmix/ directory
    with pytest.raises(DataError, match=r"no climbmix/ directory.*karpathy/climbmix-400b-shuffle"):
        download_shards(ShardsConfig(source=str(shared_data), dataset="climbmix"), tmp_path / "a")
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "b"), "--dataset", "climbmix", "--num-shards", "3"])  # $NANOCHAT_DATA
    assert e.value.code == 2 and "karpathy/climbmix-400b-shuffle" in capsys.readouterr().err
    # no mirror at all, offline: an error before any network access
    monkeypatch.delenv("NANOCHAT_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"HF_HUB_OFFLINE.*NVIDIA ClimbMix.*karpathy/climbmix-400b-shuffle"):
        download_shards(ShardsConfig(dataset="climbmix", num_shards=3), tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.parquet"))
