"""Multi-head self-attention over F.scaled_dot_product_attention."""
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear

__all__ = ["Attention", "sdpa"]


def sdpa(q, k, v, bias=None, dropout: float = 0.0, scale=None):
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

    def forward(self, x, bias=None):
        *lead, n, _ = x.shape
        qkv = self.qkv(x).reshape(*lead, n, 3, self.num_heads, self.head_dim).movedim(-3, 0).transpose(-2, -3)
        q, k, v = qkv.unbind(0)  # each (..., heads, N, head_dim)
        x = sdpa(q, k, v, bias, self.attn_drop if self.training else 0.0, self.scale)
        x = x.transpose(-2, -3).reshape(*lead, n, -1)
        return self.proj_drop(self.proj(x))
