"""The part every q/k/v mechanism shares: project, split heads, mix, merge, project out.

A subclass implements `mix(q, k, v, mask)` on (B, H, N, D) tensors, where mask is (B, N)
bool (True = a real token) or None, and returns (B, H, N, D). Padded keys must carry no
weight; padded queries may produce anything (the model never reads them).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange


class QKVAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, max_len: int, causal: bool = False, dropout: float = 0.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.dim, self.num_heads, self.max_len, self.causal = dim, num_heads, max_len, causal
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def check(self, x: torch.Tensor, mask: torch.Tensor | None):
        name = getattr(self, "attention_name", type(self).__name__)
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"attention {name!r}: expected (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] > self.max_len:
            raise ValueError(f"attention {name!r}: {x.shape[1]} tokens exceed max_len={self.max_len}")
        if mask is not None and (mask.shape != x.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(f"attention {name!r}: mask must be bool of shape {tuple(x.shape[:2])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")

    def mix(self, q, k, v, mask):
        raise NotImplementedError

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check(x, mask)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = self.mix(q, k, v, mask)
        return self.drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


def zero_padded(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions of a (B, H, N, D) tensor."""
    return t if mask is None else t * mask[:, None, :, None].to(t.dtype)
