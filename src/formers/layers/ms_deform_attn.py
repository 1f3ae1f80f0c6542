"""Multi-scale deformable attention (Deformable DETR, Zhu et al., arXiv 2010.04159), in plain PyTorch.

Each query looks at a few points per head and per feature level: a linear layer predicts, from the
query, `n_points` 2-d offsets per (head, level) around the query's reference point and one weight per
(head, level, point), softmax-normalised over levels x points. The value maps are sampled at those
locations with bilinear interpolation (zero outside the map) and summed with the weights.

`ms_deform_attn` is the sampling-and-sum core (what the Deformable DETR repository ships as
`ms_deform_attn_core_pytorch`, the reference its CUDA kernel is tested against); `MSDeformAttn` is the
module around it, with the Deformable DETR parameter names (`sampling_offsets`, `attention_weights`,
`value_proj`, `output_proj`) and init, so released checkpoints of models built on it (ViT-Adapter,
ViT-CoMer, Mask2Former's pixel decoder, ...) load unchanged. No custom CUDA op: `F.grid_sample` does
the sampling, one call per level, on any device and dtype, with autograd and torch.compile
(not torch.fx symbolic tracing: the module branches on the reference points' last size).

Spatial shapes may be given as a (levels, 2) integer tensor, as the official code does, or as a Python
list of (h, w): the list keeps the level sizes static, so tracing or compiling a model does not read
them back from a tensor.
"""
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .linear import Linear

__all__ = ["MSDeformAttn", "ms_deform_attn", "spatial_shapes_list"]

SpatialShapes = Union[torch.Tensor, Sequence[Sequence[int]]]


def spatial_shapes_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """The level sizes as a list of (h, w) ints, from a (levels, 2) tensor or any sequence of pairs."""
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                   attention_weights: torch.Tensor) -> torch.Tensor:
    """Sample every level at the given locations and sum the samples with the given weights.

    value: (B, sum_l h_l*w_l, heads, head_dim), the levels' row-major maps one after the other.
    spatial_shapes: the (h_l, w_l) of each level (tensor or list).
    sampling_locations: (B, Lq, heads, levels, points, 2), (x, y) in [0, 1] with (0, 0) the top-left
        corner of the map and (1, 1) its bottom-right corner (pixel centres at (i + 0.5) / w);
        `grid_sample` semantics with align_corners=False, zero outside the map.
    attention_weights: (B, Lq, heads, levels, points).
    Returns (B, Lq, heads * head_dim), heads outermost.
    """
    b, heads, head_dim = value.shape[0], value.shape[2], value.shape[3]
    lq, points = sampling_locations.shape[1], sampling_locations.shape[4]
    shapes = spatial_shapes_list(spatial_shapes)
    levels = len(shapes)
    if sampling_locations.shape[3] != levels:
        raise ValueError(f"ms_deform_attn: {levels} spatial shapes for {sampling_locations.shape[3]} sampling levels")
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1   # grid_sample's [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, heads, D) -> (B*heads, D, h, w); locations (B, Lq, heads, P, 2) -> (B*heads, Lq, P, 2)
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * heads, lq, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*heads, D, Lq, levels*P) weighted by (B*heads, 1, Lq, levels*P), summed over the samples
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, lq, levels * points)
    out = (samples * weights.to(samples.dtype)).sum(-1)
    return out.view(b, heads * head_dim, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with the Deformable DETR layout.

    d_model: query / input width; n_levels: feature levels; n_heads: heads; n_points: samples per head
    and level; ratio: the value width is int(d_model * ratio) (ViT-Adapter / ViT-CoMer's `deform_ratio`,
    1.0 in Deformable DETR), split over the heads.

    forward(query (B, Lq, d_model), reference_points, input_flatten (B, sum h*w, d_model),
    input_spatial_shapes, input_level_start_index, input_padding_mask=None) -> (B, Lq, d_model).
    reference_points: (B, Lq, n_levels, 2) normalised (x, y) points, the sampling location being the point
    plus offset / (w_l, h_l) (offsets in pixels of each level); or (B, Lq, n_levels, 4) boxes (cx, cy, w, h),
    the location being the centre plus offset / n_points * (w, h) / 2. A size-1 batch or level dimension
    broadcasts. input_level_start_index is accepted for the official signature and not needed (the levels
    are split by their sizes). input_padding_mask: (B, sum h*w), True where the input is padding; those
    values are zeroed before sampling.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 ratio: float = 1.0):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"MSDeformAttn: the value width {value_dim} (d_model {d_model} x ratio {ratio}) is not "
                             f"divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points, self.ratio = d_model, n_levels, n_heads, n_points, ratio
        self.head_dim = value_dim // n_heads
        self.sampling_offsets = Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = Linear(d_model, value_dim)
        self.output_proj = Linear(value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        """Deformable DETR's init: offsets weight 0 and bias = head h's unit direction at angle 2*pi*h/heads,
        scaled so that max(|x|, |y|) = 1, times (point index + 1), the same on every level; attention
        weights 0 (uniform over levels x points); value / output projections xavier-uniform, zero bias.
        (The official name; model inits that re-run it after a generic init call it by this name.)"""
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets_bias_init(self.n_heads, self.n_levels, self.n_points))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: SpatialShapes, input_level_start_index: Optional[torch.Tensor] = None,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, lq = query.shape[0], query.shape[1]
        shapes = spatial_shapes_list(input_spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn: built for {self.n_levels} levels, got {len(shapes)} spatial shapes")
        if sum(h * w for h, w in shapes) != input_flatten.shape[1]:
            raise ValueError(f"MSDeformAttn: the spatial shapes {shapes} hold {sum(h * w for h, w in shapes)} "
                             f"positions, the input has {input_flatten.shape[1]}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.unflatten(-1, (self.n_heads, self.head_dim))
        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, lq, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
        ref = reference_points[:, :, None, :, None, :]   # (B, Lq, 1, levels, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = ref + offsets / normalizer[:, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"MSDeformAttn: reference_points end in 2 (points) or 4 (boxes), "
                             f"not {reference_points.shape[-1]}")
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, ratio={self.ratio}")


def offsets_bias_init(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """The (heads * levels * points * 2,) initial `sampling_offsets` bias, in the (head, level, point, xy)
    order of the layer's output: head h points along angle 2*pi*h/heads, on the square of half-side
    point + 1 (so max(|x|, |y|) = point + 1)."""
    theta = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    unit = torch.stack([theta.cos(), theta.sin()], -1)
    unit = unit / unit.abs().max(-1, keepdim=True).values
    scale = torch.arange(1, n_points + 1, dtype=torch.float32)
    grid = unit[:, None, None, :] * scale[None, None, :, None]       # (heads, 1, points, 2)
    return grid.expand(n_heads, n_levels, n_points, 2).reshape(-1)
