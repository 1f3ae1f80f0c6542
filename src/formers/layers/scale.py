"""A learnable per-channel multiplier: LayerScale (CaiT) and ResScale (Shleifer et al.) are both this."""
import torch
import torch.nn as nn

from .helpers import is_traced

__all__ = ["Scale", "add_residual"]


class Scale(nn.Module):
    """x * scale with one learnable value per channel, on channels-last maps or tokens
    (channels_last=True) or on NCHW maps (channels_last=False)."""

    def __init__(self, dim: int, init_value: float = 1.0, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    @property
    def multiplier(self) -> torch.Tensor:
        """The per-channel values shaped to broadcast against this layout's input."""
        return self.scale if self.channels_last else self.scale[:, None, None]

    def forward(self, x):
        return x * self.multiplier

    def extra_repr(self):
        return f"dim={self.scale.shape[0]}, channels_last={self.channels_last}"


def add_residual(x: torch.Tensor, y: torch.Tensor, scale: nn.Module | None = None) -> torch.Tensor:
    """x + y, or scale(x) + y for a `Scale` (ResScale). `y` must be a branch output nothing else holds:
    with autograd off it is updated in place, saving a full-size buffer per block (on a CPU, the page
    faults of a fresh large allocation cost as much as the add itself); with autograd on, the scaled form
    is one addcmul instead of a multiply and an add. Under torch.fx tracing and torch.compile it is the
    plain formula. TorchScript cannot pass a module to a function: a scripted caller writes
    `scale(x) + y` itself under `if torch.jit.is_scripting()`."""
    gamma = scale.multiplier if isinstance(scale, Scale) else None
    if is_traced(y):
        return x + y if gamma is None else x * gamma + y
    if not torch.is_grad_enabled() and y.shape == x.shape and y.dtype == torch.promote_types(x.dtype, y.dtype):
        return y.add_(x) if gamma is None else y.addcmul_(x, gamma)
    return x + y if gamma is None else torch.addcmul(y, x, gamma)
