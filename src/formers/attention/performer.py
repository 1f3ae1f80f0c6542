"""Performer / FAVOR+ (Choromanski et al., 2021), the LRA baseline: attention through
random features phi so that phi(q).phi(k) estimates a kernel, computed in linear form.

Two kernels: "relu" (the LRA repo's "generalized" Performer: phi(x) = relu(W x) + eps with
256 features) and "softmax" (positive random features exp(W x - |x|^2/2) / sqrt(m), an
unbiased estimate of exp(q.k), with q, k scaled by d^-1/4). The projection W has blocks of
orthogonal rows with chi-distributed norms; it is a buffer drawn once from `seed`
(deterministic, as the LRA configs are), `redraw()` draws a new one.
"""
from __future__ import annotations

import math

import torch

from . import register_attention
from ._base import QKVAttention, zero_padded
from .linear import linear_attention


def orthogonal_features(m: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(m, d): stacked blocks of d orthonormal rows, each row rescaled to a chi(d) norm."""
    blocks, rows = [], 0
    while rows < m:
        g = torch.randn(d, d, generator=generator)
        qmat, _ = torch.linalg.qr(g)
        blocks.append(qmat.T)
        rows += d
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


@register_attention("performer")
class PerformerAttention(QKVAttention):
    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, num_features: int = 256,
                 kernel: str = "relu", seed: int = 0):
        super().__init__(dim, num_heads, max_len, causal, dropout)
        if kernel not in ("relu", "softmax"):
            raise ValueError(f"attention 'performer': kernel must be 'relu' or 'softmax', got {kernel!r}")
        self.kernel, self.num_features, self.seed = kernel, num_features, seed
        self.register_buffer("projection", torch.empty(num_features, self.head_dim), persistent=True)
        self.redraw(seed)

    @torch.no_grad()
    def redraw(self, seed: int | None = None):
        if self.projection.is_meta:
            return
        g = torch.Generator().manual_seed(self.seed if seed is None else seed)
        self.projection.copy_(orthogonal_features(self.num_features, self.head_dim, g))

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        w = self.projection.to(x.dtype)
        if self.kernel == "relu":
            return torch.relu(x @ w.T) + 1e-3
        x = x * self.head_dim ** -0.25
        proj = x @ w.T
        sq = 0.5 * (x * x).sum(-1, keepdim=True)
        # a per-row (queries) or global (keys) max keeps exp() finite; it cancels in the normalisation
        stab = proj.amax(-1, keepdim=True) if is_query else proj.amax(dim=(-1, -2), keepdim=True)
        return torch.exp(proj - sq - stab.detach()) / math.sqrt(self.num_features) + 1e-6

    def mix(self, q, k, v, mask):
        return linear_attention(self.features(q, True), zero_padded(self.features(k, False), mask), v, self.causal)


