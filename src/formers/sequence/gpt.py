"""A minimal byte-level GPT: token and learned position embeddings, pre-norm causal transformer
blocks (formers.layers.TransformerBlock with a causal mask), a final LayerNorm and a head tied to
the token embedding. Small enough (about 1-3M parameters) to train on a CPU in minutes; it is
the causal model the FuseGPT transform (catalog 37) is demonstrated on."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.layers import TransformerBlock

__all__ = ["GPT", "CausalBlock"]


class CausalBlock(TransformerBlock):
    """TransformerBlock whose attention sees only the current and earlier positions."""

    def forward(self, x):
        n = x.shape[-2]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        x = x + self.drop_path(self.attn(self.norm1(x), bias=mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """forward(ids (B, T) int) -> next-token logits (B, T, vocab); forward_features -> the
    normalised hidden states (B, T, dim); loss(ids, targets) -> mean cross-entropy in nats."""

    def __init__(self, vocab_size: int = 256, context: int = 128, dim: int = 128, depth: int = 6,
                 num_heads: int = 4, mlp_ratio: float = 4.0, drop: float = 0.0):
        super().__init__()
        self.vocab_size, self.context, self.num_features = vocab_size, context, dim
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, dim))
        self.drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList([CausalBlock(dim, num_heads, mlp_ratio, drop=drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.apply(self._init)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.head.weight = self.tok_embed.weight          # tied

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, ids):
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ValueError(f"GPT: expected integer token ids (B, T), got {tuple(ids.shape)} {ids.dtype}")
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"GPT: sequence length {t} exceeds the context {self.context}")
        x = self.drop(self.tok_embed(ids.long()) + self.pos_embed[:, :t])
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, ids):
        return self.head(self.forward_features(ids))

    def loss(self, ids, targets):
        logits = self(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
