"""FaViT: Factorization Vision Transformer.

Paper (catalog id 53): "Factorization Vision Transformer: Modeling Long Range Dependency with Local
Window Cost", Qin et al., arXiv 2312.08614. Official code: q2479036243/FaViT (FaViT/classification/favit.py).

The idea, in three lines:
  factorization self-attention (FaSA): split the channels into groups; one group attends globally to a
      spatially reduced map (PVT's SRA, one head), the others attend to 7x7 = 49 "kv tokens" each;
  a group's kv tokens come from cutting its K/V map into 7x7 windows sampled with dilation d (1, or the
      stage's reduction ratio) and pooling over all windows, so every query sees the whole map at 49-key cost;
  a PVTv2 skeleton: overlapping patch embeddings, a dwconv FFN, a LayerNorm after every stage, mean pooling.

The pooling over windows is the official code's: the unfolded (windows L x channels c) values of each of
the 49 kernel positions are flattened window-major and averaged in c runs of L consecutive entries
(torch's adaptive average pooling to c outputs), so a run mixes windows *and* channels; we reproduce it
exactly. K/V maps are reflection-padded at the bottom/right to a multiple of the window stride
(d * 6 + 1); where the official padding fails (a pad as large as the map, e.g. stage 1 below
~200 px), we reflect the padded map again (a 1-pixel side repeats), which agrees with it wherever it runs. Any input at least `min_input_size` (29 px for the paper's strides) works; below it the
global branch's reduction conv would see an empty map. The taps are gathered by index (cached per size in
eager mode, computed in the graph under torch.export), so one exported program takes a dynamic height and
width: from 61 px when traced at 64, where every reduced map is at least 2 x 2 (a map of one pixel at the
traced size would be specialised to one).
"""
from __future__ import annotations

import math
import re

import torch
import torch.fx
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.checkpoint import release_state_dict
from formers.layers import DropPath, PatchEmbed, cached_constant, drop_path_rates, sdpa, to_2tuple
from formers.layers.pool import pool_map
from formers.layers.windows import compiling
from formers.models.base import Backbone, stage_intermediates
from formers.registry import ModelCard, register_model

__all__ = ["FactorizationTransformer", "FactorizationAttention", "reflect_pad", "checkpoint_filter_fn"]


def _reflect(pos: torch.Tensor, size: int) -> torch.Tensor:
    """Positions on a side of `size` reflection-padded however far -> the source positions. Reflecting the
    padded side again wherever one reflection is not enough gives the triangle wave of period 2 (size - 1)
    (a 1-pixel side repeats). Tensor arithmetic of the size: no branch, traceable at a symbolic size."""
    if torch.jit.is_scripting():
        period = max(2 * size - 2, 1)
    else:
        period = torch.sym_max(2 * size - 2, 1)  # no guard on the size under torch.export
    q = pos - (pos // period) * period  # pos mod period, without `%` (ONNX lacks it for a symbolic period)
    return torch.minimum(q, period - q)


def reflect_pad(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Reflection-pad an NCHW map by `bottom` rows and `right` columns, however large: where one
    reflection (at most side - 1) is not enough, reflect the padded map again; a 1-pixel side repeats."""
    h, w = x.shape[-2], x.shape[-1]
    rows = _reflect(torch.arange(h + bottom, device=x.device), h)
    cols = _reflect(torch.arange(w + right, device=x.device), w)
    return x.index_select(-2, rows).index_select(-1, cols)


def _tap_positions(size: int, k: int, d: int, device: torch.device) -> torch.Tensor:
    """(cells * k,) source positions, along a side of `size`, of the k taps (dilation d) of each cell of
    d * (k - 1) + 1 pixels (cell-major), the side reflection-padded at its end to whole cells (as reflect_pad)."""
    stride = d * (k - 1) + 1
    cells = (size + stride - 1) // stride
    p = torch.arange(cells * k, device=device)
    cell = p // k
    return _reflect(cell * stride + (p - cell * k) * d, size)


def _build_tap_index(h: int, w: int, k: int, d: int, c: int, device: torch.device) -> torch.Tensor:
    """(k*k, windows * c) indices into a (c, h, w) map flattened: entry (u*k + v, (i*nw + j)*c + ch) is
    channel ch at tap (u, v) of cell (i, j). Built from flat aranges: no tensor has an axis of cells or
    windows, which torch.export would specialise where it is 1 at the traced size."""
    rows, cols = _tap_positions(h, k, d, device), _tap_positions(w, k, d, device)
    nw = cols.shape[0] // k
    e = torch.arange(rows.shape[0] // k * nw * c, device=device)
    cell = e // c
    ch = e - cell * c
    i = cell // nw
    j = cell - i * nw
    t = torch.arange(k * k, device=device)[:, None]
    u = t // k
    v = t - u * k
    return ch * (h * w) + rows[i * k + u] * w + cols[j * k + v]


@cached_constant(maxsize=64)
def _cached_tap_index(h: int, w: int, k: int, d: int, c: int, device: str) -> torch.Tensor:
    """_build_tap_index, cached: it depends on sizes only."""
    return _build_tap_index(h, w, k, d, c, torch.device(device))


def _tap_index(h: int, w: int, k: int, d: int, c: int, device: torch.device) -> torch.Tensor:
    """_build_tap_index: cached in eager mode, computed in the graph under TorchScript, torch.compile and
    torch.export (sizes there may be symbolic). One torch.fx node, so a traced model takes any size."""
    if torch.jit.is_scripting():
        return _build_tap_index(h, w, k, d, c, device)
    else:
        if compiling():
            return _build_tap_index(h, w, k, d, c, device)
        return _cached_tap_index(h, w, k, d, c, str(device))


torch.fx.wrap("_tap_index")


def _run_means(x: torch.Tensor, runs: int) -> torch.Tensor:
    """(..., runs * n) -> (..., runs): the means of the consecutive runs of n entries. Eager: a reshape and a
    mean; under torch.compile / torch.export a product with the averaging matrix (n is 1 at small sizes, and
    an axis of n entries would fix an exported program to that; ONNX's adaptive pooling fixes n outright)."""
    n = x.shape[-1] // runs
    if compiling():
        entry = torch.arange(x.shape[-1], device=x.device)[:, None]
        average = (entry // n == torch.arange(runs, device=x.device)[None, :]).to(x.dtype) / n
        return x @ average
    return x.unflatten(-1, (runs, n)).mean(-1)


def _dwconv(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)


class FactorizationAttention(nn.Module):
    """FaSA on (B, N, C) tokens of an (H, W) map.

    Channels split into units of C/16 as [2, 7, 7] when sr_ratio > 1 (a global group and two local
    groups with dilation 1 and sr_ratio) or of C/8 as [1, 7] when sr_ratio = 1 (global + dilation 1).
    Global group (one head of width C_g): keys/values from the map reduced by a Conv(k=s=sr) and a
    LayerNorm (eps 1e-5), V plus a 3x3 depthwise conv of itself (on the reduced map).
    Local groups (num_heads heads each): K/V from a depthwise 3x3 + pointwise conv of their channels;
    the queries of head h of group g are channels [h * C_l/heads + offset_g, ... + C_g/heads) of the
    local part of q (the local groups are interleaved inside each head, as in the official code), while
    K/V of group g are its own contiguous channels. 49 kv tokens per head (see the module docstring),
    a Linear (`fc`) then a Linear to k and v, V plus a 3x3 depthwise conv over the 7x7 kernel grid.
    Every group uses the usual 1/sqrt(head width) scale. Outputs are concatenated [global, local...]
    and projected.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, window: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        parts = (2, 7, 7) if sr_ratio > 1 else (1, 7)
        unit = dim // sum(parts)
        if dim % sum(parts):
            raise ValueError(f"FaSA: dim {dim} must be a multiple of {sum(parts)} (sr_ratio {sr_ratio})")
        self.dims = [unit * p for p in parts]
        if any(d % num_heads for d in self.dims[1:]):
            raise ValueError(f"FaSA: the local group widths {self.dims[1:]} must be multiples of num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.window = window
        self.dilations = [1, sr_ratio][:len(parts) - 1]
        self.attn_drop = attn_drop
        cg, cl = self.dims[0], dim - self.dims[0]
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        # global branch
        self.global_sr = nn.Conv2d(cg, cg, sr_ratio, sr_ratio)
        self.global_norm = nn.LayerNorm(cg)
        self.global_kv = nn.Linear(cg, 2 * cg, bias=qkv_bias)
        self.global_v_conv = _dwconv(cg)
        # local branches
        self.local_kv_dw = _dwconv(cl)
        self.local_kv_pw = nn.Conv2d(cl, cl, 1)
        widths = [d // num_heads for d in self.dims[1:]]
        self.local_fc = nn.ModuleList(nn.Linear(c, c, bias=qkv_bias) for c in widths)
        self.local_kv = nn.ModuleList(nn.Linear(c, 2 * c, bias=qkv_bias) for c in widths)
        self.local_v_conv = nn.ModuleList(_dwconv(d) for d in self.dims[1:])
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def pooled_taps(self, kv: torch.Tensor, group: int) -> torch.Tensor:
        """(B, C_g, H, W) local K/V map of a group -> its window^2 pooled kv tokens (B, heads, window^2, C_g/heads)
        (see the module docstring), before the group's Linears."""
        b, h, w = kv.shape[0], kv.shape[2], kv.shape[3]
        heads, k, d = self.num_heads, self.window, self.dilations[group]
        c = kv.shape[1] // heads
        # tap (u, v) of cell (i, j) of the padded map is pixel (i*s + u*d, j*s + v*d), s = d*(k-1)+1
        index = _tap_index(h, w, k, d, c, kv.device)
        taps = kv.reshape(b, heads, c * h * w)[:, :, index]  # (B, heads, k*k, windows * c), window-major
        return _run_means(taps, c)  # per tap: averaged in c runs of `windows` consecutive entries

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, dim = x.shape[0], x.shape[1], x.shape[2]  # indexed, not unpacked: torch.fx traces it
        h, w = hw[0], hw[1]
        drop = self.attn_drop if self.training else 0.0
        cg, heads, k = self.dims[0], self.num_heads, self.window
        q = self.q(x)
        # global: one head over the reduced map
        red = self.global_sr(x[..., :cg].transpose(1, 2).reshape(b, cg, h, w))
        hr, wr = red.shape[2], red.shape[3]
        red = self.global_norm(red.flatten(2).transpose(1, 2))
        kg, vg = self.global_kv(red).chunk(2, dim=-1)  # (B, Nr, C_g)
        vg = vg + self.global_v_conv(vg.transpose(1, 2).reshape(b, cg, hr, wr)).flatten(2).transpose(1, 2)
        outs = [sdpa(q[:, None, :, :cg], kg[:, None], vg[:, None], dropout=drop)[:, 0]]
        # local: queries per head, then split into the groups inside each head
        ql = q[..., cg:].reshape(b, n, heads, (dim - cg) // heads).transpose(1, 2)
        kv = self.local_kv_pw(self.local_kv_dw(x[..., cg:].transpose(1, 2).reshape(b, dim - cg, h, w)))
        q_groups = ql.split([d // heads for d in self.dims[1:]], dim=-1)
        kv_groups = kv.split(self.dims[1:], dim=1)
        for g, (fc, to_kv, v_conv) in enumerate(zip(self.local_fc, self.local_kv, self.local_v_conv)):
            cgrp = self.dims[1 + g]
            kl, vl = to_kv(fc(self.pooled_taps(kv_groups[g], g))).chunk(2, dim=-1)
            grid = vl.transpose(2, 3).reshape(b, cgrp, k, k)
            vl = vl + v_conv(grid).reshape(b, heads, cgrp // heads, k * k).transpose(2, 3)
            outs.append(sdpa(q_groups[g], kl, vl, dropout=drop).transpose(1, 2).reshape(b, n, cgrp))
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))


class DWConvMlp(nn.Module):
    """PVTv2's FFN on (B, N, C) tokens: Linear, 3x3 depthwise conv on the map, GELU, Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _dwconv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, hw: tuple[int, int]):
        x = self.fc1(x)
        x = x.transpose(1, 2).reshape(x.shape[0], self.fc1.out_features, hw[0], hw[1])
        x = self.dwconv(x).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(x))))


class Block(nn.Module):
    """Pre-norm block (LayerNorm eps 1e-6): x + FaSA(LN(x)), then x + DWConvMlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, window: int = 7,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = FactorizationAttention(dim, num_heads, sr_ratio, window, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x, hw: tuple[int, int]):
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        return x + self.drop_path(self.mlp(self.norm2(x), hw))


class FaViTStage(nn.Module):
    """Overlapping patch embedding (conv 7x7 s4 in the first stage, 3x3 s2 after; LayerNorm eps 1e-5),
    blocks, then a LayerNorm (eps 1e-6). NCHW map in, normalised NCHW map out."""

    def __init__(self, in_chans: int, dim: int, first: bool, depth: int, num_heads: int, mlp_ratio: float,
                 sr_ratio: int, window: int = 7, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path=()):
        super().__init__()
        self.patch_embed = PatchEmbed(4 if first else 2, in_chans, dim, norm_layer=nn.LayerNorm,
                                      kernel_size=7 if first else 3, padding=3 if first else 1)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, sr_ratio, window, qkv_bias, drop, attn_drop, drop_path[j])
            for j in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.patch_embed(x)  # (B, H, W, C)
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        x = x.reshape(b, h * w, c)
        for blk in self.blocks:
            if not torch.jit.is_scripting() and self.grad_checkpointing and x.requires_grad:
                x = checkpoint(blk, x, (h, w), use_reentrant=False)  # TorchScript has no checkpointing
            else:
                x = blk(x, (h, w))
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)


def _min_input_size(sr_ratios) -> int:
    """The smallest side for which every stage map is at least its reduction ratio (the global
    branch's conv k=s=sr needs one output): stage sides are ceil(H/4), then halved (ceil)."""
    size = 1
    while True:
        side, ok = -(-size // 4), True
        for i, sr in enumerate(sr_ratios):
            if i:
                side = -(-side // 2)
            ok = ok and side >= sr
        if ok:
            return size
        size += 1


class FactorizationTransformer(Backbone):
    """FaViT for classification: four FaViTStages and a linear head on the mean of the last map.

    forward_features returns the normalised stage-4 map (B, C, H/32, W/32); forward_intermediates gives
    each stage's normalised map (the per-stage LayerNorms are part of the stages, so `norm` changes
    nothing).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224,
                 embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(8, 6, 4, 4), sr_ratios=(8, 4, 2, 1), window: int = 7, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg"):
        super().__init__()
        n = len(depths)
        if not all(len(v) == n for v in (embed_dims, num_heads, mlp_ratios, sr_ratios)):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage")
        self.num_classes = num_classes
        self.in_chans = in_chans
        h, w = to_2tuple(img_size)
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = embed_dims[-1]
        self.min_input_size = _min_input_size(sr_ratios)
        if min(h, w) < self.min_input_size:
            raise ValueError(f"FactorizationTransformer: img_size {h}x{w} is below the smallest input "
                             f"{self.min_input_size} for sr_ratios {tuple(sr_ratios)}")
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        self.feature_info = []
        prev, reduction = in_chans, 4
        for i in range(n):
            self.stages.append(FaViTStage(prev, embed_dims[i], i == 0, depths[i], num_heads[i], mlp_ratios[i],
                                          sr_ratios[i], window, qkv_bias, drop_rate, attn_drop_rate, dpr[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            prev, reduction = embed_dims[i], reduction * 2
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # the official init: truncated normal Linears, unit LayerNorms, He-normal (fan-out) convolutions
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return set()  # the official recipe decays everything but 1-D tensors (timm's optimizer factory)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x, pre_logits: bool = False):
        x = self.head_drop(pool_map(x, self.global_pool))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        if output_fmt != "NCHW":
            raise ValueError(f"{getattr(self, 'model_name', 'favit')}: output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        return stage_intermediates(self.stages, x, indices, stop_early, intermediates_only)


_STAGED = re.compile(r"^(patch_embed|block|norm)(\d+)\.(.*)$")
_ATTN_RENAMES = (("sr.", "global_sr."), ("norm.", "global_norm."), ("kv_g.", "global_kv."),
                 ("local_conv_g.", "global_v_conv."), ("kv_l.depth_conv.", "local_kv_dw."),
                 ("kv_l.point_conv.", "local_kv_pw."), ("fcs.", "local_fc."), ("single_heads.", "local_kv."),
                 ("local_convs.", "local_v_conv."))


def checkpoint_filter_fn(state_dict: dict, model: FactorizationTransformer) -> dict:
    """Map an official FaViT checkpoint (or our own state dict) to our key names.

    Official -> ours: patch_embed{i}.* -> stages.{i-1}.patch_embed.*, norm{i}.* -> stages.{i-1}.norm.*,
    block{i}.{j}.* -> stages.{i-1}.blocks.{j}.* with, inside attn: sr / norm / kv_g / local_conv_g ->
    global_sr / global_norm / global_kv / global_v_conv, kv_l.depth_conv / kv_l.point_conv ->
    local_kv_dw / local_kv_pw, fcs / single_heads / local_convs -> local_fc / local_kv / local_v_conv;
    mlp.dwconv.dwconv -> mlp.dwconv. head.* is unchanged. The official model has no buffers and no
    position tables, so nothing depends on the input size. timm has no FaViT.
    """
    state_dict = release_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        m = _STAGED.match(k)
        if m:
            kind, i, rest = m.groups()
            i = int(i) - 1
            if kind == "block":
                j, rest = rest.split(".", 1)
                if rest.startswith("attn."):
                    rest = rest[len("attn."):]
                    for old, new in _ATTN_RENAMES:
                        if rest.startswith(old):
                            rest = new + rest[len(old):]
                            break
                    rest = "attn." + rest
                rest = rest.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
                k = f"stages.{i}.blocks.{j}.{rest}"
            elif kind == "patch_embed":
                k = f"stages.{i}.patch_embed.{rest}"
            else:
                k = f"stages.{i}.norm.{rest}"
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the official README (ImageNet-1K, 224x224; no weights were released). The paper's
# FLOPs are mmcv's count of the layers plus the official get_flops.py estimate of the attention
# products (2 * HW * 49 * 14C/16 local + 2 * HW * HW/sr^2 * 2C/16 global per block).

_CFG = dict(crop_pct=0.875, interpolation="bicubic", first_conv="stages.0.patch_embed.proj", classifier="head")  # DeiT eval: Resize(256), crop 224
_COMMON = dict(num_heads=(1, 2, 4, 8), mlp_ratios=(8, 6, 4, 4), sr_ratios=(8, 4, 2, 1), window=7, qkv_bias=True)


def _card(name: str, params: str, macs: float | None, top1: float, notes: str = "") -> ModelCard:
    return ModelCard(paper=53, arxiv="2312.08614", repo="q2479036243/FaViT", official_name=name, params_m=params,
                     macs_g=macs, img_size=224, top1=top1, notes=notes)


def _create(variant: dict, **kwargs) -> FactorizationTransformer:
    """A variant's config (widths, depths), which keyword arguments override (depths=(1, 1, 1, 1), ...)."""
    return FactorizationTransformer(**{**_COMMON, **variant, **kwargs})


@register_model(_card("FaViT-B0", "3.4", None, 71.5, "README: 0.6G FLOPs; we count 0.632 GMACs (+5.3%, inside the "
                      "README's rounding to 0.1 G but outside the 5% check), so macs_g is left empty"), **_CFG)
def favit_b0(**kwargs):
    return _create(dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 6, 2)), **kwargs)


@register_model(_card("FaViT-B1", "13", 2.4, 79.4), **_CFG)
def favit_b1(**kwargs):
    return _create(dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2)), **kwargs)


@register_model(_card("FaViT-B2", "24.9", 4.5, 82.3, "README: 24M params, but the official favit_b2 definition "
                      "builds 24,919,896 (counted by running it; ours is the same), 3.8% more: the README truncates "
                      "here as for B3 (48.75 -> 48), so params_m carries the code's count"), **_CFG)
def favit_b2(**kwargs):
    return _create(dict(embed_dims=(64, 128, 256, 512), depths=(2, 3, 18, 3)), **kwargs)


@register_model(_card("FaViT-B3", "48", 8.5, 83.4), **_CFG)
def favit_b3(**kwargs):
    return _create(dict(embed_dims=(96, 192, 384, 768), depths=(2, 3, 14, 3)), **kwargs)


@register_model(ModelCard(paper=53, arxiv="2312.08614", repo="q2479036243/FaViT", official_name="", img_size=32,
                          status="reduced", notes="a small config for quick runs at 32x32: widths 16-128, "
                          "depths 1-1-2-1, MLP ratio 4; the paper's heads, reductions and 7x7 kv grid"), **_CFG)
def favit_demo(**kwargs):
    return _create(dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), img_size=32, mlp_ratios=(4, 4, 4, 4)),
                   **kwargs)
