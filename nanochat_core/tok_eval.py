"""Tokenizer evaluation: compression (UTF-8 bytes per token) of our tokenizer against GPT-2 and GPT-4, per domain.

The text is the validation shard (never trained on), grouped by its `source` column (one domain, "all", when
a shard has none). GPT-2's and GPT-4's ranks come from the data mirror (`tiktoken/vocab.bpe` + `encoder.json`,
`tiktoken/cl100k_base.tiktoken`), loaded with tiktoken's own loaders, offline. The tokenizer stage writes the
table to `tok_eval.md` in its output directory; `python -m nanochat_core.tok_eval --tokenizer DIR --shards DIR`
prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import tiktoken
import tiktoken.load

from nanochat_core.data.sources import DataError, is_url, read_bytes, resolve
from nanochat_core.fileio import atomic_write_bytes

# tiktoken's split patterns for r50k (GPT-2) and cl100k (GPT-4)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""  # noqa: E501
REFERENCE_FILES = {"gpt2": ["tiktoken/vocab.bpe", "tiktoken/encoder.json"], "gpt4": ["tiktoken/cl100k_base.tiktoken"]}
REPORT_FILE = "tok_eval.md"
TOTAL = "total"

Encoder = Callable[[list[str]], list[list[int]]]


def _local_files(names: list[str], tmp: Path) -> list[str]:
    """Local paths of mirror files (a URL mirror is fetched into tmp first)."""
    paths = []
    for name in names:
        location = resolve(name)
        if is_url(location):
            path = tmp / Path(name).name
            path.write_bytes(read_bytes(location))
            location = str(path)
        elif not Path(location).is_file():
            raise DataError(f"reference tokenizer file not found: {location}")
        paths.append(location)
    return paths


@contextmanager
def _tiktoken_cache_off() -> Iterator[None]:
    """tiktoken's loaders would copy each file into /tmp/data-gym-cache, keyed by its path (so a changed file
    at the same path would be read stale). An empty TIKTOKEN_CACHE_DIR turns that off."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def reference_encodings() -> dict[str, tiktoken.Encoding]:
    """GPT-2 (r50k) and GPT-4 (cl100k) encodings built from the mirror's rank files, without the internet."""
    with tempfile.TemporaryDirectory() as tmp, _tiktoken_cache_off():
        vocab_bpe, encoder_json = _local_files(REFERENCE_FILES["gpt2"], Path(tmp))
        (cl100k,) = _local_files(REFERENCE_FILES["gpt4"], Path(tmp))
        gpt2_ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
        gpt4_ranks = tiktoken.load.load_tiktoken_bpe(cl100k)
    return {
        "gpt2": tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=gpt2_ranks,
                                  special_tokens={"<|endoftext|>": len(gpt2_ranks)}),
        "gpt4": tiktoken.Encoding("cl100k_base", pat_str=GPT4_PATTERN, mergeable_ranks=gpt4_ranks,
                                  special_tokens={"<|endoftext|>": len(gpt4_ranks) + 1}),
    }


def domain_documents(shard: Path, max_chars: int) -> dict[str, list[str]]:
    """The shard's documents in order, up to about max_chars in all, grouped by `source` ("all" if none)."""
    try:
        pf = pq.ParquetFile(shard)
        columns = [c for c in ("text", "source") if c in pf.schema_arrow.names]
        if "text" not in columns:
            raise DataError(f"{shard} has no 'text' column (columns: {pf.schema_arrow.names})")
        domains: dict[str, list[str]] = {}
        chars = 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=columns)
            sources = table.column("source").to_pylist() if "source" in columns else ["all"] * table.num_rows
            for text, source in zip(table.column("text").to_pylist(), sources, strict=True):
                domains.setdefault(str(source), []).append(text or "")
                chars += len(text or "")
                if chars >= max_chars:
                    return domains
        return domains
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read parquet shard {shard}: {e}") from e


def compression_rows(encoders: dict[str, Encoder], domains: dict[str, list[str]]) -> list[dict]:
    """One row per domain and a total row: UTF-8 bytes, then tokens and bytes/token per encoder."""
    rows = []
    for domain, texts in sorted(domains.items()):
        row = {"domain": domain, "docs": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts)}
        for name, encode in encoders.items():
            row[f"{name}_tokens"] = sum(map(len, encode(texts)))
        rows.append(row)
    total = {"domain": TOTAL, **{k: sum(r[k] for r in rows) for k in rows[0] if k != "domain"}} if rows else None
    for row in rows + ([total] if total else []):
        for name in encoders:
            tokens = row[f"{name}_tokens"]
            row[f"{name}_bytes_per_token"] = row["bytes"] / tokens if tokens else float("nan")
    return rows + ([total] if total else [])


def markdown(rows: list[dict], names: list[str], title: str) -> str:
    """The table, with our token count relative to each reference (negative = we need fewer tokens)."""
    refs = [n for n in names if n != "ours"]
    head = ["domain", "docs", "bytes"] + [f"{n} bytes/token" for n in names] + [f"ours vs {r} tokens" for r in refs]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [row["domain"], f"{row['docs']:,}", f"{row['bytes']:,}"]
        cells += [f"{row[f'{n}_bytes_per_token']:.3f}" for n in names]
        cells += [f"{100 * (row['ours_tokens'] / row[f'{r}_tokens'] - 1):+.1f}%" for r in refs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(tokenizer, val_shard: Path, out_dir: Path | None, max_chars: int) -> dict:
    """Compare `tokenizer` (a nanochat_core.tokenizer.Tokenizer) with GPT-2 and GPT-4 on the val shard;
    write tok_eval.md into out_dir (if given). Returns flat summary metrics over all domains."""
    encoders: dict[str, Encoder] = {"ours": tokenizer.encode}
    note = ""
    try:
        for name, enc in reference_encodings().items():
            encoders[name] = lambda texts, enc=enc: enc.encode_ordinary_batch(texts, num_threads=2)
    except (DataError, OSError, ValueError) as e:  # the comparison is optional, our own numbers are not
        note = f"\nGPT-2/GPT-4 ranks unavailable ({e}); only our tokenizer is listed.\n"
    domains = domain_documents(val_shard, max_chars)
    rows = compression_rows(encoders, domains)
    if not rows or rows[-1]["ours_tokens"] == 0:
        raise DataError(f"validation shard {val_shard} holds no text")
    title = f"Tokenizer evaluation: UTF-8 bytes per token (vocab {tokenizer.get_vocab_size():,}, {val_shard.name})"
    if out_dir is not None:
        atomic_write_bytes(Path(out_dir) / REPORT_FILE, (markdown(rows, list(encoders), title) + note).encode())
    total = rows[-1]
    metrics = {f"{name}_bytes_per_token" if name != "ours" else "bytes_per_token":
               round(total[f"{name}_bytes_per_token"], 4) for name in encoders}
    metrics |= {f"vs_{name}_tokens_pct": round(100 * (total["ours_tokens"] / total[f"{name}_tokens"] - 1), 2)
                for name in encoders if name != "ours"}
    return metrics


def main(argv: list[str] | None = None) -> None:
    from nanochat_core.data.sources import find_shards
    from nanochat_core.tok_train import VAL_EVAL_CHARS
    from nanochat_core.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (Tokenizer.save)")
    parser.add_argument("--shards", required=True, help="shards directory (the last shard is validation)")
    parser.add_argument("--max-chars", type=int, default=VAL_EVAL_CHARS)
    args = parser.parse_args(argv)
    try:
        tokenizer = Tokenizer.load(args.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            metrics = evaluate(tokenizer, find_shards(args.shards)[-1], Path(tmp), args.max_chars)
            print((Path(tmp) / REPORT_FILE).read_text())
    except (DataError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
