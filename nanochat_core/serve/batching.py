"""Continuous batching: one decode loop per model replica; requests join and leave the batch between steps.

Why: with a lock around Engine.generate, the N-th of N concurrent users waits for N-1 whole replies. But
a decode step reads every weight once whatever the batch size, so decoding B rows costs little more than
decoding one while B is small. So each replica keeps a KV cache of `max_batch` slots and runs a loop:
  1. drop the rows whose client went away (their slot is free again),
  2. prefill newly arrived prompts (at batch 1) into free slots; each new row samples its first token,
  3. decode one token for every row in one forward pass; rows that stop or reach max_tokens leave.
Rows sit at different positions, so the step runs the model's own forward with a cache view that gives
each row its own rotary position and attention mask (DecodeView); tests check it against GPT.forward.
Active rows always fill slots 0..B-1 (a leaving row's slot gets the last row's cache), so a
step reads contiguous views. Each row draws from its own seeded random.Random (sample_rows): a reply
depends on its request only, never on what else is in the batch. A Router sends each request to the least
busy replica (one per GPU; on a CPU the replicas share the weights). On CUDA each decode step is replayed
from a CUDA graph (GraphDecoder: padded batch sizes, attention over the whole cache under a mask), since a
small model's step is otherwise bound by launching its kernels from Python.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanochat_core.device import autocast_context
from nanochat_core.engine import Engine, RowState
from nanochat_core.gpt import attention, causal_attention, visible_keys

logger = logging.getLogger("nanochat.batching")

RATE_WINDOW_S = 10.0  # tokens_per_s in /stats is measured over this much recent time
SUMMED_STATS = ("requests_total", "requests_active", "requests_queued", "requests_served", "requests_disconnected",
                "tokens_generated", "decode_steps")


# -----------------------------------------------------------------------------
# the model, with one position per row

class SlotCache:
    """Keys and values of up to `slots` rows: (layers, slots, kv_heads, sequence_len, head_dim) each, allocated
    at the first write in the dtype the model computes in (fp32 on CPU, bf16 under autocast); and each slot's
    last embedding (for smear). The model reads and writes it through a PrefillView or a DecodeView."""

    def __init__(self, config, slots: int):
        self.shape = (config.n_layer, slots, config.n_kv_head, config.sequence_len, config.n_embd // config.n_head)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None  # (slots, 1, C)

    def ensure(self, like: torch.Tensor) -> None:
        if self.k is None:
            kind = like.device.type  # under autocast attention runs in its dtype (bf16): store that, not fp32
            dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else like.dtype
            self.k = like.new_zeros(self.shape, dtype=dtype)
            self.v = like.new_zeros(self.shape, dtype=dtype)

    def set_prev(self, rows: slice | int, embedding: torch.Tensor) -> None:
        if self.prev is None:
            self.prev = embedding.new_zeros((self.shape[1], 1, embedding.size(-1)))
        self.prev[rows] = embedding

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first `length` positions (and its last embedding) into slot dst."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        if self.prev is not None:
            self.prev[dst] = self.prev[src]


class PrefillView:
    """gpt.InferenceCache for a prompt run into one fresh slot at positions 0..T-1."""

    def __init__(self, cache: SlotCache, slot: int):
        self.cache, self.slot = cache, slot

    @property
    def prev_embedding(self) -> None:
        return None  # a new row: nothing before its first token

    @prev_embedding.setter
    def prev_embedding(self, embedding: torch.Tensor) -> None:
        self.cache.set_prev(self.slot, embedding[0])

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.cache.shape[3]:
            raise ValueError(f"prompt of {T} tokens exceeds the model's context of {self.cache.shape[3]}")
        return cos[:, :T], sin[:, :T]

    def attend(self, layer, q, k, v, window, gqa):
        T = k.size(2)
        self.cache.ensure(k)
        self.cache.k[layer, self.slot, :, :T] = k[0]
        self.cache.v[layer, self.slot, :, :T] = v[0]
        return causal_attention(q, k, v, window, gqa)


class DecodeView:
    """gpt.InferenceCache for one token in each of rows 0..B-1, row i at position pos[i], attending over the
    first Tk cache positions (masked past its own position and outside its window)."""

    def __init__(self, cache: SlotCache, pos: torch.Tensor, Tk: int):
        self.cache, self.pos, self.Tk = cache, pos, Tk
        self.rows = torch.arange(pos.size(0), device=pos.device)

    @property
    def prev_embedding(self) -> torch.Tensor | None:
        return None if self.cache.prev is None else self.cache.prev[:self.pos.size(0)]

    @prev_embedding.setter
    def prev_embedding(self, embedding: torch.Tensor) -> None:
        self.cache.set_prev(slice(0, self.pos.size(0)), embedding)

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        return cos[0, self.pos][:, None], sin[0, self.pos][:, None]

    def attend(self, layer, q, k, v, window, gqa):
        B, pos = self.pos.size(0), self.pos
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys[self.rows, :, pos] = k[:, :, 0].to(keys.dtype)
        values[self.rows, :, pos] = v[:, :, 0].to(values.dtype)
        visible = visible_keys(pos, self.Tk, window)[:, None, None, :]  # (B, 1, 1, Tk)
        return attention(q, keys[:B, :, :self.Tk], values[:B, :, :self.Tk], attn_mask=visible, enable_gqa=gqa)


def prefill(model, cache: SlotCache, slot: int, tokens: list[int]) -> torch.Tensor:
    """Run a prompt (positions 0..T-1) into cache slot `slot`; (1, V) logits for the next token."""
    ids = torch.tensor([tokens], dtype=torch.long, device=model.cos.device)
    return model.logits(model.hidden_states(ids, PrefillView(cache, slot))[:, -1])


def decode(model, cache: SlotCache, last: list[int], positions: list[int]) -> torch.Tensor:
    """One token for each of rows 0..B-1: row i feeds last[i] at position positions[i]; (B, V) logits."""
    device = model.cos.device
    ids, pos = torch.tensor(last, dtype=torch.long, device=device), torch.tensor(positions, device=device)
    return _decode_rows(model, cache, ids, pos, max(positions) + 1)


def decode_padded(model, cache: SlotCache, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """decode() with static shapes, for CUDA graphs: ids and pos (Bb,) on the device, rows past the real ones
    padding (free slots, position 0, overwritten by their next prefill), and every row attending over the whole
    cache under a mask. Same logits as decode() for the real rows; (Bb, V)."""
    return _decode_rows(model, cache, ids, pos, cache.shape[3])


def _decode_rows(model, cache: SlotCache, ids: torch.Tensor, pos: torch.Tensor, Tk: int) -> torch.Tensor:
    """The model's own forward, one token per row at the row's own position; (B, V) logits."""
    return model.logits(model.hidden_states(ids[:, None], DecodeView(cache, pos, Tk))[:, -1])


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes a decode graph is captured for: powers of two below max_batch, and max_batch."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class GraphDecoder:
    """decode() replayed from CUDA graphs, one per padded batch size (captured at its first use, in a few ms).

    Why: a decode step is hundreds of small kernels; launched one by one from Python the GPU waits on the CPU
    (d12 on an H100: 1.5 ms of GPU work in a 13-17 ms step). A graph launches them all at once: 2.5-3.4 ms a
    step at batch 1-32, logits bit-identical (bench/decode.py --graphs).
    The graph runs its own bf16 autocast without the weight-cast cache: a cached cast made during capture
    would be freed when the caller's autocast ends, under the graph's feet."""

    def __init__(self, model, cache: SlotCache, max_batch: int):
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.sizes = graph_batch_sizes(max_batch)
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, last: list[int], positions: list[int]) -> torch.Tensor:
        B = len(last)
        Bb = next(size for size in self.sizes if size >= B)
        pad = [0] * (Bb - B)
        self.ids[:Bb].copy_(torch.tensor(last + pad))
        self.pos[:Bb].copy_(torch.tensor(positions + pad))
        if Bb not in self.graphs:
            self.graphs[Bb] = self._capture(Bb)
        graph, logits = self.graphs[Bb]
        graph.replay()
        return logits[:B]

    def _forward(self, Bb: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return decode_padded(self.model, self.cache, self.ids[:Bb], self.pos[:Bb])

    def _capture(self, Bb: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up off the capture (library handles, workspaces)
            for _ in range(2):
                self._forward(Bb)  # rewrites the same cache entries the replay will write
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other replicas' threads may use CUDA
            logits = self._forward(Bb)
        return graph, logits


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int | None],
                top_p: list[float | None], uniform: list[float]) -> list[int]:
    """One token per row of (B, V) logits, each row with its own settings, in a few batched ops.

    Same rules as engine.sample_next_token (temperature 0 greedy, top_k 0/None and top_p None/1 off), but the
    draw is inverse-CDF with the row's own uniform number in [0, 1) rather than torch.multinomial (one
    generator for the batch), so a row's token does not depend on the other rows."""
    B, V = logits.shape
    greedy = logits.argmax(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    if all(t < tiny for t in temperature):
        return greedy.tolist()
    device = logits.device
    temps = torch.tensor(temperature, dtype=torch.float32, device=device)[:, None].clamp_min(tiny)
    x = logits.float()
    x = (x - x.amax(dim=-1, keepdim=True)) / temps  # <= 0, so a tiny temperature cannot overflow
    ks = [k if k is not None and 0 < k < V else V for k in top_k]
    if min(ks) < V:  # the k-th largest value of each row (the V-th: keep all)
        kth = torch.topk(x, max(k for k in ks if k < V), dim=-1).values
        kth = torch.cat([kth, x.amin(dim=-1, keepdim=True)], dim=-1)
        index = torch.tensor([k - 1 if k < V else kth.size(1) - 1 for k in ks], device=device)[:, None]
        x = x.masked_fill(x < kth.gather(1, index), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    ps = [p if p is not None and 0.0 < p < 1.0 else float("inf") for p in top_p]
    if min(ps) < 1.0:  # keep the smallest set of most likely tokens that reaches top_p
        ranked, order = torch.sort(probs, dim=-1, descending=True)
        keep_p = torch.tensor(ps, dtype=torch.float32, device=device)[:, None]
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, ranked.cumsum(dim=-1) - ranked > keep_p)
        probs = probs.masked_fill(drop, 0.0)  # in vocabulary order still: a row's draw is the same in any batch
    cdf = probs.cumsum(dim=-1)
    u = torch.tensor(uniform, dtype=torch.float32, device=device)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_max(V - 1)[:, 0]  # right: never a token of probability 0
    return torch.where(temps[:, 0] > tiny, picked, greedy).tolist()


# -----------------------------------------------------------------------------
# one replica's decode loop

@dataclass(eq=False)
class Job:
    """A sequence to generate. `emit(kind, value)` is called on the replica's thread with ("token", id) for each
    token, then ("done", "stop" | "length") or ("error", exception); nothing after a cancel. It must not block."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    emit: Callable[[str, object], None] = lambda kind, value: None
    cancelled: str = ""  # set by Replica.cancel: the counter the drop is booked under


@dataclass(eq=False)
class Row:
    job: Job
    state: RowState
    rng: random.Random  # the row's own draws: its tokens never depend on the rest of the batch
    pos: int  # tokens in the cache
    last: int = -1  # the token to feed at the next step
    generated: int = 0


class Replica:
    """A model on one device, its slot cache and the thread that decodes its rows. `lock` is held for each
    step (hold it to pause the replica); `cond` guards the queue and the counters and wakes the thread."""

    def __init__(self, model, tokenizer, max_batch: int = 32, cuda_graphs: bool = True):
        self.model, self.engine, self.max_batch = model, Engine(model, tokenizer), max_batch
        self.device = next(model.parameters()).device
        self.vocab = tokenizer.get_vocab_size()  # ids past the tokenizer's (a padded lm_head) are never sampled
        self.stops = {self.engine.assistant_end, self.engine.bos}
        self.cache = SlotCache(model.config, max_batch)
        self.graphs = GraphDecoder(model, self.cache, max_batch) if cuda_graphs and self.device.type == "cuda" else None
        self.pending: deque[Job] = deque()
        self.rows: list[Row] = []
        self.lock, self.cond = threading.Lock(), threading.Condition()
        self.closing, self.thread = False, None
        self.counts = dict.fromkeys(("requests_total", "requests_served", "requests_disconnected",
                                     "tokens_generated", "decode_steps"), 0)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.started = time.monotonic()

    def load(self) -> int:
        return len(self.rows) + len(self.pending)

    def submit(self, job: Job) -> None:
        if not job.prompt or len(job.prompt) + job.max_tokens > self.model.config.sequence_len or job.max_tokens < 1:
            raise ValueError(f"a job needs a prompt and 1 <= max_tokens <= sequence_len - prompt; got "
                             f"{len(job.prompt)} + {job.max_tokens} > {self.model.config.sequence_len}")
        with self.cond:
            self.pending.append(job)
            self.counts["requests_total"] += 1
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name=f"nanochat-decode-{self.device}", daemon=True)
                self.thread.start()
            self.cond.notify()

    def cancel(self, job: Job, counter: str = "requests_disconnected") -> None:
        """Stop a job (its client left, or it hit a stop string); its row is freed before the next step."""
        with self.cond:
            job.cancelled = counter
            if job in self.pending:
                self.pending.remove(job)
                self.counts[counter] += 1

    def close(self) -> None:
        """Stop the thread; jobs still queued or running get an error event."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
        with self.cond:
            for job in [*self.pending, *(row.job for row in self.rows)]:
                job.emit("error", RuntimeError("the server is shutting down"))
            self.pending.clear()
            self.rows.clear()
            self.closing, self.thread = False, None

    def stats(self) -> dict:
        with self.cond:
            self._forget_old_steps()
            window = max(min(RATE_WINDOW_S, time.monotonic() - self.started), 1e-3)
            return {"device": str(self.device), "max_batch": self.max_batch, **self.counts,
                    "requests_active": len(self.rows), "requests_queued": len(self.pending),
                    "tokens_per_s": round(sum(n for _, n in self.recent) / window, 1)}

    def _forget_old_steps(self) -> None:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    # ---- the decode thread

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        with torch.inference_mode(), autocast_context(self.device):
            while self._wait_for_work():
                with self.lock:
                    try:
                        self._step()
                    except Exception as e:  # noqa: BLE001 - a failed step ends its rows, not the server
                        logger.exception("decode step failed")
                        with self.cond:
                            for row in self.rows:
                                row.job.emit("error", e)
                            self.rows.clear()

    def _wait_for_work(self) -> bool:
        with self.cond:
            while not (self.pending or self.rows or self.closing):
                self.cond.wait()
            return not self.closing

    def _step(self) -> None:
        with self.cond:
            gone = {i for i, row in enumerate(self.rows) if row.job.cancelled}
            for i in gone:
                self.counts[self.rows[i].job.cancelled] += 1
            self._retire(gone)
            admitted = [self.pending.popleft() for _ in range(min(len(self.pending), self.max_batch - len(self.rows)))]
        for job in admitted:
            self._admit(job)
        if self.rows:
            rows = self.rows
            step = self.graphs or (lambda last, positions: decode(self.model, self.cache, last, positions))
            logits = step([r.last for r in rows], [r.pos for r in rows])
            for row in rows:
                row.pos += 1
            self._advance(rows, self._sample(logits, rows), decode_step=True)

    def _admit(self, job: Job) -> None:
        """Prefill a new row into the next free slot; it samples its first token right away."""
        row = Row(job, RowState(tokens=list(job.prompt)), random.Random(job.seed), pos=len(job.prompt))
        self.rows.append(row)
        try:
            logits = prefill(self.model, self.cache, len(self.rows) - 1, job.prompt)
        except Exception as e:  # noqa: BLE001 - this request fails, the batch goes on
            logger.exception("prefill failed")
            self.rows.pop()
            job.emit("error", e)
            return
        self._advance([row], self._sample(logits, [row]))

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        logits[:, self.vocab:] = float("-inf")
        jobs = [row.job for row in rows]
        return sample_rows(logits, [j.temperature for j in jobs], [j.top_k for j in jobs], [j.top_p for j in jobs],
                           [row.rng.random() for row in rows])

    def _advance(self, rows: list[Row], sampled: list[int], decode_step: bool = False) -> None:
        """Give each row its token (the calculator's forced output first); rows that end leave the batch. The
        counters and the batch are updated before the jobs hear of it, so /stats is never behind a reply."""
        events, finished = [], set()
        for row, token in zip(rows, sampled, strict=True):
            token, _ = self.engine.step_row(row.state, token)
            row.generated += 1
            if token in self.stops:
                events.append((row.job, "done", "stop"))
            else:
                events.append((row.job, "token", token))
                row.last = token
                if row.generated < row.job.max_tokens:
                    continue
                events.append((row.job, "done", "length"))
            finished.add(self.rows.index(row))
        with self.cond:
            self.counts["tokens_generated"] += len(rows)
            self.counts["decode_steps"] += decode_step
            self.counts["requests_served"] += len(finished)
            self.recent.append((time.monotonic(), len(rows)))
            self._forget_old_steps()
            self._retire(finished)
        for job, kind, value in events:
            job.emit(kind, value)

    def _retire(self, indices: set[int]) -> None:
        """Remove rows; the last row moves into each freed slot so the active rows stay in slots 0..B-1."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.rows[i] = self.rows[last]
                self.cache.move(last, i, self.rows[i].pos)
            self.rows.pop()


# -----------------------------------------------------------------------------
# replicas

def replica_devices(device: torch.device, num_replicas: int = 0) -> list[torch.device]:
    """One replica per GPU on CUDA (num_replicas 0), else num_replicas (0: 1) replicas, GPUs used in turn."""
    if device.type != "cuda":
        return [device] * (num_replicas or 1)
    count = torch.cuda.device_count()
    return [torch.device("cuda", i % count) for i in range(num_replicas or count)]


@dataclass
class Router:
    """Sends each job to the least busy replica (fewest rows running or queued)."""
    replicas: list[Replica] = field(default_factory=list)

    def submit(self, job: Job) -> Replica:
        replica = min(self.replicas, key=Replica.load)
        replica.submit(job)
        return replica

    def stats(self) -> dict:
        per = [replica.stats() for replica in self.replicas]
        totals = {key: sum(p[key] for p in per) for key in SUMMED_STATS}
        return {**totals, "tokens_per_s": round(sum(p["tokens_per_s"] for p in per), 1), "replicas": per}

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()


def build_router(model, tokenizer, num_replicas: int = 0, max_batch: int = 32, cuda_graphs: bool = True) -> Router:
    """Replicas of `model` (copied to each other GPU; shared on one device) behind a Router."""
    device = next(model.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    models = {device: model}
    replicas = []
    for d in replica_devices(device, num_replicas):
        if d not in models:
            models[d] = copy.deepcopy(model).to(d)
        replicas.append(Replica(models[d], tokenizer, max_batch, cuda_graphs))
    return Router(replicas)
