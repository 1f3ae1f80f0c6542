"""Learned absolute position tables: resampling a (1, prefix + h*w, C) table to another grid."""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["resample_pos_embed"]


def resample_pos_embed(pos_embed: torch.Tensor, new_hw: tuple[int, int], old_hw: tuple[int, int],
                       num_prefix_tokens: int = 0,
                       mode: str = "bilinear", align_corners: bool = False,
                       antialias: bool = False) -> torch.Tensor:
    """Interpolate the grid part of a (1, prefix + h*w, C) table from `old_hw` to `new_hw`.

    The first `num_prefix_tokens` entries (cls/distillation tokens) are kept as they are.
    Row-major token order (h, then w) is assumed, as a flattened NCHW map has. Returns the
    table unchanged when the grids agree. TorchScript compiles it; a model traced by torch.fx calls it
    as one node (`torch.fx.wrap("resample_pos_embed")` in the model's file), as the grid is the input's.
    """
    new_h, new_w = new_hw
    old_h, old_w = old_hw
    # torch.compile / torch.export: no test on the (symbolic) grid, which would pin the input size; resizing
    # to the same grid is exact (bilinear and bicubic sample the table at its own points)
    if not torch.compiler.is_compiling() and (new_h, new_w) == (old_h, old_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != old_h * old_w:
        raise ValueError(f"position table has {grid.shape[1]} grid entries, not {old_h}x{old_w}")
    c = grid.shape[-1]
    grid = grid.reshape(grid.shape[0], old_h, old_w, c).permute(0, 3, 1, 2)
    corners: Optional[bool] = None
    if mode in ("linear", "bilinear", "bicubic", "trilinear"):
        corners = align_corners
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode=mode, align_corners=corners, antialias=antialias)
    grid = grid.to(pos_embed.dtype).flatten(2).transpose(1, 2)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid
