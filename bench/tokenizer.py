"""Benchmark BPE training and encoding: our rustbpe vs the upstream PyPI `rustbpe` wheel vs HF `tokenizers`.

Every trainer runs in its own subprocess on the same text (the tokenizer stage's documents: train shards,
each document cropped to --doc-cap chars, at most --max-chars in total), with the same split pattern and
thread count. For each it reports the wall time of the train call, chars/s, the peak RSS of the worker
process (its VmHWM: getrusage/wait4 would report the parent's RSS at fork time when that is larger) and the
memory the training itself added (peak RSS during training minus RSS before it), and the ratios against
upstream. Ours and upstream must produce byte-identical ranks (checked). Then encoding
throughput on the same ranks: our batch_encode, tiktoken's encode_ordinary_batch and HF `tokenizers`'
encode_batch.

    python bench/tokenizer.py [--corpus DIR] [--vocab 32768 65536] [--threads 2]

The upstream wheel has the same import name as ours: install it into its own directory
(`uv pip install --target .venv/upstream-rustbpe rustbpe`); its worker runs with that directory first on
sys.path. Timings are noisy on a shared machine: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_UPSTREAM = REPO / ".venv" / "upstream-rustbpe"
TRAINERS = ["ours", "upstream", "hf"]


# ---------------------------------------------------------------------------------------------
# the worker: one trainer, one vocab size, in its own process


def load_texts(corpus: Path, max_chars: int, doc_cap: int) -> list[str]:
    from nanochat_core.data.sources import find_shards
    from nanochat_core.tok_train import training_texts

    return list(training_texts(find_shards(corpus)[:-1], max_chars, doc_cap, {}))


def rss_kib(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0), so the peak covers training only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def train_hf(texts: list[str], vocab_size: int, pattern: str) -> list[bytes]:
    """HF tokenizers' BPE trainer with the same split, byte-level (as nanochat's HuggingFaceTokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return tok


def hf_tokens(tok) -> list[bytes]:
    decode = {c: b for b, c in byte_level_alphabet().items()}
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return [bytes(decode[c] for c in token) for token, _ in vocab]


def worker(args: argparse.Namespace) -> None:
    vocab = args.vocab[0]
    texts = load_texts(args.corpus, args.max_chars, args.doc_cap)
    from nanochat_core.tokenizer import SPLIT_PATTERN

    if args.trainer in ("ours", "upstream"):
        import rustbpe

        origin = Path(rustbpe.__file__).resolve()
        if (args.trainer == "upstream") != origin.is_relative_to(args.upstream.resolve()):
            raise SystemExit(f"{args.trainer}: imported the wrong rustbpe ({origin})")
    before, loading_peak = rss_kib("VmRSS"), rss_kib("VmHWM")
    reset_peak_rss()
    t0 = time.perf_counter()
    if args.trainer == "hf":
        tok = train_hf(texts, vocab, SPLIT_PATTERN)
    else:
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab, pattern=SPLIT_PATTERN)
    wall = time.perf_counter() - t0
    tokens = hf_tokens(tok) if args.trainer == "hf" else [token for token, _ in tok.get_mergeable_ranks()]
    result = {
        "trainer": args.trainer, "vocab": vocab, "wall": wall, "chars": sum(map(len, texts)),
        "train_rss_kib": rss_kib("VmHWM") - before, "peak_rss_kib": max(loading_peak, rss_kib("VmHWM")),
        "num_tokens": len(tokens),
        "tokens": [base64.b64encode(t).decode() for t in tokens],
    }
    Path(args.result).write_text(json.dumps(result))


def run_worker(args: argparse.Namespace, trainer: str, vocab: int) -> dict:
    """Run one trainer in a subprocess."""
    # pyarrow's default pool (mimalloc) keeps 50-80 MiB of freed buffers around, differently each run:
    # the system allocator makes the RSS before training steady, so peaks compare across processes.
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads), "RAYON_RS_NUM_CPUS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(REPO), "ARROW_DEFAULT_MEMORY_POOL": "system"}
    if trainer == "upstream":
        env["PYTHONPATH"] = os.pathsep.join([str(args.upstream), str(REPO)])
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--worker", trainer, "--vocab", str(vocab), "--result", out.name,
               "--corpus", str(args.corpus), "--max-chars", str(args.max_chars), "--doc-cap", str(args.doc_cap),
               "--upstream", str(args.upstream)]
        code = subprocess.run(cmd, env=env).returncode
        if code != 0:
            raise SystemExit(f"{trainer} worker failed (exit {code})")
        return json.loads(Path(out.name).read_text())


# ---------------------------------------------------------------------------------------------
# encoding


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char map (what HF's ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def merge_pairs(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each token (rank >= 256): BPE-encode its bytes with the lower ranks only."""
    pairs = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if rank < 256:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        pairs.append((parts[0], parts[1]))
    return pairs


def hf_from_ranks(ranks: dict[bytes, int], pattern: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = byte_level_alphabet()
    show = lambda b: "".join(alphabet[x] for x in b)
    vocab = {show(token): rank for token, rank in ranks.items()}
    merges = [(show(a), show(b)) for a, b in merge_pairs(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def timed(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_encoding(args: argparse.Namespace, vocab: int, ours_tokens: list[bytes]) -> list[dict]:
    import tiktoken

    import rustbpe
    from nanochat_core.tokenizer import SPLIT_PATTERN

    texts = load_texts(args.corpus, args.max_chars, args.doc_cap)
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab, pattern=SPLIT_PATTERN)
    ranks = dict(tok.get_mergeable_ranks())
    assert sorted(ranks, key=ranks.get) == ours_tokens, "in-process training differs from the worker's"
    enc = tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    hf = hf_from_ranks(ranks, SPLIT_PATTERN)
    hf_encode = lambda: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    runs = [
        ("ours batch_encode", lambda: tok.batch_encode(texts)),
        ("tiktoken encode_ordinary_batch", lambda: enc.encode_ordinary_batch(texts, num_threads=args.threads)),
        ("hf tokenizers encode_batch", hf_encode),
    ]
    chars = sum(map(len, texts))
    rows, reference = [], None
    for name, fn in runs:
        wall, ids = timed(fn, args.repeat)
        reference = reference if reference is not None else ids
        same = sum(a == b for a, b in zip(ids, reference, strict=True)) / len(texts)
        rows.append({"encoder": name, "wall": wall, "chars_per_s": chars / wall, "same_ids": same,
                     "tokens": sum(map(len, ids))})
    if rows[1]["same_ids"] != 1.0:
        raise SystemExit("our batch_encode and tiktoken disagree on the same ranks")
    return rows


# ---------------------------------------------------------------------------------------------
# report


def print_training(vocab: int, results: dict[str, dict]) -> None:
    up = results.get("upstream")
    print(f"\n## training, vocab {vocab}, {results['ours']['chars']:,} chars\n")
    print("| trainer | wall s | Mchar/s | peak RSS MiB | train RSS MiB | speed vs upstream | train RSS vs upstream |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        speed = f"{up['wall'] / r['wall']:.2f}x" if up else "-"
        rss = f"{r['train_rss_kib'] / max(up['train_rss_kib'], 1):.2f}x" if up else "-"
        print(f"| {name} | {r['wall']:.3f} | {r['chars'] / r['wall'] / 1e6:.2f} | {r['peak_rss_kib'] / 1024:.0f} "
              f"| {r['train_rss_kib'] / 1024:.0f} | {speed} | {rss} |")
    if up:
        same = results["ours"]["tokens"] == up["tokens"]
        print(f"\nours == upstream ranks (byte for byte, {up['num_tokens']} tokens): {same}")
        if not same:
            raise SystemExit("ranks differ from upstream")


def print_encoding(vocab: int, rows: list[dict]) -> None:
    tiktoken_speed = rows[1]["chars_per_s"]
    print(f"\n## encoding, vocab {vocab} (same ranks; ids equal to ours: fraction of documents)\n")
    print("| encoder | wall s | Mchar/s | vs tiktoken | tokens | same ids |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['wall']:.3f} | {r['chars_per_s'] / 1e6:.2f} "
              f"| {r['chars_per_s'] / tiktoken_speed:.2f}x | {r['tokens']:,} | {r['same_ids']:.4f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from nanochat_core.tok_train import TokenizerConfig

    data = Path(os.environ.get("NANOCHAT_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=data / "pretrain", help="shard_*.parquet dir (last = val)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536], help="vocab sizes (256 + merges)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-chars", type=int, default=TokenizerConfig.max_chars)
    parser.add_argument("--doc-cap", type=int, default=TokenizerConfig.doc_cap)
    parser.add_argument("--trainers", nargs="+", default=TRAINERS, choices=TRAINERS)
    parser.add_argument("--upstream", type=Path, default=DEFAULT_UPSTREAM, help="dir holding the upstream wheel")
    parser.add_argument("--repeat", type=int, default=3, help="encoding: best of this many runs")
    parser.add_argument("--no-encode", action="store_true")
    parser.add_argument("--worker", choices=TRAINERS, dest="trainer", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trainer:
        return worker(args)
    if "upstream" in args.trainers and not (args.upstream / "rustbpe").is_dir():
        raise SystemExit(f"upstream wheel not found in {args.upstream}: "
                         f"uv pip install --target {args.upstream} rustbpe")
    print(f"threads {args.threads}, corpus {args.corpus}, doc_cap {args.doc_cap}, max_chars {args.max_chars}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    for vocab in args.vocab:
        results = {trainer: run_worker(args, trainer, vocab) for trainer in args.trainers}
        print_training(vocab, results)
        if not args.no_encode and "ours" in results:
            ours_tokens = [base64.b64decode(t) for t in results["ours"]["tokens"]]
            print_encoding(vocab, bench_encoding(args, vocab, ours_tokens))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
