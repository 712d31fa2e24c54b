"""Benchmark the chat server: tokens/s and latency for 1, 4, 8 and 16 concurrent streaming clients.

    python bench/serve.py                                    # a random d4 model on this machine's device
    python bench/serve.py --model DIR --tokenizer DIR        # a real checkpoint
    python bench/serve.py --depth 8 --clients 1,4,8,16 --requests 3 --max-tokens 128 --repeats 3

The server runs as its own process (`python -m nanochat_core.serve` on 127.0.0.1, as in production), so
the clients here do not share its GIL. For each level, that many clients each send --requests streaming
requests to /v1/chat/completions back to back (temperature 1, a fixed max_tokens, usage in the stream).
Per level it reports aggregate completion tokens/s (all clients' tokens / the level's wall time), tokens/s
per client, and p50/p99 of request latency and of time to first token. The target of the serving issue is
8 clients >= 4x the tokens/s of 1 client on the same machine, which only batching can give: with --repeats
the levels run several times (in alternating order, so a drift in the machine's load evens out) and the
ratio is reported as median and range. Without --tokenizer, one with --vocab tokens is trained on a shard of
$NANOCHAT_DATA (default ../shared/data). The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanochat_core.checkpoint import save_final_model  # noqa: E402
from nanochat_core.gpt import GPT, config_for_depth  # noqa: E402
from nanochat_core.tok_train import train_bpe  # noqa: E402
from nanochat_core.tokenizer import Tokenizer  # noqa: E402

TOPICS = ["the sea", "a city at night", "how bread is made", "the history of maps", "a cat", "rain", "mountains",
          "trains", "the moon", "coffee", "music", "a library", "winter", "bees", "a bridge", "the desert"]


# -----------------------------------------------------------------------------
# the server under test

def train_tokenizer(out: Path, vocab: int) -> Path:
    import pyarrow.parquet as pq

    data = Path(os.environ.get("NANOCHAT_DATA", REPO.parent / "shared" / "data"))
    table = pq.read_table(data / "pretrain" / "shard_00000.parquet", columns=["text"])
    texts, chars = [], 0
    for text in table.column("text").to_pylist():
        texts.append(text)
        chars += len(text)
        if chars >= 1_000_000:
            break
    train_bpe(texts, vocab_size=vocab).save(out)
    return out


def random_model(out: Path, tokenizer_dir: Path, depth: int, seq_len: int) -> Path:
    vocab = Tokenizer.load(tokenizer_dir).get_vocab_size()
    torch.manual_seed(0)
    model = GPT(config_for_depth(depth, vocab, seq_len))  # PyTorch's default init: varied, rarely-stopping text
    save_final_model(out, model, {"model_config": model.config.to_dict(), "step": 0})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model_dir: Path, tokenizer_dir: Path, args, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "nanochat_core.serve", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir),
           "--port", str(port), "--max-batch", str(args.max_batch), "--num-replicas", str(args.num_replicas)]
    if args.device:
        cmd += ["--device-type", args.device]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                           "NANOCHAT_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"the server did not start; see {log}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -----------------------------------------------------------------------------
# the clients

class Connection:
    """One keep-alive HTTP/1.1 connection over asyncio streams: a client far lighter than httpx's streaming, so
    that at 8 or 16 clients the bench process (which shares the machine with the server) costs little CPU per
    token. It still reads every byte of every reply and parses every SSE event as JSON."""

    def __init__(self, url: str):
        self.host, self.port = httpx.URL(url).host, httpx.URL(url).port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """POST body; yields the response's SSE events (the text after "data: "), as they arrive."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                          f"\r\nAccept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        reader = self.reader
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        if "chunked" not in headers.get("transfer-encoding", ""):  # an error: a plain body
            text = (await reader.readexactly(int(headers.get("content-length", 0)))).decode()
            raise RuntimeError(f"HTTP {status}: {text[:500]}")
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        buffer = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            buffer += data[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if event.startswith(b"data: "):
                    yield event[6:]
        if headers.get("connection", "").lower() == "close":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def one_request(conn: Connection, topic: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"Write a few paragraphs about {topic}."}],
            "max_tokens": max_tokens, "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    started, first, tokens, chars = time.perf_counter(), None, 0, 0
    async for event in conn.post_stream("/v1/chat/completions", body):
        if event == b"[DONE]":
            continue
        chunk = json.loads(event)
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and (content := chunk["choices"][0]["delta"].get("content")):
            chars += len(content)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if tokens and not chars:
        raise RuntimeError("a reply with tokens but no text")
    return {"latency": end - started, "ttft": (first or end) - started, "tokens": tokens}


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    async def client_loop(c: int) -> list[dict]:
        conn = Connection(url)
        try:
            return [await one_request(conn, TOPICS[(c + i) % len(TOPICS)], max_tokens) for i in range(requests)]
        finally:
            conn.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - started
    done = [r for rs in results for r in rs]
    tokens = sum(r["tokens"] for r in done)
    return {"clients": clients, "requests": len(done), "tokens": tokens, "wall_s": round(wall, 3),
            "tok_per_s": round(tokens / wall, 1), "tok_per_s_per_client": round(tokens / wall / clients, 1),
            "latency_p50_s": round(quantile([r["latency"] for r in done], 0.5), 3),
            "latency_p99_s": round(quantile([r["latency"] for r in done], 0.99), 3),
            "ttft_p50_s": round(quantile([r["ttft"] for r in done], 0.5), 4),
            "ttft_p99_s": round(quantile([r["ttft"] for r in done], 0.99), 4)}


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


# -----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (model.pt + meta.json); default: a random model")
    parser.add_argument("--tokenizer", help="tokenizer directory; default: train one (--vocab)")
    parser.add_argument("--depth", type=int, default=4, help="depth of the random model")
    parser.add_argument("--seq-len", type=int, default=1024, help="context of the random model")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary of the tokenizer trained here")
    parser.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None, help="default: the server's choice")
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=3, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="run all levels this many times")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    parser.add_argument("--num-replicas", type=int, default=0, help="server --num-replicas (0: one per GPU)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        tokenizer_dir = Path(args.tokenizer) if args.tokenizer else train_tokenizer(tmp / "tokenizer", args.vocab)
        model_dir = Path(args.model) if args.model else random_model(tmp / "model", tokenizer_dir, args.depth,
                                                                     args.seq_len)
        with server(model_dir, tokenizer_dir, args, tmp / "server.log") as url:
            health = httpx.get(f"{url}/health").json()
            print(f"server: {health['model']} on {health['device']} ({health['replicas']} replica(s)), "
                  f"max_batch {args.max_batch}, {args.max_tokens} tokens per request, {args.requests} requests "
                  f"per client, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}", flush=True)
            asyncio.run(run_level(url, 1, 1, 8))  # warm-up
            runs = []
            for repeat in range(args.repeats):
                order = levels if repeat % 2 == 0 else levels[::-1]
                rows = sorted((asyncio.run(run_level(url, c, args.requests, args.max_tokens)) for c in order),
                              key=lambda r: levels.index(r["clients"]))
                runs.append(rows)
                print(f"\nrun {repeat + 1}/{args.repeats}")
                print(f"{'clients':>7} {'tok/s':>9} {'tok/s/client':>12} {'p50 s':>7} {'p99 s':>7} "
                      f"{'ttft p50':>9} {'ttft p99':>9}")
                for r in rows:
                    print(f"{r['clients']:>7} {r['tok_per_s']:>9.1f} {r['tok_per_s_per_client']:>12.1f} "
                          f"{r['latency_p50_s']:>7.3f} {r['latency_p99_s']:>7.3f} {r['ttft_p50_s']:>9.4f} "
                          f"{r['ttft_p99_s']:>9.4f}", flush=True)
            stats = httpx.get(f"{url}/stats").json()
    summary = {"model": health["model"], "device": health["device"], "levels": runs, "server_stats": {
        k: stats[k] for k in ("requests_total", "tokens_generated", "decode_steps")}}
    if 1 in levels and 8 in levels:
        ratios = [next(r["tok_per_s"] for r in rows if r["clients"] == 8) /
                  next(r["tok_per_s"] for r in rows if r["clients"] == 1) for rows in runs]
        summary["ratio_8_vs_1"] = {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
                                   "max": round(max(ratios), 2), "runs": len(ratios)}
        verdict = "meets" if statistics.median(ratios) >= 4 else "misses"
        print(f"\n8 clients vs 1: {statistics.median(ratios):.2f}x aggregate tokens/s (median of {len(ratios)} run(s), "
              f"range {min(ratios):.2f}-{max(ratios):.2f}); {verdict} the >= 4x target")
    print(f"mean batch in the server: {stats['tokens_generated'] / max(stats['decode_steps'], 1):.2f} rows per step")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
