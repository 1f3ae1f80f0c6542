"""Gaussian-mixture mask attention (catalog 20): "Toward a Deeper Understanding: RetNet Viewed through
Convolution", Pattern Recognition 2024, arXiv 2309.05375 (official code:
CatworldLee/Gaussian-Mixture-Mask-Attention).

A locality prior on the attention logits, two learnable numbers per Gaussian per head:
    G_h(i, j) = sum_k alpha_{k,h} exp(-d_ij^2 / (2 (sigma_{k,h}^2 + 1e-5)))
    mode="multiply" (default, the official code: `dots = mask(dots)` = G * dots): softmax((Q K^T / sqrt(d)) (.) G) V
    mode="add" (the paper's reading, "add the obtained GMM to the preceding softmax"): softmax(Q K^T / sqrt(d) + G) V
The official code multiplies, so it is the default; the paper's words (and the README, which says adding
before or after the softmax matters little) describe an addition, kept as the option. Neutral masks:
G = 1 (multiply; one kernel with alpha = 1 and sigma = inf) or G = 0 (add; alpha = 0) give vanilla attention.

Distance: the paper and code use the 2-D patch grid, d^2 = drow^2 + dcol^2 (images; `grid=(h, w)`, with
`prefix_tokens` leading tokens such as a CLS token left unmasked, i.e. neutral rows and columns). For
sequences (the default, LRA) d = |i - j|, an adaptation. Parameters as official: alpha ~ N(0, 2^2),
sigma ~ N(10, 10^2), num_kernels 5 (the official CLI default). The official code writes the Gaussian as
exp(-d^2/2) ** (1/(sigma^2 + 1e-5)), the same function, but its exp(-d^2/2) underflows to 0 beyond
d ~ 14 in float32 (harmless on its 8x8 grids, not on 1-D sequences); we evaluate the exponent directly.
O(N^2) like softmax attention; the multiplicative form runs outside SDPA (explicit softmax).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_attention
from ._base import QKVAttention
from .urpe import allowed_pairs

PAPER = 20


def distance_table(n: int, grid: tuple[int, int] | None = None, prefix: int = 0, device=None):
    """Squared distances of token positions as a small table and an (N, N) index into it (the mask is then
    evaluated once per distinct distance, not per pair): |i - j|^2 for sequences; drow^2 + dcol^2 on an
    h x w grid after `prefix` tokens, whose rows and columns point to a NaN entry (no position)."""
    if grid is None:
        i = torch.arange(n, device=device)
        return (i.float() ** 2), (i[:, None] - i[None, :]).abs()
    h, w = grid
    if n != prefix + h * w:
        raise ValueError(f"attention 'gmm_mask': grid {h}x{w} with {prefix} prefix tokens needs "
                         f"{prefix + h * w} tokens, got {n}")
    dr, dc = torch.arange(h, device=device).float(), torch.arange(w, device=device).float()
    table = torch.cat([(dr[:, None] ** 2 + dc[None, :] ** 2).flatten(), torch.full((1,), float("nan"), device=device)])
    p = torch.arange(h * w, device=device)
    r, c = p // w, p % w
    index = (r[:, None] - r[None, :]).abs() * w + (c[:, None] - c[None, :]).abs()
    return table, F.pad(index, (prefix, 0, prefix, 0), value=h * w)


@register_attention("gmm_mask")
class GMMMaskAttention(QKVAttention):
    """Options: num_kernels (5), mode ("multiply" | "add"), grid ((h, w) or None for 1-D), prefix_tokens."""

    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, num_kernels: int = 5,
                 mode: str = "multiply", grid: tuple[int, int] | None = None, prefix_tokens: int = 0):
        super().__init__(dim, num_heads, max_len, causal, dropout)
        if mode not in ("multiply", "add"):
            raise ValueError(f"attention 'gmm_mask': mode must be 'multiply' or 'add', got {mode!r}")
        self.mode, self.prefix = mode, prefix_tokens
        self.grid = None if grid is None else tuple(grid)
        self.sigma = nn.Parameter(torch.randn(num_kernels, num_heads, 1, 1) * 10 + 10)
        self.alpha = nn.Parameter(torch.randn(num_kernels, num_heads, 1, 1) * 2)

    def gmm(self, n: int) -> torch.Tensor:
        """(H, N, N) mask G; neutral (1 multiply, 0 add) on prefix-token rows and columns."""
        table, index = distance_table(n, self.grid, self.prefix, self.alpha.device)
        table = table.to(self.alpha.dtype)
        g = (self.alpha[..., 0] * torch.exp(-table.nan_to_num(0.0) / (2 * (self.sigma[..., 0] ** 2 + 1e-5)))).sum(0)
        g = torch.where(table.isnan(), 1.0 if self.mode == "multiply" else 0.0, g)      # (H, table size)
        return g[:, index]

    def mix(self, q, k, v, mask):
        n = q.shape[-2]
        g = self.gmm(n).to(q.dtype)
        keep = allowed_pairs(mask, n, self.causal, q.device)
        if self.mode == "add":
            bias = g if keep is None else g.masked_fill(~keep, float("-inf"))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 * g
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        return logits.softmax(-1) @ v
