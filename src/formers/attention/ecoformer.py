"""EcoFormer (catalog 36): "EcoFormer: Energy-Saving Attention with Linear Complexity",
Liu, Pan, He, Cai, Zhuang, NeurIPS 2022, arXiv 2209.09004 (official code: ziplab/EcoFormer).

Queries and keys (one shared projection, rows L2-normalised) are hashed to b-bit codes
H(x) = sign(A (kappa(x) - mu)) in {-1,+1}^b, kappa(x)_j = exp(-|x - a_j|^2 / (2 sigma)) over m anchors a_j;
for +-1 codes H_i.H_j = b - 2 Ham(H_i, H_j), so the shifted Hamming affinity s_ij = H_i.H_j + c (c = b + 1 > b)
is positive and out_i = sum_j s_ij v_j / sum_j s_ij = (H_i sum_j H_j^T v_j + c sum_j v_j) / (H_i.sum_j H_j + c N),
linear in N, with multiplications by +-1 only (the energy claim).

What follows the official code (pvt/performer.py, pvt/hashing/ksh.py), and where we differ:
- the hash is kernel-based supervised hashing (KSH), trained self-supervised ONCE, on the first forward
  batch (then frozen; `retrain_hash()` asks for a new fit, as the official `set_retrain`). Targets from the
  normalised qk similarities: S_ij = +1 for the `topk` largest and -1 for the `topk` smallest of row i
  (the smallest overwrite), anchors = m random tokens of the first sample, mu = the mean kernel vector.
  Bits are fitted greedily: S <- b S; for each bit r, Nesterov SGD (lr 5e-4, momentum 0.9, `hash_iters`
  steps) on -y^T S y / (N b) with the smooth sign y = 2 sigmoid(K a_r) - 1; a_r is kept only if the
  binarised loss improves (averaged over batch and heads, as official); then S <- S - y y^T.
  We never form S: S_r = b S0 - sum_{s<r} y_s y_s^T with S0 holding 2 topk entries per row, so
  y^T S_r y = b y^T S0 y - sum_s (y_s.y)^2 costs O(N (topk + r)) instead of O(N^2) (the same number).
- A, mu, anchors are buffers (no gradient, as official: A.detach()); gradients reach the projection
  through the straight-through sign (identity where |pre-activation| < 1, zero elsewhere). Our sign maps
  0 to +1 (official torch.sign gives 0 there) so codes are always +-1.
- sigma = the mean squared token-anchor distance of the current input per (sample, head), as official,
  taken over real tokens only (so padding changes nothing). With causal=True the input mean would let
  future tokens move a token's code, so the causal form uses the sigma stored at hash-training time.
- value_bias="sum" (default) is the normalised form above (row weights sum to 1, equal to the explicit
  N x N form); value_bias="own" is the official code's form, numerator c v_i instead of c sum_j v_j while
  the denominator keeps c N (rows then do not sum to 1).
Padding: padded tokens take no part in hash fitting, sigma, or as keys.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from . import register_attention
from ._base import QKVAttention, zero_padded
from .linear import linear_attention

PAPER = 36


class _STESign(torch.autograd.Function):
    """+-1 sign (0 -> +1); backward passes the gradient where |x| < 1 (straight-through, clipped)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() < 1).to(g.dtype)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    return _STESign.apply(x)


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances between +-1 codes a (..., N, b) and b (..., M, b), counted bit by bit."""
    return (a.unsqueeze(-2) != b.unsqueeze(-3)).sum(-1)


def _masked_mean(x: torch.Tensor, w: torch.Tensor, dims) -> torch.Tensor:
    w = w.expand_as(x)
    return (x * w).sum(dims, keepdim=True) / w.sum(dims, keepdim=True).clamp_min(1e-12)


def ksh_loss(y: torch.Tensor, s0_idx: torch.Tensor, s0_val: torch.Tensor, prev: torch.Tensor | None,
             nbits: int, n_real: torch.Tensor) -> torch.Tensor:
    """-y^T S y / (N b) averaged over (batch, head) with S = b S0 - sum_s y_s y_s^T, without forming S.

    y (B, H, N) (zero at padded tokens); S0 as (B, H, N, T) column indices and values; prev the
    earlier bits' binary codes (B, H, N, r) or None; n_real (B, 1) the real-token counts.
    """
    gathered = torch.gather(y, -1, s0_idx.flatten(-2)).view_as(s0_idx)
    quad = nbits * (y * (gathered * s0_val).sum(-1)).sum(-1)          # b y^T S0 y, (B, H)
    if prev is not None:
        quad = quad - (torch.einsum("bhnr,bhn->bhr", prev, y) ** 2).sum(-1)
    return (-quad / (n_real * nbits)).mean()


def ksh_targets(x: torch.Tensor, real: torch.Tensor, topk: int, rows: int = 1024):
    """The KSH similarity targets S0 in sparse form: for each real query row of x (B, H, N, D), the topk most
    similar real keys (+1) and the topk least similar (-1; a key in both is -1, as the official scatter
    writes the smallest last). Returns column indices and values (B, H, N, 2 topk); one sample and at
    most `rows` query rows at a time, so memory stays O(rows N) however long the sequence."""
    b, _, n, _ = x.shape
    k = min(topk, n)
    idx_l, idx_s, ok_l, ok_s = [], [], [], []
    for i in range(b):
        key_pad = ~real[i][None, None, :]
        parts = []
        for r0 in range(0, n, rows):
            sim = x[i, :, r0:r0 + rows] @ x[i].transpose(-2, -1)                 # (H, rows, N)
            parts.append(sim.masked_fill(key_pad, float("-inf")).topk(k, -1)
                         + sim.masked_fill(key_pad, float("inf")).topk(k, -1, largest=False))
        hi, il, lo, is_ = (torch.cat(t, 1) for t in zip(*parts))
        idx_l.append(il), idx_s.append(is_)
        ok_l.append(torch.isfinite(hi) & real[i][None, :, None])
        ok_s.append(torch.isfinite(lo) & real[i][None, :, None])
    idx_l, idx_s, ok_l, ok_s = (torch.stack(t) for t in (idx_l, idx_s, ok_l, ok_s))
    ok_l = ok_l & ~((idx_l.unsqueeze(-1) == idx_s.unsqueeze(-2)) & ok_s.unsqueeze(-2)).any(-1)
    return torch.cat([idx_l, idx_s], -1), torch.cat([ok_l.to(x.dtype), -ok_s.to(x.dtype)], -1)


class KernelHash(nn.Module):
    """Kernelised hash of (B, H, N, D) rows to b-bit +-1 codes, fitted by KSH (see the module docstring)."""

    def __init__(self, num_heads: int, head_dim: int, nbits: int = 16, num_anchors: int = 25, topk: int = 10,
                 lr: float = 5e-4, momentum: float = 0.9, iters: int = 100):
        super().__init__()
        self.nbits, self.m, self.topk = nbits, num_anchors, topk
        self.lr, self.momentum, self.iters = lr, momentum, iters
        self.register_buffer("A", torch.randn(num_heads, nbits, num_anchors))
        self.register_buffer("mu", torch.zeros(1, num_heads, 1, num_anchors))
        self.register_buffer("anchors", torch.zeros(1, num_heads, num_anchors, head_dim))
        self.register_buffer("sigma", torch.ones(1, num_heads, 1, 1))
        self.trained = False
        # a loaded state dict carries a fitted hash
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "trained", True))

    def sq_dist(self, x: torch.Tensor) -> torch.Tensor:
        a = self.anchors.to(x.dtype)
        d = (x * x).sum(-1, keepdim=True) + (a * a).sum(-1).unsqueeze(-2) - 2 * x @ a.transpose(-2, -1)
        return d.clamp_min(0)                                              # (B, H, N, m)

    def kernel(self, x: torch.Tensor, w: torch.Tensor, stored_sigma: bool) -> torch.Tensor:
        """kappa(x) - mu; w (B, 1, N, 1) real-token weights."""
        d = self.sq_dist(x)
        sigma = self.sigma.to(x.dtype) if stored_sigma else _masked_mean(d, w, (-2, -1))
        return torch.exp(-d / (2 * sigma)) - self.mu.to(x.dtype)

    def forward(self, x: torch.Tensor, w: torch.Tensor, stored_sigma: bool = False) -> torch.Tensor:
        pre = torch.einsum("bhnm,hkm->bhnk", self.kernel(x, w, stored_sigma), self.A.to(x.dtype))
        return ste_sign(pre)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, mask: torch.Tensor | None, anchors: torch.Tensor | None = None):
        """Fit anchors, mu, sigma and A on one batch x (B, H, N, D) of normalised rows (anchors (1, H, m, D)
        may be given; by default m random real tokens of the first sample, with replacement only if it has
        fewer than m)."""
        b, h, n, _ = x.shape
        real = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
        w = real[:, None, :, None].to(x.dtype)
        if anchors is None:
            p = real[0].to(torch.float)
            anchors = x[:1, :, torch.multinomial(p, self.m, replacement=int(real[0].sum()) < self.m)]
        self.anchors.copy_(anchors)
        d = self.sq_dist(x)
        sigma = _masked_mean(d, w, (-2, -1))                                # (B, H, 1, 1)
        self.sigma.copy_(sigma.mean(0, keepdim=True))
        kern = torch.exp(-d / (2 * sigma))
        self.mu.copy_(_masked_mean(kern, w, (0, 2)))
        kern = (kern - self.mu) * w
        s0_idx, s0_val = ksh_targets(x, real, self.topk)
        n_real = real.sum(1, keepdim=True).to(x.dtype)
        prev = None
        for r in range(self.nbits):
            a0 = self.A[:, r].to(x.dtype).clone()
            a = a0.clone().requires_grad_(True)
            opt = torch.optim.SGD([a], lr=self.lr, momentum=self.momentum, nesterov=True)
            with torch.enable_grad():
                for _ in range(self.iters):
                    y = (2 * torch.sigmoid(torch.einsum("bhnm,hm->bhn", kern, a)) - 1) * w[..., 0]
                    loss = ksh_loss(y, s0_idx, s0_val, prev, self.nbits, n_real)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            codes = []
            for cand in (a0, a.detach()):
                y = torch.where(torch.einsum("bhnm,hm->bhn", kern, cand) > 0, 1.0, -1.0).to(x.dtype) * w[..., 0]
                codes.append((ksh_loss(y, s0_idx, s0_val, prev, self.nbits, n_real), y, cand))
            (l_old, y_old, _), (l_new, y_new, a_new) = codes
            if l_new < l_old:
                self.A[:, r].copy_(a_new)
            y = (y_new if l_new < l_old else y_old).unsqueeze(-1)
            prev = y if prev is None else torch.cat([prev, y], -1)
        self.trained = True


def hamming_linear_attention(hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, shift: float,
                             mask: torch.Tensor | None, causal: bool = False, value_bias: str = "sum"):
    """Attention with the affinity s_ij = hq_i.hk_j + shift over real keys, in linear form.

    "sum": the normalised form, features [hq, shift] . [hk, 1] through linear attention;
    "own": the official numerator hq_i sum_j hk_j v_j^T + shift v_i over the denominator hq_i.sum_j hk_j + shift N.
    """
    if value_bias == "sum":
        fq = torch.cat([hq, torch.full_like(hq[..., :1], shift)], -1)
        fk = zero_padded(torch.cat([hk, torch.ones_like(hk[..., :1])], -1), mask)
        return linear_attention(fq, fk, v, causal, eps=0.0)
    hk, vk = zero_padded(hk, mask), zero_padded(v, mask)
    real = (torch.ones_like(v[:, :1, :, 0]) if mask is None else mask[:, None, :].to(v.dtype))   # (B, 1, N)
    if causal:
        kv = torch.einsum("bhnk,bhnd->bhnkd", hk, vk).cumsum(2)
        num = torch.einsum("bhnk,bhnkd->bhnd", hq, kv)
        den = (hq * hk.cumsum(2)).sum(-1)
        count = real.cumsum(-1)
    else:
        num = hq @ (hk.transpose(-2, -1) @ vk)
        den = (hq * hk.sum(2, keepdim=True)).sum(-1)
        count = real.sum(-1, keepdim=True)
    return (num + shift * v) / (den + shift * count).unsqueeze(-1)


@register_attention("ecoformer")
class EcoFormerAttention(QKVAttention):
    """Options: nbits (b, 16), num_anchors (m, 25 as the PVTv2 configs), topk (10), hash_iters (100),
    hash_lr (5e-4; the official SGD settings), shift (c, default b + 1), value_bias ("sum" | "own", see the module docstring), qkv_bias."""

    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, nbits: int = 16, num_anchors: int = 25,
                 topk: int = 10, hash_iters: int = 100, hash_lr: float = 5e-4, shift: float | None = None,
                 value_bias: str = "sum", qkv_bias: bool = True):
        super().__init__(dim, num_heads, max_len, causal, dropout, qkv_bias)
        if value_bias not in ("sum", "own"):
            raise ValueError(f"attention 'ecoformer': value_bias must be 'sum' or 'own', got {value_bias!r}")
        del self.qkv                                            # queries and keys share one projection
        self.qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.hash = KernelHash(num_heads, self.head_dim, nbits, num_anchors, topk, lr=hash_lr, iters=hash_iters)
        self.nbits, self.value_bias = nbits, value_bias
        self.shift = float(nbits + 1 if shift is None else shift)

    def retrain_hash(self):
        """Refit the hash functions on the next forward batch (the official set_retrain)."""
        self.hash.trained = False

    def codes(self, qk: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, H, N, D) projected rows -> (B, H, N, b) +-1 codes (fits the hash first if it is not fitted)."""
        qk = qk / qk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if not self.hash.trained:
            self.hash.fit(qk.detach(), mask)
        w = (torch.ones_like(qk[..., :1]) if mask is None else mask[:, None, :, None].to(qk.dtype))
        return self.hash(qk, w, stored_sigma=self.causal)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check(x, mask)
        qk = rearrange(self.qk(x), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v(x), "b n (h d) -> b h n d", h=self.num_heads)
        h = self.codes(qk, mask)
        out = hamming_linear_attention(h, h, v, self.shift, mask, self.causal, self.value_bias)
        return self.drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
