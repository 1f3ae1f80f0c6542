"""MemoryFormer (catalog 31): "MemoryFormer: Minimize Transformer Computation by Removing
Fully-Connected Layers", Ding, Tang, Qin, Zhou, Xu, Li, Han, Liao, Wang, NeurIPS 2024, arXiv 2411.12992
(code: C0-Design/MemoryFormer, a GPT-NeoX fork; that it is the authors' release is unverified).

A Memory Layer replaces y = W x: x in R^d is cut into K = d / tau chunks z_k in R^tau, each chunk is
hashed by its signs to a bucket h(z_k) = sum_j [z_kj >= 0] 2^(tau-1-j) of a learnable table T_k (2^tau rows
of width d_out), and y = sum_k p(z_k) T_k[h(z_k)] + bias: K gathered rows instead of d x d_out MACs.
p(z) = softmax_i <z, b_i> over the 2^tau sign vectors b_i, read at the chosen bucket = prod_j sigmoid(2|z_j|).

What follows the official code (memory_module/memory.py, compute_code_score/kernel.py,
megatron/model/transformer.py, configs/memoryformer_tiny.yml), and where we differ:
- no hashing projection (remove_projection: true), code_length tau = 8, tables 0.02 N(0,1), bias 0.001 N(0,1).
- the weight actually used by the repo is p(z) = |z|_1 prod_j sigmoid(2|z_j|) (the paper's form is left
  commented out there); `score="official"` (default) is that, `score="paper"` is prod_j sigmoid(2|z_j|).
  Gradients reach the tables through the gather and reach the input only through p (the bucket index is
  piecewise constant).
- Q, K and V share one hash of x (the official `_forward_memory_qkv`), so the three layers are one memory
  layer of width 3 d; attention itself stays softmax (SDPA). The official config deletes the attention
  output projection (del_dense: true): `out_proj="none"` (default); "memory" or "linear" put one back.
- MemoryFFN is the official FFN replacement ("MemoryBlock", extra_bit mode): memory layer d -> K (tau + 2),
  LayerNorm, memory layer with code length tau + 2 -> d, no activation. It is not used by the mechanism.
`memory_layer_cost` counts parameters and per-token multiply-adds of a memory layer against the nn.Linear
it replaces: K 2^tau d_out + d_out parameters (2^tau / tau times those of a d x d_out Linear) and
K (d_out + tau) MACs (the weighted sum of K rows plus the tau-factor product per chunk): tau times fewer
than the Linear's d d_out (the method's O(d^2 / tau) per token).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_attention
from .softmax import SoftmaxAttention

PAPER = 31

__all__ = ["hash_codes", "bucket_weight", "MemoryLayer", "MemoryFFN", "MemoryFormerAttention",
           "memory_layer_cost"]


def hash_codes(z: torch.Tensor) -> torch.Tensor:
    """(..., K, tau) chunks -> (..., K) int64 bucket ids: the sign bits read big-endian (z >= 0 is a 1)."""
    tau = z.shape[-1]
    place = 2 ** torch.arange(tau - 1, -1, -1, device=z.device)
    return ((z >= 0).long() * place).sum(-1)


def bucket_weight(z: torch.Tensor, score: str = "official") -> torch.Tensor:
    """(..., K, tau) -> (..., K) weight of the retrieved row. "paper": the softmax over all 2^tau sign
    vectors of <z, b>, at the selected bucket, = prod_j 1 / (1 + exp(-2|z_j|)); "official": that times |z|_1."""
    a = z.abs()
    p = torch.sigmoid(2 * a).prod(-1)
    if score == "official":
        return a.sum(-1) * p
    if score == "paper":
        return p
    raise ValueError(f"memoryformer: score must be 'official' or 'paper', got {score!r}")


class MemoryLayer(nn.Module):
    """y = sum_k p(z_k) T_k[h(z_k)] + bias for x (..., in_dim) cut into in_dim / code_length chunks."""

    def __init__(self, in_dim: int, out_dim: int, code_length: int = 8, score: str = "official",
                 bias: bool = True):
        super().__init__()
        if in_dim % code_length:
            raise ValueError(f"memoryformer: input width {in_dim} is not a multiple of code_length {code_length}")
        bucket_weight(torch.zeros(1, 1), score)          # validate the option early
        self.in_dim, self.out_dim, self.code_length, self.score = in_dim, out_dim, code_length, score
        self.num_tables = in_dim // code_length
        self.table_size = 2 ** code_length
        self.tables = nn.Parameter(0.02 * torch.randn(self.num_tables * self.table_size, out_dim))
        self.bias = nn.Parameter(0.001 * torch.randn(out_dim)) if bias else None

    def extra_repr(self):
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_tables={self.num_tables}, "
                f"code_length={self.code_length}, score={self.score!r}")

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat row indices (..., K) into `tables` and their weights (..., K)."""
        z = x.unflatten(-1, (self.num_tables, self.code_length))
        offset = torch.arange(self.num_tables, device=x.device) * self.table_size
        return hash_codes(z) + offset, bucket_weight(z, self.score)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, weight = self.lookup(x)
        lead = x.shape[:-1]
        y = F.embedding_bag(rows.reshape(-1, self.num_tables), self.tables, mode="sum",
                            per_sample_weights=weight.reshape(-1, self.num_tables).to(self.tables.dtype))
        y = y.reshape(*lead, self.out_dim)
        return y if self.bias is None else y + self.bias


class MemoryFFN(nn.Module):
    """The official FFN replacement (extra_bit mode): memory layer dim -> K (tau + extra_bits), LayerNorm,
    memory layer with code length tau + extra_bits -> out_dim; no activation."""

    def __init__(self, dim: int, out_dim: int | None = None, code_length: int = 8, extra_bits: int = 2,
                 score: str = "official"):
        super().__init__()
        hidden = (dim // code_length) * (code_length + extra_bits)
        self.fc1 = MemoryLayer(dim, hidden, code_length, score)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = MemoryLayer(hidden, out_dim or dim, code_length + extra_bits, score)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def memory_layer_cost(in_dim: int, out_dim: int, code_length: int = 8, bias: bool = True) -> dict:
    """Parameters and per-token multiply-adds of a memory layer and of the nn.Linear it replaces."""
    k = in_dim // code_length
    return dict(params=k * 2 ** code_length * out_dim + (out_dim if bias else 0),
                macs=k * (out_dim + code_length),
                linear_params=in_dim * out_dim + (out_dim if bias else 0),
                linear_macs=in_dim * out_dim)


@register_attention("memoryformer")
class MemoryFormerAttention(SoftmaxAttention):
    """Softmax attention (the shared SDPA path) whose Q, K, V come from one shared-hash memory layer
    of width 3 dim; the output projection is none (official), a memory layer or a Linear."""

    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, code_length: int = 8,
                 score: str = "official", out_proj: str = "none"):
        super().__init__(dim, num_heads, max_len, causal, dropout)
        self.qkv = MemoryLayer(dim, 3 * dim, code_length, score)
        if out_proj == "none":
            self.proj = nn.Identity()
        elif out_proj == "memory":
            self.proj = MemoryLayer(dim, dim, code_length, score)
        elif out_proj == "linear":
            pass                                          # the base class's nn.Linear
        else:
            raise ValueError(f"memoryformer: out_proj must be 'none', 'memory' or 'linear', got {out_proj!r}")
