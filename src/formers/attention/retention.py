"""Retention (RetNet: "Retentive Network: A Successor to Transformer for Large Language Models", Sun, Dong,
Huang, Ma, Xia, Xue, Wang, Wei, arXiv 2307.08621; official code: microsoft/torchscale), the operator RMT
(catalog 8, models/rmt.py) brings to vision. PAPER is None: catalog 8 is RMT's, taken by models/rmt.py.

Multi-scale retention, per head h with decay gamma_h = 1 - 2^(-5-h) and rotary-rotated q, k (k scaled by d^-1/2):
  parallel    O = (Q K^T * D) V,  D_nm = gamma^(n-m) for n >= m else 0   (no softmax)
  recurrent   S_n = gamma S_{n-1} + k_n^T v_n,  o_n = q_n S_n
  chunkwise   inside a chunk the parallel form; across chunks R_i = gamma^B R_{i-1} + K_[i]^T (V_[i] * zeta),
              o_[i] += (Q_[i] * xi) R_{i-1}, zeta_j = gamma^(B-1-j), xi_j = gamma^(j+1)
then a per-head norm (RMSNorm without affine, as torchscale), the swish gate swish(X W_G) * ., and W_O.

What follows torchscale (torchscale/component/multiscale_retention.py, architecture/retnet.py), and where
we differ:
- q, k, v, g, out projections without bias, xavier_uniform with gain 2^-2.5 (out: 2^-1); rotation
  x cos + rotate_every_two(x) sin of q and k at positions 0..N-1 (formers.layers.retention).
- torchscale divides D by sqrt(row sum of D) (its recurrent form carries the same running scale): we
  apply that factor to the output of the raw forms, identically in all three, so the RMSNorm's eps acts on
  the same magnitudes as in torchscale (bidirectional: the row sums over real keys, so padding is inert).
  torchscale's parallel and chunkwise forms also divide the scores by their |row sum| clamped to
  [1, 5e4] (a data-dependent per-row factor, which its recurrent form lacks): we leave it out, so the
  three forms agree exactly; the per-head RMSNorm removes such factors up to its eps.
- value_factor: v and g have value_factor * dim channels (torchscale's RetNet uses 2); default 1 here,
  the width every LRA mechanism gets.
- causal=True: RetNet's operator, all three forms (mode="parallel" default, "recurrent", "chunkwise").
  causal=False (LRA's bidirectional encoders) is an adaptation, not the paper's operator: the parallel
  form with the symmetric decay D_nm = gamma^|n-m|; the recurrent and chunkwise forms are causal only
  and refuse it.
Padding: padded keys and values are zeroed, so they add nothing to any sum.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import register_attention
from ._base import QKVAttention, zero_padded
from formers.layers.retention import (apply_rotary, decay_mask_1d, retention_log_decay, rotary_angles,
                                      rotary_sin_cos)

PAPER = None

__all__ = ["retention_parallel", "retention_recurrent", "retention_chunkwise", "MultiScaleRetention"]


def retention_parallel(q, k, v, log_decay, causal=True):
    """q, k (B, H, N, Dk), v (B, H, N, Dv), log_decay (H,) -> (B, H, N, Dv): (Q K^T * D) V."""
    d = decay_mask_1d(q.shape[-2], log_decay.to(q.dtype), causal).exp()
    return ((q @ k.transpose(-2, -1)) * d) @ v


def retention_recurrent(q, k, v, log_decay):
    """The causal recurrence S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n (a loop over tokens)."""
    gamma = log_decay.to(q.dtype).exp()[:, None, None]
    s = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    out = []
    for n in range(q.shape[-2]):
        s = gamma * s + k[:, :, n, :, None] * v[:, :, n, None, :]
        out.append((q[:, :, n, None, :] @ s)[:, :, 0])
    return torch.stack(out, 2)


def retention_chunkwise(q, k, v, log_decay, chunk: int = 64):
    """Causal chunkwise retention: the parallel form inside chunks of `chunk` tokens, the cross-chunk
    states R_i = sum_{j<i} gamma^(B(i-1-j)) K_[j]^T (V_[j] * zeta) summed for all chunks at once."""
    b, h, n, _ = q.shape
    pad = (-n) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q, k, v = (rearrange(t, "b h (c s) d -> b h c s d", s=chunk) for t in (q, k, v))
    ld = log_decay.to(q.dtype)
    inner = ((q @ k.transpose(-2, -1)) * decay_mask_1d(chunk, ld, causal=True).exp()[:, None]) @ v
    pos = torch.arange(chunk, dtype=q.dtype, device=q.device)
    zeta = ((chunk - 1 - pos) * ld[:, None]).exp()                # (H, B): decay to the chunk's end
    xi = ((pos + 1) * ld[:, None]).exp()                          # (H, B): decay from the previous end
    kv = k.transpose(-2, -1) @ (v * zeta[:, None, :, None])       # (b, h, c, Dk, Dv)
    nc = q.shape[2]
    idx = torch.arange(nc, dtype=q.dtype, device=q.device)
    gap = idx[:, None] - 1 - idx[None, :]                          # state before chunk i holds chunk j < i
    w = (chunk * gap * ld[:, None, None]).exp() * (gap >= 0)       # (H, c, c)
    state = torch.einsum("hij,bhjde->bhide", w, kv)
    cross = (q * xi[:, None, :, None]) @ state
    return rearrange(inner + cross, "b h c s d -> b h (c s) d")[:, :, :n]


@register_attention("retention")
class MultiScaleRetention(nn.Module):
    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, mode: str = "parallel",
                 chunk_size: int = 64, value_factor: int = 1, gamma_init: float = 5.0, eps: float = 1e-6):
        super().__init__()
        if mode not in ("parallel", "recurrent", "chunkwise"):
            raise ValueError(f"attention 'retention': mode must be parallel, recurrent or chunkwise, got {mode!r}")
        if not causal and mode != "parallel":
            raise ValueError(f"attention 'retention': the {mode} form is causal only; causal=False (symmetric "
                             "decay) needs mode='parallel'")
        self.dim, self.num_heads, self.max_len, self.causal = dim, num_heads, max_len, causal
        self.mode, self.chunk_size, self.eps = mode, chunk_size, eps
        self.key_dim = dim // num_heads
        self.value_dim = value_factor * dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.out_proj = nn.Linear(self.value_dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("log_decay", retention_log_decay(num_heads, gamma_init), persistent=False)
        self.register_buffer("angle", rotary_angles(self.key_dim), persistent=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out_proj.weight, gain=2 ** -1)

    check = QKVAttention.check

    def retain(self, q, k, v, mode: str | None = None):
        mode = mode or self.mode
        if mode == "parallel":
            return retention_parallel(q, k, v, self.log_decay, self.causal)
        if not self.causal:
            raise ValueError(f"attention 'retention': the {mode} form is causal only")
        if mode == "recurrent":
            return retention_recurrent(q, k, v, self.log_decay)
        if mode == "chunkwise":
            return retention_chunkwise(q, k, v, self.log_decay, self.chunk_size)
        raise ValueError(f"attention 'retention': unknown mode {mode!r}")

    def decay_norm(self, n: int, mask: torch.Tensor | None, dtype) -> torch.Tensor:
        """1 / sqrt(row sums of D) over the keys a token may see: torchscale's D / sqrt(D 1), applied to the
        output (the same for all three forms). (H, N), or (B, H, N) when bidirectional with padding."""
        ld = self.log_decay.to(dtype)
        if self.causal:                                  # sum_{j<=n} gamma^j, closed form
            pos = torch.arange(n, dtype=dtype, device=ld.device)
            rows = -torch.expm1((pos + 1) * ld[:, None]) / -torch.expm1(ld)[:, None]
        else:
            d = decay_mask_1d(n, ld).exp()
            rows = d.sum(-1) if mask is None else torch.einsum("hnm,bm->bhn", d, mask.to(dtype))
        return rows.clamp_min(1e-30).rsqrt()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str | None = None) -> torch.Tensor:
        self.check(x, mask)
        n = x.shape[1]
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.num_heads) * self.key_dim ** -0.5
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        sin, cos = rotary_sin_cos(torch.arange(n, device=x.device, dtype=x.dtype), self.angle.to(x.dtype))
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        k, v = zero_padded(k, mask), zero_padded(v, mask)
        o = self.retain(q, k, v, mode) * self.decay_norm(n, mask, x.dtype)[..., None]
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.eps)       # per-head RMSNorm, no affine
        o = F.silu(self.g_proj(x)) * rearrange(o, "b h n d -> b n (h d)")
        return self.drop(self.out_proj(o))
