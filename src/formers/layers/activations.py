"""Activations introduced by the MetaFormer papers and reused by their token mixers."""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["StarReLU", "SquaredReLU"]


class StarReLU(nn.Module):
    """s * relu(x)^2 + b with learnable scalars s and b."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0, learnable: bool = True):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([scale]), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor([bias]), requires_grad=learnable)

    def forward(self, x):
        return self.scale * F.relu(x).square() + self.bias


class SquaredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x).square()
