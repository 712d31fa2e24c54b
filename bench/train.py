"""Benchmark base training on this machine's device: tok/s, MFU and where a step's time goes.

    python bench/train.py --depth 4 --seq-len 256 --batch 8 --steps 10 --device cpu
    python bench/train.py --depth 12 --seq-len 2048 --batch 32 --device cuda --compile
    python bench/train.py --depth 2 --seq-len 64 --batch 4 --compare threads --threads 2
    torchrun --standalone --nproc_per_node=8 bench/train.py --depth 20 --seq-len 2048 --batch 32 --compile

Each step is timed in four phases, with the device synchronised between them (which removes a little of
the overlap a training run has, so the shares are of a slightly serialised step):
  data     getting the next (x, y) batch onto the device (random tokens, or --shards/--tokenizer: the real loader)
  fwd+bwd  forward pass and backward pass of one micro-batch
  optim    the optimizers' own work (AdamW + Muon updates; under torchrun on this rank's shard)
  comm     under torchrun: the time the sharded optimizers spend blocked on their reduce-scatters and
           all-gathers (measured inside the step by their CommClock: the communication the overlap with the
           updates did not hide); 0 on one process
The first --warmup steps (compilation, allocator warmup) are not timed. MFU needs a GPU in
nanochat_core.device's peak table; elsewhere it is omitted. --compare runs a peer configuration in the same
process and prints the ratios: `compile` (eager vs torch.compile) or `threads` (1 thread vs --threads, CPU).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat_core.common import DistInfo, cleanup_distributed, init_distributed  # noqa: E402
from nanochat_core.dataloader import PretrainLoader  # noqa: E402
from nanochat_core.device import (  # noqa: E402
    autocast_context,  # noqa: E402
    mfu_percent,
    peak_flops,
)
from nanochat_core.gpt import config_for_depth  # noqa: E402
from nanochat_core.progress import print0  # noqa: E402
from nanochat_core.tokenizer import Tokenizer  # noqa: E402
from nanochat_core.train.common import new_model, remember_initial_lrs, seed_everything  # noqa: E402

PHASES = ("data", "fwd_bwd", "optim", "comm")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(vocab_size: int, B: int, T: int, device: torch.device, rank: int = 0):
    """Endless uniformly random (x, y) token batches, made on the CPU and copied like the real loader's."""
    gen = torch.Generator().manual_seed(1234 + rank)  # different data on each rank
    while True:
        block = torch.randint(0, vocab_size, (B * T + 1,), generator=gen)
        cuda = device.type == "cuda"
        block = block.pin_memory() if cuda else block
        yield block[:-1].view(B, T).to(device, non_blocking=cuda), block[1:].view(B, T).to(device, non_blocking=cuda)


def make_batches(args, d: DistInfo):
    if args.shards:
        tok = Tokenizer.load(args.tokenizer)
        loader = PretrainLoader(args.shards, tok, args.batch, args.seq_len, "train", d.rank, d.world_size, d.device)
        return loader, tok.get_vocab_size()
    return random_batches(args.vocab, args.batch, args.seq_len, d.device, d.rank), args.vocab


def run_once(args, d: DistInfo, compile_model: bool) -> dict:
    """Train args.warmup + args.steps steps of a fresh model; per-phase seconds over the timed steps."""
    seed_everything(42)
    batches, vocab_size = make_batches(args, d)
    model = new_model(config_for_depth(args.depth, vocab_size, args.seq_len), d.device)
    optimizers = model.setup_optimizers()
    remember_initial_lrs(optimizers)
    clocks = [opt.comm for opt in optimizers if hasattr(opt, "comm")]  # only the sharded optimizers have one
    for clock in clocks:
        clock.enabled = True
    fwd = torch.compile(model, dynamic=False) if compile_model else model
    autocast = autocast_context(d.device)
    totals = dict.fromkeys(PHASES, 0.0)
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    for step in range(args.warmup + args.steps):
        sync(d.device)
        t0 = time.perf_counter()
        x, y = next(batches)
        sync(d.device)
        t1 = time.perf_counter()
        with autocast:
            loss = fwd(x, y)
        loss.backward()
        sync(d.device)
        t2 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        sync(d.device)
        t3 = time.perf_counter()
        comm = sum(clock.seconds for clock in clocks)
        for clock in clocks:
            clock.seconds = 0.0
        times = {"data": t1 - t0, "fwd_bwd": t2 - t1, "optim": t3 - t2 - comm, "comm": comm}
        if step >= args.warmup:
            for k in PHASES:
                totals[k] += times[k]
    step_s = sum(totals.values()) / args.steps
    tokens = args.batch * args.seq_len * d.world_size  # per step, all ranks
    result = {
        "params": model.num_params(),
        "tok_per_s": round(tokens / step_s),
        "step_ms": round(1000 * step_s, 2),
        **{f"{k}_share": round(totals[k] / (step_s * args.steps), 4) for k in PHASES},
    }
    mfu = mfu_percent(model.estimate_flops(), tokens, step_s, peak_flops(d.device), d.world_size)
    result["mfu"] = None if mfu is None else round(mfu, 2)
    result["comm_ms"] = round(1000 * totals["comm"] / args.steps, 2)
    if d.device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(d.device) / 2**30, 2)
    return result


def describe(label: str, r: dict) -> str:
    mfu = "n/a (no known peak for this device)" if r["mfu"] is None else f"{r['mfu']:.2f}%"
    shares = ", ".join(f"{k} {100 * r[f'{k}_share']:.1f}%" for k in PHASES)
    mem = f", peak memory {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""
    return f"{label}: {r['tok_per_s']:,} tok/s, {r['step_ms']:.1f} ms/step, MFU {mfu}{mem}; {shares}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (on CPU: needs a C++ compiler)")
    parser.add_argument("--vocab", type=int, default=65536, help="vocabulary for random tokens")
    parser.add_argument("--shards", help="pretraining shards dir: real data through PretrainLoader (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer dir for --shards")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or 1)")
    parser.add_argument("--compare", choices=["none", "compile", "threads"], default="none")
    args = parser.parse_args(argv)
    for name in ("depth", "seq_len", "batch", "steps", "vocab"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if bool(args.shards) != bool(args.tokenizer):
        parser.error("--shards and --tokenizer go together")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 1))
    torch.set_num_threads(threads)
    d = init_distributed(args.device or "")
    print0(f"bench/train: depth {args.depth}, seq {args.seq_len}, batch {args.batch} x {d.world_size} rank(s), "
           f"{args.steps} timed steps on {d.device}" + (f" ({torch.cuda.get_device_name(d.device)})"
                                                         if d.device.type == "cuda" else f", {threads} thread(s)"))
    runs = {}
    if args.compare == "compile":
        runs["eager"] = run_once(args, d, compile_model=False)
        runs["compiled"] = run_once(args, d, compile_model=True)
    elif args.compare == "threads":
        torch.set_num_threads(1)
        runs["1 thread"] = run_once(args, d, compile_model=args.compile)
        torch.set_num_threads(threads)
        runs[f"{threads} threads"] = run_once(args, d, compile_model=args.compile)
    else:
        runs["compiled" if args.compile else "eager"] = run_once(args, d, compile_model=args.compile)
    for label, r in runs.items():
        print0(describe(label, r))
    summary = {"depth": args.depth, "seq_len": args.seq_len, "batch": args.batch, "world_size": d.world_size,
               "device": str(d.device), "runs": runs}
    if len(runs) == 2:
        (a, ra), (b, rb) = runs.items()
        summary["speedup"] = round(rb["tok_per_s"] / ra["tok_per_s"], 3)
        print0(f"{b} vs {a}: {summary['speedup']:.2f}x tok/s")
    print0(json.dumps(summary))
    cleanup_distributed()


if __name__ == "__main__":
    main()
