"""Normalisation layers beyond torch's own."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerNorm2d", "RMSNorm", "CRMSNorm", "LayerNormNoBias", "ChannelLayerNorm"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension (no mean subtraction; a bias only if `bias`)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        x = F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return x if self.bias is None else x + self.bias


class CRMSNorm(nn.Module):
    """Compressed RMSNorm (Pre-CRMSNorm, arXiv 2305.14858): the input is a zero-mean vector of
    `dim` entries stored without its last one (`dim - 1` entries, the last being minus their sum);
    the output is the full `dim`-vector divided by its RMS, times `weight`, plus `bias`.

    With `groups` > 1 the input is `groups` such compressed vectors side by side (each of
    dim / groups entries when whole) and the RMS is taken over all of them together, as a norm
    over a concatenation of zero-mean vectors (Swin's patch merging) does.
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True, bias: bool = False, groups: int = 1):
        super().__init__()
        if dim % groups:
            raise ValueError(f"CRMSNorm: dim {dim} is not divisible by groups {groups}")
        self.dim, self.groups, self.eps = dim, groups, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        z = x.unflatten(-1, (self.groups, self.dim // self.groups - 1))
        x = torch.cat([z, -z.sum(-1, keepdim=True)], dim=-1).flatten(-2)
        x = F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return x if self.bias is None else x + self.bias

    def extra_repr(self):
        return f"{self.dim}, groups={self.groups}, eps={self.eps}"


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
