"""Swin Transformer (catalog 48): "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", Liu et al., ICCV 2021, arXiv 2103.14030; code microsoft/Swin-Transformer.

Self-attention inside non-overlapping M x M windows, with a learned relative position bias;
every second block shifts the windows by M/2 (a cyclic roll plus a mask) so information
crosses window borders; patch merging halves the resolution and doubles the width per stage.

Any input size works: as the paper's detection/segmentation backbone does, a map that is not a
multiple of the window (or patch) is padded at the bottom/right, and here the padded tokens are
masked out of attention, so no real token attends to padding. At 224 (and 384 with window 12)
nothing is padded and the outputs are those of the official model.
"""
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from formers.layers import (DropPath, Linear, Mlp, PatchEmbed, add_residual, cached_constant, drop_path_rates,
                            relative_position_bias, relative_position_index, sdpa, window_attention_mask,
                            window_partition, window_region_ids, window_reverse)
from formers.layers.windows import compiling, contiguous_output, crop_hw, pad_hw
from formers.registry import ModelCard, register_model

from .base import ChannelsLastPyramid, Stage, init_trunc_normal

__all__ = ["SwinTransformer", "checkpoint_filter_fn"]


class WindowAttention(nn.Module):
    """Multi-head attention within windows, plus a relative position bias per head."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size, window_size),
                             persistent=False)

    @torch.no_grad()
    def init_non_persistent_buffers(self):
        """Refill `relative_position_index` (not in the state dict) in place, for the table's window."""
        window = round((self.relative_position_bias_table.shape[0] ** 0.5 + 1) / 2)
        index = self.relative_position_index
        index.copy_(relative_position_index(window, window).to(device=index.device, dtype=index.dtype))

    def forward(self, x, mask: Optional[torch.Tensor] = None):
        """x: (B, nW, N, C) windows; mask: (nW, N, N) additive or None."""
        b, nw, n = x.shape[0], x.shape[1], x.shape[2]
        bias = relative_position_bias(self.relative_position_bias_table, self.relative_position_index)
        bias, groups = _window_groups(bias, mask, b, nw, self.num_heads)
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, self.head_dim).permute(3, 0, 1, 4, 2, 5)
        qkv = qkv.reshape(3, groups[0], groups[1], n, self.head_dim)
        x = sdpa(qkv[0], qkv[1], qkv[2], bias.to(qkv.dtype), self.attn_drop if self.training else 0.0)
        x = contiguous_output(x).view(b, nw, self.num_heads, n, self.head_dim).transpose(2, 3)
        x = x.reshape(b, nw, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


def _window_groups(bias: torch.Tensor, mask: Optional[torch.Tensor], b: int, nw: int,
                   heads: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The attention bias and the (batch, heads) grouping of the windows for sdpa. The CPU flash kernel
    takes 4-D tensors only (5-D falls back to the math path): windows go into the batch when all share
    one bias, into the head axis when the mask differs per window. One torch.fx node (mask may be None)."""
    n = bias.shape[-1]
    if mask is None:
        return bias[None], (b * nw, heads)  # (1, heads, N, N)
    return (bias + mask[:, None]).reshape(1, nw * heads, n, n), (b, nw * heads)


@cached_constant(maxsize=64)
def _cached_shift_mask(hp: int, wp: int, window: int, sh: int, sw: int, h: int, w: int, device: str):
    """The additive mask of one (padded) map size and shift; cached, it depends on sizes only."""
    ids = window_region_ids(hp, wp, window, window, sh, sw, h, w, device=torch.device(device))
    return window_attention_mask(ids, window, window)


def _shift_mask(hp: int, wp: int, window: int, sh: int, sw: int, h: int, w: int,
                device: torch.device) -> torch.Tensor:
    """_cached_shift_mask in eager mode; computed in the graph under TorchScript, torch.compile and
    torch.export (sizes there may be symbolic, and a cache would bake one size in)."""
    if torch.jit.is_scripting():
        return window_attention_mask(window_region_ids(hp, wp, window, window, sh, sw, h, w, device), window, window)
    else:
        if compiling():
            ids = window_region_ids(hp, wp, window, window, sh, sw, h, w, device)
            return window_attention_mask(ids, window, window)
        return _cached_shift_mask(hp, wp, window, sh, sw, h, w, str(device))


def _shift_windows(x: torch.Tensor, window: int, shift: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], int, int]:
    """(B, H, W, C) -> its windows (B, nW, N, C) after padding to the window and the cyclic shift, the
    attention mask (None when no window mixes regions) and the shift (sh, sw). A dimension that fits in one
    window is not shifted: shifting would only wrap it around. One torch.fx node: the decisions are taken
    at run time from the real size, so a traced model takes any size."""
    h, w = x.shape[1], x.shape[2]
    sh = shift if h > window else 0
    sw = shift if w > window else 0
    x = pad_hw(x, window, window)
    hp, wp = x.shape[1], x.shape[2]
    if sh != 0 or sw != 0:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    mask: Optional[torch.Tensor] = None
    if compiling() or sh != 0 or sw != 0 or hp != h or wp != w:
        mask = _shift_mask(hp, wp, window, sh, sw, h, w, x.device)
    return window_partition(x, window, window), mask, sh, sw


def _unshift_windows(x: torch.Tensor, window: int, sh: int, sw: int, hp: int, wp: int,
                     h: int, w: int) -> torch.Tensor:
    """The inverse of _shift_windows: (B, nW, N, C) windows of the padded (hp, wp) map -> (B, h, w, C)."""
    x = window_reverse(x, window, window, hp, wp)
    if sh != 0 or sw != 0:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return crop_hw(x, h, w)


torch.fx.wrap("_window_groups")
torch.fx.wrap("_shift_windows")
torch.fx.wrap("_unshift_windows")


class SwinBlock(nn.Module):
    """LN -> (shifted) window attention -> residual; LN -> MLP -> residual. Channels-last input."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def _attention(self, x):
        ws = self.window_size
        h, w = x.shape[1], x.shape[2]
        hp, wp = (h + ws - 1) // ws * ws, (w + ws - 1) // ws * ws
        windows = _shift_windows(x, ws, self.shift_size)  # indexed, not unpacked: torch.fx traces it
        y = self.attn(windows[0], windows[1])
        return _unshift_windows(y, ws, windows[2], windows[3], hp, wp, h, w)

    def forward(self, x):
        if torch.jit.is_scripting():  # add_residual's in-place fast path is eager Python
            x = x + self.drop_path(self._attention(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = add_residual(x, self.drop_path(self._attention(self.norm1(x))))
        return add_residual(x, self.drop_path(self.mlp(self.norm2(x))))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> concat (4C) -> LN -> Linear to 2C. Odd sizes are padded first."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x):
        x = _pad_even(x)
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        # channel order of the paper's code: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1)
        x = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


def _pad_even(x: torch.Tensor) -> torch.Tensor:
    """Odd heights/widths padded by one at the bottom/right (one torch.fx node: decided at run time)."""
    return pad_hw(x, 2, 2)


torch.fx.wrap("_pad_even")


class SwinStage(Stage):
    """Optional patch merging, then blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window_size: int, downsample: bool,
                 mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: list[float]):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinBlock(out_dim, num_heads, window_size, shift=i % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop=drop, attn_drop=attn_drop, drop_path=drop_path[i])
            for i in range(depth))


class SwinTransformer(ChannelsLastPyramid):
    """Swin Transformer; forward_features returns a channels-last (B, H, W, C) map, as in timm."""

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, global_pool: str = "avg"):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"SwinTransformer: depths {depths} and num_heads {num_heads} differ in length")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = self.check_pool(global_pool)
        self.window_size = window_size
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm, pad=True)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList(
            SwinStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], window_size, downsample=i > 0,
                      mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                      drop_path=rates[i])
            for i in range(len(depths)))
        self.feature_info = [dict(num_chs=d, reduction=patch_size * 2 ** i, module=f"layers.{i}")
                             for i, d in enumerate(dims)]
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)

    @property
    def feature_stages(self):
        return self.layers  # named `layers` in the official and timm checkpoints

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        for stage in self.layers:  # not self.feature_stages: TorchScript cannot iterate a property's modules
            x = stage(x)
        return self.norm(x)

    def stem(self, x):
        return self.pos_drop(self.patch_embed(x))


def _resize_bias_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """Bicubically resample a ((2M-1)^2, heads) bias table to another window size."""
    old = int(round(table.shape[0] ** 0.5))
    new = 2 * window - 1
    if old == new:
        return table
    grid = table.T.reshape(1, -1, old, old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(-1, new * new).T.to(table.dtype)


def checkpoint_filter_fn(state_dict: dict, model: SwinTransformer) -> dict:
    """Official (microsoft/Swin-Transformer) or timm keys -> ours; our own keys pass unchanged.

    The official code keeps patch merging at the end of stages 0-2 (`layers.i.downsample`); ours
    (as the paper's figure, and timm) at the start of stages 1-3. timm names the classifier
    `head.fc`. Saved buffers (`relative_position_index`, `attn_mask`) are rebuilt, so dropped;
    bias tables of another window size are resampled.
    """
    official = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if official and k.startswith("layers.") and ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i + 1}.downsample.", 1)
        if k.startswith("head.fc."):
            k = "head." + k[len("head.fc."):]
        if k.endswith("relative_position_bias_table"):
            side = round(v.shape[0] ** 0.5) if v.dim() == 2 else 0
            if side * side != (v.shape[0] if v.dim() == 2 else -1) or side % 2 == 0:
                from formers.checkpoint import does_not_fit
                raise does_not_fit(model, f"{k} has shape {tuple(v.shape)}; a bias table is "
                                          f"((2M-1)^2, heads) for a window of M")
            v = _resize_bias_table(v, model.window_size)
        out[k] = v
    return out


def _swin(kwargs, **config):
    """The variant's config, overridden by what the caller passed."""
    return SwinTransformer(**{**config, **kwargs})


_paper = dict(paper=48, arxiv="2103.14030", repo="microsoft/Swin-Transformer")
_in22k = "ImageNet-22K pre-trained, fine-tuned on ImageNet-1K (the paper has no Swin-L trained on 1K alone)"


@register_model(ModelCard(**_paper, official_name="Swin-T", params_m="28", macs_g=4.5, top1=81.2))
def swin_tiny_patch4_window7_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.2)  # the official training config
    return _swin(kwargs, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)


@register_model(ModelCard(**_paper, official_name="Swin-S", params_m="50", macs_g=8.7, top1=83.2))
def swin_small_patch4_window7_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.3)  # the official training config
    return _swin(kwargs, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)


@register_model(ModelCard(**_paper, official_name="Swin-B", params_m="88", macs_g=15.4, top1=83.5))
def swin_base_patch4_window7_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.5)  # the official training config
    return _swin(kwargs, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7)


@register_model(ModelCard(**_paper, official_name="Swin-B 384", params_m="88", macs_g=47.1, img_size=384,
                          top1=84.5), crop_pct=1.0)
def swin_base_patch4_window12_384(**kwargs):
    return _swin(kwargs, img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)


@register_model(ModelCard(**_paper, official_name="Swin-L", params_m="197", macs_g=34.5, top1=86.3, notes=_in22k))
def swin_large_patch4_window7_224(**kwargs):
    return _swin(kwargs, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7)


@register_model(ModelCard(**_paper, official_name="Swin-L 384", params_m="197", macs_g=103.9, img_size=384,
                          top1=87.3, notes=_in22k), crop_pct=1.0)
def swin_large_patch4_window12_384(**kwargs):
    return _swin(kwargs, img_size=384, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12)


@register_model(ModelCard(**_paper, official_name="(none: a reduced Swin for the demo and tests)", img_size=32,
                          status="reduced", notes="patch 2, window 4, width 32: trains on 8x8 digits in minutes"),
                reduction=8)
def swin_demo(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.0)
    return _swin(kwargs, img_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4)
