"""Linformer (Wang et al., 2020), the LRA baseline: keys and values are projected along
the sequence axis to k rows (E, F: k x max_len learned matrices shared across heads, as
the LRA configs use k=16..32), so attention is (N x k): linear in N. Padded positions are
zeroed before the projection; a sequence shorter than max_len uses the first N columns.
Not causal: a length projection mixes the future into every key.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_attention
from ._base import QKVAttention, zero_padded


@register_attention("linformer")
class LinformerAttention(QKVAttention):
    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, k: int = 16):
        if causal:
            raise ValueError("attention 'linformer' cannot be causal: its length projection mixes future tokens")
        super().__init__(dim, num_heads, max_len, causal, dropout)
        self.k = k
        self.proj_k = nn.Parameter(torch.randn(k, max_len) / max_len ** 0.5)
        self.proj_v = nn.Parameter(torch.randn(k, max_len) / max_len ** 0.5)

    def mix(self, q, k, v, mask):
        n = q.shape[2]
        k = torch.einsum("kn,bhnd->bhkd", self.proj_k[:, :n], zero_padded(k, mask))
        v = torch.einsum("kn,bhnd->bhkd", self.proj_v[:, :n], zero_padded(v, mask))
        return F.scaled_dot_product_attention(q, k, v)
