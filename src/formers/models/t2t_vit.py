"""T2T-ViT: Tokens-to-Token Vision Transformer.

Paper (catalog id 39): "Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet",
Yuan et al., arXiv 2101.11986. Official code: yitu-opensource/T2T-ViT (models/t2t_vit.py,
token_performer.py, token_transformer.py, transformer_block.py).

The idea, in three lines:
  instead of cutting the image into hard 16x16 patches, a Tokens-to-Token module soft-splits it with
      overlapping unfolds (7/s4, 3/s2, 3/s2) and, between splits, re-structures the tokens with a small
      one-head transformer (or Performer) layer and folds them back into an image, so local structure is modelled;
  the resulting 1/16 grid of tokens feeds a deep-narrow ViT backbone (cls token, fixed sinusoidal positions).

Two scales that are easy to get wrong, both reproduced here as in the official code:
  * the T2T-layer attention (`_t` variants) multiplies q.k by (its *input* width)^-0.5: 147^-0.5 after the
    first split (3*7*7 values), 576^-0.5 after the second (64*3*3) - not by its head width 64^-0.5;
  * the released checkpoints were trained with the backbone's attention scaled by embed_dim^-0.5 (the official
    factories set qk_scale = embed_dim**-0.5 when pretrained=True), not head_dim^-0.5. Our registered variants
    use that scale so that the official weights give the reported accuracy; pass `qk_scale="head_dim"` for
    head_dim^-0.5 (what the official code trains with from scratch).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from formers.checkpoint import release_state_dict
from formers.layers import Attention, DropPath, Mlp, resample_pos_embed, sdpa, to_2tuple
from formers.models.base import TokenBackbone, init_trunc_normal
from formers.registry import ModelCard, register_model

torch.fx.wrap("resample_pos_embed")  # the table is resized to the input's grid: one eager node under fx

__all__ = ["T2TViT", "TokensToToken", "TokenPerformer", "TokenTransformer", "sinusoid_table",
           "checkpoint_filter_fn"]


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """The fixed (1, n_position, dim) table of "Attention is all you need": channel 2i holds
    sin(p / 10000^(2i/dim)), channel 2i+1 cos of the same angle. Computed in float64, stored in float32."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    pair = torch.div(torch.arange(dim), 2, rounding_mode="floor").to(torch.float64)
    angle = pos / torch.pow(10000.0, 2.0 * pair / dim)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32)[None]


def _unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _soft_split(x, h: int, w: int, split: tuple[int, int, int]) -> tuple[torch.Tensor, int, int]:
    """(B, C, h, w) map -> (B, h' * w', C * k * k) overlapping patches (C outermost), h', w'."""
    k, s, p = split
    x = F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
    return x, _unfold_size(h, k, s, p), _unfold_size(w, k, s, p)


# ---------------------------------------------------------------------------------------------
# The T2T layers: a one-head attention whose value is also its skip path (input and output widths differ).

class TokenAttention(nn.Module):
    """One-head attention from `dim` input values to `out_dim` outputs; v is added back as the skip.

    q.k is scaled by `scale`, which the official code leaves at dim^-0.5 (the input width).
    """

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, scale: float | None = None):
        super().__init__()
        self.out_dim = out_dim
        self.scale = dim ** -0.5 if scale is None else scale
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # each (B, 1, N, out_dim)
        y = sdpa(q, k, v, dropout=self.attn_drop if self.training else 0.0, scale=self.scale)
        return v.squeeze(1) + self.proj_drop(self.proj(y.squeeze(1)))


class TokenTransformer(nn.Module):
    """T2T layer of the `_t` variants: x = TokenAttention(LN(x)); x = x + MLP(LN(x)) (MLP ratio 1)."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.0, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, out_dim, proj_drop=drop)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """T2T layer of the default variants: one-head Performer (FAVOR+ positive random features).

    softmax(q k^T) v is approximated by phi(q) (phi(k)^T v) / (phi(q) . sum_t phi(k_t)), with
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m) and w an (m, out_dim) matrix of m = kernel_ratio * out_dim
    orthogonal rows of norm sqrt(m), drawn once and frozen (it is saved with the weights; load it, never redraw).
    Note: no 1/sqrt(d) scaling of q and k, and the projection runs on k, q, v in that order, as in the
    official code. The random-feature products run in float32. Dropout defaults to the official 0.1.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1, eps: float = 1e-8):
        super().__init__()
        self.out_dim = out_dim
        self.m = int(out_dim * kernel_ratio)
        self.eps = eps
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.attn_drop = nn.Dropout(drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim)
        self.mlp_drop = nn.Dropout(drop)
        self.register_buffer("w", torch.empty(self.m, out_dim))
        self.reset_random_features()

    def reset_random_features(self):
        nn.init.orthogonal_(self.w)
        with torch.no_grad():
            self.w.mul_(math.sqrt(self.m))

    def random_features(self, x):
        """(B, T, d) -> (B, T, m), float32."""
        x = x.float()
        return torch.exp(x @ self.w.float().t() - 0.5 * x.pow(2).sum(-1, keepdim=True)) / math.sqrt(self.m)

    def attention(self, x):
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)
        kp, qp = self.random_features(k), self.random_features(q)
        denom = qp @ kp.sum(dim=1).unsqueeze(-1)                   # (B, T, 1)
        y = (qp @ (kp.transpose(1, 2) @ v.float())) / (denom + self.eps)  # (B, T, out_dim)
        return v + self.attn_drop(self.proj(y.to(v.dtype)))

    def forward(self, x):
        x = self.attention(self.norm1(x))
        return x + self.mlp_drop(self.mlp(self.norm2(x)))


class TokensToToken(nn.Module):
    """Soft split -> [T2T layer -> fold back to a map -> soft split] x 2 -> Linear to embed_dim.

    The splits are unfolds with kernel/stride/padding 7/4/2, 3/2/1, 3/2/1, so an HxW image gives
    about H/16 x W/16 tokens (exactly floor((H-3)/4)+1 halved twice, rounding up). Keys follow the
    official module: attention1, attention2, project.
    """

    splits = ((7, 4, 2), (3, 2, 1), (3, 2, 1))
    __constants__ = ["splits"]  # for TorchScript

    def __init__(self, tokens_type: str = "performer", in_chans: int = 3, embed_dim: int = 768,
                 token_dim: int = 64, performer_drop: float = 0.1):
        super().__init__()
        (k0, _, _), (k1, _, _), (k2, _, _) = self.splits
        dims = (in_chans * k0 * k0, token_dim * k1 * k1)
        if tokens_type == "performer":
            self.attention1 = TokenPerformer(dims[0], token_dim, drop=performer_drop)
            self.attention2 = TokenPerformer(dims[1], token_dim, drop=performer_drop)
        elif tokens_type == "transformer":
            self.attention1 = TokenTransformer(dims[0], token_dim)
            self.attention2 = TokenTransformer(dims[1], token_dim)
        else:
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)

    @classmethod
    def grid(cls, hw) -> tuple[int, int]:
        h, w = hw
        for k, s, p in cls.splits:
            h, w = _unfold_size(h, k, s, p), _unfold_size(w, k, s, p)
        return h, w

    def forward(self, x):
        """(B, C, H, W) -> tokens (B, h*w, embed_dim) and the grid (h, w)."""
        # written out split by split (TorchScript indexes neither modules nor tuples by a loop variable);
        # no -1 in the reshapes (a batch of 0 works), no unpacking of x.shape (torch.fx traces it)
        h, w = x.shape[-2], x.shape[-1]
        x, h, w = _soft_split(x, h, w, self.splits[0])
        x = self.attention1(x).transpose(1, 2).unflatten(2, (h, w))
        x, h, w = _soft_split(x, h, w, self.splits[1])
        x = self.attention2(x).transpose(1, 2).unflatten(2, (h, w))
        x, h, w = _soft_split(x, h, w, self.splits[2])
        return self.project(x), (h, w)


# ---------------------------------------------------------------------------------------------
# The backbone: a plain pre-norm ViT.

class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); qkv without bias, as in the official backbone."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              scale=qk_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class T2TViT(TokenBackbone):
    """T2T module, cls token + fixed sinusoidal position table, `depth` pre-norm blocks, LayerNorm, head.

    `qk_scale` scales q.k in the backbone blocks: "head_dim" (head_dim^-0.5, this class's default and the
    official class's), "embed_dim" (embed_dim^-0.5, what the released weights need; the registered variants'
    default) or a number.

    The position table (and each Performer's random matrix `w`) is a persistent buffer: saved and
    loaded under the official key name but never trained (the official code holds them as frozen
    Parameters). For an input of another size than `img_size`, the grid part of the table is
    resized bicubically on the fly, as the official transfer-learning loader resizes it.

    Features follow timm's ViTs: one entry per block (`blocks.i`, stride 16), each the patch tokens
    reshaped to an NCHW map (cls token dropped). forward_features returns all normalised tokens
    (B, 1 + h*w, C), cls first; the head reads the cls token (global_pool='token') or the mean of
    the patch tokens ('avg').
    """

    output_fmt = "NLC"  # forward_features returns the tokens (B, 1 + N, C)

    num_prefix_tokens = 1
    min_input_size = 3

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size=224, tokens_type: str = "performer",
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, qk_scale: float | str = "head_dim", token_dim: int = 64,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 performer_drop: float = 0.1, global_pool: str = "token"):
        super().__init__()
        if isinstance(qk_scale, str):
            if qk_scale not in ("head_dim", "embed_dim"):
                raise ValueError(f"qk_scale must be a number, 'head_dim' or 'embed_dim', got {qk_scale!r}")
            qk_scale = None if qk_scale == "head_dim" else embed_dim ** -0.5
        h, w = to_2tuple(img_size)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size if isinstance(img_size, int) else (h, w)
        self.global_pool = self.check_pool(global_pool)
        self.num_features = self.embed_dim = embed_dim

        self.tokens_to_token = TokensToToken(tokens_type, in_chans, embed_dim, token_dim, performer_drop)
        self.grid = TokensToToken.grid((h, w))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=16, module=f"blocks.{i}") for i in range(depth)]
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_trunc_normal)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def _embed(self, x):
        """Image -> tokens (B, 1 + h*w, C) with the cls token and positions, and the grid (h, w)."""
        x, hw = self.tokens_to_token(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = resample_pos_embed(self.pos_embed, hw, self.grid, self.num_prefix_tokens, mode="bicubic")
        return self.pos_drop(x + pos), hw


def checkpoint_filter_fn(state_dict: dict, model: T2TViT) -> dict:
    """Map an official T2T-ViT release (or our own state dict) to our key names.

    The official names are kept except the Performer MLP, an nn.Sequential there:
    tokens_to_token.attention{1,2}.mlp.{0,2}.* -> .mlp.{fc1,fc2}.*. The Performer matrices
    (`tokens_to_token.attention{1,2}.w`) and the sinusoid `pos_embed` are loaded as saved; a
    position table made for another grid is resized bicubically (cls entry kept), as the official
    loader does. timm has no T2T-ViT.
    """
    state_dict = release_state_dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        if k.startswith("tokens_to_token.attention"):
            k = k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.")
        out[k] = v
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        from formers.checkpoint import does_not_fit
        if pos.dim() != 3 or pos.shape[2] != model.pos_embed.shape[2] or pos.shape[1] <= model.num_prefix_tokens:
            raise does_not_fit(model, f"pos_embed has shape {tuple(pos.shape)}; the model's is "
                                      f"{tuple(model.pos_embed.shape)} (1, tokens, channels)")
        n = pos.shape[1] - model.num_prefix_tokens
        side = math.isqrt(n)
        if side * side != n:
            raise does_not_fit(model, f"pos_embed: cannot resize a table of {n} grid entries (not a square grid) "
                             f"to {model.grid[0]}x{model.grid[1]}")
        out["pos_embed"] = resample_pos_embed(pos, model.grid, (side, side), model.num_prefix_tokens,
                                              mode="bicubic")
    return out


# ---------------------------------------------------------------------------------------------
# Variants. Params / MACs / top-1 from the official README (ImageNet-1K). The README's parameter
# counts include the frozen position table and Performer matrices (buffers here): see the notes.

# The first layer that sees pixels is a Linear on the 7x7 unfold (C*49 inputs, C outermost).
_CFG = dict(reduction=16, crop_pct=0.9, interpolation="bicubic", first_conv="tokens_to_token.attention1.kqv",
            classifier="head")
_CFG_T = dict(_CFG, first_conv="tokens_to_token.attention1.attn.qkv")


def _card(name: str, params: str, macs: float | None, top1: float, img_size: int = 224, notes: str = "") -> ModelCard:
    base = ("README #params count the frozen sinusoid pos_embed and Performer w (buffers here, not parameters); "
            "backbone qk_scale = embed_dim^-0.5 as the released weights need")
    return ModelCard(paper=39, arxiv="2101.11986", repo="yitu-opensource/T2T-ViT", official_name=name,
                     params_m=params, macs_g=macs, img_size=img_size, top1=top1,
                     notes=base + (f"; {notes}" if notes else ""))


def _create(tokens_type: str, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, **kwargs) -> T2TViT:
    kwargs.setdefault("qk_scale", "embed_dim")
    return T2TViT(tokens_type=tokens_type, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  mlp_ratio=mlp_ratio, **kwargs)


@register_model(_card("T2T-ViT-7", "4.3", 1.1, 71.7), **_CFG)
def t2t_vit_7(**kwargs):
    return _create("performer", 256, 7, 4, 2.0, **kwargs)


@register_model(_card("T2T-ViT-10", "5.9", 1.5, 75.2), **_CFG)
def t2t_vit_10(**kwargs):
    return _create("performer", 256, 10, 4, 2.0, **kwargs)


@register_model(_card("T2T-ViT-12", "6.9", 1.8, 76.5), **_CFG)
def t2t_vit_12(**kwargs):
    return _create("performer", 256, 12, 4, 2.0, **kwargs)


@register_model(_card("T2T-ViT-14", "21.5", 4.8, 81.5), **_CFG)
def t2t_vit_14(**kwargs):
    return _create("performer", 384, 14, 6, 3.0, **kwargs)


@register_model(_card("T2T-ViT-19", "39.2", 8.5, 81.9), **_CFG)
def t2t_vit_19(**kwargs):
    return _create("performer", 448, 19, 7, 3.0, **kwargs)


@register_model(_card("T2T-ViT-24", "64.1", 13.8, 82.3), **_CFG)
def t2t_vit_24(**kwargs):
    return _create("performer", 512, 24, 8, 3.0, **kwargs)


@register_model(_card("T2T-ViT_t-14", "21.5", 6.1, 81.7), **_CFG_T)
def t2t_vit_t_14(**kwargs):
    return _create("transformer", 384, 14, 6, 3.0, **kwargs)


@register_model(_card("T2T-ViT_t-19", "39.2", 9.8, 82.4), **_CFG_T)
def t2t_vit_t_19(**kwargs):
    return _create("transformer", 448, 19, 7, 3.0, **kwargs)


@register_model(_card("T2T-ViT_t-24", "64.1", 15.0, 82.6), **_CFG_T)
def t2t_vit_t_24(**kwargs):
    return _create("transformer", 512, 24, 8, 3.0, **kwargs)


@register_model(_card("T2T-ViT-14 (384)", "21.7", None, 83.3, img_size=384,
                      notes="trained at 384; the README gives no MACs"), **_CFG)
def t2t_vit_14_384(**kwargs):
    kwargs.setdefault("img_size", 384)
    return _create("performer", 384, 14, 6, 3.0, **kwargs)


@register_model(ModelCard(paper=39, arxiv="2101.11986", repo="yitu-opensource/T2T-ViT", official_name="",
                          img_size=64, status="reduced",
                          notes="demo: T2T module (performer, token_dim 32) + 4 blocks of width 96, 3 heads"),
                **_CFG)
def t2t_vit_demo(**kwargs):
    kwargs.setdefault("img_size", 64)
    kwargs.setdefault("token_dim", 32)
    return _create("performer", 96, 4, 3, 2.0, **kwargs)
