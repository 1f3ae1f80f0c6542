"""CSWin Transformer (catalog 25): "CSWin Transformer: A General Vision Transformer Backbone with
Cross-Shaped Windows", Dong et al., CVPR 2022, arXiv 2107.00652; code microsoft/CSWin-Transformer.

Each block splits its heads in two: half attend within vertical stripes (full height, width sw),
half within horizontal stripes (height sw, full width), so together a token sees a cross-shaped
window; a 3x3 depthwise conv on V (LePE) adds position. Stripes widen as the map shrinks; the
last stage attends globally. Conv stems/merges (7x7 s4, then 3x3 s2) build a 4-stage pyramid.

Sizes. The official classifier is built for one resolution (img_size // 4); its segmentation
backbone takes any size by zero-padding each branch's map symmetrically to a multiple of the
stripe width. We pad the same way (same stripe placement, so the same windows), and by default
also mask the padded keys out of attention (`pad_mask=True`), so real tokens never attend to
padding; `pad_mask=False` reproduces the official segmentation backbone exactly. At the paper's
resolutions nothing is padded and the logits are the official ones.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.layers.attention import sdpa
from formers.layers.helpers import cached_constant
from formers.layers.drop import DropPath, drop_path_rates
from formers.layers.mlp import Mlp
from formers.layers.patch_embed import PatchEmbed
from formers.registry import ModelCard, register_model

from .base import ChannelsLastPyramid, Stage, init_trunc_normal

__all__ = ["CSWinTransformer", "checkpoint_filter_fn"]


@cached_constant(maxsize=128)
def _real_key_mask(hp: int, wp: int, wh: int, ww: int, top: int, left: int, h: int, w: int, device: str):
    """(1, nW, 1, 1, wh*ww) bool, True at the real tokens of each window of a padded (hp, wp) map
    whose real (h, w) part starts at (top, left)."""
    dev = torch.device(device)
    rows = torch.arange(hp, device=dev)
    cols = torch.arange(wp, device=dev)
    real = ((rows >= top) & (rows < top + h))[:, None] & ((cols >= left) & (cols < left + w))[None, :]
    real = real.view(hp // wh, wh, wp // ww, ww).transpose(1, 2)
    return real.reshape(1, -1, 1, 1, wh * ww)


def stripe_attention(qkv, heads: int, window: tuple[int | None, int | None], lepe: nn.Module,
                     pad_mask: bool = True, dropout: float = 0.0):
    """Attention within (wh, ww) windows of a map, plus LePE; None in `window` means the whole side.

    qkv: (B, H, W, 3, C) channels-last. A side that is not a multiple of its window is zero-padded
    symmetrically (the extra row/column at the bottom/right); `pad_mask` keeps padded keys out of
    attention. Returns (B, H, W, C).
    """
    b, h, w, _, c = qkv.shape
    wh, ww = window[0] or h, window[1] or w
    ph, pw = -h % wh, -w % ww
    top, left = ph // 2, pw // 2
    if ph or pw:
        qkv = F.pad(qkv, (0, 0, 0, 0, left, pw - left, top, ph - top))
    hp, wp = h + ph, w + pw
    nh, nw = hp // wh, wp // ww
    d = c // heads
    # (B, hp, wp, 3, C) -> 3 x (B * windows, heads, tokens per window, d); 4-D so SDPA takes a fused kernel
    qkv = qkv.view(b, nh, wh, nw, ww, 3, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = qkv.reshape(3, b * nh * nw, heads, wh * ww, d).unbind(0)

    # LePE: a depthwise conv on V, each window seen as its own small image (zeros beyond its border)
    v_img = v.view(-1, heads, wh, ww, d).permute(0, 1, 4, 2, 3).reshape(-1, c, wh, ww)
    pos = lepe(v_img).view(-1, heads, d, wh * ww).transpose(-1, -2)

    mask = None
    if pad_mask and (ph or pw):
        mask = _real_key_mask(hp, wp, wh, ww, top, left, h, w, str(qkv.device))
        mask = mask.expand(b, -1, -1, -1, -1).reshape(b * nh * nw, 1, 1, wh * ww)
    x = sdpa(q, k, v, mask, dropout) + pos  # (B * nW, heads, N, d)
    x = x.view(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, c)
    return x[:, top:top + h, left:left + w] if (ph or pw) else x


class CrossShapedAttention(nn.Module):
    """One qkv projection; half the channels (and heads) attend in vertical stripes, half in
    horizontal ones (or all globally when `full`); each branch has its own LePE conv; then proj."""

    def __init__(self, dim: int, num_heads: int, stripe_width: int, full: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, pad_mask: bool = True):
        super().__init__()
        branches = 1 if full else 2
        if dim % (branches * num_heads) or num_heads % branches:
            raise ValueError(f"CSWin: dim {dim} and {num_heads} heads cannot split into {branches} branch(es)")
        self.dim = dim
        self.heads = num_heads // branches  # per branch
        # (height, width) of the windows of each branch; None = the whole side of the map
        self.windows = [(None, None)] if full else [(None, stripe_width), (stripe_width, None)]
        self.branch_dim = dim // branches
        self.pad_mask = pad_mask
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.ModuleList(nn.Conv2d(self.branch_dim, self.branch_dim, 3, padding=1, groups=self.branch_dim)
                                  for _ in self.windows)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, h, w, c = x.shape
        qkv = self.qkv(x).view(b, h, w, 3, c)
        dropout = self.attn_drop if self.training else 0.0
        parts = qkv.split(self.branch_dim, dim=-1)  # branch i takes the i-th slice of each of q, k, v
        x = torch.cat([stripe_attention(p, self.heads, win, lepe, self.pad_mask, dropout)
                       for p, win, lepe in zip(parts, self.windows, self.lepe)], dim=-1)
        return self.proj_drop(self.proj(x))


class CSWinBlock(nn.Module):
    """LN -> cross-shaped window attention -> residual; LN -> MLP -> residual. Channels-last."""

    def __init__(self, dim: int, num_heads: int, stripe_width: int, full: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 pad_mask: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossShapedAttention(dim, num_heads, stripe_width, full, qkv_bias, attn_drop, drop, pad_mask)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nn.Module):
    """Conv 3x3 stride 2 (halves the map, rounding up) then LN, on a channels-last map."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class CSWinStage(Stage):
    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, stripe_width: int, full: bool,
                 downsample: bool, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: list[float], pad_mask: bool):
        super().__init__()
        self.downsample = MergeBlock(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            CSWinBlock(out_dim, num_heads, stripe_width, full, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i],
                       pad_mask)
            for i in range(depth))


class CSWinTransformer(ChannelsLastPyramid):
    """CSWin Transformer; forward_features returns a channels-last (B, H, W, C) map, as timm's Swin.

    `split_size[i]` is the stripe width of stage i; the last stage attends over the whole map.
    Any input of at least 3x3 works (see the module docstring for how stripes are padded).
    The official classifier also makes any stage whose map (at its build size) equals the stripe
    width a one-branch global stage; at the paper's configs that is only the last stage, so here,
    as in the official segmentation backbone, the branch layout never depends on the image size.
    """

    min_input_size = 3  # the 7x7 stride-4 stem (padding 2) needs 3 pixels a side; anything larger works

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 64,
                 depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7), mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, pad_mask: bool = True, global_pool: str = "avg"):
        super().__init__()
        if not len(depths) == len(num_heads) == len(split_size):
            raise ValueError(f"CSWinTransformer: depths {depths}, num_heads {num_heads} and split_size "
                             f"{split_size} differ in length")
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = self.check_pool(global_pool)
        n = len(depths)
        dims = [embed_dim * 2 ** i for i in range(n)]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(4, in_chans, embed_dim, norm_layer=nn.LayerNorm, kernel_size=7, padding=2)
        rates = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.ModuleList(
            CSWinStage(dims[max(i - 1, 0)], dims[i], depths[i], num_heads[i], split_size[i], full=i == n - 1,
                       downsample=i > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                       attn_drop=attn_drop_rate, drop_path=rates[i], pad_mask=pad_mask)
            for i in range(n))
        self.feature_info = [dict(num_chs=d, reduction=4 * 2 ** i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_trunc_normal)


def checkpoint_filter_fn(state_dict: dict, model: CSWinTransformer) -> dict:
    """Official (microsoft/CSWin-Transformer `models/cswin.py`) keys -> ours; ours pass unchanged.

    The official model names its parts `stage1_conv_embed.{0,2}` (stem conv, LN), `stage{s}.{j}`
    (blocks, with `qkv`/`proj` on the block and the LePE convs at `attns.{b}.get_v`) and
    `merge{s}` (the merge before stage s+1). It saves no buffers; CSWin has no position tables
    to resize. timm has no CSWin.
    """
    if "stage1_conv_embed.0.weight" not in state_dict:
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        name = k
        try:
            head, _, rest = k.partition(".")
            if head == "stage1_conv_embed":
                idx, _, leaf = rest.partition(".")
                k = {"0": "patch_embed.proj.", "2": "patch_embed.norm."}[idx] + leaf
            elif head.startswith("stage"):
                s = int(head[len("stage"):]) - 1
                j, _, leaf = rest.partition(".")
                if leaf.startswith(("qkv.", "proj.")):
                    leaf = "attn." + leaf
                elif leaf.startswith("attns."):
                    b, leaf = leaf[len("attns."):].split(".get_v.")
                    leaf = f"attn.lepe.{b}.{leaf}"
                k = f"stages.{s}.blocks.{j}.{leaf}"
            elif head.startswith("merge"):
                s = int(head[len("merge"):])
                k = f"stages.{s}.downsample.{rest}"
        except (KeyError, ValueError):
            from formers.checkpoint import does_not_fit
            raise does_not_fit(model, f"{name!r} is neither an official CSWin key nor ours") from None
        out[k] = v
    return out


def _cswin(kwargs, **config):
    """The variant's config, overridden by what the caller passed."""
    return CSWinTransformer(**{**config, **kwargs})


_paper = dict(paper=25, arxiv="2107.00652", repo="microsoft/CSWin-Transformer")
_in22k = "ImageNet-22K pre-trained, fine-tuned on ImageNet-1K"
# CSWin-L costs 5.2% (384: 5.3%) more MACs than the paper prints: the official model, counted with
# torch's flop counter, gives exactly our count (and its params match the paper), so the gap is the
# paper's. Its FLOPs stay in the notes rather than in macs_g, where the 5% check would fail.
_large_macs = "Paper: {paper}G FLOPs; the official code costs {code} GMACs (+{pct}%), so macs_g is left empty"
_T = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16))
_S = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16))
_B = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32))
_L = dict(embed_dim=144, depths=(2, 4, 32, 2), num_heads=(6, 12, 24, 24))  # last stage: 24 heads, not 48
_224 = dict(split_size=(1, 2, 7, 7))
_384 = dict(img_size=384, split_size=(1, 2, 12, 12))


# drop_path_rate defaults: the official training / fine-tuning commands (README)
@register_model(ModelCard(**_paper, official_name="CSWin-T (CSWin_64_12211_tiny_224)", params_m="23", macs_g=4.3,
                          top1=82.8))
def cswin_64_12211_tiny_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.2)
    return _cswin(kwargs, **_T, **_224)


@register_model(ModelCard(**_paper, official_name="CSWin-S (CSWin_64_24322_small_224)", params_m="35", macs_g=6.9,
                          top1=83.6))
def cswin_64_24322_small_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.4)
    return _cswin(kwargs, **_S, **_224)


@register_model(ModelCard(**_paper, official_name="CSWin-B (CSWin_96_24322_base_224)", params_m="78", macs_g=15.0,
                          top1=84.2))
def cswin_96_24322_base_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.5)
    return _cswin(kwargs, **_B, **_224)


@register_model(ModelCard(**_paper, official_name="CSWin-B 384 (CSWin_96_24322_base_384)", params_m="78",
                          macs_g=47.0, img_size=384, top1=85.5), crop_pct=1.0)
def cswin_96_24322_base_384(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.7)
    return _cswin(kwargs, **_B, **_384)


@register_model(ModelCard(**_paper, official_name="CSWin-L (CSWin_144_24322_large_224)", params_m="173",
                          top1=86.5, notes=f"{_in22k}. {_large_macs.format(paper=31.5, code=33.13, pct=5.2)}"))
def cswin_144_24322_large_224(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.2)
    return _cswin(kwargs, **_L, **_224)


@register_model(ModelCard(**_paper, official_name="CSWin-L 384 (CSWin_144_24322_large_384)", params_m="173",
                          img_size=384, top1=87.5,
                          notes=f"{_in22k}. {_large_macs.format(paper=96.8, code=101.88, pct=5.3)}"), crop_pct=1.0)
def cswin_144_24322_large_384(**kwargs):
    kwargs.setdefault("drop_path_rate", 0.2)  # not given for L@384: as L@224
    return _cswin(kwargs, **_L, **_384)


@register_model(ModelCard(**_paper, official_name="(none: a reduced CSWin for the demo and tests)", img_size=32,
                          status="reduced", notes="3 stages, width 24, stripes 1/2 then global: trains in minutes"),
                reduction=16)
def cswin_demo(**kwargs):
    return _cswin(kwargs, img_size=32, embed_dim=24, depths=(1, 2, 2), num_heads=(2, 4, 8), split_size=(1, 2, 2))
