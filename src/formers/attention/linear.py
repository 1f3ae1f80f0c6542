"""Linear attention (Katharopoulos et al., 2020), the LRA baseline "Linear Transformer":
softmax(QK^T)V is replaced by phi(Q) (phi(K)^T V) / (phi(Q) phi(K)^T 1) with the feature
map phi(x) = elu(x) + 1, so cost and memory grow linearly with the sequence length.
Causal form: prefix sums of phi(k) v^T. The LRA repo's epsilon, 1e-6, guards the division.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_attention
from ._base import QKVAttention, zero_padded


def feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def linear_attention(phi_q, phi_k, v, causal: bool = False, eps: float = 1e-6):
    """phi_q, phi_k: (B, H, N, M) non-negative features; v: (B, H, N, D)."""
    if causal:
        kv = torch.einsum("bhnm,bhnd->bhnmd", phi_k, v).cumsum(2)
        num = torch.einsum("bhnm,bhnmd->bhnd", phi_q, kv)
        den = torch.einsum("bhnm,bhnm->bhn", phi_q, phi_k.cumsum(2))
    else:
        num = phi_q @ (phi_k.transpose(-2, -1) @ v)
        den = phi_q @ phi_k.sum(2, keepdim=True).transpose(-2, -1)
        den = den.squeeze(-1)
    return num / (den.unsqueeze(-1) + eps)


@register_attention("linear")
class LinearAttention(QKVAttention):
    def mix(self, q, k, v, mask):
        return linear_attention(feature_map(q), zero_padded(feature_map(k), mask), v, self.causal)
