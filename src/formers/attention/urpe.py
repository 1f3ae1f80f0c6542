"""URPE (catalog 16): "Your Transformer May Not be as Powerful as You Expect", Luo, Li, Zheng, Liu,
Wang, He, NeurIPS 2022, arXiv 2205.13401 (official code: lsj2408/URPE, a fairseq fork).

Relative-position attention (T5/Shaw style) puts a bias B_ij = b_{j-i} inside the softmax:
    RPE:  Attn(X) = softmax(Q K^T / sqrt(d) + B) V
The softmax rows sum to one, so with identical tokens every position outputs the same v: position
information cannot reach the output and RPE Transformers are not universal approximators. URPE
multiplies the attention matrix, AFTER the softmax and without renormalising, by a learnable
Toeplitz matrix C_ij = c_{j-i} (per head):
    URPE: Attn(X) = (softmax(Q K^T / sqrt(d) + B) (.) C) V
As in the official code (fairseq multihead_attention: `attn_weights * ur_rel_pos_bias` after the
softmax, before dropout): b and c are per-head embeddings indexed by the offset j - i, either one
entry per offset ("unique", the official synthetic runs: --rel-pos-unique --ur-attn-unique; our
default) or T5 log buckets (`buckets=64, max_distance=128`, the official defaults otherwise);
b ~ N(0, 0.02) (BERT init), c = 1 (--constant-init-ur-attn, so URPE starts as plain RPE); padded keys
get weight 0 in both. The official code shares b and c across layers; here each layer owns its own.
"relpe" registers the same attention without C, the comparison the paper draws.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_attention
from ._base import QKVAttention

PAPER = 16


def relative_bucket(offset: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """The official signed T5 bucketing of offsets j - i: num_buckets // 2 buckets per sign, the first
    half of them exact, the rest logarithmic up to max_distance; returns the signed bucket value."""
    half = num_buckets // 2
    exact = half // 2
    n = offset.abs()
    log_part = exact + (torch.log(n.clamp_min(1).float() / exact) / math.log(max_distance / exact)
                        * (half - exact)).long()
    value = torch.where(n < exact, n, log_part.clamp_max(half - 1))
    return value * offset.sign()


class RelativeTable(nn.Module):
    """A per-head table over relative offsets j - i, expanded to (H, N, N); Toeplitz by construction."""

    def __init__(self, num_heads: int, max_len: int, buckets: int | None = None, max_distance: int = 128,
                 init: str = "normal"):
        super().__init__()
        offset = torch.arange(max_len)[None, :] - torch.arange(max_len)[:, None]      # j - i
        if buckets is None:
            index, size = offset + max_len - 1, 2 * max_len - 1
        else:
            if buckets < 4 or buckets % 2:
                raise ValueError(f"relative buckets must be an even number >= 4, got {buckets}")
            index, size = relative_bucket(offset, buckets, max_distance) + buckets // 2 - 1, buckets - 1
        self.register_buffer("index", index, persistent=False)
        self.weight = nn.Parameter(torch.empty(size, num_heads))
        if init == "ones":
            nn.init.ones_(self.weight)
        else:
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, n: int) -> torch.Tensor:
        return self.weight[self.index[:n, :n]].permute(2, 0, 1)                         # (H, N, N)


def allowed_pairs(mask: torch.Tensor | None, n: int, causal: bool, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, N, N) of allowed (query, key) pairs; a padded query keeps itself (never all -inf)."""
    if mask is None and not causal:
        return None
    keep = torch.ones(1, 1, n, n, dtype=torch.bool, device=device)
    if causal:
        keep = keep.tril()
    if mask is not None:
        eye = torch.eye(n, dtype=torch.bool, device=device)
        keep = (keep & mask[:, None, None, :]) | ((~mask)[:, None, :, None] & eye)
    return keep


def relative_attention(q, k, v, bias, mask, causal, toeplitz=None):
    """softmax(q k^T / sqrt(d) + bias) V, optionally (. toeplitz) after the softmax; q, k, v (B, H, N, D),
    bias and toeplitz (H, N, N)."""
    keep = allowed_pairs(mask, q.shape[-2], causal, q.device)
    if toeplitz is None:
        attn_mask = bias.to(q.dtype) if keep is None else bias.to(q.dtype).masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias.to(q.dtype)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    weights = logits.softmax(-1) * toeplitz.to(q.dtype)
    if keep is not None:
        weights = weights * keep          # the official zeroes C at padded keys; the softmax already did
    return weights @ v


@register_attention("relpe")
class RelPEAttention(QKVAttention):
    """Softmax attention with a learned relative-position bias b_{j-i} per head (no absolute positions).
    Options: buckets (None = one entry per offset, or an even number of T5 log buckets), max_distance."""

    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, buckets: int | None = None,
                 max_distance: int = 128):
        super().__init__(dim, num_heads, max_len, causal, dropout)
        self.rel_bias = RelativeTable(num_heads, max_len, buckets, max_distance, init="normal")

    def toeplitz(self, n: int):
        return None

    def mix(self, q, k, v, mask):
        n = q.shape[-2]
        return relative_attention(q, k, v, self.rel_bias(n), mask, self.causal, self.toeplitz(n))


@register_attention("urpe")
class URPEAttention(RelPEAttention):
    """RPE attention whose softmax output is multiplied by a learnable per-head Toeplitz C (c = 1 at init).
    Options: buckets, max_distance (for both b and c, as the official ur_rp_bucket/ur_max_rp), c_init
    ("ones", the official --constant-init-ur-attn, or "normal")."""

    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, buckets: int | None = None,
                 max_distance: int = 128, c_init: str = "ones"):
        super().__init__(dim, num_heads, max_len, causal, dropout, buckets, max_distance)
        if c_init not in ("ones", "normal"):
            raise ValueError(f"attention 'urpe': c_init must be 'ones' or 'normal', got {c_init!r}")
        self.ur_scale = RelativeTable(num_heads, max_len, buckets, max_distance, init=c_init)

    def toeplitz(self, n: int):
        return self.ur_scale(n)
