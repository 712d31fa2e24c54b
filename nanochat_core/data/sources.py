"""Where data comes from: the NANOCHAT_DATA mirror (a directory or http(s) URL laid out like
../shared/data), or, when it is unset, the real Hugging Face datasets.

Every dataset is named by its path inside the mirror layout (e.g. "gsm8k/train.jsonl"). `resolve` maps
that name to a local path or URL; `read_records` reads jsonl, jsonl.gz or parquet into a list of dicts.
The pretraining corpora (PRETRAIN_DATASETS: FineWeb-Edu, NVIDIA ClimbMix) are shard sets: on Hugging Face as
shard_{index:05d}.parquet, in a mirror under their own directory (pretrain/ holds FineWeb-Edu's stand-in).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat_core.errors import UserError

DATA_ENV = "NANOCHAT_DATA"
HF = "https://huggingface.co/datasets"


@dataclass(frozen=True)
class ShardDataset:
    """A pretraining corpus in nanochat's shard layout: parquet files shard_{index:05d}.parquet with a `text` column,
    in the Hugging Face dataset `repo`, and in a NANOCHAT_DATA mirror under `mirror_dir/`."""
    title: str
    repo: str
    num_shards: int
    mirror_dir: str
    val_shard: int | None = None  # the validation shard, pinned whatever the number fetched; None: the last fetched

    @property
    def shard_url(self) -> str:
        """A format string with {index} giving each shard's URL."""
        return f"{HF}/{self.repo}/resolve/main/shard_{{index:05d}}.parquet"


PRETRAIN_DATASETS: dict[str, ShardDataset] = {
    "fineweb-edu": ShardDataset("FineWeb-Edu", "karpathy/fineweb-edu-100b-shuffle", 1823, "pretrain"),
    # As upstream's nanochat/dataset.py has it since the switch to ClimbMix (March 2026): BASE_URL
    # https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main, files shard_{index:05d}.parquet,
    # MAX_SHARD = 6542, and the validation shard always fetched and pinned to the last one, shard_06542.
    "climbmix": ShardDataset("NVIDIA ClimbMix", "karpathy/climbmix-400b-shuffle", 6543, "climbmix", val_shard=6542),
}
FINEWEB_SHARD_URL = PRETRAIN_DATASETS["fineweb-edu"].shard_url
FINEWEB_NUM_SHARDS = PRETRAIN_DATASETS["fineweb-edu"].num_shards
TEXT_TYPES = ("string", "large_string", "string_view")  # arrow types whose values are str

# Mirror path -> real source. The HF files keep the same schema as the mirror's, possibly another format.
HF_SOURCES: dict[str, str] = {
    "arc/ARC-Easy/train.parquet": f"{HF}/allenai/ai2_arc/resolve/main/ARC-Easy/train-00000-of-00001.parquet",
    "arc/ARC-Easy/validation.parquet": f"{HF}/allenai/ai2_arc/resolve/main/ARC-Easy/validation-00000-of-00001.parquet",
    "arc/ARC-Easy/test.parquet": f"{HF}/allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet",
    "arc/ARC-Challenge/train.parquet": f"{HF}/allenai/ai2_arc/resolve/main/ARC-Challenge/train-00000-of-00001.parquet",
    "arc/ARC-Challenge/validation.parquet": (
        f"{HF}/allenai/ai2_arc/resolve/main/ARC-Challenge/validation-00000-of-00001.parquet"
    ),
    "arc/ARC-Challenge/test.parquet": f"{HF}/allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet",
    "mmlu/all/test.parquet": f"{HF}/cais/mmlu/resolve/main/all/test-00000-of-00001.parquet",
    "mmlu/all/dev.parquet": f"{HF}/cais/mmlu/resolve/main/all/dev-00000-of-00001.parquet",
    "mmlu/all/validation.parquet": f"{HF}/cais/mmlu/resolve/main/all/validation-00000-of-00001.parquet",
    "mmlu/auxiliary_train/train.parquet": (
        f"{HF}/cais/mmlu/resolve/main/auxiliary_train/train-00000-of-00001.parquet"
    ),
    "gsm8k/train.jsonl": f"{HF}/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet",
    "gsm8k/test.jsonl": f"{HF}/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet",
    "humaneval/HumanEval.jsonl.gz": (
        f"{HF}/openai/openai_humaneval/resolve/main/openai_humaneval/test-00000-of-00001.parquet"
    ),
}
# Conversation data for SFT / midtraining: the mirror's sft/*.jsonl, or SmolTalk.
HF_SFT_SOURCES = [f"{HF}/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00000-of-00001.parquet"]
# upstream's identity conversations (who the model is), ~1K rows; not on Hugging Face
IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


class DataError(UserError, RuntimeError):
    """Data is missing or malformed; the message names the file."""


def pretrain_dataset(name: str) -> ShardDataset:
    if name not in PRETRAIN_DATASETS:
        raise ValueError(f"unknown pretraining dataset {name!r}; choose one of {sorted(PRETRAIN_DATASETS)}")
    return PRETRAIN_DATASETS[name]


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for nothing to be fetched from Hugging Face (its truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def data_root() -> str | None:
    root = os.environ.get(DATA_ENV, "").strip()
    if not root:
        return None
    if root.startswith(("http://", "https://")):
        return root.rstrip("/")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{DATA_ENV}={root} is not a directory (expected a layout like ../shared/data)")
    return str(path.resolve())


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def resolve(name: str) -> str:
    """Local path or URL of a dataset file named by its mirror path."""
    root = data_root()
    if root is not None:
        return f"{root}/{name}" if is_url(root) else str(Path(root) / name)
    if name in HF_SOURCES:
        return HF_SOURCES[name]
    raise DataError(f"no default source for {name!r}: set {DATA_ENV} to a mirror directory or URL")


def list_mirror(prefix: str, suffix: str) -> list[str]:
    """Mirror paths under `prefix` ending in `suffix` (local mirrors only; URLs cannot be listed)."""
    root = data_root()
    if root is None or is_url(root):
        return []
    base = Path(root) / prefix
    return sorted(f"{prefix}/{p.name}" for p in base.glob(f"*{suffix}")) if base.is_dir() else []


def sft_sources() -> list[str]:
    """Locations of the conversation files (`{"messages": [...]}` rows)."""
    root = data_root()
    if root is None:
        return list(HF_SFT_SOURCES)
    names = list_mirror("sft", ".jsonl")
    if not names and is_url(root):
        raise DataError(f"{DATA_ENV} is a URL; list sft files explicitly (cannot list {root}/sft/)")
    if not names:
        raise DataError(f"no conversation files in {root}/sft/ (expected *.jsonl)")
    return [resolve(n) for n in names]


def read_bytes(location: str) -> bytes:
    if is_url(location):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(location, timeout=60) as r:
                return r.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            hint = "" if data_root() else f" (set {DATA_ENV} to an offline mirror such as ../shared/data)"
            raise DataError(f"cannot fetch {location}: {e}{hint}") from e
    try:
        return Path(location).read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"data file not found: {location}") from e


def decode_utf8(data: bytes, location: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{location}:{lineno} is not valid UTF-8 (byte {data[e.start]:#04x})") from e


def read_records(location: str, lists_allowed: bool = False) -> list[Any]:
    """Rows of a jsonl, jsonl.gz or parquet file as dicts (or, with lists_allowed, a jsonl line may be a JSON
    list), with a DataError naming the file, and for jsonl the line, on malformed input."""
    data = read_bytes(location)
    if location.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
            raise DataError(f"{location} is not a readable parquet file: {e}") from e
    if location.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{location} is not a readable gzip file: {e}") from e
    row_types = (dict, list) if lists_allowed else dict
    rows = []
    for lineno, line in enumerate(decode_utf8(data, location).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{location}:{lineno} is not valid JSON: {e}") from e
        if not isinstance(row, row_types):
            raise DataError(f"{location}:{lineno} is not a JSON object (got {type(row).__name__}: {line[:60]})")
        rows.append(row)
    return rows


def read_dataset(name: str) -> list[dict[str, Any]]:
    return read_records(resolve(name))


def find_shards(shards_dir: str | Path) -> list[Path]:
    """The shard files in order (the last one is validation)."""
    shards_dir = Path(shards_dir)
    if not shards_dir.is_dir():
        raise DataError(f"shards directory {shards_dir} does not exist")
    paths = sorted(shards_dir.glob("shard_*.parquet"))
    if len(paths) < 2:
        raise DataError(f"{shards_dir} holds {len(paths)} shard_*.parquet file(s); need at least 2 (train + val)")
    return paths


def check_text_column(schema: Any, location: str | Path) -> None:
    """DataError naming the file unless the arrow `schema` has a `text` column of strings (a binary column
    reads as bytes, which the tokenizer cannot train on)."""
    if "text" not in schema.names:
        raise DataError(f"{location} has no 'text' column (columns: {schema.names})")
    kind = schema.field("text").type
    value_kind = getattr(kind, "value_type", kind)  # a dictionary-encoded column holds its values' type
    if str(value_kind) not in TEXT_TYPES:
        raise DataError(f"{location}: the 'text' column has type {kind}, expected string (utf8 text)")


def iter_documents(path: Path) -> Iterator[str]:
    """The `text` column of a parquet shard, one row group at a time."""
    import pyarrow.parquet as pq  # here: most users of this module never read a shard

    try:
        pf = pq.ParquetFile(path)
        check_text_column(pf.schema_arrow, path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet shard {path}: {e}") from e
