"""SegFormer: the Mix Transformer (MiT) encoder under an All-MLP decoder.

Paper: "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
Xie et al., arXiv 2105.15203. Official code: NVlabs/SegFormer (mmseg/models/backbones/mix_transformer.py,
mmseg/models/decode_heads/segformer_head.py). It is not a catalog paper of its own: it is the encoder
(and the baseline head) of DAFormer (catalog id 2), so the cards name paper 2.

The idea, in three lines:
  a 4-stage pyramid (strides 4/8/16/32) of overlapping strided-conv patch embeddings, with no position
      embedding: a 3x3 depthwise conv inside every feed-forward (Mix-FFN) tells tokens where they are;
  efficient self-attention: keys/values come from the map shrunk sr = 8/4/2/1 times per side by a conv;
  the decoder is only MLPs: each level projected to E channels, upsampled to stride 4, concatenated, fused.

`SegFormer(x)` returns stride-4 logits (B, num_classes, ceil(H/4), ceil(W/4)), as the official head
does; the segmentation task upsamples them to the label size. `forward_features(x)` returns the
encoder's four NCHW maps. Any input of at least `min_input_size` pixels a side works (the convs pad
k//2, so sizes need not be multiples of 32; the reduction convs drop the remainder rows, as the
official code does).
"""
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from formers.checkpoint import does_not_fit, release_state_dict
from formers.layers import DropPath, Linear, check_image_input, drop_path_rates, sdpa
from formers.layers.mlp import DWConvMlp
from formers.models.base import init_conv_fan_out, init_trunc_normal
from formers.registry import ModelCard, register_model

__all__ = ["MixTransformer", "SegFormerHead", "SegFormer", "EfficientSelfAttention", "checkpoint_filter_fn"]


def _init_mit(m: nn.Module):
    """The official init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms,
    normal(0, sqrt(2 / fan_out)) convolutions (fan_out per group)."""
    init_trunc_normal(m)
    init_conv_fan_out(m)


class OverlapPatchEmbed(nn.Module):
    """Conv(k, stride s, padding k//2), then LayerNorm (torch's eps 1e-5, as the official code):
    (B, C_in, H, W) -> channels-last (B, ceil(H/s), ceil(W/s), C)."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class EfficientSelfAttention(nn.Module):
    """Multi-head attention on a channels-last map whose keys/values come from the map reduced
    `sr_ratio` times per side (Conv k=s=sr_ratio, then LayerNorm eps 1e-5); one fused `kv` projection
    (keys first). sr_ratio 1: plain self-attention."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """(B, H, W, C) -> (B, H, W, C)."""
        hw = x.shape[1:3]
        tokens = x.flatten(1, 2)
        q = self.q(tokens).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        if hasattr(self, "sr"):
            kv_in = self.norm(self.sr(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2))
        else:
            kv_in = tokens
        k, v = self.kv(kv_in).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        out = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0)  # (B, heads, H*W, head_dim)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
        return out.unflatten(1, hw)


class Block(nn.Module):
    """Pre-norm block on a channels-last map: x + attn(LN(x)), then x + MixFFN(LN(x)), where Mix-FFN is
    fc1 -> 3x3 depthwise conv -> GELU -> fc2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = DWConvMlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MitStage(nn.Module):
    """Overlapping patch embedding, blocks, LayerNorm: NCHW in, NCHW out (a channels-last view)."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, depth: int, num_heads: int,
                 mlp_ratio: float, sr_ratio: int, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path=(), norm_eps: float = 1e-6):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, kernel_size, stride)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, sr_ratio, qkv_bias, drop, attn_drop, drop_path[j], norm_eps)
            for j in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.patch_embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x).permute(0, 3, 1, 2)


def _min_input_size(kernels, strides, sr_ratios) -> int:
    """The smallest side for which every stage's map is at least as large as its reduction conv."""
    for side in range(1, 4096):
        size, ok = side, True
        for k, s, r in zip(kernels, strides, sr_ratios):
            size = (size + 2 * (k // 2) - k) // s + 1
            ok = ok and size >= max(r, 1)
        if ok:
            return side
    raise ValueError("no input size up to 4096 fits these strides and reduction ratios")


class MixTransformer(nn.Module):
    """The MiT encoder: four MitStages; `forward_features(x)` (= `forward`) returns their four
    normalised NCHW maps, strides 4/8/16/32 (ceil division for other sizes).

    LayerNorm eps: 1e-5 (torch's default) in the patch embeddings and the key/value reduction, `norm_eps`
    (1e-6) in the blocks and the per-stage norms, as in the official code.
    """

    def __init__(self, in_chans: int = 3, embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2),
                 num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1),
                 patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2), qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, norm_eps: float = 1e-6):
        super().__init__()
        n = len(depths)
        if not all(len(v) == n for v in (embed_dims, num_heads, mlp_ratios, sr_ratios, patch_sizes, strides)):
            raise ValueError("embed_dims, depths, num_heads, mlp_ratios, sr_ratios, patch_sizes and strides "
                             "need one entry per stage")
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.min_input_size = _min_input_size(patch_sizes, strides, sr_ratios)
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList()
        self.feature_info = []
        reduction, prev = 1, in_chans
        for i in range(n):
            reduction *= strides[i]
            self.stages.append(MitStage(prev, embed_dims[i], patch_sizes[i], strides[i], depths[i], num_heads[i],
                                        mlp_ratios[i], sr_ratios[i], qkv_bias, drop_rate, attn_drop_rate, dpr[i],
                                        norm_eps))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            prev = embed_dims[i]
        self.apply(_init_mit)

    def check_input(self, x, model=None):
        return check_image_input(model if model is not None else self, x, min_size=self.min_input_size)

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def run_stages(self, x) -> list[torch.Tensor]:
        """The four maps, without the input check (for models built on this encoder)."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x) -> list[torch.Tensor]:
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.run_stages(x)

    def forward(self, x) -> list[torch.Tensor]:
        return self.forward_features(x)


class SegFormerHead(nn.Module):
    """The All-MLP decoder: per level Linear(C_i -> E), bilinear upsampling (align_corners=False) to the
    first level's size, concatenation in the order c4, c3, c2, c1, 1x1 conv (4E -> E, no bias) + BatchNorm
    + ReLU, Dropout2d, 1x1 conv (E -> num_classes; none for num_classes 0).

    Computed in another order with the same parameters: the fuse conv's block for level i times that
    level's Linear is one (E, C_i) map, applied at the level's own resolution before upsampling, and the
    upsampled maps are summed instead of concatenated. Upsampling is linear with weights that sum to one
    at every pixel, so this is the same function (up to float rounding) and the same gradients; it skips
    the 4E-channel concatenation at stride 4 and the 4E -> E conv over it (half of B0's FLOPs at 512 px).
    """

    def __init__(self, in_channels, embed_dim: int = 256, num_classes: int = 150, dropout: float = 0.1):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.linear_c = nn.ModuleList([Linear(c, embed_dim) for c in in_channels])
        self.fuse = nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(embed_dim)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout)  # mmseg's BaseDecodeHead drops whole channels
        self.classifier = self.make_classifier(num_classes)

    def make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Conv2d(self.embed_dim, num_classes, 1) if num_classes > 0 else nn.Identity()

    def forward(self, feats):
        size = feats[0].shape[2:]
        e, n = self.embed_dim, len(feats)
        fuse = self.fuse.weight.view(e, n * e)
        x = None
        for j, i in enumerate(range(n - 1, -1, -1)):      # the concatenation's order: c4, c3, c2, c1
            block = fuse[:, j * e:(j + 1) * e]
            lin = self.linear_c[i]
            w, b = block @ lin.weight, block @ lin.bias
            y = F.conv2d(feats[i], w[:, :, None, None].to(feats[i].dtype), b.to(feats[i].dtype))
            if i > 0:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            x = y if x is None else x + y
        x = self.act(self.bn(x))
        return self.classifier(self.dropout(x))


class SegFormer(nn.Module):
    """MiT encoder + All-MLP head: (B, C, H, W) -> logits (B, num_classes, ceil(H/4), ceil(W/4))."""

    output_stride = 4
    input_divisor = 1   # any size: the convs pad k//2 (outputs are ceil(H/4) x ceil(W/4))

    def __init__(self, num_classes: int = 150, in_chans: int = 3, img_size=512, embed_dims=(32, 64, 160, 256),
                 depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8), mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1),
                 decoder_dim: int = 256, qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, head_dropout: float = 0.1, norm_eps: float = 1e-6):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.encoder = MixTransformer(in_chans, embed_dims, depths, num_heads, mlp_ratios, sr_ratios,
                                      qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                      drop_path_rate=drop_path_rate, norm_eps=norm_eps)
        self.min_input_size = self.encoder.min_input_size
        self.feature_info = [dict(d, module=f"encoder.{d['module']}") for d in self.encoder.feature_info]
        self.num_features = decoder_dim
        self.head = self.make_head(tuple(embed_dims), decoder_dim, num_classes, head_dropout)

    def make_head(self, in_channels, decoder_dim: int, num_classes: int, dropout: float) -> nn.Module:
        """The decode head over the encoder's four maps (a model built on this encoder overrides it); it
        has `classifier`, `num_classes` and `make_classifier(num_classes)`."""
        head = SegFormerHead(in_channels, decoder_dim, num_classes, dropout)
        nn.init.kaiming_normal_(head.fuse.weight, mode="fan_out", nonlinearity="relu")  # mmcv ConvModule's
        return head

    def check_input(self, x):
        return check_image_input(self, x, min_size=self.min_input_size)

    def get_classifier(self) -> nn.Module:
        return self.head.classifier

    def reset_classifier(self, num_classes: int):
        """A fresh final 1x1 conv for `num_classes` (0: none; forward returns the fused E-channel map),
        on the model's device and dtype."""
        ref = next(self.head.parameters())
        with torch.device(ref.device):
            classifier = self.head.make_classifier(num_classes)
        self.head.classifier = classifier.to(dtype=ref.dtype).train(self.training)
        self.head.num_classes = self.num_classes = num_classes

    def no_weight_decay(self) -> set[str]:
        # the official recipe: decay_mult 0 for every parameter whose name holds 'norm'
        return {n for n, _ in self.named_parameters() if "norm" in n}

    def set_grad_checkpointing(self, enable: bool = True):
        self.encoder.set_grad_checkpointing(enable)

    def forward_features(self, x) -> list[torch.Tensor]:
        """The encoder's four NCHW maps (strides 4, 8, 16, 32)."""
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.encoder.run_stages(x)

    def forward_head(self, feats) -> torch.Tensor:
        return self.head(feats)

    def forward(self, x) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Checkpoints: official (mmseg segmentation files and ImageNet mit_b*.pth), HF transformers (4.x hub
# names and 5.x names), and ours.

_OFFICIAL = [  # NVlabs/SegFormer, after the `backbone.` prefix is removed
    (r"^patch_embed(\d)\.(proj|norm)\.", lambda m: f"encoder.stages.{int(m[1]) - 1}.patch_embed.{m[2]}."),
    (r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", lambda m: f"encoder.stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"encoder.stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"encoder.stages.{int(m[1]) - 1}.norm."),
    (r"^decode_head\.linear_c(\d)\.proj\.", lambda m: f"head.linear_c.{int(m[1]) - 1}."),
    (r"^decode_head\.linear_fuse\.conv\.", lambda m: "head.fuse."),
    (r"^decode_head\.linear_fuse\.bn\.", lambda m: "head.bn."),
    (r"^decode_head\.linear_pred\.", lambda m: "head.classifier."),
]
_OFFICIAL_DROPPED = (r"^decode_head\.conv_seg\.", r"^head\.")  # mmseg's unused conv_seg; the ImageNet classifier

# HF transformers 4.x (the names of the files on the hub) -> 5.x, as transformers' own conversion mapping
_HF4_TO_HF5 = [
    (r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"attention\.self\.query\.", "attention.q_proj."),
    (r"attention\.self\.key\.", "attention.k_proj."),
    (r"attention\.self\.value\.", "attention.v_proj."),
    (r"attention\.self\.sr\.", "attention.sequence_reduction.sequence_reduction."),
    (r"attention\.self\.layer_norm\.", "attention.sequence_reduction.layer_norm."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"mlp\.dense1\.", "mlp.fc1."),
    (r"mlp\.dense2\.", "mlp.fc2."),
    (r"layer_norm_1\.", "layernorm_before."),
    (r"layer_norm_2\.", "layernorm_after."),
    (r"^decode_head\.linear_c\.", "decode_head.linear_projections."),
]

_HF5 = [  # HF transformers 5.x, after the `segformer.` prefix is removed
    (r"^stages\.(\d+)\.patch_embeddings\.proj\.", r"encoder.stages.\1.patch_embed.proj."),
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.", r"encoder.stages.\1.patch_embed.norm."),
    (r"^stages\.(\d+)\.layer_norm\.", r"encoder.stages.\1.norm."),
    (r"^stages\.(\d+)\.blocks\.", r"encoder.stages.\1.blocks."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.attention\.q_proj\.", ".attn.q."),
    (r"\.attention\.o_proj\.", ".attn.proj."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.norm."),
    (r"\.attention\.([kv])_proj\.", r".attn.\1_proj."),  # fused into attn.kv below
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    (r"^decode_head\.linear_projections\.(\d+)\.proj\.", r"head.linear_c.\1."),
    (r"^decode_head\.linear_fuse\.", "head.fuse."),
    (r"^decode_head\.batch_norm\.", "head.bn."),
    (r"^decode_head\.classifier\.", "head.classifier."),
]
_HF_DROPPED = (r"^classifier\.",)  # SegformerForImageClassification's head


def _layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith("encoder.stages.") for k in keys):
        return "ours"
    if any(re.match(r"^(backbone\.)?(patch_embed\d|block\d)\.", k) for k in keys):
        return "official"
    if any(re.match(r"^(segformer\.)?(stages\.\d+\.(patch_embeddings|blocks)|encoder\.(block|patch_embeddings))\.", k)
           for k in keys):
        return "hf"
    return "unknown"


def _rename(k: str, rules, full: bool = False):
    """Apply the first matching rule (or, with full, every rule in turn); None when none matched."""
    matched = False
    for pattern, repl in rules:
        new = re.sub(pattern, repl, k, count=1)
        if new != k:
            k, matched = new, True
            if not full:
                break
    return k if matched else None


def map_official_keys(sd: dict, head_rules=()) -> tuple[dict, list]:
    """Official (NVlabs / mmseg) keys -> ours: the encoder's, and the decode head's by `head_rules` first
    (a model with another head, e.g. DAFormer), else SegFormer's. Returns (mapped, unmapped keys)."""
    out, unmapped = {}, []
    for k, v in sd.items():
        k = k[len("backbone."):] if k.startswith("backbone.") else k
        new = _rename(k, head_rules) if head_rules else None
        if new is None:
            if any(re.match(p, k) for p in _OFFICIAL_DROPPED):
                continue
            new = _rename(k, _OFFICIAL)
        if new is None:
            unmapped.append(k)
        else:
            out[new] = v
    return out, unmapped


def checkpoint_filter_fn(state_dict: dict, model: SegFormer) -> dict:
    """Map a SegFormer / MiT checkpoint to our key names.

    Takes: the official mmseg segmentation files (`backbone.` + `decode_head.`; the unused
    `decode_head.conv_seg` is dropped), the official ImageNet `mit_b*.pth` encoder files (their
    classifier `head.*` dropped), HF transformers SegformerForSemanticSegmentation / SegformerModel state
    dicts in 5.x names (`segformer.stages...`; split k_proj / v_proj fused into our `kv`, keys first) or in
    the 4.x names of the hub files (`segformer.encoder.block...`), and our own. An encoder-only file
    leaves the decode head at its initialisation (with a warning).
    """
    sd = release_state_dict(state_dict)
    layout = _layout(sd)
    if layout == "unknown":
        some = ", ".join(sorted(sd)[:4])
        raise does_not_fit(model, f"its keys ({some}, ...) are not those of a SegFormer / MiT checkpoint "
                                  f"(official NVlabs/mmseg, HF transformers or formers)")
    if layout == "ours":
        return sd
    out, unmapped = {}, []
    if layout == "official":
        out, unmapped = map_official_keys(sd)
    else:
        kv = {}
        for k, v in sd.items():
            k = k[len("segformer."):] if k.startswith("segformer.") else k
            if any(re.match(p, k) for p in _HF_DROPPED):
                continue
            k = _rename(k, _HF4_TO_HF5, full=True) or k
            new = _rename(k, _HF5, full=True)
            if new is None:
                unmapped.append(k)
            elif ".attn.k_proj." in new or ".attn.v_proj." in new:
                kv[new] = v
            else:
                out[new] = v
        for k in [k for k in kv if ".attn.k_proj." in k]:
            v_key = k.replace(".attn.k_proj.", ".attn.v_proj.")
            if v_key not in kv:
                raise does_not_fit(model, f"{k} has no matching value projection {v_key}")
            out[k.replace(".attn.k_proj.", ".attn.kv.")] = torch.cat([kv.pop(k), kv.pop(v_key)], dim=0)
        if kv:
            raise does_not_fit(model, f"value projections without key projections: {sorted(kv)[:3]}")
    if unmapped:
        raise does_not_fit(model, f"{len(unmapped)} key(s) of this {layout} SegFormer checkpoint have no "
                                  f"counterpart here: {unmapped[:4]}")
    if not any(k.startswith("head.") for k in out):
        warnings.warn(f"{getattr(model, 'model_name', type(model).__name__)}: the checkpoint holds an encoder "
                      f"only; the decode head is left at its initialisation")
        out.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    return out


# ---------------------------------------------------------------------------------------------
# Variants: MiT-B0..B5 (official mit_b0..mit_b5) with the ADE20K decoder (150 classes, 512x512; B5 640x640).
# params_m: the paper's table (encoder + head); macs_g: the GFLOPs the paper prints (512x512; B5 640x640),
# which are multiply-accumulates: counted in the paper's order of operations they are 8.39 (B0), 62.34 (B2),
# 183.14 (B5 at 640); formers.count_flops of our head's order gives 4.13, 24.29 and 123.35.

_CFG = dict(first_conv="encoder.stages.0.patch_embed.proj", classifier="head.classifier", crop_pct=1.0,
            interpolation="bilinear", num_classes=150)
_NOTES = ("paper ADE20K mIoU {miou} (single scale, {size}); mmseg re-implementation: ADE20K {mmseg_ade} ss, "
          "Cityscapes 1024x1024 {mmseg_city} ss. params include the 150-class head; encoder alone {enc:,}. "
          "FLOPs are the paper's at {size} (our count of the paper's order of operations: {ours} G; "
          "SegFormerHead computes the same function with fewer, see its docstring)")


def _card(k: int, params: str, macs: float, miou: float, mmseg_ade: str, mmseg_city: float, enc: int,
          ours: str, img_size: int = 512) -> ModelCard:
    notes = _NOTES.format(miou=miou, size=f"{img_size}x{img_size}", mmseg_ade=mmseg_ade, mmseg_city=mmseg_city,
                          enc=enc, ours=ours)
    return ModelCard(paper=2, arxiv="2105.15203", repo="NVlabs/SegFormer", official_name=f"SegFormer-B{k} (mit_b{k})",
                     params_m=params, macs_g=macs, img_size=img_size, notes=notes, task="segment")


_SMALL = dict(embed_dims=(32, 64, 160, 256), decoder_dim=256)
_WIDE = dict(embed_dims=(64, 128, 320, 512))


def _segformer(kwargs, **config) -> SegFormer:
    return SegFormer(**{**config, **kwargs})


_DEPTHS = {0: (2, 2, 2, 2), 1: (2, 2, 2, 2), 2: (3, 4, 6, 3), 3: (3, 4, 18, 3), 4: (3, 8, 27, 3), 5: (3, 6, 40, 3)}
# HF's SegFormer uses torch's LayerNorm eps (1e-5) everywhere: with it ours computes HF's function
HF_COMPAT_KWARGS = {f"segformer_b{k}": {"norm_eps": 1e-5} for k in _DEPTHS}


def hf_peer(name: str, num_classes: int, **kwargs):
    """HF transformers' SegformerForSemanticSegmentation of variant `name` (for `formers bench --peer hf`),
    randomly initialised; its weights load into ours through checkpoint_filter_fn."""
    import transformers
    k = int(name.rsplit("b", 1)[1])
    dims = _SMALL["embed_dims"] if k == 0 else _WIDE["embed_dims"]
    config = transformers.SegformerConfig(num_labels=num_classes, hidden_sizes=list(dims), depths=list(_DEPTHS[k]),
                                          num_attention_heads=[1, 2, 5, 8], sr_ratios=[8, 4, 2, 1],
                                          mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=256 if k < 2 else 768,
                                          **kwargs)
    return transformers.SegformerForSemanticSegmentation(config)


@register_model(_card(0, "3.8", 8.4, 37.4, "37.41", 76.54, 3_319_392, "8.39"), **_CFG)
def segformer_b0(**kwargs):
    return _segformer(kwargs, **_SMALL, depths=(2, 2, 2, 2))


@register_model(_card(1, "13.7", 15.9, 42.2, "40.97", 78.56, 13_151_424, "not measured"), **_CFG)
def segformer_b1(**kwargs):
    return _segformer(kwargs, **_WIDE, decoder_dim=256, depths=(2, 2, 2, 2))


@register_model(_card(2, "27.5", 62.4, 46.5, "45.58", 81.08, 24_196_288, "62.34"), **_CFG)
def segformer_b2(**kwargs):
    return _segformer(kwargs, **_WIDE, decoder_dim=768, depths=(3, 4, 6, 3))


@register_model(_card(3, "47.3", 79.0, 49.4, "47.82", 81.94, 44_072_128, "not measured"), **_CFG)
def segformer_b3(**kwargs):
    return _segformer(kwargs, **_WIDE, decoder_dim=768, depths=(3, 4, 18, 3))


@register_model(_card(4, "64.1", 95.7, 50.3, "48.46", 81.89, 60_842_688, "not measured"), **_CFG)
def segformer_b4(**kwargs):
    return _segformer(kwargs, **_WIDE, decoder_dim=768, depths=(3, 8, 27, 3))


@register_model(_card(5, "84.7", 183.3, 51.0, "49.13 (640x640: 49.62)", 82.25, 81_443_008, "183.14", img_size=640), **_CFG)
def segformer_b5(**kwargs):
    kwargs.setdefault("img_size", 640)
    return _segformer(kwargs, **_WIDE, decoder_dim=768, depths=(3, 6, 40, 3))
