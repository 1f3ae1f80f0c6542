"""Token mixers of the MetaFormer family. All take channels-last (B, H, W, C) maps except
where `channels_last=False` says NCHW."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import StarReLU, apply_act
from .linear import Linear

__all__ = ["Pooling", "SepConv", "RandomMixing", "IdentityMixer"]


class IdentityMixer(nn.Identity):
    """No token mixing at all (IdentityFormer)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class Pooling(nn.Module):
    """avg_pool(x) - x (PoolFormer): the block's residual adds x back."""

    def __init__(self, pool_size: int = 3, channels_last: bool = True, **kwargs):
        super().__init__()
        self.channels_last = channels_last
        self.pool = nn.AvgPool2d(pool_size, 1, pool_size // 2, count_include_pad=False)

    def forward(self, x):
        if self.channels_last:
            y = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            y = self.pool(x)
        return y - x


class SepConv(nn.Module):
    """Inverted separable convolution (MobileNetV2 style): pw expand, act, dw kxk, pw project."""

    def __init__(self, dim: int, expansion_ratio: float = 2, act1_layer=StarReLU, act2_layer=nn.Identity,
                 bias: bool = False, kernel_size: int = 7, padding: int = 3, **kwargs):
        super().__init__()
        mid = int(expansion_ratio * dim)
        self.pwconv1 = Linear(dim, mid, bias=bias)
        self.act1 = act1_layer()
        self.dwconv = nn.Conv2d(mid, mid, kernel_size, padding=padding, groups=mid, bias=bias)
        self.act2 = act2_layer()
        self.pwconv2 = Linear(mid, dim, bias=bias)

    def forward(self, x):
        if torch.jit.is_scripting():
            x = self.act1(self.pwconv1(x))
        else:
            x = apply_act(self.act1, self.pwconv1(x))
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.pwconv2(self.act2(x))


class RandomMixing(nn.Module):
    """Mix the N tokens with a frozen random row-stochastic (N, N) matrix (RandFormer).

    The matrix fixes the number of tokens, so a model using it takes one input size only. It is never
    trained, so it is a persistent buffer (saved under the official key `random_matrix`, which the
    official code stores as a frozen Parameter): every parameter of a RandFormer then gets a gradient
    (DDP, timm's backward test), and the paper's "+x M" counts these buffers.
    """

    def __init__(self, num_tokens: int = 196, **kwargs):
        super().__init__()
        self.register_buffer("random_matrix", torch.softmax(torch.rand(num_tokens, num_tokens), dim=-1))

    def forward(self, x):
        y = torch.einsum("mn,bnc->bmc", self.random_matrix, x.flatten(1, 2))
        return y.unflatten(1, (x.shape[1], x.shape[2]))
