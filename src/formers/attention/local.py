"""Local attention, the LRA baseline: the sequence is cut into non-overlapping blocks
(block 20 in the LRA repo) and each token attends only inside its block. The sequence is
padded to a multiple of the block; padding and masked tokens are excluded as keys. A
block whose keys are all padding gets zeros (no NaN). Causal: also lower-triangular in the block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import register_attention
from ._base import QKVAttention


@register_attention("local")
class LocalAttention(QKVAttention):
    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, block: int = 20):
        super().__init__(dim, num_heads, max_len, causal, dropout)
        self.block = block

    def mix(self, q, k, v, mask):
        b, h, n, d = q.shape
        pad = (-n) % self.block
        real = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            real = F.pad(real, (0, pad), value=False)
        q, k, v = (rearrange(t, "b h (w s) d -> b h w s d", s=self.block) for t in (q, k, v))
        keep = rearrange(real, "b (w s) -> b 1 w 1 s", s=self.block)
        if self.causal:
            keep = keep & torch.ones(self.block, self.block, dtype=torch.bool, device=q.device).tril()
        has_key = keep.any(-1, keepdim=True)          # a block of padding only: let it attend, then zero it
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | ~has_key) * has_key
        return rearrange(out, "b h w s d -> b h (w s) d")[:, :, :n]
