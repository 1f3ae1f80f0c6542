"""Stochastic depth."""
import torch
import torch.nn as nn

__all__ = ["DropPath", "drop_path_rates"]


class DropPath(nn.Module):
    """Drop the whole residual branch per sample with probability p (scaled to keep the mean)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


def drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Linearly rising stochastic-depth rates over all blocks, split per stage."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out
