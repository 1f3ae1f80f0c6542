"""The LRA sequence model: token embedding + positional embedding, L pre-norm blocks whose token
mixer is `formers.attention.build_attention(name, ...)`, a final norm, CLS or mean pooling and the
task head; for Retrieval a two-tower model (one shared encoder, no cross-attention).

Settings per task are those of the official repo configs (google-research/long-range-arena, as the
reference sheet records them; where the paper appendix differs, the configs win, as the LRA README
asks). `scale` multiplies the widths (embedding, MLP) for CPU runs; such a model is a reduced one.
Embeddings N(0, 1), learned positions N(0, 0.02), zero-init CLS token prepended, head
Dense(mlp) -> ReLU -> Dense(classes) (Retrieval: Dense(mlp) -> ReLU -> Dense(mlp/2) -> ReLU -> Dense(2)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from formers.attention import attention_class, build_attention
from formers.layers.mlp import Mlp

__all__ = ["LRAConfig", "TASK_CONFIGS", "task_config", "LRAModel", "LRAEncoder", "build_model"]


@dataclass(frozen=True)
class LRAConfig:
    depth: int
    heads: int
    dim: int
    mlp_dim: int
    pool: str                  # "cls" or "mean"
    pos: str                   # "learned" or "sinusoidal"
    dropout: float = 0.1
    attn_dropout: float = 0.1
    # training settings of the config (used by the CLI)
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 0.1
    warmup: int = 1000
    steps: int = 5000
    schedule: str = "rsqrt"    # constant * linear warmup * rsqrt decay, or "cosine"
    grad_clip: float = 0.0


TASK_CONFIGS = {
    "listops": LRAConfig(depth=4, heads=8, dim=512, mlp_dim=1024, pool="cls", pos="learned",
                         batch_size=32, lr=0.05, weight_decay=0.1, warmup=1000, steps=5000),
    "text": LRAConfig(depth=4, heads=4, dim=256, mlp_dim=1024, pool="cls", pos="learned",
                      batch_size=32, lr=0.05, weight_decay=0.1, warmup=8000, steps=20000),
    "retrieval": LRAConfig(depth=4, heads=4, dim=128, mlp_dim=512, pool="cls", pos="learned",
                           batch_size=32, lr=0.05, weight_decay=0.1, warmup=8000, steps=5000),
    "image": LRAConfig(depth=1, heads=1, dim=32, mlp_dim=64, pool="cls", pos="learned", dropout=0.3,
                       attn_dropout=0.2, batch_size=256, lr=5e-4, weight_decay=0.0, warmup=175, steps=35000,
                       schedule="cosine"),
    # the config's qkv width is 16 (two heads of 8): the attention interface keeps qkv = dim here
    "pathfinder32": LRAConfig(depth=1, heads=2, dim=32, mlp_dim=32, pool="mean", pos="sinusoidal",
                              batch_size=512, lr=1e-3, weight_decay=0.0, warmup=312, steps=62400,
                              schedule="cosine"),
    "pathfinder128": LRAConfig(depth=1, heads=2, dim=32, mlp_dim=32, pool="mean", pos="learned",
                               batch_size=64, lr=1e-3, weight_decay=0.0, warmup=312, steps=500000,
                               schedule="cosine", grad_clip=1.0),
}


def task_config(task: str, scale: float = 1.0, **overrides) -> LRAConfig:
    """The task's config; scale multiplies dim and mlp_dim (kept divisible by the heads)."""
    if task not in TASK_CONFIGS:
        raise ValueError(f"unknown LRA task {task!r}; choose one of {', '.join(TASK_CONFIGS)}")
    cfg = TASK_CONFIGS[task]
    if scale != 1.0:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        q = cfg.heads * 4
        cfg = replace(cfg, dim=max(q, int(round(cfg.dim * scale / q)) * q),
                      mlp_dim=max(8, int(round(cfg.mlp_dim * scale))))
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def sinusoidal_table(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, :dim // 2]
    return table


class Block(nn.Module):
    """Pre-norm: x + mix(LN(x), mask), then x + MLP(LN(x))."""

    def __init__(self, attention: str, dim: int, heads: int, mlp_dim: int, max_len: int, dropout: float,
                 attn_dropout: float, attn_options: dict):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mix = build_attention(attention, dim, heads, max_len, causal=False, dropout=attn_dropout,
                                   **attn_options)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout)

    def forward(self, x, mask):
        x = x + self.drop(self.mix(self.norm1(x), mask))
        return x + self.mlp(self.norm2(x))


class LRAEncoder(nn.Module):
    """Tokens (B, N) -> pooled features (B, dim). mask (B, N) bool, True = real token, or None.
    A mixer that declares `causal_only` (each token sees only its past) would never inform a CLS token
    prepended at position 0, so with such a mixer CLS pooling becomes mean pooling."""

    def __init__(self, attention: str, cfg: LRAConfig, vocab_size: int, max_len: int, attn_options: dict | None = None):
        super().__init__()
        if cfg.pool == "cls" and getattr(attention_class(attention), "causal_only", False):
            cfg = replace(cfg, pool="mean")
        self.cfg, self.max_len = cfg, max_len
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        n = max_len + (self.cls is not None)
        if cfg.pos == "learned":
            self.pos = nn.Parameter(torch.randn(1, n, cfg.dim) * 0.02)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("pos", sinusoidal_table(n, cfg.dim)[None], persistent=False)
        else:
            raise ValueError(f"pos must be 'learned' or 'sinusoidal', got {cfg.pos!r}")
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(attention, cfg.dim, cfg.heads, cfg.mlp_dim, n, cfg.dropout,
                                          cfg.attn_dropout, attn_options or {}) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"LRA encoder: expected (batch, tokens) integer ids, got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"LRA encoder: {tokens.shape[1]} tokens exceed max_len={self.max_len}")
        x = self.embed(tokens)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
            if mask is not None:
                mask = torch.cat([mask.new_ones(len(x), 1), mask], 1)
        x = self.drop(x + self.pos[:, :x.shape[1]])
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        if self.cls is not None:
            return x[:, 0]
        if mask is None:
            return x.mean(1)
        w = mask.to(x.dtype).unsqueeze(-1)
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class LRAModel(nn.Module):
    """Classifier over one sequence, or (pair=True) the two-tower matcher over (B, 2, N) pairs whose
    head reads [u, v, u*v, u-v] (interaction="nli", the paper) or [u, v] ("concat", the repo)."""

    def __init__(self, attention: str, cfg: LRAConfig, vocab_size: int, max_len: int, num_classes: int,
                 pair: bool = False, interaction: str = "nli", attn_options: dict | None = None):
        super().__init__()
        self.encoder = LRAEncoder(attention, cfg, vocab_size, max_len, attn_options)
        self.cfg, self.pair, self.interaction, self.attention = self.encoder.cfg, pair, interaction, attention
        if pair:
            if interaction not in ("nli", "concat"):
                raise ValueError(f"interaction must be 'nli' or 'concat', got {interaction!r}")
            width = cfg.dim * (4 if interaction == "nli" else 2)
            self.head = nn.Sequential(nn.Linear(width, cfg.mlp_dim), nn.ReLU(),
                                      nn.Linear(cfg.mlp_dim, cfg.mlp_dim // 2), nn.ReLU(),
                                      nn.Linear(cfg.mlp_dim // 2, num_classes))
        else:
            self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, num_classes))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.pair:
            return self.head(self.encoder(tokens, mask))
        if tokens.ndim != 3 or tokens.shape[1] != 2:
            raise ValueError(f"LRA retrieval: expected (batch, 2, tokens), got {tuple(tokens.shape)}")
        b = len(tokens)
        both = self.encoder(tokens.flatten(0, 1), None if mask is None else mask.flatten(0, 1))
        u, v = both.view(b, 2, -1).unbind(1)
        feats = [u, v, u * v, u - v] if self.interaction == "nli" else [u, v]
        return self.head(torch.cat(feats, -1))


def build_model(task: str, attention: str, vocab_size: int, max_len: int, num_classes: int,
                scale: float = 1.0, attn_options: dict | None = None, **overrides) -> LRAModel:
    cfg = task_config(task, scale, **overrides)
    return LRAModel(attention, cfg, vocab_size, max_len, num_classes, pair=task == "retrieval",
                    attn_options=attn_options)


def config_dict(cfg: LRAConfig) -> dict:
    return asdict(cfg)
