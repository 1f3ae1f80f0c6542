"""Retention parts: per-head decay rates, distance-decay masks and the rotary position rotation.

Retention (RetNet, Sun et al. 2023, arXiv 2307.08621) weighs the interaction of tokens i and j by
gamma_h ** dist(i, j), one decay rate gamma_h per head, and rotates queries and keys by their
position (xPos-style rotary without the scaling). RetNet's parallel form multiplies
q k^T by D[i, j] = gamma^(i - j) (i >= j); vision variants such as RMT (arXiv 2309.11523) add
dist * log(gamma) to the attention logits before a softmax instead. Everything here works in log
space: a mask is dist(i, j) * log(gamma_h), to be added to logits (or exp()'d for RetNet's product).

The functions are pure and take the device and dtype to build on, so a model can make its masks
for whatever input size it sees (and on the `meta` device) instead of storing them.
"""
from __future__ import annotations

import torch

__all__ = ["retention_log_decay", "rotary_angles", "rotary_sin_cos", "rotate_every_two", "apply_rotary",
           "decay_mask_1d", "manhattan_decay_mask"]


def retention_log_decay(num_heads: int, init_value: float = 5.0, heads_range: float | None = None,
                        device=None) -> torch.Tensor:
    """log(gamma_h) for h = 0..num_heads-1, gamma_h = 1 - 2 ** -(init_value + heads_range * h / num_heads).

    heads_range=None means num_heads, which gives RetNet's gamma_h = 1 - 2 ** (-5 - h) for
    init_value 5. Larger h decays more slowly (gamma closer to 1): heads see further.
    Computed in float32 (the precision the official codes use).
    """
    if heads_range is None:
        heads_range = num_heads
    h = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log(1 - 2 ** (-init_value - heads_range * h / num_heads))


def rotary_angles(head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """(head_dim,) rotation speeds theta_i = base ** -(i / (head_dim/2 - 1)), i < head_dim/2, each
    repeated for the two channels of its pair (0,1), (2,3), ... (RetNet's spacing: linspace(0, 1)
    in the exponent, so the slowest pair turns at exactly 1/base)."""
    if head_dim % 2:
        raise ValueError(f"rotary position needs an even head dim, got {head_dim}")
    theta = 1.0 / (base ** torch.linspace(0, 1, head_dim // 2, device=device))
    return theta.repeat_interleave(2)


def rotary_sin_cos(positions: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sin and cos of positions x angle: (..., ) positions and (d,) angles -> two (..., d) tensors."""
    phase = positions[..., None] * angle
    return torch.sin(phase), torch.cos(phase)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of each channel pair."""
    first, second = x[..., 0::2], x[..., 1::2]
    return torch.stack((-second, first), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair of x (..., d) by its phase: x * cos + rotate_every_two(x) * sin."""
    return x * cos + rotate_every_two(x) * sin


def decay_mask_1d(length: int, log_decay: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """(heads, L, L) log-space decay |i - j| * log(gamma_h) along one axis.

    With causal=True (RetNet's parallel form) entries with j > i are -inf, so exp() of the mask is
    RetNet's D matrix and a softmax over it never looks ahead.
    """
    index = torch.arange(length, dtype=log_decay.dtype, device=log_decay.device)
    dist = index[:, None] - index[None, :]
    mask = dist.abs() * log_decay[:, None, None]
    if causal:
        mask = mask.masked_fill(dist < 0, float("-inf"))
    return mask


def manhattan_decay_mask(h: int, w: int, log_decay: torch.Tensor) -> torch.Tensor:
    """(heads, h*w, h*w) log-space decay (|dh| + |dw|) * log(gamma_h) between the tokens of an
    h x w map flattened row-major (RMT's Manhattan spatial decay)."""
    rows = torch.arange(h, dtype=log_decay.dtype, device=log_decay.device)
    cols = torch.arange(w, dtype=log_decay.dtype, device=log_decay.device)
    dh = (rows[:, None] - rows[None, :]).abs()  # (h, h)
    dw = (cols[:, None] - cols[None, :]).abs()  # (w, w)
    dist = (dh[:, None, :, None] + dw[None, :, None, :]).reshape(h * w, h * w)
    return dist * log_decay[:, None, None]
