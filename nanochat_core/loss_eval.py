"""Validation metrics: mean loss and bits per byte of the model, and bits per byte of a unigram baseline.

Bits per byte divides the summed loss (nats) by the number of UTF-8 bytes the target tokens stand for, so
it does not depend on the tokenizer's vocabulary. Special tokens (0 bytes) and ignored targets (-1) count
neither in the loss nor in the bytes. Sums are all-reduced across ranks before dividing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist


def _all_reduce_sum(*values: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for v in values:
            dist.all_reduce(v, op=dist.ReduceOp.SUM)


def target_bytes(y: torch.Tensor, token_bytes: torch.Tensor) -> torch.Tensor:
    """Bytes of each target token; 0 for ignored (-1) targets and special tokens."""
    valid = y >= 0
    return torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> dict[str, float]:
    """{"loss": mean cross-entropy over valid targets, "bpb": bits per byte} over `steps` (x, y) batches."""
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    nats = torch.zeros((), dtype=torch.float32, device=device)  # over tokens that stand for bytes
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # over all valid targets
    count = torch.zeros((), dtype=torch.int64, device=device)
    it = iter(batches)
    for _ in range(steps):
        x, y = next(it)
        loss = model(x, y, loss_reduction="none").view(-1).float()
        y = y.view(-1)
        nb = target_bytes(y, token_bytes)
        valid = y >= 0
        nats += (loss * (nb > 0)).sum()
        nbytes += nb.sum()
        loss_sum += (loss * valid).sum()
        count += valid.sum()
    _all_reduce_sum(nats, nbytes, loss_sum, count)
    n_bytes, n_tokens = nbytes.item(), count.item()
    return {
        "loss": loss_sum.item() / n_tokens if n_tokens else float("inf"),
        "bpb": nats.item() / (math.log(2) * n_bytes) if n_bytes else float("inf"),
    }


def evaluate_bpb(model: torch.nn.Module, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of the model on `steps` (x, y) batches (inf when the targets hold no bytes)."""
    return evaluate(model, batches, steps, token_bytes)["bpb"]


def unigram_bpb(train_token_counts: torch.Tensor, val_tokens: torch.Tensor, token_bytes: torch.Tensor) -> float:
    """Bits per byte of an add-one smoothed unigram model counted on train tokens, scored on val_tokens.

    train_token_counts: [vocab] counts of the training targets (already summed over ranks); val_tokens: the
    (rank-local) targets the model was scored on, any shape, -1 = ignored. The baseline the model must beat."""
    counts = train_token_counts.detach().cpu().double()
    token_bytes = token_bytes.cpu()
    if counts.shape != token_bytes.shape:
        raise ValueError(f"train_token_counts has shape {tuple(counts.shape)}, token_bytes {tuple(token_bytes.shape)}")
    log2_p = torch.log2((counts + 1.0) / (counts.sum() + counts.numel()))
    y = val_tokens.detach().cpu().reshape(-1).long()
    nb = target_bytes(y, token_bytes)
    scored = nb > 0
    bits = -log2_p[y.clamp(min=0)][scored].sum()
    totals = torch.stack([bits, nb.sum().double()])
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        totals = totals.to(device)
        _all_reduce_sum(totals)
    bits_total, bytes_total = totals.tolist()
    return bits_total / bytes_total if bytes_total else float("inf")
