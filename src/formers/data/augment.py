"""Batched, seedable image transforms in torch: one call per batch, no per-image Python.

Training batches get a random crop of the zero-padded image (a shift of up to `pad`
pixels) and, where the data allow it, a horizontal flip; every batch is then scaled to
[0, 1], normalised with the training split's channel statistics and, for a model with
more channels than the data (grayscale into an RGB model), repeated across channels.
The random draws of a step come from a generator seeded by (seed, epoch, step), so a
resumed run sees exactly the augmentations an uninterrupted one would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_stats", "BatchTransform", "AUGMENTS"]

AUGMENTS = ("auto", "none", "crop", "crop-flip")


def channel_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) tensor, in [0, 1] units."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].double().div_(255.0)
        s += part.sum((0, 2, 3))
        s2 += part.pow(2).sum((0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(1e-12).sqrt().clamp_min(1e-3)
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


class BatchTransform:
    """uint8 (B, C, H, W) -> normalised float (B, out_chans, H, W), with optional augmentation."""

    def __init__(self, mean, std, out_chans: int, crop_pad: int = 0, hflip: bool = False):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.out_chans = out_chans
        self.crop_pad = crop_pad
        self.hflip = hflip

    @property
    def augments(self) -> bool:
        return self.crop_pad > 0 or self.hflip

    def draw(self, n: int, generator: torch.Generator) -> dict:
        """The random parameters of `n` images (drawn for a whole global batch, then sliced)."""
        p = self.crop_pad
        return {
            "shift": torch.randint(0, 2 * p + 1, (n, 2), generator=generator) if p else None,
            "flip": torch.rand(n, generator=generator) < 0.5 if self.hflip else None,
        }

    @staticmethod
    def slice_params(params: dict | None, sl: slice) -> dict | None:
        if params is None:
            return None
        return {k: None if v is None else v[sl] for k, v in params.items()}

    def __call__(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        x = x.float().div_(255.0)
        if params is not None:
            if params.get("shift") is not None and self.crop_pad:
                x = self._shift(x, params["shift"].to(x.device))
            if params.get("flip") is not None:
                flip = params["flip"].to(x.device).view(-1, 1, 1, 1)
                x = torch.where(flip, x.flip(-1), x)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if x.shape[1] != self.out_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.out_chans, -1, -1)
            elif self.out_chans == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"cannot map {x.shape[1]}-channel images to a {self.out_chans}-channel model")
        return x.contiguous()

    def _shift(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch: image b is cut at offset shift[b] = (dy, dx)."""
        b, _, h, w = x.shape
        p = self.crop_pad
        padded = F.pad(x, (p, p, p, p))
        rows = shift[:, 0:1] + torch.arange(h, device=x.device)          # (B, H)
        cols = shift[:, 1:2] + torch.arange(w, device=x.device)          # (B, W)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        out = padded[batch, :, rows.view(b, h, 1), cols.view(b, 1, w)]   # (B, H, W, C)
        return out.permute(0, 3, 1, 2)
