"""Feed-forward blocks."""
import torch
import torch.nn as nn

from .activations import apply_act
from .linear import Linear

__all__ = ["Mlp", "ConvMlp", "DWConvMlp"]


class Mlp(nn.Module):
    """Linear -> act -> drop -> Linear -> drop, on the last dimension."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act_layer=nn.GELU,
                 bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, out_dim or dim, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        if torch.jit.is_scripting():
            x = self.act(self.fc1(x))
        else:
            x = apply_act(self.act, self.fc1(x))
        return self.drop2(self.fc2(self.drop1(x)))


class ConvMlp(nn.Module):
    """The same as Mlp with 1x1 convolutions, on NCHW maps."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act_layer=nn.GELU,
                 bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, out_dim or dim, 1, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DWConvMlp(nn.Module):
    """PVTv2's feed-forward on channels-last (B, H, W, C) maps: fc1, 3x3 depthwise conv over the hidden
    channels, act, fc2 (SVT; FaViT has the same block on (B, N, C) tokens)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = act_layer()
        self.fc2 = Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.dwconv(self.fc1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(self.drop(self.act(x))))
