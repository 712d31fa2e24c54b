"""Shards stage: fetch the pretraining parquet shards into the stage's output directory.

The corpus is `ShardsConfig.dataset`: "fineweb-edu" (FineWeb-Edu, the default) or "climbmix" (NVIDIA ClimbMix, as
upstream's HEAD trains on). Source, in order: `ShardsConfig.source` (a directory or http(s) URL laid out like
../shared/data, the corpus under its own directory: pretrain/ for FineWeb-Edu, climbmix/ for ClimbMix), else the
NANOCHAT_DATA mirror, else the real shards on Hugging Face (never when HF_HUB_OFFLINE is set: that is an error
naming the dataset). Shards are named `shard_{i:05d}.parquet`; the last one fetched is the validation shard
(upstream's convention). For ClimbMix that is always shard_06542, as upstream pins it: num_shards=N fetches
shards 0..N-2 and shard_06542.

Each shard is written to a temporary name, checked (opens as parquet, has a `text` column of strings, at
least one row) and renamed into place, so a present shard is a valid one. Shards already present and valid are
skipped; transient network errors are retried with exponential backoff; a corrupt shard is an error that
names the file (retrying cannot fix it).

    python -m nanochat_core.data.shards --out DIR [--num-shards 8] [--source DIR|URL] [--dataset climbmix]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from nanochat_core.config import ConfigError, add_config_arguments, config_from_args
from nanochat_core.data.sources import (
    DATA_ENV,
    PRETRAIN_DATASETS,
    DataError,
    ShardDataset,
    check_text_column,
    hf_offline,
    is_url,
    pretrain_dataset,
)

SHARD_NAME = "shard_{index:05d}.parquet"


@dataclass(frozen=True)
class ShardsConfig:
    num_shards: int = -1  # -1: every shard the source has (all 1823 for FineWeb-Edu, 6543 for ClimbMix)
    source: str = ""  # directory or URL of a mirror; "" = $NANOCHAT_DATA, else Hugging Face
    retries: int = 5
    timeout_seconds: float = 120.0
    dataset: str = "fineweb-edu"  # the corpus: "fineweb-edu" or "climbmix" (see PRETRAIN_DATASETS)

    def validate(self) -> None:
        if self.dataset not in PRETRAIN_DATASETS:
            raise ConfigError(f"ShardsConfig.dataset must be one of {sorted(PRETRAIN_DATASETS)}, got {self.dataset!r}")
        if self.num_shards == 0 or self.num_shards < -1:
            raise ConfigError(f"ShardsConfig.num_shards must be -1 (all) or >= 1, got {self.num_shards}")
        if self.num_shards == 1:
            raise ConfigError("ShardsConfig.num_shards must be >= 2: the last shard is validation, the rest train")
        if self.retries < 1:
            raise ConfigError(f"ShardsConfig.retries must be >= 1, got {self.retries}")
        if not self.timeout_seconds > 0:  # also NaN
            raise ConfigError(f"ShardsConfig.timeout_seconds must be > 0, got {self.timeout_seconds}")


class TransientError(RuntimeError):
    """A fetch failure worth retrying (network, 5xx)."""


def shard_template(source: str, dataset: str = "fineweb-edu") -> str:
    """A format string with {index} giving the location of each shard of `dataset`."""
    ds = pretrain_dataset(dataset)
    source = source or os.environ.get(DATA_ENV, "").strip()
    if not source:
        if hf_offline():  # fail now, naming what is missing, rather than in (or after) a network timeout
            raise DataError(f"HF_HUB_OFFLINE is set and no mirror is given: cannot download the {ds.title} shards "
                            f"({ds.repo}); set {DATA_ENV} or ShardsConfig.source to a mirror with a "
                            f"{ds.mirror_dir}/ directory of shard_*.parquet files")
        return ds.shard_url
    if is_url(source):
        return source.rstrip("/") + f"/{ds.mirror_dir}/" + SHARD_NAME
    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"data source {source} is not a directory (expected a layout like ../shared/data)")
    if not (root / ds.mirror_dir).is_dir():
        raise DataError(f"data source {source} has no {ds.mirror_dir}/ directory of shard_*.parquet files "
                        f"({ds.title}, {ds.repo})")
    return str(root.resolve() / ds.mirror_dir / SHARD_NAME)


def count_available(template: str, dataset: str = "fineweb-edu") -> int:
    """How many shards the source has: local mirrors are listed (consecutive from shard 0, plus a pinned
    validation shard), the Hugging Face counts are known."""
    ds = pretrain_dataset(dataset)
    if template == ds.shard_url:
        return ds.num_shards
    if is_url(template):
        raise ConfigError("num_shards=-1 needs a listable source; give num_shards explicitly for a URL mirror")
    n = 0
    while n != ds.val_shard and Path(template.format(index=n)).is_file():
        n += 1
    return n if ds.val_shard is None else n + 1  # the pinned validation shard is fetched (or missed, by name) too


def shard_indices(ds: ShardDataset, n: int) -> list[int]:
    """The indices of the n shards to fetch, the validation shard last: 0..n-1, or 0..n-2 and the pinned one."""
    if ds.val_shard is None:
        return list(range(n))
    if n > ds.num_shards:
        raise DataError(f"{ds.title} ({ds.repo}) has {ds.num_shards} shards, fewer than the {n} asked for")
    return [*range(n - 1), ds.val_shard]


def check_shard(path: Path, source: str = "") -> int:
    """Rows in a valid shard; DataError otherwise, naming `source` (where a fetched copy came from) or the file."""
    label = f"shard {source or path}"
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise DataError(f"{label} is not a readable parquet file: {e}") from e
    check_text_column(pf.schema_arrow, label)
    if pf.metadata.num_rows == 0:
        raise DataError(f"{label} has no rows")
    return pf.metadata.num_rows


def _copy_to(location: str, tmp: Path, timeout: float) -> None:
    if not is_url(location):
        if not Path(location).is_file():
            raise DataError(f"shard not found: {location}")
        shutil.copyfile(location, tmp)
        return
    try:
        with urllib.request.urlopen(location, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise TransientError(f"{location}: HTTP {e.code}") from e
        raise DataError(f"cannot fetch {location}: HTTP {e.code}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise TransientError(f"{location}: {e}") from e


def fetch_shard(location: str, dest: Path, retries: int, timeout: float) -> None:
    """Fetch one shard to dest atomically, retrying transient errors."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    for attempt in range(retries):
        try:
            _copy_to(location, tmp, timeout)
            check_shard(tmp, source=location)  # errors name the source, not the temporary copy
            os.replace(tmp, dest)
            return
        except TransientError as e:
            tmp.unlink(missing_ok=True)
            if attempt == retries - 1:
                raise DataError(f"giving up on {location} after {retries} attempts: {e}") from e
            wait = 2**attempt
            print(f"transient error fetching {location} ({e}); retrying in {wait}s", flush=True)
            time.sleep(wait)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def download_shards(config: ShardsConfig, out_dir: str | Path) -> dict:
    """Fetch the shards into out_dir; returns the stage metrics."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = shard_template(config.source, config.dataset)
    n = config.num_shards if config.num_shards > 0 else count_available(template, config.dataset)
    if n < 2:
        raise DataError(f"the source {template.format(index=0)} has {n} shard(s); need at least 2 (train + val)")
    t0 = time.time()
    fetched = skipped = rows = 0
    for k, index in enumerate(shard_indices(pretrain_dataset(config.dataset), n)):
        dest = out / SHARD_NAME.format(index=index)
        if dest.is_file():
            try:
                rows += check_shard(dest)
                skipped += 1
                continue
            except DataError as e:
                print(f"replacing damaged shard: {e}", flush=True)
                dest.unlink()
        fetch_shard(template.format(index=index), dest, config.retries, config.timeout_seconds)
        rows += check_shard(dest)
        fetched += 1
        print(f"shard {k + 1}/{n}: {dest.name}", flush=True)
    print(f"{fetched} shard(s) fetched, {skipped} already present, {time.time() - t0:.1f}s", flush=True)
    # Only content facts go into the metrics (and so the manifest): a re-fetch of the same shards must
    # give the same digest, or every downstream stage would retrain for nothing.
    metrics = {"num_shards": n, "documents": rows}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {**metrics, "fetched": fetched, "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for the shards")
    add_config_arguments(parser, ShardsConfig)
    args = parser.parse_args(argv)
    try:
        metrics = download_shards(config_from_args(ShardsConfig, args), args.out)
    except (ConfigError, DataError) as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
