"""The GPT model (nanochat SEED architecture).

- token embedding -> parameter-free RMSNorm -> N pre-norm blocks -> RMSNorm -> untied lm_head
- attention: rotary embeddings (RoPE, base 10000) then QK-norm, grouped-query attention (n_kv_head <= n_head)
- MLP: ReLU^2; no biases anywhere; logits soft-capped at 15, computed in float32 (SEED did it in bf16)

Weights are kept in float32 (SEED casts wte to bf16 on CUDA); on CUDA the training loops run the
forward under bf16 autocast. The rotary tables are float32 too, so an incremental (KV-cache) decode
gives the same logits as a full forward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SOFTCAP = 15.0
ROPE_BASE = 10000.0
# Attention kernels outside compiled training: not cuDNN's, which builds an execution plan for every new
# shape (about 60 ms each on an H100, bench/decode.py), while inference changes shape with every prompt and
# every generated token.
VARYING_SHAPE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_head {self.n_head} must divide n_embd {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: head dim {self.n_embd // self.n_head} must be even for rotary embeddings")


def config_for_depth(depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128) -> GPTConfig:
    """The depth dial: width C = 64·depth, heads of `head_dim` channels, no GQA (n_kv_head = n_head).

    The effective head dim starts at min(head_dim, C) and is halved until it divides C, and
    n_head = C // head_dim_eff. So d20 -> C 1280, 10 heads of 128; d1 -> C 64, 1 head of 64; d21 ->
    C 1344 (not a multiple of 128), 21 heads of 64 (SEED's ceil(C/128) heads would not divide C there).
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    n_embd = 64 * depth
    hd = min(head_dim, n_embd)
    while n_embd % hd:
        hd //= 2
    n_head = n_embd // hd
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd)
    config.validate()
    return config


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, T, H, D): y1 = x1·cos + x2·sin, y2 = -x1·sin + x2·cos."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=3).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (1, seq_len, 1, head_dim/2), float32."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE ** (channel / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention; on CUDA outside torch.compile, without the cuDNN backend (see
    VARYING_SHAPE_BACKENDS). sdpa_kernel sets process-wide flags: fine for one decode thread per device."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(VARYING_SHAPE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], kv_cache=None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # the whole cache so far, this chunk included
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head
        if Tq == Tk:
            y = attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:  # one new token attends to the whole cache
            y = attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:  # a chunk after a prefix: the prefix is visible, causal within the chunk
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
            y = attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary_seq_len = config.sequence_len * 10  # room for generation past the training length
        cos, sin = rotary_tables(self.rotary_seq_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """SEED init: N(0,1) embedding, fan-in scaled linears, zero lm_head and output projections.
        Also (re)computes the rotary tables, which a model built on the meta device lacks."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(block.attn.c_proj.weight)
        self.cos, self.sin = rotary_tables(self.rotary_seq_len, self.config.n_embd // self.config.n_head,
                                           device=self.lm_head.weight.device)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per non-embedding parameter plus attention's 12·L·H·D·T."""
        c = self.config
        n = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
        """[AdamW for lm_head + embedding, Muon for the block matrices]; the sharded versions under torchrun.
        Every param group records its "initial_lr" for the LR schedules."""
        from nanochat_core.adamw import DistAdamW
        from nanochat_core.muon import DistMuon, Muon

        scale = (self.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
        adam_groups = [
            {"params": [self.lm_head.weight], "lr": unembedding_lr * scale},
            {"params": [self.transformer.wte.weight], "lr": embedding_lr * scale},
        ]
        adam_kwargs = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": weight_decay}
        matrices = list(self.transformer.h.parameters())
        if dist.is_initialized() and dist.get_world_size() > 1:
            optimizers = [DistAdamW(adam_groups, **adam_kwargs), DistMuon(matrices, lr=matrix_lr, momentum=0.95)]
        else:
            fused = self.lm_head.weight.device.type == "cuda"
            optimizers = [torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs),
                          Muon(matrices, lr=matrix_lr, momentum=0.95)]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, V) in float32 when targets is None, else the cross-entropy loss (ignore_index=-1):
        a scalar for loss_reduction="mean", per token (B*T,) for "none"."""
        if idx.ndim != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be a (B, T) integer tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {T0 + T} tokens exceeds the rotary table of {self.cos.size(1)}")
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        logits = self.lm_head(norm(x)).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)  # float32: in bf16 the cap rounds away logit detail
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
