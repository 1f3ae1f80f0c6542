"""ViT-CoMer: a plain ViT with a convolutional multi-scale branch, for dense prediction.

Paper: "ViT-CoMer: Vision Transformer with Convolutional Multi-scale Feature Interaction for Dense
Predictions", Xia et al., CVPR 2024, arXiv 2403.07392 (catalog id 30). Official code: Traffic-X/ViT-CoMer
(segmentation/mmseg_custom/models/backbones/vit_comer.py, comer_modules.py, base/vit.py; the deformable
attention of ops/ is Deformable DETR's, here `formers.layers.MSDeformAttn`).

The idea, in a few lines:
  a plain ViT (DeiT weights, patch 16, no cls token) runs next to a small CNN (`spm`: a stem to stride 4,
      then strided 3x3 convs to strides 8, 16, 32, each projected to the ViT width) whose 3 deeper maps,
      flattened and concatenated (with a learned per-level embedding), form one multi-scale token set c;
  the ViT's 12 blocks are split into 4 stages; before each stage, MRFP (multi-receptive-field 3x3 / 5x5
      depthwise convs inside an FFN) refines c, and CTI-toV adds to the ViT tokens what they gather, through
      3-level deformable attention over c (c's stride-16 part plus the ViT tokens), scaled by a zero-init
      gamma; after the stage CTI-toC adds the ViT tokens to c's stride-16 part and refines c with the same
      kind of deformable attention (the last stage does that 4 more times, the "extra CTIs");
  the outputs are c's 3 maps plus a stride-4 map (a 2x transposed conv of the stride-8 map plus the stem's),
      each plus the matching ViT stage output resized, each through BatchNorm: strides 4, 8, 16, 32.
The segmentors are UperNet (+ an FCN auxiliary head on the stride-16 map in training) on ADE20K, 512x512.

Choices where the paper and the code leave room (all follow the official code unless said):
  * the position table keeps DeiT's 197 entries (14x14 + the unused cls entry, so DeiT / official files
    load as they are); the grid part is resized bicubically to the input's token grid;
  * CTI-toV / CTI-toC / the extra CTIs are all "self" deformable attention over c: the official
    `deform_inputs` also builds a 1-level ViT-grid set of inputs that its modules receive and ignore;
    here the one 3-level set (reference points at the pixel centres of every level) is built once per
    forward and passed around, and the level sizes travel as a Python list;
  * CTI-toC, when the CNN-side interaction is on (every official config), normalises c with its own
    query / feature norms and then its inner extractor normalises again: the residual of the inner
    extractor is the normalised c, exactly as the official code computes it;
  * MRFP applies GELU twice (after its BatchNorm, then again before fc2), as the official code does;
  * SyncBatchNorm is BatchNorm2d here (the same parameters and buffers);
  * initialisation: the official recipe for the CNN, the interaction modules, `up` and the deformable
    attention; the ViT blocks (which the official code leaves at PyTorch's defaults, as DeiT weights
    overwrite them) and the position table get timm's ViT init (trunc-normal 0.02);
  * inputs must be multiples of 32 on both sides (the CNN and the token split need the stride-32 map to
    be exactly half the stride-16 map), at least 32: anything else is a ValueError naming the model.
"""
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from formers.checkpoint import does_not_fit, release_state_dict
from formers.layers import (Attention, DropPath, Linear, Mlp, MSDeformAttn, PatchEmbed, check_image_input,
                            resample_pos_embed)
from formers.models.dense.upernet import FCNAuxHead, UperNetHead, reset_head_classifiers
from formers.registry import ModelCard, register_model

__all__ = ["ViTCoMer", "ViTCoMerUperNet", "checkpoint_filter_fn"]

Shapes = list[tuple[int, int]]


# ---------------------------------------------------------------------------------------------
# Token <-> map helpers: c is the concatenation of the stride-8, -16 and -32 maps, row-major each.

def _split_maps(tokens: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
    """(B, sum h*w, C) -> one (B, C, h, w) map per level."""
    parts = tokens.split([h * w for h, w in shapes], dim=1)
    return [p.transpose(1, 2).unflatten(2, hw) for p, hw in zip(parts, shapes)]


def _join_maps(maps) -> torch.Tensor:
    """One (B, C, h, w) map per level -> (B, sum h*w, C)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def _add_to_middle(c: torch.Tensor, x: torch.Tensor, shapes: Shapes) -> torch.Tensor:
    """c with the ViT tokens x added to its stride-16 (second) level."""
    start = shapes[0][0] * shapes[0][1]
    return torch.cat([c[:, :start], c[:, start:start + x.shape[1]] + x, c[:, start + x.shape[1]:]], dim=1)


def _reference_points(shapes: Shapes, device, dtype) -> torch.Tensor:
    """(1, sum h*w, 1, 2): every level's pixel centres as normalised (x, y), one point for all levels."""
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    return torch.cat(points, 0)[None, :, None]


def _init_weights(m: nn.Module):
    """The official init: trunc-normal(0.02) Linear weights with zero biases, unit norms, normal(0,
    sqrt(2 / fan_out)) convolutions and transposed convolutions (fan_out per group), zero conv biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# The ViT branch

class ViTBlock(nn.Module):
    """The official ViT block: pre-norm attention and MLP, each scaled by a per-channel gamma (init 1)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, layer_scale: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale = layer_scale
        if layer_scale:
            self.gamma1 = nn.Parameter(torch.ones(dim))
            self.gamma2 = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if self.layer_scale:
            x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
            return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------
# The CNN branch and the multi-scale feed-forwards

class SpatialPyramid(nn.Module):
    """The official `CNN` (spm): a 3-conv stem + max pool to stride 4, then stride-2 3x3 convs to strides
    8, 16, 32 (widths w, 2w, 4w, 4w for conv_inplane w); 1x1 convs `fc1..fc4` (with bias) project each to
    the ViT width. Returns the stride-4 map (NCHW) and the three deeper ones as tokens."""

    def __init__(self, in_chans: int = 3, inplanes: int = 64, embed_dim: int = 384):
        super().__init__()

        def conv_bn_relu(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = inplanes
        self.stem = nn.Sequential(*conv_bn_relu(in_chans, w, 2), *conv_bn_relu(w, w, 1), *conv_bn_relu(w, w, 1),
                                  nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*conv_bn_relu(w, 2 * w, 2))
        self.conv3 = nn.Sequential(*conv_bn_relu(2 * w, 4 * w, 2))
        self.conv4 = nn.Sequential(*conv_bn_relu(4 * w, 4 * w, 2))
        self.fc1 = nn.Conv2d(w, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * w, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * w, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * w, embed_dim, 1)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tokens = [fc(c).flatten(2).transpose(1, 2) for fc, c in ((self.fc2, c2), (self.fc3, c3), (self.fc4, c4))]
        return self.fc1(c1), tokens


class LevelDWConv(nn.Module):
    """One 3x3 depthwise conv (with bias) applied to each level of a multi-scale token set."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, shapes: Shapes):
        return _join_maps([self.dwconv(m) for m in _split_maps(x, shapes)])


class MultiReceptiveDWConv(nn.Module):
    """MRFP's core: per level, half the channels through a 3x3 depthwise conv and half through a 5x5 one
    (separate convs per level: dwconv1/2 for stride 8, 3/4 for 16, 5/6 for 32), concatenated, then that
    level's BatchNorm and GELU."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"MRFP needs an even hidden width, got {dim}")
        half = dim // 2
        for i in range(3):
            setattr(self, f"dwconv{2 * i + 1}", nn.Conv2d(half, half, 3, 1, 1, groups=half))
            setattr(self, f"dwconv{2 * i + 2}", nn.Conv2d(half, half, 5, 1, 2, groups=half))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(dim))
        self.act = nn.GELU()

    def forward(self, x, shapes: Shapes):
        out = []
        for i, m in enumerate(_split_maps(x, shapes)):
            small, large = m.chunk(2, dim=1)
            small = getattr(self, f"dwconv{2 * i + 1}")(small)
            large = getattr(self, f"dwconv{2 * i + 2}")(large)
            out.append(self.act(getattr(self, f"bn{i + 1}")(torch.cat([small, large], dim=1))))
        return _join_maps(out)


class LevelFFN(nn.Module):
    """fc1 -> per-level depthwise conv -> GELU -> fc2 on a multi-scale token set: the official ConvFFN
    (`multi_receptive=False`, one 3x3 conv) and MRFP (`multi_receptive=True`, 3x3 + 5x5 convs with
    BatchNorm and GELU per level, before the FFN's own GELU)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, multi_receptive: bool = False):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.dwconv = MultiReceptiveDWConv(hidden) if multi_receptive else LevelDWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, shapes: Shapes):
        x = self.drop(self.act(self.dwconv(self.fc1(x), shapes)))
        return self.drop(self.fc2(x))


# ---------------------------------------------------------------------------------------------
# The interaction modules (CTI)

class DeformFFN(nn.Module):
    """Deformable attention over a multi-scale token set (`attn` after `query_norm` / `feat_norm`),
    optionally followed by a ConvFFN (`ffn` after `ffn_norm`, with drop path). `residual`: whether the
    attention output is added to the query (CTI-toC's extractor) or replaces it (CTI-toV)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, with_cffn: bool,
                 cffn_ratio: float, drop: float, drop_path: float, norm_eps: float = 1e-6):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.feat_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = MSDeformAttn(dim, n_levels=3, n_heads=num_heads, n_points=n_points, ratio=deform_ratio)
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = LevelFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = nn.LayerNorm(dim, eps=norm_eps)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def attend(self, query, feat, ref, shapes: Shapes):
        return self.attn(self.query_norm(query), ref, self.feat_norm(feat), shapes)

    def feed_forward(self, x, shapes: Shapes):
        return x + self.drop_path(self.ffn(self.ffn_norm(x), shapes)) if self.with_cffn else x

    def forward(self, query, feat, ref, shapes: Shapes):
        return self.feed_forward(query + self.attend(query, feat, ref, shapes), shapes)


class CTIToViT(DeformFFN):
    """CTI-toV (CNN -> ViT): c attends to itself, the ConvFFN refines the result, its three levels are
    resized to the ViT grid (bilinear) and summed, and the ViT tokens get that sum times `gamma`."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, cffn_ratio: float,
                 init_values: float, drop: float, drop_path: float):
        super().__init__(dim, num_heads, n_points, deform_ratio, True, cffn_ratio, drop, drop_path)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, c, ref, shapes: Shapes):
        c = self.feed_forward(self.attend(c, c, ref, shapes), shapes)
        grid = shapes[1]
        total = sum(m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
                    for m in _split_maps(c, shapes))
        return x + self.gamma * total.flatten(2).transpose(1, 2)


class CTIToCNN(nn.Module):
    """CTI-toC (ViT -> CNN): the ViT tokens are added to c's stride-16 level; with
    `cnn_feature_interaction`, c (normalised by `query_norm` and `feat_norm`) then attends to itself in
    `cfinter` (attention + ConvFFN, the normalised c as residual). `pre_ffn`: a ConvFFN on c between the
    two steps (the official Extractor_CTI, the 4 extra CTIs of the last stage)."""

    def __init__(self, dim: int, num_heads: int, n_points: int, deform_ratio: float, with_cffn: bool,
                 cffn_ratio: float, drop: float, drop_path: float, cnn_feature_interaction: bool = True,
                 pre_ffn: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.feat_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.pre_ffn = pre_ffn and with_cffn
        if self.pre_ffn:
            self.ffn = LevelFFN(dim, int(dim * cffn_ratio), drop)
            self.ffn_norm = nn.LayerNorm(dim, eps=norm_eps)
            self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cnn_feature_interaction = cnn_feature_interaction
        if cnn_feature_interaction:
            self.cfinter = DeformFFN(dim, num_heads, n_points, deform_ratio, with_cffn, cffn_ratio, drop, drop_path)

    def forward(self, c, x, ref, shapes: Shapes):
        c = _add_to_middle(c, x, shapes)
        if self.pre_ffn:
            c = c + self.drop_path(self.ffn(self.ffn_norm(c), shapes))
        if self.cnn_feature_interaction:
            c = self.cfinter(self.query_norm(c), self.feat_norm(c), ref, shapes)
        return c


class CTIBlock(nn.Module):
    """One interaction stage around a slice of ViT blocks: MRFP on c and CTI-toV into the ViT tokens,
    the blocks, CTI-toC back into c, and on the last stage 4 extra CTI-toC (with a ConvFFN first)."""

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, drop: float = 0.0, drop_path: float = 0.0,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, init_values: float = 0.0,
                 deform_ratio: float = 1.0, extra_cti: bool = False, use_cti_tov: bool = True,
                 use_cti_toc: bool = True, dim_ratio: float = 6.0, cnn_feature_interaction: bool = True):
        super().__init__()
        self.use_cti_tov, self.use_cti_toc = use_cti_tov, use_cti_toc
        common = dict(num_heads=num_heads, n_points=n_points, deform_ratio=deform_ratio, cffn_ratio=cffn_ratio,
                      drop=drop, drop_path=drop_path)
        if use_cti_tov:
            self.cti_tov = CTIToViT(dim, init_values=init_values, **common)
        if use_cti_toc:
            self.cti_toc = CTIToCNN(dim, with_cffn=with_cffn, cnn_feature_interaction=cnn_feature_interaction,
                                    **common)
        self.extra_CTIs = None
        if extra_cti:
            self.extra_CTIs = nn.ModuleList([
                CTIToCNN(dim, with_cffn=with_cffn, cnn_feature_interaction=cnn_feature_interaction, pre_ffn=True,
                         **common) for _ in range(4)])
        self.mrfp = LevelFFN(dim, int(dim * dim_ratio), multi_receptive=True)
        self.grad_checkpointing = False

    def _run(self, fn, *args):
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x, c, blocks, ref, shapes: Shapes):
        if self.use_cti_tov:
            c = self._run(self.mrfp, c, shapes)
            c = _add_to_middle(c, x, shapes)
            x = self._run(self.cti_tov, x, c, ref, shapes)
        for blk in blocks:
            x = self._run(blk, x)
        if self.use_cti_toc:
            c = self._run(self.cti_toc, c, x, ref, shapes)
        if self.extra_CTIs is not None:
            for cti in self.extra_CTIs:
                c = self._run(cti, c, x, ref, shapes)
        return x, c


# ---------------------------------------------------------------------------------------------
# The backbone

class ViTCoMer(nn.Module):
    """The ViT-CoMer backbone: `forward_features(x)` (= `forward`) returns four BatchNorm-ed NCHW maps of
    width `embed_dim`, strides 4, 8, 16, 32. H and W must be multiples of 32 (module doc).

    Hyper-parameters keep the official names (`conv_inplane`, `deform_num_heads`, `n_points`,
    `cffn_ratio`, `deform_ratio`, `dim_ratio`, `init_values` (CTI-toV's gamma), `interaction_indexes`,
    `use_CTI_toV`, `use_CTI_toC`, `cnn_feature_interaction` (a bool or one per stage), `use_extra_CTI`,
    `add_vit_feature`); `pretrain_size` is the grid (x16) of the stored position table.
    """

    input_divisor = 32

    def __init__(self, in_chans: int = 3, embed_dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, layer_scale: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, patch_size: int = 16,
                 pretrain_size: int = 224, conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6,
                 init_values: float = 0.0, interaction_indexes=((0, 2), (3, 5), (6, 8), (9, 11)),
                 with_cffn: bool = True, cffn_ratio: float = 0.25, deform_ratio: float = 1.0,
                 add_vit_feature: bool = True, use_extra_CTI: bool = True, use_CTI_toV=True, use_CTI_toC=True,
                 cnn_feature_interaction=True, dim_ratio: float = 6.0):
        super().__init__()
        if patch_size != 16:
            raise ValueError(f"ViT-CoMer pairs the ViT tokens with the CNN's stride-16 map: patch_size must be 16, "
                             f"got {patch_size}")
        self.in_chans = in_chans
        self.embed_dim = self.num_features = embed_dim
        self.interaction_indexes = [tuple(ix) for ix in interaction_indexes]
        if self.interaction_indexes[-1][-1] != depth - 1:
            raise ValueError(f"interaction_indexes {self.interaction_indexes} must end at the last block ({depth - 1})")
        self.add_vit_feature = add_vit_feature
        self.pretrain_grid = (pretrain_size // patch_size, pretrain_size // patch_size)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid[0] * self.pretrain_grid[1] + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0]
        self.blocks = nn.ModuleList([
            ViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], layer_scale)
            for i in range(depth)])

        def per_stage(v, i):
            return v if isinstance(v, bool) else bool(v[i])

        n = len(self.interaction_indexes)
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        self.spm = SpatialPyramid(in_chans, conv_inplane, embed_dim)
        self.interactions = nn.ModuleList([
            CTIBlock(embed_dim, deform_num_heads, n_points, drop=0.0, drop_path=drop_path_rate, with_cffn=with_cffn,
                     cffn_ratio=cffn_ratio, init_values=init_values, deform_ratio=deform_ratio,
                     extra_cti=use_extra_CTI and i == n - 1, use_cti_tov=per_stage(use_CTI_toV, i),
                     use_cti_toc=per_stage(use_CTI_toC, i), dim_ratio=dim_ratio,
                     cnn_feature_interaction=per_stage(cnn_feature_interaction, i))
            for i in range(n)])
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norm1 = nn.BatchNorm2d(embed_dim)
        self.norm2 = nn.BatchNorm2d(embed_dim)
        self.norm3 = nn.BatchNorm2d(embed_dim)
        self.norm4 = nn.BatchNorm2d(embed_dim)
        self.feature_info = [dict(num_chs=embed_dim, reduction=2 ** (i + 2), module=f"norm{i + 1}") for i in range(4)]
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        """Module doc: the official init, plus timm's ViT init for the blocks and the position table."""
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.level_embed)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()

    def check_input(self, x, model=None):
        return check_image_input(model if model is not None else self, x, divisor=32, min_size=32)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.interactions:
            stage.grad_checkpointing = enable

    def level_shapes(self, h: int, w: int) -> Shapes:
        """The (h, w) of the CNN's stride-8, -16 and -32 maps for an h x w input."""
        return [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]

    def run(self, x) -> list[torch.Tensor]:
        """The four maps, without the input check (for models built on this backbone)."""
        b, _, h, w = x.shape
        shapes = self.level_shapes(h, w)
        ref = _reference_points(shapes, x.device, x.dtype)

        c1, cs = self.spm(x)
        c = torch.cat([t + self.level_embed[i] for i, t in enumerate(cs)], dim=1)

        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        pos = resample_pos_embed(self.pos_embed[:, 1:], grid, self.pretrain_grid, mode="bicubic")
        x = self.pos_drop(x.flatten(2).transpose(1, 2) + pos)

        vit_maps = []
        for stage, (first, last) in zip(self.interactions, self.interaction_indexes):
            x, c = stage(x, c, self.blocks[first:last + 1], ref, shapes)
            vit_maps.append(x.transpose(1, 2).unflatten(2, grid))

        c2, c3, c4 = _split_maps(c, shapes)
        c1 = self.up(c2) + c1
        maps = [c1, c2, c3, c4]
        if self.add_vit_feature:
            maps = [m + (v if v.shape[-2:] == m.shape[-2:] else
                         F.interpolate(v, size=m.shape[-2:], mode="bilinear", align_corners=False))
                    for m, v in zip(maps, vit_maps)]
        return [self.norm1(maps[0]), self.norm2(maps[1]), self.norm3(maps[2]), self.norm4(maps[3])]

    def forward_features(self, x) -> list[torch.Tensor]:
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.run(x)

    def forward(self, x) -> list[torch.Tensor]:
        return self.forward_features(x)


# ---------------------------------------------------------------------------------------------
# The segmentor: UperNet on the four maps, an FCN auxiliary head on the stride-16 one (training only)

class ViTCoMerUperNet(nn.Module):
    """ViT-CoMer + UperNet (mmseg's EncoderDecoder with `UPerHead` and an `FCNHead` auxiliary head on the
    stride-16 map): (B, C, H, W) -> scores (B, num_classes, H/4, W/4); in training, (main, auxiliary)
    scores, the auxiliary ones at stride 16, weighted (1.0, 0.4) in the loss (`loss_weights`)."""

    output_stride = 4
    input_divisor = 32

    def __init__(self, num_classes: int = 150, in_chans: int = 3, img_size=512, head_channels: int = 512,
                 aux_channels: int = 256, aux_loss_weight: float = 0.4, head_dropout: float = 0.1, **backbone_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.backbone = ViTCoMer(in_chans=in_chans, **backbone_kwargs)
        dim = self.backbone.embed_dim
        self.feature_info = [dict(d, module=f"backbone.{d['module']}") for d in self.backbone.feature_info]
        self.num_features = head_channels
        self.head = UperNetHead([dim] * 4, channels=head_channels, num_classes=num_classes, dropout=head_dropout)
        self.aux_head = FCNAuxHead(dim, channels=aux_channels, num_classes=num_classes, num_convs=1,
                                   dropout=head_dropout)
        self.aux_index = 2          # mmseg's in_index: the stride-16 map
        self.loss_weights = (1.0, aux_loss_weight)

    def check_input(self, x):
        return self.backbone.check_input(x, model=self)

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def reset_classifier(self, num_classes: int):
        """Fresh final 1x1 convs for `num_classes` in the main and the auxiliary head (0: none; forward returns
        the head's fused map), on the model's device and dtype."""
        reset_head_classifiers((self.head, self.aux_head), num_classes, self.training)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        # the official LayerDecayOptimizerConstructor: no decay for 1-d parameters and biases
        return {n for n, p in self.named_parameters() if p.ndim == 1 or n.endswith(".bias")}

    def set_grad_checkpointing(self, enable: bool = True):
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x) -> list[torch.Tensor]:
        """The backbone's four NCHW maps (strides 4, 8, 16, 32)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.backbone.run(x)

    def forward_head(self, feats):
        main = self.head(feats)
        if self.training:
            return main, self.aux_head(feats[self.aux_index])
        return main

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Checkpoints: the official mmseg files (`backbone.` + `decode_head.` + `auxiliary_head.`). The backbone
# keeps the official module names (blocks.N, spm, interactions.N.{mrfp, cti_tov, cti_toc, extra_CTIs},
# level_embed, up, norm1..4), so its keys pass unchanged; the heads are renamed.

_HEAD_RULES = [  # official (mmseg UPerHead / FCNHead) -> ours, applied to the key after its head prefix
    (r"^conv_seg\.", "classifier."),
]
_PREFIXES = (("backbone.", "backbone."), ("decode_head.", "head."), ("auxiliary_head.", "aux_head."))


def checkpoint_filter_fn(state_dict: dict, model: ViTCoMerUperNet) -> dict:
    """Map an official ViT-CoMer segmentation checkpoint (mmseg's `state_dict`: `backbone.*`,
    `decode_head.*`, `auxiliary_head.*`) to our key names; our own state dicts pass unchanged. A file
    without the auxiliary head (an inference export) keeps ours at its initialisation."""
    sd = release_state_dict(state_dict)
    if any(k.startswith(("head.", "aux_head.")) for k in sd):
        return sd
    if not any(k.startswith("backbone.interactions.") for k in sd):
        some = ", ".join(sorted(sd)[:4])
        raise does_not_fit(model, f"its keys ({some}, ...) are not those of an official ViT-CoMer segmentor")
    out, unmapped = {}, []
    for k, v in sd.items():
        for theirs, ours in _PREFIXES:
            if k.startswith(theirs):
                rest = k[len(theirs):]
                if ours != "backbone.":
                    for pattern, repl in _HEAD_RULES:
                        rest = re.sub(pattern, repl, rest, count=1)
                out[ours + rest] = v
                break
        else:
            unmapped.append(k)
    if unmapped:
        raise does_not_fit(model, f"{len(unmapped)} key(s) outside backbone / decode_head / auxiliary_head: "
                                  f"{unmapped[:4]}")
    if not any(k.startswith("aux_head.") for k in out):
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("aux_head.")})
    return out


# ---------------------------------------------------------------------------------------------
# Variants: the official ADE20K configs (150 classes, 512x512, UperNet channels 512, FCN aux 256 at 0.4),
# segmentation/configs/ade20k/upernet_vit_comer_{tiny,small,base}_512_160k_ade20k.py. params_m: the
# README / paper table (#Param of the whole segmentor); mIoU single scale.

_CFG = dict(first_conv="backbone.patch_embed.proj", classifier="head.classifier", crop_pct=1.0,
            interpolation="bilinear", num_classes=150)

_VARIANTS = {
    "tiny": dict(embed_dim=192, num_heads=3, deform_num_heads=6, drop_path_rate=0.1, deform_ratio=1.0, dim_ratio=6.0),
    "small": dict(embed_dim=384, num_heads=6, deform_num_heads=6, drop_path_rate=0.2, deform_ratio=1.0, dim_ratio=1.5),
    "base": dict(embed_dim=768, num_heads=12, deform_num_heads=12, drop_path_rate=0.3, deform_ratio=0.5,
                 dim_ratio=1.0),
}


def _card(size: str, letter: str, params: str, miou: float, pretrain: str, ours: int, backbone: int) -> ModelCard:
    notes = (f"ADE20K val mIoU {miou} (single scale, 512x512 crops, 160k iterations, UperNet, {pretrain} init); "
             f"config upernet_vit_comer_{size}_512_160k_ade20k.py. params: the whole segmentor with the 150-class "
             f"UperNet and FCN auxiliary heads, as mmseg counts it: ours {ours:,} (backbone {backbone:,})")
    return ModelCard(paper=30, arxiv="2403.07392", repo="Traffic-X/ViT-CoMer", official_name=f"ViT-CoMer-{letter}",
                     params_m=params, img_size=512, notes=notes, task="segment")


def _build(size: str, kwargs) -> ViTCoMerUperNet:
    return ViTCoMerUperNet(**{**_VARIANTS[size], **kwargs})


@register_model(_card("tiny", "T", "38.7", 43.5, "DeiT-T", 38_715_148, 10_619_360), **_CFG)
def vit_comer_tiny_upernet(**kwargs):
    return _build("tiny", kwargs)


@register_model(_card("small", "S", "61.4", 46.5, "DeiT-S", 61_391_500, 31_280_480), **_CFG)
def vit_comer_small_upernet(**kwargs):
    return _build("small", kwargs)


@register_model(_card("base", "B", "144.7", 48.8, "DeiT-B (the README's table says DeiT-S; the config loads "
                     "deit_base_patch16_224)", 144_745_132, 110_603_648), **_CFG)
def vit_comer_base_upernet(**kwargs):
    return _build("base", kwargs)
