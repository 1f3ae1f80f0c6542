"""LMUFormer (catalog 28): "LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory
Units", Liu, Datta, Li, Beerel, ICLR 2024, arXiv 2402.04882 (official code: zeyuliu1037/LMUFormer).

The token mixer is a Legendre Memory Unit (Voelker et al. 2019): a scalar u_t = f(W_u x_t) drives a
d-dimensional memory theta m'(t) = A m(t) + B u(t) (A, B the Pade delay system, so m holds the last
theta steps of u in shifted Legendre coordinates), discretised by zero-order hold (dt = 1):
Ad = expm(A / theta), Bd = (A / theta)^-1 (Ad - I) B / theta; m_t = Ad m_{t-1} + Bd u_t = sum_{j<=t} H_{t-j} u_j
with H_k = Ad^k Bd; then h_t = f(W_h [m_t; x_t]) (f = ReLU, m used as is) and a 1x1 projection + BatchNorm.

What follows the official code (src/blocks/lmu_cell.py LMUFFTCell / SpikingLMUFFTCell, src/blocks/lmu.py
LMU / SLMU), and where we differ:
- A_ij = (2i+1)/theta * (-1 if i < j else (-1)^(i-j+1)), B_i = (2i+1)/theta * (-1)^i, discretised as scipy's
  cont2discrete(method="zoh", dt=1) does (expm of the block matrix [[A, B], [0, 0]]), in float64.
- mode="parallel" (default, the official forward): m = irfft(rfft(u, 2N) rfft(H, 2N))[:N], a linear (causal)
  convolution by FFT, O(N log N d). mode="recurrent" (the official forward_recurrent): the step-by-step
  recurrence, a Python loop over tokens, for streaming and as the tested alternative.
- The official precomputes H for one fixed seq_len (128); we build H for each length met (cached), by
  repeated squaring (H[k:2k] = Ad^k H[:k]) in float64, so no loop over tokens. theta defaults to
  max_len (the official theta = seq_len); memory_size defaults to dim (official LMU), 2 dim when spiking
  (official SLMU). f_u = f_h = ReLU; W_u: dim -> 1, W_h: memory + dim -> dim; num_heads is unused (as official).
- spiking=True (official SpikingLMUFFTCell + SLMU): BatchNorm then a LIF neuron (spikingjelly
  MultiStepLIFNode: tau 2, threshold 1, hard reset to 0, detached reset, sigmoid surrogate alpha 4) on u,
  on m and on h, and after the output BatchNorm; the LIF time axis is the token axis, as official, so it
  is a recurrence (loop over tokens) in both modes. The official forward_recurrent skips the LIF on m;
  ours applies it in both modes so the two forms agree.
- The LMU is causal by nature: causal=False runs the same causal memory (a token sees only its past).
  So a CLS token prepended at position 0 sees nothing of the sequence: pool by mean (or the last real
  token) when a classifier uses this mixer.
- Padding: u is zeroed at padded positions (they add nothing to the memory), BatchNorm statistics are
  taken over real tokens only, and a LIF neuron keeps its state across a padded step, so padding
  appended at the end never changes the real outputs (padding inside a sequence still counts as elapsed
  time for the memory's delay window). In training mode BatchNorm's batch statistics mix all real tokens
  of the batch (as official), so strict causality holds in eval mode.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_attention
from ._base import QKVAttention

PAPER = 28

__all__ = ["lmu_state_space", "zoh_discretize", "impulse_response", "lif", "MaskedBatchNorm", "LMUMixer"]


def lmu_state_space(order: int, theta: float, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (A, B) of the LMU with 1/theta folded in: (order, order) and (order, 1)."""
    q = torch.arange(order, dtype=dtype, device="cpu")
    r = (2 * q + 1)[:, None] / theta
    i, j = q[:, None], q[None, :]
    a = r * torch.where(i < j, -1.0, (-1.0) ** (i - j + 1)).to(dtype)
    b = r * ((-1.0) ** q)[:, None].to(dtype)
    return a, b


def zoh_discretize(a: torch.Tensor, b: torch.Tensor, dt: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold: expm(dt [[A, B], [0, 0]]) = [[Ad, Bd], [0, I]], so Ad = expm(A dt) and
    Bd = int_0^dt expm(A s) ds B (= A^-1 (Ad - I) B when A is invertible)."""
    n, m = b.shape
    block = torch.zeros(n + m, n + m, dtype=a.dtype, device=a.device)
    block[:n, :n], block[:n, n:] = a * dt, b * dt
    e = torch.linalg.matrix_exp(block)
    return e[:n, :n], e[:n, n:]


def impulse_response(ad: torch.Tensor, bd: torch.Tensor, length: int) -> torch.Tensor:
    """(length, order) rows H_k = Ad^k Bd, by doubling: the block [k, 2k) is Ad^k times the block [0, k)."""
    h = bd.T                                         # (1, order): H_0
    power = ad                                       # Ad^k for the current k = h.shape[0]
    while h.shape[0] < length:
        h = torch.cat([h, h @ power.T], 0)
        power = power @ power
    return h[:length]


class _Spike(torch.autograd.Function):
    """Heaviside(x) forward (x >= 0 -> 1); sigmoid surrogate alpha sig(alpha x)(1 - sig(alpha x)) backward."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * x)
        return g * ctx.alpha * s * (1 - s), None


def lif(x: torch.Tensor, mask: torch.Tensor | None = None, tau: float = 2.0, v_threshold: float = 1.0,
        alpha: float = 4.0) -> torch.Tensor:
    """Multi-step LIF over the token axis of x (B, N, C): v <- v + (x - v) / tau, spike = [v >= threshold],
    hard reset to 0 with the spike detached. At padded steps (mask False) the state is kept, the spike is 0."""
    v = torch.zeros_like(x[:, 0])
    out = []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        s = _Spike.apply(h - v_threshold, alpha)
        v_new = h * (1 - s.detach())
        if mask is not None:
            keep = mask[:, t, None].to(x.dtype)
            v_new, s = keep * v_new + (1 - keep) * v, s * keep
        v = v_new
        out.append(s)
    return torch.stack(out, 1)


class MaskedBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the channels of (B, N, C) whose statistics come from the real tokens only."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return super().forward(x.reshape(-1, x.shape[-1])).view_as(x)
        out = torch.zeros_like(x)
        out[mask] = super().forward(x[mask])
        return out


@register_attention("lmu")
class LMUMixer(nn.Module):
    causal_only = True       # every token sees only its past, whatever `causal` says: a classifier should
                             # pool by mean or read the last token, not a CLS token prepended at position 0
    def __init__(self, dim, num_heads, max_len, causal=False, dropout=0.0, memory_size: int | None = None,
                 theta: float | None = None, mode: str = "parallel", spiking: bool = False,
                 tau: float = 2.0, v_threshold: float = 1.0):
        super().__init__()
        if mode not in ("parallel", "recurrent"):
            raise ValueError(f"attention 'lmu': mode must be 'parallel' or 'recurrent', got {mode!r}")
        self.dim, self.num_heads, self.max_len, self.causal = dim, num_heads, max_len, causal
        self.memory_size = memory_size or (2 * dim if spiking else dim)
        self.theta = float(theta or max_len)
        self.mode, self.spiking, self.tau, self.v_threshold = mode, spiking, tau, v_threshold
        self.w_u = nn.Linear(dim, 1)
        self.w_h = nn.Linear(self.memory_size + dim, dim)
        self.proj = nn.Linear(dim, dim)                  # the official 1x1 Conv1d
        self.proj_bn = MaskedBatchNorm(dim)
        if spiking:
            self.bn_u, self.bn_m, self.bn_h = (MaskedBatchNorm(c) for c in (1, self.memory_size, dim))
        self.drop = nn.Dropout(dropout)
        ad, bd = zoh_discretize(*lmu_state_space(self.memory_size, self.theta, dtype=torch.float64))
        # derived constants, not parameters or buffers: kept in float64 on the CPU and moved per call
        # (the official stores A, B, H, fft_H as buffers of one fixed length)
        self._ad64, self._bd64 = ad, bd
        self._h64: torch.Tensor | None = None
        self._fft_h: dict = {}

    check = QKVAttention.check

    def _act(self, x, mask, bn=None):
        if not self.spiking:
            return F.relu(x)
        return lif(bn(x, mask), mask, self.tau, self.v_threshold)

    def spectrum(self, n: int, device, dtype) -> torch.Tensor:
        """rfft(H, 2n) of the impulse response over n steps: (n + 1, memory_size) complex, cached."""
        key = (n, str(device), dtype)
        if key not in self._fft_h:
            if self._h64 is None or self._h64.shape[0] < n:          # H for n steps is a prefix of a longer H
                self._h64 = impulse_response(self._ad64, self._bd64, max(n, self.max_len))
            if len(self._fft_h) >= 8:                                # a few lengths at a time
                self._fft_h.pop(next(iter(self._fft_h)))
            spec = torch.fft.rfft(self._h64[:n], n=2 * n, dim=0)
            self._fft_h[key] = spec.to(device=device, dtype=torch.complex128 if dtype == torch.float64
                                       else torch.complex64)
        return self._fft_h[key]

    def memory(self, u: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """u (B, N) -> m (B, N, memory_size), m_t = sum_{j<=t} Ad^(t-j) Bd u_j."""
        n = u.shape[1]
        if (mode or self.mode) == "parallel":
            spec = self.spectrum(n, u.device, u.dtype)
            m = torch.fft.irfft(torch.fft.rfft(u, n=2 * n, dim=1)[:, :, None] * spec, n=2 * n, dim=1)
            return m[:, :n]
        ad = self._ad64.to(device=u.device, dtype=u.dtype)
        bd = self._bd64.to(device=u.device, dtype=u.dtype)[:, 0]
        m, out = u.new_zeros(u.shape[0], self.memory_size), []
        for t in range(n):
            m = m @ ad.T + u[:, t, None] * bd
            out.append(m)
        return torch.stack(out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, mode: str | None = None) -> torch.Tensor:
        self.check(x, mask)
        u = self._act(self.w_u(x), mask, getattr(self, "bn_u", None))[..., 0]      # (B, N)
        if mask is not None:
            u = u * mask.to(u.dtype)
        m = self.memory(u, mode)
        if self.spiking:                                  # the ANN cell uses the memory as it is
            m = lif(self.bn_m(m, mask), mask, self.tau, self.v_threshold)
        h = self._act(self.w_h(torch.cat([m, x], -1)), mask, getattr(self, "bn_h", None))
        y = self.proj_bn(self.proj(h), mask)
        if self.spiking:
            y = lif(y, mask, self.tau, self.v_threshold)
        return self.drop(y)
