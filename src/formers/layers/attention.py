"""Multi-head self-attention over F.scaled_dot_product_attention."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear

__all__ = ["Attention", "sdpa"]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
         dropout: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """scaled_dot_product_attention on tensors (..., heads, tokens, head_dim); `bias` is added to the logits."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


class Attention(nn.Module):
    """Self-attention on (..., N, C) tokens with one fused qkv projection.

    `head_dim` defaults to dim // num_heads; when given, the inner width is heads * head_dim
    (CAFormer uses head_dim=32 and derives the head count).
    """

    def __init__(self, dim: int, num_heads: int = 8, head_dim: int | None = None, qkv_bias: bool = True,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, scale=None):
        super().__init__()
        self.head_dim = head_dim or dim // num_heads
        self.num_heads = num_heads
        inner = num_heads * self.head_dim
        self.scale = scale  # None: head_dim ** -0.5
        self.qkv = Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, bias: Optional[torch.Tensor] = None):
        return self.attend(x, bias)

    def attend(self, x, bias: Optional[torch.Tensor] = None):
        """forward's body, for subclasses that reshape around it (TorchScript has no super())."""
        # Sizes only through unflatten/flatten (no -1: a batch of zero samples works; no unpacking of
        # x.shape: torch.fx traces it) and swaps of two dims (ONNX gets non-negative permutations).
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        q, k, v = q.transpose(-2, -3), k.transpose(-2, -3), v.transpose(-2, -3)  # each (..., heads, N, head_dim)
        x = sdpa(q, k, v, bias, self.attn_drop if self.training else 0.0, self.scale)
        x = x.transpose(-2, -3).flatten(-2)
        return self.proj_drop(self.proj(x))
