"""Patch embeddings: image -> tokens by a strided convolution."""
import torch.nn as nn
import torch.nn.functional as F

from .helpers import to_2tuple

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """Conv(kernel=stride=patch) then an optional norm on channels.

    Returns NCHW when `norm_layer` is None, otherwise a channels-last (B, H, W, C) map
    normalised over C. With `pad=True` a size that is not a multiple of the patch is padded
    at the bottom/right (as Swin's dense-task backbones do), otherwise the conv floors it.
    """

    def __init__(self, patch_size=4, in_chans: int = 3, embed_dim: int = 96, norm_layer=None,
                 kernel_size=None, padding=0, pad: bool = False):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.pad = pad
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size or self.patch_size, self.patch_size, padding)
        self.norm = norm_layer(embed_dim) if norm_layer else None

    def forward(self, x):
        if self.pad:
            ph, pw = self.patch_size
            h, w = x.shape[-2], x.shape[-1]  # rounded up by floor division: short size formulas under torch.export
            x = F.pad(x, (0, (w + pw - 1) // pw * pw - w, 0, (h + ph - 1) // ph * ph - h))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1))
        return x
