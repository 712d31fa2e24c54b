"""The GPT model: nanochat's November 2025 architecture, plus the 2026 record recipe's features as switches.

November 2025 (every switch off, the default; bit for bit the model earlier versions trained):
- token embedding -> parameter-free RMSNorm -> N pre-norm blocks -> RMSNorm -> untied lm_head
- attention: rotary embeddings (RoPE, base 10000) then QK-norm, grouped-query attention (n_kv_head <= n_head)
- MLP: ReLU^2; no biases anywhere; logits soft-capped at 15, computed in float32 (SEED did it in bf16)

2026 record recipe (upstream nanochat, July 2026; each a GPTConfig field):
- value_embeds: on alternating layers (the last included) a per-token embedding is mixed into attention's
  values through a learned per-head gate (ResFormer);
- residual_scalars: before every block, x = resid_lambdas[i] * x + x0_lambdas[i] * x0 (x0: the block-0 input);
- smear: each position adds a gated share of the previous token's (normed) embedding, so an incremental
  decode carries the previous token's embedding in its cache;
- backout: the final hidden state minus a learned share of the residual after layer n_layer // 2;
- window_pattern: sliding-window attention, the pattern tiled over layers ("SSSL": short windows, every
  fourth layer and the last one full); S = ceil(sequence_len / 4 / 128) * 128 keys back, as upstream;
- qk_gain (q and k scaled after QK-norm: upstream 1.2), rope_base (1e5), softcap (15) as settings.
"L" means the whole context here; upstream's L is sequence_len keys, which only differs past sequence_len.

Weights are kept in float32; on CUDA the training loops run the forward under bf16 autocast. Rotary tables
are float32 (rotary_dtype="bfloat16" reproduces upstream SEED, which stored them in bf16 even on CPU).

One inference path: `forward(idx, kv_cache=cache)` serves the KV-cache engine, the batching server (CUDA
graphs included) and every evaluation. A cache supplies the rotary rows of its positions (`rotary`), stores
keys/values and runs attention (`attend`), and carries `prev_embedding` for smear; engine.KVCache (one
position for all rows) and serve.batching's slot caches (a position per row) are the two implementations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SOFTCAP = 15.0  # the November default (GPTConfig.softcap)
ROPE_BASE = 10000.0  # the November default (GPTConfig.rope_base)
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the block input (upstream)
SMEAR_GATE_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding (upstream)
RECIPES = ("nov2025", "2026")
ROTARY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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
    # the 2026 recipe's features; these defaults are the November 2025 model
    window_pattern: str = "L"
    value_embeds: bool = False
    residual_scalars: bool = False
    smear: bool = False
    backout: bool = False
    qk_gain: float = 1.0
    rope_base: float = ROPE_BASE
    softcap: float = SOFTCAP
    rotary_dtype: str = "float32"
    vocab_pad_to: int = 1  # embeddings and lm_head padded to a multiple of this; logits sliced back
    recipe: str = "nov2025"  # how the weights are initialised and grouped for the optimizers

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> GPTConfig:
        """A config from a checkpoint's model_config; fields it lacks (older checkpoints) take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"GPTConfig has no field(s) {unknown}")
        return cls(**values)

    def validate(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "vocab_pad_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_head {self.n_head} must divide n_embd {self.n_embd}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        for name in ("value_embeds", "residual_scalars", "smear", "backout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.window_pattern, str) or not self.window_pattern \
                or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"GPTConfig.window_pattern must be a non-empty string of S and L, "
                             f"got {self.window_pattern!r}")
        for name in ("qk_gain", "rope_base", "softcap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a finite number > 0, got {value!r}")
        if self.rotary_dtype not in ROTARY_DTYPES:
            raise ValueError(f"GPTConfig.rotary_dtype must be one of {sorted(ROTARY_DTYPES)}, "
                             f"got {self.rotary_dtype!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"GPTConfig.recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.smear and self.n_embd < SMEAR_GATE_CHANNELS:
            raise ValueError(f"GPTConfig: smear needs n_embd >= {SMEAR_GATE_CHANNELS}, got {self.n_embd}")
        if self.value_embeds and self.n_embd < VE_GATE_CHANNELS:
            raise ValueError(f"GPTConfig: value_embeds needs n_embd >= {VE_GATE_CHANNELS}, got {self.n_embd}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_pad_to) * self.vocab_pad_to

    def has_value_embed(self, layer: int) -> bool:
        """Alternating layers, the last one always included (upstream's rule)."""
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2

    def windows(self) -> list[int | None]:
        """Per layer, how many keys back a query sees besides itself (None: the whole context)."""
        short = -(-self.sequence_len // 4 // 128) * 128  # upstream rounds up to FA3's tile of 128
        pattern = self.window_pattern.upper()
        sizes = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        sizes[-1] = None  # the last layer always sees everything
        return sizes


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


def config_for_depth_2026(depth: int, vocab_size: int, sequence_len: int) -> GPTConfig:
    """The 2026 depth dial (upstream HEAD): C = 64·depth rounded up to a multiple of 128, heads of 128 channels
    (d4: C 256, 2 heads), every feature on, SSSL windows, q/k gain 1.2, RoPE base 1e5, vocab padded to 64."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    n_embd = -(-64 * depth // 128) * 128
    n_head = n_embd // 128
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                       n_kv_head=n_head, n_embd=n_embd, window_pattern="SSSL", value_embeds=True,
                       residual_scalars=True, smear=True, backout=True, qk_gain=1.2, rope_base=100000.0,
                       vocab_pad_to=64, recipe="2026")
    config.validate()
    return config


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, T, H, D): y1 = x1·cos + x2·sin, y2 = -x1·sin + x2·cos."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=3).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, device=None, base: float = ROPE_BASE,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (1, seq_len, 1, head_dim/2), computed in float32 and stored in `dtype`."""
    channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (base ** (channel / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention; on CUDA outside torch.compile, without the cuDNN backend (see
    VARYING_SHAPE_BACKENDS). sdpa_kernel sets process-wide flags: fine for one decode thread per device."""
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with sdpa_kernel(VARYING_SHAPE_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def visible_keys(query_pos: torch.Tensor, Tk: int, window: int | None) -> torch.Tensor:
    """Bool mask (..., Tk): key j is visible from a query at absolute position p when j <= p and, with a
    window, p - j <= window (so a window of w sees w + 1 keys, as upstream's (w, 0))."""
    keys = torch.arange(Tk, device=query_pos.device)
    delta = query_pos[..., None] - keys
    return (delta >= 0) if window is None else (delta >= 0) & (delta <= window)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     gqa: bool) -> torch.Tensor:
    """Attention of a chunk over itself (training, a prefill from position 0)."""
    T = q.size(2)
    if window is None or window >= T - 1:  # the window reaches back to position 0: plain causal
        return attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = visible_keys(torch.arange(T, device=q.device), T, window)
    return attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class InferenceCache(Protocol):
    """What GPT.forward needs from a KV cache (engine.KVCache, serve.batching's slot caches)."""
    prev_embedding: torch.Tensor | None  # (B, 1, C): the last position's embedding, for smear

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary rows of the next T positions, broadcastable to (B, T, 1, D/2)."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
               gqa: bool) -> torch.Tensor:
        """Store k, v (B, H_kv, T, D) at the next positions; attention of q (B, H, T, D) over the cache."""


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_gain = config.qk_gain
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if config.has_value_embed(layer_idx):  # one gate per kv head, from the first channels of the input
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], window: int | None = None,
                ve: torch.Tensor | None = None, kv_cache: InferenceCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: a gated share (0..3) of this token's value embedding
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        if self.qk_gain != 1.0:  # sharper attention, split between q and k (upstream 2026: 1.2)
            q, k = q * self.qk_gain, k * self.qk_gain
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:
            y = causal_attention(q, k, v, window, gqa)
        else:
            y = kv_cache.attend(self.layer_idx, q, k, v, window, gqa)
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

    def forward(self, x, cos_sin, window=None, ve=None, kv_cache=None):
        x = x + self.attn(norm(x), cos_sin, window, ve, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        vocab = config.padded_vocab_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        if config.residual_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
        if config.value_embeds:
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab, kv_dim)
                                               for i in range(config.n_layer) if config.has_value_embed(i)})
        self.windows = config.windows()
        self.rotary_seq_len = config.sequence_len * 10  # room for generation past the training length
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return rotary_tables(self.rotary_seq_len, c.head_dim, device=device, base=c.rope_base,
                             dtype=ROTARY_DTYPES[c.rotary_dtype])

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh weights by the config's recipe; also (re)computes the rotary tables, which a model built on
        the meta device lacks."""
        if self.config.recipe == "2026":
            self._init_2026()
        else:
            self._init_nov2025()
        self.cos, self.sin = self._rotary_tables(device=self.lm_head.weight.device)

    def _init_nov2025(self) -> None:
        """SEED init: N(0,1) embeddings, fan-in scaled linears, zero lm_head and output projections (2026
        features, if switched on, start neutral)."""
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
        self._init_scalars(resid=lambda i: 1.0, x0=lambda i: 0.0)

    def _init_2026(self) -> None:
        """Upstream HEAD's init: N(0, 0.8) embedding, lm_head N(0, 0.001), uniform q/k/v (and 0.4x c_fc) of
        the same std as N(0, 1/C), zero projections, decaying residual scalars, small positive gates."""
        c = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        s = 3**0.5 * c.n_embd**-0.5  # uniform(-s, s) has std 1/sqrt(C)
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
        span = max(c.n_layer - 1, 1)
        self._init_scalars(resid=lambda i: 1.15 - 0.10 * i / span, x0=lambda i: 0.20 - 0.15 * i / span)
        if c.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        if c.value_embeds:
            for embedding in self.value_embeds.values():
                nn.init.uniform_(embedding.weight, -s, s)
            for block in self.transformer.h:
                if hasattr(block.attn, "ve_gate"):
                    nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)

    def _init_scalars(self, resid, x0) -> None:
        c = self.config
        if c.residual_scalars:
            for i in range(c.n_layer):
                self.resid_lambdas[i] = resid(i)
                self.x0_lambdas[i] = x0(i)
        if c.smear:
            nn.init.zeros_(self.smear_lambda)
        if c.backout:
            nn.init.constant_(self.backout_lambda, 0.2)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_matmul_params(self) -> int:
        """Parameters that multiply the token stream (every nn.Linear): 2 FLOPs each per token forward."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def num_scaling_params(self) -> int:
        """Transformer matrices + lm_head: what the 2026 recipe's tokens:params ratio counts (embeddings, value
        embeddings and scalars excluded, as upstream)."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    def estimate_flops(self) -> float:
        """Training FLOPs per token: 6 per matmul parameter plus attention's 12·H·D·(keys seen) per layer
        (a sliding window sees at most window + 1 keys)."""
        c = self.config
        attn = sum(12 * c.n_head * c.head_dim * (c.sequence_len if w is None else min(w + 1, c.sequence_len))
                   for w in self.windows)
        return 6 * self.num_matmul_params() + attn

    def setup_optimizers(self, unembedding_lr: float = 0.004, embedding_lr: float = 0.2, matrix_lr: float = 0.02,
                         weight_decay: float = 0.0,
                         disable: frozenset[str] = frozenset()) -> list[torch.optim.Optimizer]:
        """[AdamW for lm_head + embeddings (+ scalars), Muon for the block matrices]; the sharded versions under
        torchrun. Every param group records its "initial_lr" for the LR schedules. The 2026 recipe's groups
        and Muon variant are upstream HEAD's; `disable` turns its Muon parts off for ablations
        ("polar_express", "normuon", "cautious_wd")."""
        if self.config.recipe == "2026":
            return self._optimizers_2026(unembedding_lr, embedding_lr, matrix_lr, weight_decay, disable)
        scale = (self.config.n_embd / 768) ** -0.5  # AdamW LRs were tuned at width 768
        adam_groups = [
            {"params": [self.lm_head.weight], "lr": unembedding_lr * scale},
            {"params": [self.transformer.wte.weight], "lr": embedding_lr * scale},
        ]
        extra = [p for name, p in self.named_parameters() if not name.startswith(("transformer.", "lm_head."))]
        if extra:  # 2026 features on a November-recipe model: plain AdamW at the embedding LR
            adam_groups.append({"params": extra, "lr": embedding_lr * scale})
        adam_kwargs = {"betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": weight_decay}
        return self._build_optimizers(adam_groups, adam_kwargs, {"lr": matrix_lr, "momentum": 0.95})

    def _optimizers_2026(self, unembedding_lr, embedding_lr, matrix_lr, weight_decay, disable):
        c, s = self.config, (self.config.n_embd / 768) ** -0.5
        groups = [({"params": [self.lm_head.weight], "lr": unembedding_lr * s}, (0.8, 0.96), 0.01),
                  ({"params": [self.transformer.wte.weight], "lr": embedding_lr * s}, (0.8, 0.995), 0.001)]
        if c.value_embeds:
            groups.append(({"params": list(self.value_embeds.parameters()), "lr": embedding_lr * s * 0.5},
                           (0.8, 0.995), 0.01))
        if c.residual_scalars:
            groups.append(({"params": [self.resid_lambdas], "lr": 0.5 * 0.01}, (0.8, 0.95), 0.05))
            groups.append(({"params": [self.x0_lambdas], "lr": 0.5}, (0.96, 0.95), 0.0))
        gates = ([self.smear_gate.weight, self.smear_lambda] if c.smear else []) + \
                ([self.backout_lambda] if c.backout else [])
        if gates:
            groups.append(({"params": gates, "lr": 0.2}, (0.8, 0.95), 0.0))
        adam_groups = [{**g, "betas": betas, "weight_decay": wd} for g, betas, wd in groups]
        muon_kwargs = {"lr": matrix_lr, "momentum": 0.95, "weight_decay": weight_decay,
                       "orthogonalizer": "newton_schulz" if "polar_express" in disable else "polar_express",
                       "normuon_beta2": None if "normuon" in disable else 0.9,
                       "cautious_wd": "cautious_wd" not in disable}
        return self._build_optimizers(adam_groups, {"eps": 1e-10}, muon_kwargs)

    def _build_optimizers(self, adam_groups: list[dict], adam_kwargs: dict, muon_kwargs: dict):
        from nanochat_core.adamw import DistAdamW
        from nanochat_core.muon import DistMuon, Muon

        in_adam = {id(p) for g in adam_groups for p in g["params"]}
        matrices = [p for p in self.transformer.h.parameters() if id(p) not in in_adam]
        if len(in_adam) + len(matrices) != len(list(self.parameters())):
            raise RuntimeError("setup_optimizers: some parameters belong to no optimizer group")
        if dist.is_initialized() and dist.get_world_size() > 1:
            optimizers = [DistAdamW(adam_groups, **adam_kwargs), DistMuon(matrices, **muon_kwargs)]
        else:
            fused = self.lm_head.weight.device.type == "cuda"
            optimizers = [torch.optim.AdamW(adam_groups, fused=fused, **adam_kwargs), Muon(matrices, **muon_kwargs)]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: InferenceCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """Logits (B, T, vocab_size) in float32 when targets is None, else the cross-entropy loss (ignore_index=-1):
        a scalar for loss_reduction="mean", per token (B*T,) for "none"."""
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
        logits = self.logits(self.hidden_states(idx, kv_cache))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    def hidden_states(self, idx: torch.Tensor, kv_cache: InferenceCache | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, C): everything but lm_head and the soft-cap."""
        if idx.ndim != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"idx must be a (B, T) integer tensor, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        c = self.config
        B, T = idx.shape
        if kv_cache is None:
            if T > self.cos.size(1):
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table of {self.cos.size(1)}")
            cos_sin = self.cos[:, :T], self.sin[:, :T]
        else:
            cos_sin = kv_cache.rotary(self.cos, self.sin, T)
        x = norm(self.transformer.wte(idx))
        if c.smear:
            x = self._smear(x, kv_cache)
        x0, x_mid = x, None
        for i, block in enumerate(self.transformer.h):
            if c.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if c.has_value_embed(i) else None
            x = block(x, cos_sin, self.windows[i], ve, kv_cache)
            if c.backout and i == c.n_layer // 2:
                x_mid = x
        if x_mid is not None:  # backout: remove a learned share of the middle layer's (low-level) features
            x = x - self.backout_lambda * x_mid
        return norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Soft-capped float32 logits of hidden states (..., C); padding columns sliced off."""
        logits = self.lm_head(h)
        if logits.size(-1) != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]
        logits = logits.float()
        cap = self.config.softcap
        return cap * torch.tanh(logits / cap)  # float32: in bf16 the cap rounds away logit detail

    def _smear(self, x: torch.Tensor, kv_cache: InferenceCache | None) -> torch.Tensor:
        """Each position adds smear_lambda * sigmoid(gate(own embedding)) times the previous position's
        embedding; a cached decode takes the previous embedding from the cache and leaves its own there."""
        prev = None if kv_cache is None else kv_cache.prev_embedding
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_GATE_CHANNELS]))
        if prev is None:  # the first position has no previous token
            smeared = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        else:
            smeared = x + gate * torch.cat([prev.to(x.dtype), x[:, :-1]], dim=1)
        if kv_cache is not None:  # only now: a cache may hand out a view of the storage this overwrites
            kv_cache.prev_embedding = x[:, -1:]
        return smeared
