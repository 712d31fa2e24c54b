"""Inference: a KV cache and an engine that samples several rows at once, with the calculator tool.

Prefill runs the prompt once at batch 1; its cache is copied into every row, so all rows share the
prompt's work. Each row then samples its own first token (upstream broadcast one to all rows, which
killed sample diversity). A row ends at <|assistant_end|> or <|bos|>. When a row closes a
<|python_start|> ... <|python_end|> block, the calculator's answer is forced into that row as
<|output_start|> answer <|output_end|> (mask 0: the model did not choose those tokens).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat_core.calculator import calculate
from nanochat_core.gpt import attention, visible_keys

GROW_CHUNK = 1024  # a full cache grows to the next multiple of this many positions


class KVCache:
    """Per-layer keys and values, shaped (B, H_kv, T, D); grows when a sequence outruns it. Every row is at the
    same position. Implements gpt.InferenceCache: the model calls rotary(), attend() per layer, and reads and
    writes prev_embedding (the last position's embedding, for smear).

    The storage is allocated on the first insert with that insert's dtype and device, so the cache
    always matches what the model computes (fp32 on CPU, bf16 under autocast), unless `dtype` is given."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int,
                 dtype: torch.dtype | None = None):
        if min(batch_size, num_heads, seq_len, head_dim, num_layers) < 1:
            raise ValueError(f"KVCache sizes must be >= 1: batch {batch_size}, heads {num_heads}, "
                             f"seq_len {seq_len}, head_dim {head_dim}, layers {num_layers}")
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.dtype = dtype
        self.kv: torch.Tensor | None = None
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.shape[4] if self.kv is None else self.kv.size(4)

    def reset(self) -> None:
        self.pos = 0
        self.prev_embedding = None

    def get_pos(self) -> int:
        return self.pos

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + T > cos.size(1):
            raise ValueError(f"sequence of {self.pos + T} tokens exceeds the rotary table of {cos.size(1)}")
        return cos[:, self.pos:self.pos + T], sin[:, self.pos:self.pos + T]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
               gqa: bool) -> torch.Tensor:
        """Store this chunk's keys/values; attention of its queries over the cache so far (causal, windowed)."""
        k, v = self.insert_kv(layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        if window is not None and Tk - 1 > window:  # some keys fall out of the window
            mask = visible_keys(torch.arange(Tk - Tq, Tk, device=q.device), Tk, window)
            return attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if Tq == Tk:
            return attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if Tq == 1:  # one new token attends to the whole cache
            return attention(q, k, v, is_causal=False, enable_gqa=gqa)
        # a chunk after a prefix: the prefix is visible, causal within the chunk
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        return attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at the current position; return this layer's keys/values so far."""
        L, _, B, H, _, D = self.shape
        if k.shape != v.shape or k.dim() != 4 or (k.size(0), k.size(1), k.size(3)) != (B, H, D):
            raise ValueError(f"insert_kv expects k and v shaped ({B}, {H}, T, {D}), got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        if not 0 <= layer_idx < L:
            raise ValueError(f"layer_idx {layer_idx} out of range for a {L}-layer cache")
        if self.kv is None:
            self.kv = torch.empty(self.shape, dtype=self.dtype or k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv.size(4):  # grow, keeping what is there
            extra = list(self.kv.shape)
            extra[4] = (t1 + GROW_CHUNK - 1) // GROW_CHUNK * GROW_CHUNK - self.kv.size(4)
            self.kv = torch.cat([self.kv, self.kv.new_empty(extra)], dim=4)
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == L - 1:  # every layer has written this chunk
            self.pos = t1
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]

    def prefill(self, other: KVCache) -> None:
        """Copy a filled batch-1 cache into every row of this (empty) one."""
        if other.kv is None or other.shape[2] != 1:
            raise ValueError("prefill needs a filled batch-1 source cache")
        if self.kv is not None:
            raise ValueError("prefill needs an empty target cache")
        if (other.shape[0], other.shape[3], other.shape[5]) != (self.shape[0], self.shape[3], self.shape[5]):
            raise ValueError(f"cache shapes differ: source {other.shape}, target {self.shape}")
        if other.pos > self.shape[4]:
            raise ValueError(f"prompt of {other.pos} tokens does not fit a cache of {self.shape[4]}")
        self.kv = other.kv.new_empty(self.shape, dtype=self.dtype or other.kv.dtype)
        self.kv[:, :, :, :, : other.pos] = other.kv[:, :, :, :, : other.pos]
        self.pos = other.pos
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.shape[2], -1, -1).clone()


def sample_next_token(logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids. temperature 0 is greedy; top_k 0/None and top_p None/1 disable those."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that it is 0 in float32: greedy
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0, so a tiny temperature cannot overflow
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=rng)


@dataclass
class RowState:
    """One sample's progress: its tokens, tool tokens waiting to be forced in, and whether it is done."""
    tokens: list[int]
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    completed: bool = False


class IncrementalDecoder:
    """Text deltas of a growing token list that never split a UTF-8 character. The tokens since the text was
    last whole are decoded, and held back while they end in U+FFFD (the first bytes of a character whose rest
    is still to come); so a token costs the length of that tail, not of the whole reply."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.text = tokenizer, [], ""
        self.start = 0  # tokens[:start] are in self.text

    def push(self, token: int) -> str:
        self.tokens.append(token)
        tail = self.tokenizer.decode(self.tokens[self.start:])
        return "" if tail.endswith("\ufffd") else self._commit(tail)

    def flush(self) -> str:
        """Whatever is held back (at the end of a reply, an incomplete character is shown as U+FFFD)."""
        return self._commit(self.tokenizer.decode(self.tokens[self.start:]))

    def _commit(self, tail: str) -> str:
        self.text, self.start = self.text + tail, len(self.tokens)
        return tail


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        self.assistant_end, self.bos = special("<|assistant_end|>"), tokenizer.get_bos_token_id()
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _new_cache(self, batch_size: int, seq_len: int) -> KVCache:
        c = self.model.config
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer)

    def step_row(self, row: RowState, sampled: int) -> tuple[int, int]:
        """Advance one row by one token: a queued tool token if there is one (mask 0), else `sampled` (mask 1).
        Tracks python blocks; when one closes, queues the calculator's answer as forced tokens."""
        forced = bool(row.forced)
        token = row.forced.popleft() if forced else sampled
        row.tokens.append(token)
        if token in (self.assistant_end, self.bos):
            row.completed = True
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            value = calculate(self.tokenizer.decode(row.python_tokens))
            if value is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(str(value)), self.output_end])
        elif row.in_python:
            row.python_tokens.append(token)
        return token, 0 if forced else 1

    def _check_request(self, tokens: list[int], num_samples: int, max_tokens: int | None,
                       temperature: float, top_k: int | None, top_p: float | None) -> None:
        vocab = self.model.config.vocab_size
        if not tokens or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ValueError(f"generate needs a non-empty list of token ids in [0, {vocab})")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no top-k), got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 top_p: float | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per step, the next token of every row and its mask (1 sampled, 0 forced).

        At most `max_tokens` steps (None: until the model's context, config.sequence_len, is full); stops
        early once every row has produced <|assistant_end|> or <|bos|>. Rows that finished early keep
        being sampled until then (their later tokens are meaningless; generate_batch drops them)."""
        self._check_request(tokens, num_samples, max_tokens, temperature, top_k, top_p)
        if max_tokens is None:
            max_tokens = max(0, self.model.config.sequence_len - len(tokens))
        if max_tokens == 0:
            return
        device = next(self.model.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        prefill_cache = self._new_cache(1, len(tokens))
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill_cache)
        logits = logits[:, -1, :].expand(num_samples, -1)  # every row samples its own first token from these
        cache = self._new_cache(num_samples, len(tokens) + max_tokens)
        cache.prefill(prefill_cache)
        del prefill_cache
        rows = [RowState(tokens=list(tokens)) for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = zip(*(self.step_row(row, s) for row, s in zip(rows, sampled, strict=True)), strict=True)
            yield list(column), list(masks)
            if step == max_tokens - 1 or all(r.completed for r in rows):
                break
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
            logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Whole completions (prompt included, terminal token excluded) and their masks (prompt: 0)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if done[i]:
                    continue
                if token in (self.assistant_end, self.bos):
                    done[i] = True
                    continue
                results[i].append(token)
                masks[i].append(mask)
            if all(done):
                break
        return results, masks
