"""CrossFormer and CrossFormer++ (catalog 19): "CrossFormer: A Versatile Vision Transformer Hinging on
Cross-scale Attention", Wang et al., ICLR 2022, arXiv 2108.00154; CrossFormer++ (TPAMI 2023),
arXiv 2303.06908; code cheerss/CrossFormer.

Every embedding mixes several scales: the stem and each merging layer (CEL) run convolutions of
several kernel sizes with one stride and concatenate them. Attention alternates between adjacent
G x G groups (SDA) and groups of tokens taken every I-th position (LDA), with a position bias that
an MLP computes from relative offsets (DPB), so no table is tied to a size. CrossFormer++ picks
G and I per stage (small groups early, large late), keeps LDA groups at G x G inside G*I regions,
and every third block ends with an activation cooling layer x = LN(DWConv3x3(x)) (no residual).

Sizes. As the official dense-task backbones do, a map that is not a multiple of the group span is
zero-padded at the bottom/right and the padded keys are masked out of attention. v1's LDA keeps I
and its groups grow with the map (its dense code, branch `crossformer`); ++ keeps G and I (current
code). A map no larger than G on a side is one global group, as the current dense code does (v1's
dense code used square groups of the short side instead: that differs only for non-square inputs
under 256 px on a side). The convolutions floor odd sizes, so any input of at least 32 pixels
(patch stride x 2^(stages-1)) works. At 224 the logits are the official ones.
"""
from typing import Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from formers.checkpoint import _adapt_first_conv
from formers.layers.attention import sdpa
from formers.layers.helpers import cached_constant
from formers.layers.drop import DropPath, drop_path_rates
from formers.layers.mlp import Mlp
from formers.layers.windows import (compiling, contiguous_output, crop_hw, relative_position_bias,
                                   relative_position_index)
from formers.registry import ModelCard, register_model

from .base import ChannelsLastPyramid, Stage, init_trunc_normal

__all__ = ["CrossFormer", "checkpoint_filter_fn"]

# Added to the logits of padded keys. exp() of it is exactly 0 in fp32, and unlike -inf it keeps a
# group made only of padding finite (those outputs are dropped), in fp16/bf16 as well.
_MASKED = -1e4


def _split_channels(total: int, n: int) -> list[int]:
    """CEL channel split over n kernels, largest share to the smallest kernel: [C/2, C/4, ..., the
    last two equal], e.g. [C/2, C/4, C/8, C/8] for four kernels and [C/2, C/2] for two."""
    return [total // 2 ** min(i + 1, n - 1) for i in range(n)]


class CrossScaleEmbedding(nn.Module):
    """Cross-scale embedding layer (CEL): parallel convs, kernels `kernel_sizes`, one stride, padding
    (k - stride) / 2 so all sample the same grid; outputs concatenated along channels.

    As the stem it takes an NCHW image and normalises after; as a merging layer (`norm_first`) it
    takes a channels-last map and normalises before. Returns channels-last (B, H/s, W/s, out_chans).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_sizes, stride: int, norm_first: bool = False):
        super().__init__()
        self.norm_first = norm_first
        self.projs = nn.ModuleList(
            nn.Conv2d(in_chans, c, k, stride=stride, padding=(k - stride) // 2)
            for k, c in zip(kernel_sizes, _split_channels(out_chans, len(kernel_sizes))))
        self.norm = nn.LayerNorm(in_chans if norm_first else out_chans)

    def forward(self, x):
        if self.norm_first:
            x = self.norm(x).permute(0, 3, 1, 2)
        x = torch.cat([proj(x) for proj in self.projs], dim=1).permute(0, 2, 3, 1)
        return x if self.norm_first else self.norm(x)


def _offsets_and_index(gh: int, gw: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """((2gh-1)(2gw-1), 2) float offsets (dy, dx), row-major, and the (N, N) index of each token pair
    into them, for a gh x gw group."""
    dy = torch.arange(1 - gh, gh, device=device, dtype=torch.float32)
    dx = torch.arange(1 - gw, gw, device=device, dtype=torch.float32)
    offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape((2 * gh - 1) * (2 * gw - 1), 2)
    return offsets, relative_position_index(gh, gw).to(device)


@cached_constant(maxsize=64)
def _cached_offsets(gh: int, gw: int, device: str):
    """_offsets_and_index, cached: it depends on sizes only."""
    return _offsets_and_index(gh, gw, torch.device(device))


def _relative_offsets(gh: int, gw: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """_offsets_and_index on the device and in the dtype of `like`: from the cache in eager mode, computed
    in the graph under TorchScript, torch.compile and torch.export (the group may have a symbolic size
    there). One torch.fx node."""
    if torch.jit.is_scripting():
        offsets, index = _offsets_and_index(gh, gw, like.device)
    else:
        if compiling():
            offsets, index = _offsets_and_index(gh, gw, like.device)
        else:
            offsets, index = _cached_offsets(gh, gw, str(like.device))
    return offsets.to(like.dtype), index


torch.fx.wrap("_relative_offsets")


class DynamicPosBias(nn.Module):
    """DPB: an MLP from a relative offset (dy, dx) to one bias per head,
    Linear(2, D), then (LN, ReLU, Linear) three times, the last to `num_heads`; no residuals."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.pos_proj = nn.Linear(2, dim)
        self.pos1 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.pos2 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.pos3 = nn.Sequential(nn.LayerNorm(dim), nn.ReLU(), nn.Linear(dim, num_heads))

    def forward(self, gh: int, gw: int):
        """(heads, N, N) bias for a gh x gw group (N = gh * gw)."""
        pair = _relative_offsets(gh, gw, self.pos_proj.weight)  # (offsets, index); indexed: torch.fx traces it
        table = self.pos3(self.pos2(self.pos1(self.pos_proj(pair[0]))))
        return relative_position_bias(table, pair[1])


def group_tokens(x, gh: int, gw: int, ih: int, iw: int):
    """(B, H, W, C) -> (B, nG, gh*gw, C). H is split as (regions, gh, ih): a group holds the gh x gw
    tokens of one region that are (ih, iw) apart. ih = iw = 1: adjacent groups (SDA); ih, iw > 1:
    every I-th token (LDA). H, W must be multiples of gh*ih, gw*iw."""
    b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # indexed: torch.fx traces it
    rh, rw = h // (gh * ih), w // (gw * iw)
    x = x.view(b, rh, gh, ih, rw, gw, iw, c).permute(0, 1, 4, 3, 6, 2, 5, 7)
    return x.reshape(b, rh * rw * ih * iw, gh * gw, c)


def ungroup_tokens(x, gh: int, gw: int, ih: int, iw: int, h: int, w: int):
    """The inverse of group_tokens: (B, nG, gh*gw, C) -> (B, H, W, C)."""
    b, c = x.shape[0], x.shape[3]
    rh, rw = h // (gh * ih), w // (gw * iw)
    x = x.view(b, rh, rw, ih, iw, gh, gw, c).permute(0, 1, 5, 3, 2, 6, 4, 7)
    return x.reshape(b, h, w, c)


def _pad_mask(h: int, w: int, hp: int, wp: int, gh: int, gw: int, ih: int, iw: int,
              device: torch.device, value: float = _MASKED) -> torch.Tensor:
    """(nG, 1, 1, N) additive mask: `value` at the keys that are padding (row >= h or col >= w)."""
    pad = (torch.arange(hp, device=device) >= h)[:, None] | (torch.arange(wp, device=device) >= w)[None, :]
    pad = group_tokens(pad[None, :, :, None], gh, gw, ih, iw)[0, :, :, 0]  # (nG, N)
    return torch.zeros(pad.shape, device=device).masked_fill(pad, value)[:, None, None, :]


@cached_constant(maxsize=64)
def _cached_pad_mask(h: int, w: int, hp: int, wp: int, gh: int, gw: int, ih: int, iw: int, device: str):
    """_pad_mask, cached: it depends on sizes only."""
    return _pad_mask(h, w, hp, wp, gh, gw, ih, iw, torch.device(device))


def _differ(a: int, b: int) -> bool:
    """a != b; under torch.compile / torch.export (sizes symbolic) True unless they are equal for every size,
    so that no guard is added (the padding then is of a possibly-zero amount)."""
    if torch.jit.is_scripting():
        return a != b
    else:
        if compiling():
            return not statically_known_true(a == b)
        return a != b


def _padded_size(n: int, g: int, i: int) -> int:
    """n rounded up to whole regions of g * i tokens. Without a division where that is one region (one
    global group; v1's LDA, whose g is ceil(n / i)), so that torch.export sees no count of 1 to specialise."""
    if not _differ(g * i, n):
        return n
    if not _differ(g, (n + i - 1) // i):
        return g * i
    return (n + g * i - 1) // (g * i) * (g * i)


def _padded_groups(qkv: torch.Tensor, bias: torch.Tensor, gh: int, gw: int, ih: int,
                   iw: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """(B, H, W, 3C) -> its groups (B, nG, N, 3C) after zero-padding the map at the bottom/right to whole
    regions, the (heads, N, N) bias plus the mask of padded keys where there are some ((nG, heads, N, N)),
    and the padded size (hp, wp). The mask is cached in eager mode and computed in the graph under
    TorchScript, torch.compile and torch.export. One torch.fx node: the padding is decided at run time."""
    h, w = qkv.shape[1], qkv.shape[2]
    hp, wp = _padded_size(h, gh, ih), _padded_size(w, gw, iw)
    if _differ(hp, h) or _differ(wp, w):
        qkv = F.pad(qkv, [0, 0, 0, wp - w, 0, hp - h])
        if torch.jit.is_scripting():
            bias = bias + _pad_mask(h, w, hp, wp, gh, gw, ih, iw, qkv.device)
        else:
            if compiling():
                bias = bias + _pad_mask(h, w, hp, wp, gh, gw, ih, iw, qkv.device)
            else:
                bias = bias + _cached_pad_mask(h, w, hp, wp, gh, gw, ih, iw, str(qkv.device))
    return group_tokens(qkv, gh, gw, ih, iw), bias, hp, wp


def _crop(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The top-left (B, h, w, C) of a padded map (see crop_hw); x itself when it is known not to be padded
    (one global group). One torch.fx node."""
    if not (_differ(x.shape[1], h) or _differ(x.shape[2], w)):
        return x
    return crop_hw(x, h, w)


def _attention_layout(bias: torch.Tensor, b: int, ng: int,
                      heads: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The 4-D attention bias and the (batch, heads) grouping of the groups for sdpa (4-D for its CPU flash
    kernel and for ONNX): the groups go into the batch when they share one (heads, N, N) bias, into the
    head axis when a padding mask makes it (nG, heads, N, N). One torch.fx node."""
    n = bias.shape[-1]
    if bias.dim() == 3:
        return bias[None], (b * ng, heads)
    return bias.reshape(1, ng * heads, n, n), (b, ng * heads)


torch.fx.wrap("_padded_groups")
torch.fx.wrap("_crop")
torch.fx.wrap("_attention_layout")


class GroupAttention(nn.Module):
    """Multi-head attention within the groups of a channels-last map, plus the dynamic position bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.pos = DynamicPosBias(dim // 16, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, gh: int, gw: int, ih: int, iw: int):
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        # Project before padding: padded keys are masked and padded queries dropped, so their
        # projections (the official code's qkv bias) never reach a real token.
        groups = _padded_groups(self.qkv(x), self.pos(gh, gw), gh, gw, ih, iw)  # indexed, not unpacked
        ng, n = groups[0].shape[1], groups[0].shape[2]
        heads, d = self.num_heads, c // self.num_heads
        qkv = groups[0].view(b, ng, n, 3, heads, d).permute(3, 0, 1, 4, 2, 5)  # (3, B, nG, heads, N, d)
        layout = _attention_layout(groups[1], b, ng, heads)
        qkv = qkv.reshape(3, layout[1][0], layout[1][1], n, d)
        x = sdpa(qkv[0], qkv[1], qkv[2], layout[0].to(qkv.dtype), self.attn_drop if self.training else 0.0)
        x = contiguous_output(x).view(b, ng, heads, n, d).transpose(2, 3).reshape(b, ng, n, c)
        x = ungroup_tokens(x, gh, gw, ih, iw, groups[2], groups[3])
        return self.proj_drop(self.proj(_crop(x, h, w)))


class ActivationCooling(nn.Module):
    """ACL (CrossFormer++): x = LN(DWConv3x3(x)) on a channels-last map, replacing x (no residual)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class CrossFormerBlock(nn.Module):
    """LN -> SDA or LDA -> residual; LN -> MLP -> residual; optionally ACL. Channels-last."""

    def __init__(self, dim: int, num_heads: int, group_size: int, interval: int, long_distance: bool,
                 lda_regions: bool, cooling: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.group_size = group_size
        self.interval = interval
        self.long_distance = long_distance
        self.lda_regions = lda_regions
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.cooling = ActivationCooling(dim) if cooling else nn.Identity()

    def groups(self, h: int, w: int) -> Tuple[int, int, int, int]:
        """(gh, gw, ih, iw) of the groups for an h x w map (see group_tokens)."""
        return group_layout(h, w, self.group_size, self.interval, self.long_distance, self.lda_regions)

    def forward(self, x):
        layout = _map_groups(x, self.group_size, self.interval, self.long_distance, self.lda_regions)
        x = x + self.drop_path(self.attn(self.norm1(x), layout[0], layout[1], layout[2], layout[3]))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.cooling(x)


def group_layout(h: int, w: int, g: int, i: int, long_distance: bool, lda_regions: bool) -> Tuple[int, int, int, int]:
    """(gh, gw, ih, iw) of the attention groups of an h x w map, for group size g and interval i."""
    if min(h, w) <= g:
        return h, w, 1, 1  # the map fits a group: one group, global attention
    if not long_distance:
        return g, g, 1, 1  # SDA: adjacent G x G tokens
    if lda_regions:
        return g, g, i, i  # LDA, CrossFormer++: G x G tokens I apart, inside G*I x G*I regions
    return (h + i - 1) // i, (w + i - 1) // i, i, i  # LDA, CrossFormer: every I-th token of the map


def _map_groups(x: torch.Tensor, g: int, i: int, long_distance: bool, lda_regions: bool) -> Tuple[int, int, int, int]:
    """group_layout of the (B, H, W, C) map x. One torch.fx node: decided at run time from its size."""
    return group_layout(x.shape[1], x.shape[2], g, i, long_distance, lda_regions)


torch.fx.wrap("_map_groups")


class CrossFormerStage(Stage):
    """Optional CEL merging (stride 2), then blocks alternating SDA (even) and LDA (odd); with
    `use_acl`, every third block but the last ends with activation cooling."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, group_size: int, interval: int,
                 merge_kernels, lda_regions: bool, use_acl: bool, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: list[float]):
        super().__init__()
        self.downsample = (CrossScaleEmbedding(in_dim, dim, merge_kernels, stride=2, norm_first=True)
                           if merge_kernels else nn.Identity())
        self.blocks = nn.ModuleList(
            CrossFormerBlock(dim, num_heads, group_size, interval, long_distance=i % 2 == 1,
                             lda_regions=lda_regions, cooling=use_acl and (i + 1) % 3 == 0 and i < depth - 1,
                             mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop,
                             drop_path=drop_path[i])
            for i in range(depth))


def _per_stage(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"CrossFormer: {what} {value} needs one entry per stage ({n})")
    return values


class CrossFormer(ChannelsLastPyramid):
    """CrossFormer (v1: `lda_regions=False`, no ACL) and CrossFormer++ (`lda_regions=True`,
    `use_acl=True`, per-stage group sizes and intervals); forward_features returns a channels-last
    (B, H, W, C) map, as timm's Swin does."""

    __jit_unused_properties__ = ["feature_stages"]  # TorchScript reads self.stages (see forward_features)

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), patch_kernels=(4, 8, 16, 32), patch_stride: int = 4,
                 merge_kernels=((2, 4), (2, 4), (2, 4)), group_size=7, interval=(8, 4, 2, 1),
                 lda_regions: bool = False, use_acl: bool = False, mlp_ratio=4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 global_pool: str = "avg"):
        super().__init__()
        n = len(depths)
        heads = _per_stage(num_heads, n, "num_heads")
        groups = _per_stage(group_size, n, "group_size")
        intervals = _per_stage(interval, n, "interval")
        ratios = _per_stage(mlp_ratio, n, "mlp_ratio")
        merges = [None] + _per_stage(merge_kernels, n - 1, "merge_kernels")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = self.check_pool(global_pool)
        # Each merging conv floors; the last one needs a map of at least 2.
        self.min_input_size = patch_stride * 2 ** (n - 1)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.num_features = dims[-1]
        self.patch_embed = CrossScaleEmbedding(in_chans, embed_dim, patch_kernels, stride=patch_stride)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList(
            CrossFormerStage(dims[max(i - 1, 0)], dims[i], depths[i], heads[i], groups[i], intervals[i], merges[i],
                             lda_regions, use_acl, ratios[i], qkv_bias, drop_rate, attn_drop_rate, rates[i])
            for i in range(n))
        self.feature_info = [dict(num_chs=d, reduction=patch_stride * 2 ** i, module=f"stages.{i}")
                             for i, d in enumerate(dims)]
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Identity()  # the official head has no dropout
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)

    def stem(self, x):
        return self.pos_drop(self.patch_embed(x))

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:  # not self.feature_stages: TorchScript cannot iterate a property's modules
            x = stage(x)
        return self.norm(x)


_DROPPED = ("attn.biases", "attn.relative_position_index", "attn_mask")


def checkpoint_filter_fn(state_dict: dict, model: CrossFormer) -> dict:
    """Official (cheerss/CrossFormer) keys -> ours; our own keys pass unchanged. timm has no CrossFormer.

    The official code keeps merging at the end of stages 0..n-2 (`layers.i.downsample`), ours at the
    start of stages 1..n-1; it names the merging convs `reductions` and the ACL `ex_conv`/`ex_ln`.
    The v1 release (commit f20000d) saved its DPB offsets and index (`attn.biases`,
    `attn.relative_position_index`) as buffers: they are recomputed here, so dropped. Detection
    checkpoints carry a `backbone.` prefix. The DPB has no size-dependent table, so nothing is
    resized; stem convs of another channel count are adapted (all of them, not only the first).
    """
    if any(k.startswith("stages.") for k in state_dict):
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("backbone."):
            k = k[len("backbone."):]
        if k.endswith(_DROPPED):
            continue
        if k.startswith("layers."):
            parts = k.split(".", 2)
            if len(parts) < 3 or not parts[1].isdigit():
                from formers.checkpoint import does_not_fit
                raise does_not_fit(model, f"{k!r} is neither an official CrossFormer key (layers.<i>.*) nor ours")
            _, i, rest = parts
            i = int(i)
            if rest.startswith("downsample."):
                i += 1
            k = f"stages.{i}.{rest}"
            k = k.replace(".downsample.reductions.", ".downsample.projs.")
            k = k.replace(".ex_conv.", ".cooling.conv.").replace(".ex_ln.", ".cooling.norm.")
        if k.startswith("patch_embed.projs.") and k.endswith(".weight") and v.shape[1] != model.in_chans:
            v = _adapt_first_conv(v, model.in_chans)
        out[k] = v
    return out


def _crossformer(kwargs, **config):
    """The variant's config, overridden by what the caller passed."""
    return CrossFormer(**{**config, **kwargs})


_cfg = dict(first_conv="patch_embed.projs.0", crop_pct=0.875)
_v1 = dict(paper=19, arxiv="2108.00154", repo="cheerss/CrossFormer")
_pp = dict(paper=19, arxiv="2303.06908", repo="cheerss/CrossFormer")
# CrossFormer++: G = [4, 4, 14, 7], I = [4, 2, 1, 1] (configs/crossformer_pp/*.yaml); its detection configs
# pass group_size=7, interval=(8, 4, 2, 1) instead, which these builders accept as keyword arguments.
_pp_arch = dict(group_size=(4, 4, 14, 7), interval=(4, 2, 1, 1), lda_regions=True, use_acl=True)


@register_model(ModelCard(**_v1, official_name="CrossFormer-T", params_m="27.8", macs_g=2.9, top1=81.5), **_cfg)
def crossformer_tiny(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.1)  # the official training configs' rates, here and below
    return _crossformer(kwargs, embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))


@register_model(ModelCard(**_v1, official_name="CrossFormer-S", params_m="30.7", macs_g=4.9, top1=82.5), **_cfg)
def crossformer_small(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.2)
    return _crossformer(kwargs, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))


@register_model(ModelCard(**_v1, official_name="CrossFormer-B", params_m="52.0", macs_g=9.2, top1=83.4), **_cfg)
def crossformer_base(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.3)
    return _crossformer(kwargs, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))


@register_model(ModelCard(**_v1, official_name="CrossFormer-L", params_m="92.0", macs_g=16.1, top1=84.0), **_cfg)
def crossformer_large(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.5)
    return _crossformer(kwargs, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


@register_model(ModelCard(**_pp, official_name="CrossFormer++-S", params_m="23.3", macs_g=4.4, top1=83.2, notes=(
    "the official README prints 4.9G FLOPs, but its official config (23.3M params, matched here) counts 4.39G with "
    "the official model's own flops() and 4.40G here: 4.9 looks like a misprint, so the card holds 4.4")), **_cfg)
def crossformer_pp_small(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.2)
    return _crossformer(kwargs, embed_dim=64, depths=(2, 2, 18, 2), num_heads=(2, 4, 8, 16), **_pp_arch)


@register_model(ModelCard(**_pp, official_name="CrossFormer++-B", params_m="52.0", macs_g=9.5, top1=84.2), **_cfg)
def crossformer_pp_base(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.3)
    return _crossformer(kwargs, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), **_pp_arch)


@register_model(ModelCard(**_pp, official_name="CrossFormer++-L", params_m="92.0", macs_g=16.6, top1=84.7), **_cfg)
def crossformer_pp_large(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.5)
    return _crossformer(kwargs, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), **_pp_arch)


@register_model(ModelCard(**_pp, official_name="CrossFormer++-H", params_m="96.0", macs_g=21.8, top1=84.9), **_cfg)
def crossformer_pp_huge(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.5)
    return _crossformer(kwargs, embed_dim=128, depths=(6, 6, 18, 2), num_heads=(4, 8, 16, 32), **_pp_arch)


@register_model(ModelCard(**_pp, official_name="(none: a reduced CrossFormer++ for the demo and tests)", img_size=32,
                          status="reduced", notes="3 stages, CEL stem kernels 2/4/8 stride 2, width 32, G=4, "
                                                  "I=4/2/1, one ACL: trains on 28-32 px images in minutes"),
                reduction=8, **_cfg)
def crossformer_demo(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.0)
    return _crossformer(kwargs, img_size=32, embed_dim=32, depths=(2, 4, 1), num_heads=(1, 2, 4),
                        patch_kernels=(2, 4, 8), patch_stride=2, merge_kernels=((2, 4), (2, 4)), group_size=4,
                        interval=(4, 2, 1), lda_regions=True, use_acl=True)
