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
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from formers.layers.attention import sdpa
from formers.layers.helpers import cached_constant
from formers.layers.drop import DropPath, drop_path_rates
from formers.layers.mlp import Mlp
from formers.layers.patch_embed import PatchEmbed
from formers.layers.windows import compiling
from formers.registry import ModelCard, register_model

from .base import ChannelsLastPyramid, Stage, init_trunc_normal

__all__ = ["CrossShapedAttention", "CSWinTransformer", "checkpoint_filter_fn"]


def _real_keys(nh: int, nw: int, wh: int, ww: int, top: int, left: int, h: int, w: int,
               device: torch.device) -> torch.Tensor:
    """(nW, wh*ww) bool, True at the real tokens of each window of a map padded to (nh, nw) windows of
    (wh, ww), whose real (h, w) part starts at (top, left)."""
    rows = torch.arange(nh * wh, device=device)
    cols = torch.arange(nw * ww, device=device)
    real = ((rows >= top) & (rows < top + h))[:, None] & ((cols >= left) & (cols < left + w))[None, :]
    return real.view(nh, wh, nw, ww).transpose(1, 2).reshape(nh * nw, wh * ww)


@cached_constant(maxsize=128)
def _cached_real_keys(nh: int, nw: int, wh: int, ww: int, top: int, left: int, h: int, w: int, device: str):
    """_real_keys, cached: it depends on sizes only."""
    return _real_keys(nh, nw, wh, ww, top, left, h, w, torch.device(device))


def _real_key_mask(nh: int, nw: int, wh: int, ww: int, top: int, left: int, h: int, w: int,
                   device: torch.device) -> torch.Tensor:
    """_real_keys from the cache in eager mode; computed in the graph under TorchScript, torch.compile and
    torch.export (sizes there may be symbolic, and a cache would bake one size in)."""
    if torch.jit.is_scripting():
        return _real_keys(nh, nw, wh, ww, top, left, h, w, device)
    else:
        if compiling():
            return _real_keys(nh, nw, wh, ww, top, left, h, w, device)
        return _cached_real_keys(nh, nw, wh, ww, top, left, h, w, str(device))


def _needs_padding(ph: int, pw: int) -> bool:
    """Whether a pad by (ph, pw) does anything. Under torch.compile / torch.export, where the amounts may
    be symbolic, only an amount known to be 0 for every size counts as none (a whole-side window)."""
    if torch.jit.is_scripting():
        return ph != 0 or pw != 0
    else:
        if compiling():
            return not (statically_known_true(ph == 0) and statically_known_true(pw == 0))
        return ph != 0 or pw != 0


def _stripes(n: int, width: int) -> Tuple[int, int]:
    """(window, count) of stripes of `width` along a side of n tokens (width 0: one window, the whole side)."""
    if width == 0:
        return n, 1
    return width, (n + width - 1) // width


def _pad_stripes(qkv: torch.Tensor, sh: int, sw: int, pad_mask: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, H, W, 3, C) zero-padded symmetrically to whole (sh, sw) stripes (the extra row/column at the
    bottom/right; 0: the whole side) and, with `pad_mask`, the (B * nW, 1, 1, N) bool mask of the real keys
    of each window (None when nothing is padded). One torch.fx node: the padding is decided at run time."""
    b, h, w = qkv.shape[0], qkv.shape[1], qkv.shape[2]
    (wh, nh), (ww, nw) = _stripes(h, sh), _stripes(w, sw)
    ph, pw = nh * wh - h, nw * ww - w
    top, left = ph // 2, pw // 2
    mask: Optional[torch.Tensor] = None
    if _needs_padding(ph, pw):
        qkv = F.pad(qkv, [0, 0, 0, 0, left, pw - left, top, ph - top])
        if pad_mask:
            real = _real_key_mask(nh, nw, wh, ww, top, left, h, w, qkv.device)  # (nW, N)
            mask = real[None].expand(b, nh * nw, wh * ww).reshape(b * nh * nw, 1, 1, wh * ww)
    return qkv, mask


def _crop_stripes(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of _pad_stripes' padding: the real (B, h, w, C) middle of a padded map. Under
    torch.compile / torch.export a gather of the real rows and columns: a slice would be contiguous for
    some sizes and not others, and torch.export would specialise the program to the traced case."""
    ph, pw = x.shape[1] - h, x.shape[2] - w
    if not _needs_padding(ph, pw):
        return x
    if torch.jit.is_scripting():
        return x[:, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]
    else:
        if compiling():
            rows = torch.arange(h, device=x.device) + ph // 2
            cols = torch.arange(w, device=x.device) + pw // 2
            return x.index_select(1, rows).index_select(2, cols)
        return x[:, ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


torch.fx.wrap("_pad_stripes")
torch.fx.wrap("_crop_stripes")


def stripe_windows(qkv: torch.Tensor, heads: int, sh: int, sw: int,
                   pad_mask: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(B, H, W, 3, C) channels-last qkv -> q, k, v of its windows of (sh, sw) stripes (0: the whole side),
    each (B * nW, heads, N, d) (4-D, so SDPA takes a fused kernel), and the mask of padded keys or None."""
    b, h, w, c = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[4]
    (wh, nh), (ww, nw) = _stripes(h, sh), _stripes(w, sw)
    qkv, mask = _pad_stripes(qkv, sh, sw, pad_mask)
    qkv = qkv.view(b, nh, wh, nw, ww, 3, heads, c // heads).permute(5, 0, 1, 3, 6, 2, 4, 7)
    qkv = qkv.reshape(3, b * nh * nw, heads, wh * ww, c // heads)
    return qkv[0], qkv[1], qkv[2], mask


def window_images(v: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """(B * nW, heads, wh*ww, d) -> (B * nW, heads * d, wh, ww): each window as its own small image, for LePE."""
    bw, heads, d = v.shape[0], v.shape[1], v.shape[3]
    return v.view(bw, heads, wh, ww, d).permute(0, 1, 4, 2, 3).reshape(bw, heads * d, wh, ww)


def window_tokens(img: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of window_images: (B * nW, heads * d, wh, ww) -> (B * nW, heads, wh*ww, d)."""
    bw, c, wh, ww = img.shape[0], img.shape[1], img.shape[2], img.shape[3]
    return img.view(bw, heads, c // heads, wh * ww).transpose(-1, -2)


def merge_windows(x: torch.Tensor, b: int, h: int, w: int, sh: int, sw: int) -> torch.Tensor:
    """(B * nW, heads, N, d) outputs of the windows of (sh, sw) stripes -> the (B, h, w, heads * d) map."""
    heads, d = x.shape[1], x.shape[3]
    (wh, nh), (ww, nw) = _stripes(h, sh), _stripes(w, sw)
    x = x.view(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, nh * wh, nw * ww, heads * d)
    return _crop_stripes(x, h, w)


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
        self.stripe_h = [wh or 0 for wh, _ in self.windows]  # the same as int lists (0: the whole side), for
        self.stripe_w = [ww or 0 for _, ww in self.windows]  # TorchScript, which cannot type a list of Nones
        self.branch_dim = dim // branches
        self.pad_mask = pad_mask
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = nn.ModuleList(nn.Conv2d(self.branch_dim, self.branch_dim, 3, padding=1, groups=self.branch_dim)
                                  for _ in self.windows)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, h, w, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # indexed: torch.fx traces it
        qkv = self.qkv(x).view(b, h, w, 3, c)
        dropout = self.attn_drop if self.training else 0.0
        parts = qkv.split(self.branch_dim, dim=-1)  # branch i takes the i-th slice of each of q, k, v
        outs: List[torch.Tensor] = []
        for i, lepe in enumerate(self.lepe):
            sh, sw = self.stripe_h[i], self.stripe_w[i]
            q, k, v, mask = stripe_windows(parts[i], self.heads, sh, sw, self.pad_mask)
            # LePE: a depthwise conv on V, each window seen as its own small image (zeros beyond its border)
            wh, ww = _stripes(h, sh)[0], _stripes(w, sw)[0]
            pos = window_tokens(lepe(window_images(v, wh, ww)), self.heads)
            outs.append(merge_windows(sdpa(q, k, v, mask, dropout) + pos, b, h, w, sh, sw))
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))


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
    __jit_unused_properties__ = ["feature_stages"]  # TorchScript reads self.stages (see forward_features)

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

    def forward_features(self, x):
        if not torch.jit.is_scripting():
            self.check_input(x)
        x = self.stem(x)
        for stage in self.stages:  # not self.feature_stages: TorchScript cannot iterate a property's modules
            x = stage(x)
        return self.norm(x)


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
