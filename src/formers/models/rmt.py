"""RMT: Retentive Networks Meet Vision Transformers.

Paper (catalog id 8): "RMT: Retentive Networks Meet Vision Transformers", Fan et al., CVPR 2024,
arXiv 2309.11523. Official code: qhfan/RMT (classfication_release/RMT.py, `VisRetNet`).

The idea, in three lines:
  RetNet's temporal decay made spatial: each head adds (|dh| + |dw|) * log(gamma_h) to its attention
      logits, so a token attends less to tokens far away in Manhattan distance (MaSA);
  in the high-resolution stages attention is decomposed, along each row then along each column,
      each with its own 1-D decay mask, which keeps the prior and costs O(N (H + W)) instead of O(N^2);
  a conv stem, conv position encodings (a 3x3 dw conv before each block, a 5x5 "LePE" on V) and
      a conv-FFN make it a 4-stage pyramid; a 1024-wide projection + BN + Swish precedes the pooling.

Points that are easy to get wrong (all read from the official code):
  - the rotary rotation ("theta_shift") uses the *flattened 1-D* raster index h * W + w of a token,
    with RetNet's angles 10000 ** -linspace(0, 1, d/2), not a 2-D position;
  - the decay is added to the logits before the softmax (not multiplied after it), keys are scaled by
    key_dim ** -0.5, and the decomposed form attends along W first, then along H on that output,
    reusing the same rotated q and k;
  - which stages decompose is a per-variant list (T: stages 1-2; S, B, L: stages 1-3).

The masks depend on the input size: they are built for the size each stage actually sees (and
cached per size in eager mode; built in the graph under torch.fx, torch.compile and torch.export), so any
input size works, and one exported program takes a dynamic height and width (with a dynamic batch, as
`formers export` makes it: with a fixed batch above one, the row/column attention's merge of the batch with
a ceil-rounded size adds guards the exporter cannot prove). The strided convs (3x3, stride 2, padding 1) round odd
sizes up, as the official dense-task backbones do, so any H, W >= 1 is taken. The official
checkpoints also hold the per-stage `Relpos.angle/decay` buffers; they are recomputed here from
the config and dropped on loading.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.fx
import torch.nn as nn
import torch.utils.checkpoint

from formers.checkpoint import release_state_dict
from formers.layers.attention import sdpa
from formers.layers.drop import DropPath, drop_path_rates
from formers.layers.helpers import feature_take_indices, to_2tuple
from formers.layers.retention import (apply_rotary, decay_mask_1d, manhattan_decay_mask, retention_log_decay,
                                      rotary_angles, rotary_sin_cos)
from formers.layers.scale import Scale
from formers.layers.pool import pool_map
from formers.layers.windows import compiling
from formers.models.base import Backbone, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["RMT", "ManhattanSelfAttention", "SpatialDecay", "manhattan_attention", "decomposed_manhattan_attention",
           "checkpoint_filter_fn"]


def _dwconv_channels_last(conv: nn.Conv2d, x):
    """Apply an NCHW depth-wise conv to a channels-last (B, H, W, C) map."""
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvBN(nn.Sequential):
    """Conv 3x3 (padding 1, with bias) then BatchNorm, on NCHW maps."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__(OrderedDict(conv=nn.Conv2d(in_chs, out_chs, 3, stride, 1), bn=nn.BatchNorm2d(out_chs)))


class SpatialDecay(nn.Module):
    """Position terms of one stage for a given map size: rotary sin/cos and the decay mask(s).

    Nothing is learned: gamma_h = 1 - 2 ** -(init_value + heads_range * h / num_heads) and the
    rotary angles come from the config. For an (H, W) map it returns
      sin, cos: (H, W, 1, key_dim), phases of the flattened raster index H_i * W + W_i;
      masks: (heads, HW, HW) Manhattan decay (whole attention), or a pair of 1-D decays
             ((heads, H, H), (heads, W, W)) for the decomposed attention.
    Results are cached per (size, device, dtype, inference mode): a few small tensors per size.
    """

    _CACHE_SIZE = 8

    def __init__(self, key_dim: int, num_heads: int, init_value: float, heads_range: float, decomposed: bool):
        super().__init__()
        self.key_dim = key_dim
        self.num_heads = num_heads
        self.init_value = init_value
        self.heads_range = heads_range
        self.decomposed = decomposed
        self._cache: OrderedDict = OrderedDict()

    def log_decay(self, device=None) -> torch.Tensor:
        return retention_log_decay(self.num_heads, self.init_value, self.heads_range, device=device)

    def _build(self, h: int, w: int, device):
        log_decay = self.log_decay(device)
        index = torch.arange(h * w, dtype=torch.float32, device=device)
        sin, cos = rotary_sin_cos(index, rotary_angles(self.key_dim, device=device))
        sin, cos = sin.view(h, w, 1, self.key_dim), cos.view(h, w, 1, self.key_dim)
        if self.decomposed:
            masks = (decay_mask_1d(h, log_decay), decay_mask_1d(w, log_decay))
        else:
            masks = manhattan_decay_mask(h, w, log_decay)
        return sin, cos, masks

    def _terms(self, h: int, w: int, device, dtype):
        """sin, cos and mask(s) for an (h, w) map, in `dtype`."""
        sin, cos, masks = self._build(h, w, device)
        masks = tuple(m.to(dtype) for m in masks) if self.decomposed else masks.to(dtype)
        return sin.to(dtype), cos.to(dtype), masks

    def forward(self, h: int, w: int, device=None, dtype=torch.float32):
        if compiling() or isinstance(h, torch.fx.Proxy):
            # sizes may be symbolic (torch.export, torch.compile, torch.fx): built in the graph, as a cache
            # would bake one size in (and keep the tracer's values)
            return self._terms(h, w, device, dtype)
        # Tensors made under inference_mode cannot join autograd later, hence the mode in the key.
        key = (h, w, str(device), dtype, torch.is_inference_mode_enabled())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        out = self._terms(h, w, device, dtype)
        self._cache[key] = out
        while len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)
        return out

    def extra_repr(self):
        return (f"heads={self.num_heads}, init_value={self.init_value}, heads_range={self.heads_range}, "
                f"decomposed={self.decomposed}")


def manhattan_attention(q, k, v, mask, scale: float):
    """Softmax attention over all H*W tokens with the (heads, HW, HW) Manhattan decay added to the
    logits. q, k, v: (B, H, W, heads, d) -> (B, H, W, heads, d)."""
    b, h, w, n, d = q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.shape[4]

    def tokens(t):  # (B, heads, HW, d)
        return t.reshape(b, h * w, n, d).transpose(1, 2)

    out = sdpa(tokens(q), tokens(k), tokens(v), mask, scale=scale)
    return out.transpose(1, 2).reshape(b, h, w, n, d)


def decomposed_manhattan_attention(q, k, v, mask_h, mask_w, scale: float):
    """The decomposed MaSA: attend within each row (1-D decay over W), then, on that output, within
    each column (1-D decay over H), with the same q and k. q, k, v: (B, H, W, heads, d)."""
    b, h, w, n, d = q.shape[0], q.shape[1], q.shape[2], q.shape[3], q.shape[4]

    def rows(t):  # every row a batch entry: (B*H, heads, W, d)
        return t.permute(0, 1, 3, 2, 4).reshape(b * h, n, w, d)

    def cols(t):  # every column a batch entry: (B*W, heads, H, d)
        return t.permute(0, 2, 3, 1, 4).reshape(b * w, n, h, d)

    out = sdpa(rows(q), rows(k), rows(v), mask_w, scale=scale).view(b, h, n, w, d)
    out = sdpa(cols(q), cols(k), out.permute(0, 3, 2, 1, 4).reshape(b * w, n, h, d), mask_h, scale=scale)
    return out.view(b, w, n, h, d).permute(0, 3, 1, 2, 4)


class ManhattanSelfAttention(nn.Module):
    """MaSA on a channels-last (B, H, W, C) map.

    q, k, v, out: Linears with bias; q and k are rotated by their raster position; logits are
    q.k * key_dim ** -0.5 plus the decay mask; LePE (a 5x5 dw conv of V) is added to the output
    before the out projection. `decomposed`: attend within each row (mask over W), then within each
    column (mask over H) on the rows' output, instead of over all H*W tokens at once.
    """

    def __init__(self, dim: int, num_heads: int, decomposed: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.decomposed = decomposed
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pos):
        """x: (B, H, W, C); pos: SpatialDecay's (sin, cos, masks) for this H, W."""
        b, h, w, c = x.shape
        heads = (b, h, w, self.num_heads, self.key_dim)
        sin, cos, masks = pos
        v = self.v(x)
        lepe = _dwconv_channels_last(self.lepe, v)
        q, k = self.q(x), self.k(x)
        sin, cos = sin.to(q.dtype), cos.to(q.dtype)  # no-ops outside autocast
        q = apply_rotary(q.view(heads), sin, cos)
        k = apply_rotary(k.view(heads), sin, cos)
        v = v.view(heads).to(q.dtype)
        if self.decomposed:
            mask_h, mask_w = (m.to(q.dtype) for m in masks)
            out = decomposed_manhattan_attention(q, k, v, mask_h, mask_w, self.scale)
        else:
            out = manhattan_attention(q, k, v, masks.to(q.dtype), self.scale)
        return self.proj(out.reshape(b, h, w, c) + lepe)


class ConvFFN(nn.Module):
    """fc1 -> GELU -> (x + DWConv3x3(x)) -> fc2, on channels-last maps."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = x + _dwconv_channels_last(self.dwconv, x)
        return self.fc2(x)


class RetBlock(nn.Module):
    """x += DWConv3x3(x) (conv position encoding); x += MaSA(LN(x)); x += FFN(LN(x)).

    LayerNorms use eps 1e-6; `layer_scale` (B and L, stages 3-4) multiplies both branches by a
    learned per-channel scale started at `layer_scale` (1e-6).
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, decomposed: bool, drop_path: float = 0.0,
                 layer_scale: float | None = None):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ManhattanSelfAttention(dim, num_heads, decomposed)
        self.ls1 = Scale(dim, layer_scale) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, mlp_hidden)
        self.ls2 = Scale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, pos):
        x = x + _dwconv_channels_last(self.cpe, x)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), pos)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class RmtStage(nn.Module):
    """(Downsample: conv 3x3 s2 + BN, stages 2-4) then RetBlocks sharing the stage's position terms.

    Takes and returns channels-last (B, H, W, C) maps. The official code puts each downsample at the
    end of the previous stage; here it opens the next one, so a stage's output has that stage's width.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, init_value: float, heads_range: float,
                 mlp_ratio: float, decomposed: bool, downsample: bool, drop_path=(), layer_scale=None):
        super().__init__()
        self.downsample = ConvBN(in_dim, dim, stride=2) if downsample else None
        self.rel_pos = SpatialDecay(dim // num_heads, num_heads, init_value, heads_range, decomposed)
        self.blocks = nn.ModuleList([
            RetBlock(dim, num_heads, int(mlp_ratio * dim), decomposed, drop_path[j] if drop_path else 0.0,
                     layer_scale) for j in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x):
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        pos = self.rel_pos(x.shape[1], x.shape[2], x.device, x.dtype)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, pos, use_reentrant=False)
            else:
                x = blk(x, pos)
        return x


class RMT(Backbone):
    """RMT (the official `VisRetNet`) for classification.

    Stem: four 3x3 convs (stride 2, 1, 2, 1; widths C/2, C/2, C, C) each with BN, GELU between them
    (none after the last). Four stages of RetBlocks. Then, per position, Linear(C4 -> `projection`)
    -> BatchNorm -> Swish; that map (B, projection, H/32, W/32) is `forward_features`, as timm does for
    EfficientNet's conv head, so `num_features` = projection. Global average pool, dropout, Linear.
    """

    script_unsupported = ("each stage's position terms (one decay mask or a pair of them, by stage) come from a "
                          "Python cache keyed by the input size")

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224,
                 embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                 init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
                 decomposed=(True, True, False, False), layer_scales=(False, False, False, False),
                 layer_scale_init: float = 1e-6, projection: int = 1024, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, global_pool: str = "avg"):
        super().__init__()
        num_stages = len(depths)
        per_stage = (embed_dims, num_heads, init_values, heads_ranges, mlp_ratios, decomposed, layer_scales)
        if not all(len(v) == num_stages for v in per_stage):
            raise ValueError("embed_dims, depths, num_heads, init_values, heads_ranges, mlp_ratios, decomposed "
                             "and layer_scales need one entry per stage")
        for dim, heads in zip(embed_dims, num_heads):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(f"RMT: width {dim} must split into {heads} heads of an even size (rotary pairs)")
        self.num_classes = num_classes
        self.in_chans = in_chans
        h, w = to_2tuple(img_size)
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = projection
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        c0 = embed_dims[0]
        self.stem = nn.Sequential(
            ConvBN(in_chans, c0 // 2, stride=2), nn.GELU(),
            ConvBN(c0 // 2, c0 // 2, stride=1), nn.GELU(),
            ConvBN(c0 // 2, c0, stride=2), nn.GELU(),
            ConvBN(c0, c0, stride=1))

        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            self.stages.append(RmtStage(
                embed_dims[i - 1] if i else c0, embed_dims[i], depths[i], num_heads[i], init_values[i],
                heads_ranges[i], mlp_ratios[i], decomposed[i], downsample=i > 0, drop_path=dpr[i],
                layer_scale=layer_scale_init if layer_scales[i] else None))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))

        self.proj = nn.Linear(embed_dims[-1], projection)
        self.norm = nn.BatchNorm2d(projection)
        self.act = nn.SiLU()  # Swish
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(projection, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        """As the official code: trunc-normal(0.02) Linears with zero bias (applied last, so it also
        overrides the attention's xavier init there), unit LayerNorms, torch defaults for convs/BN."""
        self.apply(init_trunc_normal)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head or len(self.stages) < len(self.feature_info):
            # the projection (Linear, BatchNorm, Swish) is the classifier's: it goes with it
            self.proj, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.feature_info[len(self.stages) - 1]["num_chs"]
        return take

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _stem(self, x):
        return self.stem(x).permute(0, 2, 3, 1)  # channels-last from here on

    def _project(self, x):
        """Channels-last stage-4 map -> (B, projection, H, W): Linear, BatchNorm, Swish."""
        return self.act(self.norm(self.proj(x).permute(0, 3, 1, 2)))

    def forward_features(self, x):
        """(B, C, H, W) -> (B, projection, ceil(H/32), ceil(W/32)), before pooling."""
        self.check_input(x)
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._project(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.head_drop(pool_map(x, self.global_pool))
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """One NCHW map per requested stage (C_i channels at stride 4 * 2^i) and, unless
        `intermediates_only`, the forward_features output. RMT has no final norm on the stage maps,
        so `norm` changes nothing (the official dense backbones add their own LayerNorms)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; only 'NCHW'")
        self.check_input(x)
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early or intermediates_only else self.stages
        x = self._stem(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        if len(stages) < len(self.stages):
            return x.permute(0, 3, 1, 2), intermediates
        return self._project(x), intermediates

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Official checkpoint names -> ours

_BLOCK_RENAMES = (
    ("retention_layer_norm.", "norm1."), ("final_layer_norm.", "norm2."),
    ("retention.q_proj.", "attn.q."), ("retention.k_proj.", "attn.k."), ("retention.v_proj.", "attn.v."),
    ("retention.lepe.conv.", "attn.lepe."), ("retention.out_proj.", "attn.proj."),
    ("ffn.fc1.", "mlp.fc1."), ("ffn.fc2.", "mlp.fc2."), ("ffn.dwconv.conv.", "mlp.dwconv."),
    ("pos.conv.", "cpe."), ("gamma_1", "ls1.scale"), ("gamma_2", "ls2.scale"),
)
# the official stem is one Sequential: conv, BN, GELU, conv, BN, GELU, conv, BN, GELU, conv, BN
_STEM_RENAMES = {0: "0.conv", 1: "0.bn", 3: "2.conv", 4: "2.bn", 6: "4.conv", 7: "4.bn", 9: "6.conv", 10: "6.bn"}


def _rename_official(k: str) -> str | None:
    """One official key -> ours (None: a buffer we recompute)."""
    parts = k.split(".")
    if parts[0] == "patch_embed" and parts[1] == "proj":
        return f"stem.{_STEM_RENAMES[int(parts[2])]}." + ".".join(parts[3:])
    if parts[0] != "layers":
        return k  # proj, norm (BN), head keep their names
    i, kind, rest = int(parts[1]), parts[2], ".".join(parts[3:])
    if kind == "Relpos":
        return None
    if kind == "downsample":  # the end of official stage i opens our stage i + 1
        rest = rest.replace("reduction.", "conv.").replace("norm.", "bn.")
        return f"stages.{i + 1}.downsample.{rest}"
    if kind == "blocks":
        for old, new in _BLOCK_RENAMES:
            rest = rest.replace(old, new)
        return f"stages.{i}.blocks.{rest}"
    return k


def checkpoint_filter_fn(state_dict: dict, model: RMT) -> dict:
    """Map an official RMT release (`VisRetNet` keys, in {'model': ...} or bare) or our own state dict.

    Official -> ours: patch_embed.proj.{0,1,3,4,6,7,9,10} -> stem.{0,2,4,6}.{conv,bn};
    layers.{i}.blocks.{j}.* -> stages.{i}.blocks.{j}.* (retention.{q,k,v,out}_proj -> attn.{q,k,v,proj},
    retention.lepe.conv -> attn.lepe, retention_layer_norm/final_layer_norm -> norm1/norm2,
    ffn.dwconv.conv -> mlp.dwconv, pos.conv -> cpe, gamma_1/2 (1,1,1,C) -> ls1/ls2.scale (C,));
    layers.{i}.downsample.{reduction,norm} -> stages.{i+1}.downsample.{conv,bn};
    layers.{i}.Relpos.{angle,decay} are dropped (recomputed); proj, norm, head keep their names.
    """
    state_dict = release_state_dict(state_dict)
    if not any(k.startswith(("layers.", "patch_embed.")) for k in state_dict):
        return dict(state_dict)  # already ours
    from formers.checkpoint import does_not_fit
    out = {}
    for k, v in state_dict.items():
        try:
            new = _rename_official(k)
        except (ValueError, KeyError, IndexError):
            raise does_not_fit(model, f"{k!r} is neither an official RMT key nor ours") from None
        if new is None:
            continue
        if new.endswith(("ls1.scale", "ls2.scale")):
            if v.dim() == 0 or v.numel() != v.shape[-1]:
                raise does_not_fit(model, f"{k!r} has shape {tuple(v.shape)}; a layer scale holds one value "
                                          f"per channel")
            v = v.reshape(-1)
        out[new] = v
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the official RMT_T3 / RMT_S / RMT_M2 (= B) / RMT_L6 (= L); params, FLOPs and top-1 as the
# official README prints them (ImageNet-1K, 224x224, no token labeling). Eval: Resize(256) + crop 224.

_CFG = dict(crop_pct=0.875, interpolation="bicubic", first_conv="stem.0.conv", classifier="head")
_REPO = "qhfan/RMT"
# The released code costs 5.5-7.1% more MACs than the paper prints, though its parameter counts match the
# official training logs to the unit: counted on the official model with the authors' own fvcore call
# (main.py) it is 2.65 / 4.80 / 10.41 / 19.55 G, with torch's counter 2.637 / 4.777 / 10.373 / 19.488 G,
# exactly what this file counts. No input size or counting rule we tried gives the paper's numbers, so
# they stay in the notes rather than in macs_g, where the 5% check would fail.
_MACS_NOTE = ("Paper: {paper}G FLOPs; the official code costs {code} GMACs (+{pct}%; fvcore on the released "
              "code: {fv}G), so macs_g is left empty. The token-labeling (*) variants (extra aux head) are not "
              "included; official weights are on Baidu pan only.")


def _card(official, params, top1, paper_macs, code_macs, fvcore_macs):
    pct = round(100 * (code_macs / paper_macs - 1), 1)
    return ModelCard(paper=8, arxiv="2309.11523", repo=_REPO, official_name=official, params_m=params,
                     macs_g=None, top1=top1,
                     notes=_MACS_NOTE.format(paper=paper_macs, code=code_macs, pct=pct, fv=fvcore_macs))


def _create(variant_defaults: dict, **kwargs) -> RMT:
    return RMT(**{**variant_defaults, **kwargs})


@register_model(_card("RMT_T3", "14", 82.4, 2.5, 2.637, 2.65), **_CFG)
def rmt_tiny(**kwargs):
    return _create(dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
                        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
                        decomposed=(True, True, False, False), drop_path_rate=0.1), **kwargs)


@register_model(_card("RMT_S", "27", 84.1, 4.5, 4.777, 4.80), **_CFG)
def rmt_small(**kwargs):
    return _create(dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
                        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
                        decomposed=(True, True, True, False), drop_path_rate=0.15), **kwargs)


@register_model(_card("RMT_M2", "54", 85.0, 9.7, 10.373, 10.41), **_CFG)
def rmt_base(**kwargs):
    return _create(dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
                        init_values=(2, 2, 2, 2), heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
                        decomposed=(True, True, True, False), layer_scales=(False, False, True, True),
                        drop_path_rate=0.4), **kwargs)


@register_model(_card("RMT_L6", "95", 85.5, 18.2, 19.488, 19.55), **_CFG)
def rmt_large(**kwargs):
    return _create(dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
                        init_values=(2, 2, 2, 2), heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
                        decomposed=(True, True, True, False), layer_scales=(False, False, True, True),
                        drop_path_rate=0.5), **kwargs)


@register_model(ModelCard(paper=8, arxiv="2309.11523", repo=_REPO, img_size=32, status="reduced",
                          notes="a reduced RMT for quick training runs (Fashion-MNIST at 32x32), not in the paper"),
                **_CFG)
def rmt_demo(**kwargs):
    return _create(dict(img_size=32, embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(2, 2, 3, 4),
                        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
                        decomposed=(True, True, False, False), projection=256, drop_path_rate=0.0), **kwargs)
