"""MetaFormer baselines: "MetaFormer Baselines for Vision" (catalog id 38, arXiv 2210.13452).

One four-stage MetaFormer (norm -> token mixer -> residual, norm -> MLP -> residual) probes how much
the token mixer matters: none (IdentityFormer), a frozen random matrix (RandFormer), pooling
(PoolFormerV2), separable convs (ConvFormer), convs then attention (CAFormer), all with StarReLU.

The blocks run channels-last (B, H, W, C), as the official code does, so every MLP and pointwise conv
is a Linear; only the depthwise / strided convs and pooling see an NCHW view of the same memory.
Official code: sail-sg/metaformer (metaformer_baselines.py). PoolFormer v1 is models/poolformer.py.
"""
import re

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.layers import (Attention, ChannelLayerNorm, DropPath, IdentityMixer, LayerNormNoBias, Mlp, Pooling,
                            RandomMixing, Scale, SepConv, SquaredReLU, StarReLU, add_residual, check_image_input,
                            drop_path_rates, feature_take_indices, to_2tuple)
from formers.layers.pool import pool_map
from formers.models.base import Backbone
from formers.registry import ModelCard, register_model

__all__ = ["MetaFormer", "MetaFormerBlock", "MlpHead", "checkpoint_filter_fn"]


class Stem(nn.Module):
    """Conv 7x7 stride 4 (pad 2), then LayerNorm over channels: NCHW image in, channels-last map out."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 7, 4, 2)
        self.norm = LayerNormNoBias(out_chs)

    def forward(self, x):
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class Downsample(nn.Module):
    """LayerNorm over channels, then conv 3x3 stride 2 (pad 1); channels-last in and out."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.norm = LayerNormNoBias(in_chs)
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 2, 1)

    def forward(self, x):
        return self.conv(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class MapAttention(Attention):
    """Self-attention among all H*W positions of a channels-last map (CAFormer stages 3-4)."""

    def forward(self, x):
        return self.attend(x.flatten(1, 2)).unflatten(1, (x.shape[1], x.shape[2]))


def make_token_mixer(kind: str, dim: int, num_tokens: int) -> nn.Module:
    """The token mixer of one stage; `num_tokens` (H*W at this stage) sizes RandFormer's matrix."""
    if kind == "identity":
        return IdentityMixer()
    if kind == "random":
        return RandomMixing(num_tokens)
    if kind == "pool":
        return Pooling(3)
    if kind == "sepconv":
        return SepConv(dim, expansion_ratio=2, kernel_size=7, padding=3)
    if kind == "attention":
        return MapAttention(dim, num_heads=max(dim // 32, 1), head_dim=32, qkv_bias=False, proj_bias=False)
    raise ValueError(f"unknown token mixer {kind!r}")


class MetaFormerBlock(nn.Module):
    """x = rs1 * x + mixer(norm1(x)); x = rs2 * x + mlp(norm2(x)), where rs is a learnable
    per-channel ResScale in stages 3-4 and the identity elsewhere."""

    def __init__(self, dim: int, mixer: nn.Module, norm_layer, res_scale: bool = False, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.token_mixer = mixer
        self.drop_path1 = DropPath(drop_path)
        self.res_scale1 = Scale(dim) if res_scale else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, 4 * dim, act_layer=StarReLU, bias=False, drop=drop)
        self.drop_path2 = DropPath(drop_path)
        self.res_scale2 = Scale(dim) if res_scale else nn.Identity()

    def forward(self, x):
        if torch.jit.is_scripting():  # add_residual takes a module, which TorchScript cannot pass
            x = self.res_scale1(x) + self.drop_path1(self.token_mixer(self.norm1(x)))
            return self.res_scale2(x) + self.drop_path2(self.mlp(self.norm2(x)))
        else:
            x = add_residual(x, self.drop_path1(self.token_mixer(self.norm1(x))), self.res_scale1)
            return add_residual(x, self.drop_path2(self.mlp(self.norm2(x))), self.res_scale2)


class MetaFormerStage(nn.Module):
    """A downsampling (all stages but the first), then `len(mixers)` blocks."""

    def __init__(self, in_dim: int, dim: int, mixers, norm_layer, res_scale: bool, drop: float, drop_paths,
                 downsample: bool):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[MetaFormerBlock(dim, mixer, norm_layer, res_scale, drop, p)
                                      for mixer, p in zip(mixers, drop_paths)])
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.downsample(x)
        if torch.jit.is_scripting():
            return self.blocks(x)
        else:
            if self.grad_checkpointing and torch.is_grad_enabled():
                for block in self.blocks:
                    x = checkpoint(block, x, use_reentrant=False)
                return x
            return self.blocks(x)


class MlpHead(nn.Module):
    """ConvFormer / CAFormer classifier: fc1 (x4) -> SquaredReLU -> LayerNorm -> dropout -> fc2.
    The LayerNorm keeps torch's default eps 1e-5, as the official code (timm's port uses 1e-6)."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: int = 4, drop: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        hidden = mlp_ratio * dim
        self.fc1 = nn.Linear(dim, hidden)
        self.act = SquaredReLU()
        self.norm = nn.LayerNorm(hidden, eps=norm_eps)
        self.dropout = nn.Dropout(drop)  # not `drop`: torchvision's fx node names would clash with `head_drop`
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.dropout(self.norm(self.act(self.fc1(x)))))


def _stage_sizes(img_size) -> list[tuple[int, int]]:
    """(H, W) of each stage's map for an input of img_size: 7x7 s4 p2, then 3x3 s2 p1 three times."""
    h, w = to_2tuple(img_size)
    sizes = [((h - 3) // 4 + 1, (w - 3) // 4 + 1)]
    for _ in range(3):
        h, w = sizes[-1]
        sizes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return sizes


class MetaFormer(Backbone):
    """Stem -> four stages of MetaFormer blocks -> average -> LayerNorm -> Linear or MlpHead.

    mixers: one token-mixer kind per stage ("identity", "random", "pool", "sepconv", "attention").
    norm: "channel" normalises each sample over all of (H, W, C) (GroupNorm(1)-like, IdentityFormer,
    RandFormer, PoolFormerV2); "layer" over C only (ConvFormer, CAFormer). Both without bias, eps 1e-6.
    res_scale: which stages scale the residual path by a learnable per-channel vector.
    A RandFormer's frozen mixing matrices are sized for `img_size`: it takes that input size only.
    """

    min_input_size = 3  # the 7x7 stride-4 stem (pad 2) needs 3 pixels
    head_norm = True    # `norm` acts on the pooled features, before the classifier

    def __init__(self, depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), mixers=("pool",) * 4, norm: str = "channel",
                 res_scale=(False, False, True, True), mlp_head: bool = False, num_classes: int = 1000,
                 in_chans: int = 3, img_size=224, global_pool: str = "avg", drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if norm not in ("channel", "layer"):
            raise ValueError(f"norm must be 'channel' or 'layer', got {norm!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.global_pool = self.check_pool(global_pool)
        self.num_features = dims[-1]
        self.mlp_head = mlp_head
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.fixed_input_size = to_2tuple(img_size) if "random" in mixers else None

        norm_layer = ChannelLayerNorm if norm == "channel" else LayerNormNoBias
        sizes = _stage_sizes(img_size)
        rates = drop_path_rates(drop_path_rate, depths)
        self.stem = Stem(in_chans, dims[0])
        self.stages = nn.Sequential()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stage_mixers = [make_token_mixer(mixers[i], dim, sizes[i][0] * sizes[i][1]) for _ in range(depth)]
            self.stages.append(MetaFormerStage(dims[max(i - 1, 0)], dim, stage_mixers, norm_layer, res_scale[i],
                                               proj_drop_rate, rates[i], downsample=i > 0))
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}") for i, d in enumerate(dims)]

        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(0.0 if mlp_head else drop_rate)  # MlpHead drops inside, before fc2
        self.head = self._make_head(num_classes)
        self.apply(self._init_weights)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.mlp_head:
            return MlpHead(self.num_features, num_classes, drop=self.drop_rate)
        return nn.Linear(self.num_features, num_classes)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def make_classifier(self, num_classes: int) -> nn.Module:
        return self._make_head(num_classes)

    def check_input(self, x):
        # the 7x7 stride-4 stem (pad 2) needs 3 pixels; RandFormer takes its one size only
        return check_image_input(self, x, min_size=self.min_input_size, fixed_size=self.fixed_input_size)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x):
        """The last stage's map as NCHW (a view of the channels-last tensor the blocks work on)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.stages(self.stem(x)).permute(0, 3, 1, 2)

    def forward_head(self, x, pre_logits: bool = False):
        if self.global_pool:
            x = pool_map(x, self.global_pool)
        else:
            x = x.permute(0, 2, 3, 1)  # unpooled: the head runs at every position
        x = self.head_drop(self.norm(x))
        if not pre_logits:
            x = self.head(x)
        return x if self.global_pool else x.permute(0, 3, 1, 2)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The map after each requested stage (NCHW views, in stage order, as timm). The model has no
        per-stage norm, so `norm` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        take, last = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            if i > last and (stop_early or intermediates_only):
                break
            x = stage(x)
            if i in take:
                feats.append(x.permute(0, 3, 1, 2))
        return feats if intermediates_only else (x.permute(0, 3, 1, 2), feats)


def checkpoint_filter_fn(state_dict: dict, model: MetaFormer) -> dict:
    """Our keys from ours (unchanged), the official release or timm's port.

    official: downsample_layers.0.{conv,post_norm} -> stem.{conv,norm};
              downsample_layers.i.{pre_norm,conv} -> stages.i.downsample.{norm,conv};
              stages.i.j.* -> stages.i.blocks.j.*  (norm.*, head.* are already ours)
    timm:     the body has our names but runs NCHW, so its 1x1-conv weights (C_out, C_in, 1, 1) become
              Linear weights; head.norm -> norm, head.fc -> head (head.fc.fc1 -> head.fc1 ...).
    """
    if "stem.conv.weight" in state_dict and "norm.weight" in state_dict:
        return state_dict
    own = model.state_dict()
    official = "downsample_layers.0.conv.weight" in state_dict
    out = {}
    for k, v in state_dict.items():
        if official:
            k = re.sub(r"^downsample_layers\.0\.conv\.", "stem.conv.", k)
            k = re.sub(r"^downsample_layers\.0\.post_norm\.", "stem.norm.", k)
            k = re.sub(r"^downsample_layers\.(\d+)\.pre_norm\.", r"stages.\1.downsample.norm.", k)
            k = re.sub(r"^downsample_layers\.(\d+)\.conv\.", r"stages.\1.downsample.conv.", k)
            k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        else:
            k = re.sub(r"^head\.norm\.", "norm.", k)
            k = re.sub(r"^head\.fc\.", "head.", k)
            if k in own and v.dim() == 4 and own[k].dim() == 2 and v.shape[2:] == (1, 1):
                v = v.flatten(1)
        out[k] = v
    return out


_PAPER = dict(paper=38, arxiv="2210.13452", repo="sail-sg/metaformer")
_CFG = dict(first_conv="stem.conv", crop_pct=1.0)
_S12, _S24, _S36, _M36, _M48 = (2, 2, 6, 2), (4, 4, 12, 4), (6, 6, 18, 6), (6, 6, 18, 6), (8, 8, 24, 8)
_S, _M = (64, 128, 320, 512), (96, 192, 384, 768)
_RAND = ("identity", "identity", "random", "random")
_CA = ("sepconv", "sepconv", "attention", "attention")


def _card(name: str, params: str, macs: float, top1: float, img_size: int = 224, **kw) -> ModelCard:
    return ModelCard(**_PAPER, official_name=name, params_m=params, macs_g=macs, top1=top1, img_size=img_size, **kw)


# IdentityFormer, RandFormer, PoolFormerV2: GroupNorm-like norm, linear head.

@register_model(_card("identityformer_s12", "11.9", 1.8, 74.6), **_CFG)
def identityformer_s12(**kwargs):
    return MetaFormer(_S12, _S, mixers=("identity",) * 4, **kwargs)


@register_model(_card("identityformer_s24", "21.3", 3.4, 78.2), **_CFG)
def identityformer_s24(**kwargs):
    return MetaFormer(_S24, _S, mixers=("identity",) * 4, **kwargs)


@register_model(_card("identityformer_s36", "30.8", 5.0, 79.3), **_CFG)
def identityformer_s36(**kwargs):
    return MetaFormer(_S36, _S, mixers=("identity",) * 4, **kwargs)


@register_model(_card("identityformer_m36", "56.1", 8.8, 80.0), **_CFG)
def identityformer_m36(**kwargs):
    return MetaFormer(_M36, _M, mixers=("identity",) * 4, **kwargs)


@register_model(_card("identityformer_m48", "73.3", 11.5, 80.4), **_CFG)
def identityformer_m48(**kwargs):
    return MetaFormer(_M48, _M, mixers=("identity",) * 4, **kwargs)


_RAND_NOTE = "'+x' are the frozen random mixing matrices (not trained, stored in the checkpoint); 224 input only"


@register_model(_card("randformer_s12", "11.9+0.2", 1.9, 76.6, notes=_RAND_NOTE), fixed_input_size=True, **_CFG)
def randformer_s12(**kwargs):
    return MetaFormer(_S12, _S, mixers=_RAND, **kwargs)


@register_model(_card("randformer_s24", "21.3+0.5", 3.5, 78.2, notes=_RAND_NOTE), fixed_input_size=True, **_CFG)
def randformer_s24(**kwargs):
    return MetaFormer(_S24, _S, mixers=_RAND, **kwargs)


@register_model(_card("randformer_s36", "30.8+0.7", 5.2, 79.5, notes=_RAND_NOTE), fixed_input_size=True, **_CFG)
def randformer_s36(**kwargs):
    return MetaFormer(_S36, _S, mixers=_RAND, **kwargs)


@register_model(_card("randformer_m36", "56.1+0.7", 9.0, 81.2, notes=_RAND_NOTE), fixed_input_size=True, **_CFG)
def randformer_m36(**kwargs):
    return MetaFormer(_M36, _M, mixers=_RAND, **kwargs)


@register_model(_card("randformer_m48", "73.3+0.9", 11.9, 81.4, notes=_RAND_NOTE), fixed_input_size=True, **_CFG)
def randformer_m48(**kwargs):
    return MetaFormer(_M48, _M, mixers=_RAND, **kwargs)


@register_model(_card("poolformerv2_s12", "11.9", 1.8, 78.0), **_CFG)
def poolformerv2_s12(**kwargs):
    return MetaFormer(_S12, _S, mixers=("pool",) * 4, **kwargs)


@register_model(_card("poolformerv2_s24", "21.3", 3.4, 80.7), **_CFG)
def poolformerv2_s24(**kwargs):
    return MetaFormer(_S24, _S, mixers=("pool",) * 4, **kwargs)


@register_model(_card("poolformerv2_s36", "30.8", 5.0, 81.6), **_CFG)
def poolformerv2_s36(**kwargs):
    return MetaFormer(_S36, _S, mixers=("pool",) * 4, **kwargs)


@register_model(_card("poolformerv2_m36", "56.1", 8.8, 82.2), **_CFG)
def poolformerv2_m36(**kwargs):
    return MetaFormer(_M36, _M, mixers=("pool",) * 4, **kwargs)


@register_model(_card("poolformerv2_m48", "73.3", 11.5, 82.6), **_CFG)
def poolformerv2_m48(**kwargs):
    return MetaFormer(_M48, _M, mixers=("pool",) * 4, **kwargs)


# ConvFormer and CAFormer: LayerNorm over channels, MLP head; the _384 variants are the same
# networks fine-tuned at 384 (the card's MACs are at 384).

_CONV_S18, _CONV_36 = (3, 3, 9, 3), (3, 12, 18, 3)
_CM, _CB = (96, 192, 384, 576), (128, 256, 512, 768)
_HEAD_CFG = dict(_CFG, classifier="head.fc2")


def _convformer(depths, dims, **kwargs):
    return MetaFormer(depths, dims, mixers=("sepconv",) * 4, norm="layer", mlp_head=True, **kwargs)


def _caformer(depths, dims, **kwargs):
    return MetaFormer(depths, dims, mixers=_CA, norm="layer", mlp_head=True, **kwargs)


@register_model(_card("convformer_s18", "27", 3.9, 83.0), **_HEAD_CFG)
def convformer_s18(**kwargs):
    return _convformer(_CONV_S18, _S, **kwargs)


@register_model(_card("convformer_s18_384", "27", 11.6, 84.4, img_size=384), **_HEAD_CFG)
def convformer_s18_384(img_size=384, **kwargs):
    return _convformer(_CONV_S18, _S, img_size=img_size, **kwargs)


@register_model(_card("convformer_s36", "40", 7.6, 84.1), **_HEAD_CFG)
def convformer_s36(**kwargs):
    return _convformer(_CONV_36, _S, **kwargs)


@register_model(_card("convformer_s36_384", "40", 22.4, 85.4, img_size=384), **_HEAD_CFG)
def convformer_s36_384(img_size=384, **kwargs):
    return _convformer(_CONV_36, _S, img_size=img_size, **kwargs)


@register_model(_card("convformer_m36", "57", 12.8, 84.5), **_HEAD_CFG)
def convformer_m36(**kwargs):
    return _convformer(_CONV_36, _CM, **kwargs)


@register_model(_card("convformer_m36_384", "57", 37.7, 85.6, img_size=384), **_HEAD_CFG)
def convformer_m36_384(img_size=384, **kwargs):
    return _convformer(_CONV_36, _CM, img_size=img_size, **kwargs)


@register_model(_card("convformer_b36", "100", 22.6, 84.8), **_HEAD_CFG)
def convformer_b36(**kwargs):
    return _convformer(_CONV_36, _CB, **kwargs)


@register_model(_card("convformer_b36_384", "100", 66.5, 85.7, img_size=384), **_HEAD_CFG)
def convformer_b36_384(img_size=384, **kwargs):
    return _convformer(_CONV_36, _CB, img_size=img_size, **kwargs)


@register_model(_card("caformer_s18", "26", 4.1, 83.6), **_HEAD_CFG)
def caformer_s18(**kwargs):
    return _caformer(_CONV_S18, _S, **kwargs)


@register_model(_card("caformer_s18_384", "26", 13.4, 85.0, img_size=384), **_HEAD_CFG)
def caformer_s18_384(img_size=384, **kwargs):
    return _caformer(_CONV_S18, _S, img_size=img_size, **kwargs)


@register_model(_card("caformer_s36", "39", 8.0, 84.5), **_HEAD_CFG)
def caformer_s36(**kwargs):
    return _caformer(_CONV_36, _S, **kwargs)


@register_model(_card("caformer_s36_384", "39", 26.0, 85.7, img_size=384), **_HEAD_CFG)
def caformer_s36_384(img_size=384, **kwargs):
    return _caformer(_CONV_36, _S, img_size=img_size, **kwargs)


@register_model(_card("caformer_m36", "56", 13.2, 85.2), **_HEAD_CFG)
def caformer_m36(**kwargs):
    return _caformer(_CONV_36, _CM, **kwargs)


@register_model(_card("caformer_m36_384", "56", 42.0, 86.2, img_size=384), **_HEAD_CFG)
def caformer_m36_384(img_size=384, **kwargs):
    return _caformer(_CONV_36, _CM, img_size=img_size, **kwargs)


@register_model(_card("caformer_b36", "99", 23.2, 85.5), **_HEAD_CFG)
def caformer_b36(**kwargs):
    return _caformer(_CONV_36, _CB, **kwargs)


@register_model(_card("caformer_b36_384", "99", 72.2, 86.4, img_size=384), **_HEAD_CFG)
def caformer_b36_384(img_size=384, **kwargs):
    return _caformer(_CONV_36, _CB, img_size=img_size, **kwargs)
