"""CrossViT: a two-branch, two-patch-size vision transformer fused by cross-attention.

Paper (catalog id 52): "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
Classification", Chen, Fan and Panda, arXiv 2103.14899. Official code: IBM/CrossViT (models/crossvit.py).

The idea, in three lines:
  two ViT branches see the image at two granularities: small patches (12 px on a 240 px image) in a
      narrow branch, large patches (16 px on the image resized to 224 px) in a branch twice as wide;
  after each few blocks the branches trade information through their CLS tokens only: a branch's CLS,
      projected to the other width, attends to the other branch's patch tokens and is projected back;
  each branch classifies its own CLS token and the two logits are averaged.
"""
import math
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from formers.checkpoint import _adapt_first_conv
from formers.layers import (DropPath, PatchEmbed, TransformerBlock, drop_path_rates, feature_take_indices,
                            resample_pos_embed, sdpa)
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

# the sizes below follow the input's: each is one eager node of a torch.fx graph
torch.fx.wrap("resample_pos_embed")
torch.fx.wrap("resize_to_branch")

__all__ = ["CrossViT", "CrossAttention", "checkpoint_filter_fn"]


def _scaled_side(v: int, patch: int, num: int, den: int) -> int:
    """v * num / den rounded (halves up) to the nearest multiple of `patch`, at least one patch: integer
    arithmetic only, so torch.export and ONNX carry it as a formula of the input size."""
    return max(1, (2 * v * num + patch * den) // (2 * patch * den)) * patch


def resize_to_branch(x: torch.Tensor, patch: int, num: int, den: int) -> torch.Tensor:
    """The input as a branch sees it: resized (bicubic) by num / den to the nearest multiple of its patch
    (at least one), or unchanged when that is its size. Under torch.compile / torch.export it always
    resamples (exact at the same size), so no test pins the input size."""
    if num == den:  # the branch that sees the input as it is (its patch divides the input: checked)
        return x
    h, w = x.shape[-2], x.shape[-1]
    nh, nw = _scaled_side(h, patch, num, den), _scaled_side(w, patch, num, den)
    if not torch.compiler.is_compiling() and nh == h and nw == w:
        return x
    return F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)


def multi_conv_proj(in_chans: int, dim: int, patch_size: int) -> nn.Sequential:
    """The dagger (†) patch embedding: three convs with ReLUs instead of one patch-sized conv.

    7x7 stride 4 to dim/4 channels, then 3x3 stride 3 (patch 12) or stride 2 (patch 16) to dim/2,
    then 3x3 stride 1 (patch 12) or stride 2 (patch 16) to dim: a total stride equal to the patch.
    """
    if patch_size not in (12, 16):
        raise ValueError(f"the multi-conv patch embedding is defined for patches of 12 and 16, got {patch_size}")
    second, third = ((3, 0), (1, 1)) if patch_size == 12 else ((2, 1), (2, 1))
    return nn.Sequential(
        nn.Conv2d(in_chans, dim // 4, 7, stride=4, padding=3), nn.ReLU(inplace=True),
        nn.Conv2d(dim // 4, dim // 2, 3, stride=second[0], padding=second[1]), nn.ReLU(inplace=True),
        nn.Conv2d(dim // 2, dim, 3, stride=third[0], padding=third[1]))


class CrossAttention(nn.Module):
    """Attention of the first token (a CLS) over all tokens: one query, N keys and values.

    Separate `wq`, `wk`, `wv` projections (the query one applied to the first token only), scale
    head_dim ** -0.5; returns the updated first token, (B, 1, C).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        # (B, L, C) -> (B, heads, L, C / heads) by unflatten: no -1 (a batch of 0 works), no shape unpacking (fx)
        heads = (self.num_heads, self.head_dim)
        q = self.wq(x[:, :1]).unflatten(-1, heads).transpose(1, 2)
        k = self.wk(x).unflatten(-1, heads).transpose(1, 2)
        v = self.wv(x).unflatten(-1, heads).transpose(1, 2)
        out = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))


class CrossAttentionBlock(nn.Module):
    """cls + DropPath(CrossAttention(LN(tokens))): pre-norm, residual on the CLS token only, no MLP."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        return x[:, :1] + self.drop_path(self.attn(self.norm1(x)))


def _proj(dim_in: int, dim_out: int, norm_eps: float) -> nn.Sequential:
    """LN -> GELU -> Linear: carries a CLS token from one branch's width to the other's."""
    return nn.Sequential(nn.LayerNorm(dim_in, eps=norm_eps), nn.GELU(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Transformer blocks in each branch, then cross-attention fusion of the CLS tokens.

    For branch i with partner j: its CLS goes through projs[i] (to j's width), is put in front of
    j's patch tokens, attends over them in fusion[i] (heads of j), and comes back through
    revert_projs[i] to replace i's CLS. The patch tokens themselves pass unchanged.
    """

    def __init__(self, dims, depths, num_heads, mlp_ratios, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path=(0.0,), norm_eps: float = 1e-6):
        super().__init__()
        n = len(dims)
        self.blocks = nn.ModuleList([
            nn.Sequential(*[TransformerBlock(dims[i], num_heads[i], mlp_ratios[i], qkv_bias, drop, attn_drop,
                                             drop_path[j], norm_eps) for j in range(depths[i])])
            for i in range(n)])
        partner = [(i + 1) % n for i in range(n)]
        self.projs = nn.ModuleList([_proj(dims[i], dims[p], norm_eps) for i, p in enumerate(partner)])
        self.fusion = nn.ModuleList([
            CrossAttentionBlock(dims[p], num_heads[p], qkv_bias, drop, attn_drop, drop_path[-1], norm_eps)
            for p in partner])
        self.revert_projs = nn.ModuleList([_proj(dims[p], dims[i], norm_eps) for i, p in enumerate(partner)])

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        ys: list[torch.Tensor] = []
        for i, blocks in enumerate(self.blocks):
            ys.append(blocks(xs[i]))
        out: list[torch.Tensor] = []
        for i, (proj, fusion, revert) in enumerate(zip(self.projs, self.fusion, self.revert_projs)):
            x, other = ys[i], ys[(i + 1) % len(ys)]
            cls = fusion(torch.cat([proj(x[:, :1]), other[:, 1:]], dim=1))
            out.append(torch.cat([revert(cls), x[:, 1:]], dim=1))
        return out


class CrossViT(Backbone):
    """CrossViT for classification: per-branch patch embedding, CLS token and position table; a
    stack of MultiScaleBlocks; per-branch final LayerNorm and linear head on the CLS; mean of the logits.

    `img_size` is the input size; branch i sees the input resized by `img_scale[i]` (bicubic, as the
    official code does: 240 -> 224 for the large-patch branch) to the nearest multiple of its patch.
    Other input sizes work: height and width must be multiples of the first branch's patch (that
    branch sees the image as it is), position tables are resized (bicubic) to the grids.

    forward_features returns a list with each branch's normalised tokens (CLS first), as timm's
    CrossVit does; `feature_info` has one entry per branch and multi-scale block, branch-major
    (timm's order), and forward_intermediates returns those patch-token maps as NCHW.
    """

    pool_types = ("token", "avg")  # forward_features is one token set per branch: no unpooled form

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 240,
                 img_scale=(1.0, 224 / 240), patch_size=(12, 16), embed_dim=(96, 192),
                 depth=((1, 4), (1, 4), (1, 4)), num_heads=(3, 3), mlp_ratio=(4.0, 4.0), multi_conv: bool = False,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, global_pool: str = "token"):
        super().__init__()
        n = len(patch_size)
        if not all(len(v) == n for v in (img_scale, embed_dim, num_heads)) or len(mlp_ratio) < n:
            raise ValueError("img_scale, patch_size, embed_dim, num_heads and mlp_ratio need one entry per branch")
        if any(len(d) not in (n, n + 1) or (len(d) == n + 1 and d[-1] != 0) for d in depth):
            raise ValueError(f"depth: one ({', '.join(['blocks'] * n)}) entry per multi-scale block (the official "
                             f"third entry, the fusion depth, must be 0), got {depth}")
        if not isinstance(img_size, int):
            if len(set(img_size)) != 1:
                raise ValueError(f"CrossViT: img_size must be square (one int), got {img_size}")
            img_size = int(img_size[0])
        depth = [tuple(d[:n]) for d in depth]
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.img_scale = tuple(img_scale)
        # each scale as a fraction (224 / 240 -> 14 / 15): the resize rounds in integers (export, ONNX)
        self.scale_ratios = [(f.numerator, f.denominator)
                             for f in (Fraction(float(v)).limit_denominator(10000) for v in img_scale)]
        self.patch_size = tuple(patch_size)
        self.embed_dim = tuple(embed_dim)
        self.num_branches = n
        self.global_pool = self.check_pool(global_pool)
        self.num_features = sum(embed_dim)
        self.input_divisor = self.min_input_size = patch_size[0]
        if img_size % patch_size[0]:
            raise ValueError(f"CrossViT: img_size {img_size} must be a multiple of the first patch {patch_size[0]}")

        self.grids = [self._branch_size((img_size, img_size), i)[0] // p for i, p in enumerate(patch_size)]
        self.patch_embed = nn.ModuleList()
        for p, d in zip(patch_size, embed_dim):
            embed = PatchEmbed(p, in_chans, d)
            if multi_conv:
                embed.proj = multi_conv_proj(in_chans, d, p)
            self.patch_embed.append(embed)
        self.cls_token = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, d)) for d in embed_dim])
        self.pos_embed = nn.ParameterList([nn.Parameter(torch.zeros(1, 1 + g * g, d))
                                           for g, d in zip(self.grids, embed_dim)])
        self.pos_drop = nn.Dropout(drop_rate)

        # stochastic depth rises over the deepest branch of each multi-scale block; the fusion
        # of a block takes the rate of its last block
        dpr = drop_path_rates(drop_path_rate, [max(d) for d in depth])
        self.blocks = nn.ModuleList([
            MultiScaleBlock(embed_dim, d, num_heads, mlp_ratio[:n], qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                            norm_eps) for i, d in enumerate(depth)])
        self.feature_info = [dict(num_chs=embed_dim[b], reduction=round(patch_size[b] / img_scale[b]),
                                  module=f"blocks.{i}") for b in range(n) for i in range(len(depth))]
        self.norm = nn.ModuleList([nn.LayerNorm(d, eps=norm_eps) for d in embed_dim])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_heads(num_classes)
        self.init_weights()

    def init_weights(self):
        for p in list(self.pos_embed) + list(self.cls_token):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(init_trunc_normal)

    def _make_heads(self, num_classes: int) -> nn.ModuleList:
        return nn.ModuleList([nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity()
                              for d in self.embed_dim])

    def make_classifier(self, num_classes: int) -> nn.ModuleList:
        return self._make_heads(num_classes)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """timm's: keep the blocks up to the last one a taken index needs (index b * num_blocks + i is
        branch b after block i). The fusion into a branch no tap reads stays, unused (DDP then needs
        find_unused_parameters=True), as in timm."""
        num_blocks = len(self.feature_info) // self.num_branches  # as built: pruning keeps the indices
        take, _ = feature_take_indices(self.num_branches * num_blocks, indices)
        self.blocks = self.blocks[:max(t % num_blocks for t in take) + 1]
        if prune_norm:
            self.norm = nn.ModuleList([nn.Identity() for _ in range(self.num_branches)])
        if prune_head:
            self.reset_classifier(0)
        return take

    def _branch_size(self, hw, i: int) -> tuple[int, int]:
        """The size branch i resizes an (H, W) input to: scaled, rounded to a multiple of its patch."""
        num, den = self.scale_ratios[i]
        return tuple(v if num == den else _scaled_side(v, self.patch_size[i], num, den) for v in hw)

    def _embed(self, x) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Per branch: resize, patch-embed, prepend the CLS, add the (resized) position table."""
        if not torch.jit.is_scripting():
            self.check_input(x)
            if torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling():
                raise RuntimeError(f"{getattr(self, 'model_name', 'CrossViT')}: the TorchScript-based ONNX exporter "
                                   "records the large-patch branch's resize (a rounded fraction of the input size) "
                                   "as a constant, so the graph would be wrong at any other size; export with "
                                   "torch.onnx.export(..., dynamo=True) instead")
        xs: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        for i, (embed, cls_token, pos_embed) in enumerate(zip(self.patch_embed, self.cls_token, self.pos_embed)):
            num, den = self.scale_ratios[i]
            xi = embed(resize_to_branch(x, self.patch_size[i], num, den))  # (B, C, h, w)
            grid = (xi.shape[-2], xi.shape[-1])
            xi = torch.cat([cls_token.expand(x.shape[0], -1, -1), xi.flatten(2).transpose(1, 2)], dim=1)
            pos = resample_pos_embed(pos_embed, grid, (self.grids[i], self.grids[i]), 1, mode="bicubic")
            xs.append(self.pos_drop(xi + pos))
            grids.append(grid)
        return xs, grids

    def _run(self, blk, xs):
        if getattr(self, "grad_checkpointing", False) and xs[0].requires_grad:
            return checkpoint(blk, xs, use_reentrant=False)
        return blk(xs)

    def forward_features(self, x) -> list[torch.Tensor]:
        """(B, C, H, W) -> one (B, 1 + h_i * w_i, C_i) tensor per branch, normalised, CLS first."""
        xs, _ = self._embed(x)
        for blk in self.blocks:
            if torch.jit.is_scripting():  # TorchScript cannot pass a module to _run
                xs = blk(xs)
            else:
                xs = self._run(blk, xs)
        out: list[torch.Tensor] = []
        for i, norm in enumerate(self.norm):
            out.append(norm(xs[i]))
        return out

    def forward_head(self, xs: list[torch.Tensor], pre_logits: bool = False):
        """Mean of the branches' logits; with pre_logits (or no classifier), the pooled branch
        features concatenated (num_features = sum of the widths)."""
        feats: list[torch.Tensor] = []
        for t in xs:
            feats.append(self.head_drop(t[:, 1:].mean(1) if self.global_pool == "avg" else t[:, 0]))
        if pre_logits or self.num_classes == 0:
            return torch.cat(feats, dim=-1)
        logits: list[torch.Tensor] = []
        for i, head in enumerate(self.head):
            logits.append(head(feats[i]))
        return torch.stack(logits).mean(0)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Patch tokens of each branch after each multi-scale block, index b * num_blocks + i for
        branch b after block i (timm's order); `norm` applies the branch's final LayerNorm.
        The final output is forward_features' list (unless stop_early cut the blocks short)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        num_blocks = len(self.feature_info) // self.num_branches  # as built: pruning keeps the indices
        take, _ = feature_take_indices(self.num_branches * num_blocks, indices)
        last_block = max(t % num_blocks for t in take)
        xs, grids = self._embed(x)
        blocks = self.blocks[:last_block + 1] if stop_early or intermediates_only else self.blocks
        per_branch = [[] for _ in range(self.num_branches)]
        for i, blk in enumerate(blocks):
            xs = self._run(blk, xs)
            for b, t in enumerate(xs):
                if b * num_blocks + i in take:
                    t = (self.norm[b](t) if norm else t)[:, 1:]
                    if output_fmt == "NCHW":
                        t = t.transpose(1, 2).unflatten(2, grids[b])
                    per_branch[b].append(t)
        intermediates = [t for feats in per_branch for t in feats]
        if intermediates_only:
            return intermediates
        if len(blocks) == num_blocks:
            xs = [n(t) for n, t in zip(self.norm, xs)]
        return xs, intermediates

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: CrossViT) -> dict:
    """Map an official CrossViT release, a timm CrossVit state dict, or our own, to our key names.

    The official names are ours (position tables and CLS tokens in ParameterLists: `pos_embed.0`);
    timm flattens those two to `pos_embed_0` / `cls_token_0`. Position tables are resized (bicubic,
    CLS entry kept) to the model's grids, and patch-embedding first convs made for another channel
    count are converted (summed for 1 channel, tiled otherwise) for both branches. Wrappers
    ({'model': ...}) and a `module.` prefix are removed before, by formers.checkpoint.read_state_dict.
    """
    out = {}
    for k, v in state_dict.items():
        for name in ("pos_embed", "cls_token"):
            if k.startswith(name + "_"):
                k = f"{name}.{k[len(name) + 1:]}"
        out[k] = v
    for i, grid in enumerate(model.grids):
        key = f"pos_embed.{i}"
        if key in out and (out[key].dim() != 3 or out[key].shape[1] != 1 + grid * grid):
            from formers.checkpoint import does_not_fit
            if out[key].dim() != 3 or out[key].shape[1] < 2:
                raise does_not_fit(model, f"{key} has shape {tuple(out[key].shape)}; a position table is "
                                          f"(1, 1 + grid entries, channels)")
            n = out[key].shape[1] - 1
            side = math.isqrt(n)
            if side * side != n:
                raise does_not_fit(model, f"{key}: cannot resize a table of {n} grid entries (not square) to {grid}x{grid}")
            out[key] = resample_pos_embed(out[key], (grid, grid), (side, side), 1, mode="bicubic")
        for first in (f"patch_embed.{i}.proj.weight", f"patch_embed.{i}.proj.0.weight"):
            if first in out and out[first].dim() == 4 and out[first].shape[1] != model.in_chans:
                out[first] = _adapt_first_conv(out[first], model.in_chans)
    return out


# ---------------------------------------------------------------------------------------------
# Variants, named as timm names them (by their real input size: the official *_224 models take
# 240 px, *_384 take 408 px). Reported numbers: the paper's Table 1/2 (as recorded in
# shared/reference/backbones.tsv); FLOPs are MACs at the card's resolution.

# One head per branch (their logits averaged); inputs are multiples of the first patch (12) and at least one
# patch, so timm's harness, which shrinks inputs to 128 px (not a multiple of 12), takes min_input_size.
# forward_features is one token set per branch: there is no map, so no pool_size.
_CFG = dict(crop_pct=0.875, first_conv=("patch_embed.0.proj", "patch_embed.1.proj"), classifier=("head.0", "head.1"),
            min_input_size=(3, 12, 12), pool_size=None)
_DAGGER_CFG = dict(_CFG, first_conv=("patch_embed.0.proj.0", "patch_embed.1.proj.0"))
_CFG_408 = dict(_DAGGER_CFG, crop_pct=1.0)
_NOTE_408 = "top-1 as recorded in the shared reference (not confirmed against the paper's table)"


def _card(official: str, params: str, macs: float, top1: float | None, img_size: int = 240, notes: str = "",
          status: str = "implemented") -> ModelCard:
    return ModelCard(paper=52, arxiv="2103.14899", repo="IBM/CrossViT", official_name=official, params_m=params,
                     macs_g=macs, img_size=img_size, top1=top1, status=status, notes=notes)


def _create(embed_dim, depth: int, num_heads: int, mlp_ratio: float, multi_conv: bool = False,
            base: int = 240, **kwargs) -> CrossViT:
    # the large-patch branch sees a 240 px input at 224 px and a 408 px one at 384 px
    branch = {240: 224, 408: 384}[base]
    args = dict(img_size=base, img_scale=(1.0, branch / base), patch_size=(12, 16), embed_dim=embed_dim,
                depth=((1, depth),) * 3, num_heads=(num_heads, num_heads), mlp_ratio=(mlp_ratio, mlp_ratio),
                multi_conv=multi_conv, qkv_bias=True, norm_eps=1e-6)
    args.update(kwargs)
    return CrossViT(**args)


@register_model(_card("crossvit_tiny_224", "6.9", 1.6, 73.4, notes="the official/timm build has 7.01M parameters "
                      "(+1.6% on the printed 6.9, inside its rounding tolerance)"), **_CFG)
def crossvit_tiny_240(**kwargs):
    return _create((96, 192), 4, 3, 4.0, **kwargs)


@register_model(_card("crossvit_small_224", "26.7", 5.6, 81.0), **_CFG)
def crossvit_small_240(**kwargs):
    return _create((192, 384), 4, 6, 4.0, **kwargs)


@register_model(_card("crossvit_base_224", "104.7", 21.2, 82.2), **_CFG)
def crossvit_base_240(**kwargs):
    return _create((384, 768), 4, 12, 4.0, **kwargs)


@register_model(_card("crossvit_9_224", "8.6", 1.8, 73.9), **_CFG)
def crossvit_9_240(**kwargs):
    return _create((128, 256), 3, 4, 3.0, **kwargs)


@register_model(_card("crossvit_15_224", "27.4", 5.8, 81.5), **_CFG)
def crossvit_15_240(**kwargs):
    return _create((192, 384), 5, 6, 3.0, **kwargs)


@register_model(_card("crossvit_18_224", "43.3", 9.0, 82.5), **_CFG)
def crossvit_18_240(**kwargs):
    return _create((224, 448), 6, 7, 3.0, **kwargs)


@register_model(_card("crossvit_9_dagger_224", "8.8", 2.0, 77.1), **_DAGGER_CFG)
def crossvit_9_dagger_240(**kwargs):
    return _create((128, 256), 3, 4, 3.0, multi_conv=True, **kwargs)


@register_model(_card("crossvit_15_dagger_224", "28.2", 6.1, 82.3), **_DAGGER_CFG)
def crossvit_15_dagger_240(**kwargs):
    return _create((192, 384), 5, 6, 3.0, multi_conv=True, **kwargs)


@register_model(_card("crossvit_18_dagger_224", "44.3", 9.5, 82.8), **_DAGGER_CFG)
def crossvit_18_dagger_240(**kwargs):
    return _create((224, 448), 6, 7, 3.0, multi_conv=True, **kwargs)


@register_model(_card("crossvit_15_dagger_384", "28.5", 21.4, 83.5, img_size=408,
                      notes=_NOTE_408), **_CFG_408)
def crossvit_15_dagger_408(**kwargs):
    return _create((192, 384), 5, 6, 3.0, multi_conv=True, base=408, **kwargs)


@register_model(_card("crossvit_18_dagger_384", "44.6", 32.4, 83.9, img_size=408,
                      notes=_NOTE_408), **_CFG_408)
def crossvit_18_dagger_408(**kwargs):
    return _create((224, 448), 6, 7, 3.0, multi_conv=True, base=408, **kwargs)


@register_model(_card("", None, None, None, img_size=32, status="reduced",
                      notes="demo: 32 px input, patches 4 and 7 (the second branch sees it at 28 px)"),
                **dict(_CFG, min_input_size=(3, 4, 4)))
def crossvit_demo(**kwargs):
    args = dict(img_size=32, img_scale=(1.0, 28 / 32), patch_size=(4, 7), embed_dim=(48, 96),
                depth=((1, 2), (1, 2)), num_heads=(2, 4), mlp_ratio=(3.0, 3.0))
    args.update(kwargs)
    return CrossViT(**args)
