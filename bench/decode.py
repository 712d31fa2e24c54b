"""Benchmark the serving engine's decode step alone (no HTTP): ms per step and tokens/s by batch size.

    python bench/decode.py                                   # random d4 model, this machine's device
    python bench/decode.py --depth 12 --device cuda --batches 1,8,32 --profile
    python bench/decode.py --depth 12 --device cuda --graphs        # eager steps vs CUDA-graph replays

For each batch size B, B rows are prefilled with a --prompt-token prompt into the server's slot cache, then
--steps decode steps run as the server runs them (batching.decode + sample_rows at temperature 1, top-k 50),
timed after --warmup untimed steps. It prints ms/step, tokens/s and each batch's tokens/s as a ratio to
batch 1: the ceiling on what continuous batching can give the chat server on this device. --profile adds
torch.profiler's table of the batch-1 step (where a single user's token time goes). --graphs (CUDA) runs
every batch size again through batching.GraphDecoder, the server's default on CUDA, and prints its speedup
and the largest logit difference from the eager step on the same inputs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat_core.device import autocast_context  # noqa: E402
from nanochat_core.gpt import GPT, config_for_depth  # noqa: E402
from nanochat_core.serve.batching import GraphDecoder, SlotCache, decode, prefill, sample_rows  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_step(decoder, last: list[int], positions: list[int], rng: random.Random) -> list[int]:
    logits = decoder(last, positions)
    B = len(last)
    return sample_rows(logits, [1.0] * B, [50] * B, [None] * B, [rng.random() for _ in range(B)])


def prefilled(model, batch: int, args) -> tuple[SlotCache, list[int]]:
    """A slot cache with `batch` rows prefilled with the same random prompt, and each row's next token."""
    rng = random.Random(0)
    cache = SlotCache(model.config, batch)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(args.prompt_tokens)]
    return cache, [int(prefill(model, cache, slot, prompt).argmax(dim=-1)) for slot in range(batch)]


def eager(model, cache: SlotCache):
    return lambda last, positions: decode(model, cache, last, positions)


def time_batch(model, batch: int, args, device: torch.device, graphs: bool = False) -> float:
    """Seconds per decode step at this batch size (prefill excluded)."""
    rng = random.Random(0)
    cache, last = prefilled(model, batch, args)
    decoder = GraphDecoder(model, cache, batch) if graphs else eager(model, cache)
    positions = [args.prompt_tokens] * batch
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        last = decode_step(decoder, last, positions, rng)
        positions = [p + 1 for p in positions]
    sync(device)
    return (time.perf_counter() - t0) / args.steps


def graph_error(model, batch: int, args) -> float:
    """Largest |logit| difference between an eager step and a graph replay on the same cache and inputs."""
    cache, last = prefilled(model, batch, args)
    positions = [args.prompt_tokens] * batch
    expected = decode(model, cache, last, positions).float()
    got = GraphDecoder(model, cache, batch)(last, positions).float()  # rewrites the same cache entries
    return (got - expected).abs().max().item()


def profile_batch_one(model, args, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(0)
    cache, last = prefilled(model, 1, args)
    positions, decoder = [args.prompt_tokens], eager(model, cache)
    for _ in range(3):  # warm
        last = decode_step(decoder, last, positions, rng)
        positions = [positions[0] + 1]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(10):
            last = decode_step(decoder, last, positions, rng)
            positions = [positions[0] + 1]
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps per batch size")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true", help="print the profiler table of the batch-1 step")
    parser.add_argument("--graphs", action="store_true", help="CUDA: also time CUDA-graph replays of each step")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(batches) < 1 or min(args.depth, args.seq_len, args.vocab, args.prompt_tokens, args.steps) < 1:
        parser.error("--batches, --depth, --seq-len, --vocab, --prompt-tokens and --steps must be >= 1")
    if args.prompt_tokens + args.warmup + args.steps > args.seq_len:
        parser.error("--prompt-tokens + --warmup + --steps must fit in --seq-len")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.graphs and (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cuda":
        parser.error("--graphs needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = GPT(config_for_depth(args.depth, args.vocab, args.seq_len)).to(device).eval()
    print(f"bench/decode: d{args.depth}, vocab {args.vocab}, prompt {args.prompt_tokens}, {args.steps} steps on "
          f"{device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    results = {}
    with torch.inference_mode(), autocast_context(device):
        for batch in batches:
            step_s = time_batch(model, batch, args, device)
            results[batch] = {"ms_per_step": round(1000 * step_s, 3), "tok_per_s": round(batch / step_s, 1)}
            if args.graphs:
                graph_s = time_batch(model, batch, args, device, graphs=True)
                results[batch].update(graph_ms_per_step=round(1000 * graph_s, 3),
                                      graph_speedup=round(step_s / graph_s, 2),
                                      graph_max_logit_diff=graph_error(model, batch, args))
        base = results[batches[0]]["tok_per_s"]
        print(f"{'batch':>6} {'ms/step':>9} {'tok/s':>10} {'vs ' + str(batches[0]):>7}"
              + (f" {'graph ms':>9} {'speedup':>8} {'max diff':>9}" if args.graphs else ""))
        for batch, r in results.items():
            r["ratio"] = round(r["tok_per_s"] / base, 2)
            print(f"{batch:>6} {r['ms_per_step']:>9.2f} {r['tok_per_s']:>10.1f} {r['ratio']:>6.2f}x"
                  + (f" {r['graph_ms_per_step']:>9.2f} {r['graph_speedup']:>7.2f}x {r['graph_max_logit_diff']:>9.2e}"
                     if args.graphs else ""))
        if args.profile:
            print(profile_batch_one(model, args, device))
    print(json.dumps({"depth": args.depth, "device": str(device), "batches": results}))


if __name__ == "__main__":
    main()
