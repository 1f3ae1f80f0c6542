"""PoolFormer: "MetaFormer Is Actually What You Need for Vision" (catalog id 70, arXiv 2111.11418).

The paper's claim is that the transformer's power lies in its block shape (norm -> token mixer ->
residual, norm -> MLP -> residual), not in attention: a parameter-free 3x3 average pool as the
token mixer, in a four-stage pyramid, already beats comparable ViTs and MLP-like models.

Everything runs on NCHW maps: GroupNorm with one group, `avg_pool(x) - x` as mixer, 1x1-conv MLP,
LayerScale on both branches. Official code: sail-sg/poolformer (models/poolformer.py).
"""
import re
from collections import OrderedDict

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from formers.layers import (ConvMlp, DropPath, Pooling, Scale, check_image_input, drop_path_rates,
                            feature_take_indices)
from formers.layers.pool import pool_map
from formers.models.base import Backbone
from formers.registry import ModelCard, register_model

__all__ = ["PoolFormer", "PoolFormerBlock", "checkpoint_filter_fn"]


def conv_embed(in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    """A strided convolution, keyed `.conv`: the stem (7x7 s4) and the downsamplings (3x3 s2)."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)))


class PoolFormerBlock(nn.Module):
    """x + ls1 * pool_mixer(GN(x)), then x + ls2 * ConvMlp(GN(x)), all on NCHW maps."""

    def __init__(self, dim: int, pool_size: int = 3, mlp_ratio: float = 4.0, layer_scale_init: float = 1e-5,
                 drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.token_mixer = Pooling(pool_size, channels_last=False)
        self.layer_scale1 = Scale(dim, layer_scale_init, channels_last=False)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.layer_scale2 = Scale(dim, layer_scale_init, channels_last=False)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.layer_scale1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.layer_scale2(self.mlp(self.norm2(x))))


class PoolFormerStage(nn.Module):
    """An optional 3x3 stride-2 downsampling conv, then `depth` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths, **block_kwargs):
        super().__init__()
        self.downsample = conv_embed(in_dim, dim, 3, 2, 1) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[PoolFormerBlock(dim, drop_path=p, **block_kwargs) for p in drop_paths])
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


class PoolFormer(Backbone):
    """Stem conv 7x7 s4 -> four stages of PoolFormer blocks -> norm -> average -> linear.

    `final_norm`: "group" (the official code) normalises the whole last map with GroupNorm(1, C)
    and then averages; "layer" (timm's port) averages first and applies LayerNorm(eps 1e-6) over
    channels. Both hold one weight and one bias per channel, so the same checkpoint loads into
    either; the logits differ, and the official weights were trained with "group".
    """

    min_input_size = 3  # the 7x7 stride-4 stem (pad 2) needs 3 pixels
    head_norm = True    # `norm` is the head's (in forward_head, around the pooling)

    def __init__(self, depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), mlp_ratio: float = 4.0, pool_size: int = 3,
                 layer_scale_init: float = 1e-5, num_classes: int = 1000, in_chans: int = 3, img_size=224,
                 global_pool: str = "avg", drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, final_norm: str = "group"):
        super().__init__()
        if final_norm not in ("group", "layer"):
            raise ValueError(f"final_norm must be 'group' (official) or 'layer' (timm), got {final_norm!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.global_pool = self.check_pool(global_pool)
        self.num_features = dims[-1]
        self.final_norm = final_norm
        self.grad_checkpointing = False

        self.stem = conv_embed(in_chans, dims[0], 7, 4, 2)
        rates = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*[
            PoolFormerStage(dims[max(i - 1, 0)], dims[i], depths[i], downsample=i > 0, drop_paths=rates[i],
                            pool_size=pool_size, mlp_ratio=mlp_ratio, layer_scale_init=layer_scale_init,
                            drop=proj_drop_rate)
            for i in range(len(depths))])
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}") for i, d in enumerate(dims)]

        self.norm = nn.GroupNorm(1, dims[-1]) if final_norm == "group" else nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # As the official code: truncated normal for the linear layers and the MLP's 1x1 convs,
        # PyTorch's default for the stem and downsampling convs.
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def check_input(self, x):
        return check_image_input(self, x, min_size=self.min_input_size)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def _embed(self, x):
        # Channels-last memory (the tensors stay NCHW): oneDNN's convs, pooling and GroupNorm then run
        # without reordering between layers (1.34x timm's eager img/s on poolformer_s12, batch 8, CPU).
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.stages(self._embed(x))

    def forward_head(self, x, pre_logits: bool = False):
        if self.final_norm == "group":
            x = self.norm(x)  # official: GroupNorm over the whole map, then average
        if self.global_pool:
            x = pool_map(x, self.global_pool)
        else:
            x = x.permute(0, 2, 3, 1)  # unpooled: the head runs at every position
        if self.final_norm == "layer":
            x = self.norm(x)
        x = self.head_drop(x)
        if not pre_logits:
            x = self.head(x)
        return x if self.global_pool else x.permute(0, 3, 1, 2)

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The map after each requested stage (NCHW, in stage order, as timm). There is no per-stage norm
        in the classification model, so `norm` changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        take, last = feature_take_indices(len(self.stages), indices)
        x = self._embed(x)
        feats = []
        for i, stage in enumerate(self.stages):
            if i > last and (stop_early or intermediates_only):
                break
            x = stage(x)
            if i in take:
                feats.append(x)
        return feats if intermediates_only else (x, feats)


def checkpoint_filter_fn(state_dict: dict, model: PoolFormer) -> dict:
    """Our keys from ours (unchanged), the official release or timm's port.

    official: patch_embed.proj -> stem.conv; network.{2i}.{j}.* -> stages.i.blocks.j.*
              (layer_scale_1 -> layer_scale1.scale); network.{2i-1}.proj -> stages.i.downsample.conv
    timm:     head.norm -> norm; head.fc -> head (the body already has our names)
    timm's weights loaded into final_norm="group" (the official head) give the official head's
    logits, not timm's: that is said in one warning (final_norm="layer" gives timm's).
    """
    if "stem.conv.weight" in state_dict and "norm.weight" in state_dict:
        return state_dict
    out = {}
    official = "patch_embed.proj.weight" in state_dict
    if not official and "head.norm.weight" in state_dict and getattr(model, "final_norm", "") == "group":
        import warnings
        warnings.warn(f"{getattr(model, 'model_name', type(model).__name__)}: these are timm's PoolFormer weights "
                      f"(head.norm), loaded into the official head (GroupNorm over the map, then pooling), so the "
                      f"logits are the official head's, not timm's; build with final_norm=\"layer\" to get timm's "
                      f"(pooling, then LayerNorm)", UserWarning, stacklevel=2)
    for k, v in state_dict.items():
        if official:
            k = re.sub(r"^patch_embed\.proj\.", "stem.conv.", k)
            m = re.match(r"^network\.(\d+)\.(.*)$", k)
            if m and int(m[1]) % 2 == 0:
                rest = re.sub(r"layer_scale_(\d)$", r"layer_scale\1.scale", m[2])
                k = f"stages.{int(m[1]) // 2}.blocks.{rest}"
            elif m:
                k = f"stages.{(int(m[1]) + 1) // 2}.downsample.{m[2].replace('proj.', 'conv.')}"
        else:
            k = re.sub(r"^head\.norm\.", "norm.", k)
            k = re.sub(r"^head\.fc\.", "head.", k)
        out[k] = v
    return out


_PAPER = dict(paper=70, arxiv="2111.11418", repo="sail-sg/poolformer")
_CFG = dict(first_conv="stem.conv", classifier="head")
# timm's PoolFormer pools before a LayerNorm (eps 1e-6) where the official model applies GroupNorm to
# the whole map first; `formers bench --peer timm` builds ours this way to time the same computation.
TIMM_COMPAT_KWARGS = {f"poolformer_{v}": {"final_norm": "layer"} for v in ("s12", "s24", "s36", "m36", "m48")}
_S, _M = (64, 128, 320, 512), (96, 192, 384, 768)


@register_model(ModelCard(**_PAPER, official_name="poolformer_s12", params_m="12", macs_g=1.8, top1=77.2),
                crop_pct=0.9, **_CFG)
def poolformer_s12(**kwargs):
    return PoolFormer(depths=(2, 2, 6, 2), dims=_S, layer_scale_init=1e-5, **kwargs)


@register_model(ModelCard(**_PAPER, official_name="poolformer_s24", params_m="21", macs_g=3.4, top1=80.3),
                crop_pct=0.9, **_CFG)
def poolformer_s24(**kwargs):
    return PoolFormer(depths=(4, 4, 12, 4), dims=_S, layer_scale_init=1e-5, **kwargs)


@register_model(ModelCard(**_PAPER, official_name="poolformer_s36", params_m="31", macs_g=5.0, top1=81.4),
                crop_pct=0.9, **_CFG)
def poolformer_s36(**kwargs):
    return PoolFormer(depths=(6, 6, 18, 6), dims=_S, layer_scale_init=1e-6, **kwargs)


@register_model(ModelCard(**_PAPER, official_name="poolformer_m36", params_m="56", macs_g=8.8, top1=82.1),
                crop_pct=0.95, **_CFG)
def poolformer_m36(**kwargs):
    return PoolFormer(depths=(6, 6, 18, 6), dims=_M, layer_scale_init=1e-6, **kwargs)


@register_model(ModelCard(**_PAPER, official_name="poolformer_m48", params_m="73", macs_g=11.6, top1=82.5),
                crop_pct=0.95, **_CFG)
def poolformer_m48(**kwargs):
    return PoolFormer(depths=(8, 8, 24, 8), dims=_M, layer_scale_init=1e-6, **kwargs)
