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


class KVCache:
    """Per-layer keys and values, shaped (B, H_kv, T, D); grows when a sequence outruns it."""

    def __init__(self, batch_size: int, num_heads: int, seq_len: int, head_dim: int, num_layers: int):
        self.shape = (num_layers, 2, batch_size, num_heads, seq_len, head_dim)
        self.kv: torch.Tensor | None = None
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv is None:
            self.kv = torch.empty(self.shape, dtype=k.dtype, device=k.device)
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.kv.size(4):  # grow, keeping what is there
            extra = list(self.kv.shape)
            extra[4] = (t1 + 1024 - 1) // 1024 * 1024 - self.kv.size(4)
            self.kv = torch.cat([self.kv, torch.empty(extra, dtype=self.kv.dtype, device=self.kv.device)], dim=4)
        self.kv[layer_idx, 0, :, :, t0:t1] = k
        self.kv[layer_idx, 1, :, :, t0:t1] = v
        if layer_idx == self.kv.size(0) - 1:
            self.pos = t1
        return self.kv[layer_idx, 0, :, :, :t1], self.kv[layer_idx, 1, :, :, :t1]

    def prefill(self, other: KVCache) -> None:
        """Copy a batch-1 cache into every row of this one."""
        assert other.kv is not None and self.kv is None, "prefill needs a filled source and an empty target"
        if other.pos > self.shape[4]:
            raise ValueError(f"prompt of {other.pos} tokens does not fit a cache of {self.shape[4]}")
        self.kv = torch.empty(self.shape, dtype=other.kv.dtype, device=other.kv.device)
        self.kv[:, :, :, :, : other.pos] = other.kv[:, :, :, :, : other.pos]
        self.pos = other.pos


def sample_next_token(logits: torch.Tensor, rng: torch.Generator, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids. temperature 0 is greedy; top_k 0/None and top_p None/1 disable those."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
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
    tokens: list[int]
    forced: deque = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    completed: bool = False


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

    def _tool_tokens(self, state: RowState) -> None:
        """Track python blocks; when one closes, queue the calculator's answer as forced tokens."""
        token = state.tokens[-1]
        if token == self.python_start:
            state.in_python, state.python_tokens = True, []
        elif token == self.python_end and state.in_python:
            state.in_python = False
            value = calculate(self.tokenizer.decode(state.python_tokens))
            if value is not None:
                state.forced.extend([self.output_start, *self.tokenizer.encode(str(value)), self.output_end])
        elif state.in_python:
            state.python_tokens.append(token)

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 top_p: float | None = None) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per step, the next token of every row and its mask (1 sampled, 0 forced)."""
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("generate needs a non-empty list of token ids")
        device = self.model.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        prefill_cache = self._new_cache(1, len(tokens))
        logits = self.model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=prefill_cache)
        logits = logits[:, -1, :].expand(num_samples, -1)
        cache = self._new_cache(num_samples, len(tokens) + (max_tokens or self.model.config.sequence_len))
        cache.prefill(prefill_cache)
        rows = [RowState(tokens=list(tokens)) for _ in range(num_samples)]
        steps = 0
        while max_tokens is None or steps < max_tokens:
            if all(r.completed for r in rows):
                break
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()
            column, masks = [], []
            for row, token in zip(rows, sampled, strict=True):
                forced = bool(row.forced)
                token = row.forced.popleft() if forced else token
                column.append(token)
                masks.append(0 if forced else 1)
                row.tokens.append(token)
                if token in (self.assistant_end, self.bos):
                    row.completed = True
                self._tool_tokens(row)
            yield column, masks
            steps += 1
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
            logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: list[int], num_samples: int = 1,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Whole completions (prompt included, terminal token excluded) and their masks."""
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
