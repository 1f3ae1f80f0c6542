"""Normalisation layers beyond torch's own."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerNorm2d", "RMSNorm", "LayerNormNoBias", "ChannelLayerNorm"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x):
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


class LayerNormNoBias(nn.Module):
    """LayerNorm over the last dimension with a scale and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, self.eps)


class ChannelLayerNorm(nn.Module):
    """Normalise each sample over all of (H, W, C) of a channels-last map, then scale per channel
    (GroupNorm with one group, as the MetaFormer baselines use it), optionally with a bias."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        x = F.layer_norm(x, x.shape[1:], eps=self.eps)
        x = x * self.weight
        return x + self.bias if self.bias is not None else x
