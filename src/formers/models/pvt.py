"""PVT v1: Pyramid Vision Transformer.

Paper (catalog id 65): "Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction
without Convolutions", Wang et al., arXiv 2102.12122. Official code: whai362/PVT (classification/pvt.py).

The idea, in three lines:
  a plain transformer made into a 4-stage pyramid (strides 4, 8, 16, 32) by a patch embedding per stage;
  spatial-reduction attention (SRA): keys/values come from the map shrunk R times per side by a strided conv,
      so attention on the high-resolution stages costs N * N / R^2 instead of N^2;
  each stage has its own learned position table (bilinearly resized for other input sizes); a cls token
      joins in the last stage only and the classifier reads it.
"""
import math
import re

import torch
import torch.nn as nn
import torch.utils.checkpoint

from formers.checkpoint import release_state_dict
from formers.layers import (DropPath, Mlp, PatchEmbed, drop_path_rates, feature_take_indices, resample_pos_embed,
                            sdpa, to_2tuple)
from formers.layers.pool import TOKEN_POOLS, pool_tokens
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

torch.fx.wrap("resample_pos_embed")  # the table is resized to the input's grid: one eager node under fx

__all__ = ["PyramidVisionTransformer", "SpatialReductionAttention", "checkpoint_filter_fn"]


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from a map reduced `sr_ratio` times per side.

    Queries: every token. Keys/values: for sr_ratio > 1, the (H, W) map through a Conv(k=s=sr_ratio)
    and a LayerNorm (eps 1e-5, torch's default, as in the official code); for sr_ratio 1, the tokens
    themselves (prefix tokens such as cls included).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, hw: tuple[int, int]):
        # no -1 in a reshape (a batch of 0 works) and no unpacking of x.shape (torch.fx traces it)
        q = self.q(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        if hasattr(self, "sr"):  # sr_ratio > 1 (hasattr: TorchScript skips the branch for the others)
            kv_in = self.sr(x.transpose(1, 2).unflatten(2, hw)).flatten(2).transpose(1, 2)
            kv_in = self.norm(kv_in)
        else:
            kv_in = x
        kv = self.kv(kv_in).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, M, head_dim), M = (H/R)*(W/R)
        x = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).flatten(2)  # heads * head_dim (less than c once heads are pruned)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + SRA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x, hw: tuple[int, int]):
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PvtStage(nn.Module):
    """Patch embedding (conv k=s=patch, then LayerNorm eps 1e-5), + position table, then blocks.

    The position table is learned for `grid` = (H, W) of the default input size and resized
    bilinearly for any other size. With `cls_token`, a learned token is put in front of the
    patch tokens and the table has one more entry (first) for it.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, grid: tuple[int, int], depth: int,
                 num_heads: int, mlp_ratio: float, sr_ratio: int, cls_token: bool = False,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path=(),
                 norm_eps: float = 1e-6):
        super().__init__()
        self.grid = grid
        self.num_prefix_tokens = 1 if cls_token else 0
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, norm_layer=nn.LayerNorm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid[0] * grid[1], dim))
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop, attn_drop, drop_path[j], norm_eps)
            for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x):
        """(B, C_in, H_in, W_in) -> tokens (B, prefix + H*W, C) and (H, W)."""
        x = self.patch_embed(x)  # (B, H, W, C), normalised
        h, w = x.shape[1], x.shape[2]
        x = x.flatten(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, (h, w), self.grid, self.num_prefix_tokens)
        x = self.pos_drop(x + pos)
        for blk in self.blocks:
            if not torch.jit.is_scripting() and self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, (h, w), use_reentrant=False)
            else:
                x = blk(x, (h, w))
        return x, (h, w)


class PyramidVisionTransformer(Backbone):
    """PVT v1 for classification: four PvtStages, a final LayerNorm, a linear head on the cls token.

    Takes any input whose height and width are multiples of 32 (the total stride); position
    tables are resized (bilinear) to the input's grids on the fly, as the official code does.
    One deliberate difference: the official model skips the resize whenever a stage has as many
    tokens as stage 1 at the default size (so a 1568x32 input would get the 56x56 table added
    unresized, in the wrong layout); here a table is resized whenever its grid differs.
    """

    input_divisor = 32
    output_fmt = "NLC"  # forward_features returns the last stage's tokens (B, 1 + h * w, C)
    pool_types = TOKEN_POOLS

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, patch_size: int = 4,
                 embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1), qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, global_pool: str = "token"):
        super().__init__()
        num_stages = len(depths)
        if not all(len(v) == num_stages for v in (embed_dims, num_heads, mlp_ratios, sr_ratios)):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage")
        if sr_ratios[-1] != 1:
            raise ValueError("the last stage carries the cls token and must use sr_ratio 1")
        h, w = to_2tuple(img_size)
        total_stride = patch_size * 2 ** (num_stages - 1)
        self.input_divisor = total_stride
        if h % total_stride or w % total_stride:
            raise ValueError(f"PyramidVisionTransformer: img_size {h}x{w} must be a multiple of {total_stride}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = embed_dims[-1]
        self.grad_checkpointing = False

        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        self.feature_info = []
        reduction, prev = patch_size, in_chans
        for i in range(num_stages):
            if i > 0:
                reduction *= 2
            self.stages.append(PvtStage(
                prev, embed_dims[i], patch_size if i == 0 else 2, (h // reduction, w // reduction), depths[i],
                num_heads[i], mlp_ratios[i], sr_ratios[i], cls_token=i == num_stages - 1, qkv_bias=qkv_bias,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            prev = embed_dims[i]
        self.norm = nn.LayerNorm(self.num_features, eps=norm_eps)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        for stage in self.stages:
            nn.init.trunc_normal_(stage.pos_embed, std=0.02)
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)
        self.apply(init_trunc_normal)

    def no_weight_decay(self) -> set[str]:
        # The official training excludes only the cls token (plus, through timm's optimizer
        # factory, every 1-D tensor); its position tables are decayed.
        return {n for n, _ in self.named_parameters() if n.endswith("cls_token")}

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @staticmethod
    def _to_map(x, hw: tuple[int, int], num_prefix_tokens: int):
        return x[:, num_prefix_tokens:].transpose(1, 2).unflatten(2, hw)

    def forward_features(self, x):
        """(B, C, H, W) -> normalised tokens (B, 1 + H/32 * W/32, C), the cls token first."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x, hw = stage(x)
            if i < last:
                x = self._to_map(x, hw, stage.num_prefix_tokens)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = pool_tokens(x, self.global_pool, self.stages[-1].num_prefix_tokens)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """One NCHW map per requested stage (the last without its cls token; `norm` applies the
        final LayerNorm to it) and, unless `intermediates_only`, the forward_features output
        (or, with `stop_early`, the NCHW map of the last stage run)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        self.check_input(x)
        last = len(self.stages) - 1
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x, hw = stage(x)
            if i < last:
                x = self._to_map(x, hw, stage.num_prefix_tokens)
                if i in take:
                    intermediates.append(x)
                continue
            x_norm = self.norm(x)
            if i in take:
                intermediates.append(self._to_map(x_norm if norm else x, hw, stage.num_prefix_tokens))
            x = x_norm
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


_OFFICIAL_STAGED = re.compile(r"^(patch_embed|pos_embed|block)(\d+)(\..*)?$")


def checkpoint_filter_fn(state_dict: dict, model: PyramidVisionTransformer) -> dict:
    """Map an official PVT v1 release (or our own state dict) to our key names.

    Official -> ours: patch_embed{i}.* -> stages.{i-1}.patch_embed.*, pos_embed{i} -> stages.{i-1}.pos_embed,
    block{i}.{j}.* -> stages.{i-1}.blocks.{j}.*, cls_token -> stages.{last}.cls_token; norm.* and head.*
    keep their names. Position tables are resized (bilinear, cls entry kept) when the model was
    built for another input size than the checkpoint; the checkpoint's grids are assumed square.
    """
    state_dict = release_state_dict(state_dict)
    last = len(model.stages) - 1
    out = {}
    for k, v in state_dict.items():
        staged = _OFFICIAL_STAGED.match(k)
        if k == "cls_token":
            k = f"stages.{last}.cls_token"
        elif staged:
            kind, i, rest = staged.groups()
            i = int(i) - 1
            k = {"patch_embed": f"stages.{i}.patch_embed{rest}", "pos_embed": f"stages.{i}.pos_embed",
                 "block": f"stages.{i}.blocks{rest}"}[kind]
        out[k] = v
    for i, stage in enumerate(model.stages):
        key = f"stages.{i}.pos_embed"
        if key not in out or out[key].shape == stage.pos_embed.shape:
            continue
        if out[key].dim() != 3 or out[key].shape[2] != stage.pos_embed.shape[2]:
            from formers.checkpoint import does_not_fit
            raise does_not_fit(model, f"{key} has shape {tuple(out[key].shape)}; the model's is "
                                      f"{tuple(stage.pos_embed.shape)} (1, tokens, channels)")
        prefix = stage.num_prefix_tokens
        n = out[key].shape[1] - prefix
        side = math.isqrt(n)
        if side * side != n:
            from formers.checkpoint import does_not_fit
            raise does_not_fit(model, f"{key}: cannot resize a position table of {n} grid entries (not a square grid) "
                             f"to {stage.grid[0]}x{stage.grid[1]}")
        out[key] = resample_pos_embed(out[key], stage.grid, (side, side), prefix)
    return out


# ---------------------------------------------------------------------------------------------
# Variants. Numbers from the paper's Table 2 / the official README (ImageNet-1K, 224x224).

_COMMON = dict(patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
               sr_ratios=(8, 4, 2, 1), qkv_bias=True, norm_eps=1e-6)
_CFG = dict(crop_pct=0.875, interpolation="bicubic", first_conv="stages.0.patch_embed.proj", classifier="head")


_NOTES = ("params/top-1 from the official README; FLOPs (1.9/3.8/6.7/9.8 G) as recalled from the paper, "
          "not seen in stored material, and matched by our count (MACs at 224, attention matmuls included): "
          "1.93/3.82/6.66/9.81 G")


def _card(name: str, params: str, macs: float, top1: float) -> ModelCard:
    return ModelCard(paper=65, arxiv="2102.12122", repo="whai362/PVT", official_name=name, params_m=params,
                     macs_g=macs, img_size=224, top1=top1, notes=_NOTES)


def _create(depths, **kwargs) -> PyramidVisionTransformer:
    return PyramidVisionTransformer(**{**_COMMON, "depths": depths, **kwargs})


@register_model(_card("PVT-Tiny", "13.2", 1.9, 75.1), **_CFG)
def pvt_tiny(**kwargs):
    return _create((2, 2, 2, 2), **kwargs)


@register_model(_card("PVT-Small", "24.5", 3.8, 79.8), **_CFG)
def pvt_small(**kwargs):
    return _create((3, 4, 6, 3), **kwargs)


@register_model(_card("PVT-Medium", "44.2", 6.7, 81.2), **_CFG)
def pvt_medium(**kwargs):
    return _create((3, 4, 18, 3), **kwargs)


@register_model(_card("PVT-Large", "61.4", 9.8, 81.7), **_CFG)
def pvt_large(**kwargs):
    return _create((3, 8, 27, 3), **kwargs)
