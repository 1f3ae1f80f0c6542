"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper (catalog id 41): "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al.,
CVPR 2023, arXiv 2303.08125. Official code: rayleizhu/BiFormer (models/biformer.py, ops/bra_legacy.py).

The idea, in three lines:
  cut each stage map into S x S regions; each region routes to the top-k regions whose mean key best
      matches its mean query (a region-level affinity, hard and gradient-free);
  its tokens then attend only to the gathered keys/values of those k regions (token to token), plus a
      5x5 depthwise "LePE" conv on V; a 4-stage conv-stem pyramid, top-k 1/4/16, full attention in stage 4.

Any input size works. The classification code requires every stage map to split into S x S regions
(224 with S=7); its dense-task option `auto_pad` instead zero-pads the (normalised) map at the bottom
and right to a multiple of S before the qkv projection and crops the result, with the padded tokens
taking part in routing and attention unmasked. We always do the same, so at 224 nothing is padded and
the outputs are the official classifier's, and at other sizes they are the official auto_pad model's.
(The official detection/segmentation configs also change S: n_win=16 on COCO, 8 on ADE20K; pass
`n_win=` for that. The repository's later NCHW rewrite, ops/bra_nchw.py, pads differently and is not
what the released weights were trained with.)

Under torch.export the padding, the regions' reassembly and the crop are index gathers whose shapes need
no guard, so one exported program takes a dynamic height and width: from 113 px when traced at 128 or
more, where every routed stage's regions are at least 2 x 2 (a region of one pixel at the traced size
would be specialised to one).
"""
from __future__ import annotations

import re

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from formers.checkpoint import release_state_dict
from formers.layers.attention import sdpa
from formers.layers.drop import DropPath, drop_path_rates
from formers.layers.helpers import feature_take_indices, to_2tuple
from formers.layers.mlp import Mlp
from formers.layers.windows import compiling, crop_hw, window_partition, window_reverse
from formers.layers.pool import pool_map
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["BiFormer", "BiLevelRoutingAttention", "AttentionLePE", "checkpoint_filter_fn"]


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BRA) on a channels-last (B, H, W, C) map.

    One Linear gives q, k (qk_dim channels each) and v (dim channels). Level 1: the map is cut into
    n_win x n_win regions; region queries/keys are the means of their tokens' q/k, and each region
    keeps the `topk` regions of highest (q_r * scale) . k_r. Level 2: each region's queries attend to
    the keys/values of all tokens of its routed regions (SDPA). LePE (a depthwise conv on the V map)
    is added before the output Linear. Note the softmax scale is qk_dim ** -0.5 with the FULL qk_dim,
    not the per-head width, in both levels (as the official code does).
    """

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, qk_dim: int | None = None, topk: int = 4,
                 side_dwconv: int = 5, attn_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim {self.qk_dim} and dim {dim} must be divisible by num_heads {num_heads}")
        if not 0 < topk <= n_win * n_win:
            raise ValueError(f"topk={topk} must be in 1..{n_win * n_win} (the number of regions, n_win={n_win})")
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = self.qk_dim ** -0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def route(self, q_reg, k_reg):
        """Region-level routing: (B, R, n, c) region tokens -> (B, R, topk) indices of routed regions."""
        q_r = q_reg.detach().mean(2)
        k_r = k_reg.detach().mean(2)
        affinity = (q_r * self.scale) @ k_r.transpose(-1, -2)  # (B, R, R)
        return affinity.topk(self.topk, dim=-1)[1]  # the indices ([1]: TorchScript returns a plain tuple)

    @staticmethod
    def gather_regions(x_reg, idx):
        """(B, R, n, c) regions and (B, R, k) indices -> (B, R, k*n, c): the tokens of the k routed regions.

        One row gather (index_select) from the (B*R, n*c) table of regions. Its backward adds into
        (B*R, n*c); gathering from an R-times expanded view, as the official code does, would
        allocate and scatter into R copies of the map in the backward pass.
        """
        b, r, n, c = x_reg.shape[0], x_reg.shape[1], x_reg.shape[2], x_reg.shape[3]
        k = idx.shape[-1]
        rows = (idx + r * torch.arange(b, device=idx.device).view(b, 1, 1)).reshape(b * r * k)
        return x_reg.reshape(b * r, n * c).index_select(0, rows).reshape(b, r, k * n, c)

    def forward(self, x):
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # indexed, not unpacked: torch.fx traces it
        s = self.n_win
        rh, rw = (h + s - 1) // s, (w + s - 1) // s  # region size; R = s*s regions of n = rh*rw tokens
        hp, wp = s * rh, s * rw  # (sizes written as multiples of the regions: torch.export needs no guard)
        x = _pad_to(x, hp, wp)  # zeros at the bottom/right (the official auto_pad)
        q, kv = self.qkv(x).split([self.qk_dim, self.qk_dim + c], dim=-1)
        q_reg = window_partition(q, rh, rw)  # (B, R, n, qk)
        kv_reg = window_partition(kv, rh, rw)  # (B, R, n, qk + C)
        idx = self.route(q_reg, kv_reg[..., :self.qk_dim])
        kv_sel = self.gather_regions(kv_reg, idx)  # (B, R, topk*n, qk + C)

        # explicit sizes, no -1: a batch of zero images reshapes too
        r, n, m, sel = s * s, rh * rw, self.num_heads, self.topk * rh * rw
        q = q_reg.reshape(b * r, n, m, self.qk_dim // m).transpose(1, 2)  # heads split the channels in order
        k_sel, v_sel = kv_sel.reshape(b * r, sel, self.qk_dim + c).split([self.qk_dim, c], dim=-1)
        k_sel = k_sel.reshape(b * r, sel, m, self.qk_dim // m).transpose(1, 2)
        v_sel = v_sel.reshape(b * r, sel, m, c // m).transpose(1, 2)
        out = sdpa(q, k_sel, v_sel, dropout=self.attn_drop if self.training else 0.0, scale=self.scale)
        out = _merge_regions(out.transpose(1, 2).reshape(b, r, n, c), s, rh, rw)

        v_map = kv[..., self.qk_dim:].permute(0, 3, 1, 2)
        out = out + self.lepe(v_map).permute(0, 2, 3, 1)
        return _crop_to(self.proj(out), h, w)


def _merge_regions(x: torch.Tensor, s: int, rh: int, rw: int) -> torch.Tensor:
    """(B, s*s, rh*rw, C) region tokens -> the (B, s*rh, s*rw, C) map (window_reverse). Under torch.compile /
    torch.export every pixel is gathered from its region by index: reshaping (s, rh) into one axis would add
    guards on the size (s % (s * rh) != 0) that the exporter cannot prove for a dynamic height and width."""
    if compiling():
        x = x.view(x.shape[0], s, s, rh, rw, x.shape[3])
        i, j = torch.arange(s * rh, device=x.device)[:, None], torch.arange(s * rw, device=x.device)[None, :]
        ri, rj = i // rh, j // rw  # the region of each pixel, then its place in it (no `%`: ONNX lacks it here)
        return x[:, ri, rj, i - ri * rh, j - rj * rw]
    return window_reverse(x, rh, rw, s * rh, s * rw)


def _pad_to(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """(B, H, W, C) zero-padded at the bottom/right to (B, hp, wp, C): x itself when it fits (eager), a pad
    by a possibly-zero amount under torch.compile / torch.export."""
    if compiling() or x.shape[1] != hp or x.shape[2] != wp:
        x = F.pad(x, (0, 0, 0, wp - x.shape[2], 0, hp - x.shape[1]))
    return x


def _crop_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H', W', C) -> its top-left (B, h, w, C), the inverse of _pad_to. Under torch.compile / torch.export
    the rows and columns are gathered by index: a slice would make the tracer guard on whether anything was
    padded, fixing the exported program to sizes of one kind."""
    if compiling():
        rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        return x.index_select(1, rows).index_select(2, cols)
    return crop_hw(x, h, w)


# padding and cropping decided from the real size at run time: one torch.fx node each, so a traced model
# takes any size
torch.fx.wrap("_pad_to")
torch.fx.wrap("_crop_to")


class AttentionLePE(nn.Module):
    """Full multi-head self-attention plus LePE, on a channels-last (B, H, W, C) map (the last stage).

    Unlike BRA: qkv has no bias, the scale is the usual head_dim ** -0.5, and the depthwise LePE conv
    runs on the block's (normalised) input x, not on V.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        out = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class BiFormerBlock(nn.Module):
    """NCHW in and out: x + DWConv3x3(x) (conditional position encoding), then, channels-last,
    x + Attn(LN(x)) and x + MLP(LN(x)) (LayerNorms eps 1e-6, MLP Linear-GELU-Linear).

    topk > 0: bi-level routing attention; topk == -2: full attention with LePE (AttentionLePE, built
    with its own default of 8 heads, as the official code does, whatever the stage's head count).
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, topk: int, n_win: int = 7, mlp_ratio: float = 3.0,
                 side_dwconv: int = 5, cpe_kernel: int = 3, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, cpe_kernel, padding=cpe_kernel // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, qk_dim, topk, side_dwconv, attn_drop)
        elif topk == -2:
            self.attn = AttentionLePE(dim, 8, side_dwconv, attn_drop)
        else:
            raise ValueError(f"topk={topk}: use a positive region count (BRA) or -2 (full attention with LePE)")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.cpe(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormerStage(nn.Module):
    """A downsampling layer (the conv stem in stage 0: conv3 s2-BN-GELU-conv3 s2-BN; later stages:
    conv3 s2-BN), then the blocks. NCHW throughout."""

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, qk_dim: int, topk: int, n_win: int,
                 mlp_ratio: float, side_dwconv: int, stem: bool = False, attn_drop: float = 0.0, drop_path=()):
        super().__init__()
        if stem:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2), nn.GELU(),
                nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
        else:
            self.downsample = nn.Sequential(nn.Conv2d(in_chans, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[
            BiFormerBlock(dim, num_heads, qk_dim, topk, n_win, mlp_ratio, side_dwconv, attn_drop=attn_drop,
                          drop_path=drop_path[j]) for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.downsample(x)
        for blk in self.blocks:
            if not torch.jit.is_scripting() and self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)  # TorchScript has no activation checkpointing
            else:
                x = blk(x)
        return x


class BiFormer(Backbone):
    """BiFormer for classification: four BiFormerStages (strides 4, 8, 16, 32), a final BatchNorm on
    the stage-4 map, global average pooling and a linear head.

    Heads per stage are qk_dim // head_dim for the BRA stages; stage 4 (topk -2) uses 8 heads.
    Any input size works (stride-2 convs round up; BRA pads each map to a multiple of n_win).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, depths=(2, 2, 8, 2),
                 embed_dims=(64, 128, 256, 512), qk_dims=None, head_dim: int = 32, topks=(1, 4, 16, -2),
                 n_win: int = 7, mlp_ratios=(3, 3, 3, 3), side_dwconv: int = 5, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        num_stages = len(depths)
        qk_dims = tuple(qk_dims or embed_dims)
        if not all(len(v) == num_stages for v in (embed_dims, qk_dims, topks, mlp_ratios)):
            raise ValueError("depths, embed_dims, qk_dims, topks and mlp_ratios need one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        h, w = to_2tuple(img_size)
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = embed_dims[-1]
        self.n_win = n_win
        self.grad_checkpointing = False

        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        self.feature_info = []
        prev = in_chans
        for i in range(num_stages):
            self.stages.append(BiFormerStage(
                prev, embed_dims[i], depths[i], qk_dims[i] // head_dim, qk_dims[i], topks[i], n_win, mlp_ratios[i],
                side_dwconv, stem=i == 0, attn_drop=attn_drop_rate, drop_path=dpr[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))
            prev = embed_dims[i]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)  # as the official code; convs keep torch's init


    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x):
        """(B, C, H, W) -> the normalised stage-4 map (B, C4, ceil(H/32), ceil(W/32))."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        """Average pooling then the classifier; with global_pool='' the map stays unpooled (and the
        classifier, if any, is applied at every position)."""
        if self.global_pool:
            x = self.head_drop(pool_map(x, self.global_pool))
            return x if pre_logits else self.head(x)
        return x if pre_logits else self.head(self.head_drop(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """One NCHW map per requested stage (the last one through the final BatchNorm when `norm`)
        and, unless `intermediates_only`, the forward_features output (with `stop_early`, the map
        of the last stage run)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        self.check_input(x)
        last = len(self.stages) - 1
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early or intermediates_only else self.stages
        feats = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                feats.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return feats
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, feats

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


_BLOCK_RENAMES = (("pos_embed.", "cpe."), ("attn.qkv.qkv.", "attn.qkv."), ("attn.wo.", "attn.proj."),
                  ("mlp.0.", "mlp.fc1."), ("mlp.3.", "mlp.fc2."))
_OFFICIAL_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.(.*)$")
_OFFICIAL_DOWN = re.compile(r"^downsample_layers\.(\d+)\.(.*)$")


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict:
    """Map an official BiFormer release (or our own state dict) to our key names.

    Official -> ours: downsample_layers.{i}.* -> stages.{i}.downsample.* (i = 0 is the stem);
    stages.{i}.{j}.* -> stages.{i}.blocks.{j}.* with pos_embed -> cpe, attn.qkv.qkv -> attn.qkv,
    attn.wo -> attn.proj, mlp.0 / mlp.3 -> mlp.fc1 / mlp.fc2 (stage-4 attn.qkv / attn.proj / attn.lepe
    keep their names); norm.* (BatchNorm, running stats included) and head.* are unchanged.
    A `_checkpoint_wrapped_module.` component (added by torch.distributed's activation-checkpoint
    wrapper, should a checkpoint have been saved through one) and a `module.` prefix are dropped. There are no position tables, so nothing depends on the input size.
    timm has no BiFormer, so there is no third format.
    """
    state_dict = release_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        k = k.replace("_checkpoint_wrapped_module.", "")
        down = _OFFICIAL_DOWN.match(k)
        block = _OFFICIAL_BLOCK.match(k)
        if down:
            k = f"stages.{down.group(1)}.downsample.{down.group(2)}"
        elif block:
            i, j, rest = block.groups()
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = f"stages.{i}.blocks.{j}.{rest}"
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Variants. Numbers from the paper's Table 1 / the official README (ImageNet-1K, 224x224).

_CFG = dict(crop_pct=0.875, interpolation="bicubic", first_conv="stages.0.downsample.0", classifier="head")
_BRA = dict(topks=(1, 4, 16, -2), n_win=7, head_dim=32, mlp_ratios=(3, 3, 3, 3), side_dwconv=5)


def _card(name: str, params: str, macs: float, top1: float) -> ModelCard:
    return ModelCard(paper=41, arxiv="2303.08125", repo="rayleizhu/BiFormer", official_name=name, params_m=params,
                     macs_g=macs, img_size=224, top1=top1)


@register_model(_card("BiFormer-T", "13.1", 2.2, 81.4), **_CFG)
def biformer_tiny(**kwargs):
    return BiFormer(**{**_BRA, "depths": (2, 2, 8, 2), "embed_dims": (64, 128, 256, 512), **kwargs})


@register_model(_card("BiFormer-S", "25.5", 4.5, 83.8), **_CFG)
def biformer_small(**kwargs):
    return BiFormer(**{**_BRA, "depths": (4, 4, 18, 4), "embed_dims": (64, 128, 256, 512), **kwargs})


@register_model(_card("BiFormer-B", "56.8", 9.8, 84.3), **_CFG)
def biformer_base(**kwargs):
    return BiFormer(**{**_BRA, "depths": (4, 4, 18, 4), "embed_dims": (96, 192, 384, 768), **kwargs})


@register_model(ModelCard(paper=41, arxiv="2303.08125", repo="rayleizhu/BiFormer", official_name="",
                          img_size=32, status="reduced",
                          notes="a few-hundred-K-parameter config for quick training runs at 32x32: "
                                "2x2 regions (n_win=2), head_dim 16"), **_CFG)
def biformer_demo(**kwargs):
    defaults = dict(img_size=32, depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=16,
                    topks=(1, 2, 2, -2), n_win=2, mlp_ratios=(3, 3, 3, 3), side_dwconv=5)
    return BiFormer(**{**defaults, **kwargs})
