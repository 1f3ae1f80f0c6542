"""A learnable per-channel multiplier: LayerScale (CaiT) and ResScale (Shleifer et al.) are both this."""
import torch
import torch.nn as nn

__all__ = ["Scale"]


class Scale(nn.Module):
    """x * scale with one learnable value per channel, on channels-last maps or tokens
    (channels_last=True) or on NCHW maps (channels_last=False)."""

    def __init__(self, dim: int, init_value: float = 1.0, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * (self.scale if self.channels_last else self.scale[:, None, None])

    def extra_repr(self):
        return f"dim={self.scale.shape[0]}, channels_last={self.channels_last}"
