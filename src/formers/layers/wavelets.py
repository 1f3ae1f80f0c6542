"""The dual-tree complex wavelet transform (DTCWT) at level 1, in plain torch convolutions.

Level 1 of Kingsbury's DTCWT filters the image with a biorthogonal pair along rows and columns (no
decimation), then turns each of the three bandpass images (lh, hl, hh) into two complex half-resolution
subbands by pairing the corners of every 2x2 quad: six oriented subbands (15, 45, 75, 105, 135, 165 degrees),
each complex. The lowpass stays at full resolution. The layout is the one pytorch_wavelets' DTCWTForward
(J=1, o_dim=2, ri_dim=-1, mode='symmetric') returns, so weights trained on it apply unchanged:

    low:  (B, C, H, W)
    high: (B, C, 6, H/2, W/2, 2)   orientation in dim 2, (real, imag) in the last dim

Borders use half-sample symmetric extension (numpy's 'symmetric'), repeated as often as a short signal
needs. H and W must be even. The inverse is exact up to float rounding (the filters are a perfect-
reconstruction pair). Levels >= 2 (the q-shift filters) are not implemented: SVT uses J=1 only.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DTCWT", "BIORTHOGONAL_FILTERS", "symmetric_pad"]

# Kingsbury's near-symmetric 13/19-tap level-1 filters as exact fractions: (numerators, denominator)
# of the analysis lowpass h0 (13 taps) and the synthesis lowpass g0 (19 taps). The highpass filters
# are their modulations: h1[n] = (-1)^(n - c) g0[n] and g1[n] = (-1)^(n - c) h0[n] (c: centre tap).
BIORTHOGONAL_FILTERS = {
    "near_sym_b": (
        ([-9, 0, 114, -240, -247, 1520, 2844, 1520, -247, -240, 114, 0, -9], 5120),
        ([81, 0, -1539, -2160, 8208, 27360, -63816, -59280, 343786, 641600, 343786, -59280, -63816, 27360,
          8208, -2160, -1539, 0, 81], 1146880),
    ),
}


def _modulate(taps: list[float]) -> list[float]:
    """(-1)^(n - centre) * taps[n]: the highpass partner of a symmetric odd-length lowpass."""
    c = len(taps) // 2
    return [t * (-1) ** abs(n - c) for n, t in enumerate(taps)]


def _centre_pad(taps: list[float], length: int) -> list[float]:
    k = (length - len(taps)) // 2
    return [0.0] * k + list(taps) + [0.0] * k


def symmetric_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Extend `x` by `pad` samples at both ends of `dim` with half-sample symmetry ([b a | a b c | c b]),
    reflecting again as often as needed when pad > length."""
    n = x.shape[dim]
    idx = torch.arange(-pad, n + pad, device=x.device)
    idx = idx.remainder(idx.new_full((), 2 * n))  # a tensor divisor: ONNX's Mod takes no symbolic scalar
    idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
    return x.index_select(dim, idx)


def _check_even(x: torch.Tensor):
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"DTCWT: expected a (B, C, H, W) tensor with even H and W, got {tuple(x.shape)}")


def _check_inverse(low: torch.Tensor, high: torch.Tensor):
    _check_even(low)
    b, c, h, w = low.shape
    if high.shape != (b, c, 6, h // 2, w // 2, 2):
        raise ValueError(f"DTCWT.inverse: the highpass must be {(b, c, 6, h // 2, w // 2, 2)} for a lowpass "
                         f"{tuple(low.shape)}, got {tuple(high.shape)}")


# shape tests and index tables from the input's size: each is one eager node of a torch.fx graph
torch.fx.wrap("_check_even")
torch.fx.wrap("_check_inverse")
torch.fx.wrap("symmetric_pad")


class DTCWT(nn.Module):
    """Level-1 2-D DTCWT: `forward(x) -> (low, high)` and `inverse(low, high) -> x`.

    The four filters are stored as non-persistent buffers (they are constants, not weights), zero-padded to
    one common odd length so that the row and the column passes are one grouped conv each.
    """

    def __init__(self, biort: str = "near_sym_b"):
        super().__init__()
        if biort not in BIORTHOGONAL_FILTERS:
            raise ValueError(f"DTCWT: unknown level-1 filters {biort!r}; have {', '.join(BIORTHOGONAL_FILTERS)}")
        (h0, dh), (g0, dg) = BIORTHOGONAL_FILTERS[biort]
        h0 = [t / dh for t in h0]
        g0 = [t / dg for t in g0]
        h1, g1 = _modulate(g0), _modulate(h0)
        length = max(len(h0), len(g0))
        self.pad = length // 2
        # conv2d correlates; flipping makes it the convolution the transform is defined with
        analysis = torch.tensor([_centre_pad(h0, length), _centre_pad(h1, length)], dtype=torch.float32).flip(-1)
        synthesis = torch.tensor([_centre_pad(g0, length), _centre_pad(g1, length)], dtype=torch.float32).flip(-1)
        self.register_buffer("analysis", analysis, persistent=False)     # (2, L): lowpass, highpass
        self.register_buffer("synthesis", synthesis, persistent=False)

    def _analyse(self, x, dim: int):
        """Lowpass and highpass of every channel along `dim` (-1: rows, -2: columns): (B, 2C, H, W)."""
        c = x.shape[1]
        taps = self.analysis.to(x.dtype).repeat(c, 1)
        w = taps[:, None, None, :] if dim == -1 else taps[:, None, :, None]
        return F.conv2d(symmetric_pad(x, self.pad, dim), w, groups=c)

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_scripting():
            _check_even(x)
        # rows then columns, lowpass and highpass each: per channel [ll, lh, hl, hh]
        y = self._analyse(self._analyse(x, -1), -2)                      # (B, 4C, H, W)
        y = y.unflatten(1, (-1, 4))  # no batch size named: a batch of 0 works, and torch.fx traces it
        low = y[:, :, 0]
        bands = y[:, :, [1, 3, 2]] / math.sqrt(2)                        # lh, hh, hl
        a, bb = bands[..., 0::2, 0::2], bands[..., 0::2, 1::2]
        cc, d = bands[..., 1::2, 0::2], bands[..., 1::2, 1::2]
        # quads -> two complex subbands each: (a - d, b + c) at 15/45/75 degrees, (a + d, b - c) at 165/135/105
        real = torch.cat([a - d, (a + d).flip(2)], dim=2)
        imag = torch.cat([bb + cc, (bb - cc).flip(2)], dim=2)
        return low, torch.stack([real, imag], dim=-1)

    def inverse(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_inverse(low, high)
        c = low.shape[1]
        real, imag = high.unbind(-1)
        r1, i1 = real[:, :, :3], imag[:, :, :3]                          # 15, 45, 75
        r2, i2 = real[:, :, 3:].flip(2), imag[:, :, 3:].flip(2)          # 165, 135, 105
        a, bb, cc, d = r1 + r2, i1 + i2, i1 - i2, r2 - r1
        quads = torch.stack([torch.stack([a, bb], -1), torch.stack([cc, d], -1)], -3)  # (B, C, 3, h/2, 2, w/2, 2)
        bands = quads.flatten(5, 6).flatten(3, 4) / math.sqrt(2)        # (B, C, 3, h, w): lh, hh, hl
        y = torch.stack([low, bands[:, :, 0], bands[:, :, 2], bands[:, :, 1]], dim=2).flatten(1, 2)
        # columns: [ll, lh] -> lo and [hl, hh] -> hi; then rows: [lo, hi] -> x
        g = self.synthesis.to(y.dtype)                                   # (2, L): g0, g1
        y = F.conv2d(symmetric_pad(y, self.pad, -2), g[None, :, :, None].expand(2 * c, 2, -1, 1).contiguous(),
                     groups=2 * c)
        return F.conv2d(symmetric_pad(y, self.pad, -1), g[None, :, None, :].expand(c, 2, 1, -1).contiguous(),
                        groups=c)
