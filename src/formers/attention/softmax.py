"""Vanilla multi-head softmax attention (Vaswani et al., 2017): the LRA "Transformer" row and
the reference every efficient mechanism is timed against. softmax(QK^T / sqrt(d)) V through
F.scaled_dot_product_attention; padded keys are masked out with a boolean key-padding mask,
so a padded sequence gives its real tokens exactly what the unpadded one gives. O(N^2) cost.
`dropout` acts on the output projection (the shared base), as for every mechanism here, not on the
attention probabilities: SDPA then keeps its fused CPU kernel and all mechanisms are regularised alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_attention
from ._base import QKVAttention


@register_attention("softmax")
class SoftmaxAttention(QKVAttention):
    def mix(self, q, k, v, mask):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        n = q.shape[-2]
        keep = mask[:, None, None, :]                       # (B, 1, 1, N): keys that are real tokens
        if self.causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        # a padded query whose row would be all -inf (NaN) attends to itself; its output is never read
        keep = keep | ((~mask)[:, None, :, None] & torch.eye(n, dtype=torch.bool, device=q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
