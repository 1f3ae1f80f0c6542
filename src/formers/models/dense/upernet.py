"""UperNet: any registered image backbone under a unified-perceptual-parsing decode head.

Paper: "Unified Perceptual Parsing for Scene Understanding", Xiao et al. 2018, arXiv 1807.10221; the
implementation followed is mmsegmentation's (`UPerHead` in mmseg/models/decode_heads/uper_head.py, its
pyramid pooling module from psp_head.py, and `FCNHead` as the auxiliary head of the UperNet configs).
This is the segmentor with which backbone papers (Swin, MetaFormer, ...) report ADE20K mIoU.

The head, in three lines:
  a pyramid pooling module (PPM) on the coarsest map: average-pooled to 1/2/3/6 cells a side, each
      projected, upsampled back and concatenated with the map, then fused by a 3x3 conv;
  an FPN: 1x1 lateral convs on the finer maps, a top-down pass adding each upsampled coarser map, 3x3 convs;
  all levels upsampled to the finest, concatenated, fused by a 3x3 conv, dropout, a 1x1 classifier.

The segmentors `UperNet` and `SegFormerHeadModel` (SegFormer's All-MLP head) put either head on any
registered image backbone, read through its timm-style `forward_intermediates`: a pyramid backbone gives
its (last four) stage outputs; a columnar one (one resolution: T2T-ViT, TNT, ResFormer, CrossViT's finer
branch) gives four evenly spaced blocks, turned into a pyramid by the neck mmseg's BEiT uses
(`ColumnarNeck`). Registered: `upernet` and `segformer_head` (pass `backbone=`) and the published
Swin + UperNet ADE20K models (`upernet_swin_tiny/small/base`).

Module names follow mmseg's (`psp_modules`, `bottleneck`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`, `convs`; mmcv's ConvModule is our `ConvBnReLU` with its `conv` / `bn`), except that
mmseg's `conv_seg` is our `classifier`, so an official checkpoint maps by that one rename.
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.checkpoint import does_not_fit, release_state_dict
from formers.layers import ConvBnReLU, LayerNorm2d, check_image_input
from formers.models.dense.segformer import SegFormerHead
from formers.registry import ModelCard, register_model

__all__ = ["UperNetHead", "FCNAuxHead", "seg_classifier", "reset_head_classifiers", "ColumnarNeck", "UperNet", "SegFormerHeadModel", "checkpoint_filter_fn"]


def reset_head_classifiers(heads, num_classes: int, training: bool):
    """Give each decode head (a module with `classifier`, `num_classes` and `make_classifier`) a fresh
    classifier for `num_classes`, made on the heads' device and dtype, in train mode if `training`."""
    ref = next(heads[0].parameters())
    for head in heads:
        with torch.device(ref.device):
            fresh = head.make_classifier(num_classes)
        head.classifier = fresh.to(dtype=ref.dtype).train(training)
        head.num_classes = num_classes


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def seg_classifier(channels: int, num_classes: int) -> nn.Module:
    """The final 1x1 conv (mmseg's `conv_seg`: normal(0, 0.01) weights, zero bias); none for 0 classes."""
    if num_classes <= 0:
        return nn.Identity()
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


class UperNetHead(nn.Module):
    """mmseg's `UPerHead`: (list of NCHW maps, finest first) -> scores (B, num_classes, H_0, W_0) at the size
    of the first map. `num_classes` 0: the fused `channels`-channel map, with no classifier."""

    def __init__(self, in_channels: Sequence[int], channels: int = 512, pool_scales=(1, 2, 3, 6),
                 num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.channels = channels
        self.pool_scales = tuple(pool_scales)
        self.num_classes = num_classes
        top = self.in_channels[-1]
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBnReLU(top, channels, 1)) for scale in self.pool_scales])
        self.bottleneck = ConvBnReLU(top + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvBnReLU(c, channels, 1) for c in self.in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvBnReLU(channels, channels, 3) for _ in self.in_channels[:-1]])
        self.fpn_bottleneck = ConvBnReLU(len(self.in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)  # mmseg's BaseDecodeHead drops whole channels
        self.classifier = self.make_classifier(num_classes)

    def make_classifier(self, num_classes: int) -> nn.Module:
        return seg_classifier(self.channels, num_classes)

    def pyramid_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The PPM on the coarsest map, fused with it by the 3x3 bottleneck."""
        size = x.shape[2:]
        pooled = [_upsample(branch(x), size) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def fuse(self, feats) -> torch.Tensor:
        """The `channels`-channel map at the first level's size, before dropout and the classifier."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"UperNetHead takes {len(self.in_channels)} maps, got {len(feats)}")
        levels = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        levels.append(self.pyramid_pool(feats[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: add each coarser map to the next finer one
            levels[i - 1] = levels[i - 1] + _upsample(levels[i], levels[i - 1].shape[2:])
        size = levels[0].shape[2:]
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels)]
        outs.append(levels[-1])
        outs = [outs[0]] + [_upsample(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats) -> torch.Tensor:
        return self.classifier(self.dropout(self.fuse(feats)))


class FCNAuxHead(nn.Module):
    """mmseg's `FCNHead` as the auxiliary head of the UperNet configs (`concat_input=False`, kernel 3):
    `num_convs` 3x3 ConvBnReLU (the first C_in -> channels), dropout, a 1x1 classifier. One NCHW map in,
    scores at its size out. `num_convs` 0 needs in_channels == channels (the map goes straight through)."""

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, num_convs: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"FCNAuxHead with num_convs=0 needs in_channels == channels, got {in_channels} "
                             f"and {channels}")
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        convs = [ConvBnReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = self.make_classifier(num_classes)

    def make_classifier(self, num_classes: int) -> nn.Module:
        return seg_classifier(self.channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


# ---------------------------------------------------------------------------------------------
# Reading a backbone: which of its feature_info entries become the head's levels

def _plan_levels(feature_info, name: str) -> tuple[str, list[int]]:
    """("pyramid" | "columnar", feature indices). A pyramid's distinct reductions double from one to the
    next: its levels are the last entry of each reduction, at most the last four. Otherwise the entries
    at the smallest reduction form one column, of which four evenly spaced ones are taken (ViT's 2/5/8/11
    of 12; a column shorter than four repeats some)."""
    reductions = [d.get("reduction") for d in feature_info]
    if not reductions or any(r is None for r in reductions):
        raise ValueError(f"{name}: this backbone has no spatial feature maps (feature_info reductions "
                         f"{reductions}), so no segmentation head can be put on it")
    distinct = sorted(set(reductions))
    doubling = all(b == 2 * a for a, b in zip(distinct, distinct[1:]))
    ordered = all(a <= b for a, b in zip(reductions, reductions[1:]))
    if len(distinct) > 1 and doubling and ordered:
        last = {r: i for i, r in enumerate(reductions)}
        return "pyramid", [last[r] for r in distinct][-4:]
    column = [i for i, r in enumerate(reductions) if r == distinct[0]]
    n = len(column)
    return "columnar", [column[max((k + 1) * n // 4 - 1, 0)] for k in range(4)]


class ColumnarNeck(nn.Module):
    """mmseg's BEiT / ViT UperNet neck (its `fpn1`..`fpn4`): four maps of one stride s become strides s/4
    (2x2 stride-2 transposed conv, BatchNorm, GELU, another one), s/2 (one transposed conv), s (as is)
    and 2s (2x2 max pooling)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def _choices() -> str:
    return ("pass backbone=<a registered image backbone with spatial feature maps>, e.g. 'convformer_s18', "
            "'swin_tiny_patch4_window7_224', 'pvt_tiny', 't2t_vit_7' (formers.list_models(task='classify') "
            "lists them), or an nn.Module with forward_intermediates and feature_info")


class _BackboneSegmentor(nn.Module):
    """A backbone read through forward_intermediates, its levels (through the columnar neck where it has
    one, and per-level LayerNorms with `out_norm`), under a decode head that a subclass builds."""

    def __init__(self, backbone, num_classes: int, in_chans: int, img_size, out_norm: bool, **backbone_kwargs):
        super().__init__()
        if backbone is None:
            raise TypeError(f"{type(self).__name__} needs a backbone: {_choices()}")
        if isinstance(backbone, str):
            import formers
            if backbone not in formers.list_models(task="classify"):
                raise ValueError(f"unknown backbone {backbone!r}: {_choices()}")
            name = backbone
            backbone = formers.create_model(backbone, num_classes=0, in_chans=in_chans, img_size=img_size,
                                            **backbone_kwargs)
        elif isinstance(backbone, nn.Module):
            name = getattr(backbone, "model_name", type(backbone).__name__)
        else:
            raise TypeError(f"backbone must be a model name or an nn.Module, got {type(backbone).__name__}: "
                            f"{_choices()}")
        if not hasattr(backbone, "forward_intermediates") or not getattr(backbone, "feature_info", None):
            raise ValueError(f"{name}: a segmentation head needs forward_intermediates and feature_info, "
                             f"which this backbone lacks")
        self.backbone_name = name
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.kind, indices = _plan_levels(backbone.feature_info, name)
        info = [dict(backbone.feature_info[i]) for i in indices]
        self.take = sorted(set(indices))
        if hasattr(backbone, "prune_intermediate_layers"):   # drop the classifier, final norm, later blocks
            try:
                backbone.prune_intermediate_layers(self.take, prune_norm=True, prune_head=True)
            except NotImplementedError:
                pass
        self.backbone = backbone
        self.level_of = [self.take.index(i) for i in indices]   # level k reads forward_intermediates' entry
        if self.kind == "columnar":
            dims = {d["num_chs"] for d in info}
            if len(dims) != 1:
                raise ValueError(f"{name}: the columnar levels have different widths {sorted(dims)}")
            self.neck = ColumnarNeck(info[0]["num_chs"])
            strides = [info[0]["reduction"] * f for f in (0.25, 0.5, 1, 2)]
            self.feature_info = [dict(num_chs=d["num_chs"], reduction=int(s) if float(s).is_integer() else s,
                                      module=f"neck.fpn{k + 1}") for k, (d, s) in enumerate(zip(info, strides))]
        else:
            self.neck = None
            self.feature_info = [dict(num_chs=d["num_chs"], reduction=d["reduction"],
                                      module=f"backbone.{d['module']}") for d in info]
        self.out_norms = nn.ModuleList([LayerNorm2d(d["num_chs"]) for d in self.feature_info]) if out_norm else None
        self.in_channels = tuple(d["num_chs"] for d in self.feature_info)
        self.input_divisor = getattr(backbone, "input_divisor", 1)
        self.min_input_size = getattr(backbone, "min_input_size", 1)
        self.fixed_input_size = getattr(backbone, "fixed_input_size", None)

    def check_input(self, x):
        return check_image_input(self, x, divisor=self.input_divisor, min_size=self.min_input_size,
                                 fixed_size=self.fixed_input_size)

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def _heads(self) -> list[nn.Module]:
        return [self.head]

    def reset_classifier(self, num_classes: int):
        """Fresh final 1x1 convs for `num_classes` in every head (0: none; forward returns the fused map)."""
        reset_head_classifiers(self._heads(), num_classes, self.training)
        self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        """The backbone's own exclusions, and every 1-d parameter (norms, biases)."""
        own = getattr(self.backbone, "no_weight_decay", None)
        keep = {f"backbone.{n}" for n in own()} if callable(own) else set()
        return keep | {n for n, p in self.named_parameters() if p.ndim <= 1}

    def set_grad_checkpointing(self, enable: bool = True):
        self.backbone.set_grad_checkpointing(enable)

    def forward_features(self, x) -> list[torch.Tensor]:
        """The head's NCHW levels, finest first (strides in `feature_info`)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        maps = self.backbone.forward_intermediates(x, indices=self.take, intermediates_only=True)
        feats = [maps[j] for j in self.level_of]
        if self.neck is not None:
            feats = self.neck(feats)
        if self.out_norms is not None:
            feats = [norm(f) for norm, f in zip(self.out_norms, feats)]
        return feats

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class UperNet(_BackboneSegmentor):
    """A backbone under UperNet (mmseg's EncoderDecoder with `UPerHead`, and with `aux_head` an `FCNHead`
    on the second-coarsest level, mmseg's in_index 2): (B, C, H, W) -> scores (B, num_classes, H/s, W/s)
    at the finest level's stride s (`output_stride`: 4 on a stride-4 pyramid). In training with the
    auxiliary head, (main, auxiliary) scores, weighted `loss_weights` = (1.0, 0.4) in the loss.

    Columnar backbones get mmseg's BEiT neck (`ColumnarNeck`, fpn1..fpn4) on four evenly spaced blocks.
    `out_norm`: a LayerNorm on each level, as the official Swin segmentation backbone's norm0..norm3.
    The backbone is pruned of its classifier, final norm and unused blocks (a module passed in, in place).
    Other keywords go to the backbone's builder."""

    def __init__(self, backbone=None, num_classes: int = 150, in_chans: int = 3, img_size=512, channels: int = 512,
                 pool_scales=(1, 2, 3, 6), aux_head: bool = True, aux_channels: int = 256,
                 aux_loss_weight: float = 0.4, head_dropout: float = 0.1, out_norm: bool = False, **backbone_kwargs):
        super().__init__(backbone, num_classes, in_chans, img_size, out_norm, **backbone_kwargs)
        self.output_stride = self.feature_info[0]["reduction"]
        self.num_features = channels
        self.head = UperNetHead(self.in_channels, channels, pool_scales, num_classes, head_dropout)
        self.aux_index = max(len(self.in_channels) - 2, 0)
        if aux_head:
            self.aux_head = FCNAuxHead(self.in_channels[self.aux_index], aux_channels, num_classes, 1, head_dropout)
            self.loss_weights = (1.0, aux_loss_weight)
        else:
            self.aux_head = None

    def _heads(self) -> list[nn.Module]:
        return [self.head] + ([self.aux_head] if self.aux_head is not None else [])

    def forward_head(self, feats):
        main = self.head(feats)
        if self.training and self.aux_head is not None:
            return main, self.aux_head(feats[self.aux_index])
        return main


class SegFormerHeadModel(_BackboneSegmentor):
    """A backbone under SegFormer's All-MLP head (`SegFormerHead` of segformer.py): (B, C, H, W) -> scores
    at the finest level's stride (4 on a stride-4 pyramid). Levels as `UperNet`'s; no auxiliary head.
    Other keywords go to the backbone's builder."""

    def __init__(self, backbone=None, num_classes: int = 150, in_chans: int = 3, img_size=512,
                 decoder_dim: int = 256, head_dropout: float = 0.1, out_norm: bool = False, **backbone_kwargs):
        super().__init__(backbone, num_classes, in_chans, img_size, out_norm, **backbone_kwargs)
        self.output_stride = self.feature_info[0]["reduction"]
        self.num_features = decoder_dim
        self.head = SegFormerHead(self.in_channels, decoder_dim, num_classes, head_dropout)
        nn.init.kaiming_normal_(self.head.fuse.weight, mode="fan_out", nonlinearity="relu")  # as SegFormer's

    def forward_head(self, feats):
        return self.head(feats)


# ---------------------------------------------------------------------------------------------
# Checkpoints: mmseg segmentors (`backbone.*`, `decode_head.*`, `auxiliary_head.*`). The heads keep mmseg's
# module names but `conv_seg` (ours: `classifier`); SegFormer's head is renamed by segformer.py's rules.
# The backbone's keys go through its own module's checkpoint_filter_fn, the neck's (BEiT's
# `backbone.fpn1..4`) and the per-level norms (Swin's `backbone.norm0..3`) are taken out first.

_SEGFORMER_HEAD = [  # NVlabs/SegFormer's decode head -> SegFormerHead
    (r"^linear_c(\d)\.proj\.", lambda m: f"linear_c.{int(m[1]) - 1}."),
    (r"^linear_fuse\.conv\.", lambda m: "fuse."),
    (r"^linear_fuse\.bn\.", lambda m: "bn."),
    (r"^linear_pred\.", lambda m: "classifier."),
]


def _head_key(rest: str, model) -> str | None:
    """A key after `decode_head.` / `auxiliary_head.` -> ours after `head.` / `aux_head.` (None: dropped)."""
    if isinstance(model, SegFormerHeadModel):
        if rest.startswith("conv_seg."):    # mmseg's SegFormerHead builds it but never uses it
            return None
        for pattern, repl in _SEGFORMER_HEAD:
            new = re.sub(pattern, repl, rest, count=1)
            if new != rest:
                return new
        return rest
    return re.sub(r"^conv_seg\.", "classifier.", rest, count=1)


def _backbone_keys(sd: dict, model) -> dict:
    """`backbone.*` of an mmseg file -> ours: neck and level norms by name, the rest through the backbone's
    own filter; pruned parts (its classifier and final norm) dropped."""
    out, rest = {}, {}
    for k, v in sd.items():
        m = re.match(r"^fpn(\d)\.(.*)$", k)
        n = re.match(r"^norm(\d)\.(.*)$", k)
        if m and model.neck is not None:
            out[f"neck.fpn{m[1]}.{m[2]}"] = v
        elif n and model.out_norms is not None:
            out[f"out_norms.{n[1]}.{n[2]}"] = v
        else:
            rest[k] = v
    own_filter = getattr(sys.modules.get(type(model.backbone).__module__), "checkpoint_filter_fn", None)
    if own_filter is not None and rest:
        rest = own_filter(rest, model.backbone)
    own = model.backbone.state_dict()
    for k, v in rest.items():
        if k not in own and k.startswith(("head.", "norm.")):
            continue
        out[f"backbone.{k}"] = v
    return out


def checkpoint_filter_fn(state_dict: dict, model: _BackboneSegmentor) -> dict:
    """Map an mmseg segmentor's state dict (UperNet: `decode_head.psp_modules / bottleneck / lateral_convs /
    fpn_convs / fpn_bottleneck / conv_seg`, `auxiliary_head.convs / conv_seg`; SegFormer's head:
    `decode_head.linear_c* / linear_fuse / linear_pred`) to our names; our own state dicts pass unchanged.
    A file without the auxiliary head leaves ours at its initialisation; a model without one drops it."""
    sd = release_state_dict(state_dict)
    if not any(k.startswith("decode_head.") for k in sd):
        if any(k.startswith(("head.", "backbone.")) for k in sd):
            return sd
        some = ", ".join(sorted(sd)[:4])
        raise does_not_fit(model, f"its keys ({some}, ...) are neither an mmseg segmentor's (backbone., "
                                  f"decode_head., auxiliary_head.) nor ours")
    has_aux = getattr(model, "aux_head", None) is not None
    backbone, out, unmapped = {}, {}, []
    for k, v in sd.items():
        if k.startswith("backbone."):
            backbone[k[len("backbone."):]] = v
        elif k.startswith("decode_head."):
            new = _head_key(k[len("decode_head."):], model)
            if new is not None:
                out[f"head.{new}"] = v
        elif k.startswith("auxiliary_head."):
            if has_aux:
                out[f"aux_head.{_head_key(k[len('auxiliary_head.'):], model)}"] = v
        else:
            unmapped.append(k)
    if unmapped:
        raise does_not_fit(model, f"{len(unmapped)} key(s) outside backbone / decode_head / auxiliary_head: "
                                  f"{unmapped[:4]}")
    out.update(_backbone_keys(backbone, model))
    if has_aux and not any(k.startswith("aux_head.") for k in out):
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("aux_head.")})
    return out


# ---------------------------------------------------------------------------------------------
# Registered models. `upernet` / `segformer_head`: any backbone (backbone=...). The published Swin + UperNet
# ADE20K models: SwinTransformer/Swin-Transformer-Semantic-Segmentation README (mIoU ss / ms+flip, #params,
# FLOPs at 512x2048) and configs/swin/upernet_swin_{tiny,small,base}_patch4_window7_512x512_160k_ade20k.py
# (channels 512, FCN auxiliary head 256 at 0.4, drop_path_rate 0.3, a LayerNorm on each output).

_CFG = dict(classifier=("head.classifier", "aux_head.classifier"), crop_pct=1.0, interpolation="bilinear",
            num_classes=150, first_conv="")
_GENERIC = dict(arxiv="1807.10221", repo="open-mmlab/mmsegmentation", img_size=512, task="segment",
                status="reduced")


@register_model(ModelCard(paper=48, official_name="UPerNet (any backbone)", **_GENERIC,
                          notes="UperNet (Xiao et al. 2018, mmseg's UPerHead + FCNHead auxiliary) on the backbone "
                                "given as backbone=...; no paper number of its own"), reduction=4, **_CFG)
def upernet(backbone=None, **kwargs):
    return UperNet(backbone, **kwargs)


@register_model(ModelCard(paper=2, official_name="SegFormer All-MLP head (any backbone)",
                          **{**_GENERIC, "arxiv": "2105.15203", "repo": "NVlabs/SegFormer"},
                          notes="SegFormer's All-MLP decode head (Xie et al. 2021) on the backbone given as "
                                "backbone=...; no paper number of its own"),
                reduction=4, **{**_CFG, "classifier": "head.classifier"})
def segformer_head(backbone=None, **kwargs):
    return SegFormerHeadModel(backbone, **kwargs)


def _swin_card(size: str, miou: str, ms: str, params: str, flops: int, ours: int) -> ModelCard:
    notes = (f"ADE20K val mIoU {miou} single scale, {ms} multi-scale + flip (512x512 crops, 160k iterations, "
             f"ImageNet-1K init); #params {params}M and {flops} GFLOPs (at 512x2048) from the README of "
             f"SwinTransformer/Swin-Transformer-Semantic-Segmentation; config "
             f"upernet_swin_{size}_patch4_window7_512x512_160k_ade20k.py. params count the 150-class UperNet "
             f"and FCN auxiliary heads, as mmseg does: ours {ours:,}")
    return ModelCard(paper=48, arxiv="2103.14030", repo="SwinTransformer/Swin-Transformer-Semantic-Segmentation",
                     official_name=f"Swin-{size[0].upper()} UperNet", params_m=params, macs_g=float(flops),
                     img_size=512, notes=notes, task="segment")


def _swin_upernet(backbone: str, kwargs) -> UperNet:
    kwargs.setdefault("drop_path_rate", 0.3)
    kwargs.setdefault("out_norm", True)
    return UperNet(backbone, **kwargs)


@register_model(_swin_card("tiny", "44.51", "45.81", "60", 945, 59_941_862), reduction=4, **_CFG)
def upernet_swin_tiny(**kwargs):
    return _swin_upernet("swin_tiny_patch4_window7_224", kwargs)


@register_model(_swin_card("small", "47.64", "49.47", "81", 1038, 81_259_766), reduction=4, **_CFG)
def upernet_swin_small(**kwargs):
    return _swin_upernet("swin_small_patch4_window7_224", kwargs)


@register_model(_swin_card("base", "48.13", "49.72", "121", 1188, 121_279_716), reduction=4, **_CFG)
def upernet_swin_base(**kwargs):
    return _swin_upernet("swin_base_patch4_window7_224", kwargs)
